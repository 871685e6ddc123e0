"""Precision variants of prefix.onnx and suffix.onnx, with the precision explicit in the graph
(docs/design.md §5: TensorRT 10/11 strongly typed networks, and the same file for ONNX Runtime).

FP16: Cast nodes around the float16 compute; graph inputs and outputs keep their names and types.
INT8: static QDQ from onnxruntime.quantization.quantize_static; every scale and zero point is
calibrated once and stored as an initializer.

Soundness (docs/design.md §3.7): the prefix must stay a per-position function with static parameters,
and the suffix's window masks must zero exactly the window. So the nodes split.py adds (named
"scalecert/...": the SIN gate in the prefix, the window masks in the suffix) stay float32 and
unquantized, and no scale is ever computed at run time: a dynamic quantisation scale is a
statistic of the whole tensor, which a patch could move at every position.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import numpy as np
import onnx
import onnx_ir as ir

from scalecert.graph import finish, run_passes

PROTECTED = "scalecert/"  # name prefix of the gate (prefix) and window-mask (suffix) nodes, see split.py
FLOAT, HALF = ir.DataType.FLOAT, ir.DataType.FLOAT16

# Computed in float16: convolutions, matmuls, activations and data movement, ops whose float
# inputs all share the output's type. Everything else (reductions such as ReduceMean and
# GlobalAveragePool, Softmax, normalisations, Exp, ...) stays float32, as do the protected nodes.
FP16_OPS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid",
    "HardSigmoid", "HardSwish", "Tanh", "Add", "Sub", "Mul", "Div", "Max", "Min", "MaxPool",
    "AveragePool", "Pad", "Slice", "Concat", "Split", "Reshape", "Flatten", "Transpose", "Squeeze",
    "Unsqueeze", "Identity", "Where",
}
# Given Q/DQ in the INT8 variant: compute and the data movement between it.
INT8_OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Relu", "Clip", "MaxPool", "AveragePool",
            "Pad", "Slice", "Concat", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"]
# Inputs that carry quantisation parameters, which must be constants.
QUANT_PARAMS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "QLinearConv": (1, 2, 4, 5, 6, 7),
                "QLinearMatMul": (1, 2, 4, 5, 6, 7), "ConvInteger": (2, 3), "MatMulInteger": (2, 3)}


def _load_typed(path: str) -> ir.Model:
    """The model with every value's type and shape inferred (strict: a failure raises)."""
    return ir.from_proto(onnx.shape_inference.infer_shapes(onnx.load(path), strict_mode=True, data_prop=True))


def _dtype(value: ir.Value | None):
    return None if value is None or value.type is None else value.dtype


def _io_signature(path: str) -> list[tuple[str, str, int]]:
    graph = onnx.load(path, load_external_data=False).graph
    return ([("input", v.name, v.type.tensor_type.elem_type) for v in graph.input]
            + [("output", v.name, v.type.tensor_type.elem_type) for v in graph.output])


def _check_same_io(src_path: str, dst_path: str) -> None:
    before, after = _io_signature(src_path), _io_signature(dst_path)
    if before != after:
        raise RuntimeError(f"{dst_path}: graph inputs/outputs changed: {before} -> {after}")


def _check_kind(kind: str) -> None:
    if kind not in ("prefix", "suffix"):
        raise ValueError(f"kind must be prefix or suffix, not {kind!r}")


# --- FP16 ----------------------------------------------------------------------------------


def _cast(graph: ir.Graph, value: ir.Value, to: ir.DataType, name: str) -> ir.Value:
    node = ir.node("Cast", [value], attributes={"to": to}, name=f"{name}/Cast")
    out = node.outputs[0]
    out.name, out.type, out.shape = name, ir.TensorType(to), value.shape
    graph.append(node)
    return out


