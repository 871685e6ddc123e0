"""Derive a bundle variant (another pruning rate or occluding stride) without re-exporting:
the threshold for every calibrated rate is in the manifest, and the stride only changes the
window family. Written to a temp dir and renamed; hashes recomputed (no torch)."""
from __future__ import annotations

import copy
import os
import shutil

import numpy as np
import onnx_ir as ir

from . import manifest as manifest_io
from .errors import ScaleCertError
from .runtime import geometry


def _set_threshold(prefix_path: str, tau: float) -> None:
    model = ir.load(prefix_path)
    value = model.graph.initializers.get("sin_threshold")
    if value is None:
        raise ScaleCertError(f"{prefix_path}: no sin_threshold initializer; re-export the bundle")
    value.const_value = ir.tensor(np.array(tau, np.float32), name="sin_threshold")
    ir.save(model, prefix_path)


def derive(bundle: str, output: str, prune_rate: float | None = None, stride: int | None = None) -> str:
    manifest = copy.deepcopy(manifest_io.read(bundle))
    with manifest_io.staging(output, ".scalecert-variant-") as work:
        for name in manifest["files"]:
            os.makedirs(os.path.dirname(os.path.join(work, name)), exist_ok=True)  # engines/ sit in a subfolder
            shutil.copy2(os.path.join(bundle, name), os.path.join(work, name))
        if prune_rate is not None and prune_rate != manifest["sin"]["prune_rate"]:
            table = manifest["sin"].get("threshold_by_rate")
            if table is None:
                raise ScaleCertError(f"{bundle}: exported without --calib, so it has no thresholds for other "
                                     "pruning rates; re-export with --calib DIR")
            index = round(prune_rate * 100)
            if not 0 <= index < len(table) or abs(index / 100 - prune_rate) > 1e-9:
                raise ScaleCertError(f"prune rate {prune_rate}: sweeps take rates in steps of 0.01 below 1")
            tau = table[index] if index > 0 else -1.0
            for files in manifest.get("precisions", {"fp32": {"prefix": "prefix.onnx"}}).values():
                _set_threshold(os.path.join(work, files["prefix"]), tau)
            manifest["sin"].update({"prune_rate": index / 100, "threshold": tau, "prune_rate_auto": None})
        if stride is not None and stride != manifest["windows"]["stride"]:
            if stride < 1:
                raise ScaleCertError(f"stride {stride}: must be positive")
            feature_hw = tuple(manifest["layer"]["shape"][1:])
            windows = geometry.window_family(tuple(manifest["windows"]["footprint"]), stride, feature_hw)
            manifest["windows"].update({"stride": stride, "count": len(windows), "budget": None,
                                        "size": [int(windows[0, 2] - windows[0, 0]), int(windows[0, 3] - windows[0, 1])]})
        manifest["files"] = manifest_io.describe_files(work, list(manifest["files"]))
        manifest["derived_from"] = os.path.abspath(bundle)
        manifest_io.write(work, manifest)
    return output
