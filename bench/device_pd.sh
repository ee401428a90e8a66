#!/usr/bin/env bash
# One GPU, P/D disaggregation: the GPU tests (the hand-off's CUDA path and the rest of the one-GPU
# suite), the hand-off's data path between two processes, then the P/D mesh against the colocated
# one (TTFT, decode inter-token latency while long prompts arrive). Results land in $OUT.
#   PART=tests|rest|handoff|mesh picks one part (each fits one 10-minute call); default: all.
source bench/device_env.sh
PART=${PART:-all}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step() { echo "=== $1 ($(date +%T))"; }
run() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $? ($name)"
  grep -E "passed|failed|Error|error:|wrote|TTFT|ITL|handoff|bytes_per_s|ratio|agree|FAILED" "$OUT/$name.log" | tail -24
}
if [ "$PART" = all ] || [ "$PART" = tests ]; then
  step "P/D GPU tests"
  run gpu_tests_pd 300 python3 -m pytest -q -s -m gpu tests/gpu/test_pd_gpu.py tests/gpu/test_kv_store_gpu.py -p no:cacheprovider
fi
if [ "$PART" = all ] || [ "$PART" = rest ]; then
  step "the rest of the one-GPU suite"
  run gpu_tests_rest 280 python3 -m pytest -q -m gpu tests/gpu -k "not split and not one_shot and not closes" \
    --deselect tests/gpu/test_pd_gpu.py --deselect tests/gpu/test_kv_store_gpu.py -p no:cacheprovider
fi
if [ "$PART" = all ] || [ "$PART" = handoff ]; then
  step "hand-off data path, 4k-token 8B prompt, two processes"
  run pd_handoff 120 python3 bench/pd_handoff.py --device cuda --out "$OUT/pd_handoff_8b_1xh200.json"
fi
if [ "$PART" = all ] || [ "$PART" = mesh ]; then
  step "P/D mesh vs colocated, 8B, one GPU"
  (cd bench && run pd_mesh 540 python3 pd_mesh.py --preset llama-3-8b --out "$OUT/pd_mesh_8b_1xh200.json")
fi
if [ "$PART" = timings ]; then  # where P/D's TTFT goes: the router's per-request hand-off timings
  step "P/D TTFT with the router's hand-off timings (debug logs)"
  (cd bench && TRELLIS_TRACE=console TRELLIS_LOG_LEVEL=DEBUG run pd_timings 300 python3 pd_mesh.py \
    --preset llama-3-8b --kinds pd --lengths 4096 --reps 5 --arrivals 0 --streams 1 --decode-len 16 \
    --out "$OUT/pd_timings.json")
  grep -c '"name"' "$OUT/pd_timings.log"
fi
