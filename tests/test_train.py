"""The training loop on a tiny generated data set: determinism, bitwise resume (also after SIGKILL), outputs."""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import checkpoint, config
from ddpm.checkpoint import CheckpointError
from ddpm.config import TrainConfig
from ddpm.prepare import content_hash
from ddpm.train import TrainingOutOfMemoryError, TrainingStopped, _explain_out_of_memory, checkpoint_dir, ema_beta, learning_rate, train

PROJECT_ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def make_prepared(root: Path, n: int = 40, size: int = 8, seed: int = 0) -> Path:
    """A prepared data set in ddpm.prepare's layout: uint8 (N, 1, size, size) images, int64 labels, manifest."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8),
        "train_labels": (np.arange(n) % 10).astype(np.int64),
        "test_images": rng.integers(0, 256, (8, 1, size, size), dtype=np.uint8),
        "test_labels": (np.arange(8) % 10).astype(np.int64),
    }
    root.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(root / f"{name}.npy", array)
    manifest = {"content_hash": content_hash(arrays), "channels": 1, "resolution": size, "shape": [1, size, size],
                "classes": [str(k) for k in range(10)]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prepared") / "data")


# 40 images, batch 8, 2 micro-batches per step: an epoch ends inside step 3, so a resume at step 3 or 6
# lands mid-epoch; hflip and dropout draw from both RNGs; v objective with min-SNR weights.
HARD = dict(model={"dropout": 0.1}, diffusion={"objective": "v"},
            train={"hflip": True, "grad_accum_steps": 2, "min_snr_gamma": 5.0})
PLAIN = dict(model={}, diffusion={}, train={})
BF16 = dict(model={}, diffusion={}, train={"mixed_precision": "bf16"})  # bf16 autocast on the CPU
CASES = {"hard": HARD, "plain": PLAIN, "bf16": BF16}


def tiny_cfg(run_dir: Path, model=None, diffusion=None, train=None) -> config.Config:
    t = dict(steps=12, batch_size=8, lr=2e-3, lr_warmup_steps=2, ema_halflife_steps=2.0, log_every_steps=2,
             checkpoint_every_steps=3, keep_checkpoints=3, device="cpu", mixed_precision="fp32",
             checkpoint_dir=str(run_dir / "checkpoints"), out_dir=str(run_dir / "models"),
             loss_path=str(run_dir / "metrics" / "train_loss.csv"))
    return config.from_dict({
        "model": {"base_channels": 8, "channel_mults": [1, 2], "attention_levels": [-1], "attention_heads": 2,
                  **(model or {})},
        "diffusion": {"schedule": "cosine", "timesteps": 20, **(diffusion or {})},
        "train": {**t, **(train or {})},
    })


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)[0]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class Interrupt(Exception):
    pass


def stop_after_checkpoint(step: int):
    def callback(event):
        if event["event"] == "checkpoint" and event["step"] == step:
            raise Interrupt(f"stopped after the checkpoint at step {step}")
    return callback


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """Uninterrupted 12-step runs, one per configuration, computed once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cfg = tiny_cfg(tmp_path_factory.mktemp(f"reference-{name}"), **CASES[name])
            cache[name] = train(cfg, prepared)
        return cache[name]
    return get


def assert_matches_reference(result, ref_result) -> None:
    """Final EMA weights, last checkpoint (model, EMA, optimizer, RNG, data position) and loss curve all equal."""
    assert result.steps == ref_result.steps
    assert_same_tensors(weights(result.model_path), weights(ref_result.model_path))
    last = checkpoint.step_path(result.checkpoint_dir, result.steps)
    ref_last = checkpoint.step_path(ref_result.checkpoint_dir, ref_result.steps)
    tensors, meta = checkpoint.load(last)
    ref_tensors, ref_meta = checkpoint.load(ref_last)
    assert_same_tensors(tensors, ref_tensors)
    assert (meta["step"], meta["epoch"], meta["pos"]) == (ref_meta["step"], ref_meta["epoch"], ref_meta["pos"])
    assert result.loss_csv.read_text() == ref_result.loss_csv.read_text()


