"""Random ONNX prefixes and a measured-dependence check for the receptive-field pass.

`generate(seed, index, kind)` builds one small opset-18 float32 model whose first input is the image
("image", shape (batch, C, H, W) with C in 1..3 and H, W in 10..20): a chain of 1-5 layers, sometimes
forking into two branches that are joined again by Add or Concat(axis=1) when their strides match.

- kind "accept": every layer is one the pass must model as local (ACCEPT_LAYERS);
- kind "refuse": one layer is one the pass must refuse (REFUSE_LAYERS), with accepted layers before
  and possibly after it.

`check(case)` runs `scalecert.export.receptive.receptive_fields` on the model and measures the real
dependence with ONNX Runtime (CPU): for every input pixel, all channels of that pixel are perturbed by
large amounts in a few random trials and every output position of every 4-D value that changes at
all (any channel, bitwise, NaN included) is recorded. Every recorded dependence must lie inside the
pass's RF box; values the pass calls `None` must not change at all. Accepted graphs must get an RF
on every image-dependent 4-D value; refused graphs must get NonLocal (one line, naming the refused
node or its op) on the refused layer's output and on everything after it.

`check(case, mutate=...)` hands the pass a mutated copy of the model while measuring the real one:
the negative controls (CONTROLS) that the harness must catch.

Everything is seeded: the case of (seed, index) is the same on every machine, so a failure can be
replayed alone (`benchmarks/receptive_property.py --seed S --index I --verbose`).
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
INT64_MAX = 2**63 - 1
IMAGE = "image"
CUSTOM_DOMAIN = "com.example.scalecert"
FLOAT = TensorProto.FLOAT


class Reject(Exception):
    """The drawn parameters make no valid layer here; the generator draws again."""


# --- the builder ---------------------------------------------------------------------------------------


class Builder:
    """Accumulates nodes and initializers; knows the (C, H, W) of every value through ONNX shape
    inference and the stride (sy, sx) of every layer output (for joining branches)."""

    def __init__(self, rng: np.random.Generator, c: int, h: int, w: int):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.opsets = {"": OPSET}
        self.shapes: dict[str, tuple] = {IMAGE: (c, h, w)}
        self.strides: dict[str, tuple[int, int]] = {IMAGE: (1, 1)}
        self.layers: list[str] = []  # one description per layer
        self.tags: set[str] = set()  # features exercised (coverage)
        self.may_refuse: dict[str, str] = {}  # node name -> why refusing it is also right
        self._names = 0

    # names and constants
    def fresh(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}{self._names}"

    def const(self, array, prefix: str = "k") -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values, prefix: str = "i") -> str:
        return self.const(np.asarray(values, np.int64), prefix)

    def node(self, op: str, inputs, outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        name = f"node{len(self.nodes):02d}"
        outs = [f"{name}_y{k}" if k else f"{name}_y" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs

    # models
    def model(self, outputs: list[str] | None = None) -> onnx.ModelProto:
        outputs = outputs or [self.nodes[-1].output[0]]
        c, h, w = self.shapes[IMAGE]
        graph = helper.make_graph(
            self.nodes, "prefix", [helper.make_tensor_value_info(IMAGE, FLOAT, ["batch", c, h, w])],
            [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs],
            self.inits, value_info=self.value_info)
        opsets = [helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="scalecert-graphgen")
        model.ir_version = 9
        return model

    def settle(self, out: str, require_map: bool = True) -> None:
        """Shape inference over everything so far; `out` must be a 4-D tensor with H, W >= 1 (unless
        not `require_map`: refused layers may end the map)."""
        try:
            inferred = infer(self.model([out]))
        except Exception as exc:  # onnx raises several types
            raise Reject(f"shape inference: {str(exc).splitlines()[0][:200]}") from None
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            shape = value_shape(vi)
            if shape is not None:
                self.shapes[vi.name] = shape
        shape = self.shapes.get(out)
        if not require_map:
            return
        if shape is None or len(shape) != 3 or not all(isinstance(d, int) and d >= 1 for d in shape):
            raise Reject(f"output shape {shape}")

    def snapshot(self):
        return (len(self.nodes), len(self.inits), len(self.value_info), len(self.layers), set(self.tags),
                dict(self.opsets), dict(self.may_refuse))

    def rollback(self, snap) -> None:
        n, i, v, l, tags, opsets, may_refuse = snap
        del self.nodes[n:], self.inits[i:], self.value_info[v:], self.layers[l:]
        self.tags, self.opsets, self.may_refuse = tags, opsets, may_refuse


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


def value_shape(vi: onnx.ValueInfoProto):
    """(C, H, W) of a 4-D value (ints, None for unknown); ("NHW", H, W) of a 3-D one (a channel-reduced
    map, measured as one channel); ("rank", n) for other ranks; None if unranked."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if len(dims) == 4:
        return tuple(dims[1:])
    return ("NHW", dims[1], dims[2]) if len(dims) == 3 else ("rank", len(dims))


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _chance(rng, p: float) -> bool:
    return bool(rng.random() < p)


# --- accepted layers ----------------------------------------------------------------------------------


