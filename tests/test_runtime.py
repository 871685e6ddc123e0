"""Runtime: decision rule, exact dedupe, preprocessing, certify CLI contract. (That the runtime
imports and certifies without torch is checked in test_layout.py.)"""
from __future__ import annotations

import json
import os
import shutil

import types

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, skimage_photos
from scalecert.core import decision, geometry
from scalecert.errors import ScaleCertError
from scalecert.runtime import Certifier
from scalecert.runtime.images import load_image, read_image, resize_to_input


def test_decision_rule():
    labels = np.array([3, 3, 3, 3])
    margins = np.array([1.0, 0.5, 2.0, 0.3], np.float32)
    assert decision.decide(3, 1.0, labels, margins).status == "certified"
    thin = decision.decide(3, 1.0, labels, margins, delta=0.4)  # every window agrees, one too thinly to certify
    assert thin.status == "uncertified" and thin.alert_windows.tolist() == []
    bad = decision.decide(3, 1.0, np.array([3, 5, 3, 5]), margins)
    assert bad.status == "alert" and bad.alert_windows.tolist() == [1, 3] and bad.label == 3
    assert decision.decide(3, 0.01, labels, margins, delta=0.1).status == "uncertified"  # thin base margin
    group = np.array([-1, 0, 1, 0, -1])
    assert decision.expand_groups(group, np.array([7, 8]), 3).tolist() == [3, 7, 8, 7, 3]
    lab, marg = decision.top2_margin(np.array([[0.0, 2.0, 1.5], [3.0, -1.0, 0.0]]))
    assert lab.tolist() == [1, 0] and np.allclose(marg, [0.5, 3.0])


def test_distinct_windows_is_exact_grouping():
    rng = np.random.default_rng(0)
    feature_hw = (13, 11)
    windows = geometry.window_family((4, 3), 2, feature_hw)
    masks = geometry.window_masks(windows, feature_hw)
    for density in (0.0, 0.05, 0.3, 1.0):
        gate = rng.random(feature_hw) < density
        d = geometry.distinct_windows(windows, masks, gate)
        inter = masks & gate.reshape(1, -1)
        for i in range(len(windows)):
            if not inter[i].any():
                assert d.group_of_window[i] == -1
                continue
            rep = d.representatives[d.group_of_window[i]]
            rep_mask = geometry.window_masks(rep[None], feature_hw)[0] & gate.reshape(-1)
            assert (rep_mask == inter[i]).all()  # same kept positions zeroed -> same S_W
        distinct_rows = {inter[i].tobytes() for i in range(len(windows)) if inter[i].any()}
        assert len(d.representatives) == len(distinct_rows)


def test_filled_windows_group_by_coverage_only():
    """With a fill (docs/design.md §3.5) a gated-off position under a window holds the fill, not 0:
    Dedupe(filled=True) groups windows as if every position were kept, whatever the gate, and
    skips none as empty."""
    rng = np.random.default_rng(2)
    feature_hw = (13, 11)
    windows = geometry.window_family((4, 3), 2, feature_hw)
    masks = geometry.window_masks(windows, feature_hw)
    pairs = geometry.pair_indices(len(windows))
    dedupe = geometry.Dedupe(windows, masks, filled=True)
    everywhere = np.ones(feature_hw, bool)
    for gate in (np.zeros(feature_hw, bool), rng.random(feature_hw) < 0.3, everywhere):
        got = dedupe.windows_for(gate)
        assert (got.group_of_window >= 0).all()
        assert np.array_equal(got.representatives, geometry.distinct_windows(windows, masks, everywhere).representatives)
        assert np.array_equal(dedupe.pairs_for(gate, pairs).group_of_window,
                              geometry.distinct_pairs(windows, masks, everywhere, pairs).group_of_window)


def test_filled_bundle_runs_every_window_the_gate_would_have_skipped(tiny_blank_gated_bundle, photo_files):
    """A --fill blank bundle with a sparse gate: every window's label equals that window's own row
    through the suffix (no dedupe), on real photos. Grouping by kept positions, as without a fill,
    would reuse logits that are not the window's own for some of them (the negative control)."""
    from scalecert.bundle import Bundle
    from scalecert.runtime.images import load_image, normalize
    from scalecert.runtime.pipelines.onnxruntime import OrtRunner

    bundle = tiny_blank_gated_bundle
    m = Bundle.open(bundle).manifest
    assert m["windows"]["fill"] == "blank" and m["sin"]["prune_rate"] == 0.7
    wrong_without = 0
    with Certifier.load(bundle, backend="ort", evaluation=True) as certifier, \
            OrtRunner(os.path.join(bundle, "prefix.onnx")) as prefix, OrtRunner(os.path.join(bundle, "suffix.onnx")) as suffix:
        windows = certifier.windows
        for path in photo_files:
            pixels = load_image(path, m["input"])
            features = prefix.infer({"image": normalize(pixels, m["input"])})["features"]
            own = suffix.infer({"features": features, "windows": windows})["logits"].argmax(1)
            result = certifier.certify(pixels)
            assert np.array_equal(result.window_labels, own), path
            unfilled = geometry.Dedupe(windows, certifier.masks, filled=False).windows_for(result.gate)
            every = suffix.infer({"features": features, "windows": np.concatenate([np.zeros((1, 4), np.int64), windows])})["logits"]
            base, rows = every[0], every[1:]
            for i, group in enumerate(unfilled.group_of_window):  # what grouping by kept positions would reuse
                reused = base if group < 0 else rows[np.flatnonzero(unfilled.group_of_window == group)[0]]
                wrong_without += not np.array_equal(reused, rows[i])
    assert wrong_without > 0


