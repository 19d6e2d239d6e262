"""The public front on CuPy: the same checks as on NumPy, at real sizes, through the kernels."""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np
import pytest

import swr_array as sa
from swr_array.ops import to_time_last

pytestmark = pytest.mark.gpu
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


def draw(rng, layout, per_head, B, H, D, N, dtype):
    us = (B, H, D, N) if layout == "BHDL" else (B, N, H, D)
    if per_head:
        as_ = (B, H, N) if layout == "BHDL" else (B, N, H)
    else:
        as_ = us
    u = rng.standard_normal(us, dtype=np.float32).astype(dtype)
    a = rng.uniform(-1.05, 1.05, as_).astype(np.float32).astype(dtype)
    return a, u


def rel(got, want):
    got = np.asarray(got, np.float64)
    return float(np.linalg.norm(got - want) / (np.linalg.norm(want) + 1e-30))


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("hops", [0, 1, 2, 5, None])
@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_forward_backward_state(cp, rng, layout, hops, dtype):
    a, u = draw(rng, layout, True, 2, 4, 16, 1000, dtype)
    x0 = rng.standard_normal((2, 4, 16)).astype(np.float32)
    dy = rng.standard_normal(u.shape).astype(np.float32).astype(dtype)
    kw = dict(block_len=16, hops=hops, layout=layout)
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    want = sa.swr(f64(a), f64(u), x0=f64(x0), **kw)
    tol = 1e-5 if dtype == np.float32 else 1e-2
    ca, cu, cx0 = cp.asarray(a), cp.asarray(u), cp.asarray(x0)
    y = sa.swr(ca, cu, x0=cx0, **kw)
    assert isinstance(y, cp.ndarray) and y.dtype == dtype
    assert rel(y.get(), want) < tol
    # split at a point inside a block, continue from the state
    sl = (lambda x, s: x[..., s]) if layout == "BHDL" else (lambda x, s: x[:, s])
    y1, st = sa.swr(sl(ca, slice(0, 357)), sl(cu, slice(0, 357)), x0=cx0, return_state=True, **kw)
    y2 = sa.swr(sl(ca, slice(357, None)), sl(cu, slice(357, None)), state=st, **kw)
    joined = cp.concatenate([y1, y2], axis=-1 if layout == "BHDL" else 1)
    assert rel(joined.get(), want) < tol
    da, du, dx0 = sa.swr_vjp(ca, cu, cp.asarray(dy), x0=cx0, **kw)
    eda, edu, edx0 = sa.swr_vjp(f64(a), f64(u), f64(dy), x0=f64(x0), **kw)
    assert rel(da.get(), eda) < tol * 3 and rel(du.get(), edu) < tol and rel(dx0.get(), edx0) < tol


def test_issue_size_through_public_api(cp, rng):
    for layout in ("BLHD", "BHDL"):
        a, u = draw(rng, layout, True, 4, 128, 16, 8192, BF16)
        ca, cu = cp.asarray(a), cp.asarray(u)
        y = sa.swr(ca, cu, layout=layout)
        y2 = sa.swr(ca, cu, layout=layout)  # the cached fast path
        assert cp.array_equal(y, y2)
        at, ut = to_time_last(a, layout, True), to_time_last(u, layout, False)
        got = to_time_last(y.get(), layout, False)
        for h in (0, 77, 127):
            want = sa.reference.swr(at[1:2, h:h + 1].astype(np.float64),
                                    ut[1:2, h:h + 1].astype(np.float64))
            assert rel(got[1:2, h:h + 1], want) < 1e-2


