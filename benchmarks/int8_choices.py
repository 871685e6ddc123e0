"""INT8 choices for one bundle, side by side: activation type (symmetric int8, as TensorRT needs,
or asymmetric uint8, which ONNX Runtime CPU folds ReLU/ReLU6 into), 7-bit weights or not, 8-bit
depthwise weights or not, and which convolutions stay float (compile/precision.py::KEEP_FLOAT). For each: top-1 agreement with
fp32 over held-back images x (base + every window), the fp32 and int8 certified rates on them,
and the suffix latency per window on ONNX Runtime CPU.

    python benchmarks/int8_choices.py BUNDLE --calib DIR [--calib-limit 64] [--held-back 16] [--out R.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def suffix_ms_per_window(pipeline, image: np.ndarray, queue: np.ndarray, runs: int = 3) -> float:
    features, _ = pipeline.prefix(image)
    one = pipeline.select(features, 0)
    pipeline.suffix(one, queue)  # warm-up
    started = time.perf_counter()
    for _ in range(runs):
        pipeline.suffix(one, queue)
    return (time.perf_counter() - started) / runs / len(queue) * 1e3


def main(argv=None) -> int:
    from scalecert.bundle import Bundle
    from scalecert.compile import precision as conversions
    from scalecert.compile.build import calibration_images, suffix_feeds
    from scalecert.runtime import pipelines
    from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--calib-limit", type=int, default=64)
    parser.add_argument("--held-back", type=int, default=16)
    parser.add_argument("--choices", help="comma-separated ACTIVATIONS:KEEP:WEIGHTS_7BIT[:DEPTHWISE_8BIT] (default: a set)")
    parser.add_argument("--reference", action="store_true",
                        help="judge by reference QDQ semantics (graph optimisations off: no fused integer kernels)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    bundle = Bundle.open(args.bundle)
    images = calibration_images(args.calib, args.calib_limit, bundle.input_spec)
    held, fit = images[:args.held_back], images[args.held_back:]
    windows = bundle.windows()
    queue = np.concatenate([np.zeros((1, 4), np.int64), windows])
    src = bundle.files("fp32")

    def logits_of(pipeline):
        out = []
        for i in range(len(held)):
            features, _ = pipeline.prefix(held[i:i + 1])
            out.append(pipeline.suffix(pipeline.select(features, 0), queue))
        return np.stack(out)

    with pipelines.open_pipeline(bundle, "ort-cpu", "fp32") as fp32:
        reference = logits_of(fp32)
        feeds = suffix_feeds(fp32, fit, windows)
    prefix_feeds = [{"image": fit[i:i + 16]} for i in range(0, len(fit), 16)]
    ref_labels = reference.argmax(-1)
    ref_cert = (ref_labels == ref_labels[:, :1]).all(1)
    rows = []
    choices = [("int8", "none", False, False), ("uint8", "none", True, False), ("uint8", "none", True, True),
               ("uint8", "first", True, True), ("uint8", "high_resolution", True, True)]
    if args.choices:
        choices = [(a, k, r == "True", rest == ["True"]) for a, k, r, *rest in (c.split(":") for c in args.choices.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        for activations, keep, reduce_range, full_range_depthwise in choices:
            paths = {part: os.path.join(tmp, f"{part}-{activations}-{keep}-{reduce_range}-{full_range_depthwise}.onnx")
                     for part in ("prefix", "suffix")}
            weights = {"full_range_depthwise": full_range_depthwise}
            started = time.perf_counter()
            conversions.to_int8(src["prefix"], paths["prefix"], "prefix", prefix_feeds, activations=activations,
                                keep_float=keep, reduce_range=reduce_range, **weights)
            conversions.to_int8(src["suffix"], paths["suffix"], "suffix", feeds, activations=activations, keep_float=keep,
                                reduce_range=reduce_range, **weights)
            seconds = time.perf_counter() - started
            with OrtCpuPipeline(paths["prefix"], paths["suffix"], window_parallel=True,
                                reference=args.reference) as variant:
                got = logits_of(variant)
                per_window_ms = suffix_ms_per_window(variant, held[:1], queue)
            labels = got.argmax(-1)
            cert = (labels == labels[:, :1]).all(1)
            row = {"activations": activations, "float_kept": keep, "weights_7bit": reduce_range,
                   "depthwise_8bit": full_range_depthwise or not reduce_range, "top1_agreement": float((labels == ref_labels).mean()),
                   "base_agreement": float((labels[:, 0] == ref_labels[:, 0]).mean()),
                   "certified_fp32": float(ref_cert.mean()), "certified_int8": float(cert.mean()),
                   "status_agreement": float((cert == ref_cert).mean()), "suffix_ms_per_window": per_window_ms,
                   "quantize_seconds": seconds}
            print(json.dumps(row), flush=True)
            rows.append(row)
    with pipelines.open_pipeline(bundle, "ort-cpu", "fp32") as fp32:
        print(json.dumps({"fp32_suffix_ms_per_window": suffix_ms_per_window(fp32, held[:1], queue)}))
    if args.out:
        json.dump({"bundle": args.bundle, "held_back": len(held), "windows": len(queue), "rows": rows}, open(args.out, "w"),
                  indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
