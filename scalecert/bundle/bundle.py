"""The typed bundle: one place that turns a manifest into the facts every stage needs.

A bundle is a folder: manifest.json (bundle/manifest.py), prefix.onnx (image -> gated features,
gate map), suffix.onnx (features + window rectangles -> logits), precision variants and engines
(`scalecert build`). See docs/design.md §5.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from scalecert.bundle import manifest as manifest_io
from scalecert.core import geometry
from scalecert.errors import BundleError


class Bundle:
    def __init__(self, path: str, manifest: dict):
        self.path, self.manifest = path, manifest

    @classmethod
    def open(cls, path: str, verify: bool = True) -> "Bundle":
        """Read and check the manifest (schema, required keys and, with verify, every file hash)."""
        return cls(path, manifest_io.read(path, verify=verify))

    # -- the threat model and the split ----------------------------------------------------------
    @property
    def input_spec(self) -> dict:
        """input_size (C, H, W), resize_short, mean, std: how the runtime prepares an image."""
        return self.manifest["input"]

    @property
    def image_hw(self) -> tuple[int, int]:
        return tuple(self.manifest["input"]["input_size"][1:])

    @property
    def patch_hw(self) -> tuple[int, int]:
        return tuple(self.manifest["threat_model"]["patch"])

    @property
    def feature_hw(self) -> tuple[int, int]:
        return tuple(self.manifest["layer"]["shape"][1:])

    @property
    def receptive_field(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """((stride, lo, hi) for y, the same for x): feature i sees pixels [i*stride+lo, i*stride+hi]."""
        rf = self.manifest["layer"]["receptive_field"]
        return tuple(rf["y"]), tuple(rf["x"])

    @property
    def footprint(self) -> tuple[int, int]:
        return tuple(self.manifest["windows"]["footprint"])

    @property
    def stride(self) -> int:
        return int(self.manifest["windows"]["stride"])

    @property
    def window_filled(self) -> bool:
        """Whether windows hold a fill other than 0 (--fill blank, docs/design.md §2): then what an
        occluded row holds depends on the whole window, not only on its kept positions (§3.5)."""
        return self.manifest["windows"].get("fill", "zero") == "blank"

    @property
    def classes(self) -> list[str] | None:
        return self.manifest.get("classes")

    @property
    def default_threshold(self) -> float:
        """The confidence threshold T the bundle was exported with (docs/design.md §7)."""
        return float(self.manifest.get("decision", {}).get("threshold", 0.0))

    @property
    def default_mode(self) -> str:
        """What `scalecert certify` does without --mode: "detect" or "recover" (docs/design.md §10)."""
        return self.manifest.get("decision", {}).get("mode", manifest_io.DEFAULT_MODE)

    @property
    def suffix_takes_pairs(self) -> bool:
        """Whether suffix.onnx takes several rectangles per row (exported with recovery support).
        Bundles exported before it take exactly one rectangle per row: they detect, never recover."""
        return "windows" in self.manifest.get("tensors", {}).get("suffix", {})

    @property
    def suffix_max_rows(self) -> int | None:
        """Rows one suffix call takes: 1 for a model whose fixed batch of 1 was kept at export
        (export/batch.py), None for a symbolic batch."""
        return self.manifest["tensors"]["suffix"].get("max_batch")

    @property
    def suffix_macs(self) -> float:
        return self.manifest.get("stats", {}).get("suffix", {}).get("macs") or 0

    @functools.cached_property
    def _windows(self) -> np.ndarray:
        windows = geometry.window_family(self.footprint, self.stride, self.feature_hw)
        if len(windows) != self.manifest["windows"]["count"]:
            raise BundleError(f"{self.path}: window family mismatch ({len(windows)} vs "
                                 f"{self.manifest['windows']['count']}); re-export the bundle")
        return windows

    def windows(self) -> np.ndarray:
        """The certification window family, (n, 4) [y0, x0, y1, x1) in feature positions."""
        return self._windows

    # -- files, precisions, margins, engines ------------------------------------------------------
    @property
    def precisions(self) -> dict:
        """{precision: {"prefix": file, "suffix": file, ...}}; an un-built bundle has fp32 only."""
        return self.manifest.get("precisions") or {"fp32": dict(manifest_io.FP32_FILES)}

    def files(self, precision: str = "fp32") -> dict[str, str]:
        """{"prefix": path, "suffix": path} of one precision variant, or one line saying how to add it."""
        if precision not in manifest_io.PRECISIONS:
            raise BundleError(f"unknown precision {precision!r} ({', '.join(manifest_io.PRECISIONS)})")
        variant = self.precisions.get(precision)
        if variant is None:
            raise BundleError(f"this bundle has no {precision} variant; add one with "
                                 f"`scalecert build BUNDLE --precision {precision}`")
        return {part: os.path.join(self.path, variant[part]) for part in ("prefix", "suffix")}

    def proven_prefix(self, precision: str = "fp32") -> str:
        """The prefix file of a precision, refused unless its locality was proven and checked for
        exactly these bytes (export/locality.py, docs/design.md §3.1); the caller has verified the
        file hashes. Bundles exported before the check have no record: they must be re-exported."""
        name = self.precisions[precision]["prefix"]
        record = (self.manifest.get("locality") or {}).get(name)
        if record is None:
            raise BundleError(f"{self.path}: {name} has no locality record (exported by a scalecert that did not "
                                 "prove and check the prefix at export); re-export the bundle")
        sha = (self.manifest["files"].get(name) or {}).get("sha256")
        if record.get("sha256") != sha or not record.get("check", {}).get("passed"):
            raise BundleError(f"{self.path}: {name} is not the file whose locality was proven; re-export the bundle")
        return os.path.join(self.path, name)

    def margin(self, backend: str, precision: str) -> float | None:
        """The numeric margin delta measured for this backend and precision, None if never measured."""
        value = self.manifest["margin"].get(manifest_io.margin_key(backend, precision))
        return None if value is None else float(value)

    @property
    def probe_images(self) -> list[str]:
        """Known-answer probe images (runtime/probes.py), relative to the bundle; hashed like every file."""
        return list((self.manifest.get("probes") or {}).get("images") or [])

    def probe_answers(self, backend: str, precision: str) -> list[dict] | None:
        """The certifier's recorded answers for the probe images on this backend and precision."""
        return ((self.manifest.get("probes") or {}).get("answers") or {}).get(manifest_io.margin_key(backend, precision))

    def engines(self, precision: str) -> dict | None:
        return (self.manifest.get("engines") or {}).get(f"trt-{precision}")

    def threshold_for_rate(self, rate: float) -> float:
        """The calibrated gate threshold for another pruning rate (steps of 0.01)."""
        table = self.manifest["sin"].get("threshold_by_rate")
        if table is None:
            raise BundleError(f"{self.path}: exported without --calib, so it has no thresholds for other "
                                 "pruning rates; re-export with --calib DIR")
        index = round(rate * 100)
        if not 0 <= index < len(table) or abs(index / 100 - rate) > 1e-9:
            raise BundleError(f"prune rate {rate}: sweeps take rates in steps of 0.01 below 1")
        return table[index] if index > 0 else -1.0
