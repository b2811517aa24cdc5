"""benchmarks/quality_per_budget.py refuses what it cannot score in seconds, naming it, before its minutes of
Inception passes (and, with `--phases score` alone, before it prepares the data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "quality_per_budget.py"


def write_recipe(out: Path, name: str, n: int) -> None:
    (out / f"stats_{name}.json").write_text(json.dumps({"recipe": name}))
    np.savez(out / f"samples_{name}.npz", images=np.zeros((n, 1, 28, 28), np.uint8))


def score(out: Path, n: int, source: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--phases", "score", "--n", str(n), "--out", str(out),
                           "--source", str(source), "--workdir", str(out / "work")],
                          capture_output=True, text=True, timeout=120)


def test_scored_inputs_name_the_missing_or_short_file(tmp_path):
    from benchmarks.quality_per_budget import _scored_inputs

    write_recipe(tmp_path, "ours", 8)
    with pytest.raises(SystemExit, match=f"{tmp_path}/stats_course.json, {tmp_path}/samples_course.npz not found"):
        _scored_inputs(tmp_path, 8)
    write_recipe(tmp_path, "course", 5)
    with pytest.raises(SystemExit, match="samples_course.npz holds 5 samples, fewer than --n 8"):
        _scored_inputs(tmp_path, 8)
    inputs = _scored_inputs(tmp_path, 5)
    assert [(stats["recipe"], len(images)) for stats, images in inputs.values()] == [("ours", 5), ("course", 5)]


def test_score_alone_checks_its_inputs_before_the_data_and_names_a_missing_source(tmp_path):
    out, empty = tmp_path / "out", tmp_path / "no-fashion-mnist"
    out.mkdir()
    empty.mkdir()
    write_recipe(out, "ours", 4)
    short = score(out, 8, empty)  # both wrong: the inputs are named, the data never read
    assert short.returncode == 1
    assert short.stderr.strip().splitlines()[-1] == f"{out}/samples_ours.npz holds 4 samples, fewer than --n 8"
    write_recipe(out, "course", 4)
    missing = score(out, 4, empty)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    assert missing.stderr.strip().splitlines()[-1].startswith(
        f"--source: Fashion-MNIST idx files not found in {empty}: missing train-images-idx3-ubyte[.gz]")
