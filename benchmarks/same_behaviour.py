"""Same behaviour across a refactor: certify fixed exports and compare the outcomes.

Every export names its layer, stride and pruning rate explicitly and calibrates on a flat folder
that holds its own labels.csv, so nothing depends on a default or a data-layout rule. For each
image it keeps what the certificate is made of: status, label, windows evaluated, alert windows.

    python benchmarks/same_behaviour.py record OUT.json [--shared ../shared] [--small]
    python benchmarks/same_behaviour.py check  OUT.json [--shared ../shared] [--small]

`--small` is the CI version (tests/test_same_behaviour.py): a seeded random ResNet-20 and
scikit-image photos, no ../shared needed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

FIELDS = ("status", "label", "windows_evaluated", "alert_windows")


def _exe(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _run(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def flat_calibration_folder(folder: str, items: list[tuple[str, int]]) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "labels.csv"), "w") as f:
        f.write("file,index\n")
        for i, (path, label) in enumerate(items):
            name = f"{i:04d}{os.path.splitext(path)[1]}"
            shutil.copy(path, os.path.join(folder, name))
            f.write(f"{name},{label}\n")
    return folder


def certify(bundle: str, images: list[str], precision: str = "fp32") -> list[dict]:
    out = []
    for lo in range(0, len(images), 200):  # keep argv short
        lines = _run(_exe("scalecert"), "certify", bundle, *images[lo:lo + 200], "--json", "--precision", precision)
        out += [json.loads(line) for line in lines.splitlines() if line.strip()]
    return [{"image": os.path.basename(r["image"]), **{k: r.get(k) for k in FIELDS}} for r in out]


def tiny_checkpoint(path: str) -> str:
    """A CIFAR ResNet-20 state_dict with seeded random weights (tests/conftest.py builds the same)."""
    from scalecert.export.archs import random_checkpoint

    return random_checkpoint("resnet20-cifar", path, seed=0)


def photo_folder(folder: str, count: int = 24) -> list[str]:
    """scikit-image photos and deterministic crops of them, as 64x64 PNGs (real photo content)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    os.makedirs(folder, exist_ok=True)
    photos = [getattr(data, n)() for n in ("chelsea", "coffee", "rocket", "astronaut", "camera")]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        path = os.path.join(folder, f"p{i:02d}.png")
        Image.fromarray(photo[y:y + side, x:x + side]).resize((64, 64)).save(path)
        paths.append(path)
    return paths


def cases_small(work: str) -> dict:
    ckpt = tiny_checkpoint(os.path.join(work, "tiny.pt"))
    photos = photo_folder(os.path.join(work, "photos"))
    calib = flat_calibration_folder(os.path.join(work, "calib"), [(p, i % 10) for i, p in enumerate(photos[:16])])
    bundle = os.path.join(work, "tiny.scalecert")
    _run(_exe("scalecert-export"), ckpt, "--arch", "resnet20-cifar", "--patch", "5", "--layer", "relu_2",
         "--stride", "4", "--prune-rate", "0.3", "--calib", calib, "-o", bundle, "--quiet")
    _run(_exe("scalecert"), "build", bundle, "--precision", "int8", "--calib", calib, "--accept-loss", "--quiet")
    return {"tiny-r20-fp32": certify(bundle, photos[8:]), "tiny-r20-int8": certify(bundle, photos[8:], "int8")}


def cases_full(work: str, shared: str) -> dict:
    train, test = os.path.join(shared, "data", "cifar10-train"), os.path.join(shared, "data", "cifar10-test")
    classes = sorted(os.listdir(train))
    calib = flat_calibration_folder(os.path.join(work, "r20-calib"), [
        (p, c) for c, name in enumerate(classes) for p in sorted(glob.glob(os.path.join(train, name, "*.jpg")))[:20]])
    test_images = [p for name in classes for p in sorted(glob.glob(os.path.join(test, name, "*.jpg")))[:30]]
    r20 = os.path.join(work, "r20.scalecert")
    _run(_exe("scalecert-export"), os.path.join(shared, "models", "resnet20-cifar10.th"), "--arch", "resnet20-cifar",
         "--patch", "5", "--layer", "relu", "--stride", "5", "--prune-rate", "0.3", "--calib", calib, "-o", r20, "--quiet")
    _run(_exe("scalecert"), "build", r20, "--precision", "int8", "--calib", calib, "--quiet")
    sample = os.path.join(shared, "data", "imagenet-sample")
    with open(os.path.join(sample, "labels.csv")) as f:
        rows = [line.strip().split(",") for line in f if line.strip() and not line.startswith("file")]
    labelled = [(os.path.join(sample, "images", r[0]), int(r[1])) for r in rows]
    eff_calib = flat_calibration_folder(os.path.join(work, "eff-calib"), labelled[:64])
    eff = os.path.join(work, "eff.scalecert")
    _run(_exe("scalecert-export"), "--arch", "efficientnet-lite0", "--pretrained", "--patch", "32", "--layer",
         "getitem_15", "--stride", "8", "--prune-rate", "0.1", "--calib", eff_calib, "-o", eff, "--quiet")
    return {"r20-fp32": certify(r20, test_images), "r20-int8": certify(r20, test_images, "int8"),
            "effnet-fp32": certify(eff, [p for p, _ in labelled[400:436]])}


def compare(expected: dict, got: dict) -> list[str]:
    diffs = []
    for case, rows in expected.items():
        if case not in got:
            diffs.append(f"{case}: missing")
            continue
        if len(rows) != len(got[case]):
            diffs.append(f"{case}: {len(rows)} images recorded, {len(got[case])} now")
        for a, b in zip(rows, got[case]):
            if a != b:
                diffs.append(f"{case} {a['image']}: {a} != {b}")
    return diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["record", "check"])
    parser.add_argument("path")
    parser.add_argument("--shared", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="same-behaviour-")
    try:
        got = cases_small(work) if args.small else cases_full(work, args.shared)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.mode == "record":
        with open(args.path, "w") as f:
            json.dump(got, f, indent=1)
        print(f"recorded {sum(len(v) for v in got.values())} outcomes in {args.path}")
        return 0
    with open(args.path) as f:
        diffs = compare(json.load(f), got)
    total = sum(len(v) for v in got.values())
    print(f"{total - len(diffs)} of {total} outcomes identical" + ("" if not diffs else ":\n" + "\n".join(diffs[:20])))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
