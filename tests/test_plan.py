"""The measured plan (docs/design.md §4): candidates scored by what they certify on calibration
images, the best within the cost budget, ties to the cheaper plan; recorded in the manifest."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import export, in_process, run_cli
from scalecert.bundle import Bundle
from scalecert.export.layers import Layer
from scalecert.export.plan import Candidate, PlanSearch, candidate_strides
from scalecert.export.receptive import RF


def _layer(name, index, shape=(8, 16, 16)):
    return Layer(name, "", index, shape, RF((1, -1, 1), (1, -1, 1)), True)


class _Scored(PlanSearch):
    """A search whose candidates score as a table says (the objective, apart from any model)."""

    def __init__(self, scores, budget):
        self.scores, self.budget, self.say, self.image_hw, self.patch_hw, self.full_macs = scores, budget, print, (16, 16), (3, 3), 100
        self.evaluated = []

    def _graphs(self, layer):
        return None, None, 0, 4 if layer.name == "cheap" else 5

    def evaluate(self, layer, stride, rate=0.0, alpha=None, beat=None):
        certified, cost = self.scores[(layer.name, stride, rate)]
        self.evaluated.append((layer.name, stride, rate))
        return Candidate(layer, stride, rate, 10, 0, 5, certified, 1.0, 10.0, cost)


def test_best_certified_within_budget_ties_to_cheaper(monkeypatch):
    import scalecert.export.plan as plan_module

    monkeypatch.setattr(plan_module, "candidate_strides", lambda *args: [2, 3, 4])
    scores = {("dear", 2, 0.0): (0.50, 30.0), ("dear", 3, 0.0): (0.40, 20.0), ("dear", 4, 0.0): (0.30, 10.0),
              ("cheap", 2, 0.0): (0.60, 40.0),  # the best score, but over the budget: never chosen
              ("cheap", 3, 0.0): (0.50, 15.0),  # ties with dear/2 and is cheaper
              ("cheap", 4, 0.0): (0.45, 8.0)}
    for rate in plan_module.AUTO_RATES:  # the rates of the best split: 0.3 ties again, cheaper still
        scores[("cheap", 3, rate)] = (0.50, 14.0) if rate == 0.3 else (0.20, 12.0)
    search = _Scored(scores, budget=37.0)
    table, best = search.search([_layer("dear", 1), _layer("cheap", 2)], "auto", "auto",
                                lambda layer: np.ones(8, np.float32))
    assert (best.layer.name, best.stride, best.rate) == ("cheap", 3, 0.3)
    assert best.chosen and sum(c.chosen for c in table) == 1 and len(table) == 6 + len(plan_module.AUTO_RATES)
    search = _Scored(scores, budget=25.0)  # a tighter budget rules out dear/2 and cheap/2
    _, best = search.search([_layer("dear", 1), _layer("cheap", 2)], "auto", "0", lambda layer: None)
    assert (best.layer.name, best.stride, best.rate) == ("cheap", 3, 0.0)


def test_candidate_strides_fit_the_budget():
    strides = candidate_strides((7, 7), (32, 32), prefix_macs=0, suffix_macs=10, full_macs=10, budget=37.0)
    from scalecert.core import geometry

    counts = [geometry.count_windows((7, 7), s, (32, 32)) for s in strides]
    assert len(strides) == 3 and counts == sorted(counts, reverse=True) and len(set(counts)) == 3
    assert all(1 + n <= 37 for n in counts) and 1 + geometry.count_windows((7, 7), strides[0] - 1, (32, 32)) > 37


def test_recovery_compares_layers_at_the_most_windows():
    """Recovery (max_windows) scores one stride per layer: the smallest within budget and cap."""
    from scalecert.core import geometry

    strides = candidate_strides((7, 7), (32, 32), prefix_macs=0, suffix_macs=10, full_macs=10, budget=37.0,
                                max_windows=25)
    assert len(strides) == 1 and geometry.count_windows((7, 7), strides[0], (32, 32)) <= 25
    assert geometry.count_windows((7, 7), strides[0] - 1, (32, 32)) > 25


def test_occlusion_is_part_of_the_cost():
    """The occlusion is elementwise work over each row's whole features (twice that with a fill), so
    at the image layer the pixel baseline's 36 windows plus the clean row cost more than its 37
    forwards: the default budget does not admit the baseline plus overhead."""
    from scalecert.export.plan import occlusion_macs

    image = Layer("image", "", 0, (3, 224, 224), RF((1, 0, 0), (1, 0, 0)), True)
    deep = Layer("deep", "", 9, (24, 56, 56), RF((1, 0, 0), (1, 0, 0)), True)
    assert occlusion_macs(image, False) > 0 and occlusion_macs(deep, True) == 2 * occlusion_macs(deep, False)
    full = 385_000_000  # EfficientNet-Lite0
    assert 37 * (full + occlusion_macs(image, False)) / full > 37.0


def test_export_with_calibration_measures_the_plan(tmp_path_factory, tiny_checkpoint, calib_dir):
    bundle = export(tmp_path_factory, "planned", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5",
                    "--calib", calib_dir)
    m = Bundle.open(bundle).manifest
    plan = m["plan"]
    assert plan["method"] == "measured" and plan["images"] > 0 and len(plan["candidates"]) >= 2
    chosen = [c for c in plan["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0] == plan["chosen"]
    assert (chosen[0]["layer"], chosen[0]["stride"], chosen[0]["prune_rate"]) == (
        m["layer"]["name"], m["windows"]["stride"], m["sin"]["prune_rate"])
    assert all(c["cost_forwards"] <= plan["budget_forwards"] for c in plan["candidates"] if not c["pruned"])
    scored = [c for c in plan["candidates"] if not c["pruned"] and c["cost_forwards"] <= plan["budget_forwards"]]
    assert chosen[0]["certified"] == max(c["certified"] for c in scored)
    shown = run_cli("scalecert", "inspect", bundle)
    assert shown.returncode == 0 and "plan" in shown.stdout and chosen[0]["layer"] in shown.stdout


def test_export_without_calibration_says_the_rule_is_geometric(tmp_path_factory, tiny_checkpoint, capsys):
    out = str(tmp_path_factory.mktemp("geo") / "b")
    in_process("export", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5", "-o", out)
    assert "no --calib images: the layer by the geometric rule" in capsys.readouterr().out
    assert json.load(open(f"{out}/manifest.json"))["plan"]["method"] == "geometric"


@pytest.mark.parametrize("args, needle", [
    (["--budget", "0"], "--budget 0: expected a positive number of full forwards per image"),
    (["--threshold", "1.5"], "--threshold 1.5: expected a confidence in [0, 1)"),
    (["--threshold", "-0.1"], "--threshold -0.1: expected a confidence in [0, 1)"),
    (["--fill", "grey"], "Invalid value for '--fill': 'grey' is not one of 'auto', 'zero', 'blank'. "
                         "(see scalecert-export --help)"),
])
def test_export_bad_plan_options_are_one_line(tmp_path, tiny_checkpoint, args, needle):
    proc = run_cli("scalecert-export", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5", *args,
                   "-o", str(tmp_path / "b"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {needle}" and not (tmp_path / "b").exists()


def test_calibration_folder_without_images_is_one_line(tmp_path, tiny_checkpoint):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    proc = run_cli("scalecert-export", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5",
                   "--calib", str(tmp_path / "empty"), "-o", str(tmp_path / "b"))
    assert proc.returncode == 2 and "no images found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["certify", "bench"])
def test_threshold_out_of_range_is_one_line(tiny_bundle, photo_dir, photo_files, command):
    args = ["certify", tiny_bundle, photo_files[0]] if command == "certify" else ["bench", tiny_bundle, "--data", photo_dir]
    proc = run_cli("scalecert", *args, "--threshold", "1")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --threshold 1: expected a confidence in [0, 1)"
