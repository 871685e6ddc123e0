"""Loaded model -> one onnx-ir model with input `image` (dynamic batch) and output `logits`.

The batch (docs/design.md §4): torch inputs are exported with a dynamic batch. An ONNX file, or a
torch.export program, that fixes the batch at 1 is made symbolic by export/batch.py (proven by
its analysis and checked bit for bit on ONNX Runtime); when that cannot be shown the model keeps
the batch of 1 and its logits say so ((1, classes)): ONNX Runtime runners then split larger
batches into rows (runtime/pipelines/onnxruntime.py), and the bundle's suffix runs one window per
call. `loaded.batch_note` says which happened, `loaded.max_batch` is 1 for the second.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import sys
import tempfile
import warnings

import onnx
import onnx_ir as ir

from scalecert.errors import ModelError, ScaleCertError
from scalecert.export import batch as batch_pass
from scalecert.export.loading import LoadedModel
from scalecert.graph import infer_shapes

OPSET = 18
MADE_SYMBOLIC = f"fixed batch 1 made symbolic (checked batch 1 and {batch_pass.CHECK_BATCH} bit for bit)"
KEPT = "fixed batch 1 kept: the suffix runs one window per call"
DYNAMIC_BATCH_HINT = ("re-export it with a dynamic batch: torch.export.export(model, (x,), "
                      "dynamic_shapes=({0: torch.export.Dim('batch')},))")
# ops TorchScript records for nn.MultiheadAttention / nn.TransformerEncoderLayer when traced under torch.no_grad()
FAST_PATH_OPS = {
    "_transformer_encoder_layer_fwd": "nn.TransformerEncoderLayer's inference fast path",
    "_native_multi_head_attention": "nn.MultiheadAttention's inference fast path",
}
FAST_PATH_FIX = ("trace it again after torch.backends.mha.set_fastpath_enabled(False), or bring the model as "
                 "torch.export .pt2 or ONNX")


@contextlib.contextmanager
def _quiet():
    """Nothing from the exporters reaches the terminal: Python's streams, warnings and the `torch`
    logger, and the file descriptors themselves (the TorchScript exporter prints whole graphs from
    C++). The user gets one error line instead (SCALECERT_DEBUG=1 re-raises with the traceback)."""
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.CRITICAL)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved, sink = [], None
    try:
        sink = tempfile.TemporaryFile()
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(sink.fileno(), fd)
    except OSError:  # no real descriptors (an embedding host): Python's streams are still redirected
        pass
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if sink is not None:
            sink.close()
        torch_logger.setLevel(level)


@contextlib.contextmanager
def _no_mha_fast_path():
    """nn.MultiheadAttention's inference fast path (one fused op) off while exporting, where torch
    offers the switch: the composite path exports to plain ONNX ops."""
    import torch

    backends = getattr(torch.backends, "mha", None)
    if backends is None or not hasattr(backends, "set_fastpath_enabled"):
        yield
        return
    before = backends.get_fastpath_enabled()
    backends.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backends.set_fastpath_enabled(before)


def _native_mha_symbolic(g, query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias,
                         mask, need_weights, average_attn_weights, mask_type):
    """aten::_native_multi_head_attention (what a TorchScript trace of nn.MultiheadAttention under
    torch.no_grad() records) as plain ONNX ops: the packed projections, scaled dot-product
    attention per head (the query scaled by 1/sqrt(head_dim) first, as the fused kernel does),
    the output projection. Batch-first (N, L, E) inputs, as the fast path requires; no mask."""
    import torch
    from torch.onnx import symbolic_helper as sh

    if not sh._is_none(mask):
        raise RuntimeError("aten::_native_multi_head_attention with an attention mask has no ONNX form here")
    embed_dim, num_head = sh._get_const(embed_dim, "i", "embed_dim"), sh._get_const(num_head, "i", "num_head")
    need_weights = sh._get_const(need_weights, "b", "need_weights")
    average = sh._get_const(average_attn_weights, "b", "average_attn_weights")
    head_dim = embed_dim // num_head

    def ints(values):
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    weights = g.op("Split", qkv_weight, ints([embed_dim] * 3), axis_i=0, outputs=3)
    biases = g.op("Split", qkv_bias, ints([embed_dim] * 3), axis_i=0, outputs=3)

    def linear(x, w, b):
        return g.op("Add", g.op("MatMul", x, g.op("Transpose", w, perm_i=[1, 0])), b)

    def reshape(x, last):  # (N, L, ...) -> (N, L, *last); the batch and length read from x
        leading = g.op("Slice", g.op("Shape", x), ints([0]), ints([2]))
        return g.op("Reshape", x, g.op("Concat", leading, ints(last), axis_i=0))

    def heads(x, perm):  # (N, L, E) -> (N, L, H, D) -> perm
        return g.op("Transpose", reshape(x, [num_head, head_dim]), perm_i=perm)

    q = heads(linear(query, weights[0], biases[0]), [0, 2, 1, 3])  # (N, H, L, D)
    k = heads(linear(key, weights[1], biases[1]), [0, 2, 3, 1])  # (N, H, D, S)
    v = heads(linear(value, weights[2], biases[2]), [0, 2, 1, 3])  # (N, H, S, D)
    scale = g.op("CastLike", g.op("Constant", value_t=torch.tensor(1.0 / math.sqrt(head_dim))), q)
    attention = g.op("Softmax", g.op("MatMul", g.op("Mul", q, scale), k), axis_i=-1)  # (N, H, L, S)
    out = g.op("Transpose", g.op("MatMul", attention, v), perm_i=[0, 2, 1, 3])
    out = linear(reshape(out, [embed_dim]), proj_weight, proj_bias)
    if not need_weights:
        return out, g.op("Constant", value_t=torch.zeros(0))
    return out, (g.op("ReduceMean", attention, ints([1]), keepdims_i=0) if average else attention)


@contextlib.contextmanager
def _torchscript_symbolics():
    import torch

    name = "aten::_native_multi_head_attention"
    torch.onnx.register_custom_op_symbolic(name, _native_mha_symbolic, OPSET)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            torch.onnx.unregister_custom_op_symbolic(name, OPSET)


def _cause(exc: BaseException) -> str:
    """The line that names why torch could not export: the innermost cause that says something
    other than the exporter's "step 1/3 ... Next steps" wrapper, ANSI colours removed."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    lines = []
    for item in reversed(chain):
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(item)).strip()
        if "## Exception summary" in text:  # the exporter's own report: the summary names the cause
            text = text.split("## Exception summary", 1)[1].strip()
            text = re.sub(r"^<class '[\w.]+'>:\s*", "", text)
        candidates = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith(("- ", "#"))]
        if candidates and not candidates[0].startswith("Failed to export the model with torch.export"):
            # "The following inconsistencies were found:" names its cause on the next line
            lines.append(" ".join(candidates[:2]) if candidates[0].endswith(":") else candidates[0])
            break
    line = lines[0] if lines else type(chain[0]).__name__
    for op, what in FAST_PATH_OPS.items():
        if f"aten::{op}" in line:
            return f"the TorchScript graph calls aten::{op} ({what}, recorded by tracing under torch.no_grad()), " \
                   f"which has no ONNX form; {FAST_PATH_FIX}"
    return line[:200]


