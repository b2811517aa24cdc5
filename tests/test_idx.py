import gzip

import numpy as np
import pytest

from ddpm.idx import IdxError, read_idx, write_idx


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_roundtrip_uint8(tmp_path, name):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, a)
    b = read_idx(tmp_path / name)
    assert b.dtype == np.uint8 and b.shape == (2, 3, 4) and np.array_equal(a, b)


def test_known_bytes_of_a_labels_file(tmp_path):
    """The header layout from the MNIST page: magic 0x00000801, count, then one byte per label."""
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 9]))
    assert read_idx(path).tolist() == [7, 2, 9]
    write_idx(tmp_path / "again", np.array([7, 2, 9], dtype=np.uint8))
    assert (tmp_path / "again").read_bytes() == path.read_bytes()


def test_multibyte_types_are_big_endian(tmp_path):
    a = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    write_idx(tmp_path / "x", a)
    assert (tmp_path / "x").read_bytes()[12:16] == (1).to_bytes(4, "big")  # after the 4 + 4*2 header bytes
    assert np.array_equal(read_idx(tmp_path / "x"), a)


def test_truncated_file_is_an_error(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 5, 5), dtype=np.uint8))
    data = (tmp_path / "x").read_bytes()
    (tmp_path / "x").write_bytes(data[:-7])
    with pytest.raises(IdxError, match="expected 100 data bytes"):
        read_idx(tmp_path / "x")


def test_not_idx(tmp_path):
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"PK\x03\x04 not idx"))
    with pytest.raises(IdxError, match="bad magic"):
        read_idx(tmp_path / "x.gz")
