"""The TensorRT suffix engine for one precision of a bundle, built with Polygraphy (TensorRT 10.x
and 11.x). Only the suffix: every backend runs the prefix on ONNX Runtime CPU, where its locality
is proven and probed (docs/design.md §9), so no prefix engine is built.

Precision lives in the ONNX (explicit casts for fp16, static Q/DQ for int8), so networks are
parsed strongly typed and no precision builder flag is set: TensorRT 11 has none, and on 10.x
strong typing makes the ONNX's types binding. Before building, a graph pass (trt_passes.py) makes
the suffix's `windows` input int32 (written beside the bundle's variants as
`suffix.<precision>.trt.onnx`), and every node is checked against the parser's documented
operator support (parser_support.py).
"""
from __future__ import annotations

import os
import shutil

from scalecert.bundle.manifest import PRECISIONS
from scalecert.compile.parser_support import check_onnx
from scalecert.compile.trt_passes import prepare_onnx
from scalecert.errors import ScaleCertError


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


RECTANGLES_PER_ROW = 2  # suffix rows hold a window (detection) or a pair of windows (recovery)


def build_engines(bundle_dir: str, work_dir: str, precision: str, suffix_onnx: str, max_windows: int,
                  workspace_mb: int) -> dict:
    """Build the suffix engine of one precision into work_dir (a copy of bundle_dir that the caller
    renames into place) and return the manifest["engines"]["trt-<precision>"] entry. suffix_onnx is
    that precision's file, relative to the bundle. The timing cache persists in the bundle's
    engines/ folder, one file per TensorRT version and GPU architecture, so rebuilding on the same
    kind of device is fast."""
    if precision not in PRECISIONS:
        raise ScaleCertError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    if min(int(max_windows), int(workspace_mb)) < 1:
        raise ScaleCertError("max windows and workspace must be at least 1")
    source = os.path.join(work_dir, suffix_onnx)
    if not os.path.isfile(source):
        raise ScaleCertError(f"{source}: missing; build the {precision} variant first (`scalecert build BUNDLE --precision {precision}`)")
    onnx_file = f"suffix.{precision}.trt.onnx"
    prepare_onnx(source, os.path.join(work_dir, onnx_file))
    problems = check_onnx(os.path.join(work_dir, onnx_file))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ScaleCertError(f"TensorRT's ONNX parser does not support this graph: {problems[0]}{more}")

    trt, poly_trt = _require_builder()
    from scalecert.runtime.pipelines.tensorrt import gpu_identity

    gpu_name, capability = gpu_identity()
    features = _input_item_shape(source, "features")
    profiles = {"suffix": {"features": {"min": [1, *features], "opt": [1, *features], "max": [1, *features]},
                           "windows": {"min": [1, 4], "opt": [int(max_windows), 4],
                                       "max": [int(max_windows), 4 * RECTANGLES_PER_ROW]}}}
    engines_dir = os.path.join("engines", f"trt-{precision}")
    os.makedirs(os.path.join(work_dir, engines_dir), exist_ok=True)
    cache = os.path.join("engines", f"timing-trt{trt.__version__}-sm{capability[0]}{capability[1]}.cache")
    if not os.path.exists(os.path.join(work_dir, cache)) and os.path.exists(os.path.join(bundle_dir, cache)):
        shutil.copyfile(os.path.join(bundle_dir, cache), os.path.join(work_dir, cache))
    plan = os.path.join(engines_dir, "suffix.plan")
    _build(poly_trt, trt, os.path.join(work_dir, onnx_file), os.path.join(work_dir, plan), profiles["suffix"],
           os.path.join(work_dir, cache), workspace_mb)
    return {
        "precision": precision,
        "suffix": plan,
        "onnx": {"suffix": onnx_file},
        "tensorrt": trt.__version__,
        "gpu": gpu_name,
        "compute_capability": list(capability),
        "profiles": profiles,
        "timing_cache": cache,
        "workspace_mb": int(workspace_mb),
        "windows_dtype": "int32",
    }
