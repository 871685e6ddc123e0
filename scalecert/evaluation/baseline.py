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
def pair_masked_batch(x: np.ndarray, masks: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """x (1,C,H,W) normalised -> (len(pairs), C, H, W): copy k with masks pairs[k, 0] and
    pairs[k, 1] set to 0 after normalisation (one mask where the two are the same)."""
    batch = np.repeat(x, len(pairs), axis=0)
    for k, (i, j) in enumerate(pairs):
        for y0, x0, y1, x1 in (masks[i], masks[j]):
            batch[k, :, y0:y1, x0:x1] = 0.0
    return batch


class PatchCleanserBaseline(PixelMaskingBaseline):
    """PatchCleanser (Xiang et al., USENIX Security 2022) in pixel space on a runner: `recover` is
    double masking (the first round over every mask, a second round only for disagreers), and
    `certify_recovery` runs every pair of masks (each mask with itself included) and certifies the
    label when all of them predict it; both decided by core/recovery.py (evaluation/recovery_eval.py).
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

    def predictor(self, x: np.ndarray):
        """predict(pairs) -> (labels, thin) for one normalised (1,C,H,W) image."""
        def predict(pairs: np.ndarray):
            labels = []
            for lo in range(0, len(pairs), self.batch):
                batch = pair_masked_batch(x, self.masks, pairs[lo:lo + self.batch])
                labels.append(next(iter(self.runner.infer({"image": batch}).values())).argmax(1))
            labels = np.concatenate(labels)
            return labels, np.zeros(len(labels), bool)

        return predict

    def recover(self, x: np.ndarray):
        from scalecert.evaluation.recovery_eval import fast_path

        return fast_path(len(self.masks), self.predictor(x))

    def certify_recovery(self, x: np.ndarray, early_exit: bool = False):
        from scalecert.evaluation.recovery_eval import certification

        return certification(len(self.masks), self.predictor(x), self.batch, early_exit)
