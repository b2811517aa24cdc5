# The two commands: `make run` (set up, then the whole pipeline on Fashion-MNIST)
# and `make test` (set up, then the test suite). Both work on a fresh Debian-like
# machine with Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without an NVIDIA GPU, the CPU build of torch (a few hundred MB instead of several GB).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.4,<2.15' || echo 'torch==2.13.0')
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup data run test postgresql clean prefect-server mlflow-ui mlflow-server deploy worker sweep bench-train gpu-wheels

# --no-compile: Python compiles what a command imports on first use (into .venv), instead of every module of
# every package at install time (about a minute on the 2-core CPU).
$(BIN)/ddpm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install --no-compile "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --no-compile -e .
	touch $@

# Only the tests need the dev extra (pytest, moto, PostgreSQL's driver, MLflow's auth app, DVC's S3 plugin):
# `make run` does not wait for it.
$(VENV)/.dev-extra: $(BIN)/ddpm
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

setup: $(BIN)/ddpm

data:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte ]; then \
	  echo "Fashion-MNIST found in $(FASHION_MNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	  sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing from $(FASHION_MNIST_DIR) and apt-get is not available."; \
	  echo "Download the four *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist (data/fashion)"; \
	  echo "into a folder and run: make run FASHION_MNIST_DIR=/that/folder"; \
	  exit 1; \
	fi

run: setup data
	$(BIN)/ddpm pipeline $(if $(filter-out /usr/share/datasets/fashion-mnist,$(FASHION_MNIST_DIR)),-S prepare.source_path=$(FASHION_MNIST_DIR))

# Two pytest workers (pytest-xdist), a test file each at a time (module fixtures start once): most of the slow
# tests wait on servers, Chromium and subprocesses, so two share the 2-core CPU well (README: what it costs).
TEST_WORKERS ?= 2
test: $(VENV)/.dev-extra postgresql
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Debian's PostgreSQL: `ddpm mlflow-server` starts one, and so do the scale-out tests.
postgresql:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	  sudo apt-get update -qq && sudo apt-get install -y -qq postgresql >/dev/null; \
	else \
	  echo "PostgreSQL is not installed and apt-get is not available: install PostgreSQL (initdb, pg_ctl) for"; \
	  echo "make mlflow-server and the scale-out tests"; \
	fi

# A recipe study (README, "Recipe studies"): each recipe of the sweep file is one DVC experiment.
SWEEP ?= sweeps/fashion_cpu.yaml
sweep: setup data
	$(BIN)/ddpm sweep $(SWEEP)

# Operations (see README, "Operations"): a local Prefect server for schedules, and the MLflow UI.
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
PREFECT_HOST ?= 127.0.0.1
# With PREFECT_SERVER_API_AUTH_STRING=user:password exported, clients need PREFECT_API_AUTH_STRING (docs/scale-out.md).
prefect-server: setup
	$(BIN)/ddpm prefect-server --host $(PREFECT_HOST) --port $(PREFECT_PORT)

mlflow-ui: setup
	$(BIN)/ddpm ui --port $(MLFLOW_PORT)

# Scaled out (docs/scale-out.md): a shared MLflow server on PostgreSQL (Debian's postgresql package), the pipeline
# deployed to the Prefect work pool `ddpm` at this commit, and a worker on it (one flow run at a time).
PG_PORT ?= 5433
MLFLOW_HOST ?= 127.0.0.1
mlflow-server: setup postgresql
	$(BIN)/python -m pip install -q -e '.[server,s3]'
	$(BIN)/ddpm mlflow-server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --pg-port $(PG_PORT) \
	  $(if $(ARTIFACTS),--artifacts-destination $(ARTIFACTS)) $(if $(ALLOWED_HOSTS),--allowed-hosts $(ALLOWED_HOSTS)) \
	  $(if $(MLFLOW_AUTH),--auth) $(if $(USERS),--auth --users $(USERS))

deploy: setup
	$(BIN)/ddpm deploy

worker: setup
	$(BIN)/python -m pip install -q -e '.[s3]'
	$(BIN)/ddpm worker $(if $(WORKER_NAME),--name $(WORKER_NAME))

# Every ignored path the pipeline and the ddpm commands create (README, "Tracking store"): stage outputs, checkpoints,
# downloaded models, the MLflow store and its artifacts (mlruns/: an experiment made by an older version), the DVC
# cache and temp folder. Not .venv, not tracked files (dvc.lock, metrics/), not the DVC remote outside the checkout.
clean:
	rm -rf data/prepared data/prepared.tmp data/reference data/reference.tmp models samples checkpoints .cache \
	  mlflow.db mlartifacts mlruns .dvc/cache .dvc/tmp

# Benchmarks (not part of the two commands). diffusers is the anchor, installed only here.
bench-train: setup
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/train_speed.py

# Wheels for benchmarks/gpu_run.sh on a GPU machine that has torch (Python 3.12, x86-64) but no registry.
gpu-wheels:
	$(PYTHON) -m pip download -q -d .whl --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  pyyaml tqdm safetensors psutil diffusers
