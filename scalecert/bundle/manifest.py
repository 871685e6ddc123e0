"""The bundle manifest: versioned schema, JSON round trip, file hashes (no torch).

Code reads a manifest through `scalecert.bundle.Bundle`; this module is its file format."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, dataclass, field, fields

from scalecert.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")  # the variants a bundle can hold (`scalecert build` adds fp16/int8)
FP32_FILES = {"prefix": "prefix.onnx", "suffix": "suffix.onnx"}
MODES = ("detect", "recover")  # manifest["decision"]["mode"]: what `scalecert certify` does by default
DEFAULT_MODE = "detect"  # manifests written before recovery existed have no mode: they detect


@dataclass
class Manifest:
    """Every top-level field of manifest.json (schema 1), typed: the one home of the schema. Export
    builds one (export/record.py); `build` and derived bundles add `precisions`, `engines`,
    `doctor`, `derived_from`; code reads a bundle through bundle.Bundle. Sub-fields are documented
    here and in docs/design.md §5."""

    input: dict  # input_size [C, H, W], resize_short (None: straight to size), mean, std
    threat_model: dict  # patch [h, w] input pixels, patch_spec, image [h, w], for_source {size, patch, patch_spec}
    layer: dict  # name, scope, requested, shape [C, H', W'], channels_kept, receptive_field {y, x, size}, max_growth
    windows: dict  # footprint [h, w], stride, size [h, w], count, budget, fill ("zero" | "blank")
    sin: dict  # phi, importance, prune_rate, threshold (tau), alpha, threshold_by_rate, dead channels, ...
    tensors: dict  # prefix/suffix input and output names; suffix windows layout, max_batch (a kept batch of 1)
    files: dict  # {relative path: {sha256, bytes}} of every file of the bundle
    margin: dict  # {"<backend>-<precision>": delta}: the numeric margin per engine (docs/design.md §3.6)
    # {prefix file: {sha256, proof, check}}: the runtime opens only a proven prefix (§3.1); optional when
    # read, so that a bundle made before it gets the one line that says to re-export (Bundle.proven_prefix)
    locality: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # the model file: file, path, sha256, kind, arch, pretrained, batch
    num_classes: int | None = None
    classes: list | None = None
    margin_measurement: dict = field(default_factory=dict)  # how each margin was measured
    stats: dict = field(default_factory=dict)  # params and MACs of full model, prefix, suffix
    tools: dict = field(default_factory=dict)  # tool_versions() at export
    created: str = ""
    plan: dict | None = None  # how the split was chosen: measured (candidates), geometric or given
    decision: dict | None = None  # threshold T and default mode
    probes: dict | None = None  # known-answer images and the answers per engine
    export_seconds: dict = field(default_factory=dict)  # seconds per export stage: where the time went
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


REQUIRED = tuple(f.name for f in fields(Manifest) if f.default is MISSING and f.default_factory is MISSING) + (
    "schema_version",)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(bundle_dir: str, names) -> dict:
    return {n: {"sha256": sha256(os.path.join(bundle_dir, n)), "bytes": os.path.getsize(os.path.join(bundle_dir, n))}
            for n in sorted(names)}


def write(bundle_dir: str, manifest: dict) -> None:
    tmp = os.path.join(bundle_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, os.path.join(bundle_dir, MANIFEST))


def read(bundle_dir: str, verify: bool = True) -> dict:
    """Load and check a bundle's manifest: schema, required keys and, with verify, every file hash."""
    if not os.path.isdir(bundle_dir):
        raise BundleError(f"{bundle_dir}: no such bundle directory")
    path = os.path.join(bundle_dir, MANIFEST)
    if not os.path.isfile(path):
        raise BundleError(f"{bundle_dir}: not a scalecert bundle (no {MANIFEST}); create one with scalecert-export")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: corrupt manifest ({exc})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise BundleError(f"{path}: no schema_version; not a scalecert manifest")
    if version > SCHEMA_VERSION:
        raise BundleError(f"{bundle_dir}: bundle schema {version} is newer than this scalecert "
                             f"(reads up to {SCHEMA_VERSION}); upgrade scalecert")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks {', '.join(missing)}")
    if verify:
        for name, meta in manifest["files"].items():
            file = os.path.join(bundle_dir, name)
            if not os.path.isfile(file):
                raise BundleError(f"{bundle_dir}: {name} is missing; re-export the bundle")
            if sha256(file) != meta["sha256"]:
                raise BundleError(f"{bundle_dir}: {name} does not match its sha256 in the manifest "
                                     "(modified or corrupt); re-export the bundle")
    return manifest


def check_mode(mode: str) -> str:
    if mode not in MODES:
        from scalecert.errors import OptionError

        raise OptionError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def margin_key(backend: str, precision: str) -> str:
    """The key of a measured numeric margin in manifest["margin"], e.g. "ort-cpu-int8"; the same key
    names a backend's known answers in manifest["probes"]["answers"] and its device probes in
    manifest["doctor"]."""
    return f"{backend}-{precision}"


def tool_versions() -> dict:
    """The versions that made (or measured) a bundle: scalecert and the libraries it ran on; the one
    list the manifest and bench reports record."""
    import importlib.metadata as md

    from scalecert import __version__

    versions = {"scalecert": __version__}
    for name in ("torch", "onnx", "onnx-ir", "onnxruntime", "onnxscript", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions
