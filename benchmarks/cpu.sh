#!/usr/bin/env bash
# CPU sweep (not CI): scalecert configurations (pruning rates x strides x fp32/int8) against the
# pixel-masking baseline (PyTorch eager and ONNX Runtime) on real data, one run per model; writes
# $OUT/cpu_*.json and .png (`scalecert bench` prints each table). Not re-run since windows hold a
# blank image's features by default: its 2026-11-25 reports are cited in RESULTS.md only as the
# figures behind design choices.
#   SHARED=../shared benchmarks/cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-benchmarks/results}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

scalecert-export "$SHARED/models/resnet20-cifar10.th" --arch resnet20-cifar --patch 5 \
  --calib "$SHARED/data/cifar10-train" --calib-limit 500 --prune-rate 0 -o "$WORK/r20" --quiet
scalecert build "$WORK/r20" --precision int8 --calib "$SHARED/data/cifar10-train" --calib-limit 128 --quiet
scalecert bench "$WORK/r20" --force --data "$SHARED/data/cifar10-test" --limit 1000 --precision fp32,int8 \
  --prune-rate 0,0.1,0.3 --stride 3,5 --baseline --baseline-engine both \
  -o "$OUT/cpu_resnet20.json" --plot "$OUT/cpu_resnet20.png"

scalecert-export --arch efficientnet-lite0 --pretrained --patch 32 \
  --calib "$SHARED/data/imagenet-sample/images" --calib-limit 128 --prune-rate 0 -o "$WORK/eff" --quiet
scalecert build "$WORK/eff" --precision int8 --calib "$SHARED/data/imagenet-sample/images" --calib-limit 64 --quiet
scalecert bench "$WORK/eff" --force --data "$SHARED/data/imagenet-sample/images" --labels "$SHARED/data/imagenet-sample/labels.csv" \
  --limit 50 --seed 0 --precision fp32,int8 --prune-rate 0,0.3 --stride 5,8 --baseline --baseline-engine both \
  -o "$OUT/cpu_effnet.json" --plot "$OUT/cpu_effnet.png"

# the same model with the superficial layer at the input (identity prefix): windows = baseline masks
scalecert-export --arch efficientnet-lite0 --pretrained --patch 32 --layer image --stride 33 -o "$WORK/eff-id" --quiet
scalecert bench "$WORK/eff-id" --force --data "$SHARED/data/imagenet-sample/images" --labels "$SHARED/data/imagenet-sample/labels.csv" \
  --limit 50 --seed 0 --baseline --baseline-engine both \
  -o "$OUT/cpu_effnet_identity.json"
echo "reports in $OUT/cpu_resnet20.json, $OUT/cpu_effnet.json, $OUT/cpu_effnet_identity.json"
