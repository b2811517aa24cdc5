"""The Prefect flow: prepare -> train -> sample -> reference -> evaluate, as one pipeline with DVC.

Each task reproduces its DVC stage (``dvc.repo.Repo.reproduce(stage)``), so DVC
decides what is stale, runs the stage's ``ddpm`` command, caches its outputs and
writes ``dvc.lock``: after a flow run ``dvc status`` is clean, and a second run
with unchanged inputs skips every stage. Stages run one at a time (DVC locks
the workspace). The flow ends by pushing outputs to the default DVC remote and
publishing a markdown artifact with the metrics and where the results are.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import CancelledRun
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings
from prefect.states import Cancelled

from ddpm import config as config_mod
from flows import dvc_cache, experiment, tracking, workspace_lock
from flows.credentials import scrub, scrub_prefect_logs
from flows.signals import Stopped, signal_of, stop_process_group
from flows.tracking_outage import redacted
from flows.stage_failure import StageFailed, StageTimedOut, classify

STAGES = config_mod.PIPELINE_STAGES
# Retries per stage. A retried train stage resumes from its newest checkpoint and MLflow run.
RETRIES = {"prepare": 1, "train": 2, "sample": 1, "reference": 1, "evaluate": 1}
RETRY_DELAY_S = [5, 30]
# A stopped stage gets this long after SIGTERM (training writes its checkpoint), then SIGKILL: less than the
# 30 s a Prefect runner gives a cancelled flow run's process before it kills that in turn.
STOP_GRACE_S = 20


def apply_overrides_to_params(params_path: str | Path, overrides: list[str]) -> None:
    """Validate ``section.key=value`` overrides, then write them into params.yaml, keeping its
    comments (what ``dvc exp run -S`` does). An invalid override writes nothing."""
    if not overrides:
        return
    config_mod.load(params_path, overrides)  # raises ConfigError naming the bad key before any write
    from ruamel.yaml import YAML

    yaml = YAML()
    path = Path(params_path)
    doc = yaml.load(path.read_text())
    for text in overrides:
        section, key, value = config_mod.parse_override(text)
        doc.setdefault(section, {})[key] = value
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        yaml.dump(doc, f)
    tmp.replace(path)


_PROGRESS_EVERY_S = 15.0  # a progress bar's line reaches the task log at most this often


def _retry_unless_deterministic(task, task_run, state) -> bool:
    return not (isinstance(state.data, StageFailed) and state.data.deterministic)


def _stream(proc: subprocess.Popen, logger, lines: deque) -> None:
    """The stage's output into the Prefect task log (which Prefect also prints here): every finished
    line, and a progress bar's state every 15 s rather than every redraw."""
    pending, last_progress = b"", 0.0
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
        pending += chunk
        *parts, pending = re.split(rb"(\r|\n)", pending)
        for text, sep in zip(parts[0::2], parts[1::2]):
            line = text.decode(errors="replace").rstrip()
            if not line:
                continue
            if sep == b"\n":
                logger.info(line)
                lines.append(line)
            elif time.monotonic() - last_progress > _PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                logger.info(line)
    if pending.strip():
        lines.append(pending.decode(errors="replace").strip())
        logger.info(lines[-1])


@task(name="reproduce-stage", task_run_name="{stage}", cache_policy=None, log_prints=True,
      retry_condition_fn=_retry_unless_deterministic)
def reproduce_stage(root: str, stage: str, timeout_s: int = 0) -> dict:
    """Bring one DVC stage up to date (``dvc repro --single-item <stage>``), its output streamed into
    the task log; returns whether it ran and how long it took. Raises :class:`StageFailed`, and
    :class:`StageTimedOut` past ``timeout_s`` (Prefect's task timeout, set from params). Stopped (SIGTERM,
    Ctrl-C, a cancellation), it stops the stage's processes and ends Cancelled."""
    logger = get_run_logger()
    logger.info("stage %s: checking with DVC", stage)
    t0 = time.perf_counter()
    lines: deque = deque(maxlen=5000)  # finished lines; progress bars redraw with \r and are not kept
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _stream(proc, logger, lines)
        proc.wait()
    except BaseException as exc:  # a timeout, Ctrl-C, SIGTERM, a cancellation: stop the whole stage
        signum, elapsed = signal_of(exc), time.perf_counter() - t0
        drain = threading.Thread(target=_stream, args=(proc, logger, lines), daemon=True)
        drain.start()  # what the stage says while it stops ("stopped at step N; checkpoint ... written")
        stop_process_group(proc, STOP_GRACE_S)
        drain.join(timeout=5)
        if timeout_s and signum is None and (isinstance(exc, TimeoutError) or elapsed >= timeout_s - 1):
            raise StageTimedOut(stage, f"pipeline.{stage}_timeout_s", timeout_s) from None
        if signum is not None:  # the task run ends Cancelled (not Crashed), saying so
            return Cancelled(message=str(_stopped_during(stage, signum)))
        raise
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise classify(stage, list(lines))
    ran = any(ln.startswith(f"Running stage '{stage}'") for ln in lines)
    logger.info("stage %s: %s in %.1f s", stage, "reproduced" if ran else "up to date, skipped", seconds)
    return {"stage": stage, "ran": ran, "seconds": round(seconds, 1)}


