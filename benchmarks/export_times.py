"""Export every architecture the project exports, with two source trees, and time each (not CI).

    python benchmarks/export_times.py --before /tmp/old --after . --out benchmarks/results/export_times.json

`--before`/`--after` are folders holding a `scalecert` package (e.g. `git archive <commit> scalecert |
tar -x -C /tmp/old`); each export runs `python -m scalecert.cli export ...` in a fresh process with
that folder first on PYTHONPATH, in the same virtual environment, the two trees taking turns model
by model. Random-weight checkpoints are written for the archs without pip-shipped weights; the
CIFAR ResNets come from ../shared/models (skipped without it). Prints a table: model, seconds
before/after, whether each exported, the cut layer, windows, and the locality check's share.

    python benchmarks/export_times.py --before /tmp/old --full-size --out benchmarks/results/export_full_size.json

`--full-size`: instead, tests/zoo.py's look-alikes at torchvision's sizes (ResNet-50, ConvNeXt-T,
ViT-B/16; 3x224x224, 1000 classes, random weights) saved as a user saves them (`--formats`, default
TorchScript, torch.export and plain `torch.onnx.export`), each exported with `--patch 2%` and no
calibration; the after tree's seconds per stage (manifest["export_seconds"]) are printed beside.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SCALECERT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))


def random_checkpoint(arch: str, folder: str) -> str:
    import torch

    from scalecert.export.archs import REGISTRY

    torch.manual_seed(0)
    model = REGISTRY[arch].build()
    path = os.path.join(folder, f"{arch}.pt")
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def models(folder: str) -> list[tuple[str, list[str]]]:
    out = []
    for depth in (20, 32, 44, 56):
        path = os.path.join(SHARED, "models", f"resnet{depth}-cifar10.th")
        if os.path.exists(path):
            out.append((f"resnet{depth}-cifar", [path, "--arch", f"resnet{depth}-cifar", "--patch", "5"]))
    calib = os.path.join(SHARED, "data", "cifar10-train")
    if out and os.path.isdir(calib):
        out.append(("resnet20-cifar --calib 64", out[0][1] + ["--calib", calib, "--calib-limit", "64"]))
    out.append(("efficientnet-lite0", ["--arch", "efficientnet-lite0", "--pretrained", "--patch", "32"]))
    for arch in ("resnet18-imagenet", "vit-patch8-64"):
        out.append((arch, [random_checkpoint(arch, folder), "--arch", arch, "--patch", "2%"]))
    return out


def full_size_models(folder: str, formats: list[str]) -> list[tuple[str, list[str]]]:
    from zoo import tests_module  # benchmarks/zoo.py: this folder is first on sys.path

    zoo = tests_module("zoo")
    out = []
    for family in zoo.FULL_SIZE:
        paths = zoo.save_formats(zoo.build(family), os.path.join(folder, family), formats, zoo.FULL_SIZE_INPUT)
        out += [(f"{family} {fmt}", [paths[fmt], "--patch", "2%"]) for fmt in formats]
    return out


def export(tree: str, args: list[str], output: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import sys; from scalecert.cli import export_main; sys.exit(export_main())",
                           *args, "-o", output, "--force"], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(output))  # not this checkout: `python -c` puts the cwd first on sys.path
    seconds = time.perf_counter() - start
    row = {"seconds": round(seconds, 1), "exit": proc.returncode}
    if proc.returncode:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    with open(os.path.join(output, "manifest.json")) as f:
        manifest = json.load(f)
    row.update({"layer": manifest["layer"]["name"], "windows": manifest["windows"]["count"]})
    check = (manifest.get("locality") or {}).get("prefix.onnx", {}).get("check")
    if check:
        row["locality_check_s"] = check["seconds"]
    if manifest.get("export_seconds"):
        row["stages"] = manifest["export_seconds"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=ROOT)
    parser.add_argument("--out")
    parser.add_argument("--full-size", action="store_true", help="torchvision-sized look-alikes (module docstring)")
    parser.add_argument("--formats", default="pt,pt2,onnx-fixed", help="with --full-size: tests/zoo.py FORMATS")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="scalecert-export-times-") as folder:
        cases = full_size_models(folder, args.formats.split(",")) if args.full_size else models(folder)
        for name, model_args in cases:
            row = {"model": name}
            for label, tree in (("before", args.before), ("after", args.after)):
                row[label] = export(tree, model_args, os.path.join(folder, f"{label}.scalecert"))
            rows.append(row)
            b, a = row["before"], row["after"]
            print(f"{name:28s} before {b['seconds']:6.1f} s (exit {b['exit']})  after {a['seconds']:6.1f} s "
                  f"(exit {a['exit']}, check {a.get('locality_check_s', '-')} s)  layer {a.get('layer', a.get('error'))}  "
                  f"windows {a.get('windows', '-')}", flush=True)
            if a.get("stages"):
                slow = sorted(a["stages"].items(), key=lambda kv: -kv[1])[:4]
                print("    after, slowest stages: " + ", ".join(f"{k} {v} s" for k, v in slow), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": f"{os.cpu_count()} cores", "before": args.before, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
