"""MLflow tracking for the stage commands.

Lineage: one MLflow run per trained model. ``ddpm train`` opens it (or
continues the run stored with the checkpoint it resumes from, or the one named
by ``MLFLOW_RUN_ID``) and records its id in ``<train.out_dir>/mlflow.json``;
``ddpm sample`` and ``ddpm evaluate`` log into the run of the model they used
and pass the id on in their own outputs. Because those files are DVC outputs,
a cached stage restores the id of the run that produced it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from ddpm.config import Config

RUN_FILE = "mlflow.json"
ENV_FLOW_RUN_ID = "DDPM_PREFECT_FLOW_RUN_ID"  # set by the Prefect flow for its stage subprocesses
ENV_STUDY_RUN_ID = "DDPM_STUDY_RUN_ID"  # set by `ddpm sweep` for each recipe's stages


def quiet_env() -> None:
    """Telemetry off for every tool (see shared STACK notes)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an SQLite store ``mlflow.db`` in the project root (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def client(root: str | Path = "."):
    import mlflow
    from mlflow import MlflowClient

    quiet_env()
    # Fail fast on an unreachable server; _with_retries below owns the waiting and backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def git_commit(root: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def read_run_file(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_run_file(directory: str | Path, info: dict[str, Any]) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _with_retries(what: str, fn, attempts: int = 5, first_delay_s: float = 1.0):
    """Call ``fn`` until it succeeds, with exponential backoff; a tracking server may be restarting."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # MLflow raises several types for an unreachable server
            if attempt == attempts:
                raise RuntimeError(f"MLflow: {what} failed after {attempts} attempts against "
                                   f"{tracking_uri()}: {exc}") from exc
            warnings.warn(f"MLflow: {what} failed ({exc}); retrying in {delay:.0f} s", stacklevel=2)
            time.sleep(delay)
            delay *= 2


def lineage_tags(root: str | Path, data_hash: str | None) -> dict[str, str]:
    tags = {"ddpm.git_commit": git_commit(root) or "unknown"}
    if data_hash:
        tags["ddpm.data_hash"] = data_hash
    if os.environ.get(ENV_FLOW_RUN_ID):
        tags["prefect.flow_run_id"] = os.environ[ENV_FLOW_RUN_ID]
    if os.environ.get(ENV_STUDY_RUN_ID):  # a recipe of `ddpm sweep`: a child of the study's run
        study, recipe = os.environ.get("DDPM_STUDY", ""), os.environ.get("DDPM_RECIPE", "")
        tags.update({"mlflow.parentRunId": os.environ[ENV_STUDY_RUN_ID], "ddpm.study_run_id": os.environ[ENV_STUDY_RUN_ID],
                     "ddpm.study": study, "ddpm.recipe": recipe, "mlflow.runName": f"{study}/{recipe}"})
    return tags


def start_train_run(root: str | Path, cfg: Config, data_hash: str, resume_run_id: str | None) -> str:
    """Open the run for a training: ``MLFLOW_RUN_ID``, else the resumed one, else a new one."""
    c = client(root)
    run_id = os.environ.get("MLFLOW_RUN_ID") or resume_run_id
    if run_id is None:
        exp_id = experiment_id(c, root, cfg.tracking.experiment)
        run_id = _with_retries("create run", lambda: c.create_run(exp_id, tags={"mlflow.source.name": "ddpm train"}).info.run_id)
    else:
        print(f"MLflow: continuing run {run_id}")
        _with_retries("reopen run", lambda: c.update_run(run_id, status="RUNNING"))
    params = {k: v for k, v in cfg.flat().items() if k.split(".")[0] in ("prepare", "model", "diffusion", "train", "tracking")}
    log_params(root, run_id, params)
    _with_retries("set tags", lambda: [c.set_tag(run_id, k, v) for k, v in lineage_tags(root, data_hash).items()])
    return run_id


def experiment_id(c, root: str | Path, name: str) -> str:
    exp = _with_retries("get experiment", lambda: c.get_experiment_by_name(name))
    if exp is not None:
        return exp.experiment_id
    location = None
    if "MLFLOW_TRACKING_URI" not in os.environ:  # the embedded store keeps artifacts beside it
        location = (Path(root).resolve() / "mlartifacts").as_uri()
    return _with_retries("create experiment", lambda: c.create_experiment(name, artifact_location=location))


def end_run(root: str | Path, run_id: str, status: str) -> None:
    """Mark a run FINISHED or FAILED; best effort, since this runs on the way out of an error."""
    try:
        client(root).set_terminated(run_id, status)
    except Exception as exc:
        warnings.warn(f"MLflow: could not mark run {run_id} {status}: {exc}")


def log_params(root: str | Path, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(root)
    batch = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
    for i in range(0, len(batch), 100):
        _with_retries("log params", lambda: c.log_batch(run_id, params=batch[i : i + 100]))


class MetricBuffer:
    """Live training metrics, sent as they come; kept while the server is unreachable.

    Best effort by design: ``sync_history`` at the end of training sends whatever
    is still missing, from the checkpointed history.
    """

    def __init__(self, root: str | Path, run_id: str):
        self.client, self.run_id, self.pending = client(root), run_id, []

    def add(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in values.items()]
        try:
            for i in range(0, len(self.pending), 1000):
                self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        except Exception as exc:
            warnings.warn(f"MLflow unreachable, keeping {len(self.pending)} metric points to send later ({exc})")
            return
        self.pending = []


def log_metrics(root: str | Path, run_id: str, values: dict[str, float], step: int = 0) -> None:
    """Log a few metrics now, retrying while the server is unreachable."""
    from mlflow.entities import Metric

    c, ts = client(root), int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in values.items()]
    _with_retries("log metrics", lambda: c.log_batch(run_id, metrics=batch))


TRAIN_METRICS = {"loss": "train_loss", "lr": "lr", "images_per_s": "images_per_s"}


def sync_history(root: str | Path, run_id: str, history: list[dict]) -> int:
    """Log every training record the run does not have yet; returns how many points were sent.

    Live logging may have missed points (server down) or a resumed process may have
    lost its buffer: the checkpointed history is the truth, and steps already on the
    server are not sent twice.
    """
    from mlflow.entities import Metric

    c = client(root)
    ts, missing = int(time.time() * 1000), []
    for src, key in TRAIN_METRICS.items():
        have = {m.step for m in _with_retries(f"read {key}", lambda: c.get_metric_history(run_id, key))}
        missing += [Metric(key, float(r[src]), ts, int(r["step"])) for r in history if r["step"] not in have]
    for i in range(0, len(missing), 1000):
        _with_retries("log metrics", lambda: c.log_batch(run_id, metrics=missing[i : i + 1000]))
    return len(missing)


def register_model(root: str | Path, run_id: str, model_path: str | Path, cfg: Config) -> str:
    """Log ``model.safetensors`` as a pyfunc in ``run_id`` and register a new version; returns it."""
    import mlflow

    from flows.mlflow_model import WEIGHTS, DDPMPyfunc

    client(root)
    with mlflow.start_run(run_id=run_id):
        info = _with_retries("log model", lambda: mlflow.pyfunc.log_model(
            name="model", python_model=DDPMPyfunc(), artifacts={WEIGHTS: str(model_path)},
            pip_requirements=["torch", "safetensors", "numpy", "pillow", "ddpm-pipeline"],
            registered_model_name=cfg.tracking.model_name))
    version = str(info.registered_model_version)
    print(f"registered {cfg.tracking.model_name} version {version} (run {run_id})")
    return version


def log_artifacts(root: str | Path, run_id: str, paths: list[str | Path], artifact_path: str | None = None) -> None:
    c = client(root)
    for p in paths:
        if Path(p).exists():
            _with_retries(f"log artifact {p}", lambda: c.log_artifact(run_id, str(p), artifact_path))


def registry_version(root: str | Path, ref: str):
    """The registered ModelVersion that ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` names."""
    from mlflow.exceptions import MlflowException

    c = client(root)
    body = ref[len("models:/"):]
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return c.get_model_version_by_alias(name, alias)
        name, version = body.rsplit("/", 1)
        return c.get_model_version(name, version)
    except (MlflowException, ValueError) as exc:
        raise FileNotFoundError(f"model {ref} is not in the registry at {tracking_uri(root)}: {exc}") from None


def resolve_model(root: str | Path, ref: str, download_dir: str | Path) -> tuple[Path, str | None]:
    """A model reference -> (local model.safetensors, the MLflow run that made it, if known).

    ``ref`` is a file path, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
    """
    if not ref.startswith("models:/"):
        path = Path(ref)
        if not path.exists():
            raise FileNotFoundError(f"model {path} not found: run `ddpm train` first, or pass models:/<name>@<alias>")
        info = read_run_file(path.parent)
        return path, info["run_id"] if info else None
    import mlflow

    mv = registry_version(root, ref)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(download_dir))
    weights = next(Path(local).rglob("model.safetensors"), None)
    if weights is None:
        raise FileNotFoundError(f"model {ref} (version {mv.version}) holds no model.safetensors")
    return weights, mv.run_id
