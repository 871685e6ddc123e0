"""Parameter and multiply-accumulate counts of an ONNX graph, for one image / one window."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _dims(value):
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in value.shape]


def graph_stats(model: ir.Model) -> dict:
    graph = model.graph
    params = sum(int(np.prod(v.const_value.shape)) for v in graph.initializers.values()
                 if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point())
    macs = 0
    for node in graph:
        out = _dims(node.outputs[0]) if node.outputs else None
        if out is None:
            continue
        if node.op_type == "Conv":
            w = _dims(node.inputs[1])
            if w:
                macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a = _dims(node.inputs[0])
            if a:
                macs += int(np.prod(out)) * a[-1]
    return {"params": int(params), "macs": int(macs)}


def with_shapes(model: ir.Model) -> ir.Model:
    import onnx

    proto = onnx.shape_inference.infer_shapes(ir.to_proto(model), data_prop=True)
    return ir.from_proto(proto)
