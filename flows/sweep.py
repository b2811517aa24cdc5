"""A recipe study ("project time" in the HF course): recipes from a sweep file, each run as a
DVC experiment, tracked in MLflow under one parent run, collected into a leaderboard.

Each recipe is a set of ``section.key=value`` overrides on params.yaml, validated like ``-S``
before anything runs. Recipes run one after another as ``dvc exp run --temp -n <study>-<recipe>``,
so ``dvc exp show`` lists every one and ``dvc exp apply`` restores any; the workspace is not
touched. A recipe with a row in the leaderboard is not run again, so an interrupted study
continues where it stopped; a recipe that fails (a diverging loss, a bad combination) gets a
row with its reason and the study goes on.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddpm import config as config_mod
from ddpm.config import ConfigError
from flows.stage_failure import classify

LEADERBOARD = Path("metrics/leaderboard.csv")
STUDY_KEYS = ("study", "base", "recipes", "grids", "metric")
FIXED_COLUMNS = ["recipe", "family", "overrides", "status", "reason", "images_seen", "train_seconds", "device",
                 "sampler", "sample_steps", "experiment", "mlflow_run_id"]


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str  # one line in the quality-against-compute plot
    overrides: tuple[str, ...]  # section.key=value, the study's base first


@dataclass(frozen=True)
class Study:
    name: str
    recipes: tuple[Recipe, ...]
    metric: str  # the quality metric the plot shows, e.g. fd_classifier (lower is better)


def _override(key: str, value: Any) -> str:
    """``train.lr``, 0.0003 -> ``train.lr=0.0003``: the value as YAML in one line, as ``-S`` takes it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return f"{key}={text[:-4].strip() if text.endswith('...') else text}"


def _mapping(where: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of section.key: value, got {type(raw).__name__}")
    return raw


def _grid_recipes(where: str, grid: Any) -> list[tuple[str, str, dict]]:
    """Every combination of ``axes``, on top of the grid's own ``set``, is one recipe of ``family``."""
    if not isinstance(grid, dict) or set(grid) - {"family", "set", "axes"} or "family" not in grid:
        raise ConfigError(f"{where} must have a family and axes (a mapping of section.key: [values]), "
                          f"and may have set")
    fixed = _mapping(f"{where}.set", grid.get("set"))
    axes = _mapping(f"{where}.axes", grid.get("axes"))
    if not axes or any(not isinstance(v, list) or not v for v in axes.values()):
        raise ConfigError(f"{where}.axes must map each section.key to a non-empty list of values")
    out = []
    for values in itertools.product(*axes.values()):
        combo = dict(zip(axes, values))
        name = "-".join(k.split(".")[-1] + re.sub(r"[^A-Za-z0-9.]+", "_", json.dumps(v)).strip("_")
                        for k, v in combo.items())  # e.g. channel_mults [1, 2] -> channel_mults1_2
        out.append((f"{grid['family']}-{name}", str(grid["family"]), {**fixed, **combo}))
    return out


def load_study(path: str | Path, params: str | Path = "params.yaml") -> Study:
    """Read a sweep file and validate every recipe against params.yaml; raises ``ConfigError``
    naming the recipe and the key before anything runs."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"sweep file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path} must be a mapping with {', '.join(STUDY_KEYS)}")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key {unknown[0]!r}; valid keys: {', '.join(STUDY_KEYS)}")
    study = str(raw.get("study") or path.stem)
    base = _mapping(f"sweep file {path}: base", raw.get("base"))
    entries: list[tuple[str, str, dict]] = []
    for i, r in enumerate(raw.get("recipes") or []):
        if not isinstance(r, dict) or "name" not in r or set(r) - {"name", "family", "set"}:
            raise ConfigError(f"sweep file {path}: recipes[{i}] must have a name, and may have family and set")
        entries.append((str(r["name"]), str(r.get("family", r["name"])), _mapping(f"recipe {r['name']}: set", r.get("set"))))
    for i, g in enumerate(raw.get("grids") or []):
        entries += _grid_recipes(f"sweep file {path}: grids[{i}]", g)
    if not entries:
        raise ConfigError(f"sweep file {path} names no recipes (recipes: or grids:)")
    recipes, seen = [], set()
    for name, family, values in entries:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name in seen:
            raise ConfigError(f"sweep file {path}: recipe name {name!r} must be unique and use only letters, "
                              f"digits, '.', '_' and '-' (it names a DVC experiment)")
        seen.add(name)
        overrides = tuple(_override(k, v) for k, v in {**base, **values}.items())
        try:
            config_mod.load(params, list(overrides))
        except ConfigError as exc:
            raise ConfigError(f"sweep file {path}, recipe {name}: {exc}") from None
        recipes.append(Recipe(name, family, overrides))
    metric = str(raw.get("metric") or config_mod.load(params).tracking.primary_metric)
    return Study(study, tuple(recipes), metric)


# -- running ----------------------------------------------------------------------------------------------

def experiment_name(study: str, recipe: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{study}-{recipe}")


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _experiment_ref(root: Path, name: str) -> str | None:
    """The git ref DVC keeps experiment ``name`` under (refs/exps/<base commit>/<name>), if any."""
    refs = _git(root, "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    return next((r for r in refs if r.rsplit("/", 1)[-1] == name), None)


def read_leaderboard(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_leaderboard(path: Path, rows: list[dict[str, Any]]) -> None:
    metric_cols = sorted({k for r in rows for k in r} - set(FIXED_COLUMNS))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIXED_COLUMNS + metric_cols)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # a study killed while writing keeps the previous leaderboard


def _failure_reason(output: str) -> str:
    """The stage's own error line (``ddpm <stage>: error: ...``) rather than DVC's summary after it,
    found as the pipeline flow finds it."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", output)]
    return classify("recipe", lines).reason[:500]


