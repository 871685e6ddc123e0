"""Shared fixtures and helpers. Real data from ../shared is optional: the default run (not `slow`)
needs none of it. Filler images are generated (`cifar_files`: a CIFAR-10-shaped stand-in tree;
`calib_dir`; scikit-image's photos), models are seeded random-weight networks (`tiny_checkpoint`,
the checked-in `stored_bundle`) or the pip-shipped pretrained EfficientNet-Lite0 (`effnet_bundle`).
Only `slow` tests whose claim needs the real pretrained ResNet-20 or real CIFAR/ImageNet data use
../shared (`need`, `real_cifar_files`, `r20_bundle`), and they skip cleanly without it.

Bundles are exported in this process (`export`, `in_process`): the same click commands and option
parsing as the CLI, without a fresh interpreter and torch start-up per bundle. Tests of the CLI
contract itself (exit codes, one-line errors, `--json` output) run the console scripts in a
subprocess (`run_cli`).
"""
from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SCALECERT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
R20 = os.path.join(SHARED, "models", "resnet20-cifar10.th")
CIFAR_TEST = os.path.join(SHARED, "data", "cifar10-test")
CIFAR_TRAIN = os.path.join(SHARED, "data", "cifar10-train")
IMAGENET = os.path.join(SHARED, "data", "imagenet-sample")
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")  # scikit-image's, in this order
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TINY_BUNDLE = os.path.join(ROOT, "tests", "data", "tiny_bundle")  # checked in; tests/data/make_tiny_bundle.py


def need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (real data lives in ../shared, absent from a fresh clone)")
    return path


def real_cifar_files(per_class: int, offset: int = 0) -> list[str]:
    """Real CIFAR-10 test files from ../shared, `per_class` from each class (skips without them): only
    for `slow` tests whose claim needs real data (accuracy of the pretrained model, attacks on it)."""
    need(CIFAR_TEST)
    files = []
    for cls in sorted(os.listdir(CIFAR_TEST)):
        files += sorted(glob.glob(os.path.join(CIFAR_TEST, cls, "*.jpg")))[offset:offset + per_class]
    return files


