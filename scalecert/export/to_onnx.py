"""Loaded model -> one onnx-ir model with input `image` (dynamic batch) and output `logits`."""
from __future__ import annotations

import contextlib
import io
import re
import warnings

import onnx
import onnx_ir as ir

from scalecert.errors import ScaleCertError
from scalecert.export.loading import LoadedModel

OPSET = 18


def _quiet():
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    # a failing torch.export prints graph dumps to stderr and logs through the `torch` logger; the
    # user gets one error line instead (SCALECERT_DEBUG=1 re-raises with the traceback)
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    torch_logger = logging.getLogger("torch")
    stack.callback(torch_logger.setLevel, torch_logger.level)
    torch_logger.setLevel(logging.CRITICAL)
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _torch_to_proto(loaded: LoadedModel):
    """-> (ModelProto, the decomposed ExportedProgram whose node names match the ONNX values)."""
    import torch

    example = torch.rand(2, *loaded.preprocess.input_size)
    # without its shape guards: a program exported with a fixed batch (torch.export's default) can be
    # re-traced with a dynamic one; shapes baked into its graph still fail loudly at the re-trace
    module = loaded.model.module(check_guards=False) if loaded.kind == "exported" else loaded.model
    try:
        with _quiet():
            if loaded.kind == "torchscript":  # the dynamo exporter cannot trace ScriptModules
                buffer = io.BytesIO()
                torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET,
                                  input_names=["image"], output_names=["logits"],
                                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
                return onnx.load_from_string(buffer.getvalue()), None
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        input_names=["image"], output_names=["logits"])
            program.optimize()
            return program.model_proto, program.exported_program
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporter colours its messages
        first = text.splitlines()[0][:160] if text else type(exc).__name__
        raise ScaleCertError(f"{loaded.source}: torch -> ONNX export failed: {first}") from None


def _make_batch_dynamic(proto: onnx.ModelProto) -> None:
    for value in list(proto.graph.input[:1]) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_param = "batch"


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
            raise ScaleCertError(f"{source}: the graph is in training mode: {node.op_type} {node.name or '(unnamed)'} {training}; "
                                 "export the model after model.eval() (torch.onnx.export(..., "
                                 "training=torch.onnx.TrainingMode.EVAL))")


def to_onnx(loaded: LoadedModel):
    """-> (onnx-ir model, ExportedProgram or None)."""
    program = None
    if loaded.kind == "onnx":
        proto = onnx.ModelProto()
        proto.CopyFrom(loaded.model)
        _make_batch_dynamic(proto)
    else:
        proto, program = _torch_to_proto(loaded)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        raise ScaleCertError(f"{loaded.source}: ONNX shape inference failed: {str(exc).splitlines()[0][:160]}") from None
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
            raise ScaleCertError(f"model input is {tuple(fixed)}, but --input-size says {(c, h, w)}")
    image.shape = ir.Shape(["batch", c, h, w])
    if logits.shape is not None and len(logits.shape) != 2:
        raise ScaleCertError(f"{loaded.source}: the model outputs shape {list(logits.shape)}; expected "
                             "(batch, classes) logits")
    return model, program
