"""The checked-in bundle tests/data/tiny_bundle (made by tests/data/make_tiny_bundle.py): it is
current (opens with every hash verified, certifies its probe images as recorded, has the structure
a fresh export has), and the runtime certifies with it in a fresh interpreter where torch cannot be
imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_BUNDLE

REGENERATE = ("tests/data/tiny_bundle no longer fits the bundle format: run "
              "`python tests/data/make_tiny_bundle.py` and commit tests/data/tiny_bundle")


def _open_checked_in():
    from scalecert.bundle import Bundle
    from scalecert.errors import ScaleCertError
    from scalecert.runtime import Certifier

    try:
        bundle = Bundle.open(TINY_BUNDLE, verify=True)
        return bundle, Certifier.load(TINY_BUNDLE, threads=1)
    except ScaleCertError as exc:
        pytest.fail(f"{REGENERATE} (the runtime refuses it: {exc})")


def test_checked_in_bundle_is_current():
    from scalecert.bundle import manifest as manifest_io
    from scalecert.runtime import probes

    bundle, certifier = _open_checked_in()
    assert bundle.manifest["schema_version"] == manifest_io.SCHEMA_VERSION, REGENERATE
    assert "prefix.onnx" in bundle.manifest.get("locality", {}), REGENERATE
    recorded = bundle.probe_answers("ort-cpu", "fp32")
    assert recorded and len(recorded) == len(bundle.probe_images), REGENERATE
    with certifier:
        got = probes.answers(certifier, bundle)
    problems = probes.differences(recorded, got, certifier.delta)
    assert not problems, f"{REGENERATE}: its probe images no longer certify as recorded: {problems}"
    assert [(a["status"], a["label"]) for a in got] == [(a["status"], a["label"]) for a in recorded], REGENERATE
    # what the runtime tests that use it rely on: both outcomes, more than one label, a sparse gate, a fill
    assert {a["status"] for a in recorded} == {"certified", "alert"} and len({a["label"] for a in recorded}) > 1
    assert 0 < bundle.manifest["sin"]["prune_rate"] < 1 and bundle.window_filled


def _structure(value, depth: int = 3):
    """The shape of a manifest: nested key sets (dicts), lengths of lists of dicts, types elsewhere."""
    if isinstance(value, dict) and depth:
        return {k: _structure(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], dict) and depth:
        return [_structure(value[0], depth - 1)]
    return type(value).__name__


def _graph(path: str) -> dict:
    import onnx

    model = onnx.load(path)
    g = model.graph
    return {"opset": sorted((o.domain, o.version) for o in model.opset_import),
            "inputs": [(v.name, v.type.tensor_type.elem_type) for v in g.input],
            "outputs": [(v.name, v.type.tensor_type.elem_type) for v in g.output],
            "ops": [n.op_type for n in g.node],
            "initializers": sorted((i.name, tuple(i.dims), i.data_type) for i in g.initializer)}


def test_checked_in_bundle_matches_a_fresh_export(tiny16_bundle):
    """make_tiny_bundle.py run now gives a bundle of the same structure: the same manifest keys
    (nested), the same graphs (ops, inputs, outputs, initializers), the same files. The bytes may
    differ (a calibrated threshold can move by an ulp on another CPU, timestamps), the structure
    may not."""
    with open(os.path.join(TINY_BUNDLE, "manifest.json")) as f:
        stored = json.load(f)
    with open(os.path.join(tiny16_bundle, "manifest.json")) as f:
        fresh = json.load(f)
    assert _structure(stored) == _structure(fresh), REGENERATE + " (the exporter now writes another manifest)"
    assert sorted(stored["files"]) == sorted(fresh["files"]), REGENERATE
    for name in ("prefix.onnx", "suffix.onnx"):
        assert _graph(os.path.join(TINY_BUNDLE, name)) == _graph(os.path.join(tiny16_bundle, name)), (
            f"{REGENERATE} (the exporter now writes another {name})")


# A fresh interpreter in which torch cannot be imported (as on a device without it): a meta path
# finder refuses torch and every torch.* module, and records who asked.
_NO_TORCH = r'''
import json, sys

class NoTorch:
    asked = []

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            NoTorch.asked.append(name)
            raise ImportError(f"torch is blocked in this interpreter ({name})")
        return None

for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
    del sys.modules[name]
sys.meta_path.insert(0, NoTorch())
try:
    import torch  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
NoTorch.asked.clear()

from scalecert.bundle import Bundle
from scalecert.runtime import Certifier, probes

bundle_dir = sys.argv[1]
bundle = Bundle.open(bundle_dir, verify=True)
with Certifier.load(bundle_dir, threads=1) as certifier:
    got = probes.answers(certifier, bundle)
    extra = certifier.certify(sys.argv[2])
print(json.dumps({"blocked": blocked, "asked": NoTorch.asked,
                  "torch_loaded": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
                  "answers": [{"status": str(getattr(a["status"], "value", a["status"])), "label": a["label"]}
                              for a in got],
                  "extra": str(getattr(extra.status, "value", extra.status))}))
'''


def test_runtime_certifies_the_checked_in_bundle_without_torch(stored_bundle, photo_files):
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, stored_bundle, photo_files[0]], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["blocked"], "the finder did not block torch: this test would prove nothing"
    assert out["torch_loaded"] == [] and out["asked"] == [], out
    with open(os.path.join(stored_bundle, "manifest.json")) as f:
        recorded = json.load(f)["probes"]["answers"]["ort-cpu-fp32"]
    assert out["answers"] == [{"status": a["status"], "label": a["label"]} for a in recorded]
    assert out["extra"] in ("certified", "alert")
