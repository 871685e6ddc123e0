"""The standard pixel-space baselines: PatchCleanser's R-covering mask set, one full forward per
mask. Detection: certified iff every masked prediction equals the unmasked one (Minority Reports /
PatchCleanser's first round). Recovery (PatchCleanser's double masking): two rounds for the label,
every pair of masks for certification, decided by core/recovery.py. PyTorch eager or ONNX Runtime
on the full model."""
from __future__ import annotations

import math
import time

import numpy as np

from scalecert.core import geometry
from scalecert.runtime.pipelines.base import Activated, Runner


def mask_stride(image_hw, patch_hw, masks_per_axis=(6, 6)) -> tuple[int, int]:
    """PatchCleanser's mask stride per axis: s = ceil((n - p + 1) / k) for k masks on an n-pixel axis."""
    return tuple(math.ceil((n - p + 1) / k) for n, p, k in zip(image_hw, patch_hw, masks_per_axis))


def mask_set(image_hw, patch_hw, masks_per_axis=(6, 6)) -> np.ndarray:
    """(k, 4) pixel rectangles [y0, x0, y1, x1): PatchCleanser's R-covering masks, i.e. the window
    family of the patch itself at the mask stride (size p + s - 1, the last flush with the border)."""
    return geometry.window_family(tuple(patch_hw), mask_stride(image_hw, patch_hw, masks_per_axis), tuple(image_hw))


def masked_batch(x: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """x (1,C,H,W) normalised -> (1 + k, C, H, W): the clean image, then one copy per mask with
    the masked pixels set to 0 after normalisation."""
    batch = np.repeat(x, len(masks) + 1, axis=0)
    for i, (y0, x0, y1, x1) in enumerate(masks, start=1):
        batch[i, :, y0:y1, x0:x1] = 0.0
    return batch


class TorchEagerRunner(Runner):
    """The model as a plain nn.Module in PyTorch eager mode (the baseline a PyTorch user runs)."""

    name = "torch"

    def __init__(self, module, threads: int | None = None):
        self.module, self.threads = module, threads

    def activate_impl(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.module.eval()

    def infer(self, feeds):
        import torch

        with torch.inference_mode():
            return {"logits": self.module(torch.from_numpy(next(iter(feeds.values())))).numpy()}

    def deactivate_impl(self) -> None:
        pass


class PixelMaskingBaseline(Activated):
    """One full forward per mask on a runner: TorchEagerRunner ("torch") or OrtRunner on the full
    model's ONNX ("ort"). Use it in a with-block (or activate/deactivate)."""

    def __init__(self, runner: Runner, masks: np.ndarray, engine: str):
        self.runner, self.masks, self.engine = runner, masks, engine

    @classmethod
    def torch_eager(cls, module, masks, threads: int | None = None) -> "PixelMaskingBaseline":
        return cls(TorchEagerRunner(module, threads), masks, "torch")

    @classmethod
    def onnx_runtime(cls, onnx_path: str, masks, threads: int | None = None) -> "PixelMaskingBaseline":
        from scalecert.runtime.pipelines.onnxruntime import OrtRunner

        return cls(OrtRunner(onnx_path, threads=threads), masks, "ort")

    def activate_impl(self) -> None:
        self.runner.activate()

    def deactivate_impl(self) -> None:
        self.runner.deactivate()

    def certify(self, x: np.ndarray) -> dict:
        start = time.perf_counter()
        batch = masked_batch(x, self.masks)
        logits = next(iter(self.runner.infer({"image": batch}).values()))
        labels = logits.argmax(1)
        elapsed = (time.perf_counter() - start) * 1e3
        return {"label": int(labels[0]), "certified": bool((labels[1:] == labels[0]).all()),
                "latency_ms": elapsed, "masks": len(self.masks)}


# -- recovery (PatchCleanser's double masking) --------------------------------------------------------
def rect_masked_batch(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x (1,C,H,W) normalised -> one copy per row of rectangles ((k, 4) or (k, R, 4), pixel
    [y0, x0, y1, x1)) with each rectangle of the row set to 0 after normalisation."""
    rows = np.asarray(rows).reshape(len(rows), -1, 4)
    batch = np.repeat(x, len(rows), axis=0)
    for k, row in enumerate(rows):
        for y0, x0, y1, x1 in row:
            batch[k, :, y0:y1, x0:x1] = 0.0
    return batch


class PatchCleanserBaseline(PixelMaskingBaseline):
    """PatchCleanser (Xiang et al., USENIX Security 2022) in pixel space on a runner: `recover` is
    double masking (the first round over every mask, a second round only for disagreers), and
    `certify_recovery` runs every pair of masks (each mask with itself included) and certifies the
    label when all of them predict it; both by the runtime's procedure (runtime/recovery.py::PairRecovery).
    As PatchCleanser, no numeric margin: the engine's own argmax is taken as is."""

    def __init__(self, runner: Runner, masks: np.ndarray, engine: str, batch: int = 128):
        super().__init__(runner, masks, engine)
        self.batch = batch

    @classmethod
    def torch_eager(cls, module, masks, threads: int | None = None) -> "PatchCleanserBaseline":
        return cls(TorchEagerRunner(module, threads), masks, "torch")

    @classmethod
    def onnx_runtime(cls, onnx_path: str, masks, threads: int | None = None) -> "PatchCleanserBaseline":
        from scalecert.runtime.pipelines.onnxruntime import OrtRunner

        return cls(OrtRunner(onnx_path, threads=threads), masks, "ort")

    def recover(self, x: np.ndarray, certify: bool = True):
        """Double masking on one normalised (1,C,H,W) image by the runtime's own procedure
        (runtime/recovery.py::PairRecovery) over the pixel masks, every pixel kept, no fill ->
        its Outcome. No numeric margin beyond the decision's rounding floor: the engine's argmax is
        taken as is, as PatchCleanser does."""
        from scalecert.runtime.recovery import PairRecovery

        procedure = self.__dict__.get("_procedure")
        if procedure is None or procedure.feature_hw != x.shape[2:]:  # its dedupe caches the all-kept grouping
            procedure = self.__dict__["_procedure"] = PairRecovery(self.masks, x.shape[2:], batch=self.batch)

        def predict(rows: np.ndarray) -> np.ndarray:
            return next(iter(self.runner.infer({"image": rect_masked_batch(x, rows)}).values()))

        return procedure.run(predict, np.ones(x.shape[2:], bool), certify)
