"""A fixed batch of 1 made symbolic, proven by a batch-axis analysis and checked on ONNX Runtime.

`torch.onnx.export(model, x, "model.onnx")` writes the batch of `x` (usually 1) into the graph:
the input and output are (1, ...) and every shape the tracer saw is a constant, e.g. the target
of `x.view(x.size(0), -1)` is `[1, C]`. Renaming the input's dimension to "batch" leaves those
constants behind, and the first call with two rows fails inside ONNX Runtime. The runtime needs
a batch: the suffix runs many windows per call (docs/design.md §2, §3.6).

`make_symbolic` rewrites such a graph so that it runs any batch:

1. Constant folding (onnxscript's optimizer) on the static batch-1 graph first, so that shape
   computations (`Shape -> Gather -> Concat -> Reshape`) become constants too.
2. A forward analysis gives every value computed from the image the *place of the batch* in its
   batch-1 shape: an axis `a` whose size becomes `d_a * N`, and `q`, the stride of the batch index
   inside that axis (`q = 1`: the batch is the axis' innermost part, `q = d_a`: its outermost;
   `(0, 1)` for the image). Every op is modelled by name with the attributes and constant inputs
   that move the batch; anything else that reads a batch-carrying value is refused (default
   deny, as in receptive.py): an unknown op or domain, a subgraph, a reduction, softmax,
   normalisation, gather or slice *along* the batch, a matrix product contracting over it, a
   shape read at run time (`Shape`, `Size`), a broadcast that only works because the batch is 1.
3. A Reshape keeps the flat position of the batch (`s = q * product of the dims after a`); its
   new axis is one whose span holds `s`. Where two axes qualify (the batch of 1 sits on the
   boundary between them, e.g. `[L, 1, E] -> [L, 4, 8]`: `[L*N, 4, 8]` or `[L, N*4, 8]`), the
   analysis takes a batch-1 axis of its own first, then the innermost candidate, and backtracks
   when a later op refuses the choice (a matrix product contracting over the batch, mismatched
   operands, an output whose batch is not its first axis).
4. The constants that carry the batch are rewritten: a Reshape target gets -1 on the batch's axis
   (its other entries are the batch-1 sizes), a Slice over the whole batch axis ends at INT64_MAX,
   an Expand target keeps the operand's batch (1), and a constant concatenated with batch-carrying
   values (a class token) is expanded to the batch with the batch size read from its neighbour.

The analysis is the argument; `check` is the witness: the rewritten graph on ONNX Runtime CPU
(the runtime's settings) must give the original's logits bit for bit at batch 1, and at batch 3
(three different images) the three batch-1 answers, row by row, bit for bit. When either fails
the caller keeps the batch of 1 (the suffix then runs one window per call).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from scalecert.graph import add_constant, finish, infer_shapes, without_weights

INT64_MAX = np.iinfo(np.int64).max
CHECK_BATCH = 3
TOLERANCE = 1e-5  # of the largest |output|: a row of a batch against the image alone, where kernels round by batch size
SEARCH_STEPS = 40  # the analysis may visit each node this many times (backtracking) before giving up

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Reciprocal",
    "Neg", "Abs", "Ceil", "Floor", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh",
    "Asinh", "Acosh", "Atanh", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Gelu", "Mish", "Identity", "Cast",
    "Clip", "Not", "IsNaN", "IsInf", "ThresholdedRelu", "Shrink", "BitwiseNot", "Dropout",
    "QuantizeLinear", "DequantizeLinear",
}
BROADCAST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Greater", "GreaterOrEqual",
    "Less", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "PRelu", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
}
PER_IMAGE = {  # ops that treat axis 0 as the batch: the batch must be there (merged or not)
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "InstanceNormalization", "GroupNormalization", "DepthToSpace", "SpaceToDepth",
}
PER_CHANNEL = {"BatchNormalization", "LRN"}  # axis 1 is the channel: the batch anywhere else
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
          "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"}


class Unproven(Exception):
    """The graph could not be shown to run any batch; the message says where, in one line."""


class _Refuse(Exception):
    pass


@dataclass(frozen=True)
class Loc:
    """Where the batch lives in a value: axis `axis` of the batch-1 shape is d * N long, and the
    batch index moves in steps of `q` inside it."""

    axis: int
    q: int = 1


@dataclass
class _Action:
    kind: str  # "reshape", "slice", "expand", "broadcast"
    node: ir.Node
    data: object


# --- the analysis ---------------------------------------------------------------------------------------------


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    dims = list(value.shape)
    return dims if all(isinstance(d, int) for d in dims) else None


def _need_dims(value: ir.Value, node: ir.Node) -> list[int]:
    dims = _dims(value)
    if dims is None:
        raise _Refuse(f"{_where(node)}: the shape of {value.name} is not known")
    return dims


def _rank(value: ir.Value, node: ir.Node) -> int:
    if value.shape is None:
        raise _Refuse(f"{_where(node)}: the rank of {value.name} is not known")
    return len(value.shape)


def _dim(value: ir.Value, axis: int, node: ir.Node) -> int:
    dim = value.shape[axis] if value.shape is not None and 0 <= axis < len(value.shape) else None
    if not isinstance(dim, int):
        raise _Refuse(f"{_where(node)}: dimension {axis} of {value.name} is not known")
    return dim


def _const(value: ir.Value | None):
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _ints(node: ir.Node, index: int, attr: str | None = None) -> list[int] | None:
    """A constant integer input (or, in older opsets, the attribute); None when absent."""
    if len(node.inputs) > index and node.inputs[index] is not None:
        array = _const(node.inputs[index])
        if array is None:
            raise _Refuse(f"{_where(node)}: input {index} is not a constant")
        return [int(v) for v in np.ravel(array)]
    if attr is not None and attr in node.attributes:
        return [int(v) for v in node.attributes[attr].value]
    return None


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _where(node: ir.Node) -> str:
    return f"{node.op_type} {node.name or '(unnamed)'}"


def _stride(loc: Loc, dims: list[int]) -> int:
    return loc.q * int(np.prod(dims[loc.axis + 1:], dtype=np.int64))


def _placements(stride: int, out_dims: list[int]) -> list[Loc]:
    """The axes of a reshaped value that can hold the batch at flat stride `stride`: own (batch-1)
    axes first, outermost first, then the others innermost first."""
    inner = [int(np.prod(out_dims[j + 1:], dtype=np.int64)) for j in range(len(out_dims))]
    found = [Loc(j, stride // r) for j, (r, t) in enumerate(zip(inner, out_dims))
             if t > 0 and stride % r == 0 and t % (stride // r) == 0]
    own = [loc for loc in found if out_dims[loc.axis] == 1]
    return own + [loc for loc in reversed(found) if out_dims[loc.axis] != 1]


class _Analysis:
    def __init__(self, graph: ir.Graph, opset: int):
        self.graph, self.opset = graph, opset

    def outcomes(self, node: ir.Node, locs: dict) -> list[tuple[dict, list]]:
        """[(output locs, actions)] for the node given its inputs' locs: one entry, or several
        for a Reshape the batch could take two ways; _Refuse when none holds."""
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise _Refuse(f"{_where(node)}: a node with a subgraph (it may read any value of the graph)")
        carried = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v in locs]
        if not carried:
            return [({}, [])]
        if node.domain not in ("", "ai.onnx"):
            raise _Refuse(f"{_where(node)}: domain {node.domain} is not modelled")
        handler = getattr(self, f"op_{node.op_type}", None)
        if handler is None:
            if node.op_type in UNARY:
                handler = self.unary
            elif node.op_type in BROADCAST:
                handler = self.broadcast
            elif node.op_type in PER_IMAGE or node.op_type in PER_CHANNEL:
                handler = self.per_image
            elif node.op_type in REDUCE:
                handler = self.reduce
            else:
                raise _Refuse(f"{_where(node)}: not modelled")
        result = handler(node, locs, carried)
        return result if isinstance(result, list) else [result]

    @staticmethod
    def _all(node, loc, actions=()):
        return {o: loc for o in node.outputs if o is not None}, list(actions)

    @staticmethod
    def _only_first(node, carried, what="its other inputs"):
        if any(i != 0 for i, _ in carried):
            raise _Refuse(f"{_where(node)}: {what} depend on the image")

    def unary(self, node, locs, carried):
        self._only_first(node, carried)
        loc = locs[node.inputs[0]]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = _dims(node.inputs[1])
            rank = _rank(node.inputs[0], node)
            if scale is None or (int(np.prod(scale)) > 1 and _axis(_attr(node, "axis", 1), node, rank) == loc.axis):
                raise _Refuse(f"{_where(node)}: per-axis scales along the batch")
        return self._all(node, loc)

    def op_CastLike(self, node, locs, carried):
        """The second input gives only the type: a constant cast like an image value stays constant."""
        if node.inputs[0] not in locs:
            return {}, []
        return self._all(node, locs[node.inputs[0]])

    def broadcast(self, node, locs, carried):
        rank = max(_rank(v, node) for v in node.inputs if v is not None)
        place = None
        for _, value in carried:
            loc = locs[value]
            here = (loc.axis + rank - _rank(value, node), loc.q, _dim(value, loc.axis, node))
            if place is not None and here != place:
                raise _Refuse(f"{_where(node)}: operands hold the batch in different places")
            place = here
        axis, q, size = place
        for value in node.inputs:
            if value is None or value in locs:
                continue
            k = axis - (rank - _rank(value, node))
            if k >= 0 and _dim(value, k, node) != 1:
                raise _Refuse(f"{_where(node)}: {value.name} broadcasts only because the batch is 1")
        return self._all(node, Loc(axis, q))

    def per_image(self, node, locs, carried):
        self._only_first(node, carried)
        loc = locs[node.inputs[0]]
        if node.op_type in PER_CHANNEL:
            if loc.axis == 1:
                raise _Refuse(f"{_where(node)}: the batch is on the channel axis")
        elif loc.axis != 0:
            raise _Refuse(f"{_where(node)}: the batch is not on axis 0")
        if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
            raise _Refuse(f"{_where(node)}: its Indices count across the batch")
        return self._all(node, loc)

    def _along(self, node, loc, axes: list[int], rank: int, why: str):
        if loc.axis in [_axis(a, node, rank) for a in axes]:
            raise _Refuse(f"{_where(node)}: {why} along the batch axis")

    def reduce(self, node, locs, carried):
        self._only_first(node, carried)
        value = node.inputs[0]
        loc, rank = locs[value], _rank(value, node)
        if node.op_type in ("ArgMax", "ArgMin"):
            axes = [int(_attr(node, "axis", 0))]
        else:
            axes = _ints(node, 1, "axes")
            if not axes:
                if _attr(node, "noop_with_empty_axes", 0):
                    return self._all(node, loc)
                raise _Refuse(f"{_where(node)}: reduces every axis, the batch too")
        axes = sorted(_axis(a, node, rank) for a in axes)
        self._along(node, loc, axes, rank, "reduces")
        if not _attr(node, "keepdims", 1):
            loc = Loc(loc.axis - sum(a < loc.axis for a in axes), loc.q)
        return self._all(node, loc)

    def _axis_op(self, node, locs, carried, default, why):
        self._only_first(node, carried)
        loc = locs[node.inputs[0]]
        rank = _rank(node.inputs[0], node)
        axis = _axis(_attr(node, "axis", default), node, rank)
        return loc, rank, axis

    def op_Softmax(self, node, locs, carried):
        default = -1 if self.opset >= 13 else 1
        loc, rank, axis = self._axis_op(node, locs, carried, default, "normalises")
        if (self.opset >= 13 and loc.axis == axis) or (self.opset < 13 and loc.axis >= axis):
            raise _Refuse(f"{_where(node)}: normalises along the batch axis")
        return self._all(node, loc)

    op_LogSoftmax = op_Hardmax = op_Softmax

    def op_LayerNormalization(self, node, locs, carried):
        loc, rank, axis = self._axis_op(node, locs, carried, -1, "normalises")
        if loc.axis >= axis:
            raise _Refuse(f"{_where(node)}: normalises over the batch axis")
        return self._all(node, loc)

    def op_LpNormalization(self, node, locs, carried):
        loc, rank, axis = self._axis_op(node, locs, carried, -1, "normalises")
        self._along(node, loc, [axis], rank, "normalises")
        return self._all(node, loc)

    def op_TopK(self, node, locs, carried):
        loc, rank, axis = self._axis_op(node, locs, carried, -1, "sorts")
        self._along(node, loc, [axis], rank, "sorts")
        return self._all(node, loc)

    def op_CumSum(self, node, locs, carried):
        self._only_first(node, carried)
        loc, rank = locs[node.inputs[0]], _rank(node.inputs[0], node)
        self._along(node, loc, _ints(node, 1) or [0], rank, "sums")
        return self._all(node, loc)

    def op_MeanVarianceNormalization(self, node, locs, carried):
        self._only_first(node, carried)
        loc, rank = locs[node.inputs[0]], _rank(node.inputs[0], node)
        self._along(node, loc, list(_attr(node, "axes", [0, 2, 3])), rank, "normalises")
        return self._all(node, loc)

    def op_Transpose(self, node, locs, carried):
        loc = locs[node.inputs[0]]
        rank = _rank(node.inputs[0], node)
        perm = [int(p) for p in _attr(node, "perm", list(range(rank))[::-1])]
        return self._all(node, Loc(perm.index(loc.axis), loc.q))

    def op_Flatten(self, node, locs, carried):
        dims = _need_dims(node.inputs[0], node)
        loc = locs[node.inputs[0]]
        axis = _axis(_attr(node, "axis", 1), node, len(dims) + 1)
        out = [int(np.prod(dims[:axis], dtype=np.int64)), int(np.prod(dims[axis:], dtype=np.int64))]
        j = 0 if loc.axis < axis else 1
        stride, inner = _stride(loc, dims), int(np.prod(out[j + 1:], dtype=np.int64))
        if stride % inner or out[j] % (stride // inner):
            raise _Refuse(f"{_where(node)}: cannot place the batch")
        return self._all(node, Loc(j, stride // inner))

    def op_Reshape(self, node, locs, carried):
        self._only_first(node, carried, "its target shape")
        target = _const(node.inputs[1])
        if target is None:
            raise _Refuse(f"{_where(node)}: a target shape computed at run time")
        dims = _need_dims(node.inputs[0], node)
        out = _reshaped(dims, [int(t) for t in target], bool(_attr(node, "allowzero", 0)))
        if out is None:
            raise _Refuse(f"{_where(node)}: target {target.tolist()} does not fit {dims}")
        loc = locs[node.inputs[0]]
        choices = _placements(_stride(loc, dims), out)
        if not choices:
            raise _Refuse(f"{_where(node)}: cannot place the batch in {out}")
        results = []
        for place in choices:
            new = np.array(out, np.int64)
            new[place.axis] = -1
            results.append(self._all(node, place, [_Action("reshape", node, new)]))
        return results

    def op_Squeeze(self, node, locs, carried):
        self._only_first(node, carried)
        value = node.inputs[0]
        loc, rank = locs[value], _rank(value, node)
        axes = _ints(node, 1, "axes")
        if axes is None:
            axes = [i for i, d in enumerate(_need_dims(value, node)) if d == 1]
        axes = [_axis(a, node, rank) for a in axes]
        if loc.axis in axes:
            raise _Refuse(f"{_where(node)}: squeezes the batch axis")
        return self._all(node, Loc(loc.axis - sum(a < loc.axis for a in axes), loc.q))

    def op_Unsqueeze(self, node, locs, carried):
        self._only_first(node, carried)
        loc = locs[node.inputs[0]]
        axes = _ints(node, 1, "axes") or []
        rank = _rank(node.inputs[0], node) + len(axes)
        axes = sorted(_axis(a, node, rank) for a in axes)
        kept = [i for i in range(rank) if i not in axes]
        return self._all(node, Loc(kept[loc.axis], loc.q))

    def op_Concat(self, node, locs, carried):
        first = carried[0][1]
        rank = _rank(first, node)
        axis = _axis(_attr(node, "axis", 0), node, rank)
        loc = locs[first]
        size = _dim(first, loc.axis, node)
        for _, value in carried:
            if locs[value] != loc or _dim(value, loc.axis, node) != size:
                raise _Refuse(f"{_where(node)}: operands hold the batch in different places")
        if loc.axis == axis:
            raise _Refuse(f"{_where(node)}: concatenates along the batch axis")
        actions = []
        for i, value in enumerate(node.inputs):
            if value is None or value in locs:
                continue
            # Concat needs equal sizes off its axis: this operand's size on the batch axis is the carrier's
            if size != 1:
                raise _Refuse(f"{_where(node)}: {value.name} is concatenated with batch rows")
            actions.append(_Action("broadcast", node, (i, first, loc.axis, rank)))
        return self._all(node, loc, actions)

    def op_Split(self, node, locs, carried):
        self._only_first(node, carried)
        loc, rank = locs[node.inputs[0]], _rank(node.inputs[0], node)
        self._along(node, loc, [_attr(node, "axis", 0)], rank, "splits")
        return self._all(node, loc)

    def op_Slice(self, node, locs, carried):
        self._only_first(node, carried)
        value = node.inputs[0]
        loc, rank = locs[value], _rank(value, node)
        if self.opset < 10:
            starts, ends = list(_attr(node, "starts", [])), list(_attr(node, "ends", []))
            axes = list(_attr(node, "axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts, ends = _ints(node, 1), _ints(node, 2)
            axes = _ints(node, 3) or list(range(len(starts)))
            steps = _ints(node, 4) or [1] * len(starts)
        axes = [_axis(a, node, rank) for a in axes]
        if loc.axis not in axes:
            return self._all(node, loc)
        k = axes.index(loc.axis)
        if self.opset < 10 or starts[k] != 0 or steps[k] != 1 or ends[k] < _dim(value, loc.axis, node):
            raise _Refuse(f"{_where(node)}: slices the batch axis")
        new = np.array(ends, np.int64)
        new[k] = INT64_MAX
        return self._all(node, loc, [_Action("slice", node, new)])

    def op_Gather(self, node, locs, carried):
        data, indices = node.inputs[0], node.inputs[1]
        axis = _axis(_attr(node, "axis", 0), node, _rank(data, node))
        index_rank = _rank(indices, node)
        if data in locs and indices in locs:
            raise _Refuse(f"{_where(node)}: data and indices both depend on the image")
        if data in locs:
            loc = locs[data]
            if loc.axis == axis:
                raise _Refuse(f"{_where(node)}: gathers along the batch axis")
            return self._all(node, Loc(loc.axis if loc.axis < axis else loc.axis + index_rank - 1, loc.q))
        loc = locs[indices]
        return self._all(node, Loc(axis + loc.axis, loc.q))

    def op_Expand(self, node, locs, carried):
        self._only_first(node, carried, "its target shape")
        value = node.inputs[0]
        shape = _const(node.inputs[1])
        if shape is None:
            raise _Refuse(f"{_where(node)}: a target shape computed at run time")
        shape = [int(s) for s in shape]
        loc = locs[value]
        size = _dim(value, loc.axis, node)
        rank = max(_rank(value, node), len(shape))
        axis = loc.axis + rank - _rank(value, node)
        k = axis - (rank - len(shape))
        actions = []
        if k >= 0:
            if shape[k] not in (1, size):
                raise _Refuse(f"{_where(node)}: repeats the batch rows")
            if shape[k] != 1:
                new = np.array(shape, np.int64)
                new[k] = 1
                actions.append(_Action("expand", node, new))
        return self._all(node, Loc(axis, loc.q), actions)

    def op_Tile(self, node, locs, carried):
        self._only_first(node, carried)
        loc = locs[node.inputs[0]]
        repeats = _ints(node, 1)
        if repeats is None or repeats[loc.axis] != 1:
            raise _Refuse(f"{_where(node)}: tiles the batch axis")
        return self._all(node, loc)

    def op_Pad(self, node, locs, carried):
        self._only_first(node, carried)
        loc, rank = locs[node.inputs[0]], _rank(node.inputs[0], node)
        pads = _ints(node, 1, "pads") or []
        axes = _ints(node, 3) if self.opset >= 18 else None
        axes = [_axis(a, node, rank) for a in axes] if axes else list(range(rank))
        if loc.axis in axes:
            k = axes.index(loc.axis)
            if pads[k] or pads[k + len(axes)]:
                raise _Refuse(f"{_where(node)}: pads the batch axis")
        return self._all(node, loc)

    def op_Resize(self, node, locs, carried):
        self._only_first(node, carried)
        loc = locs[node.inputs[0]]
        scales = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        sizes = node.inputs[3] if len(node.inputs) > 3 else None
        if sizes is not None or scales is None or loc.axis >= len(scales) or float(scales[loc.axis]) != 1.0:
            raise _Refuse(f"{_where(node)}: resizes with sizes or along the batch")
        return self._all(node, loc)

    def op_MatMul(self, node, locs, carried):
        a, b = node.inputs
        ra, rb = _rank(a, node), _rank(b, node)
        if ra < 2 or rb < 2:
            raise _Refuse(f"{_where(node)}: a vector operand")
        rank = max(ra, rb)
        places = []
        for value, r, row, inner, col in ((a, ra, ra - 2, ra - 1, None), (b, rb, None, rb - 2, rb - 1)):
            if value not in locs:
                continue
            loc = locs[value]
            if loc.axis == inner:
                raise _Refuse(f"{_where(node)}: contracts over the batch axis")
            if loc.axis == row:
                places.append(("rows", Loc(rank - 2, loc.q)))
            elif loc.axis == col:
                places.append(("columns", Loc(rank - 1, loc.q)))
            else:
                places.append(("batch", Loc(loc.axis + rank - r, loc.q), _dim(value, loc.axis, node)))
        if len(places) == 2 and (places[0] != places[1] or places[0][0] != "batch"):
            raise _Refuse(f"{_where(node)}: the operands hold the batch in different places")
        kind, loc = places[0][:2]
        if kind == "batch" and len(places) == 1:
            other = b if a in locs else a
            k = loc.axis - (rank - _rank(other, node))
            if 0 <= k < _rank(other, node) - 2 and _dim(other, k, node) != 1:
                raise _Refuse(f"{_where(node)}: {other.name} broadcasts only because the batch is 1")
        return self._all(node, loc)

    def op_Gemm(self, node, locs, carried):
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if a not in locs or b in locs or (c is not None and c in locs):
            raise _Refuse(f"{_where(node)}: the batch is not in the first operand's rows")
        loc = locs[a]
        if loc.axis != (1 if _attr(node, "transA", 0) else 0):
            raise _Refuse(f"{_where(node)}: the batch is not in the first operand's rows")
        if c is not None:
            if _rank(c, node) == 2 and _dim(c, 0, node) != 1:
                raise _Refuse(f"{_where(node)}: the bias {c.name} has a row per batch-1 row")
        return self._all(node, Loc(0, loc.q))


def _axis(axis: int, node: ir.Node, rank: int) -> int:
    axis = int(axis)
    if not -rank <= axis < rank:
        raise _Refuse(f"{_where(node)}: axis {axis} out of range")
    return axis % rank


def _reshaped(dims: list[int], target: list[int], allowzero: bool) -> list[int] | None:
    out = [dims[i] if t == 0 and not allowzero and i < len(dims) else t for i, t in enumerate(target)]
    total = int(np.prod(dims, dtype=np.int64))
    if out.count(-1) > 1 or any(t < -1 for t in out) or 0 in out:
        return None
    if -1 in out:
        known = int(np.prod([t for t in out if t != -1], dtype=np.int64))
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return out if int(np.prod(out, dtype=np.int64)) == total else None


def _search(graph: ir.Graph, image: ir.Value, opset: int) -> list[_Action]:
    """Depth-first over the nodes in order, with a choice point at each ambiguous Reshape."""
    analysis = _Analysis(graph, opset)
    nodes = list(graph)
    locs: dict = {image: Loc(0, 1)}
    actions: list = []
    stack: list = []  # (node index, remaining outcomes, locs before, len(actions) before)
    first_refusal = None
    i, steps = 0, SEARCH_STEPS * (len(nodes) + 1)
    while True:
        steps -= 1
        if steps < 0:
            raise Unproven(first_refusal or "the batch analysis did not finish")
        try:
            if i == len(nodes):
                _check_outputs(graph, locs)
                return actions
            outcomes = analysis.outcomes(nodes[i], locs)
        except _Refuse as refusal:
            first_refusal = first_refusal or str(refusal)
            while stack and not stack[-1][1]:
                stack.pop()
            if not stack:
                raise Unproven(first_refusal) from None
            i, remaining, before, count = stack[-1]
            outcome = remaining.pop(0)
            locs, actions = dict(before), actions[:count]
        else:
            if len(outcomes) > 1:
                stack.append((i, outcomes[1:], dict(locs), len(actions)))
            outcome = outcomes[0]
        locs.update(outcome[0])
        actions.extend(outcome[1])
        i += 1


def _check_outputs(graph: ir.Graph, locs: dict) -> None:
    for value in graph.outputs:
        if value not in locs:
            raise _Refuse(f"output {value.name} does not depend on the image")
        dims = _dims(value)
        if locs[value] != Loc(0, 1) or (dims is not None and dims[0] != 1):
            raise _Refuse(f"output {value.name} does not hold the batch on its first axis")


# --- the rewrite --------------------------------------------------------------------------------------------


class _Names:
    def __init__(self):
        self.count = 0

    def __call__(self, what: str) -> str:
        self.count += 1
        return f"scalecert/batch/{what}_{self.count}"


def _apply(graph: ir.Graph, actions: list[_Action], opset: int) -> None:
    name = _Names()
    for action in actions:
        node = action.node
        if action.kind == "reshape":
            node.replace_input_with(1, add_constant(graph, name("shape"), action.data))
        elif action.kind == "slice":
            node.replace_input_with(2, add_constant(graph, name("ends"), action.data))
        elif action.kind == "expand":
            node.replace_input_with(1, add_constant(graph, name("shape"), action.data))
        elif action.kind == "broadcast":
            index, carrier, axis, rank = action.data
            new = []

            def op(op_type, inputs, **attrs):
                made = ir.node(op_type, inputs, attributes=attrs or None, name=name(op_type.lower()))
                made.outputs[0].name = made.name
                new.append(made)
                return made.outputs[0]

            if opset >= 15:
                batch = op("Shape", [carrier], start=axis, end=axis + 1)
            else:
                batch = op("Slice", [op("Shape", [carrier]), add_constant(graph, name("start"), np.array([axis], np.int64)),
                                     add_constant(graph, name("end"), np.array([axis + 1], np.int64))])
            ones = np.ones(rank, np.int64)
            parts = [add_constant(graph, name("ones"), ones[:axis]), batch,
                     add_constant(graph, name("ones"), ones[axis + 1:])]
            shape = op("Concat", parts, axis=0)
            expanded = op("Expand", [node.inputs[index], shape])
            graph.insert_before(node, new)
            node.replace_input_with(index, expanded)


def _small_shape(node: ir.Node) -> bool:
    shape = _const(node.inputs[0]) if node.inputs else None
    return shape is not None and int(np.prod(shape)) <= 1024


def _image_input(graph: ir.Graph) -> ir.Value:
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    if len(inputs) != 1:
        raise Unproven("expected one image input")
    return inputs[0]


def make_symbolic(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with its input's and outputs' first dimension "batch" and every constant that
    carried the batch rewritten (module docstring); Unproven with one line where it cannot."""
    try:
        inferred = infer_shapes(proto)
    except Exception as exc:  # noqa: BLE001
        raise Unproven(f"shape inference failed ({str(exc).splitlines()[0][:100]})") from None
    model = ir.from_proto(inferred)
    try:
        import onnxscript.optimizer

        onnxscript.optimizer.optimize(model)
        # ConstantOfShape is left alone by default (it would grow the file); small ones feed shapes (pads, targets)
        small = lambda node: True if node.op_type == "ConstantOfShape" and _small_shape(node) else None  # noqa: E731
        onnxscript.optimizer.fold_constants(model, should_fold=small)
        onnxscript.optimizer.optimize(model)
        model = ir.from_proto(infer_shapes(ir.to_proto(model)))
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - the optimizer is a convenience; its failure is not the model's
        raise Unproven(f"constant folding failed ({type(exc).__name__})") from None
    graph = model.graph
    image = _image_input(graph)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18))
    _apply(graph, _search(graph, image, opset), opset)
    finish()(model)
    for node in graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None
    for value in [image, *graph.outputs]:
        if value.shape is not None and len(value.shape):
            value.shape = ir.Shape(["batch", *list(value.shape)[1:]])
    return ir.to_proto(model)


