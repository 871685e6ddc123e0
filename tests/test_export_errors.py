"""Bad input through the real `scalecert-export` CLI: one `error:` line on stderr, a non-zero
exit, no traceback and nothing left behind (no bundle, no `.scalecert-*` work directory). Also
the model formats that must work: .onnx, TorchScript, torch.export .pt2, a trusted pickle, and
`scalecert inspect --json` on what they produce.

Every case is a separate `scalecert-export` process, as a user runs it; they start together in
session fixtures (a few at a time) because most of each one's time is interpreter and torch
start-up, and the tests then check what each left behind.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import numpy as np
import pytest

from conftest import run_cli
from scalecert.bundle import manifest as manifest_io

HELPER_MODULE = "scalecert_test_helper_net"
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


    class Untraceable(SmallNet):
        def forward(self, x):  # data-dependent control flow: torch.export cannot trace it
            y = self.body(x)
            if y.sum() > 0:
                y = y * 2
            return self.head(y.mean((2, 3)))
""")

INSPECT_KEYS = ("layer", "feature_shape", "receptive_field", "footprint", "window_size", "occluding_stride",
                "windows_per_image", "prune_rate", "prefix", "suffix")
WORKERS = max(2, min(4, 2 * (os.cpu_count() or 1)))


def _load_helper(helper_dir) -> ModuleType:
    """The helper module, loaded from its file without touching sys.path. The export subprocesses
    that need it find it through PYTHONPATH."""
    path = helper_dir / f"{HELPER_MODULE}.py"
    path.write_text(HELPER)
    spec = importlib.util.spec_from_file_location(HELPER_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def files(tmp_path_factory, tiny_checkpoint):
    """Model files of every kind, good and bad, made once; plus PyTorch reference logits. ResNet
    checkpoints come from the one tiny-checkpoint builder (scalecert.export.archs.random_checkpoint);
    the TorchScript, torch.export and pickled containers hold one small custom network (its class
    must live outside scalecert for the pickle cases)."""
    import warnings

    import torch
    import torch.nn as nn

    from scalecert.export.archs import random_checkpoint

    root = tmp_path_factory.mktemp("export-errors")
    helper_dir = root / "helper"
    helper_dir.mkdir()
    helper = _load_helper(helper_dir)
    paths = {"helper_dir": str(helper_dir), "tiny": tiny_checkpoint}

    def path(name):
        paths[name] = str(root / name)
        return paths[name]

    with torch.random.fork_rng():  # seeded weights without moving the session's global RNG
        torch.manual_seed(0)
        net = helper.SmallNet().eval()
        with torch.no_grad():  # non-trivial BatchNorm statistics
            net.body[1].running_mean.uniform_(-0.5, 0.5)
            net.body[1].running_var.uniform_(0.5, 2.0)
        seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                            nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).eval()
        example = torch.rand(1, 3, 32, 32)
        probe = torch.rand(3, 3, 32, 32)
        untraceable = helper.Untraceable().eval()
    sys.modules[HELPER_MODULE] = helper  # pickle and TorchScript look the classes up by module name
    try:
        torch.save(net, path("pickled_custom.pt"))
        torch.save(untraceable, path("untraceable.pt"))
        torch.jit.script(net).save(path("script.pt"))
        # torch.export's usual form: a fixed batch of one, as traced from one example image
        torch.export.save(torch.export.export(net, (example,)), path("program.pt2"))
    finally:
        del sys.modules[HELPER_MODULE]
    torch.save(seq, path("pickled_seq.pt"))
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
    with open(path("bad.onnx"), "wb") as f:
        f.write(b"\x08\x07 this is no protobuf" * 10)
    random_checkpoint("resnet32-cifar", path("r32_state.pt"), seed=1)
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    state["linear.weight"], state["linear.bias"] = torch.zeros(100, 64), torch.zeros(100)
    torch.save(state, path("r20_100classes.pt"))
    torch.save({"weights": [1, 2, 3]}, path("not_a_state.pt"))
    random_checkpoint("vit-patch8-64", path("vit.pt"), seed=2)
    with torch.no_grad():
        paths["reference"] = {"probe": probe.numpy(), "net": net(probe).numpy(), "seq": seq(probe).numpy()}
    return paths


# --- running cases concurrently -----------------------------------------------------------------------


@dataclass
class Case:
    args: Callable  # (files, case_dir) -> argument list
    needles: tuple = ()
    env: bool = False  # put the helper module on PYTHONPATH
    setup: Callable | None = None  # (case_dir) -> None, before the run
    output: Callable | None = None  # (case_dir) -> output path; default case_dir/out/model.scalecert


