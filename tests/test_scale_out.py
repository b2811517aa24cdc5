"""Scaled out on loopback (docs/scale-out.md): an S3-compatible store (moto's server, as DVC's own tests use),
`ddpm mlflow-server` (MLflow on a PostgreSQL of its own, artifacts proxied to S3), a Prefect server with the
`ddpm` process work pool and two workers, each in a checkout of its own.

Servers start once for the module; each is a subprocess on a free loopback port, stopped by its fixture.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import run
from tests.test_operations import (DDPM, MODEL_NAME, base_env, chromium_dom, free_port, logged_in, spawn, stop, tail,
                                   tiny_project, wait_for_checkpoint, wait_http)

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# Distinctive secrets, searched for in every record the pipeline leaves (moto accepts any AWS key)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "aws-Secret-93be1f6a0c",
               "AWS_DEFAULT_REGION": "us-east-1"}
USER, PASSWORD = "alice", "alice-Pw-7c1e9b44"  # a user of the MLflow server (--auth --users)
ADMIN_PASSWORD = "admin-Pw-5f3a2d81e6"
PREFECT_AUTH = "team:prefect-Pw-0d4b7a3c"  # the Prefect server's PREFECT_SERVER_API_AUTH_STRING
SECRETS = (PASSWORD, ADMIN_PASSWORD, CREDENTIALS["AWS_SECRET_ACCESS_KEY"], PREFECT_AUTH.partition(":")[2])
AUTH = (USER, PASSWORD)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """`moto_server` on a free port with the buckets ddpm-dvc (the DVC remote) and ddpm-mlflow (artifacts)."""
    import boto3

    port, log = free_port(), tmp_path_factory.mktemp("moto") / "moto.log"
    proc = spawn([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, env=base_env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/moto-api/", proc, 60, log)
        client = boto3.client("s3", endpoint_url=url, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                           if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
        for bucket in ("ddpm-dvc", "ddpm-mlflow"):
            client.create_bucket(Bucket=bucket)
        yield {"url": url, "client": client}
    finally:
        stop(proc)


def _objects(s3: dict, bucket: str, prefix: str = "") -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def tracking_server(s3):
    """`ddpm mlflow-server --auth` (MLflow's basic-auth app, the user alice) with its own PostgreSQL and
    artifacts on s3://ddpm-mlflow/artifacts; ``restart()`` SIGKILLs the server and its database together and
    starts them again."""
    state = Path(tempfile.mkdtemp(prefix="ddpm-mlflow-server-"))
    state.chmod(0o755)  # PostgreSQL runs as the user postgres, who must reach its data folder
    port, pg_port, log = free_port(), free_port(), state / "server.log"
    users = state / "users.txt"
    users.write_text(f"# the team\n{USER}:{PASSWORD}\n")
    users.chmod(0o600)
    env = base_env(**CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3["url"], MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD)
    cmd = [DDPM, "mlflow-server", "--port", str(port), "--pg-port", str(pg_port), "--pg-data", str(state / "pg"),
           "--artifacts-destination", "s3://ddpm-mlflow/artifacts", "--auth", "--users", str(users)]

    def start() -> subprocess.Popen:
        proc = spawn(cmd, log, cwd=state, env=env)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc, 120, log)
            deadline = time.monotonic() + 60  # then its users
            while b"MLflow users ready" not in log.read_bytes() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.5)
        except BaseException:
            stop(proc, signal.SIGINT)
            raise
        return proc

    def restart() -> None:
        """SIGKILL the server and take its PostgreSQL down as a crash does (`pg_ctl stop -m immediate`: no
        shutdown checkpoint, crash recovery at the next start; pg_ctl runs it in a session of its own, out
        of the server's process group), then start both again."""
        from flows.mlflow_server import _as_postgres_user, _pg_bin

        stop(server["proc"], signal.SIGKILL)
        subprocess.run(_as_postgres_user([_pg_bin("pg_ctl"), "-D", str(state / "pg"), "-m", "immediate", "-w",
                                          "stop"]), check=True, capture_output=True)
        server["proc"] = start()

    server = {"proc": start(), "url": f"http://127.0.0.1:{port}", "log": log, "restart": restart,
              "pg_port": pg_port, "pg_password": (state / "pg.password").read_text().strip()}
    try:
        yield server
    finally:
        stop(server["proc"], signal.SIGINT, grace_s=30)
        from flows.mlflow_server import stop_local_postgres

        stop_local_postgres(state / "pg")  # if the server was killed and left it running
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def prefect_auth(tmp_path_factory):
    """`ddpm prefect-server` with PREFECT_SERVER_API_AUTH_STRING: the environment its clients need."""
    home = tmp_path_factory.mktemp("prefect-auth")
    port, log = free_port(), home / "server.log"
    proc = spawn([DDPM, "prefect-server", "--port", str(port)], log,
                 env=base_env(PREFECT_HOME=str(home), PREFECT_SERVER_API_AUTH_STRING=PREFECT_AUTH))
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api}/health", proc, 180, log)
        yield {"PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": PREFECT_AUTH}
    finally:
        stop(proc, signal.SIGINT, grace_s=30)


def s3_project(base: Path, s3: dict, extra: list[str] = ()) -> Path:
    """A tiny project whose default DVC remote is s3://ddpm-dvc/store on the moto server, committed."""
    project = tiny_project(base, list(extra))
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "remote", "add", "-d", "shared", "s3://ddpm-dvc/store"], project)
    run([*dvc, "remote", "modify", "shared", "endpointurl", s3["url"]], project)
    run(["git", "commit", "-qam", "a shared DVC remote on S3"], project)
    return project


