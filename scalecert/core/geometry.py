"""Footprints, the window family and exact SIN-aware window dedupe (numpy only).

docs/design.md §3.2 (exact footprint), §3.4 (a family that covers every footprint), §3.5 (exact
dedupe).

Rectangles are (y0, x0, y1, x1) with exclusive ends, in feature coordinates.
A receptive field per axis is (stride, lo, hi): feature position i sees input
pixels [i*stride + lo, i*stride + hi] (the exporter computes these).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scalecert.errors import OptionError


def parse_patch(spec: str, image_hw: tuple[int, int]) -> tuple[int, int]:
    """'5' -> 5x5, '16x48' -> 16x48 (height x width), '2%' -> square covering 2% of the area."""
    spec = str(spec).strip().lower()
    h, w = image_hw
    try:
        if spec.endswith("%"):
            frac = float(spec[:-1]) / 100.0
            if not 0 < frac < 1:
                raise OptionError(f"patch {spec!r}: a percentage of the input area must lie between 0% and 100%")
            side = max(1, math.ceil(math.sqrt(frac * h * w)))
            ph, pw = side, side
        elif "x" in spec:
            ph, pw = (int(v) for v in spec.split("x"))
        else:
            ph = pw = int(spec)
    except ValueError:
        raise OptionError(f"patch {spec!r}: expected N, HxW or P% (e.g. 5, 16x48, 2%)") from None
    if ph < 1 or pw < 1:
        raise OptionError(f"patch {spec!r}: patch sides must be positive")
    if ph > h or pw > w:
        raise OptionError(f"patch {spec!r}: a {ph}x{pw} patch does not fit the {h}x{w} input")
    if ph >= h and pw >= w:
        raise OptionError(f"patch {spec!r}: a {ph}x{pw} patch covers the whole {h}x{w} input; nothing can be certified")
    return ph, pw


def footprint_1d(start: int, patch: int, rf: tuple[int, int, int], size: int) -> tuple[int, int]:
    """Feature positions [first, last+1) whose receptive field meets pixels [start, start+patch)."""
    stride, lo, hi = rf
    first = math.ceil((start - hi) / stride)
    last = math.floor((start + patch - 1 - lo) / stride)
    first, last = max(first, 0), min(last, size - 1)
    return (first, last + 1) if first <= last else (0, 0)


def footprint(patch_yx: tuple[int, int], patch_hw, rf_yx, feature_hw) -> tuple[int, int, int, int]:
    """Footprint rectangle of the patch whose top-left pixel is patch_yx."""
    y0, y1 = footprint_1d(patch_yx[0], patch_hw[0], rf_yx[0], feature_hw[0])
    x0, x1 = footprint_1d(patch_yx[1], patch_hw[1], rf_yx[1], feature_hw[1])
    return (y0, x0, y1, x1)


def window_size(patch_hw, image_hw, rf_yx, feature_hw) -> tuple[int, int]:
    """Largest footprint extent per axis over every patch position, borders included."""
    def largest(axis: int) -> int:
        spans = (footprint_1d(a, patch_hw[axis], rf_yx[axis], feature_hw[axis])
                 for a in range(image_hw[axis] - patch_hw[axis] + 1))
        return max(end - start for start, end in spans)

    return largest(0), largest(1)


def _starts(extent: int, win: int, stride: int) -> list[int]:
    win = min(win, extent)
    starts = list(range(0, extent - win + 1, stride))
    if starts[-1] != extent - win:
        starts.append(extent - win)  # flush with the far border: closes the gap at the edge
    return starts


def _per_axis(stride) -> tuple[int, int]:
    sy, sx = (stride, stride) if np.isscalar(stride) else stride
    if int(sy) < 1 or int(sx) < 1:
        raise OptionError(f"stride {stride}: must be positive")
    return int(sy), int(sx)


def window_family(window_hw, stride, feature_hw) -> np.ndarray:
    """All occlusion windows, (n, 4) int64: size window + stride - 1 per axis, at `stride` (one int
    or (sy, sx)), plus the window flush with the far border, so every rectangle of extent <= window
    lies inside at least one of them. The one generator of R-covering rectangles: the bundle's
    feature windows and the pixel-masking baseline's masks (window = patch, in pixels)."""
    (wh, ww), (fh, fw), (sy, sx) = window_hw, feature_hw, _per_axis(stride)
    h, w = min(wh + sy - 1, fh), min(ww + sx - 1, fw)
    rects = [(y, x, y + h, x + w) for y in _starts(fh, h, sy) for x in _starts(fw, w, sx)]
    return np.asarray(rects, dtype=np.int64)


def count_windows(window_hw, stride, feature_hw) -> int:
    return len(window_family(window_hw, stride, feature_hw))


def window_masks(windows: np.ndarray, feature_hw) -> np.ndarray:
    """Boolean (n, H*W): which feature positions each window covers."""
    fh, fw = feature_hw
    rows, cols = np.arange(fh), np.arange(fw)
    in_rows = (rows[None, :] >= windows[:, 0:1]) & (rows[None, :] < windows[:, 2:3])
    in_cols = (cols[None, :] >= windows[:, 1:2]) & (cols[None, :] < windows[:, 3:4])
    return (in_rows[:, :, None] & in_cols[:, None, :]).reshape(len(windows), fh * fw)


