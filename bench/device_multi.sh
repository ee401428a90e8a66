#!/usr/bin/env bash
# Several GPUs, part 1: multi-GPU correctness, all-reduce, UCX handoff, TP scaling of the 8B shape.
#   run on the device machine with carry [".whl", "trellis/v1"]; results land in $OUT
source bench/device_env.sh
N=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1; nvidia-smi topo -m | head -6
step() { echo "=== $1 ($(date +%T))"; }
step "GPU tests (multi-GPU)"
timeout 200 python3 -m pytest -q -m gpu tests/gpu -k "split or one_shot" -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests_multi.log" | tail -4
for n in 2 $N; do
  step "all-reduce on $n GPUs"
  timeout 90 python3 -m torch.distributed.run --nproc-per-node $n bench/allreduce.py --out "$OUT/allreduce_${n}gpu.json" 2>&1 | grep "bytes=" | tail -8
done
step "UCX handoff GPU0 -> GPU1"
UCXPY_PROGRESS_MODE=polling timeout 60 python3 bench/ucx_handoff.py --src-gpu 0 --dst-gpu 1 --out "$OUT/ucx_handoff_gpu.json" 2>&1 | tail -6
d() { timeout 150 python3 bench/gpu_decode.py --decode-burst 8 "$@" 2>&1 | grep "batch" | grep -v replay; }
step "8B TP 1"; d --preset llama-3-8b --tp 1 --batches 1,64 --out "$OUT/multi_8b_tp1.json"
for tp in 2 $N; do
  step "8B TP $tp (one-shot <= 64 KB)"; d --preset llama-3-8b --tp $tp --batches 1,64 --one-shot-max-bytes 65536 --out "$OUT/multi_8b_tp${tp}_oneshot.json"
  step "8B TP $tp (NCCL only)"; d --preset llama-3-8b --tp $tp --batches 1 --out "$OUT/multi_8b_tp${tp}.json"
done
step "done part 1"
