"""The `.npy` header `np.save` writes: readers of many small or large arrays that Blues wrote
compare a file's first bytes with it instead of parsing the header (a start-up reads
thousands); any other header is read the slow way, with `np.load`, and checked."""

from __future__ import annotations

import io

import numpy as np


def saved_header(dtype, shape: tuple) -> bytes:
    """The exact header `np.save` writes for a C-ordered array of `dtype` and `shape`."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return header.getvalue()
