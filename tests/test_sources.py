"""Parquet, Arrow and hub sources, read through Hugging Face ``datasets`` from local files.

The hub source calls ``load_dataset(hub_id, revision=...)``; given a local folder of
parquet files laid out like a hub data set repository, that call runs the same code
without the network.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ddpm.config import ConfigError, PrepareConfig
from ddpm.prepare import DataSourceError, load_split, prepare
from ddpm.sources import folder_labels

FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee", "cow"]),
                              "caption": datasets.Value("string")})


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def png(value: int, size=(6, 6), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def image_dataset(n: int, offset: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"image": [{"bytes": png(10 * (i + offset)), "path": None} for i in range(n)],
         "label": [i % 3 for i in range(n)], "caption": [f"c{i}" for i in range(n)]}, features=FEATURES)


def hub_like_repo(root: Path) -> Path:
    """A data set repository as the hub stores it: data/{split}-00000-of-00001.parquet."""
    (root / "data").mkdir(parents=True)
    image_dataset(9).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    image_dataset(4, offset=20).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def cfg(tmp_path: Path, **kw) -> PrepareConfig:
    return PrepareConfig(**{"out_dir": str(tmp_path / "out"), "resolution": 4, "num_proc": 1, **kw})


def test_hub_source_keeps_splits_labels_and_class_names(tmp_path):
    repo = hub_like_repo(tmp_path / "repo")
    manifest = prepare(cfg(tmp_path, source="hub", hub_id=str(repo), revision="main"))
    assert manifest["source"]["kind"] == "hub" and manifest["source"]["hub_id"] == str(repo)
    assert manifest["source"]["image_column"] == "image" and manifest["source"]["labels"] == "label"
    assert manifest["classes"] == ["ant", "bee", "cow"] and manifest["channels"] == 1
    assert manifest["held_out"]["from"] == "the source's 'test' split"
    assert manifest["splits"]["train"]["class_counts"] == [3, 3, 3] and manifest["splits"]["test"]["count"] == 4
    train = load_split(tmp_path / "out", "train")
    assert train.images[:, 0, 0, 0].tolist() == [10 * i for i in range(9)]  # row order kept
    assert train.labels.tolist() == [i % 3 for i in range(9)]


def test_parquet_folder_is_the_same_data_as_the_hub_path(tmp_path):
    repo = hub_like_repo(tmp_path / "repo")
    hub = prepare(cfg(tmp_path, source="hub", hub_id=str(repo), out_dir=str(tmp_path / "hub")))
    local = prepare(cfg(tmp_path, source="parquet", source_path=str(repo), out_dir=str(tmp_path / "pq")))
    assert hub["content_hash"] == local["content_hash"]


def test_plain_parquet_file_columns_are_detected_or_configured(tmp_path):
    """A parquet file written without datasets' metadata: images as {bytes, path} structs."""
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"name": ["a", "b", "c", "d"],
                             "picture": [{"bytes": png(v, (8, 6), "RGB"), "path": f"{v}.png"} for v in (1, 2, 3, 4)],
                             "kind": ["sun", "moon", "sun", "star"]}), path)
    manifest = prepare(cfg(tmp_path, source="parquet", source_path=str(path), label_column="kind",
                           holdout_fraction=0.25))
    assert manifest["source"]["image_column"] == "picture" and manifest["classes"] == ["moon", "star", "sun"]
    assert manifest["channels"] == 3 and manifest["splits"]["train"]["count"] == 3
    assert sum(sum(manifest["splits"][s]["class_counts"][i] for s in ("train", "test")) for i in range(3)) == 4
    with pytest.raises(DataSourceError, match=r"no column 'photo' \(prepare\.image_column\); it has name, picture, kind"):
        prepare(cfg(tmp_path, source="parquet", source_path=str(path), image_column="photo"))
    with pytest.raises(DataSourceError, match=r"no column 'species' \(prepare\.label_column\)"):
        prepare(cfg(tmp_path, source="parquet", source_path=str(path), label_column="species"))


def test_binary_image_column_and_no_labels(tmp_path):
    path = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "data": [png(v) for v in (5, 6, 7)]}), path)
    manifest = prepare(cfg(tmp_path, source="parquet", source_path=str(path)))
    assert manifest["source"]["image_column"] == "data" and manifest["classes"] == ["all"]
    assert manifest["splits"]["train"]["class_counts"] == [2] and manifest["splits"]["test"]["class_counts"] == [1]
    assert load_split(tmp_path / "out", "train").labels.tolist() == [0, 0]


def test_arrow_save_to_disk_dataset_and_dataset_dict(tmp_path):
    image_dataset(6).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": image_dataset(6), "test": image_dataset(2)}).save_to_disk(str(tmp_path / "two"))
    one = prepare(cfg(tmp_path, source="arrow", source_path=str(tmp_path / "one"), out_dir=str(tmp_path / "o1")))
    two = prepare(cfg(tmp_path, source="arrow", source_path=str(tmp_path / "two"), out_dir=str(tmp_path / "o2"),
                      label_column="none"))
    assert one["held_out"]["from"] == "prepare.holdout_fraction" and one["classes"] == ["ant", "bee", "cow"]
    assert two["splits"]["test"]["count"] == 2 and two["classes"] == ["all"]
    with pytest.raises(DataSourceError, match=r"has no split 'training' \(prepare\.split\); it has train, test"):
        prepare(cfg(tmp_path, source="arrow", source_path=str(tmp_path / "two"), split="training"))


def test_broken_rows_are_skipped_by_row(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [{"bytes": png(1), "path": None}, {"bytes": b"junk", "path": None},
                                               {"bytes": png(3), "path": None}]},
                                    features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    manifest = prepare(cfg(tmp_path, source="arrow", source_path=str(tmp_path / "ds")))
    assert [s["item"] for s in manifest["skipped"]] == ["train[1]"]


def test_missing_local_table_names_the_path(tmp_path):
    with pytest.raises(DataSourceError, match=str(tmp_path / "nowhere.parquet")):
        prepare(cfg(tmp_path, source="parquet", source_path=str(tmp_path / "nowhere.parquet")))


def test_hub_needs_an_id():
    with pytest.raises(ConfigError, match=r"prepare\.hub_id must name a data set"):
        PrepareConfig(source="hub")


def test_folder_labels_strip_split_folders_and_reject_loose_images():
    labels, classes = folder_labels({"train": ["train/cat/a.png", "train/dog/x/b.png"], "test": ["test/cat/c.png"]})
    assert classes == ["cat", "dog"] and labels["train"].tolist() == [0, 1] and labels["test"].tolist() == [0]
    assert folder_labels({"train": ["cat/a.png", "loose.png"]}) == (None, ["all"])
