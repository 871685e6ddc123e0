"""Model files -> a torch module, an ExportedProgram or an ONNX model, with their input spec."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from scalecert.errors import ModelError
from scalecert.export.archs import REGISTRY, Preprocess


@dataclass
class LoadedModel:
    kind: str  # "torch", "torchscript", "exported", "onnx"
    model: Any  # nn.Module, ScriptModule, ExportedProgram or onnx.ModelProto
    preprocess: Preprocess
    arch: str | None
    source: str
    tuned: dict | None = None  # the `scalecert tune` record of a tuned checkpoint
    batch_note: str | None = None  # set by to_onnx when the model came with a fixed batch of 1
    max_batch: int | None = None  # 1 when that batch was kept (export/batch.py could not make it symbolic)


def parse_input_size(spec: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in spec.lower().split("x"))
        if min(c, h, w) < 1:
            raise ValueError
    except ValueError:
        raise ModelError(f"--input-size {spec!r}: expected CxHxW, e.g. 3x224x224") from None
    return c, h, w


def _default_preprocess(input_size) -> Preprocess:
    h = input_size[1]
    return Preprocess(tuple(input_size), resize_short=round(h * 256 / 224) if h >= 128 else None)


def _archive_names(path: str) -> list[str]:
    if not zipfile.is_zipfile(path):
        return []
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        return []


def _strip_prefix(state: dict) -> dict:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


class _PickledObjects(Exception):
    pass


def _safe_load(path: str):
    """torch.load with weights_only=True: tensors and containers only, never code."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise _PickledObjects from None
        lines = [l.strip() for l in text.splitlines() if l.strip()]
        marker = next((i for i, l in enumerate(lines) if "WeightsUnpickler error" in l), None)
        first = (lines[marker + 1] if marker is not None and marker + 1 < len(lines)
                 else lines[0] if lines else type(exc).__name__)[:160]
        raise ModelError(f"{path}: corrupt or truncated checkpoint, PyTorch cannot read it ({first})") from None


def _unpickle(path: str):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: cannot unpickle ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


PICKLE_REFUSED = ("holds pickled Python objects; refusing to unpickle it because that runs arbitrary code "
                  "from the file. Pass --trust-pickle only if you trust its source, or save a state_dict")


