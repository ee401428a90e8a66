#!/usr/bin/env bash
# Several GPUs, part 2: the Llama-3-70B shape on 4 GPUs, TP 4 and TP 2 x PP 2.
source bench/device_env.sh
N=$(nvidia-smi -L | wc -l)
step() { echo "=== $1 ($(date +%T))"; }
d() { timeout 240 python3 bench/gpu_decode.py "$@" 2>&1 | grep "batch\|Error\|error" | grep -v replay | tail -4; }
step "70B TP $N (one-shot <= 64 KB, bursts of 8)"; d --preset llama-3-70b --tp $N --batches 1,64 --decode-burst 8 --one-shot-max-bytes 65536 --out "$OUT/multi_70b_tp${N}_oneshot.json"
step "70B TP $N (NCCL only, bursts of 8)"; d --preset llama-3-70b --tp $N --batches 1 --decode-burst 8 --out "$OUT/multi_70b_tp${N}.json"
step "70B TP 2 x PP 2"; d --preset llama-3-70b --tp 2 --pp 2 --batches 1,64 --out "$OUT/multi_70b_tp2pp2.json"
step "done part 2"