def _batch_specialised(text: str) -> bool:
    return any(k in text for k in ("is inconsistent", "specialized", "specialised", "Constraints violated",
                                   "Invalid ranges", "marked batch as dynamic", "Not all values of batch"))


def _program_batch(program) -> int | None:
    """The batch a torch.export program was traced with when it is fixed (None: symbolic)."""
    import torch

    try:
        name = program.graph_signature.user_inputs[0]
        node = next(n for n in program.graph.nodes if n.name == name)
        size = node.meta["val"].shape[0]
    except (StopIteration, KeyError, IndexError, AttributeError):
        return None
    return int(size) if isinstance(size, int) or (isinstance(size, torch.SymInt) and size.node.is_constant()) else None


def _torch_to_proto(loaded: LoadedModel):
    """-> (ModelProto, the decomposed ExportedProgram whose node names match the ONNX values or None,
    whether the ONNX graph has a fixed batch of 1 to make symbolic)."""
    import torch

    example = torch.rand(2, *loaded.preprocess.input_size)
    dynamic = ({0: torch.export.Dim("batch")},)
    names = {"input_names": ["image"], "output_names": ["logits"]}
    try:
        with _quiet(), _no_mha_fast_path():
            if loaded.kind == "torchscript":  # the dynamo exporter cannot trace ScriptModules
                buffer = io.BytesIO()
                with _torchscript_symbolics():
                    torch.onnx.export(loaded.model, (example,), buffer, dynamo=False, opset_version=OPSET,
                                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, **names)
                return onnx.load_from_string(buffer.getvalue()), None, False
            if loaded.kind == "exported":
                return _exported_to_proto(loaded, example, dynamic, names)
            try:
                program = torch.onnx.export(loaded.model, (example,), dynamo=True, opset_version=OPSET,
                                            dynamic_shapes=dynamic, **names)
            except Exception as exc:  # noqa: BLE001
                if not _batch_specialised(_cause(exc)):
                    raise
                # code that fixes the batch (`x.view(1, -1)`): at a batch of 1, then the batch pass
                program = torch.onnx.export(loaded.model, (example[:1],), dynamo=True, opset_version=OPSET, **names)
                program.optimize()
                return program.model_proto, None, True
            program.optimize()
            return program.model_proto, program.exported_program, False
    except ScaleCertError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types
        if os.environ.get("SCALECERT_DEBUG"):
            raise
        cause = _cause(exc)
        raise ModelError(f"{loaded.source}: torch -> ONNX export failed: {cause}") from None


