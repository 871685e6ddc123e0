#!/usr/bin/env bash
# One short GPU check (< 5 minutes) for issue 15, on an NVIDIA machine with onnxruntime-gpu already
# installed (TensorRT optional: its steps skip without it). Nothing is installed; the repository is
# used from PYTHONPATH.
#   OUT=/some/dir SHARED=../shared benchmarks/gpu_check.sh
# BUNDLES=DIR: use DIR/r20 (and DIR/r20-deep) instead of exporting here.
# Writes to $OUT (default benchmarks/results/gpu_check):
#   env.txt                      versions, providers, nvidia-smi
#   build_*.log                  `scalecert build --backend ort-cuda|trt` (margins, device probes recorded)
#   doctor_<backend>_<p>.{txt,json}  `scalecert doctor` text and JSON, exit codes in doctor_rc.txt
#   gpu_pytest.log               `pytest -m gpu -q`
#   gpu_latency.json             certification latency per image, ort-cpu vs ort-cuda (vs trt)
#   gpu_prefix_locality.json     is the prefix bitwise local ON THE GPU (cuDNN)? evidence for design §9
# Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PY:-python3}
SHARED=${SHARED:-../shared}
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" SCALECERT_SHARED="$SHARED"
START=$(date +%s)
status=0
step() { echo "== $* ($(( $(date +%s) - START ))s)"; }
fail() { echo "FAILED: $*"; status=1; }
sc() { "$PY" -c 'import sys; from scalecert.cli import main; sys.argv[0] = "scalecert"; main()' "$@"; }
sc_export() { "$PY" -c 'import sys; from scalecert.cli import export_main; sys.argv[0] = "scalecert-export"; export_main()' "$@"; }

# CUDA/cuDNN libraries that come as nvidia-* pip packages (beside torch) go on the loader path
nvlibs=$("$PY" - <<'EOF'
import glob, os, site
roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(os.path.join(p, "nvidia"))]
print(":".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)})))
EOF
)
export LD_LIBRARY_PATH="${nvlibs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step environment
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import onnxruntime as o, numpy; print("onnxruntime", o.__version__, o.get_available_providers(), "numpy", numpy.__version__)'
  "$PY" -c 'import tensorrt; print("tensorrt", tensorrt.__version__)' 2>/dev/null || echo "no TensorRT: trt steps skip"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>/dev/null || echo "no torch"
} 2>&1 | tee "$OUT/env.txt"
"$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' \
  || { echo "onnxruntime has no CUDA execution provider here: install onnxruntime-gpu (benchmarks/GPU.md)"; exit 1; }
HAVE_TRT=0
"$PY" -c 'import tensorrt, polygraphy' 2>/dev/null && HAVE_TRT=1

# --- bundles: ResNet-20 (../shared) with a pruned gate, else the seeded random ResNet-20 -----------
step export
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
R20="$SHARED/models/resnet20-cifar10.th"
CALIB="$SHARED/data/cifar10-train"
if [ -n "${BUNDLES:-}" ] && [ -d "$BUNDLES/r20" ]; then
  echo "bundles exported elsewhere: $BUNDLES"  # the export needs torch 2.13; the device may hold another
  cp -r "$BUNDLES/r20" "$WORK/r20"; [ -d "$BUNDLES/r20-deep" ] && cp -r "$BUNDLES/r20-deep" "$WORK/r20-deep"
else
  if [ -f "$R20" ] && [ -d "$CALIB" ]; then
    MODEL="$R20"; CAL=(--calib "$CALIB" --calib-limit 64 --prune-rate 0.3)
  else
    echo "no $R20: the seeded random ResNet-20 stands in"
    MODEL="$WORK/tiny.pt"; CAL=(--prune-rate 0)
    "$PY" -c "from scalecert.export.archs import random_checkpoint as r; r('resnet20-cifar', '$MODEL', seed=0)"
  fi
  sc_export "$MODEL" --arch resnet20-cifar --patch 5 --layer relu --stride 3 "${CAL[@]}" -o "$WORK/r20" --quiet \
    || { echo "export failed"; exit 1; }
  # a deeper cut (two stages of 3x3 convolutions) for the GPU-prefix locality evidence only
  sc_export "$MODEL" --arch resnet20-cifar --patch 5 --layer layer2.0 --prune-rate 0 -o "$WORK/r20-deep" --quiet \
    || echo "deep export failed: the locality evidence covers the shallow cut only"
