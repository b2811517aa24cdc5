"""The *reference* stage: what samples are measured against, computed once per data version.

Writes into ``evaluate.reference_dir`` (a DVC output, so it is cached and only
recomputed when the prepared data or these settings change)::

    reference.json          data hash, device, counts, classifier accuracy, seconds
    classifier.safetensors  the domain classifier (labelled data only), accuracy in its metadata
    classifier_test.npy     its penultimate features of the whole held-out split, float32 (M, 64)
    inception.npz           InceptionV3 pool3 features, float32: ``test`` for M held-out images (the
                            reference), ``train`` for M training images (the real-data floor), and the
                            indices they were drawn at
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm import checkpoint
from ddpm.classifier import Classifier, predict, train_classifier
from ddpm.config import EvaluateConfig
from ddpm.device import resolve_device
from ddpm.export import load_state_checked
from ddpm.inception import WEIGHTS_FILE, WEIGHTS_PACKAGE, inception_features
from ddpm.prepare import load_manifest, load_split
from ddpm.sample_counts import resolve_count

INFO_FILE = "reference.json"
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_FEATURES_FILE = "classifier_test.npy"
INCEPTION_FILE = "inception.npz"


@dataclass
class Reference:
    info: dict
    classifier: Classifier | None  # None for unlabelled data
    classifier_test: np.ndarray | None  # (M_test, 64) features of the whole held-out split
    inception_test: np.ndarray | None  # (M, 2048); None when evaluate.inception is false
    inception_train: np.ndarray | None  # (M, 2048)


def has_labels(manifest: dict) -> bool:
    return len(manifest["classes"]) > 1


def draw(count: int, total: int, seed: int) -> np.ndarray:
    """``count`` sorted indices out of ``total``, seeded; all of them when count >= total.
    Random, not the first ones: a folder source may be ordered by class."""
    if count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


def build_reference(prepared_dir: str | Path, cfg: EvaluateConfig) -> dict:
    """Run the stage; returns the summary written to ``reference.json``."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    manifest = load_manifest(prepared_dir)
    train, test = load_split(prepared_dir, "train"), load_split(prepared_dir, "test")
    out = Path(cfg.reference_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info: dict = {"data_hash": manifest["content_hash"], "shape": manifest["shape"], "device": device.type,
                  "classifier": None, "inception": None, "seconds": {}}

    if has_labels(manifest):
        t = time.perf_counter()
        model = train_classifier(train.images, train.labels, len(manifest["classes"]), cfg.classifier_epochs,
                                 cfg.classifier_batch_size, cfg.classifier_lr, cfg.seed, device)
        features, pred = predict(model, test.images, device)
        accuracy = float((pred == test.labels).mean())
        checkpoint.save(tmp / CLASSIFIER_FILE, dict(model.cpu().state_dict()),
                        {"config": model.config, "accuracy": accuracy, "data_hash": manifest["content_hash"]})
        np.save(tmp / CLASSIFIER_FEATURES_FILE, features.astype(np.float32))
        info["classifier"] = {"accuracy": round(accuracy, 4), "test_images": len(test.labels),
                              "epochs": cfg.classifier_epochs}
        info["seconds"]["classifier"] = round(time.perf_counter() - t, 1)
        print(f"classifier: held-out accuracy {accuracy:.4f} after {cfg.classifier_epochs} epochs")
    else:
        print("the data has no labels: no domain classifier, so no classifier metrics")

    if cfg.inception:
        t = time.perf_counter()
        m = resolve_count(cfg.reference_num_images, "reference", device)
        test_idx = draw(m, len(test.labels), cfg.seed)
        train_idx = draw(len(test_idx), len(train.labels), cfg.seed + 1)
        f_test = inception_features(test.images[test_idx], device, desc="inception held-out")
        f_train = inception_features(train.images[train_idx], device, desc="inception train")
        np.savez(tmp / INCEPTION_FILE, test=f_test, train=f_train, test_index=test_idx, train_index=train_idx)
        info["inception"] = {"num_images": len(test_idx), "weights": f"{WEIGHTS_PACKAGE}/{WEIGHTS_FILE}",
                             "input": "bilinear resize to 299x299 of [0, 1] images, then 2x - 1 (pytorch-fid)"}
        dt = time.perf_counter() - t
        info["seconds"]["inception"] = round(dt, 1)
        print(f"inception: {len(test_idx)} held-out + {len(train_idx)} training images in {dt:.1f} s "
              f"({dt / (2 * len(test_idx)):.3f} s/image on {device})")

    info["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"reference for data {manifest['content_hash'][:12]} in {info['seconds']['total']:.1f} s -> {out}")
    return info


def load_reference(reference_dir: str | Path, manifest: dict, device: torch.device) -> Reference:
    """Read the stage's output; fails if it was computed from other prepared data."""
    d = Path(reference_dir)
    if not (d / INFO_FILE).exists():
        raise FileNotFoundError(f"{d / INFO_FILE} not found: run `ddpm reference` (or `dvc repro reference`) first")
    info = json.loads((d / INFO_FILE).read_text())
    if info["data_hash"] != manifest["content_hash"]:
        raise ValueError(f"{d} was computed from data {info['data_hash'][:12]}, but the prepared data is "
                         f"{manifest['content_hash'][:12]}: run `ddpm reference` again")
    classifier = classifier_test = inception_test = inception_train = None
    if info["classifier"] is not None:
        tensors, meta = checkpoint.load(d / CLASSIFIER_FILE)
        classifier = Classifier(**meta["config"])
        load_state_checked(classifier, tensors, str(d / CLASSIFIER_FILE))
        classifier = classifier.to(device).eval()
        classifier_test = np.load(d / CLASSIFIER_FEATURES_FILE)
    if info["inception"] is not None:
        with np.load(d / INCEPTION_FILE) as f:
            inception_test, inception_train = f["test"], f["train"]
    return Reference(info, classifier, classifier_test, inception_test, inception_train)
