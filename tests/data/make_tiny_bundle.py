"""Regenerate tests/data/tiny_bundle/: the checked-in bundle the runtime tests use without exporting.

    . .venv/bin/activate && python tests/data/make_tiny_bundle.py

Rerun it (and commit the result) whenever the bundle format changes: a new or renamed manifest
key, a schema_version bump, a new proof record the runtime requires (manifest["locality"]), new
probe answers, a change to what export writes into prefix.onnx / suffix.onnx. The suite tells you
when: tests/test_tiny_bundle.py (test_checked_in_bundle_is_current: the runtime refuses it or its
probe images no longer certify as recorded; test_checked_in_bundle_matches_a_fresh_export: this
script now writes another structure) fails with a message naming this script.

What it is: a 2-conv CNN with seeded random weights (no training, no data), 3x16x16 input, 4
classes, a 3x3 patch, split after the first conv (8x16x16 features, 36 windows at stride 2, filled
with a blank image's features), its SIN gate calibrated on 12 seeded synthetic images (scalecert's
probes.synthetic_images) so a quarter of the feature positions are gated off, exported with the
current exporter through the `scalecert export` command. About 50 KB, most of it manifest JSON.
Its 4 probe images (2 calibration images, 2 synthetic) certify 2 certified (labels 2 and 3) and 2
alert, every margin clear of float noise. The output is the same bytes on a rerun (ONNX files;
the manifest differs in its timestamp and temporary paths).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "tiny_bundle")
INPUT = (3, 16, 16)
CLASSES = 4
PATCH = "3"
PRUNE_RATE = "0.25"
LAYER = "relu"  # after the first conv: a 3x3 receptive field
STRIDE = "2"
SEED = 2


def tiny_module():
    """conv 3->8 (3x3) -> relu -> conv 8->8 (3x3, stride 2) -> relu -> flatten -> linear 512->4 (no global
    mean: the head sees where things are, so a patch moves the logits)."""
    import torch
    import torch.nn as nn

    class Tiny16(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.fc = nn.Linear(8 * 8 * 8, CLASSES)

        def forward(self, x):
            x = self.c2(self.c1(x).relu()).relu()
            return self.fc(x.flatten(1))

    torch.manual_seed(SEED)
    model = Tiny16().eval()
    with torch.no_grad():  # spread the logits: a random head gives near-ties, and near-ties never certify
        model.fc.weight.mul_(2.0)
    return model


def write_model(path: str) -> str:
    """The model as a torch.export archive (what `scalecert export` loads without --arch)."""
    import torch

    batch = torch.export.Dim("batch")
    program = torch.export.export(tiny_module(), (torch.zeros(2, *INPUT),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def write_calibration(folder: str, count: int = 12) -> str:
    """Seeded smooth colour fields (unlabelled): what the gate threshold is calibrated on."""
    from PIL import Image

    from scalecert.runtime.probes import synthetic_images

    os.makedirs(folder, exist_ok=True)
    for i, pixels in enumerate(synthetic_images(INPUT[1:], count, seed=SEED + 1)):
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:02d}.png"))
    return folder


def export_args(model: str, calib: str, out: str) -> list[str]:
    return [model, "--input-size", "x".join(map(str, INPUT)), "--patch", PATCH, "--layer", LAYER,
            "--stride", STRIDE, "--calib", calib, "--prune-rate", PRUNE_RATE, "-o", out, "--quiet"]


def make(out: str = OUT) -> str:
    """Export the tiny bundle to `out` (replacing it); returns `out`."""
    from scalecert.cli import main

    with tempfile.TemporaryDirectory(prefix="tiny-bundle-") as scratch:
        model = write_model(os.path.join(scratch, "tiny16.pt2"))
        calib = write_calibration(os.path.join(scratch, "calib"))
        staged = os.path.join(scratch, "bundle")
        main.commands["export"].main(args=export_args(model, calib, staged), prog_name="scalecert export",
                                     standalone_mode=False)
        if os.path.exists(out):
            shutil.rmtree(out)
        shutil.copytree(staged, out)
    return out


if __name__ == "__main__":
    path = make(sys.argv[1] if len(sys.argv) > 1 else OUT)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    print(f"wrote {path} ({size / 1024:.1f} KiB)")
