"""The prefix and suffix graphs, as onnx-ir passes over a clone of the whole model.

prefix.onnx: image (N,C,H,W) -> features (N,C',H',W') gated, gate (N,H',W') uint8
suffix.onnx: features (N|1,C',H',W'), windows (B,4R) int64 -> logits (B,K): each row holds R >= 1
rectangles [y0,x0,y1,x1) (R is the same for the whole batch) and occludes their union (zeros, or
the bundle's constant fill: the layer's features of a blank image), so a row of one rectangle is a
window (detection) and a row of two is a pair (recovery, docs/design.md §10)

The gate is per position with static alpha and tau (docs/design.md §3.3); the window masks are
built inside the suffix from the rectangles and occlude exactly the window (§3.4). Nodes added here
are named "scalecert/...": compile/precision.py never converts them.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from scalecert.errors import ScaleCertError
from scalecert.export.channels import RemoveDeadChannels, SliceSuffixInputs
from scalecert.export.layers import Layer
from scalecert.export.receptive import BATCH, image_batch, image_dependent, shape_read
from scalecert.graph import add_constant, finish, run_passes, value_named


class GatePrefix(ir.passes.InPlacePass):
    """Cut the model at `layer` and gate it: S = A where sum_c alpha_c phi(A_c) > tau (and the
    channel is live, when dead channels are zeroed rather than removed), else 0."""

    def __init__(self, layer: Layer, alpha: np.ndarray, threshold: float, phi: str, live_channels=None):
        self.layer, self.alpha, self.threshold, self.phi = layer, alpha, threshold, phi
        self.live_channels = live_channels

    def requires(self, model: ir.Model) -> None:
        value_named(model.graph, self.layer.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        feature = value_named(graph, self.layer.name)
        nodes = []

        def op(op_type, inputs, name, **attrs):
            node = ir.node(op_type, inputs, attributes=attrs or None, name=f"scalecert/{name}")
            node.outputs[0].name = name
            nodes.append(node)
            return node.outputs[0]

        if feature.producer() is None:  # identity prefix: the layer is the image
            feature = op("Identity", [feature], "superficial")
        magnitude = op("Abs" if self.phi == "abs" else "Relu", [feature], "sin_magnitude")
        alpha_v = add_constant(graph, "sin_alpha", self.alpha.astype(np.float32).reshape(1, -1, 1, 1))
        weighted = op("Mul", [magnitude, alpha_v], "sin_weighted")
        score = op("ReduceSum", [weighted, add_constant(graph, "sin_axes", np.array([1], np.int64))], "sin_score", keepdims=1)
        keep = op("Greater", [score, add_constant(graph, "sin_threshold", np.array(self.threshold, np.float32))], "sin_keep")
        if self.live_channels is not None:
            channel_live = add_constant(graph, "sin_live_channels", self.live_channels.reshape(1, -1, 1, 1))
            keep_all = op("And", [keep, channel_live], "sin_keep_channels")
        else:
            keep_all = keep
        zero = add_constant(graph, "sin_zero", np.array(0.0, np.float32))
        gated = op("Where", [keep_all, feature, zero], "features")
        gate8 = op("Cast", [keep], "sin_keep_u8", to=ir.DataType.UINT8)
        gate = op("Squeeze", [gate8, add_constant(graph, "sin_channel_axis", np.array([1], np.int64))], "gate")
        graph.extend(nodes)
        gated.type, gated.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", len(self.alpha), *self.layer.shape[1:]])
        gate.type, gate.shape = ir.TensorType(ir.DataType.UINT8), ir.Shape(["batch", *self.layer.shape[1:]])
        graph.outputs.clear()
        graph.outputs.extend([gated, gate])
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if [v.name for v in model.graph.outputs] != ["features", "gate"]:
            raise ir.passes.PostconditionError("the prefix must output features and gate")


WINDOWS_LAYOUT = "(B, 4R) int64: R rectangles [y0, x0, y1, x1) per row, their union zeroed"


class OcclusionSuffix(ir.passes.InPlacePass):
    """Make the layer a graph input `features` and zero, per row of `windows`, the union of the
    row's rectangles before the rest of the network. A (B, 4) batch is one window per row; a
    (B, 8) batch a pair of windows per row.

    Exact and cheap (docs/design.md §2): the union is a 0/1 float map U (B, 1, H', W'), built from
    per-row and per-column 0/1 vectors (products and a maximum of exact 0s and 1s), and the
    occluded features are F - F * U, with F the input with any non-finite value set to 0. For
    finite F this is +0 wherever U = 1 and F elsewhere (-0 becomes +0), bit for bit, on every
    engine; it replaced a Where over (B, C', H', W'), which ONNX Runtime runs about 5x slower than
    a Mul. Not F * (1 - U): ONNX Runtime drops an "Add 0" that would clear the sign of -0, and
    F * 0 keeps the sign of F, so the zeroed values would depend on what they hide.

    With `fill` (C', H', W'), the window holds the fill instead of zeros: (F - F * U) + fill * U, which
    is fill exactly under the window (+0 + v = v) and the zeroed form elsewhere (x + +-0 = x for
    x != 0). The fill is a constant of the bundle (the layer's features of a blank image, §2), so
    what the window holds still does not depend on the input."""

    def __init__(self, layer: Layer, channels: int, fill: np.ndarray | None = None):
        self.layer, self.channels = layer, channels
        self.fill = None if fill is None else check_fill(fill, (channels, *layer.shape[1:]))
        if self.fill is not None and not self.fill.any():
            self.fill = None  # all +0: the zeroed form is already the fill

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        feature = value_named(graph, self.layer.name)
        fh, fw = self.layer.shape[1], self.layer.shape[2]
        # Its own batch name: it is N or 1, not the window batch ("batch" downstream), and ONNX
        # Runtime reuses buffers between tensors whose symbolic shapes match.
        features_in = ir.Value(name="features", shape=ir.Shape(["features_batch", self.channels, fh, fw]),
                               type=ir.TensorType(ir.DataType.FLOAT))
        windows_in = ir.Value(name="windows", shape=ir.Shape(["windows", "rectangle_coords"]),
                              type=ir.TensorType(ir.DataType.INT64))
        nodes = []
        opset = model.opset_imports.get("", 18)

        def op(op_type, inputs, name, n_out=1, **attrs):
            node = ir.node(op_type, inputs, attributes=attrs or None, name=f"scalecert/{name}", num_outputs=n_out)
            for i, out in enumerate(node.outputs):
                out.name = name if n_out == 1 else f"{name}_{i}"
            nodes.append(node)
            return node.outputs[0] if n_out == 1 else node.outputs

        rects = op("Reshape", [windows_in, add_constant(graph, "window_rects_shape", np.array([0, -1, 4], np.int64))],
                   "window_rects")  # (B, R, 4)
        y0, x0, y1, x1 = op("Split", [rects], "window_bounds", n_out=4, axis=2,  # (B, R, 1) each; before opset 18
                            **({"num_outputs": 4} if opset >= 18 else {}))  # the outputs' count says equal parts
        rows = add_constant(graph, "window_rows", np.arange(fh, dtype=np.int64).reshape(1, 1, fh))
        cols = add_constant(graph, "window_cols", np.arange(fw, dtype=np.int64).reshape(1, 1, fw))
        one = add_constant(graph, "mask_one", np.array(1.0, np.float32))
        zero = add_constant(graph, "mask_zero", np.array(0.0, np.float32))
        in_rows = op("And", [op("GreaterOrEqual", [rows, y0], "rows_from"), op("Less", [rows, y1], "rows_to")], "in_rows")
        in_cols = op("And", [op("GreaterOrEqual", [cols, x0], "cols_from"), op("Less", [cols, x1], "cols_to")], "in_cols")
        rows01 = op("Where", [in_rows, one, zero], "in_rows_01")  # (B, R, H'): small, no Cast (TensorRT)
        cols01 = op("Where", [in_cols, one, zero], "in_cols_01")  # (B, R, W')
        inside01 = op("Mul", [op("Unsqueeze", [rows01, add_constant(graph, "axes_3", np.array([3], np.int64))], "in_rows_4d"),
                              op("Unsqueeze", [cols01, add_constant(graph, "axes_2", np.array([2], np.int64))], "in_cols_4d")],
                      "in_window_01")  # (B, R, H', W'), exact 0/1
        if opset >= 18:
            union01 = op("ReduceMax", [inside01, add_constant(graph, "axes_1", np.array([1], np.int64))],
                         "in_union_01", keepdims=1)
        else:
            union01 = op("ReduceMax", [inside01], "in_union_01", keepdims=1, axes=[1])  # (B, 1, H', W')
        non_finite = op("Or", [op("IsNaN", [features_in], "features_nan"), op("IsInf", [features_in], "features_inf")],
                        "features_non_finite")
        finite = op("Where", [non_finite, zero, features_in], "finite_features")  # once per call, not per row
        hidden = op("Mul", [finite, union01], "hidden_features")
        masked = op("Sub", [finite, hidden], "zeroed_features" if self.fill is not None else "occluded_features")
        if self.fill is not None:
            fill = add_constant(graph, "occlusion_fill", self.fill[None])
            masked = op("Add", [masked, op("Mul", [fill, union01], "window_fill")], "occluded_features")

        for node, index in list(feature.uses()):
            node.replace_input_with(index, masked)
        self._read_own_batch(graph, masked, op, opset)
        old_inputs = list(graph.inputs)
        graph.inputs.clear()
        graph.inputs.extend([features_in, windows_in])
        graph.extend(nodes)
        self.old_inputs = old_inputs
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _read_own_batch(graph: ir.Graph, masked: ir.Value, op, opset: int) -> None:
        """Shape reads of the image and of prefix values (receptive.py::shape_read: static sizes and
        the batch) become the same sizes with the batch of the suffix's own rows, so nothing of the
        prefix is left for the suffix to read. The suffix runs the rest of the model on a batch of
        occluded rows, so their count is the batch that the model's computation meant."""
        batch, prefix_side = image_batch(graph), image_dependent(graph)  # the features' uses already read `masked`
        reads = [(node, read) for node in graph
                 if (read := shape_read(node, batch)) is not None and node.inputs[0] in prefix_side]

        def rows(tag):
            if opset >= 15:
                return op("Shape", [masked], f"rows_{tag}", start=0, end=1)
            return op("Slice", [op("Shape", [masked], f"occluded_shape_{tag}"),
                                add_constant(graph, f"rows_start_{tag}", np.array([0], np.int64)),
                                add_constant(graph, f"rows_end_{tag}", np.array([1], np.int64))], f"rows_{tag}")

        for count, (node, read) in enumerate(reads):
            parts = [rows(f"{count}_{i}") if dim == BATCH else
                     add_constant(graph, f"static_size_{count}_{i}", np.array([dim], np.int64))
                     for i, dim in enumerate(read)]
            if not parts:
                sizes = add_constant(graph, f"static_size_{count}", np.zeros(0, np.int64))
            elif len(parts) == 1:
                sizes = parts[0]
            else:
                sizes = op("Concat", parts, f"read_sizes_{count}", axis=0)
            node.outputs[0].replace_all_uses_with(sizes)


def check_fill(fill: np.ndarray, shape) -> np.ndarray:
    """The window's fill as float32 (C', H', W'), finite, with -0 made +0 (so that the value under a
    window is one bit pattern)."""
    fill = np.asarray(fill, np.float32)
    if fill.shape != tuple(shape):
        raise ScaleCertError(f"occlusion fill of shape {fill.shape}, expected {tuple(shape)}")
    if not np.isfinite(fill).all():
        raise ScaleCertError("the layer's features of a blank image are not finite; export with --fill zero")
    return fill + np.float32(0.0)


class DropOldInputs(ir.passes.InPlacePass):
    """After OcclusionSuffix and finishing: nothing may still read the image."""

    def __init__(self, occlusion: OcclusionSuffix):
        self.occlusion = occlusion

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for old in self.occlusion.old_inputs:
            if old.uses():
                raise ScaleCertError(f"layer {self.occlusion.layer.name} does not separate the image from the logits")
        return ir.passes.PassResult(model, modified=False)


def build_prefix(model: ir.Model, layer: Layer, alpha: np.ndarray, threshold: float, phi: str,
                 remove_dead: bool) -> ir.Model:
    """The gated prefix, on a clone of `model`. Channels with alpha = 0 are removed from the graph
    (remove_dead) or zeroed by the gate."""
    prefix = model.clone()
    live = alpha > 0
    passes = []
    if remove_dead and not live.all():
        passes.append(RemoveDeadChannels(layer.name, np.flatnonzero(live)))
        gate = GatePrefix(layer, alpha[live], threshold, phi)
    else:
        gate = GatePrefix(layer, alpha, threshold, phi, None if live.all() else live)
    return run_passes(prefix, *passes, gate, finish())


def build_suffix(model: ir.Model, layer: Layer, channels: int, keep: np.ndarray | None = None,
                 fill: np.ndarray | None = None) -> ir.Model:
    """The occluding suffix on `channels` feature channels, on a clone of `model`; with `keep`, the
    Convs reading the features take only those input channels (dead channels removed); with `fill`
    (channels, H', W'), windows hold it instead of zeros."""
    suffix = model.clone()
    occlusion = OcclusionSuffix(layer, channels, fill)
    passes = [occlusion, finish(), DropOldInputs(occlusion)]
    if keep is not None:
        passes.append(SliceSuffixInputs(keep))
    return run_passes(suffix, *passes, finish())
