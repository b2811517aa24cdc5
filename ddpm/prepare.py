"""The *prepare* stage: a raw image source -> uint8 arrays and a manifest.

Output layout under ``out_dir`` (all deterministic: the same input gives
byte-identical files)::

    train_images.npy  uint8 (N, C, H, W)     train_labels.npy  int64 (N,)
    test_images.npy   uint8 (M, C, H, W)     test_labels.npy   int64 (M,)
    manifest.json     counts, shape, class counts, content hash, source

``.npy`` files are memory-mapped on load, so training reads pages on demand
instead of holding the data set in RAM.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ddpm.config import PrepareConfig
from ddpm.idx import read_idx

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


class DataSourceError(FileNotFoundError):
    """The configured data source is missing or empty."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, C, H, W), usually a read-only memmap
    labels: np.ndarray  # int64 (N,)


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


def resize_square(image: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> (resolution, resolution[, C]): shorter side resized, centre crop."""
    pil = Image.fromarray(image)
    w, h = pil.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        pil = pil.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        pil = pil.crop((left, top, left + resolution, top + resolution))
    return np.asarray(pil)


def _to_nchw(images: np.ndarray, resolution: int, channels: int, desc: str) -> np.ndarray:
    """(N, H, W) grey uint8 -> (N, C, res, res) uint8 with a progress bar."""
    out = np.empty((len(images), channels, resolution, resolution), dtype=np.uint8)
    for i in tqdm(range(len(images)), desc=desc, unit="img", mininterval=1.0):
        out[i] = resize_square(images[i], resolution)[None]  # grey replicated over C
    return out


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def prepare(cfg: PrepareConfig) -> dict:
    """Run the prepare stage; returns the manifest. Writes atomically into ``cfg.out_dir``."""
    t0 = time.perf_counter()
    if cfg.source != "fashion_mnist":
        raise NotImplementedError(f"prepare.source={cfg.source!r} is not implemented yet; use fashion_mnist")
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

    manifest = {
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

    out = Path(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", array)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    n = sum(len(arrays[f"{s}_labels"]) for s in SPLITS)
    dt = time.perf_counter() - t0
    print(f"prepared {n} images at {cfg.resolution}x{cfg.resolution} in {dt:.1f} s "
          f"({n / dt:.0f} img/s) -> {out}  hash {manifest['content_hash'][:12]}")
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