def test_dedupe_reuses_the_all_kept_answer_only_for_an_all_kept_gate():
    """geometry.Dedupe gives what distinct_windows/distinct_pairs give for every gate, computing the
    all-kept answer once (the same object comes back) and never reusing it for another gate."""
    rng = np.random.default_rng(1)
    feature_hw = (13, 11)
    windows = geometry.window_family((4, 3), 3, feature_hw)
    masks = geometry.window_masks(windows, feature_hw)
    pairs = geometry.pair_indices(len(windows))
    dedupe = geometry.Dedupe(windows, masks)
    all_kept = np.ones(feature_hw, np.uint8)
    one_off = all_kept.copy()
    one_off[6, 5] = 0
    for gate in (all_kept, one_off, rng.random(feature_hw) < 0.5, all_kept):
        for got, want in ((dedupe.windows_for(gate), geometry.distinct_windows(windows, masks, gate)),
                          (dedupe.pairs_for(gate, pairs), geometry.distinct_pairs(windows, masks, gate, pairs)),
                          (dedupe.pairs_for(gate, pairs[:5]), geometry.distinct_pairs(windows, masks, gate, pairs[:5]))):
            assert np.array_equal(got.group_of_window, want.group_of_window)
            assert np.array_equal(got.representatives, want.representatives)
    assert dedupe.windows_for(all_kept) is dedupe.windows_for(all_kept)
    assert dedupe.pairs_for(all_kept, pairs) is dedupe.pairs_for(all_kept, pairs)
    assert dedupe.pairs_for(all_kept, pairs[:5]) is not dedupe.pairs_for(all_kept, pairs)

    class Owner:  # as Certifier and Recoverer: `dedupe = property(Dedupe.of)`
        dedupe = property(geometry.Dedupe.of)

    owner = Owner()
    owner.windows, owner.masks = windows, masks
    owner.bundle = types.SimpleNamespace(window_filled=False)
    assert owner.dedupe is owner.dedupe and owner.dedupe.windows is windows
    owner.windows, owner.masks = windows[1:], masks[1:]  # a replaced family (the negative controls do this)
    assert owner.dedupe.windows is owner.windows and len(owner.dedupe.windows_for(all_kept).group_of_window) == len(windows) - 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_image_modes_convert_to_rgb(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 65536, (40, 50))).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    path = str(tmp_path / f"img.{'tiff' if mode in ('I;16', 'CMYK') else 'png'}")
    img.save(path)
    spec = {"input_size": [3, 32, 32], "resize_short": None, "mean": [0.5] * 3, "std": [0.5] * 3}
    out = load_image(path, spec)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert out.max() > 100  # 16-bit range scaled, not clipped to white or black


def test_resize_short_side_and_crop():
    spec = {"input_size": [3, 224, 224], "resize_short": 256, "mean": [0.5] * 3, "std": [0.5] * 3}
    out = resize_to_input(Image.fromarray(skimage_photos()["chelsea"]), spec)
    assert out.shape == (224, 224, 3)


