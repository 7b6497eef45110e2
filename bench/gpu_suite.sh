#!/usr/bin/env bash
# Every GPU measurement in one command (issue 21; ../shared/gpu/README.md). From the project root:
#   bench/gpu_suite.sh              # on the GPU machine, random weights at full size, <= 8 minutes; JSON into $OUT
#   bench/gpu_suite.sh --cpu-try    # the same steps at tiny sizes on the CPU (tests/test_gpu_suite.py runs it in CI)
# Before sending: ../shared/gpu/wheels.sh  (diffusers into .whl/, installed here when missing).
# Steps (each bounded by `timeout`; a failed step is logged and the suite goes on; the exit status says whether
# every step succeeded; $OUT/suite.json lists them with the device):
#   1. emo: the live default sd15_live at 512x512 (4 guidance-free steps, TAESD) for 1, 4, 8 and 16 sessions:
#      aggregate fps, p50/p95 segment latency, first-frame latency, achieved TFLOP/s against the counted FLOPs,
#      peak memory; then one offline sd15 clip (40 guided steps, SD VAE).
#   2. echomimic: EchoMimic v1 acc weights live (6 steps, TAESD) for 1, 4, 8 and 16 sessions, then an offline
#      acc clip (render_video over 2 s, SD VAE).
#   3. musetalk: MuseTalk 1.5 live (the published networks' shapes, random weights; 5-frame segments, SD VAE
#      decode, whisper over the padded window per session and segment, the paste on the GPU) for 1, 8, 16 and 32
#      sessions, first-frame latency, then an offline clip (render_video over 4 s: MuseTalk's own file path).
#   Each of steps 1-3 also records `calibration`: the start-up timing serve / worker use for their default
#   capacity (emo_stream.streaming.capacity; live step seconds at batches 1, 2, 4 and the sessions they allow).
#   4. emo again with torch.compile (reduce-overhead: CUDA graphs, batch buckets) for 1 and 16 sessions, while
#      time is left.
# Time on one H100 by the FLOP count (bench/results/flops.json; warm-up 2 + 6 timed segments per session count)
# at an assumed 300 TFLOP/s achieved (30% of the bf16 dense peak): emo 1856 live frames x 3.6 + 2 offline clips
# of 12 frames x 103 = 9.2 PFLOP ~ 31 s; echomimic 1856 x 11.4 + 63 offline frames x 12.6 = 22 PFLOP ~ 74 s;
# musetalk 2280 live frames x 0.81 + 113 offline x 0.81 = 1.9 PFLOP ~ 7 s (small batches run far below 300:
# bounded by the step's time limit); plus ~30 s of loading per step. Each step is cut by its own limit
# (130 + 150 + 100 s) and the compiled step only runs in what is left of 470 s: at most 8 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_suite}
CPU_TRY=0
[ "${1:-}" = "--cpu-try" ] && CPU_TRY=1
if [ "$CPU_TRY" = 1 ]; then
  EMO_MODEL=tiny; EMO_OFFLINE=tiny; EMO_SIZE=64; ECHO_MODEL=tiny; ECHO_SIZE=128; MT_MODEL=tiny; MT_SIZE=128
  SESSIONS=1,2; MT_SESSIONS=1,2; SEGMENTS=1; WARMUP=0; BUDGET=2400
  EMO_LIMIT=600; ECHO_LIMIT=600; MT_LIMIT=600; EMO_TIMEOUT=900; ECHO_TIMEOUT=900; MT_TIMEOUT=900
else
  EMO_MODEL=sd15_live; EMO_OFFLINE=sd15; EMO_SIZE=512; ECHO_MODEL=acc; ECHO_SIZE=512; MT_MODEL=full; MT_SIZE=512
  SESSIONS=1,4,8,16; MT_SESSIONS=1,8,16,32; SEGMENTS=6; WARMUP=2; BUDGET=470
  EMO_LIMIT=100; ECHO_LIMIT=120; MT_LIMIT=70; EMO_TIMEOUT=130; ECHO_TIMEOUT=150; MT_TIMEOUT=100
fi
mkdir -p "$OUT"
start=$(date +%s)
if ! python3 -c "import diffusers" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "diffusers missing and no .whl/ (run ../shared/gpu/wheels.sh first)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "$OUT/nvidia-smi.csv") 2>/dev/null || true
steps_json=""
failed=0
run_step() {   # name, seconds, command...
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s) rc=0
  echo "[gpu_suite] $name (at most ${secs}s)"
  timeout "$secs" "$@" || rc=$?
  [ "$rc" = 0 ] || { echo "[gpu_suite] $name failed: $rc"; failed=1; }
  steps_json="$steps_json${steps_json:+,}{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}"
}
left() { echo $(( BUDGET - ($(date +%s) - start) )); }

run_step emo-live "$EMO_TIMEOUT" python3 bench/gpu_live.py --family emo --model "$EMO_MODEL" --size "$EMO_SIZE" \
  --sessions "$SESSIONS" --segments "$SEGMENTS" --warmup "$WARMUP" --offline-model "$EMO_OFFLINE" \
  --time-limit "$EMO_LIMIT" --out "$OUT" --tag eager
run_step echomimic-live "$ECHO_TIMEOUT" python3 bench/gpu_live.py --family echomimic --model "$ECHO_MODEL" \
  --size "$ECHO_SIZE" --sessions "$SESSIONS" --segments "$SEGMENTS" --warmup "$WARMUP" --offline-model "$ECHO_MODEL" \
  --time-limit "$ECHO_LIMIT" --out "$OUT" --tag eager
run_step musetalk-live "$MT_TIMEOUT" python3 bench/gpu_live.py --family musetalk --model "$MT_MODEL" --size "$MT_SIZE" \
  --sessions "$MT_SESSIONS" --segments "$SEGMENTS" --warmup "$WARMUP" --offline-model "$MT_MODEL" \
  --time-limit "$MT_LIMIT" --out "$OUT" --tag eager
if [ "$CPU_TRY" = 0 ] && [ "$(left)" -gt 90 ] && python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  run_step emo-compiled "$(left)" python3 bench/gpu_live.py --family emo --model "$EMO_MODEL" --size "$EMO_SIZE" \
    --sessions "1,16" --segments "$SEGMENTS" --compile reduce-overhead --time-limit $(( $(left) - 60 )) \
    --out "$OUT" --tag compiled
fi
device=$(python3 -c "import sys; sys.path.insert(0, 'bench'); from _common import device_name; import torch; \
print(device_name(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))" 2>/dev/null || echo unknown)
cat > "$OUT/suite.json" <<EOF
{"bench": "gpu_suite", "device": "$device", "cpu_try": $([ "$CPU_TRY" = 1 ] && echo true || echo false),
 "seconds": $(( $(date +%s) - start )), "steps": [$steps_json]}
EOF
ls -l "$OUT"
echo "[gpu_suite] done in $(( $(date +%s) - start )) s"
exit $failed
