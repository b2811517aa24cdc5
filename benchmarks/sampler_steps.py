"""Which sampler, at which step count, on one trained model: the classifier Frechet distance of N samples
for each (sampler, steps) pair, beside the real-data value at the same N and each pair's ratio to the best.
Every pair draws its N images from the same seeds (``sample.seed``); the rest of ``sample`` is params.yaml's.

    python benchmarks/sampler_steps.py --model models/model.safetensors --prepared data/prepared \\
        --reference data/reference --n 1000 --pairs dpm_solver++:20 dpm_solver++_sde:20 ddpm:100 \\
        dpm_solver++_sde:20:karras

A pair is ``<sampler>:<steps>``, or ``<sampler>:<steps>:<timestep_spacing>`` to override params.yaml's spacing.

(classifier FD, not Inception: ~1 ms an image on a CPU instead of 0.1-0.3 s, and the reference stage's
classifier scores every N; the sampling is the cost, ~3 s a step for 1,000 images on the 2-core CPU.)
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm import config  # noqa: E402
from ddpm.classifier import predict  # noqa: E402
from ddpm.device import resolve_device  # noqa: E402
from ddpm.export import load_model  # noqa: E402
from ddpm.metrics import frechet_distance_features  # noqa: E402
from ddpm.prepare import load_manifest, load_split  # noqa: E402
from ddpm.reference import draw, load_reference  # noqa: E402
from ddpm.sampler_comparison import compare_samplers  # noqa: E402


def pair(text: str) -> tuple[str, int, str]:
    name, steps, spacing = (text.split(":") + [""])[:3]
    if name not in config.SAMPLERS or not steps.isdigit() or spacing not in ("", *config.TIMESTEP_SPACINGS) \
            or text.count(":") > 2:
        raise argparse.ArgumentTypeError(f"{text!r}: want <sampler>:<steps>[:<spacing>], sampler one of "
                                         f"{', '.join(config.SAMPLERS)}, spacing one of "
                                         f"{', '.join(config.TIMESTEP_SPACINGS)}")
    return name, int(steps), spacing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--reference", required=True, help="the reference stage's folder (its domain classifier)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--pairs", type=pair, nargs="+", required=True)
    ap.add_argument("--seed", type=int, default=None, help="sample.seed for every pair (default: params.yaml's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="", help="write the markdown table here as well")
    args = ap.parse_args()
    device = resolve_device(args.device)
    cfg = config.load(args.params, [f"sample.device={device}"] + ([] if args.seed is None else [f"sample.seed={args.seed}"]))
    ref = load_reference(args.reference, load_manifest(args.prepared), device)
    train = load_split(args.prepared, "train")
    real = frechet_distance_features(ref.classifier_test, predict(ref.classifier, train.images[draw(args.n, len(train.images), 0)],
                                                                  device)[0])
    loaded = load_model(args.model, device)
    rows = []
    for name, steps, spacing in args.pairs:
        sample_cfg = dataclasses.replace(cfg.sample, device=str(device),
                                         timestep_spacing=spacing or cfg.sample.timestep_spacing)
        for row in compare_samplers(loaded, sample_cfg, (name,), (steps,), args.n,
                                    lambda images: frechet_distance_features(ref.classifier_test,
                                                                             predict(ref.classifier, images, device)[0])):
            rows.append({**row, "spacing": sample_cfg.timestep_spacing})
    best = min(r["value"] for r in rows)
    s = cfg.sample
    lines = [f"# Samplers and step counts on one model: classifier FD at N = {args.n}", "",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}; {device}, "
             f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}",
             f"- model: {args.model} ({loaded.meta.get('diffusion', {})}); sample settings from {args.params}: "
             f"spacing {s.timestep_spacing}, clip_x0 {s.clip_x0}, mixed_precision {s.mixed_precision}, seed {s.seed}",
             "", f"| sampler | steps | spacing | fd_classifier_n{args.n} | / best | sampling s |",
             "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['spacing']} | {r['value']:.3f} | {r['value'] / best:.3f} | "
              f"{r['seconds']:.0f} |" for r in rows]
    lines += [f"| real training images (the floor) | | | {real:.3f} | | |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
