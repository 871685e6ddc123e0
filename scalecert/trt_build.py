"""TensorRT engines for one precision of a bundle, built with Polygraphy (TensorRT 10.x and 11.x).

Precision lives in the ONNX (explicit casts for fp16, static Q/DQ for int8), so networks are
parsed strongly typed and no precision builder flag is set: TensorRT 11 has none, and on 10.x
strong typing makes the ONNX's types binding. Before building, two graph passes make the ONNX
what TensorRT handles best (written beside the bundle's variants as `*.<precision>.trt.onnx`):
the suffix's `windows` input becomes int32, and a uint8 cast feeding only shape ops (the gate
map's Squeeze) moves after them, since TensorRT takes uint8 only at network inputs and outputs.
Then every node is checked against the parser's documented operator support (trt_support).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import onnx_ir as ir

from .errors import ScaleCertError
from .trt_support import check_onnx

PRECISIONS = ("fp32", "fp16", "int8")
_FOLLOW = {"Split", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Identity", "Slice", "Gather", "Transpose"}
_COMPARE = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal"}
_SHAPE_ONLY = {"Squeeze", "Unsqueeze", "Reshape", "Flatten", "Identity", "Transpose"}


# --- graph passes ------------------------------------------------------------------------


def _int32_const(graph: ir.Graph, value: ir.Value, cache: dict) -> ir.Value | None:
    """An int32 initializer equal to the int64 constant `value`, or None if it does not fit."""
    if value.name in cache:
        return cache[value.name]
    array = value.const_value.numpy()
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
        return None
    name = f"{value.name}_int32"
    new = ir.Value(name=name, const_value=ir.tensor(array.astype(np.int32), name=name))
    new.shape, new.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.INT32)
    graph.register_initializer(new)
    cache[value.name] = new
    return new


def windows_to_int32(model: ir.Model, name: str = "windows") -> bool:
    """Make the int64 graph input `name` int32. Values derived from it through shape/split ops
    become int32 too, and comparisons of them with int64 constants compare against int32 copies
    of those constants; any other consumer gets a Cast back to int64. Returns whether anything
    changed."""
    graph = model.graph
    windows = next((v for v in graph.inputs if v.name == name), None)
    if windows is None or windows.dtype == ir.DataType.INT32:
        return False
    if windows.dtype != ir.DataType.INT64:
        raise ScaleCertError(f"graph input {name} is {windows.dtype}, expected int64")
    windows.dtype = ir.DataType.INT32
    constants, casts, frontier = {}, {}, [windows]
    while frontier:
        value = frontier.pop()
        for node, index in list(value.uses()):
            if node.op_type in _FOLLOW and index == 0:
                for out in node.outputs:
                    out.dtype = ir.DataType.INT32
                    frontier.append(out)
                continue
            if node.op_type in _COMPARE:
                other = node.inputs[1 - index]
                if other is not None and other.const_value is not None and other.dtype == ir.DataType.INT64:
                    replacement = _int32_const(graph, other, constants)
                    if replacement is not None:
                        node.replace_input_with(1 - index, replacement)
                        continue
            if value.name not in casts:
                cast = ir.node("Cast", [value], {"to": ir.DataType.INT64}, name=f"scalecert/{value.name}_int64")
                cast.outputs[0].name = f"{value.name}_int64"
                cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.INT64, value.shape
                graph.append(cast)
                casts[value.name] = cast.outputs[0]
            node.replace_input_with(index, casts[value.name])
    return True


def uint8_cast_last(model: ir.Model) -> int:
    """Move Cast(to=UINT8) after the shape-only ops that are its only consumers (x -> Cast ->
    Squeeze -> gate becomes x -> Squeeze -> Cast -> gate), so uint8 exists only at the graph
    output. Returns the number of moves."""
    graph, moves = model.graph, 0
    for cast in [n for n in graph if n.op_type == "Cast"]:
        while cast.attributes.get_int("to") == ir.DataType.UINT8:
            uses = list(cast.outputs[0].uses())
            if (len(uses) != 1 or cast.outputs[0].is_graph_output() or uses[0][0].op_type not in _SHAPE_ONLY
                    or uses[0][1] != 0):
                break
            shaper, source = uses[0][0], cast.inputs[0]
            result = shaper.outputs[0]
            shaper.replace_input_with(0, source)
            out = ir.Value(name=f"{result.name}_uint8", shape=result.shape, type=ir.TensorType(ir.DataType.UINT8))
            result.replace_all_uses_with(out, replace_graph_outputs=True)
            name = result.name
            result.name, result.type = f"{name}_precast", source.type  # None where the file does not say
            if source.type is None:
                result.shape = None
            out.name = name
            moved = ir.node("Cast", [result], {"to": ir.DataType.UINT8}, outputs=[out], name=cast.name)
            graph.remove(cast, safe=True)
            graph.insert_after(shaper, moved)
            cast, moves = moved, moves + 1
    return moves


def prepare_onnx(src: str, dst: str) -> dict:
    """Write the TensorRT-ready variant of one bundle ONNX file; returns what changed."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    try:
        model = ir.load(src)
    except Exception as exc:  # noqa: BLE001
        raise ScaleCertError(f"{src}: cannot read it as ONNX ({str(exc).splitlines()[0][:120]})") from None
    changes = {"windows_int32": windows_to_int32(model), "uint8_casts_moved": uint8_cast_last(model)}
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
    ir.save(model, dst)
    return changes


# --- engines -----------------------------------------------------------------------------