# --- MLflow on PostgreSQL, artifacts and the DVC remote on S3 ----------------------------------------

def test_the_pipeline_against_postgresql_and_s3_with_a_tracking_server_that_restarts(tmp_path, s3, tracking_server,
                                                                                      prefect_auth):
    """`ddpm pipeline` logging to `ddpm mlflow-server --auth` (PostgreSQL, artifacts on S3) as alice, whose
    password is in MLFLOW_TRACKING_URI, with its flow run on a Prefect server that wants an auth string, and
    pushing to an S3 DVC remote; the server and its database are SIGKILLed at the first checkpoint and started
    again: training goes on (or the flow's retry resumes it), and the server shows one finished run with every
    loss point, its artifacts in the bucket, the registered version with the champion alias (the promotion
    gate), and the UI shows the run; `dvc status -c` has nothing to push. No secret of the environment is in
    any record the run left (MLflow, Prefect, the artifacts, the DVC files and remote, the terminal)."""
    project = s3_project(tmp_path, s3, ["train.steps=40", "train.log_every_steps=2", "train.checkpoint_every_steps=5",
                                        "train.keep_checkpoints=20"])
    url = tracking_server["url"]
    env = base_env(**CREDENTIALS, **prefect_auth, MLFLOW_TRACKING_URI=url.replace("://", f"://{USER}:{PASSWORD}@"),
                   OMP_NUM_THREADS="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")  # MLflow's HTTP retries 1, 2, 4, 8 s apart
    log = tmp_path / "pipeline.log"
    pipeline = spawn([DDPM, "pipeline"], log, cwd=project, env=env)
    t0 = time.monotonic()
    try:
        wait_for_checkpoint(project, "*.safetensors", pipeline, log, 180)
        tracking_server["restart"]()
        back_at = time.monotonic() - t0
        rc = pipeline.wait(timeout=420)
    finally:
        stop(pipeline)
    text = log.read_text(errors="replace")
    assert rc == 0, tail(log, 8000)
    attempts = text.count("Running stage 'train'")
    print(f"\nserver and database killed and back at {back_at:.1f} s; training attempts: {attempts}")
    assert "MLflow unreachable" in text or "MLflow HTTP: Retrying" in text, text[-4000:]

    rest = f"{url}/api/2.0/mlflow"
    exp_id = httpx.get(f"{rest}/experiments/get-by-name", params={"experiment_name": "ddpm"}, auth=AUTH,
                       timeout=10).json()["experiment"]["experiment_id"]
    [run_] = httpx.post(f"{rest}/runs/search", json={"experiment_ids": [exp_id]}, auth=AUTH, timeout=10).json()["runs"]
    info = run_["info"]
    assert info["status"] == "FINISHED"
    assert info["artifact_uri"].startswith("mlflow-artifacts:/"), info["artifact_uri"]  # proxied by the server
    hist = httpx.get(f"{rest}/metrics/get-history", params={"run_id": info["run_id"], "metric_key": "train_loss"},
                     auth=AUTH, timeout=10).json()["metrics"]
    assert sorted(int(m["step"]) for m in hist) == list(range(2, 41, 2))
    alias = httpx.get(f"{rest}/registered-models/alias", params={"name": MODEL_NAME, "alias": "champion"}, auth=AUTH,
                      timeout=10)
    assert alias.status_code == 200 and alias.json()["model_version"]["run_id"] == info["run_id"], alias.text
    # the artifacts are in the bucket, the model's weights among them; the stages' outputs on the DVC remote
    keys = _objects(s3, "ddpm-mlflow", "artifacts/")
    assert any(k.endswith("samples/grid.png") or k.endswith(".png") for k in keys), keys[:20]
    assert any(k.endswith(".safetensors") for k in keys), keys[:20]
    assert _objects(s3, "ddpm-dvc", "store/"), "nothing was pushed to the S3 DVC remote"
    status = run([sys.executable, "-m", "dvc", "status", "-c"], project, env=env)
    assert "new:" not in status.stdout and "missing:" not in status.stdout, status.stdout
    with logged_in(url, AUTH) as ui:  # as a browser does after its login prompt
        page = chromium_dom(f"{ui}/#/experiments/{exp_id}/runs/{info['run_id']}", tmp_path / "chromium")
    assert info["run_name"] in page and "Failed to" not in page, page[-3000:]

    records = _records(rest, prefect_auth, s3, project, text)
    leaks = sorted({(where, secret) for where, data in records.items() for secret in SECRETS
                    if secret.encode() in data})
    assert not leaks, leaks
    assert len(records["prefect logs"]) > 10_000 and any(k.startswith("artifact ddpm-mlflow/") for k in records)
    assert f"{USER}:***@".encode() in records["flow report"], records["flow report"][:3000]  # masked, not absent


