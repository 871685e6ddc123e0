"""Evidence for docs/design.md §9: is the PREFIX bitwise local when it runs on the GPU (ONNX Runtime
CUDA execution provider, cuDNN)? scalecert does not rely on it (the prefix runs on ONNX Runtime
CPU); this measures what running it on the GPU would risk.

For each bundle and each cuDNN algorithm-search mode (HEURISTIC, the runtime's old setting;
EXHAUSTIVE, which times every algorithm and may pick Winograd/FFT; DEFAULT), the prefix runs on
CUDA and scalecert's locality probe (runtime/probes.py::probe_locality: patches of random,
saturated and out-of-range contents at many positions, in batches of 16, against the clean
image alone) counts the positions whose features or gates move outside the footprint. Also:
the largest |GPU - CPU| feature difference and the gate disagreement on the clean image.

    python benchmarks/gpu_prefix_locality.py BUNDLE [BUNDLE...] --positions 400 --out result.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from scalecert.bundle import Bundle
from scalecert.runtime.probes import probe_locality, probe_pixels
from scalecert.runtime.images import normalize
from scalecert.runtime.pipelines.onnxruntime import OrtRunner


class CudaPrefix:
    """The bundle's prefix on the CUDA execution provider: `prefix(images) -> (features, gate)` in host memory."""

    def __init__(self, path: str, search: str):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": search, "use_tf32": "0"}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, options, providers=providers)
        assert self.session.get_providers()[0] == "CUDAExecutionProvider", self.session.get_providers()

    def prefix(self, image):
        features, gate = self.session.run(["features", "gate"], {"image": np.ascontiguousarray(image, np.float32)})
        return features, gate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--positions", type=int, default=400)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for path in args.bundles:
        bundle = Bundle.open(path)
        prefix = bundle.files("fp32")["prefix"]
        pixels = probe_pixels(bundle)
        clean = normalize(pixels[None], bundle.input_spec)
        with OrtRunner(prefix) as cpu:
            reference = cpu.infer({"image": clean})
        for search in ("HEURISTIC", "EXHAUSTIVE", "DEFAULT"):
            start = time.perf_counter()
            gpu = CudaPrefix(prefix, search)
            features, gate = gpu.prefix(clean)
            check = probe_locality(gpu, bundle, pixels, count=args.positions, seed=1)
            rows.append({"bundle": path, "layer": bundle.manifest["layer"]["name"], "search": search,
                         "positions": check.data["positions"], "leaking": check.data["leaking"],
                         "moved_inside": check.data["moved_inside"], "first_leak": check.data["first_leak"],
                         "max_abs_diff_vs_cpu": float(np.abs(features - reference["features"]).max()),
                         "gate_disagreement_vs_cpu": float((gate != reference["gate"]).mean()),
                         "seconds": round(time.perf_counter() - start, 2)})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
