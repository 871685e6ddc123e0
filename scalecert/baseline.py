"""The standard pixel-space baseline: PatchCleanser's R-covering mask set, one full forward per
mask; certified iff every masked prediction equals the unmasked one (certified detection, as in
Minority Reports / PatchCleanser's first round). PyTorch eager or ONNX Runtime on the full model."""
from __future__ import annotations

import math
import time

import numpy as np


def mask_set(image_hw, patch_hw, masks_per_axis=(6, 6)) -> np.ndarray:
    """(k, 4) pixel rectangles [y0, x0, y1, x1): per axis, mask stride s = ceil((n - p + 1) / k),
    mask size p + s - 1, starts 0, s, 2s, ... and the last mask flush with the border."""
    axes = []
    for n, p, k in zip(image_hw, patch_hw, masks_per_axis):
        stride = math.ceil((n - p + 1) / k)
        size = min(n, p + stride - 1)
        starts = list(range(0, n - size + 1, stride))
        if starts[-1] != n - size:
            starts.append(n - size)
        axes.append((starts, size, stride))
    (ys, h, _), (xs, w, _) = axes
    return np.array([(y, x, y + h, x + w) for y in ys for x in xs], np.int64)


def mask_stride(image_hw, patch_hw, masks_per_axis=(6, 6)) -> tuple[int, int]:
    return tuple(math.ceil((n - p + 1) / k) for n, p, k in zip(image_hw, patch_hw, masks_per_axis))


def masked_batch(x: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """x (1,C,H,W) normalised -> (1 + k, C, H, W): the clean image, then one copy per mask with
    the masked pixels set to 0 after normalisation."""
    batch = np.repeat(x, len(masks) + 1, axis=0)
    for i, (y0, x0, y1, x1) in enumerate(masks, start=1):
        batch[i, :, y0:y1, x0:x1] = 0.0
    return batch


class PixelMaskingBaseline:
    """`engine`: "torch" (eager nn.Module) or "ort" (ONNX Runtime on the full model's ONNX)."""

    def __init__(self, predict, masks: np.ndarray, engine: str):
        self.predict, self.masks, self.engine = predict, masks, engine

    @classmethod
    def torch_eager(cls, module, masks, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        module.eval()

        def predict(batch):
            with torch.inference_mode():
                return module(torch.from_numpy(batch)).numpy()

        return cls(predict, masks, "torch")

    @classmethod
    def onnx_runtime(cls, onnx_path: str, masks, threads: int | None = None):
        from .runtime.backends import OrtRunner

        runner = OrtRunner(onnx_path, threads=threads)
        runner.activate()
        name = runner.session.get_inputs()[0].name
        return cls(lambda batch: runner.infer({name: batch})[runner.output_names[0]], masks, "ort")

    def certify(self, x: np.ndarray) -> dict:
        start = time.perf_counter()
        logits = self.predict(masked_batch(x, self.masks))
        labels = logits.argmax(1)
        elapsed = (time.perf_counter() - start) * 1e3
        return {"label": int(labels[0]), "certified": bool((labels[1:] == labels[0]).all()),
                "latency_ms": elapsed, "masks": len(self.masks)}
