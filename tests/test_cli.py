"""The ``ddpm`` command's errors for a missing server or wrong usage."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

DDPM = str(Path(sys.executable).with_name("ddpm"))


def ddpm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    full.update(env or {})
    return subprocess.run([DDPM, *args], capture_output=True, text=True, env=full, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_without_a_prefect_server_says_how_to_start_one():
    out = ddpm("serve", "--interval", "60")
    assert out.returncode == 2
    assert "PREFECT_API_URL is not set" in out.stderr and "make prefect-server" in out.stderr


def test_serve_with_an_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}/api"
    out = ddpm("serve", "--interval", "60", env={"PREFECT_API_URL": url})
    assert out.returncode == 2 and f"no Prefect server answers at PREFECT_API_URL={url}" in out.stderr


def test_serve_reads_the_api_url_from_the_prefect_profile(tmp_path):
    """`prefect config set PREFECT_API_URL=...` is how Prefect users point at a server; serve must see it."""
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {"PREFECT_HOME": str(tmp_path), "PREFECT_PROFILES_PATH": str(tmp_path / "profiles.toml")}
    prefect = str(Path(sys.executable).with_name("prefect"))
    set_url = subprocess.run([prefect, "config", "set", f"PREFECT_API_URL={url}"], capture_output=True, text=True,
                             timeout=120, env={**os.environ, **env})
    assert set_url.returncode == 0, set_url.stderr
    out = ddpm("serve", "--interval", "60", env=env)
    assert out.returncode == 2 and f"no Prefect server answers at PREFECT_API_URL={url}" in out.stderr, out.stderr


def test_serve_needs_exactly_one_schedule():
    out = ddpm("serve")
    assert out.returncode == 2 and "exactly one of --cron or --interval" in out.stderr


def test_ui_on_a_busy_port_fails_and_says_so(tmp_path):
    """`mlflow ui` logs "Address already in use" and exits 0; `ddpm ui` must not report success."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([DDPM, "ui", "--port", str(port)], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"ddpm ui: error: cannot serve the MLflow UI on 127.0.0.1:{port}: Address already in use (another UI or "
        "server is there; open it, or choose another --port)")


def test_a_temporary_prefect_server_that_does_not_start_in_time_is_one_line(tmp_path):
    """The embedded server gets 120 s by default (Prefect's 20 s failed `make run` on a loaded machine); past
    the limit the user reads what happened and what to do, not Prefect's traceback, and nothing ran."""
    from tests.conftest import make_project

    project = make_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1", PREFECT_HOME=str(tmp_path / "prefect"))
    out = subprocess.run([DDPM, "pipeline"], cwd=project, capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "ddpm pipeline: error: the temporary Prefect server did not answer within 1 s "
        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); nothing ran. On a busy machine raise it, or start a "
        "server once with `make prefect-server` and set PREFECT_API_URL"), out.stderr[-3000:]
    assert not (project / "data" / "prepared").exists() and not (project / "mlflow.db").exists()
