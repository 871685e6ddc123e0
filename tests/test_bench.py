"""`scalecert bench`: the identity-prefix cross-check against the pixel-masking baseline, and a
small end-to-end run whose report is validated against the documented schema."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from conftest import cifar_files, in_process, run_cli
from scalecert.core import geometry
from scalecert.evaluation.baseline import PixelMaskingBaseline, mask_set, mask_stride
from scalecert.export.loading import load_model
from scalecert.runtime import Certifier
from scalecert.runtime.images import normalize


def test_mask_set_is_patchcleanser_r_covering():
    masks = mask_set((32, 32), (5, 5), (6, 6))
    assert len(masks) == 36 and mask_stride((32, 32), (5, 5)) == (5, 5)
    assert set(masks[:, 0]) == {0, 5, 10, 15, 20, 23} and (masks[:, 2] - masks[:, 0] == 9).all()
    for y in range(28):  # every 5x5 patch lies inside some mask
        for x in range(28):
            assert ((masks[:, 0] <= y) & (masks[:, 2] >= y + 5) & (masks[:, 1] <= x) & (masks[:, 3] >= x + 5)).any()


def test_identity_prefix_windows_are_the_baseline_masks(tiny_identity_bundle):
    cert = Certifier.load(tiny_identity_bundle)
    masks = mask_set((32, 32), (5, 5), (6, 6))
    assert sorted(map(tuple, cert.windows.tolist())) == sorted(map(tuple, masks.tolist()))


def test_identity_prefix_certifies_exactly_the_baseline_images(tiny_identity_bundle, tiny_checkpoint):
    """The claim holds for any weights: the bundle (ONNX Runtime, identity prefix) and the baseline
    (torch, the same model, pixel masks) certify the same images with the same labels. The random
    ResNet-20 certifies some of the 60 filler images and not others, with several labels."""
    cert = Certifier.load(tiny_identity_bundle)
    loaded = load_model(tiny_checkpoint, "resnet20-cifar")
    masks = mask_set((32, 32), (5, 5), (6, 6))
    files = cifar_files(6)
    pixels = np.stack([cert.prepare(f) for f in files])
    x = normalize(pixels, cert.input_spec)
    ours = cert.certify_batch(pixels)
    with PixelMaskingBaseline.torch_eager(loaded.model, masks) as baseline:
        theirs = [baseline.certify(x[i:i + 1]) for i in range(len(x))]
    assert [r.label for r in ours] == [t["label"] for t in theirs]
    assert [r.status == "certified" for r in ours] == [t["certified"] for t in theirs]
    assert 0 < sum(r.status == "certified" for r in ours) < len(ours)
    assert len({r.label for r in ours}) > 1


def test_bench_end_to_end_report_schema(tmp_path_factory, tiny_pruned_bundle, tiny_checkpoint, capsys):
    """The command (in this process) on tiny_pruned_bundle (relu, stride 3, calibrated gate): a
    sweep of rates and strides, both baselines, the report file, the plot and --json."""
    data = tmp_path_factory.mktemp("bench_data")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        os.makedirs(data / cls)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / cls / f"{i}.png")
    report_path, plot_path = str(data / "report.json"), str(data / "plot.png")
    in_process("bench", tiny_pruned_bundle, "--data", str(data), "--prune-rate", "0,0.3", "--stride", "3,6",
               "--baseline", "--baseline-engine", "both", "--model", tiny_checkpoint, "--arch", "resnet20-cifar",
               "-o", report_path, "--plot", plot_path, "--json")
    report = json.load(open(report_path))
    assert json.loads(capsys.readouterr().out) == report
    assert report["schema"] == "scalecert-bench/1"
    assert len(report["configs"]) == 4 and set(report["baseline"]) == {"torch", "ort"}
    keys = {"images", "clean_accuracy", "certified_accuracy", "false_alert_rate", "accuracy_non_alerted",
            "latency_ms_median", "latency_ms_p95", "latency_ms_mean", "images_per_s", "peak_rss_mb"}
    for config in report["configs"]:
        assert keys | {"windows_total", "windows_evaluated_mean", "windows_evaluated_p95", "prefix_ms_median",
                       "suffix_ms_median", "prune_rate", "stride"} <= set(config)
        assert config["images"] == 6 and config["certified_accuracy"] <= config["clean_accuracy"]
    assert {c["windows_total"] for c in report["configs"]} == {
        geometry.count_windows((7, 7), 3, (32, 32)), geometry.count_windows((7, 7), 6, (32, 32))}
    for engine in ("torch", "ort"):
        assert keys <= set(report["baseline"][engine]) and report["baseline"][engine]["masks"] == 36
    assert set(report["ratios"]["0"]) == {"vs_torch", "vs_ort"}
    assert {"cpu", "cores"} <= set(report["machine"]) and "onnxruntime" in report["versions"]
    assert os.path.getsize(plot_path) > 10_000


def test_bench_bad_input_one_line(tmp_path):
    proc = run_cli("scalecert", "bench", str(tmp_path / "missing"), "--data", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing: no such bundle directory" in lines[0], proc.stderr