def test_fast_path_cache_keeps_checks(cp, rng):
    a, u = draw(rng, "BLHD", True, 1, 2, 16, 64, np.float32)
    ca, cu = cp.asarray(a), cp.asarray(u)
    sa.swr(ca, cu, layout="BLHD")
    sa.swr(ca, cu, layout="BLHD")
    with pytest.raises(TypeError, match="hops must be"):
        sa.swr(ca, cu, layout="BLHD", hops=True)
    with pytest.raises(TypeError, match="share one dtype"):
        sa.swr(ca.astype(cp.float16), cu, layout="BLHD")
    with pytest.raises(ValueError, match="fit layout 'BLHD', not layout='BHDL'"):
        sa.swr(ca, cu, layout="BHDL")
    with pytest.raises(TypeError, match="a is a numpy array"):
        sa.swr(a, cu, layout="BLHD")
    out = cp.empty(u.shape, cp.float32)
    for _ in range(2):  # the second call takes the cached path with out=
        assert sa.swr(ca, cu, layout="BLHD", out=out, out_dtype="float32") is out
    with pytest.raises(ValueError, match="out must have shape"):
        sa.swr(ca, cu, layout="BLHD", out=out[:, :1])
    with pytest.raises(TypeError, match="out_dtype must be a float dtype"):
        sa.swr(ca, cu, layout="BLHD", out_dtype="banana")
    y = sa.swr(ca[:, ::2], cu[:, ::2], layout="BLHD")  # non-contiguous: copied, not cached
    want = sa.swr(a[:, ::2].astype(np.float64), u[:, ::2].astype(np.float64), layout="BLHD")
    assert rel(y.get(), want) < 1e-5


@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
@pytest.mark.parametrize("hops", [0, 1])
def test_vjp_cached_path_matches_reference(cp, rng, layout, hops):
    """The second and third plain swr_vjp calls take the checked-call cache and the cached launch
    plan (with and without out=); they must give the reference's numbers, into poisoned outputs,
    and still reject a bad call with the same key prefix."""
    kw = dict(layout=layout, hops=hops)
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    a, u = draw(rng, layout, True, 2, 4, 16, 200, np.float32)
    dy = rng.standard_normal(u.shape).astype(np.float32)
    ca, cu, cdy = cp.asarray(a), cp.asarray(u), cp.asarray(dy)
    eda, edu, _ = sa.swr_vjp(f64(a), f64(u), f64(dy), **kw)
    for _ in range(3):
        da, du, dx0 = sa.swr_vjp(ca, cu, cdy, **kw)
        assert dx0 is None and rel(da.get(), eda) < 1e-4 and rel(du.get(), edu) < 1e-5
    oda = cp.full(a.shape, cp.nan, cp.float32)
    odu = cp.full(u.shape, cp.nan, cp.float32)
    for _ in range(3):
        got = sa.swr_vjp(ca, cu, cdy, out=(oda, odu, None), **kw)
        assert got[0] is oda and got[1] is odu
        assert rel(oda.get(), eda) < 1e-4 and rel(odu.get(), edu) < 1e-5
        oda.fill(cp.nan)
        odu.fill(cp.nan)
    with pytest.raises(ValueError, match="dy must have u's shape"):
        sa.swr_vjp(ca, cu, cdy[:, :-1], **kw)
    with pytest.raises(ValueError, match=r"out\[1\] \(du\) must have shape"):
        sa.swr_vjp(ca, cu, cdy, out=(oda, odu[:, :1], None), **kw)
    # arrays 2 bytes off an 8-byte boundary get their own plan (the general kernel), not the
    # aligned one's: alternate aligned and misaligned calls of the same shapes
    a16, u16 = a.astype(np.float16), u.astype(np.float16)
    eda16, edu16, _ = sa.swr_vjp(f64(a16), f64(u16), f64(dy), **kw)

    def placed(x, shift):
        buf = cp.empty(x.size + 4, cp.float16)
        view = buf[shift:shift + x.size].reshape(x.shape)
        view[...] = cp.asarray(x)
        return view

    for shift in (0, 1, 0, 1):
        got = sa.swr_vjp(placed(a16, shift), placed(u16, shift), cdy, **kw)
        assert rel(got[0].get(), eda16) < 1e-2 and rel(got[1].get(), edu16) < 1e-2


def test_out_and_streams(cp, rng):
    a, u = draw(rng, "BHDL", False, 2, 3, 8, 300, np.float32)
    ca, cu = cp.asarray(a), cp.asarray(u)
    want = sa.swr(a.astype(np.float64), u.astype(np.float64), layout="BHDL")
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        out = cp.full(u.shape, cp.nan, cp.float32)
        got = sa.swr(ca, cu, out=out, layout="BHDL")
    s.synchronize()
    assert got is out and rel(out.get(), want) < 1e-5


