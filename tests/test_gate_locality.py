"""The SIN gate is per-position with static parameters (docs/design.md §3.3): a patch changes
`gate` and `features` of prefix.onnx only inside its footprint.

Bundles with a non-zero prune rate (conftest's tiny_pruned_bundle, tiny_deep_pruned_bundle,
tiny_blank_gated_bundle; r20_pruned_bundle under -m slow) are exported with the CLI's export command; prefix.onnx runs under
ONNX Runtime on an image and on copies with a patch pasted at every position (borders included),
and every position outside the patch's footprint must be bitwise identical to the clean run. A
gate that normalised by an image-wide statistic (per-image top-k, a mean, a dynamic quantisation
scale) would fail this, and the certificate with it.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import bits, patch_contents, patch_positions, real_cifar_files
from scalecert.bundle import manifest as manifest_io
from scalecert.core import geometry
from scalecert.runtime.images import load_image, normalize
from scalecert.runtime.pipelines.onnxruntime import OrtRunner

# the pretrained ResNet-20 (../shared) only under -m slow: locality is a property of the graph, which
# the random-weight bundles have as well
BUNDLES = ["tiny_pruned_bundle", "tiny_deep_pruned_bundle", "tiny_blank_gated_bundle",
           pytest.param("r20_pruned_bundle", marks=pytest.mark.slow)]


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
        files = real_cifar_files(1)[:3]  # real test images (the bundle was calibrated on the train set)
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
            positions = patch_positions(patch_hw, (h, w), rng, every)
            jobs = []
            for i, (py, px) in enumerate(positions):
                image = clean[0].copy()
                image[:, py:py + patch_hw[0], px:px + patch_hw[1]] = patch_contents(rng, patch_hw, spec, i % 3)
                jobs.append(((py, px), image))
            for start in range(0, len(jobs), 64):  # in batches: other images must not matter either
                part = jobs[start:start + 64]
                out = prefix.infer({"image": np.stack([img for _, img in part])})
                for ((py, px), _), gate, feat in zip(part, out["gate"], out["features"]):
                    y0, x0, y1, x1 = geometry.footprint((py, px), patch_hw, rf_yx, feature_hw)
                    outside = np.ones(feature_hw, bool)
                    outside[y0:y1, x0:x1] = False
                    gate_diff = gate != ref_gate
                    feat_diff = (bits(feat) != bits(ref_feat)).any(axis=0)
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
