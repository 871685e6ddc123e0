"""`scalecert tune` end to end on a tiny ImageFolder of real photo crops (no ../shared needed):
the checkpoint loads with weights_only=True, exports with the tuned gate, certifies; the gate the
training used equals the exported prefix's; resume, seed determinism and bad inputs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import in_process, run_cli, skimage_photos

TUNE_ARGS = ("--arch", "resnet20-cifar", "--patch", "5", "--stride", "8", "--prune-rate", "0.5", "--batch", "16",
             "--val-limit", "12", "--cert-limit", "4", "--quiet")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> str:
    """Three classes of 32x32 crops of real scikit-image photos, as an ImageFolder tree."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, photo in list(skimage_photos().items())[:3]:
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        os.makedirs(root / name)
        for i in range(20):
            y, x = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 96)
            crop = Image.fromarray(photo[y:y + 96, x:x + 96]).resize((32, 32), Image.BILINEAR)
            crop.save(root / name / f"{i:02d}.png")
    return str(root)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, photo_folder, tiny_checkpoint) -> str:
    out = str(tmp_path_factory.mktemp("tuned") / "tuned.pt")
    in_process("tune", tiny_checkpoint, "--data", photo_folder, "--epochs", "2", "-o", out, *TUNE_ARGS)
    return out


def test_checkpoint_is_a_plain_state_dict_with_its_record(tuned, tiny_checkpoint):
    import torch

    data = torch.load(tuned, map_location="cpu", weights_only=True)
    record = data["scalecert_tune"]
    assert record["settings"]["patch"] == "5" and record["settings"]["stride_chosen"] == 8
    assert record["sin"]["prune_rate"] == 0.5 and len(record["sin"]["threshold_by_rate"]) == 100
    assert [h["epoch"] for h in record["history"]] == list(range(record["epoch"] + 1))  # best epoch kept
    last = torch.load(tuned + ".last", map_location="cpu", weights_only=True)
    assert [h["epoch"] for h in last["history"]] == [0, 1, 2] and last["best"]["epoch"] == record["epoch"]
    start = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    assert set(data["state_dict"]) == set(start)
    assert not torch.equal(data["state_dict"]["conv1.weight"], start["conv1.weight"]), "tuning changed nothing"


def test_tune_keeps_its_input_when_training_hurts(tuned, tmp_path, photo_folder, capsys):
    """A learning rate that wrecks the weights: validation runs before the first epoch, no epoch
    beats the input, and the output holds the input's weights unchanged (one line says so)."""
    import torch

    out = str(tmp_path / "hurt.pt")
    in_process("tune", tuned, "--data", photo_folder, "--epochs", "1", "--lr", "1000", "-o", out,
               *[a for a in TUNE_ARGS if a != "--quiet"])
    said = capsys.readouterr().out
    assert "no epoch beat the input on validation" in said
    assert "warning: 3 validation images are too few" in said
    kept = torch.load(out, map_location="cpu", weights_only=True)
    start = torch.load(tuned, map_location="cpu", weights_only=True)["state_dict"]
    assert kept["scalecert_tune"]["epoch"] == 0
    assert all(torch.equal(kept["state_dict"][k], start[k]) for k in start)


def test_tuned_checkpoint_exports_with_its_gate_and_certifies(tuned, tmp_path, photo_folder):
    """Export takes patch/stride/layer/gate from the record; the prefix's gate is bitwise the
    training gate (off float ties at tau) and its features equal the training features."""
    import torch

    from scalecert.export.loading import load_model
    from scalecert.runtime import Certifier
    from scalecert.training.tune import SplitNetwork, plan

    bundle = str(tmp_path / "tuned.scalecert")
    in_process("export", tuned, "--arch", "resnet20-cifar", "-o", bundle, "--quiet")
    manifest = json.load(open(os.path.join(bundle, "manifest.json")))
    record = torch.load(tuned, weights_only=True)["scalecert_tune"]
    assert manifest["threat_model"]["patch"] == [5, 5] and manifest["windows"]["stride"] == 8
    assert manifest["sin"]["threshold"] == record["sin"]["threshold"] and manifest["sin"]["prune_rate"] == 0.5
    assert manifest["windows"]["fill"] == "zero"  # tune trains with zeroed windows, so its export zeroes them

    loaded = load_model(tuned, "resnet20-cifar")
    program, split = plan(loaded, "5", "auto", "8", 100, 2.0)
    layer, windows = split.layer, split.windows
    assert (layer.name, split.stride) == (manifest["layer"]["name"], manifest["windows"]["stride"])
    net = SplitNetwork(program.module(), layer.name, manifest["input"], windows, layer.shape[1:], "abs")
    net.alpha = torch.tensor(record["sin"]["alpha"]).reshape(1, -1, 1, 1)
    net.tau = record["sin"]["threshold"]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(photo_folder) for f in fs)[:24]
    with Certifier.load(bundle) as cert:
        pixels = np.stack([cert.prepare(f) for f in files])
        features, gate = cert.features(pixels)
        result = cert.certify(files[0])
    with torch.no_grad():
        a = net.superficial(net.normalize(pixels))
        trained_gate = (net.score(a) > net.tau).numpy()
        trained_features = net.gated(a).numpy()
    clear = np.abs(net.score(a).numpy() - net.tau) > 1e-4 * max(1.0, abs(net.tau))
    assert 0.1 < trained_gate.mean() < 0.9  # a real gate: neither all kept nor all pruned
    assert np.array_equal(gate.astype(bool)[clear], trained_gate[clear])
    live = np.asarray(record["sin"]["alpha"]) > 0
    np.testing.assert_allclose(features, trained_features[:, live] if features.shape[1] < len(live) else trained_features,
                               atol=1e-5)
    assert result.status in ("certified", "alert") and result.windows_total == len(windows)


