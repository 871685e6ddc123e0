"""The split plan: superficial layer, window footprint, occluding stride and window family.

One function for `scalecert-export` and `scalecert tune`, so a model is tuned through exactly the
split it will be exported with.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from scalecert.core import geometry
from scalecert.errors import ScaleCertError
from scalecert.export.layers import Layer, choose_layer, list_layers


@dataclass(frozen=True)
class SplitPlan:
    layer: Layer
    patch_hw: tuple[int, int]
    image_hw: tuple[int, int]
    window_hw: tuple[int, int]  # the largest footprint (docs/design.md §3.2)
    stride: int
    windows: np.ndarray  # the family (§3.4)

    @property
    def feature_hw(self) -> tuple[int, int]:
        return tuple(self.layer.shape[1:])

    def describe(self) -> str:
        rf = self.layer.rf
        return (f"layer {self.layer.name} ({self.layer.scope or 'root'}): features {self.layer.shape}, receptive field "
                f"{rf.size()}, footprint {self.window_hw}, windows {self.window_size[0]}x{self.window_size[1]} "
                f"at stride {self.stride}: {len(self.windows)}")

    @property
    def window_size(self) -> tuple[int, int]:
        return int(self.windows[0, 2] - self.windows[0, 0]), int(self.windows[0, 3] - self.windows[0, 1])


def choose_stride(spec: str, window_hw, feature_hw, budget: int) -> int:
    """An explicit positive stride, or `auto`: the smallest whose family has at most `budget` windows."""
    if spec != "auto":
        try:
            stride = int(spec)
            if stride < 1:
                raise ValueError
        except ValueError:
            raise ScaleCertError(f"--stride {spec!r}: expected a positive integer or auto") from None
        return stride
    for stride in range(1, max(feature_hw) + 1):
        if geometry.count_windows(window_hw, stride, feature_hw) <= budget:
            return stride
    return max(feature_hw)


def plan_split(model: ir.Model, image_hw, patch_hw, layer_spec: str, stride_spec: str, window_budget: int,
               max_growth: float) -> SplitPlan:
    layer = choose_layer(list_layers(model), layer_spec, patch_hw, image_hw, max_growth, model=model)
    feature_hw = layer.shape[1:]
    window_hw = geometry.window_size(patch_hw, image_hw, (layer.rf.y, layer.rf.x), feature_hw)
    stride = choose_stride(stride_spec, window_hw, feature_hw, window_budget)
    return SplitPlan(layer, tuple(patch_hw), tuple(image_hw), tuple(window_hw), stride,
                     geometry.window_family(window_hw, stride, feature_hw))
