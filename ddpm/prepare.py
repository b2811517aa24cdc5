"""The *prepare* stage: a raw image source -> uint8 arrays and a manifest.

Output layout under ``out_dir`` (all deterministic: the same input gives
byte-identical files, whatever ``num_proc``)::

    train_images.npy  uint8 (N, C, H, W)     train_labels.npy  int64 (N,)
    test_images.npy   uint8 (M, C, H, W)     test_labels.npy   int64 (M,)
    manifest.json     counts, shape, class counts, content hash, source,
                      skipped files, upscaled count

Image sources (``ddpm.sources``) are decoded in a fixed order, in parallel
(``num_proc``), and written row by row into the ``.npy`` files, so memory stays
flat as the source grows. ``.npy`` files are memory-mapped on load, so training
reads pages on demand instead of holding a large data set in RAM.

Held-out split: the source's ``test`` split where it has one; otherwise
``holdout_fraction`` of the images, chosen by a seeded hash of each image's key
(relative path or row), so adding images moves at most one other image
between the splits.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from itertools import chain
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from ddpm.config import PrepareConfig
from ddpm.idx import read_idx
from ddpm.npy_writer import NpyRowWriter, update_hash
from ddpm.sources import DataSourceError, Source, Table, open_source
from ddpm.transforms import GREY_MODES, Payload, Result, Spec, prepare_image, probe_mode, resize_square

__all__ = ["DataSourceError", "UnreadableImageError", "Split", "prepare", "load_split", "load_manifest",
           "content_hash", "holdout_split", "resize_square", "read_fashion_mnist"]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SPLITS = ("train", "test")
_CHUNK_IMAGES = 16  # images per task sent to a decoding process


class UnreadableImageError(ValueError):
    """An image that cannot be decoded, with ``prepare.strict`` on."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, C, H, W), usually a read-only memmap
    labels: np.ndarray  # int64 (N,)


# -- Fashion-MNIST (idx files, held in memory) ----------------------------------------------


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def read_fashion_mnist(root: str | Path) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST arrays (images uint8 (N, 28, 28), labels) from idx files."""
    root = Path(root)
    found = {key: _find(root, stem) for key, stem in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] + "[.gz]" for k, p in found.items() if p is None]
    if missing:
        raise DataSourceError(
            f"Fashion-MNIST idx files not found in {root}: missing {', '.join(missing)}. "
            "On Debian/Ubuntu: `sudo apt-get update && sudo apt-get install dataset-fashion-mnist` "
            "(installs them to /usr/share/datasets/fashion-mnist); otherwise download the four "
            "files from https://github.com/zalandoresearch/fashion-mnist (data/fashion) and set "
            "prepare.source_path to their folder."
        )
    arrays = {key: read_idx(path) for key, path in found.items()}
    for split in SPLITS:
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataSourceError(f"{root}: {split} has {n_img} images but {n_lab} labels")
    return arrays


def _to_nchw(images: np.ndarray, resolution: int, channels: int, desc: str) -> np.ndarray:
    """(N, H, W) grey uint8 -> (N, C, res, res) uint8 with a progress bar."""
    out = np.empty((len(images), channels, resolution, resolution), dtype=np.uint8)
    for i in tqdm(range(len(images)), desc=desc, unit="img", mininterval=1.0):
        out[i] = resize_square(images[i], resolution)[None]  # grey replicated over C
    return out


def _prepare_fashion_mnist(cfg: PrepareConfig, out: Path) -> dict:
    raw = read_fashion_mnist(cfg.source_path)
    channels = cfg.channels or 1
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        images, labels = raw[f"{split}_images"], raw[f"{split}_labels"]
        if cfg.max_images:
            images, labels = images[: cfg.max_images], labels[: cfg.max_images]
        arrays[f"{split}_images"] = _to_nchw(images, cfg.resolution, channels, f"prepare {split}")
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    upscaled = sum(len(raw[f"{s}_images"]) for s in SPLITS) if raw["train_images"].shape[1] < cfg.resolution else 0
    for name, array in arrays.items():
        np.save(out / f"{name}.npy", array)
    return {
        "source": {"kind": cfg.source, "path": str(Path(cfg.source_path).resolve())},
        "resolution": cfg.resolution,
        "channels": channels,
        "shape": [channels, cfg.resolution, cfg.resolution],
        "classes": list(FASHION_MNIST_CLASSES),
        "splits": {
            s: {
                "count": int(len(arrays[f"{s}_labels"])),
                "class_counts": np.bincount(arrays[f"{s}_labels"], minlength=len(FASHION_MNIST_CLASSES)).tolist(),
            }
            for s in SPLITS
        },
        "upscaled": upscaled,
        "skipped": [],
        "content_hash": content_hash(arrays),
    }


# -- image sources (folders, parquet, arrow, hub) ----------------------------------------------


def holdout_split(keys: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, each ascending: the ``round(fraction * n)`` keys (at least one, and
    never all) with the smallest sha256 of ``seed/key`` are held out."""
    n = len(keys)
    scores = np.fromiter((int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big")
                          for key in keys), dtype=np.uint64, count=n)
    order = np.argsort(scores, kind="stable")
    k = min(n - 1, max(1, round(fraction * n)))
    return np.sort(order[k:]), np.sort(order[:k])


