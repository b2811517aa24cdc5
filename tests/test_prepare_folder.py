"""A real, messy image folder through ``prepare``: every bad case the stage must survive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.config import PrepareConfig
from ddpm.prepare import DataSourceError, UnreadableImageError, holdout_split, load_split, prepare
from tests.test_prepare_transforms import encode, exif_rotated_jpeg

UNREADABLE = ("dogs/text.jpg", "dogs/truncated.jpg", "dogs/zero.png")


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep Hugging Face datasets' cache inside the test's temporary folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def make_messy_folder(root: Path, seed: int = 0) -> Path:
    """Two class subfolders holding every mode, an EXIF-rotated JPEG, a tiny image, three
    unreadable files and two text files, as a user's photo folder might."""
    rng = np.random.default_rng(seed)
    cats, dogs = root / "cats", root / "dogs" / "puppies"  # dogs: nested one level deeper
    cats.mkdir(parents=True)
    dogs.mkdir(parents=True)
    noise = lambda *shape: rng.integers(0, 255, shape, dtype=np.uint8)  # noqa: E731
    Image.fromarray(noise(20, 24, 3)).save(cats / "rgb.jpg", quality=90)
    (cats / "exif_rotated.jpg").write_bytes(exif_rotated_jpeg(6))
    Image.fromarray(noise(16, 16, 4)).save(cats / "rgba.png")
    Image.fromarray(noise(16, 16, 2), "LA").save(cats / "la.png")
    Image.fromarray(noise(16, 16, 3)).convert("P").save(cats / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)).save(dogs / "sixteen_bit.png")
    Image.fromarray(noise(16, 20)).save(root / "dogs" / "grey.png")
    Image.fromarray(noise(4, 4, 3)).save(root / "dogs" / "tiny.png")  # smaller than the resolution
    jpeg = encode(Image.fromarray(noise(32, 32, 3)), "JPEG")
    (root / "dogs" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dogs" / "zero.png").write_bytes(b"")
    (root / "dogs" / "text.jpg").write_text("not a JPEG at all")
    (root / "notes.txt").write_text("shot on holiday")
    (root / "dogs" / "README.md").write_text("dogs")
    return root


def cfg_for(folder: Path, out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(**{"source": "imagefolder", "source_path": str(folder), "out_dir": str(out),
                            "resolution": 8, "num_proc": 1, **kw})


def test_messy_folder_is_prepared_with_everything_accounted_for(tmp_path):
    folder = make_messy_folder(tmp_path / "photos")
    manifest = prepare(cfg_for(folder, tmp_path / "out"))
    assert manifest["classes"] == ["cats", "dogs"]
    assert manifest["channels"] == 3 and manifest["shape"] == [3, 8, 8]  # colour in the data
    assert sorted(s["item"] for s in manifest["skipped"]) == list(UNREADABLE)  # text files never considered
    assert all(s["error"] for s in manifest["skipped"])
    assert manifest["upscaled"] == 1
    splits = manifest["splits"]
    assert splits["train"]["count"] + splits["test"]["count"] == 8  # all modes converted, none lost
    assert splits["train"]["candidates"] + splits["test"]["candidates"] == 11
    cats = sum(splits[s]["class_counts"][0] for s in ("train", "test"))
    assert cats == 5  # the nested dogs/puppies image counts as a dog
    assert splits["test"]["count"] >= 1 and manifest["held_out"]["from"] == "prepare.holdout_fraction"
    train, test = load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "test")
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (3, 8, 8)
    assert len(train.labels) == splits["train"]["count"] and len(test.labels) == splits["test"]["count"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_exif_orientation_survives_preparation(tmp_path):
    folder = tmp_path / "photos"
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    (folder / "train" / "a_rotated.jpg").write_bytes(exif_rotated_jpeg(6))
    Image.new("L", (8, 8), 128).save(folder / "train" / "b_grey.png")
    Image.new("L", (8, 8), 0).save(folder / "test" / "c.png")
    manifest = prepare(cfg_for(folder, tmp_path / "out", resolution=16, fit="pad", background=[128] * 3))
    assert manifest["held_out"]["from"] == "the source's 'test' split" and manifest["classes"] == ["all"]
    assert manifest["channels"] == 1 and manifest["splits"]["train"]["count"] == 2
    rotated = load_split(tmp_path / "out", "train").images[0, 0]  # sorted order: a_rotated.jpg first
    assert rotated[1:7, 6:10].max() < 40 and rotated[9:15, 6:10].min() > 215  # black on top, as displayed


@pytest.mark.parametrize("num_proc", [1, 2])
def test_strict_fails_on_the_first_unreadable_file_by_name(tmp_path, num_proc):
    folder = make_messy_folder(tmp_path / "photos")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    with pytest.raises(UnreadableImageError, match=r"cannot read dogs/(text|truncated)\.jpg in .*photos"):
        prepare(cfg_for(folder, out, strict=True, num_proc=num_proc))
    assert (out / "keep.txt").read_text() == "earlier output"
    assert not (tmp_path / "out.tmp").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "only_text", "only_unreadable"])
