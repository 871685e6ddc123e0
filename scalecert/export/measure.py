"""What export measures on the finished graphs: the numeric margin, the known answers of the probe
images, the savings of removed channels (all through ONNX Runtime CPU, as the runtime runs them)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from scalecert.bundle import manifest as manifest_io
from scalecert.export.options import Request
from scalecert.export.plan import SplitPlan
from scalecert.export.split import build_prefix, build_suffix
from scalecert.export.stats import graph_stats, with_shapes


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
    from scalecert.core.margin import rows_evaluated
    from scalecert.runtime import probes

    full_rows = rows_evaluated(1 + min(63, windows)) + probes.COUNT * (1 + windows)
    full_macs = full_rows * float(suffix_macs)
    if full_macs <= FULL_CHECKS_MACS:
        return CheckSample(True, probes.COUNT, full_macs)
    return CheckSample(False, probes.FEWEST, full_macs)


def measure_margin(work: str, input_spec: dict, calibration, windows: np.ndarray, suffix_macs: float,
                   every_row: bool = True) -> dict:
    """Through the same ONNX Runtime CPU pipeline the runtime will use."""
    from scalecert.core.margin import measure_margin
    from scalecert.runtime.images import normalize
    from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline, window_parallel

    if calibration is not None:
        image = calibration.images[:1]
    else:
        _, h, w = input_spec["input_size"]
        image = normalize(np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8), input_spec)
    with OrtCpuPipeline(os.path.join(work, "prefix.onnx"), os.path.join(work, "suffix.onnx"),
                        window_parallel=window_parallel("fp32", suffix_macs)) as pipeline:
        return measure_margin(pipeline, image, windows, every_row)


def check_pixels(request: Request) -> np.ndarray:
    """The image the locality check patches: the first calibration image, else a synthetic one."""
    from scalecert.runtime import probes
    from scalecert.runtime.images import load_image

    if request.calibration_items:
        return load_image(request.calibration_items[0][0], request.input_spec)
    return probes.synthetic_images(request.image_hw, 1)[0]


def known_answers(work: str, manifest: dict, request: Request, count: int) -> dict:
    """`count` probe images (up to half from the calibration set, the rest seeded synthetic) and the ONNX
    Runtime CPU fp32 answers for them, which `scalecert doctor` compares on the target."""
    from scalecert.bundle import Bundle
    from scalecert.runtime import probes
    from scalecert.runtime.certifier import Certifier
    from scalecert.runtime.images import load_image

    real = [load_image(path, request.input_spec) for path, _ in (request.calibration_items or [])[:count // 2]]
    synthetic = probes.synthetic_images(request.image_hw, count - len(real))
    names = probes.write_images(work, np.concatenate([np.stack(real), synthetic]) if real else synthetic)
    bundle = Bundle(work, {**manifest, "probes": {"images": names}})
    with Certifier(bundle, "ort-cpu", "fp32") as certifier:
        recorded = probes.answers(certifier, bundle)
    return {"images": names, "answers": {manifest_io.margin_key("ort-cpu", "fp32"): recorded}}