def conv(b: Builder, v: str, force_dilation: bool = False, stride: tuple[int, int] | None = None) -> str:
    rng = b.rng
    c, h, w = b.shapes[v]
    groups = [g for g in range(2, c + 1) if c % g == 0]
    g = _pick(rng, groups) if groups and _chance(rng, 0.35) else 1
    cout = g * int(rng.integers(1, 3 if g > 1 else 5))
    k = [int(rng.integers(1, 6)), int(rng.integers(1, 6))]
    s = list(stride) if stride else [int(rng.integers(1, 4)), int(rng.integers(1, 4))]
    d = [int(rng.integers(1, 3)) if _chance(rng, 0.4) else 1 for _ in range(2)]
    mode = _pick(rng, ["pads", "pads", "pads", "none", "SAME_UPPER", "SAME_LOWER", "VALID"])
    if force_dilation:
        a = int(rng.integers(2))
        d[a], k[a] = 2, max(k[a], 2)
        mode = _pick(rng, ["pads", "none", "VALID"])
    attrs = {"kernel_shape": k, "strides": s} if _chance(rng, 0.5) else {"strides": s}
    if mode.startswith("SAME"):
        d = [1, 1]  # ONNX Runtime: "Dilation not supported for AutoPadType::SAME_UPPER or SAME_LOWER"
    if d != [1, 1] or _chance(rng, 0.2):
        attrs["dilations"] = d
    pads = [0, 0, 0, 0]
    if mode == "pads":
        pads = [int(p) for p in rng.integers(0, 4, size=4)]
        attrs["pads"] = pads
        if _chance(rng, 0.15):
            attrs["auto_pad"] = "NOTSET"
    elif mode != "none":
        attrs["auto_pad"] = mode
    if mode in ("pads", "none", "VALID"):
        _check_fits((h, w), pads, k, d)
    if g > 1:
        attrs["group"] = g
    inputs = [v, b.const(rng.standard_normal((cout, c // g, *k)).astype(np.float32), "w")]
    bias = _chance(rng, 0.6)
    if bias:
        inputs.append(b.const(rng.standard_normal(cout).astype(np.float32), "bias"))
    out = b.node("Conv", inputs, **attrs)[0]
    b.strides[out] = (b.strides[v][0] * s[0], b.strides[v][1] * s[1])
    b.layers.append(f"Conv(k={k}, {attrs_text(attrs, skip=('kernel_shape',))}, cout={cout}, bias={bias})")
    b.tags |= {"Conv", f"Conv:{mode}"} | ({"Conv:dilation"} if d != [1, 1] else set()) \
        | ({"Conv:group"} if g > 1 else set()) | ({"Conv:stride"} if s != [1, 1] else set()) \
        | ({"Conv:asymmetric-pads"} if pads[:2] != pads[2:] else set())
    return out


def _check_fits(hw, pads, kernel, dilations) -> None:
    """Reject a window (dilated kernel) larger than the padded input on either axis."""
    for a, size in enumerate(hw):
        if size + pads[a] + pads[a + 2] < (kernel[a] - 1) * dilations[a] + 1:
            raise Reject("window larger than the padded input")


def pool(b: Builder, v: str, op: str | None = None, stride: tuple[int, int] | None = None) -> str:
    rng = b.rng
    op = op or _pick(rng, ["MaxPool", "AveragePool", "LpPool"])
    c, h, w = b.shapes[v]
    k = [int(rng.integers(1, 5)), int(rng.integers(1, 5))]
    s = list(stride) if stride else [int(rng.integers(1, 4)), int(rng.integers(1, 4))]
    attrs: dict = {"kernel_shape": k}
    if s != [1, 1] or _chance(rng, 0.3):
        attrs["strides"] = s
    d = [1, 1]
    if op in ("MaxPool", "LpPool") and _chance(rng, 0.35):  # AveragePool has dilations from opset 19
        d = [int(rng.integers(1, 3)), int(rng.integers(1, 3))]
        attrs["dilations"] = d
    mode = _pick(rng, ["pads", "pads", "none", "SAME_UPPER", "SAME_LOWER", "VALID"])
    if mode.startswith("SAME") and (d != [1, 1] or s[0] > k[0] or s[1] > k[1]):
        mode = "pads"  # ONNX Runtime's SAME pooling differs from ONNX's there (or fails: negative pads)
    pads = [0, 0, 0, 0]
    if mode == "pads":
        pads = [int(rng.integers(0, k[a % 2])) for a in range(4)]  # ONNX Runtime: pad < kernel
        attrs["pads"] = pads
    elif mode != "none":
        attrs["auto_pad"] = mode
    if mode in ("pads", "none", "VALID"):
        _check_fits((h, w), pads, k, d)
    ceil = _chance(rng, 0.4)
    edge = False
    if ceil and mode != "SAME_UPPER" and mode != "SAME_LOWER":
        for a, size in enumerate((h, w)):
            total = size + pads[a] + pads[a + 2] - ((k[a] - 1) * d[a] + 1)
            edge |= math.ceil(total / s[a]) * s[a] >= size + pads[a]
        # The last window would start in the end padding: ONNX Runtime and onnx's reference
        # evaluator drop it, onnx (1.23) shape inference counts it: the inferred size is one too
        # large. The pass may refuse such a node (it cannot trust the shape); if it accepts it,
        # the run's output size must match (it does not), so sometimes generate one.
        if edge and not _chance(rng, 0.3):
            raise Reject("ceil_mode window starting in the end padding")
    if ceil or _chance(rng, 0.2):
        attrs["ceil_mode"] = int(ceil)
    if op == "AveragePool" and _chance(rng, 0.6):
        attrs["count_include_pad"] = int(rng.integers(2))
    if op == "LpPool" and _chance(rng, 0.7):
        attrs["p"] = int(rng.integers(1, 4))
    if op == "MaxPool" and _chance(rng, 0.1):
        attrs["storage_order"] = 0
    out = b.node(op, [v], **attrs)[0]
    if edge:
        b.may_refuse[b.nodes[-1].name] = "ceil_mode window starting in the end padding"
        b.tags.add("pool:ceil-window-in-end-padding")
    b.strides[out] = (b.strides[v][0] * s[0], b.strides[v][1] * s[1])
    b.layers.append(f"{op}({attrs_text(attrs)})")
    b.tags |= {op, f"{op}:{mode}"} | ({f"{op}:ceil"} if ceil else set()) \
        | ({f"{op}:dilation"} if d != [1, 1] else set()) \
        | ({f"{op}:count_include_pad"} if attrs.get("count_include_pad") else set())
    return out


def pad(b: Builder, v: str) -> str:
    rng = b.rng
    c, h, w = b.shapes[v]
    begins, ends = {1: 0, 2: 0, 3: 0}, {1: 0, 2: 0, 3: 0}
    if _chance(rng, 0.25):
        begins[1], ends[1] = int(rng.integers(0, 3)), int(rng.integers(0, 3))
    for a, size in ((2, h), (3, w)):
        for side in (begins, ends):
            side[a] = int(rng.integers(-min(3, size // 2 - (1 if size % 2 == 0 else 0)), 4)) \
                if size > 2 else int(rng.integers(0, 4))
        if size + begins[a] + ends[a] < 1:
            raise Reject("pads remove the whole axis")
    form = _pick(rng, ["all", "axes", "axes-negative", "axes-spatial"])
    if form == "all":
        axes = None
        pads = [0, begins[1], begins[2], begins[3], 0, ends[1], ends[2], ends[3]]
    else:
        chosen = [1, 2, 3] if form != "axes-spatial" else [2, 3]
        chosen = list(rng.permutation(chosen))
        axes = [a - 4 if form == "axes-negative" else a for a in chosen]
        pads = [begins[a] for a in chosen] + [ends[a] for a in chosen]
        if form == "axes-spatial":
            begins[1] = ends[1] = 0
    inputs = [v, b.ints(pads, "pads")]
    value = _pick(rng, ["absent", "empty", "value"])
    if value == "value":
        inputs.append(b.const(np.float32(rng.normal() * 3), "padvalue"))
    elif value == "empty" or axes is not None:
        inputs.append("")
    if axes is not None:
        inputs.append(b.ints(axes, "axes"))
    attrs = {"mode": "constant"} if _chance(rng, 0.5) else {}
    out = b.node("Pad", inputs, **attrs)[0]
    b.strides[out] = b.strides[v]
    b.layers.append(f"Pad(pads={pads}, axes={axes}, constant_value={value}, {attrs_text(attrs)})")
    negative = any(x < 0 for x in pads)
    b.tags |= {"Pad", f"Pad:{form}", f"Pad:value-{value}"} | ({"Pad:negative"} if negative else set()) \
        | ({"Pad:positive"} if any(x > 0 for x in pads) else set())
    return out


def _slice_bounds(rng, size: int, tag: set, force_below: bool = False):
    """(start, end, step) drawing from every representation ONNX allows on a spatial axis."""
    step = int(rng.integers(1, 4)) if _chance(rng, 0.5) else 1
    kind = "below" if force_below else _pick(rng, ["zero", "pos", "neg", "below", "below"])
    if kind == "zero":
        start = 0
    elif kind == "pos":
        start = int(rng.integers(0, size))
    elif kind == "neg":
        start = -int(rng.integers(1, size + 1))
    else:
        start = _pick(rng, [-1000, -size - 1, -size - int(rng.integers(1, 50)), -INT64_MAX])
    eff = min(max(start + size if start < 0 else start, 0), size)
    end_kind = _pick(rng, ["in", "in", "above", "max", "neg"])
    if end_kind == "in":
        end = int(rng.integers(eff + 1, size + 1)) if eff < size else size
    elif end_kind == "above":
        end = _pick(rng, [size + int(rng.integers(1, 20)), 1000])
    elif end_kind == "max":
        end = INT64_MAX
    else:
        end = -int(rng.integers(1, max(2, size - eff)))
    tag |= {f"Slice:start-{kind}", f"Slice:end-{end_kind}"} | ({"Slice:step"} if step > 1 else set())
    return start, end, step


def slice_(b: Builder, v: str, force_below: bool = False) -> str:
    rng = b.rng
    c, h, w = b.shapes[v]
    axes = [a for a in (1, 2, 3) if _chance(rng, 0.5)] or [int(rng.integers(1, 4))]
    if force_below and not any(a in (2, 3) for a in axes):
        axes.append(int(rng.integers(2, 4)))
    axes = [int(a) for a in rng.permutation(axes)]
    starts, ends, steps, tags = [], [], [], set()
    below_axis = next(a for a in axes if a in (2, 3)) if force_below else None
    for a in axes:
        if a == 1:  # channels: any direction
            if _chance(rng, 0.5):
                step = -int(rng.integers(1, 3))
                start = _pick(rng, [-1, c - 1, INT64_MAX, c + 5])
                end = _pick(rng, [-INT64_MAX, -c - 1, -1000]) if c > 1 or _chance(rng, 0.5) else -c - 1
                tags.add("Slice:channel-reverse")
            else:
                step = 1
                start = int(rng.integers(0, c))
                end = _pick(rng, [start + 1, INT64_MAX, c])
                tags.add("Slice:channel")
        else:
            start, end, step = _slice_bounds(rng, (h, w)[a - 2], tags, force_below=a == below_axis)
        starts.append(start), ends.append(end), steps.append(step)
    axes_repr = [a - 4 if _chance(rng, 0.3) else a for a in axes]
    inputs = [v, b.ints(starts, "starts"), b.ints(ends, "ends"), b.ints(axes_repr, "axes")]
    if any(s != 1 for s in steps) or _chance(rng, 0.5):
        inputs.append(b.ints(steps, "steps"))
    out = b.node("Slice", inputs)[0]
    sy = steps[axes.index(2)] if 2 in axes else 1
    sx = steps[axes.index(3)] if 3 in axes else 1
    b.strides[out] = (b.strides[v][0] * sy, b.strides[v][1] * sx)
    b.layers.append(f"Slice(starts={starts}, ends={ends}, axes={axes_repr}, steps={steps})")
    b.tags |= {"Slice"} | tags
    return out


def batchnorm(b: Builder, v: str) -> str:
    rng = b.rng
    c = b.shapes[v][0]
    stats = [rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.2, 2.0, c)]
    attrs: dict = {}
    if _chance(rng, 0.5):
        attrs["training_mode"] = 0
    if _chance(rng, 0.3):
        attrs["epsilon"] = float(rng.uniform(1e-5, 1e-2))
    if _chance(rng, 0.2):
        attrs["momentum"] = float(rng.uniform(0.5, 0.99))  # running statistics only: no effect in inference
    out = b.node("BatchNormalization", [v] + [b.const(s.astype(np.float32), "bn") for s in stats], **attrs)[0]
    b.strides[out] = b.strides[v]
    b.layers.append(f"BatchNormalization({attrs_text(attrs)})")
    b.tags |= {"BatchNormalization", f"BatchNormalization:{'training_mode=0' if attrs.get('training_mode') == 0 else 'default'}"}
    return out


def dropout(b: Builder, v: str) -> str:
    rng = b.rng
    inputs = [v] + ([b.const(np.float32(rng.uniform(0.1, 0.9)), "ratio")] if _chance(rng, 0.5) else [])
    mask = _chance(rng, 0.3)
    attrs = {"seed": int(rng.integers(1000))} if _chance(rng, 0.2) else {}
    out = b.node("Dropout", inputs, outputs=2 if mask else 1, **attrs)[0]
    b.strides[out] = b.strides[v]
    b.layers.append(f"Dropout(ratio={'given' if len(inputs) > 1 else 'absent'}, mask={mask})")
    b.tags |= {"Dropout"}
    return out


def activation(b: Builder, v: str) -> str:
    rng = b.rng
    op = _pick(rng, ["Relu", "Sigmoid", "LeakyRelu", "HardSwish", "Clip"])
    inputs, attrs, text = [v], {}, op
    if op == "LeakyRelu" and _chance(rng, 0.7):
        attrs["alpha"] = float(rng.uniform(0.01, 0.5))
    if op == "Clip":
        lo, hi = sorted(rng.normal(0, 1.5, size=2).tolist())
        form = _pick(rng, ["both", "min", "max", "none"])
        if form in ("both", "min"):
            inputs.append(b.const(np.float32(lo), "min"))
        elif form == "max":
            inputs.append("")
        if form in ("both", "max"):
            inputs.append(b.const(np.float32(hi), "max"))
        text = f"Clip({form})"
        b.tags.add(f"Clip:{form}")
    out = b.node(op, inputs, **attrs)[0]
    b.strides[out] = b.strides[v]
    b.layers.append(text)
    b.tags.add(op)
    return out


def arithmetic(b: Builder, v: str) -> str:
    rng = b.rng
    c, h, w = b.shapes[v]
    op = _pick(rng, ["Mul", "Add"])
    form = _pick(rng, ["scalar", "C11", "1C11", "11HW", "HW", "1W", "CHW"])
    shape = {"scalar": (), "C11": (c, 1, 1), "1C11": (1, c, 1, 1), "11HW": (1, 1, h, w), "HW": (h, w),
             "1W": (1, w), "CHW": (c, h, w)}[form]
    k = b.const(rng.normal(0, 1.5, size=shape).astype(np.float32), "operand")
    out = b.node(op, [v, k] if _chance(rng, 0.6) else [k, v])[0]
    b.strides[out] = b.strides[v]
    b.layers.append(f"{op}(constant {form})")
    b.tags |= {op, f"{op}:{'per-position' if form in ('11HW', 'HW', '1W', 'CHW') else 'per-channel'}"}
    return out


def qdq(b: Builder, v: str) -> str:
    rng = b.rng
    c = b.shapes[v][0]
    per_channel = _chance(rng, 0.4)
    attrs = {"axis": _pick(rng, [1, 1, -3])} if per_channel else {}
    dtype = _pick(rng, [np.uint8, np.int8])
    scale = rng.uniform(0.02, 0.2, size=c if per_channel else ()).astype(np.float32)
    inputs = [v, b.const(scale, "scale")]
    zp_given = _chance(rng, 0.7)
    if zp_given:
        lo, hi = (0, 255) if dtype == np.uint8 else (-128, 127)
        inputs.append(b.const(rng.integers(lo + 50, hi - 50, size=scale.shape).astype(dtype), "zero"))
    q = b.node("QuantizeLinear", inputs, **attrs)[0]
    out = b.node("DequantizeLinear", [q] + inputs[1:], **attrs)[0]
    b.strides[q] = b.strides[out] = b.strides[v]
    b.layers.append(f"QuantizeLinear+DequantizeLinear(per_channel={per_channel}, "
                    f"{np.dtype(dtype).name if zp_given else 'uint8 default'})")
    b.tags |= {"QDQ", f"QDQ:{'per-channel' if per_channel else 'per-tensor'}"}
    return out


def cast16(b: Builder, v: str) -> str:
    half = b.node("Cast", [v], to=TensorProto.FLOAT16)[0]
    if _chance(b.rng, 0.4):
        half = b.node("Relu", [half])[0]
    out = b.node("Cast", [half], to=FLOAT)[0]
    b.strides[out] = b.strides[v]
    b.layers.append("Cast(float16)+Cast(float)")
    b.tags.add("Cast")
    return out


def reducesum(b: Builder, v: str) -> str:
    """ReduceSum over the channels, keepdims=1; sometimes through a rank-3 (N, H, W) map (keepdims=0
    or Squeeze, then Unsqueeze), as the gate's score is."""
    form = _pick(b.rng, ["keepdims", "keepdims", "keepdims=0", "squeeze"])
    attrs = {"keepdims": 1} if form == "squeeze" or (form == "keepdims" and _chance(b.rng, 0.5)) else {}
    if form == "keepdims=0":
        attrs["keepdims"] = 0
    if _chance(b.rng, 0.2):
        attrs["noop_with_empty_axes"] = 0
    out = b.node("ReduceSum", [v, b.ints([_pick(b.rng, [1, -3])], "axes")], **attrs)[0]
    text = f"ReduceSum(axes=[1], {attrs_text(attrs)})"
    if form != "keepdims":
        if form == "squeeze":
            out = b.node("Squeeze", [out, b.ints([1], "axes")])[0]
            text += "+Squeeze([1])"
        if _chance(b.rng, 0.5):
            h, w = b.shapes[v][1:]
            out = b.node("Mul", [out, b.const(b.rng.normal(size=(h, w)).astype(np.float32), "operand")])[0]
            text += "+Mul(constant HW)"
        out = b.node("Unsqueeze", [out, b.ints([_pick(b.rng, [1, -3])], "axes")])[0]
        text += "+Unsqueeze([1])"
        b.tags.add("ReduceSum:rank3")
    b.strides[out] = b.strides[v]
    b.layers.append(text)
    b.tags.add("ReduceSum")
    return out


def where(b: Builder, v: str) -> str:
    rng = b.rng
    c, h, w = b.shapes[v]
    form = _pick(rng, ["const-position", "const-channel", "image"])
    if form == "const-position":
        cond = b.const(rng.random((1, 1, h, w)) < 0.5, "cond")
    elif form == "const-channel":
        cond = b.const(rng.random((1, c, 1, 1)) < 0.5, "cond")
    else:
        cond = b.node("Greater", [v, b.const(np.float32(rng.normal()), "threshold")])[0]
    other = _pick(rng, ["scalar", "channel", "feature"])
    if other == "feature":
        other_v = b.node("Neg", [v])[0]
    else:
        other_v = b.const(rng.normal(size=() if other == "scalar" else (c, 1, 1)).astype(np.float32), "other")
    pair = [v, other_v] if _chance(rng, 0.5) else [other_v, v]
    out = b.node("Where", [cond, *pair])[0]
    b.strides[out] = b.strides[v]
    b.layers.append(f"Where(cond={form}, other={other})")
    b.tags |= {"Where", f"Where:{form}"}
    return out


ACCEPT_LAYERS = {
    "conv": conv, "pool": pool, "pad": pad, "slice": slice_, "batchnorm": batchnorm, "dropout": dropout,
    "activation": activation, "arithmetic": arithmetic, "qdq": qdq, "cast16": cast16,
    "reducesum": reducesum, "where": where,
}
ACCEPT_WEIGHTS = {"conv": 4, "pool": 3, "pad": 2, "slice": 3, "batchnorm": 1, "dropout": 1, "activation": 2,
                  "arithmetic": 2, "qdq": 1, "cast16": 1, "reducesum": 1, "where": 1}

# features every campaign of the default size must have exercised in checked graphs
REQUIRED_TAGS = {
    "Conv", "Conv:pads", "Conv:none", "Conv:SAME_UPPER", "Conv:SAME_LOWER", "Conv:VALID", "Conv:dilation",
    "Conv:group", "Conv:stride", "Conv:asymmetric-pads",
    "MaxPool", "MaxPool:ceil", "MaxPool:dilation", "AveragePool", "AveragePool:ceil",
    "AveragePool:count_include_pad", "LpPool", "LpPool:ceil", "LpPool:dilation",
    "Pad", "Pad:negative", "Pad:positive", "Pad:all", "Pad:axes", "Pad:axes-negative", "Pad:value-value",
    "Pad:value-absent",
    "Slice", "Slice:start-below", "Slice:start-neg", "Slice:start-pos", "Slice:end-above", "Slice:end-max",
    "Slice:end-neg", "Slice:step", "Slice:channel", "Slice:channel-reverse",
    "BatchNormalization", "BatchNormalization:training_mode=0", "BatchNormalization:default", "Dropout",
    "Relu", "Sigmoid", "LeakyRelu", "HardSwish", "Clip", "Clip:both",
    "Mul", "Add", "Mul:per-channel", "Mul:per-position", "Add:per-channel", "Add:per-position",
    "QDQ", "QDQ:per-channel", "QDQ:per-tensor", "Cast", "ReduceSum", "ReduceSum:rank3", "Where", "Where:image",
    "join:Add", "join:Concat", "pool:ceil-window-in-end-padding",
}


# --- refused layers -----------------------------------------------------------------------------------


def bn_training(b: Builder, v: str) -> str:
    rng = b.rng
    c = b.shapes[v][0]
    stats = [rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.2, 2.0, c)]
    out = b.node("BatchNormalization", [v] + [b.const(s.astype(np.float32), "bn") for s in stats], outputs=3,
                 training_mode=1)[0]
    b.layers.append("BatchNormalization(training_mode=1)")
    return out


def dropout_training(b: Builder, v: str) -> str:
    out = b.node("Dropout", [v, b.const(np.float32(0.5), "ratio"), b.const(np.bool_(True), "training")])[0]
    b.layers.append("Dropout(training_mode=True)")
    return out


def global_pool(b: Builder, v: str) -> str:
    out = b.node("GlobalAveragePool", [v])[0]
    b.layers.append("GlobalAveragePool")
    return out


def reduce_mean(b: Builder, v: str) -> str:
    axes = _pick(b.rng, [[2, 3], [2], [3], [-1], [-2, -1], [1, 2]])
    out = b.node("ReduceMean", [v, b.ints(axes, "axes")], keepdims=1)[0]
    b.layers.append(f"ReduceMean(axes={axes})")
    return out


def resize(b: Builder, v: str) -> str:
    mode = _pick(b.rng, ["nearest", "linear"])
    out = b.node("Resize", [v, "", b.const(np.array([1, 1, 2, 2], np.float32), "scales")], mode=mode)[0]
    b.layers.append(f"Resize(x2, {mode})")
    return out


def reshape(b: Builder, v: str) -> str:
    c, h, w = b.shapes[v]
    target = _pick(b.rng, [[0, 1, c * h, w], [0, c, w, h] if h != w else [0, c * h, 1, w], [0, -1]])
    out = b.node("Reshape", [v, b.ints(target, "shape")])[0]
    b.layers.append(f"Reshape({target})")
    return out


def flatten(b: Builder, v: str) -> str:
    out = b.node("Flatten", [v], axis=1)[0]
    b.layers.append("Flatten(axis=1)")
    return out


def transpose(b: Builder, v: str) -> str:
    perm = _pick(b.rng, [[0, 1, 3, 2], [0, 2, 1, 3], [0, 3, 2, 1], [0, 2, 3, 1]])
    out = b.node("Transpose", [v], perm=perm)[0]
    b.layers.append(f"Transpose(perm={perm})")
    return out


def pad_mirror(b: Builder, v: str) -> str:
    c, h, w = b.shapes[v]
    mode = _pick(b.rng, ["reflect", "edge"])
    if mode == "reflect" and min(h, w) < 3:
        mode = "edge"
    by, bx = int(b.rng.integers(1, 3)), int(b.rng.integers(0, 3))
    pads = [0, 0, by, bx, 0, 0, int(b.rng.integers(0, 2)), int(b.rng.integers(0, 2))]
    out = b.node("Pad", [v, b.ints(pads, "pads")], mode=mode)[0]
    b.layers.append(f"Pad(mode={mode}, pads={pads})")
    return out


def slice_reverse(b: Builder, v: str) -> str:
    axis = int(b.rng.integers(2, 4))
    step = -int(b.rng.integers(1, 3))
    out = b.node("Slice", [v, b.ints([-1], "starts"), b.ints([-INT64_MAX], "ends"), b.ints([axis], "axes"),
                           b.ints([step], "steps")])[0]
    b.layers.append(f"Slice(axes=[{axis}], steps=[{step}])")
    return out


def slice_batch(b: Builder, v: str) -> str:
    axis = _pick(b.rng, [0, -4])
    out = b.node("Slice", [v, b.ints([0], "starts"), b.ints([1], "ends"), b.ints([axis], "axes")])[0]
    b.layers.append(f"Slice(axes=[{axis}], starts=[0], ends=[1])")
    return out


def softmax(b: Builder, v: str) -> str:
    axis = _pick(b.rng, [2, 3, -1, -2])
    out = b.node("Softmax", [v], axis=axis)[0]
    b.layers.append(f"Softmax(axis={axis})")
    return out


def if_outer(b: Builder, v: str) -> str:
    then_out, else_out = b.fresh("then"), b.fresh("else")
    then_g = helper.make_graph([helper.make_node("Relu", [v], [then_out], name=b.fresh("then_relu"))], "then",
                               [], [helper.make_tensor_value_info(then_out, FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", [v], [else_out], name=b.fresh("else_neg"))], "else",
                               [], [helper.make_tensor_value_info(else_out, FLOAT, None)])
    out = b.node("If", [b.const(np.bool_(b.rng.random() < 0.5), "cond")], then_branch=then_g,
                 else_branch=else_g)[0]
    b.layers.append("If(branches read the feature map through outer scope)")
    return out


def custom(b: Builder, v: str) -> str:
    b.opsets[CUSTOM_DOMAIN] = 1
    out = b.node("LocalLooking", [v], domain=CUSTOM_DOMAIN)[0]
    c, h, w = b.shapes[v]
    b.value_info.append(helper.make_tensor_value_info(out, FLOAT, ["batch", c, h, w]))
    b.layers.append(f"{CUSTOM_DOMAIN}::LocalLooking")
    return out


def random_add(b: Builder, v: str) -> str:
    noise = b.node("RandomNormalLike", [v])[0]
    out = b.node("Add", [v, noise])[0]
    b.layers.append("Add(RandomNormalLike)")
    return out


def layernorm(b: Builder, v: str) -> str:
    c, h, w = b.shapes[v]
    axis = _pick(b.rng, [1, 2, 3, -1])
    shape = (c, h, w)[(axis % 4) - 1:]
    out = b.node("LayerNormalization", [v, b.const(np.ones(shape, np.float32), "ln"),
                                        b.const(np.zeros(shape, np.float32), "ln")], axis=axis)[0]
    b.layers.append(f"LayerNormalization(axis={axis})")
    return out


def instancenorm(b: Builder, v: str) -> str:
    c = b.shapes[v][0]
    out = b.node("InstanceNormalization", [v, b.const(np.ones(c, np.float32), "in"),
                                           b.const(np.zeros(c, np.float32), "in")])[0]
    b.layers.append("InstanceNormalization")
    return out


def matmul(b: Builder, v: str) -> str:
    w = b.shapes[v][2]
    out = b.node("MatMul", [v, b.const(b.rng.standard_normal((w, w)).astype(np.float32), "matrix")])[0]
    b.layers.append("MatMul(constant WxW)")
    return out


REFUSE_LAYERS = {
    "bn_training": bn_training, "dropout_training": dropout_training, "global_pool": global_pool,
    "reduce_mean": reduce_mean, "resize": resize, "reshape": reshape, "flatten": flatten,
    "transpose": transpose, "pad_mirror": pad_mirror, "slice_reverse": slice_reverse,
    "slice_batch": slice_batch, "softmax": softmax, "if_outer": if_outer, "custom": custom,
    "random_add": random_add, "layernorm": layernorm, "instancenorm": instancenorm, "matmul": matmul,
}


def attrs_text(attrs: dict, skip=()) -> str:
    return ", ".join(f"{k}={v}" for k, v in attrs.items() if k not in skip)


# --- whole graphs -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    seed: int
    index: int
    kind: str  # "accept" | "refuse"
    model: onnx.ModelProto  # shape-inferred, outputs: the last value
    input_shape: tuple[int, int, int]
    layers: list[str]
    tags: set[str]
    refused_layer: str | None = None  # REFUSE_LAYERS key
    refused_nodes: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, op)
    refused_output: str | None = None
    downstream: set[str] = dataclasses.field(default_factory=set)  # values at or after the refused layer
    may_refuse: dict[str, str] = dataclasses.field(default_factory=dict)  # accepted ops the pass may refuse

    def describe(self) -> str:
        c, h, w = self.input_shape
        return f"seed={self.seed} index={self.index} {self.kind} image=({c},{h},{w}): " + " -> ".join(self.layers)


def _add_layer(b: Builder, v: str, fn, *args, attempts: int = 12, require_map: bool = True) -> str:
    for _ in range(attempts):
        snap = b.snapshot()
        try:
            out = fn(b, v, *args)
            b.strides.setdefault(out, b.strides[v])  # refused layers: irrelevant, nothing joins after them
            b.settle(out, require_map)
            return out
        except Reject:
            b.rollback(snap)
    raise Reject(f"{fn.__name__}: no valid parameters for input {b.shapes[v]}")


def _accepted(b: Builder, v: str) -> str:
    names = list(ACCEPT_WEIGHTS)
    p = np.array([ACCEPT_WEIGHTS[n] for n in names], float)
    for _ in range(6):
        name = names[int(b.rng.choice(len(names), p=p / p.sum()))]
        try:
            return _add_layer(b, v, ACCEPT_LAYERS[name])
        except Reject:
            continue
    return _add_layer(b, v, activation)


def _strided(b: Builder, v: str, stride: tuple[int, int]) -> str:
    """A layer multiplying the stride by exactly `stride` (a branch matching its sibling)."""
    for _ in range(12):
        snap = b.snapshot()
        try:
            if stride == (1, 1) and _chance(b.rng, 0.5):
                out = _accepted(b, v)
                if b.strides[out] == b.strides[v]:
                    return out
                raise Reject("stride changed")
            choice = _pick(b.rng, ["conv", "pool", "slice"])
            if choice == "slice":
                out = b.node("Slice", [v, b.ints([int(b.rng.integers(0, 2)), int(b.rng.integers(0, 2))], "starts"),
                                       b.ints([INT64_MAX, INT64_MAX], "ends"), b.ints([2, 3], "axes"),
                                       b.ints(list(stride), "steps")])[0]
                b.layers.append(f"Slice(steps={list(stride)})")
                b.tags.add("Slice")
            elif choice == "conv":
                out = conv(b, v, stride=stride)
            else:
                out = pool(b, v, stride=stride)
            b.strides[out] = (b.strides[v][0] * stride[0], b.strides[v][1] * stride[1])
            b.settle(out)
            return out
        except Reject:
            b.rollback(snap)
    raise Reject(f"no layer of stride {stride}")


def _crop(b: Builder, v: str, hw: tuple[int, int]) -> str:
    c, h, w = b.shapes[v]
    if (h, w) == hw:
        return v
    oy, ox = int(b.rng.integers(0, h - hw[0] + 1)), int(b.rng.integers(0, w - hw[1] + 1))
    out = b.node("Slice", [v, b.ints([oy, ox], "starts"), b.ints([oy + hw[0], ox + hw[1]], "ends"),
                           b.ints([2, 3], "axes")])[0]
    b.strides[out] = b.strides[v]
    b.layers.append(f"Slice(crop to {hw} at {(oy, ox)})")
    b.settle(out)
    return out


def _join(b: Builder, v: str) -> str:
    """Two branches from v (1-2 layers each, the same total stride) joined by Add or Concat(axis=1)."""
    snap = b.snapshot()
    try:
        b.layers.append("fork[")
        a = _accepted(b, v)
        if _chance(b.rng, 0.4):
            a = _accepted(b, a)
        total = (b.strides[a][0] // b.strides[v][0], b.strides[a][1] // b.strides[v][1])
        if max(total) > 3:
            raise Reject("branch stride too large to match")
        b.layers.append("|")
        other = _strided(b, v, total)
        if _chance(b.rng, 0.3):
            nxt = _accepted(b, other)
            other = nxt if b.strides[nxt] == b.strides[other] else other
        if b.strides[a] != b.strides[other]:
            raise Reject("strides differ")
        hw = (min(b.shapes[a][1], b.shapes[other][1]), min(b.shapes[a][2], b.shapes[other][2]))
        a, other = _crop(b, a, hw), _crop(b, other, hw)
        ca, co = b.shapes[a][0], b.shapes[other][0]
        op = "Add" if (ca == co or 1 in (ca, co)) and _chance(b.rng, 0.6) else "Concat"
        pair = [a, other] if _chance(b.rng, 0.5) else [other, a]
        out = b.node(op, pair, **({"axis": _pick(b.rng, [1, -3])} if op == "Concat" else {}))[0]
        b.strides[out] = b.strides[a]
        b.layers.append(f"]{op}")
        b.tags.add(f"join:{op}")
        b.settle(out)
        return out
    except Reject:
        b.rollback(snap)
        return _accepted(b, v)


def downstream_of(model: onnx.ModelProto, start: set[str]) -> set[str]:
    seen = set(start)
    for node in model.graph.node:
        if any(i in seen for i in node.input if i):
            seen.update(node.output)
    return seen


def generate(seed: int, index: int, kind: str = "accept", refuse: str | None = None,
             force: str | None = None) -> Case:
    """One case. kind "refuse" inserts REFUSE_LAYERS[refuse] (drawn when None); `force` inserts one
    chosen feature in an accepted chain: "conv_dilated", "slice_below" (a spatial start below -dim)
    or "bn_training" (for the negative controls)."""
    rng = np.random.default_rng([seed, index, {"accept": 0, "refuse": 1}[kind]])
    for _ in range(20):
        c, h, w = int(rng.integers(1, 4)), int(rng.integers(10, 21)), int(rng.integers(10, 21))
        b = Builder(rng, c, h, w)
        try:
            n = int(rng.integers(1, 6))
            special = int(rng.integers(0, n)) if (kind == "refuse" or force) else -1
            v = IMAGE
            refused_layer, refused_nodes, refused_out = None, [], None
            for step in range(n):
                if step == special:
                    if kind == "refuse":
                        refused_layer = refuse or _pick(rng, sorted(REFUSE_LAYERS))
                        first = len(b.nodes)
                        v = _add_layer(b, v, REFUSE_LAYERS[refused_layer], require_map=False)
                        refused_nodes = [(nd.name, nd.op_type) for nd in b.nodes[first:]]
                        refused_out = v
                    elif force == "conv_dilated":
                        v = _add_layer(b, v, conv, True)
                    elif force == "slice_below":
                        v = _add_layer(b, v, slice_, True)
                    elif force == "bn_training":
                        v = _add_layer(b, v, bn_training)
                    else:
                        raise ValueError(force)
                    if len(b.shapes.get(v, ())) != 3 or None in b.shapes[v]:
                        break  # not a 4-D map any more (Flatten, ...): the chain ends here
                elif _chance(rng, 0.2) and step < n - 1 and step + 1 != special:
                    v = _join(b, v)
                else:
                    v = _accepted(b, v)
        except Reject:
            continue
        model = infer(b.model([v]))
        downstream = downstream_of(model, {refused_out}) if refused_out else set()
        if refused_out:
            downstream |= {o for nd in model.graph.node if nd.name in {n for n, _ in refused_nodes}
                           for o in nd.output}
        return Case(seed, index, kind, model, (c, h, w), list(b.layers), set(b.tags), refused_layer,
                    refused_nodes, refused_out, downstream, dict(b.may_refuse))
    raise RuntimeError(f"could not generate case seed={seed} index={index} kind={kind}")


def case_at(seed: int, index: int, refuse_share: float = 0.25) -> Case:
    """Case `index` of the campaign `seed`: every round(1/refuse_share)-th is a refused one, cycling
    through REFUSE_LAYERS (so each appears once there are that many refused cases)."""
    period = max(1, round(1 / refuse_share)) if refuse_share > 0 else 0
    if period and index % period == period - 1:
        names = sorted(REFUSE_LAYERS)
        return generate(seed, index, "refuse", names[(index // period) % len(names)])
    return generate(seed, index, "accept")


def campaign(seed: int, graphs: int, refuse_share: float = 0.25) -> list[Case]:
    return [case_at(seed, index, refuse_share) for index in range(graphs)]


# --- mutations for the negative controls ---------------------------------------------------------------


def _strip_attribute(model: onnx.ModelProto, op_type: str, name: str, keep_outputs: int | None = None):
    model = copy.deepcopy(model)
    for node in model.graph.node:
        if node.op_type == op_type:
            keep = [a for a in node.attribute if a.name != name]
            del node.attribute[:]
            node.attribute.extend(keep)
            if keep_outputs is not None:
                del node.output[keep_outputs:]
    return model


def strip_conv_dilations(model: onnx.ModelProto) -> onnx.ModelProto:
    """The pass ignores Conv dilations."""
    return _strip_attribute(model, "Conv", "dilations")


def strip_bn_training(model: onnx.ModelProto) -> onnx.ModelProto:
    """The pass ignores BatchNormalization's training_mode."""
    return _strip_attribute(model, "BatchNormalization", "training_mode", keep_outputs=1)


def unclamp_slice_starts(model: onnx.ModelProto) -> onnx.ModelProto:
    """The pass's old arithmetic: a spatial Slice start below -dim taken as start + dim (< 0), not 0.
    Simulated for a correct pass: Pad(begin = -(start + dim)) before the Slice and start 0, which any
    correct pass maps to the same (too far up/left) offset start + dim."""
    model = copy.deepcopy(model)
    shapes = {vi.name: value_shape(vi) for vi in list(model.graph.value_info) + list(model.graph.input)}
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes = []
    for node in model.graph.node:
        if node.op_type == "Slice" and len(node.input) > 3 and node.input[3] in inits:
            starts = numpy_helper.to_array(inits[node.input[1]]).copy()
            axes = numpy_helper.to_array(inits[node.input[3]]) % 4
            hw = shapes.get(node.input[0])
            begins = [0, 0, 0, 0]
            for k, a in enumerate(axes):
                if a in (2, 3) and hw and hw[a - 1] is not None and starts[k] < -hw[a - 1]:
                    begins[a] = -(int(starts[k]) + hw[a - 1])
                    starts[k] = 0
            if any(begins):
                padded = node.input[0] + "_unclamped"
                pads = numpy_helper.from_array(np.array(begins + [0, 0, 0, 0], np.int64), padded + "_pads")
                new_starts = numpy_helper.from_array(starts.astype(np.int64), node.input[1] + "_unclamped")
                model.graph.initializer.extend([pads, new_starts])
                new_nodes.append(helper.make_node("Pad", [node.input[0], pads.name], [padded],
                                                  name=node.name + "_unclamped"))
                node.input[0], node.input[1] = padded, new_starts.name
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    del model.graph.value_info[:]
    return model


CONTROLS = {  # name -> (force, mutation)
    "conv-dilation-ignored": ("conv_dilated", strip_conv_dilations),
    "bn-training-ignored": ("bn_training", strip_bn_training),
    "slice-start-unclamped": ("slice_below", unclamp_slice_starts),
}


# --- the check ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    case: Case
    accepted: bool = False  # the final output got an RF
    allowed_refusal: bool = False  # refused, naming a node the pass may refuse (Case.may_refuse)
    pixels: int = 0  # pixel positions perturbed
    checked_values: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)  # measured dependence outside the box
    violating_pairs: int = 0  # (pixel, output position) pairs outside the box
    violating_values: list[str] = dataclasses.field(default_factory=list)
    wrongly_refused: list[str] = dataclasses.field(default_factory=list)
    wrongly_accepted: list[str] = dataclasses.field(default_factory=list)
    bad_reasons: list[str] = dataclasses.field(default_factory=list)
    shape_mismatches: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    skipped: str | None = None  # controls only: the mutated copy is not a valid model

    @property
    def failed(self) -> bool:
        return bool(self.violations or self.wrongly_refused or self.wrongly_accepted or self.bad_reasons
                    or self.shape_mismatches or self.error)


def load_pass(path: str | None = None):
    """The module under test: scalecert.export.receptive, or another implementation of its API
    (e.g. an older revision: `git show REV:scalecert/export/receptive.py > /tmp/old.py`)."""
    if path is None:
        from scalecert.export import receptive

        return receptive
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("receptive_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def pass_fields(model: onnx.ModelProto, impl=None) -> dict:
    """value name -> RF | NonLocal | None from the pass under test."""
    import onnx_ir

    impl = impl or load_pass()
    graph = onnx_ir.from_proto(model).graph
    return {value.name: info for value, info in impl.receptive_fields(graph).items() if value.name}


def _prune(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Only the nodes the values `names` need (the measurement must not run what follows a refused
    node: a custom op has no kernel)."""
    needed, keep = set(names), []
    for node in reversed(model.graph.node):
        if needed & set(node.output):
            keep.append(node)
            needed |= {i for i in node.input if i}
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    for inner in g.node:
                        needed |= {i for i in inner.input if i}
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    return model


def _image_dependent(model: onnx.ModelProto) -> set[str]:
    """Values that structurally depend on the image, subgraphs' outer-scope reads included."""
    def reads(node):
        names = set(node.input)
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for inner in g.node:
                    names |= reads(inner)
        return names
    seen = {IMAGE}
    for node in model.graph.node:
        if reads(node) & seen:
            seen.update(node.output)
    return seen


def _perturbations(rng, c: int, h: int, w: int, trials: int):
    base = rng.standard_normal((1, c, h, w)).astype(np.float32)
    batch = np.repeat(base, h * w * trials, axis=0).reshape(h, w, trials, c, h, w)
    for t in range(trials):
        magnitude = rng.uniform(3.0, 8.0, size=(h, w, 1))
        if t == 0:
            sign = np.ones((h, w, c))
        elif t == 1:
            sign = -np.ones((h, w, c))
        else:
            sign = rng.choice([-1.0, 1.0], size=(h, w, c))
        delta = (sign * magnitude).astype(np.float32)
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        batch[ys, xs, t, :, ys, xs] += delta[ys, xs]
    return base, batch.reshape(h * w * trials, c, h, w)


def _differs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.floating):
        return ~((a == b) | (np.isnan(a) & np.isnan(b)))
    return a != b


def measure(model: onnx.ModelProto, names: list[str], input_shape, rng, trials: int = 3, chunk: int = 512):
    """name -> (changed (H, W, Ho, Wo) bool, output shape) measured with ONNX Runtime on CPU, plus notes."""
    import onnxruntime as ort

    model = _prune(copy.deepcopy(model), names)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(model.graph.value_info) + list(model.graph.output)}
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(n, types.get(n, 0), None) for n in names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # failures come back as exceptions
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    c, h, w = input_shape
    base, batch = _perturbations(rng, c, h, w, trials)
    solo = session.run(names, {IMAGE: base})
    if any(_differs(a, b).any() for a, b in zip(solo, session.run(names, {IMAGE: base}))):
        raise RuntimeError("ONNX Runtime is not deterministic on this graph (a random op)")
    notes = []
    other = (base + rng.normal(0, 5, size=base.shape)).astype(np.float32)  # differs at every pixel
    first = session.run(names, {IMAGE: np.concatenate([base, base, other])})
    mixes = any(_differs(f[0], s[0]).any() or _differs(f[1], s[0]).any() for f, s in zip(first, solo))
    outs: list[list[np.ndarray]] = [[] for _ in names]
    if mixes:  # batch items influence each other (BatchNormalization training mode): one image per run
        notes.append("batch items interact: measured one image per run")
        for k in range(len(batch)):
            for acc, y in zip(outs, session.run(names, {IMAGE: batch[k:k + 1]})):
                acc.append(y)
        base_out = solo
    else:
        for start in range(0, len(batch), chunk):
            part = session.run(names, {IMAGE: np.concatenate([base, batch[start:start + chunk], base])})
            for acc, y, s in zip(outs, part, solo):
                if _differs(y[0], s[0]).any() or _differs(y[-1], s[0]).any():
                    raise RuntimeError("ONNX Runtime is not deterministic on this graph")
                acc.append(y[1:-1])
        base_out = solo
    measured = {}
    for name, acc, b0 in zip(names, outs, base_out):
        y, b0 = np.concatenate(acc), b0
        if y.ndim == 3:  # (N, H, W): one channel
            y, b0 = y[:, None], b0[:, None]
        if y.ndim != 4:
            continue
        diff = _differs(y, np.broadcast_to(b0, y.shape)).reshape(h, w, trials, *y.shape[1:])
        measured[name] = (diff.any(axis=(2, 3)), y.shape)
    return measured, notes


def _box_violations(changed: np.ndarray, rf) -> tuple[int, str | None]:
    """Pairs (pixel, output position) with a measured dependence outside the RF box; a description
    of the worst output position."""
    h, w, ho, wo = changed.shape
    (sy, loy, hiy), (sx, lox, hix) = rf.y, rf.x

    def inside_axis(n_in, n_out, stride, lo, hi):  # (n_in, n_out): pixel inside the box of position
        clamp = lambda v: min(max(int(v), -1), n_in)  # exact Python ints first: boxes may be huge
        los = np.array([clamp(k * stride + lo) for k in range(n_out)])
        his = np.array([clamp(k * stride + hi) for k in range(n_out)])
        pix = np.arange(n_in)[:, None]
        return (los[None, :] <= pix) & (pix <= his[None, :])

    in_y, in_x = inside_axis(h, ho, sy, loy, hiy), inside_axis(w, wo, sx, lox, hix)
    inside = in_y[:, None, :, None] & in_x[None, :, None, :]
    bad = changed & ~inside
    count = int(bad.sum())
    if not count:
        return 0, None
    per_out = bad.sum(axis=(0, 1))
    oi, oj = (int(k) for k in np.unravel_index(int(per_out.argmax()), per_out.shape))
    ys, xs = np.nonzero(changed[:, :, oi, oj])
    return count, (f"output ({oi},{oj}): pass box rows [{oi * sy + loy},{oi * sy + hiy}] cols "
                   f"[{oj * sx + lox},{oj * sx + hix}], measured rows [{ys.min()},{ys.max()}] cols "
                   f"[{xs.min()},{xs.max()}]")


def check(case: Case, mutate=None, trials: int = 3, rng_seed: int | None = None, impl=None) -> Result:
    """The property on one case (see the module docstring). `mutate`: the pass sees mutate(model),
    every value is measured and must be inside the box (negative controls). `impl`: the pass
    module (load_pass())."""
    impl = impl or load_pass()
    RF, NonLocal = impl.RF, impl.NonLocal
    result = Result(case)
    model = case.model
    seen_model = model
    if mutate is not None:
        try:
            seen_model = mutate(model)
            del seen_model.graph.value_info[:]
            for out in seen_model.graph.output:
                out.type.tensor_type.ClearField("shape")
            seen_model = infer(seen_model)
        except Exception as exc:
            result.skipped = f"mutated copy invalid: {str(exc).splitlines()[0][:160]}"
            return result
    try:
        fields = pass_fields(seen_model, impl)
    except Exception as exc:
        result.error = f"pass raised {type(exc).__name__}: {exc}"
        return result
    dependent = _image_dependent(model)
    shapes = {vi.name: value_shape(vi) for vi in list(model.graph.value_info) + list(model.graph.output)}
    downstream = case.downstream if mutate is None else set()
    final = model.graph.output[0].name
    result.accepted = isinstance(fields.get(final), RF)
    final_info = fields.get(final)
    result.allowed_refusal = isinstance(final_info, NonLocal) and any(n in final_info.reason for n in case.may_refuse)

    # refusals
    if case.kind == "refuse" and mutate is None:
        names = {n for n, _ in case.refused_nodes} | {op for _, op in case.refused_nodes}
        for value in sorted(downstream & dependent):
            if value not in fields and value not in shapes:
                continue  # e.g. outputs only inside subgraphs
            info = fields.get(value, "missing")
            if not isinstance(info, NonLocal):
                result.wrongly_accepted.append(f"{value}: {info!r} after refused {case.refused_layer} "
                                               f"{case.refused_nodes}")
        out_info = fields.get(case.refused_output)
        if isinstance(out_info, NonLocal):
            reason = out_info.reason
            if "\n" in reason or "\r" in reason:
                result.bad_reasons.append(f"reason has several lines: {reason!r}")
            elif not any(n in reason for n in names):
                upstream_refused = [fields.get(i) for nd in model.graph.node
                                    if nd.name in {n for n, _ in case.refused_nodes} for i in nd.input
                                    if isinstance(fields.get(i), NonLocal)]
                if not upstream_refused:  # otherwise the earlier refusal is reported as wrongly_refused
                    result.bad_reasons.append(f"reason does not name {case.refused_nodes}: {reason!r}")

    # measured dependence of every value the pass models as local (or independent of the image)
    to_measure = []
    for value in sorted(dependent - {IMAGE} - downstream):
        shape = shapes.get(value)
        info = fields.get(value, "missing")
        if isinstance(info, NonLocal) or info == "missing":
            allowed = info != "missing" and any(n in info.reason for n in case.may_refuse)
            if shape is not None and len(shape) == 3 and mutate is None and not allowed:
                result.wrongly_refused.append(f"{value}: {info.reason if info != 'missing' else 'no entry'}")
            continue
        if shape is not None and len(shape) == 3:
            to_measure.append(value)
    # a value the pass should have refused but modelled: measure it too where ONNX Runtime can (not
    # after a custom op; a random op fails the determinism check), as evidence
    evidence = [v for v in sorted(downstream & dependent) if not isinstance(fields.get(v, "missing"), NonLocal)
                and fields.get(v, "missing") != "missing" and len(shapes.get(v) or ()) == 3]
    rng_key = [case.seed, case.index, 7] if rng_seed is None else rng_seed
    measured = {}
    if evidence:
        try:
            measured, notes = measure(model, to_measure + evidence, case.input_shape,
                                      np.random.default_rng(rng_key), trials)
            result.notes += notes
        except Exception as exc:
            result.notes.append(f"wrongly accepted values not measurable: {str(exc).splitlines()[0][:160]}")
    if to_measure and not measured:
        try:
            measured, notes = measure(model, to_measure, case.input_shape, np.random.default_rng(rng_key), trials)
            result.notes += notes
        except Exception as exc:
            result.error = f"ONNX Runtime: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            return result
    if measured:
        result.pixels = case.input_shape[1] * case.input_shape[2]
    for value, (changed, out_shape) in measured.items():
        info = fields[value]
        result.checked_values += 1
        shape = shapes[value]
        label = f"{value} (after refused {case.refused_layer})" if value in downstream else value
        if mutate is None and tuple(out_shape[2:]) != tuple(shape[1:]):
            result.shape_mismatches.append(f"{label}: ONNX Runtime {tuple(out_shape[2:])}, inferred {shape[1:]}")
            continue
        if info is None:
            if changed.any():
                result.violating_values.append(value)
                result.violations.append(f"{label}: pass says independent of the image, "
                                         f"{int(changed.sum())} measured dependences")
                result.violating_pairs += int(changed.sum())
            continue
        count, where = _box_violations(changed, info)
        if count:
            result.violating_values.append(value)
            result.violations.append(f"{label} {info}: {count} pairs outside; {where}")
            result.violating_pairs += count
    # a refusal for a reason that is only an upstream one: report the origin once
    if result.wrongly_refused:
        result.wrongly_refused = sorted({r.split(": ", 1)[1] for r in result.wrongly_refused})
    return result


def text(model: onnx.ModelProto) -> str:
    """The model as ONNX text; initializers of more than 8 elements elided (shape kept)."""
    m = copy.deepcopy(model)
    inits = []
    for t in m.graph.initializer:
        array = numpy_helper.to_array(t)
        if array.size <= 8:
            inits.append(helper.make_tensor(t.name, t.data_type, array.shape, array.ravel().tolist()))
        else:
            inits.append(helper.make_tensor(t.name, t.data_type, [0], []))  # "<...>": contents elided
            inits[-1].ClearField("dims")
            inits[-1].dims.extend(array.shape)
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    del m.graph.value_info[:]
    return onnx.printer.to_text(m.graph)


FIELDS = ("violations", "wrongly_refused", "wrongly_accepted", "bad_reasons", "shape_mismatches", "error")


def summarize(results: list[Result]) -> dict:
    accepted = [r for r in results if r.case.kind == "accept"]
    refused = [r for r in results if r.case.kind == "refuse"]
    return {
        "graphs": len(results),
        "accept_cases": len(accepted),
        "refuse_cases": len(refused),
        "accepted": sum(r.accepted for r in results),
        "allowed_refusals": sum(r.allowed_refusal for r in results),
        "refused": sum(not r.accepted for r in results),
        "pixels": sum(r.pixels for r in results),
        "checked_values": sum(r.checked_values for r in results),
        "violations": sum(bool(r.violations) for r in results),
        "violating_pairs": sum(r.violating_pairs for r in results),
        "wrongly_refused": sum(bool(r.wrongly_refused) for r in results),
        "wrongly_accepted": sum(bool(r.wrongly_accepted) for r in refused),
        "bad_reasons": sum(bool(r.bad_reasons) for r in results),
        "shape_mismatches": sum(bool(r.shape_mismatches) for r in results),
        "errors": sum(r.error is not None for r in results),
        "skipped": sum(r.skipped is not None for r in results),
    }


def summary_line(s: dict) -> str:
    return (f"graphs={s['graphs']} accepted={s['accepted']} refused={s['refused']} pixels={s['pixels']} "
            f"violations={s['violations']} (pairs={s['violating_pairs']}) "
            f"wrongly_refused={s['wrongly_refused']} wrongly_accepted={s['wrongly_accepted']} "
            f"bad_reasons={s['bad_reasons']} shape_mismatches={s['shape_mismatches']} errors={s['errors']}")


def _producer(model: onnx.ModelProto, value: str) -> str:
    for node in model.graph.node:
        if value in node.output:
            return node.op_type
    return "?"


def failure_key(result: Result, field: str) -> str:
    """What a failure is about: the op of the first violating value, the op named by a wrong
    refusal, the refused layer of a wrong acceptance."""
    if field == "violations":
        if result.shape_mismatches:  # ONNX Runtime ran other sizes than the pass was shown
            return "after an ONNX Runtime / inferred shape mismatch"
        return _producer(result.case.model, result.violating_values[0]) if result.violating_values else "?"
    if field == "wrongly_refused":
        return result.wrongly_refused[0].split(" ", 1)[0]
    if field in ("wrongly_accepted", "bad_reasons"):
        return str(result.case.refused_layer)
    if field == "shape_mismatches":
        return _producer(result.case.model, result.shape_mismatches[0].split(":")[0].split(" ")[0])
    return (result.error or "")[:60]


def failure_groups(results: list[Result]) -> dict[str, dict[str, list[Result]]]:
    groups: dict[str, dict[str, list[Result]]] = {}
    for field in FIELDS:
        for r in results:
            if getattr(r, field):
                groups.setdefault(field, {}).setdefault(failure_key(r, field), []).append(r)
    return groups


def failure_report(results: list[Result], limit: int = 1, shrink_with=None) -> str:
    """Per category and key: how many graphs, and the smallest (by node count; shrunk when
    `shrink_with` = dict(impl=..., mutate=...) is given) with its details and ONNX text."""
    lines = []
    for field, keyed in failure_groups(results).items():
        lines.append(f"{field}: {sum(len(v) for v in keyed.values())} graphs")
        for key, bad in sorted(keyed.items()):
            lines.append(f"  [{key}] {len(bad)} graphs")
            for r in sorted(bad, key=lambda r: (len(r.case.model.graph.node), r.case.index))[:limit]:
                if shrink_with is not None:
                    r = shrink(r, field, **shrink_with)
                detail = getattr(r, field)
                detail = detail if isinstance(detail, str) else "; ".join(detail[:2])
                lines.append(f"    {r.case.describe()}\n      {detail}")
                if shrink_with is not None:
                    lines.append("      " + text(r.case.model).replace("\n", "\n      "))
    return "\n".join(lines)


# --- shrinking a failure -------------------------------------------------------------------------------


def _rebuild(case: Case, nodes: list, output: str) -> Case | None:
    """The case with these nodes and this output (unused nodes and initializers dropped), or None
    if that is no valid model (or loses the refused layer)."""
    m = copy.deepcopy(case.model)
    del m.graph.node[:]
    m.graph.node.extend(copy.deepcopy(nodes))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(output, TensorProto.UNDEFINED, None))
    m = _prune(m, [output])
    used = {i for n in m.graph.node for i in n.input} | {
        i for n in m.graph.node for a in n.attribute
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs) for inner in g.node for i in inner.input}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    custom = {o for n in m.graph.node if n.domain not in ("", "ai.onnx") for o in n.output}
    vis = [vi for vi in m.graph.value_info if vi.name in custom]
    del m.graph.value_info[:]
    m.graph.value_info.extend(vis)
    names = {n.name for n in m.graph.node}
    if case.kind == "refuse" and not all(n in names for n, _ in case.refused_nodes):
        return None
    try:
        m = infer(m)
    except Exception:
        return None
    downstream = set()
    if case.refused_output:
        downstream = downstream_of(m, {case.refused_output}) | {
            o for nd in m.graph.node if nd.name in {n for n, _ in case.refused_nodes} for o in nd.output}
    layers = [f"{n.op_type}({n.name})" for n in m.graph.node]
    return dataclasses.replace(case, model=m, layers=["shrunk:"] + layers, downstream=downstream)


def _smaller(case: Case):
    nodes = list(case.model.graph.node)
    output = case.model.graph.output[0].name
    refused = {n for n, _ in case.refused_nodes}
    for node in nodes[:-1]:  # cut everything after a node
        yield _rebuild(case, nodes, node.output[0])
    dependent = _image_dependent(case.model)
    for k, node in enumerate(nodes):  # bypass a node: its uses read one of its image-dependent inputs
        if node.name in refused:
            continue
        for source in [i for i in node.input if i in dependent]:
            rewired = []
            for other in nodes[:k] + nodes[k + 1:]:
                other = copy.deepcopy(other)
                for j, name in enumerate(other.input):
                    if name == node.output[0]:
                        other.input[j] = source
                rewired.append(other)
            yield _rebuild(case, rewired, source if output == node.output[0] else output)


def shrink(result: Result, field: str, impl=None, mutate=None, budget: int = 60) -> Result:
    """Greedy: the smallest variant (cut or bypass nodes) that still fails in `field`."""
    current, tries = result, 0
    progress = True
    while progress and tries < budget:
        progress = False
        for candidate in _smaller(current.case):
            if candidate is None:
                continue
            tries += 1
            r = check(candidate, mutate, impl=impl)
            if getattr(r, field):
                current, progress = r, True
                break
            if tries >= budget:
                break
    return current