def _exported_to_proto(loaded: LoadedModel, example, dynamic, names):
    """A torch.export program. One traced with a symbolic batch is exported as it is. One traced
    with a fixed batch (torch.export's default) is traced again with a symbolic one, without its
    shape guards; when shapes baked into its graph refuse that, it is exported at its own batch,
    and a batch of 1 goes to the batch pass like an ONNX file (no PyTorch program is kept then:
    Taylor importance would run it on batches)."""
    import torch

    fixed = _program_batch(loaded.model)
    module = loaded.model.module(check_guards=False)
    if fixed is None:
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic,
                                    **names)
        program.optimize()
        return program.model_proto, program.exported_program, False
    try:
        retraced = torch.export.export(module, (example,), dynamic_shapes=dynamic, strict=False)
    except Exception:  # noqa: BLE001 - a shape baked into the graph; the fixed batch is tried next
        retraced = None
    if retraced is not None:
        program = torch.onnx.export(retraced, (example,), dynamo=True, opset_version=OPSET, **names)
        program.optimize()
        return program.model_proto, program.exported_program, False
    if fixed != 1:
        raise ModelError(f"{loaded.source}: the program was exported with a fixed batch of {fixed}; "
                             f"{DYNAMIC_BATCH_HINT}")
    program = torch.onnx.export(loaded.model, (example[:1],), dynamo=True, opset_version=OPSET, **names)
    program.optimize()
    return program.model_proto, None, True


def _first_dim(value: onnx.ValueInfoProto):
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return None
    return dims[0].dim_value if dims[0].HasField("dim_value") else None


def _set_first_dim(value: onnx.ValueInfoProto, dim) -> None:
    dims = value.type.tensor_type.shape.dim
    if dims:
        if isinstance(dim, str):
            dims[0].dim_param = dim
        else:
            dims[0].dim_value = dim


