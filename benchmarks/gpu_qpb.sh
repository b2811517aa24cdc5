#!/usr/bin/env bash
# The GPU row of benchmarks/quality_per_budget.py, for the device machine (torch but no project
# environment, no network, no Inception weights): train both recipes for 240 s each and sample
# N = 2,000 from each there; score the samples here afterwards with --phase score.
# Carries: .gpudata/fashion-mnist (the raw idx files) and .whl-qpb/ (diffusers and its pure-Python
# dependencies as wheels, from `make gpu-wheels` less numpy and pillow).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/qpb-gpu}
mkdir -p "$out"
export PIP_BREAK_SYSTEM_PACKAGES=1 PYTHONPATH=$PWD
python3 -m pip install -q --no-index --find-links .whl-qpb diffusers pyyaml tqdm safetensors 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_name.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$out/gpu_name.txt"
timeout "${QPB_TIMEOUT:-560}" python3 benchmarks/quality_per_budget.py --budget "${QPB_BUDGET:-240}" --n 2000 \
  --phases train sample --source .gpudata/fashion-mnist --out "$out" "$@" 2>&1 | grep -v '^train: *[0-9]*%' | tail -60
