"""GPU pipelines against the CPU reference (run with `pytest -m gpu` on an NVIDIA machine; every
test here skips cleanly elsewhere).

Tolerances, fp32 (TF32 off on both GPU paths: use_tf32=0 for ONNX Runtime, Polygraphy's default
for TensorRT): features within 1e-4 and logits within 1e-3 (absolute and relative) of ONNX Runtime
CPU; reduced-precision variants: the same top-1 wherever the CPU margin exceeds 0.1. Certification
outcomes (status, label, every window's label) must be equal across backends, each backend
certifying with its own measured margin delta.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import R20, cifar_files, export
from scalecert import manifest as manifest_io
from scalecert.calibration.margin import delta_from_spread, measure_logit_spread
from scalecert.runtime import Certifier, geometry, gpu
from scalecert.runtime.backends import OrtCpuPipeline
from scalecert.runtime.preprocess import load_image, normalize


def _cuda_ep() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda_ep(), reason="needs an NVIDIA GPU and onnxruntime-gpu "
                                                                        "(no CUDAExecutionProvider here)")]


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory):
    """$SCALECERT_GPU_BUNDLE (a bundle exported elsewhere: no torch needed here), else ResNet-20
    exported from ../shared, else a seeded random ResNet-20."""
    given = os.environ.get("SCALECERT_GPU_BUNDLE")
    out = str(tmp_path_factory.mktemp("gpu") / "bundle")
    if given:
        shutil.copytree(given, out)
        return out
    if os.path.exists(R20):
        return export(tmp_path_factory, "gpu-r20", R20, "--arch", "resnet20-cifar", "--patch", "5")
    pytest.importorskip("torch", reason="exporting a bundle needs torch; or set SCALECERT_GPU_BUNDLE")
    return export(tmp_path_factory, "gpu-tiny", _tiny_checkpoint(tmp_path_factory), "--arch", "resnet20-cifar", "--patch", "5")


def _tiny_checkpoint(tmp_path_factory) -> str:
    import torch

    from scalecert.exporter.archs import REGISTRY

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tinyck") / "tiny-r20.pt")
    torch.save({"state_dict": REGISTRY["resnet20-cifar"].build().state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def pixels(gpu_bundle):
    spec = manifest_io.read(gpu_bundle)["input"]
    try:
        return np.stack([load_image(p, spec) for p in cifar_files(5)])
    except pytest.skip.Exception:
        _, h, w = spec["input_size"]
        return np.random.default_rng(0).integers(0, 256, (40, h, w, 3), dtype=np.uint8)


def _paths(bundle, precision="fp32"):
    files = manifest_io.read(bundle).get("precisions", {}).get(precision) or {"prefix": "prefix.onnx", "suffix": "suffix.onnx"}
    return os.path.join(bundle, files["prefix"]), os.path.join(bundle, files["suffix"])


def _windows(manifest):
    w = manifest["windows"]
    family = geometry.window_family(tuple(w["footprint"]), w["stride"], tuple(manifest["layer"]["shape"][1:]))
    return np.concatenate([np.zeros((1, 4), np.int64), family])


def _measure_delta(pipeline, manifest, pixels) -> float:
    """The numeric margin for this pipeline, measured as `scalecert build` does (logit spread of the
    same windows across batch compositions)."""
    features, _ = pipeline.prefix(normalize(pixels[:4], manifest["input"]))
    windows = _windows(manifest)[:64]
    spread = max(measure_logit_spread(pipeline.suffix, pipeline.select(features, i), windows) for i in range(4))
    return delta_from_spread(spread)


def _with_margin(bundle, tmp_path, key, delta, extra=None) -> str:
    copy = str(tmp_path / f"bundle-{key}")
    shutil.copytree(bundle, copy)
    manifest = manifest_io.read(copy)
    manifest["margin"][key] = delta
    for k, v in (extra or {}).items():
        manifest[k] = v
    manifest_io.write(copy, manifest)
    return copy


def test_ort_cuda_prefix_and_suffix_match_cpu(gpu_bundle, pixels):
    manifest = manifest_io.read(gpu_bundle)
    image = normalize(pixels[:8], manifest["input"])
    windows = _windows(manifest)
    with gpu.OrtCudaPipeline(*_paths(gpu_bundle)) as cuda, OrtCpuPipeline(*_paths(gpu_bundle)) as cpu:
        fg, gg = cuda.prefix(image)
        fc, gc = cpu.prefix(image)
        host = np.concatenate([v.numpy() for v in fg.owner])
        np.testing.assert_allclose(host, fc, atol=1e-4, rtol=1e-4)
        assert (gg != gc).mean() < 1e-3  # gates may differ only where a score sits on the threshold
        for i in range(len(image)):
            np.testing.assert_allclose(cuda.suffix(cuda.select(fg, i), windows), cpu.suffix(cpu.select(fc, i), windows),
                                       atol=1e-3, rtol=1e-3)


def _outcomes(bundle, backend, pixels, precision="fp32"):
    with Certifier.load(bundle, backend=backend, precision=precision) as cert:
        return [(r.status, r.label, tuple(r.window_labels)) for r in cert.certify_batch(pixels)], cert.delta


def test_certifier_outcomes_equal_between_ort_cuda_and_cpu(gpu_bundle, pixels, tmp_path):
    manifest = manifest_io.read(gpu_bundle)
    with gpu.OrtCudaPipeline(*_paths(gpu_bundle)) as cuda:
        delta = _measure_delta(cuda, manifest, pixels)
    bundle = _with_margin(gpu_bundle, tmp_path, "ort-cuda-fp32", delta)
    want, _ = _outcomes(bundle, "ort-cpu", pixels)
    got, used = _outcomes(bundle, "ort-cuda", pixels)
    assert used == delta
    assert got == want, [i for i, (a, b) in enumerate(zip(want, got)) if a != b]


def test_ort_cuda_reduced_precision_variants(gpu_bundle, pixels, tmp_path):
    manifest = manifest_io.read(gpu_bundle)
    variants = [p for p in manifest.get("precisions", {}) if p != "fp32"]
    if not variants:
        pytest.skip("bundle has no fp16/int8 variants (add them with `scalecert build BUNDLE --precision P`)")
    image = normalize(pixels[:8], manifest["input"])
    windows = _windows(manifest)
    for precision in variants:
        with gpu.OrtCudaPipeline(*_paths(gpu_bundle, precision)) as cuda, OrtCpuPipeline(*_paths(gpu_bundle, precision)) as cpu:
            fg, _ = cuda.prefix(image)
            fc, _ = cpu.prefix(image)
            a, b = cuda.suffix(cuda.select(fg, 0), windows), cpu.suffix(cpu.select(fc, 0), windows)
            # same explicit-precision graph on two engines: labels agree wherever the margin is not tiny
            top = np.sort(b, axis=1)
            clear = (top[:, -1] - top[:, -2]) > 0.1
            assert (a.argmax(1) == b.argmax(1))[clear].all(), precision


def _tensorrt():
    try:
        import tensorrt  # noqa: F401
        import polygraphy  # noqa: F401
    except ImportError:
        pytest.skip("needs TensorRT and Polygraphy (pip install 'scalecert[tensorrt]' on the GPU machine)")


@pytest.fixture(scope="module")
def trt_bundle(gpu_bundle, tmp_path_factory):
    _tensorrt()
    from scalecert.trt_build import build_engines

    work = str(tmp_path_factory.mktemp("trt") / "bundle")
    shutil.copytree(gpu_bundle, work)
    entry = build_engines(gpu_bundle, work, "fp32", "prefix.onnx", "suffix.onnx", max_images=8, max_windows=48,
                          workspace_mb=512)
    manifest = manifest_io.read(work, verify=False)
    manifest.setdefault("engines", {})["trt-fp32"] = entry
    manifest["files"].update(manifest_io.describe_files(work, [entry["prefix"], entry["suffix"], *entry["onnx"].values()]))
    manifest_io.write(work, manifest)
    return work


def test_trt_matches_cpu_and_splits_window_batches(trt_bundle, pixels):
    manifest = manifest_io.read(trt_bundle)
    image = normalize(pixels[:4], manifest["input"])
    windows = _windows(manifest)  # more than the profile's 48: split into pieces
    with gpu.TrtPipeline.from_bundle(trt_bundle, manifest, "fp32") as trt, OrtCpuPipeline(*_paths(trt_bundle)) as cpu:
        ft, gt = trt.prefix(image)
        fc, gc = cpu.prefix(image)
        assert (gt != gc).mean() < 1e-3
        for i in range(len(image)):
            np.testing.assert_allclose(trt.suffix(trt.select(ft, i), windows), cpu.suffix(cpu.select(fc, i), windows),
                                       atol=1e-3, rtol=1e-3)


def test_certifier_outcomes_equal_between_trt_and_cpu(trt_bundle, pixels, tmp_path):
    manifest = manifest_io.read(trt_bundle)
    with gpu.TrtPipeline.from_bundle(trt_bundle, manifest, "fp32") as trt:
        delta = _measure_delta(trt, manifest, pixels)
    bundle = _with_margin(trt_bundle, tmp_path, "trt-fp32", delta)
    want, _ = _outcomes(bundle, "ort-cpu", pixels)
    got, used = _outcomes(bundle, "trt", pixels)
    assert used == delta
    assert got == want, [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
