"""Quality per unit of compute: the HF course's recipe and ours, the same wall-clock training budget
on the same machine, then Inception FID on N samples against the Fashion-MNIST test split.

The course recipe (Diffusion Models Course, unit 1, at 32x32): diffusers ``UNet2DModel`` with the
notebook's config (block_out_channels 64, 128, 128, 256; 2 layers per block; attention at the two
lowest resolutions), DDPMScheduler squaredcos_cap_v2, AdamW 4e-4 constant, batch 128, no EMA, fp32 as
the notebook trains, images padded from 28 to 32 px; sampled with 100 DDIM steps.
Ours: params.yaml as it is (28x28, its own sampler) or with --set overrides, trained to a step count set from a short
throughput probe so that it ends near the budget. Its samples are padded to 32 px like the test split.

Both are scored with the pytorch-fid Inception weights on N samples against N test images (padded
to 32), beside the real-data floor: N training images against the same test images.

    python benchmarks/quality_per_budget.py --budget 600 --n 2000            # the 2-core CPU
    # a GPU machine without the Inception weights: train and sample there, score here
    python benchmarks/quality_per_budget.py --budget 240 --n 2000 --phases train sample --out $OUT
    python benchmarks/quality_per_budget.py --budget 240 --n 2000 --phases score --out <those files>
    # or train on the 2-core CPU and sample the course model (N x 100 DDIM passes) on a GPU machine:
    python benchmarks/quality_per_budget.py --budget 600 --phases train --out q   # here, then there:
    python benchmarks/quality_per_budget.py --n 2000 --phases sample --out q      # then score here

Cost outside the budget: sampling (the course model: N x 100 forward passes of an 18.5 M-parameter
UNet, 19 ms an image at batch 50; N = 2,000 took about 75 min on the 2-core CPU) and 3N Inception
passes (0.1-0.3 s an image there; about 12 min for N = 2,000).
Benchmark only: diffusers is the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.course_loop import CourseLoop  # noqa: E402
from ddpm import config  # noqa: E402
from ddpm.device import resolve_device  # noqa: E402
from ddpm.export import load_model  # noqa: E402
from ddpm.images import grid, save_png  # noqa: E402
from ddpm.inception import inception_features  # noqa: E402
from ddpm.metrics import frechet_distance_features  # noqa: E402
from ddpm.prepare import load_split, prepare  # noqa: E402
from ddpm.reference import draw  # noqa: E402
from ddpm.sample import generate  # noqa: E402
from ddpm.sources import DataSourceError  # noqa: E402
from ddpm.train import train  # noqa: E402


PHASES = ("train", "sample", "score")


def pad32(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 1, 28, 28) -> (N, 1, 32, 32) with black borders, as the course pads Fashion-MNIST."""
    pad = (32 - images.shape[-1]) // 2
    return np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def course_model():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=2,
                       block_out_channels=(64, 128, 128, 256),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def train_course(images: np.ndarray, budget: float, device: torch.device) -> tuple[CourseLoop, dict]:
    loop = CourseLoop(course_model(), pad32(images), 128, device)
    t0, steps, last = time.perf_counter(), 0, 0.0
    while time.perf_counter() - t0 < budget:
        losses = loop.run(1)
        steps += 1
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            print(f"course: step {steps}, loss {losses[-1]:.4f}, {time.perf_counter() - t0:.0f}/{budget:.0f} s",
                  flush=True)
    seconds = time.perf_counter() - t0
    return loop, {"steps": steps, "images_seen": steps * 128, "train_seconds": seconds}


@torch.no_grad()
def sample_course(unet, n: int, device: torch.device, batch: int = 50) -> np.ndarray:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")  # the course's
    scheduler.set_timesteps(100)
    unet, out = unet.eval(), []
    for i in range(0, n, batch):
        g = torch.Generator().manual_seed(i)
        x = torch.randn((min(batch, n - i), 1, 32, 32), generator=g).to(device)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy())
        print(f"course: sampled {i + len(out[-1])}/{n}", flush=True)
    return np.concatenate(out)