def _graph_input(proto: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {t.name for t in proto.graph.initializer}
    return next(v for v in proto.graph.input if v.name not in initializers)


def _symbolic_batch(proto: onnx.ModelProto, loaded: LoadedModel) -> onnx.ModelProto:
    """The batch of an ONNX graph made "batch": as it is when it was symbolic already, by the batch
    pass when it was fixed at 1 (or kept, loaded.max_batch = 1); a fixed batch above 1 is refused."""
    image = _graph_input(proto)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in image.type.tensor_type.shape.dim]
    if len(dims) == 4 and None not in dims[1:] and tuple(dims[1:]) != tuple(loaded.preprocess.input_size):
        raise ModelError(f"model input is {tuple(dims[1:])}, but --input-size says {tuple(loaded.preprocess.input_size)}")
    fixed = _first_dim(image)
    if not fixed:  # symbolic or unknown
        for value in [image, *proto.graph.output]:
            _set_first_dim(value, "batch")
        return proto
    if fixed != 1:
        raise ModelError(f"{loaded.source}: the model's input has a fixed batch of {fixed}; export it with a batch "
                             "of 1 or a dynamic one (torch.onnx.export(..., dynamic_shapes=...) or dynamic_axes)")
    try:
        with _quiet():
            rewritten = batch_pass.make_symbolic(proto)
            spread = batch_pass.check(proto, rewritten, loaded.preprocess.input_size)
    except batch_pass.Unproven as why:
        loaded.batch_note, loaded.max_batch = f"{KEPT} ({why})", 1
        _set_first_dim(image, "batch")  # the prefix is local, so per image: it runs any batch
        for value in proto.graph.output:
            _set_first_dim(value, 1)
        return proto
    loaded.batch_note = MADE_SYMBOLIC if spread == 0 else (
        f"fixed batch 1 made symbolic (checked batch 1 bit for bit; at batch {batch_pass.CHECK_BATCH} each row bit for "
        f"bit independent of the others, within {spread:.2g} of batch 1: ONNX Runtime rounds by batch size)")
    return rewritten


def _optimize(model: ir.Model) -> None:
    """Constant folding and dead-code removal on one IR (onnxscript's optimizer, if installed)."""
    try:
        import onnxscript.optimizer
    except ImportError:
        return
    with _quiet():
        onnxscript.optimizer.optimize(model)


def _refuse_training(model: ir.Model, source: str) -> None:
    """A graph that trains normalises by batch statistics or drops at random, in the prefix and in the
    suffix alike (a window's logits would depend on the other windows of its batch): refused whole."""
    from scalecert.export.receptive import const_array

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        training = None
        if node.op_type == "BatchNormalization":
            mode = node.attributes.get("training_mode")
            if (mode is not None and mode.as_int() != 0) or len(node.outputs) > 1:
                training = "normalises by the statistics of each batch"
        elif node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
            flag = const_array(node.inputs[2])
            if flag is None or bool(flag.ravel()[0]):
                training = "may drop activations at random"
        if training:
            raise ModelError(f"{source}: the graph is in training mode: {node.op_type} {node.name or '(unnamed)'} {training}; "
                                 "export the model after model.eval() (torch.onnx.export(..., "
                                 "training=torch.onnx.TrainingMode.EVAL))")


def to_onnx(loaded: LoadedModel):
    """-> (onnx-ir model, ExportedProgram or None)."""
    program = None
    if loaded.kind == "onnx":
        proto = onnx.ModelProto()
        proto.CopyFrom(loaded.model)
        _refuse_training(ir.from_proto(proto), loaded.source)  # before the batch check runs it
        proto = _symbolic_batch(proto, loaded)
    else:
        proto, program, fixed = _torch_to_proto(loaded)
        if fixed:
            proto = _symbolic_batch(proto, loaded)
    try:
        proto = infer_shapes(proto)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{loaded.source}: ONNX shape inference failed: {str(exc).splitlines()[0][:160]}") from None
    model = ir.from_proto(proto)
    _refuse_training(model, loaded.source)
    if program is None:  # the dynamo path already folded constants and fused Conv+BN
        _optimize(model)
    image, logits = model.graph.inputs[0], model.graph.outputs[0]
    image.name, logits.name = "image", "logits"
    c, h, w = loaded.preprocess.input_size
    if image.shape is not None and len(image.shape) == 4:
        fixed = [d for d in list(image.shape)[1:]]
        if all(isinstance(d, int) for d in fixed) and tuple(fixed) != (c, h, w):
            raise ModelError(f"model input is {tuple(fixed)}, but --input-size says {(c, h, w)}")
    image.shape = ir.Shape(["batch", c, h, w])
    if logits.shape is not None and len(logits.shape) != 2:
        raise ModelError(f"{loaded.source}: the model outputs shape {list(logits.shape)}; expected "
                             "(batch, classes) logits")
    if loaded.max_batch is not None:
        logits.shape = ir.Shape([loaded.max_batch, *list(logits.shape or [None, None])[1:]])
    return model, program
