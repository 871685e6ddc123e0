"""The SIN gate is per-position with static parameters: a patch changes `gate` and `features`
of prefix.onnx only inside its footprint.

Bundles with a non-zero prune rate are exported through the real CLI; prefix.onnx runs under
ONNX Runtime on an image and on copies with a patch pasted at every position (borders included),
and every position outside the patch's footprint must be bitwise identical to the clean run. A
gate that normalised by an image-wide statistic (per-image top-k, a mean, a dynamic quantisation
scale) would fail this, and the certificate with it.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from conftest import cifar_files, export
from scalecert import manifest as manifest_io
from scalecert.runtime import geometry
from scalecert.runtime.backends import OrtRunner
from scalecert.runtime.preprocess import load_image, normalize


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory) -> str:
    """24 smooth random 32x32 PNG images (blocky colour fields plus noise), no ../shared needed."""
    folder = tmp_path_factory.mktemp("gate-calib")
    rng = np.random.default_rng(0)
    for i in range(24):
        blocks = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
        pixels = np.asarray(blocks, np.float64) + rng.normal(0, 20, (32, 32, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return str(folder)


@pytest.fixture(scope="session")
def tiny_pruned_bundle(tmp_path_factory, tiny_checkpoint, calib_dir) -> str:
    """Random-weight ResNet-20, auto (shallow) layer, 30% of positions gated off."""
    return export(tmp_path_factory, "gate-tiny", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5",
                  "--calib", calib_dir, "--prune-rate", "0.3")


@pytest.fixture(scope="session")
def tiny_deep_pruned_bundle(tmp_path_factory, tiny_checkpoint, calib_dir) -> str:
    """A deeper layer (stride-2 stage), half the positions gated and a quarter of the channels
    given zero importance (the prefix ANDs the gate with a static live-channel mask)."""
    return export(tmp_path_factory, "gate-deep", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "3x6",
                  "--layer", "layer2.0", "--calib", calib_dir, "--prune-rate", "0.5", "--channel-prune", "0.25",
                  "--stride", "2")


BUNDLES = ["tiny_pruned_bundle", "tiny_deep_pruned_bundle", "r20_pruned_bundle"]


def _positions(patch_hw, image_hw, rng, every: int):
    """Every `every`-th position on a grid, plus all four borders in full and some random ones."""
    (ph, pw), (h, w) = patch_hw, image_hw
    last_y, last_x = h - ph, w - pw
    positions = {(y, x) for y in range(0, last_y + 1, every) for x in range(0, last_x + 1, every)}
    positions |= {(y, x) for y in range(last_y + 1) for x in (0, last_x)}
    positions |= {(y, x) for y in (0, last_y) for x in range(last_x + 1)}
    positions |= {(int(rng.integers(0, last_y + 1)), int(rng.integers(0, last_x + 1))) for _ in range(20)}
    return sorted(positions)


def _contents(rng, patch_hw, spec, kind: int) -> np.ndarray:
    """Patch contents in network input space: random pixels, saturated pixels, or far outside
    the pixel range (the threat model allows arbitrary values)."""
    ph, pw = patch_hw
    if kind == 2:
        return rng.uniform(-30, 30, (3, ph, pw)).astype(np.float32)
    pixels = rng.integers(0, 256, (ph, pw, 3)) if kind == 0 else rng.choice([0, 255], (ph, pw, 3))
    return normalize(_pad_pixels(pixels, spec), spec)[0, :, :ph, :pw]


def _pad_pixels(patch_pixels: np.ndarray, spec) -> np.ndarray:
    """normalize() wants a whole image; the patch is cut back out after normalising."""
    _, h, w = spec["input_size"]
    image = np.zeros((h, w, 3), np.uint8)
    ph, pw = patch_pixels.shape[:2]
    image[:ph, :pw] = patch_pixels.astype(np.uint8)
    return image


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint8 if array.dtype == np.uint8 else np.uint32)


@pytest.mark.parametrize("bundle_fixture", BUNDLES)
def test_gate_and_features_change_only_inside_the_footprint(bundle_fixture, request):
    bundle = request.getfixturevalue(bundle_fixture)
    m = manifest_io.read(bundle)
    spec = m["input"]
    assert m["sin"]["prune_rate"] > 0
    patch_hw = tuple(m["threat_model"]["patch"])
    _, h, w = spec["input_size"]
    rf = m["layer"]["receptive_field"]
    rf_yx = (tuple(rf["y"]), tuple(rf["x"]))
    feature_hw = tuple(m["layer"]["shape"][1:])
    rng = np.random.default_rng(5)
    if bundle_fixture == "r20_pruned_bundle":
        files = cifar_files(1)[:3]  # real test images (the bundle was calibrated on the train set)
    else:
        folder = request.getfixturevalue("calib_dir")
        files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:2]]
    clean_pixels = [load_image(p, spec) for p in files]
    every = 1 if feature_hw[0] == h else 2  # every position at the shallow layer, every other deeper
    total_positions = gate_changed = outside_checked = 0
    with OrtRunner(os.path.join(bundle, "prefix.onnx")) as prefix:
        for pixels in clean_pixels:
            clean = normalize(pixels, spec)
            ref = prefix.infer({"image": clean})  # alone, batch of one
            ref_gate, ref_feat = ref["gate"][0], ref["features"][0]
            assert ref_gate.shape == feature_hw and set(np.unique(ref_gate)) <= {0, 1}
            assert 0 < ref_gate.mean() < 1, "a pruned bundle should gate off some, not all, positions"
            positions = _positions(patch_hw, (h, w), rng, every)
            jobs = []
            for i, (py, px) in enumerate(positions):
                image = clean[0].copy()
                image[:, py:py + patch_hw[0], px:px + patch_hw[1]] = _contents(rng, patch_hw, spec, i % 3)
                jobs.append(((py, px), image))
            for start in range(0, len(jobs), 64):  # in batches: other images must not matter either
                part = jobs[start:start + 64]
                out = prefix.infer({"image": np.stack([img for _, img in part])})
                for ((py, px), _), gate, feat in zip(part, out["gate"], out["features"]):
                    y0, x0, y1, x1 = geometry.footprint((py, px), patch_hw, rf_yx, feature_hw)
                    outside = np.ones(feature_hw, bool)
                    outside[y0:y1, x0:x1] = False
                    gate_diff = gate != ref_gate
                    feat_diff = (_bits(feat) != _bits(ref_feat)).any(axis=0)
                    assert not (gate_diff & outside).any(), (
                        f"patch at {(py, px)} changed the gate at {np.argwhere(gate_diff & outside)[:5].tolist()}, "
                        f"outside its footprint {(y0, x0, y1, x1)}")
                    assert not (feat_diff & outside).any(), (
                        f"patch at {(py, px)} changed features at {np.argwhere(feat_diff & outside)[:5].tolist()}, "
                        f"outside its footprint {(y0, x0, y1, x1)}")
                    total_positions += 1
                    outside_checked += int(outside.sum())
                    gate_changed += bool(gate_diff.any())
    # the test could fail: patches do flip gates (inside their footprints)
    assert gate_changed >= max(1, total_positions // 10), f"only {gate_changed}/{total_positions} patches flipped a gate"
    assert outside_checked > 0
