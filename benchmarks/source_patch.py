"""Source-space patches on ImageNet photos at their native sizes (issue 16's measurement).

An EfficientNet-Lite0 bundle certified for a 32x32 patch of its 224 input (calibrated on the first
--calib photos, which are never attacked); each later photo certified at its native size; each
certified photo attacked in its OWN pixels at the same positions (borders, crop edges, the widest
spot, random) with patches (a) of the covered source patch the runtime reports (docs/design.md §8)
and (b) a square of 2% of the photo's area. Violations: another label without an alert.

    python benchmarks/source_patch.py --images 12 --out benchmarks/results/source_patch.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the attack harness (tests/attack_harness.py) lives with the tests


def _calib_folder(data: str, names: list[str], folder: str) -> str:
    """A flat labelled folder (symlinks + labels.csv) of the calibration photos."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(data, "labels.csv")) as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    with open(os.path.join(folder, "labels.csv"), "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=["file", "index"])
        out.writeheader()
        for name in names:
            link = os.path.join(folder, name)
            if not os.path.exists(link):
                os.symlink(os.path.join(data, "images", name), link)
            out.writerow({"file": name, "index": rows[name]["index"]})
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(os.environ.get("SCALECERT_SHARED", "/work/shared"), "data",
                                                       "imagenet-sample"))
    parser.add_argument("--work", default="/tmp/scalecert-source-bench")
    parser.add_argument("--calib", type=int, default=32, help="photos used to calibrate (never attacked)")
    parser.add_argument("--images", type=int, default=12, help="photos certified and, when certified, attacked")
    parser.add_argument("--random", type=int, default=8, help="random positions per photo (besides borders etc.)")
    parser.add_argument("--per-edge", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    from PIL import Image

    from scalecert.core.source import parse_source_patch
    import attack_harness as attack
    from scalecert.runtime import Certifier
    from scalecert.runtime.images import read_image
    from scalecert.runtime.source import source_map

    names = sorted(os.listdir(os.path.join(args.data, "images")))
    calib, targets = names[:args.calib], names[args.calib:args.calib + args.images]
    bundle = os.path.join(args.work, "effnet-32.scalecert")
    start = time.perf_counter()
    if not os.path.exists(os.path.join(bundle, "manifest.json")):
        from scalecert.cli import main as cli

        folder = _calib_folder(args.data, calib, os.path.join(args.work, "calib"))
        cli.commands["export"].main(args=["--arch", "efficientnet-lite0", "--pretrained", "--patch", "32", "--calib",
                                          folder, "-o", bundle, "--force", "--quiet"], standalone_mode=False)
    export_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    tallies = {"bound": attack.Tally(), "2%": attack.Tally()}
    rows = []
    with Certifier.load(bundle, early_exit=True, threads=args.threads) as cert:
        certified = 0
        for k, name in enumerate(targets):
            path = os.path.join(args.data, "images", name)
            result = cert.certify(path)
            covered = tuple(result.source.covered_patch)
            source = np.asarray(read_image(path))
            two = parse_source_patch("2%", source.shape[:2])
            row = {"image": name, "size": list(source.shape[:2]), "status": result.status, "covered": list(covered),
                   "two_percent": list(two), "two_percent_needs": list(source_map(source.shape[:2], cert.input_spec)
                                                                      .needed_patch(two))}
            if result.status == "certified":
                certified += 1
                smap = source_map(source.shape[:2], cert.input_spec)
                donors = np.stack([np.asarray(read_image(os.path.join(args.data, "images", o))
                                              .resize(source.shape[1::-1], Image.BILINEAR)) for o in calib[:6]])
                for tag, patch in (("bound", covered), ("2%", two)):
                    positions = attack.source_positions(smap, patch, rng, random=args.random, per_edge=args.per_edge)
                    part = attack.attack_source_image(cert, source, result.label, patch, positions, donors=donors,
                                                      rng=rng, tally=tallies[tag], name=name, index=k)
                    row[tag] = {key: part[key] for key in attack.COUNT_KEYS}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    out = {"bundle": f"efficientnet-lite0 --pretrained --patch 32 --calib <first {args.calib} photos>",
           "photos": len(targets), "certified": certified, "export_seconds": round(export_s, 1),
           "seconds": round(time.perf_counter() - start, 1),
           "totals": {tag: t.totals() for tag, t in tallies.items()},
           "violations_detail": {tag: [{k: v for k, v in d.items() if k != "patch"} for d in t.violations]
                                 for tag, t in tallies.items()},
           "per_image": rows, "args": vars(args)}
    print(json.dumps({"totals": out["totals"], "certified": certified, "photos": len(targets)}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
