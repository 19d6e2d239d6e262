"""Token moves between a packed sequence batch and its block-aligned padded image.

A packed batch holds ``T`` tokens of several sequences back to back; its padded image holds the
same tokens at positions ``pos[t]`` of a longer time axis ``Lp`` (every sequence starting at a
block boundary; see swr_array/packed.py). Both arrays are seen as ``(R, n, C)`` C-contiguous
element grids (``n`` = T or Lp along time): layout "BLHD" is R=1 with the channels C innermost,
"BHDL" is R rows of channels with C=1.

- ``scatter_tokens(src, dst, pos, R, T, Lp, C)``: ``dst[r, pos[t], c] = src[r, t, c]``
- ``gather_tokens(src, dst, pos, R, T, Lp, C, fill)``: ``dst[r, t, c] = src[r, pos[t], c]``

A negative ``pos[t]`` marks a token with no place in the image (the front's device-side check of
``cu_seqlens`` failed): the scatter skips it and the gather writes ``fill[0]`` (a NaN).

One thread per element of the packed grid; ``pos`` is int64. The copies are bit moves of one
storage dtype (bfloat16 as its uint16 bits), so one kernel serves every dtype of that width;
the source and destination share a dtype. Elements of ``dst`` that no token maps to are left as
they are (the caller zeroes the padded image first). ``pos`` must be strictly increasing and
below ``Lp`` (the front builds it so); nothing here checks it.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from ._dtypes import SIMULATOR
from ._launch import FlatArray, launch

THREADS = 256

_kernels: dict = {}


def _kernel(gather: bool):
    if gather in _kernels:
        return _kernels[gather]

    @cuda.jit
    def move_tokens(src, dst, pos, R, T, Lp, C, fill):
        i = numba.int64(cuda.blockIdx.x) * THREADS + numba.int64(cuda.threadIdx.x)
        if i >= R * T * C:
            return
        c = i % C
        rt = i // C
        t = rt % T
        r = rt // T
        k = pos[numba.uint64(t)]
        j = (r * Lp + k) * C + c
        if gather:
            if k < 0:
                dst[numba.uint64(i)] = fill[0]
            else:
                dst[numba.uint64(i)] = src[numba.uint64(j)]
        elif k >= 0:
            dst[numba.uint64(j)] = src[numba.uint64(i)]

    _kernels[gather] = move_tokens
    return move_tokens


def gather_kernel():
    """The ``@cuda.jit`` dispatcher of :func:`gather_tokens` (for PTX tests)."""
    return _kernel(True)


def scatter_kernel():
    """The ``@cuda.jit`` dispatcher of :func:`scatter_tokens` (for PTX tests)."""
    return _kernel(False)


def _flat(x):
    if SIMULATOR or isinstance(x, np.ndarray):
        y = x.reshape(-1)
        return y.view(np.uint16) if y.dtype.name == "bfloat16" else y
    return FlatArray.of(x)


def _move(gather, src, dst, pos, R, T, Lp, C, fill, stream):
    n = R * T * C
    if n == 0:
        return
    grid = (n + THREADS - 1) // THREADS
    args = (_flat(src), _flat(dst), _flat(pos), np.int64(R), np.int64(T), np.int64(Lp),
            np.int64(C), _flat(src if fill is None else fill))
    launch(_kernel(gather), grid, THREADS, args, stream)


def scatter_tokens(src, dst, pos, R, T, Lp, C, *, stream=None):
    """``dst[r, pos[t], c] = src[r, t, c]`` (C-contiguous arrays of one dtype; see the module)."""
    _move(False, src, dst, pos, R, T, Lp, C, None, stream)


def gather_tokens(src, dst, pos, R, T, Lp, C, fill, *, stream=None):
    """``dst[r, t, c] = src[r, pos[t], c]``, ``fill[0]`` where ``pos[t] < 0`` (C-contiguous
    arrays of one dtype; see the module)."""
    _move(True, src, dst, pos, R, T, Lp, C, fill, stream)
