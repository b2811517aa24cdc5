"""One pipeline run per workspace, whoever starts it: `ddpm pipeline`, a `ddpm serve` runner, a Prefect worker.

A Prefect concurrency limit guards the runs one server knows about; a manual `ddpm pipeline` runs on its own
temporary server, so the lock lives in the workspace itself: an exclusive ``flock`` on
``.dvc/tmp/ddpm-pipeline.lock``, taken before anything is written and released by the kernel when the holder
exits, however it exits (a SIGKILL leaves no stale lock). The file names the holder, so a refused run can say
which run is going on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = Path(".dvc") / "tmp" / "ddpm-pipeline.lock"
_held: dict[Path, list[int]] = {}  # root -> [descriptor, depth]: the CLI and then its flow both take it


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds this workspace."""


def _describe(info: dict) -> str:
    who = f"flow run {info['flow_run']!r}" if info.get("flow_run") else "a pipeline run"
    return (f"{who} (PID {info.get('pid')} on {info.get('host')}, started {info.get('started')}, "
            f"`{info.get('command')}`)")


@contextlib.contextmanager
def hold(root: str | Path, flow_run: str | None = None):
    """Hold the workspace for the duration of the block; raises :class:`WorkspaceBusy` at once if another
    process holds it. Re-entrant within one process."""
    root = Path(root).resolve()
    if root in _held:
        fd = _held[root][0]
        if flow_run:  # the CLI took it; its flow run now has a name to show
            _write(fd, flow_run)
        _held[root][1] += 1
        try:
            yield
        finally:
            _held[root][1] -= 1
        return
    if not (root / ".dvc").is_dir():
        raise FileNotFoundError(f"{root} is not a DVC repository (no .dvc folder): run `git init && dvc init` "
                                "there, or run the pipeline from the project root")
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                info = {}
            raise WorkspaceBusy(f"{root} is busy: {_describe(info)} is running the pipeline there. One run at a "
                                f"time per workspace (DVC locks it, and both would write the same outputs): wait "
                                f"for it, stop it, or clone the project into another folder") from None
        _write(fd, flow_run)
        _held[root] = [fd, 1]
        try:
            yield
        finally:
            del _held[root]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _write(fd: int, flow_run: str | None) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "flow_run": flow_run,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:200]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
