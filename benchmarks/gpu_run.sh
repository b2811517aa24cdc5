#!/usr/bin/env bash
# The GPU part of the training-speed work in one run (about 6 minutes on an H100/H200), for the device
# machine, which has torch but not this project's other dependencies:
#   1. benchmarks/gpu_check.py: bf16 training, bitwise resume on CUDA, train.deterministic, a CUDA checkpoint
#      resumed on the CPU, a real out-of-memory error, the samplers on CUDA vs CPU;
#   2. benchmarks/train_speed.py --device cuda --compile: the real loop vs the course's diffusers loop,
#      batch 128, both configurations, fp32 / auto / auto + compile.
# Prepare the wheels it installs first, on a machine with the registry: `make gpu-wheels` (fills .whl/).
# Results are written under $OUT (the device tool's output folder) or benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PIP_BREAK_SYSTEM_PACKAGES=1 PYTHONPATH=$PWD
python3 -m pip install -q --no-index --find-links .whl pyyaml tqdm safetensors psutil diffusers 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_name.txt"
timeout 150 python3 benchmarks/gpu_check.py 2>&1 | grep -v '^train:' | tee "$out/gpu_check.md"
timeout 330 python3 benchmarks/train_speed.py --device cuda --compile --repeats 5 --warmup 2 \
  2>"$out/train_speed_gpu.log" | tee "$out/train_speed_gpu.md"
