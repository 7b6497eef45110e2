#!/usr/bin/env bash
# The owed GPU measurement of issue 12, in one script (../shared/gpu/README.md). From the project root:
#   bench/gpu_suite.sh                                   # on the GPU machine; results in $OUT
#   MODEL=tiny OFFLINE_MODEL=tiny SIZE=32 SESSIONS=1,2 SEGMENTS=1 WARMUP=1 OUT=/tmp/gpu_try bench/gpu_suite.sh  # CPU try
# Before sending: ../shared/gpu/wheels.sh  (diffusers into .whl/, which this script installs when missing).
# Records, at 512x512 with random weights: the live default (sd15_live: 4 guidance-free steps, TAESD) for 1, 4,
# 8 and 16 sessions (aggregate fps, p50/p95 segment latency, first-frame latency, achieved TFLOP/s against the
# counted FLOPs, peak memory), one offline sd15 clip (40 guided steps, SD VAE), then the same live run with
# torch.compile (reduce-overhead: CUDA graphs) for 1 and 16 sessions while time is left. About 6-8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_suite}
MODEL=${MODEL:-sd15_live}
OFFLINE_MODEL=${OFFLINE_MODEL:-sd15}
SIZE=${SIZE:-512}
SESSIONS=${SESSIONS:-1,4,8,16}
SEGMENTS=${SEGMENTS:-6}
WARMUP=${WARMUP:-2}
mkdir -p "$OUT"
start=$(date +%s)
if ! python3 -c "import diffusers" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "diffusers missing and no .whl/ (run ../shared/gpu/wheels.sh first)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "$OUT/nvidia-smi.csv") 2>/dev/null || true
echo "[gpu_suite] eager: $MODEL at ${SIZE}px, sessions $SESSIONS, offline $OFFLINE_MODEL"
timeout 330 python3 bench/gpu_live.py --model "$MODEL" --size "$SIZE" --sessions "$SESSIONS" --segments "$SEGMENTS" \
  --warmup "$WARMUP" --offline-model "$OFFLINE_MODEL" --time-limit 240 --out "$OUT" --tag eager || echo "[gpu_suite] eager run failed: $?"
left=$(( 450 - ($(date +%s) - start) ))
if [ "$left" -gt 90 ] && python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "[gpu_suite] torch.compile reduce-overhead, ${left}s left"
  timeout "$left" python3 bench/gpu_live.py --model "$MODEL" --size "$SIZE" --sessions "1,16" --segments "$SEGMENTS" \
    --compile reduce-overhead --time-limit $(( left - 60 )) --out "$OUT" --tag compiled || echo "[gpu_suite] compiled run failed: $?"
fi
ls -l "$OUT"
echo "[gpu_suite] done in $(( $(date +%s) - start )) s"
