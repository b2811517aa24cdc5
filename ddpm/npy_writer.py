"""Write a large ``.npy`` array one row at a time, without holding it in memory.

The file is created with ``np.lib.format.open_memmap`` for the most rows that
can come, filled in order, then shrunk to the rows actually written: the
header is rewritten in place (numpy pads it so the first dimension can grow
to 21 digits, so its length never changes) and the file truncated. The
result is byte-identical to ``np.save`` of the same rows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


class NpyRowWriter:
    """Append rows of ``row_shape`` and ``dtype`` to a new ``.npy`` file at ``path``."""

    def __init__(self, path: str | Path, max_rows: int, row_shape: tuple[int, ...], dtype=np.uint8):
        self.path, self.row_shape, self.dtype = Path(path), tuple(row_shape), np.dtype(dtype)
        self.rows = 0
        # open_memmap refuses a zero-length array; one spare row is cut off again in close().
        self._mm = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype,
                                             shape=(max(1, max_rows), *self.row_shape))
        self._header_len = self._mm.offset

    def append(self, row: np.ndarray) -> None:
        self._mm[self.rows] = row
        self.rows += 1

    def close(self) -> Path:
        """Flush, then shrink the file to the rows written."""
        self._mm.flush()
        del self._mm
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, *self.row_shape)}
        with open(self.path, "r+b") as f:
            np.lib.format.write_array_header_1_0(f, header)
            if f.tell() != self._header_len:  # cannot happen with numpy's growth padding; never corrupt silently
                raise RuntimeError(f"{self.path}: .npy header length changed from {self._header_len} to {f.tell()}")
            f.truncate(self._header_len + self.rows * int(np.prod(self.row_shape)) * self.dtype.itemsize)
        return self.path


def update_hash(h: "hashlib._Hash", name: str, array: np.ndarray, chunk_bytes: int = 64 << 20) -> None:
    """Feed ``name``, dtype, shape and the bytes of ``array`` to ``h``, a chunk of rows at a time,
    so a memory-mapped array is hashed without reading it all into memory."""
    h.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
    if array.ndim == 0 or len(array) == 0:
        h.update(np.ascontiguousarray(array).tobytes())
        return
    row_bytes = max(1, array[0].nbytes)
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, len(array), step):
        h.update(np.ascontiguousarray(array[start : start + step]).tobytes())
