"""Runtime: torch-free import, decision rule, exact dedupe, preprocessing, certify CLI contract."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import cifar_files, run_cli, skimage_photos
from scalecert.errors import ScaleCertError
from scalecert.runtime import decision, geometry
from scalecert.runtime.preprocess import load_image, read_image


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint):
    out = str(tmp_path_factory.mktemp("tinyb") / "bundle")
    run_cli("scalecert-export", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5", "-o", out, "--quiet",
            check=True)
    return out


@pytest.fixture(scope="session")
def photo_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, array in skimage_photos().items():
        path = str(folder / f"{name}.png")
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def test_runtime_imports_and_certifies_without_torch(tiny_bundle, photo_files):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from scalecert.runtime import Certifier\n"
        f"r = Certifier.load({tiny_bundle!r}).certify({photo_files[0]!r})\n"
        "assert r.status in ('certified', 'alert')\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m] is not None)\n"
        "print(r.status)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_decision_rule():
    labels = np.array([3, 3, 3, 3])
    margins = np.array([1.0, 0.5, 2.0, 0.3], np.float32)
    assert decision.decide(3, 1.0, labels, margins).certified
    assert not decision.decide(3, 1.0, labels, margins, delta=0.4).certified
    assert decision.decide(3, 1.0, labels, margins, delta=0.4).alert_windows.tolist() == [3]
    bad = decision.decide(3, 1.0, np.array([3, 5, 3, 5]), margins)
    assert not bad.certified and bad.alert_windows.tolist() == [1, 3] and bad.label == 3
    assert not decision.decide(3, 0.01, labels, margins, delta=0.1).certified  # thin base margin
    group = np.array([-1, 0, 1, 0, -1])
    assert decision.expand_groups(group, np.array([7, 8]), 3).tolist() == [3, 7, 8, 7, 3]
    lab, marg = decision.top2_margin(np.array([[0.0, 2.0, 1.5], [3.0, -1.0, 0.0]]))
    assert lab.tolist() == [1, 0] and np.allclose(marg, [0.5, 3.0])


def test_distinct_windows_is_exact_grouping():
    rng = np.random.default_rng(0)
    feature_hw = (13, 11)
    windows = geometry.window_family((4, 3), 2, feature_hw)
    masks = geometry.window_masks(windows, feature_hw)
    for density in (0.0, 0.05, 0.3, 1.0):
        gate = rng.random(feature_hw) < density
        d = geometry.distinct_windows(windows, masks, gate)
        inter = masks & gate.reshape(1, -1)
        for i in range(len(windows)):
            if not inter[i].any():
                assert d.group_of_window[i] == -1
                continue
            rep = d.representatives[d.group_of_window[i]]
            rep_mask = geometry.window_masks(rep[None], feature_hw)[0] & gate.reshape(-1)
            assert (rep_mask == inter[i]).all()  # same kept positions zeroed -> same S_W
        distinct_rows = {inter[i].tobytes() for i in range(len(windows)) if inter[i].any()}
        assert len(d.representatives) == len(distinct_rows)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_image_modes_convert_to_rgb(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 65536, (40, 50))).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    path = str(tmp_path / f"img.{'tiff' if mode in ('I;16', 'CMYK') else 'png'}")
    img.save(path)
    spec = {"input_size": [3, 32, 32], "resize_short": None, "mean": [0.5] * 3, "std": [0.5] * 3}
    out = load_image(path, spec)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert out.max() > 100  # 16-bit range scaled, not clipped to white or black


def test_resize_short_side_and_crop():
    spec = {"input_size": [3, 224, 224], "resize_short": 256, "mean": [0.5] * 3, "std": [0.5] * 3}
    from scalecert.runtime.preprocess import resize_to_input

    out = resize_to_input(Image.fromarray(skimage_photos()["chelsea"]), spec)
    assert out.shape == (224, 224, 3)


def test_bad_images_rejected_with_one_line(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    for path, words in ((tmp_path / "empty.png", "empty"), (tmp_path / "junk.jpg", "cannot decode"),
                        (tmp_path, "directory"), (tmp_path / "missing.png", "no such file")):
        with pytest.raises(ScaleCertError, match=words):
            read_image(str(path))


def test_certify_cli_json_contract_and_partial_failures(tiny_bundle, photo_files, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    proc = run_cli("scalecert", "certify", tiny_bundle, photo_files[0], str(tmp_path / "empty.png"),
                   photo_files[1], "--json")
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [l["status"] for l in lines][1] == "error" and "Traceback" not in proc.stderr
    for record in (lines[0], lines[2]):
        assert record["status"] in ("certified", "alert")
        for key in ("image", "label", "class", "windows_total", "windows_evaluated", "latency_ms"):
            assert key in record
        assert 0 <= record["windows_evaluated"] <= record["windows_total"]
        if record["status"] == "alert":
            assert record["alert_windows"] and all(len(w) == 4 for w in record["alert_windows"])
    ok = run_cli("scalecert", "certify", tiny_bundle, *photo_files)
    assert ok.returncode == 0 and "status" in ok.stdout.splitlines()[0]


def _one_error_line(proc, words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and words in errors[0], proc.stderr


def test_certify_refuses_bad_bundles(tiny_bundle, photo_files, tmp_path):
    _one_error_line(run_cli("scalecert", "certify", str(tmp_path / "nope"), photo_files[0]), "no such bundle")
    tampered = str(tmp_path / "tampered")
    shutil.copytree(tiny_bundle, tampered)
    with open(os.path.join(tampered, "suffix.onnx"), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    _one_error_line(run_cli("scalecert", "certify", tampered, photo_files[0]), "sha256")
    newer = str(tmp_path / "newer")
    shutil.copytree(tiny_bundle, newer)
    path = os.path.join(newer, "manifest.json")
    manifest = json.load(open(path))
    manifest["schema_version"] = 99
    json.dump(manifest, open(path, "w"))
    _one_error_line(run_cli("scalecert", "certify", newer, photo_files[0]), "newer")
    _one_error_line(run_cli("scalecert", "certify", tiny_bundle, photo_files[0], "--backend", "trt"), "TensorRT")


def test_early_exit_agrees_with_full_evaluation(tiny_bundle, photo_files):
    from scalecert.runtime import Certifier

    full, fast = Certifier.load(tiny_bundle), Certifier.load(tiny_bundle, early_exit=True, batch=8)
    for path in photo_files:
        a, b = full.certify(path), fast.certify(path)
        assert (a.status, a.label) == (b.status, b.label)
        assert b.windows_evaluated <= a.windows_evaluated
        assert set(map(tuple, b.alert_windows)) <= set(map(tuple, a.alert_windows))


def test_certify_batch_matches_single(tiny_bundle):
    from scalecert.runtime import Certifier

    cert = Certifier.load(tiny_bundle)
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    for a, b in zip(cert.certify_batch(pixels, prefix_batch=2), [cert.certify(p) for p in pixels]):
        assert (a.status, a.label) == (b.status, b.label)
        assert (a.window_labels == b.window_labels).all()


def test_same_window_same_logits_across_batches(tiny_bundle):
    """Determinism on ONNX Runtime CPU: the export measured the spread; re-measure it here."""
    from scalecert.calibration.margin import measure_logit_spread
    from scalecert.runtime import Certifier

    cert = Certifier.load(tiny_bundle)
    features, _ = cert.features(np.random.default_rng(4).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    spread = measure_logit_spread(cert.window_logits, features, cert.windows)
    assert spread <= 1e-5
    assert cert.delta == cert.manifest["margin"]["ort-cpu-fp32"] >= 0


def test_backend_without_measured_margin_is_refused(tiny_bundle):
    from scalecert.runtime import Certifier

    with pytest.raises(ScaleCertError, match="CUDA|margin"):
        Certifier.load(tiny_bundle, backend="ort-cuda")
    assert Certifier.load(tiny_bundle, backend="auto").backend == "ort-cpu"