class Float16Compute(ir.passes.InPlacePass):
    """FP16_OPS outside the protected nodes compute in float16 between explicit Casts; everything
    else stays float32; graph inputs and outputs keep their names and float32 types."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        half_nodes = {n for n in graph if n.op_type in FP16_OPS and n.domain in ("", "ai.onnx")
                      and not (n.name or "").startswith(PROTECTED)
                      and any(_dtype(v) == FLOAT for v in [*n.inputs, *n.outputs])}
        halves: dict[ir.Value, ir.Value] = {}  # float32 value -> its float16 version
        floats: dict[ir.Value, ir.Value] = {}  # float16 value -> its float32 cast

        def as_half(value: ir.Value) -> ir.Value:
            if value not in halves:
                if value.const_value is not None and value.is_initializer() and not value.is_graph_input():
                    name = f"{value.name}_fp16"
                    array = value.const_value.numpy().astype(np.float16)
                    halves[value] = ir.Value(name=name, const_value=ir.tensor(array, name=name),
                                             type=ir.TensorType(HALF), shape=ir.Shape(array.shape))
                    graph.register_initializer(halves[value])
                else:
                    halves[value] = _cast(graph, value, HALF, f"{value.name}_fp16")
            return halves[value]

        def as_float(value: ir.Value) -> ir.Value:
            if value not in floats:
                floats[value] = _cast(graph, value, FLOAT, f"{value.name}_fp32")
            return floats[value]

        half_values = {out for n in half_nodes for out in n.outputs if _dtype(out) == FLOAT}
        for value in half_values:
            value.type = ir.TensorType(HALF)
        for node in list(graph):
            for index, value in enumerate(node.inputs):
                if node in half_nodes and _dtype(value) == FLOAT:  # float32 input of float16 compute
                    node.replace_input_with(index, as_half(value))
                elif node not in half_nodes and value in half_values:  # float16 input of float32 compute
                    node.replace_input_with(index, as_float(value))
        for index, out in enumerate(list(graph.outputs)):  # outputs keep their names and float32
            if out in half_values:
                name, out.name = out.name, f"{out.name}_fp16"
                graph.outputs[index] = as_float(out)
                graph.outputs[index].name = name
        self.half_nodes = half_nodes
        self.casts_added = sum(1 for v in [*halves.values(), *floats.values()] if not v.is_initializer())
        return ir.passes.PassResult(model, modified=bool(half_nodes))


def to_fp16(src_path: str, dst_path: str, kind: str) -> dict:
    """FP16 variant with explicit casts (Float16Compute), written to dst_path."""
    _check_kind(kind)
    model = _load_typed(src_path)
    half = Float16Compute()
    run_passes(model, half, finish())
    ir.save(model, dst_path)
    _check_same_io(src_path, dst_path)
    kept = sorted({n.op_type for n in model.graph if n not in half.half_nodes and n.op_type != "Cast"
                   and any(_dtype(v) == FLOAT for v in [*n.inputs, *n.outputs])})
    return {"method": "explicit Cast nodes (float16 compute, float32 I/O)", "kind": kind,
            "nodes_fp16": len(half.half_nodes), "kept_fp32": kept, "casts_added": half.casts_added}


# --- INT8 ----------------------------------------------------------------------------------


class _Feeds:
    """onnxruntime.quantization.CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


@contextlib.contextmanager
def _without_preprocess_advice():
    """quantize_static logs advice to run quant_pre_process; we infer shapes ourselves instead
    (quant_pre_process fails symbolic shape inference on the suffix and adds ORT-only opsets)."""
    quiet = logging.Filter()
    quiet.filter = lambda record: "pre-process" not in record.getMessage()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def _copy_const(graph: ir.Graph, value: ir.Value, name: str) -> ir.Value:
    copy = ir.Value(name=name, const_value=ir.tensor(value.const_value.numpy(), name=name),
                    type=value.type, shape=value.shape)
    graph.register_initializer(copy)
    return copy


class OneQdqPairPerConsumer(ir.passes.InPlacePass):
    """Give every consumer of a quantized activation its own QuantizeLinear -> DequantizeLinear
    pair, with its own copies of the scale and zero point (same values, same arithmetic).

    Why: on x86, ONNX Runtime runs int8 QDQ fast only after its pass that rewrites an int8 Q/DQ
    pair as uint8 (zero point + 128) for its u8s8 kernels; that pass needs a Q with one consumer,
    and ONNX Runtime merges identical Q nodes back together unless their inputs differ. Without
    this, every tensor that fans out (each residual block input) keeps float Conv/Add and the
    int8 suffix is slower than float32. `added` counts the pairs."""

    added = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.added = _one_qdq_pair_per_consumer(model)
        return ir.passes.PassResult(model, modified=self.added > 0)


