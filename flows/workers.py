"""Many machines: the pipeline as a Prefect deployment on a process work pool, run by Prefect workers.

``ddpm deploy`` registers prefect.yaml's deployment for the project's current commit; ``ddpm worker`` starts
a Prefect process worker (one flow run at a time: one training per GPU machine). A flow run on a worker:

1. prefect.yaml's pull steps clone the project at the deployed commit into a temporary folder and run
   ``bin/ddpm pull-inputs`` there: ``dvc pull`` of what dvc.lock names (from the shared default remote), so
   the stages whose inputs did not change are skipped;
2. ``pipeline_at_commit`` below runs the pipeline flow in that checkout with the run's overrides, pushes
   the outputs to the shared DVC remote and logs to the shared MLflow server (MLFLOW_TRACKING_URI), and
   pushes the run's DVC experiment to the repository it was cloned from (``dvc exp push origin``).

A recipe study fans out over the workers with ``ddpm sweep FILE --on-workers`` (flows/sweep.py).
Everything shared must be reachable from every worker: checked before a worker starts and before a deploy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger

from flows.credentials import mlflow_auth, mlflow_refusal
from flows.tracking_outage import redacted

POOL = "ddpm"
FLOW_NAME = "ddpm-pipeline-at-commit"
DEPLOYMENT_NAME = "workers"
DEPLOYMENT = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
PROJECT_DEPENDENCIES = ("torch", "dvc", "mlflow", "safetensors", "ddpm", "flows")


class NotShared(ValueError):
    """Something every worker must reach is local to this machine or checkout."""


def missing_dependencies() -> list[str]:
    import importlib.util

    return [name for name in PROJECT_DEPENDENCIES if importlib.util.find_spec(name) is None]


def check_dependencies() -> None:
    missing = missing_dependencies()
    if missing:
        raise NotShared(f"this worker's Python ({sys.executable}) lacks the project's dependencies "
                        f"({', '.join(missing)}): start workers with `make worker` in a checkout of the project "
                        f"(it installs them into .venv), or `pip install -e .` in the worker's environment")


def _written_url(root: Path, remote: str) -> str | None:
    """A remote's URL as written in .dvc/config.local or .dvc/config (DVC makes a relative one absolute)."""
    from configobj import ConfigObj  # DVC's own config reader

    for name in ("config.local", "config"):
        path = root / ".dvc" / name
        if path.exists():
            url = ConfigObj(str(path)).get(f'remote "{remote}"', {}).get("url")
            if url:
                return url
    return None


def shared_remote(root: Path) -> str:
    """The default DVC remote's URL, which every worker's checkout must reach: not a relative folder."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise NotShared("the project has no default DVC remote: workers push and pull through one; add a "
                            "shared one with `dvc remote add -d shared s3://bucket/path` and commit .dvc/config")
        url = _written_url(root, name) or repo.config["remote"][name]["url"]
    if "://" not in url and not os.path.isabs(url):
        raise NotShared(f"the default DVC remote {name!r} is {url}, a folder relative to each checkout: every "
                        f"worker would push to its own. Make a shared remote the default (`dvc remote add -d "
                        f"shared s3://bucket/path`, or an absolute path all machines mount) and commit .dvc/config")
    return url


def check_tracking_server(timeout_s: float = 10.0) -> str:
    """MLFLOW_TRACKING_URI must name a tracking server that answers: workers log their runs to it."""
    import httpx

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise NotShared(f"MLFLOW_TRACKING_URI is {redacted(uri) if uri else 'not set'}: each worker would keep its "
                        "runs in a store of its own temporary checkout. Start a shared server (`make "
                        "mlflow-server`) and export MLFLOW_TRACKING_URI=http://<its host>:5000 where the worker starts")
    # An API route, not /health: MLflow answers /health whatever the Host header, and refuses API calls
    # whose Host is not among the server's --allowed-hosts (403)
    probe = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        reply = httpx.get(probe, auth=mlflow_auth(uri), timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise NotShared(f"no MLflow tracking server answers at MLFLOW_TRACKING_URI={redacted(uri)} ({exc}); "
                        "start it (`make mlflow-server`) or fix the URI") from None
    if reply.status_code == 403 and "Host" in reply.text:
        raise NotShared(f"the MLflow server at {redacted(uri)} refuses this host name ({reply.text.strip()[:200]}): "
                        "start it with --allowed-hosts naming it (make mlflow-server ALLOWED_HOSTS=...)")
    if reply.status_code in (401, 403):
        raise mlflow_refusal(reply.status_code, uri, "searching its experiments")
    if reply.status_code != 200:
        raise NotShared(f"the MLflow server at {redacted(uri)} answered {reply.status_code} to an API call "
                        f"({reply.text.strip()[:200]})")
    return uri


def ensure_pool(name: str = POOL) -> None:
    """Create the process work pool ``name`` unless it exists (what `prefect work-pool create` does)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:  # another worker created it meanwhile
                pass
            return
    if pool.type != "process":
        raise NotShared(f"the work pool {name!r} on the Prefect server is of type {pool.type!r}, not 'process': "
                        f"the deployment runs the pipeline as a local process on each worker")


