"""Cut points of the model graph and the choice of the superficial layer.

A usable layer is local (its receptive field is a box, docs/design.md §3.1) and a cut point (every
path from the image to the logits passes through it, so the suffix sees nothing else).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

import onnx_ir as ir

from scalecert.core import geometry
from scalecert.errors import ModelError
from scalecert.export.receptive import RF, NonLocal, depends_on_image_without, receptive_fields


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


PATCH_EMBEDDING_SHARE = 0.25  # the most of its token map one window of a patch embedding may cover


def patch_embedding(layer: Layer) -> bool:
    """A non-overlapping patch embedding (a ViT's stride-s, s x s convolution on the image): each
    position sees exactly its own s x s pixels."""
    rf = layer.rf
    return isinstance(rf, RF) and rf.y[0] > 1 and rf.x[0] > 1 and rf.size() == (rf.y[0], rf.x[0])


def cuttable(layer: Layer) -> bool:
    """Usable, and a map of more than one row and column."""
    return layer.usable and layer.shape[1] >= 2 and layer.shape[2] >= 2


def admitted(layer: Layer, patch_hw, image_hw, max_growth: float) -> bool:
    """A layer the plan may cut at: cuttable, and a window
    covering at most `max_growth` times the share of the map that the patch covers of the image.
    A patch embedding is admitted by a share instead (its window at most PATCH_EMBEDDING_SHARE of
    the token map): its footprint outgrows the patch only by rounding to the model's own tokens (a
    32-pixel patch touches 3 of 16-pixel tokens), not by a receptive field spreading, so no layer of
    the model, the image's pixel windows at the same budget included, hides less per window."""
    if not cuttable(layer):
        return False
    if patch_embedding(layer):
        win = geometry.window_size(patch_hw, image_hw, (layer.rf.y, layer.rf.x), layer.shape[1:])
        return win[0] * win[1] <= PATCH_EMBEDDING_SHARE * layer.shape[1] * layer.shape[2]
    return _layer_ratio(layer, patch_hw, image_hw) <= max_growth


def choose_layer(layers: list[Layer], spec: str, patch_hw, image_hw, max_growth: float = 2.0,
                 model: ir.Model | None = None) -> Layer:
    """`auto`: the deepest usable layer whose window covers at most `max_growth` times the share of
    the feature map that the patch covers of the image. Deeper layers share more computation across
    windows (a cheaper suffix), but their footprints grow relative to the map, so each window hides
    more of the evidence and certified accuracy falls; the growth bound trades the two."""
    if spec == "auto":
        fits = [l for l in layers if admitted(l, patch_hw, image_hw, max_growth)]
        return fits[-1] if fits else layers[0]
    by_name = [l for l in layers if l.name == spec]
    if not by_name:
        by_name = [l for l in layers if l.scope == spec or l.scope.startswith(spec + ".")]
        by_name = by_name[-1:]  # a module path means that module's output
    if not by_name:
        usable = [l.name for l in layers if l.usable]
        reason = _not_a_feature_map(model, spec) if model is not None else None
        if reason is not None:  # e.g. a pooled or flattened tensor, or the classifier head
            raise ModelError(f"--layer {spec!r} is not local: {reason}; the certificate needs a local prefix "
                                 f"(local cut layers: {', '.join(usable[:30])})")
        raise ModelError(f"--layer {spec!r}: no such tensor or module; local cut layers: {', '.join(usable[:30])}")
    layer = by_name[-1]
    if isinstance(layer.rf, NonLocal):
        raise ModelError(f"--layer {spec!r} is not local: {layer.rf.reason}; the certificate needs a local prefix")
    if not layer.is_cut:
        raise ModelError(f"--layer {spec!r} ({layer.name}) is not a cut point: another branch "
                             "bypasses it on the way to the logits; choose a block output")
    return layer


