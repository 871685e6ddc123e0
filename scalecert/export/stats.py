"""Parameter and multiply-accumulate counts of an ONNX graph, for one image / one window."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from scalecert.graph import infer_shapes


def _dims(value):
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in value.shape]


def node_macs(node: ir.Node) -> int:
    """Multiply-accumulates of one Conv, Gemm or MatMul node (0 for other ops or unknown shapes)."""
    out = _dims(node.outputs[0]) if node.outputs else None
    if out is None:
        return 0
    if node.op_type == "Conv":
        w = _dims(node.inputs[1])
        return int(np.prod(out)) * int(np.prod(w[1:])) if w else 0
    if node.op_type in ("Gemm", "MatMul"):
        a = _dims(node.inputs[0])
        return int(np.prod(out)) * a[-1] if a else 0
    return 0


def graph_stats(model: ir.Model) -> dict:
    graph = model.graph
    params = sum(int(np.prod(v.const_value.shape)) for v in graph.initializers.values()
                 if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point())
    return {"params": int(params), "macs": int(sum(node_macs(node) for node in graph))}


def with_shapes(model: ir.Model) -> ir.Model:
    return ir.from_proto(infer_shapes(ir.to_proto(model)))


def prefix_macs_by_value(model: ir.Model) -> dict[str, int]:
    """MACs of every node up to and including the producer of each value, in topological order: for
    a cut point, what the prefix costs (the suffix is the rest). An estimate for planning only."""
    out, total = {value.name: 0 for value in model.graph.inputs}, 0
    for node in model.graph:
        total += node_macs(node)
        for value in node.outputs:
            out[value.name] = total
    return out
