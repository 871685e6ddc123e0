"""Recovery evaluation (issue 13) for `scalecert bench --mode recover`: the early-exit certification
decides as all pairs do; pairs through the bundle's ONNX suffix (one window zeroed beforehand) equal
the torch split's union masks; with the identity prefix (windows = PatchCleanser's pixel masks) the
bundle recovers and certifies exactly as the PatchCleanser baseline; the CLI's report."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import R20, cifar_files, export, need, run_cli
from scalecert.evaluation.baseline import PatchCleanserBaseline, mask_set, pair_masked_batch
from scalecert.evaluation.recovery_eval import BundleRecovery, certification, fast_path, pair_index
from scalecert.export.loading import load_model
from scalecert.runtime import Certifier
from scalecert.runtime.images import normalize


def map_predictor(labels: np.ndarray, thin: np.ndarray | None = None):
    """predict(pairs) over a fixed symmetric (n, n) label map: the decision logic alone."""
    thin = np.zeros(labels.shape, bool) if thin is None else thin
    return lambda pairs: (labels[pairs[:, 0], pairs[:, 1]], thin[pairs[:, 0], pairs[:, 1]])


@pytest.mark.parametrize("case", ["all agree", "one pair flips", "a thin pair", "disagreer wins", "majority"])
def test_early_exit_certification_decides_as_all_pairs(case):
    n = 6
    labels, thin = np.full((n, n), 3), np.zeros((n, n), bool)
    expected = {"all agree": (3, "agreed", True), "one pair flips": (3, "agreed", False),
                "a thin pair": (3, "agreed", False), "disagreer wins": (7, "disagreer", False),
                "majority": (3, "majority", False)}[case]
    if case == "one pair flips":
        labels[1, 4] = labels[4, 1] = 5
    elif case == "a thin pair":
        thin[2, 5] = thin[5, 2] = True
    elif case == "disagreer wins":  # window 2 disagrees; its second round is unanimous for 7
        labels[2, :] = labels[:, 2] = 7
    elif case == "majority":  # windows 0 and 1 disagree, neither second round is unanimous
        labels[0, 0], labels[1, 1] = 7, 8
    predict = map_predictor(labels, thin)
    full = certification(n, predict)
    early = certification(n, predict, batch=4, early_exit=True)
    assert (full.label, full.case, full.certified) == expected
    assert (early.label, early.certified) == (full.label, full.certified)
    assert full.evaluated == len(pair_index(n)) == 21
    fast = fast_path(n, predict)
    assert (fast.label, fast.case) == expected[:2]
    assert fast.evaluated == (n if case in ("all agree", "one pair flips", "a thin pair") else 2 * n if
                              case == "disagreer wins" else 3 * n)


def test_pair_masked_batch_zeroes_the_union_of_two_masks():
    masks = mask_set((32, 32), (5, 5), (6, 6))
    x = np.ones((1, 3, 32, 32), np.float32)
    pairs = np.array([[0, 0], [0, 35], [7, 8]])
    batch = pair_masked_batch(x, masks, pairs)
    for k, (i, j) in enumerate(pairs):
        expected = np.ones((32, 32), bool)
        for y0, x0, y1, x1 in (masks[i], masks[j]):
            expected[y0:y1, x0:x1] = False
        np.testing.assert_array_equal(batch[k] != 0, np.broadcast_to(expected, (3, 32, 32)))
    assert (x == 1).all()  # the input is untouched


def test_bundle_pairs_equal_the_torch_split_union_masks(tiny_pruned_bundle, tiny_checkpoint, photo_files):
    """Feature windows, 30% of positions gated: a pair as one ONNX suffix row (both rectangles) gives
    the logits of the torch split with the union of both windows zeroed."""
    from scalecert.training.reference import TorchReference

    reference = TorchReference(load_model(tiny_checkpoint, "resnet20-cifar"), tiny_pruned_bundle)
    rng = np.random.default_rng(0)
    with Certifier.load(tiny_pruned_bundle, backend="ort") as cert:
        evaluator = BundleRecovery(cert)
        n = evaluator.n
        pairs = pair_index(n)[rng.choice(len(pair_index(n)), 40, replace=False)]
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        for path in photo_files[:2]:
            pixels = cert.prepare(path)
            labels, _ = evaluator.predictor(pixels)(pairs)
            import torch

            with torch.no_grad():
                s = reference.gated(reference.superficial(reference.normalize(pixels[None])))
                logits = reference.suffix(reference.occlude(s, pairs)).numpy()
                single = reference.suffix(reference.occlude(s, pairs[:, 0])).numpy()
            np.testing.assert_array_equal(labels, logits.argmax(1))
            assert not np.allclose(logits, single, atol=1e-3)  # the second window changed something


@pytest.fixture(scope="module")
def identity_bundle(tmp_path_factory):
    return export(tmp_path_factory, "identity-recover", need(R20), "--arch", "resnet20-cifar", "--patch", "5",
                  "--layer", "image", "--prune-rate", "0", "--stride", "5")


def test_identity_prefix_recovers_and_certifies_as_patchcleanser(identity_bundle):
    """With pixel-space windows the bundle's family is PatchCleanser's 36 masks: every one of the
    666 pair predictions, the recovered label and the certificate agree with the baseline's."""
    cert = Certifier.load(identity_bundle, backend="ort")
    masks = cert.windows  # the baseline's masks, in the bundle's order:
    assert sorted(map(tuple, masks.tolist())) == sorted(map(tuple, mask_set((32, 32), (5, 5), (6, 6)).tolist()))
    loaded = load_model(R20, "resnet20-cifar")
    pixels = np.stack([cert.prepare(f) for f in cifar_files(1)[:4]])
    x = normalize(pixels, cert.input_spec)
    evaluator, pairs = BundleRecovery(cert), pair_index(36)
    with cert, PatchCleanserBaseline.torch_eager(loaded.model, masks) as baseline:
        for i in range(len(pixels)):
            ours, theirs = evaluator.predictor(pixels[i]), baseline.predictor(x[i:i + 1])
            np.testing.assert_array_equal(ours(pairs)[0], theirs(pairs)[0])
            a, b = certification(36, ours), baseline.certify_recovery(x[i:i + 1])
            assert (a.label, a.case, a.certified) == (b.label, b.case, b.certified)
            assert fast_path(36, ours).label == baseline.recover(x[i:i + 1]).label == a.label


