"""Recovery on a GPU backend beside ONNX Runtime CPU: the fast path's latency and the certification
(all pairs) per image, and whether label, case and certificate agree between the backends.

    python benchmarks/gpu_recovery_latency.py BUNDLE IMAGES_DIR [--images 20] [--out R.json]
(BUNDLE needs an ort-cuda margin: `scalecert build BUNDLE --backend ort-cuda` first.)
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np


def main(argv=None) -> int:
    from scalecert.runtime.recovery import Recoverer

    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("images")
    parser.add_argument("--images", dest="count", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.images, "**", "*.jpg"), recursive=True))
    files = files[::max(1, len(files) // args.count)][:args.count]
    rows, outcomes = [], {}
    for backend in ("ort-cpu", "ort-cuda"):
        with Recoverer.load(args.bundle, backend=backend, certify=True) as recoverer:
            pixels = [recoverer.prepare(f) for f in files]
            recoverer.recover(pixels[0])  # warm-up
            results = [recoverer.recover(px) for px in pixels]
        outcomes[backend] = [(r.label, r.case, r.certified) for r in results]
        rows.append({"backend": backend, "images": len(results),
                     "fast_path_median_ms": float(np.median([r.latency_ms for r in results])),
                     "certify_median_ms": float(np.median([r.certify_ms for r in results])),
                     "certified": float(np.mean([r.certified for r in results])),
                     "cases": {c: sum(r.case == c for r in results) for c in ("agreed", "disagreer", "majority")}})
        print(json.dumps(rows[-1]), flush=True)
    same = outcomes["ort-cpu"] == outcomes["ort-cuda"]
    print(json.dumps({"outcomes_equal": same}))
    if args.out:
        json.dump({"rows": rows, "outcomes_equal": same}, open(args.out, "w"), indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
