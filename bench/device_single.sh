#!/usr/bin/env bash
# One GPU: check the GPU path against transformers, then time decode, the mesh and the baseline.
#   run on the device machine with carry [".whl", "trellis/v1"]; results land in $OUT
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, grpc, google.protobuf as pb; print('torch', torch.__version__, 'triton', triton.__version__, 'grpc', grpc.__version__, 'protobuf', pb.__version__)"
python3 -c "import ucxx; print('ucxx ok')" 2>&1 | tail -1
step() { echo "=== $1 ($(date +%T))"; }
step "GPU tests"
python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
step "8B decode sweep (engine)"
python3 bench/gpu_decode.py --preset llama-3-8b --batches ${BATCHES:-1,8,32,64,128} --out "$OUT/gpu_decode_8b_tp1.json" 2>&1 | tail -20
step "transformers baseline"
python3 bench/hf_baseline.py --preset llama-3-8b --batches 1,8,64 --out "$OUT/hf_8b.json" 2>&1 | tail -6
step "8B batch sweep (mesh)"
python3 bench/gpu_mesh.py --preset llama-3-8b --batches ${BATCHES:-1,8,32,64,128} --out "$OUT/gpu_mesh_8b_tp1.json" 2>&1 | tail -12
step "done"