def _records(rest: str, prefect: dict, s3: dict, project: Path, terminal: str) -> dict[str, bytes]:
    """Everything a run leaves behind that a team member can read: MLflow runs (params, tags, inputs),
    registered models and versions, every artifact object, Prefect's logs, flow and task runs (state messages,
    parameters) and artifacts (the flow report), the project's files (params.yaml, dvc.lock, .dvc/config and
    the cache), the DVC remote's objects, and what the terminal showed."""
    import base64
    import json

    out: dict[str, bytes] = {"terminal": terminal.encode()}
    exps = httpx.post(f"{rest}/experiments/search", json={"max_results": 100}, auth=AUTH, timeout=10).json()
    ids = [e["experiment_id"] for e in exps["experiments"]]
    out["mlflow runs"] = httpx.post(f"{rest}/runs/search", json={"experiment_ids": ids, "max_results": 1000},
                                    auth=AUTH, timeout=10).content
    out["mlflow models"] = httpx.post(f"{rest}/registered-models/search", json={}, auth=AUTH, timeout=10).content
    out["mlflow versions"] = httpx.get(f"{rest}/model-versions/search", auth=AUTH, timeout=10).content
    for bucket in ("ddpm-mlflow", "ddpm-dvc"):
        for key in _objects(s3, bucket):
            out[f"artifact {bucket}/{key}"] = s3["client"].get_object(Bucket=bucket, Key=key)["Body"].read()
    api = prefect["PREFECT_API_URL"]
    headers = {"Authorization": "Basic " + base64.b64encode(prefect["PREFECT_API_AUTH_STRING"].encode()).decode()}
    for kind in ("logs", "flow_runs", "task_runs", "artifacts"):
        items: list[dict] = []
        while True:
            page = httpx.post(f"{api}/{kind}/filter", json={"limit": 200, "offset": len(items)}, headers=headers,
                              timeout=30)
            assert page.status_code == 200, page.text
            if not page.json():
                break
            items += page.json()
        out[f"prefect {kind}"] = json.dumps(items).encode()
        if kind == "artifacts":
            out["flow report"] = "\n".join(a["data"] for a in items if a.get("key") == "ddpm-pipeline-report").encode()
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.relative_to(project).parts:
            out[f"file {path.relative_to(project)}"] = path.read_bytes()
    return out


# --- the pipeline on Prefect workers ----------------------------------------------------------------

@pytest.fixture
def worker_env(s3, tracking_server, prefect_auth, tmp_path):
    """Credentials from the environment, as a team member's machine has them."""
    home = tmp_path / "prefect_home"
    home.mkdir()
    return base_env(**CREDENTIALS, **prefect_auth, MLFLOW_TRACKING_URI=tracking_server["url"],
                    MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD, PREFECT_HOME=str(home),
                    OMP_NUM_THREADS="1")


