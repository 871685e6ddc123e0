"""Shared fixtures and helpers. Real data from ../shared is optional: tests that need it skip without it.

Bundles are exported in this process (`export`, `in_process`): the same click commands and option
parsing as the CLI, without a fresh interpreter and torch start-up per bundle. Tests of the CLI
contract itself (exit codes, one-line errors, `--json` output) run the console scripts in a
subprocess (`run_cli`).
"""
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
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")  # scikit-image's, in this order


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

    return {name: getattr(data, name)() for name in PHOTOS}


# --- running the CLI ------------------------------------------------------------------------------


def run_cli(*args, check=False, **kwargs):
    """Run a console entry point in a subprocess, as a user would (for tests of the CLI contract)."""
    exe = os.path.join(os.path.dirname(sys.executable), args[0])
    proc = subprocess.run([exe, *map(str, args[1:])], capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def in_process(command: str, *args) -> None:
    """Run `scalecert COMMAND ARGS...` in this process: the command's own click option parsing,
    without the one-line error guard, so a failure raises (ScaleCertError or click's UsageError)."""
    from scalecert.cli import main

    main.commands[command].main(args=[str(a) for a in args], prog_name=f"scalecert {command}",
                                standalone_mode=False)


def export(tmp_path_factory, name: str, *args) -> str:
    """`scalecert-export ARGS -o <fresh dir>/bundle --quiet`, in this process; returns the bundle."""
    out = str(tmp_path_factory.mktemp(name) / "bundle")
    in_process("export", *args, "-o", out, "--quiet")
    return out


# --- patches and bits (gate locality, precision variants) -----------------------------------------


def patch_positions(patch_hw, image_hw, rng, every: int) -> list[tuple[int, int]]:
    """Every `every`-th top-left patch position on a grid, plus all four borders in full and some
    random ones."""
    (ph, pw), (h, w) = patch_hw, image_hw
    last_y, last_x = h - ph, w - pw
    positions = {(y, x) for y in range(0, last_y + 1, every) for x in range(0, last_x + 1, every)}
    positions |= {(y, x) for y in range(last_y + 1) for x in (0, last_x)}
    positions |= {(y, x) for y in (0, last_y) for x in range(last_x + 1)}
    positions |= {(int(rng.integers(0, last_y + 1)), int(rng.integers(0, last_x + 1))) for _ in range(20)}
    return sorted(positions)


def patch_contents(rng, patch_hw, spec: dict, kind: int) -> np.ndarray:
    """Patch contents (3, ph, pw) in network input space: random pixels (kind 0), saturated pixels
    (1), or far outside the pixel range (2; the threat model allows arbitrary values)."""
    from scalecert.runtime.images import normalize

    ph, pw = patch_hw
    if kind == 2:
        return rng.uniform(-30, 30, (3, ph, pw)).astype(np.float32)
    pixels = rng.integers(0, 256, (ph, pw, 3)) if kind == 0 else rng.choice([0, 255], (ph, pw, 3))
    _, h, w = spec["input_size"]
    image = np.zeros((h, w, 3), np.uint8)  # normalize() wants a whole image; the patch is cut back out
    image[:ph, :pw] = pixels.astype(np.uint8)
    return normalize(image, spec)[0, :, :ph, :pw]


def bits(array: np.ndarray) -> np.ndarray:
    """The array's bit patterns (compare floats bitwise: -0.0 != 0.0, NaN == the same NaN)."""
    return np.ascontiguousarray(array).view(np.uint8 if array.dtype == np.uint8 else np.uint32)


# --- model files and images -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A small CIFAR ResNet-20 {"state_dict": ...} with seeded random weights (no ../shared needed):
    the one tiny-checkpoint builder, scalecert.export.archs.random_checkpoint."""
    from scalecert.export.archs import random_checkpoint

    return random_checkpoint("resnet20-cifar", str(tmp_path_factory.mktemp("tiny") / "tiny-r20.pt"), seed=0)


@pytest.fixture(scope="session")
def tiny_bn_checkpoint(tmp_path_factory) -> str:
    """The tiny ResNet-20 with random BatchNorm statistics too: a blank image has features other
    than 0 there, so --fill blank puts a real fill under the windows."""
    from scalecert.export.archs import random_checkpoint

    return random_checkpoint("resnet20-cifar", str(tmp_path_factory.mktemp("tiny-bn") / "tiny-bn-r20.pt"), seed=1,
                             random_norms=True)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> str:
    """scikit-image's photos as PNG files (NAME.png for NAME in PHOTOS). Read-only: copy to add files."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for name, array in skimage_photos().items():
        Image.fromarray(array).save(folder / f"{name}.png")
    return str(folder)


@pytest.fixture(scope="session")
def photo_files(photo_dir) -> list[str]:
    return [os.path.join(photo_dir, f"{name}.png") for name in PHOTOS]


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory) -> str:
    """24 smooth random 32x32 PNG images (blocky colour fields plus noise), no ../shared needed."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("gate-calib")
    rng = np.random.default_rng(0)
    for i in range(24):
        blocks = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
        pixels = np.asarray(blocks, np.float64) + rng.normal(0, 20, (32, 32, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return str(folder)


# --- bundles ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint) -> str:
    """The tiny random ResNet-20 with a 5x5 patch, everything else default (dense gates)."""
    return export(tmp_path_factory, "tiny-bundle", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5")


@pytest.fixture(scope="session")
def tiny_blank_bundle(tmp_path_factory, tiny_bn_checkpoint) -> str:
    """tiny_bn_checkpoint at layer1.0 with a 5x5 patch, everything else default (--fill blank)."""
    return export(tmp_path_factory, "tiny-blank", tiny_bn_checkpoint, "--arch", "resnet20-cifar", "--patch", "5",
                  "--layer", "layer1.0", "--stride", "2")


@pytest.fixture(scope="session")
def tiny_pruned_bundle(tmp_path_factory, tiny_checkpoint, calib_dir) -> str:
    """Random-weight ResNet-20, the shallow layer, 30% of positions gated off."""
    return export(tmp_path_factory, "gate-tiny", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5",
                  "--layer", "relu", "--stride", "3", "--calib", calib_dir, "--prune-rate", "0.3",
                  "--fill", "zero")


@pytest.fixture(scope="session")
def tiny_deep_pruned_bundle(tmp_path_factory, tiny_checkpoint, calib_dir) -> str:
    """A deeper layer (stride-2 stage), half the positions gated and a quarter of the channels
    given zero importance (the prefix ANDs the gate with a static live-channel mask)."""
    return export(tmp_path_factory, "gate-deep", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "3x6",
                  "--layer", "layer2.0", "--calib", calib_dir, "--prune-rate", "0.5", "--channel-prune", "0.25",
                  "--stride", "2")


@pytest.fixture(scope="session")
def r20_bundle(tmp_path_factory) -> str:
    """ResNet-20 (pretrained, ../shared) with a 5x5 patch, dense gates, zeroed windows (the
    source-space attacks were sized on what it certifies; r20_pruned_bundle has the default fill)."""
    return export(tmp_path_factory, "r20", need(R20), "--arch", "resnet20-cifar", "--patch", "5", "--fill", "zero")


@pytest.fixture(scope="session")
def r20_pruned_bundle(tmp_path_factory) -> str:
    """ResNet-20 with a 5x5 patch and 30% of positions gated off (calibrated on CIFAR train), windows
    filled (the default): dedupe with a fill under a sparse gate, checked against the reference."""
    return export(tmp_path_factory, "r20p", need(R20), "--arch", "resnet20-cifar", "--patch", "5", "--layer", "relu",
                  "--stride", "3", "--calib", need(CIFAR_TRAIN), "--calib-limit", "200", "--prune-rate", "0.3")


@pytest.fixture(scope="session")
def effnet_bundle(tmp_path_factory) -> str:
    """Pretrained EfficientNet-Lite0 (pip-shipped weights), 32x32 patch, dense gates."""
    return export(tmp_path_factory, "eff", "--arch", "efficientnet-lite0", "--pretrained", "--patch", "32")
