"""Training with several ranks (DDP through torchrun, gloo on the CPU), started by `ddpm train` itself:
the loss curve of 2 ranks matches one process with the same global batch, only rank 0 writes, a killed
rank fails the run with a clear message and a rerun resumes. Plus the errors raised before any rank starts.

Tolerance: the 2-rank run draws the same data, timesteps and noise as one process (ddpm/train.py), so
the only difference is the order of floating-point sums (per-rank means averaged by the all-reduce
instead of one mean over the batch, gradients summed by gloo): logged losses agree to ~1e-7 relative
here; we allow 1e-5. The EMA weights agree to ~2e-4 absolute (AdamW divides by sqrt(v), which
magnifies rounding in parameters whose gradients are tiny); we allow 2e-3.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from ddpm import checkpoint, config, distributed
from ddpm.config import ConfigError
from ddpm.train import checkpoint_dir, refuse_other_world_size, train
from tests.test_train import PROJECT_ROOT, make_prepared, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_RTOL, WEIGHT_ATOL = 1e-5, 2e-3

# Installed in every process of a `ddpm train` run through PYTHONPATH: records what each rank writes
# under WATCH (opened for writing, renamed, created, deleted) in AUDIT/rank<RANK>.txt.
AUDIT_HOOK = '''
import os, sys
if "RANK" in os.environ:
    _watch, _log, _busy = os.environ["DDPM_TEST_WATCH"], os.path.join(os.environ["DDPM_TEST_AUDIT"],
                                                                      "rank" + os.environ["RANK"] + ".txt"), []
    def _hook(event, args):
        if _busy or event not in ("open", "os.rename", "os.replace", "os.mkdir", "os.remove"):
            return
        path = args[0] if event != "os.rename" and event != "os.replace" else args[1]
        if event == "open" and not ((isinstance(args[1], str) and any(c in args[1] for c in "wax+"))
                                    or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR)):
            return
        if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(_watch):
            _busy.append(1)
            try:
                with open(_log, "a") as f:
                    f.write(event + " " + os.fsdecode(path) + "\\n")
            finally:
                _busy.pop()
    sys.addaudithook(_hook)
'''


def write_params(run_dir: Path, prepared: Path, **train_overrides) -> Path:
    raw = tiny_cfg(run_dir, train={"nproc_per_node": 2, **train_overrides}).to_dict()
    raw["prepare"]["out_dir"] = str(prepared)
    params = run_dir / "params.yaml"
    params.parent.mkdir(parents=True, exist_ok=True)
    params.write_text(json.dumps(raw))  # JSON is YAML
    return params


def ddpm_train(params: Path, env: dict | None = None, track: bool = False, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "train", *([] if track else ["--no-track"]),
                             "--params", str(params)],
                            cwd=PROJECT_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def losses(path: Path) -> list[tuple[int, float]]:
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def assert_same_curve(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=LOSS_RTOL)


def test_two_ranks_train_as_one_process_with_the_same_global_batch_and_only_rank_0_writes(tmp_path):
    prepared = make_prepared(tmp_path / "data")
    one = train(tiny_cfg(tmp_path / "one"), prepared)

    run_dir, audit, hook = tmp_path / "two", tmp_path / "audit", tmp_path / "hook"
    audit.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    params = write_params(run_dir, prepared)
    store = f"sqlite:///{run_dir / 'mlflow.db'}"
    child = ddpm_train(params, track=True, env={"PYTHONPATH": os.pathsep.join([str(hook), str(PROJECT_ROOT)]),
                                                "DDPM_TEST_WATCH": str(run_dir), "DDPM_TEST_AUDIT": str(audit),
                                                "MLFLOW_TRACKING_URI": store})
    out, err = child.communicate(timeout=240)
    assert child.returncode == 0, err[-3000:]
    assert "starting 2 ranks on this machine (world size 2, global batch 8, 4 per rank) through torchrun" in out

    assert_same_curve(losses(run_dir / "metrics" / "train_loss.csv"), losses(one.loss_csv))
    w2, w1 = checkpoint.load(run_dir / "models" / "model.safetensors")[0], checkpoint.load(one.model_path)[0]
    assert max((w2[k] - w1[k]).abs().max().item() for k in w1) < WEIGHT_ATOL

    # rank 0 wrote the checkpoints (in the world-size-2 folder), the loss table, the model and its run file;
    # rank 1 wrote nothing at all
    assert not (audit / "rank1.txt").exists(), (audit / "rank1.txt").read_text()
    written = {Path(line.split(" ", 1)[1]).relative_to(run_dir).as_posix()
               for line in (audit / "rank0.txt").read_text().splitlines() if "/." not in line}
    ckpt_dir = checkpoint_dir(config.load(params), prepared, world_size=2)
    assert ckpt_dir != one.checkpoint_dir
    logged = {p for p in written if p.startswith("mlartifacts/")}  # rank 0's MLflow artifacts: the logged model
    assert any(p.endswith("model.safetensors") for p in logged), sorted(written)
    assert {p for p in written - logged if p.endswith(".safetensors")} == {
        "models/model.safetensors", *(f"checkpoints/{ckpt_dir.name}/step-{s:09d}.safetensors" for s in (3, 6, 9, 12))}
    assert {"metrics/train_loss.csv", "models/mlflow.json"} <= written
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(ckpt_dir)] == [6, 9, 12]
    # one MLflow run (rank 0's, in the store it alone wrote) with one registered version
    from mlflow import MlflowClient

    client = MlflowClient(store, store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    assert [v.run_id for v in client.search_model_versions()] == [runs[0].info.run_id]


def test_a_killed_rank_fails_the_run_clearly_and_a_rerun_resumes(tmp_path):
    prepared = make_prepared(tmp_path / "data")
    steps = dict(steps=24, log_every_steps=4, checkpoint_every_steps=4, hflip=True, grad_accum_steps=2)
    one = train(tiny_cfg(tmp_path / "one", train=steps), prepared)
    run_dir = tmp_path / "two"
    params = write_params(run_dir, prepared, **steps)
    ckpt_dir = checkpoint_dir(config.load(params), prepared, world_size=2)

    child = ddpm_train(params)
    try:
        deadline = time.monotonic() + 180
        while not checkpoint.step_path(ckpt_dir, 8).exists():
            assert child.poll() is None, f"training exited early ({child.returncode}):\n{child.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint at step 8 after 180 s"
            time.sleep(0.01)
        (rank1,) = [p for p in psutil.Process(child.pid).children(recursive=True)
                    if p.environ().get("RANK") == "1"]
        rank1.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 1, err[-3000:]
    left = [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(ckpt_dir)]
    assert 8 in left and max(left) < 24, left  # killed before the end
    assert not (run_dir / "models").exists()  # no model from a failed run
    last = err.strip().splitlines()[-1]
    assert last == (f"ddpm train: error: training rank 1 of 2 was killed by SIGKILL, and torchrun stopped the other "
                    f"ranks; the last checkpoint is step {max(left)} in {ckpt_dir}; run `ddpm train` again to "
                    f"resume from it"), last

    rerun = ddpm_train(params)
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err[-3000:]
    assert json.loads((run_dir / "models" / "mlflow.json").read_text())["resumed_from_step"] == max(left)
    assert_same_curve(losses(run_dir / "metrics" / "train_loss.csv"), losses(one.loss_csv))


def test_the_batch_must_split_evenly_across_the_ranks():
    with pytest.raises(ConfigError, match=re.escape(
            "train.batch_size=30 must be divisible by the world size 4 (train.nproc_per_node=2 x train.nnodes=2): "
            "each rank takes batch_size / world size images of every batch; e.g. train.batch_size=28")):
        config.from_dict({"train": {"batch_size": 30, "nproc_per_node": 2, "nnodes": 2}})
    with pytest.raises(ConfigError, match=r"train\.node_rank=2 must be in 0\.\.1 \(train\.nnodes=2\)"):
        config.from_dict({"train": {"nnodes": 2, "node_rank": 2}})


def test_more_ranks_than_gpus_is_an_error_before_anything_starts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a 2-GPU machine, on this CPU-only one
    tc = config.TrainConfig(nproc_per_node=4)
    with pytest.raises(ConfigError, match=re.escape(
            "train.nproc_per_node=4 is more than the 2 GPUs this machine has (one rank per GPU): set "
            "train.nproc_per_node to at most 2")):
        distributed.check_devices(tc, torch.device("cuda"))
    distributed.check_devices(config.TrainConfig(nproc_per_node=2), torch.device("cuda"))
    distributed.check_devices(tc, torch.device("cpu"))  # gloo ranks on the CPU: any number


def test_world_size_is_in_the_fingerprint_only_above_one_and_another_one_says_what_to_do(tmp_path):
    prepared = make_prepared(tmp_path / "data")
    base = checkpoint_dir(tiny_cfg(tmp_path), prepared)
    launch_only = tiny_cfg(tmp_path, train={"master_port": 1234, "master_addr": "10.0.0.1"})
    assert checkpoint_dir(launch_only, prepared) == base  # how ranks meet is not what they compute
    two = tiny_cfg(tmp_path, train={"nproc_per_node": 2})
    assert checkpoint_dir(two, prepared) != base
    assert checkpoint_dir(two, prepared) == checkpoint_dir(tiny_cfg(tmp_path, train={"nnodes": 2}), prepared)

    one = train(tiny_cfg(tmp_path, train={"steps": 3}), prepared)  # one process, up to step 3
    base = one.checkpoint_dir
    two = tiny_cfg(tmp_path, train={"nproc_per_node": 2, "steps": 3})
    with pytest.raises(ConfigError) as caught:
        refuse_other_world_size(two, prepared, fresh=False)
    assert str(caught.value) == (
        f"{base} holds checkpoints of this training at world size 1 (up to step 3), and this run has world size 2 "
        f"(train.nproc_per_node=2 x train.nnodes=1); a checkpoint resumes only at the world size that wrote it. "
        f"To continue that run, set train.nproc_per_node x train.nnodes back to 1; to start over at world size 2, "
        f"run `ddpm train --fresh` (the checkpoints in {base} are kept)")
    refuse_other_world_size(two, prepared, fresh=True)  # --fresh: start over, nothing to refuse
