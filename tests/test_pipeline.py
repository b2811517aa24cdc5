"""The whole pipeline through real Prefect, DVC and MLflow, on tiny generated data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import PROJECT_ROOT, make_project, run, write_fashion_idx

pytestmark = pytest.mark.slow

DDPM = str(Path(sys.executable).with_name("ddpm"))
DVC = [sys.executable, "-m", "dvc"]


def tiny_overrides(source: Path) -> list[str]:
    return [
        f"prepare.source_path={source}", "prepare.resolution=16",
        "model.base_channels=8", "model.channel_mults=[1, 2]", "model.attention_levels=[-1]",
        "model.attention_heads=2", "diffusion.timesteps=50",
        "train.steps=6", "train.batch_size=8", "train.log_every_steps=2", "train.checkpoint_every_steps=3",
        "train.lr_warmup_steps=2",
        "sample.num_samples=16", "sample.batch_size=16", "sample.steps=4",
        "evaluate.classifier_epochs=1", "evaluate.classifier_batch_size=32",
    ]


STAGES = ["prepare", "train", "sample", "reference", "evaluate"]


class StageKiller(threading.Thread):
    """SIGKILLs the `ddpm <stage>` process of each stage once, when first seen (polled every 0.1 s; a tiny
    stage can be over within half a second on a quiet machine), as the OOM killer or a `kill -9` would:
    the fault matrix's "SIGKILL at each stage"; the flow's retry must bring each back."""

    def __init__(self, project: Path):
        super().__init__(daemon=True)
        self.project, self.killed, self.done = project, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if Path(os.readlink(f"/proc/{pid}/cwd")) != self.project:
                        continue
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                except (OSError, ValueError):
                    continue
                stage = argv[2] if len(argv) > 2 and argv[1].endswith("/ddpm") else None
                if stage in STAGES and stage not in self.killed:
                    os.kill(int(pid), signal.SIGKILL)
                    self.killed.append(stage)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, prefect_server):
    """Run the flow twice in one temporary git + DVC project with its own MLflow store."""
    base = tmp_path_factory.mktemp("pipeline")
    source = write_fashion_idx(base / "fashion")
    project = make_project(base / "project")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # the tiny training lasts seconds
    from flows.pipeline import ddpm_pipeline

    from flows.pipeline import apply_overrides_to_params

    apply_overrides_to_params(project / "params.yaml", tiny_overrides(source))  # the project's own params
    run(["git", "commit", "-qam", "tiny params"], project)
    committed = (project / "params.yaml").read_text()
    import flows.pipeline

    delays, flows.pipeline.RETRY_DELAY_S = flows.pipeline.RETRY_DELAY_S, [1]  # the retries below: 1 s apart
    killer = StageKiller(project)
    killer.start()
    try:
        first = ddpm_pipeline(root=str(project))
    finally:
        killer.done.set()
        flows.pipeline.RETRY_DELAY_S = delays
    ckpts = sorted(p.name for p in (project / "checkpoints").rglob("*.safetensors"))
    mtimes = {p: p.stat().st_mtime_ns for p in (project / "models").iterdir()}
    second = ddpm_pipeline(root=str(project))
    lock = (project / "dvc.lock").read_text()
    samples = (project / "samples" / "samples.npz").read_bytes()
    # for this run only (no sampler comparison: the first run's metrics check it; seconds here)
    third = ddpm_pipeline(root=str(project), overrides=["sample.seed=1", "evaluate.compare_samplers=[]"])
    yield {"project": project, "source": source, "first": first, "killed": killer.killed, "second": second, "third": third, "ckpts": ckpts,
           "mtimes": mtimes, "uri": uri, "base": base, "committed": committed, "lock": lock, "samples": samples}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_first_run_runs_every_stage_and_registers_a_model(pipeline_run):
    """Each stage's process was SIGKILLed once on the way (StageKiller) and retried: the run's records below
    are those of an undisturbed run (one MLflow run, one version, every loss point)."""
    from mlflow import MlflowClient

    first, project = pipeline_run["first"], pipeline_run["project"]
    assert pipeline_run["killed"] == STAGES
    assert [s["stage"] for s in first["stages"]] == STAGES
    assert all(s["ran"] for s in first["stages"])
    metrics = json.loads((project / "metrics" / "metrics.json").read_text())
    comparison = {f"fd_classifier_n16_{s}_{k}steps" for s in ("ddpm", "ddim", "dpm_solver_pp", "dpm_solver_pp_sde")
                  for k in (5, 10, 20)}
    assert set(metrics) == {"fd_classifier_n16", "fd_classifier_real_n16", "classifier_accuracy",
                            "sample_class_entropy", "num_samples", "fid_inception_n16", "fid_inception_real_n16",
                            "kid_inception_n16", "kid_inception_real_n16", "precision_inception_n16",
                            "recall_inception_n16", "inception_reference_images", "memorized_fraction_n16"} | comparison
    assert metrics["num_samples"] == 16 and metrics["fd_classifier_n16"] > 0
    client = MlflowClient(pipeline_run["uri"], pipeline_run["uri"])
    versions = client.search_model_versions("name='ddpm-fashion-mnist'")
    assert [int(v.version) for v in versions] == [1]
    mlrun = client.get_run(versions[0].run_id)
    assert mlrun.data.params["train.steps"] == "6" and mlrun.data.params["sample.steps"] == "4"
    assert mlrun.data.metrics[f"fd_classifier_n16"] == metrics["fd_classifier_n16"]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(mlrun.data.metrics)
    losses = client.get_metric_history(mlrun.info.run_id, "train_loss")
    assert [m.step for m in losses] == [2, 4, 6]
    manifest = json.loads((project / "data" / "prepared" / "manifest.json").read_text())
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert mlrun.data.tags["ddpm.data_hash"] == manifest["content_hash"]
    assert mlrun.data.tags["ddpm.git_commit"] == head
    assert mlrun.data.tags["prefect.flow_run_id"]
    # the prepared data is the run's dataset input: its content hash, its DVC path at this commit
    [ds_input] = mlrun.inputs.dataset_inputs
    ds = ds_input.dataset
    assert ds.digest == manifest["content_hash"][:12] and ds.source_type == "dvc"
    assert json.loads(ds.source)["dvc_path"] == "data/prepared" and json.loads(ds.source)["git_commit"] == head
    assert json.loads(ds.profile)["train_images"] == manifest["splits"]["train"]["count"]
    assert [(t.key, t.value) for t in ds_input.tags] == [("mlflow.data.context", "training")]
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "samples")}
    assert "samples/grid.png" in artifacts
    # sample grids by training step (checkpoints at steps 3 and 6), shown as an image history in the UI
    steps_logged = {a.path for a in client.list_artifacts(mlrun.info.run_id, "images")}
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in steps_logged if p.endswith(".png")) == [3, 6]
    assert first["run"]["run_id"] == mlrun.info.run_id
    # the promotion gate ran: the first evaluated version is both candidate and champion
    assert int(client.get_model_version_by_alias("ddpm-fashion-mnist", "champion").version) == 1
    assert int(client.get_model_version_by_alias("ddpm-fashion-mnist", "candidate").version) == 1
    assert mlrun.data.tags["promotion.reason"] == "no champion yet"
    assert "champion: `models:/ddpm-fashion-mnist@champion` = version 1" in first["report"]
    # evaluation metrics are the logged model's (the Models tab), not version tags; the experiment is a
    # model-training one (the UI's runs view, not the GenAI view)
    from flows.promotion import logged_model_id

    model = client.get_logged_model(logged_model_id(versions[0]))
    third = pipeline_run["third"]["metrics"]["fd_classifier_n16"]  # the override run evaluated the same version
    assert {m.value for m in model.metrics if m.key == "fd_classifier_n16"} == {metrics["fd_classifier_n16"], third}
    assert not any(k.startswith("ddpm.metric.") for k in versions[0].tags)
    assert client.get_experiment(mlrun.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_flow_leaves_dvc_clean_and_second_run_skips_everything(pipeline_run):
    from mlflow import MlflowClient

    project, second = pipeline_run["project"], pipeline_run["second"]
    status = run(DVC + ["status"], project).stdout
    assert "up to date" in status, status
    assert [s["ran"] for s in second["stages"]] == [False, False, False, False, False]
    assert sorted(p.name for p in (project / "checkpoints").rglob("*.safetensors")) == pipeline_run["ckpts"]
    assert {p: p.stat().st_mtime_ns for p in (project / "models").iterdir()} == pipeline_run["mtimes"]
    client = MlflowClient(pipeline_run["uri"], pipeline_run["uri"])
    assert len(client.search_model_versions("name='ddpm-fashion-mnist'")) == 1
    assert second["metrics"] == pipeline_run["first"]["metrics"]


def test_a_run_with_overrides_is_a_dvc_experiment_and_leaves_nothing_behind(pipeline_run):
    project, third = pipeline_run["project"], pipeline_run["third"]
    assert [s["ran"] for s in third["stages"]] == [False, False, True, False, True]  # sample and evaluate
    # the workspace is as before the run: params, dvc.lock, outputs
    assert (project / "params.yaml").read_text() == pipeline_run["committed"]
    assert (project / "dvc.lock").read_text() == pipeline_run["lock"]
    assert (project / "samples" / "samples.npz").read_bytes() == pipeline_run["samples"]
    assert "up to date" in run(DVC + ["status"], project).stdout
    # the run is an experiment with its params and metrics; its MLflow run names it
    name = third["experiment"]
    exps = json.loads(run(DVC + ["exp", "show", "--json"], project).stdout)
    found = [e for rev in exps for e in (rev.get("experiments") or []) if e.get("name") == name]
    assert len(found) == 1, exps
    params = found[0]["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert params["sample"]["seed"] == 1 and params["train"]["steps"] == 6
    assert f"dvc exp apply {name}" in third["report"]
    from mlflow import MlflowClient

    tags = MlflowClient(pipeline_run["uri"]).get_run(pipeline_run["first"]["run"]["run_id"]).data.tags
    assert tags["ddpm.dvc_experiment"] == pipeline_run["first"]["experiment"] and tags["ddpm.git_dirty"] == "false"


def test_make_clean_leaves_the_checkout_as_before_the_runs(pipeline_run, tmp_path):
    """`make clean` removes every ignored path the runs made (outputs, checkpoints, the MLflow store and its
    artifacts, DVC's cache) and nothing tracked; the virtualenv stays."""
    project = tmp_path / "project"
    shutil.copytree(pipeline_run["project"], project, symlinks=True)  # the module's other tests keep the original
    shutil.copy2(PROJECT_ROOT / "Makefile", project / "Makefile")
    (project / ".venv").mkdir()
    (project / ".venv" / "pyvenv.cfg").write_text("")
    run(["git", "add", "-A"], project)  # in a user's checkout dvc.lock and metrics/ are tracked files
    run(["git", "commit", "-qm", "after the runs"], project)
    made = run(["git", "status", "--porcelain", "--ignored"], project).stdout.splitlines()
    assert "!! mlartifacts/" in made and "!! mlruns/" not in made, made  # the artifacts where the README says
    run(["make", "clean"], project)
    assert run(["git", "status", "--porcelain", "--ignored"], project).stdout.splitlines() == ["!! .venv/"]


def test_sample_from_the_registry(pipeline_run):
    project = pipeline_run["project"]
    out = run([DDPM, "sample", "--model", "models:/ddpm-fashion-mnist/1", "-S", "sample.out_dir=registry_samples",
               "-S", "sample.num_samples=4", "--no-track"], project)
    with np.load(project / "registry_samples" / "samples.npz") as f:
        assert f["images"].shape == (4, 1, 16, 16)
    run([DDPM, "sample", "--model", "models:/ddpm-fashion-mnist@champion", "-S", "sample.out_dir=champion_samples",
         "-S", "sample.num_samples=4", "--no-track"], project)
    with np.load(project / "champion_samples" / "samples.npz") as f:
        assert f["images"].shape == (4, 1, 16, 16)
    missing = run([DDPM, "sample", "--model", "models:/ddpm-fashion-mnist/7", "-S", "sample.out_dir=x"], project,
                  check=False)
    assert missing.returncode == 2 and "models:/ddpm-fashion-mnist/7 is not in the registry" in missing.stderr


def test_bad_override_is_named_and_loses_nothing(pipeline_run):
    project = pipeline_run["project"]
    before = (project / "params.yaml").read_text()
    out = run([DDPM, "pipeline", "-S", "train.stepz=3"], project, check=False)
    assert out.returncode == 2 and "unknown key train.stepz" in out.stderr
    out = run([DDPM, "train", "-S", "train.lr=fast"], project, check=False)
    assert out.returncode == 2 and "train.lr='fast' must be a number" in out.stderr
    assert (project / "params.yaml").read_text() == before
    assert (project / "models" / "model.safetensors").exists()


def test_another_clone_reproduces_an_experiment_with_dvc_pull(pipeline_run):
    """Nothing by hand: the experiment ref from the project (git remote origin), its outputs from the DVC remote."""
    project, base, name = pipeline_run["project"], pipeline_run["base"], pipeline_run["third"]["experiment"]
    clone = base / "exp-clone"
    run(["git", "clone", "-q", str(project), str(clone)], base)
    run(DVC + ["exp", "pull", "origin", name], clone)
    run(DVC + ["exp", "branch", name, "from-exp"], clone)  # (`dvc exp apply` needs the outputs in the cache first)
    run(["git", "checkout", "-q", "from-exp"], clone)
    run(DVC + ["pull"], clone)
    assert run(["git", "status", "--porcelain"], clone).stdout == ""
    assert yaml.safe_load((clone / "params.yaml").read_text())["sample"]["seed"] == 1
    assert "up to date" in run(DVC + ["status"], clone).stdout
    assert (clone / "samples" / "samples.npz").read_bytes() != pipeline_run["samples"]  # the experiment's samples


def test_fresh_clone_restores_outputs_with_dvc_pull(pipeline_run):
    project, base = pipeline_run["project"], pipeline_run["base"]
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "pipeline run"], project)
    clone = base / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], base)
    assert not (clone / "models" / "model.safetensors").exists()
    run(DVC + ["pull"], clone)
    assert (clone / "models" / "model.safetensors").read_bytes() == (project / "models" / "model.safetensors").read_bytes()
    assert "up to date" in run(DVC + ["status"], clone).stdout

    # the pulled models/mlflow.json names a run of the first project's store; the clone has a store of its own
    store = f"sqlite:///{clone / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    old_run = json.loads((clone / "models" / "mlflow.json").read_text())["run_id"]
    sampled = run([DDPM, "sample", "-S", "sample.seed=2"], clone, env=env)
    assert f"names run {old_run}, which the tracking store {store} does not hold" in sampled.stdout, sampled.stdout
    new_run = json.loads((clone / "samples" / "mlflow.json").read_text())["run_id"]
    assert new_run and new_run != old_run
    evaluated = run([DDPM, "evaluate", "-S", "evaluate.compare_samplers=[]"], clone, env=env)
    assert "promotion: the samples come from no registered model version; gate skipped" in evaluated.stdout
    from mlflow import MlflowClient

    got = MlflowClient(store).get_run(new_run)
    assert got.data.tags["ddpm.run_id_elsewhere"] == old_run and "fd_classifier_n16" in got.data.metrics
    assert MlflowClient(store, store).search_registered_models() == []  # nothing registered or promoted here