def _input_item_shape(path: str, name: str) -> list[int]:
    """Static dims after the batch axis of one graph input."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    for value in model.graph.input:
        if value.name == name:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim][1:]
            if None in dims:
                raise ScaleCertError(f"{path}: input {name} has dynamic dims after the batch axis; TensorRT profiles need them fixed")
            return dims
    raise ScaleCertError(f"{path}: no graph input named {name}")


def _require_builder():
    try:
        import tensorrt
        from polygraphy.backend import trt as poly_trt
    except ImportError as exc:
        raise ScaleCertError(f"building TensorRT engines needs TensorRT and Polygraphy ({exc.name} is missing) on a "
                             "machine with an NVIDIA GPU: pip install 'scalecert[tensorrt]' there (TensorRT from "
                             "NVIDIA's index or JetPack) and run `scalecert build BUNDLE --backend trt` on it") from None
    return tensorrt, poly_trt


def _build(poly_trt, trt, onnx_path: str, plan_path: str, profile: dict, cache: str, workspace_mb: int) -> None:
    typed = hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    # 10.x: strongly typed on request; 11.x: always strongly typed (the flag, where present, is ignored)
    network = poly_trt.NetworkFromOnnxPath(onnx_path, strongly_typed=True if typed else None)
    shapes = poly_trt.Profile()
    for name, dims in profile.items():
        shapes.add(name, min=dims["min"], opt=dims["opt"], max=dims["max"])
    # no precision flags (the ONNX carries the types); TF32 stays off, Polygraphy's default, so fp32 is fp32
    config = poly_trt.CreateConfig(profiles=[shapes], load_timing_cache=cache,
                                   memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_mb) << 20})
    try:
        poly_trt.SaveEngine(poly_trt.EngineFromNetwork(network, config, save_timing_cache=cache), plan_path)()
    except Exception as exc:  # noqa: BLE001 - Polygraphy reports failures with its own exception type
        raise ScaleCertError(f"{onnx_path}: TensorRT could not build an engine ({str(exc).strip().splitlines()[0][:200]})") from None


def build_engines(bundle_dir: str, work_dir: str, precision: str, prefix_onnx: str, suffix_onnx: str,
                  max_images: int, max_windows: int, workspace_mb: int) -> dict:
    """Build the prefix and suffix engines of one precision into work_dir (a copy of bundle_dir
    that the caller renames into place) and return the manifest["engines"]["trt-<precision>"]
    entry. prefix_onnx/suffix_onnx are that precision's files, relative to the bundle. The
    timing cache persists in the bundle's engines/ folder, one file per TensorRT version and
    GPU architecture, so rebuilding on the same kind of device is fast."""
    if precision not in PRECISIONS:
        raise ScaleCertError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    if min(int(max_images), int(max_windows), int(workspace_mb)) < 1:
        raise ScaleCertError("max images, max windows and workspace must be at least 1")
    sources = {"prefix": os.path.join(work_dir, prefix_onnx), "suffix": os.path.join(work_dir, suffix_onnx)}
    onnx_files, problems = {}, []
    for kind, src in sources.items():
        if not os.path.isfile(src):
            raise ScaleCertError(f"{src}: missing; build the {precision} variant first (`scalecert build BUNDLE --precision {precision}`)")
        onnx_files[kind] = f"{kind}.{precision}.trt.onnx"
        prepare_onnx(src, os.path.join(work_dir, onnx_files[kind]))
        problems += check_onnx(os.path.join(work_dir, onnx_files[kind]))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ScaleCertError(f"TensorRT's ONNX parser does not support this graph: {problems[0]}{more}")

    trt, poly_trt = _require_builder()
    from .runtime.gpu import gpu_identity

    gpu_name, capability = gpu_identity()
    image = _input_item_shape(sources["prefix"], "image")
    features = _input_item_shape(sources["suffix"], "features")
    profiles = {
        "prefix": {"image": {"min": [1, *image], "opt": [1, *image], "max": [int(max_images), *image]}},
        "suffix": {"features": {"min": [1, *features], "opt": [1, *features], "max": [1, *features]},
                   "windows": {"min": [1, 4], "opt": [int(max_windows), 4], "max": [int(max_windows), 4]}},
    }
    engines_dir = os.path.join("engines", f"trt-{precision}")
    os.makedirs(os.path.join(work_dir, engines_dir), exist_ok=True)
    cache = os.path.join("engines", f"timing-trt{trt.__version__}-sm{capability[0]}{capability[1]}.cache")
    if not os.path.exists(os.path.join(work_dir, cache)) and os.path.exists(os.path.join(bundle_dir, cache)):
        shutil.copyfile(os.path.join(bundle_dir, cache), os.path.join(work_dir, cache))
    plans = {}
    for kind in ("prefix", "suffix"):
        plans[kind] = os.path.join(engines_dir, f"{kind}.plan")
        _build(poly_trt, trt, os.path.join(work_dir, onnx_files[kind]), os.path.join(work_dir, plans[kind]),
               profiles[kind], os.path.join(work_dir, cache), workspace_mb)
    return {
        "precision": precision,
        "prefix": plans["prefix"],
        "suffix": plans["suffix"],
        "onnx": onnx_files,
        "tensorrt": trt.__version__,
        "gpu": gpu_name,
        "compute_capability": list(capability),
        "profiles": profiles,
        "timing_cache": cache,
        "workspace_mb": int(workspace_mb),
        "windows_dtype": "int32",
    }
