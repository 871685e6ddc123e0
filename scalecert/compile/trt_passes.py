"""The graph pass that makes the suffix ONNX what TensorRT handles best (an onnx-ir pass): its
`windows` input becomes int32."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from scalecert.errors import ScaleCertError
from scalecert.graph import finish, run_passes

_FOLLOW = {"Split", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Identity", "Slice", "Gather", "Transpose"}
_COMPARE = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal"}


def _int32_const(graph: ir.Graph, value: ir.Value, cache: dict) -> ir.Value | None:
    """An int32 initializer equal to the int64 constant `value`, or None if it does not fit."""
    if value.name in cache:
        return cache[value.name]
    array = value.const_value.numpy()
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
        return None
    name = f"{value.name}_int32"
    new = ir.Value(name=name, const_value=ir.tensor(array.astype(np.int32), name=name))
    new.shape, new.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.INT32)
    graph.register_initializer(new)
    cache[value.name] = new
    return new


class WindowsToInt32(ir.passes.InPlacePass):
    """Make the int64 graph input `windows` int32. Values derived from it through shape/split ops
    become int32 too, and comparisons of them with int64 constants compare against int32 copies
    of those constants; any other consumer gets a Cast back to int64."""

    def __init__(self, name: str = "windows"):
        self.name = name

    changed = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.changed = _windows_to_int32(model, self.name)
        return ir.passes.PassResult(model, modified=self.changed)

    def ensures(self, model: ir.Model) -> None:
        windows = next((v for v in model.graph.inputs if v.name == self.name), None)
        if windows is not None and windows.dtype != ir.DataType.INT32:
            raise ir.passes.PostconditionError(f"{self.name} is still {windows.dtype}")


def _windows_to_int32(model: ir.Model, name: str) -> bool:
    graph = model.graph
    windows = next((v for v in graph.inputs if v.name == name), None)
    if windows is None or windows.dtype == ir.DataType.INT32:
        return False
    if windows.dtype != ir.DataType.INT64:
        raise ScaleCertError(f"graph input {name} is {windows.dtype}, expected int64")
    windows.dtype = ir.DataType.INT32
    constants, casts, frontier = {}, {}, [windows]
    while frontier:
        value = frontier.pop()
        for node, index in list(value.uses()):
            if node.op_type in _FOLLOW and index == 0:
                for out in node.outputs:
                    out.dtype = ir.DataType.INT32
                    frontier.append(out)
                continue
            if node.op_type in _COMPARE:
                other = node.inputs[1 - index]
                if other is not None and other.const_value is not None and other.dtype == ir.DataType.INT64:
                    replacement = _int32_const(graph, other, constants)
                    if replacement is not None:
                        node.replace_input_with(1 - index, replacement)
                        continue
            if value.name not in casts:
                cast = ir.node("Cast", [value], {"to": ir.DataType.INT64}, name=f"scalecert/{value.name}_int64")
                cast.outputs[0].name = f"{value.name}_int64"
                cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.INT64, value.shape
                graph.append(cast)
                casts[value.name] = cast.outputs[0]
            node.replace_input_with(index, casts[value.name])
    return True


def prepare_onnx(src: str, dst: str) -> dict:
    """Write the TensorRT-ready variant of a bundle's suffix ONNX file; returns what changed."""
    try:
        model = ir.load(src)
    except Exception as exc:  # noqa: BLE001
        raise ScaleCertError(f"{src}: cannot read it as ONNX ({str(exc).splitlines()[0][:120]})") from None
    windows = WindowsToInt32()
    run_passes(model, windows, finish())
    ir.save(model, dst)
    return {"windows_int32": windows.changed}
