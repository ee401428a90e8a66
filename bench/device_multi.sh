#!/usr/bin/env bash
# Several GPUs: all-reduce, UCX handoff, TP scaling on the 8B shape, the 70B shape on 4 GPUs.
#   run on the device machine with carry [".whl", "trellis/v1"]; results land in $OUT
source bench/device_env.sh
N=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv; nvidia-smi topo -m | head -8
step() { echo "=== $1 ($(date +%T))"; }
step "GPU tests (multi-GPU splits)"
python3 -m pytest -q -m gpu tests/gpu -k "split" -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests_multi.log" | tail -8
for n in 2 $N; do
  step "all-reduce on $n GPUs"
  python3 -m torch.distributed.run --nproc-per-node $n bench/allreduce.py --out "$OUT/allreduce_${n}gpu.json" 2>&1 | grep -v Warning | tail -9
done
step "UCX handoff GPU0 -> GPU1"
UCXPY_PROGRESS_MODE=polling python3 bench/ucx_handoff.py --src-gpu 0 --dst-gpu 1 --out "$OUT/ucx_handoff_gpu.json" 2>&1 | tail -7
for tp in 1 2 $N; do
  step "8B TP $tp"
  python3 bench/gpu_decode.py --preset llama-3-8b --tp $tp --batches 1,64 --out "$OUT/gpu_decode_8b_tp$tp.json" ${ONESHOT:+--one-shot-max-bytes $ONESHOT} 2>&1 | tail -3
done
step "70B TP $N"
python3 bench/gpu_decode.py --preset llama-3-70b --tp $N --batches 1,64 --out "$OUT/gpu_decode_70b_tp$N.json" ${ONESHOT:+--one-shot-max-bytes $ONESHOT} 2>&1 | tail -3
step "70B TP 2 x PP 2"
python3 bench/gpu_decode.py --preset llama-3-70b --tp 2 --pp 2 --batches 1,64 --out "$OUT/gpu_decode_70b_tp2pp2.json" 2>&1 | tail -3
step "done"