@dataclass
class Ran:
    proc: object
    output: str
    parent: str
    before: set
    after: set
    case_dir: object = field(default=None)


def _run_all(cases: dict, files, tmp_path_factory, extra=()) -> dict:
    jobs = {}
    for name, case in cases.items():
        case_dir = tmp_path_factory.mktemp("case-" + name.replace("/", "-"))
        (case_dir / "out").mkdir()
        if case.setup:
            case.setup(case_dir)
        output = str(case.output(case_dir) if case.output else case_dir / "out" / "model.scalecert")
        env = dict(os.environ, PYTHONPATH=files["helper_dir"]) if case.env else None
        argv = [str(a) for a in case.args(files, case_dir)] + ["-o", output, *extra]
        parent = os.path.dirname(output)
        jobs[name] = (argv, env, output, parent, set(os.listdir(parent)) if os.path.isdir(parent) else set(), case_dir)

    def one(item):
        name, (argv, env, output, parent, before, case_dir) = item
        proc = run_cli("scalecert-export", *argv, env=env, timeout=480)
        after = set(os.listdir(parent)) if os.path.isdir(parent) else set()
        return name, Ran(proc, output, parent, before, after, case_dir)

    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(pool.map(one, jobs.items()))


def _make_calib_dirs(case_dir):
    (case_dir / "empty").mkdir()
    (case_dir / "no_images" / "sub").mkdir(parents=True)
    (case_dir / "no_images" / "notes.txt").write_text("not an image")
    (case_dir / "no_images" / "sub" / "data.csv").write_text("a,b\n")
    (case_dir / "broken").mkdir()
    (case_dir / "broken" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


def _existing_bundle(case_dir):
    """An old bundle (its manifest says so: --force replaces only scalecert bundles)."""
    old = case_dir / "out" / "model.scalecert"
    old.mkdir()
    (old / "keep.txt").write_text("old bundle")
    (old / "manifest.json").write_text(json.dumps({"schema_version": 1, "windows": {}}))


R20 = ("--arch", "resnet20-cifar", "--patch", "5")

FAILURES = {
    # model files
    "missing-file": Case(lambda f, d: [d / "nope.pt", "--arch", "resnet20-cifar"], ("nope.pt", "no such file")),
    "empty-file": Case(lambda f, d: [f["empty.pt"], "--arch", "resnet20-cifar"], ("empty file",)),
    "garbage/arch": Case(lambda f, d: [f["garbage.pt"], "--arch", "resnet20-cifar"],
                         ("garbage.pt", "corrupt or truncated checkpoint")),
    "pickle-garbage/arch": Case(lambda f, d: [f["pickle_garbage.pt"], "--arch", "resnet20-cifar"],
                                ("pickle_garbage.pt", "corrupt or truncated checkpoint")),
    "truncated/arch": Case(lambda f, d: [f["truncated.pt"], "--arch", "resnet20-cifar"],
                           ("truncated.pt", "corrupt or truncated")),
    "truncated": Case(lambda f, d: [f["truncated.pt"]], ("truncated.pt", "corrupt or truncated")),
    "bad-onnx": Case(lambda f, d: [f["bad.onnx"]], ("bad.onnx", "not a valid ONNX model")),
    "not-a-state-dict": Case(lambda f, d: [f["not_a_state.pt"], "--arch", "resnet20-cifar"],
                             ("expected a state_dict",)),
    "state-dict-without-arch": Case(lambda f, d: [f["tiny"]], ("a state_dict checkpoint; pass --arch NAME",)),
    # checkpoints that do not fit the architecture
    "missing-keys": Case(lambda f, d: [f["tiny"], "--arch", "resnet32-cifar"],
                         ("does not fit --arch resnet32-cifar", "missing keys", "layer1.3.")),
    "unexpected-keys": Case(lambda f, d: [f["r32_state.pt"], "--arch", "resnet20-cifar"],
                            ("does not fit --arch resnet20-cifar", "unexpected keys", "layer1.3.")),
    "shape-mismatch": Case(lambda f, d: [f["r20_100classes.pt"], "--arch", "resnet20-cifar"],
                           ("shape mismatch", "linear.weight")),
    # pickles
    "pickle-untrusted": Case(lambda f, d: [f["pickled_custom.pt"], "--input-size", "3x32x32"],
                             ("pickled", "runs arbitrary code", "--trust-pickle"), env=True),
    "pickle-untrusted-seq": Case(lambda f, d: [f["pickled_seq.pt"], "--input-size", "3x32x32"],
                                 ("pickled", "runs arbitrary code", "--trust-pickle")),
    "pickle-class-missing": Case(lambda f, d: [f["pickled_custom.pt"], "--trust-pickle", "--input-size", "3x32x32"],
                                 ("cannot unpickle", HELPER_MODULE)),
    "untraceable": Case(lambda f, d: [f["untraceable.pt"], "--trust-pickle", "--input-size", "3x32x32"],
                        ("untraceable.pt", "torch -> ONNX export failed"), env=True),  # no graph dumps on stderr
    # options
    "unknown-arch": Case(lambda f, d: [f["tiny"], "--arch", "resnet21-cifar"],
                         ("unknown --arch 'resnet21-cifar'", "resnet20-cifar")),
    "patch-abc": Case(lambda f, d: [f["model.onnx"], "--patch", "abc"], ("--patch 'abc'", "expected N, HxW or P%")),
    "patch-too-large": Case(lambda f, d: [f["model.onnx"], "--patch", "33"], ("does not fit the 32x32 input",)),
    "prune-rate-needs-calib": Case(lambda f, d: [f["model.onnx"], "--patch", "5", "--prune-rate", "0.3"],
                                   ("needs --calib",)),
    # superficial layers that cannot carry a certificate
    "layer-vit-flattened": Case(lambda f, d: [f["vit.pt"], "--arch", "vit-patch8-64", "--patch", "8", "--layer", "view"],
                                ("--layer 'view' is not local", "Reshape")),
    "layer-resnet-mean": Case(lambda f, d: [f["tiny"], *R20, "--layer", "mean"], ("is not local", "ReduceMean")),
    "layer-resnet-linear": Case(lambda f, d: [f["tiny"], *R20, "--layer", "linear"], ("is not local", "ReduceMean")),
    "layer-inside-block": Case(lambda f, d: [f["tiny"], *R20, "--layer", "layer1.0.bn1"],
                               ("is not a cut point", "getitem_3")),
    "layer-unknown": Case(lambda f, d: [f["tiny"], *R20, "--layer", "no_such_tensor"],
                          ("no such tensor or module", "relu_4")),
    # calibration data
    "calib-empty": Case(lambda f, d: [f["model.onnx"], "--patch", "5", "--calib", d / "empty"], ("no images found",),
                        setup=_make_calib_dirs),
    "calib-no-images": Case(lambda f, d: [f["model.onnx"], "--patch", "5", "--calib", d / "no_images"],
                            ("no images found",), setup=_make_calib_dirs),
    "calib-absent": Case(lambda f, d: [f["model.onnx"], "--patch", "5", "--calib", d / "absent"],
                         ("absent: no such directory",)),
    # fails after the work directory exists: it must be removed
    "calib-undecodable": Case(lambda f, d: [f["model.onnx"], "--patch", "5", "--prune-rate", "0.3", "--calib",
                                            d / "broken"], ("a.png", "cannot decode image"), setup=_make_calib_dirs),
    # output paths
    "output-exists": Case(lambda f, d: [f["model.onnx"], "--patch", "5"], ("already exists", "--force"),
                          setup=_existing_bundle),
    "output-under-a-file": Case(lambda f, d: [f["model.onnx"], "--patch", "5"], ("is a file, not a folder",),
                                output=lambda d: d / "no" / "such" / "b", setup=lambda d: (d / "no").write_text("x")),
}

SUCCESSES = {
    "onnx": Case(lambda f, d: [f["model.onnx"], "--patch", "5"]),
    "torchscript": Case(lambda f, d: [f["script.pt"], "--input-size", "3x32x32", "--patch", "5"]),
    "exported": Case(lambda f, d: [f["program.pt2"], "--patch", "5"]),
    "pickle-trusted": Case(lambda f, d: [f["pickled_custom.pt"], "--trust-pickle", "--input-size", "3x32x32",
                                         "--patch", "5"], env=True),
    "force": Case(lambda f, d: [f["model.onnx"], "--patch", "5", "--force"], setup=_existing_bundle),
}


@pytest.fixture(scope="session")
def failures(files, tmp_path_factory):
    return _run_all(FAILURES, files, tmp_path_factory, extra=("--quiet",))


@pytest.fixture(scope="session")
def successes(files, tmp_path_factory):
    return _run_all(SUCCESSES, files, tmp_path_factory)


# --- failures --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAILURES))
def test_bad_input_fails_cleanly(failures, name):
    ran = failures[name]
    proc = ran.proc
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in FAILURES[name].needles:
        assert needle in lines[0], lines[0]
    assert ran.after == ran.before, f"left behind: {ran.after - ran.before}"
    if os.path.isdir(ran.parent):
        assert not [n for n in os.listdir(ran.parent) if n.startswith(".scalecert-")]
    if name != "output-exists":
        assert not os.path.exists(ran.output)


def test_failures_say_what_is_wrong(failures):
    assert "unexpected keys" not in failures["missing-keys"].proc.stderr
    assert "missing keys" not in failures["unexpected-keys"].proc.stderr
    assert not [name for name, r in failures.items() if "\x1b" in r.proc.stderr], "terminal colour codes"
    # the refused output is left exactly as it was
    old = failures["output-exists"].case_dir / "out" / "model.scalecert"
    assert sorted(os.listdir(old)) == ["keep.txt", "manifest.json"] and (old / "keep.txt").read_text() == "old bundle"


# --- formats that must work ----------------------------------------------------------------------------


def _ok(successes, name) -> tuple[str, dict]:
    ran = successes[name]
    proc = ran.proc
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"wrote {ran.output}" in proc.stdout
    m = manifest_io.read(ran.output, verify=True)  # every hash checks out
    assert set(os.listdir(ran.parent)) == ran.before | {os.path.basename(ran.output)}  # no work dirs left
    return ran.output, m


def inspect_json(bundle: str) -> dict:
    proc = run_cli("scalecert", "inspect", bundle, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    missing = [k for k in INSPECT_KEYS if k not in info]
    assert not missing, f"inspect --json lacks {missing}"
    return info


def _dense_logits(bundle: str, x: np.ndarray) -> np.ndarray:
    from scalecert.runtime.pipelines.onnxruntime import OrtRunner

    with OrtRunner(os.path.join(bundle, "prefix.onnx")) as prefix, \
            OrtRunner(os.path.join(bundle, "suffix.onnx")) as suffix:
        features = prefix.infer({"image": x})["features"]
        return np.concatenate([suffix.infer({"features": f[None], "windows": np.zeros((1, 4), np.int64)})["logits"]
                               for f in features])


def test_force_replaces_an_existing_bundle(successes):
    bundle, _ = _ok(successes, "force")
    assert not os.path.exists(os.path.join(bundle, "keep.txt"))
    assert {"manifest.json", "prefix.onnx", "suffix.onnx"} <= set(os.listdir(bundle))


def test_onnx_input_and_inspect(successes, files):
    bundle, m = _ok(successes, "onnx")
    assert m["source"]["kind"] == "onnx" and m["input"]["input_size"] == [3, 32, 32]
    proc = run_cli("scalecert", "inspect", bundle)
    assert proc.returncode == 0 and "model.onnx" in proc.stdout and "5x5 pixels" in proc.stdout, proc.stdout
    info = inspect_json(bundle)
    assert info["source"] == "model.onnx" and info["patch"] == [5, 5]
    assert info["layer"] == m["layer"]["name"] and info["prune_rate"] == 0
    assert info["windows_per_image"] == m["windows"]["count"] >= 1
    assert info["feature_shape"] == [m["layer"]["channels_kept"], *m["layer"]["shape"][1:]]
    assert info["receptive_field"] == m["layer"]["receptive_field"]["size"]
    assert info["footprint"] == m["windows"]["footprint"] and info["window_size"] == m["windows"]["size"]
    assert info["prefix"]["macs"] > 0 and info["suffix"]["params"] > 0
    ref = files["reference"]
    assert np.abs(_dense_logits(bundle, ref["probe"]) - ref["seq"]).max() <= 1e-4


@pytest.mark.parametrize("name, kind", [("torchscript", "torchscript"), ("exported", "exported"),
                                        ("pickle-trusted", "torch")])
def test_torch_formats_produce_bundles(successes, files, name, kind):
    bundle, m = _ok(successes, name)
    assert m["source"]["kind"] == kind and m["num_classes"] == 10 and m["input"]["input_size"] == [3, 32, 32]
    info = inspect_json(bundle)
    assert info["feature_shape"][1:] == m["layer"]["shape"][1:]
    ref = files["reference"]  # the same network in three containers; a batch of 3 through the bundle
    assert np.abs(_dense_logits(bundle, ref["probe"]) - ref["net"]).max() <= 1e-4