SWEEP = """\
study: w
metric: fd_classifier
recipes:
  - {name: lr1, family: lr, set: {train.lr: 0.001}}
  - {name: lr3, family: lr, set: {train.lr: 0.003}}
"""


def test_a_study_fans_out_over_two_workers_from_one_deployment(tmp_path, s3, worker_env):
    """`ddpm deploy` registers prefect.yaml's deployment at the project's commit; two `ddpm worker`s, each in
    a checkout of its own, take one flow run at a time; `ddpm sweep --on-workers` submits one flow run per
    recipe through the API: each runs on a different worker in a fresh clone at that commit, pulls the
    prepared data and the evaluation's reference from the S3 remote (both stages skipped), logs to the
    shared server, and the leaderboard collects both."""
    project = s3_project(tmp_path / "origin", s3)
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "repro", "reference"], project, env=worker_env)  # prepare, then the evaluation's reference
    run([*dvc, "push"], project, env=worker_env)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "prepared data"], project)
    (project / "sweeps").mkdir(exist_ok=True)
    (project / "sweeps" / "w.yaml").write_text(SWEEP)

    deployed = run([DDPM, "deploy"], project, env=worker_env)
    assert "deployed ddpm-pipeline-at-commit/workers" in deployed.stdout, deployed.stdout + deployed.stderr
    workers = []
    for name in ("w1", "w2"):
        checkout = tmp_path / name
        run(["git", "clone", "-q", str(project), str(checkout)], tmp_path)
        log = tmp_path / f"{name}.log"
        workers.append((name, log, spawn([DDPM, "worker", "--name", name], log, cwd=checkout, env=worker_env)))
    try:
        sweep_log = tmp_path / "sweep.log"
        sweep = spawn([DDPM, "sweep", "sweeps/w.yaml", "--on-workers"], sweep_log, cwd=project, env=worker_env)
        try:
            rc = sweep.wait(timeout=480)
        finally:
            stop(sweep)
        logs = {name: log.read_text(errors="replace") for name, log, _ in workers}
        assert rc == 0, tail(sweep_log, 6000) + "\n".join(f"--- {n}\n{t[-4000:]}" for n, t in logs.items())
    finally:
        for _, _, proc in workers:
            stop(proc, signal.SIGINT, grace_s=20)
    text = sweep_log.read_text(errors="replace")
    assert "study w: 2 recipes finished, 0 failed" in text, text[-4000:]
    from flows.sweep import read_leaderboard

    rows = read_leaderboard(project / "metrics" / "leaderboard.csv")
    assert sorted(r["recipe"] for r in rows) == ["lr1", "lr3"] and all(r["status"] == "ok" for r in rows), rows
    assert all(float(r["fd_classifier_n16"]) > 0 and r["mlflow_run_id"] for r in rows), rows
    # one flow run on each worker, each from a fresh clone that pulled the prepared data (both may try to take
    # the same run; the loser logs "Aborted submission of flow run", so count the runs each one started)
    submitted = {name: logs[name].count("submitted to infrastructure") for name in logs}
    assert submitted == {"w1": 1, "w2": 1}, submitted
    for name, log_text in logs.items():
        assert "dvc pull from s3://ddpm-dvc/store" in log_text, log_text[-4000:]
        assert "stage prepare: up to date, skipped" in log_text, log_text[-4000:]
        assert "stage reference: up to date, skipped" in log_text, log_text[-4000:]
    # each run's DVC experiment was pushed back to the repository the workers cloned
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).stdout.split()
    assert len(refs) == 2, refs


# --- bad input and faults: one line naming what is wrong and what to do -------------------------------

def _last_line(out: subprocess.CompletedProcess) -> str:
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[-1] if lines else ""


