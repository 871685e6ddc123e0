"""Recovery evaluation for `scalecert bench --mode recover`, on the one procedure
(runtime/recovery.py::PairRecovery): its decisions over a fixed label map; pairs through the bundle's
ONNX suffix equal the torch split's union masks; with the identity prefix (windows = PatchCleanser's
pixel masks) the bundle recovers and certifies exactly as the PatchCleanser baseline; the CLI's report."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import cifar_files, in_process, run_cli
from scalecert.core import geometry
from scalecert.evaluation.baseline import PatchCleanserBaseline, mask_set, rect_masked_batch
from scalecert.export.loading import load_model
from scalecert.runtime import Certifier
from scalecert.runtime.images import normalize
from scalecert.runtime.recovery import PairRecovery


def map_predictor(windows: np.ndarray, labels: np.ndarray, thin: np.ndarray | None = None):
    """predict(rows) -> logits over a fixed symmetric (n, n) label map (a row of one rectangle is
    (i, i)); a thin pair gets a margin of 0. The decision logic alone."""
    index = {tuple(w): i for i, w in enumerate(windows.tolist())}
    thin = np.zeros(labels.shape, bool) if thin is None else thin

    def predict(rows):
        rows = np.asarray(rows).reshape(len(rows), -1, 4)
        logits = np.zeros((len(rows), 10), np.float32)
        for k, row in enumerate(rows):
            ij = [index[tuple(r)] for r in row.tolist() if r[2] > r[0]] or [None]
            i, j = ij[0], ij[-1]
            label = 3 if i is None else labels[i, j]
            logits[k, label] = 0.0 if i is not None and thin[i, j] else 5.0
        return logits

    return predict


@pytest.mark.parametrize("case", ["all agree", "one pair flips", "a thin pair", "disagreer wins", "majority"])
def test_the_procedure_decides_over_a_label_map(case):
    windows = geometry.window_family((2, 2), 2, (4, 6))
    n = len(windows)
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
    procedure = PairRecovery(windows, (4, 6), batch=4)
    outcome = procedure.run(map_predictor(windows, labels, thin), np.ones((4, 6), bool), certify=True)
    assert (outcome.verdict.label, outcome.verdict.case, outcome.certified) == expected
    assert outcome.certification_rows == n * (n + 1) // 2 == 21
    assert outcome.first_rows == n and (outcome.second_rows == 0) == (expected[1] == "agreed")


def test_rect_masked_batch_zeroes_the_union_of_two_masks():
    masks = mask_set((32, 32), (5, 5), (6, 6))
    x = np.ones((1, 3, 32, 32), np.float32)
    pairs = np.array([[0, 0], [0, 35], [7, 8]])
    batch = rect_masked_batch(x, geometry.pair_rectangles(masks, pairs))
    for k, (i, j) in enumerate(pairs):
        expected = np.ones((32, 32), bool)
        for y0, x0, y1, x1 in (masks[i], masks[j]):
            expected[y0:y1, x0:x1] = False
        np.testing.assert_array_equal(batch[k] != 0, np.broadcast_to(expected, (3, 32, 32)))
    assert (x == 1).all()  # the input is untouched


def test_bundle_pairs_equal_the_torch_split_union_masks(tiny_pruned_bundle, tiny_checkpoint, photo_files):
    """Feature windows, 30% of positions gated: a pair as one ONNX suffix row (both rectangles) gives
    the logits of the torch split with the union of both windows zeroed."""
    import torch

    from scalecert.training.reference import TorchReference

    reference = TorchReference(load_model(tiny_checkpoint, "resnet20-cifar"), tiny_pruned_bundle)
    rng = np.random.default_rng(0)
    with Certifier.load(tiny_pruned_bundle, backend="ort") as cert:
        n = len(cert.windows)
        all_pairs = geometry.pair_indices(n)
        pairs = all_pairs[rng.choice(len(all_pairs), 40, replace=False)]
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        for path in photo_files[:2]:
            pixels = cert.prepare(path)
            features, _ = cert.features(pixels[None])
            ours = cert.window_logits(cert.pipeline.select(features, 0), geometry.pair_rectangles(cert.windows, pairs))
            with torch.no_grad():
                s = reference.gated(reference.superficial(reference.normalize(pixels[None])))
                logits = reference.suffix(reference.occlude(s, pairs)).numpy()
                single = reference.suffix(reference.occlude(s, pairs[:, 0])).numpy()
            np.testing.assert_array_equal(ours.argmax(1), logits.argmax(1))
            assert not np.allclose(logits, single, atol=1e-3)  # the second window changed something


def test_identity_prefix_recovers_and_certifies_as_patchcleanser(tiny_identity_bundle, tiny_checkpoint):
    """With pixel-space windows the bundle's family is PatchCleanser's 36 masks: every pair
    prediction, the recovered label and the certificate agree with the baseline's, both through the
    one procedure (the bundle through the Recoverer, with its dedupe; the baseline over its masks)."""
    from scalecert.runtime.recovery import Recoverer

    rec = Recoverer.load(tiny_identity_bundle, backend="ort")
    masks = rec.windows  # the baseline's masks, in the bundle's order:
    assert sorted(map(tuple, masks.tolist())) == sorted(map(tuple, mask_set((32, 32), (5, 5), (6, 6)).tolist()))
    loaded = load_model(tiny_checkpoint, "resnet20-cifar")  # any weights: the claim is exact agreement
    pixels = np.stack([rec.prepare(f) for f in cifar_files(1)[:4]])
    x = normalize(pixels, rec.certifier.input_spec)
    rows = geometry.pair_rectangles(masks, geometry.pair_indices(36))
    with rec, PatchCleanserBaseline.torch_eager(loaded.model, masks) as baseline:
        for i in range(len(pixels)):
            features, _ = rec.certifier.features(pixels[i:i + 1])
            ours = rec.certifier.window_logits(rec.certifier.pipeline.select(features, 0), rows).argmax(1)
            theirs = next(iter(baseline.runner.infer({"image": rect_masked_batch(x[i:i + 1], rows)}).values())).argmax(1)
            np.testing.assert_array_equal(ours, theirs)
            a, b = rec.recover(pixels[i], certify=True), baseline.recover(x[i:i + 1])
            assert (a.label, a.case, a.certified) == (b.verdict.label, b.verdict.case, b.certified)


def test_bench_recover_report(tmp_path, tiny_bundle, tiny_checkpoint, photo_dir, capsys):
    from PIL import Image

    data = tmp_path / "data"
    for k, name in enumerate(sorted(os.listdir(photo_dir))[:2]):
        os.makedirs(data / f"c{k}")
        Image.open(os.path.join(photo_dir, name)).convert("RGB").resize((32, 32)).save(data / f"c{k}" / "a.png")
    report_path = tmp_path / "r.json"
    in_process("bench", tiny_bundle, "--mode", "recover", "--data", data, "--baseline",  # the report, in this process
               "--baseline-engine", "both", "--model", tiny_checkpoint, "--arch", "resnet20-cifar",
               "--timing-images", "1", "--threads", "1", "-o", report_path)
    stdout = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["mode"] == "recover" and set(report["baseline"]) == {"torch", "ort"}
    for row in [*report["recovery"].values(), *report["baseline"].values()]:
        assert row["images"] == 2 and 0 < row["certification_rows"]["median"] <= row["pairs"]
        assert row["pairs"] == (666 if "masks" in row else len(row["pairs"] * [0]))
        assert 0 <= row["certified_recovery_accuracy"] <= row["recovered_accuracy"]
        assert row["fast_path_ms"]["n"] == row["certification_ms"]["n"] == 1  # --timing-images 1
    assert report["baseline"]["torch"]["recovered_accuracy"] == report["baseline"]["ort"]["recovered_accuracy"]
    assert set(report["ratios"]) == {"vs_torch", "vs_ort"}
    assert "certification" in stdout and "PatchCleanser torch" in stdout

    bad = run_cli("scalecert", "bench", tiny_bundle, "--mode", "recover", "--data", data, "--precision", "int8")
    assert bad.returncode != 0 and "--mode recover takes no" in bad.stderr and "Traceback" not in bad.stderr
