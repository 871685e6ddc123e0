"""`scalecert tune --for recover` (issue 13): occluded copies with one and with two windows of the
family zeroed (PatchCleanser fine-tunes with two masks); validation certifies recovery over every
pair; the input is kept when training hurts. Tiny random ResNet-20 on real photo crops."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import in_process, run_cli
from test_tune import TUNE_ARGS, photo_folder  # noqa: F401  (the module-scoped fixture)


def test_recover_copies_zero_one_window_and_unions_of_two_distinct_windows(tiny_checkpoint):
    """The sampler and the split's occlusion together: the detection copies zero exactly one window
    of the family, the recovery copies also zero the union of two different windows."""
    import torch

    from scalecert.core import geometry
    from scalecert.export.loading import load_model
    from scalecert.training.tune import SplitNetwork, occlusion_indices, plan

    loaded = load_model(tiny_checkpoint, "resnet20-cifar")
    program, split = plan(loaded, "5", "image", "5", 100, 2.0)
    net = SplitNetwork(program.module(), split.layer.name, loaded.preprocess.to_json(), split.windows,
                       split.layer.shape[1:], "abs")
    n, masks = len(split.windows), geometry.window_masks(split.windows, split.feature_hw)
    assert n == 36  # PatchCleanser's 6x6 pixel masks for a 5x5 patch on 32x32
    rng = np.random.default_rng(0)
    detect = occlusion_indices(rng, n, 64, 2, "detect")
    assert [z.shape for z in detect] == [(64,), (64,)]
    singles, pairs = occlusion_indices(rng, n, 512, 1, "recover")
    assert singles.shape == (512,) and pairs.shape == (512, 2)
    assert (pairs[:, 0] != pairs[:, 1]).all() and pairs.min() >= 0 and pairs.max() < n
    assert len({tuple(p) for p in pairs}) > 200  # many different pairs, not a fixed one
    ones = torch.ones(512, *split.layer.shape)
    for index in (singles, pairs):
        zeroed = (net.occlude(ones, index) == 0).all(1).reshape(512, -1).numpy()  # every channel zeroed
        expected = masks[index] if index.ndim == 1 else masks[index[:, 0]] | masks[index[:, 1]]
        np.testing.assert_array_equal(zeroed, expected)
    assert (expected.sum(1) > masks[pairs[:, 0]].sum(1)).all()  # a second window adds positions


@pytest.mark.slow
def test_tune_for_recovery_trains_on_pairs_and_keeps_its_input_when_training_hurts(tmp_path, photo_folder,
                                                                                   tiny_checkpoint, capsys):
    """One epoch that learns on three rows per image (clean, one window, two windows) and validates
    certified recovery; then an epoch at a learning rate that wrecks the weights keeps its input."""
    import torch

    args = [a for a in TUNE_ARGS if a != "--quiet"]
    out = str(tmp_path / "recover.pt")
    in_process("tune", tiny_checkpoint, "--data", photo_folder, "--epochs", "1", "--mode", "recover", "-o", out, *args)
    assert "certified recovery" in capsys.readouterr().out
    record = torch.load(out + ".last", map_location="cpu", weights_only=True)
    trained = record["history"][-1]
    assert trained["rows_per_image"] == pytest.approx(3.0)  # the clean image, one window, a pair
    assert trained["target"] == "recover" and 0 <= trained["certified_accuracy"] <= 1
    assert record["settings"]["target"] == "recover"

    bundle = tmp_path / "recover.scalecert"  # export reads the target: a recovery bundle by default
    in_process("export", out, "--arch", "resnet20-cifar", "-o", str(bundle), "--quiet")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["decision"]["mode"] == "recover"

    hurt = str(tmp_path / "hurt.pt")
    in_process("tune", out, "--data", photo_folder, "--epochs", "1", "--mode", "recover", "--lr", "1000", "-o", hurt,
               *args)
    assert "no epoch beat the input on validation" in capsys.readouterr().out
    kept = torch.load(hurt, map_location="cpu", weights_only=True)
    start = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    assert kept["scalecert_tune"]["epoch"] == 0
    assert all(torch.equal(kept["state_dict"][k], start[k]) for k in start)


def test_unknown_target_is_one_line(tmp_path, photo_folder, tiny_checkpoint):
    proc = run_cli("scalecert", "tune", tiny_checkpoint, "--data", photo_folder, "--mode", "both",
                   "-o", str(tmp_path / "x.pt"), *TUNE_ARGS)
    assert proc.returncode != 0 and "--mode" in proc.stderr and "Traceback" not in proc.stderr


def test_recovery_defaults_hold_pairs_to_patchcleansers_count():
    """--stride auto plans at most 36 windows for recovery (666 pairs, PatchCleanser's 6x6 masks) and
    100 for detection: one table (export/plan.WINDOW_BUDGET) that tune and export both read."""
    from scalecert.core import geometry
    from scalecert.export.plan import WINDOW_BUDGET, choose_stride

    assert WINDOW_BUDGET == {"detect": 100, "recover": 36}
    for budget in WINDOW_BUDGET.values():
        stride = choose_stride("auto", (7, 7), (32, 32), budget)
        assert geometry.count_windows((7, 7), stride, (32, 32)) <= budget
    assert geometry.count_windows((7, 7), choose_stride("auto", (7, 7), (32, 32), 36), (32, 32)) == 36


def test_measured_plan_for_recovery_caps_the_windows():
    """The measured plan's strides for a recovery export (export/plan.candidate_strides with
    max_windows): none with more windows than the cap, and the cap changes the choice."""
    from scalecert.core import geometry
    from scalecert.export.plan import candidate_strides

    free = candidate_strides((7, 7), (32, 32), 0, 1, 1, 1000)
    capped = candidate_strides((7, 7), (32, 32), 0, 1, 1, 1000, max_windows=36)
    assert geometry.count_windows((7, 7), free[0], (32, 32)) > 36
    assert capped and all(geometry.count_windows((7, 7), s, (32, 32)) <= 36 for s in capped)
