"""Certified recovery (docs/design.md §10): pairs in one suffix row, exact pair dedupe, the fast
path against double masking computed naively over every pair, the CLI contract, and soundness
by attack with a negative control (the harness is tests/attack_harness.py in recovery mode).

In recovery mode there is no alert: a *violation* is an attacked image (of an image certified
for recovery) whose recovered label differs from the clean one.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import export, run_cli
from scalecert.core import geometry, recovery
from scalecert.core.decision import top2_margin
import attack_harness as attack
from scalecert.runtime import Certifier
from scalecert.runtime.recovery import Recoverer
from test_soundness import POSITIONS_5x5_32, _report, _target_data


# -- geometry -------------------------------------------------------------------------------------
def test_pair_dedupe_is_exact():
    """Two pairs share an inference iff their unions hold exactly the same kept positions; a pair
    whose union holds none sees the un-occluded features; each unordered pair appears once."""
    rng = np.random.default_rng(0)
    feature_hw = (12, 12)
    windows = geometry.window_family((3, 3), 2, feature_hw)
    masks = geometry.window_masks(windows, feature_hw)
    pairs = geometry.pair_indices(len(windows))
    assert len(pairs) == len(windows) * (len(windows) + 1) // 2
    assert np.all(pairs[:, 0] <= pairs[:, 1]) and len(np.unique(pairs, axis=0)) == len(pairs)
    for keep in (0.03, 0.2, 0.7, 1.0):
        gate = rng.random(feature_hw) < keep
        distinct = geometry.distinct_pairs(windows, masks, gate, pairs)
        union = (masks[pairs[:, 0]] | masks[pairs[:, 1]]) & gate.reshape(1, -1)
        group = distinct.group_of_window
        assert np.array_equal(group < 0, ~union.any(axis=1))
        hit = np.flatnonzero(group >= 0)
        same_row = (union[hit][:, None, :] == union[hit][None, :, :]).all(axis=2)
        assert np.array_equal(same_row, group[hit][:, None] == group[hit][None, :])
        # the representative of a group zeroes that group's positions
        rep_masks = geometry.window_masks(distinct.representatives[:, 0], feature_hw) | geometry.window_masks(
            distinct.representatives[:, 1], feature_hw)
        assert np.array_equal(rep_masks[group[hit]] & gate.reshape(1, -1), union[hit])
        if keep < 0.5:
            assert len(distinct.representatives) < len(pairs)  # sparse gates: unions coincide


# -- the suffix takes pairs in one row ------------------------------------------------------------
def test_pair_rows_zero_the_union_and_single_rows_are_unchanged(tiny_bundle):
    """A (B, 4) batch, the same windows as (B, 1, 4) and as pairs (w, w) give bitwise the same
    logits; a pair (a, b) gives bitwise the logits of the features with a ∪ b zeroed by hand."""
    with Certifier.load(tiny_bundle, backend="ort", threads=1) as cert:
        pipe = cert.pipeline
        image = np.random.default_rng(1).standard_normal((1, *cert.input_spec["input_size"])).astype(np.float32)
        features, _ = pipe.prefix(image)
        windows = cert.windows[::7]
        single = pipe.suffix(features, windows)
        assert np.array_equal(single, pipe.suffix(features, windows[:, None, :]))
        assert np.array_equal(single, pipe.suffix(features, np.stack([windows, windows], axis=1)))
        pairs = np.stack([windows, windows[::-1]], axis=1)
        got = pipe.suffix(features, pairs)
        masks = geometry.window_masks(windows, cert.feature_hw)
        for k in range(len(pairs)):
            zeroed = features.copy()
            zeroed[0][:, (masks[k] | masks[len(pairs) - 1 - k]).reshape(cert.feature_hw)] = 0.0
            assert np.array_equal(got[k], pipe.suffix(zeroed, np.zeros((1, 4), np.int64))[0])


# -- a tiny CNN (the one tests/test_soundness.py trains) exported for recovery ---------------------
@pytest.fixture(scope="module")
def tiny_recovery(tmp_path_factory, trained_tiny_cnn):
    """(bundle, TorchReference, images, labels, names): the tiny CNN of test_soundness (the same
    trained model, conftest's trained_tiny_cnn), exported with --stride 8 (16 windows, 136 pairs)
    and --mode recover."""

    from scalecert.export.loading import load_model
    from scalecert.training.reference import TorchReference

    path = trained_tiny_cnn
    bundle = export(tmp_path_factory, "tinycnn-recovery", path, "--input-size", "3x32x32", "--patch", "5",
                    "--layer", "auto", "--stride", "8", "--mode", "recover")
    reference = TorchReference(load_model(path, input_size=(3, 32, 32)), bundle)
    images, labels, names = _target_data()
    return bundle, reference, images, labels, names


@pytest.fixture(scope="module")
def pruned_recovery(tmp_path_factory, tiny_checkpoint, calib_dir):
    """Random ResNet-20, 90% of positions gated off (pairs and windows with nothing kept exist)."""
    return export(tmp_path_factory, "rec-pruned", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5",
                  "--layer", "relu", "--stride", "8", "--calib", calib_dir, "--prune-rate", "0.9", "--mode", "recover")


def _naive(rec: Recoverer, pixels: np.ndarray):
    """Double masking from every pair evaluated one row each (no dedupe, no early stop)."""
    pipe = rec.certifier.pipeline
    features, _ = rec.certifier.features(pixels[None])
    n = len(rec.windows)
    pairs = geometry.pair_indices(n)
    logits = pipe.suffix(pipe.select(features, 0), geometry.pair_rectangles(rec.windows, pairs))
    labels, margins = top2_margin(logits)
    matrix = np.empty((n, n), np.int64)
    matrix[pairs[:, 0], pairs[:, 1]] = labels
    matrix[pairs[:, 1], pairs[:, 0]] = labels
    first = np.diag(matrix).copy()
    verdict = recovery.double_masking(first, {i: matrix[i] for i in range(n)})
    certified = recovery.certified_recovery(labels, verdict.label, thin=margins <= rec.delta)
    return verdict, certified


@pytest.mark.parametrize("which", ["tiny_recovery", "pruned_recovery"])
def test_fast_path_equals_naive_double_masking(which, request, photo_files, calib_dir):
    bundle = request.getfixturevalue(which)
    bundle = bundle[0] if isinstance(bundle, tuple) else bundle
    with Recoverer.load(bundle, backend="ort", threads=1, certify=True) as rec:
        assert rec.bundle.default_mode == "recover"
        files = photo_files + sorted(os.path.join(calib_dir, f) for f in os.listdir(calib_dir))[:8]
        pixels = np.stack([rec.prepare(f) for f in files])
        results = rec.certify_batch(pixels)
        cases, empty = set(), 0
        for pixel, result in zip(pixels, results):
            verdict, certified = _naive(rec, pixel)
            assert (result.label, result.case, result.certified) == (verdict.label, verdict.case, certified)
            assert result.disagreers == rec.windows[verdict.disagreers].tolist()
            assert result.windows_evaluated <= len(rec.windows) + 1
            assert result.certification_pairs_evaluated <= len(rec.pairs) + 1
            cases.add(result.case)
            empty += int(result.certification_pairs_evaluated < len(rec.pairs))
        print(f"\n[{which}] cases {sorted(cases)}, {sum(r.certified for r in results)} of {len(results)} certified, "
              f"{empty} images with deduplicated pairs")
        if which == "pruned_recovery":
            assert empty > 0  # dedupe (and the base path for empty unions) was exercised


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_recover_json_and_one_line_refusals(tiny_recovery, tiny_bundle, photo_files, tmp_path):
    bundle = tiny_recovery[0]
    proc = run_cli("scalecert", "certify", bundle, photo_files[0], "--json", "--certify-recovery", "--threads", "1",
                   check=True)
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["mode"] == "recover" and isinstance(row["certified"], bool) and row["case"] in ("agreed", "disagreer", "majority")
    for key in ("label", "class", "disagreers", "windows_evaluated", "pairs_evaluated", "pairs_total",
                "certification_pairs_evaluated", "latency_ms", "prefix_ms", "suffix_ms", "certify_ms"):
        assert key in row, key
    proc = run_cli("scalecert", "certify", bundle, photo_files[0], "--mode", "detect", "--json", "--threads", "1", check=True)
    assert json.loads(proc.stdout.splitlines()[0])["status"] in ("certified", "alert", "uncertified")

    old = str(tmp_path / "old")  # a bundle as exported before recovery: no windows layout, no mode
    shutil.copytree(tiny_bundle, old)
    manifest = json.load(open(os.path.join(old, "manifest.json")))
    manifest["tensors"]["suffix"].pop("windows")
    manifest["decision"].pop("mode")
    json.dump(manifest, open(os.path.join(old, "manifest.json"), "w"))
    cases = [((old, "--mode", "recover"), "exported before certified recovery"),
             ((old, "--certify-recovery"), "--certify-recovery needs --mode recover (this bundle's default mode is detect)"),
             ((bundle, "--mode", "detect", "--certify-recovery"), "--certify-recovery needs --mode recover (--mode detect was given)"),
             ((bundle, "--early-exit"), "--early-exit belongs to --mode detect"),
             ((bundle, "--threshold", "0.5"), "--threshold belongs to --mode detect")]
    for args, message in cases:
        proc = run_cli("scalecert", "certify", args[0], photo_files[0], *args[1:])
        assert proc.returncode != 0 and proc.stdout == "", (args, proc.stdout)
        assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    proc = run_cli("scalecert", "certify", old, photo_files[0], "--json", "--threads", "1", check=True)  # old bundles still detect
    assert json.loads(proc.stdout.splitlines()[0])["status"] in ("certified", "alert", "uncertified")


# -- soundness by attack --------------------------------------------------------------------------
def _certified_for_recovery(rec, images, labels, names, n):
    """The first n images certified for recovery."""
    clean = rec.certify_batch(images, certify=True)
    chosen = [i for i, r in enumerate(clean) if r.certified][:n]
    return images[chosen], labels[chosen], [names[i] for i in chosen]


def _assert_recovery_sound(out: dict, min_images: int) -> None:
    t = out["total"]
    assert out["mode"] == "recover"
    assert out["images_attacked"] >= min_images, f"too few images certified for recovery: {out['images_attacked']}"
    assert t["alert"] == 0  # recovery has no alert path
    assert t["violations"] == 0, out["violations_detail"][:3]
    plain = sum(c["attacked"] for name, c in out["per_content"].items() if name != "pgd")
    assert plain >= out["images_attacked"] * out["positions_per_image"]


def test_recovery_attacked_everywhere_keeps_the_clean_label(tiny_recovery):
    bundle, reference, images, labels, names = tiny_recovery
    rec = Recoverer.load(bundle, backend="ort", threads=1)
    chosen = _certified_for_recovery(rec, images, labels, names, 2)
    out = attack.attack_images(rec, chosen[0], labels=chosen[1], names=chosen[2], mix=True,
                               donor_pool=images, donor_labels=labels,
                               contents=("noise", "extreme", "donor", "pgd"), reference=reference,
                               pgd_positions=16, pgd_steps=10, pgd_views=4, seed=0)
    _report("recovery: tiny CNN", out)
    assert out["positions_per_image"] == POSITIONS_5x5_32
    _assert_recovery_sound(out, min_images=1)
    assert out["total"]["attacked"] == out["total"]["uncertified_same"]  # the clean label, every time
    assert out["total"]["first_round_split"] > 0, "no attack split the first round: too weak to mean anything"


class _RecoveryWithHole(Recoverer):
    """A Recoverer whose family lacks the central window [8, 22) x [8, 22): a patch whose footprint
    lies there is hidden by no window and by no pair (the gap docs/design.md §3.4 rules out)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        keep = ~((self.windows[:, 0] == 8) & (self.windows[:, 1] == 8))
        self.windows, self.masks = self.windows[keep], self.masks[keep]
        self.pairs = geometry.pair_indices(len(self.windows))


def test_recovery_negative_control_window_family_with_a_gap_is_caught(tiny_recovery):
    """The same harness, PGD at the positions whose footprint only the dropped window contains:
    violations on the family with the gap, none on the sound family, same images and attack."""
    bundle, reference, images, labels, names = tiny_recovery
    sound = Recoverer.load(bundle, backend="ort", threads=1)
    holed = _RecoveryWithHole(sound.certifier)
    assert len(holed.windows) == len(sound.windows) - 1
    clean = holed.certify_batch(images, certify=True)
    both = [i for i, r in enumerate(clean) if r.certified]
    assert both, "the family with a gap certified none of the images"
    positions = attack.all_positions((32, 32), (5, 5))

    def contained(windows, position) -> bool:
        y0, x0, y1, x1 = attack.footprint_of(sound.certifier, position)
        return bool(((windows[:, 0] <= y0) & (windows[:, 1] <= x0) & (windows[:, 2] >= y1) & (windows[:, 3] >= x1)).any())

    gap = np.array([p for p in positions if not contained(holed.windows, p)])
    assert len(gap) and all(contained(sound.windows, p) for p in gap)
    chosen = both[:6]
    out = attack.attack_images(holed, images[chosen], labels=labels[chosen], names=[names[i] for i in chosen],
                               contents=("pgd",), reference=reference, pgd_positions=gap, pgd_steps=20, pgd_views=6,
                               seed=4)
    _report("recovery negative: gap in the window family", out)
    assert out["total"]["violations"] > 0, "PGD found no violation through the gap"
    assert all(not contained(holed.windows, v["position"]) for v in out["violations_detail"])
    # the sound family, same attack, on the images where the gap let PGD through
    hit = sorted({v["image"] for v in out["violations_detail"]})
    again = [i for i in chosen if names[i] in hit]
    out = attack.attack_images(sound, images[again], labels=labels[again], names=[names[i] for i in again],
                               contents=("pgd",), reference=reference, pgd_positions=gap, pgd_steps=20, pgd_views=6,
                               seed=4)
    _report("recovery negative: sound family, same attack", out)
    assert out["images_attacked"] >= 1 and out["total"]["violations"] == 0


# -- every precision: the variants take pairs, and the margin covers pair rows -------------------
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_recovery_with_each_precision(precision, pruned_recovery, calib_dir, photo_files, tmp_path_factory):
    """A built variant recovers: fast path equal to naive double masking, certificates equal; and
    pair rows moved between batch compositions stay within the spread the margin was measured
    from (docs/design.md §10: the rectangle count changes only the exact mask)."""
    from scalecert.core.margin import measure_logit_spread

    from conftest import in_process

    bundle = str(tmp_path_factory.mktemp(f"rec-{precision}") / "bundle")
    shutil.copytree(pruned_recovery, bundle)
    in_process("build", bundle, "--precision", precision, "--calib", calib_dir, "--accept-loss", "--quiet")
    with Recoverer.load(bundle, backend="ort", threads=2, precision=precision, certify=True) as rec:
        pixels = np.stack([rec.prepare(f) for f in photo_files])
        for pixel, result in zip(pixels, rec.certify_batch(pixels)):
            verdict, certified = _naive(rec, pixel)
            assert (result.label, result.case, result.certified) == (verdict.label, verdict.case, certified)
        pipe = rec.certifier.pipeline
        features, _ = rec.certifier.features(pixels[:1])
        rows = geometry.pair_rectangles(rec.windows, rec.pairs)
        spread = measure_logit_spread(pipe.suffix, pipe.select(features, 0), rows[:63])
        recorded = rec.bundle.manifest["margin_measurement"][f"ort-cpu-{precision}"]["spread"]
        print(f"\n[{precision}] pair-row spread {spread:.3g}, recorded window spread {recorded:.3g}, delta {rec.delta:.3g}")
        assert spread <= 2 * recorded  # delta = 8 x recorded: half of it is left for compositions not sampled
