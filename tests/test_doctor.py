"""`scalecert doctor` on ONNX Runtime CPU (what CI has): a good bundle passes; a non-local prefix
fails the locality probe; altered probe answers fail the known-answer probe; a tampered file fails
integrity; `scalecert build` records the same probes and refuses a non-local prefix. And the GPU
rule of docs/design.md §9 (the prefix of every backend runs on ONNX Runtime CPU) for the GPU
pipelines, with the CPU provider or host memory standing in for CUDA (named as such)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx_ir as ir
import pytest

from conftest import bits, export, in_process, run_cli
from scalecert.bundle import Bundle
from scalecert.bundle import manifest as manifest_io
from scalecert.errors import ScaleCertError
from scalecert.runtime import doctor, probes
from scalecert.runtime.pipelines import onnxruntime as ort_pipelines
from scalecert.runtime.pipelines import tensorrt as trt_pipelines
from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline, OrtCudaPipeline


def _copy(bundle: str, tmp_path, name: str) -> str:
    out = str(tmp_path / name)
    shutil.copytree(bundle, out)
    return out


def _rehash(bundle: str) -> None:
    manifest = manifest_io.read(bundle, verify=False)
    manifest["files"] = manifest_io.describe_files(bundle, list(manifest["files"]))
    manifest_io.write(bundle, manifest)


def _doctor(bundle: str, precision: str = "fp32") -> tuple[int, dict]:
    """The report `scalecert doctor BUNDLE --backend ort-cpu --json` prints, and its exit status
    (in this process; the CLI itself is run in test_doctor_passes_on_a_good_bundle)."""
    report = doctor.run(bundle, "ort-cpu", precision).to_json()
    return (0 if report["passed"] else 1), json.loads(json.dumps(report))


def _checks(report: dict) -> dict:
    return {c["name"]: c for c in report["checks"]}


def _make_prefix_non_local(path: str) -> None:
    """features + their global average over positions: every feature moves with every pixel."""
    model = ir.load(path)
    graph = model.graph
    features = next(v for v in graph.outputs if v.name == "features")
    features.name = "features_local"
    average = ir.node("GlobalAveragePool", [features])
    total = ir.node("Add", [features, average.outputs[0]])
    total.outputs[0].name, total.outputs[0].type, total.outputs[0].shape = "features", features.type, features.shape
    graph.extend([average, total])
    graph.outputs[[v.name for v in graph.outputs].index("features_local")] = total.outputs[0]
    ir.save(model, path)


@pytest.fixture(scope="module")
def non_local_bundle(tiny_bundle, tmp_path_factory) -> str:
    out = _copy(tiny_bundle, tmp_path_factory.mktemp("nonlocal"), "bundle")
    _make_prefix_non_local(os.path.join(out, "prefix.onnx"))
    _rehash(out)
    return out


def test_doctor_passes_on_a_good_bundle(tiny_bundle):
    proc = run_cli("scalecert", "doctor", tiny_bundle, "--backend", "ort-cpu", "--json")
    rc, report = proc.returncode, json.loads(proc.stdout)
    checks = _checks(report)
    assert rc == 0 and report["passed"], [c for c in report["checks"] if c["ok"] is False]
    assert {"integrity", "backend", "margin", "locality", "spread", "known answer", "latency"} <= set(checks)
    assert checks["locality"]["data"]["positions"] >= 40 and checks["locality"]["data"]["moved_inside"] > 0
    assert checks["known answer"]["data"]["images"] == probes.COUNT
    assert report["environment"]["prefix_runs_on"].startswith("ONNX Runtime CPU")
    assert doctor.run(tiny_bundle, "ort-cpu").render().endswith("all probes passed")


def test_export_stores_hashed_probe_images_with_answers(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    assert len(bundle.probe_images) == probes.COUNT
    assert all(name in bundle.manifest["files"] for name in bundle.probe_images)
    answers = bundle.probe_answers("ort-cpu", "fp32")
    assert len(answers) == probes.COUNT and len(answers[0]["window_labels"]) == len(bundle.windows())
    assert bundle.manifest["probes"]["rows_from_margin"] == 1 + len(bundle.windows())  # windows <= 63


def test_the_full_samples_unless_suffix_rows_are_expensive():
    """export/measure.py::check_sample: a ResNet-50 cut after its maxpool (~4 GMACs a row, 36
    windows) keeps the full margin and 4 probe images; a ViT-B/16 at its patch embedding (16 GMACs
    a row) gets the reduced sample and 2 (docs/design.md §3.6)."""
    from scalecert.export.measure import check_sample

    resnet = check_sample(4e9, 36)
    assert resnet.every_row and resnet.probe_images == probes.COUNT and resnet.describe() is None
    vit = check_sample(16.06e9, 36)
    assert not vit.every_row and vit.probe_images == probes.FEWEST and "2 probe images" in vit.describe()


def test_reduced_sample_bundle_records_it_and_passes_doctor(tmp_path_factory, tiny_checkpoint, monkeypatch):
    """With every suffix counted expensive, export records the reduced margin sample (every row run
    twice) and 2 probe images; doctor's spread and known-answer probes pass on it."""
    from scalecert.export import measure

    monkeypatch.setattr(measure, "FULL_CHECKS_MACS", 0.0)
    out = export(tmp_path_factory, "reduced-sample", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5")
    bundle = Bundle.open(out)
    record = bundle.manifest["margin_measurement"]["ort-cpu-fp32"]
    assert record["every_row"] is False
    assert record["rows_evaluated"] == 2 * record["windows_sampled"] == 2 * (1 + min(63, len(bundle.windows())))
    assert len(bundle.probe_images) == probes.FEWEST == len(bundle.probe_answers("ort-cpu", "fp32"))
    # probe image 0's rows are the margin's reference run on it, replayed call for call
    assert bundle.manifest["probes"]["rows_from_margin"] == 1 + len(bundle.windows())
    rc, report = _doctor(out)
    assert rc == 0, [c for c in report["checks"] if c["ok"] is False]
    assert _checks(report)["known answer"]["data"]["images"] == probes.FEWEST


def test_non_local_prefix_fails_the_proof_and_the_locality_probe(non_local_bundle):
    rc, report = _doctor(non_local_bundle)
    proof = _checks(report)["proof"]
    assert rc == 1 and not report["passed"]
    assert proof["ok"] is False and "not the file whose locality was proven" in proof["detail"]
    assert _checks(report)["integrity"]["ok"]  # re-hashed: the proof record still tells
    # the probe, run on the swapped prefix directly, finds the leaks too
    from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline

    bundle = Bundle.open(non_local_bundle)
    with OrtCpuPipeline(os.path.join(non_local_bundle, "prefix.onnx"), os.path.join(non_local_bundle, "suffix.onnx")) as pipe:
        locality = probes.probe_locality(pipe, bundle, probes.probe_pixels(bundle))
    assert locality.ok is False and locality.data["leaking"] >= locality.data["positions"]
    assert "do not certify on this device" in locality.fix


def test_altered_probe_answers_fail_the_known_answer_probe(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path, "altered")
    manifest = manifest_io.read(bundle)
    first = manifest["probes"]["answers"]["ort-cpu-fp32"][0]
    first["label"] = (first["label"] + 1) % 10
    first["base_margin"] = 5.0  # clear of any margin: the difference cannot be excused
    manifest_io.write(bundle, manifest)
    rc, report = _doctor(bundle)
    known = _checks(report)["known answer"]
    assert rc == 1 and known["ok"] is False and "probe 0: label" in known["detail"]
    assert [c["name"] for c in report["checks"] if c["ok"] is False] == ["known answer"]
    proc = run_cli("scalecert", "doctor", bundle)
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL ")]
    assert proc.returncode == 1 and len(failures) == 1 and failures[0].startswith("FAIL known answer:")
    assert " -> " in failures[0]  # what to do


@pytest.mark.parametrize("victim", ["suffix.onnx", "probes/probe-2.png"])
def test_tampered_file_fails_integrity(tiny_bundle, tmp_path, victim):
    bundle = _copy(tiny_bundle, tmp_path, "tampered")
    with open(os.path.join(bundle, victim), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0x01]))
    rc, report = _doctor(bundle)
    integrity = _checks(report)["integrity"]
    assert rc == 1 and integrity["ok"] is False and victim in integrity["detail"] and integrity["fix"]
    assert _checks(report)["probes"]["detail"].startswith("not run")


