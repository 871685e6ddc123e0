#!/usr/bin/env bash
# GPU checks and benchmarks (not CI), on an NVIDIA machine. See benchmarks/GPU.md.
#
#   benchmarks/gpu.sh [--install] [--pack] check|bench
#   benchmarks/gpu.sh export DIR [check|bench|all]
#
# Subcommands:
#   check   under 5 minutes; benchmarks/results/gpu_h200/ is its output. ResNet-20 (relu, stride 3,
#           rate 0.3; the seeded random ResNet-20 without ../shared): `scalecert build` and
#           `scalecert doctor` (text and JSON) per GPU backend (ort-cuda, and trt when TensorRT is
#           importable) at fp32 and fp16, `pytest -m gpu`, latency per image on 50 CIFAR-10 test
#           images (ort-cpu and every GPU backend; gpu_latency.json), and the GPU-prefix locality
#           evidence for docs/design.md §9 (benchmarks/gpu_prefix_locality.py; not relied on).
#   bench   ResNet-20 (LIMIT_R20 CIFAR-10 test images, 200) and EfficientNet-Lite0 (LIMIT_EFF images
#           of the ImageNet sample, 50) x GPU backend x fp32/fp16/int8: build (margins), `pytest -m gpu`,
#           median / p95 latency, prefix and suffix shares, suffix windows per second, clean and
#           certified rates, ONNX Runtime CPU as the reference row (gpu_bench.json; the table is printed).
#   export  on a machine with torch and ../shared (no GPU needed): export the bundles that check
#           (r20, r20-deep) or bench (r20, eff) use into DIR; carry DIR and set BUNDLES=DIR there, so
#           the GPU machine needs no torch. EfficientNet-Lite0's export takes minutes.
# Options:
#   --install  first install scalecert (pip install -e . pytest), onnxruntime-gpu in place of
#              onnxruntime (the two install the same module: never both) and polygraphy
#   --pack     also pack the results folder into $OUT/gpu_<subcommand>.tgz (for machines that return
#              few files); the results themselves then go to a temporary folder
# Environment:
#   PY        the Python to run (and --install into); default python3
#   SHARED    the team's data and models; default ../shared
#   OUT       results folder; default benchmarks/results/gpu_<subcommand>
#   BUNDLES   folder of bundles exported elsewhere (`export`): r20/ [r20-deep/] [eff/]
#   WHEELS    folder of wheels for a machine with no package registry (onnxruntime_gpu-*.whl,
#             polygraphy-*.whl, ...), used by --install
#   LIMIT_R20, LIMIT_EFF  images per model for bench (200, 50)
# Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PY:-python3}
SHARED=${SHARED:-../shared}
WHEELS=${WHEELS:-}
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" SCALECERT_SHARED="$SHARED"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

INSTALL=0 PACK=0 CMD="" ARGS=()
for arg in "$@"; do
  case $arg in
    --install) INSTALL=1 ;;
    --pack) PACK=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) if [ -z "$CMD" ]; then CMD=$arg; else ARGS+=("$arg"); fi ;;
  esac
