"""Detection on the same engine, interleaved (issue 12): the runtime's Certifier against the pixel
baseline on ONNX Runtime (the full model's ONNX, the 6x6 masks), one process, taking turns image
by image with the order alternating, so that drift of the machine's speed (+-15% on the 2-core VM)
falls on both alike. `scalecert bench` runs each baseline in its own process, one after the other,
which is right for PyTorch eager but leaves a same-engine ratio near 1 at the mercy of drift.
Decoding and normalising happen before the clock for both; each side's timed call is its whole
decision for one image (Certifier.certify on the prepared pixels; the baseline's masked batch).

    python benchmarks/same_engine.py BUNDLE --data DIR [--images 100] [--threads 2] [--precision fp32]
        [--model FILE --arch A] [--out R.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    from scalecert.evaluation.baseline import PixelMaskingBaseline, mask_set
    from scalecert.evaluation.bench import open_baseline
    from scalecert.runtime import datasets
    from scalecert.runtime.certifier import Certifier
    from scalecert.runtime.images import normalize

    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--model", help="default: the bundle's source model")
    parser.add_argument("--arch")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    files = [path for path, _ in datasets.image_set(args.data, limit=args.images)]
    ours, theirs, agree = [], [], 0
    with Certifier.load(args.bundle, backend="ort", threads=args.threads, precision=args.precision) as certifier, \
            tempfile.TemporaryDirectory() as scratch:
        source = certifier.manifest["source"]
        pixels = [certifier.prepare(f) for f in files]
        x = normalize(np.stack(pixels), certifier.input_spec)
        masks = mask_set(certifier.bundle.image_hw, certifier.bundle.patch_hw, (6, 6))
        with open_baseline(PixelMaskingBaseline, "ort", args.model or source["path"], args.arch or source.get("arch"),
                           masks, args.threads, scratch) as baseline:
            certifier.certify(pixels[0])  # warm-up, both
            baseline.certify(x[:1])
            for i in range(len(pixels)):
                def run_ours(i=i):
                    start = time.perf_counter()
                    result = certifier.certify(pixels[i])
                    ours.append((time.perf_counter() - start) * 1e3)
                    return result

                def run_theirs(i=i):
                    out = baseline.certify(x[i:i + 1])
                    theirs.append(out["latency_ms"])
                    return out

                first, second = (run_ours, run_theirs) if i % 2 == 0 else (run_theirs, run_ours)
                a, b = first(), second()
                result, out = (a, b) if first is run_ours else (b, a)
                agree += (result.status == "certified") == out["certified"]
    ours, theirs = np.array(ours), np.array(theirs)
    report = {"bundle": args.bundle, "precision": args.precision, "images": len(files), "threads": args.threads,
              "masks": len(masks), "scalecert_ms_median": float(np.median(ours)),
              "baseline_ort_ms_median": float(np.median(theirs)),
              "ratio_of_medians": float(np.median(theirs) / np.median(ours)),
              "median_of_per_image_ratios": float(np.median(theirs / ours)),
              "certified_status_agreement": agree / len(files)}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as out:
            json.dump(report, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
