#!/usr/bin/env bash
# Everything this project runs on a lent GPU machine in one call (onnxruntime-gpu importable,
# bundles exported elsewhere in $BUNDLES/r20[-deep], a few CIFAR-10 test JPEGs in $SHARED):
# benchmarks/gpu_check.sh (build + doctor + pytest -m gpu + latency + GPU-prefix locality), the
# CUDA suffix profile per cuDNN search, and recovery latency on ort-cuda vs ort-cpu.
# Outputs are packed into $OUT/gpu_session.tgz (the device returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" SCALECERT_SHARED="${SHARED:-../shared}"
SHARED=${SHARED:-../shared}
nvlibs=$(python3 -c 'import glob, os, site; print(":".join(sorted({d for r in site.getsitepackages() for d in glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)})))')
export LD_LIBRARY_PATH="${nvlibs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
OUT_DIR=${OUT:-benchmarks/results}
OUT="$RESULTS" timeout 420 bash benchmarks/gpu_check.sh 2>&1 | grep -v "cudnn_fe_call\|Fallback mode\|plugin EP device" | tee "$RESULTS/console.log"
echo "gpu_check exit ${PIPESTATUS[0]}" | tee -a "$RESULTS/console.log"
sc() { python3 -c 'import sys; from scalecert.cli import main; sys.argv[0] = "scalecert"; main()' "$@"; }
cp -r "$BUNDLES/r20" "$RESULTS/r20-fp16" && sc build "$RESULTS/r20-fp16" --precision fp16 --quiet >/dev/null 2>&1
for p in fp32 fp16; do
  B="$BUNDLES/r20"; [ "$p" = fp16 ] && B="$RESULTS/r20-fp16"
  timeout 120 python3 benchmarks/gpu_profile.py "$B" --precision $p --out "$RESULTS/gpu_profile_$p.json" 2>&1 \
    | grep -v "cudnn_fe_call\|Fallback" | cut -c1-600
done
cp -r "$BUNDLES/r20" "$RESULTS/r20-rec"
sc build "$RESULTS/r20-rec" --backend ort-cuda --quiet 2>&1 | grep -v "plugin EP" | tail -2
timeout 240 python3 benchmarks/gpu_recovery_latency.py "$RESULTS/r20-rec" "$SHARED/data/cifar10-test" --images 20 --out "$RESULTS/gpu_recovery.json" 2>&1 | grep -v "plugin EP\|cudnn_fe\|Fallback"
rm -rf "$RESULTS/r20-fp16" "$RESULTS/r20-rec"
mkdir -p "$OUT_DIR" && tar czf "$OUT_DIR/gpu_session.tgz" -C "$RESULTS" .
