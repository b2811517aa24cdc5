"""Reader and writer for the IDX format used by MNIST and Fashion-MNIST.

Layout (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a
type code, the number of dimensions, then each dimension as a big-endian
uint32, then the data in C order. Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

# type code -> big-endian numpy dtype
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {v.newbyteorder("="): k for k, v in _DTYPES.items()}


class IdxError(ValueError):
    """An IDX file that is truncated or not IDX at all."""


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (possibly gzipped) IDX file into a native-endian array."""
    path = Path(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise IdxError(f"{path}: cannot read ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise IdxError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IdxError(f"{path}: expected {expected} data bytes for shape {shape}, found {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as IDX; gzip when ``compress`` or when the name ends in .gz."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype not in _CODES:
        raise IdxError(f"dtype {array.dtype} has no IDX type code")
    header = bytes([0, 0, _CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
