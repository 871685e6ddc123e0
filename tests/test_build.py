"""`scalecert build`: fp16/int8 variants added atomically with hashes and margins; certify and bench
take --precision; bad input leaves the bundle as it was. Real ONNX files and sessions, real photos."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import PHOTOS, export, in_process, run_cli
from scalecert.bundle import manifest as manifest_io
from scalecert.compile.precision import INT8_FLOAT_STEPS


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_checkpoint, photo_dir) -> str:
    bundle = export(tmp_path_factory, "built", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5",
                    "--stride", "6", "--calib", photo_dir, "--prune-rate", "0.3")
    for precision in ("fp16", "int8"):  # random weights: the int8 floor is not what these tests are about
        in_process("build", bundle, "--precision", precision, "--calib", photo_dir, "--accept-loss", "--quiet")
    return bundle


def _no_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is None


def _manifest(bundle):
    with open(os.path.join(bundle, "manifest.json")) as f:
        return json.load(f)


def test_variants_are_recorded_hashed_and_have_margins(built):
    m = manifest_io.read(built, verify=True)
    assert set(m["precisions"]) == {"fp32", "fp16", "int8"}
    for precision in ("fp16", "int8"):
        files = m["precisions"][precision]
        assert files["prefix"] in m["files"] and files["suffix"] in m["files"]
        assert f"ort-cpu-{precision}" in m["margin"] and m["margin"][f"ort-cpu-{precision}"] >= 0
        assert files["vs_fp32"]["top1_agreement"] >= 0.5
    assert m["precisions"]["fp16"]["vs_fp32"]["max_abs_logit_diff"] < 0.1
    assert not [d for d in os.listdir(os.path.dirname(built)) if d.startswith(".scalecert")]


def test_certify_with_each_precision(built, photo_dir):
    image = os.path.join(photo_dir, "chelsea.png")
    labels = {}
    for precision in ("fp32", "fp16", "int8"):
        proc = run_cli("scalecert", "certify", built, image, "--precision", precision, "--json", check=True)
        row = json.loads(proc.stdout.strip().splitlines()[0])
        assert row["status"] in ("certified", "alert") and row["windows_total"] == _manifest(built)["windows"]["count"]
        labels[precision] = row["label"]
    assert labels["fp16"] == labels["fp32"]


def test_missing_variant_and_int8_without_calib_are_one_line(tmp_path, tiny_bundle, photo_dir):
    bundle = str(tmp_path / "plain")
    shutil.copytree(tiny_bundle, bundle)
    before = open(os.path.join(bundle, "manifest.json")).read()
    cases = [((bundle, "--precision", "int8"), "--precision int8 needs --calib DIR"),
             ((bundle, "--precision", "int8", "--calib", str(tmp_path / "none")), "no such directory"),
             ((str(tmp_path / "nope"),), "no such bundle")]
    if _no_tensorrt():  # with TensorRT installed, --backend trt would build engines
        cases.append(((bundle, "--backend", "trt"), "the TensorRT backend needs TensorRT"))
    for args, words in cases:
        proc = run_cli("scalecert", "build", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    proc = run_cli("scalecert", "certify", bundle, os.path.join(photo_dir, "coffee.png"), "--precision", "int8")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "no int8 variant; add one with `scalecert build BUNDLE --precision int8`" in lines[0], proc.stderr
    assert open(os.path.join(bundle, "manifest.json")).read() == before
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".scalecert")]


def test_prune_rate_variants_move_every_precision_threshold(built, tmp_path):
    import onnx_ir as ir

    from scalecert.compile.variants import derive

    out = derive(built, str(tmp_path / "r50"), prune_rate=0.5)
    m = _manifest(out)
    for files in m["precisions"].values():
        tau = ir.load(os.path.join(out, files["prefix"])).graph.initializers["sin_threshold"].const_value.numpy()
        assert np.isclose(float(tau), m["sin"]["threshold_by_rate"][50])


def test_bench_sweeps_precisions(built, tmp_path, photo_dir):
    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    with open(data / "labels.csv", "w") as f:
        f.write("file,index\n" + "".join(f"{name}.png,{i}\n" for i, name in enumerate(PHOTOS)))
    report_path = str(tmp_path / "report.json")
    in_process("bench", built, "--data", str(data), "--precision", "fp32,int8", "-o", report_path, "--quiet")
    report = json.load(open(report_path))
    assert [c["precision"] for c in report["configs"]] == ["fp32", "int8"]
    assert all(c["images"] == 4 for c in report["configs"])


def test_int8_below_the_floor_is_refused_unless_accepted(tmp_path, tiny_bundle, photo_dir):
    """The variant is compared with fp32 on the calibration images (base and every window); below
    the agreement floor (here raised to 100% so that any flip counts) build refuses in one line and
    leaves the bundle as it was, after trying every float step; --accept-loss keeps it and says so."""
    from scalecert.compile.variants import derive

    bundle = derive(tiny_bundle, str(tmp_path / "b"), stride=1)  # every window position: some int8 flip to see
    before = open(os.path.join(bundle, "manifest.json")).read()
    proc = run_cli("scalecert", "build", bundle, "--precision", "int8", "--calib", photo_dir, "--min-agreement", "1")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: int8 variant refused: top-1 agreement") and "--accept-loss" in lines[0]
    assert "int8 (cpu, float kept: high_resolution) vs fp32 on 4" in proc.stdout  # both numbers printed before the verdict
    assert open(os.path.join(bundle, "manifest.json")).read() == before
    proc = run_cli("scalecert", "build", bundle, "--precision", "int8", "--calib", photo_dir, "--min-agreement", "1",
                   "--accept-loss")
    assert proc.returncode == 0 and "warning: int8 kept with --accept-loss" in proc.stdout, proc.stderr
    variant = _manifest(bundle)["precisions"]["int8"]
    assert variant["accepted_loss"] and variant["family"] == "cpu" and variant["vs_fp32"]["top1_agreement"] < 1
    # no float step met the raised floor, so each was tried, fastest first, and the last is kept
    assert [step["float_kept"] for step in variant["float_steps"]] == list(INT8_FLOAT_STEPS)
    assert variant["float_kept"] == INT8_FLOAT_STEPS[-1]
