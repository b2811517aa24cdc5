"""The ``ddpm`` command: one subcommand per pipeline stage, plus ``pipeline``.

Each stage subcommand reads ``params.yaml`` (``-S section.key=value`` overrides
it in memory), runs one pure function from ``ddpm``, and logs to MLflow.
``dvc.yaml`` runs these same subcommands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ddpm import config as config_mod
from ddpm.config import Config, ConfigError
from flows.stage_failure import StageFailed
from flows.dvc_cache import CorruptCache, PushIncomplete
from flows.dvc_remote import RemoteUnavailable
from flows.launch import RanksFailed
from flows.mlflow_server import BackendUnavailable
from flows.serve import ServerUnavailable
from flows.tracking_outage import TrackingUnavailable
from flows.signals import Stopped, StopRequest, stop_on_signals
from flows.workspace_lock import WorkspaceBusy

EXIT_USAGE = 2


def _load(args) -> Config:
    return config_mod.load(args.params, args.set)


def _tracked(args) -> bool:
    return not args.no_track and os.environ.get("DDPM_TRACKING", "1") != "0"


def cmd_prepare(args) -> None:
    from ddpm.prepare import prepare

    prepare(_load(args).prepare)


def cmd_train(args) -> None:
    """SIGTERM or SIGINT: the step in progress ends, a checkpoint is written, the MLflow run ends KILLED,
    and the command exits 128 + the signal; the next run resumes from that step in the same MLflow run.
    With train.nproc_per_node x train.nnodes > 1 it starts the ranks through torchrun (flows/launch.py),
    each running this command again: rank 0 as below, the others training only."""
    from ddpm import distributed

    cfg = _load(args)
    if cfg.train.world_size > 1 and not distributed.launched():
        from flows.launch import launch_ranks

        launch_ranks(args, cfg)
        return
    request = StopRequest()
    with stop_on_signals(graceful=request):
        _train(args, cfg, request, distributed.current().main)


def _train(args, cfg: Config, request: StopRequest, main_rank: bool) -> None:
    from ddpm.prepare import load_manifest
    from ddpm.train import TrainingStopped, checkpoint_dir, train
    from flows.tracking import write_run_file

    prepared = cfg.prepare.out_dir
    if not _tracked(args) or not main_rank:
        try:
            result = train(cfg, prepared, fresh=args.fresh, stop=request)
        except TrainingStopped as exc:
            raise Stopped(request.signum, str(exc)) from None
        if not main_rank:
            return
        summary = _train_summary(result)
        write_run_file(cfg.train.out_dir, {**summary, "run_id": None})
        return
    from flows import tracking

    # The run id sits beside the checkpoints, so a rerun after a crash continues the same run.
    ckpt_dir = checkpoint_dir(cfg, prepared)
    previous = None if args.fresh else tracking.verified_run_file(".", ckpt_dir)
    if previous is not None and previous.get("run_id") is None:  # the store changed since the checkpoint
        previous = None
    manifest = load_manifest(prepared)
    run_id = tracking.start_train_run(".", cfg, manifest["content_hash"], (previous or {}).get("run_id"))
    if previous is None:  # a resumed run logged its input already
        tracking.log_dataset(".", run_id, cfg, manifest)
    write_run_file(ckpt_dir, {"run_id": run_id})
    buffer = tracking.MetricBuffer(".", run_id)

    def callback(event: dict) -> None:
        if event["event"] == "log":
            buffer.add({key: event[src] for src, key in tracking.TRAIN_METRICS.items()}, step=event["step"])
        elif event["event"] == "start":
            buffer.add({"num_parameters": event["num_parameters"]}, step=event["step"])
        elif event["event"] == "checkpoint":
            log_grid(event["step"], event["path"])

    log_grid = _grid_logger(cfg, prepared, run_id)

    try:
        with tracking.system_metrics(".", run_id, resume=previous is not None):
            result = train(cfg, prepared, callback=callback, fresh=args.fresh, stop=request)
    except TrainingStopped as exc:
        tracking.end_run(".", run_id, "KILLED")
        raise Stopped(request.signum, f"{exc} (MLflow run {run_id} KILLED; it continues then)") from None
    except BaseException as exc:
        tracking.end_run(".", run_id, "KILLED" if isinstance(exc, (Stopped, KeyboardInterrupt)) else "FAILED")
        raise
    try:
        version = _register(args, cfg, run_id, result)
    except Exception as exc:
        _explain_outage(exc, cfg, run_id, f"registering the model (training finished: {result.steps} steps, "
                                          f"the final checkpoint in {ckpt_dir})")
        raise
    write_run_file(cfg.train.out_dir, {**_train_summary(result), "run_id": run_id,
                                       "model_name": cfg.tracking.model_name, "model_version": version})


def _register(args, cfg: Config, run_id: str, result) -> str:
    """The trained run's last records (the metric points live logging missed, the loss table), then a new
    registered version of its model; returns the version."""
    from flows import tracking

    sent = tracking.sync_history(".", run_id, result.history)
    if sent:
        print(f"MLflow: sent {sent} metric points that live logging had missed")
    tracking.log_artifacts(".", run_id, [result.loss_csv, args.params])
    tracking.log_metrics(".", run_id, {"train_seconds": round(result.seconds, 1)}, step=result.steps)
    tracking.client(".").set_tag(run_id, "ddpm.device", result.device)
    return tracking.register_model(".", run_id, result.model_path, cfg)


def _explain_outage(exc: Exception, cfg: Config, run_id: str, doing: str) -> None:
    """If ``exc`` is the tracking server not answering, raise :class:`TrackingUnavailable` saying what is
    kept and what to do; any other error is left to the caller."""
    from flows import tracking
    from flows.tracking_outage import TrackingUnavailable, first_line, is_outage, redacted

    if is_outage(exc):
        raise TrackingUnavailable(
            f"the MLflow tracking server {redacted(tracking.tracking_uri('.'))} stopped answering while {doing}; "
            f"nothing is lost: rerun when it is back and MLflow run {run_id} continues and the model "
            f"{cfg.tracking.model_name} is registered then, without training again ({first_line(exc)})") from None


def _grid_logger(cfg: Config, prepared: str, run_id: str):
    """A function that logs a 4x4 sample grid from a checkpoint's EMA weights to the run, by step,
    so the MLflow UI shows how samples improve. Best effort: a failure never stops training."""
    import warnings

    import torch

    from ddpm import checkpoint
    from ddpm.export import load_state_checked
    from ddpm.images import grid, to_uint8
    from ddpm.prepare import load_manifest
    from ddpm.samplers import sample
    from ddpm.schedule import NoiseSchedule
    from ddpm.unet import build_unet
    from flows import tracking

    channels, res, _ = load_manifest(prepared)["shape"]
    schedule = NoiseSchedule.from_name(cfg.diffusion.schedule, cfg.diffusion.timesteps,
                                       cfg.diffusion.zero_terminal_snr)

    def log_grid(step: int, path: str) -> None:
        try:
            tensors, _ = checkpoint.load(path)
            unet = build_unet(cfg.model, channels, res)
            load_state_checked(unet, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, path)
            x = sample("dpm_solver++", unet.eval(), schedule, (16, channels, res, res),
                       torch.Generator().manual_seed(0), steps=10, objective=cfg.diffusion.objective, clip_x0=True)
            picture = grid(to_uint8(x), nrow=4)
            tracking.client(".").log_image(run_id, picture[..., 0] if channels == 1 else picture,
                                           key="samples", step=step)
        except Exception as exc:
            warnings.warn(f"could not log the sample grid at step {step}: {exc}")

    return log_grid


def _train_summary(result) -> dict:
    print(f"trained to step {result.steps}: final loss {result.final_loss:.4f}, "
          f"{result.images_per_s:.1f} img/s -> {result.model_path}")
    return {"steps": result.steps, "final_loss": result.final_loss, "images_per_s": round(result.images_per_s, 2),
            "num_parameters": result.num_parameters, "resumed_from_step": result.resumed_from_step,
            "train_seconds": round(result.seconds, 1), "device": result.device}


def _log_stage_params(run_id: str, section: str, values: dict) -> str:
    """Log ``section.*`` params to the run; if the run already has other values (a rerun of this
    stage with new settings on a cached model), log into a new child run of it instead."""
    from mlflow.exceptions import MlflowException

    from flows import tracking

    params = {f"{section}.{k}": v for k, v in values.items()}
    try:
        tracking.log_params(".", run_id, params)
        return run_id
    except (MlflowException, RuntimeError) as exc:
        if "Changing param values is not allowed" not in str(exc) and "INVALID_PARAMETER_VALUE" not in str(exc):
            raise
    c = tracking.client(".")
    parent = c.get_run(run_id)
    child = c.create_run(parent.info.experiment_id, tags={"mlflow.parentRunId": run_id,
                                                          "mlflow.source.name": f"ddpm {section}"})
    child_id = child.info.run_id
    print(f"MLflow: {section} settings differ from run {run_id}'s; logging into child run {child_id}")
    tracking.log_params(".", child_id, params)
    return child_id


def cmd_sample(args) -> None:
    from dataclasses import asdict, replace

    from ddpm.export import load_model
    from ddpm.sample import sample_stage

    cfg = _load(args)
    scfg = replace(cfg.sample, model=args.model) if args.model else cfg.sample
    if _tracked(args) or scfg.model.startswith("models:/"):
        from flows import tracking

        weights, run_id = tracking.resolve_model(".", scfg.model, Path(scfg.out_dir) / ".download")
    else:
        weights, run_id = Path(scfg.model), None
    loaded = load_model(weights)
    summary = sample_stage(loaded, scfg, source=scfg.model)
    run_id = os.environ.get("MLFLOW_RUN_ID") or run_id
    stale = _raw_run_id(scfg.model) if _tracked(args) and not run_id else None
    if stale:  # the model's run is not in this store (outputs pulled from DVC): a run of its own
        from flows import tracking

        run_id = tracking.start_stage_run(".", cfg, "sample", stale)
    if _tracked(args) and run_id:
        from flows import tracking

        run_id = _log_stage_params(run_id, "sample", {k: v for k, v in asdict(scfg).items() if k != "out_dir"})
        tracking.log_artifacts(".", run_id, [Path(scfg.out_dir) / "grid.png", Path(scfg.out_dir) / "summary.json"],
                               artifact_path="samples")
        tracking.log_metrics(".", run_id, {"sample_images_per_s": summary["images_per_s"]})
    from flows.tracking import write_run_file

    write_run_file(scfg.out_dir, {"run_id": run_id if _tracked(args) else None, "model": scfg.model})


def _raw_run_id(model: str) -> str | None:
    """The run id in the mlflow.json beside a model file, unchecked."""
    from flows.tracking import read_run_file

    return None if model.startswith("models:/") else (read_run_file(Path(model).parent) or {}).get("run_id")


def cmd_reference(args) -> None:
    from ddpm.reference import build_reference

    cfg = _load(args)
    build_reference(cfg.prepare.out_dir, cfg.evaluate)


def cmd_evaluate(args) -> None:
    import time

    from ddpm.evaluate import evaluate
    from ddpm.export import load_model
    t0 = time.perf_counter()
    cfg = _load(args)
    samples_dir = Path(cfg.sample.out_dir)
    if _tracked(args):
        from flows.tracking import verified_run_file

        sample_run = verified_run_file(".", samples_dir) or {}
    else:
        from flows.tracking import read_run_file

        sample_run = read_run_file(samples_dir) or {}
    loaded = None
    if cfg.evaluate.compare_samplers:
        # The sampler comparison draws from the model that made the samples.
        model_ref = sample_run.get("model") or cfg.sample.model
        if model_ref.startswith("models:/"):
            from flows import tracking

            # Not into samples/: that folder is the sample stage's DVC output.
            weights, _ = tracking.resolve_model(".", model_ref, Path(".cache/ddpm/models"))
        else:
            weights = Path(model_ref)
        loaded = load_model(weights)
    metrics = evaluate(cfg.prepare.out_dir, samples_dir / "samples.npz", cfg.evaluate, loaded, cfg.sample)
    seconds = time.perf_counter() - t0

    run_id = os.environ.get("MLFLOW_RUN_ID") or sample_run.get("run_id")
    if _tracked(args) and not run_id and sample_run.get("stale_run_id"):  # see flows/tracking.verified_run_file
        from flows import tracking

        run_id = tracking.start_stage_run(".", cfg, "evaluate", sample_run["stale_run_id"])
    if _tracked(args) and run_id:
        from flows import tracking

        run_id = _log_stage_params(run_id, "evaluate", cfg.to_dict()["evaluate"])
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        name, version = _evaluated_version(cfg, sample_run)
        from flows.promotion import logged_model_id

        model_id = logged_model_id(tracking.client(".").get_model_version(name, version)) if version else None
        tracking.log_metrics(".", run_id, numbers, model_id=model_id)  # on the run and on its logged model
        tracking.log_metrics(".", run_id, {"evaluate_seconds": round(seconds, 1)})
        out = Path(cfg.evaluate.metrics_path).parent
        tracking.log_artifacts(".", run_id, [cfg.evaluate.metrics_path, "dvc.lock",
                                             Path(cfg.evaluate.reference_dir) / "reference.json",
                                             *(out / name for name in EVALUATE_FILES)], artifact_path="evaluation")
        _promote(cfg, name, version, run_id, numbers)
    print(json.dumps(metrics, indent=2))


def _promote(cfg: Config, name: str, version: str | None, run_id: str, metrics: dict) -> None:
    """Run the promotion gate for the evaluated model version; the decision goes to the MLflow run."""
    import re

    from flows import promotion, tracking

    if version is None:
        print("promotion: the samples come from no registered model version; gate skipped")
        return
    pattern = re.compile(rf"{re.escape(cfg.tracking.primary_metric)}_n\d+")
    keys = [k for k in metrics if pattern.fullmatch(k)]
    c = tracking.client(".")
    if not keys:
        print(f"promotion: no {cfg.tracking.primary_metric}_n<N> among the metrics; gate skipped")
        return
    d = promotion.promote(c, name, version, keys[0], metrics[keys[0]], cfg.tracking.primary_metric_goal)
    tracking.log_params(".", run_id, {"promotion.metric": d.metric})
    c.set_tag(run_id, "promotion.decision", "promoted" if d.promoted else "kept champion")
    c.set_tag(run_id, "promotion.reason", d.reason)
    tracking.log_metrics(".", run_id, {"promotion.promoted": float(d.promoted),
                                       **({"promotion.champion_value": d.champion_value}
                                          if d.champion_value is not None else {})})
    print(f"promotion: {name} v{version}: {'now champion' if d.promoted else 'candidate'} ({d.reason})")


def _evaluated_version(cfg: Config, sample_run: dict) -> tuple[str, str | None]:
    """(registered model name, version) of the model the samples came from, if registered."""
    from flows import tracking

    ref = sample_run.get("model") or cfg.sample.model
    if ref.startswith("models:/"):
        mv = tracking.registry_version(".", ref)
        return mv.name, str(mv.version)
    info = tracking.verified_run_file(".", Path(ref).parent) or {}
    return info.get("model_name") or cfg.tracking.model_name, info.get("model_version")


# Written beside evaluate.metrics_path (see ddpm/evaluate.py); DVC outputs of the evaluate stage.
EVALUATE_FILES = ("class_histogram.csv", "memorization.png", "sampler_comparison.csv", "sampler_comparison.png")


def cmd_pipeline(args) -> None:
    from flows.pipeline import run_pipeline

    run_pipeline(root=".", params=args.params, overrides=args.set)


def cmd_sweep(args) -> None:
    from flows.sweep import load_study, run_study, run_study_on_workers

    study = load_study(args.file, args.params)  # every recipe validated before anything runs
    run = run_study_on_workers if args.on_workers else run_study
    rows = run(".", study, args.params, args.leaderboard)
    failed = [r["recipe"] for r in rows if r["status"] != "ok"]
    done = len(rows) - len(failed)
    print(f"study {study.name}: {done} recipe{'' if done == 1 else 's'} finished, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}; leaderboard: {args.leaderboard}")


def cmd_serve(args) -> None:
    from flows.serve import serve

    serve(root=".", cron=args.cron, interval_s=args.interval, name=args.name)


def cmd_deploy(args) -> None:
    from flows.workers import deploy

    deploy(root=".", pool=args.pool, repository=args.repository)


def cmd_worker(args) -> int:
    from flows.workers import start_worker

    return start_worker(root=".", pool=args.pool, name=args.name, limit=args.limit)


def cmd_pull_inputs(args) -> None:
    from flows.workers import pull_inputs

    pull_inputs(root=".")


def cmd_mlflow_server(args) -> int:
    from flows.mlflow_server import serve

    return serve(host=args.host, port=args.port, backend_store_uri=args.backend_store_uri,
                 artifacts_destination=args.artifacts_destination, pg_port=args.pg_port, pg_data=args.pg_data,
                 allowed_hosts=args.allowed_hosts, auth=args.auth, users_file=args.users)


def cmd_prefect_server(args) -> int:
    from flows.serve import prefect_server

    return prefect_server(host=args.host, port=args.port)


def cmd_ui(args) -> int:
    from flows.serve import mlflow_ui

    return mlflow_ui(root=".", host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="Train, sample and evaluate DDPM image models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one parameter (repeatable), e.g. -S train.steps=200")
        p.set_defaults(fn=fn)
        return p

    add("prepare", cmd_prepare, "prepare the data set (section: prepare)")
    p = add("train", cmd_train, "train the model (sections: model, diffusion, train)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start from step 0")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p = add("sample", cmd_sample, "generate samples (section: sample)")
    p.add_argument("--model", help="checkpoint path or models:/<name>@<alias> | models:/<name>/<version>")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    add("reference", cmd_reference, "train the domain classifier and compute the held-out data's Inception "
        "features, once per data version (section: evaluate)")
    p = add("evaluate", cmd_evaluate, "evaluate the samples (section: evaluate)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    add("pipeline", cmd_pipeline, "run the whole pipeline as a Prefect flow over the DVC stages; "
        "-S overrides hold for this run only: it is saved as a DVC experiment (dvc exp show) and "
        "params.yaml is put back")
    p = sub.add_parser("sweep", help="a recipe study: run each recipe of a sweep file as a DVC experiment, "
                       "tracked in MLflow, and write a leaderboard")
    p.add_argument("--params", default="params.yaml", help="params file the recipes override (default: params.yaml)")
    p.set_defaults(fn=cmd_sweep)
    p.add_argument("file", help="sweep file, e.g. sweeps/fashion_cpu.yaml")
    p.add_argument("--leaderboard", default="metrics/leaderboard.csv", help="where the leaderboard goes")
    p.add_argument("--on-workers", action="store_true", help="one flow run of the workers' deployment per recipe "
                   "(ddpm deploy, ddpm worker; PREFECT_API_URL and a shared MLFLOW_TRACKING_URI)")
    p = sub.add_parser("serve", help="run the pipeline on a schedule against a Prefect server (PREFECT_API_URL)")
    p.add_argument("--cron", help='cron schedule, e.g. "0 3 * * *"')
    p.add_argument("--interval", type=int, help="run every N seconds")
    p.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("deploy", help="deploy the pipeline at this commit to the Prefect work pool (prefect.yaml)")
    p.add_argument("--pool", default="ddpm", help="work pool (default: ddpm)")
    p.add_argument("--repository", help="where workers clone the project (default: git's origin, else this folder)")
    p.set_defaults(fn=cmd_deploy)
    p = sub.add_parser("worker", help="start a Prefect worker on the work pool: one flow run at a time")
    p.add_argument("--pool", default="ddpm", help="work pool (default: ddpm)")
    p.add_argument("--name", help="worker name (default: Prefect's)")
    p.add_argument("--limit", type=int, default=1, help="flow runs at a time (default: 1, one training per GPU)")
    p.set_defaults(fn=cmd_worker)
    p = sub.add_parser("pull-inputs", help="dvc pull what dvc.lock names from the default remote, allowing "
                       "missing files (a worker's pull step)")
    p.set_defaults(fn=cmd_pull_inputs)
    p = sub.add_parser("mlflow-server", help="a shared MLflow tracking server on PostgreSQL with proxied artifacts")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", help="postgresql://USER:PASSWORD@HOST:PORT/DB (default: start a local "
                   "PostgreSQL in .mlflow-server/postgres)")
    p.add_argument("--artifacts-destination", help="folder or s3://bucket/path (default: .mlflow-server/artifacts)")
    p.add_argument("--pg-port", type=int, default=5433, help="port of the local PostgreSQL (default: 5433)")
    p.add_argument("--pg-data", help="data folder of the local PostgreSQL (default: .mlflow-server/postgres)")
    p.add_argument("--allowed-hosts", help="host names clients use to reach the server, comma-separated (MLflow "
                   "refuses other Host headers; needed with --host 0.0.0.0), e.g. mlflow.internal,mlflow.internal:5000")
    p.add_argument("--auth", action="store_true", help="MLflow's basic-auth app: the admin's password from "
                   "MLFLOW_AUTH_ADMIN_PASSWORD; clients log in with MLFLOW_TRACKING_USERNAME/PASSWORD")
    p.add_argument("--users", metavar="FILE", help="with --auth: name:password lines; each user is created (or its "
                   "password set) when the server starts")
    p.set_defaults(fn=cmd_mlflow_server)

    p = sub.add_parser("prefect-server", help="a Prefect server for schedules and workers (with "
                       "PREFECT_SERVER_API_AUTH_STRING=user:password, an authenticated one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4200)
    p.set_defaults(fn=cmd_prefect_server)

    p = sub.add_parser("ui", help="start the MLflow UI for the project's tracking store on 127.0.0.1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(fn=cmd_ui)
    return parser


def _quiet_prefect() -> None:
    import logging

    logging.getLogger("prefect").setLevel(logging.WARNING)  # no "Stopping temporary server" below the reason


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with stop_on_signals():  # SIGTERM too unwinds: finally blocks run, children are stopped
            rc = args.fn(args)  # most commands return None (success) or raise; `ui` passes the UI's exit status on
    except Stopped as exc:
        _quiet_prefect()
        print(f"ddpm {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except StageFailed as exc:  # the stage printed its output above; this is the reason, last on screen
        _quiet_prefect()
        print(f"ddpm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.deterministic else 1
    except (ConfigError, FileNotFoundError, ValueError, ServerUnavailable, WorkspaceBusy, CorruptCache) as exc:
        _quiet_prefect()
        print(f"ddpm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RemoteUnavailable as exc:
        _quiet_prefect()
        print(f"ddpm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.deterministic else 1
    except (TrackingUnavailable, PushIncomplete, BackendUnavailable) as exc:  # transient: exit 1 (the flow retries a stage)
        print(f"ddpm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except RanksFailed as exc:
        print(f"ddpm {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        from ddpm.checkpoint import CheckpointError
        from ddpm.train import TrainingOutOfMemoryError
        from flows.credentials import refusal, scrub

        # deterministic failures whose message says what to do: no traceback above it
        refused = refusal(exc)  # a server refused the credentials (HTTP 401/403): retrying cannot help
        if refused is not None or isinstance(exc, (CheckpointError, TrainingOutOfMemoryError, FloatingPointError)):
            _quiet_prefect()
            print(f"ddpm {args.command}: error: {scrub(str(refused or exc))}", file=sys.stderr)
            return EXIT_USAGE
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
