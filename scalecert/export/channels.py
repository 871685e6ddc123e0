"""Dead-channel removal: channels whose importance alpha is 0 are cut out of both graphs, not just
zeroed, when the producer chain and every consumer allow it (fewer parameters and MACs).

Two onnx-ir passes: RemoveDeadChannels on the prefix (the Conv [+BN/activation] chain that produces
the layer keeps only the live output channels) and SliceSuffixInputs on the suffix (every Conv that
reads the occluded features keeps only the live input channels).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from scalecert.export.layers import Layer
from scalecert.graph import add_constant, finish, value_named

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
    return add_constant(graph, f"{value.name}_kept", array)


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
    feature = value_named(model.graph, layer.name)
    chain = _producer_chain(model.graph, feature)
    if isinstance(chain, str):
        return False, chain
    reason = _suffix_consumers_ok(feature)
    return (reason is None), (reason or "removed")


class RemoveDeadChannels(ir.passes.InPlacePass):
    """Prefix: keep only the `keep` output channels of the chain that produces `layer`."""

    def __init__(self, layer: str, keep: np.ndarray):
        self.layer, self.keep = layer, keep

    def requires(self, model: ir.Model) -> None:
        chain = _producer_chain(model.graph, value_named(model.graph, self.layer))
        if isinstance(chain, str):
            raise ir.passes.PreconditionError(chain)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        _remove_from_prefix(graph, _producer_chain(graph, value_named(graph, self.layer)), self.keep)
        return finish()(model)


class SliceSuffixInputs(ir.passes.InPlacePass):
    """Suffix: drop the input channels of removed features from every Conv that reads them."""

    def __init__(self, keep: np.ndarray):
        self.keep = keep

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        masked = value_named(model.graph, "occluded_features")
        for node, _ in masked.uses():
            node.replace_input_with(1, _slice_const(model.graph, node.inputs[1], self.keep, 1))
        return finish()(model)