@dataclass(frozen=True)
class DistinctWindows:
    """Windows grouped by their exact intersection with the kept positions."""

    representatives: np.ndarray  # (k, 4) one window per distinct non-empty intersection
    group_of_window: np.ndarray  # (n,) index into representatives, -1 where nothing is kept


def distinct_windows(windows: np.ndarray, masks: np.ndarray, gate: np.ndarray) -> DistinctWindows:
    """Exact dedupe: two windows share an inference only if they zero exactly the same kept
    positions (row-wise equality of boolean vectors, no hashing that could merge them)."""
    inter = masks & gate.reshape(1, -1).astype(bool)
    nonempty = inter.any(axis=1)
    group = np.full(len(windows), -1, dtype=np.int64)
    if not nonempty.any():
        return DistinctWindows(np.zeros((0, 4), np.int64), group)
    idx = np.flatnonzero(nonempty)
    packed = np.packbits(inter[idx], axis=1)  # exact, lossless encoding of each row
    first: dict[bytes, int] = {}  # keyed by the whole row: a hash collision compares the bytes, never merges
    for k, row in enumerate(packed):
        group[idx[k]] = first.setdefault(row.tobytes(), len(first))
    representatives = np.empty(len(first), dtype=np.int64)
    representatives[group[idx]] = idx  # any member will do: they zero the same kept positions
    return DistinctWindows(windows[representatives], group)


# -- pairs of windows (certified recovery, docs/design.md §10) --------------------------------------
def pair_indices(n: int) -> np.ndarray:
    """(n(n+1)/2, 2) int64: every pair (i, j) with i <= j of n windows (a window with itself
    included; (i, j) and (j, i) zero the same union, so each symmetric pair appears once)."""
    i, j = np.triu_indices(n)
    return np.stack([i, j], axis=1).astype(np.int64)


def pair_rectangles(windows: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(p, 2, 4): the two rectangles of each pair, one suffix row each (the suffix zeroes the union)."""
    return np.stack([windows[pairs[:, 0]], windows[pairs[:, 1]]], axis=1)


def pair_masks(masks: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Boolean (p, H*W): the union of each pair's two window masks."""
    return masks[pairs[:, 0]] | masks[pairs[:, 1]]


def distinct_pairs(windows: np.ndarray, masks: np.ndarray, gate: np.ndarray, pairs: np.ndarray) -> DistinctWindows:
    """Exact dedupe of pairs, as distinct_windows for windows: two pairs share an inference only
    if their unions zero exactly the same kept positions; a pair whose union holds no kept
    position (group -1) sees the un-occluded features. Representatives are (k, 2, 4) rows."""
    return distinct_windows(pair_rectangles(windows, pairs), pair_masks(masks, pairs), gate)


class Dedupe:
    """distinct_windows and distinct_pairs for one window family, with the answer for a gate that
    keeps every position (the default, rate 0) computed once and reused: the same function on the
    same inputs, so exactly as exact, without redoing the boolean work per image (on a 224x224 map
    that work is 5 ms for 36 windows and far more for 666 pairs). Callers must not modify results.

    With `filled` (windows hold a nonzero fill, docs/design.md §3.5), an occluded row is the fill on
    the whole window, gated-off positions included, so every position counts as kept: windows
    group only when they cover the same positions."""

    def __init__(self, windows: np.ndarray, masks: np.ndarray, filled: bool = False):
        self.windows, self.masks, self.filled = windows, masks, filled
        self._all_kept: dict[bytes | None, DistinctWindows] = {}

    @staticmethod
    def of(owner) -> Dedupe:
        """The Dedupe of `owner`'s current `windows` and `masks`, rebuilt whenever either is replaced
        (use as `dedupe = property(Dedupe.of)`)."""
        cached = owner.__dict__.get("_dedupe")
        if cached is None or cached.windows is not owner.windows or cached.masks is not owner.masks:
            cached = owner.__dict__["_dedupe"] = Dedupe(owner.windows, owner.masks, owner.bundle.window_filled)
        return cached

    def windows_for(self, gate: np.ndarray) -> DistinctWindows:
        gate = self._counted(gate)
        return self._reused(gate, None, lambda: distinct_windows(self.windows, self.masks, gate))

    def pairs_for(self, gate: np.ndarray, pairs: np.ndarray) -> DistinctWindows:
        gate = self._counted(gate)
        key = np.ascontiguousarray(pairs, dtype=np.int64).tobytes()  # the whole array: equal keys, equal pairs
        return self._reused(gate, key, lambda: distinct_pairs(self.windows, self.masks, gate, pairs))

    def _counted(self, gate: np.ndarray) -> np.ndarray:
        """The positions whose occlusion can change a row: the kept ones, or all with a fill."""
        return np.ones(gate.shape, bool) if self.filled else gate

    def _reused(self, gate: np.ndarray, key: bytes | None, compute) -> DistinctWindows:
        if not gate.all():
            return compute()
        if key not in self._all_kept:
            self._all_kept[key] = compute()
        return self._all_kept[key]
