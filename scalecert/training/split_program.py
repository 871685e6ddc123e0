"""The model's own decomposed PyTorch program, cut at the superficial layer: A, the static SIN gate,
and the suffix on (occluded) gated features. The reference and `scalecert tune` both run the method
through it. torch is used here; never in runtime/.
"""
from __future__ import annotations

import numpy as np

from scalecert.core import geometry


def run_to(module, layer_node, x):
    """Run the program's module on x up to layer_node and return that node's value (the prefix)."""
    import torch

    if layer_node.op == "placeholder":
        return x
    captured = {}

    class Stop(Exception):
        pass

    class Capture(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node is layer_node:
                captured["a"] = out
                raise Stop
            return out

    try:
        Capture(module).run(x)
    except Stop:
        pass
    return captured["a"]


def cut_node(module, layer: str):
    """The program's node for the plan's layer name. The ONNX graph names the model input `image`
    (export/to_onnx.py), the program its first placeholder: pixel-space windows cut there."""
    nodes = list(module.graph.nodes)
    named = [n for n in nodes if n.name == layer]
    if not named and layer == "image":
        named = [n for n in nodes if n.op == "placeholder"][:1]
    if not named:
        raise KeyError(f"no node {layer!r} in the program")
    return named[0]


class SplitProgram:
    """A decomposed PyTorch program cut at the superficial layer: A, the SIN gate, the suffix on
    (occluded) gated features. The reference and `scalecert tune` both run the method through it."""

    def __init__(self, module, layer: str, input_spec: dict, windows: np.ndarray, feature_hw, alpha, tau: float,
                 phi: str, device: str = "cpu"):
        import torch

        self.torch, self.module, self.phi, self.device = torch, module, phi, device
        self.layer_node = cut_node(module, layer)
        self.mean = torch.tensor(input_spec["mean"], dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self.std = torch.tensor(input_spec["std"], dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self.input_size = tuple(input_spec["input_size"])
        self.windows, self.feature_hw = windows, tuple(feature_hw)
        masks = geometry.window_masks(windows, self.feature_hw).reshape(-1, 1, *self.feature_hw)
        self.window_masks = torch.from_numpy(masks).to(device)
        self.alpha = torch.as_tensor(np.asarray(alpha, np.float32), device=device).reshape(1, -1, 1, 1)
        self.tau = float(np.float32(tau))
        self.fill = None  # what an occluded window holds: zeros, or use_blank_fill()'s features

    def use_blank_fill(self) -> None:
        """Windows hold the layer's features of a blank image (0 after normalisation), dead channels
        0: the bundle's --fill blank (export/split.py), recomputed here in PyTorch."""
        with self.torch.no_grad():
            blank = self.superficial(self.torch.zeros(1, *self.input_size, device=self.device))
        self.fill = self.torch.where(self.alpha > 0, blank, self.torch.zeros((), dtype=blank.dtype, device=self.device))

    def normalize(self, pixels_uint8: np.ndarray):
        x = self.torch.from_numpy(np.ascontiguousarray(pixels_uint8)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def superficial(self, x):
        """A: the superficial tensor for a normalised batch."""
        return run_to(self.module, self.layer_node, x)

    def score(self, a):
        magnitude = a.abs() if self.phi == "abs" else self.torch.relu(a)
        return (magnitude * self.alpha).sum(1)

    def gate(self, a):
        return self.score(a) > self.tau

    def gated(self, a):
        """S = A where score > tau and alpha > 0, else 0: the exported prefix's Where, exactly."""
        return self._apply_gate(a, self.score(a))

    def _apply_gate(self, a, score):
        keep = (score > self.tau)[:, None] & (self.alpha > 0)
        return self.torch.where(keep, a, self.torch.zeros((), dtype=a.dtype, device=a.device))

    def suffix(self, s):
        """logits from (already occluded) gated features, one row per row of s."""
        dummy = self.torch.zeros(len(s), *self.input_size, device=self.device)
        return self.torch.fx.Interpreter(self.module).run(dummy, initial_env={self.layer_node: s})

    def occlude(self, s, window_index: np.ndarray):
        """Row i: s (or its only row) with window window_index[i] of the family zeroed (or filled,
        use_blank_fill); with a (n, k) index, the union of the k windows window_index[i] (a pair for
        recovery, k = 2)."""
        index = self.torch.from_numpy(np.asarray(window_index)).to(self.device)
        masks = self.window_masks[index]
        if index.dim() == 2:
            masks = masks.any(1)
        hidden = self.torch.zeros((), dtype=s.dtype, device=s.device) if self.fill is None else self.fill.to(s.dtype)
        return self.torch.where(masks, hidden, s)