def test_empty_or_missing_source_names_the_path(tmp_path, case):
    folder = tmp_path / case
    if case != "missing":
        folder.mkdir()
    if case == "only_text":
        (folder / "notes.txt").write_text("no images here")
    if case == "only_unreadable":
        (folder / "a.png").write_bytes(b"")
        (folder / "b.jpg").write_text("nope")
    with pytest.raises(DataSourceError, match=str(folder)):
        prepare(cfg_for(folder, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_same_folder_same_bytes_whatever_num_proc_and_a_new_file_changes_the_hash(tmp_path):
    folder = make_messy_folder(tmp_path / "photos")
    a = prepare(cfg_for(folder, tmp_path / "a", num_proc=1))
    b = prepare(cfg_for(folder, tmp_path / "b", num_proc=2))
    assert a == b
    for name in ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    Image.new("RGB", (9, 9), (1, 2, 3)).save(folder / "cats" / "new.png")
    c = prepare(cfg_for(folder, tmp_path / "c"))
    assert c["content_hash"] != a["content_hash"]
    assert sum(c["splits"][s]["count"] for s in ("train", "test")) == 9


def test_grey_folder_gives_one_channel_and_configured_channels_win(tmp_path):
    folder = tmp_path / "grey"
    folder.mkdir()
    Image.new("L", (8, 8), 10).save(folder / "a.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(folder / "b.png")
    Image.new("LA", (8, 8), (200, 255)).save(folder / "c.png")
    assert prepare(cfg_for(folder, tmp_path / "o1"))["shape"] == [1, 8, 8]
    manifest = prepare(cfg_for(folder, tmp_path / "o3", channels=3))
    assert manifest["shape"] == [3, 8, 8] and manifest["classes"] == ["all"]
    assert manifest["splits"]["train"]["class_counts"] == [manifest["splits"]["train"]["count"]]


def test_holdout_is_seeded_and_stable_as_the_folder_grows():
    keys = [f"img{i:03d}.png" for i in range(200)]
    train, test = holdout_split(keys, 0.1, seed=0)
    assert len(test) == 20 and len(train) == 180 and not set(train) & set(test)
    assert np.array_equal(holdout_split(keys, 0.1, seed=0)[1], test)
    assert not np.array_equal(holdout_split(keys, 0.1, seed=1)[1], test)
    grown = keys + ["img999.png"]
    _, test_grown = holdout_split(grown, 0.1, seed=0)
    moved = {keys[i] for i in test} ^ {grown[i] for i in test_grown}
    assert len(moved) <= 2  # one image in, at most one out
    assert len(holdout_split(keys[:3], 0.1, seed=0)[1]) == 1  # never an empty held-out split


def test_labels_from_a_metadata_column(tmp_path):
    """datasets' imagefolder reads metadata.csv beside the images; label_column picks one of its columns."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 50 * i).save(folder / f"{i}.png")
    (folder / "metadata.csv").write_text("file_name,kind\n0.png,sun\n1.png,moon\n2.png,sun\n3.png,star\n")
    manifest = prepare(cfg_for(folder, tmp_path / "out", label_column="kind"))
    assert manifest["classes"] == ["moon", "star", "sun"] and manifest["source"]["labels"] == "kind"
    labels = np.concatenate([load_split(tmp_path / "out", s).labels for s in ("train", "test")])
    assert sorted(labels.tolist()) == [0, 1, 2, 2]
