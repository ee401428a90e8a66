#!/usr/bin/env bash
# One GPU: check the GPU path against transformers, then time decode, the baseline and the mesh.
#   run on the device machine with carry [".whl", "trellis/v1"]; results land in $OUT
#   PART=tests|decode|rest|prefill picks one part (each fits one 10-minute call); default: all of them.
source bench/device_env.sh
PART=${PART:-all}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c "import torch, triton, grpc, google.protobuf as pb; print('torch', torch.__version__, 'triton', triton.__version__, 'grpc', grpc.__version__, 'protobuf', pb.__version__)"
step() { echo "=== $1 ($(date +%T))"; }
# run NAME TIMEOUT CMD...: the whole output to $OUT/NAME.log, its summary lines here
run() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $? ($name)"
  grep -E "batch|passed|failed|Error|error:|wrote|copy|steps|us/step|total|TTFT|TFLOP" "$OUT/$name.log" | grep -v "^\s*$" | tail -14
}
if [ "$PART" = all ] || [ "$PART" = tests ]; then
  step "GPU tests (one GPU)"
  run gpu_tests_1gpu 240 python3 -m pytest -q -s -m gpu tests/gpu -k "not split and not one_shot and not closes" -p no:cacheprovider
fi
if [ "$PART" = all ] || [ "$PART" = decode ]; then
  for burst in 8 1 16; do
    batches=1,8,32,64,128; [ $burst = 16 ] && batches=1,64
    step "8B decode, decode_burst $burst"
    run decode_8b_tp1_burst$burst 200 python3 bench/gpu_decode.py --preset llama-3-8b --batches $batches \
      --decode-burst $burst --out "$OUT/decode_8b_tp1_burst$burst.json"
  done
fi
if [ "$PART" = all ] || [ "$PART" = rest ]; then
  step "transformers generate, same shape"
  run hf_baseline_8b 240 python3 bench/hf_baseline.py --preset llama-3-8b --batches 1,8,64 --out "$OUT/hf_baseline_8b.json"
  step "the mesh: router + stage worker, gRPC streams"
  run mesh_8b_tp1 200 python3 bench/gpu_mesh.py --preset llama-3-8b --batches 1,8,32,64,128 --out "$OUT/mesh_8b_tp1.json"
  step "kernel profile, batch 1 and 64"
  run profile_8b 150 python3 bench/profile_decode.py --preset llama-3-8b --batches 1,64
fi
if [ "$PART" = all ] || [ "$PART" = prefill ]; then
  step "prefill attention: the SDPA kernels A/B, 2k and 8k"
  run sdpa_backends 120 python3 bench/sdpa_backends.py --lengths 2048,8192 --out "$OUT/sdpa_backends.json"
  step "prefill attention against the reference and transformers"
  run gpu_tests_prefill 240 python3 -m pytest -q -s -m gpu tests/gpu/test_prefill_gpu.py -p no:cacheprovider
  step "8B prefill, old vs new attention, against the FLOP limit"
  run prefill_8b 300 python3 bench/gpu_prefill.py --preset llama-3-8b --lengths 512,2048,8192,8000,32768 \
    --out "$OUT/prefill_8b.json" --plot "$OUT/prefill_8b.png"
fi
step "done"
