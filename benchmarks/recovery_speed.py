"""Certified recovery, speed side by side (issue 13): the runtime's Recoverer (pair rows in the
suffix, exact pair dedupe, the gate) against PatchCleanser's 6x6 pixel masks in PyTorch eager and
on ONNX Runtime (taking turns image by image, the order alternating), on the same images,
threads pinned. Each system certifies every pair (no early exit; the first round included, as
the pairs (i, i)) and, separately, runs the fast path; medians per image and ratios. ONNX
Runtime sessions are closed before torch runs (no idle pool competes with it).

    python benchmarks/recovery_speed.py BUNDLE MODEL --arch resnet20-cifar --data DIR [--images 20]
        [--threads 2] [--precision fp32|fp16|int8] [--out R.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1e3, out


def main(argv=None) -> int:
    from scalecert.evaluation.baseline import PatchCleanserBaseline, mask_set
    from scalecert.evaluation.bench import open_baseline
    from scalecert.runtime import datasets
    from scalecert.runtime.images import normalize
    from scalecert.runtime.recovery import Recoverer

    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("model", help="the network PatchCleanser masks (a checkpoint for --arch)")
    parser.add_argument("--arch", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precision", default="fp32", help="the bundle's variant scalecert runs (built with `scalecert build`)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    rows = {}
    files = [path for path, _ in datasets.image_set(args.data, limit=args.images, seed=0)]
    with tempfile.TemporaryDirectory() as scratch:
        # scalecert and PatchCleanser on ONNX Runtime take turns image by image, the order alternating,
        # so that drift of the machine's speed (+-15% here) falls on both alike.
        with Recoverer.load(args.bundle, backend="ort", threads=args.threads, precision=args.precision,
                            certify=True) as recoverer:
            spec, patch = recoverer.certifier.input_spec, recoverer.certifier.bundle.patch_hw
            pixels = [recoverer.prepare(f) for f in files]
            x = normalize(np.stack(pixels), spec)
            _, h, w = spec["input_size"]
            masks = mask_set((h, w), patch, (6, 6))
            with open_baseline(PatchCleanserBaseline, "ort", args.model, args.arch, masks, args.threads,
                               scratch) as baseline:
                recoverer.recover(pixels[0])
                baseline.certify_recovery(x[:1])
                ours, fast, full_ms = [], [], []
                for i in range(len(pixels)):
                    def run_ours(i=i):
                        ours.append(recoverer.recover(pixels[i]))

                    def run_theirs(i=i):
                        fast.append(timed(lambda: baseline.recover(x[i:i + 1]))[0])
                        full_ms.append(timed(lambda: baseline.certify_recovery(x[i:i + 1]))[0])

                    for run in ((run_ours, run_theirs) if i % 2 == 0 else (run_theirs, run_ours)):
                        run()
        rows["scalecert"] = {"windows": ours[0].windows_total, "pairs": ours[0].pairs_total,
                             "fast_path_ms": float(np.median([r.latency_ms for r in ours])),
                             "certify_ms": float(np.median([r.certify_ms for r in ours])),
                             "pair_rows_run": float(np.median([r.certification_pairs_evaluated for r in ours]))}
        rows["patchcleanser-ort"] = {"masks": len(masks), "pairs": len(masks) * (len(masks) + 1) // 2,
                                     "fast_path_ms": float(np.median(fast)), "certify_ms": float(np.median(full_ms))}
        # PyTorch eager alone, after every ONNX Runtime session is closed (no idle pool competes with it)
        with open_baseline(PatchCleanserBaseline, "torch", args.model, args.arch, masks, args.threads,
                           scratch) as baseline:
            baseline.certify_recovery(x[:1])
            fast = [timed(lambda i=i: baseline.recover(x[i:i + 1]))[0] for i in range(len(x))]
            full_ms = [timed(lambda i=i: baseline.certify_recovery(x[i:i + 1]))[0] for i in range(len(x))]
        rows["patchcleanser-torch"] = {"masks": len(masks), "pairs": len(masks) * (len(masks) + 1) // 2,
                                       "fast_path_ms": float(np.median(fast)), "certify_ms": float(np.median(full_ms))}
    ours_ms = rows["scalecert"]["certify_ms"]
    for key in ("patchcleanser-torch", "patchcleanser-ort"):
        rows[key]["scalecert_certify_speedup"] = rows[key]["certify_ms"] / ours_ms
        rows[key]["scalecert_fast_path_speedup"] = rows[key]["fast_path_ms"] / rows["scalecert"]["fast_path_ms"]
    report = {"bundle": args.bundle, "precision": args.precision, "model": args.model, "images": len(pixels), "threads": args.threads, "rows": rows}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as out:
            json.dump(report, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
