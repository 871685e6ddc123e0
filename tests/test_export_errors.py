"""Bad input through the real `scalecert-export` CLI: one `error:` line on stderr, a non-zero
exit, no traceback and nothing left behind (no bundle, no `.scalecert-*` work directory). Also
the model formats that must work: .onnx, TorchScript, torch.export .pt2, a trusted pickle, and
`scalecert inspect --json` on what they produce."""
from __future__ import annotations

import json
import os
import textwrap

import pytest

from conftest import run_cli
from scalecert import manifest as manifest_io

HELPER = textwrap.dedent("""
    import torch.nn as nn


    class SmallNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))
""")

INSPECT_KEYS = ("layer", "feature_shape", "receptive_field", "footprint", "window_size", "occluding_stride",
                "windows_per_image", "prune_rate", "prefix", "suffix")


@pytest.fixture(scope="session")
def files(tmp_path_factory, tiny_checkpoint):
    """Model files of every kind, good and bad, made once."""
    import sys
    import warnings

    import torch
    import torch.nn as nn

    from scalecert.exporter.archs import REGISTRY

    root = tmp_path_factory.mktemp("export-errors")
    helper_dir = root / "helper"
    helper_dir.mkdir()
    (helper_dir / "scalecert_test_helper_net.py").write_text(HELPER)
    sys.path.insert(0, str(helper_dir))
    try:
        from scalecert_test_helper_net import SmallNet
    finally:
        sys.path.remove(str(helper_dir))
    torch.manual_seed(0)
    net = SmallNet().eval()
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).eval()
    example = torch.rand(1, 3, 32, 32)
    paths = {"helper_dir": str(helper_dir), "tiny": tiny_checkpoint}

    def path(name):
        paths[name] = str(root / name)
        return paths[name]

    torch.save(net, path("pickled_custom.pt"))
    torch.save(seq, path("pickled_seq.pt"))
    torch.jit.script(net).save(path("script.pt"))
    torch.export.save(torch.export.export(net, (example,)), path("program.pt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(seq, (example,), path("model.onnx"), dynamo=False, input_names=["input"],
                          output_names=["out"])
    with open(tiny_checkpoint, "rb") as f:
        whole = f.read()
    with open(path("truncated.pt"), "wb") as f:
        f.write(whole[: len(whole) // 2])
    with open(path("garbage.pt"), "wb") as f:
        f.write(bytes(range(256)) * 8)
    with open(path("pickle_garbage.pt"), "wb") as f:
        f.write(b"\x80\x02garbage" * 50)  # a pickle header, then nonsense
    open(path("empty.pt"), "wb").close()
    torch.manual_seed(1)
    torch.save(REGISTRY["resnet32-cifar"].build().state_dict(), path("r32_state.pt"))
    state = REGISTRY["resnet20-cifar"].build().state_dict()
    state["linear.weight"] = torch.zeros(100, 64)
    state["linear.bias"] = torch.zeros(100)
    torch.save(state, path("r20_100classes.pt"))
    torch.save({"weights": [1, 2, 3]}, path("not_a_state.pt"))
    return paths


def _listing(folder) -> set:
    return set(os.listdir(folder))


def fails(tmp_path, *args, needles=(), output=None, **kwargs) -> str:
    """Run scalecert-export, expect a clean failure, return its one stderr line."""
    parent = tmp_path / "out"
    parent.mkdir(exist_ok=True)
    output = str(output or parent / "model.scalecert")
    before = _listing(parent)
    proc = run_cli("scalecert-export", *map(str, args), "-o", output, "--quiet", **kwargs)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _listing(parent) == before, f"left behind: {_listing(parent) - before}"
    assert not any(n.startswith(".scalecert-") for n in os.listdir(parent))
    return lines[0]


def succeeds(tmp_path, *args, output=None, **kwargs) -> str:
    output = str(output or tmp_path / "ok.scalecert")
    proc = run_cli("scalecert-export", *map(str, args), "-o", output, **kwargs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"wrote {output}" in proc.stdout
    manifest_io.read(output, verify=True)  # every hash checks out
    assert not any(n.startswith(".scalecert-") for n in os.listdir(os.path.dirname(output)))
    return output


def inspect_json(bundle: str) -> dict:
    proc = run_cli("scalecert", "inspect", bundle, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    missing = [k for k in INSPECT_KEYS if k not in info]
    assert not missing, f"inspect --json lacks {missing}"
    return info


# --- model files ---------------------------------------------------------------------------------


def test_missing_model_file(tmp_path):
    fails(tmp_path, tmp_path / "nope.pt", "--arch", "resnet20-cifar", needles=("nope.pt", "no such file"))
    fails(tmp_path, tmp_path / "nope.onnx", needles=("no such file",))
    fails(tmp_path, tmp_path, "--arch", "resnet20-cifar", needles=("is a directory",))
    fails(tmp_path, needles=("no model file given",))


def test_corrupt_checkpoints(tmp_path, files):
    for name in ("garbage.pt", "pickle_garbage.pt"):
        fails(tmp_path, files[name], "--arch", "resnet20-cifar", needles=(name,))
        fails(tmp_path, files[name], needles=(name,))
    fails(tmp_path, files["truncated.pt"], "--arch", "resnet20-cifar", needles=("truncated.pt", "cannot read checkpoint"))
    fails(tmp_path, files["truncated.pt"], needles=("truncated.pt",))
    fails(tmp_path, files["empty.pt"], "--arch", "resnet20-cifar", needles=("empty file",))
    fails(tmp_path, files["not_a_state.pt"], "--arch", "resnet20-cifar", needles=("expected a state_dict",))
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"\x08\x07 this is no protobuf" * 10)
    fails(tmp_path, bad_onnx, needles=("not a valid ONNX model",))


def test_checkpoint_that_does_not_fit_the_arch(tmp_path, files):
    line = fails(tmp_path, files["tiny"], "--arch", "resnet32-cifar",
                 needles=("does not fit --arch resnet32-cifar", "missing keys", "layer1.3."))
    assert "unexpected keys" not in line
    fails(tmp_path, files["r32_state.pt"], "--arch", "resnet20-cifar",
          needles=("does not fit --arch resnet20-cifar", "unexpected keys", "layer1.3."))
    fails(tmp_path, files["r20_100classes.pt"], "--arch", "resnet20-cifar",
          needles=("shape mismatch", "linear.weight"))
    fails(tmp_path, files["tiny"], needles=("state_dict", "--arch"))  # which architecture?


def test_pickled_module_needs_trust(tmp_path, files):
    env = dict(os.environ, PYTHONPATH=files["helper_dir"])
    for name in ("pickled_custom.pt", "pickled_seq.pt"):
        fails(tmp_path, files[name], "--input-size", "3x32x32",
              needles=("pickled", "runs arbitrary code", "--trust-pickle"), env=env)
    # trusted, but the class it names cannot be imported: still one clean line
    fails(tmp_path, files["pickled_custom.pt"], "--trust-pickle", "--input-size", "3x32x32",
          needles=("cannot unpickle", "scalecert_test_helper_net"))
    bundle = succeeds(tmp_path, files["pickled_custom.pt"], "--trust-pickle", "--input-size", "3x32x32",
                      "--patch", "5", env=env)
    m = manifest_io.read(bundle)
    assert m["source"]["kind"] == "torch" and m["input"]["input_size"] == [3, 32, 32]


# --- bad options -------------------------------------------------------------------------------------


def test_unknown_arch(tmp_path, files):
    fails(tmp_path, files["tiny"], "--arch", "resnet21-cifar", needles=("unknown --arch 'resnet21-cifar'", "resnet20-cifar"))
    fails(tmp_path, "--arch", "resnet20-cifar", "--pretrained", needles=("--pretrained needs --arch with shipped weights",))


@pytest.mark.parametrize("spec, needle", [("abc", "expected N, HxW or P%"), ("0", "positive"), ("5x", "expected"),
                                          ("0%", "expected"), ("33", "does not fit the 32x32 input"),
                                          ("5x40", "does not fit the 32x32 input")])
def test_bad_patch(tmp_path, files, spec, needle):
    fails(tmp_path, files["model.onnx"], "--patch", spec, needles=("--patch", needle))


def test_bad_numbers(tmp_path, files):
    fails(tmp_path, files["model.onnx"], "--input-size", "3x32", needles=("--input-size",))
    fails(tmp_path, files["model.onnx"], "--patch", "5", "--prune-rate", "1.5", needles=("--prune-rate",))
    fails(tmp_path, files["model.onnx"], "--patch", "5", "--prune-rate", "0.3", needles=("needs --calib",))
    fails(tmp_path, files["model.onnx"], "--patch", "5", "--stride", "0", needles=("--stride",))


def test_non_local_layer(tmp_path, files):
    # after the ViT's flatten (a Reshape to tokens) and inside its attention
    from scalecert.exporter.archs import REGISTRY

    import torch

    torch.manual_seed(0)
    vit = tmp_path / "vit.pt"
    torch.save(REGISTRY["vit-patch8-64"].build().state_dict(), vit)
    fails(tmp_path, vit, "--arch", "vit-patch8-64", "--patch", "8", "--layer", "view",
          needles=("--layer 'view' is not local", "Reshape"))
    # ResNet-20's global average pool and the classifier after it
    fails(tmp_path, files["tiny"], "--arch", "resnet20-cifar", "--patch", "5", "--layer", "mean",
          needles=("is not local", "ReduceMean"))
    fails(tmp_path, files["tiny"], "--arch", "resnet20-cifar", "--patch", "5", "--layer", "linear",
          needles=("is not local", "ReduceMean"))


def test_non_cut_layer(tmp_path, files):
    fails(tmp_path, files["tiny"], "--arch", "resnet20-cifar", "--patch", "5", "--layer", "layer1.0.bn1",
          needles=("is not a cut point", "getitem_3"))
    fails(tmp_path, files["tiny"], "--arch", "resnet20-cifar", "--patch", "5", "--layer", "no_such_tensor",
          needles=("no such tensor or module", "relu_4"))


def test_calibration_dirs(tmp_path, files):
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(tmp_path, files["model.onnx"], "--patch", "5", "--calib", empty, needles=("no images found",))
    no_images = tmp_path / "no_images"
    (no_images / "sub").mkdir(parents=True)
    (no_images / "notes.txt").write_text("not an image")
    (no_images / "sub" / "data.csv").write_text("a,b\n")
    fails(tmp_path, files["model.onnx"], "--patch", "5", "--calib", no_images, needles=("no images found",))
    fails(tmp_path, files["model.onnx"], "--patch", "5", "--calib", tmp_path / "absent", needles=("no such directory",))
    # an image that does not decode fails after the work directory exists: it must be removed
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    fails(tmp_path, files["model.onnx"], "--patch", "5", "--prune-rate", "0.3", "--calib", broken,
          needles=("a.png", "cannot decode image"))


def test_existing_output_needs_force(tmp_path, files):
    out = tmp_path / "out" / "model.scalecert"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("old bundle")
    fails(tmp_path, files["model.onnx"], "--patch", "5", output=out, needles=("already exists", "--force"))
    assert (out / "keep.txt").read_text() == "old bundle"
    as_file = tmp_path / "out" / "file.scalecert"
    as_file.write_text("x")
    fails(tmp_path, files["model.onnx"], "--patch", "5", output=as_file, needles=("already exists",))
    fails(tmp_path, files["model.onnx"], "--patch", "5", output=tmp_path / "no" / "such" / "dir" / "b",
          needles=("cannot write there",))
    # --force replaces it, and what replaces it verifies
    succeeds(tmp_path, files["model.onnx"], "--patch", "5", "--force", output=out)
    assert not (out / "keep.txt").exists()
    assert sorted(os.listdir(tmp_path / "out")) == ["file.scalecert", "model.scalecert"]
    assert {"manifest.json", "prefix.onnx", "suffix.onnx"} <= set(os.listdir(out))


# --- formats that must work ---------------------------------------------------------------------------


def test_onnx_input_and_inspect(tmp_path, files):
    bundle = succeeds(tmp_path, files["model.onnx"], "--patch", "5")
    m = manifest_io.read(bundle)
    assert m["source"]["kind"] == "onnx" and m["input"]["input_size"] == [3, 32, 32]
    proc = run_cli("scalecert", "inspect", bundle)
    assert proc.returncode == 0 and "model.onnx" in proc.stdout and "5x5 pixels" in proc.stdout, proc.stdout
    info = inspect_json(bundle)
    assert info["source"] == "model.onnx" and info["patch"] == [5, 5]
    assert info["layer"] == m["layer"]["name"] and info["prune_rate"] == 0
    assert info["windows_per_image"] == m["windows"]["count"] >= 1
    assert len(info["feature_shape"]) == 3 and len(info["receptive_field"]) == 2


@pytest.mark.parametrize("name, kind", [("script.pt", "torchscript"), ("program.pt2", "exported")])
def test_torchscript_and_exported_program_inputs(tmp_path, files, name, kind):
    bundle = succeeds(tmp_path, files[name], "--input-size", "3x32x32", "--patch", "5")
    m = manifest_io.read(bundle)
    assert m["source"]["kind"] == kind and m["num_classes"] == 10
    info = inspect_json(bundle)
    assert info["feature_shape"][1:] == m["layer"]["shape"][1:]
