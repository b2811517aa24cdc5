"""A stage past its time limit is stopped with everything it started; a second run on a busy workspace is
refused. Real `ddpm pipeline` processes, a real DVC project, the process table read from /proc."""

from __future__ import annotations

import os
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


def test_a_stage_timeout_stops_the_stage_and_a_busy_workspace_is_refused(tmp_path):
    project = make_project(tmp_path / "project")
    from flows.pipeline import apply_overrides_to_params

    apply_overrides_to_params(project / "params.yaml", tiny_overrides(write_fashion_idx(tmp_path / "fashion")))
    run(["git", "commit", "-qam", "tiny params"], project)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen([DDPM, "pipeline", "-S", "train.steps=1000000", "-S", "pipeline.train_timeout_s=20"],
                                 cwd=project, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(log, "Running stage 'train'", first, timeout_s=180)

        # a second run while the first trains: refused at once, naming the first
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
    text = log.read_text()
    assert text.strip().splitlines()[-1] == (
        "ddpm pipeline: error: stage train failed (timed out, not retried): stopped after 20 s, the limit "
        "pipeline.train_timeout_s (raise it in params.yaml, or 0 for none)"), text[-3000:]
    assert text.count("Running stage 'train'") == 1  # a timeout is not retried
    time.sleep(1)
    assert processes_in(project) == []  # DVC, the shell and `ddpm train` all stopped with it
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], project).stdout == ""  # overrides undone
    # the lock went with the first run: the workspace is free again
    from flows import workspace_lock

    with workspace_lock.hold(project):
        pass
