"""Byte-scanning helpers for file formats (the GGUF reader's string arrays).

``gather_strings(buf, pos, n, max_len)``: a GGUF string array is n x (u64 little-endian length, bytes). Returns
(blob uint8, offsets int64 (n+1,), end) with string i = blob[offsets[i]:offsets[i+1]] and `end` the position after
the array, or end = -1 when the array runs past the buffer or a length exceeds max_len (the caller then reports
the error with its slow path). The reference is the plain Python loop in llamba.gguf (`_Reader._string_array`),
which the tests compare it with.
"""
from __future__ import annotations

import numpy as np
from llamba.kernels import _jit  # noqa: F401  (Numba set-up: before the first kernel)
from numba import njit


@njit(cache=True, nogil=True)
def gather_strings(buf, pos, n, max_len):
    size = buf.shape[0]
    offsets = np.zeros(n + 1, np.int64)
    # pass 1: lengths and validity
    p = pos
    total = 0
    for i in range(n):
        if p + 8 > size:
            return np.empty(0, np.uint8), offsets, -1
        ln = np.uint64(0)
        for b in range(8):
            ln |= np.uint64(buf[p + b]) << np.uint64(8 * b)
        p += 8
        if ln > np.uint64(max_len) or ln > np.uint64(size - p):
            return np.empty(0, np.uint8), offsets, -1
        p += np.int64(ln)
        total += np.int64(ln)
        offsets[i + 1] = total
    # pass 2: copy the bytes
    blob = np.empty(total, np.uint8)
    p = pos
    for i in range(n):
        ln = offsets[i + 1] - offsets[i]
        p += 8
        o = offsets[i]
        for j in range(ln):
            blob[o + j] = buf[p + j]
        p += ln
    return blob, offsets, p
