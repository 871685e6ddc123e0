"""Where the ONNX Runtime CUDA suffix spends its time: one window batch of a bundle's suffix,
profiled per node (op type, execution provider), under each cuDNN algorithm search.

    python benchmarks/gpu_profile.py BUNDLE [--precision fp32] [--windows 64] [--runs 20] --out R.json
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile
import time

import numpy as np


def profile(suffix_path: str, features: np.ndarray, windows: np.ndarray, search: str, runs: int,
            device: str = "cuda") -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "suffix")
    providers = ([("CUDAExecutionProvider", {"cudnn_conv_algo_search": search, "use_tf32": "0"})] if device == "cuda"
                 else []) + ["CPUExecutionProvider"]
    session = ort.InferenceSession(suffix_path, options, providers=providers)
    names = {i.name: i for i in session.get_inputs()}
    dtype = np.float16 if "float16" in names["features"].type else np.float32
    device_features = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(features, dtype), device, 0)
    binding = session.io_binding()
    window_dtype = np.int32 if "int32" in names["windows"].type else np.int64

    def once():
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_ortvalue_input("features", device_features)
        binding.bind_cpu_input("windows", np.ascontiguousarray(windows, window_dtype))
        binding.bind_output("logits", "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    for _ in range(3):
        once()
    started = time.perf_counter()
    for _ in range(runs):
        once()
    per_batch_ms = (time.perf_counter() - started) / runs * 1e3
    path = session.end_profiling()
    events = json.load(open(path))
    by_op: dict = collections.defaultdict(float)
    by_provider: dict = collections.defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        by_op[(args.get("op_name"), args.get("provider"))] += event["dur"] / 1e3
        by_provider[args.get("provider")] += event["dur"] / 1e3
    total_runs = runs + 3
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {"search": search, "per_batch_ms": per_batch_ms, "windows": len(windows),
            "by_provider_ms_per_run": {k: v / total_runs for k, v in by_provider.items()},
            "top_ops_ms_per_run": [{"op": op, "provider": provider, "ms": ms / total_runs} for (op, provider), ms in top]}


def main(argv=None) -> int:
    from scalecert.bundle import Bundle
    from scalecert.runtime.images import normalize
    from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script where no GPU exists")
    args = parser.parse_args(argv)
    bundle = Bundle.open(args.bundle)
    files = bundle.files(args.precision)
    probe = sorted(glob.glob(os.path.join(args.bundle, "probes", "*.png")))
    from scalecert.runtime.images import load_image

    pixels = load_image(probe[0], bundle.input_spec) if probe else np.zeros((*bundle.image_hw, 3), np.uint8)
    with OrtCpuPipeline(bundle.files("fp32")["prefix"], bundle.files("fp32")["suffix"]) as cpu:
        features, _ = cpu.prefix(normalize(pixels[None], bundle.input_spec))
    windows = bundle.windows()[:args.windows]
    rows = []
    for search in ("HEURISTIC", "EXHAUSTIVE", "DEFAULT"):
        rows.append(profile(files["suffix"], features[:1], windows, search, args.runs, args.device))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        json.dump({"bundle": args.bundle, "precision": args.precision, "rows": rows}, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
