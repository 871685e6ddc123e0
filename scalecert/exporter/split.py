"""Superficial-layer choice and the prefix/suffix graphs (onnx-ir passes).

prefix.onnx: image (N,C,H,W) -> features (N,C',H',W') gated, gate (N,H',W') uint8
suffix.onnx: features (N|1,C',H',W'), windows (B,4) int64 [y0,x0,y1,x1) -> logits (B,K)
The window masks are built inside the suffix from the rectangles.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..errors import ScaleCertError
from ..runtime import geometry
from .receptive import RF, NonLocal, depends_on_image_without, receptive_fields


@dataclass
class Layer:
    name: str  # ONNX tensor name
    scope: str  # torch module path of the producing node ("" at the root)
    index: int  # topological position (0 = the image)
    shape: tuple  # (C, H, W)
    rf: RF | NonLocal
    is_cut: bool  # every path from the image to the logits passes through it

    @property
    def usable(self) -> bool:
        return isinstance(self.rf, RF) and self.is_cut


def _scope(node: ir.Node | None) -> str:
    if node is None:
        return ""
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return ""
    try:
        parts = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return ""
    return parts[-2] if len(parts) >= 3 else ""  # scopes are nested full paths; the last is the op


def list_layers(model: ir.Model) -> list[Layer]:
    graph = model.graph
    rfs = receptive_fields(graph)
    logits = graph.outputs[0]
    layers = []
    values = [graph.inputs[0]] + [out for node in graph for out in node.outputs]
    for index, value in enumerate(values):
        rf = rfs.get(value)
        if rf is None or value.shape is None or len(value.shape) != 4:
            continue
        shape = tuple(list(value.shape)[1:])
        if not all(isinstance(d, int) for d in shape):
            continue
        is_cut = not depends_on_image_without(graph, value, logits)
        layers.append(Layer(value.name, _scope(value.producer()), index, shape, rf, is_cut))
    return layers


def _layer_ratio(layer: Layer, patch_hw, image_hw) -> float:
    """Window area over feature area, relative to patch area over image area."""
    win = geometry.window_size(patch_hw, image_hw, (layer.rf.y, layer.rf.x), layer.shape[1:])
    feature_frac = win[0] * win[1] / (layer.shape[1] * layer.shape[2])
    patch_frac = patch_hw[0] * patch_hw[1] / (image_hw[0] * image_hw[1])
    return feature_frac / patch_frac


def _not_a_feature_map(model: ir.Model, spec: str) -> str | None:
    """Why the tensor or module `spec`, absent from list_layers (not a 4-D map), cannot be the layer;
    None when the graph has no such tensor or module."""
    graph = model.graph
    values = [graph.inputs[0]] + [out for node in graph for out in node.outputs]
    named = [v for v in values if v.name == spec]
    named = named or [v for v in values if _scope(v.producer()) == spec or _scope(v.producer()).startswith(spec + ".")]
    if not named:
        return None
    rf = receptive_fields(graph).get(named[-1])
    if isinstance(rf, NonLocal):
        return rf.reason
    return f"{named[-1].name} is not a spatial (N, C, H, W) feature map of the image"


def choose_layer(layers: list[Layer], spec: str, patch_hw, image_hw, max_growth: float = 2.0,
                 model: ir.Model | None = None) -> Layer:
    """`auto`: the deepest usable layer whose window covers at most `max_growth` times the share of
    the feature map that the patch covers of the image. Deeper layers share more computation across
    windows (a cheaper suffix), but their footprints grow relative to the map, so each window hides
    more of the evidence and certified accuracy falls; the growth bound trades the two."""
    if spec == "auto":
        fits = [l for l in layers if l.usable and l.shape[1] > 1 and l.shape[2] > 1
                and _layer_ratio(l, patch_hw, image_hw) <= max_growth]
        return fits[-1] if fits else layers[0]
    by_name = [l for l in layers if l.name == spec]
    if not by_name:
        by_name = [l for l in layers if l.scope == spec or l.scope.startswith(spec + ".")]
        by_name = by_name[-1:]  # a module path means that module's output
    if not by_name:
        usable = [l.name for l in layers if l.usable]
        reason = _not_a_feature_map(model, spec) if model is not None else None
        if reason is not None:  # e.g. a pooled or flattened tensor, or the classifier head
            raise ScaleCertError(f"--layer {spec!r} is not local: {reason}; the certificate needs a local prefix "
                                 f"(local cut layers: {', '.join(usable[:30])})")
        raise ScaleCertError(f"--layer {spec!r}: no such tensor or module; local cut layers: {', '.join(usable[:30])}")
    layer = by_name[-1]
    if isinstance(layer.rf, NonLocal):
        raise ScaleCertError(f"--layer {spec!r} is not local: {layer.rf.reason}; the certificate needs a local prefix")
    if not layer.is_cut:
        raise ScaleCertError(f"--layer {spec!r} ({layer.name}) is not a cut point: another branch "
                             "bypasses it on the way to the logits; choose a block output")
    return layer


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _value(graph: ir.Graph, name: str) -> ir.Value:
    for value in [*graph.inputs, *(o for n in graph for o in n.outputs)]:
        if value.name == name:
            return value
    raise KeyError(name)


def _const(graph: ir.Graph, name: str, array) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
    value.shape = ir.Shape(np.asarray(array).shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(np.asarray(array).dtype))
    graph.register_initializer(value)
    return value


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def _finish(model: ir.Model) -> ir.Model:
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    RemoveUnusedNodesPass()(model)
    _drop_unused_initializers(model.graph)
    TopologicalSortPass()(model)
    return model


# --- dead-channel removal ----------------------------------------------------------------

_CHANNEL_TRANSPARENT = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Identity",
                        "LeakyRelu", "Elu", "Gelu", "Softplus", "Mish"}


def _producer_chain(graph: ir.Graph, feature: ir.Value) -> list[ir.Node] | str:
    """Nodes from a Conv to `feature` that are per-channel, so dropping output channels of the Conv
    drops exactly those channels of `feature`. A string says why not."""
    chain, value = [], feature
    while True:
        node = value.producer()
        if node is None:
            return "the layer is the image itself"
        if len(value.uses()) > 1 and value is not feature:
            return f"{value.name} has other consumers"
        chain.append(node)
        if node.op_type == "Conv":
            if node.inputs[1] is None or node.inputs[1].const_value is None:
                return "the producing Conv has no constant weights"
            group = node.attributes.get("group")
            if group is not None and group.as_int() != 1:
                return "the producing Conv is grouped"
            return chain[::-1]
        if node.op_type == "BatchNormalization" or node.op_type in _CHANNEL_TRANSPARENT:
            if any(v is not None and v.const_value is None for v in node.inputs[1:]):
                return f"{node.op_type} {node.name} has input-dependent parameters"
            value = node.inputs[0]
            continue
        return f"{node.op_type} {node.name} sits between the last Conv and the layer"


def _slice_const(graph: ir.Graph, value: ir.Value, keep: np.ndarray, axis: int) -> ir.Value:
    array = np.take(value.const_value.numpy(), keep, axis=axis)
    return _const(graph, f"{value.name}_kept", array)


def _remove_from_prefix(graph: ir.Graph, chain: list[ir.Node], keep: np.ndarray) -> None:
    for node in chain:
        if node.op_type == "Conv":
            node.replace_input_with(1, _slice_const(graph, node.inputs[1], keep, 0))
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                node.replace_input_with(2, _slice_const(graph, node.inputs[2], keep, 0))
        elif node.op_type == "BatchNormalization":
            for i in range(1, 5):
                node.replace_input_with(i, _slice_const(graph, node.inputs[i], keep, 0))
        for out in node.outputs:
            if out.shape is not None and len(out.shape) == 4:
                out.shape = ir.Shape([out.shape[0], len(keep), out.shape[2], out.shape[3]])


def _suffix_consumers_ok(feature: ir.Value) -> str | None:
    for node, _ in feature.uses():
        if node.op_type != "Conv" or node.inputs[0] is not feature:
            return f"{node.op_type} {node.name} consumes the layer (only Conv consumers can drop inputs)"
        group = node.attributes.get("group")
        if (group is not None and group.as_int() != 1) or node.inputs[1].const_value is None:
            return f"{node.name} is grouped or has non-constant weights"
    return None


def dead_channel_plan(model: ir.Model, layer: Layer, alpha: np.ndarray) -> tuple[bool, str]:
    """Can channels with alpha = 0 be removed from the graph (not just zeroed)?"""
    if (alpha > 0).all():
        return False, "no channel has zero importance"
    feature = _value(model.graph, layer.name)
    chain = _producer_chain(model.graph, feature)
    if isinstance(chain, str):
        return False, chain
    reason = _suffix_consumers_ok(feature)
    return (reason is None), (reason or "removed")


# --- prefix and suffix -------------------------------------------------------------------


def build_prefix(model: ir.Model, layer: Layer, alpha: np.ndarray, threshold: float, phi: str,
                 remove_dead: bool) -> ir.Model:
    prefix = _copy(model)
    graph = prefix.graph
    feature = _value(graph, layer.name)
    live = alpha > 0 if (alpha == 0).any() else np.ones_like(alpha, dtype=bool)
    if remove_dead and not live.all():
        _remove_from_prefix(graph, _producer_chain(graph, feature), np.flatnonzero(live))
        alpha = alpha[live]
    nodes = []

    def op(op_type, inputs, name, **attrs):
        node = ir.node(op_type, inputs, attributes=attrs or None, name=f"scalecert/{name}")
        node.outputs[0].name = name
        nodes.append(node)
        return node.outputs[0]

    if feature.producer() is None:  # identity prefix: the layer is the image
        feature = op("Identity", [feature], "superficial")
    magnitude = op("Abs" if phi == "abs" else "Relu", [feature], "sin_magnitude")
    alpha_v = _const(graph, "sin_alpha", alpha.astype(np.float32).reshape(1, -1, 1, 1))
    weighted = op("Mul", [magnitude, alpha_v], "sin_weighted")
    score = op("ReduceSum", [weighted, _const(graph, "sin_axes", np.array([1], np.int64))], "sin_score", keepdims=1)
    keep = op("Greater", [score, _const(graph, "sin_threshold", np.array(threshold, np.float32))], "sin_keep")
    if not remove_dead and not live.all():
        channel_live = _const(graph, "sin_live_channels", live.reshape(1, -1, 1, 1))
        keep_all = op("And", [keep, channel_live], "sin_keep_channels")
    else:
        keep_all = keep
    zero = _const(graph, "sin_zero", np.array(0.0, np.float32))
    gated = op("Where", [keep_all, feature, zero], "features")
    gate8 = op("Cast", [keep], "sin_keep_u8", to=ir.DataType.UINT8)
    gate = op("Squeeze", [gate8, _const(graph, "sin_channel_axis", np.array([1], np.int64))], "gate")
    graph.extend(nodes)
    gated.type, gated.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", len(alpha), *layer.shape[1:]])
    gate.type, gate.shape = ir.TensorType(ir.DataType.UINT8), ir.Shape(["batch", *layer.shape[1:]])
    graph.outputs.clear()
    graph.outputs.extend([gated, gate])
    return _finish(prefix)


def build_suffix(model: ir.Model, layer: Layer, channels: int) -> ir.Model:
    suffix = _copy(model)
    graph = suffix.graph
    feature = _value(graph, layer.name)
    fh, fw = layer.shape[1], layer.shape[2]
    features_in = ir.Value(name="features", shape=ir.Shape(["batch", channels, fh, fw]),
                           type=ir.TensorType(ir.DataType.FLOAT))
    windows_in = ir.Value(name="windows", shape=ir.Shape(["windows", 4]), type=ir.TensorType(ir.DataType.INT64))
    nodes = []

    def op(op_type, inputs, name, n_out=1, **attrs):
        node = ir.node(op_type, inputs, attributes=attrs or None, name=f"scalecert/{name}", num_outputs=n_out)
        for i, out in enumerate(node.outputs):
            out.name = name if n_out == 1 else f"{name}_{i}"
        nodes.append(node)
        return node.outputs[0] if n_out == 1 else node.outputs

    y0, x0, y1, x1 = op("Split", [windows_in], "window_bounds", n_out=4, axis=1, num_outputs=4)
    rows = _const(graph, "window_rows", np.arange(fh, dtype=np.int64).reshape(1, fh))
    cols = _const(graph, "window_cols", np.arange(fw, dtype=np.int64).reshape(1, fw))
    in_rows = op("And", [op("GreaterOrEqual", [rows, y0], "rows_from"), op("Less", [rows, y1], "rows_to")], "in_rows")
    in_cols = op("And", [op("GreaterOrEqual", [cols, x0], "cols_from"), op("Less", [cols, x1], "cols_to")], "in_cols")
    axes2 = _const(graph, "axes_2", np.array([2], np.int64))
    axes1 = _const(graph, "axes_1", np.array([1], np.int64))
    inside = op("And", [op("Unsqueeze", [in_rows, axes2], "in_rows_3d"),
                        op("Unsqueeze", [in_cols, axes1], "in_cols_3d")], "in_window")
    mask = op("Unsqueeze", [inside, axes1], "window_mask")
    zero = _const(graph, "mask_zero", np.array(0.0, np.float32))
    masked = op("Where", [mask, zero, features_in], "occluded_features")

    for node, index in list(feature.uses()):
        node.replace_input_with(index, masked)
    old_inputs = list(graph.inputs)
    graph.inputs.clear()
    graph.inputs.extend([features_in, windows_in])
    graph.extend(nodes)
    _finish(suffix)
    for old in old_inputs:
        if old.uses():
            raise ScaleCertError(f"layer {layer.name} does not separate the image from the logits")
    return suffix


def slice_suffix_inputs(suffix: ir.Model, keep: np.ndarray) -> None:
    """Drop the input channels of removed features from every Conv that reads them."""
    masked = _value(suffix.graph, "occluded_features")
    for node, _ in masked.uses():
        node.replace_input_with(1, _slice_const(suffix.graph, node.inputs[1], keep, 1))
    _drop_unused_initializers(suffix.graph)
