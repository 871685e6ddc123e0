"""Certified recovery through the runtime (scalecert.runtime.recovery) on labelled images: recovered
accuracy, certified recovery accuracy, and the latency of the fast path and of certification
(all pairs), per image, one backend, threads pinned. The full comparison with the PatchCleanser
pixel baseline is `scalecert bench --mode recover`; this is the runtime's own number.

    python benchmarks/recovery_runtime.py BUNDLE DATA --per-class 10 --threads 2 --out results.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> dict:
    from scalecert.runtime.datasets import image_set
    from scalecert.runtime.images import load_image
    from scalecert.runtime.recovery import Recoverer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("data", help="labelled images (ImageFolder or images + labels.csv)")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    items = image_set(args.data)
    chosen, seen = [], {}
    for path, label in items:
        if seen.get(label, 0) < args.per_class:
            seen[label] = seen.get(label, 0) + 1
            chosen.append((path, label))
    with Recoverer.load(args.bundle, backend=args.backend, threads=args.threads, certify=True) as rec:
        pixels = np.stack([load_image(p, rec.certifier.input_spec) for p, _ in chosen])
        labels = np.array([label for _, label in chosen])
        start = time.perf_counter()
        results = [rec.recover(pixels[i], name=chosen[i][0]) for i in range(len(chosen))]
        seconds = time.perf_counter() - start
    fast = np.array([r.prefix_ms + r.suffix_ms for r in results])
    cert = np.array([r.prefix_ms + r.certify_ms for r in results])
    out = {
        "bundle": args.bundle, "images": len(results), "backend": rec.backend, "threads": args.threads,
        "windows": len(rec.windows), "pairs": len(rec.pairs),
        "recovered_accuracy": float(np.mean([r.label == y for r, y in zip(results, labels)])),
        "certified_recovery_accuracy": float(np.mean([bool(r.certified) and r.label == y for r, y in zip(results, labels)])),
        "cases": {c: int(sum(r.case == c for r in results)) for c in ("agreed", "disagreer", "majority")},
        "fast_path_ms": {"mean": float(fast.mean()), "median": float(np.median(fast)), "max": float(fast.max())},
        "fast_path_ms_agreed": float(np.mean([f for f, r in zip(fast, results) if r.case == "agreed"] or [np.nan])),
        "certification_ms": {"mean": float(cert.mean()), "median": float(np.median(cert))},
        "suffix_rows": {"fast_path_mean": float(np.mean([r.windows_evaluated + r.pairs_evaluated for r in results])),
                        "certification_mean": float(np.mean([r.certification_pairs_evaluated for r in results]))},
        "seconds": round(seconds, 1),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