def test_stage_output_reaches_the_prefect_task_log(pipeline_run):
    """The train stage's own lines (not just 'checking with DVC') are in the task run's log."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTextSearch

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(text=LogFilterTextSearch(query="trained to step 6")))
    assert any(log.task_run_id is not None and "trained to step 6" in log.message for log in logs)


def test_a_deterministic_stage_failure_is_not_retried_and_its_reason_is_the_last_line(tmp_path, prefect_api_url):
    project = make_project(tmp_path / "project")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "PREFECT_API_URL": prefect_api_url}
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["source_path"] = str(tmp_path / "no-such-folder")  # DVC refuses before the command
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([DDPM, "pipeline"], project, check=False, env=env)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2, out.stderr[-2000:]
    assert last.startswith("ddpm pipeline: error: stage prepare failed (DVC did not run it, not retried): "
                           "failed to reproduce 'prepare': "), last
    assert "No such file or directory" in last and last.endswith("no-such-folder'"), last
    assert (out.stdout + out.stderr).count("Retrying") == 0 and out.stderr.count("checking with DVC") == 1

    # the command runs and explains its failure (exit 2): its own line is the reason, and train is not retried
    params["prepare"].update(source_path=str(write_fashion_idx(tmp_path / "fashion")), resolution=16)
    params["train"]["batch_size"] = 100_000
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([DDPM, "pipeline"], project, check=False, env=env)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2, out.stderr[-2000:]
    assert last.startswith("ddpm pipeline: error: stage train failed (exit 2, not retried): ddpm train: error: "), last
    assert "100000" in last and out.stderr.count("Running stage 'train'") == 1  # once: no retry


def test_the_stage_error_line_is_found_under_dvc_and_tracebacks():
    import pickle

    from flows.stage_failure import classify

    own = classify("train", ["Running stage 'train':", "ddpm train: error: train.lr=1e+30 diverged", "",
                             "ERROR: failed to reproduce 'train': failed to run: bin/ddpm train, exited with 2"])
    assert (own.exit_code, own.reason, own.deterministic) == (2, "ddpm train: error: train.lr=1e+30 diverged", True)
    crash = classify("train", ["Traceback (most recent call last):", '  File "x.py", line 1', "KeyError: 'x'",
                               "ERROR: failed to reproduce 'train': failed to run: bin/ddpm train, exited with 1"])
    assert (crash.exit_code, crash.reason, crash.deterministic) == (1, "KeyError: 'x'", False)
    dvc = classify("prepare", ["ERROR: failed to reproduce 'prepare': dependency 'x' does not exist"])
    assert (dvc.exit_code, dvc.deterministic) == (None, True) and dvc.reason.endswith("'x' does not exist")
    assert not classify("train", ["ERROR: Unable to acquire lock. Most likely another DVC process"]).deterministic
    killed = classify("sample", ["Running stage 'sample':", "> bin/ddpm sample",
                                 "ERROR: failed to reproduce 'sample': failed to run: bin/ddpm sample, exited with -9"])
    assert (killed.reason, killed.deterministic) == ("killed by SIGKILL", False)
    late = classify("train", ["> bin/ddpm train", "train: 40%", "ERROR: failed to reproduce 'train': failed to run: "
                              "bin/ddpm train, exited with -15"])
    assert late.reason == "killed by SIGTERM after: train: 40%"
    shell = classify("reference", ["> bin/ddpm reference", "Killed", "ERROR: failed to reproduce 'reference': failed "
                                   "to run: bin/ddpm reference, exited with 137"])
    assert (shell.exit_code, shell.reason, shell.deterministic) == (137, "killed by SIGKILL", False)
    assert str(pickle.loads(pickle.dumps(own))) == str(own)


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_ddpm_ui_shows_the_pipeline_run_with_its_metrics_and_sample_grid(pipeline_run, tmp_path):
    """What a user opens after `make run`: `ddpm ui`, the run's page and its sample grid, in headless Chromium."""
    import httpx

    from tests.test_operations import base_env, chromium_dom, free_port, spawn, stop, tail

    project, run_id = pipeline_run["project"], pipeline_run["first"]["run"]["run_id"]
    port, log = free_port(), tmp_path / "ui.log"
    ui = spawn([DDPM, "ui", "--port", str(port)], log, cwd=project, env=base_env(MLFLOW_TRACKING_URI=pipeline_run["uri"]))
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            assert ui.poll() is None, f"ddpm ui exited ({ui.returncode}):\n{tail(log)}"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        exp_id = httpx.get(f"{base}/api/2.0/mlflow/runs/get", params={"run_id": run_id}).json()["run"]["info"]["experiment_id"]

        def dom(fragment: str) -> str:
            return chromium_dom(f"{base}/#/experiments/{exp_id}/runs/{run_id}{fragment}?workflowType=machine_learning",
                                tmp_path / "chromium")

        printed = f"{base}/#/experiments/{exp_id}?workflowType=machine_learning"  # the model-training view
        assert printed in log.read_text(), tail(log)
        overview = dom("")
        assert "fd_classifier_n16" in overview and "train_loss" in overview, overview[-3000:]
        assert "ddpm-fashion-mnist" in overview, overview[-3000:]  # the registered model it produced
        grid = dom("/artifacts/samples/grid.png")
        assert '<img alt="samples/grid.png" src="blob:' in grid, grid[-3000:]  # the grid, fetched and shown
        png = httpx.get(f"{base}/get-artifact", params={"path": "samples/grid.png", "run_uuid": run_id})
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        stop(ui, signal.SIGINT, grace_s=10)
    with socket.socket() as s:  # Ctrl-C to `ddpm ui` stopped the MLflow server it started: the port is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