def train_ours(params: str, overrides: list[str], prepared: Path, workdir: Path, budget: float,
               device: str) -> tuple[object, dict]:
    base = config.load(params, [*overrides, f"train.device={device}", f"sample.device={device}"])

    def run(steps: int, out: str):
        tc = dataclasses.replace(base.train, steps=steps, out_dir=str(workdir / out),
                                 checkpoint_dir=str(workdir / out / "ckpt"), loss_path=str(workdir / out / "loss.csv"),
                                 lr_warmup_steps=min(base.train.lr_warmup_steps, steps // 10),
                                 checkpoint_every_steps=max(steps, 1))
        return dataclasses.replace(base, train=tc), train(dataclasses.replace(base, train=tc), prepared, fresh=True)

    _, probe = run(75, "probe")  # throughput after warm-up: the mean rate of the logged windows past the first
    rates = [h["images_per_s"] for h in probe.history[1:]] or [probe.images_per_s]
    steps = max(1, int(budget * float(np.median(rates)) / base.train.batch_size))
    cfg, result = run(steps, "ours")
    return (cfg, result), {"steps": result.steps, "images_seen": result.steps * cfg.train.batch_size,
                           "train_seconds": result.seconds}


def train_recipes(args, device: torch.device, prepared: Path, workdir: Path, out: Path) -> None:
    """Train both recipes for the budget: <out>/model_ours.safetensors, <out>/model_course.safetensors (the
    UNet in fp16, half the size, so a CPU-trained model fits the GPU machine's 64 MiB transfer; sampled in
    fp32 again) and each recipe's stats json."""
    (cfg, result), ours = train_ours(args.params, args.set, prepared, workdir, args.budget, str(device))
    shutil.copyfile(result.model_path, out / "model_ours.safetensors")
    recipe = "ours (params.yaml" + (" with " + " ".join(f"`{o}`" for o in args.set) if args.set else "") + ")"
    _write_stats(out, "ours", {**ours, "recipe": recipe, "overrides": args.set, "sampler": f"{cfg.sample.sampler} {cfg.sample.steps}",
                               "trained_on": _where(device),
                               "model": f"{result.num_parameters / 1e6:.1f} M params, {cfg.diffusion.objective}, "
                                        f"min-SNR {cfg.train.min_snr_gamma:g}, batch {cfg.train.batch_size}, {result.device}"})
    loop, course = train_course(load_split(prepared, "train").images, args.budget, device)
    params = sum(p.numel() for p in loop.unet.parameters())
    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in loop.unet.state_dict().items()},
              str(out / "model_course.safetensors"))
    _write_stats(out, "course", {**course, "recipe": "HF course unit 1", "sampler": "DDIM 100", "trained_on": _where(device),
                                 "model": f"{params / 1e6:.1f} M params, eps, batch 128, fp32, no EMA"})


def sample_recipes(args, device: torch.device, out: Path) -> None:
    """N samples from each trained recipe: <out>/samples_<recipe>.npz and a grid."""
    cfg = config.load(args.params, [*args.set, f"sample.device={device}"])
    images = generate(load_model(out / "model_ours.safetensors"), cfg.sample, num_samples=args.n)
    _save(out, "ours", pad32(images), device)
    unet = course_model()
    unet.load_state_dict({k: v.float() for k, v in load_file(str(out / "model_course.safetensors")).items()})
    _save(out, "course", sample_course(unet.to(device), args.n, device), device)


