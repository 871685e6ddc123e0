#!/usr/bin/env bash
# GPU checks and latency (not CI), one command on an NVIDIA machine (see benchmarks/GPU.md):
#   SHARED=../shared benchmarks/gpu.sh
# Environment:
#   PY       the Python to install into and run (default python3)
#   WHEELS   folder of wheels for a machine with no package registry (onnxruntime_gpu-*.whl,
#            polygraphy-*.whl, ...); dependencies already installed are used as they are
#   BUNDLES  folder holding r20/ and eff/ bundles exported elsewhere (then this machine needs no torch)
#   OUT      results folder (default benchmarks/results); LIMIT_R20 / LIMIT_EFF images (200 / 50)
# Steps: install scalecert with onnxruntime-gpu in place of onnxruntime; add fp16/int8 variants and
# measure each GPU backend's numeric margin (`scalecert build`); run `pytest -m gpu`; time
# certification per image and suffix windows per second for each model x backend x precision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SHARED=${SHARED:-../shared}
OUT=${OUT:-benchmarks/results}
WHEELS=${WHEELS:-}
mkdir -p "$OUT"

pip_install() {
  if [ -n "$WHEELS" ]; then "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$@"; else "$PY" -m pip install -q "$@"; fi
}
has_cuda_ep() { "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; }

# --- install ---------------------------------------------------------------------------------
pip_install -e . pytest
if ! has_cuda_ep; then
  # onnxruntime and onnxruntime-gpu install the same module: never both
  "$PY" -m pip uninstall -y -q onnxruntime onnxruntime-gpu || true
  wheel=$(ls "${WHEELS:-wheels}"/onnxruntime_gpu-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$wheel" ]; then "$PY" -m pip install -q --no-deps "$wheel"; else pip_install onnxruntime-gpu; fi
fi
"$PY" -c 'import polygraphy' 2>/dev/null || pip_install polygraphy || echo "polygraphy not installed: TensorRT steps skip"
# CUDA/cuDNN libraries that come as nvidia-* pip packages (beside torch) go on the loader path
nvlibs=$("$PY" - <<'EOF'
import glob, os, site
roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(os.path.join(p, "nvidia"))]
print(":".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)})))
EOF
)
export LD_LIBRARY_PATH="${nvlibs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
has_cuda_ep || { echo "onnxruntime has no CUDA execution provider here (see benchmarks/GPU.md)" >&2; exit 1; }
HAVE_TRT=0
"$PY" -c 'import tensorrt, polygraphy' 2>/dev/null && HAVE_TRT=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
[ "$HAVE_TRT" = 1 ] && "$PY" -c 'import tensorrt; print("tensorrt", tensorrt.__version__)' || echo "no TensorRT: trt rows skip"

# --- bundles, precision variants, margins ----------------------------------------------------
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -n "${BUNDLES:-}" ]; then
  cp -r "$BUNDLES/r20" "$BUNDLES/eff" "$WORK/"
else
  scalecert-export "$SHARED/models/resnet20-cifar10.th" --arch resnet20-cifar --patch 5 \
    --calib "$SHARED/data/cifar10-train" --calib-limit 500 --prune-rate 0 -o "$WORK/r20" --quiet
  scalecert-export --arch efficientnet-lite0 --pretrained --patch 32 \
    --calib "$SHARED/data/imagenet-sample/images" --calib-limit 128 --prune-rate 0 -o "$WORK/eff" --quiet
fi
declare -A CALIB=([r20]="$SHARED/data/cifar10-train" [eff]="$SHARED/data/imagenet-sample/images")
backends=(ort-cuda)
[ "$HAVE_TRT" = 1 ] && backends+=(trt)
for model in r20 eff; do
  for precision in fp32 fp16 int8; do
    for backend in "${backends[@]}"; do
      echo "== build $model $precision $backend"
      scalecert build "$WORK/$model" --precision "$precision" --calib "${CALIB[$model]}" --backend "$backend" \
        || echo "build failed: $model $precision $backend (its rows will be missing)"
    done
  done
done

# --- GPU tests ---------------------------------------------------------------------------------
status=0
SCALECERT_GPU_BUNDLE="$WORK/r20" "$PY" -m pytest -q -m gpu tests/test_gpu.py -rs 2>&1 | tee "$OUT/gpu_pytest.log" || status=$?

# --- latency -----------------------------------------------------------------------------------
"$PY" - "$WORK" "$SHARED" "$OUT/gpu_latency.json" "${LIMIT_R20:-200}" "${LIMIT_EFF:-50}" <<'EOF'
import json, platform, subprocess, sys
import numpy as np
from scalecert.bundle import Bundle
from scalecert.bundle.manifest import PRECISIONS
from scalecert.runtime.pipelines import BACKENDS
from scalecert.runtime.datasets import image_set
from scalecert.errors import ScaleCertError
from scalecert.runtime import Certifier

work, shared, out, limit_r20, limit_eff = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
models = {"resnet20-cifar": (f"{work}/r20", f"{shared}/data/cifar10-test", limit_r20),
          "efficientnet-lite0": (f"{work}/eff", f"{shared}/data/imagenet-sample/images", limit_eff)}
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    gpu = "?"
rows = []
for model, (bundle, data, limit) in models.items():
    items = image_set(data, limit=limit, seed=0)
    opened = Bundle.open(bundle)
    for backend in BACKENDS:
        for precision in PRECISIONS:
            if opened.margin(backend, precision) is None:
                continue
            try:
                cert = Certifier.load(bundle, backend=backend, precision=precision)
            except ScaleCertError as exc:
                print(f"skip {model} {backend} {precision}: {exc}")
                continue
            with cert:
                pixels = [cert.prepare(p) for p, _ in items]
                for px in pixels[:3]:
                    cert.certify(px)  # warm-up: sessions, allocators, kernel choice
                results = [cert.certify(px) for px in pixels]
            lat = np.array([r.latency_ms for r in results])
            evaluations = sum(r.windows_evaluated + 1 for r in results)  # + the un-occluded pass
            labels = [label for _, label in items]
            rows.append({
                "model": model, "backend": backend, "precision": precision, "images": len(results), "delta": cert.delta,
                "latency_ms_median": float(np.median(lat)), "latency_ms_p95": float(np.percentile(lat, 95)),
                "prefix_ms_median": float(np.median([r.prefix_ms for r in results])),
                "suffix_ms_median": float(np.median([r.suffix_ms for r in results])),
                "windows_per_s": evaluations / (sum(r.suffix_ms for r in results) / 1e3),
                "certified_rate": float(np.mean([r.status == "certified" for r in results])),
                "clean_accuracy": (float(np.mean([r.label == y for r, y in zip(results, labels)]))
                                   if None not in labels else None),
            })
with open(out, "w") as f:
    json.dump({"gpu": gpu, "python": platform.python_version(), "rows": rows}, f, indent=1)
print(f"GPU: {gpu}")
print("| model | backend | precision | delta | median ms | p95 ms | prefix ms | suffix ms | windows/s | clean | certified |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    clean = "" if r["clean_accuracy"] is None else f"{r['clean_accuracy']:.1%}"
    print(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['delta']:.3g} | {r['latency_ms_median']:.2f} | "
          f"{r['latency_ms_p95']:.2f} | {r['prefix_ms_median']:.2f} | {r['suffix_ms_median']:.2f} | "
          f"{r['windows_per_s']:.0f} | {clean} | {r['certified_rate']:.1%} |")
EOF
echo "wrote $OUT/gpu_latency.json and $OUT/gpu_pytest.log"
exit $status
