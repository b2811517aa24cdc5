"""Shared fixtures: tiny generated data, a temporary git + DVC project, one Prefect test server."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ddpm.idx import write_idx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What a user's checkout holds: code, pipeline definition, params, DVC config.
PROJECT_FILES = ("bin/ddpm", "ddpm", "flows", "params.yaml", "dvc.yaml", "prefect.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore",
                 ".gitignore", "pyproject.toml")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def make_fashion_like(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, size, size) uint8 whose class k (0..9) is a bright bar at a class-specific place,
    plus noise: easy for a classifier, not trivial for a generator."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, size, size), dtype=np.uint8)
    for i, k in enumerate(labels):
        if k < 5:
            r = 3 + 5 * k
            images[i, r : r + 3, 4:-4] = 220
        else:
            c = 3 + 5 * (k - 5)
            images[i, 4:-4, c : c + 3] = 220
    return images, labels


def write_fashion_idx(root: Path, n_train: int = 240, n_test: int = 80, gz: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = make_fashion_like(n, seed)
        write_idx(root / f"{split}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte{ext}", labels)
    return root


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    return write_fashion_idx(tmp_path / "fashion")


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def make_project(dest: Path) -> Path:
    """A fresh git repository holding a copy of this project's pipeline, as a user's clone would."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = PROJECT_ROOT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "config", "user.email", "tests@example.invalid"], dest)
    run(["git", "config", "user.name", "tests"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "project"], dest)
    return dest


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for tiny CPU ops: on a small shared CPU, oversubscribed threads make them
    10-50x slower, and a subprocess with one thread computes bitwise the same (SIGKILL test)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite) for the whole session."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def prefect_api_url(prefect_server) -> str:
    """The session's Prefect server, for `ddpm pipeline` subprocesses that need not test their own temporary
    server (PREFECT_API_URL in their environment: no server start of several seconds each)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url
