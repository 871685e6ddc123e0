"""Receptive-field pass over an onnx-ir graph: the proof that a prefix is local (docs/design.md §3.1).

Every value gets one of:
  None              - does not depend on the image (weights, constants, static shapes);
  RF((sy,loy,hiy),(sx,lox,hix)) - local: feature (i, j) sees pixels
                      [i*sy+loy, i*sy+hiy] x [j*sx+lox, j*sx+hix], nothing else;
  NonLocal(reason)  - refused: one line naming the node and why.

Default deny. A node is modelled only when its domain is ONNX's, the model's opset is one this pass
was written against, and its op, *every attribute it carries* and every input that could change its
reach are in the tables below with the values they are modelled for (training-mode BatchNormalization,
a Dropout that may drop, a Slice that reverses a spatial axis, reflect padding, a Conv whose kernel
shape disagrees with its weight ... are refused). A node with a subgraph (If, Loop, Scan), a
non-default domain or a random op is refused whatever its inputs. Shapes are cross-checked: where the
pass computes an output size (windows, padding, slicing with ONNX's clamping) it must equal the
inferred one, or the node is refused. Image-dependent values keep the batch on axis 0 and the two
spatial axes last (rank 4 NCHW; rank 3 NHW only for channel-reduced maps such as the gate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

Axis = tuple[int, int, int]  # stride, lo, hi
MIN_OPSET, MAX_OPSET = 11, 25  # the default-domain opsets whose operator semantics the tables follow


@dataclass(frozen=True)
class RF:
    y: Axis
    x: Axis

    def size(self) -> tuple[int, int]:
        return (self.y[2] - self.y[1] + 1, self.x[2] - self.x[1] + 1)

    def within(self, other: "RF") -> bool:
        """Same strides, and every box of self inside the box of other at the same position."""
        return all(a[0] == b[0] and a[1] >= b[1] and a[2] <= b[2] for a, b in ((self.y, other.y), (self.x, other.x)))

    def to_json(self) -> dict:
        return {"y": list(self.y), "x": list(self.x)}


@dataclass(frozen=True)
class NonLocal:
    reason: str


class _Deny(Exception):
    """Raised by an op's rule: the node is refused for this reason."""


# Ops that map each position to the same position, with the attributes they are modelled for
# (any other attribute, or another value of a checked one, refuses the node). Inputs after the
# first must not depend on the image.
POINTWISE = {
    "Relu": (), "Sigmoid": (), "HardSwish": (), "Tanh": (), "Abs": (), "Neg": (), "Exp": (), "Log": (),
    "Sqrt": (), "Erf": (), "Softplus": (), "Softsign": (), "Mish": (), "Identity": (), "Round": (), "Floor": (),
    "Ceil": (), "Reciprocal": (), "Sign": (), "Not": (), "Sin": (), "Cos": (), "IsNaN": (),
    "IsInf": ("detect_negative", "detect_positive"), "LeakyRelu": ("alpha",), "HardSigmoid": ("alpha", "beta"),
    "Elu": ("alpha",), "Selu": ("alpha", "gamma"), "Celu": ("alpha",), "ThresholdedRelu": ("alpha",),
    "Gelu": ("approximate",), "Shrink": ("bias", "lambd"), "Clip": (), "Cast": ("to", "saturate", "round_mode"),
    "CastLike": ("saturate", "round_mode"), "BatchNormalization": ("epsilon", "momentum", "training_mode"),
    "Dropout": ("seed", "ratio"),
    # constant (image-independent) scales and zero points only: a dynamic scale is a statistic of the
    # whole tensor (DynamicQuantizeLinear is refused as unknown)
    "QuantizeLinear": ("axis", "saturate", "block_size", "output_dtype", "precision"),
    "DequantizeLinear": ("axis", "block_size", "output_dtype"),
}
# Position-wise ops of several inputs; image-dependent inputs must have the output's rank and
# spatial size (no broadcast across positions), constants must not vary along the batch.
ELEMENTWISE = {
    "Add": (), "Sub": (), "Mul": (), "Div": (), "Pow": (), "Max": (), "Min": (), "Sum": (), "Mean": (),
    "Where": (), "PRelu": (), "And": (), "Or": (), "Xor": (), "Greater": (), "Less": (), "Equal": (),
    "GreaterOrEqual": (), "LessOrEqual": (), "Mod": ("fmod",), "Concat": ("axis",),
}
WINDOWED = {
    "Conv": ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"),
    "MaxPool": ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "storage_order", "strides"),
    "AveragePool": ("auto_pad", "ceil_mode", "count_include_pad", "dilations", "kernel_shape", "pads", "strides"),
    "LpPool": ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "p", "pads", "strides"),
}
CHANNEL_REDUCE = {op: ("axes", "keepdims", "noop_with_empty_axes") for op in (
    "ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare")}
