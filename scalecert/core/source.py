"""Source (camera) pixels -> network-input pixels: which input pixels a source patch can change.

The certificate holds for a patch in the network input (docs/design.md §1). The runtime makes the
input from the source image by a separable resize and a crop (runtime/images.py), so a source
pixel can change only the input pixels whose resize kernel reaches it, and only inside the crop.
This module computes that reach per axis from the kernel's support, the way the footprint pass
does for layers (docs/design.md §3.2, §8), and from it the largest source patch whose reach fits
the bundle's input-space patch anywhere in the source, and the input patch a source patch needs.

Pure numpy; the resize geometry (sizes, crop offsets) comes from runtime/images.py::resize_plan.

The resize is Pillow's BILINEAR (src/libImaging/Resample.c, precompute_coeffs): for output pixel
j of an axis resized from n_in to n_out, scale = n_in / n_out, filterscale = max(scale, 1),
support = 1 * filterscale (antialiasing widens the triangle with the downscale factor),
center = (j + 0.5) * scale, and the pixels summed are [trunc(center - support + 0.5),
trunc(center + support + 0.5)) clipped to [0, n_in), each with weight
triangle((x - center + 0.5) / filterscale). A pixel whose weight is exactly 0 (the triangle's
foot) is multiplied by 0 in the fixed-point sum and is dropped here; every other pixel of the
support counts, however small its weight (sound: the reach may only be over-estimated). An axis
whose size does not change is not resampled (Pillow skips that pass): each pixel reaches itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scalecert.errors import ScaleCertError

BILINEAR_SUPPORT = 1.0  # Pillow's bilinear (triangle) filter: support 1 at scale 1


def kernel_bounds(n_in: int, n_out: int, support: float = BILINEAR_SUPPORT) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel, the first and last input pixel with a non-zero resize weight (inclusive)."""
    if n_in == n_out:  # Pillow does not resample an axis whose size stays
        index = np.arange(n_out)
        return index, index.copy()
    scale = float(n_in) / n_out
    filterscale = max(scale, 1.0)
    reach = support * filterscale
    center = 0.0 + (np.arange(n_out) + 0.5) * scale  # Pillow's doubles, same operation order
    lo = np.clip(np.trunc(center - reach + 0.5).astype(np.int64), 0, None)
    hi = np.clip(np.trunc(center + reach + 0.5).astype(np.int64), None, n_in)  # exclusive
    ksize = math.ceil(reach) * 2 + 1
    first = np.full(n_out, -1, np.int64)
    last = np.full(n_out, -1, np.int64)
    ss = 1.0 / filterscale
    for k in range(ksize):
        x = lo + k
        inside = x < hi
        arg = ((x.astype(np.float64) - center) + 0.5) * ss
        live = inside & (np.abs(arg) < 1.0)  # the triangle is 0 at |arg| >= 1
        first = np.where(live & (first < 0), x, first)
        last = np.where(live, x, last)
    if (first < 0).any():
        raise AssertionError("an output pixel with no input pixel")  # cannot happen for n_in >= 1
    return first, last