def _put_back(root: Path, stage: str, before: dict) -> None:
    restored, problems = experiment.put_back_outputs(root, stage, before)
    logger = get_run_logger()
    if restored:
        logger.info("stage %s did not finish: its outputs are back as before the run: %s", stage, ", ".join(restored))
    for problem in problems:
        logger.warning("stage %s did not finish; putting back its outputs: %s", stage, problem)


def _stopped_during(stage: str, signum: int) -> Stopped:
    return Stopped(signum, f"during stage {stage}; " + (
        "the next pipeline run resumes training from its newest checkpoint, in the same MLflow run"
        if stage == "train" else "the next pipeline run runs it again"))


def _retry_unless_corrupt(task, task_run, state) -> bool:
    """A corrupt cache, missing credentials or a missing bucket stay so; an unreachable remote may come back."""
    from flows.dvc_remote import RemoteUnavailable

    if isinstance(state.data, RemoteUnavailable):
        return not state.data.deterministic
    return not isinstance(state.data, dvc_cache.CorruptCache)


@task(name="push-to-dvc-remote", cache_policy=None, retries=1, retry_delay_seconds=5,
      retry_condition_fn=_retry_unless_corrupt)
def push_outputs(root: str) -> int:
    """``dvc push`` to the default remote, checked (:func:`flows.dvc_cache.push`), so a fresh clone can
    ``dvc pull`` the results. A corrupt cache file is not retried; a remote left short is, once."""
    pushed = dvc_cache.push(Path(root))
    get_run_logger().info("dvc push: %s files pushed to the default remote", pushed)
    return pushed


def _alias(root: Path, name: str, alias: str):
    try:
        return tracking.client(root).get_model_version_by_alias(name, alias)
    except Exception:  # no such alias (yet), or the registry is unreachable: the report says less
        return None


def _report(root: Path, cfg, results: list[dict], saved: str | None, overrides: list[str]) -> str:
    metrics_path = root / cfg.evaluate.metrics_path
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    run = tracking.read_run_file(root / cfg.train.out_dir) or {}
    lines = ["# DDPM pipeline", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {'ran' if r['ran'] else 'up to date'} | {r['seconds']} |" for r in results]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## Where to look", "",
              f"- sample grid: `{(root / cfg.sample.out_dir / 'grid.png').resolve()}`",
              f"- model: `{(root / cfg.train.out_dir / 'model.safetensors').resolve()}`",
              f"- MLflow run: `{run.get('run_id')}` in `{redacted(tracking.tracking_uri(root))}`",
              f"- registered model: `models:/{run.get('model_name')}/{run.get('model_version')}`"]
    if saved:
        lines.append(f"- DVC experiment: `{saved}` (`dvc exp show`; here `dvc exp apply {saved}` restores its params, "
                     f"dvc.lock, metrics and outputs; in another clone, after `dvc exp push origin {saved}`: "
                     f"`dvc exp pull origin {saved} && dvc exp branch {saved} <branch> && git checkout <branch> "
                     "&& dvc pull`)")
    if overrides:
        lines.append(f"- overrides, for this run only: `{' '.join(overrides)}`; params.yaml and the workspace are "
                     "back as they were")
    if run.get("model_name"):
        for alias in ("champion", "candidate"):
            mv = _alias(root, run["model_name"], alias)
            if mv is not None:
                note = f" ({mv.tags.get('ddpm.promotion')})" if alias == "candidate" and mv.tags.get("ddpm.promotion") else ""
                lines.append(f"- {alias}: `models:/{run['model_name']}@{alias}` = version {mv.version}{note}")
    return "\n".join(lines) + "\n"


