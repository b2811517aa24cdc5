"""The *evaluate* stage: how close, how diverse and how original the samples are.

Measured against the reference stage's output (ddpm/reference.py). Every metric
that depends on a sample count carries it in its name (``_n{N}``):

- ``fid_inception_n{N}``: FID (Heusel et al. 2017) between the N samples and M
  held-out images (``inception_reference_images``), in InceptionV3 pool3 features.
- ``fid_inception_real_n{N}``: the same for N real training images: the floor a
  perfect model reaches at this N (FID is biased upwards at small N).
- ``kid_inception_n{N}``, ``kid_inception_real_n{N}``: KID (Binkowski et al.
  2018), unbiased, so about 0 for real images at any N.
- ``precision_inception_n{N}``, ``recall_inception_n{N}`` (Kynkaanniemi et al.
  2019, k = 3): how many samples look real; how much of the real data the
  samples cover. N samples against N held-out images.
- ``fd_classifier_n{N}``, ``fd_classifier_real_n{N}``: the Frechet distance in
  the domain classifier's penultimate features, against the whole held-out split.
- ``classifier_accuracy``: that classifier on the held-out split.
- ``sample_class_entropy``: entropy of the samples' predicted classes over
  log(number of classes); 1 means all classes equally often.
- ``memorized_fraction_n{N}``: samples with d1/d2 < 1/3 to their two nearest
  training images (Gu et al. 2023).
- ``{metric}_n{N}_{sampler}_{steps}steps``: the sampler comparison.

Files beside ``metrics_path``: ``class_histogram.csv``, ``memorization.png``,
``sampler_comparison.csv`` and ``sampler_comparison.png``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from ddpm import sampler_comparison
from ddpm.classifier import predict
from ddpm.config import EvaluateConfig, SampleConfig
from ddpm.device import resolve_device
from ddpm.export import LoadedModel
from ddpm.images import save_png
from ddpm.inception import inception_features
from ddpm.memorization import closest_pairs_picture, nearest_training_images
from ddpm.metrics import frechet_distance_features, kernel_inception_distance, precision_recall
from ddpm.prepare import Split, load_manifest, load_split
from ddpm.reference import Reference, draw, load_reference
from ddpm.sample import load_samples
from ddpm.sample_counts import resolve_count

PR_NEIGHBOURS = 3  # k of Kynkaanniemi et al. 2019
PAIRS_SHOWN = 16


def _r(x: float) -> float:
    return round(float(x), 6)


def classifier_metrics(ref: Reference, samples: np.ndarray, train: Split, test: Split, classes: list[str],
                       seed: int, device: torch.device, out_dir: Path) -> dict:
    n = len(samples)
    f_samples, pred = predict(ref.classifier, samples, device)
    f_real, _ = predict(ref.classifier, train.images[draw(n, len(train.labels), seed)], device)
    hist = np.bincount(pred, minlength=len(classes)) / n
    nz = hist[hist > 0]
    entropy = float(-(nz * np.log(nz)).sum() / np.log(len(classes))) + 0.0  # no "-0.0" for one class
    real_hist = np.bincount(test.labels, minlength=len(classes)) / len(test.labels)
    with open(out_dir / "class_histogram.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "samples", "held_out"])
        for name, s, r in zip(classes, hist, real_hist):
            w.writerow([name, round(float(s), 4), round(float(r), 4)])
    return {
        f"fd_classifier_n{n}": _r(frechet_distance_features(ref.classifier_test, f_samples)),
        f"fd_classifier_real_n{len(f_real)}": _r(frechet_distance_features(ref.classifier_test, f_real)),
        "classifier_accuracy": ref.info["classifier"]["accuracy"],
        "sample_class_entropy": round(entropy, 4),
    }


def inception_metrics(ref: Reference, samples: np.ndarray, seed: int, device: torch.device) -> dict:
    """On at most as many samples as the reference holds (the first ones): on a CPU the classifier FD uses
    N = 1,000 samples, Inception (0.1-0.3 s an image there) the reference's 128, and says so in its names."""
    samples = samples[:len(ref.inception_test)]
    n = len(samples)
    t = time.perf_counter()
    f_samples = inception_features(samples, device, desc="inception samples")
    print(f"inception: {n} samples in {time.perf_counter() - t:.1f} s")
    real_test, real_train = ref.inception_test, ref.inception_train
    # The floor and precision/recall compare equal counts; the reference may hold fewer than N.
    f_floor = real_train[draw(min(n, len(real_train)), len(real_train), seed)]
    n_pr = min(n, len(real_test))
    precision, recall = precision_recall(real_test[draw(n_pr, len(real_test), seed)],
                                         f_samples[draw(n_pr, n, seed)], k=PR_NEIGHBOURS, device=device)
    return {
        f"fid_inception_n{n}": _r(frechet_distance_features(real_test, f_samples)),
        f"fid_inception_real_n{len(f_floor)}": _r(frechet_distance_features(real_test, f_floor)),
        f"kid_inception_n{n}": _r(kernel_inception_distance(real_test, f_samples, seed=seed, device=device)),
        f"kid_inception_real_n{len(f_floor)}": _r(kernel_inception_distance(real_test, f_floor, seed=seed,
                                                                            device=device)),
        f"precision_inception_n{n_pr}": _r(precision),
        f"recall_inception_n{n_pr}": _r(recall),
        "inception_reference_images": len(real_test),
    }


