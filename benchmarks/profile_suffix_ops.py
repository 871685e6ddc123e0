"""ONNX Runtime kernel time by op type for a bundle's suffix at each precision, and the share of the
window occlusion (the nodes named scalecert/..., export/split.py::OcclusionSuffix).
    python benchmarks/profile_suffix_ops.py BUNDLE [--windows 19] [--precisions fp32,int8] [--threads 1]"""
from __future__ import annotations

import argparse
import collections
import json

import numpy as np
import onnxruntime as ort

from scalecert.bundle import Bundle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--windows", type=int, default=19)
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    windows = np.concatenate([np.zeros((1, 4), np.int64), bundle.windows()])[:args.windows]
    features = np.random.default_rng(0).standard_normal((1, *bundle.manifest["layer"]["shape"])).astype(np.float32)
    for precision in args.precisions.split(","):
        options = ort.SessionOptions()
        options.enable_profiling, options.intra_op_num_threads = True, args.threads
        options.profile_file_prefix = f"/tmp/scalecert-ops-{precision}"
        path = bundle.files(precision)["suffix"]
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(args.runs):
            session.run(None, {"features": features, "windows": windows})
        with open(session.end_profiling()) as f:
            events = json.load(f)
        by_op, occlusion = collections.Counter(), 0
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                by_op[e["args"]["op_name"]] += e["dur"]
                occlusion += e["dur"] if e["name"].startswith("scalecert/") else 0
        total = sum(by_op.values())
        print(f"{precision}: {total / args.runs / 1e3:.1f} ms per call (occlusion {occlusion / args.runs / 1e3:.1f} ms);",
              ", ".join(f"{op} {100 * t / total:.1f}%" for op, t in by_op.most_common(8)))


if __name__ == "__main__":
    main()