def test_bench_recover_report(tmp_path, tiny_bundle, tiny_checkpoint, photo_dir):
    from PIL import Image

    data = tmp_path / "data"
    for k, name in enumerate(sorted(os.listdir(photo_dir))[:2]):
        os.makedirs(data / f"c{k}")
        Image.open(os.path.join(photo_dir, name)).convert("RGB").resize((32, 32)).save(data / f"c{k}" / "a.png")
    report_path = tmp_path / "r.json"
    proc = run_cli("scalecert", "bench", tiny_bundle, "--mode", "recover", "--data", data, "--baseline",
                   "--baseline-engine", "both", "--model", tiny_checkpoint, "--arch", "resnet20-cifar",
                   "--timing-images", "1", "--threads", "1", "--report", report_path, "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["mode"] == "recover" and set(report["baseline"]) == {"torch", "ort"}
    for row in [*report["recovery"].values(), *report["baseline"].values()]:
        assert row["images"] == 2 and row["certification_rows"] == (666 if "masks" in row else row["pairs"])
        assert 0 <= row["certified_recovery_accuracy"] <= row["recovered_accuracy"]
        assert row["fast_label_equals_certification_label"] == 2 and row["timed_certified_agree"] == 1
    assert report["baseline"]["torch"]["recovered_accuracy"] == report["baseline"]["ort"]["recovered_accuracy"]
    assert set(report["ratios"]) == {"vs_torch", "vs_ort"}
    assert "certification" in proc.stdout and "PatchCleanser torch" in proc.stdout

    bad = run_cli("scalecert", "bench", tiny_bundle, "--mode", "recover", "--data", data, "--precision", "int8")
    assert bad.returncode != 0 and "--mode recover takes no" in bad.stderr and "Traceback" not in bad.stderr
