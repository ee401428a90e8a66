#!/usr/bin/env bash
# Several GPUs (4): multi-GPU correctness and teardown, all-reduce, UCX handoff, TP scaling of the
# 8B shape, and the 70B shape as TP 4 and as TP 2 x PP 2 (1 and 2 micro-batches in flight).
#   run on the device machine with carry [".whl", "trellis/v1"]; results land in $OUT
#   PART=tests|comm|tp|70b picks one part (each fits one 10-minute call); default: all of them.
source bench/device_env.sh
PART=${PART:-all}
N=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
python3 -c "import torch; print('torch', torch.__version__, 'one_shot_all_reduce_copy:', hasattr(torch.ops.symm_mem, 'one_shot_all_reduce_copy'))"
step() { echo "=== $1 ($(date +%T))"; }
# run NAME TIMEOUT CMD...: the whole output to $OUT/NAME.log, its summary lines here
run() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $? ($name)"
  grep -E "batch|passed|failed|Error|error:|identical|took|rel diff|bytes=|bubble|p50" "$OUT/$name.log" | grep -v replay | tail -16
}
want() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
if want tests; then
  step "GPU tests (multi-GPU)"
  TRELLIS_HANG_DUMP_S=120 run gpu_tests_multi 330 python3 -m pytest -q -s -m gpu tests/gpu \
    -k "split or one_shot or closes" -p no:cacheprovider
fi
if want comm; then
  for n in 2 $N; do
    step "all-reduce on $n GPUs"
    run allreduce_${n}gpu 100 python3 -m torch.distributed.run --nproc-per-node $n bench/allreduce.py --out "$OUT/allreduce_${n}gpu.json"
  done
  step "transformers generate on GPU 0 (the baseline, median of 3)"
  CUDA_VISIBLE_DEVICES=0 run hf_baseline_8b 200 python3 bench/hf_baseline.py --preset llama-3-8b --batches 1,8,64 \
    --out "$OUT/hf_baseline_8b.json"
  step "UCX handoff GPU0 -> GPU1"
  UCXPY_PROGRESS_MODE=polling run ucx_handoff 60 python3 bench/ucx_handoff.py --src-gpu 0 --dst-gpu 1 --out "$OUT/ucx_handoff_gpu.json"
fi
if want tp; then
  for tp in 1 2 $N; do
    step "8B TP $tp, bursts of 8, one-shot all-reduce <= 64 KB"
    run decode_8b_tp${tp}_burst8 170 python3 bench/gpu_decode.py --preset llama-3-8b --tp $tp --batches 1,64 \
      --decode-burst 8 --one-shot-max-bytes 65536 --out "$OUT/decode_8b_tp${tp}_burst8.json"
  done
  step "8B TP 2, NCCL only"
  run decode_8b_tp2_nccl 150 python3 bench/gpu_decode.py --preset llama-3-8b --tp 2 --batches 1 --decode-burst 8 \
    --out "$OUT/decode_8b_tp2_burst8_nccl.json"
fi
if want 70b; then
  step "70B TP $N, bursts of 8, one-shot <= 64 KB"
  run decode_70b_tp${N} 240 python3 bench/gpu_decode.py --preset llama-3-70b --tp $N --batches 1,64 --decode-burst 8 \
    --one-shot-max-bytes 65536 --out "$OUT/decode_70b_tp${N}_burst8.json"
  for inflight in 2 1; do
    step "70B TP 2 x PP 2, $inflight micro-batches in flight"
    run decode_70b_tp2pp2_inflight$inflight 240 python3 bench/gpu_decode.py --preset llama-3-70b --tp 2 --pp 2 \
      --batches 1,64 --one-shot-max-bytes 65536 --max-in-flight $inflight --out "$OUT/decode_70b_tp2pp2_inflight$inflight.json"
  done
fi
step "done"
