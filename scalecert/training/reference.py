"""Plain-PyTorch reference of the ScaleCert method, for cross-checking the engine path.

Independent of the runtime: it runs the model's own (decomposed) PyTorch graph, gates the
superficial tensor with the bundle's alpha and tau, occludes every window of the family (no
dedupe, no skipping) and decides with its own few lines. Torch is imported here; never in runtime/.
"""
from __future__ import annotations

import numpy as np

from scalecert.bundle import Bundle
from scalecert.export.loading import LoadedModel
from scalecert.training.split_program import SplitProgram


class TorchReference(SplitProgram):
    def __init__(self, loaded: LoadedModel, bundle_dir: str, program=None):
        from scalecert.export.to_onnx import to_onnx

        bundle = Bundle.open(bundle_dir)
        self.manifest = bundle.manifest
        if program is None:
            _, program = to_onnx(loaded)
        sin = bundle.manifest["sin"]
        super().__init__(program.module(), bundle.manifest["layer"]["name"], bundle.input_spec, bundle.windows(),
                         bundle.feature_hw, sin["alpha"], sin["threshold"], sin["phi"])
        if bundle.manifest["windows"].get("fill", "zero") == "blank":
            self.use_blank_fill()

    def certify(self, pixels_uint8: np.ndarray, batch: int = 128) -> dict:
        """-> {"status", "label", "window_labels", "gate"} for one HxWx3 uint8 image."""
        torch = self.torch
        with torch.no_grad():
            x = self.normalize(pixels_uint8[None])
            s = self.gated(self.superficial(x))
            base = int(self.suffix(s).argmax(1)[0])
            labels = torch.cat([self.suffix(self.occlude(s, np.arange(i, min(i + batch, len(self.windows))))).argmax(1)
                                for i in range(0, len(self.windows), batch)]).numpy()
        certified = bool((labels == base).all())
        return {"status": "certified" if certified else "alert", "label": base, "window_labels": labels,
                "gate": self.gate(self.superficial(x))[0].numpy()}
