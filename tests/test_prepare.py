import hashlib
import json

import numpy as np
import pytest

from ddpm.config import ConfigError, PrepareConfig
from ddpm.npy_writer import NpyRowWriter, update_hash
from ddpm.prepare import DataSourceError, content_hash, load_split, prepare, resize_square
from tests.conftest import make_fashion_like

# The hash of the generated Fashion-MNIST-like set at resolution 32, as the first version of
# the prepare stage wrote it: new sources and options must leave the default path byte-identical.
GOLDEN_FASHION_HASH_32 = "d7988f03c500e427de73d0d330c07595fa7cd804b37deb2531fb1301263a0efb"


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
    assert manifest["content_hash"] == GOLDEN_FASHION_HASH_32
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


@pytest.mark.parametrize("rows,max_rows", [(7, 10), (0, 5), (3, 3), (9, 100_000)])
def test_row_writer_matches_np_save_byte_for_byte(tmp_path, rows, max_rows):
    a = np.random.default_rng(rows).integers(0, 255, (rows, 3, 4, 4), dtype=np.uint8)
    writer = NpyRowWriter(tmp_path / "w.npy", max_rows, (3, 4, 4))
    for row in a:
        writer.append(row)
    writer.close()
    np.save(tmp_path / "s.npy", a)
    assert (tmp_path / "w.npy").read_bytes() == (tmp_path / "s.npy").read_bytes()


def test_chunked_hash_equals_one_shot_hash(tmp_path):
    a = np.random.default_rng(0).integers(0, 255, (50, 1, 5, 5), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    h = hashlib.sha256()
    update_hash(h, "x", np.load(tmp_path / "a.npy", mmap_mode="r"), chunk_bytes=64)
    one = hashlib.sha256(f"x:{a.dtype.str}:{a.shape};".encode() + a.tobytes())
    assert h.hexdigest() == one.hexdigest()
    assert content_hash({"x": a}) == one.hexdigest()


@pytest.mark.parametrize("kw,message", [
    ({"fit": "stretch"}, r"prepare\.fit='stretch' is not valid; choose one of crop, pad"),
    ({"background": (0, 0)}, r"prepare\.background=\[0, 0\] must be three ints"),
    ({"background": (0, 0, 256)}, r"prepare\.background=\[0, 0, 256\]"),
    ({"num_proc": -1}, r"prepare\.num_proc=-1 must be >= 0"),
    ({"split": ""}, r"prepare\.split must name a split"),
    ({"source": "zip"}, r"prepare\.source='zip' is not valid; choose one of fashion_mnist, imagefolder, hub"),
])
def test_prepare_config_errors_name_the_key(kw, message):
    with pytest.raises(ConfigError, match=message):
        PrepareConfig(**kw)
