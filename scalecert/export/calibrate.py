"""SIN calibration at export: channel importances alpha and the gate threshold tau, both static
(docs/design.md §3.3), from calibration images, from a `scalecert tune` record, or uniform.

The pruning rate is chosen with the layer and stride by the measured plan (export/plan.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from scalecert.core import sin
from scalecert.export.layers import Layer
from scalecert.graph import save_checked



@dataclass
class CalibrationSet:
    images: np.ndarray  # normalised (N, C, H, W)
    labels: list  # int or None per image

    @classmethod
    def load(cls, items, input_spec: dict) -> "CalibrationSet":
        from scalecert.runtime.images import load_image, normalize

        images = normalize(np.stack([load_image(p, input_spec) for p, _ in items]), input_spec)
        return cls(images, [label for _, label in items])

    @property
    def labelled(self) -> bool:
        return None not in self.labels


@dataclass
class Importance:
    alpha: np.ndarray
    note: str  # how it was computed, for the manifest
    features: np.ndarray | None = None  # ungated calibration features, when images were used


@dataclass
class GateChoice:
    rate: float = 0.0
    threshold: float = -1.0  # below every score: the dense model, exactly
    threshold_by_rate: list | None = None
    notes: list = field(default_factory=list)


def run_onnx(path: str, feeds_list, output: str) -> np.ndarray:
    from scalecert.runtime.pipelines.onnxruntime import OrtRunner

    with OrtRunner(path) as runner:
        return np.concatenate([runner.infer(f)[output] for f in feeds_list])


def ungated_features(model: ir.Model, layer: Layer, calibration: CalibrationSet, work: str) -> np.ndarray:
    """The superficial tensor A on every calibration image (an ungated prefix, run once)."""
    from scalecert.export.split import build_prefix

    path = os.path.join(work, "features.onnx")
    save_checked(build_prefix(model, layer, np.ones(layer.shape[0], np.float32), -1.0, "abs", remove_dead=False), path)
    try:
        x = calibration.images
        return run_onnx(path, [{"image": x[i:i + 32]} for i in range(0, len(x), 32)], "features")
    finally:
        os.remove(path)


def blank_features(model: ir.Model, layer: Layer, input_chw, work: str) -> np.ndarray:
    """The layer's features (C, H', W') of a blank image: 0 after normalisation, the pixel baseline's
    mask value. Windows are filled with it (--fill blank, docs/design.md §2)."""
    blank = CalibrationSet(np.zeros((1, *input_chw), np.float32), [None])
    return ungated_features(model, layer, blank, work)[0]


def channel_importance(model: ir.Model, program, layer: Layer, calibration: CalibrationSet | None, record: dict | None,
                       phi: str, channel_prune: float, work: str) -> Importance:
    if calibration is not None:
        features = ungated_features(model, layer, calibration, work)
        taylor = None
        if program is not None:
            from scalecert.export.taylor import taylor_scores

            taylor = taylor_scores(program, layer.name, calibration.images,
                                   calibration.labels if calibration.labelled else None)
        if taylor is not None:
            alpha, note = sin.taylor_importance(*taylor), "taylor |A*dL/dA|"
        else:
            alpha, note = sin.gradient_free_importance(features, phi), "inverse mean magnitude"
        return Importance(sin.kill_channels(alpha, channel_prune), note, features)
    if record is not None:
        return Importance(sin.kill_channels(np.asarray(record["alpha"], np.float32), channel_prune),
                          f"{record['importance']} (from the scalecert tune record)")
    return Importance(np.ones(layer.shape[0], np.float32), "uniform (no calibration data)")


def choose_gate(importance: Importance, calibration: CalibrationSet | None, record: dict | None, live: np.ndarray,
                prune_rate: str, phi: str) -> GateChoice:
    """The threshold for the pruning rate (chosen by the plan, given, or the tune record's), and
    the full threshold table when calibrated (bench sweeps rates without re-export)."""
    from scalecert.errors import ScaleCertError

    choice = GateChoice()
    if calibration is not None:
        score = sin.scores(importance.features, importance.alpha, phi)
        choice.threshold_by_rate = [sin.threshold_for_rate(score, r / 100) for r in range(100)]
        choice.rate = 0.0 if prune_rate == "auto" else float(prune_rate)
        choice.threshold = sin.threshold_for_rate(score, choice.rate)
    elif record is not None:
        choice.threshold_by_rate = table = record["threshold_by_rate"]
        choice.rate = record["prune_rate"] if prune_rate == "auto" else float(prune_rate)
        if abs(round(choice.rate * 100) - choice.rate * 100) > 1e-9:
            raise ScaleCertError(f"--prune-rate {choice.rate}: a tuned checkpoint's thresholds come in steps of 0.01")
        choice.threshold = table[round(choice.rate * 100)] if choice.rate > 0 else -1.0
        choice.notes.append(f"SIN gate from the tune record: prune rate {choice.rate}, threshold {choice.threshold:.6g}")
    elif prune_rate == "auto":
        choice.notes.append("--prune-rate auto chose 0 (no --calib images to measure what a gate costs)")
    return choice