def test_doctor_refuses_a_folder_that_is_no_bundle(tmp_path):
    proc = run_cli("scalecert", "doctor", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1


def test_build_records_the_probes_and_refuses_a_non_local_prefix(tiny_bundle, non_local_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path, "built")
    in_process("build", bundle, "--precision", "fp16", "--quiet")
    manifest = manifest_io.read(bundle)
    record = manifest["doctor"]["ort-cpu-fp16"]
    assert record["locality"]["leaking"] == 0 and record["known_answers"] == probes.COUNT
    assert len(manifest["probes"]["answers"]["ort-cpu-fp16"]) == probes.COUNT
    rc, report = _doctor(bundle, "fp16")
    assert rc == 0 and _checks(report)["known answer"]["data"]["reference"] == "ort-cpu-fp16"
    broken = _copy(non_local_bundle, tmp_path, "broken")
    with pytest.raises(ScaleCertError, match="locality was proven|not provably local|is not local"):
        in_process("build", broken, "--precision", "fp16", "--quiet")
    assert "fp16" not in manifest_io.read(broken).get("precisions", {})  # nothing swapped in


def test_known_answer_differences_respect_the_margin():
    want = [{"status": "certified", "label": 3, "base_margin": 0.5, "window_labels": [3, 3], "window_margins": [0.5, 0.05]}]
    flipped_close = [{"status": "uncertified", "label": 3, "base_margin": 0.5, "window_labels": [3, 4], "window_margins": [0.5, 0.0]}]
    assert probes.differences(want, flipped_close, slack=0.1) == []  # within the margin: allowed
    assert len(probes.differences(want, flipped_close, slack=0.01)) == 2  # a window label and the status
    assert probes.differences(want, [{**want[0], "label": 2}], slack=0.1)


# -- the GPU rule (docs/design.md §9) with stand-ins for CUDA ---------------------------------------


def test_ort_cuda_prefix_session_is_cpu_with_the_cpu_provider_standing_in_for_cuda(tiny_bundle, monkeypatch):
    """OrtCudaPipeline asks for a CPU session for the prefix and a CUDA one for the suffix (the CPU
    provider stands in for CUDA here); its prefix output is bitwise the CPU pipeline's."""
    asked = []
    real = ort_pipelines.load_session

    def load_session(path, device="cpu", *args, **kwargs):
        asked.append((os.path.basename(path), device))
        return real(path, "cpu", *args, **kwargs)

    monkeypatch.setattr(ort_pipelines, "load_session", load_session)
    prefix, suffix = (os.path.join(tiny_bundle, f"{part}.onnx") for part in ("prefix", "suffix"))
    pipeline = OrtCudaPipeline(prefix, suffix, device="cuda")
    pipeline.activate()
    try:
        assert sorted(asked) == [("prefix.onnx", "cpu"), ("suffix.onnx", "cuda")]
        assert pipeline.prefix_runner.session.get_providers() == ["CPUExecutionProvider"]
        image = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
        with OrtCpuPipeline(prefix, suffix) as cpu:
            (features, gate), (want_features, want_gate) = pipeline.prefix(image), cpu.prefix(image)
        assert isinstance(features, np.ndarray)
        assert np.array_equal(bits(features), bits(want_features)) and np.array_equal(gate, want_gate)
    finally:
        pipeline.deactivate()


def test_trt_pipeline_runs_the_bundle_prefix_onnx_on_the_cpu_with_stand_ins(tiny_bundle, monkeypatch):
    """TrtPipeline.from_bundle (TensorRT and the GPU identity stood in for): the prefix is the
    bundle's ONNX for that precision on an ONNX Runtime CPU runner, never an engine."""
    bundle = Bundle.open(tiny_bundle)
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["engines"] = {"trt-fp32": {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": [8, 7],
                                        "precision": "fp32", "prefix": "engines/p.plan", "suffix": "engines/s.plan",
                                        "profiles": {"suffix": {"windows": {"max": [64, 4]}}}}}
    monkeypatch.setattr(trt_pipelines, "require_tensorrt", lambda: type("trt", (), {"__version__": "10.3.0"}))
    monkeypatch.setattr(trt_pipelines, "gpu_identity", lambda device=0: ("Orin", (8, 7)))
    pipeline = trt_pipelines.TrtPipeline.from_bundle(Bundle(tiny_bundle, manifest), "fp32")
    assert isinstance(pipeline.prefix_runner, ort_pipelines.OrtRunner)
    assert pipeline.prefix_runner.path == os.path.join(tiny_bundle, "prefix.onnx")
    assert pipeline.suffix_engine.plan_path == os.path.join(tiny_bundle, "engines/s.plan")
    assert not hasattr(pipeline, "prefix_engine")


def test_ort_cuda_suffix_runs_fixed_size_row_batches_with_the_cpu_standing_in_for_cuda(tiny_bundle):
    """OrtCudaPipeline.suffix always hands the session ROWS rows (cuDNN re-plans on every shape
    change), pads with the last real row and returns exactly the CPU pipeline's logits for 1, 5,
    ROWS and ROWS + 6 windows (the CPU device stands in for CUDA)."""
    from scalecert.bundle import Bundle

    prefix, suffix = (os.path.join(tiny_bundle, f"{part}.onnx") for part in ("prefix", "suffix"))
    windows = Bundle.open(tiny_bundle).windows()
    windows = np.concatenate([windows] * (1 + (OrtCudaPipeline.ROWS + 6) // len(windows)))
    image = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    seen = []
    with OrtCudaPipeline(prefix, suffix, device="cpu") as stand_in, OrtCpuPipeline(prefix, suffix) as cpu:
        run = stand_in._run_suffix
        stand_in._run_suffix = lambda features, rows: seen.append(len(rows)) or run(features, rows)
        features, _ = stand_in.prefix(image)
        want_features, _ = cpu.prefix(image)
        for count in (1, 5, OrtCudaPipeline.ROWS, OrtCudaPipeline.ROWS + 6):
            got = stand_in.suffix(stand_in.select(features, 0), windows[:count])
            assert np.array_equal(got, cpu.suffix(cpu.select(want_features, 0), windows[:count])), count
    assert len(seen) == 5 and set(seen) == {OrtCudaPipeline.ROWS}