def _num_proc(cfg: PrepareConfig) -> int:
    if cfg.num_proc:
        return cfg.num_proc
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _probe_channels(payloads: Iterable[Payload], total: int) -> int:
    """1 if every readable image has a grey mode (L, LA, I;16, ...), else 3; reads headers only."""
    for payload in tqdm(payloads, total=total, desc="probe modes", unit="img", mininterval=1.0):
        mode = probe_mode(payload)
        if mode is not None and mode not in GREY_MODES:
            return 3
    return 1


@contextlib.contextmanager
def _decoding_pool(num_proc: int) -> Iterator[Pool | None]:
    """A pool of ``num_proc`` processes, or None for decoding in this process. Spawned (safe beside
    torch and threads) and started first, so workers boot while the source is being listed."""
    if num_proc <= 1:
        yield None
        return
    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        yield pool


def _decode(payloads: Iterable[Payload], spec: Spec, pool: Pool | None) -> Iterator[Result]:
    """``prepare_image`` over ``payloads``, in input order."""
    work = functools.partial(prepare_image, spec=spec)
    return map(work, payloads) if pool is None else pool.imap(work, payloads, chunksize=_CHUNK_IMAGES)


def _write_split(out: Path, split: str, table: Table, indices: np.ndarray, spec: Spec, cfg: PrepareConfig,
                 where: str, pool: Pool | None) -> dict:
    """Decode ``table`` rows ``indices`` into ``{split}_images.npy`` / ``_labels.npy``; returns counts."""
    writer = NpyRowWriter(out / f"{split}_images.npy", len(indices), (spec.channels, spec.resolution, spec.resolution))
    labels, kept, skipped, upscaled = np.empty(len(indices), dtype=np.int64), 0, [], 0
    results = _decode(table.payloads(indices), spec, pool)
    bar = tqdm(zip(indices, results), total=len(indices), desc=f"prepare {split}", unit="img", mininterval=1.0)
    try:
        for i, result in bar:
            key = table.keys[i]
            if result.image is None:
                if cfg.strict:
                    raise UnreadableImageError(f"cannot read {key} in {where}: {result.error} "
                                               "(prepare.strict is true; set it to false to skip and list such files)")
                skipped.append({"split": split, "item": key, "error": result.error})
                continue
            writer.append(result.image)
            labels[kept] = table.labels[i]
            kept += 1
            upscaled += result.upscaled
    finally:
        bar.close()
        writer.close()
    np.save(out / f"{split}_labels.npy", labels[:kept])
    if not kept:
        raise DataSourceError(f"no readable images for the {split} split in {where}: "
                              f"all {len(indices)} failed to decode (first: {skipped[0]['item'] if skipped else '-'})")
    return {"candidates": int(len(indices)), "skipped": skipped, "upscaled": upscaled}


def _prepare_images(cfg: PrepareConfig, out: Path) -> dict:
    with _decoding_pool(_num_proc(cfg)) as pool:  # on an error, leaving this block stops the workers
        return _prepare_images_with(cfg, out, pool)