def memorization_metrics(samples: np.ndarray, train: Split, device: torch.device, out_dir: Path) -> dict:
    nb = nearest_training_images(samples, train.images, device)
    save_png(out_dir / "memorization.png", closest_pairs_picture(samples, train.images, nb, PAIRS_SHOWN), scale=2)
    return {f"memorized_fraction_n{len(samples)}": _r(nb.memorized_fraction())}


def comparison_metric(cfg: EvaluateConfig, ref: Reference, device: torch.device) -> str:
    """``compare_metric`` resolved: auto is Inception FID on a GPU, the classifier FD on a CPU when there is one."""
    metric = cfg.compare_metric
    if metric == "auto":
        cheap = device.type == "cpu" or ref.inception_test is None
        metric = "fd_classifier" if cheap and ref.classifier is not None else "fid_inception"
    if metric == "fd_classifier" and ref.classifier is None:
        raise ValueError("evaluate.compare_metric=fd_classifier needs a domain classifier, and the data has no labels")
    if metric == "fid_inception" and ref.inception_test is None:
        raise ValueError("evaluate.compare_metric=fid_inception needs evaluate.inception=true")
    return metric


def sampler_comparison_metrics(loaded: LoadedModel, sample_cfg: SampleConfig, cfg: EvaluateConfig, ref: Reference,
                               num_samples: int, device: torch.device, out_dir: Path) -> dict:
    metric = comparison_metric(cfg, ref, device)
    # auto: never more than the main evaluation draws (a tiny run stays tiny).
    n = cfg.compare_num_samples or min(resolve_count(0, "compare", device), num_samples)

    def score(images: np.ndarray) -> float:
        if metric == "fd_classifier":
            return frechet_distance_features(ref.classifier_test, predict(ref.classifier, images, device)[0])
        return frechet_distance_features(ref.inception_test, inception_features(images, device))

    print(f"sampler comparison: {metric} of {n} samples per sampler and step count")
    rows = sampler_comparison.compare_samplers(loaded, sample_cfg, cfg.compare_samplers, cfg.compare_steps, n, score)
    sampler_comparison.write_table(rows, out_dir / "sampler_comparison.csv")
    sampler_comparison.plot(rows, f"{metric}_n{n}", out_dir / "sampler_comparison.png")
    return {sampler_comparison.metric_key(metric, n, r["sampler"], r["steps"]): _r(r["value"]) for r in rows}


def evaluate(prepared_dir: str | Path, samples_path: str | Path, cfg: EvaluateConfig,
             loaded: LoadedModel | None = None, sample_cfg: SampleConfig | None = None) -> dict:
    """Compute the metrics and write ``cfg.metrics_path`` and the files beside it. The sampler comparison
    runs when ``loaded`` (the model that made the samples) is given and ``cfg.compare_samplers`` is not empty."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    manifest = load_manifest(prepared_dir)
    samples = load_samples(samples_path)
    if samples.shape[1:] != tuple(manifest["shape"]):
        raise ValueError(f"samples have shape {samples.shape[1:]} but the prepared data has {tuple(manifest['shape'])}: "
                         "they come from a model trained on other data")
    ref = load_reference(cfg.reference_dir, manifest, device)
    train, test = load_split(prepared_dir, "train"), load_split(prepared_dir, "test")
    if ref.inception_test is not None and cfg.reference_num_images == 0:
        auto = min(resolve_count(0, "reference", device), len(test.labels))
        if auto != len(ref.inception_test):
            print(f"note: the Inception reference holds {len(ref.inception_test)} images (made on "
                  f"{ref.info['device']}); auto on {device.type} would be {auto}: `dvc repro -f reference` to redo it")
    out_dir = Path(cfg.metrics_path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("class_histogram.csv", "sampler_comparison.csv", "sampler_comparison.png"):
        (out_dir / name).unlink(missing_ok=True)  # never leave a previous run's file beside these metrics

    metrics: dict = {"num_samples": len(samples)}
    seconds: dict[str, float] = {}
    if ref.classifier is not None:
        with _timed(seconds, "classifier"):
            metrics.update(classifier_metrics(ref, samples, train, test, manifest["classes"], cfg.seed, device,
                                              out_dir))
    if ref.inception_test is not None:
        with _timed(seconds, "inception"):
            metrics.update(inception_metrics(ref, samples, cfg.seed, device))
    with _timed(seconds, "memorization"):
        metrics.update(memorization_metrics(samples, train, device, out_dir))
    if loaded is not None and cfg.compare_samplers:
        with _timed(seconds, "sampler comparison"):
            metrics.update(sampler_comparison_metrics(loaded, sample_cfg or SampleConfig(), cfg, ref, len(samples),
                                                      device, out_dir))
    _write_placeholders(out_dir)

    out = Path(cfg.metrics_path)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"evaluated {len(samples)} samples in {time.perf_counter() - t0:.1f} s ("
          + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + ")")
    return metrics


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str):
    t = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t


def _write_placeholders(out_dir: Path) -> None:
    """The stage's declared outputs exist even when a part did not run (no labels, no comparison)."""
    if not (out_dir / "class_histogram.csv").exists():
        (out_dir / "class_histogram.csv").write_text("class,samples,held_out\n")
    if not (out_dir / "sampler_comparison.csv").exists():
        sampler_comparison.write_table([], out_dir / "sampler_comparison.csv")
    if not (out_dir / "sampler_comparison.png").exists():
        sampler_comparison.plot([], "", out_dir / "sampler_comparison.png")