def test_host_overhead_report(cp, rng):
    """The host cost of one tiny call is reported (docs/benchmarks.md) and the repeated call's
    result still equals the reference (no timing assertion: it depends on the machine)."""
    a, u = draw(rng, "BLHD", True, 1, 1, 16, 16, BF16)
    ca, cu = cp.asarray(a), cp.asarray(u)
    for _ in range(50):
        sa.swr(ca, cu, layout="BLHD")
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(1000):
        t = time.perf_counter()
        sa.swr(ca, cu, layout="BLHD")
        times.append(time.perf_counter() - t)
    cp.cuda.get_current_stream().synchronize()
    med = float(np.median(times) * 1e6)
    print(f"\nhost overhead of swr_array.swr (tiny bf16 input): median {med:.1f} us")
    y = cp.asnumpy(sa.swr(ca, cu, layout="BLHD")).astype(np.float64)
    ref = sa.swr(a.astype(np.float64), u.astype(np.float64), layout="BLHD")
    np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_backward_beyond_2_31_elements(cp, layout):
    """64-bit indexing of the backward through the public API: 2**31 + 32768 elements."""
    B, H, D, N = 1, 128, 16, 2**20 + 16
    us = (B, H, D, N) if layout == "BHDL" else (B, N, H, D)
    as_ = (B, H, N) if layout == "BHDL" else (B, N, H)
    cp.random.seed(7)
    u = cp.random.standard_normal(us, dtype=cp.float32).astype(BF16)
    dy = cp.random.standard_normal(us, dtype=cp.float32).astype(BF16)
    a = cp.random.uniform(0.5, 1.0, as_, dtype=cp.float32).astype(BF16)
    da, du, _ = sa.swr_vjp(a, u, dy, layout=layout)
    for h in (0, 127):  # head 127 holds the highest flat indices in either layout
        if layout == "BHDL":
            pick = lambda x, h=h: cp.asnumpy(x[:, h]).astype(np.float64)  # noqa: E731
            tl = lambda x: x  # noqa: E731  (B, D, N) already time-last
        else:
            pick = lambda x, h=h: cp.asnumpy(x[:, :, h]).astype(np.float64)  # noqa: E731
            tl = lambda x: x.transpose(0, 2, 1)  # noqa: E731  (B, N, D) -> (B, D, N)
        at = pick(a)[:, None, None, :]  # (B, 1, 1, N)
        eda, edu, _ = sa.reference.swr_vjp(at, tl(pick(u))[:, None], tl(pick(dy))[:, None])
        assert rel(tl(pick(du)), edu[:, 0]) < 1e-2
        assert rel(pick(da), eda.sum(axis=2)[:, 0]) < 2e-2


@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_launch_plan_matches_the_front_bitwise(cp, rng, layout):
    """swr_array._plans.launch_plan: the adapters' hot path gives the front's numbers bit for bit,
    on a stream of the caller's, into poisoned outputs."""
    from swr_array._plans import launch_plan

    a, u = draw(rng, layout, True, 2, 4, 16, 96, BF16)
    ca, cu = cp.asarray(a), cp.asarray(u)
    dy = cp.asarray(rng.standard_normal(u.shape).astype(BF16))
    plan = launch_plan(ca, cu, block_len=16, hops=1, layout=layout, dy=dy)
    assert plan is launch_plan(ca, cu, block_len=16, hops=1, layout=layout, dy=dy)
    stream = cp.cuda.Stream(non_blocking=True)
    y, da, du = cp.empty(u.shape, u.dtype), cp.empty(a.shape, a.dtype), cp.empty(u.shape, u.dtype)
    for x in (y, da, du):
        x.view(cp.uint16).fill(0x7FC0)  # NaN until a kernel writes it
    plan.forward(ca, cu, y, stream=stream.ptr)
    plan.backward(ca, cu, dy, da, du, stream=stream.ptr)
    stream.synchronize()
    want_y = sa.swr(ca, cu, layout=layout, block_len=16, hops=1)
    want_da, want_du, _ = sa.swr_vjp(ca, cu, dy, layout=layout, block_len=16, hops=1)
    for got, want in ((y, want_y), (da, want_da), (du, want_du)):
        assert bool((got.view(cp.uint16) == want.view(cp.uint16)).all())
