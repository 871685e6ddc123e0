"""Device-side feature buffers shared by the GPU pipelines (ONNX Runtime CUDA, TensorRT).

Both run the prefix on ONNX Runtime CPU (docs/design.md §9) and keep one image's gated features
on the device for the suffix: `select(i)` uploads image i's features (bit-for-bit the CPU
prefix's) to an aligned device address once, and the suffix reads them there for every window
batch of that image. Windows go up from the host (four integers each); the logits come back.
Selected features stay valid until the pipeline's next `select`, which is how the certifier
uses them.
"""
from __future__ import annotations

import numpy as np

from scalecert.errors import BackendError
from scalecert.runtime.pipelines.base import window_rows

ALIGN = 256  # bytes; every device tensor address handed to an engine is a multiple of this


def aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


def batches(n: int, limit: int | None) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering n items, each at most `limit` long (one range without a limit)."""
    step = max(1, int(limit)) if limit else max(1, n)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


class DeviceFeatures:
    """Gated features of images in device memory: one aligned address per image (`owner` keeps
    the memory alive); the suffix always reads them from an aligned address."""

    def __init__(self, owner, ptrs, item_shape, dtype):
        self.owner, self.ptrs = owner, [int(p) for p in ptrs]
        self.item_shape, self.dtype = tuple(int(d) for d in item_shape), np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.ptrs)

    @property
    def shape(self) -> tuple:
        return (len(self.ptrs), *self.item_shape)

    @property
    def ptr(self) -> int:
        if len(self.ptrs) != 1:
            raise BackendError(f"the suffix takes one image's features, got {len(self.ptrs)}; select one first")
        return self.ptrs[0]

    def image(self, index: int) -> "DeviceFeatures":
        return DeviceFeatures(self.owner, [self.ptrs[index]], self.item_shape, self.dtype)


def host_windows(windows: np.ndarray, dtype) -> np.ndarray:
    """Window rectangles ((B, 4), or (B, R, 4) rows of R rectangles) as the suffix's contiguous
    (B, 4R) host array of the engine's integer type."""
    windows = window_rows(windows)
    if np.dtype(dtype) == np.int32 and len(windows) and np.abs(windows).max() > np.iinfo(np.int32).max:
        raise BackendError("window coordinates do not fit int32")
    return np.ascontiguousarray(windows, dtype)
