"""The bundle manifest: versioned schema, JSON round trip, file hashes (no torch).

Code reads a manifest through `scalecert.bundle.Bundle`; this module is its file format."""
from __future__ import annotations

import hashlib
import json
import os

from scalecert.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")  # the variants a bundle can hold (`scalecert build` adds fp16/int8)
FP32_FILES = {"prefix": "prefix.onnx", "suffix": "suffix.onnx"}
MODES = ("detect", "recover")  # manifest["decision"]["mode"]: what `scalecert certify` does by default
DEFAULT_MODE = "detect"  # manifests written before recovery existed have no mode: they detect
REQUIRED = ("schema_version", "input", "threat_model", "layer", "windows", "sin", "tensors", "files", "margin")


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
