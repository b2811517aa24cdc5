"""Long-running entry points: the pipeline on a schedule, and the MLflow UI.

Schedules need a real Prefect server (Prefect's temporary per-process server
runs no schedules): start one with ``make prefect-server`` and point
``PREFECT_API_URL`` at it. ``serve`` then registers a deployment of the
pipeline flow with the schedule and runs its flow runs in this process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from flows import tracking
from flows.credentials import warn_if_exposed
from flows.signals import stop_process_group
from flows.tracking_outage import redacted


class ServerUnavailable(RuntimeError):
    """The server a command needs is not configured or does not answer."""


def check_prefect_server(timeout_s: float = 5.0, what: str = "schedules") -> str:
    """Prefect's API URL (the environment, else the active profile: `prefect config set PREFECT_API_URL=...`),
    after checking that a server answers there."""
    import httpx
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url
    if not api:
        raise ServerUnavailable(
            f"{what} need a Prefect server, and PREFECT_API_URL is not set (neither in the environment nor in "
            "the active Prefect profile): start one with `make prefect-server` (prefect server start --host "
            "127.0.0.1 --port 4200), then `export PREFECT_API_URL=http://127.0.0.1:4200/api` or "
            "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`")
    from flows.credentials import prefect_headers, prefect_refusal

    try:  # an API route: the server answers /health to anyone, and the rest only with its auth string
        reply = httpx.get(api.rstrip("/") + "/admin/version", headers=prefect_headers(), timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ServerUnavailable(f"no Prefect server answers at PREFECT_API_URL={redacted(api)} ({exc}); "
                                "start one with `make prefect-server`") from None
    if reply.status_code == 401:
        raise prefect_refusal(api)
    if reply.status_code != 200:
        raise ServerUnavailable(f"the Prefect server at PREFECT_API_URL={redacted(api)} answered HTTP "
                                f"{reply.status_code} ({reply.text.strip()[:200]})")
    return api


def serve(root: str = ".", cron: str | None = None, interval_s: int | None = None,
          name: str = "scheduled") -> None:
    """Serve the pipeline flow with a cron or interval schedule until interrupted."""
    from flows.pipeline import ddpm_pipeline

    if (cron is None) == (interval_s is None):
        raise ValueError("give exactly one of --cron or --interval")
    if interval_s is not None and interval_s <= 0:
        raise ValueError(f"--interval {interval_s} must be a positive number of seconds")
    api = check_prefect_server()
    tracking.quiet_env()
    root = str(Path(root).resolve())
    print(f"serving ddpm-pipeline/{name} on {api} ({'cron ' + cron if cron else f'every {interval_s} s'}) "
          f"for {root}; Ctrl+C stops")
    # One flow run of this deployment at a time, across every runner serving it: a run that comes due while
    # the previous one still goes (a short interval, a slow run) is cancelled by the server, not left to pile
    # up as Late. Runs started elsewhere on the same workspace meet flows/workspace_lock.py.
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    ddpm_pipeline.serve(name=name, cron=cron, interval=interval_s, parameters={"root": root},
                        global_limit=one_at_a_time)


def server_env() -> dict[str, str]:
    """The environment for an MLflow server or UI: without MLflow 3's job runner (eight huey processes for
    GenAI judge and trace jobs, none of which this project uses) unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION
    is set."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}


def mlflow_ui(root: str = ".", host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the MLflow UI for the project's tracking store in the foreground."""
    uri = tracking.tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        print(f"MLFLOW_TRACKING_URI points at a tracking server: its UI is {uri}")
        return 0
    check_port_free(host, port)
    warn_if_exposed(host, "the MLflow UI", False, "Keep it on 127.0.0.1, or share runs through `make mlflow-server "
                    "MLFLOW_AUTH=1` instead.")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    artifacts = tracking.artifact_root(root)
    if artifacts:  # experiments made in the UI keep their artifacts where the pipeline's are
        cmd += ["--default-artifact-root", artifacts]
    print(f"MLflow UI for {uri}: {_experiment_url(root, f'http://{host}:{port}')}")
    ui = subprocess.Popen(cmd, start_new_session=True, env=server_env())  # one group, stopped together
    try:
        return ui.wait()
    finally:  # Ctrl-C, SIGTERM
        stop_process_group(ui, grace_s=10, first=signal.SIGINT)


def prefect_server(host: str = "127.0.0.1", port: int = 4200) -> int:
    """``prefect server start`` in the foreground, its UI asking the API at this address. With
    ``PREFECT_SERVER_API_AUTH_STRING`` (user:password) set, the API answers only clients whose
    ``PREFECT_API_AUTH_STRING`` is the same, and the UI asks for it; without it, beyond loopback, a warning."""
    from prefect.settings import PREFECT_SERVER_API_AUTH_STRING

    from flows.credentials import prefect_setting

    check_port_free(host, port, "the Prefect server")
    auth = prefect_setting(PREFECT_SERVER_API_AUTH_STRING)
    if auth is not None and ":" not in auth:
        raise ValueError("PREFECT_SERVER_API_AUTH_STRING must be user:password (clients send it as HTTP basic auth)")
    reach = socket.gethostname() if host in ("0.0.0.0", "::") else host
    api = f"http://{reach}:{port}/api"
    print(f"Prefect server on http://{host}:{port}: clients export PREFECT_API_URL={api}"
          + (" and PREFECT_API_AUTH_STRING=<the same user:password>" if auth else "") + "; Ctrl+C stops", flush=True)
    warn_if_exposed(host, "the Prefect server", bool(auth), "Set PREFECT_SERVER_API_AUTH_STRING=user:password "
                    "(make prefect-server PREFECT_HOST=... with it exported).")
    env = {**os.environ, "PREFECT_UI_API_URL": api}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                              start_new_session=True, env=env)
    try:
        return server.wait()
    finally:  # Ctrl-C, SIGTERM
        stop_process_group(server, grace_s=20, first=signal.SIGINT)


def check_port_free(host: str, port: int, what: str = "the MLflow UI") -> None:
    """``mlflow ui`` and ``mlflow server`` log "Address already in use" and still exit 0: find out first, and
    fail clearly."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServerUnavailable(f"cannot serve {what} on {host}:{port}: {exc.strerror} (another UI "
                                    f"or server is there; open it, or choose another --port)") from None


def _experiment_url(root: str, base: str) -> str:
    """The project's experiment in the UI's model-training view (MLflow 3 opens in its GenAI view by default)."""
    view = "?workflowType=machine_learning"
    try:
        from ddpm import config as config_mod

        name = config_mod.load(Path(root) / "params.yaml").tracking.experiment
        exp = tracking.client(root).get_experiment_by_name(name)
    except Exception:  # no params.yaml or no store yet: the experiments list
        exp = None
    return f"{base}/#/experiments/{exp.experiment_id}{view}" if exp else f"{base}/#/experiments{view}"
