#!/usr/bin/env bash
# Issue 12's targets with default settings, on images nobody tuned or calibrated on (not CI):
#  - EfficientNet-Lite0 pretrained, --patch 32 --calib CALIB (64-128 images of the ImageNet sample),
#    everything else default; bench on TEST (other images of the sample) with the pixel baseline.
#  - ResNet-20: `scalecert tune` with defaults, one epoch on 5000 CIFAR-10 training images, exported
#    with defaults; bench on 1000 test images against the vanilla model's pixel baseline.
#  - int8 (build defaults) on both, and the confidence-threshold curve.
#   SHARED=../shared CALIB=dir TEST=dir [TEST_LABELS=labels.csv] benchmarks/defaults.sh
#   (the ImageNet runs in RESULTS.md: CALIB=runs/imagenet-calib TEST=runs/imagenet-test
#    TEST_LABELS=../shared/data/imagenet-sample/labels.csv, folders made by benchmarks/recovery.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
THRESHOLDS=0,0.5,0.8,0.95

if [ -n "${CALIB:-}" ]; then
  scalecert-export --arch efficientnet-lite0 --pretrained --patch 32 --calib "$CALIB" -o "$WORK/eff" --force
  scalecert build "$WORK/eff" --precision int8 --calib "$CALIB"
  scalecert bench "$WORK/eff" --data "$TEST" ${TEST_LABELS:+--labels "$TEST_LABELS"} --precision fp32,int8 --threshold $THRESHOLDS --baseline \
    --baseline-engine both --threads 2 -o "$OUT/defaults_effnet.json" --plot "$OUT/defaults_effnet.png"
  # the same-engine ratio, both sides in one process taking turns (bench runs baselines one after the other)
  python benchmarks/same_engine.py "$WORK/eff" --data "$TEST" --threads 2 --out "$OUT/same_engine_effnet.json"
fi

if [ ! -f "$WORK/r20-tuned.pt" ]; then
  scalecert tune "$SHARED/models/resnet20-cifar10.th" --arch resnet20-cifar --data "$SHARED/data/cifar10-train" \
    --patch 5 --epochs 1 --limit 5000 -o "$WORK/r20-tuned.pt"
fi
scalecert-export "$WORK/r20-tuned.pt" --arch resnet20-cifar -o "$WORK/r20" --force
scalecert build "$WORK/r20" --precision int8 --calib "$SHARED/data/cifar10-train"
scalecert bench "$WORK/r20" --data "$SHARED/data/cifar10-test" --limit 1000 --precision fp32,int8 \
  --threshold $THRESHOLDS --baseline --baseline-engine both --model "$SHARED/models/resnet20-cifar10.th" \
  --arch resnet20-cifar -o "$OUT/defaults_resnet20.json" --plot "$OUT/defaults_resnet20.png"