done
case $CMD in
  check|bench) [ ${#ARGS[@]} = 0 ] || { echo "gpu.sh $CMD: unexpected argument ${ARGS[0]}" >&2; exit 2; } ;;
  export) [ ${#ARGS[@]} -ge 1 ] && [ ${#ARGS[@]} -le 2 ] || { echo "gpu.sh export DIR [check|bench|all]" >&2; exit 2; } ;;
  *) usage >&2; exit 2 ;;
esac

START=$(date +%s)
status=0
step() { echo "== $* ($(( $(date +%s) - START ))s)"; }
fail() { echo "FAILED: $*"; status=1; }
sc() { "$PY" -c 'import sys; from scalecert.cli import main; sys.argv[0] = "scalecert"; main()' "$@"; }
sc_export() { "$PY" -c 'import sys; from scalecert.cli import export_main; sys.argv[0] = "scalecert-export"; export_main()' "$@"; }

# --- bundles -------------------------------------------------------------------------------------
# export_bundles DEST NAME...: r20 (ResNet-20, relu, stride 3, rate 0.3 on ../shared's model, else the
# seeded random ResNet-20 at rate 0), r20-deep (the layer2.0 cut, two stages of 3x3 convolutions: for
# the GPU-prefix locality evidence only), eff (EfficientNet-Lite0 pretrained, 32x32 patch, calibrated).
export_bundles() {
  local dest=$1 name model cal
  shift
  mkdir -p "$dest"
  local r20="$SHARED/models/resnet20-cifar10.th" calib="$SHARED/data/cifar10-train"
  if [ -f "$r20" ] && [ -d "$calib" ]; then
    model=$r20; cal=(--calib "$calib" --calib-limit 64 --prune-rate 0.3)
  else
    echo "no $r20: the seeded random ResNet-20 stands in"
    model="$dest/random-resnet20.pt"; cal=(--prune-rate 0)
    "$PY" -c "from scalecert.export.archs import random_checkpoint as r; r('resnet20-cifar', '$model', seed=0)" || return 1
  fi
  for name in "$@"; do
    step "export $name"
    case $name in
      r20) sc_export "$model" --arch resnet20-cifar --patch 5 --layer relu --stride 3 "${cal[@]}" -o "$dest/r20" --quiet \
             || { echo "export r20 failed"; return 1; } ;;
      r20-deep) sc_export "$model" --arch resnet20-cifar --patch 5 --layer layer2.0 --prune-rate 0 -o "$dest/r20-deep" --quiet \
             || echo "deep export failed: the locality evidence covers the shallow cut only" ;;
      eff) sc_export --arch efficientnet-lite0 --pretrained --patch 32 --calib "$SHARED/data/imagenet-sample/images" \
             --calib-limit 128 --prune-rate 0 -o "$dest/eff" --quiet || { echo "export eff failed"; return 1; } ;;
    esac
  done
}

# bundles NAME...: into $WORK, from $BUNDLES when set (the export needs torch 2.13; a GPU machine may
# hold another), else exported here. r20-deep is optional.
bundles() {
  local name
  if [ -n "${BUNDLES:-}" ]; then
    echo "bundles exported elsewhere: $BUNDLES"
    for name in "$@"; do
      if [ -d "$BUNDLES/$name" ]; then cp -r "$BUNDLES/$name" "$WORK/$name"
      elif [ "$name" != r20-deep ]; then echo "no $BUNDLES/$name (benchmarks/gpu.sh export DIR)"; return 1; fi
    done
  else
    export_bundles "$WORK" "$@"
  fi
}

