"""Per-image certification latency on real data (not CI).

python benchmarks/latency.py BUNDLE --data DIR [--limit N] [--out results.json]
Reports median / p95 latency, the prefix / suffix split, windows evaluated vs total, and
clean / certified accuracy when labels are known (ImageFolder or labels.csv).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalecert.runtime.datasets import image_set  # noqa: E402
from scalecert.runtime import Certifier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--early-exit", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()

    items = image_set(args.data, limit=args.limit)
    with Certifier.load(args.bundle, batch=args.batch, early_exit=args.early_exit) as cert:
        pixels = [cert.prepare(p) for p, _ in items]
        for px in pixels[:3]:
            cert.certify(px)  # warm-up: session initialisation, allocator
        results = [cert.certify(px, name=p) for px, (p, _) in zip(pixels, items)]
        manifest = cert.manifest
    lat = np.array([r.latency_ms for r in results])
    pre = np.array([r.prefix_ms for r in results])
    suf = np.array([r.suffix_ms for r in results])
    evaluated = np.array([r.windows_evaluated for r in results])
    labels = [label for _, label in items]
    summary = {
        "bundle": os.path.basename(os.path.normpath(args.bundle)),
        "images": len(results),
        "windows_total": results[0].windows_total,
        "windows_evaluated_mean": float(evaluated.mean()),
        "windows_evaluated_p95": float(np.percentile(evaluated, 95)),
        "latency_ms_median": float(np.median(lat)),
        "latency_ms_p95": float(np.percentile(lat, 95)),
        "latency_ms_mean": float(lat.mean()),
        "prefix_ms_median": float(np.median(pre)),
        "suffix_ms_median": float(np.median(suf)),
        "kept_fraction_mean": float(np.mean([r.kept_fraction for r in results])),
        "certified_rate": float(np.mean([r.status == "certified" for r in results])),
        "prune_rate": manifest["sin"]["prune_rate"],
        "early_exit": args.early_exit,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    if None not in labels:
        y = np.array(labels)
        pred = np.array([r.label for r in results])
        cert_ok = np.array([r.status == "certified" for r in results])
        summary["clean_accuracy"] = float((pred == y).mean())
        summary["certified_accuracy"] = float(((pred == y) & cert_ok).mean())
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