def test_same_seed_same_weights_other_seed_other_weights(prepared, tmp_path, reference):
    ref = reference("plain")
    again = train(tiny_cfg(tmp_path / "a"), prepared)
    assert_same_tensors(weights(again.model_path), weights(ref.model_path))
    other = train(tiny_cfg(tmp_path / "b", train={"seed": 1}), prepared)
    w, w_other = weights(ref.model_path), weights(other.model_path)
    assert sum(not torch.equal(w[k], w_other[k]) for k in w) > len(w) // 2


@pytest.mark.parametrize("case,stop_at", [("plain", 6), ("hard", 3), ("hard", 6), ("bf16", 6)])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(prepared, tmp_path, reference, case, stop_at):
    ref = reference(case)
    cfg = tiny_cfg(tmp_path, **CASES[case])
    with pytest.raises(Interrupt):
        train(cfg, prepared, callback=stop_after_checkpoint(stop_at))
    ckpt_dir = checkpoint_dir(cfg, prepared)
    assert [p.name for p in checkpoint.list_checkpoints(ckpt_dir)][-1] == f"step-{stop_at:09d}.safetensors"
    assert not (tmp_path / "models").exists()  # a crash writes no final model

    events = []
    result = train(cfg, prepared, callback=events.append)
    assert result.resumed_from_step == stop_at
    assert events[0]["event"] == "start" and events[0]["resumed_from_step"] == stop_at
    assert [e["step"] for e in events if e["event"] == "log"] == list(range(stop_at + 2 - stop_at % 2, 13, 2))
    assert_matches_reference(result, ref)


def test_a_stop_request_checkpoints_the_step_in_progress_and_resume_is_bitwise_identical(prepared, tmp_path,
                                                                                       reference):
    """What SIGTERM asks of `ddpm train`: stop at step 5, between the checkpoints at 3 and 6, losing no step."""
    ref = reference("plain")
    cfg = tiny_cfg(tmp_path)
    stop = threading.Event()
    with pytest.raises(TrainingStopped, match=r"stopped at step 5; checkpoint .*step-000000005.safetensors written"):
        train(cfg, prepared, callback=lambda e: stop.set() if e["event"] == "log" and e["step"] == 4 else None,
              stop=stop)
    ckpt_dir = checkpoint_dir(cfg, prepared)
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(ckpt_dir)] == [3, 5]
    assert not (tmp_path / "models").exists()

    result = train(cfg, prepared)
    assert result.resumed_from_step == 5
    assert_matches_reference(result, ref)


def test_sigkill_then_resume_is_bitwise_identical(prepared, tmp_path, reference):
    """A real crash: kill -9 a training process mid-run, then resume in this process."""
    ref = reference("hard")
    cfg = tiny_cfg(tmp_path, **HARD)
    ckpt_dir = checkpoint_dir(cfg, prepared)
    script = (
        "import json, sys, time, torch\n"
        "torch.set_num_threads(1)\n"
        "from ddpm import config\n"
        "from ddpm.train import train\n"
        "cfg = config.from_dict(json.loads(sys.argv[1]))\n"
        # slow each logged step (every 2) down so the parent can kill the process between checkpoints
        "train(cfg, sys.argv[2], callback=lambda e: time.sleep(0.5) if e['event'] == 'log' else None)\n"
    )
    log = tmp_path / "child.log"
    with open(log, "wb") as out:
        child = subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg.to_dict()), str(prepared)],
                                 cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        middle = checkpoint.step_path(ckpt_dir, 6)
        deadline = time.monotonic() + 120
        while not middle.exists():
            assert child.poll() is None, f"training exited early ({child.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no checkpoint at step 6 after 120 s:\n{log.read_text()}"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    left = [int(p.name[5:14]) for p in checkpoint.list_checkpoints(ckpt_dir)]
    assert 6 in left and max(left) < 12, left  # killed before the end
    assert not (tmp_path / "models").exists()

    result = train(cfg, prepared)
    assert result.resumed_from_step == max(left)
    assert_matches_reference(result, ref)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(prepared, tmp_path, reference):
    ref = reference("hard")
    cfg = tiny_cfg(tmp_path, **HARD)
    with pytest.raises(Interrupt):
        train(cfg, prepared, callback=stop_after_checkpoint(6))
    newest = checkpoint.step_path(checkpoint_dir(cfg, prepared), 6)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # e.g. a disk that filled up
    with pytest.warns(UserWarning, match=r"step-000000006\.safetensors is corrupt or truncated.*previous checkpoint"):
        result = train(cfg, prepared)
    assert result.resumed_from_step == 3 and result.steps == 12
    assert_matches_reference(result, ref)