fi

# --- build (margin + device probes recorded) and doctor, per GPU backend ---------------------------
backends=(ort-cuda)
[ "$HAVE_TRT" = 1 ] && backends+=(trt)
: > "$OUT/doctor_rc.txt"
for backend in "${backends[@]}"; do
  for precision in fp32 fp16; do
    step "build $backend $precision"
    sc build "$WORK/r20" --backend "$backend" --precision "$precision" > "$OUT/build_${backend}_${precision}.log" 2>&1 \
      || fail "build $backend $precision (see build_${backend}_${precision}.log)"
    tail -n 6 "$OUT/build_${backend}_${precision}.log"
    step "doctor $backend $precision"
    sc doctor "$WORK/r20" --backend "$backend" --precision "$precision" | tee "$OUT/doctor_${backend}_${precision}.txt"
    rc=${PIPESTATUS[0]}
    sc doctor "$WORK/r20" --backend "$backend" --precision "$precision" --json > "$OUT/doctor_${backend}_${precision}.json"
    echo "$backend $precision text=$rc json=$?" >> "$OUT/doctor_rc.txt"
    [ "$rc" = 0 ] || fail "doctor $backend $precision"
  done
done
step "doctor ort-cpu fp32 (reference)"
sc doctor "$WORK/r20" --backend ort-cpu > "$OUT/doctor_ort-cpu_fp32.txt"; echo "ort-cpu fp32 text=$?" >> "$OUT/doctor_rc.txt"

# --- pytest -m gpu ---------------------------------------------------------------------------------
step "pytest -m gpu"
SCALECERT_GPU_BUNDLE="$WORK/r20" timeout 120 "$PY" -m pytest -q -m gpu -rs tests/test_gpu.py -p no:cacheprovider \
  2>&1 | tee "$OUT/gpu_pytest.log" | tail -n 15
[ "${PIPESTATUS[0]}" = 0 ] || fail "pytest -m gpu"

# --- latency: one image at a time, each backend on the same images ---------------------------------
step latency
timeout 120 "$PY" - "$WORK/r20" "$SHARED" "$OUT/gpu_latency.json" <<'EOF' || fail "latency"
import glob, json, os, sys
import numpy as np
from scalecert.bundle import Bundle
from scalecert.runtime import Certifier
from scalecert.runtime.pipelines import BACKENDS

bundle, shared, out = sys.argv[1:4]
files = sorted(glob.glob(os.path.join(shared, "data", "cifar10-test", "*", "*.jpg")))
files = files[::max(1, len(files) // 50)][:50]
opened = Bundle.open(bundle)
rows = []
for backend in BACKENDS:
    for precision in ("fp32", "fp16"):
        if opened.margin(backend, precision) is None:
            continue
        with Certifier.load(bundle, backend=backend, precision=precision) as cert:
            pixels = [cert.prepare(p) for p in files] or [cert.prepare(os.path.join(bundle, n)) for n in opened.probe_images] * 10
            for px in pixels[:3]:
                cert.certify(px)
            results = [cert.certify(px) for px in pixels]
        lat = np.array([r.latency_ms for r in results])
        rows.append({"backend": backend, "precision": precision, "images": len(results), "delta": cert.delta,
                     "median_ms": float(np.median(lat)), "p95_ms": float(np.percentile(lat, 95)),
                     "prefix_ms": float(np.median([r.prefix_ms for r in results])),
                     "suffix_ms": float(np.median([r.suffix_ms for r in results])),
                     "certified": float(np.mean([r.status == "certified" for r in results]))})
        print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(out, "w"), indent=1)
EOF

# --- evidence for design §9: the prefix run ON THE GPU, probed for locality --------------------------
step "GPU prefix locality (evidence, not relied on)"
deep=(); [ -d "$WORK/r20-deep" ] && deep=("$WORK/r20-deep")
timeout 120 "$PY" benchmarks/gpu_prefix_locality.py "$WORK/r20" "${deep[@]}" --positions 400 \
  --out "$OUT/gpu_prefix_locality.json" || fail "GPU prefix locality probe did not run"

step "done: status $status, outputs in $OUT"
exit $status
