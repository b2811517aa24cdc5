"""Run a sweep file's recipes in-process on one accelerator, several at once, without DVC or MLflow.

`ddpm sweep` is the study as users run it: each recipe a DVC experiment tracked in MLflow, one after
another. On a 2-core CPU that is ~12 minutes a recipe. This script runs the same recipes (the same
overrides on params.yaml, the same library stages: prepare, reference, train, sample, evaluate) on a
GPU machine that has torch but neither DVC nor MLflow, `--workers` recipes at a time, and writes the
leaderboard's columns to a CSV. Quality depends on the recipe and the images seen, not on the device
(both devices train in bf16 autocast here), so the CPU budget is stated in images seen; the GPU's train
seconds are not the CPU's and are reported as measured, under `--workers` sharing one GPU.

    python benchmarks/recipe_study.py sweeps/fashion_explore.yaml --source DIR --workdir /tmp/study \
        --workers 6 --deadline 400 --out results.csv

One recipe per subprocess (its log in <workdir>/<recipe>/log.txt), so a crash or NaN in one is a
failed row, not a failed study.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.sweep import _override, load_study  # noqa: E402  (only yaml and ddpm.config: no MLflow, no DVC)


def _paths(workdir: Path, recipe: str, source: str) -> list[str]:
    """Overrides that put every output of one recipe under <workdir>/<recipe> and share the data."""
    r = workdir / recipe
    return [f"prepare.source_path={source}", f"prepare.out_dir={workdir / 'prepared'}",
            f"evaluate.reference_dir={workdir / 'reference'}", f"train.out_dir={r / 'models'}",
            f"train.checkpoint_dir={r / 'checkpoints'}", f"train.loss_path={r / 'train_loss.csv'}",
            f"sample.out_dir={r / 'samples'}", f"sample.model={r / 'models' / 'model.safetensors'}",
            f"evaluate.metrics_path={r / 'metrics.json'}"]


def run_one(params: str, overrides: list[str], out: Path) -> None:
    """The stages for one recipe, in this process; writes <out>/row.json."""
    from ddpm import config
    from ddpm.evaluate import evaluate
    from ddpm.export import load_model
    from ddpm.sample import sample_stage
    from ddpm.train import train

    cfg = config.load(params, overrides)
    result = train(cfg, cfg.prepare.out_dir, fresh=True)
    loaded = load_model(result.model_path)
    sample_stage(loaded, cfg.sample, source=str(result.model_path))
    metrics = evaluate(cfg.prepare.out_dir, Path(cfg.sample.out_dir) / "samples.npz", cfg.evaluate,
                       loaded if cfg.evaluate.compare_samplers else None, cfg.sample)
    row = {"images_seen": result.steps * cfg.train.batch_size * cfg.train.grad_accum_steps,
           "train_seconds": round(result.seconds, 1), "device": result.device, "final_loss": result.final_loss,
           "sampler": cfg.sample.sampler, "sample_steps": cfg.sample.steps, **metrics}
    (out / "row.json").write_text(json.dumps(row))


def _shared_stages(params: str, base: list[str]) -> None:
    from ddpm import config
    from ddpm.prepare import prepare
    from ddpm.reference import build_reference

    cfg = config.load(params, base)
    prepare(cfg.prepare)
    build_reference(cfg.prepare.out_dir, cfg.evaluate)


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return lines[-1][:300] if lines else "no output"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--source", help="the raw data folder (prepare.source_path); needed to run recipes")
    ap.add_argument("--workdir", default="/tmp/recipe_study")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=0, help="seconds; start no recipe after this (0: none)")
    ap.add_argument("--out", default="recipe_study.csv")
    ap.add_argument("--only", default="", help="comma-separated recipe names: run just these")
    ap.add_argument("--grids", default="", help="a .tar.gz to collect every recipe's sample grid into")
    ap.add_argument("--report", nargs="*", help="merge these result CSVs (later ones win), print a markdown "
                    "table and write --out (CSV) and the plot beside it; runs nothing")
    ap.add_argument("--one", nargs="*", help=argparse.SUPPRESS)  # internal: run one recipe's overrides
    args = ap.parse_args()
    if args.one is not None:
        run_one(args.params, args.one, Path(args.workdir))
        return 0

    if args.report:
        return report(args.study, args.params, [Path(p) for p in args.report], Path(args.out))
    if not args.source:
        ap.error("--source (the raw data folder) is needed to run recipes")
    t0 = time.perf_counter()
    study = load_study(args.study, args.params)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {r.name for r in study.recipes}
        if unknown:
            raise SystemExit(f"--only names recipes the study does not have: {', '.join(sorted(unknown))}")
        study = dataclasses.replace(study, recipes=tuple(r for r in study.recipes if r.name in wanted))
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    source = str(Path(args.source).resolve())
    first = study.recipes[0]
    _shared_stages(args.params, list(first.overrides) + _paths(workdir, first.name, source))
    print(f"data and reference ready in {time.perf_counter() - t0:.0f} s; {len(study.recipes)} recipes, "
          f"{args.workers} at a time", flush=True)
    # longest first, so the stragglers start early
    from ddpm import config
    def cost(recipe) -> int:  # images seen x the width's share of the convolution work
        c = config.load(args.params, list(recipe.overrides))
        return c.train.steps * c.train.batch_size * c.model.base_channels ** 2

    order = sorted(study.recipes, key=cost, reverse=True)

    def launch(recipe):
        if args.deadline and time.perf_counter() - t0 > args.deadline:
            return recipe, "skipped", "past the deadline"
        out = workdir / recipe.name
        out.mkdir(parents=True, exist_ok=True)
        overrides = list(recipe.overrides) + _paths(workdir, recipe.name, source)
        with open(out / "log.txt", "w") as log:
            rc = subprocess.call([sys.executable, __file__, args.study, "--params", args.params, "--source", source,
                                  "--workdir", str(out), "--one", *overrides], stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})
        return recipe, "ok" if rc == 0 else "failed", "" if rc == 0 else _last_line(out / "log.txt")

    rows = []
    with ThreadPoolExecutor(args.workers) as pool:
        for fut in as_completed([pool.submit(launch, r) for r in order]):
            recipe, status, reason = fut.result()
            row = {"recipe": recipe.name, "family": recipe.family, "overrides": " ".join(recipe.overrides),
                   "status": status, "reason": reason}
            if status == "ok":
                row.update(json.loads((workdir / recipe.name / "row.json").read_text()))
            rows.append(row)
            metric = next((k for k in row if k.startswith(study.metric + "_n") and "real" not in k
                           and "steps" not in k), None)
            print(f"[{len(rows)}/{len(order)}] {recipe.name}: {status} "
                  + (f"{metric}={row[metric]:.3f} in {row['train_seconds']:.0f} s" if metric else reason)
                  + f" (t={time.perf_counter() - t0:.0f} s)", flush=True)
            _write(rows, Path(args.out))  # after every recipe: a study cut short keeps what it finished
            if args.grids:
                _collect_grids(rows, workdir, Path(args.grids))
    print(f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} recipes in {time.perf_counter() - t0:.0f} s "
          f"-> {args.out}")
    return 0


def report(study_file: str, params: str, csvs: list[Path], out: Path) -> int:
    """One leaderboard from several runs of the study (a recipe's last finished row wins)."""
    from flows.sweep import metric_column, plot

    study = load_study(study_file, params)
    merged: dict[str, dict] = {}
    for path in csvs:
        for row in csv.DictReader(open(path)):
            if row["status"] != "skipped" or row["recipe"] not in merged:
                merged[row["recipe"]] = row
    rows = [merged[r.name] for r in study.recipes if r.name in merged]
    col = metric_column(rows, study.metric)
    real = next((k for k in rows[0] if k.startswith(f"{study.metric}_real_n")), "")
    rows.sort(key=lambda r: float(r[col]) if r.get(col) else float("inf"))
    _write(rows, out)
    plot(rows, study.metric, out.with_suffix(".png"))
    base = {_override(k, v) for k, v in load_study_base(study_file).items()}
    print(f"| recipe | overrides (on params.yaml before this study) | images seen | {col} | train s |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        over = " ".join(o for o in r["overrides"].split(" ") if o not in base)
        value = f"{float(r[col]):.2f}" if r.get(col) else r["status"]
        print(f"| {r['recipe']} | `{over}` | {r.get('images_seen', '')} | {value} | {r.get('train_seconds', '')} |")
    print(f"\nReal data at the same N ({real}): {rows[0].get(real, '')}. {len(rows)} recipes -> {out}, "
          f"{out.with_suffix('.png')}")
    return 0


def load_study_base(study_file: str) -> dict:
    import yaml

    return (yaml.safe_load(Path(study_file).read_text()) or {}).get("base") or {}


def _collect_grids(rows: list[dict], workdir: Path, path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for r in rows:
            grid = workdir / r["recipe"] / "samples" / "grid.png"
            if grid.exists():
                tar.add(grid, arcname=f"{r['recipe']}.png")


def _write(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