# --- the witness ----------------------------------------------------------------------------------------------


def _model_source(proto: onnx.ModelProto) -> tuple[bytes, dict]:
    """What ONNX Runtime opens: the graph's bytes without its weights, and the weights as arrays
    (load_session's `weights`); serialising a ViT-B/16's 344 MB for each session took seconds."""
    from onnx import numpy_helper

    light, stripped = without_weights(proto)
    return light.SerializeToString(), {name: numpy_helper.to_array(proto.graph.initializer[i])
                                       for name, i in stripped.items()}


def _outputs(session, images: np.ndarray, batch: int) -> list[np.ndarray]:
    """Each output for the images one at a time (batch 1, rows concatenated) or all at once."""
    name = session.get_inputs()[0].name
    if batch == 1:
        runs = [session.run(None, {name: images[i:i + 1]}) for i in range(len(images))]
        return [np.concatenate([run[k] for run in runs]) for k in range(len(runs[0]))]
    return session.run(None, {name: images})


def _same(got: list, expected: list, what: str, rows=slice(None)) -> None:
    for k, (g, e) in enumerate(zip(got, expected)):
        g, e = g[rows], e[rows]
        if g.shape != e.shape or g.dtype != e.dtype:
            raise Unproven(f"{what}: output {k} has shape {g.shape}, expected {e.shape}")
        if g.tobytes() != e.tobytes():
            spread = float(np.abs(g.astype(np.float64) - e.astype(np.float64)).max())
            raise Unproven(f"{what}: the outputs differ by up to {spread:.3g}")