@dataclass(frozen=True)
class AxisMap:
    """One axis: source length -> resized length -> crop [offset, offset + size).

    reach_lo[x], reach_hi[x]: the network-input pixels (inclusive, un-clipped) that source pixel x
    can change through the resize, before the crop is applied."""

    source: int
    resized: int
    offset: int
    size: int
    reach_lo: np.ndarray
    reach_hi: np.ndarray

    @classmethod
    def build(cls, source: int, resized: int, offset: int, size: int) -> AxisMap:
        first, last = kernel_bounds(source, resized)
        lo = np.full(source, resized, np.int64)
        hi = np.full(source, -1, np.int64)
        for j in range(resized):  # output j reads source [first[j], last[j]]
            lo[first[j]:last[j] + 1] = np.minimum(lo[first[j]:last[j] + 1], j)
            hi[first[j]:last[j] + 1] = np.maximum(hi[first[j]:last[j] + 1], j)
        # a source pixel no output reads (impossible for these kernels) would reach nothing: lo > hi
        return cls(source, resized, offset, size, lo - offset, hi - offset)

    def span(self, start, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Input pixels [lo, hi] (inclusive, clipped to the crop) that source pixels
        [start, start + length) can change; empty where lo > hi (cropped away)."""
        start = np.asarray(start)
        lo = np.clip(self.reach_lo[start], 0, self.size - 1)
        hi = np.clip(self.reach_hi[start + length - 1], 0, self.size - 1)
        hit = (self.reach_hi[start + length - 1] >= 0) & (self.reach_lo[start] <= self.size - 1)
        return np.where(hit, lo, 1), np.where(hit, hi, 0)

    def widest(self, length: int) -> int:
        """The most input pixels a source run of `length` pixels can change, anywhere on the axis."""
        if length <= 0:
            return 0
        length = min(length, self.source)
        lo, hi = self.span(np.arange(self.source - length + 1), length)
        return int(np.max(hi - lo + 1, initial=0))

    def covered(self, patch: int) -> int:
        """The longest source run whose reach fits in `patch` input pixels anywhere (0: none)."""
        lo, hi = 0, self.source  # widest() is monotone in the length
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.widest(mid) <= patch:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def window(self) -> tuple[int, int]:
        """Source pixels [start, stop) that reach the input at all; the rest are cropped away."""
        hit = np.flatnonzero((self.reach_hi >= 0) & (self.reach_lo <= self.size - 1))
        return (int(hit[0]), int(hit[-1]) + 1) if len(hit) else (0, 0)


@dataclass(frozen=True)
class SourceMap:
    """Both axes of one source size under one preprocessing."""

    y: AxisMap
    x: AxisMap

    @classmethod
    def build(cls, source_hw, resized_hw, offset_yx, input_hw) -> SourceMap:
        return cls(AxisMap.build(source_hw[0], resized_hw[0], offset_yx[0], input_hw[0]),
                   AxisMap.build(source_hw[1], resized_hw[1], offset_yx[1], input_hw[1]))

    @property
    def source_hw(self) -> tuple[int, int]:
        return self.y.source, self.x.source

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.y.size, self.x.size

    def covered_patch(self, patch_hw) -> tuple[int, int]:
        """The largest source patch (h, w) whose influence fits an input patch of `patch_hw`,
        wherever it is placed in the source. Each axis on its own: the resize is separable, so a
        source rectangle changes at most the product of its two axis reaches."""
        return self.y.covered(int(patch_hw[0])), self.x.covered(int(patch_hw[1]))

    def needed_patch(self, source_patch_hw) -> tuple[int, int]:
        """The smallest input patch that contains the influence of any source patch of this size."""
        return self.y.widest(int(source_patch_hw[0])), self.x.widest(int(source_patch_hw[1]))

    def influence(self, top: int, left: int, patch_hw) -> tuple[int, int, int, int]:
        """[y0, x0, y1, x1) of the input pixels a source patch at (top, left) can change
        (empty, y0 >= y1 or x0 >= x1, when it lies where the crop discards it)."""
        ylo, yhi = self.y.span(top, int(patch_hw[0]))
        xlo, xhi = self.x.span(left, int(patch_hw[1]))
        return int(ylo), int(xlo), int(yhi) + 1, int(xhi) + 1

    def window(self) -> tuple[int, int, int, int]:
        """[y0, x0, y1, x1) of the source pixels that reach the input; outside it a patch changes nothing."""
        (y0, y1), (x0, x1) = self.y.window(), self.x.window()
        return y0, x0, y1, x1


def parse_source_patch(spec: str, source_hw, what: str = "source patch") -> tuple[int, int]:
    """'40' -> 40x40, '30x60' -> 30x60 (height x width), '2%' -> the square covering 2% of the
    source area (rounded up), in source pixels of `source_hw`. `what` names the value in errors."""
    h, w = source_hw
    ph, pw = parse_patch_spec(spec, what)
    if isinstance(ph, float):
        ph = pw = max(1, math.ceil(math.sqrt(ph * h * w)))
    if ph > h or pw > w:
        raise ScaleCertError(f"{what} {spec}: a {ph}x{pw} patch does not fit the {h}x{w} (HxW) source")
    return ph, pw


def parse_patch_spec(spec: str, what: str = "source patch"):
    """The syntax alone: (h, w) ints, or (fraction, fraction) floats for 'P%'. One line on error."""
    text = str(spec).strip().lower()
    try:
        if text.endswith("%"):
            frac = float(text[:-1]) / 100.0
            if not 0 < frac < 1:
                raise ScaleCertError(f"{what} {spec}: a percentage of the area must lie between 0% and 100%")
            return frac, frac
        ph, pw = (int(v) for v in text.split("x")) if "x" in text else (int(text),) * 2
    except ValueError:
        raise ScaleCertError(f"{what} {spec!r}: expected N, HxW or P% (e.g. 40, 30x60, 2%)") from None
    if ph < 1 or pw < 1:
        raise ScaleCertError(f"{what} {spec}: patch sides must be positive")
    return ph, pw


def parse_size_wh(spec: str, what: str = "source size") -> tuple[int, int]:
    """'640x480' (width x height, as cameras are named) -> (height, width)."""
    try:
        w, h = (int(v) for v in str(spec).strip().lower().split("x"))
    except ValueError:
        raise ScaleCertError(f"{what} {spec!r}: expected WIDTHxHEIGHT in pixels, e.g. 640x480") from None
    if w < 1 or h < 1:
        raise ScaleCertError(f"{what} {spec}: width and height must be positive")
    return h, w
