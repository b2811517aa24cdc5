"""Exercise the CUDA paths of the library once: bf16 training, checkpoint + resume with
CUDA RNG state, deterministic mode, a real out-of-memory error, a CUDA checkpoint resumed
on the CPU, and each sampler on the GPU against the same sampler on the CPU.

    python benchmarks/gpu_check.py      # prints a markdown report
"""

from __future__ import annotations

import json
import tempfile
import warnings
import time
from pathlib import Path

import numpy as np
import torch

from ddpm import config
from ddpm.export import load_model
from ddpm.samplers import sample
from ddpm.train import TrainingOutOfMemoryError, train


def prepared(root: Path, n: int = 512, shape: tuple[int, int, int] = (1, 28, 28)) -> Path:
    d = root / f"prepared-{n}-{'x'.join(map(str, shape))}"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 64)):
        np.save(d / f"{split}_images.npy", rng.integers(0, 256, (count, *shape), dtype=np.uint8))
        np.save(d / f"{split}_labels.npy", rng.integers(0, 10, count).astype(np.int64))
    (d / "manifest.json").write_text(json.dumps({"content_hash": "gpu-check", "channels": 1, "shape": [1, 28, 28],
                                                 "classes": [str(i) for i in range(10)]}))
    return d


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"# GPU check: {torch.cuda.get_device_name()} torch {torch.__version__}\n")
    root = Path(tempfile.mkdtemp())
    data = prepared(root)

    def cfg(name: str):
        return config.from_dict({"train": {"steps": 40, "batch_size": 64, "device": "cuda", "log_every_steps": 10,
                                           "checkpoint_every_steps": 20, "hflip": True,
                                           "checkpoint_dir": str(root / name / "ck"), "out_dir": str(root / name / "m"),
                                           "loss_path": str(root / name / "loss.csv")},
                                 "model": {"dropout": 0.1}})

    t0 = time.perf_counter()
    straight = train(cfg("a"), data)
    t_straight = time.perf_counter() - t0

    class Stop(Exception):
        pass

    def stop_at_20(event):
        if event["event"] == "checkpoint" and event["step"] == 20:
            raise Stop

    try:
        train(cfg("b"), data, callback=stop_at_20)
    except Stop:
        pass
    resumed = train(cfg("b"), data)
    a, b = load_model(straight.model_path), load_model(resumed.model_path)
    diffs = [(pa - pb).abs().max().item() for pa, pb in zip(a.unet.parameters(), b.unet.parameters())]
    print("| check | result |\n|---|---|")
    print(f"| bf16 training, 40 steps x 64 | final loss {straight.final_loss:.4f}, {straight.images_per_s:.0f} img/s "
          f"(incl. warm-up), {t_straight:.1f} s |")
    print(f"| resume at step 20 vs straight | resumed_from={resumed.resumed_from_step}, "
          f"max |dEMA| = {max(diffs):.3g}, bitwise equal: {max(diffs) == 0} |")
    print(f"| peak CUDA memory | {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB |")

    det = [train(cfg(f"det{i}", deterministic=True, mixed_precision="fp32"), data) for i in (1, 2)]
    da, db = load_model(det[0].model_path), load_model(det[1].model_path)
    same = all(torch.equal(pa, pb) for pa, pb in zip(da.unet.parameters(), db.unet.parameters()))
    print(f"| train.deterministic: two fp32 runs of 40 steps | bitwise equal: {same}; "
          f"{det[0].images_per_s:.0f} img/s vs {straight.images_per_s:.0f} (bf16, not deterministic) |")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the same run on the CPU: device is not part of the fingerprint, so it finds run b's last checkpoint
        on_cpu = train(config.from_dict({**cfg("b").to_dict(), "train": {**cfg("b").to_dict()["train"],
                                                                          "device": "cpu"}}), data)
    said = [str(w.message) for w in caught if "was written on cuda" in str(w.message)]
    print(f"| a CUDA bf16 checkpoint resumed on the CPU | resumed_from={on_cpu.resumed_from_step}, "
          f"warned: {said[0][:160] if said else 'NO WARNING'} |")

    big = prepared(root, n=4096, shape=(3, 64, 64))
    try:
        train(config.from_dict({"train": {"steps": 2, "batch_size": 4096, "device": "cuda",
                                          "checkpoint_dir": str(root / "oom" / "ck"),
                                          "out_dir": str(root / "oom" / "m"), "loss_path": str(root / "oom.csv")},
                                "model": {"base_channels": 256, "attention_levels": [0, 1, 2]}}), big)
        print("| out of memory | batch 4096 at 64x64 with attention at 64 fitted: no error to show |")
    except TrainingOutOfMemoryError as exc:
        print(f"| out of memory | {str(exc)[:300]} |")
    torch.cuda.empty_cache()

    model = a.unet
    for name, steps in (("ddpm", 100), ("ddim", 20), ("dpm_solver++", 20)):
        out = {}
        for dev in ("cuda", "cpu"):
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            out[dev] = sample(name, model.to(dev), a.schedule, (256, 1, 28, 28), g, steps=steps, clip_x0=True,
                              device=dev).cpu()
            if dev == "cuda":
                torch.cuda.synchronize()
            out[dev + "_s"] = time.perf_counter() - t0
        print(f"| {name} {steps} steps, 256 images | cuda {out['cuda_s']:.2f} s, cpu {out['cpu_s']:.2f} s; "
              f"max |cuda - cpu| = {(out['cuda'] - out['cpu']).abs().max():.3g}, finite: "
              f"{bool(torch.isfinite(out['cuda']).all())} |")


if __name__ == "__main__":
    main()
