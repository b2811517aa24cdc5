"""Image sources for the prepare stage, all opened through Hugging Face ``datasets``.

- ``imagefolder``: ``load_dataset("imagefolder", data_dir=..., data_files=...)``:
  recursive, only image extensions (other files are ignored). Top-level ``train/``
  and ``test/`` folders (or ``training/``, ``testing/``, ``eval/``, ``validation/``...)
  become splits. Labels come from class subfolders (see ``folder_labels``).
- ``parquet``: one ``.parquet`` file, or a folder of them (``train-*.parquet`` and
  ``test-*.parquet`` names become splits).
- ``arrow``: a ``save_to_disk`` folder, one ``.arrow`` file, or a folder of them.
- ``hub``: ``load_dataset(hub_id, revision=...)``, the one call that downloads from
  the Hugging Face hub. Given a local folder instead of an id, ``load_dataset``
  reads it with the same code (how the tests exercise this path offline).

Every split becomes a ``Table``: stable keys (relative paths or ``split[row]``), int
labels, and the encoded images read lazily in a fixed order, so memory does not
grow with the data set and the output does not depend on file system order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ddpm.config import PrepareConfig
from ddpm.transforms import Payload

UNLABELLED = ["all"]  # the one class of a source without labels; every label is 0
# Folder names that mark a split, as datasets' own split patterns read them.
SPLIT_FOLDERS = {"train": ("train", "training"), "test": ("test", "testing", "eval", "evaluation"),
                 "validation": ("validation", "valid", "val", "dev")}
SPLIT_DIR_NAMES = frozenset(name for names in SPLIT_FOLDERS.values() for name in names)
HELD_OUT_SPLIT = "test"


class DataSourceError(FileNotFoundError):
    """The configured data source is missing, empty, or lacks what the config names."""


@dataclass
class FileTable:
    """Images that are files: ``paths`` are absolute, ``keys`` relative to the source folder."""

    keys: list[str]
    labels: np.ndarray  # int64 (N,)
    paths: list[str]

    def payloads(self, indices: Sequence[int]) -> Iterator[Payload]:
        for i in indices:
            yield self.paths[i]


class RowKeys(Sequence[str]):
    """``"train[0]"``, ``"train[1]"``, ...: row keys made on demand, not held for millions of rows."""

    def __init__(self, split: str, n: int):
        self.split, self.n = split, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return f"{self.split}[{i % self.n}]"


@dataclass
class ArrowTable:
    """Images stored in one column of an Arrow-backed ``datasets.Dataset``."""

    keys: Sequence[str]
    labels: np.ndarray  # int64 (N,)
    dataset: Any  # datasets.Dataset holding only the image column, not decoded
    column: str
    batch_rows: int = 256

    def payloads(self, indices: Sequence[int]) -> Iterator[Payload]:
        for start in range(0, len(indices), self.batch_rows):
            rows = self.dataset[[int(i) for i in indices[start : start + self.batch_rows]]][self.column]
            for row in rows:
                yield _payload(row)


Table = FileTable | ArrowTable


@dataclass
class Source:
    """The splits of one source: ``test`` is None when the source has no held-out split."""

    train: Table
    test: Table | None
    classes: list[str]
    description: dict[str, Any] = field(default_factory=dict)


def _payload(row: Any) -> Payload:
    """A stored image -> bytes or a path: ``{"bytes", "path"}`` structs (the Image feature) or raw bytes."""
    if isinstance(row, dict):
        if row.get("bytes"):
            return row["bytes"]
        if row.get("path"):
            return row["path"]
        return b""  # an empty cell: decoding fails and the row is reported as skipped
    return row if row is not None else b""


def open_source(cfg: PrepareConfig) -> Source:
    """Open the source that ``cfg.source`` names; raises ``DataSourceError`` naming the path or id."""
    if cfg.source == "imagefolder":
        return open_imagefolder(cfg)
    if cfg.source == "hub":
        return open_hub(cfg)
    if cfg.source in ("parquet", "arrow"):
        return open_local_table(cfg)
    raise ValueError(f"prepare.source={cfg.source!r} has no image source here; choose one of imagefolder, "
                     "parquet, arrow, hub")


def _existing(path_text: str, what: str) -> Path:
    path = Path(path_text).expanduser().absolute()
    if not path.exists():
        raise DataSourceError(f"{what} {path} does not exist (prepare.source_path)")
    return path.resolve()


# -- image folders ---------------------------------------------------------------


def open_imagefolder(cfg: PrepareConfig) -> Source:
    import datasets

    root = _existing(cfg.source_path, "image folder")
    if not root.is_dir():
        raise DataSourceError(f"image folder {root} is not a folder (prepare.source_path)")
    try:
        dd = datasets.load_dataset("imagefolder", data_dir=str(root), data_files=split_patterns(root),
                                   drop_labels=True)
    except (datasets.data_files.EmptyDatasetError, ValueError) as exc:
        raise DataSourceError(f"image folder {root} holds no readable image files (prepare.source_path): "
                              f"{exc}") from None
    dd = {name: ds.cast_column("image", datasets.Image(decode=False)) for name, ds in dd.items()}
    train_name, test_name = _split_names(dd, cfg, str(root))

    tables: dict[str, dict] = {}
    for role, name in (("train", train_name), ("test", test_name)):
        if name is None:
            continue
        paths = [row["path"] for row in dd[name]["image"]]
        keys = [Path(os.path.relpath(p, root)).as_posix() for p in paths]  # lexical: symlinks stay inside
        order = sorted(range(len(keys)), key=keys.__getitem__)
        tables[role] = {"keys": [keys[i] for i in order], "paths": [paths[i] for i in order],
                        "dataset": dd[name].select(order)}

    if cfg.label_column == "none":
        labels, classes, label_from = None, list(UNLABELLED), None
    elif cfg.label_column:
        labels, classes = _column_labels({r: t["dataset"] for r, t in tables.items()}, cfg.label_column)
        label_from = cfg.label_column
    else:
        labels, classes = folder_labels({r: t["keys"] for r, t in tables.items()})
        label_from = "class subfolders" if labels is not None else None
    built = {r: FileTable(t["keys"], _labels_or_zeros(labels, r, len(t["keys"])), t["paths"])
             for r, t in tables.items()}
    description = {"kind": "imagefolder", "path": str(root), "split": train_name, "test_split": test_name,
                   "labels": label_from}
    return Source(built["train"], built.get("test"), classes, description)


def split_patterns(root: Path) -> dict[str, str]:
    """``data_files`` patterns: one per top-level split folder when there is a train folder, else
    everything is ``train``. Two patterns instead of datasets' ~60 default ones, each of which walks
    the whole tree (7 s instead of 0.6 s to list 3000 files)."""
    folders = {p.name.lower(): p.name for p in root.iterdir() if p.is_dir()}
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        name = next((folders[n] for n in names if n in folders), None)
        if name is not None:
            found[split] = f"{name}/**"
    return found if "train" in found else {"train": "**"}


def folder_labels(keys_by_split: dict[str, list[str]]) -> tuple[dict[str, np.ndarray] | None, list[str]]:
    """Labels from class subfolders: the first folder under the source folder (under its
    ``train/`` or ``test/`` folder, when it has one) names the class of every image below it.
    Returns ``(None, ["all"])`` when an image sits outside any class subfolder."""
    names: dict[str, list[str]] = {}
    for split, keys in keys_by_split.items():
        parts = [PurePosixPath(k).parts for k in keys]
        parts = [p[1:] if len(p) > 1 and p[0].lower() in SPLIT_DIR_NAMES else p for p in parts]
        if any(len(p) < 2 for p in parts):
            return None, list(UNLABELLED)
        names[split] = [p[0] for p in parts]
    classes = sorted(set().union(*names.values()))
    index = {c: i for i, c in enumerate(classes)}
    return {s: np.array([index[c] for c in n], dtype=np.int64) for s, n in names.items()}, classes


# -- parquet, arrow and the hub ------------------------------------------------------------


def open_local_table(cfg: PrepareConfig) -> Source:
    import datasets

    path = _existing(cfg.source_path, f"{cfg.source} data set")
    try:
        if cfg.source == "arrow" and path.is_dir() and ((path / "dataset_dict.json").exists()
                                                        or (path / "state.json").exists()):
            dd = datasets.load_from_disk(str(path))  # save_to_disk output, memory-mapped in place
        elif path.is_dir():
            dd = datasets.load_dataset(cfg.source, data_dir=str(path))
        else:
            dd = datasets.load_dataset(cfg.source, data_files={"train": str(path)})
    except (datasets.data_files.EmptyDatasetError, ValueError) as exc:
        raise DataSourceError(f"{cfg.source} data set {path} holds no {cfg.source} files "
                              f"(prepare.source_path): {exc}") from None
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict({"train": dd})
    return _from_datasets(dd, cfg, {"kind": cfg.source, "path": str(path)})


def open_hub(cfg: PrepareConfig) -> Source:
    """``load_dataset(hub_id, revision=...)``: a hub id needs the network; a local folder does not."""
    import datasets

    try:
        dd = datasets.load_dataset(cfg.hub_id, revision=cfg.revision or None)
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise DataSourceError(f"data set {cfg.hub_id!r} (prepare.hub_id) was not found: {exc}") from None
    except ConnectionError as exc:
        raise DataSourceError(f"data set {cfg.hub_id!r} (prepare.hub_id) needs the network: {exc}. With a copy "
                              "in the datasets cache, set HF_HUB_OFFLINE=1; or download the repository and use "
                              "source: parquet with source_path set to it") from None
    description = {"kind": "hub", "hub_id": cfg.hub_id, "revision": cfg.revision or None,
                   "resolved_revision": _hub_commit(cfg.hub_id, cfg.revision)}
    return _from_datasets(dd, cfg, description)


def _hub_commit(hub_id: str, revision: str) -> str | None:
    """The commit sha a hub revision resolves to, for the manifest; None offline or for a local folder."""
    if Path(hub_id).expanduser().exists():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(hub_id, revision=revision or None).sha
    except Exception:  # offline, or an older hub client: the manifest just lacks the sha
        return None


def _split_names(dd, cfg: PrepareConfig, where: str) -> tuple[str, str | None]:
    if cfg.split not in dd:
        raise DataSourceError(f"{where} has no split {cfg.split!r} (prepare.split); it has {', '.join(dd)}")
    test = HELD_OUT_SPLIT if HELD_OUT_SPLIT in dd and cfg.split != HELD_OUT_SPLIT else None
    return cfg.split, test


def _from_datasets(dd, cfg: PrepareConfig, description: dict[str, Any]) -> Source:
    import datasets

    where = description.get("path") or description.get("hub_id")
    train_name, test_name = _split_names(dd, cfg, where)
    features = dd[train_name].features
    column = image_column(features, cfg.image_column, where)
    chosen = {"train": dd[train_name]}
    if test_name is not None:
        chosen["test"] = dd[test_name]
    if cfg.label_column == "none":
        labels, classes, label_column = None, list(UNLABELLED), None
    elif cfg.label_column:
        labels, classes = _column_labels(chosen, cfg.label_column)
        label_column = cfg.label_column
    else:
        label_column = next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        labels, classes = _column_labels(chosen, label_column) if label_column else (None, list(UNLABELLED))
    tables = {}
    for role, ds in chosen.items():
        images = ds.select_columns([column])
        if isinstance(images.features[column], datasets.Image):
            images = images.cast_column(column, datasets.Image(decode=False))
        name = train_name if role == "train" else test_name
        tables[role] = ArrowTable(RowKeys(name, len(ds)),
                                  _labels_or_zeros(labels, role, len(ds)), images, column)
    description = {**description, "split": train_name, "test_split": test_name, "image_column": column,
                   "labels": label_column}
    return Source(tables["train"], tables.get("test"), classes, description)


def image_column(features, configured: str, where: str) -> str:
    """The configured image column, else the first Image column, else a {bytes, path} struct or binary one."""
    import datasets

    names = list(features)
    if configured:
        if configured not in features:
            raise DataSourceError(f"{where} has no column {configured!r} (prepare.image_column); "
                                  f"it has {', '.join(names)}")
        return configured
    for test in (lambda f: isinstance(f, datasets.Image),
                 lambda f: isinstance(f, dict) and "bytes" in f,
                 lambda f: isinstance(f, datasets.Value) and f.dtype in ("binary", "large_binary")):
        for name in names:
            if test(features[name]):
                return name
    raise DataSourceError(f"{where} has no image column among {', '.join(names)}: set prepare.image_column")


def _column_labels(splits: dict[str, Any], column: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Labels from a column: ClassLabel keeps its names; ints or strings become sorted class names."""
    import datasets

    first = next(iter(splits.values()))
    if column not in first.features:
        raise DataSourceError(f"the source has no column {column!r} (prepare.label_column); "
                              f"it has {', '.join(first.features)}")
    feature = first.features[column]
    values = {role: ds[column] for role, ds in splits.items()}
    if isinstance(feature, datasets.ClassLabel):
        return {r: np.asarray(v, dtype=np.int64) for r, v in values.items()}, list(feature.names)
    if not (isinstance(feature, datasets.Value) and (feature.dtype.startswith(("int", "uint"))
                                                     or feature.dtype in ("string", "large_string"))):
        raise DataSourceError(f"prepare.label_column={column!r} holds {feature}, not class names or ints")
    distinct = sorted(set().union(*values.values()))
    index = {v: i for i, v in enumerate(distinct)}
    return {r: np.array([index[x] for x in v], dtype=np.int64) for r, v in values.items()}, [str(v) for v in distinct]


def _labels_or_zeros(labels: dict[str, np.ndarray] | None, role: str, n: int) -> np.ndarray:
    return labels[role] if labels is not None else np.zeros(n, dtype=np.int64)
