"""MLflow tracking for the stage commands.

Lineage: one MLflow run per trained model. ``ddpm train`` opens it (or
continues the run stored with the checkpoint it resumes from, or the one named
by ``MLFLOW_RUN_ID``) and records its id in ``<train.out_dir>/mlflow.json``;
``ddpm sample`` and ``ddpm evaluate`` log into the run of the model they used
and pass the id on in their own outputs. Because those files are DVC outputs,
a cached stage restores the id of the run that produced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from ddpm.config import Config
from flows import model_safety
from flows.credentials import scrub
from flows.tracking_outage import redacted

RUN_FILE = "mlflow.json"
# What the logged pyfunc needs where it is loaded (the ddpm library itself travels in the model as code)
PYFUNC_REQUIREMENTS = ["torch", "numpy", "safetensors", "pyyaml", "tqdm", "pillow"]
ENV_FLOW_RUN_ID = "DDPM_PREFECT_FLOW_RUN_ID"  # set by the Prefect flow for its stage subprocesses
ENV_STUDY_RUN_ID = "DDPM_STUDY_RUN_ID"  # set by `ddpm sweep` for each recipe's stages
ENV_DVC_EXPERIMENT = "DDPM_DVC_EXPERIMENT"  # set by the Prefect flow: the DVC experiment it will save


def quiet_env() -> None:
    """Telemetry off for every tool (see shared STACK notes)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def project_root(root: str | Path = ".") -> Path:
    """The project a stage belongs to. ``dvc exp run --temp`` and ``--queue`` run stages in a copy under
    ``<project>/.dvc/tmp/exps/``; their runs, artifacts and registered models belong to the project's own
    store, not to a throwaway one in the copy."""
    path = Path(root).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def artifact_root(root: str | Path = ".") -> str | None:
    """Where new experiments keep their artifacts: for an SQLite store, ``mlartifacts/`` beside its database
    file (the default store: ``<project>/mlartifacts``); None for any other store, whose server decides."""
    uri = tracking_uri(root)
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an SQLite store ``mlflow.db`` in the project root (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


def client(root: str | Path = "."):
    import mlflow
    from mlflow import MlflowClient

    quiet_env()
    # Transient server errors (connection refused, 429, 5xx) are retried by MLflow's own HTTP client with
    # exponential backoff: MLFLOW_HTTP_REQUEST_MAX_RETRIES (default 7), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR
    # (2: 2, 4, ... 128 s, ~4 min in all), MLFLOW_HTTP_REQUEST_TIMEOUT (120 s). A permanent error (a 4xx such
    # as a param conflict) fails at once. Set them in the environment to change them.
    _show_http_retries()
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def _show_http_retries() -> None:
    """urllib3 logs each retry ("Retrying (Retry(total=6, ...)) after connection broken by ...") to a logger
    with only a NullHandler: without this a run waiting for a restarting server would look hung."""
    import logging

    log = logging.getLogger("urllib3.connectionpool")
    if not any(getattr(h, "_ddpm", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("MLflow HTTP: %(message)s"))
        handler.setLevel(logging.WARNING)
        handler._ddpm = True
        log.addHandler(handler)


def git_commit(root: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def read_run_file(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def verified_run_file(root: str | Path, directory: str | Path) -> dict[str, Any] | None:
    """:func:`read_run_file`, with the ids checked against the current tracking store.

    ``mlflow.json`` travels with DVC outputs (a fresh clone's ``dvc pull``, an experiment applied elsewhere),
    but the ids in it belong to the store that wrote it. A run the store does not hold is dropped (the stage
    then logs into a new run, tagged with the old id); a registered version whose run is not this run is
    dropped too, so the promotion gate never acts on another model that happens to have the same number."""
    info = read_run_file(directory)
    if not info or not info.get("run_id"):
        return info
    from mlflow.exceptions import MlflowException

    c, where = client(root), f"{Path(directory) / RUN_FILE}"
    try:
        c.get_run(info["run_id"])
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        print(f"MLflow: {where} names run {info['run_id']}, which the tracking store {redacted(tracking_uri(root))} does not "
              f"hold (outputs pulled from DVC, or another store): its stages log into a new run")
        return {**info, "run_id": None, "model_version": None, "stale_run_id": info["run_id"]}
    if info.get("model_version"):
        name, version = info.get("model_name"), str(info["model_version"])
        try:
            owner = c.get_model_version(name, version).run_id
        except MlflowException:
            owner = None
        if owner != info["run_id"]:
            print(f"MLflow: {where} names {name} version {version}, which in {redacted(tracking_uri(root))} "
                  f"{'belongs to run ' + owner if owner else 'does not exist'}, not to run {info['run_id']}: "
                  f"no registered version is used for it")
            return {**info, "model_version": None}
    return info


def start_stage_run(root: str | Path, cfg: Config, stage: str, stale_run_id: str | None = None) -> str:
    """A new run for a stage whose model has no run in this store (see :func:`verified_run_file`)."""
    c = client(root)
    tags = {"mlflow.source.name": f"ddpm {stage}", **lineage_tags(root, None)}
    if stale_run_id:
        tags["ddpm.run_id_elsewhere"] = stale_run_id
    return c.create_run(experiment_id(c, root, cfg.tracking.experiment), tags=tags).info.run_id


def write_run_file(directory: str | Path, info: dict[str, Any]) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def lineage_tags(root: str | Path, data_hash: str | None) -> dict[str, str]:
    from flows.experiment import git_dirty

    dirty = git_dirty(Path(root))
    tags = {"ddpm.git_commit": git_commit(root) or "unknown", "ddpm.git_dirty": "unknown" if dirty is None else str(dirty).lower()}
    if os.environ.get(ENV_DVC_EXPERIMENT):
        tags["ddpm.dvc_experiment"] = os.environ[ENV_DVC_EXPERIMENT]
    if data_hash:
        tags["ddpm.data_hash"] = data_hash
    if os.environ.get(ENV_FLOW_RUN_ID):
        tags["prefect.flow_run_id"] = os.environ[ENV_FLOW_RUN_ID]
    if os.environ.get(ENV_STUDY_RUN_ID):  # a recipe of `ddpm sweep`: a child of the study's run
        study, recipe = os.environ.get("DDPM_STUDY", ""), os.environ.get("DDPM_RECIPE", "")
        tags.update({"mlflow.parentRunId": os.environ[ENV_STUDY_RUN_ID], "ddpm.study_run_id": os.environ[ENV_STUDY_RUN_ID],
                     "ddpm.study": study, "ddpm.recipe": recipe, "mlflow.runName": f"{study}/{recipe}"})
    return tags


def log_dataset(root: str | Path, run_id: str, cfg: Config, manifest: dict) -> None:
    """The prepared data as the run's input (the UI's "Datasets used"): digest = its content hash, source =
    the DVC output path at this git commit, profile = the counts and shape from its manifest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = {"dvc_path": cfg.prepare.out_dir, "git_commit": git_commit(root) or "unknown",
              "prepared_from": manifest.get("source", {})}
    profile = {"shape": manifest.get("shape"), "classes": len(manifest.get("classes") or []),
               **{f"{split}_images": info.get("count") for split, info in manifest.get("splits", {}).items()}}
    name = f"{cfg.prepare.source}-{Path(cfg.prepare.source_path).name or cfg.prepare.hub_id}-{cfg.prepare.resolution}px"
    ds = Dataset(name=name, digest=manifest["content_hash"][:12], source_type="dvc", source=scrub(json.dumps(source)),
                 profile=json.dumps(profile))
    client(root).log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", "training")])])


def start_train_run(root: str | Path, cfg: Config, data_hash: str, resume_run_id: str | None) -> str:
    """Open the run for a training: ``MLFLOW_RUN_ID``, else the resumed one, else a new one."""
    c = client(root)
    run_id = os.environ.get("MLFLOW_RUN_ID") or resume_run_id
    if run_id is None:
        exp_id = experiment_id(c, root, cfg.tracking.experiment)
        run_id = c.create_run(exp_id, tags={"mlflow.source.name": "ddpm train"}).info.run_id
    else:
        print(f"MLflow: continuing run {run_id}")
        c.update_run(run_id, status="RUNNING")
    params = {k: v for k, v in cfg.flat().items() if k.split(".")[0] in ("prepare", "model", "diffusion", "train", "tracking")}
    log_params(root, run_id, params)
    from mlflow.entities import RunTag

    c.log_batch(run_id, tags=[RunTag(k, v) for k, v in lineage_tags(root, data_hash).items()])
    return run_id


# The UI opens an experiment in the view its kind names; without it MLflow 3 guesses, and shows GenAI tabs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(c, root: str | Path, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if "mlflow.experimentKind" not in exp.tags:  # made by an older version of the project
            c.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    # Not MLflow's default (./mlruns of whatever directory creates the experiment). Not read from whether
    # MLFLOW_TRACKING_URI is set: mlflow.set_tracking_uri() sets it. An experiment keeps the location it was
    # created with (MLflow cannot move it): one made under ./mlruns by an older version stays there.
    return c.create_experiment(name, artifact_location=artifact_root(root), tags=EXPERIMENT_KIND)


def end_run(root: str | Path, run_id: str, status: str) -> None:
    """Mark a run FINISHED, FAILED or KILLED; best effort, since this runs on the way out of an error."""
    try:
        client(root).set_terminated(run_id, status)
    except Exception as exc:
        warnings.warn(f"MLflow: could not mark run {run_id} {status}: {exc}")


def log_params(root: str | Path, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(root)
    batch = [Param(k, scrub(json.dumps(v) if isinstance(v, (list, dict)) else str(v))) for k, v in params.items()]
    for i in range(0, len(batch), 100):
        c.log_batch(run_id, params=batch[i : i + 100])


@contextlib.contextmanager
def _one_try():
    """MLflow's HTTP client without its retries (it reads the variable on every request)."""
    old = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = old


@contextlib.contextmanager
def system_metrics(root: str | Path, run_id: str, resume: bool = False):
    """MLflow's system metrics (CPU, memory, disk, network; GPU with pynvml) into the run while training; the
    UI's "System metrics" tab. MLflow's variables apply: ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (s,
    default here 10), ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns them off."""
    from mlflow.environment_variables import (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING,
                                              MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL)
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    interval_s = MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10.0

    if os.environ.get(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.name, "true").lower() in ("false", "0"):
        yield
        return
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume,
                                   tracking_uri=tracking_uri(root))
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


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
            with _one_try():  # training must not wait minutes in MLflow's backoff for a live point
                for i in range(0, len(self.pending), 1000):
                    self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        except Exception as exc:
            warnings.warn(f"MLflow unreachable, keeping {len(self.pending)} metric points to send later ({exc})")
            return
        self.pending = []


def log_metrics(root: str | Path, run_id: str, values: dict[str, float], step: int = 0,
                model_id: str | None = None) -> None:
    """Log a few metrics now (MLflow's HTTP client retries while a server is unreachable); with ``model_id``
    they are also the metrics of that logged model."""
    from mlflow.entities import Metric

    c, ts = client(root), int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step, model_id=model_id) for k, v in values.items()]
    c.log_batch(run_id, metrics=batch)


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
        have = {m.step for m in c.get_metric_history(run_id, key)}
        missing += [Metric(key, float(r[src]), ts, int(r["step"])) for r in history if r["step"] not in have]
    for i in range(0, len(missing), 1000):
        c.log_batch(run_id, metrics=missing[i : i + 1000])
    return len(missing)


def register_model(root: str | Path, run_id: str, model_path: str | Path, cfg: Config) -> str:
    """Log ``model.safetensors`` as a pyfunc from code in ``run_id`` and register a new version; returns it.

    Models from code: the logged model holds ``flows/mlflow_model.py``, the ``ddpm`` library and the weights,
    no pickle; ``model_config`` carries the run's sample settings (the params' defaults)."""
    import mlflow

    from ddpm.export import load_model
    from flows import mlflow_model

    c = client(root)
    done = c.search_model_versions(f"name='{cfg.tracking.model_name}' and run_id='{run_id}'")
    if done:  # a rerun after the server dropped the reply to the registration: the version exists
        version = str(max(int(mv.version) for mv in done))
        print(f"{cfg.tracking.model_name} version {version} is already registered for run {run_id}; not again")
        return version
    c.set_tag(run_id, model_safety.WEIGHTS_TAG, model_safety.sha256_of(model_path))  # checked by every loader
    unet = load_model(model_path).unet.config
    shape = (unet["channels"], unet["resolution"], unet["resolution"])
    sample = {k: v for k, v in dataclasses.asdict(cfg.sample).items()
              if k in ("sampler", "steps", "eta", "timestep_spacing", "clip_x0", "batch_size", "seed", "mixed_precision")}
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=mlflow_model.__file__, artifacts={mlflow_model.WEIGHTS: str(model_path)},
            code_paths=[str(Path(__file__).resolve().parents[1] / "ddpm")], model_config=sample,
            signature=mlflow_model.signature(sample, shape), pip_requirements=PYFUNC_REQUIREMENTS,
            input_example=({"num_samples": [1]}, {"steps": 1}),  # MLflow checks it predicts; one sample, one step
            registered_model_name=cfg.tracking.model_name)
    version = str(info.registered_model_version)
    print(f"registered {cfg.tracking.model_name} version {version} (run {run_id})")
    return version


