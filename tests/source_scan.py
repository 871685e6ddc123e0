"""Perturbation scans through the REAL preprocessing (runtime/images.py::resize_to_input): which
network-input pixels does changing a source pixel, row or column actually change? Checks the
computed reach (core/source.py) bitwise: nothing outside it changes, and says how tight it is.
A test and benchmark helper, not part of the shipped package."""
from __future__ import annotations

import numpy as np

from scalecert.core.source import AxisMap, SourceMap


def contrast(values: np.ndarray) -> np.ndarray:
    """The farthest uint8 value from each: 255 for dark values, 0 for light ones."""
    return np.where(values < 128, 255, 0).astype(np.uint8)


def preprocess(source: np.ndarray, input_spec: dict) -> np.ndarray:
    from PIL import Image

    from scalecert.runtime.images import resize_to_input

    return resize_to_input(Image.fromarray(source), input_spec)


def scan_axis(source: np.ndarray, input_spec: dict, axis: int, indices=None) -> tuple[np.ndarray, np.ndarray]:
    """For each source row (axis 0) or column (axis 1) in `indices` (default: all), set it to its
    contrast and record the first and last input row/column that changed (lo > hi: none)."""
    clean = preprocess(source, input_spec).astype(np.int16)
    n = source.shape[axis]
    indices = np.arange(n) if indices is None else np.asarray(indices)
    size = clean.shape[axis]
    lo, hi = np.full(len(indices), size, np.int64), np.full(len(indices), -1, np.int64)
    for k, i in enumerate(indices):
        moved = source.copy()
        line = moved[i] if axis == 0 else moved[:, i]
        line[...] = contrast(line)
        changed = np.flatnonzero((preprocess(moved, input_spec) != clean).any(axis=(1 - axis, 2)))
        if len(changed):
            lo[k], hi[k] = changed[0], changed[-1]
    return lo, hi


def observed_widest(lo: np.ndarray, hi: np.ndarray, length: int) -> int:
    """From a full scan (lo > hi where nothing changed): the most input pixels a run of `length`
    source pixels was seen to change, anywhere (runs are unions of their pixels' reaches)."""
    from numpy.lib.stride_tricks import sliding_window_view

    top = sliding_window_view(hi, length).max(axis=1)
    bottom = sliding_window_view(np.where(lo <= hi, lo, np.iinfo(np.int64).max), length).min(axis=1)
    return int(np.max(np.where(top >= 0, top - bottom + 1, 0), initial=0))


def observed_bound(lo: np.ndarray, hi: np.ndarray, patch: int) -> int:
    """The longest source run the scan saw fit in `patch` input pixels everywhere."""
    best = 0
    for length in range(1, len(lo) + 1):
        if observed_widest(lo, hi, length) > patch:
            break
        best = length
    return best


def compare_axis(computed: AxisMap, lo: np.ndarray, hi: np.ndarray, indices=None) -> dict:
    """Observed (scan) vs computed reach per source index: `escapes` counts indices that changed an
    input pixel outside the computed reach (must be 0), `extra` the computed pixels that the scan
    did not see change (over-estimate), and, for a full scan, the bound each implies at every
    input patch side 1..size."""
    indices = np.arange(computed.source) if indices is None else np.asarray(indices)
    clo, chi = computed.span(indices, 1)
    seen = lo <= hi
    escapes = int(np.sum(seen & ((lo < clo) | (hi > chi))))
    width_c = np.maximum(chi - clo + 1, 0)
    width_o = np.where(seen, hi - lo + 1, 0)
    out = {"indices": len(indices), "escapes": escapes,
           "extra_pixels_max": int(np.max(width_c - width_o, initial=0)),
           "extra_pixels_mean": round(float(np.mean(width_c - width_o)), 3) if len(indices) else 0.0,
           "reach_computed_max": int(np.max(width_c, initial=0)), "reach_observed_max": int(np.max(width_o, initial=0))}
    if len(indices) == computed.source:
        sides = range(1, computed.size, max(1, computed.size // 16))
        bound_c = [computed.covered(p) for p in sides]
        bound_o = [observed_bound(lo, hi, p) for p in sides]
        out["bound_gap_max"] = int(max((o - c for c, o in zip(bound_c, bound_o)), default=0))
        out["bound_below_observed"] = int(sum(c > o for c, o in zip(bound_c, bound_o)))  # must be 0
    return out


def scan_pixels(source: np.ndarray, input_spec: dict, smap: SourceMap, positions) -> dict:
    """Single source pixels set to their contrast: every changed input pixel must lie in the
    computed influence rectangle (`escapes` counts pixels where one did not)."""
    clean = preprocess(source, input_spec)
    escapes, changed_total, rect_total = 0, 0, 0
    for y, x in positions:
        moved = source.copy()
        moved[y, x] = contrast(moved[y, x])
        diff = (preprocess(moved, input_spec) != clean).any(axis=2)
        y0, x0, y1, x1 = smap.influence(int(y), int(x), (1, 1))
        inside = np.zeros_like(diff)
        inside[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
        escapes += int(np.any(diff & ~inside))
        changed_total += int(diff.sum())
        rect_total += int(inside.sum())
    return {"pixels": len(positions), "escapes": escapes, "changed": changed_total, "computed": rect_total}


def patch_reach(source: np.ndarray, input_spec: dict, top: int, left: int, patch_hw) -> tuple[int, int]:
    """(rows, columns) spanned by the input pixels that a contrast source patch at (top, left) changed."""
    clean = preprocess(source, input_spec)
    moved = source.copy()
    h, w = patch_hw
    moved[top:top + h, left:left + w] = contrast(moved[top:top + h, left:left + w])
    diff = (preprocess(moved, input_spec) != clean).any(axis=2)
    rows, cols = np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))
    return (int(rows[-1] - rows[0] + 1) if len(rows) else 0, int(cols[-1] - cols[0] + 1) if len(cols) else 0)


def widest_position(amap: AxisMap, length: int) -> int:
    """A start on this axis where a run of `length` source pixels reaches the most input pixels."""
    starts = np.arange(amap.source - length + 1)
    lo, hi = amap.span(starts, length)
    return int(starts[np.argmax(hi - lo + 1)])


def past_bound_witness(source: np.ndarray, input_spec: dict, smap: SourceMap, patch_hw, axis: int, patch: int,
                       limit: int = 200):
    """A source patch of `patch_hw` whose contrast version, through the real preprocessing, changes
    more than `patch` input pixels along `axis`: ((top, left), reach) or None. Tries the starts where
    the computed reach exceeds `patch` (up to `limit`, evenly spread), the other axis at its widest."""
    amap, other = (smap.y, smap.x) if axis == 0 else (smap.x, smap.y)
    length, other_length = patch_hw[axis], patch_hw[1 - axis]
    lo, hi = amap.span(np.arange(amap.source - length + 1), length)
    starts = np.flatnonzero(hi - lo + 1 > patch)
    if len(starts) > limit:
        starts = starts[np.linspace(0, len(starts) - 1, limit).round().astype(int)]
    fixed = widest_position(other, other_length)
    for start in starts:
        top, left = (int(start), fixed) if axis == 0 else (fixed, int(start))
        reach = patch_reach(source, input_spec, top, left, patch_hw)
        if reach[axis] > patch:
            return (top, left), reach
    return None
