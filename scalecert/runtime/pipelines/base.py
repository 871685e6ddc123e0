"""Runners and pipelines: activate / infer / deactivate, in the manner of Polygraphy's runners.

The activation guard: `activate()` either succeeds or releases whatever it took before failing
(`deactivate_impl` must therefore tolerate a half-done activation), and `deactivate()` is safe to
call any number of times. Both are what `with runner:` does.
"""
from __future__ import annotations

import numpy as np


class Activated:
    name = "runner"
    is_active = False

    def activate_impl(self) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        """Release everything activate_impl took, including after it failed part-way."""
        raise NotImplementedError

    def activate(self) -> None:
        if self.is_active:
            return
        try:
            self.activate_impl()
        except BaseException:
            self.deactivate_impl()
            raise
        self.is_active = True

    def deactivate(self) -> None:
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()


class Runner(Activated):
    """One model file on one engine: named input arrays in, named output arrays out."""

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def window_rows(windows: np.ndarray) -> np.ndarray:
    """Suffix rows from rectangles: (B, 4) is one window per row, (B, R, 4) R rectangles per row
    whose union the suffix zeroes (a pair of windows for recovery); both become (B, 4R), the
    suffix graph's `windows` input (export/split.py)."""
    windows = np.asarray(windows)
    if windows.ndim == 3 and windows.shape[2] == 4 and windows.shape[1] >= 1:
        return windows.reshape(len(windows), -1)
    if windows.ndim == 2 and windows.shape[1] >= 4 and windows.shape[1] % 4 == 0:
        return windows
    from scalecert.errors import BackendError

    raise BackendError(f"windows must be (B, 4) or (B, R, 4) rectangles, got shape {windows.shape}")


class Pipeline(Activated):
    """One bundle precision on one device: the prefix over image batches, then the suffix over
    window batches of one image. `prefix` returns features in whatever form the backend keeps
    them (numpy here, device buffers on a GPU) plus the gate map as numpy; `select` takes one
    image's features out of a batch; `suffix` takes (B, 4) windows or (B, R, 4) rows of R
    rectangles (`window_rows`) and returns logits as numpy."""

    name = "pipeline"

    def prefix(self, image: np.ndarray):
        raise NotImplementedError

    def select(self, features, index: int):
        raise NotImplementedError

    def suffix(self, features, windows: np.ndarray) -> np.ndarray:
        raise NotImplementedError