def smooth_image(rng, hw=(32, 32)) -> np.ndarray:
    """A seeded smooth colour field with noise, uint8 (H, W, 3): image-like filler, no data needed
    (the same recipe as scalecert.runtime.probes.synthetic_images)."""
    from PIL import Image

    h, w = hw
    blocks = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    pixels = np.asarray(blocks, np.float64) + rng.normal(0, 20, (h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


_STAND_IN: dict[str, str] = {}


def cifar_stand_in(per_class: int) -> str:
    """The root of a CIFAR-10-shaped ImageFolder tree: <class>/NNNN.jpg, 32x32 JPEG, the ten CIFAR-10
    class folders, at least `per_class` generated images in each (seeded by class and index, so a
    file's pixels never depend on how many were asked for). Built once per test process."""
    from PIL import Image

    root = _STAND_IN.get("root")
    if root is None:
        root = _STAND_IN["root"] = tempfile.mkdtemp(prefix="scalecert-cifar-stand-in-")
        atexit.register(shutil.rmtree, root, True)
    for k, cls in enumerate(CIFAR_CLASSES):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, cls, f"{i:04d}.jpg")
            if not os.path.exists(path):
                Image.fromarray(smooth_image(np.random.default_rng([k, i]))).save(path, quality=90)
    return root


def cifar_files(per_class: int, offset: int = 0) -> list[str]:
    """Filler images laid out like the CIFAR-10 test set (<class>/NNNN.jpg, 32x32 JPEG), `per_class`
    from each class in class order: generated (`cifar_stand_in`), so they are there on a fresh clone
    and the same everywhere. Their folder names are labels no model was trained on; a test whose
    claim needs the real photos uses `real_cifar_files`."""
    root = cifar_stand_in(offset + per_class)
    return [os.path.join(root, cls, f"{i:04d}.jpg") for cls in CIFAR_CLASSES for i in range(offset, offset + per_class)]


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
def trained_tiny_cnn(tmp_path_factory) -> str:
    """tests/test_soundness.py's tiny CNN, trained once per run (~300 seeded steps) and saved with
    torch.export: its soundness and recovery tests share it."""
    from test_soundness import _trained_tiny_cnn

    return _trained_tiny_cnn(tmp_path_factory, "tinycnn")


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
        Image.fromarray(smooth_image(rng)).save(folder / f"{i:03d}.png")
    return str(folder)


# --- bundles ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stored_bundle(tmp_path_factory) -> str:
    """A copy of the checked-in tests/data/tiny_bundle (2-conv random-weight CNN, 3x16x16, 4 classes,
    3x3 patch, a quarter of the positions gated, windows filled): for runtime tests that need a
    bundle but no export (no torch). Its probe images certify 2 certified, 2 alert."""
    copy = str(tmp_path_factory.mktemp("stored") / "tiny_bundle")
    shutil.copytree(TINY_BUNDLE, copy)
    return copy


def make_tiny_bundle():
    """tests/data/make_tiny_bundle.py as a module (the script that makes tests/data/tiny_bundle)."""
    import importlib.util

    if "make_tiny_bundle" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_tiny_bundle",
                                                      os.path.join(ROOT, "tests", "data", "make_tiny_bundle.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["make_tiny_bundle"] = module
    return sys.modules["make_tiny_bundle"]


@pytest.fixture(scope="session")
def tiny16_bundle(tmp_path_factory) -> str:
    """What tests/data/tiny_bundle should be: make_tiny_bundle.py run now, with the current exporter."""
    return make_tiny_bundle().make(str(tmp_path_factory.mktemp("tiny16-fresh") / "bundle"))


@pytest.fixture(scope="session")
def tiny16_model(tmp_path_factory) -> str:
    """The model behind tiny16_bundle and tests/data/tiny_bundle (seeded), as a torch.export archive."""
    return make_tiny_bundle().write_model(str(tmp_path_factory.mktemp("tiny16-model") / "tiny16.pt2"))


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
def tiny_blank_gated_bundle(tmp_path_factory, tiny_bn_checkpoint, calib_dir) -> str:
    """tiny_bn_checkpoint at layer1.0, 70% of positions gated off, windows filled (the default,
    --fill blank): dedupe with a fill under a sparse gate."""
    return export(tmp_path_factory, "blank-gated", tiny_bn_checkpoint, "--arch", "resnet20-cifar", "--patch", "5",
                  "--layer", "layer1.0", "--stride", "2", "--calib", calib_dir, "--prune-rate", "0.7")


@pytest.fixture(scope="session")
def tiny_identity_bundle(tmp_path_factory, tiny_checkpoint) -> str:
    """The identity prefix (--layer image) of the tiny random ResNet-20, 5x5 patch, stride 5, dense:
    its windows are the pixel-masking (PatchCleanser) baseline's 36 masks. On cifar_files(6) it
    certifies 27 of 60 with three different labels."""
    return export(tmp_path_factory, "identity", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5",
                  "--layer", "image", "--prune-rate", "0", "--stride", "5")


# the real models (../shared): only `slow` tests, whose claim needs the trained weights, use these


@pytest.fixture(scope="session")
def r20_bundle(tmp_path_factory) -> str:
    """ResNet-20 (pretrained, ../shared) with a 5x5 patch, dense gates, zeroed windows (the
    source-space attacks were sized on what it certifies; r20_pruned_bundle has the default fill)."""
    return export(tmp_path_factory, "r20", need(R20), "--arch", "resnet20-cifar", "--patch", "5", "--fill", "zero",
                  "--stride", "3")  # the 81 windows the source-space attacks were sized on (no budget-bound stride)


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
