"""Plain-PyTorch reference of the ScaleCert method, for cross-checking the engine path.

Independent of the runtime: it runs the model's own (decomposed) PyTorch graph, gates the
superficial tensor with the bundle's alpha and tau, occludes every window of the family (no
dedupe, no skipping) and decides with its own few lines. Torch is imported here; never in runtime/.
"""
from __future__ import annotations

import numpy as np

from . import manifest as manifest_io
from .exporter.loading import LoadedModel
from .runtime import geometry


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


class TorchReference:
    def __init__(self, loaded: LoadedModel, bundle_dir: str, program=None):
        import torch

        from .exporter.to_onnx import to_onnx

        self.torch = torch
        self.manifest = manifest_io.read(bundle_dir)
        if program is None:
            _, program = to_onnx(loaded)
        self.module = program.module()
        layer = self.manifest["layer"]["name"]
        self.layer_node = next(n for n in self.module.graph.nodes if n.name == layer)
        sin = self.manifest["sin"]
        self.alpha = torch.tensor(sin["alpha"], dtype=torch.float32).reshape(1, -1, 1, 1)
        self.tau = torch.tensor(sin["threshold"], dtype=torch.float32)
        self.phi = sin["phi"]
        spec = self.manifest["input"]
        self.mean = torch.tensor(spec["mean"]).reshape(1, 3, 1, 1)
        self.std = torch.tensor(spec["std"]).reshape(1, 3, 1, 1)
        w = self.manifest["windows"]
        self.feature_hw = tuple(self.manifest["layer"]["shape"][1:])
        self.windows = geometry.window_family(tuple(w["footprint"]), w["stride"], self.feature_hw)

    def normalize(self, pixels_uint8: np.ndarray):
        x = self.torch.from_numpy(np.array(pixels_uint8)).float().permute(0, 3, 1, 2) / 255.0
        return (x - self.mean) / self.std

    def superficial(self, x):
        """A: the superficial tensor for a normalised batch."""
        return run_to(self.module, self.layer_node, x)

    def gate(self, a):
        torch = self.torch
        magnitude = a.abs() if self.phi == "abs" else torch.relu(a)
        score = (magnitude * self.alpha).sum(1)
        return score > self.tau

    def gated(self, a):
        live = (self.alpha > 0).expand_as(a[:1])
        keep = self.gate(a)[:, None] & live
        return self.torch.where(keep, a, self.torch.zeros((), dtype=a.dtype))

    def suffix(self, s):
        """logits from (already occluded) gated features, one row per row of s."""
        dummy = self.torch.zeros(len(s), *self.manifest["input"]["input_size"])
        return self.torch.fx.Interpreter(self.module).run(dummy, initial_env={self.layer_node: s})

    def occlude(self, s, windows: np.ndarray):
        """(1,C,H,W) gated features -> (B,C,H,W) with each window zeroed."""
        masks = geometry.window_masks(windows, self.feature_hw).reshape(len(windows), 1, *self.feature_hw)
        return self.torch.where(self.torch.from_numpy(masks), self.torch.zeros(()), s)

    def certify(self, pixels_uint8: np.ndarray, batch: int = 128) -> dict:
        """-> {"status", "label", "window_labels", "gate"} for one HxWx3 uint8 image."""
        torch = self.torch
        with torch.no_grad():
            x = self.normalize(pixels_uint8[None])
            s = self.gated(self.superficial(x))
            base = int(self.suffix(s).argmax(1)[0])
            labels = torch.cat([self.suffix(self.occlude(s, self.windows[i:i + batch])).argmax(1)
                                for i in range(0, len(self.windows), batch)]).numpy()
        certified = bool((labels == base).all())
        return {"status": "certified" if certified else "alert", "label": base, "window_labels": labels,
                "gate": self.gate(self.superficial(x))[0].numpy()}