def test_mlflow_server_names_an_unreachable_or_wrong_backend_before_starting(tmp_path, s3, tracking_server):
    """A PostgreSQL that does not answer, a database that does not exist, a wrong password, a user it does
    not know (the password redacted in the message), an artifact bucket that does not
    exist, an S3 endpoint that does not answer and missing AWS credentials: each is the last line, exit 1,
    and no server starts."""
    env = base_env(**CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3["url"], HOME=str(tmp_path))
    nobody = free_port()
    pg = f"127.0.0.1:{tracking_server['pg_port']}"
    cases = [
        (["--backend-store-uri", f"postgresql://postgres@127.0.0.1:{nobody}/mlflow"], env,
         f"no PostgreSQL answers at 127.0.0.1:{nobody}"),
        (["--backend-store-uri", f"postgresql://postgres:{tracking_server['pg_password']}@{pg}/nope"], env,
         f"PostgreSQL at {pg} has no database 'nope'"),
        (["--backend-store-uri", f"postgresql://postgres:secret@{pg}/mlflow"], env,
         f"PostgreSQL at {pg} refused the credentials of user 'postgres'"),
        (["--backend-store-uri", f"postgresql://nobody:secret@{pg}/mlflow"], env,
         f"PostgreSQL at {pg} refused the credentials of user 'nobody'"),
        (["--artifacts-destination", "s3://no-such-bucket/a"], env, "S3 bucket 'no-such-bucket' at"),
        (["--artifacts-destination", "s3://ddpm-mlflow/a"], {**env, "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{nobody}"},
         f"nothing answers at http://127.0.0.1:{nobody}"),
        (["--artifacts-destination", "s3://ddpm-mlflow/a"],
         {k: v for k, v in env.items() if not k.startswith("AWS_")}, "no AWS credentials for the S3 bucket 'ddpm-mlflow'"),
    ]
    for args, case_env, expected in cases:
        out = run([DDPM, "mlflow-server", "--port", str(free_port()), *args], tmp_path, check=False, env=case_env)
        line = _last_line(out)
        assert out.returncode == 1 and line.startswith("ddpm mlflow-server: error: ") and expected in line, \
            (args, out.returncode, (out.stdout + out.stderr)[-2000:])
        assert "secret" not in out.stdout + out.stderr and tracking_server["pg_password"] not in out.stdout + out.stderr
    assert "does not exist: create it" in _last_line(run([DDPM, "mlflow-server", "--artifacts-destination",
                                                          "s3://no-such-bucket/a"], tmp_path, check=False, env=env))


