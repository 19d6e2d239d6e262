"""Packed sequences through the GPU path (swr_array/packed.py with device=True: the packing
kernels and the dense kernels on the padded image) with NumPy arrays under the CUDA simulator,
or CuPy arrays on a GPU, against the per-sequence reference."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import gpu_available

from swr_array import _checks, packed, reference
from swr_array.ops import from_time_last, to_time_last

SIM = bool(numba.config.ENABLE_CUDASIM)
pytestmark = pytest.mark.skipif(not (SIM or gpu_available()),
                                reason="needs the CUDA simulator or a GPU")
BF16 = np.dtype(ml_dtypes.bfloat16)


def xp():
    if SIM:
        return np
    import cupy

    return cupy


def to_np(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def run(a, u, dy, cu, *, layout, block_len, hops, x0):
    X = xp()
    a_d, u_d, dy_d, cu_d = (X.asarray(v) for v in (a, u, dy, cu))
    x0_d = None if x0 is None else X.asarray(x0)
    p = _checks.check_swr(a_d, u_d, block_len=block_len, hops=hops, layout=layout)
    if SIM:
        p = dataclasses.replace(p, backend="cupy")
    y = packed.forward(a_d, u_d, p, cu_d, x0=x0_d, device=True)
    g = packed.backward(a_d, u_d, dy_d, p, cu_d, x0=x0_d, device=True)
    return to_np(y), [None if v is None else to_np(v) for v in g]


CASES = [  # layout, per_head, hops, x0, dtype, block_len
    ("BLHD", True, 1, False, np.float32, 8),
    ("BHDL", True, 1, True, np.float32, 8),
    ("BLHD", True, 0, True, np.float32, 8),
    ("BHDL", False, None, True, np.float32, 8),
    ("BLHD", True, 2, True, BF16, 8),
    ("BHDL", False, 1, False, BF16, 8),
]


@pytest.mark.parametrize("layout, per_head, hops, with_x0, dtype, bl", CASES)
def test_packed_device_path_matches_reference(rng, layout, per_head, hops, with_x0, dtype, bl):
    lens = [0, 1, bl - 3, bl, 0, 2 * bl + 1]
    S, H, D = len(lens), 2, 2
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1])
    us = (1, T, H, D) if layout == "BLHD" else (1, H, D, T)
    a_s = ((1, T, H) if layout == "BLHD" else (1, H, T)) if per_head else us
    a = rng.uniform(-1.05, 1.05, a_s).astype(np.float32).astype(dtype)
    u = rng.standard_normal(us).astype(np.float32).astype(dtype)
    dy = rng.standard_normal(us).astype(np.float32).astype(dtype)
    x0 = rng.standard_normal((S, H, D)).astype(np.float32) if with_x0 else None
    y, (da, du, dx0) = run(a, u, dy, cu, layout=layout, block_len=bl, hops=hops, x0=x0)
    at, ut = to_time_last(a, layout, per_head), to_time_last(u, layout, False)
    yr = from_time_last(reference.swr_packed(at, ut, cu, block_len=bl, hops=hops, x0=x0), layout)
    rda, rdu, rdx0 = reference.swr_vjp_packed(at, ut, to_time_last(dy, layout, False), cu,
                                              block_len=bl, hops=hops, x0=x0)
    if per_head:
        rda = rda.sum(axis=2, keepdims=True)
    rda, rdu = from_time_last(rda, layout, per_head), from_time_last(rdu, layout)
    tol = 1e-4 if dtype == np.float32 else 4e-2
    assert y.dtype == dtype and da.dtype == dtype and du.dtype == dtype
    for got, want in ((y, yr), (da, rda), (du, rdu)):
        got = got.astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * (1 + np.abs(want).max()))
    if with_x0:
        assert dx0.shape == (S, H, D) and dx0.dtype == np.float32
        np.testing.assert_allclose(dx0, rdx0, rtol=tol, atol=tol * (1 + np.abs(rdx0).max()))
    else:
        assert dx0 is None


def test_packing_kernels_move_and_poison(rng):
    """scatter then gather is the identity on the tokens; a negative position reads the fill."""
    from swr_array import numba_kernels

    X = xp()
    R, T, C, Lp = 3, 5, 2, 12
    src = X.asarray(rng.standard_normal((R, T, C)).astype(np.float32))
    pos = X.asarray(np.array([1, 2, 6, 7, 11], np.int64))
    img = X.zeros((R, Lp, C), np.float32)
    numba_kernels.packing.scatter_tokens(src, img, pos, R, T, Lp, C)
    want = np.zeros((R, Lp, C), np.float32)
    want[:, to_np(pos)] = to_np(src)
    np.testing.assert_array_equal(to_np(img), want)
    back = X.full((R, T, C), 7.0, np.float32)
    bad = X.asarray(np.array([1, -1, 6, 7, 11], np.int64))
    fill = X.full((1,), np.nan, np.float32)
    numba_kernels.packing.gather_tokens(img, back, bad, R, T, Lp, C, fill)
    got = to_np(back)
    assert np.isnan(got[:, 1]).all()
    np.testing.assert_array_equal(got[:, [0, 2, 3, 4]], to_np(src)[:, [0, 2, 3, 4]])


def test_invalid_device_cu_poisons_the_output(rng):
    """Values of a device cu are not read by the host: an invalid one gives NaN, not garbage."""
    cu = np.array([0, 5, 3, 9], np.int64)
    a = rng.uniform(-1, 1, (1, 9, 2)).astype(np.float32)
    u = rng.standard_normal((1, 9, 2, 3)).astype(np.float32)
    y, _ = run(a, u, u, cu, layout="BLHD", block_len=8, hops=1, x0=None)
    assert np.isnan(y).all()