def _where(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"this CPU, {torch.get_num_threads()} threads"


def _write_stats(out: Path, name: str, stats: dict) -> None:
    (out / f"stats_{name}.json").write_text(json.dumps(stats))


def _save(out: Path, name: str, images: np.ndarray, device: torch.device) -> None:
    np.savez_compressed(out / f"samples_{name}.npz", images=images)
    stats = json.loads((out / f"stats_{name}.json").read_text())
    _write_stats(out, name, {**stats, "sampled_on": _where(device)})
    save_png(out / f"samples_{name}.png", grid(images[:64], nrow=8), scale=2)


def _scored_inputs(out: Path, n: int) -> dict[str, tuple[dict, np.ndarray]]:
    """Each recipe's stats and first n samples, checked before any Inception pass (minutes on a CPU)."""
    inputs = {}
    for name in ("ours", "course"):
        paths = [out / f"stats_{name}.json", out / f"samples_{name}.npz"]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SystemExit(f"{', '.join(missing)} not found: run --phases train and sample into --out {out} first")
        images = np.load(paths[1])["images"][:n]
        if len(images) < n:
            raise SystemExit(f"{paths[1]} holds {len(images)} samples, fewer than --n {n}")
        inputs[name] = json.loads(paths[0].read_text()), images
    return inputs


def score(args, device: torch.device, prepared: Path, inputs: dict[str, tuple[dict, np.ndarray]]) -> str:
    """Inception FID of each recipe's samples (``_scored_inputs``) against N padded test images, and the
    real-data floor."""
    train_images, test_images = load_split(prepared, "train").images, load_split(prepared, "test").images
    f_test = inception_features(pad32(test_images[draw(args.n, len(test_images), 0)]), device, desc="inception test")
    real = pad32(train_images[draw(args.n, len(train_images), 1)])
    floor = frechet_distance_features(f_test, inception_features(real, device, desc="inception train"))
    lines = [f"# Quality per training budget: {args.budget:.0f} s each, Inception FID at N = {args.n}", "",
             f"- command: `python {shlex.join(sys.argv)}`",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- Inception on {device}, torch {torch.__version__}{'; ' + args.where if args.where else ''}", "",
             f"| recipe | model | trained on | sampler, sampled on | train s | steps | images seen | "
             f"fid_inception_n{args.n} |", "|---|---|---|---|---:|---:|---:|---:|"]
    fids = {}
    for name, (stats, images) in inputs.items():
        fids[name] = frechet_distance_features(f_test, inception_features(images, device, desc=f"inception {name}"))
        lines.append(f"| {stats['recipe']} | {stats['model']} | {stats.get('trained_on', '')} | {stats['sampler']}, "
                     f"{stats.get('sampled_on', '')} | {stats['train_seconds']:.0f} | {stats['steps']} | "
                     f"{stats['images_seen']} | {fids[name]:.2f} |")
    lines += [f"| real training images (the floor) | | | | | | | {floor:.2f} |", "",
              f"Ours / course = {fids['ours'] / fids['course']:.2f} (goal: <= 0.5)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=600, help="training seconds for each recipe")
    ap.add_argument("--n", type=int, default=2000, help="samples (and test images) for the FID")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="an override of params.yaml for our recipe, as `ddpm -S` (repeatable; e.g. a GPU's batch)")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--out", default="", help="a folder for the samples, grids and the table")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                    help="train: both recipes for the budget, the models into --out; sample: N from each model "
                         "in --out; score: the FID table from --out's samples (split them to train on one machine, "
                         "sample on another and score where the Inception weights are)")
    ap.add_argument("--where", default="", help="a note on the machines for the table's header")
    args = ap.parse_args()
    device = resolve_device(args.device)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qpb-"))
    out = Path(args.out) if args.out else workdir
    out.mkdir(parents=True, exist_ok=True)
    # scoring alone: its inputs checked before the data are prepared, so a missing one is named in seconds
    scored = _scored_inputs(out, args.n) if args.phases == ["score"] else None
    prepared = workdir / "prepared"
    try:
        prepare(config.load(args.params, [f"prepare.source_path={args.source}",
                                          f"prepare.out_dir={prepared}"]).prepare)
    except DataSourceError as e:
        raise SystemExit(f"--source: {e}") from None
    if "train" in args.phases:
        train_recipes(args, device, prepared, workdir, out)
    if "sample" in args.phases:
        sample_recipes(args, device, out)
    if "score" in args.phases:
        text = score(args, device, prepared, scored or _scored_inputs(out, args.n))
        (out / "quality_per_budget.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
