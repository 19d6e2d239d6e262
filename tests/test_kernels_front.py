"""The CuPy backend's orchestration (_cuda.py: state, tails, block-level algebra, general hops)
driven with NumPy arrays through the kernels under the CUDA simulator (or CuPy on a GPU)."""

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import gpu_available

import swr_array as sa
from swr_array import _checks
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
    return x.get() if hasattr(x, "get") else x


def backend_swr(a, u, **kw):
    """swr through the kernel backend (its checks as in the public front)."""
    from swr_array import _cuda

    p = _checks.check_swr(a, u, block_len=kw.pop("block_len"), hops=kw.pop("hops"),
                          layout=kw.pop("layout"), out_dtype=kw.pop("out_dtype", None))
    return _cuda.swr_forward(a, u, p, **kw)


def backend_vjp(a, u, dy, *, x0=None, **kw):
    from swr_array import _cuda

    p = _checks.check_swr(a, u, **kw)
    return _cuda.swr_backward(a, u, dy, p, x0=x0)


def case(rng, layout, per_head, B=1, H=2, D=3, N=21, dtype=np.float32):
    u = rng.standard_normal((B, H, D, N))
    a = rng.uniform(-1.1, 1.1, (B, H, 1, N) if per_head else (B, H, D, N))
    x0 = rng.standard_normal((B, H, D)).astype(np.float32)
    ua = np.ascontiguousarray(from_time_last(u, layout)).astype(dtype)
    aa = np.ascontiguousarray(from_time_last(a, layout, per_head)).astype(dtype)
    return aa, ua, x0


def tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if np.dtype(dtype) != np.float32 else dict(rtol=1e-4,
                                                                                  atol=1e-4)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("hops", [0, 1, 2, None])
def test_forward_and_state(rng, layout, hops):
    X = xp()
    a, u, x0 = case(rng, layout, per_head=hops != 2)
    kw = dict(block_len=4, hops=hops, layout=layout)
    expect = sa.swr(a.astype(np.float64), u.astype(np.float64), x0=x0.astype(np.float64), **kw)
    aX, uX, x0X = X.asarray(a), X.asarray(u), X.asarray(x0)
    y = backend_swr(aX, uX, x0=x0X, state=None, return_state=False, **dict(kw))
    np.testing.assert_allclose(to_np(y), expect, **tol(np.float32))
    cut = 6 if hops != 0 else 9
    sl = (lambda x, s: x[..., s]) if layout == "BHDL" else (lambda x, s: x[:, s])
    y1, st = backend_swr(sl(aX, slice(0, cut)), sl(uX, slice(0, cut)), x0=x0X, state=None,
                         return_state=True, **dict(kw))
    y2, st = backend_swr(sl(aX, slice(cut, None)), sl(uX, slice(cut, None)), x0=None, state=st,
                         return_state=True, **dict(kw))
    joined = np.concatenate([to_np(y1), to_np(y2)], axis=-1 if layout == "BHDL" else 1)
    np.testing.assert_allclose(joined, expect, **tol(np.float32))
    _, ref_state = sa.swr(a.astype(np.float64), u.astype(np.float64), x0=x0.astype(np.float64),
                          return_state=True, **kw)
    np.testing.assert_array_equal(to_np(st.position), ref_state.position)
    np.testing.assert_allclose(to_np(st.w), ref_state.w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_np(st.carry_v), ref_state.carry_v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("hops", [2, 3])
@pytest.mark.parametrize("cut", [6, 13, 16, 17])
def test_halo_forward_returns_the_state(rng, layout, hops, cut):
    """hops 2..8 with return_state run the one-pass halo walk and take the state from the last
    hops + 1 blocks of the inputs: the state equals the reference's, field by field, and a call
    continued from it gives the rest of the sequence (cuts before and after hops whole blocks,
    on and off a block boundary)."""
    X = xp()
    a, u, x0 = case(rng, layout, per_head=hops == 2)
    kw = dict(block_len=4, hops=hops, layout=layout)
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    expect = sa.swr(f64(a), f64(u), x0=f64(x0), **kw)
    sl = (lambda x, s: x[..., s]) if layout == "BHDL" else (lambda x, s: x[:, s])
    aX, uX, x0X = X.asarray(a), X.asarray(u), X.asarray(x0)
    y1, st = backend_swr(sl(aX, slice(0, cut)), sl(uX, slice(0, cut)), x0=x0X, state=None,
                         return_state=True, **dict(kw))
    _, ref = sa.swr(f64(sl(a, slice(0, cut))), f64(sl(u, slice(0, cut))), x0=f64(x0),
                    return_state=True, **kw)
    np.testing.assert_allclose(to_np(y1), sl(expect, slice(0, cut)), **tol(np.float32))
    np.testing.assert_array_equal(to_np(st.position), ref.position)
    for name in ("w", "g", "carry_v", "carry_C"):
        np.testing.assert_allclose(to_np(getattr(st, name)), getattr(ref, name), rtol=1e-4,
                                   atol=1e-4, err_msg=name)
    y2 = backend_swr(sl(aX, slice(cut, None)), sl(uX, slice(cut, None)), x0=None, state=st,
                     return_state=False, **dict(kw))
    np.testing.assert_allclose(to_np(y2), sl(expect, slice(cut, None)), **tol(np.float32))


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("hops", [0, 1, 2, None])
@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_backward(rng, layout, hops, dtype):
    X = xp()
    a, u, x0 = case(rng, layout, per_head=True, dtype=dtype)
    dy = rng.standard_normal(u.shape).astype(dtype)
    kw = dict(block_len=4, hops=hops, layout=layout)
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    eda, edu, edx0 = sa.swr_vjp(f64(a), f64(u), f64(dy), x0=f64(x0), **kw)
    da, du, dx0 = backend_vjp(X.asarray(a), X.asarray(u), X.asarray(dy), x0=X.asarray(x0), **kw)
    assert da.dtype == a.dtype and du.dtype == u.dtype
    np.testing.assert_allclose(to_np(da).astype(np.float64), eda, **tol(dtype))
    np.testing.assert_allclose(to_np(du).astype(np.float64), edu, **tol(dtype))
    np.testing.assert_allclose(to_np(dx0), edx0, **tol(dtype))


def test_hops_beyond_blocks_is_exact(rng):
    X = xp()
    a, u, x0 = case(rng, "BHDL", per_head=False, N=13)
    kw = dict(block_len=4, layout="BHDL")
    exact = sa.swr(a.astype(np.float64), u.astype(np.float64), hops=None, **kw)
    y = backend_swr(X.asarray(a), X.asarray(u), hops=9, x0=None, state=None, return_state=False,
                    **dict(kw))
    np.testing.assert_allclose(to_np(y), exact, rtol=1e-4, atol=1e-4)
    assert to_time_last is not None
