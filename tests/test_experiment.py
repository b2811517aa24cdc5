"""flows/experiment.py on a real git + DVC repository: save a run as an experiment, put the workspace back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import experiment

DVC = [sys.executable, "-m", "dvc"]


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture
def repo(tmp_path):
    """One stage: params.yaml's `a` copied into a cached output and an uncached metric."""
    sh(["git", "init", "-q", "-b", "main"], tmp_path)
    sh(["git", "config", "user.email", "tests@example.invalid"], tmp_path)
    sh(["git", "config", "user.name", "tests"], tmp_path)
    sh(DVC + ["init", "-q"], tmp_path)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "run.py").write_text("import json, yaml\na = yaml.safe_load(open('params.yaml'))['a']\n"
                                     "open('out.txt', 'w').write(str(a))\njson.dump({'m': a * 10}, open('m.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  s:\n    cmd: {sys.executable} run.py\n    deps: [run.py]\n"
                                       "    params: [a]\n    outs: [out.txt]\n    metrics: [{m.json: {cache: false}}]\n")
    sh(DVC + ["repro", "-q"], tmp_path)
    sh(["git", "add", "-A"], tmp_path)
    sh(["git", "commit", "-qm", "a = 1"], tmp_path)
    return tmp_path


def test_save_records_the_run_and_restore_puts_the_workspace_back(repo):
    before = experiment.snapshot(repo)
    (repo / "params.yaml").write_text("a: 2\n")
    sh(DVC + ["repro", "-q"], repo)
    name = experiment.save(repo, experiment.experiment_name("brave otter"))
    assert name.startswith("brave-otter-")
    assert experiment.restore(repo, before) == []
    assert (repo / "params.yaml").read_text() == "a: 1\n" and (repo / "out.txt").read_text() == "1"
    assert json.loads((repo / "m.json").read_text()) == {"m": 10}
    assert sh(["git", "status", "--porcelain"], repo) == "" and "up to date" in sh(DVC + ["status"], repo)
    sh(DVC + ["exp", "apply", name], repo)  # the experiment brings a = 2 back, with its output and metric
    assert (repo / "params.yaml").read_text() == "a: 2\n" and (repo / "out.txt").read_text() == "2"
    assert json.loads((repo / "m.json").read_text()) == {"m": 20}


def test_save_without_a_git_identity_signs_as_the_pipeline(repo, tmp_path_factory):
    sh(["git", "config", "--unset", "user.email"], repo)
    sh(["git", "config", "--unset", "user.name"], repo)
    (repo / "params.yaml").write_text("a: 3\n")
    sh(DVC + ["repro", "-q"], repo)
    home = tmp_path_factory.mktemp("home")  # no ~/.gitconfig
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {"HOME": str(home)}
    code = "import sys; from pathlib import Path; from flows import experiment; print(experiment.save(Path('.'), 'x'))"
    sh([sys.executable, "-c", code], repo, env=env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    ref = sh(["git", "for-each-ref", "--format=%(refname) %(authorname)", "refs/exps"], repo)
    assert any(line.endswith("/x ddpm pipeline") for line in ref.splitlines()), ref


def test_a_failed_save_names_dvcs_error(repo):
    (repo / "params.yaml").write_text("a: 4\n")
    sh(DVC + ["repro", "-q"], repo)
    experiment.save(repo, "twice")
    with pytest.raises(RuntimeError, match=r"dvc exp save -n twice failed: ERROR: .*twice"):
        experiment.save(repo, "twice")


def test_the_outputs_of_a_stage_that_did_not_finish_come_back(repo):
    """DVC deletes a stage's outputs before running it; after a failed or stopped run the cached one comes
    back from the cache (a half-written file replaced) and the committed uncached one from the snapshot."""
    before = experiment.snapshot(repo)
    (repo / "out.txt").write_text("half written")
    (repo / "m.json").unlink()
    restored, problems = experiment.put_back_outputs(repo, "s", before)
    assert problems == [] and sorted(restored) == ["m.json", "out.txt"], (restored, problems)
    assert (repo / "out.txt").read_text() == "1" and json.loads((repo / "m.json").read_text()) == {"m": 10}
    assert sh(["git", "status", "--porcelain"], repo) == ""