def test_an_unreachable_s3_remote_or_missing_credentials_is_one_line(tmp_path, s3):
    """`ddpm pull-inputs` (a worker's pull step) and the pipeline's checked `dvc push` against the S3 remote:
    an endpoint that does not answer is transient (exit 1, retried by the flow), missing credentials and a
    missing bucket are not (exit 2)."""
    from flows import dvc_cache
    from flows.dvc_remote import RemoteUnavailable

    project = s3_project(tmp_path, s3)
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "remote", "modify", "shared", "endpointurl", f"http://127.0.0.1:{free_port()}"], project)
    env = base_env(**CREDENTIALS, HOME=str(tmp_path), AWS_MAX_ATTEMPTS="1")
    out = run([DDPM, "pull-inputs"], project, check=False, env=env)
    assert out.returncode == 1 and "ddpm pull-inputs: error: dvc pull failed: nothing answers at the DVC remote " \
        "'shared' (s3://ddpm-dvc/store at http://127.0.0.1:" in _last_line(out), (out.stdout + out.stderr)[-3000:]
    no_keys = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    out = run([DDPM, "pull-inputs"], project, check=False, env=no_keys)
    assert out.returncode == 2 and "no AWS credentials for the DVC remote 'shared'" in _last_line(out), \
        (out.stdout + out.stderr)[-3000:]
    run([*dvc, "remote", "modify", "shared", "endpointurl", s3["url"]], project)
    run([*dvc, "remote", "modify", "shared", "url", "s3://ddpm-missing/store"], project)
    out = run([DDPM, "pull-inputs"], project, check=False, env=env)
    assert out.returncode == 2 and "the bucket 'ddpm-missing' of the DVC remote 'shared' (s3://ddpm-missing/store " \
        f"at {s3['url']}) does not exist" in _last_line(out), (out.stdout + out.stderr)[-3000:]
    run([*dvc, "remote", "modify", "shared", "url", "s3://ddpm-dvc/store"], project)
    run([*dvc, "remote", "modify", "shared", "endpointurl", f"http://127.0.0.1:{free_port()}"], project)
    (project / "data").mkdir(exist_ok=True)
    (project / "data" / "extra.txt").write_text("something to push\n")
    run([*dvc, "add", "data/extra.txt"], project)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HOME", "AWS_MAX_ATTEMPTS")}
    os.environ.update(CREDENTIALS, HOME=str(tmp_path), AWS_MAX_ATTEMPTS="1")
    try:
        with pytest.raises(RemoteUnavailable, match="dvc push failed: nothing answers at") as err:
            dvc_cache.push(project)
        assert not err.value.deterministic  # the flow's push task retries it
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_workers_refuse_what_they_cannot_share(tmp_path, prefect_api_url):
    """A worker without a shared tracking server, a deploy whose DVC remote is a folder relative to each
    checkout, and a pull step on a machine without the project installed: each one line, nothing started."""
    project = tiny_project(tmp_path)  # the default remote: ../../ddpm-dvc-remote
    env = base_env(PREFECT_API_URL=prefect_api_url)
    out = run([DDPM, "worker"], project, check=False, env=env)
    assert out.returncode == 2 and _last_line(out).startswith("ddpm worker: error: MLFLOW_TRACKING_URI is not set: "
                                                              "each worker would keep its runs"), out.stderr[-2000:]
    out = run([DDPM, "deploy"], project, check=False, env=env)
    assert out.returncode == 2 and "the default DVC remote 'local' is ../../ddpm-dvc-remote, a folder relative to " \
        "each checkout" in _last_line(out), out.stderr[-2000:]
    out = run(["bin/ddpm", "pull-inputs"], project, check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 127 and "the ddpm command is not installed" in _last_line(out), out.stderr


def test_the_servers_refuse_requests_without_valid_credentials(tmp_path, tracking_server, prefect_auth):
    """Both shared servers refuse a request without credentials or with wrong ones (HTTP 401); the project's
    commands then say which server refused whose credentials and what to set, as their last line, exit 2
    (deterministic: not retried), nothing loaded or started."""
    url, api = tracking_server["url"], prefect_auth["PREFECT_API_URL"]
    probe = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(probe, timeout=10).status_code == 401
    assert httpx.get(probe, auth=(USER, "not-the-password"), timeout=10).status_code == 401
    assert httpx.get(probe, auth=AUTH, timeout=10).status_code == 200
    assert httpx.get(f"{url}/", timeout=10).status_code == 401  # the UI too: a browser asks for the login
    assert httpx.get(f"{api}/admin/version", timeout=10).status_code == 401
    assert httpx.get(f"{api}/admin/version", auth=tuple(PREFECT_AUTH.split(":")), timeout=10).status_code == 200

    project = tiny_project(tmp_path)
    no_login = base_env(MLFLOW_TRACKING_URI=url)
    wrong = {**no_login, "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    sample = [DDPM, "sample", "--no-track", "--model", f"models:/{MODEL_NAME}@champion",
              "-S", f"sample.out_dir={tmp_path / 'samples'}"]
    cases = [
        (sample, no_login, f"ddpm sample: error: the MLflow server at {url} asks for credentials (HTTP 401)"),
        (sample, wrong, f"ddpm sample: error: the MLflow server at {url} refused the credentials of user 'alice'"),
        ([DDPM, "worker"], wrong, f"ddpm worker: error: the MLflow server at {url} refused the credentials of "
                                  "user 'alice' while searching its experiments (HTTP 401)"),
        ([DDPM, "serve", "--interval", "60"], base_env(PREFECT_API_URL=api),
         f"ddpm serve: error: the Prefect server at {api} asks for credentials (HTTP 401): set PREFECT_API_AUTH_STRING"),
        ([DDPM, "serve", "--interval", "60"], base_env(PREFECT_API_URL=api, PREFECT_API_AUTH_STRING="team:not-it"),
         f"ddpm serve: error: the Prefect server at {api} refused PREFECT_API_AUTH_STRING (HTTP 401)"),
        ([DDPM, "pipeline"], base_env(PREFECT_API_URL=api),
         f"ddpm pipeline: error: the Prefect server at {api} asks for credentials (HTTP 401)"),
    ]
    for cmd, env, expected in cases:
        out = run(cmd, project, check=False, env=env)
        assert out.returncode == 2 and _last_line(out).startswith(expected), (cmd[1], (out.stdout + out.stderr)[-3000:])
        assert "not-the-password" not in out.stdout + out.stderr and "not-it" not in out.stdout + out.stderr
    assert not (tmp_path / "samples").exists() and not (project / "models").exists()  # nothing loaded or trained
