"""The exported split computes what the PyTorch model computes.

With prune rate 0 and the empty window, suffix(prefix(x)) under ONNX Runtime (CPU, fp32) equals
the PyTorch logits to 1e-4 (max abs): random-weight ResNet-20s on generated images and the
pip-shipped pretrained EfficientNet-Lite0 on real photos (and, under -m slow with ../shared, the
pretrained ResNet-20 on real CIFAR-10 test images). A batch of windows in one suffix call gives,
per window, what that window gives alone.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from conftest import R20, cifar_files, need, real_cifar_files, skimage_photos
from scalecert.bundle import manifest as manifest_io
from scalecert.core import geometry
from scalecert.runtime.pipelines.onnxruntime import OrtRunner
from scalecert.runtime.images import load_image, normalize, resize_to_input

LOGIT_TOL = 1e-4
WINDOW_TOL = 1e-5
EMPTY = np.zeros((1, 4), np.int64)


def _split_logits(bundle: str, x: np.ndarray):
    """-> (logits (N, K), gate (N, H', W')) through prefix.onnx then suffix.onnx, one image a call."""
    logits, gates = [], []
    with OrtRunner(os.path.join(bundle, "prefix.onnx")) as prefix, \
            OrtRunner(os.path.join(bundle, "suffix.onnx")) as suffix:
        out = prefix.infer({"image": x})
        for feat in out["features"]:
            logits.append(suffix.infer({"features": feat[None], "windows": EMPTY})["logits"][0])
        gates = out["gate"]
    return np.stack(logits), gates


def _torch_logits(loaded, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return loaded.model(torch.from_numpy(x)).numpy()


def _check_dense(bundle: str, m: dict, x: np.ndarray, reference: np.ndarray):
    assert m["sin"]["prune_rate"] == 0 and m["sin"]["threshold"] == -1.0
    logits, gate = _split_logits(bundle, x)
    assert gate.dtype == np.uint8 and gate.shape == (len(x), *m["layer"]["shape"][1:])
    assert (gate == 1).all(), "prune rate 0 must keep every position"
    diff = float(np.abs(logits - reference).max())
    assert diff <= LOGIT_TOL, f"ONNX split differs from PyTorch by {diff:.3g} (> {LOGIT_TOL})"
    assert (logits.argmax(1) == reference.argmax(1)).all()
    return logits


@pytest.mark.parametrize("bundle_fixture, checkpoint_fixture", [("tiny_bundle", "tiny_checkpoint"),
                                                                  ("tiny_blank_bundle", "tiny_bn_checkpoint")])
def test_random_resnet20_split_equals_pytorch(bundle_fixture, checkpoint_fixture, request):
    """The split is exact for any weights: the random-weight ResNet-20 (plain, and with random
    BatchNorm statistics and a deeper layer) on 50 filler images."""
    from scalecert.export.loading import load_model

    bundle = request.getfixturevalue(bundle_fixture)
    m = manifest_io.read(bundle)
    files = cifar_files(5)
    x = normalize(np.stack([load_image(p, m["input"]) for p in files]), m["input"])
    loaded = load_model(request.getfixturevalue(checkpoint_fixture), "resnet20-cifar")
    _check_dense(bundle, m, x, _torch_logits(loaded, x))


@pytest.mark.slow
def test_resnet20_split_equals_pytorch_on_cifar(r20_bundle):
    """The pretrained checkpoint as the team has it (../shared), on real CIFAR-10: also checks that
    its weights really load (accuracy)."""
    from scalecert.export.loading import load_model

    m = manifest_io.read(r20_bundle)
    files = real_cifar_files(5)  # 50 images, 5 per class
    assert len(files) == 50
    x = normalize(np.stack([load_image(p, m["input"]) for p in files]), m["input"])
    loaded = load_model(need(R20), "resnet20-cifar")
    logits = _check_dense(r20_bundle, m, x, _torch_logits(loaded, x))
    labels = np.repeat(np.arange(10), 5)
    assert (logits.argmax(1) == labels).mean() >= 0.8  # the pretrained model, really loaded


def test_efficientnet_split_equals_pytorch_on_photos(effnet_bundle):
    from scalecert.export.loading import load_model

    m = manifest_io.read(effnet_bundle)
    photos = skimage_photos()
    x = normalize(np.stack([resize_to_input(Image.fromarray(a), m["input"]) for a in photos.values()]), m["input"])
    assert x.shape == (len(photos), 3, 224, 224)
    loaded = load_model(None, "efficientnet-lite0", pretrained=True)
    logits = _check_dense(effnet_bundle, m, x, _torch_logits(loaded, x))
    assert logits.shape[1] == 1000
    # chelsea is a cat: ImageNet cat classes are 281-285 (tabby, tiger cat, Persian, Siamese, Egyptian)
    assert logits[list(photos).index("chelsea")].argmax() in range(281, 286)


def _window_batch(m: dict, limit: int) -> np.ndarray:
    feature_hw = tuple(m["layer"]["shape"][1:])
    w = m["windows"]
    family = geometry.window_family(tuple(w["footprint"]), w["stride"], feature_hw)
    assert len(family) == w["count"]
    picks = family[np.linspace(0, len(family) - 1, min(limit, len(family))).round().astype(int)]
    fh, fw = feature_hw
    extra = np.array([[0, 0, 0, 0], [0, 0, fh, fw], [fh // 2, fw // 2, fh // 2 + 1, fw // 2 + 1]], np.int64)
    return np.concatenate([extra, picks]).astype(np.int64)


@pytest.mark.parametrize("bundle_fixture, limit", [("effnet_bundle", 14), ("tiny_pruned_bundle", 40),
                                                   ("tiny_blank_bundle", 40),
                                                   pytest.param("r20_bundle", 40, marks=pytest.mark.slow)])
def test_window_batch_equals_windows_alone(bundle_fixture, limit, request):
    bundle = request.getfixturevalue(bundle_fixture)
    m = manifest_io.read(bundle)
    spec = m["input"]
    if bundle_fixture == "r20_bundle":
        pixels = load_image(real_cifar_files(1)[3], spec)
    elif bundle_fixture.startswith("tiny"):
        pixels = load_image(cifar_files(1)[3], spec)
    else:
        pixels = resize_to_input(Image.fromarray(skimage_photos()["coffee"]), spec)
    windows = _window_batch(m, limit)
    with OrtRunner(os.path.join(bundle, "prefix.onnx")) as prefix, \
            OrtRunner(os.path.join(bundle, "suffix.onnx")) as suffix:
        features = prefix.infer({"image": normalize(pixels, spec)})["features"]
        batched = suffix.infer({"features": features, "windows": windows})["logits"]
        alone = np.concatenate([suffix.infer({"features": features, "windows": windows[i:i + 1]})["logits"]
                                for i in range(len(windows))])
        # the same windows in another order and another batch size
        order = np.random.default_rng(0).permutation(len(windows))[: max(2, len(windows) // 2)]
        shuffled = suffix.infer({"features": features, "windows": windows[order]})["logits"]
    assert batched.shape == (len(windows), m["num_classes"])
    assert float(np.abs(batched - alone).max()) <= WINDOW_TOL
    assert float(np.abs(shuffled - alone[order]).max()) <= WINDOW_TOL
    # masking is real: the empty window gives the dense logits, the full window something else,
    # and occluding different places gives different logits
    dense = alone[0]
    assert float(np.abs(alone[1] - dense).max()) > 1e-3
    assert len({tuple(np.round(row, 4)) for row in alone[3:]}) > 1
