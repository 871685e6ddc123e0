"""What export measures on the finished graphs: the numeric margin, the known answers of the probe
images, the savings of removed channels (all through ONNX Runtime CPU, as the runtime runs them)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from scalecert.bundle import Bundle
from scalecert.bundle import manifest as manifest_io
from scalecert.core import margin as core_margin
from scalecert.export.options import Request
from scalecert.export.plan import SplitPlan
from scalecert.export.split import build_prefix, build_suffix
from scalecert.export.stats import graph_stats, with_shapes
from scalecert.runtime import probes
from scalecert.runtime.certifier import Certifier
from scalecert.runtime.images import load_image, normalize
from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline, window_parallel


def removal_savings(model: ir.Model, plan: SplitPlan, phi: str, stats: dict, dense_fill) -> dict:
    channels = plan.layer.shape[0]
    dense_prefix = graph_stats(with_shapes(build_prefix(model, plan.layer, np.ones(channels, np.float32), -1.0, phi, False)))
    dense_suffix = graph_stats(with_shapes(build_suffix(model, plan.layer, channels, fill=dense_fill)))
    return {"prefix_params": dense_prefix["params"] - stats["prefix"]["params"],
            "prefix_macs": dense_prefix["macs"] - stats["prefix"]["macs"],
            "suffix_params": dense_suffix["params"] - stats["suffix"]["params"],
            "suffix_macs_per_window": dense_suffix["macs"] - stats["suffix"]["macs"]}


FULL_CHECKS_MACS = 2e12  # suffix MACs export spends on the margin's and the known answers' full samples (~12 s on 2 cores)


@dataclass(frozen=True)
class CheckSample:
    """How much export measures through the suffix (docs/design.md §3.6, §9): the margin with a run
    over every row for each batch size and probes.COUNT probe images, or, where that would cost more
    than FULL_CHECKS_MACS (a ViT-B/16 row is 16 GMACs), one run in batches of the sizes in turn
    (every row compared, every position of every size sampled) and probes.FEWEST images."""

    every_row: bool
    probe_images: int
    full_macs: float

    def describe(self) -> str | None:
        if self.every_row:
            return None
        return (f"the suffix is expensive ({self.full_macs / 1e12:.1f} TMACs for the full samples, above "
                f"{FULL_CHECKS_MACS / 1e12:g}): the numeric margin runs every row once more, in batches of each size in "
                f"turn, and {self.probe_images} probe images are recorded")


def check_sample(suffix_macs: float, windows: int) -> CheckSample:
    margin_rows = core_margin.rows_evaluated(1 + min(core_margin.SAMPLED_WINDOWS, windows))
    full_rows = margin_rows + probes.COUNT * (1 + windows)
    full_macs = full_rows * float(suffix_macs)
    if full_macs <= FULL_CHECKS_MACS:
        return CheckSample(True, probes.COUNT, full_macs)
    return CheckSample(False, probes.FEWEST, full_macs)


def call_key(features: np.ndarray, windows: np.ndarray) -> tuple:
    """A suffix call by its exact inputs (every byte, not a hash: equal keys are equal calls)."""
    windows = np.asarray(windows, np.int64)
    return features.dtype.str, features.shape, features.tobytes(), windows.shape, windows.tobytes()


class RecordingPipeline(OrtCpuPipeline):
    """Export's ONNX Runtime CPU pipeline for the margin, which keeps each suffix call's logits by
    its exact inputs (`calls`): probe image 0's known answers repeat the margin's reference run on
    that image call for call and take its logits (ReplayingCertifier) instead of running the same
    rows again (7 s on a ViT-B/16)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: dict = {}

    def suffix(self, features, windows):
        logits = super().suffix(features, windows)
        self.calls[call_key(features, windows)] = logits
        return logits


class ReplayingCertifier(Certifier):
    """The export's certifier of the probe images: a suffix call identical, byte for byte, to one the
    margin made gets that call's logits, as ONNX Runtime CPU computed them there; any other runs."""

    def __init__(self, bundle, calls: dict):
        super().__init__(bundle, "ort-cpu", "fp32")
        self.calls, self.replayed_rows = calls, 0

    def window_logits(self, features, windows):
        logits = self.calls.get(call_key(features, windows))
        if logits is None:
            return super().window_logits(features, windows)
        self.replayed_rows += len(windows)
        return logits


def measure_margin(work: str, input_spec: dict, image: np.ndarray, windows: np.ndarray, suffix_macs: float,
                   every_row: bool = True) -> tuple[dict, dict]:
    """(the margin record, the suffix calls it made): measured on `image` (uint8 at network size,
    probe image 0) through the ONNX Runtime CPU pipeline the runtime will use."""
    with RecordingPipeline(os.path.join(work, "prefix.onnx"), os.path.join(work, "suffix.onnx"),
                           window_parallel=window_parallel("fp32", suffix_macs)) as pipeline:
        return core_margin.measure_margin(pipeline, normalize(image, input_spec), windows, every_row), pipeline.calls


def write_probe_images(work: str, request: Request, count: int) -> list[str]:
    """`count` probe images under probes/ (up to half from the calibration set, the rest seeded
    synthetic), names relative to the bundle. The first is the image the margin is measured on and
    the locality check patches."""
    real = [load_image(path, request.input_spec) for path, _ in (request.calibration_items or [])[:count // 2]]
    synthetic = probes.synthetic_images(request.image_hw, count - len(real))
    return probes.write_images(work, np.concatenate([np.stack(real), synthetic]) if real else synthetic)


def known_answers(work: str, manifest: dict, names: list[str], calls: dict) -> dict:
    """The ONNX Runtime CPU fp32 answers for the probe images, which `scalecert doctor` compares on
    the target; `rows_from_margin`: the suffix rows taken from the margin's run on probe image 0."""
    bundle = Bundle(work, {**manifest, "probes": {"images": names}})
    with ReplayingCertifier(bundle, calls) as certifier:
        recorded = probes.answers(certifier, bundle)
    return {"images": names, "answers": {manifest_io.margin_key("ort-cpu", "fp32"): recorded},
            "rows_from_margin": certifier.replayed_rows}