def _one_qdq_pair_per_consumer(model: ir.Model) -> int:
    graph, added = model.graph, 0
    for q in [n for n in graph if n.op_type == "QuantizeLinear" and n.inputs[0].const_value is None]:
        uses = [(dq, node, index) for dq, _ in q.outputs[0].uses() if dq.op_type == "DequantizeLinear"
                for node, index in dq.outputs[0].uses()]
        for k, (dq, node, index) in enumerate(uses[1:], 1):
            tag = f"{q.outputs[0].name}_pair{k}"
            scale = _copy_const(graph, q.inputs[1], f"{tag}_scale")
            has_zero = len(q.inputs) > 2 and q.inputs[2] is not None
            zero = _copy_const(graph, q.inputs[2], f"{tag}_zero_point") if has_zero else None
            new_q = ir.Node("", "QuantizeLinear", [q.inputs[0], scale, zero], q.attributes.values(), name=f"{tag}/Q")
            new_dq = ir.Node("", "DequantizeLinear", [new_q.outputs[0], scale, zero], dq.attributes.values(),
                             name=f"{tag}/DQ")
            for new, old in ((new_q, q), (new_dq, dq)):
                new.outputs[0].name = f"{new.name}_out"
                new.outputs[0].type, new.outputs[0].shape = old.outputs[0].type, old.outputs[0].shape
            graph.extend([new_q, new_dq])
            node.replace_input_with(index, new_dq.outputs[0])
            added += 1
    return added


def conv_input_means(src_path: str, feeds: list[dict[str, np.ndarray]], limit: int = 8) -> dict[str, np.ndarray]:
    """Per-channel mean of every convolution's input in the float model over calibration feeds,
    keyed by the convolution's node name."""
    import onnxruntime

    model = onnx.load(src_path)
    convs = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[2]]
    wanted = list(dict.fromkeys(n.input[0] for n in convs))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in wanted if name not in known)
    from scalecert.runtime.pipelines.onnxruntime import default_threads

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = default_threads()  # build --threads
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    used = feeds[:limit]
    for feed in used:
        for name, out in zip(wanted, session.run(wanted, feed)):
            mean = out.astype(np.float64).mean(axis=tuple(i for i in range(out.ndim) if i != 1))
            sums[name] = sums.get(name, 0) + mean
    return {n.name: sums[n.input[0]] / len(used) for n in convs}