def _run_logged(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``cmd`` with its output passed through to ours (progress bars included); returns the
    exit code and the last 16 KiB of output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: deque[bytes] = deque(maxlen=64)
    for chunk in iter(lambda: proc.stdout.read1(256), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        tail.append(chunk)
    return proc.wait(), b"".join(tail).decode(errors="replace")[-16384:]


def _train_run(root: Path, parent_id: str | None, recipe: str):
    """The MLflow training run of ``recipe`` in this study, if tracking found it."""
    if parent_id is None:
        return None
    from flows import tracking

    c = tracking.client(root)
    parent = c.get_run(parent_id)
    runs = c.search_runs([parent.info.experiment_id], order_by=["attributes.start_time DESC"], max_results=1,
                         filter_string=f"tags.`ddpm.study_run_id` = '{parent_id}' and tags.`ddpm.recipe` = '{recipe}'")
    return runs[0] if runs else None


def _row(root: Path, study: Study, recipe: Recipe, params: Path, rc: int, output: str, parent_id: str | None) -> dict:
    cfg = config_mod.load(params, list(recipe.overrides))
    name = experiment_name(study.name, recipe.name)
    row: dict[str, Any] = {
        "recipe": recipe.name, "family": recipe.family, "overrides": " ".join(recipe.overrides),
        "images_seen": cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum_steps,
        "sampler": cfg.sample.sampler, "sample_steps": cfg.sample.steps, "experiment": name}
    ref = _experiment_ref(root, name)
    if rc != 0 or ref is None:
        return {**row, "status": "failed", "reason": _failure_reason(output) if rc else "no experiment was saved"}
    shown = _git(root, "show", f"{ref}:{cfg.evaluate.metrics_path}")
    metrics = json.loads(shown.stdout) if shown.returncode == 0 else {}
    row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run = _train_run(root, parent_id, recipe.name)
    if run is not None:
        row.update(mlflow_run_id=run.info.run_id, train_seconds=run.data.metrics.get("train_seconds", ""),
                   device=run.data.tags.get("ddpm.device", ""))
    return {**row, "status": "ok", "reason": ""}


def _parent_run(root: Path, study: Study, params: Path) -> str | None:
    """The study's MLflow parent run: the one an interrupted study opened, else a new one."""
    if os.environ.get("DDPM_TRACKING", "1") == "0":
        return None
    from flows import tracking

    c = tracking.client(root)
    exp_id = tracking.experiment_id(c, root, config_mod.load(params).tracking.experiment)
    found = c.search_runs([exp_id], filter_string=f"tags.`ddpm.study` = '{study.name}' and tags.`ddpm.role` = 'study'",
                          max_results=1)
    if found:
        c.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = c.create_run(exp_id, run_name=f"study {study.name}",
                       tags={"ddpm.study": study.name, "ddpm.role": "study", "mlflow.source.name": "ddpm sweep",
                             "ddpm.git_commit": tracking.git_commit(root) or "unknown"})
    return run.info.run_id


def check_repository(root: Path) -> None:
    """DVC experiments are git commits: the project needs a commit and a git identity."""
    if _git(root, "rev-parse", "--verify", "HEAD").returncode != 0:
        raise ValueError(f"{root} is not a git repository with a commit: DVC experiments are based on one "
                         f"(git init && git add -A && git commit -m ...)")
    if not _git(root, "config", "user.email").stdout.strip():
        raise ValueError("DVC experiments are saved as git commits and need a git identity: "
                         "git config --global user.name 'Your Name' && git config --global user.email you@example.com")


def run_study(root: str | Path, study: Study, params: str | Path = "params.yaml",
              leaderboard: str | Path = LEADERBOARD) -> list[dict]:
    """Run every recipe that has no leaderboard row yet; returns the leaderboard rows."""
    from flows import tracking

    root, board = Path(root).resolve(), Path(root).resolve() / leaderboard
    check_repository(root)
    params = root / params
    rows = read_leaderboard(board)
    done = {r["recipe"] for r in rows if r.get("status") in ("ok", "failed")}
    parent_id = _parent_run(root, study, params)
    # no MLFLOW_TRACKING_URI needed: in DVC's temp copy the stages find the project's store (tracking.project_root)
    env = {**os.environ, "DDPM_STUDY": study.name,
           # bin/ddpm finds the project's .venv; without one it runs the `ddpm` on PATH: this interpreter's
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    if parent_id:
        env["DDPM_STUDY_RUN_ID"] = parent_id
    todo = [r for r in study.recipes if r.name not in done]
    print(f"study {study.name}: {len(study.recipes)} recipes, {len(study.recipes) - len(todo)} already on "
          f"{leaderboard}, {len(todo)} to run", flush=True)
    for i, recipe in enumerate(todo, 1):
        name = experiment_name(study.name, recipe.name)
        if _experiment_ref(root, name):  # left by an interrupted study before its row was written
            subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", name], cwd=root, env=env, check=False)
        cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name,
               *itertools.chain.from_iterable(("-S", o) for o in recipe.overrides)]
        print(f"[{i}/{len(todo)}] {recipe.name}: dvc exp run --temp -n {name} "
              f"{' '.join('-S ' + o for o in recipe.overrides)}", flush=True)
        t0 = time.perf_counter()
        rc, output = _run_logged(cmd, root, {**env, "DDPM_RECIPE": recipe.name})
        row = _row(root, study, recipe, params, rc, output, parent_id)
        rows = [r for r in rows if r["recipe"] != recipe.name] + [row]
        write_leaderboard(board, rows)
        quality = ", ".join(f"{k}={row[k]:.4g}" for k in row if k.startswith(study.metric + "_n"))
        print(f"[{i}/{len(todo)}] {recipe.name}: {row['status']} in {time.perf_counter() - t0:.0f} s"
              f"{': ' + quality if quality else ''}{': ' + row['reason'] if row['reason'] else ''}", flush=True)
    plot_path = plot(rows, study.metric, board.with_suffix(".png"))
    if parent_id:
        tracking.log_artifacts(root, parent_id, [board, plot_path])
        tracking.client(root).set_terminated(parent_id, "FINISHED")
    return rows


def metric_column(rows: list[dict], metric: str) -> str | None:
    """The study metric's column at the largest N on the leaderboard, e.g. fd_classifier_n1000."""
    cols = {k for r in rows for k, v in r.items() if re.fullmatch(rf"{re.escape(metric)}_n\d+", k) and v != ""}
    return max(cols, key=lambda k: int(k.rsplit("_n", 1)[1]), default=None)


def plot(rows: list[dict], metric: str, path: Path) -> Path:
    """Quality against training compute (images seen), one line per recipe family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = metric_column(rows, metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [r for r in rows if r.get("status") == "ok" and col and r.get(col) not in ("", None)]
    for family in sorted({r["family"] for r in ok}):
        pts = sorted((float(r["images_seen"]), float(r[col]), r["recipe"]) for r in ok if r["family"] == family)
        budgets_only = len({p[0] for p in pts}) == len(pts)  # a line joins one recipe's budgets, nothing else
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if budgets_only else "",
                label=family)
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training images seen (steps x batch)")
    ax.set_ylabel(f"{col or metric} (lower is better)" if col else metric)
    ax.set_title(f"Recipe study: {len(ok)} of {len(rows)} recipes finished")
    if ok:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the study fanned out over Prefect workers (flows/workers.py) ---------------------------------------

FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def _submit(study: Study, recipe: Recipe, parent_id: str | None):
    """One flow run of the workers' deployment for ``recipe``, scheduled now; returns it."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from flows import workers

    try:  # the same key for the same recipe of the same study run: a rerun after Ctrl+C finds the flow run
        return run_deployment(workers.DEPLOYMENT, timeout=0, flow_run_name=experiment_name(study.name, recipe.name),
                              idempotency_key=f"{study.name}/{recipe.name}/{parent_id or 'untracked'}",
                              parameters={"overrides": list(recipe.overrides), "study": study.name,
                                          "recipe": recipe.name, "study_run_id": parent_id or ""})
    except ObjectNotFound:
        raise ValueError(f"the Prefect server has no deployment {workers.DEPLOYMENT}: run `ddpm deploy` "
                         f"(make deploy) in the project first, and start workers with `make worker`") from None


def _worker_row(root: Path, study: Study, recipe: Recipe, params: Path, flow_run, parent_id: str | None) -> dict:
    """A leaderboard row from a finished flow run and the recipe's MLflow run on the shared server."""
    import tempfile

    from flows import tracking

    cfg = config_mod.load(params, list(recipe.overrides))
    row: dict[str, Any] = {
        "recipe": recipe.name, "family": recipe.family, "overrides": " ".join(recipe.overrides),
        "images_seen": cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum_steps,
        "sampler": cfg.sample.sampler, "sample_steps": cfg.sample.steps, "experiment": flow_run.name}
    state = flow_run.state
    run = _train_run(root, parent_id, recipe.name)
    if state.type.value != "COMPLETED" or run is None:
        reason = (state.message or state.name) if state.type.value != "COMPLETED" else "no MLflow run was found"
        return {**row, "status": "failed", "reason": reason[:500]}
    row.update(mlflow_run_id=run.info.run_id, train_seconds=run.data.metrics.get("train_seconds", ""),
               device=run.data.tags.get("ddpm.device", ""),
               experiment=run.data.tags.get("ddpm.dvc_experiment", row["experiment"]))  # what dvc exp pull takes
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = tracking.client(root).download_artifacts(
                run.info.run_id, f"evaluation/{Path(cfg.evaluate.metrics_path).name}", tmp)
            metrics = json.loads(Path(path).read_text())
    except Exception as exc:  # the run finished, its record is incomplete: a row that says so
        return {**row, "status": "failed", "reason": f"the evaluation's metrics are not in MLflow run "
                                                     f"{run.info.run_id}: {str(exc)[:300]}"}
    row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {**row, "status": "ok", "reason": ""}


def run_study_on_workers(root: str | Path, study: Study, params: str | Path = "params.yaml",
                         leaderboard: str | Path = LEADERBOARD, poll_s: float = 5.0) -> list[dict]:
    """Every recipe without a leaderboard row as one flow run of the workers' deployment, all submitted at
    once (the workers take them one per worker at a time); the rows come from the shared MLflow server as
    the runs finish. Returns the leaderboard rows."""
    from prefect.client.orchestration import get_client

    from flows import tracking, workers
    from flows.serve import check_prefect_server

    root, board = Path(root).resolve(), Path(root).resolve() / leaderboard
    api = check_prefect_server(what="studies on workers")
    workers.check_tracking_server()
    params = root / params
    rows = read_leaderboard(board)
    done = {r["recipe"] for r in rows if r.get("status") in ("ok", "failed")}
    parent_id = _parent_run(root, study, params)
    todo = [r for r in study.recipes if r.name not in done]
    print(f"study {study.name}: {len(study.recipes)} recipes, {len(study.recipes) - len(todo)} already on "
          f"{leaderboard}, {len(todo)} to run on the workers of {api}", flush=True)
    pending = {}
    for recipe in todo:
        flow_run = _submit(study, recipe, parent_id)
        pending[flow_run.id] = recipe
        print(f"{recipe.name}: flow run {flow_run.name} ({flow_run.id}) scheduled", flush=True)
    seen: dict = {}
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(poll_s)
            for run_id, recipe in list(pending.items()):
                flow_run = client.read_flow_run(run_id)
                state = flow_run.state.type.value
                if seen.get(run_id) != state:
                    seen[run_id] = state
                    print(f"{recipe.name}: {flow_run.state.name}", flush=True)
                if state in FINAL_STATES:
                    del pending[run_id]
                    row = _worker_row(root, study, recipe, params, flow_run, parent_id)
                    rows = [r for r in rows if r["recipe"] != recipe.name] + [row]
                    write_leaderboard(board, rows)
    plot_path = plot(rows, study.metric, board.with_suffix(".png"))
    if parent_id:
        tracking.log_artifacts(root, parent_id, [board, plot_path])
        tracking.client(root).set_terminated(parent_id, "FINISHED")
    return rows