def check(original: onnx.ModelProto, rewritten: onnx.ModelProto, input_chw, batch: int = CHECK_BATCH) -> float:
    """The witness, on seeded images; returns the largest |difference| between a row of a batch of
    `batch` and the same image alone (0.0: bit for bit), Unproven when a check fails:

    1. at batch 1 the rewritten graph gives the original's output bit for bit, both run op by op as
       ONNX defines them (ONNX Runtime without graph optimisations: with them, the kernels it fuses
       for a static batch differ from those for a symbolic one in the last bit, e.g. 5e-7 on the
       ViT look-alike; a choice of kernels, not a difference of graphs);
    2. at batch `batch`, as the runtime runs it (all optimisations, every core), each row is bit
       for bit independent of the other rows (the batch changed in all rows but one, then in that
       one alone): the rewrite mixes no images (a graph that mixed them would mix them here too;
       running these op by op as well cost 9 more forwards, 1.7 s on a ViT-B/16);
    3. each row equals the image's batch-1 output bit for bit, or, where ONNX Runtime's kernels
       round differently at another batch size (seen: 1.5e-8 on a CIFAR ResNet, 2.4e-7 on a
       TransformerEncoder ViT), within TOLERANCE of the largest logit; the runtime's numeric margin
       (docs/design.md §3.6) is measured over exactly such batch compositions."""
    from scalecert.runtime.pipelines.onnxruntime import load_session

    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, *input_chw)).astype(np.float32)
    others = images.copy()
    others[1:] = rng.standard_normal((batch - 1, *input_chw)).astype(np.float32)
    first_other = images.copy()
    first_other[0] = others[1]
    spread = 0.0
    try:
        graph, weights = _model_source(original)
        expected = _outputs(load_session(graph, "cpu", reference=True, weights=weights), images, 1)
        graph, weights = _model_source(rewritten)
        _same(_outputs(load_session(graph, "cpu", reference=True, weights=weights), images, 1), expected,
              "at batch 1 against the original")
        session = load_session(graph, "cpu", weights=weights)
        alone = _outputs(session, images, 1)
        together = _outputs(session, images, batch)
        _same(_outputs(session, others, batch), together, f"at batch {batch}, row 0 with other rows", slice(0, 1))
        _same(_outputs(session, first_other, batch), together, f"at batch {batch}, rows 1.. with another row 0",
              slice(1, None))
        for got, want in zip(together, alone):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise Unproven(f"at batch {batch}: shape {got.shape}, expected {want.shape}")
            diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if got.size else 0.0
            if not diff <= TOLERANCE * max(1.0, float(np.abs(want).max())):
                raise Unproven(f"at batch {batch} the rows differ from batch 1 by up to {diff:.3g}")
            spread = max(spread, diff)
    except Unproven:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several types
        raise Unproven(f"ONNX Runtime failed on the rewritten graph ({str(exc).splitlines()[0][:120]})") from None
    return spread