def test_fresh_ignores_existing_checkpoints(prepared, tmp_path, reference):
    ref_weights = weights(reference("plain").model_path)
    cfg = tiny_cfg(tmp_path)
    train(cfg, prepared)
    done = train(cfg, prepared)  # everything is done: resumes at the end and takes no step
    assert done.resumed_from_step == 12 and done.steps == 12
    assert_same_tensors(weights(done.model_path), ref_weights)

    events = []
    result = train(cfg, prepared, fresh=True, callback=events.append)
    assert result.resumed_from_step == 0 and events[0]["resumed_from_step"] == 0
    assert sum(e["event"] == "log" for e in events) == 6  # all 12 steps ran again
    assert_same_tensors(weights(result.model_path), ref_weights)
    assert [p.name for p in checkpoint.list_checkpoints(result.checkpoint_dir)] == [
        "step-000000006.safetensors", "step-000000009.safetensors", "step-000000012.safetensors"]


def test_outputs_loss_curve_and_events(prepared, tmp_path):
    cfg = tiny_cfg(tmp_path, train={"steps": 7, "log_every_steps": 3, "checkpoint_every_steps": 4,
                                    "keep_checkpoints": 1, "ema_rampup_ratio": 0.0})
    events = []
    result = train(cfg, prepared, callback=events.append)
    assert [(e["event"], e["step"]) for e in events] == [
        ("start", 0), ("log", 3), ("checkpoint", 4), ("log", 6), ("log", 7), ("checkpoint", 7), ("end", 7)]
    assert events[0]["num_parameters"] == result.num_parameters > 0

    with open(result.loss_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "lr"]
    assert [int(r["step"]) for r in rows] == [3, 6, 7]
    for r in rows:  # lr of the step that was logged (0-based step - 1)
        assert float(r["lr"]) == pytest.approx(learning_rate(int(r["step"]) - 1, cfg.train), rel=1e-12)
        assert 0 < float(r["loss"]) < 10
    assert float(rows[-1]["loss"]) == pytest.approx(result.final_loss, rel=1e-12)

    # keep_checkpoints=1; the model file holds the EMA weights, not the raw ones
    (last,) = checkpoint.list_checkpoints(result.checkpoint_dir)
    tensors, meta = checkpoint.load(last)
    final, final_meta = checkpoint.load(result.model_path)
    assert_same_tensors(final, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    assert any(not torch.equal(final[k], tensors[f"model.{k}"]) for k in final)
    assert final_meta["steps"] == 7 and final_meta["fingerprint"] == result.checkpoint_dir.name
    assert final_meta["diffusion"] == {"schedule": "cosine", "timesteps": 20, "objective": "v",
                                       "zero_terminal_snr": False}


def test_learning_rate_warmup_then_cosine():
    tc = TrainConfig(lr=1e-3, lr_warmup_steps=4, steps=14, lr_schedule="cosine")
    got = [learning_rate(s, tc) for s in (0, 1, 3, 4, 6, 9, 13, 14)]
    expected = [2.5e-4, 5e-4, 1e-3, 1e-3, 0.5e-3 * (1 + math.cos(0.2 * math.pi)), 5e-4,
                0.5e-3 * (1 + math.cos(0.9 * math.pi)), 0.0]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert learning_rate(6, tc) == pytest.approx(9.045084971874737e-4, rel=1e-12)
    const = TrainConfig(lr=1e-3, lr_warmup_steps=4, steps=14, lr_schedule="constant")
    assert [learning_rate(s, const) for s in (0, 3, 4, 13, 100)] == pytest.approx([2.5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    assert learning_rate(0, TrainConfig(lr=1e-3, lr_warmup_steps=0, steps=14)) == 1e-3


def test_ema_beta_from_half_life_with_ramp_up():
    assert ema_beta(0, 10, 0.0) == ema_beta(1000, 10, 0.0) == pytest.approx(0.9330329915368074, rel=1e-15)
    assert ema_beta(7, 10, 0.0) ** 10 == pytest.approx(0.5)  # half the weight is left after one half-life
    # ramp-up: half-life = min(10, 0.1 * step)
    assert ema_beta(0, 10, 0.1) == 0.0  # the first step copies the model
    assert ema_beta(50, 10, 0.1) == pytest.approx(0.5 ** (1 / 5), rel=1e-15) == pytest.approx(0.8705505632961241)
    assert ema_beta(100, 10, 0.1) == ema_beta(500, 10, 0.1) == pytest.approx(0.5 ** (1 / 10), rel=1e-15)
    assert ema_beta(0, 0, 0.0) == 0.0  # half-life 0: no averaging


def test_fingerprint_ignores_bookkeeping_but_not_training_settings(prepared, tmp_path):
    base = checkpoint_dir(tiny_cfg(tmp_path), prepared)
    assert base.parent == tmp_path / "checkpoints" and len(base.name) == 16
    bookkeeping = tiny_cfg(tmp_path, train={"log_every_steps": 5, "keep_checkpoints": 1, "out_dir": "elsewhere"})
    assert checkpoint_dir(bookkeeping, prepared) == base
    for changed in (tiny_cfg(tmp_path, train={"lr": 1e-3}), tiny_cfg(tmp_path, model={"base_channels": 16}),
                    tiny_cfg(tmp_path, diffusion={"objective": "x0"})):
        assert checkpoint_dir(changed, prepared) != base


def test_checkpoint_from_another_architecture_is_a_clear_error(prepared, tmp_path):
    """A checkpoint whose tensors do not fit the model being resumed is refused with what differs."""
    small = tiny_cfg(tmp_path, train={"steps": 3})
    train(small, prepared)
    wide = tiny_cfg(tmp_path, model={"base_channels": 16}, train={"steps": 3})
    target = checkpoint_dir(wide, prepared)
    target.mkdir(parents=True)
    source = checkpoint.step_path(checkpoint_dir(small, prepared), 3)
    checkpoint.step_path(target, 3).write_bytes(source.read_bytes())
    with pytest.raises(CheckpointError, match=r"step-000000003\.safetensors was saved from a different "
                                              r"architecture: \d+ with other shapes \(e\.g\. time_mlp\.0\.weight: "
                                              r"\(32, 8\) in the file, \(64, 16\) in the model\)"):
        train(wide, prepared)


def test_batch_larger_than_the_data_is_an_error(prepared, tmp_path):
    with pytest.raises(ValueError, match=r"train\.batch_size=64 is larger than the 40 prepared training images"):
        train(tiny_cfg(tmp_path, train={"batch_size": 64}), prepared)


def test_checkpoint_records_device_and_precision_and_another_one_resumes_with_a_warning(prepared, tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(Interrupt):
        train(cfg, prepared, callback=stop_after_checkpoint(6))
    path = checkpoint.step_path(checkpoint_dir(cfg, prepared), 6)
    tensors, meta = checkpoint.load(path)
    assert (meta["device"], meta["precision"]) == ("cpu", "fp32")
    # the same checkpoint as a GPU run with bf16 autocast would have written it
    checkpoint.save(path, tensors, {**meta, "device": "cuda", "precision": "bf16"})
    with pytest.warns(UserWarning, match=r"step-000000006\.safetensors was written on cuda with bf16; resuming on "
                                         r"cpu with fp32\. Training continues from step 6, but .* not be bitwise"):
        result = train(cfg, prepared)
    assert result.resumed_from_step == 6 and result.steps == 12 and math.isfinite(result.final_loss)


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(prepared, tmp_path, monkeypatch, reference):
    """A real torch.compile failure: inductor pointed at a C++ compiler that does not exist."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    torch._dynamo.reset()
    try:
        with pytest.warns(UserWarning, match=r"train\.compile: torch\.compile failed \(.+\); training without "
                                             r"compilation"):
            result = train(tiny_cfg(tmp_path, train={"compile": True}), prepared)
    finally:
        torch._dynamo.reset()
    assert result.steps == 12
    # the trial compile consumed no training randomness: the weights are those of an eager run
    assert_same_tensors(weights(result.model_path), weights(reference("plain").model_path))


@pytest.mark.parametrize("precision,advice", [("bf16", ""), ("fp32", " or use train.mixed_precision=bf16,")])
def test_out_of_memory_names_the_batch_size_and_what_to_change(tmp_path, precision, advice):
    cfg = tiny_cfg(tmp_path)
    expected = (f"out of device memory at train.batch_size=8 (images 8x1x8x8, {precision}, grad_accum_steps=1): CUDA "
                f"out of memory. Tried to allocate 2.00 GiB. Lower train.batch_size (and raise "
                f"train.grad_accum_steps by the same factor to keep the effective batch){advice} and run again: "
                f"nothing is lost, training resumes from the checkpoint at step 6")
    with pytest.raises(TrainingOutOfMemoryError) as caught:
        with _explain_out_of_memory(cfg, (8, 1, 8, 8), precision, lambda: 6):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore details")
    assert str(caught.value) == expected
    with pytest.raises(TrainingOutOfMemoryError, match=r"and run again: no checkpoint was written yet$"):
        with _explain_out_of_memory(cfg, (8, 1, 8, 8), precision, lambda: 0):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")


def test_deterministic_mode_trains_the_same_weights_on_cpu_and_restores_torch_settings(prepared, tmp_path, reference):
    assert not torch.are_deterministic_algorithms_enabled()
    result = train(tiny_cfg(tmp_path, train={"deterministic": True}), prepared)
    assert not torch.are_deterministic_algorithms_enabled()  # a global switch, put back after training
    assert_same_tensors(weights(result.model_path), weights(reference("plain").model_path))


def test_a_checkpoint_that_cannot_be_written_stops_training_with_its_path(prepared, tmp_path):
    """A write that fails as on a full disk (a file-size limit: EFBIG instead of ENOSPC), in the CLI."""
    cfg = tiny_cfg(tmp_path, train={"checkpoint_every_steps": 3})
    raw = cfg.to_dict()
    raw["prepare"]["out_dir"] = str(prepared)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(raw))  # JSON is YAML
    limit = 64 * 1024  # below one checkpoint (about 200 KiB), above everything else training writes

    def limit_file_size():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # No bytecode written under the limit: Python does not check for a short write, so a module this process is
    # the first to import (e.g. `tabulate` at exit) would leave a .pyc cut at 64 KiB in the venv, and every later
    # import of it fails ("EOFError: marshal data too short"). `pip install --no-compile` leaves them to be written.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--no-track", "--params", str(params)], env=env,
                         cwd=PROJECT_ROOT, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    ckpt_dir = checkpoint_dir(cfg, prepared)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"ddpm train: error: could not write checkpoint \S+/step-000000003\.safetensors: "
                        r"\[Errno 27\] File too large; no checkpoint was written yet, the next run starts from "
                        r"step 0", last), last
    assert list(ckpt_dir.iterdir()) == []  # no partial file left behind, nothing read as good later
    assert not (tmp_path / "models").exists()
