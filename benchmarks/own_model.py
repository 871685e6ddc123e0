"""Your own model without --calib (issue 26): a look-alike of tests/zoo.py saved as a user saves it,
exported with the defaults (`scalecert-export F --patch 2%`: no calibration, the budget-bound
geometric plan), then `scalecert bench` against the ONNX Runtime pixel baseline on 20 held-out
photos (`--images`), threads pinned. Not CI.

    python benchmarks/own_model.py --families mobilenet_v3,vit --out-dir benchmarks/results
    python benchmarks/own_model.py --families vit_b_16 --images 10     # tests/zoo.py FULL_SIZE, 3x224x224

Per family: the cut layer, windows, and the bench report (`own_model_<family>_like_bench.json`):
latency per image of the bundle and of the baseline's 37 forwards, as ratios. The photos are the
last 20 of ../shared/data/imagenet-sample (never used by the export, which calibrates on nothing),
else scikit-image's photos flipped and rotated; the labels are arbitrary (i mod classes): the weights
are random, so only the latency ratios mean anything.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SCALECERT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))


def held_out_photos(n: int = 20) -> list:
    from PIL import Image

    folder = os.path.join(SHARED, "data", "imagenet-sample", "images")
    if os.path.isdir(folder):
        names = sorted(os.listdir(folder))[-n:]
        return [Image.open(os.path.join(folder, name)).convert("RGB") for name in names]
    from skimage import data

    base = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("chelsea", "coffee", "rocket", "astronaut")]
    return [image.rotate(90 * (i // 4)).transpose(Image.FLIP_LEFT_RIGHT) if i % 2 else image.rotate(90 * (i // 4))
            for i, image in enumerate(base * (n // len(base) + 1))][:n]


def write_data(folder: str, spec: dict, classes: int, count: int) -> str:
    from PIL import Image

    from scalecert.runtime.images import resize_to_input

    os.makedirs(folder, exist_ok=True)
    images = [resize_to_input(photo, spec) for photo in held_out_photos(count)]
    labels = [i % classes for i in range(len(images))]  # random weights: a label is only what bench needs to run

    with open(os.path.join(folder, "labels.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "index"])
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(os.path.join(folder, f"{i:02d}.png"))
            writer.writerow([f"{i:02d}.png", label])
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="mobilenet_v3,vit")
    parser.add_argument("--format", default="onnx-dynamic", help="tests/zoo.py FORMATS")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--layer", default="auto", help="scalecert-export --layer (auto: the default); another "
                        "value is a comparison and adds it to the report's name")
    args = parser.parse_args()
    from zoo import tests_module  # benchmarks/zoo.py: this folder is first on sys.path

    zoo = tests_module("zoo")
    bin_dir = os.path.dirname(sys.executable)
    with tempfile.TemporaryDirectory(prefix="scalecert-own-model-") as work:
        for family in args.families.split(","):
            input_chw = zoo.FULL_SIZE_INPUT if family in zoo.FULL_SIZE else zoo.INPUT  # a FULL_SIZE model: 3x224x224
            path = zoo.save_formats(zoo.build(family), os.path.join(work, family), [args.format], input_chw)[args.format]
            bundle = os.path.join(work, f"{family}.scalecert")
            subprocess.run([os.path.join(bin_dir, "scalecert-export"), path, "--patch", "2%", "--layer", args.layer,
                            "-o", bundle, "--quiet"], check=True)
            with open(os.path.join(bundle, "manifest.json")) as f:
                manifest = json.load(f)
            data = write_data(os.path.join(work, f"{family}-data"), manifest["input"], manifest["num_classes"], args.images)
            suffix = "" if args.layer == "auto" else f"_layer_{args.layer}"
            report = os.path.join(args.out_dir, f"own_model_{family}_like{suffix}_bench.json")
            proc = subprocess.run([os.path.join(bin_dir, "scalecert"), "bench", bundle, "--data", data, "--baseline",
                            "--baseline-engine", "ort", "--model", path, "--threads", args.threads, "-o", report,
                            "--force", "--quiet"], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{family}: bench failed: {proc.stderr.strip().splitlines()[-1:]}")
            with open(report) as f:
                ratios = json.load(f)["ratios"]
            print(f"{family}: layer {manifest['layer']['name']} {manifest['layer']['shape']}, "
                  f"{manifest['windows']['count']} windows, vs the ORT pixel baseline {json.dumps(ratios)}", flush=True)


if __name__ == "__main__":
    main()
