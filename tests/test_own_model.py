"""Issue 26, the user's own model: what export assumes is said and can be changed (--mean, --std,
--resize, a grey input), --arch with a whole-model file is honoured, -o makes its parents, and
without --calib the geometric plan stays within the budget of full forwards per image."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import export, in_process, run_cli


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory) -> dict:
    """A small 1x28x28 classifier saved as ONNX (fixed batch 1) and TorchScript."""
    import torch

    class Grey(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))

    torch.manual_seed(0)
    model = Grey().eval()
    folder = tmp_path_factory.mktemp("grey")
    example = torch.rand(1, 1, 28, 28)
    torch.onnx.export(model, (example,), str(folder / "grey.onnx"), dynamo=False)
    torch.jit.save(torch.jit.trace(model, example), str(folder / "grey.pt"))
    return {"onnx": str(folder / "grey.onnx"), "pt": str(folder / "grey.pt"), "module": model}


def _manifest(bundle: str) -> dict:
    with open(os.path.join(bundle, "manifest.json")) as f:
        return json.load(f)


def test_a_grey_model_exports_with_its_own_normalisation_and_certifies(grey_model, tmp_path_factory):
    import torch

    import scalecert
    from scalecert.runtime.images import normalize

    bundle = export(tmp_path_factory, "grey-bundle", grey_model["onnx"], "--patch", "4", "--mean", "0.5",
                    "--std", "0.25", "--resize", "none")
    spec = _manifest(bundle)["input"]
    assert spec["input_size"] == [1, 28, 28] and spec["mean"] == [0.5] and spec["std"] == [0.25]
    assert spec["resize_short"] is None
    frame = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    with scalecert.load(bundle) as cert:
        result = cert.certify(frame)
    x = normalize(frame, spec)
    assert x.shape == (1, 1, 28, 28)
    with torch.no_grad():
        assert result.label == int(grey_model["module"](torch.from_numpy(x)).argmax())


def test_export_says_what_it_assumed(grey_model, tmp_path):
    proc = run_cli("scalecert-export", grey_model["pt"], "--input-size", "1x28x28", "--patch", "4", "-o",
                   tmp_path / "a" / "b" / "c")  # -o makes its parents
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    assert "input: grey 28x28" in said and "assumed: mean, std, resize" in said, said
    assert "no --calib images" in said and "--calib DIR" in said
    assert os.path.isfile(tmp_path / "a" / "b" / "c" / "manifest.json")
    inspect = run_cli("scalecert", "inspect", tmp_path / "a" / "b" / "c")
    assert "preprocessing" in inspect.stdout and "tau" not in inspect.stdout.split("alert threshold")[-1]


@pytest.mark.parametrize("args, needle", [
    (["--mean", "0.5,0.5"], "--mean 0.5,0.5: expected 1 numbers"),
    (["--std", "0"], "--std 0.0: expected 1 positive numbers"),
    (["--mean", "a,b"], "expected comma-separated numbers"),
    (["--resize", "big"], "expected a short side in pixels"),
])
def test_bad_preprocessing_options_are_one_line(grey_model, tmp_path, args, needle):
    proc = run_cli("scalecert-export", grey_model["onnx"], "--patch", "4", *args, "-o", tmp_path / "x")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "x")


def test_arch_with_a_whole_model_file_is_honoured(tmp_path_factory, tiny_checkpoint):
    """A TorchScript file with --arch resnet20-cifar takes the arch's input spec (CIFAR mean/std, no
    resize), never the ImageNet default."""
    import torch

    from scalecert.export.archs import REGISTRY
    from scalecert.export.loading import load_model

    loaded = load_model(tiny_checkpoint, "resnet20-cifar")
    path = str(tmp_path_factory.mktemp("ts") / "r20.pt")
    torch.jit.save(torch.jit.trace(loaded.model, torch.rand(1, 3, 32, 32)), path)
    bundle = export(tmp_path_factory, "ts-arch", path, "--arch", "resnet20-cifar", "--patch", "5")
    spec, arch = _manifest(bundle)["input"], REGISTRY["resnet20-cifar"].preprocess
    assert spec["mean"] == list(arch.mean) and spec["resize_short"] == arch.resize_short
    assert _manifest(bundle)["source"]["arch"] == "resnet20-cifar"


def test_without_calibration_the_plan_stays_within_the_budget(tiny_bundle):
    """The geometric plan's stride is the smallest whose cost fits --budget (37 forwards by default)."""
    m = _manifest(tiny_bundle)
    stats, n = m["stats"], m["windows"]["count"]
    cost = (stats["prefix"]["macs"] + (1 + n) * stats["suffix"]["macs"]) / stats["full"]["macs"]
    assert m["plan"]["method"] == "geometric" and cost <= 37, (n, cost)


def test_a_torchscript_input_size_mismatch_names_the_size(grey_model, tmp_path):
    proc = run_cli("scalecert-export", grey_model["pt"], "--patch", "4", "-o", tmp_path / "x")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "pass --input-size 1x28x28" in lines[0], proc.stderr


def test_a_missing_model_is_refused_before_options_are_read(tmp_path):
    with pytest.raises(Exception, match="no such file"):
        in_process("export", str(tmp_path / "none.onnx"), "--patch", "4", "-o", str(tmp_path / "o"))
