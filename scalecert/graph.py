"""onnx-ir helpers shared by the graph rewrites of export/ and compile/, and their one finishing step."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass


def finish() -> ir.passes.Sequential:
    """Every rewrite ends here: drop nodes and initializers nothing uses, sort topologically."""
    return ir.passes.Sequential(RemoveUnusedNodesPass(), TopologicalSortPass())


def value_named(graph: ir.Graph, name: str) -> ir.Value:
    for value in [*graph.inputs, *(o for n in graph for o in n.outputs)]:
        if value.name == name:
            return value
    raise KeyError(name)


def add_constant(graph: ir.Graph, name: str, array) -> ir.Value:
    """A named initializer with its type and shape set."""
    array = np.asarray(array)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    return value


def save_checked(model: ir.Model, path: str) -> None:
    """Save after the ONNX checker accepted the model."""
    import onnx

    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def run_passes(model: ir.Model, *passes: ir.passes.PassBase) -> ir.Model:
    """Run passes in order. onnx-ir wraps a failing pass's exception in PassError; a ScaleCertError
    (bad input the user must hear about in one line) is re-raised as itself."""
    from scalecert.errors import ScaleCertError

    try:
        return ir.passes.Sequential(*passes)(model).model
    except (ir.passes.PassError, ir.passes.InvariantError) as exc:
        cause = exc
        while cause is not None and not isinstance(cause, ScaleCertError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
