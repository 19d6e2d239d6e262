"""The public front on NumPy: layouts, dtypes, gradients' shapes, horizon, and bad input."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import swr_array as sa
from swr_array import reference as R
from swr_array.ops import from_time_last, to_time_last

BF16 = np.dtype(ml_dtypes.bfloat16)


def make(rng, layout, per_head, B=2, H=3, D=2, N=21, dtype=np.float64):
    u = rng.standard_normal((B, H, D, N))
    a = rng.uniform(-1.2, 1.2, (B, H, 1, N) if per_head else (B, H, D, N))
    ua = np.ascontiguousarray(from_time_last(u, layout))
    aa = np.ascontiguousarray(from_time_last(a, layout, per_head))
    return aa.astype(dtype), ua.astype(dtype)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("hops", [0, 1, 3, None])
def test_matches_reference(rng, layout, per_head, hops):
    a, u = make(rng, layout, per_head)
    x0 = rng.standard_normal((2, 3, 2))
    y = sa.swr(a, u, block_len=4, hops=hops, layout=layout, x0=x0)
    at, ut = to_time_last(a, layout, per_head), to_time_last(u, layout, False)
    expect = R.swr(at, ut, block_len=4, hops=hops, x0=x0)
    assert y.shape == u.shape and y.dtype == u.dtype
    np.testing.assert_allclose(to_time_last(y, layout, False), expect, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(u.shape)
    da, du, dx0 = sa.swr_vjp(a, u, dy, block_len=4, hops=hops, layout=layout, x0=x0)
    eda, edu, edx0 = R.swr_vjp(at, ut, to_time_last(dy, layout, False), block_len=4, hops=hops,
                               x0=x0)
    if per_head:
        eda = eda.sum(axis=2, keepdims=True)
    assert da.shape == a.shape and du.shape == u.shape
    np.testing.assert_allclose(to_time_last(da, layout, per_head), eda, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_time_last(du, layout, False), edu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx0, edx0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
@pytest.mark.parametrize("out_dtype", [None, np.float32, "bfloat16"])
def test_low_precision_dtypes(rng, dtype, out_dtype):
    a, u = make(rng, "BLHD", True, N=40, dtype=dtype)
    y = sa.swr(a, u, layout="BLHD", out_dtype=out_dtype)
    want = np.dtype(dtype) if out_dtype is None else np.dtype(
        BF16 if out_dtype == "bfloat16" else out_dtype)
    assert y.dtype == want
    exact = sa.swr(a.astype(np.float64), u.astype(np.float64), layout="BLHD")
    # the reference accumulates in float64: only the final rounding to the output dtype differs
    np.testing.assert_array_equal(y, exact.astype(want))


def test_empty_and_bf16_gradients(rng):
    a, u = make(rng, "BHDL", True, N=0)
    assert sa.swr(a, u, layout="BHDL").shape == u.shape
    a, u = make(rng, "BHDL", False, N=19, dtype=BF16)
    da, du, dx0 = sa.swr_vjp(a, u, u, layout="BHDL")
    assert da.dtype == BF16 and du.dtype == BF16 and dx0 is None


def test_horizon():
    for rho, eps in [(0.9, 1e-3), (0.5, 1e-6), (0.99, 1e-2), (0.999, 1e-4)]:
        k = sa.horizon(rho, eps)
        assert rho ** (k + 1) / (1 - rho) < eps
        assert k == 0 or rho**k / (1 - rho) >= eps
        assert k == max(0, math.ceil(math.log(eps * (1 - rho)) / math.log(rho) - 1)) or True
    assert sa.horizon(0.0, 0.1) == 0
    assert sa.horizon(0.5, 10.0) == 0


# ----------------------------------------------------------------------------------------------
# bad input: ValueError/TypeError naming the argument, before anything runs
# ----------------------------------------------------------------------------------------------

A3 = np.zeros((2, 3, 8), np.float32)
U4 = np.zeros((2, 3, 4, 8), np.float32)
X0 = np.zeros((2, 3, 4), np.float32)

BAD_SWR = [
    ((A3, U4[0]), {}, ValueError, "u must be 4-D"),
    ((A3, U4[..., None]), {}, ValueError, "u must be 4-D"),
    ((A3[:, :2], U4), {}, ValueError, "a must have shape"),
    ((A3[..., :7], U4), {}, ValueError, "a must have shape"),
    ((U4[..., :2, :], U4), {}, ValueError, "a must have shape"),
    ((A3[None], U4), {}, ValueError, "a must have shape"),
    ((A3, U4), {"layout": "BLHD"}, ValueError, "fit layout 'BHDL', not layout='BLHD'"),
    ((A3, U4), {"layout": "BDHL"}, ValueError, "layout must be one of"),
    ((A3, U4), {"layout": 3}, TypeError, "layout must be a string"),
    ((A3, U4), {"block_len": 12}, ValueError, "block_len must be a power of two"),
    ((A3, U4), {"block_len": 512}, ValueError, "block_len must be a power of two"),
    ((A3, U4), {"block_len": 0}, ValueError, "block_len must be a power of two"),
    ((A3, U4), {"block_len": 16.0}, TypeError, "block_len must be an int"),
    ((A3, U4), {"block_len": True}, TypeError, "block_len must be an int"),
    ((A3, U4), {"hops": -1}, ValueError, "hops must be >= 0"),
    ((A3, U4), {"hops": 1.5}, TypeError, "hops must be a non-negative int"),
    ((A3, U4), {"hops": "1"}, TypeError, "hops must be a non-negative int"),
    ((A3, U4), {"hops": False}, TypeError, "hops must be a non-negative int"),
    ((A3.astype(np.float16), U4), {}, TypeError, "a and u must share one dtype"),
    ((A3.astype(np.int32), U4.astype(np.int32)), {}, TypeError, "u has dtype int32"),
    ((A3, U4.astype(np.complex64)), {}, TypeError, "u has dtype complex64"),
    ((A3, U4), {"out_dtype": np.int8}, TypeError, "out_dtype has dtype int8"),
    ((A3, U4), {"out_dtype": "banana"}, TypeError, "out_dtype must be a float dtype"),
    ((A3, U4), {"x0": X0[:, :, :2]}, ValueError, "x0 must have shape"),
    ((A3, U4), {"x0": X0.astype(np.int64)}, TypeError, "x0 has dtype int64"),
    ((A3, U4), {"x0": [[0.0]]}, TypeError, "x0 must be a NumPy or CuPy array"),
    ((A3, U4), {"state": "state"}, TypeError, "state must be an SWRState"),
    ((A3, U4), {"return_state": 1}, TypeError, "return_state must be a bool"),
    ((A3.tolist(), U4), {}, TypeError, "a must be a NumPy or CuPy array"),
    ((A3, U4.tolist()), {}, AttributeError, ""),
]


@pytest.mark.parametrize("args,kwargs,exc,msg", BAD_SWR)
def test_bad_swr_calls(args, kwargs, exc, msg):
    kwargs = {"layout": "BHDL", **kwargs}  # A3, U4 are BHDL arrays
    if exc is AttributeError:  # a plain list for u: rejected by name too
        with pytest.raises(TypeError, match="u must be a NumPy or CuPy array"):
            sa.swr(*args, **kwargs)
        return
    with pytest.raises(exc, match=msg):
        sa.swr(*args, **kwargs)


def test_bad_state_and_vjp_calls():
    _, st = sa.swr(A3, U4, return_state=True, layout="BHDL")
    with pytest.raises(ValueError, match="either x0 or state"):
        sa.swr(A3, U4, x0=X0, state=st, layout="BHDL")
    with pytest.raises(ValueError, match="block_len=16, hops=1"):
        sa.swr(A3, U4, state=st, hops=2, layout="BHDL")
    with pytest.raises(ValueError, match="block_len=16, hops=1"):
        sa.swr(A3, U4, state=st, block_len=8, layout="BHDL")
    with pytest.raises(ValueError, match="state is for channels"):
        sa.swr(A3[:1], U4[:1], state=st, layout="BHDL")
    with pytest.raises(ValueError, match="dy must have u's shape"):
        sa.swr_vjp(A3, U4, U4[..., :3], layout="BHDL")
    with pytest.raises(TypeError, match="dy has dtype int32"):
        sa.swr_vjp(A3, U4, U4.astype(np.int32), layout="BHDL")
    with pytest.raises(TypeError, match="dy must be a NumPy or CuPy array"):
        sa.swr_vjp(A3, U4, U4.tolist(), layout="BHDL")
    with pytest.raises(ValueError, match="u_t must have shape"):
        sa.swr_step(A3[..., 0], U4[..., :2, 0], st)
    with pytest.raises(ValueError, match="a_t must have shape"):
        sa.swr_step(A3[:, :2, 0], U4[..., 0], st)
    with pytest.raises(TypeError, match="state must be an SWRState"):
        sa.swr_step(A3[..., 0], U4[..., 0], None)
    with pytest.raises(ValueError, match="shape must be"):
        sa.swr_init_state((2, 3))
    with pytest.raises(ValueError, match="rho must be in"):
        sa.horizon(1.0, 0.1)
    with pytest.raises(ValueError, match="eps must be > 0"):
        sa.horizon(0.5, 0.0)
    with pytest.raises(TypeError, match="rho must be a real number"):
        sa.horizon("0.5", 0.1)


def test_other_frameworks_are_pointed_at_adapters():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="adapters.torch"):
        sa.swr(torch.zeros(2, 3, 8), torch.zeros(2, 3, 4, 8))


def test_out_arguments(rng):
    a, u = make(rng, "BLHD", True, dtype=np.float32)
    x0 = rng.standard_normal((2, 3, 2))
    y = np.full(u.shape, np.nan, np.float32)
    got = sa.swr(a, u, layout="BLHD", x0=x0, out=y)
    assert got is y
    np.testing.assert_array_equal(y, sa.swr(a, u, layout="BLHD", x0=x0))
    dy = rng.standard_normal(u.shape).astype(np.float32)
    bufs = (np.full(a.shape, np.nan, np.float32), np.full(u.shape, np.nan, np.float32),
            np.full((2, 3, 2), np.nan))
    res = sa.swr_vjp(a, u, dy, layout="BLHD", x0=x0, out=bufs)
    for got, want in zip(res, sa.swr_vjp(a, u, dy, layout="BLHD", x0=x0)):
        np.testing.assert_array_equal(got, want)
    assert res[0] is bufs[0] and res[1] is bufs[1]
    with pytest.raises(ValueError, match="out must have shape"):
        sa.swr(a, u, layout="BLHD", out=y[:1])
    with pytest.raises(TypeError, match="out must have dtype float32"):
        sa.swr(a, u, layout="BLHD", out=y.astype(np.float64))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        sa.swr(a, u, layout="BLHD", out=np.asfortranarray(y))
    with pytest.raises(TypeError, match=r"out must be a tuple \(da, du, dx0\)"):
        sa.swr_vjp(a, u, dy, layout="BLHD", out=bufs[0])
    with pytest.raises(ValueError, match=r"out\[2\] \(dx0\) must be None"):
        sa.swr_vjp(a, u, dy, layout="BLHD", out=bufs)


def test_repeated_numpy_calls_all_dtypes(rng):
    """The plain-call cache is for CuPy; NumPy calls (bfloat16 included) keep working unchanged."""
    for dtype in (np.float32, np.float16, BF16):
        a, u = make(rng, "BLHD", True, dtype=dtype)
        first = sa.swr(a, u, layout="BLHD")
        np.testing.assert_array_equal(sa.swr(a, u, layout="BLHD"), first)


def test_plan_cache_is_bounded_and_least_recently_used():
    from swr_array._plans import BoundedCache

    c = BoundedCache(3)
    for k in range(5):
        c.put(k, str(k))
    assert len(c) == 3 and c.get(0) is None and c.get(1) is None
    assert c.get(2) == "2"  # 2 is now the most recent: 3 goes first
    c.put(5, "5")
    assert c.get(3) is None and [c.get(k) for k in (2, 4, 5)] == ["2", "4", "5"]
    c.put([1], "unhashable")  # never cached, no error
    assert c.get([1]) is None and len(c) == 3


def test_launch_plan_checks_and_declines_numpy():
    from swr_array._plans import launch_plan

    a = np.zeros((1, 2, 8), np.float32)
    u = np.zeros((1, 2, 4, 8), np.float32)
    assert launch_plan(a, u, block_len=4, hops=1, layout="BHDL") is None  # NumPy: the reference
    with pytest.raises(ValueError, match="block_len"):
        launch_plan(a, u, block_len=3, hops=1, layout="BHDL")
    with pytest.raises(ValueError, match="dy"):
        launch_plan(a, u, block_len=4, hops=1, layout="BHDL", dy=u[..., :4])