@flow(name="ddpm-pipeline", log_prints=True)
def ddpm_pipeline(root: str = ".", overrides: list[str] | None = None, push: bool = True) -> dict:
    """Run every stage that DVC finds stale; ``overrides`` are ``section.key=value`` strings. A run that
    changes results is saved as a DVC experiment; overrides hold for this run only (flows/experiment.py)."""
    from prefect.runtime import flow_run

    scrub_prefect_logs()  # no password or key from the environment reaches the flow's logs
    root_path = Path(root).resolve()
    overrides = list(overrides or [])
    with workspace_lock.hold(root_path, flow_run.name):  # refused at once if another run holds the workspace
        config_mod.load(root_path / "params.yaml", overrides)  # a bad override fails before anything is written
        recorded = tracking.git_commit(root_path) is not None
        before = experiment.snapshot(root_path)  # what a failed stage or the overrides' undoing puts back
        name = experiment.experiment_name(flow_run.name) if recorded else None
        try:
            out = _run_stages(root_path, overrides, push, name, str(flow_run.id) if flow_run.id else None, before)
        except BaseException as exc:  # SIGTERM, Ctrl-C, a cancellation from the UI or API: the run ends Cancelled
            signum = signal_of(exc)
            if signum is None:
                raise
            stopped = exc if isinstance(exc, Stopped) else Stopped(signum)
            get_run_logger().warning("%s", stopped)
            return Cancelled(message=str(stopped))
        finally:
            if overrides:  # overrides never outlive their run, failed or not
                problems = experiment.restore(root_path, before)
                for problem in problems:
                    get_run_logger().warning("restoring the workspace: %s", problem)
    return out


def _run_stages(root: Path, overrides: list[str], push: bool, name: str | None, flow_run_id: str | None,
                before: dict) -> dict:
    params = root / "params.yaml"
    apply_overrides_to_params(params, overrides)
    cfg = config_mod.load(params)
    if flow_run_id:
        os.environ[tracking.ENV_FLOW_RUN_ID] = flow_run_id
    if name:
        os.environ[tracking.ENV_DVC_EXPERIMENT] = name
    tracking.quiet_env()
    # The stages call bin/ddpm, which runs the project's .venv/bin/ddpm, or without one the `ddpm` on
    # PATH: make that the one beside this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    results = []
    for stage in STAGES:
        limit = cfg.pipeline.timeout_s(stage) or None
        task_fn = reproduce_stage.with_options(retries=RETRIES[stage], retry_delay_seconds=RETRY_DELAY_S,
                                               timeout_seconds=limit)
        try:
            state = task_fn(str(root), stage, limit or 0, return_state=True)
            if state.is_cancelled():  # the task stopped the stage and said why
                raise Stopped.from_message(state.message or "")
            results.append(state.result())  # raises what failed the stage
        except BaseException as exc:  # DVC deleted the stage's outputs before running it: bring them back
            _put_back(root, stage, before)
            if isinstance(exc, Stopped):
                raise
            signum = signal_of(exc)
            if signum is not None:
                raise _stopped_during(stage, signum) from None
            raise
    pushed = push_outputs(str(root)) if push else 0
    saved = None
    if name and any(r["ran"] for r in results):
        try:
            saved = experiment.save(root, name)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:  # the results stand; only the record is missing
            get_run_logger().warning("this run is not recorded as a DVC experiment: %s", exc)
    report = scrub(_report(root, cfg, results, saved, overrides))
    create_markdown_artifact(report, key="ddpm-pipeline-report", description="metrics and where the results are")
    print(report)
    metrics_path = root / cfg.evaluate.metrics_path
    return {"stages": results, "pushed": pushed, "report": report, "experiment": saved,
            "metrics": json.loads(metrics_path.read_text()) if metrics_path.exists() else {},
            "run": tracking.read_run_file(root / cfg.train.out_dir)}


TEMPORARY_SERVER_STARTUP_S = 120  # Prefect's default, 20 s, is too short for a loaded 2-core machine


def _patient_temporary_server():
    """Give the temporary (ephemeral) Prefect server 120 s to start, unless the user set the limit."""
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: TEMPORARY_SERVER_STARTUP_S})


def run_pipeline(root: str = ".", params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Entry point of ``ddpm pipeline``: validates first so a bad override fails before Prefect starts."""
    tracking.quiet_env()
    if Path(params).resolve() != (Path(root) / "params.yaml").resolve():
        raise config_mod.ConfigError("the pipeline reads params.yaml in the project root (DVC does too); "
                                     f"--params {params} is not supported here")
    config_mod.load(params, overrides)
    with workspace_lock.hold(root), _patient_temporary_server():  # busy: refused before a Prefect server starts
        try:
            return ddpm_pipeline(root=root, overrides=overrides or [])
        except CancelledRun as exc:  # the flow run ended Cancelled: say why, and exit as the signal would
            raise Stopped.from_message(str(exc)) from None
        except RuntimeError as exc:
            if "ephemeral Prefect API server" not in str(exc):
                raise
            from flows.serve import ServerUnavailable

            limit = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
            raise ServerUnavailable(
                f"the temporary Prefect server did not answer within {limit:g} s "
                f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); nothing ran. On a busy machine raise it, "
                f"or start a server once with `make prefect-server` and set PREFECT_API_URL") from None