SHAPING = {"Pad": ("mode",), "Slice": (), "Squeeze": ("axes",), "Unsqueeze": ("axes",)}
STATIC = {"Shape": ("start", "end"), "Size": ()}  # read shapes, not values
RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial"}
KNOWN = {**POINTWISE, **ELEMENTWISE, **WINDOWED, **CHANNEL_REDUCE, **SHAPING, **STATIC}


# -- reading nodes -----------------------------------------------------------------------------------


def _ints(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return [int(v) for v in attr.as_ints()] if attr is not None else default


def _int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return int(attr.as_int()) if attr is not None else default


def _string(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return attr.as_string() if attr is not None else default


def const_array(value: ir.Value | None):
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _const_ints(node: ir.Node, index: int, what: str) -> list[int] | None:
    """A constant integer input (None when omitted); refused when present but not constant."""
    value = _optional_input(node, index)
    if value is None:
        return None
    array = const_array(value)
    if array is None:
        raise _Deny(f"{what} is not a constant")
    if array.dtype.kind not in "iu":
        raise _Deny(f"{what} is not an integer tensor")
    return [int(v) for v in np.ravel(array)]


def _dims(value: ir.Value) -> list:
    if value.shape is None:
        raise _Deny(f"{value.name} has no inferred shape")
    return [d if isinstance(d, int) else None for d in value.shape]


def _map_dims(value: ir.Value) -> tuple[int, tuple[int, int]]:
    """(rank, (H, W)) of an image-dependent map: rank 4 (NCHW) or 3 (NHW), static spatial size."""
    dims = _dims(value)
    if len(dims) not in (3, 4):
        raise _Deny(f"{value.name} is a rank-{len(dims)} tensor, not an (N, C, H, W) feature map")
    if dims[-1] is None or dims[-2] is None:
        raise _Deny(f"{value.name} has an unknown spatial size")
    return len(dims), (dims[-2], dims[-1])


def _axes(raw: list[int], rank: int, what: str) -> list[int]:
    axes = [a + rank if a < 0 else a for a in raw]
    if any(not 0 <= a < rank for a in axes) or len(set(axes)) != len(axes):
        raise _Deny(f"{what} {raw} are not distinct axes of a rank-{rank} tensor")
    return axes


def _same_out(node: ir.Node, rank: int, hw: tuple[int, int]) -> None:
    out_rank, out_hw = _map_dims(node.outputs[0])
    if (out_rank, out_hw) != (rank, hw):
        raise _Deny(f"output {node.outputs[0].name} is not the same map as its input")


def _unused_extra_outputs(node: ir.Node, what: str) -> None:
    if any(out.uses() or out in _graph_outputs(node) for out in node.outputs[1:]):
        raise _Deny(f"{what} is used")


def _graph_outputs(node: ir.Node) -> set:
    return set(node.graph.outputs) if node.graph is not None else set()


# -- the rules -----------------------------------------------------------------------------------------


def _pointwise(node: ir.Node, rf: RF) -> RF:
    op = node.op_type
    rank, hw = _map_dims(node.inputs[0])
    if op == "BatchNormalization":
        if _int(node, "training_mode", 0) != 0 or len(node.outputs) > 1:
            raise _Deny("training mode normalises by statistics of the whole batch and image "
                        "(call model.eval() before exporting)")
    if op == "Dropout":
        training = _optional_input(node, 2)
        if training is not None:
            flag = const_array(training)
            if flag is None or bool(np.ravel(flag)[0]):
                raise _Deny("training_mode is not constant false: it may drop (call model.eval() before exporting)")
        _unused_extra_outputs(node, "its mask output")
    _same_out(node, rank, hw)
    return rf


def _elementwise(node: ir.Node, inputs: list, dependent: list) -> RF:
    out_rank, out_hw = _map_dims(node.outputs[0])
    if node.op_type == "Concat":
        axis = _int(node, "axis", 0)
        if out_rank != 4 or axis % 4 != 1:
            raise _Deny(f"joins along axis {axis}, not the channel axis")
    for value, rf in zip(node.inputs, inputs):
        if value is None:
            continue
        if rf is None:  # a constant: may vary per position or channel, never per batch row
            dims = _dims(value)
            if len(dims) == out_rank and dims[0] != 1:
                raise _Deny(f"{value.name} varies along the batch axis")
            continue
        if _map_dims(value) != (out_rank, out_hw):
            raise _Deny(f"broadcasts {value.name} across positions")
    return _hull([rf for _, rf in dependent])


def _hull(rfs: list[RF]) -> RF:
    axes = []
    for pick in (lambda r: r.y, lambda r: r.x):
        strides = {pick(r)[0] for r in rfs}
        if len(strides) != 1:
            raise _Deny("joins branches with different strides")
        axes.append((strides.pop(), min(pick(r)[1] for r in rfs), max(pick(r)[2] for r in rfs)))
    return RF(axes[0], axes[1])


def _window_pads(node, in_hw, out_hw, kernel, strides, dilations) -> list[int]:
    """Begin pads (y, x), after auto_pad; the output size must match ONNX's formula for them."""
    auto_pad = _string(node, "auto_pad", "NOTSET")
    ceil_mode = _int(node, "ceil_mode", 0)
    if ceil_mode not in (0, 1):
        raise _Deny(f"ceil_mode {ceil_mode}")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if "pads" in node.attributes:
            raise _Deny("auto_pad with explicit pads")
        begins = []
        for a in (0, 1):
            if out_hw[a] != math.ceil(in_hw[a] / strides[a]):
                raise _Deny(f"output size {out_hw[a]} disagrees with auto_pad {auto_pad}")
            total = max((out_hw[a] - 1) * strides[a] + (kernel[a] - 1) * dilations[a] + 1 - in_hw[a], 0)
            begins.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        return begins
    if auto_pad == "VALID":
        if "pads" in node.attributes:
            raise _Deny("auto_pad VALID with explicit pads")
        pads = [0, 0, 0, 0]
    elif auto_pad == "NOTSET":
        pads = _ints(node, "pads", [0, 0, 0, 0])
        if len(pads) != 4 or min(pads) < 0:
            raise _Deny(f"pads {pads}")
    else:
        raise _Deny(f"auto_pad {auto_pad}")
    for a in (0, 1):
        span = in_hw[a] + pads[a] + pads[a + 2] - ((kernel[a] - 1) * dilations[a] + 1)
        if span < 0:
            raise _Deny("the window is larger than the padded input")
        size = span // strides[a] + 1
        if ceil_mode:  # ONNX Runtime (as PyTorch) drops a last window that would start in the end padding
            size = -(-span // strides[a]) + 1
            if (size - 1) * strides[a] >= in_hw[a] + pads[a]:
                size -= 1
        if out_hw[a] != size:
            raise _Deny(f"output size {out_hw[a]} disagrees with pads {pads}, strides {strides} and ceil_mode "
                        f"{ceil_mode} (expected {size})")
    return pads[:2]


def _windowed(node: ir.Node, rf: RF) -> RF:
    rank, in_hw = _map_dims(node.inputs[0])
    out_rank, out_hw = _map_dims(node.outputs[0])
    if rank != 4 or out_rank != 4:
        raise _Deny("not a 2-D window over an (N, C, H, W) map")
    if node.op_type == "Conv":
        weight = _dims(node.inputs[1])
        if len(weight) != 4 or None in weight[2:]:
            raise _Deny("kernel shape unknown or not 2-D")
        kernel = weight[2:]
        if _ints(node, "kernel_shape", kernel) != kernel:
            raise _Deny(f"kernel_shape {_ints(node, 'kernel_shape', None)} disagrees with the weight {kernel}")
    else:
        kernel = _ints(node, "kernel_shape", None)
        if kernel is None or len(kernel) != 2:
            raise _Deny(f"kernel_shape {kernel}")
        if node.op_type == "MaxPool":
            _unused_extra_outputs(node, "its Indices output")
    strides, dilations = _ints(node, "strides", [1, 1]), _ints(node, "dilations", [1, 1])
    if len(strides) != 2 or len(dilations) != 2 or min(strides + dilations + kernel) < 1:
        raise _Deny(f"strides {strides}, dilations {dilations}, kernel {kernel}")
    begins = _window_pads(node, in_hw, out_hw, kernel, strides, dilations)
    axes = []
    for a, (stride, lo, hi) in enumerate((rf.y, rf.x)):
        axes.append((stride * strides[a], lo - begins[a] * stride,
                     hi + ((kernel[a] - 1) * dilations[a] - begins[a]) * stride))
    return RF(axes[0], axes[1])


def _pad(node: ir.Node, rf: RF) -> RF:
    mode = _string(node, "mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise _Deny(f"mode {mode}")
    rank, in_hw = _map_dims(node.inputs[0])
    out_rank, out_hw = _map_dims(node.outputs[0])
    pads = _const_ints(node, 1, "pads")
    if pads is None:
        raise _Deny("no pads")
    raw_axes = _const_ints(node, 3, "axes")
    axes = _axes(raw_axes if raw_axes is not None else list(range(rank)), rank, "axes")
    if len(pads) != 2 * len(axes):
        raise _Deny(f"{len(pads)} pads for {len(axes)} axes")
    begins, ends = dict(zip(axes, pads[:len(axes)])), dict(zip(axes, pads[len(axes):]))
    if begins.get(0, 0) or ends.get(0, 0):
        raise _Deny("pads the batch axis")
    spatial = [rank - 2, rank - 1]
    if mode != "constant" and any(begins.get(a, 0) or ends.get(a, 0) for a in spatial):
        raise _Deny(f"{mode} padding copies pixels across positions")
    for k, a in enumerate(spatial):
        size = in_hw[k] + begins.get(a, 0) + ends.get(a, 0)
        if size < 1 or out_rank != rank or out_hw[k] != size:
            raise _Deny(f"output size {out_hw[k]} disagrees with pads {pads}")
    (sy, loy, hiy), (sx, lox, hix) = rf.y, rf.x
    by, bx = begins.get(spatial[0], 0), begins.get(spatial[1], 0)
    return RF((sy, loy - by * sy, hiy - by * sy), (sx, lox - bx * sx, hix - bx * sx))


def _slice(node: ir.Node, rf: RF) -> RF:
    """ONNX Slice: a negative start or end adds the dimension, then both clamp to [0, dim] (for
    positive steps); the output has ceil((end - start) / step) positions."""
    rank, in_hw = _map_dims(node.inputs[0])
    out_rank, out_hw = _map_dims(node.outputs[0])
    starts, ends = _const_ints(node, 1, "starts"), _const_ints(node, 2, "ends")
    if starts is None or ends is None or len(starts) != len(ends):
        raise _Deny("starts and ends")
    raw_axes, steps = _const_ints(node, 3, "axes"), _const_ints(node, 4, "steps")
    axes = _axes(raw_axes if raw_axes is not None else list(range(len(starts))), rank, "axes")
    steps = steps if steps is not None else [1] * len(starts)
    if not len(axes) == len(steps) == len(starts):
        raise _Deny("starts, ends, axes and steps differ in length")
    out = {rank - 2: rf.y, rank - 1: rf.x}
    sizes = dict(zip((rank - 2, rank - 1), in_hw))
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if step == 0:
            raise _Deny("step 0")
        if axis == 0:
            raise _Deny("slices the batch axis")
        if axis not in out:
            continue  # channels: any selection keeps every position where it was
        if step < 0:
            raise _Deny("reverses a spatial axis")
        dim = sizes[axis]
        start = min(max(start + dim if start < 0 else start, 0), dim)
        end = min(max(end + dim if end < 0 else end, 0), dim)
        count = max(0, -(-(end - start) // step))
        if count == 0 or out_rank != rank or out_hw[axis - (rank - 2)] != count:
            raise _Deny(f"output size {out_hw[axis - (rank - 2)]} disagrees with slicing [{start}:{end}:{step}] "
                        f"of {dim}")
        stride, lo, hi = out[axis]
        out[axis] = (stride * step, lo + start * stride, hi + start * stride)
    for k, axis in enumerate((rank - 2, rank - 1)):
        if axis not in axes and out_hw[k] != in_hw[k]:
            raise _Deny(f"output size {out_hw[k]} of an axis it does not slice")
    return RF(out[rank - 2], out[rank - 1])


def _reduce_axes(node: ir.Node) -> list[int] | None:
    if "axes" in node.attributes:
        return _ints(node, "axes", None)
    return _const_ints(node, 1, "axes")


def _channel_reduce(node: ir.Node, rf: RF) -> RF:
    """Reductions over the channel axis alone keep every position (the SIN gate's score)."""
    rank, hw = _map_dims(node.inputs[0])
    axes = _reduce_axes(node)
    if rank != 4 or not axes or _axes(axes, rank, "axes") != [1]:
        raise _Deny(f"reduces axes {axes}, not the channel axis alone")
    _same_out(node, 4 if _int(node, "keepdims", 1) else 3, hw)
    return rf


def _squeeze(node: ir.Node, rf: RF) -> RF:
    """Squeeze/Unsqueeze of the channel axis only: (N, 1, H, W) <-> (N, H, W)."""
    rank, hw = _map_dims(node.inputs[0])
    axes = _reduce_axes(node)
    squeeze = node.op_type == "Squeeze"
    if axes is None or _axes(axes, 4, "axes") != [1] or rank != (4 if squeeze else 3):
        raise _Deny(f"axes {axes} of a rank-{rank} map: only the channel axis of (N, 1, H, W)")
    if squeeze and _dims(node.inputs[0])[1] != 1:
        raise _Deny("squeezes a channel axis of size other than 1")
    _same_out(node, 3 if squeeze else 4, hw)
    return rf


def _static(node: ir.Node) -> None:
    """Shape/Size: None when the dimensions read are static; a symbolic one (the batch) would let
    the features depend on how many images share a call."""
    dims = _dims(node.inputs[0])
    if node.op_type == "Shape":
        rank = len(dims)
        start, end = _int(node, "start", 0), _int(node, "end", rank)
        start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
        dims = dims[start:end]
    if None in dims:
        raise _Deny("reads a symbolic dimension (the batch size)")


def _subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values())


def _node_rf(node: ir.Node, info: dict, opset: int) -> RF | NonLocal | None:
    op, name = node.op_type, node.name or "(unnamed)"
    try:
        if node.domain not in ("", "ai.onnx"):
            raise _Deny(f"custom domain {node.domain!r}: not modelled")
        if _subgraph(node):
            raise _Deny("has a subgraph, which may read any value of the graph")
        if op in RANDOM:
            raise _Deny("is random: the features would differ between two runs on the same image")
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise _Deny(f"opset {opset} is outside the opsets this pass models ({MIN_OPSET}-{MAX_OPSET})")
        inputs = [info.get(v) if v is not None else None for v in node.inputs]
        dependent = [(v, r) for v, r in zip(node.inputs, inputs) if r is not None]
        if not dependent:
            return None  # a deterministic function of constants
        for _, r in dependent:
            if isinstance(r, NonLocal):
                return r
        if op not in KNOWN:
            raise _Deny("mixes positions or is not modelled (default deny)")
        unknown = sorted(set(node.attributes) - set(KNOWN[op]))
        if unknown:
            raise _Deny(f"attribute {', '.join(unknown)} is not modelled")
        if op in STATIC:
            _static(node)
            return None
        if op in ELEMENTWISE:
            return _elementwise(node, inputs, dependent)
        if len(dependent) != 1 or dependent[0][0] is not node.inputs[0]:
            raise _Deny("a parameter input depends on the image")
        rf = inputs[0]
        if op in POINTWISE:
            return _pointwise(node, rf)
        if op in WINDOWED:
            return _windowed(node, rf)
        if op in CHANNEL_REDUCE:
            return _channel_reduce(node, rf)
        if op in ("Squeeze", "Unsqueeze"):
            return _squeeze(node, rf)
        return _pad(node, rf) if op == "Pad" else _slice(node, rf)
    except _Deny as why:
        return NonLocal(f"{op} {name}: {why}")


def receptive_fields(graph: ir.Graph) -> dict[ir.Value, RF | NonLocal | None]:
    """Receptive field of every value, from the first graph input (the image)."""
    image = graph.inputs[0]
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0))
    info: dict[ir.Value, RF | NonLocal | None] = {}
    try:
        _map_dims(image)
        info[image] = RF((1, 0, 0), (1, 0, 0))
    except _Deny as why:
        info[image] = NonLocal(f"image input: {why}")
    for extra in graph.inputs[1:]:  # an input with an initializer is a constant the runtime never feeds
        info[extra] = None if extra.const_value is not None else NonLocal(f"second graph input {extra.name}")
    for node in graph:  # onnx-ir iterates nodes in topological order of a valid model
        result = _node_rf(node, info, opset)
        for out in node.outputs:
            info[out] = result
    return info


def _captured(node: ir.Node) -> list[ir.Value]:
    """Values of the outer graph that the node's subgraphs read."""
    out = []
    for attr in node.attributes.values():
        graphs = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.as_graphs()) if attr.type == ir.AttributeType.GRAPHS else [])
        for sub in graphs:
            inner = set(sub.inputs) | {v for n in sub for v in n.outputs} | set(sub.initializers.values())
            for n in sub:
                out += [v for v in n.inputs if v is not None and v not in inner]
                out += _captured(n)
    return out


BATCH = "batch"  # a dimension read by shape_read: the number of rows of the call


def shape_read(node: ir.Node, batch) -> list | None:
    """What a Shape node reads, when that is a function of the batch size alone: per dimension read,
    its static size or BATCH (the image's symbolic first dimension `batch`); None for any other node
    or dimension (unknown or another symbol). A ViT reads the batch size of the image to expand its
    class token; such a read carries no pixel, so it is no path from the image (the suffix reads the
    batch of its own rows instead, export/split.py::OcclusionSuffix)."""
    if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or set(node.attributes) - {"start", "end"}:
        return None
    source = node.inputs[0]
    if source is None or source.shape is None:
        return None
    dims = list(source.shape)
    rank = len(dims)
    start, end = _int(node, "start", 0), _int(node, "end", rank)
    start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
    read = []
    for dim in dims[start:end]:
        if isinstance(dim, int):
            read.append(dim)
        elif batch is not None and not isinstance(batch, int) and dim.value is not None and dim == batch:
            read.append(BATCH)
        else:
            return None
    return read


def image_batch(graph: ir.Graph):
    """The image's first dimension (the batch: a symbolic dimension, or an int when fixed), or None."""
    image = graph.inputs[0]
    return image.shape[0] if image.shape is not None and len(image.shape) else None


def image_dependent(graph: ir.Graph, blocked: ir.Value | None = None) -> set:
    """The values that depend on the image when every use of `blocked` is cut. Subgraphs count with
    every outer value they read; a Shape node that reads only static sizes and the batch size
    (shape_read) does not."""
    batch = image_batch(graph)
    dependent = {graph.inputs[0]}
    for node in graph:
        if shape_read(node, batch) is not None:
            continue
        reads = list(node.inputs) + _captured(node)
        if any(v is not None and v is not blocked and v in dependent for v in reads):
            dependent.update(node.outputs)
    return dependent


def depends_on_image_without(graph: ir.Graph, blocked: ir.Value, target: ir.Value) -> bool:
    """Does `target` still depend on the image when every use of `blocked` is cut?"""
    return target in image_dependent(graph, blocked)
