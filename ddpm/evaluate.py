"""The *evaluate* stage: how close the samples are to held-out data.

Metrics (each name carries its sample count N, since Frechet distances depend on it):
- ``fd_classifier_n{N}``: Frechet distance between N samples and the whole
  held-out split, in the penultimate features of a classifier trained on the
  prepared labels (cached per data version).
- ``fd_classifier_real_n{N}``: the same distance for N real training images:
  the floor a perfect model would reach at this N.
- ``classifier_accuracy``: that classifier on the held-out split.
- ``sample_class_entropy``: entropy of the samples' predicted classes over
  log(number of classes); 1 means all classes equally often.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from ddpm import checkpoint
from ddpm.classifier import Classifier, predict, train_classifier
from ddpm.config import EvaluateConfig
from ddpm.device import resolve_device
from ddpm.export import load_state_checked
from ddpm.metrics import feature_stats, frechet_distance
from ddpm.prepare import load_manifest, load_split
from ddpm.sample import load_samples


def classifier_for(prepared_dir: str | Path, cfg: EvaluateConfig, device: torch.device) -> tuple[Classifier, float]:
    """The domain classifier for this data version and its held-out accuracy, trained once and cached."""
    manifest = load_manifest(prepared_dir)
    key = json.dumps([manifest["content_hash"], cfg.classifier_epochs, cfg.classifier_batch_size,
                      cfg.classifier_lr, cfg.seed])
    path = Path(cfg.cache_dir) / f"classifier-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    num_classes = len(manifest["classes"])
    channels = manifest["channels"]
    if path.exists():
        try:
            tensors, meta = checkpoint.load(path)
            model = Classifier(channels, num_classes)
            load_state_checked(model, tensors, str(path))
            print(f"using cached classifier {path} (held-out accuracy {meta['accuracy']:.4f})")
            return model.to(device).eval(), meta["accuracy"]
        except checkpoint.CheckpointError as exc:
            print(f"retraining the classifier: {exc}")
    train, test = load_split(prepared_dir, "train"), load_split(prepared_dir, "test")
    model = train_classifier(np.asarray(train.images), train.labels, num_classes, cfg.classifier_epochs,
                             cfg.classifier_batch_size, cfg.classifier_lr, cfg.seed, device)
    _, pred = predict(model, np.asarray(test.images), device)
    accuracy = float((pred == test.labels).mean())
    checkpoint.save(path, dict(model.cpu().state_dict()), {"accuracy": accuracy, "data_hash": manifest["content_hash"]})
    print(f"classifier trained: held-out accuracy {accuracy:.4f} -> {path}")
    return model.to(device).eval(), accuracy


def evaluate(prepared_dir: str | Path, samples_path: str | Path, cfg: EvaluateConfig) -> dict:
    """Compute the metrics, write ``cfg.metrics_path`` and a class histogram CSV beside it."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    manifest = load_manifest(prepared_dir)
    samples = load_samples(samples_path)
    if samples.shape[1:] != tuple(manifest["shape"]):
        raise ValueError(f"samples have shape {samples.shape[1:]} but the prepared data has {tuple(manifest['shape'])}: "
                         "they come from a model trained on other data")
    model, accuracy = classifier_for(prepared_dir, cfg, device)
    test, train = load_split(prepared_dir, "test"), load_split(prepared_dir, "train")
    n = len(samples)
    f_test, _ = predict(model, np.asarray(test.images), device)
    f_samples, pred_samples = predict(model, samples, device)
    rng = np.random.default_rng(cfg.seed)
    real_idx = np.sort(rng.choice(len(train.labels), size=min(n, len(train.labels)), replace=False))
    f_real, _ = predict(model, np.asarray(train.images[real_idx]), device)
    mu_t, s_t = feature_stats(f_test)
    fd = frechet_distance(*feature_stats(f_samples), mu_t, s_t)
    fd_real = frechet_distance(*feature_stats(f_real), mu_t, s_t)

    num_classes = len(manifest["classes"])
    hist = np.bincount(pred_samples, minlength=num_classes) / n
    nz = hist[hist > 0]
    entropy = float(-(nz * np.log(nz)).sum() / np.log(num_classes)) + 0.0  # no "-0.0" for one class
    metrics = {
        f"fd_classifier_n{n}": round(fd, 4),
        f"fd_classifier_real_n{n}": round(fd_real, 4),
        "classifier_accuracy": round(accuracy, 4),
        "sample_class_entropy": round(entropy, 4),
        "num_samples": n,
    }
    out = Path(cfg.metrics_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    real_hist = np.bincount(test.labels, minlength=num_classes) / len(test.labels)
    with open(out.parent / "class_histogram.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "samples", "held_out"])
        for name, s, r in zip(manifest["classes"], hist, real_hist):
            w.writerow([name, round(float(s), 4), round(float(r), 4)])
    print(f"evaluated {n} samples in {time.perf_counter() - t0:.1f} s: " +
          ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return metrics
