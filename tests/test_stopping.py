"""A stopped run stops all of it: a stage past its time limit, Ctrl-C and SIGTERM each stop the stage with
everything it started, training writes a checkpoint first, the next run resumes; a second run on a busy
workspace is refused. Real `ddpm pipeline` processes, a real DVC project, the process table read from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_project, run, write_fashion_idx
from tests.test_pipeline import tiny_overrides

pytestmark = pytest.mark.slow

DDPM = str(Path(sys.executable).with_name("ddpm"))


def processes_in(folder: Path) -> list[str]:
    """Command lines of the live processes whose working directory is ``folder``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(os.readlink(f"/proc/{pid}/cwd")) == folder:
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone, or not ours
            continue
    return found


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text(errors="replace"):
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s:\n{path.read_text()[-3000:]}"
        time.sleep(0.5)


def checkpoint_steps(project: Path) -> list[int]:
    return sorted(int(p.name[5:14]) for p in (project / "checkpoints").rglob("step-*.safetensors"))


def project_mlflow(project: Path):
    """A client of the project's store and registry (named: an earlier test may have set MLflow's default)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def train_runs(project: Path) -> list:
    c = project_mlflow(project)
    return c.search_runs([e.experiment_id for e in c.search_experiments()])


def assert_stopped_cleanly(project: Path, log: Path, committed_loss: str, steps_before: list[int]) -> int:
    """Nothing of the run left running, the train run KILLED, a checkpoint at the step it stopped (not a
    periodic one), the committed loss curve and params back. Returns that step."""
    time.sleep(1)
    assert processes_in(project) == [], log.read_text()[-3000:]  # DVC, `ddpm train`, the temporary Prefect server
    steps = checkpoint_steps(project)
    assert len(steps) == len(steps_before) + 1 and steps[-1] > max(steps_before, default=0), (steps, steps_before)
    assert steps[-1] < STEPS and steps[-1] % STEPS != 0
    assert f"stopped at step {steps[-1]}; checkpoint " in log.read_text()  # the stage's own line, in the task log
    assert [r.info.status for r in train_runs(project)] == ["KILLED"]
    assert (project / "metrics" / "train_loss.csv").read_text() == committed_loss  # DVC had deleted it
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], project).stdout == ""
    from flows import workspace_lock

    with workspace_lock.hold(project):  # the lock went with the run
        pass
    return steps[-1]


# Checkpointed only at the end: every checkpoint before it is one a stop wrote. Far more steps than an 18 s
# limit allows (800 were done in 16 s on a quiet 2-core CPU, and the timeout then stopped at the end).
STEPS = 20_000


def test_a_timeout_sigint_and_sigterm_each_stop_the_whole_run_and_the_next_run_resumes(tmp_path, prefect_api_url):
    """Stopped three ways during training, each run resuming where the last stopped, in the same MLflow run.
    (A stopped run then run to the end, one run and one registered version: tests/test_operations.py, after a
    cancellation through the Prefect API.)"""
    project = make_project(tmp_path / "project")
    from flows.pipeline import apply_overrides_to_params

    apply_overrides_to_params(project / "params.yaml", tiny_overrides(write_fashion_idx(tmp_path / "fashion")) + [
        f"train.steps={STEPS}", f"train.checkpoint_every_steps={STEPS}", "train.log_every_steps=50",
        "train.mixed_precision=fp32", "evaluate.inception=false", "evaluate.compare_samplers=[]"])
    committed_loss = "step,loss,lr\n0,1.0,0.0\n"  # a loss curve from an earlier run, committed with the project
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics" / "train_loss.csv").write_text(committed_loss)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "tiny params"], project)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}

    def start(name: str, *args: str, server: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as out:
            return subprocess.Popen([DDPM, "pipeline", *args], cwd=project, stdout=out, stderr=subprocess.STDOUT,
                                    env={**env, **(server or {})}), log

    def last_line(log: Path) -> str:
        return log.read_text().strip().splitlines()[-1]

    # 1. a stage time limit (on the session's Prefect server); meanwhile a second run is refused at once
    first, log = start("timeout", "-S", "pipeline.train_timeout_s=18", server={"PREFECT_API_URL": prefect_api_url})
    try:
        wait_for(log, f"steps 0 -> {STEPS}", first, timeout_s=180)
        t0 = time.monotonic()
        second = subprocess.run([DDPM, "pipeline"], cwd=project, capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"ddpm pipeline: error: {project} is busy: flow run '"), last
        assert f"(PID {first.pid} on " in last and "One run at a time per workspace" in last, last
        assert time.monotonic() - t0 < 30 and "Starting temporary server" not in second.stderr
        assert first.wait(timeout=120) == 2, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert last_line(log) == (
        "ddpm pipeline: error: stage train failed (timed out, not retried): stopped after 18 s, the limit "
        "pipeline.train_timeout_s (raise it in params.yaml, or 0 for none)"), log.read_text()[-3000:]
    assert log.read_text().count("Running stage 'train'") == 1  # a timeout is not retried
    stopped = [assert_stopped_cleanly(project, log, committed_loss, [])]

    # 2. Ctrl-C (SIGINT), then 3. SIGTERM, each while the resumed training runs (on a temporary Prefect server)
    [run_id] = [r.info.run_id for r in train_runs(project)]
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        proc, log = start(sig.name)
        try:
            wait_for(log, f"steps {stopped[-1]} -> {STEPS}", proc, timeout_s=180)
            time.sleep(1)
            proc.send_signal(sig)
            assert proc.wait(timeout=60) == code, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
        assert last_line(log) == (
            f"ddpm pipeline: stopped by {sig.name}: during stage train; the next pipeline run resumes training "
            "from its newest checkpoint, in the same MLflow run"), log.read_text()[-3000:]
        text = log.read_text()
        assert f"Finished in state Cancelled('stopped by {sig.name}" in text  # the flow run
        assert f"MLflow: continuing run {run_id}" in text and f"at step {stopped[-1]}" in text  # resumed
        stopped.append(assert_stopped_cleanly(project, log, committed_loss, stopped))