def test_bad_images_rejected_with_one_line(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    for path, words in ((tmp_path / "empty.png", "empty"), (tmp_path / "junk.jpg", "cannot decode"),
                        (tmp_path, "directory"), (tmp_path / "missing.png", "no such file")):
        with pytest.raises(ScaleCertError, match=words):
            read_image(str(path))


def test_certify_cli_json_contract_and_partial_failures(tiny_bundle, photo_files, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    proc = run_cli("scalecert", "certify", tiny_bundle, photo_files[0], str(tmp_path / "empty.png"),
                   photo_files[1], "--json")
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [l["status"] for l in lines][1] == "error" and "Traceback" not in proc.stderr
    for record in (lines[0], lines[2]):
        assert record["status"] in ("certified", "alert")
        for key in ("image", "label", "class", "windows_total", "windows_evaluated", "latency_ms"):
            assert key in record
        assert 0 <= record["windows_evaluated"] <= record["windows_total"]
        if record["status"] == "alert":
            assert record["alert_windows"] and all(len(w) == 4 for w in record["alert_windows"])
    ok = run_cli("scalecert", "certify", tiny_bundle, *photo_files)
    assert ok.returncode == 0 and "status" in ok.stdout.splitlines()[0]


def _one_error_line(proc, words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and words in errors[0], proc.stderr


def test_certify_refuses_bad_bundles(stored_bundle, photo_files, tmp_path):
    _one_error_line(run_cli("scalecert", "certify", str(tmp_path / "nope"), photo_files[0]), "no such bundle")
    tampered = str(tmp_path / "tampered")
    shutil.copytree(stored_bundle, tampered)
    with open(os.path.join(tampered, "suffix.onnx"), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    _one_error_line(run_cli("scalecert", "certify", tampered, photo_files[0]), "sha256")
    newer = str(tmp_path / "newer")
    shutil.copytree(stored_bundle, newer)
    path = os.path.join(newer, "manifest.json")
    manifest = json.load(open(path))
    manifest["schema_version"] = 99
    json.dump(manifest, open(path, "w"))
    _one_error_line(run_cli("scalecert", "certify", newer, photo_files[0]), "newer")
    # the trt backend: without TensorRT the machine says what it lacks; with it, the bundle has no trt margin
    expected = "no numeric margin measured for trt" if _has_tensorrt() else "the TensorRT backend needs TensorRT"
    _one_error_line(run_cli("scalecert", "certify", stored_bundle, photo_files[0], "--backend", "trt"), expected)


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "stored_bundle"])
def test_early_exit_agrees_with_full_evaluation(bundle_fixture, photo_files, request):
    bundle = request.getfixturevalue(bundle_fixture)
    full, fast = Certifier.load(bundle), Certifier.load(bundle, early_exit=True, batch=8)
    probes = [os.path.join(bundle, name) for name in full.bundle.probe_images]  # certified and alert
    for path in [*photo_files, *probes]:
        a, b = full.certify(path), fast.certify(path)
        assert (a.status, a.label) == (b.status, b.label)
        assert b.windows_evaluated <= a.windows_evaluated
        assert set(map(tuple, b.alert_windows)) <= set(map(tuple, a.alert_windows))


def test_certify_batch_matches_single(stored_bundle):
    cert = Certifier.load(stored_bundle, evaluation=True)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (5, *cert.bundle.image_hw, 3), dtype=np.uint8)
    for a, b in zip(cert.certify_batch(pixels, prefix_batch=2), [cert.certify(p) for p in pixels]):
        assert (a.status, a.label) == (b.status, b.label)
        assert (a.window_labels == b.window_labels).all()


def test_same_window_same_logits_across_batches(tiny_bundle):
    """Determinism on ONNX Runtime CPU: the export measured the spread on one image and 64 windows;
    re-measure it here on another image and every window, through the certifier's own pipeline,
    and the delta the certifier uses must cover it (docs/design.md §3.6)."""
    from scalecert.core.margin import delta_from_spread, measure_logit_spread

    cert = Certifier.load(tiny_bundle)
    features, _ = cert.features(np.random.default_rng(4).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    spread = measure_logit_spread(cert.window_logits, features, cert.windows)
    assert spread <= 1e-5
    assert delta_from_spread(spread) <= cert.delta, f"spread {spread:g} here, but the bundle's delta is {cert.delta:g}"


class _RoundsAt:
    """A suffix whose logits move by `bump` at one batch size and one position in the batch (an engine
    that rounds by batch composition), exact everywhere else; bump 0 is the exact engine."""

    def __init__(self, size: int, position: int, bump: float = 1e-3):
        self.size, self.position, self.bump = size, position, bump

    def __call__(self, features, windows):
        logits = np.stack([np.sin(np.arange(5.0) + w.sum()) for w in windows]).astype(np.float32)
        if len(windows) == self.size and self.position < len(windows):
            logits[self.position] += np.float32(self.bump)
        return logits


@pytest.mark.parametrize("every_row", [True, False])
def test_margin_samples_every_position_of_every_batch_size(every_row):
    """The margin's sample (docs/design.md §3.6), full and reduced: an engine that rounds differently
    at any one (batch size, position) pair, the reference batch's included, shows a spread; the exact
    engine shows none (the negative control)."""
    from scalecert.core.margin import BATCH_SIZES, margin_sample, measure_logit_spread, rows_evaluated

    sample = margin_sample(np.arange(36 * 4, dtype=np.int64).reshape(36, 4))
    assert measure_logit_spread(_RoundsAt(1, 0, 0.0), None, sample, every_row=every_row) == 0.0
    pairs = [(size, p) for size in (*BATCH_SIZES, len(sample)) for p in range(size)]
    caught = [measure_logit_spread(_RoundsAt(size, p), None, sample, every_row=every_row) > 0 for size, p in pairs]
    assert all(caught), [pair for pair, hit in zip(pairs, caught) if not hit]
    calls = []
    measure_logit_spread(lambda f, w: calls.append(len(w)) or _RoundsAt(0, 0)(f, w), None, sample, every_row=every_row)
    assert sum(calls) == rows_evaluated(len(sample), every_row) == (5 * 37 if every_row else 2 * 37)


def _has_cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def test_backend_without_measured_margin_is_refused(stored_bundle):
    # without a CUDA provider the machine says so first; with one, the missing ort-cuda margin is refused
    expected = "no numeric margin measured for ort-cuda" if _has_cuda_provider() else "no CUDA execution provider"
    with pytest.raises(ScaleCertError, match=expected):
        Certifier.load(stored_bundle, backend="ort-cuda")
    assert Certifier.load(stored_bundle, backend="auto").backend == "ort-cpu"
