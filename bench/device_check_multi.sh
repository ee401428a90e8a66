#!/usr/bin/env bash
# Several GPUs, quick check: multi-GPU correctness and engine teardown, then the 8B shape at TP 4.
#   run on the device machine with carry [".whl", "trellis/v1"]; results land in $OUT
source bench/device_env.sh
N=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
python3 -c "import torch; print('torch', torch.__version__, 'one_shot_all_reduce_copy:', hasattr(torch.ops.symm_mem, 'one_shot_all_reduce_copy'))"
step() { echo "=== $1 ($(date +%T))"; }
step "GPU tests (multi-GPU)"
TRELLIS_HANG_DUMP_S=120 timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -s -m gpu tests/gpu \
  -k "split or one_shot or closes" -p no:cacheprovider > "$OUT/gpu_tests_multi.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|error|tokens identical|closed in|took|rel diff|Error" "$OUT/gpu_tests_multi.log" | tail -30
if [ "$N" -ge 4 ]; then
  step "8B TP 4, bursts of 8, one-shot <= 64 KB"
  timeout 170 python3 bench/gpu_decode.py --preset llama-3-8b --tp 4 --batches 1,64 --decode-burst 8 \
    --one-shot-max-bytes 65536 --out "$OUT/multi_8b_tp4_oneshot.json" > "$OUT/multi_8b_tp4.log" 2>&1
  echo "exit $?"; grep -E "batch" "$OUT/multi_8b_tp4.log" | grep -v replay | tail -4
fi
step "done"