def log_artifacts(root: str | Path, run_id: str, paths: list[str | Path], artifact_path: str | None = None) -> None:
    c = client(root)
    for p in paths:
        if Path(p).exists():
            c.log_artifact(run_id, str(p), artifact_path)


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
        from flows.credentials import refusal

        refused = refusal(exc)
        if refused is not None:  # the server refused the credentials: not a missing model
            raise refused from None
        raise FileNotFoundError(f"model {ref} is not in the registry at {redacted(tracking_uri(root))}: {exc}") from None


def resolve_model(root: str | Path, ref: str, download_dir: str | Path) -> tuple[Path, str | None]:
    """A model reference -> (local model.safetensors, the MLflow run that made it, if known).

    ``ref`` is a file path, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
    """
    if not ref.startswith("models:/"):
        path = Path(ref)
        if not path.exists():
            raise FileNotFoundError(f"model {path} not found: run `ddpm train` first, or pass models:/<name>@<alias>")
        info = verified_run_file(root, path.parent)
        return path, info["run_id"] if info else None
    mv, _, weights = _download_checked(root, ref, download_dir)
    return weights, mv.run_id


def load_pyfunc(ref: str, root: str | Path = ".", download_dir: str | Path | None = None):
    """``mlflow.pyfunc.load_model`` for a registered version, after the checks every loader of the project
    makes (no pickle unless ``DDPM_TRUST_PICKLES=1``, the weights' sha256 as logged): MLflow's own loader
    unpickles whatever a version holds before any of this project's code runs. The checked copy is loaded."""
    import tempfile

    import mlflow

    _, local, _ = _download_checked(root, ref, download_dir or tempfile.mkdtemp(prefix="ddpm-model-"))
    return mlflow.pyfunc.load_model(str(local))


def _download_checked(root: str | Path, ref: str, download_dir: str | Path):
    """Download the version ``ref`` names; raises :class:`model_safety.UnsafeModel` or FileNotFoundError
    before anything in it is loaded. Returns (ModelVersion, local folder, its model.safetensors)."""
    import mlflow

    mv = registry_version(root, ref)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                     dst_path=str(download_dir)))
    weights = next(local.rglob("model.safetensors"), None)
    model_safety.check_version(ref, mv.version, local, weights, _logged_sha256(root, mv.run_id))
    if weights is None:
        raise FileNotFoundError(f"model {ref} (version {mv.version}) holds no model.safetensors: nothing is loaded")
    return mv, local, weights


def _logged_sha256(root: str | Path, run_id: str | None) -> str | None:
    """The weights' sha256 the run logged when it registered them (None: a version registered before the
    project logged it, or a run no longer in the store)."""
    from mlflow.exceptions import MlflowException

    try:
        return client(root).get_run(run_id).data.tags.get(model_safety.WEIGHTS_TAG) if run_id else None
    except MlflowException:
        return None
