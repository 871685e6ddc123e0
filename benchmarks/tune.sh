#!/usr/bin/env bash
# Tuning benchmark (not CI, ~30 min of a 2-core CPU): fine-tune the pretrained ResNet-20 for a 5x5
# patch with `scalecert tune`, then bench the tuned model against the pixel-masking baseline of
# the vanilla model (and of the tuned model), at several pruning rates, strides and precisions.
#   SHARED=../shared benchmarks/tune.sh          (TUNED=ckpt.pt skips the training)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
TUNED=${TUNED:-$WORK/r20-tuned.pt}
if [ ! -f "$TUNED" ]; then
  scalecert tune "$SHARED/models/resnet20-cifar10.th" --arch resnet20-cifar --data "$SHARED/data/cifar10-train" \
    --patch 5 --stride 5 --prune-rate 0.7 --epochs 6 --lr 0.02 --occlusions 2 --seed 0 -o "$TUNED"
fi
TEST=(--data "$SHARED/data/cifar10-test" --limit 1000)
VANILLA=(--model "$SHARED/models/resnet20-cifar10.th" --arch resnet20-cifar)

# SIN: the rate it was tuned at (0.7) and lower ones, same tuned weights
scalecert-export "$TUNED" --arch resnet20-cifar -o "$WORK/tuned" --force --quiet
scalecert bench "$WORK/tuned" --force "${TEST[@]}" --prune-rate 0,0.3,0.5,0.7 --stride 3,5 -o "$OUT/tuned_sin.json"

# speed: no gate, fp32 and int8, strides 3..10, against the vanilla model's baseline and the tuned model's
scalecert-export "$TUNED" --arch resnet20-cifar --prune-rate 0 -o "$WORK/tuned-dense" --force --quiet
scalecert build "$WORK/tuned-dense" --precision int8 --calib "$SHARED/data/cifar10-train" --calib-limit 128 --quiet
scalecert bench "$WORK/tuned-dense" --force "${TEST[@]}" --precision fp32,int8 --stride 3,5,8,10 \
  --baseline --baseline-engine both "${VANILLA[@]}" -o "$OUT/tuned_speed.json"
scalecert bench "$WORK/tuned-dense" --force "${TEST[@]}" --stride 5 --baseline --baseline-engine both \
  -o "$OUT/tuned_own_baseline.json"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for name, title, base in (("tuned_sin", "ResNet-20 tuned (scalecert tune, rate 0.7): SIN pruning rates", ""),
                          ("tuned_speed", "ResNet-20 tuned, no gate, fp32/int8", " (vanilla model)"),
                          ("tuned_own_baseline", "ResNet-20 tuned, baseline on the tuned weights", " (tuned model)")):
    path = f"{out}/{name}.json"
    report = json.load(open(path))
    report["title"], report["baseline_model"] = title, base
    json.dump(report, open(path, "w"), indent=2)
PY
echo "reports in $OUT/tuned_*.json"