def test_resume_continues_from_the_last_epoch(tmp_path, photo_folder, tiny_checkpoint, capsys):
    import torch

    out = str(tmp_path / "r.pt")
    in_process("tune", tiny_checkpoint, "--data", photo_folder, "--epochs", "1", "-o", out, *TUNE_ARGS)
    proc = run_cli("scalecert", "tune", tiny_checkpoint, "--data", photo_folder, "--epochs", "2", "-o", out,
                   "--resume", *TUNE_ARGS)
    lines = proc.stderr.strip().splitlines()  # epochs changed the schedule: refused
    assert proc.returncode == 2 and len(lines) == 1 and "r.pt.last: was written with other settings" in lines[0], proc.stderr
    capsys.readouterr()
    in_process("tune", tiny_checkpoint, "--data", photo_folder, "--epochs", "1", "-o", out,
               "--resume", *[a for a in TUNE_ARGS if a != "--quiet"])
    assert "resumed" in capsys.readouterr().out
    last = torch.load(out + ".last", weights_only=True)
    assert last["epoch"] == 1 and len(last["history"]) == 2


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path, photo_folder, tiny_checkpoint):
    import torch

    outs = []
    for name in ("a", "b"):
        outs.append(str(tmp_path / f"{name}.pt"))
        run_cli("scalecert", "tune", tiny_checkpoint, "--data", photo_folder, "--epochs", "1", "--limit", "32",
                "-o", outs[-1], "--threads", "1", *TUNE_ARGS, check=True)
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _valid_onnx(path) -> str:
    """A well-formed ONNX classifier (global average pool): a model tune cannot write weights back to."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])],
                              "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return str(path)


BAD_INPUT = {  # case -> (arguments, expected message fragment); MODEL, DATA and TMP are filled in
    "missing data": (["MODEL", "--arch", "resnet20-cifar", "--data", "TMP/nope", "-o", "TMP/o.pt"],
                     "nope: no such directory"),
    "unknown arch": (["MODEL", "--arch", "resnet21", "--data", "DATA", "-o", "TMP/o.pt"],
                     "unknown --arch 'resnet21'; known: efficientnet-lite0"),
    "output under a file": (["MODEL", "--arch", "resnet20-cifar", "--data", "DATA", "-o", "MODEL/o.pt"],
                            "is a file, not a folder"),
    "no model": (["--arch", "resnet20-cifar", "--data", "DATA", "-o", "TMP/o.pt"], "no model file given"),
    "onnx model": (["ONNX", "--arch", "resnet20-cifar", "--data", "DATA", "-o", "TMP/o.pt"],
                   "tune needs a state_dict checkpoint with --arch"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line(case, tmp_path, photo_folder, tiny_checkpoint):
    template, expected = BAD_INPUT[case]
    onnx_model = _valid_onnx(tmp_path / "m.onnx") if "ONNX" in template else None
    named = {"MODEL": tiny_checkpoint, "DATA": photo_folder, "ONNX": onnx_model}
    args = [named.get(a, str(tmp_path) + a[3:] if a.startswith("TMP/") else
                      tiny_checkpoint + a[5:] if a.startswith("MODEL/") else a) for a in template]
    proc = run_cli("scalecert", "tune", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert expected in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "o.pt")


def test_best_checkpoint_never_a_diverged_or_collapsed_epoch():
    """The checkpoint rule of `tune` (training/tune.beats): more certified accuracy wins, unless the
    loss diverged or clean accuracy fell more than max_clean_drop below the input's (a network
    collapsing to one class 'certifies' that class's images)."""
    from scalecert.training.tune import beats

    start = {"clean_accuracy": 0.80, "certified_accuracy": 0.02}
    better = {"clean_accuracy": 0.79, "certified_accuracy": 0.20, "train_loss": 0.4}
    collapsed = {"clean_accuracy": 0.10, "certified_accuracy": 0.10, "train_loss": 2.3}
    diverged = {"clean_accuracy": 0.80, "certified_accuracy": 0.30, "train_loss": float("nan")}
    assert beats(better, start, start, 0.03)
    assert not beats(collapsed, start, start, 0.03)
    assert beats(collapsed, start, start, 1.0)  # the guard off
    assert not beats(diverged, start, start, 0.03)
    assert not beats({**better, "clean_accuracy": 0.76}, start, start, 0.03)
    assert not beats(start | {"train_loss": 0.1}, start, start, 0.03)  # a tie keeps what it has