def _load_checkpoint(path: str, arch: str, trust_pickle: bool = False):
    import torch

    spec = REGISTRY[arch]
    try:
        data = _safe_load(path)
    except _PickledObjects:
        if not trust_pickle:
            raise ModelError(f"{path}: {PICKLE_REFUSED}") from None
        data = _unpickle(path)
        if isinstance(data, torch.nn.Module):
            return data.eval(), None
    record = data.get("scalecert_tune") if isinstance(data, dict) else None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(hasattr(v, "shape") for v in data.values()):
        raise ModelError(f"{path}: expected a state_dict (or {{'state_dict': ...}}) of tensors")
    state = _strip_prefix(data)
    model = spec.build()
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        def short(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"{label}: {short(keys)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ModelError(f"{path} does not fit --arch {arch}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return model.eval(), record if isinstance(record, dict) else None


def load_model(path: str, arch: str | None = None, input_size: tuple[int, int, int] | None = None,
               trust_pickle: bool = False, pretrained: bool = False, mean=None, std=None,
               resize: int | str | None = None) -> LoadedModel:
    """The model and how its input is prepared: the arch's preprocessing with --arch (for a
    whole-model file too: the arch names its input, never ignored), else ImageNet's mean/std, short
    side 256 and a centre crop for 224 inputs; `mean`, `std`, `resize` (short side, or "none": straight
    to the input size) override either. Export prints what it assumed (describe_input)."""
    loaded = _load_model(path, arch, input_size, trust_pickle, pretrained)
    pre = loaded.preprocess
    if arch is not None and loaded.kind != "torch":  # a whole-model file with --arch: the arch's input
        pre = REGISTRY[arch].preprocess if input_size is None else replace(REGISTRY[arch].preprocess,
                                                                          input_size=tuple(input_size))
    channels = pre.input_size[0]
    for name, values in (("mean", mean), ("std", std)):
        if values is not None:
            if len(values) != channels or (name == "std" and min(values) <= 0):
                raise ModelError(f"--{name} {','.join(map(str, values))}: expected {channels} "
                                 f"{'positive ' if name == 'std' else ''}numbers, one per input channel")
            pre = replace(pre, **{name: tuple(float(v) for v in values)})
    if channels != len(pre.mean) and mean is None and std is None:  # a grey model without --mean/--std
        pre = replace(pre, mean=(float(np.mean(pre.mean)),) * channels, std=(float(np.mean(pre.std)),) * channels)
    if resize is not None:
        pre = replace(pre, resize_short=None if str(resize).lower() in ("none", "0") else int(resize))
    if pre.resize_short is not None and pre.resize_short < min(pre.input_size[1:]):
        raise ModelError(f"--resize {pre.resize_short}: the short side must be at least the input's "
                         f"{min(pre.input_size[1:])} pixels (the crop is taken from it)")
    return replace(loaded, preprocess=pre)


def describe_input(pre: Preprocess, given: set) -> str:
    """The one line export prints about how images become the input, saying what was assumed."""
    c, h, w = pre.input_size
    resize = (f"short side resized to {pre.resize_short}, centre crop {h}x{w}" if pre.resize_short else
              f"resized to {h}x{w}")
    assumed = [name for name in ("mean", "std", "resize") if name not in given]
    return (f"input: {'RGB' if c == 3 else 'grey' if c == 1 else f'{c}-channel'} {h}x{w}, {resize}, mean "
            f"{list(pre.mean)}, std {list(pre.std)}" + (f" (assumed: {', '.join(assumed)}; set --{' / --'.join(assumed)} "
                                                        "if your model was trained otherwise)" if assumed else ""))


def _load_model(path: str, arch: str | None, input_size, trust_pickle: bool, pretrained: bool) -> LoadedModel:
    if arch is not None and arch not in REGISTRY:
        raise ModelError(f"unknown --arch {arch!r}; known: {', '.join(sorted(REGISTRY))}")
    if pretrained:
        if arch is None or REGISTRY[arch].pretrained_path is None:
            with_weights = [n for n, a in REGISTRY.items() if a.pretrained_path is not None]
            raise ModelError(f"--pretrained needs --arch with shipped weights: {', '.join(with_weights)}")
        try:
            path = REGISTRY[arch].pretrained_path()
        except FileNotFoundError as exc:
            raise ModelError(str(exc)) from None
    if path is None:
        raise ModelError("no model file given (pass MODEL, or --arch NAME --pretrained)")
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, expected a model file")
    if os.path.getsize(path) == 0:
        raise ModelError(f"{path}: empty file")

    def with_size(pre: Preprocess) -> Preprocess:
        return pre if input_size is None else replace(pre, input_size=tuple(input_size))

    if path.lower().endswith(".onnx"):
        return _load_onnx(path, input_size)
    names = _archive_names(path)
    if any(n.endswith("archive_format") for n in names) or path.endswith(".pt2"):
        import torch

        try:
            program = torch.export.load(path)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{path}: cannot read torch.export archive ({type(exc).__name__})") from None
        size = input_size
        if size is None and program.example_inputs:
            size = tuple(program.example_inputs[0][0].shape[1:])
        if size is None:
            raise ModelError(f"{path}: archive holds no example input; pass --input-size")
        return LoadedModel("exported", program, _default_preprocess(size), arch, path)
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        import torch

        try:
            module = torch.jit.load(path, map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{path}: cannot read TorchScript archive ({type(exc).__name__})") from None
        if input_size is None and arch is None:
            input_size = _torchscript_input_size(module, path)
        return LoadedModel("torchscript", module, _default_preprocess(input_size or (3, 224, 224)), arch, path)
    if arch is not None:
        model, record = _load_checkpoint(path, arch, trust_pickle)
        return LoadedModel("torch", model, with_size(REGISTRY[arch].preprocess), arch, path, record)
    return _load_pickled_module(path, input_size, trust_pickle)


COMMON_INPUT_SIZES = ((3, 224, 224), (3, 32, 32), (1, 28, 28), (3, 64, 64), (1, 32, 32), (3, 96, 96), (3, 128, 128),
                      (3, 256, 256), (3, 299, 299), (3, 384, 384))


def _torchscript_input_size(module, path: str):
    """A TorchScript file does not say its input size: 3x224x224 when the module runs on it, else one
    line naming the --input-size it does run on (or asking for one), before any long work."""
    import torch

    def runs(size) -> bool:
        try:
            with torch.no_grad():
                out = module(torch.zeros(1, *size))
            return isinstance(out, torch.Tensor) and out.dim() == 2
        except Exception:  # noqa: BLE001 - a shape mismatch surfaces as several error types
            return False

    if runs(COMMON_INPUT_SIZES[0]):
        return None
    fits = next((size for size in COMMON_INPUT_SIZES[1:] if runs(size)), None)
    hint = f"it runs on {'x'.join(map(str, fits))}: pass --input-size {'x'.join(map(str, fits))}" if fits else \
        "pass --input-size CxHxW (e.g. 1x28x28 for a grey 28x28 model)"
    raise ModelError(f"{path}: the TorchScript model does not run on the default 3x224x224 input; {hint}")


def _load_pickled_module(path, input_size, trust_pickle) -> LoadedModel:
    import torch

    try:
        _safe_load(path)
    except _PickledObjects:
        if not trust_pickle:
            raise ModelError(f"{path}: {PICKLE_REFUSED} and use --arch") from None
        module = _unpickle(path)
    else:
        raise ModelError(f"{path}: a state_dict checkpoint; pass --arch NAME to say which architecture it fits")
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"{path}: unpickled a {type(module).__name__}, not an nn.Module")
    return LoadedModel("torch", module.eval(), _default_preprocess(input_size or (3, 224, 224)), None, path)


def _load_onnx(path: str, input_size) -> LoadedModel:
    import onnx

    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(graph_inputs) != 1 or len(model.graph.output) != 1:
        raise ModelError(f"{path}: expected one image input and one logits output")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_inputs[0].type.tensor_type.shape.dim]
    if input_size is None:
        if len(dims) != 4 or None in dims[1:]:
            raise ModelError(f"{path}: input shape {dims} is not static NCHW; pass --input-size")
        input_size = tuple(dims[1:])
    return LoadedModel("onnx", model, _default_preprocess(input_size), None, path)
