"""Operations against real servers: a Prefect server running the scheduled pipeline (one run cancelled
through its API), and an MLflow tracking server killed when training ends, seen through its REST API.

Every server is a subprocess on a free loopback port with its own temporary state, stopped by its
fixture; every wait is a bounded polling loop.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from flows.pipeline import apply_overrides_to_params
from tests.conftest import PROJECT_ROOT, make_project, run, write_fashion_idx
from tests.test_pipeline import tiny_overrides

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DDPM = str(BIN / "ddpm")
MODEL_NAME = "ddpm-fashion-mnist"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PREFECT_API_URL", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"):
        env.pop(key, None)
    env.update(extra)
    return env


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}) before answering {url}:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout_s} s:\n{tail(log)}")


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 15) -> None:
    """Stop a process we started with its process group: ``sig``, then SIGKILL to whatever is left."""
    from flows.signals import stop_process_group

    if proc.poll() is None:
        stop_process_group(proc, grace_s, first=sig)


def spawn(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    f = open(log, "ab")
    try:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **kw)
    finally:
        f.close()


def start_mlflow(store: Path, port: int, log: Path) -> subprocess.Popen:
    proc = spawn([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                  "--default-artifact-root", str(store / "artifacts"), "--host", "127.0.0.1",
                  "--port", str(port), "--workers", "1"], log, env=base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 120, log)
    except BaseException:
        stop(proc)
        raise
    return proc


@contextmanager
def mlflow_server(store: Path):
    store.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = store / "server.log"
    state = {"proc": start_mlflow(store, port, log), "port": port, "store": store, "log": log,
             "url": f"http://127.0.0.1:{port}"}
    try:
        yield state
    finally:
        stop(state["proc"])


# Operations are about servers and processes, not metrics: no Inception and no sampler comparison (tens of
# seconds a pipeline run here; tests/test_pipeline.py checks them)
LEAN = ["evaluate.inception=false", "evaluate.compare_samplers=[]"]


def tiny_project(base: Path, extra: list[str] = ()) -> Path:
    source = write_fashion_idx(base / "fashion")
    project = make_project(base / "project")
    apply_overrides_to_params(project / "params.yaml", tiny_overrides(source) + LEAN + list(extra))
    return project


# --- 1. the scheduled pipeline on a real Prefect server -------------------------------------------

@pytest.fixture
def prefect_api(tmp_path):
    """`make prefect-server PREFECT_PORT=<a free port>` (the README's command), this environment as the venv,
    with a profile whose PREFECT_API_URL names another port (the UI must still ask its own)."""
    port = free_port()
    home = tmp_path / "prefect_home"
    home.mkdir()
    log = tmp_path / "prefect_server.log"
    venv = Path(sys.prefix)

    def start() -> subprocess.Popen:
        proc = spawn(["make", "-s", "-C", str(PROJECT_ROOT), "prefect-server", f"PREFECT_PORT={port}",
                      f"VENV={venv}", "-o", f"{venv}/bin/ddpm"], log,
                     env=base_env(PREFECT_HOME=str(home), PREFECT_API_URL="http://127.0.0.1:4200/api"))
        try:
            wait_http(f"http://127.0.0.1:{port}/api/health", proc, 90, log)
        except BaseException:
            stop(proc, signal.SIGINT)
            raise
        return proc

    def restart() -> float:
        """Stop the server (Ctrl-C, as a user would) and start it again on the same port and database;
        returns how long the API was away."""
        t0 = time.monotonic()
        stop(server["proc"], signal.SIGINT)
        server["proc"] = start()
        return time.monotonic() - t0

    server = {"proc": start()}
    try:
        yield {"api": f"http://127.0.0.1:{port}/api", "ui": f"http://127.0.0.1:{port}", "home": home, "log": log,
               "restart": restart}
    finally:
        stop(server["proc"], signal.SIGINT)


def _flow_runs(api: str, deployment_id: str) -> list[dict]:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC",
            "limit": 50}
    r = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10)
    r.raise_for_status()
    return r.json()


# Checkpointed only at the end: a checkpoint before it is the one the cancellation wrote. The cancellation must
# land while it trains: one thread on a quiet 2-core CPU does about 50 of these steps a second.
SERVED_STEPS = 1000


def test_scheduled_pipeline_runs_on_a_real_prefect_server(prefect_api, tmp_path):
    """`ddpm serve` against `make prefect-server`: the first scheduled run is cancelled through the API while it
    trains (Cancelled, training checkpointed, its MLflow run KILLED, nothing of it left running); the next
    resumes it and completes (one MLflow run, one version) although the Prefect server is restarted while it
    trains; runs due meanwhile are cancelled by the
    deployment's limit, not queued; the UI on that port shows the cancelled flow run. (A second run with
    unchanged inputs skipping every stage: tests/test_pipeline.py.)"""
    from tests.test_stopping import processes_in, project_mlflow

    project = tiny_project(tmp_path, [f"train.steps={SERVED_STEPS}", f"train.checkpoint_every_steps={SERVED_STEPS}",
                                      "train.log_every_steps=50", "train.mixed_precision=fp32"])
    api = prefect_api["api"]
    log = tmp_path / "serve.log"
    mlflow = project_mlflow(project)
    env = base_env(PREFECT_API_URL=api, PREFECT_HOME=str(prefect_api["home"]), OMP_NUM_THREADS="1",
                   MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")
    serve = spawn([DDPM, "serve", "--interval", "10", "--name", "test"], log, cwd=project, env=env)
    try:
        deadline = time.monotonic() + 60
        dep = None
        while dep is None and time.monotonic() < deadline:
            assert serve.poll() is None, f"ddpm serve exited ({serve.returncode}):\n{tail(log)}"
            r = httpx.get(f"{api}/deployments/name/ddpm-pipeline/test", timeout=10)
            dep = r.json() if r.status_code == 200 else None
            time.sleep(1)
        assert dep is not None, f"deployment ddpm-pipeline/test never appeared:\n{tail(log)}"

        # cancel the first run while it trains, as the UI's Cancel button does
        deadline = time.monotonic() + 180
        while f"steps 0 -> {SERVED_STEPS}" not in log.read_text(errors="replace"):
            assert serve.poll() is None and time.monotonic() < deadline, f"training never started:\n{tail(log)}"
            time.sleep(0.5)
        time.sleep(1)
        [first] = [r for r in _flow_runs(api, dep["id"]) if r["state_type"] == "RUNNING"]
        r = httpx.post(f"{api}/flow_runs/{first['id']}/set_state", timeout=10,
                       json={"state": {"type": "CANCELLING", "message": "cancelled by the test"}, "force": True})
        assert r.status_code in (200, 201), r.text
        deadline = time.monotonic() + 90
        while (state := httpx.get(f"{api}/flow_runs/{first['id']}", timeout=10).json()["state"])["type"] != "CANCELLED":
            assert time.monotonic() < deadline, f"flow run still {state['type']} 90 s after Cancel:\n{tail(log, 8000)}"
            time.sleep(0.5)
        left = [c for c in processes_in(project) if "ddpm train" in c or "dvc" in c]
        assert left == [], left  # the stage stopped with its flow run
        [killed] = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
        assert killed.info.status == "KILLED"
        [stop_step] = [int(p.name[5:14]) for p in (project / "checkpoints").rglob("step-*.safetensors")]
        assert 0 < stop_step < SERVED_STEPS
        assert f"stopped at step {stop_step}; checkpoint " in log.read_text(errors="replace")

        # the Prefect server restarted while the next scheduled run trains: the run goes on and completes
        deadline = time.monotonic() + 180
        while f"resuming from " not in log.read_text(errors="replace"):  # the next run's `ddpm train` has started
            assert serve.poll() is None and time.monotonic() < deadline, f"no resumed run:\n{tail(log)}"
            time.sleep(0.5)
        away_s = prefect_api["restart"]()
        completed: list[dict] = []
        deadline = time.monotonic() + 240
        while not completed and time.monotonic() < deadline:
            assert serve.poll() is None, f"ddpm serve exited ({serve.returncode}):\n{tail(log)}"
            runs = _flow_runs(api, dep["id"])
            failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not failed, f"flow run {failed[0]['name']} {failed[0]['state_type']}:\n{tail(log, 8000)}"
            completed = [r for r in runs if r["state_type"] == "COMPLETED"]
            time.sleep(2)
        assert completed, f"no scheduled flow run completed within 240 s:\n{tail(log, 8000)}"
        print(f"\nthe resumed scheduled flow run: total_run_time {completed[0]['total_run_time']:.1f} s; the Prefect "
              f"server was away {away_s:.1f} s while it trained")
        # it skipped what the cancelled run had done and finished training in that run's MLflow run
        text = log.read_text(errors="replace")
        assert text.count("stage train: reproduced") == 1 and f"at step {stop_step}" in text, tail(log, 8000)
        assert "stage prepare: up to date, skipped" in text, tail(log, 8000)
        runs = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
        assert [(r.info.run_id, r.info.status) for r in runs] == [(killed.info.run_id, "FINISHED")]
        assert [v.run_id for v in mlflow.search_model_versions()] == [killed.info.run_id]
        # runs due while another ran (every 10 s) were cancelled by the deployment's limit, not queued
        runs = _flow_runs(api, dep["id"])
        first_end = datetime.fromisoformat(completed[0]["end_time"])
        overlapped = [r for r in runs if datetime.fromisoformat(r["expected_start_time"]) < first_end
                      and r["id"] != completed[0]["id"]]
        assert overlapped and all(r["state_type"] == "CANCELLED" for r in overlapped), \
            [(r["name"], r["state_name"]) for r in overlapped]
        assert sum(r["state_name"] == "Late" for r in runs) <= 1, [(r["name"], r["state_name"]) for r in runs]
    finally:
        stop(serve, signal.SIGINT, grace_s=20)
    page = chromium_dom(f"{prefect_api['ui']}/runs/flow-run/{first['id']}", tmp_path / "chromium")
    assert first["name"] in page and "Cancelled" in page and "Oops" not in page, page[-3000:]


@contextmanager
def logged_in(upstream: str, auth: tuple[str, str]):
    """A loopback proxy to ``upstream`` that adds the Authorization header a browser sends once its user
    answered the login prompt: headless Chromium shows no prompt, and MLflow's UI cannot fetch from a page
    whose URL holds credentials ("Request cannot be constructed from a URL that includes credentials")."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    login = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    hop = {"host", "authorization", "accept-encoding", "connection", "content-length", "content-encoding",
           "transfer-encoding", "keep-alive"}

    class Proxy(BaseHTTPRequestHandler):
        def forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
            reply = httpx.request(self.command, upstream + self.path, content=body, timeout=60,
                                  headers={**headers, "Authorization": login})
            self.send_response(reply.status_code)
            for k, v in reply.headers.multi_items():
                if k.lower() not in hop:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(reply.content)))
            self.end_headers()
            self.wfile.write(reply.content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def chromium_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, in headless Chromium (what a user's browser shows)."""
    from tests.test_pipeline import CHROMIUM

    if CHROMIUM is None:
        pytest.skip("needs Chromium (Debian: apt-get install chromium)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--virtual-time-budget=20000", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=base_env()).stdout


def wait_for_checkpoint(project: Path, pattern: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Until a checkpoint matching ``pattern`` is on disk (polled every 20 ms), while ``proc`` runs."""
    deadline = time.monotonic() + timeout_s
    while not list((project / "checkpoints").rglob(pattern)):
        assert proc.poll() is None, f"{proc.args[-1]} exited ({proc.returncode}) early:\n{tail(log)}"
        assert time.monotonic() < deadline, f"no checkpoint {pattern} within {timeout_s} s:\n{tail(log)}"
        time.sleep(0.02)


# (The pipeline against a tracking server that restarts while it trains: tests/test_scale_out.py, on PostgreSQL.)


# --- 2. the tracking server down when training ends and the model is registered --------------------

def _runs_and_versions(url: str) -> tuple[list[dict], list[dict]]:
    rest = f"{url}/api/2.0/mlflow"
    exp_id = httpx.get(f"{rest}/experiments/get-by-name", params={"experiment_name": "ddpm"},
                       timeout=10).json()["experiment"]["experiment_id"]
    runs = httpx.post(f"{rest}/runs/search", json={"experiment_ids": [exp_id]}, timeout=10).json().get("runs", [])
    versions = httpx.get(f"{rest}/model-versions/search", params={"filter": f"name='{MODEL_NAME}'"}, timeout=10)
    return runs, versions.json().get("model_versions", [])


def test_ddpm_train_when_the_tracking_server_is_down_at_registration(tmp_path):
    """The server is killed once the final checkpoint is on disk: `ddpm train` ends (after MLflow's own HTTP
    retries) with one line naming the server, what is kept and what to do, exit 1 (transient, so the flow
    retries it). Once the server is back, a rerun trains nothing, continues the same MLflow run and
    registers exactly one version."""
    project = tiny_project(tmp_path)
    env = base_env(OMP_NUM_THREADS="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    run([DDPM, "prepare"], cwd=project, env=env)
    with mlflow_server(tmp_path / "mlflow") as server:
        env["MLFLOW_TRACKING_URI"] = server["url"]
        log = tmp_path / "train.log"
        train = spawn([DDPM, "train"], log, cwd=project, env=env)
        try:
            wait_for_checkpoint(project, "step-000000006.safetensors", train, log, 120)
            stop(server["proc"], signal.SIGKILL)
            rc = train.wait(timeout=180)
        finally:
            stop(train)
        lines = log.read_text(errors="replace").strip().splitlines()
        assert rc == 1, "\n".join(lines[-30:])
        assert lines[-1].startswith(f"ddpm train: error: the MLflow tracking server {server['url']} stopped "
                                    "answering while registering the model (training finished: 6 steps"), lines[-1]
        assert "nothing is lost: rerun when it is back" in lines[-1]
        assert (project / "models" / "model.safetensors").exists()  # the trained weights are kept

        server["proc"] = start_mlflow(server["store"], server["port"], server["log"])
        again = run([DDPM, "train"], cwd=project, env=env)
        text = again.stdout + again.stderr
        assert "at step 6" in text and "steps 6 -> 6" in text, text[-3000:]  # resumed, nothing trained again
        runs, versions = _runs_and_versions(server["url"])
        assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED", runs
        assert [mv["run_id"] for mv in versions] == [runs[0]["info"]["run_id"]], versions
        assert f"registered {MODEL_NAME} version 1" in text or "already registered" in text, text[-3000:]
