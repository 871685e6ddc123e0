"""The zoo table (issue 26): every look-alike of tests/zoo.py, and real torchvision classifiers when
torchvision imports, in the four files a user brings, through `scalecert-export --patch 2%`.

    python benchmarks/zoo.py --out benchmarks/results/zoo.json
    python benchmarks/zoo.py --torchvision resnet18,vit_b_16 --formats onnx-fixed,pt2 --out tv.json

Per case: the outcome (dynamic: the batch was symbolic already; symbolic: a fixed batch of 1 made
symbolic and checked; kept: a fixed batch of 1 kept, the suffix runs one window per call;
refused: the one-line error), the cut layer, windows per image, seconds for the export, and how
many of scikit-image's photos get the bundle's base label equal to torch's top-1 (prepared as the
manifest's input spec says). Prints the table and writes it as JSON (`--out`). The torchvision
models are built with random weights (no download) at 3x224x224; without torchvision they are
skipped with one line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TORCHVISION = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "vit_b_16")


def tests_module(name: str):
    """A module of tests/ (`zoo`: the look-alikes), loaded by path: `import zoo` from a script in
    this folder would find this file. benchmarks/own_model.py and export_times.py load it here too."""
    spec = importlib.util.spec_from_file_location(f"scalecert_tests_{name}", os.path.join(ROOT, "tests", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _photos(spec: dict) -> np.ndarray:
    from PIL import Image
    from skimage import data

    from scalecert.runtime.images import resize_to_input

    names = ("chelsea", "coffee", "rocket", "astronaut")
    return np.stack([resize_to_input(Image.fromarray(getattr(data, n)()).convert("RGB"), spec) for n in names])


def run_case(model, family: str, fmt: str, path: str, input_chw, out_dir: str) -> dict:
    import torch

    from scalecert.errors import ScaleCertError
    from scalecert.export import ExportOptions, export_bundle
    from scalecert.runtime.certifier import Certifier
    from scalecert.runtime.images import normalize

    row = {"family": family, "format": fmt}
    output = os.path.join(out_dir, f"{family}-{fmt}.scalecert")
    opts = ExportOptions(model=path, output=output, patch="2%", force=True,
                         input_size=tuple(input_chw) if fmt == "pt" else None)
    start = time.perf_counter()
    try:
        export_bundle(opts)
    except ScaleCertError as exc:
        row.update(outcome="refused", error=str(exc), seconds=round(time.perf_counter() - start, 2))
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    with open(os.path.join(output, "manifest.json")) as f:
        manifest = json.load(f)
    note = manifest["source"].get("batch") or ""
    row.update(outcome="kept" if note.startswith("fixed batch 1 kept") else "symbolic" if note else "dynamic",
               note=note or None, layer=manifest["layer"]["name"], windows=manifest["windows"]["count"])
    images = _photos(manifest["input"])
    with torch.no_grad():
        top1 = model(torch.from_numpy(normalize(images, manifest["input"]))).argmax(1).tolist()
    with Certifier.load(output, "ort-cpu") as certifier:
        labels = [certifier.certify(image).label for image in images]
    row["labels_equal_torch"] = f"{sum(a == b for a, b in zip(labels, top1))}/{len(images)}"
    return row


def _torchvision_models(names):
    try:
        import torchvision  # noqa: F401
    except ImportError as exc:
        print(f"torchvision: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return []
    import torch
    import torchvision.models as tvm

    models = []
    for name in names:
        torch.manual_seed(0)
        models.append((f"torchvision.{name}", getattr(tvm, name)(weights=None).eval(), (3, 224, 224)))
    return models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--families", default=None, help="look-alike families (default: all of tests/zoo.py)")
    parser.add_argument("--formats", default=None, help="comma-separated, of pt,pt2,onnx-fixed,onnx-dynamic,onnx-legacy")
    parser.add_argument("--torchvision", default=",".join(TORCHVISION),
                        help="torchvision model names to add when torchvision imports ('' for none)")
    args = parser.parse_args()
    zoo = tests_module("zoo")
    formats = args.formats.split(",") if args.formats else list(zoo.FORMATS)
    families = args.families.split(",") if args.families else list(zoo.FAMILIES)
    models = [(f, zoo.build(f), zoo.INPUT) for f in families]
    models += _torchvision_models([n for n in args.torchvision.split(",") if n])
    rows = []
    with tempfile.TemporaryDirectory(prefix="scalecert-zoo-") as work:
        for family, model, input_chw in models:
            zoo.INPUT = tuple(input_chw)  # save_formats' example image
            paths = zoo.save_formats(model, os.path.join(work, family), formats)
            for fmt in formats:
                rows.append(run_case(model, family, fmt, paths[fmt], input_chw, work))
                r = rows[-1]
                print(f"{r['family']:28s} {r['format']:13s} {r['outcome']:9s} {str(r.get('layer', '-')):40s} "
                      f"{str(r.get('windows', '-')):>7s} {r['seconds']:6.1f}s  {r.get('labels_equal_torch', r.get('error', ''))}",
                      flush=True)
    if args.out:
        import onnxruntime
        import torch

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "patch": "2%", "machine": platform.machine(), "cpus": os.cpu_count(),
                       "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
