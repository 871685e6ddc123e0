"""Static check of an ONNX graph against what TensorRT's ONNX parser documents as supported.

The table (scalecert/resources/trt_supported_ops.json) is transcribed from onnx-tensorrt's
docs/operators.md for TensorRT 10.x: per operator, whether it is supported, the data types it
takes and its restrictions, plus scalecert's machine-checkable reading of those restrictions
("rules"). check_onnx() runs without TensorRT, so CI can tell that an exported graph will parse
before anyone reaches a GPU.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from scalecert.errors import ScaleCertError

TABLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources", "trt_supported_ops.json")

_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE", TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4",
    TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL",
}
if hasattr(TensorProto, "FLOAT4E2M1"):
    _TYPE_NAMES[TensorProto.FLOAT4E2M1] = "FP4"

# Which inputs the document's "Supported Types" column is about (default: every input). The
# others are shape/axis/index/scale operands whose types the ONNX spec fixes (mostly INT64).
_DATA0 = ("Squeeze", "Unsqueeze", "Reshape", "Expand", "Tile", "Split", "Slice", "CumSum", "TopK",
          "Resize", "Upsample", "Gather", "GatherElements", "GatherND", "QuantizeLinear",
          "DequantizeLinear", "Dropout", "Trilu", "Shape", "Size", "ReverseSequence", "Cast",
          "CastLike", "EyeLike", "ArgMax", "ArgMin", "NonZero", "Hardmax", "Softmax", "LogSoftmax",
          "DepthToSpace", "SpaceToDepth", "Flatten", "Transpose", "Identity", "STFT", "DFT")
TYPED_INPUTS = {
    **dict.fromkeys(_DATA0, (0,)),
    "Pad": (0, 2), "Scatter": (0, 2), "ScatterElements": (0, 2), "ScatterND": (0, 2),
    "Where": (1, 2), "OneHot": (2,), "Constant": (), "ConstantOfShape": (), "If": (), "Loop": (),
    "Scan": (), "RoiAlign": (0, 1), "NonMaxSuppression": (0, 1), "GridSample": (0, 1),
    "LSTM": (0, 1, 2, 3, 5, 6), "GRU": (0, 1, 2, 3, 5), "RNN": (0, 1, 2, 3, 5),
}
OUTPUT_TYPED = ("Cast", "CastLike", "Constant", "ConstantOfShape")  # the op makes a new type


@functools.lru_cache(maxsize=1)
def table() -> dict:
    with open(TABLE) as f:
        return json.load(f)


def _type_name(elem_type: int) -> str:
    return _TYPE_NAMES.get(elem_type) or TensorProto.DataType.Name(elem_type)


def _walk(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _walk(sub)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _graphs(sub)


class _Facts:
    """Element types, ranks and constant values of every named tensor in a model."""

    def __init__(self, model: onnx.ModelProto):
        self.types, self.ranks, self.consts, self.graph_inputs, self.used = {}, {}, {}, set(), set()
        for graph in _graphs(model.graph):
            for vi in [*graph.input, *graph.output, *graph.value_info]:
                tt = vi.type.tensor_type
                if tt.elem_type:
                    self.types[vi.name] = tt.elem_type
                if tt.HasField("shape"):
                    self.ranks[vi.name] = len(tt.shape.dim)
            for init in graph.initializer:
                self.types[init.name] = init.data_type
                self.ranks[init.name] = len(init.dims)
                self.consts[init.name] = init
            self.graph_inputs |= {i.name for i in graph.input} - {i.name for i in graph.initializer}
            self.used |= {o.name for o in graph.output}
            for node in graph.node:
                self.used |= set(node.input)
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    for attr in node.attribute:
                        if attr.name == "value":
                            self.types[node.output[0]] = attr.t.data_type
                            self.consts[node.output[0]] = attr.t
                        elif attr.name in ("value_int", "value_ints"):
                            self.types[node.output[0]] = TensorProto.INT64
                            self.consts[node.output[0]] = np.array(onnx.helper.get_attribute_value(attr), np.int64)
                        elif attr.name in ("value_float", "value_floats"):
                            self.types[node.output[0]] = TensorProto.FLOAT
                            self.consts[node.output[0]] = np.array(onnx.helper.get_attribute_value(attr), np.float32)

    def const(self, name: str):
        value = self.consts.get(name)
        return numpy_helper.to_array(value) if isinstance(value, TensorProto) else value


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _node_problems(node: onnx.NodeProto, spec: dict, facts: _Facts) -> list[str]:
    problems = []
    rules = spec.get("rules", {})
    allowed = spec["types"]
    typed = TYPED_INPUTS.get(node.op_type, range(len(node.input)))
    for i in typed:
        if i < len(node.input) and node.input[i] and node.input[i] in facts.types:
            name = _type_name(facts.types[node.input[i]])
            if name not in allowed:
                problems.append(f"input {i} is {name} (supported: {', '.join(allowed)})")
    if node.op_type == "Where" and node.input and facts.types.get(node.input[0], TensorProto.BOOL) != TensorProto.BOOL:
        problems.append("condition is not BOOL")
    if node.op_type in OUTPUT_TYPED:
        to = _attr(node, "to", None) if node.op_type == "Cast" else None
        elem = to if to is not None else facts.types.get(node.output[0])
        if node.op_type == "CastLike" and len(node.input) > 1:
            elem = facts.types.get(node.input[1])
        if elem is not None and _type_name(elem) not in allowed:
            problems.append(f"output is {_type_name(elem)} (supported: {', '.join(allowed)})")
    for name in rules.get("forbidden_attributes", []):
        if _attr(node, name, None) is not None:
            problems.append(f"attribute {name} is unsupported")
    for name, rule in rules.get("attributes", {}).items():
        value = _attr(node, name, rule.get("default"))
        if rule.get("all_ones") and value is not None and any(v != 1 for v in value):
            problems.append(f"{name}={list(value)} (must be empty or all ones)")
        if "allowed" in rule and value not in rule["allowed"]:
            problems.append(f"{name}={value!r} (supported: {', '.join(map(str, rule['allowed']))})")
    for i in rules.get("constant_inputs", []):
        if i < len(node.input) and node.input[i] and node.input[i] not in facts.consts:
            problems.append(f"input {i} ({node.input[i]}) must be a build-time constant (an initializer)")
    for i in rules.get("zero_inputs", []):
        if i < len(node.input) and node.input[i]:
            value = facts.const(node.input[i])
            if value is not None and np.any(value != 0):
                problems.append(f"input {i} ({node.input[i]}) must be zero")
    for i, limit in rules.get("max_value_inputs", {}).items():
        i = int(i)
        value = facts.const(node.input[i]) if i < len(node.input) and node.input[i] else None
        if value is not None and np.max(value) > limit:
            problems.append(f"input {i} ({node.input[i]}) must be at most {limit}")
    if "input_rank" in rules and node.input and node.input[0] in facts.ranks:
        if facts.ranks[node.input[0]] not in rules["input_rank"]:
            problems.append(f"input rank {facts.ranks[node.input[0]]} (supported: {rules['input_rank']})")
    for i in rules.get("unsupported_outputs", []):
        if i < len(node.output) and node.output[i] and node.output[i] in facts.used:
            problems.append(f"output {i} ({node.output[i]}) is unsupported")
    return problems


def check_onnx(model) -> list[str]:
    """Problems TensorRT's ONNX parser would have with this model (a path or a ModelProto), one
    line each, per the documented operator support; empty when every node is within it."""
    if isinstance(model, onnx.ModelProto):
        label = model.graph.name or "<model>"
    else:
        label = os.fspath(model)
        try:
            model = onnx.load(label)
        except Exception as exc:  # noqa: BLE001
            raise ScaleCertError(f"{label}: not a readable ONNX model ({str(exc).splitlines()[0][:120]})") from None
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types from the file's own annotations then
        pass
    doc = table()
    low, high = doc["opsets"]
    problems = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not low <= opset.version <= high:
            problems.append(f"{label}: ONNX opset {opset.version} is outside TensorRT's parser range {low}-{high}")
    facts = _Facts(model)
    for index, node in enumerate(_walk(model.graph)):
        where = f"{label}: {node.op_type} node {node.name or f'#{index}'}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain {node.domain!r} is not standard ONNX (TensorRT would need a plugin)")
            continue
        spec = doc["operators"].get(node.op_type)
        if spec is None or not spec["supported"]:
            problems.append(f"{where}: operator not supported by TensorRT's ONNX parser")
            continue
        problems += [f"{where}: {p}" for p in _node_problems(node, spec, facts)]
    return problems