def start_worker(root: str = ".", pool: str = POOL, name: str | None = None, limit: int = 1) -> int:
    """``prefect worker start`` on ``pool`` after checking what its flow runs will need; runs until stopped."""
    from flows.serve import check_prefect_server

    if limit < 1:
        raise ValueError(f"--limit {limit}: a worker runs at least one flow run at a time")
    check_dependencies()
    mlflow_uri = check_tracking_server()
    remote = _reachable_remote(Path(root).resolve())
    api = check_prefect_server(what="workers")
    ensure_pool(pool)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}  # the pull step's bin/ddpm
    cmd = [str(Path(bin_dir) / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
           "--limit", str(limit)]
    if name:
        cmd += ["--name", name]
    print(f"worker on pool {pool!r} of {api} (at most {limit} flow run{'s' if limit > 1 else ''} at a time), "
          f"logging to {redacted(mlflow_uri)}, DVC remote {remote}; Ctrl+C stops", flush=True)
    return subprocess.call(cmd, cwd=root, env=env)


def _reachable_remote(root: Path) -> str:
    """The shared default remote, after one request to it with this machine's credentials."""
    from dvc.repo import Repo

    from flows import dvc_remote

    url = shared_remote(root)
    with Repo(str(root)) as repo:
        dvc_remote.probe(repo, "a worker's dvc pull")
    return url


def _repository(root: Path) -> str:
    """Where workers clone the project from: git's ``origin``, else this checkout's own folder."""
    out = subprocess.run(["git", "remote", "get-url", "origin"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else str(root)


def _check_pushed(root: Path, commit: str) -> None:
    """Workers clone the repository at ``commit``: it must be on a branch of origin."""
    out = subprocess.run(["git", "branch", "-r", "--contains", commit], cwd=root, capture_output=True, text=True)
    if out.returncode == 0 and not out.stdout.strip():
        raise NotShared(f"commit {commit[:12]} is not on origin (as far as this clone knows): workers clone it from "
                        "there; `git push` first (or `git fetch` if it was pushed from elsewhere)")


def deploy(root: str = ".", pool: str = POOL, repository: str | None = None) -> str:
    """``prefect deploy`` of prefect.yaml's deployment at this checkout's commit; returns the commit."""
    from flows import experiment, tracking
    from flows.serve import check_prefect_server

    root_path = Path(root).resolve()
    commit = tracking.git_commit(root_path)
    if commit is None:
        raise ValueError(f"{root_path} is not a git repository with a commit: workers clone the project at one")
    remote = shared_remote(root_path)
    check_prefect_server(what="deployments")
    ensure_pool(pool)
    if experiment.git_dirty(root_path):
        print(f"warning: tracked files differ from commit {commit[:12]}; workers run the commit, not them",
              file=sys.stderr)
    repository = repository or _repository(root_path)
    if repository != str(root_path):
        _check_pushed(root_path, commit)
    env = {**os.environ, "DDPM_REPOSITORY": repository, "DDPM_COMMIT": commit}
    cmd = [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--prefect-file",
           str(root_path / "prefect.yaml"), "--name", DEPLOYMENT, "--pool", pool]
    out = subprocess.run(cmd, cwd=root_path, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise ValueError(f"prefect deploy failed (exit {out.returncode}): {' '.join((out.stdout + out.stderr).split())[-1500:]}")
    print(f"deployed {DEPLOYMENT} on pool {pool!r}: commit {commit[:12]} of {redacted(repository)}; "
          f"DVC remote {remote}")
    return commit


def pull_inputs(root: str = ".") -> int:
    """``dvc pull`` of every output dvc.lock names that the shared remote has (the rest is reproduced)."""
    from dvc.repo import Repo

    from flows import dvc_remote
    from flows.dvc_cache import in_dir

    root_path = Path(root).resolve()
    remote = shared_remote(root_path)
    with in_dir(root_path), Repo(str(root_path)) as repo:
        dvc_remote.probe(repo, "dvc pull")
        fetched = repo.pull(allow_missing=True)["stats"]["fetched"]
    print(f"dvc pull from {remote}: {fetched} file{'' if fetched == 1 else 's'} fetched", flush=True)
    return fetched


def _push_experiment(root: Path, name: str) -> None:
    """Share the run's DVC experiment with the repository this checkout came from."""
    from flows.experiment import DVC

    out = subprocess.run([*DVC, "exp", "push", "origin", name], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        get_run_logger().warning("the DVC experiment %s stays on this worker: dvc exp push origin failed: %s",
                                 name, (out.stderr or out.stdout).strip()[-500:])
    else:
        print(f"pushed DVC experiment {name} to origin (dvc exp pull origin {name} fetches it)")


@flow(name=FLOW_NAME, log_prints=True)
def pipeline_at_commit(overrides: list[str] | None = None, study: str = "", recipe: str = "",
                       study_run_id: str = "") -> dict:
    """The pipeline in the checkout the deployment's pull steps made (the working directory), with
    ``overrides`` for this run only; ``study``/``recipe``/``study_run_id`` file it under a recipe study."""
    from flows.credentials import scrub_prefect_logs

    scrub_prefect_logs()
    check_dependencies()
    root = Path.cwd()
    # The stages run `ddpm` from this worker's environment: let it import this commit's code, not the
    # code the environment was installed from.
    os.environ["PYTHONPATH"] = str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")
    if study:
        os.environ.update(DDPM_STUDY=study, DDPM_RECIPE=recipe)
    if study_run_id:
        os.environ["DDPM_STUDY_RUN_ID"] = study_run_id
    from flows.pipeline import ddpm_pipeline

    out = ddpm_pipeline(root=str(root), overrides=list(overrides or []))
    if isinstance(out, dict) and out.get("experiment"):
        _push_experiment(root, out["experiment"])
    return out