def _prepare_images_with(cfg: PrepareConfig, out: Path, pool: Pool | None) -> dict:
    source: Source = open_source(cfg)
    where = source.description.get("path") or source.description.get("hub_id")
    if not source.train.keys:
        raise DataSourceError(f"{where} holds no images in split {cfg.split!r}")
    if source.test is not None:
        parts = {"train": (source.train, np.arange(len(source.train.keys))),
                 "test": (source.test, np.arange(len(source.test.keys)))}
        held_out = {"from": f"the source's {source.description['test_split']!r} split"}
    else:
        if len(source.train.keys) < 2:
            raise DataSourceError(f"{where} holds 1 image; at least 2 are needed to hold one out for evaluation")
        train_idx, test_idx = holdout_split(source.train.keys, cfg.holdout_fraction, cfg.seed)
        parts = {"train": (source.train, train_idx), "test": (source.train, test_idx)}
        held_out = {"from": "prepare.holdout_fraction", "fraction": cfg.holdout_fraction, "seed": cfg.seed}
    if cfg.max_images:
        parts = {s: (table, idx[: cfg.max_images]) for s, (table, idx) in parts.items()}

    channels = cfg.channels or _probe_channels(
        chain.from_iterable(table.payloads(idx) for table, idx in parts.values()),
        sum(len(idx) for _, idx in parts.values()))
    spec = Spec(cfg.resolution, channels, cfg.fit, tuple(cfg.background))
    counts = {s: _write_split(out, s, table, idx, spec, cfg, where, pool) for s, (table, idx) in parts.items()}

    arrays = {f"{s}_{kind}": np.load(out / f"{s}_{kind}.npy", mmap_mode="r") for s in SPLITS
              for kind in ("images", "labels")}
    return {
        "source": source.description,
        "resolution": cfg.resolution,
        "channels": channels,
        "shape": [channels, cfg.resolution, cfg.resolution],
        "fit": cfg.fit,
        "background": list(cfg.background),
        "classes": source.classes,
        "held_out": held_out,
        "splits": {
            s: {
                "count": int(len(arrays[f"{s}_labels"])),
                "class_counts": np.bincount(arrays[f"{s}_labels"], minlength=len(source.classes)).tolist(),
                "candidates": counts[s]["candidates"],
            }
            for s in SPLITS
        },
        "upscaled": sum(c["upscaled"] for c in counts.values()),
        "skipped": [item for s in SPLITS for item in counts[s]["skipped"]],
        "content_hash": content_hash(arrays),
    }


# -- the stage ------------------------------------------------------------------------------


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order (read in chunks: memmaps stay on disk)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        update_hash(h, name, arrays[name])
    return h.hexdigest()


def prepare(cfg: PrepareConfig) -> dict:
    """Run the prepare stage; returns the manifest. Writes atomically into ``cfg.out_dir``:
    on any error an earlier output is left as it was."""
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if cfg.source == "fashion_mnist":
            manifest = _prepare_fashion_mnist(cfg, tmp)
        else:
            manifest = _prepare_images(cfg, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    n = sum(manifest["splits"][s]["count"] for s in SPLITS)
    dt = time.perf_counter() - t0
    skipped = f", skipped {len(manifest['skipped'])} unreadable" if manifest["skipped"] else ""
    print(f"prepared {n} images at {cfg.resolution}x{cfg.resolution}x{manifest['channels']} in {dt:.1f} s "
          f"({n / dt:.0f} img/s){skipped} -> {out}  hash {manifest['content_hash'][:12]}")
    return manifest


def load_split(prepared_dir: str | Path, split: str) -> Split:
    """Memory-map one prepared split."""
    d = Path(prepared_dir)
    path = d / f"{split}_images.npy"
    if not path.exists():
        raise DataSourceError(f"prepared data {path} not found: run `ddpm prepare` (or `dvc repro prepare`) first")
    return Split(np.load(path, mmap_mode="r"), np.load(d / f"{split}_labels.npy"))


def load_manifest(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "manifest.json"
    if not path.exists():
        raise DataSourceError(f"{path} not found: run `ddpm prepare` first")
    return json.loads(path.read_text())
