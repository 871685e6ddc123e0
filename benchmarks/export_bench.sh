#!/usr/bin/env bash
# Export time, bundle size, FLOPs and windows per image for the two reference models (not CI).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-/tmp/scalecert-bench}
mkdir -p "$OUT"
run() {
  local name=$1; shift
  local start=$(date +%s.%N)
  scalecert-export "$@" -o "$OUT/$name" --force --quiet
  local end=$(date +%s.%N)
  printf '%s export %.1f s, bundle %s\n' "$name" "$(echo "$end - $start" | bc)" "$(du -sh "$OUT/$name" | cut -f1)"
  scalecert inspect "$OUT/$name" | grep -E 'layer|windows|prefix|suffix|full model|SIN gate'
}
run resnet20 "$SHARED/models/resnet20-cifar10.th" --arch resnet20-cifar --patch 5
run effnet-lite0 --arch efficientnet-lite0 --pretrained --patch 32 --calib "$SHARED/data/imagenet-sample/images"
