#!/usr/bin/env bash
# The tuning study of the shipped recipe (sweeps/fashion_tune.yaml) on the device machine: 20 recipes at the
# default CPU budget, 10 at a time on one GPU, in about 6 minutes on an H100. The machine has torch but no
# project environment and no network.
# Carries: .gpudata/fashion-mnist (the raw idx files) and .whl-qpb/ (pyyaml, tqdm, safetensors as wheels).
# Afterwards, here: python benchmarks/recipe_study.py sweeps/fashion_tune.yaml --report OUT/recipe_tune.csv \
#   --out benchmarks/results/recipe_tune_h100.csv
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/tune-gpu}
mkdir -p "$out"
export PIP_BREAK_SYSTEM_PACKAGES=1 PYTHONPATH=$PWD
python3 -m pip install -q --no-index --find-links .whl-qpb pyyaml tqdm safetensors 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_name.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu_name.txt"
timeout "${TUNE_TIMEOUT:-470}" python3 benchmarks/recipe_study.py sweeps/fashion_tune.yaml \
  --source .gpudata/fashion-mnist --workdir /tmp/tune --workers "${TUNE_WORKERS:-10}" \
  --deadline "${TUNE_DEADLINE:-300}" --out "$out/recipe_tune.csv" --grids "$out/grids.tar.gz" "$@" 2>&1 | tail -40
