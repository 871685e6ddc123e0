"""Taylor importance through PyTorch: mean |A * dL/dA| at the ONNX tensor named `layer`.

The dynamo exporter names ONNX values after the nodes of the decomposed ExportedProgram, so the
superficial tensor is found by name in that program and its gradient taken there.
"""
from __future__ import annotations

import numpy as np


def taylor_scores(program, layer: str, images: np.ndarray, labels, batch: int = 32):
    """-> (activation, gradient) stacked over images, or None when the name is not in the program."""
    import torch
    import torch.fx

    module = program.module() if hasattr(program, "graph_signature") else program  # ExportedProgram or its module
    if not any(n.name == layer for n in module.graph.nodes):
        return None
    captured = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.name == layer:
                out = out.detach().requires_grad_(True)
                captured["a"] = out
            return out

    device = next(iter(module.parameters()), torch.zeros(())).device
    acts, grads = [], []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch]).to(device)
        with torch.enable_grad():
            logits = Capture(module).run(x)
            target = (torch.as_tensor([l if l is not None else -1 for l in labels[start:start + batch]])
                      if labels is not None else torch.full((len(x),), -1)).to(device)
            target = torch.where(target >= 0, target, logits.argmax(1))
            loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, captured["a"])
        acts.append(captured["a"].detach().cpu().numpy())
        grads.append(grad.cpu().numpy())
    return np.concatenate(acts), np.concatenate(grads)
