"""The recipe study: sweep files validated before anything runs, recipes run as real DVC experiments in a
temporary git + DVC project, tracked in a real MLflow store, collected into a leaderboard."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddpm.config import ConfigError
from ddpm.device import cpu_has_bf16_matrix_units
from flows.sweep import load_study
from tests.conftest import PROJECT_ROOT, make_project, run, write_fashion_idx
from tests.test_pipeline import tiny_overrides

DDPM = str(Path(sys.executable).with_name("ddpm"))


def sweep_file(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_recipes_expand_and_carry_the_base_overrides(tmp_path):
    study = load_study(sweep_file(tmp_path, {
        "study": "s", "base": {"train.steps": 10},
        "recipes": [{"name": "plain"}, {"name": "v", "family": "objective", "set": {"diffusion.objective": "v"}}],
        "grids": [{"family": "width", "set": {"model.dropout": 0.1},
                   "axes": {"model.base_channels": [16, 48], "model.channel_mults": [[1, 2]]}}]}),
        PROJECT_ROOT / "params.yaml")
    assert [(r.name, r.family) for r in study.recipes] == [
        ("plain", "plain"), ("v", "objective"), ("width-base_channels16-channel_mults1_2", "width"),
        ("width-base_channels48-channel_mults1_2", "width")]
    assert study.recipes[1].overrides == ("train.steps=10", "diffusion.objective=v")
    assert study.recipes[3].overrides == ("train.steps=10", "model.dropout=0.1", "model.base_channels=48",
                                          "model.channel_mults=[1, 2]")
    assert study.metric == "fd_classifier"  # params.yaml's tracking.primary_metric


@pytest.mark.parametrize("body,message", [
    ({"recipes": [{"name": "a", "set": {"train.stepz": 5}}]},
     r"recipe a: unknown key train\.stepz \(did you mean 'steps'\?\)"),
    ({"recipes": [{"name": "a"}, {"name": "b", "set": {"diffusion.objective": "score"}}]},
     r"recipe b: diffusion\.objective='score' is not valid; choose one of eps, v, x0"),
    ({"base": {"train.lr": "fast"}, "recipes": [{"name": "a"}]}, r"recipe a: train\.lr='fast' must be a number"),
    ({"recipe": [{"name": "a"}]}, r"unknown key 'recipe'; valid keys: study, base, recipes, grids, metric"),
    ({"recipes": [{"name": "a"}, {"name": "a"}]}, r"recipe name 'a' must be unique"),
    ({"recipes": []}, r"names no recipes"),
    ({"grids": [{"family": "g", "axes": {"train.steps": 5}}]}, r"grids\[0\]\.axes must map each section\.key to a "
                                                               r"non-empty list"),
])
def test_a_bad_sweep_file_fails_before_anything_runs_naming_the_key(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_study(sweep_file(tmp_path, body), PROJECT_ROOT / "params.yaml")


def test_the_cli_refuses_a_bad_sweep_file_and_starts_nothing(tmp_path):
    project = make_project(tmp_path / "project")
    path = sweep_file(tmp_path, {"recipes": [{"name": "a", "set": {"model.base_channel": 3}}]})
    out = run([DDPM, "sweep", str(path)], project, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"ddpm sweep: error: sweep file {path}, recipe a: unknown key model.base_channel (did you mean 'base_channels'?)")
    assert not (project / "metrics" / "leaderboard.csv").exists() and not (project / "mlflow.db").exists()


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """Two recipes through `ddpm sweep` in a fresh project: one that trains, one whose loss diverges."""
    base_dir = tmp_path_factory.mktemp("sweep")
    source = write_fashion_idx(base_dir / "fashion")
    project = make_project(base_dir / "project")
    base = dict(o.split("=", 1) for o in tiny_overrides(source))
    base = {k: yaml.safe_load(v) for k, v in base.items()}
    base.update({"evaluate.inception": False, "evaluate.compare_samplers": [], "train.steps": 4})
    path = sweep_file(base_dir, {"study": "tiny", "base": base, "recipes": [
        {"name": "v", "family": "objective", "set": {"diffusion.objective": "v"}},
        {"name": "diverges", "family": "lr", "set": {"train.lr": 1.0e30, "train.grad_clip_norm": 0.0}}]})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own store
    first = subprocess.run([DDPM, "sweep", str(path)], cwd=project, capture_output=True, text=True, env=env)
    again = subprocess.run([DDPM, "sweep", str(path)], cwd=project, capture_output=True, text=True, env=env)
    return {"project": project, "first": first, "again": again}


def leaderboard(project: Path) -> dict[str, dict]:
    with open(project / "metrics" / "leaderboard.csv", newline="") as f:
        return {r["recipe"]: r for r in csv.DictReader(f)}


def test_each_recipe_is_a_row_with_its_compute_and_quality_and_a_diverging_one_is_recorded_as_failed(study_run):
    first, project = study_run["first"], study_run["project"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = leaderboard(project)
    assert list(rows) == ["v", "diverges"]
    for name in ("v",):
        r = rows[name]
        assert r["status"] == "ok" and r["family"] == "objective", r
        assert int(r["images_seen"]) == 4 * 8  # steps x batch
        precision = "bf16" if cpu_has_bf16_matrix_units() else "fp32"  # mixed_precision: auto
        assert float(r["train_seconds"]) > 0 and r["device"] == f"cpu ({precision})"
        assert 0 < float(r["fd_classifier_n16"]) < 1e4 and float(r["fd_classifier_real_n16"]) >= 0
        assert (r["sampler"], r["sample_steps"]) == ("dpm_solver++_sde", "4")
    assert "diffusion.objective=v" in rows["v"]["overrides"]
    assert rows["diverges"]["status"] == "failed"
    assert "loss became" in rows["diverges"]["reason"] and "train.lr" in rows["diverges"]["reason"]
    assert "[1/2] v: dvc exp run --temp -n tiny-v" in first.stdout
    assert "[2/2] diverges: failed" in first.stdout
    assert first.stdout.strip().splitlines()[-1] == ("study tiny: 1 recipe finished, 1 failed (diverges); "
                                                     "leaderboard: metrics/leaderboard.csv")
    assert (project / "metrics" / "leaderboard.png").stat().st_size > 1000


def test_recipes_are_dvc_experiments_that_dvc_exp_show_lists(study_run):
    project = study_run["project"]
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--json"], project).stdout
    names = {e.get("name") for commit in json.loads(shown) for e in (commit.get("experiments") or [])
             for e in (e.get("revs") or [])}
    assert "tiny-v" in names, names
    params = run([sys.executable, "-m", "dvc", "exp", "show", "--csv", "--only-changed"], project).stdout
    assert "tiny-v" in params
    assert run(["git", "status", "--porcelain", "params.yaml"], project).stdout == ""  # workspace untouched


def test_the_study_is_one_mlflow_parent_run_with_a_child_per_recipe(study_run):
    from mlflow import MlflowClient

    uri = f"sqlite:///{study_run['project'] / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("ddpm")
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`ddpm.role` = 'study'")
    assert parent.data.tags["ddpm.study"] == "tiny" and parent.info.status == "FINISHED"
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_recipe = {r.data.tags["ddpm.recipe"]: r for r in children}
    assert set(by_recipe) == {"v", "diverges"}
    assert by_recipe["diverges"].info.status == "FAILED" and by_recipe["v"].info.status == "FINISHED"
    assert by_recipe["v"].data.params["diffusion.objective"] == "v"
    assert by_recipe["v"].info.run_name == "tiny/v"  # the UI lists children by recipe
    rows = leaderboard(study_run["project"])
    assert rows["v"]["mlflow_run_id"] == by_recipe["v"].info.run_id
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} == {"leaderboard.csv", "leaderboard.png"}


def test_a_rerun_runs_nothing_that_is_on_the_leaderboard(study_run):
    again = study_run["again"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert "study tiny: 2 recipes, 2 already on metrics/leaderboard.csv, 0 to run" in again.stdout
    assert "dvc exp run" not in again.stdout
