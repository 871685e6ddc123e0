"""Shared fixtures. Real data from ../shared is optional: tests that need it skip without it."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SCALECERT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
R20 = os.path.join(SHARED, "models", "resnet20-cifar10.th")
CIFAR_TEST = os.path.join(SHARED, "data", "cifar10-test")
CIFAR_TRAIN = os.path.join(SHARED, "data", "cifar10-train")
IMAGENET = os.path.join(SHARED, "data", "imagenet-sample")


def need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (real data lives in ../shared, absent from a fresh clone)")
    return path


def cifar_files(per_class: int, offset: int = 0) -> list[str]:
    """Deterministic CIFAR-10 test files, `per_class` from each class."""
    need(CIFAR_TEST)
    files = []
    for cls in sorted(os.listdir(CIFAR_TEST)):
        files += sorted(glob.glob(os.path.join(CIFAR_TEST, cls, "*.jpg")))[offset:offset + per_class]
    return files


def skimage_photos() -> dict[str, np.ndarray]:
    """Real photos shipped with scikit-image (RGB uint8)."""
    from skimage import data

    return {name: getattr(data, name)() for name in ("chelsea", "coffee", "rocket", "astronaut")}


def run_cli(*args, check=False, **kwargs):
    """Run a console entry point in a subprocess, as a user would."""
    exe = os.path.join(os.path.dirname(sys.executable), args[0])
    proc = subprocess.run([exe, *args[1:]], capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def export(tmp_path_factory, name: str, *args) -> str:
    out = str(tmp_path_factory.mktemp(name) / "bundle")
    run_cli("scalecert-export", *args, "-o", out, "--quiet", check=True)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A small CIFAR ResNet-20 state_dict with seeded random weights (no ../shared needed)."""
    import torch

    from scalecert.exporter.archs import REGISTRY

    torch.manual_seed(0)
    model = REGISTRY["resnet20-cifar"].build()
    path = str(tmp_path_factory.mktemp("tiny") / "tiny-r20.pt")
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def r20_bundle(tmp_path_factory) -> str:
    """ResNet-20 (pretrained, ../shared) with a 5x5 patch, dense gates."""
    return export(tmp_path_factory, "r20", need(R20), "--arch", "resnet20-cifar", "--patch", "5")


@pytest.fixture(scope="session")
def r20_pruned_bundle(tmp_path_factory) -> str:
    """ResNet-20 with a 5x5 patch and 30% of positions gated off (calibrated on CIFAR train)."""
    return export(tmp_path_factory, "r20p", need(R20), "--arch", "resnet20-cifar", "--patch", "5",
                  "--calib", need(CIFAR_TRAIN), "--calib-limit", "200", "--prune-rate", "0.3")


@pytest.fixture(scope="session")
def effnet_bundle(tmp_path_factory) -> str:
    """Pretrained EfficientNet-Lite0 (pip-shipped weights), 32x32 patch, dense gates."""
    return export(tmp_path_factory, "eff", "--arch", "efficientnet-lite0", "--pretrained", "--patch", "32")
