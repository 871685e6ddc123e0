"""The embeddable API (docs/api.md): `import scalecert; scalecert.load(...)`, frozen typed results, an
error hierarchy, frames of any size, and the camera-loop example of docs/api.md run as written."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

import scalecert


def _example_code() -> str:
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    loop = [b for b in blocks if "def watch" in b]
    assert len(loop) == 1, "docs/api.md must hold one camera-loop example"
    return loop[0]


def test_the_camera_loop_example_runs_without_torch(tiny_bundle):
    """The example as documented, in a fresh interpreter where importing torch fails."""
    code = ("import sys\nsys.modules['torch'] = None\n" + _example_code() +
            f"\nseen = watch({tiny_bundle!r}, frames=4)\n"
            "assert len(seen) == 4 and all(size == (480, 640) for _, _, size in seen), seen\n"
            "assert all(isinstance(s, scalecert.Status) for s, _, _ in seen)\nprint('ok', seen[0][0])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]


def test_load_gives_a_frozen_typed_result(tiny_bundle):
    with scalecert.load(tiny_bundle) as cert:
        assert isinstance(cert, scalecert.Certifier)
        frame = np.random.default_rng(1).integers(0, 256, (120, 90, 3), dtype=np.uint8)  # any size
        result = cert.certify(frame)
        assert isinstance(result.status, scalecert.Status) and result.status in tuple(scalecert.Status)
        assert result.source == scalecert.SourceReport.from_json(result.to_json()["source"])
        assert result.source.size == (120, 90)
        assert result.evaluation is None
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.label = 3
        with pytest.raises(AttributeError, match="evaluation=True"):
            result.window_labels
        assert all(isinstance(w, tuple) and len(w) == 4 for w in result.alert_windows)
        full = cert.certify(frame, evaluation=True)
        assert len(full.evaluation.labels) == full.windows_total and (full.status, full.label) == (result.status,
                                                                                                   result.label)


def test_certify_batch_takes_frames_of_any_size(tiny_bundle):
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((32, 32, 3), (64, 48, 3), (300, 200, 3))]
    with scalecert.load(tiny_bundle, mode="detect") as cert:
        batch = cert.certify_batch(frames, prefix_batch=2)
        alone = [cert.certify(frame) for frame in frames]
    for a, b, frame in zip(batch, alone, frames):
        assert (a.status, a.label, a.source) == (b.status, b.label, b.source)
        assert a.source.size == frame.shape[:2]


def test_errors_are_one_hierarchy(tiny_bundle, tmp_path):
    with pytest.raises(scalecert.BundleError, match="no such bundle"):
        scalecert.load(str(tmp_path / "missing"))
    with pytest.raises(scalecert.OptionError):
        scalecert.load(tiny_bundle, threshold=1.5)
    with pytest.raises(scalecert.OptionError, match="mode"):
        scalecert.load(tiny_bundle, mode="guess")
    with scalecert.load(tiny_bundle) as cert:
        with pytest.raises(scalecert.ImageError):
            cert.certify(np.zeros((8, 8), np.float32))
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not an image")
        with pytest.raises(scalecert.ImageError):
            cert.certify(str(broken))
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_bundle, copy)
    with open(os.path.join(copy, "suffix.onnx"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(scalecert.BundleError, match="sha256"):
        scalecert.load(copy)
    for kind in (scalecert.OptionError, scalecert.BundleError, scalecert.ImageError, scalecert.BackendError,
                 scalecert.DataError, scalecert.ModelError):
        assert issubclass(kind, scalecert.ScaleCertError)


def test_recovery_through_the_same_door(tiny_bundle):
    with scalecert.load(tiny_bundle, mode="recover", certify_recovery=True) as rec:
        assert isinstance(rec, scalecert.Recoverer)
        result = rec.recover(np.full((32, 32, 3), 128, np.uint8))
        assert isinstance(result, scalecert.RecoveryResult) and result.certified in (True, False)
    with pytest.raises(scalecert.OptionError):
        scalecert.load(tiny_bundle, mode="recover", threshold=0.5)


def test_import_is_light():
    proc = subprocess.run([sys.executable, "-c", "import sys, scalecert; "
                           "print(sorted(m for m in ('onnxruntime', 'torch', 'onnx') if m in sys.modules))"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