class BiasCorrection(ir.passes.InPlacePass):
    """Empirical bias correction (Nagel et al., ICCV 2019): a rounded weight W_q = W + dW shifts a
    convolution's output by dW . E[x] per output channel on average; subtracting that from the
    float bias removes the systematic part of the weight-rounding error, which in depthwise
    networks (EfficientNet-Lite, MobileNet) adds up layer after layer. The correction is a constant
    per channel, so the variant stays a static, per-position function (§3.7)."""

    def __init__(self, float_weights: dict[str, np.ndarray], input_means: dict[str, np.ndarray]):
        super().__init__()
        self.float_weights, self.input_means = float_weights, input_means
        self.corrected = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in model.graph:
            if node.op_type != "Conv" or node.name not in self.input_means or len(node.inputs) < 3:
                continue
            weight, bias = node.inputs[1], node.inputs[2]
            dq = weight.producer() if weight is not None else None
            if dq is None or dq.op_type != "DequantizeLinear" or bias is None or bias.const_value is None:
                continue
            q, scale = dq.inputs[0].const_value, dq.inputs[1].const_value
            zero = dq.inputs[2].const_value if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
            if q is None or scale is None:
                continue
            q = q.numpy().astype(np.float64)
            shape = (-1,) + (1,) * (q.ndim - 1)
            z = zero.numpy().astype(np.float64).reshape(shape) if zero is not None else 0.0
            rounded = (q - z) * scale.numpy().astype(np.float64).reshape(shape)
            delta = rounded - self.float_weights[node.name].astype(np.float64)  # (O, I/group, kh, kw)
            mean = self.input_means[node.name]
            group = node.attributes.get("group")
            groups = group.as_int() if group is not None else 1
            per_group_in = delta.shape[1]
            out_per_group = delta.shape[0] // groups
            channel_means = np.stack([mean[(o // out_per_group) * per_group_in:(o // out_per_group + 1) * per_group_in]
                                      for o in range(delta.shape[0])])  # (O, I/group)
            shift = (delta.sum(axis=(2, 3)) * channel_means).sum(axis=1) if delta.ndim == 4 else \
                (delta.reshape(delta.shape[0], per_group_in, -1).sum(axis=2) * channel_means).sum(axis=1)
            corrected = (bias.const_value.numpy().astype(np.float64) - shift).astype(np.float32)
            bias.const_value = ir.tensor(corrected, name=bias.name)
            self.corrected += 1
        return ir.passes.PassResult(model, modified=self.corrected > 0)


class FullRangeDepthwiseWeights(ir.passes.InPlacePass):
    """Requantize every depthwise convolution's weights on the full symmetric int8 range
    [-127, 127], per output channel, from the float weights; other convolutions keep the 7-bit range.

    Why: a depthwise channel has 9-25 weights, so its rounding error does not average out, and
    EfficientNet-Lite loses much of its int8 agreement there on 7 bits. The 7-bit range exists for
    ONNX Runtime's x86 u8s8 GEMM kernels without VNNI, whose int16 pair sums saturate on 8-bit
    weights; its depthwise kernel widens to int32 before multiplying and does not saturate
    (`benchmarks/int8_choices.py --reference` agrees with the fused kernels)."""

    def __init__(self, float_weights: dict[str, np.ndarray]):
        super().__init__()
        self.float_weights = float_weights
        self.widened = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in model.graph:
            if not _is_depthwise(node) or node.name not in self.float_weights or node.inputs[1] is None:
                continue
            dq = node.inputs[1].producer()
            if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
                continue
            weights = self.float_weights[node.name].astype(np.float64)
            peak = np.abs(weights.reshape(len(weights), -1)).max(axis=1)
            scale = np.where(peak > 0, peak, 1.0) / 127.0
            codes = np.clip(np.rint(weights / scale.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
            dq.inputs[0].const_value = ir.tensor(codes, name=dq.inputs[0].name)
            dq.inputs[1].const_value = ir.tensor(scale.astype(np.float32), name=dq.inputs[1].name)
            self.widened += 1
        return ir.passes.PassResult(model, modified=self.widened > 0)


def _conv_weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {n.name: n.inputs[1].const_value.numpy() for n in model.graph
            if n.op_type == "Conv" and n.inputs[1] is not None and n.inputs[1].const_value is not None}


def _is_depthwise(node: ir.Node) -> bool:
    group = node.attributes.get("group")
    return node.op_type == "Conv" and group is not None and group.as_int() > 1


def _is_first_conv(node: ir.Node) -> bool:
    graph = node.graph
    return node.op_type == "Conv" and graph is not None and node is next(n for n in graph if n.op_type == "Conv")


def _is_high_resolution_conv(node: ir.Node) -> bool:
    """A convolution whose output keeps at least half the width of the graph's input."""
    if node.op_type != "Conv" or node.graph is None:
        return False
    width_in, width_out = node.graph.inputs[0].shape[-1], node.outputs[0].shape[-1]
    return isinstance(width_in, int) and isinstance(width_out, int) and width_out * 2 >= width_in


KEEP_FLOAT = {"none": lambda node: False, "depthwise": _is_depthwise, "first": _is_first_conv,
              "high_resolution": _is_high_resolution_conv}
# What `scalecert build` keeps in float, tried in this order (fastest first) until the variant meets
# the floor on held-back images (compile/build.py): nothing; the first convolution, which reads the
# input (for a cut at the image, the normalised image, which one per-tensor uint8 scale resolves
# coarsely); every convolution at half the input's width or more (a mobile network's stem and first
# blocks, the layers most sensitive to quantisation). Measured in benchmarks/RESULTS.md.
INT8_FLOAT_STEPS = ("none", "first", "high_resolution")


def to_int8(src_path: str, dst_path: str, kind: str, calibration_feeds: list[dict[str, np.ndarray]],
            activations: str = "int8", keep_float: str = "none", reduce_range: bool = True,
            bias_correction: bool = True, full_range_depthwise: bool = False) -> dict:
    """Static QDQ INT8 variant calibrated once on `calibration_feeds` (MinMax ranges).

    activations="int8" (default): symmetric int8 activations and per-channel symmetric int8
    weights, float32 bias; zero points are all 0 and no int32 tensor appears, which is what
    TensorRT's explicit quantisation accepts, and with one_qdq_pair_per_consumer ONNX Runtime
    CPU runs it with its fused u8s8 kernels. activations="uint8": asymmetric uint8 activations
    (ONNX Runtime then also drops the Relus into the quantisation range), faster and slightly
    more accurate on ONNX Runtime x86, but TensorRT rejects it. `reduce_range`: weights on 7 bits
    (x86 without VNNI); with `full_range_depthwise` the depthwise convolutions still get 8 bits
    (FullRangeDepthwiseWeights). `keep_float`: a KEEP_FLOAT rule for convolutions left in float.

    Not quantized: the protected gate/mask nodes, and the nodes that produce graph outputs
    (int8 logits would tie)."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    _check_kind(kind)
    if activations not in ("int8", "uint8"):
        raise ValueError(f"activations must be int8 or uint8, not {activations!r}")
    if not calibration_feeds:
        raise ValueError("INT8 needs calibration inputs")
    symmetric = activations == "int8"
    model = _load_typed(src_path)
    graph = model.graph
    if keep_float not in KEEP_FLOAT:
        raise ValueError(f"keep_float must be one of {', '.join(KEEP_FLOAT)}, not {keep_float!r}")
    excluded = [n.name for n in graph if (n.name or "").startswith(PROTECTED)
                or any(out.is_graph_output() for out in n.outputs) or KEEP_FLOAT[keep_float](n)]
    with tempfile.TemporaryDirectory() as tmp, _without_preprocess_advice():
        typed = os.path.join(tmp, "typed.onnx")
        ir.save(model, typed)
        quantize_static(
            typed, dst_path, _Feeds(calibration_feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=INT8_OPS, per_channel=True, reduce_range=reduce_range,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": False})
    quantized = ir.load(dst_path)
    float_weights = _conv_weights(model)
    widening = FullRangeDepthwiseWeights(float_weights) if full_range_depthwise and reduce_range else None
    pairing = OneQdqPairPerConsumer()
    correction = BiasCorrection(float_weights, conv_input_means(src_path, calibration_feeds)) \
        if bias_correction else None
    run_passes(quantized, *([widening] if widening else []), *([correction] if correction else []),
               *([pairing] if symmetric else []), finish())
    ir.save(quantized, dst_path)
    pairs = pairing.added
    _check_same_io(src_path, dst_path)
    dq_outputs = {n.outputs[0] for n in quantized.graph if n.op_type == "DequantizeLinear"}
    computed = [n for n in quantized.graph if n.op_type != "QuantizeLinear" and dq_outputs & set(n.inputs)]
    return {"method": "static QDQ (onnxruntime.quantization.quantize_static)", "kind": kind,
            "onnxruntime": onnxruntime.__version__,
            "activation_type": "int8 symmetric" if symmetric else "uint8 asymmetric",
            "weight_type": "int8 symmetric per-channel" + (", 7-bit range" if reduce_range else "")
            + (f", full range for {widening.widened} depthwise convolutions" if widening else ""),
            "bias": "float32", "tensorrt": symmetric,
            "calibration_method": "MinMax", "calibration_inputs": len(calibration_feeds),
            "nodes_quantized": len(computed), "nodes_excluded": excluded, "float_kept": keep_float,
            "qdq_pairs_split": pairs, "bias_corrected_convs": correction.corrected if correction else 0}


# --- checks --------------------------------------------------------------------------------


def check_static_precision(path: str) -> list[str]:
    """Why this variant could be unsound or not strongly typed; an empty list when it is fine:
    dynamic quantisation, quantisation parameters that are not constants, values whose element
    type cannot be inferred, or a graph that fails strict type inference."""
    problems = []
    proto = onnx.load(path)
    graph = proto.graph
    constants = {i.name for i in graph.initializer} - {i.name for i in graph.input}  # inputs can override
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        label = f"{node.op_type} {node.name or '(unnamed)'}"
        if "Dynamic" in node.op_type:
            problems.append(f"{label}: dynamic quantisation computes its scale at run time")
        for index in QUANT_PARAMS.get(node.op_type, ()):
            name = node.input[index] if index < len(node.input) else ""
            if name and name not in constants:
                problems.append(f"{label}: quantisation parameter {name!r} is not a constant initializer")
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - any inference failure is the finding
        return problems + [f"strict type inference fails: {str(exc).splitlines()[0][:200]}"]
    typed = {v.name for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]
             if v.type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED}
    typed |= {i.name for i in inferred.graph.initializer}
    for node in inferred.graph.node:
        problems += [f"{node.op_type} {node.name}: output {o!r} has no inferred element type"
                     for o in node.output if o and o not in typed]
    return problems
