"""Certification outcomes of the engine path equal a plain-PyTorch reference of the same method:
status, label, the prediction of every window (so the set of disagreeing windows) and the gates."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import IMAGENET, R20, cifar_files, export, need, real_cifar_files
from scalecert.export.loading import load_model
from scalecert.training.reference import TorchReference
from scalecert.runtime import Certifier

# CI compares a sample; SCALECERT_REFERENCE_FULL=1 runs the full sizes (200 CIFAR, 10 ImageNet).
FULL = os.environ.get("SCALECERT_REFERENCE_FULL") == "1"


def _compare(bundle, loaded, files):
    cert = Certifier.load(bundle, evaluation=True)
    ref = TorchReference(loaded, bundle)
    pixels = np.stack([cert.prepare(f) for f in files])
    outcomes = {"certified": 0, "alert": 0}
    for f, px, r in zip(files, pixels, cert.certify_batch(pixels)):
        q = ref.certify(px)
        assert (r.gate.astype(bool) == q["gate"]).all(), f"gate differs on {f}"
        assert r.label == q["label"], f
        assert (r.window_labels == q["window_labels"]).all(), f"window predictions differ on {f}"
        assert r.status == q["status"], f
        ref_alerts = {tuple(w) for w in ref.windows[q["window_labels"] != q["label"]].tolist()}
        assert {tuple(w) for w in r.alert_windows} == ref_alerts
        outcomes[r.status] += 1
    return outcomes


def test_random_resnet20_matches_reference(tiny_pruned_bundle, tiny_checkpoint):
    """The method, not the weights: the random-weight ResNet-20, 30% of positions gated, windows
    zeroed, on 40 generated images."""
    per_class = 20 if FULL else 4
    outcomes = _compare(tiny_pruned_bundle, load_model(tiny_checkpoint, "resnet20-cifar"), cifar_files(per_class))
    assert sum(outcomes.values()) == 10 * per_class
    assert outcomes["certified"] > 0 and outcomes["alert"] > 0  # both branches exercised


def test_filled_windows_under_a_sparse_gate_match_reference(tiny16_bundle, tiny16_model):
    """Dedupe with a fill under a sparse gate (a window's answer depends on the whole window, not
    only its kept positions): the tiny CNN of tests/data/tiny_bundle, exported now (a quarter of the
    positions gated, --fill blank), on 40 generated images."""
    from scalecert.bundle import Bundle

    bundle = Bundle.open(tiny16_bundle)
    assert bundle.window_filled and bundle.manifest["sin"]["prune_rate"] > 0
    per_class = 20 if FULL else 4
    outcomes = _compare(tiny16_bundle, load_model(tiny16_model, input_size=bundle.manifest["input"]["input_size"]),
                        cifar_files(per_class))
    assert sum(outcomes.values()) == 10 * per_class
    assert outcomes["certified"] > 0 and outcomes["alert"] > 0, outcomes


@pytest.mark.slow
def test_resnet20_200_cifar_images_match_reference(r20_pruned_bundle):
    per_class = 20 if FULL else 4
    outcomes = _compare(r20_pruned_bundle, load_model(R20, "resnet20-cifar"), real_cifar_files(per_class))
    assert sum(outcomes.values()) == 10 * per_class
    assert outcomes["certified"] > 0 and outcomes["alert"] > 0  # both branches exercised


@pytest.mark.slow
def test_efficientnet_10_imagenet_images_match_reference(tmp_path_factory):
    images = os.path.join(need(IMAGENET), "images")
    files = sorted(os.listdir(images))
    calib = tmp_path_factory.mktemp("calib")
    for name in files[-24:]:  # calibrate on images the comparison does not use
        os.symlink(os.path.join(images, name), calib / name)
    bundle = export(tmp_path_factory, "effp", "--arch", "efficientnet-lite0", "--pretrained", "--patch", "32",
                    "--calib", str(calib), "--layer", "getitem_15", "--prune-rate", "0.2", "--stride", "8")
    loaded = load_model(None, "efficientnet-lite0", pretrained=True)
    count = 10 if FULL else 3
    outcomes = _compare(bundle, loaded, [os.path.join(images, f) for f in files[:count]])
    assert sum(outcomes.values()) == count
