#!/usr/bin/env bash
# The checks and measurements that need a GPU, as one run for a session lent one (the GPU table of issue 9):
# the CUDA tests (tests/test_cuda.py: GPU against CPU, bf16/fp16 training, sampling with CUDA graphs), then
# benchmarks/speed.py in float32, in bf16, and with torch.compile rows, each under a time limit: at most
# 9.5 minutes (one device call), most of it the compilation of the last step. The eager tables hold a
# channels_last and a cudnn.benchmark row for ours and diffusers': whether either should become a default of
# the ddpm commands on CUDA is for those rows to say.
#
# Before, on the development machine (the peers travel as wheels; the device's python3 already holds torch,
# accelerate, einops, safetensors, huggingface-hub and the rest):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     diffusers==0.42.1 importlib_metadata denoising-diffusion-pytorch==2.3.4 ema-pytorch pytorch-fid
# Then the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=590).
# What it prints comes back under $OUT (gpu.txt, tests.txt, speed_fp32.txt, speed_bf16.txt, speed_compile.txt).
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}  # the device's python3 holds a CUDA torch
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee "$OUT/gpu.txt"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_compiled.py 2>&1 \
  | grep -v '^DEBUG' | tail -40 | tee "$OUT/tests.txt"
# the paper's batch (128) for training; sampling at 256, as a FID run would. Eager tables first (about a
# minute each), the torch.compile rows last: their compilation takes minutes
ARGS=${ARGS:-"--train-batch 128 --sample-batch 256 --train-steps 10 --sample-steps 20 --reps 3"}
timeout 90 $PY benchmarks/speed.py $ARGS 2>&1 | grep -v '^W[0-9]' | tee "$OUT/speed_fp32.txt"
timeout 90 $PY benchmarks/speed.py $ARGS --bf16 2>&1 | grep -v '^W[0-9]' | tee "$OUT/speed_bf16.txt"
timeout 260 $PY benchmarks/speed.py $ARGS --compile --only ours,diffusers 2>&1 | grep -v '^W[0-9]' \
  | tee "$OUT/speed_compile.txt"
