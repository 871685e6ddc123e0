"""Derive a bundle variant (another pruning rate or occluding stride) without re-exporting:
the threshold for every calibrated rate is in the manifest, and the stride only changes the
window family. Written to a temp dir and renamed; hashes recomputed (no torch). Like `build`, it
rewrites a bundle: a new prefix is proven local again (export/locality.py) and the known answers
re-recorded through the runtime (runtime/probes.py)."""
from __future__ import annotations

import copy
import os
import shutil

import numpy as np
import onnx_ir as ir

from scalecert.bundle import manifest as manifest_io
from scalecert.bundle.bundle import Bundle
from scalecert.bundle.staging import staging
from scalecert.core import geometry
from scalecert.errors import ScaleCertError


def _set_threshold(prefix_path: str, tau: float) -> None:
    model = ir.load(prefix_path)
    value = model.graph.initializers.get("sin_threshold")
    if value is None:
        raise ScaleCertError(f"{prefix_path}: no sin_threshold initializer; re-export the bundle")
    value.const_value = ir.tensor(np.array(tau, np.float32), name="sin_threshold")
    ir.save(model, prefix_path)


def _drop_engines(work: str, manifest: dict) -> None:
    for entry in (manifest.pop("engines", None) or {}).values():
        for part in ("prefix", "suffix"):  # bundles built before the prefix engine was dropped have both
            if part in entry:
                os.remove(os.path.join(work, entry[part]))
                del manifest["files"][entry[part]]
    for key in [k for k in manifest["margin"] if k.startswith("trt-")]:
        del manifest["margin"][key]
        manifest.get("margin_measurement", {}).pop(key, None)


def _reference_answers(bundle: Bundle) -> dict:
    """The known answers of the new gate or window family (ONNX Runtime CPU fp32); the other
    backends' answers were recorded for the old one and are dropped with their margins' meaning."""
    from scalecert.runtime import probes
    from scalecert.runtime.certifier import Certifier

    with Certifier(bundle, "ort-cpu", "fp32") as certifier:
        return {manifest_io.margin_key("ort-cpu", "fp32"): probes.answers(certifier, bundle)}


def _confirm_prefixes(work: str, manifest: dict, bundle: Bundle) -> None:
    """A new threshold is a new prefix file: prove and check its locality again (export/locality.py)."""
    from scalecert.export.locality import confirm
    from scalecert.runtime.probes import probe_pixels

    pixels = probe_pixels(bundle)
    manifest["locality"] = {files["prefix"]: confirm(work, manifest, files["prefix"], pixels)
                            for files in bundle.precisions.values()}


def derive(bundle_dir: str, output: str, prune_rate: float | None = None, stride: int | None = None) -> str:
    """A copy of the bundle at `output` with another pruning rate (threshold from the calibrated
    table, set in every precision's prefix) and/or occluding stride (a new window family)."""
    bundle = Bundle.open(bundle_dir)
    manifest = copy.deepcopy(bundle.manifest)
    with staging(output, ".scalecert-variant-") as work:
        for name in manifest["files"]:
            os.makedirs(os.path.dirname(os.path.join(work, name)), exist_ok=True)  # engines/ sit in a subfolder
            shutil.copy2(os.path.join(bundle_dir, name), os.path.join(work, name))
        if prune_rate is not None and prune_rate != manifest["sin"]["prune_rate"]:
            tau = bundle.threshold_for_rate(prune_rate)
            for files in bundle.precisions.values():
                _set_threshold(os.path.join(work, files["prefix"]), tau)
            _drop_engines(work, manifest)  # built with the old tau baked in
            manifest["sin"].update({"prune_rate": round(prune_rate * 100) / 100, "threshold": tau, "prune_rate_auto": None})
        if stride is not None and stride != bundle.stride:
            windows = geometry.window_family(bundle.footprint, stride, bundle.feature_hw)
            manifest["windows"].update({"stride": stride, "count": len(windows), "budget": None,
                                        "size": [int(windows[0, 2] - windows[0, 0]), int(windows[0, 3] - windows[0, 1])]})
        changed = (prune_rate is not None and prune_rate != bundle.manifest["sin"]["prune_rate"]) or \
            (stride is not None and stride != bundle.stride)
        manifest["files"] = manifest_io.describe_files(work, list(manifest["files"]))
        if prune_rate is not None and prune_rate != bundle.manifest["sin"]["prune_rate"]:
            _confirm_prefixes(work, manifest, bundle)
        if changed and manifest.get("probes"):
            manifest["probes"]["answers"] = _reference_answers(Bundle(work, manifest))
        manifest["files"] = manifest_io.describe_files(work, list(manifest["files"]))
        manifest["derived_from"] = os.path.abspath(bundle_dir)
        manifest_io.write(work, manifest)
    return output
