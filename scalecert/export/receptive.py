"""Receptive-field pass over an onnx-ir graph (NCHW).

Every value gets one of:
  None              - does not depend on the image (weights, constants, shapes);
  RF((sy,loy,hiy),(sx,lox,hix)) - local: feature (i, j) sees pixels
                      [i*sy+loy, i*sy+hiy] x [j*sx+lox, j*sx+hix], nothing else;
  NonLocal(reason)  - some position may depend on pixels outside any such box.
Anything not known to be local is non-local: an unknown op must never shrink a footprint.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

Axis = tuple[int, int, int]  # stride, lo, hi


@dataclass(frozen=True)
class RF:
    y: Axis
    x: Axis

    def size(self) -> tuple[int, int]:
        return (self.y[2] - self.y[1] + 1, self.x[2] - self.x[1] + 1)


@dataclass(frozen=True)
class NonLocal:
    reason: str


POINTWISE = {
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Abs", "Neg", "Exp", "Log",
    "Sqrt", "Erf", "Softplus", "Softsign", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Mish",
    "Identity", "Cast", "Dropout", "Round", "Floor", "Ceil", "Reciprocal", "Sign", "Not",
    "BatchNormalization", "ThresholdedRelu", "Sin", "Cos", "IsNaN", "IsInf",
    "QuantizeLinear", "DequantizeLinear",  # static scales only: a scale that depends on the image is a second input
}
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "And",
    "Or", "Xor", "Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "Mod",
}
SHAPE_ONLY = {"Shape", "Size", "Constant", "ConstantOfShape"}
WINDOWED = {"Conv", "MaxPool", "AveragePool", "LpPool"}


def _ints(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else default


def _const(value: ir.Value | None):
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _spatial(value: ir.Value):
    shape = value.shape
    if shape is None or len(shape) != 4:
        return None
    dims = [shape[2], shape[3]]
    return tuple(d if isinstance(d, int) else None for d in dims)


def _windowed(node: ir.Node, rf: RF) -> RF | NonLocal:
    if node.op_type == "Conv":
        weight = node.inputs[1]  # _node_rf checked it does not depend on the image (e.g. DequantizeLinear of constants)
        if weight.shape is None or not all(isinstance(d, int) for d in list(weight.shape)[2:]):
            return NonLocal(f"{node.op_type} {node.name}: kernel shape unknown")
        kernel = list(weight.shape)[2:]
    else:
        kernel = _ints(node, "kernel_shape", None)
    strides = _ints(node, "strides", [1, 1])
    dilations = _ints(node, "dilations", [1, 1])
    pads = _ints(node, "pads", [0, 0, 0, 0])
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", "VALID"):
        in_hw, out_hw = _spatial(node.inputs[0]), _spatial(node.outputs[0])
        if None in (in_hw or (None,)) or None in (out_hw or (None,)):
            return NonLocal(f"{node.op_type} {node.name}: auto_pad SAME with unknown shapes")
        pads = [0, 0, 0, 0]
        for a in (0, 1):
            total = max((out_hw[a] - 1) * strides[a] + (kernel[a] - 1) * dilations[a] + 1 - in_hw[a], 0)
            before = total // 2 if auto_pad.as_string() == "SAME_UPPER" else total - total // 2
            pads[a] = before
    axes = []
    for a, (stride, lo, hi) in enumerate((rf.y, rf.x)):
        begin = pads[a]
        axes.append((stride * strides[a], lo - begin * stride, hi + ((kernel[a] - 1) * dilations[a] - begin) * stride))
    return RF(axes[0], axes[1])


def _pad(node: ir.Node, rf: RF) -> RF | NonLocal:
    mode = node.attributes.get("mode")
    pads = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None:
        return NonLocal(f"Pad {node.name} with input-dependent pads")
    pads = [int(p) for p in pads]
    axes_in = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    rank = 4
    axes = [int(a) % rank for a in axes_in] if axes_in is not None else list(range(rank))
    begins = dict(zip(axes, pads[: len(axes)]))
    ends = dict(zip(axes, pads[len(axes):]))
    spatial_padded = any(begins.get(a, 0) or ends.get(a, 0) for a in (2, 3))
    if spatial_padded and mode is not None and mode.as_string() != "constant":
        return NonLocal(f"Pad {node.name} in {mode.as_string()} mode mirrors pixels across positions")
    (sy, loy, hiy), (sx, lox, hix) = rf.y, rf.x
    by, bx = begins.get(2, 0), begins.get(3, 0)
    return RF((sy, loy - by * sy, hiy - by * sy), (sx, lox - bx * sx, hix - bx * sx))


def _slice(node: ir.Node, rf: RF) -> RF | NonLocal:
    starts, ends = _const(node.inputs[1]), _const(node.inputs[2])
    axes = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = _const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None):
        return NonLocal(f"Slice {node.name} with input-dependent bounds")
    axes = list(range(len(starts))) if axes is None else [int(a) % 4 for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    in_hw = _spatial(node.inputs[0])
    out = {2: rf.y, 3: rf.x}
    for axis, start, step in zip(axes, starts, steps):
        if axis not in (2, 3):
            continue
        if step <= 0:
            return NonLocal(f"Slice {node.name} reverses a spatial axis")
        start = int(start)
        if start < 0:
            if in_hw is None or in_hw[axis - 2] is None:
                return NonLocal(f"Slice {node.name}: negative start with unknown shape")
            start += in_hw[axis - 2]
        stride, lo, hi = out[axis]
        out[axis] = (stride * step, lo + start * stride, hi + start * stride)
    return RF(out[2], out[3])


def _hull(node: ir.Node, rfs: list[RF]) -> RF | NonLocal:
    axes = []
    for pick in (lambda r: r.y, lambda r: r.x):
        strides = {pick(r)[0] for r in rfs}
        if len(strides) != 1:
            return NonLocal(f"{node.op_type} {node.name} joins branches with different strides")
        axes.append((strides.pop(), min(pick(r)[1] for r in rfs), max(pick(r)[2] for r in rfs)))
    return RF(axes[0], axes[1])


def _node_rf(node: ir.Node, info: dict) -> RF | NonLocal | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return NonLocal(f"custom op {node.domain}::{op} ({node.name})")
    if op in SHAPE_ONLY:
        return None
    ins = [info.get(v) if v is not None else None for v in node.inputs]
    dependent = [(v, r) for v, r in zip(node.inputs, ins) if r is not None]
    if not dependent:
        return None
    for _, r in dependent:
        if isinstance(r, NonLocal):
            return r
    out_hw = _spatial(node.outputs[0])
    if out_hw is None:
        return NonLocal(f"{op} {node.name} output is not a 4-D NCHW tensor")
    if op in WINDOWED or op == "Pad" or op == "Slice":
        if node.inputs[0] is None or not isinstance(ins[0], RF) or len(dependent) != 1:
            return NonLocal(f"{op} {node.name} with input-dependent parameters")
        if op == "Pad":
            return _pad(node, ins[0])
        if op == "Slice":
            return _slice(node, ins[0])
        return _windowed(node, ins[0])
    if op in POINTWISE:
        if len(dependent) != 1 or dependent[0][0] is not node.inputs[0]:
            return NonLocal(f"{op} {node.name} with input-dependent parameters")
        return ins[0]
    if op in ELEMENTWISE or (op == "Concat" and node.attributes["axis"].as_int() % 4 == 1):
        for value, _ in dependent:
            if _spatial(value) != out_hw:
                return NonLocal(f"{op} {node.name} broadcasts a feature map across positions")
        return _hull(node, [r for _, r in dependent])
    return NonLocal(f"{op} {node.name} mixes positions (not a local op)")


def receptive_fields(graph: ir.Graph) -> dict[ir.Value, RF | NonLocal | None]:
    """Receptive field of every value, from the first graph input (the image)."""
    image = graph.inputs[0]
    info: dict[ir.Value, RF | NonLocal | None] = {image: RF((1, 0, 0), (1, 0, 0))}
    for extra in graph.inputs[1:]:
        info[extra] = NonLocal(f"second graph input {extra.name}")
    for node in graph:  # onnx-ir iterates nodes in topological order of a valid model
        result = _node_rf(node, info)
        for out in node.outputs:
            info[out] = result
    return info


def depends_on_image_without(graph: ir.Graph, blocked: ir.Value, target: ir.Value) -> bool:
    """Does `target` still depend on the image when every use of `blocked` is cut?"""
    dependent = {graph.inputs[0]}
    for node in graph:
        if any(v is not None and v is not blocked and v in dependent for v in node.inputs):
            dependent.update(node.outputs)
    return target in dependent
