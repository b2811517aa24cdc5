import json

import numpy as np
import pytest

from ddpm.config import PrepareConfig
from ddpm.prepare import DataSourceError, load_split, prepare, resize_square
from tests.conftest import make_fashion_like


def test_prepare_fashion_mnist_layout(fashion_dir, tmp_path):
    out = tmp_path / "prepared"
    manifest = prepare(PrepareConfig(source_path=str(fashion_dir), out_dir=str(out), resolution=32))
    train, test = load_split(out, "train"), load_split(out, "test")
    assert train.images.shape == (240, 1, 32, 32) and train.images.dtype == np.uint8
    assert test.images.shape == (80, 1, 32, 32) and test.labels.dtype == np.int64
    assert manifest["splits"]["train"]["count"] == 240
    assert manifest["splits"]["train"]["class_counts"] == [24] * 10
    assert manifest["shape"] == [1, 32, 32] and manifest["upscaled"] == 320
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # labels survive, in order
    _, labels = make_fashion_like(240, seed=0)
    assert np.array_equal(train.labels, labels)


def test_native_resolution_is_lossless(fashion_dir, tmp_path):
    prepare(PrepareConfig(source_path=str(fashion_dir), out_dir=str(tmp_path / "p"), resolution=28))
    images, _ = make_fashion_like(240, seed=0)
    assert np.array_equal(load_split(tmp_path / "p", "train").images[:, 0], images)


def test_prepare_is_deterministic(fashion_dir, tmp_path):
    cfg = dict(source_path=str(fashion_dir), resolution=16)
    a = prepare(PrepareConfig(out_dir=str(tmp_path / "a"), **cfg))
    b = prepare(PrepareConfig(out_dir=str(tmp_path / "b"), **cfg))
    assert a["content_hash"] == b["content_hash"]
    for name in ("train_images.npy", "test_labels.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = prepare(PrepareConfig(out_dir=str(tmp_path / "c"), max_images=100, **cfg))
    assert c["content_hash"] != a["content_hash"] and c["splits"]["train"]["count"] == 100


def test_missing_files_say_how_to_get_them(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    with pytest.raises(DataSourceError, match=r"apt-get install dataset-fashion-mnist.*prepare\.source_path"):
        prepare(PrepareConfig(source_path=str(tmp_path / "empty"), out_dir=str(out)))
    assert (out / "keep.txt").read_text() == "earlier output"  # nothing lost


def test_resize_square_centre_crops():
    img = np.zeros((20, 40), dtype=np.uint8)
    img[:, 10:30] = 255  # the centre 20x20 square is white
    out = resize_square(img, 10)
    # an off-centre crop would bring in black columns (0); bicubic only softens the edges a little
    assert out.shape == (10, 10) and out.min() >= 200 and out[:, 1:-1].min() == 255