# --- install and environment ---------------------------------------------------------------------
pip_install() {
  if [ -n "$WHEELS" ]; then "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$@"; else "$PY" -m pip install -q "$@"; fi
}
has_cuda_ep() { "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; }

install() {
  step install
  pip_install -e . pytest || return 1
  if ! has_cuda_ep; then
    "$PY" -m pip uninstall -y -q onnxruntime onnxruntime-gpu || true
    local wheel
    wheel=$(ls "${WHEELS:-wheels}"/onnxruntime_gpu-*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$wheel" ]; then "$PY" -m pip install -q --no-deps "$wheel"; else pip_install onnxruntime-gpu; fi || return 1
  fi
  "$PY" -c 'import polygraphy' 2>/dev/null || pip_install polygraphy || echo "polygraphy not installed: TensorRT steps skip"
}

gpu_environment() {
  # CUDA/cuDNN libraries that come as nvidia-* pip packages (beside torch) go on the loader path
  local nvlibs
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
  } 2>&1 | tee "$RESULTS/env.txt"
  has_cuda_ep || { echo "onnxruntime has no CUDA execution provider here: install onnxruntime-gpu (--install, benchmarks/GPU.md)"; return 1; }
  HAVE_TRT=0
  "$PY" -c 'import tensorrt, polygraphy' 2>/dev/null && HAVE_TRT=1
  backends=(ort-cuda)
  [ "$HAVE_TRT" = 1 ] && backends+=(trt)
  return 0
}

gpu_pytest() {
  step "pytest -m gpu"
  SCALECERT_GPU_BUNDLE="$WORK/r20" timeout 300 "$PY" -m pytest -q -m gpu -rs tests/test_gpu.py -p no:cacheprovider \
    2>&1 | tee "$RESULTS/gpu_pytest.log" | tail -n 15
  [ "${PIPESTATUS[0]}" = 0 ] || fail "pytest -m gpu"
}

# --- check ---------------------------------------------------------------------------------------
check() {
  bundles r20 r20-deep || exit 1

  # build (margin + device probes recorded) and doctor, per GPU backend
  : > "$RESULTS/doctor_rc.txt"
  local backend precision rc
  for backend in "${backends[@]}"; do
    for precision in fp32 fp16; do
      step "build $backend $precision"
      sc build "$WORK/r20" --backend "$backend" --precision "$precision" > "$RESULTS/build_${backend}_${precision}.log" 2>&1 \
        || fail "build $backend $precision (see build_${backend}_${precision}.log)"
      tail -n 6 "$RESULTS/build_${backend}_${precision}.log"
      step "doctor $backend $precision"
      sc doctor "$WORK/r20" --backend "$backend" --precision "$precision" | tee "$RESULTS/doctor_${backend}_${precision}.txt"
      rc=${PIPESTATUS[0]}
      sc doctor "$WORK/r20" --backend "$backend" --precision "$precision" --json > "$RESULTS/doctor_${backend}_${precision}.json"
      echo "$backend $precision text=$rc json=$?" >> "$RESULTS/doctor_rc.txt"
      [ "$rc" = 0 ] || fail "doctor $backend $precision"
    done
  done
  step "doctor ort-cpu fp32 (reference)"
  sc doctor "$WORK/r20" --backend ort-cpu > "$RESULTS/doctor_ort-cpu_fp32.txt"; echo "ort-cpu fp32 text=$?" >> "$RESULTS/doctor_rc.txt"

  gpu_pytest

  # latency: one image at a time, each backend on the same images
  step latency
  timeout 120 "$PY" - "$WORK/r20" "$SHARED" "$RESULTS/gpu_latency.json" <<'EOF' || fail "latency"
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

  # evidence for design §9: the prefix run ON THE GPU, probed for locality
  step "GPU prefix locality (evidence, not relied on)"
  local deep=()
  [ -d "$WORK/r20-deep" ] && deep=("$WORK/r20-deep")
  timeout 120 "$PY" benchmarks/gpu_prefix_locality.py "$WORK/r20" "${deep[@]}" --positions 400 \
    --out "$RESULTS/gpu_prefix_locality.json" || fail "GPU prefix locality probe did not run"
}

# --- bench ---------------------------------------------------------------------------------------
bench() {
  bundles r20 eff || exit 1
  declare -A calib=([r20]="$SHARED/data/cifar10-train" [eff]="$SHARED/data/imagenet-sample/images")
  local model precision backend
  for model in r20 eff; do
    for precision in fp32 fp16 int8; do
      for backend in "${backends[@]}"; do
        step "build $model $precision $backend"
        sc build "$WORK/$model" --precision "$precision" --calib "${calib[$model]}" --backend "$backend" \
          || fail "build $model $precision $backend (its rows will be missing)"
      done
    done
  done

  gpu_pytest

  step latency
  "$PY" - "$WORK" "$SHARED" "$RESULTS/gpu_bench.json" "${LIMIT_R20:-200}" "${LIMIT_EFF:-50}" <<'EOF' || fail "latency"
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
}

# --- main ----------------------------------------------------------------------------------------
if [ "$CMD" = export ]; then
  case ${ARGS[1]:-all} in
    check) names=(r20 r20-deep) ;;
    bench) names=(r20 eff) ;;
    all) names=(r20 r20-deep eff) ;;
    *) echo "gpu.sh export DIR [check|bench|all]" >&2; exit 2 ;;
  esac
  export_bundles "${ARGS[0]}" "${names[@]}" || exit 1
  step "done: bundles in ${ARGS[0]} (carry them; BUNDLES=DIR on the GPU machine)"
  exit 0
fi

OUT=${OUT:-benchmarks/results/gpu_$CMD}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
if [ "$PACK" = 1 ]; then RESULTS=$(mktemp -d); else RESULTS=$OUT; fi

run() {
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  if [ "$INSTALL" = 1 ]; then install || { echo "install failed"; exit 1; }; fi
  gpu_environment || exit 1
  "$CMD"
  step "done: status $status, outputs in $RESULTS"
  exit $status
}
# ONNX Runtime's CUDA provider repeats a few harmless lines per session; they would bury the log
run 2>&1 | grep --line-buffered -v "cudnn_fe_call\|Fallback mode\|plugin EP device" | tee "$RESULTS/console.log"
rc=${PIPESTATUS[0]}
if [ "$PACK" = 1 ]; then
  tar czf "$OUT/gpu_$CMD.tgz" -C "$RESULTS" . && rm -rf "$RESULTS" && echo "packed into $OUT/gpu_$CMD.tgz"
fi
exit "$rc"
