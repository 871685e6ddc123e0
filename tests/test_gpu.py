"""GPU pipelines against the CPU reference (run with `pytest -m gpu` on an NVIDIA machine; every
test here skips cleanly elsewhere).

Tolerances, fp32 (TF32 off on both GPU paths: use_tf32=0 for ONNX Runtime, Polygraphy's default
for TensorRT): the prefix runs on ONNX Runtime CPU for every backend (docs/design.md §9), so
features and gates are bitwise the CPU pipeline's; logits within 1e-3 (absolute and relative) of ONNX Runtime
CPU; reduced-precision variants: the same top-1 wherever the CPU margin exceeds 0.1. Certification
outcomes (status, label, every window's label) must be equal across backends, each backend
certifying with its own measured margin delta.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import R20, export, real_cifar_files
from scalecert.bundle import Bundle
from scalecert.bundle import manifest as manifest_io
from scalecert.core.margin import delta_from_spread, measure_logit_spread
from scalecert.runtime import Certifier
from scalecert.runtime.images import load_image, normalize
from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline, OrtCudaPipeline
from scalecert.runtime.pipelines.tensorrt import TrtPipeline


def _cuda_ep() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda_ep(), reason="needs an NVIDIA GPU and onnxruntime-gpu "
                                                                        "(no CUDAExecutionProvider here)")]


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory, request):
    """$SCALECERT_GPU_BUNDLE (a bundle exported elsewhere: no torch needed here), else ResNet-20
    exported from ../shared, else the seeded random ResNet-20 (a copy of conftest's tiny_bundle)."""
    given = os.environ.get("SCALECERT_GPU_BUNDLE")
    if given:
        out = str(tmp_path_factory.mktemp("gpu") / "bundle")
        shutil.copytree(given, out)
        return out
    pytest.importorskip("torch", reason="exporting a bundle needs torch; or set SCALECERT_GPU_BUNDLE")
    if os.path.exists(R20):
        return export(tmp_path_factory, "gpu-r20", R20, "--arch", "resnet20-cifar", "--patch", "5")
    out = str(tmp_path_factory.mktemp("gpu") / "bundle")  # tiny_bundle, copied: the tests build into it
    shutil.copytree(request.getfixturevalue("tiny_bundle"), out)
    return out


@pytest.fixture(scope="module")
def pixels(gpu_bundle):
    spec = manifest_io.read(gpu_bundle)["input"]
    try:
        return np.stack([load_image(p, spec) for p in real_cifar_files(5)])
    except pytest.skip.Exception:
        _, h, w = spec["input_size"]
        return np.random.default_rng(0).integers(0, 256, (40, h, w, 3), dtype=np.uint8)


def _paths(bundle, precision="fp32"):
    files = Bundle.open(bundle).files(precision)
    return files["prefix"], files["suffix"]


def _windows(manifest):
    """The empty window, then the bundle's whole family."""
    return np.concatenate([np.zeros((1, 4), np.int64), Bundle(None, manifest).windows()])


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


def test_ort_cuda_prefix_runs_on_the_cpu_and_suffix_on_cuda(gpu_bundle, pixels):
    """docs/design.md §9: the prefix on ONNX Runtime CPU (bitwise the CPU pipeline's features and
    gates), the suffix on the CUDA execution provider, logits within 1e-3 of the CPU's."""
    manifest = manifest_io.read(gpu_bundle)
    image = normalize(pixels[:8], manifest["input"])
    windows = _windows(manifest)
    with OrtCudaPipeline(*_paths(gpu_bundle)) as cuda, OrtCpuPipeline(*_paths(gpu_bundle)) as cpu:
        assert cuda.prefix_runner.session.get_providers() == ["CPUExecutionProvider"]
        assert cuda.suffix_session.get_providers()[0] == "CUDAExecutionProvider"
        fg, gg = cuda.prefix(image)
        fc, gc = cpu.prefix(image)
        assert np.array_equal(fg.view(np.uint32), fc.view(np.uint32)) and np.array_equal(gg, gc)
        for i in range(len(image)):
            np.testing.assert_allclose(cuda.suffix(cuda.select(fg, i), windows), cpu.suffix(cpu.select(fc, i), windows),
                                       atol=1e-3, rtol=1e-3)


def test_doctor_passes_on_ort_cuda_after_build(gpu_bundle, tmp_path):
    """`scalecert build --backend ort-cuda` measures the margin and records the device probes;
    `scalecert doctor --backend ort-cuda` then passes every probe on this GPU."""
    from conftest import in_process
    from scalecert.runtime import doctor

    bundle = str(tmp_path / "built")
    shutil.copytree(gpu_bundle, bundle)
    in_process("build", bundle, "--backend", "ort-cuda", "--quiet")
    record = manifest_io.read(bundle)["doctor"]["ort-cuda-fp32"]
    assert record["locality"]["leaking"] == 0
    report = doctor.run(bundle, "ort-cuda", "fp32")
    print(report.render())
    assert report.passed, [c.line() for c in report.checks if c.ok is False]
    assert report.environment["suffix_runs_on"] == "ONNX Runtime CUDA"


def _outcomes(bundle, backend, pixels, precision="fp32"):
    with Certifier.load(bundle, backend=backend, precision=precision, evaluation=True) as cert:
        return [(r.status, r.label, tuple(r.window_labels)) for r in cert.certify_batch(pixels)]


def test_certifier_outcomes_equal_between_ort_cuda_and_cpu(gpu_bundle, pixels, tmp_path):
    manifest = manifest_io.read(gpu_bundle)
    with OrtCudaPipeline(*_paths(gpu_bundle)) as cuda:
        delta = _measure_delta(cuda, manifest, pixels)
    bundle = _with_margin(gpu_bundle, tmp_path, "ort-cuda-fp32", delta)
    want = _outcomes(bundle, "ort-cpu", pixels)
    got = _outcomes(bundle, "ort-cuda", pixels)
    assert got == want, [i for i, (a, b) in enumerate(zip(want, got)) if a != b]


def test_ort_cuda_reduced_precision_variants(gpu_bundle, pixels, tmp_path):
    manifest = manifest_io.read(gpu_bundle)
    variants = [p for p in manifest.get("precisions", {}) if p != "fp32"]
    if not variants:
        pytest.skip("bundle has no fp16/int8 variants (add them with `scalecert build BUNDLE --precision P`)")
    image = normalize(pixels[:8], manifest["input"])
    windows = _windows(manifest)
    for precision in variants:
        with OrtCudaPipeline(*_paths(gpu_bundle, precision)) as cuda, OrtCpuPipeline(*_paths(gpu_bundle, precision)) as cpu:
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
    from scalecert.compile.tensorrt import build_engines

    work = str(tmp_path_factory.mktemp("trt") / "bundle")
    shutil.copytree(gpu_bundle, work)
    entry = build_engines(gpu_bundle, work, "fp32", "suffix.onnx", max_windows=48, workspace_mb=512)
    manifest = manifest_io.read(work, verify=False)
    manifest.setdefault("engines", {})["trt-fp32"] = entry
    manifest["files"].update(manifest_io.describe_files(work, [entry["suffix"], *entry["onnx"].values()]))
    manifest_io.write(work, manifest)
    return work


def test_trt_matches_cpu_and_splits_window_batches(trt_bundle, pixels):
    manifest = manifest_io.read(trt_bundle)
    image = normalize(pixels[:4], manifest["input"])
    windows = _windows(manifest)  # more than the profile's 48: split into pieces
    with TrtPipeline.from_bundle(Bundle.open(trt_bundle), "fp32") as trt, OrtCpuPipeline(*_paths(trt_bundle)) as cpu:
        ft, gt = trt.prefix(image)
        fc, gc = cpu.prefix(image)
        assert np.array_equal(gt, gc) and np.array_equal(ft, fc)  # the same CPU prefix (design §9)
        for i in range(len(image)):
            np.testing.assert_allclose(trt.suffix(trt.select(ft, i), windows), cpu.suffix(cpu.select(fc, i), windows),
                                       atol=1e-3, rtol=1e-3)


def test_certifier_outcomes_equal_between_trt_and_cpu(trt_bundle, pixels, tmp_path):
    manifest = manifest_io.read(trt_bundle)
    with TrtPipeline.from_bundle(Bundle.open(trt_bundle), "fp32") as trt:
        delta = _measure_delta(trt, manifest, pixels)
    bundle = _with_margin(trt_bundle, tmp_path, "trt-fp32", delta)
    want = _outcomes(bundle, "ort-cpu", pixels)
    got = _outcomes(bundle, "trt", pixels)
    assert got == want, [i for i, (a, b) in enumerate(zip(want, got)) if a != b]


def test_doctor_passes_on_trt_after_build(gpu_bundle, tmp_path):
    """`scalecert build --backend trt` on this GPU (engines, margin, device probes), then `scalecert
    doctor --backend trt`: engines compatible, prefix local on its ONNX Runtime CPU session, spread
    within the margin, known answers as recorded."""
    _tensorrt()
    from conftest import in_process
    from scalecert.runtime import doctor

    bundle = str(tmp_path / "built-trt")
    shutil.copytree(gpu_bundle, bundle)
    in_process("build", bundle, "--backend", "trt", "--max-windows", "64", "--workspace-mb", "1024", "--quiet")
    report = doctor.run(bundle, "trt", "fp32")
    print(report.render())
    assert report.passed, [c.line() for c in report.checks if c.ok is False]
    assert {c.name for c in report.checks} >= {"engines", "locality", "spread", "known answer"}


def test_recovery_on_ort_cuda_matches_the_cpu(gpu_bundle, pixels, tmp_path):
    """Recovery (docs/design.md §10) on the CUDA suffix: pair rows (two rectangles per row) within
    1e-3 of ONNX Runtime CPU, and the recovered label, case and certificate equal the CPU's, each
    backend deciding with its own measured margin."""
    from scalecert.runtime.recovery import Recoverer

    manifest = manifest_io.read(gpu_bundle)
    if not Bundle.open(gpu_bundle).suffix_takes_pairs:
        pytest.skip("the GPU bundle was exported before recovery (its suffix takes one rectangle per row)")
    windows = Bundle(None, manifest).windows()[:24]
    pairs = np.stack([windows, windows[::-1]], axis=1)
    image = normalize(pixels[:2], manifest["input"])
    with OrtCudaPipeline(*_paths(gpu_bundle)) as cuda, OrtCpuPipeline(*_paths(gpu_bundle)) as cpu:
        fg, _ = cuda.prefix(image)
        fc, _ = cpu.prefix(image)
        np.testing.assert_allclose(cuda.suffix(cuda.select(fg, 0), pairs), cpu.suffix(cpu.select(fc, 0), pairs),
                                   atol=1e-3, rtol=1e-3)
        delta = _measure_delta(cuda, manifest, pixels)
    bundle = _with_margin(gpu_bundle, tmp_path, "ort-cuda-fp32", delta)

    def outcomes(backend):
        with Recoverer.load(bundle, backend=backend, certify=True) as recoverer:
            return [(r.label, r.case, r.certified) for r in (recoverer.recover(px) for px in pixels[:8])]

    assert outcomes("ort-cuda") == outcomes("ort-cpu")
