"""Packed sequences (cu_seqlens) on a GPU: the CuPy front, the torch adapter (no host
synchronisation) and the Phalanx layer at real sizes, against the per-sequence reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import swr_array as sa
from swr_array import reference
from swr_array.ops import from_time_last, to_time_last

pytestmark = pytest.mark.gpu
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


def rel(got, want):
    got = np.asarray(got, np.float64)
    return float(np.linalg.norm(got - want) / (np.linalg.norm(want) + 1e-30))


def draw(rng, layout, per_head, lens, H, D, dtype):
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1])
    us = (1, T, H, D) if layout == "BLHD" else (1, H, D, T)
    a_s = ((1, T, H) if layout == "BLHD" else (1, H, T)) if per_head else us
    a = rng.uniform(-1.05, 1.05, a_s).astype(np.float32).astype(dtype)
    u = rng.standard_normal(us).astype(np.float32).astype(dtype)
    return cu, a, u


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("hops", [0, 1, 2, None])
@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("per_head", [True, False])
def test_cupy_packed_forward_backward(cp, rng, layout, hops, dtype, per_head):
    lens = list(rng.integers(0, 300, 12)) + [0, 1, 16, 17]
    cu, a, u = draw(rng, layout, per_head, lens, 4, 16, dtype)
    S = len(lens)
    x0 = rng.standard_normal((S, 4, 16)).astype(np.float32)
    dy = rng.standard_normal(u.shape).astype(np.float32).astype(dtype)
    kw = dict(block_len=16, hops=hops, layout=layout)
    at, ut = to_time_last(a, layout, per_head), to_time_last(u, layout, False)
    want = from_time_last(reference.swr_packed(at, ut, cu, block_len=16, hops=hops, x0=x0),
                          layout)
    rda, rdu, rdx0 = reference.swr_vjp_packed(at, ut, to_time_last(dy, layout, False), cu,
                                              block_len=16, hops=hops, x0=x0)
    if per_head:
        rda = rda.sum(axis=2, keepdims=True)
    rda, rdu = from_time_last(rda, layout, per_head), from_time_last(rdu, layout)
    tol = 1e-5 if dtype == np.float32 else 1e-2
    ca, cu_, cx0, cdy = cp.asarray(a), cp.asarray(u), cp.asarray(x0), cp.asarray(dy)
    ccu = cp.asarray(cu)
    y = sa.swr(ca, cu_, x0=cx0, cu_seqlens=ccu, **kw)
    assert y.dtype == dtype and rel(y.get(), want) < tol
    out = cp.full(u.shape, cp.nan, dtype=dtype)  # poisoned: every token must be written
    sa.swr(ca, cu_, x0=cx0, cu_seqlens=ccu, out=out, **kw)
    assert rel(out.get(), want) < tol
    da, du, dx0 = sa.swr_vjp(ca, cu_, cdy, x0=cx0, cu_seqlens=ccu, **kw)
    assert rel(da.get(), rda) < 10 * tol and rel(du.get(), rdu) < tol
    assert rel(dx0.get(), rdx0) < tol or (hops == 0 and float(abs(dx0).max()) == 0.0)


def test_cupy_bad_device_cu_gives_nan(cp, rng):
    cu, a, u = draw(rng, "BLHD", True, [100, 50], 2, 16, np.float32)
    bad = cp.asarray(np.array([0, 160, 150], np.int32))
    y = sa.swr(cp.asarray(a), cp.asarray(u), layout="BLHD", cu_seqlens=bad)
    assert bool(cp.isnan(y).all())


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
def test_torch_cuda_packed_no_sync(rng, layout):
    torch = pytest.importorskip("torch")
    from swr_array.adapters import torch as st

    lens = list(rng.integers(0, 400, 20))
    cu, a, u = draw(rng, layout, True, lens, 4, 16, np.float32)
    x0 = rng.standard_normal((20, 4, 16)).astype(np.float32)
    dev = torch.device("cuda")
    ta = torch.tensor(a, device=dev, requires_grad=True)
    tu = torch.tensor(u, device=dev, requires_grad=True)
    tx = torch.tensor(x0, device=dev, requires_grad=True)
    tcu = torch.tensor(cu, device=dev)
    st.swr(ta, tu, block_len=16, hops=1, layout=layout, x0=tx, cu_seqlens=tcu)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = st.swr(ta, tu, block_len=16, hops=1, layout=layout, x0=tx, cu_seqlens=tcu)
        y.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    at, ut = to_time_last(a, layout, True), to_time_last(u, layout, False)
    want = from_time_last(reference.swr_packed(at, ut, cu, block_len=16, hops=1, x0=x0), layout)
    assert rel(y.detach().cpu().numpy(), want) < 1e-5
    _, _, rdx0 = reference.swr_vjp_packed(at, ut, np.ones(ut.shape), cu, block_len=16, hops=1,
                                          x0=x0)
    assert rel(tx.grad.cpu().numpy(), rdx0) < 1e-5


def test_cupy_phalanx_packed(cp, rng):
    p = sa.init_phalanx(64, head_dim=16)
    lens = [100, 0, 37, 300]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    x = rng.standard_normal((1, int(cu[-1]), 64)).astype(np.float32)
    pc = {k: (cp.asarray(v) if hasattr(v, "shape") else v) for k, v in p.items()}
    out = sa.phalanx(cp.asarray(x), pc, cu_seqlens=cp.asarray(cu)).get()
    dout = rng.standard_normal(x.shape).astype(np.float32)
    dx, dp = sa.phalanx_vjp(cp.asarray(x), pc, cp.asarray(dout), cu_seqlens=cp.asarray(cu))
    dxh, dph = sa.phalanx_vjp(x, p, dout, cu_seqlens=cu)
    for lo, hi in zip(cu[:-1], cu[1:]):
        if hi > lo:
            want = reference.phalanx_reference(x[:, lo:hi], p)
            assert rel(out[:, lo:hi], want) < 1e-4
    assert rel(dx.get(), dxh) < 1e-3
    for k in dp:
        assert rel(dp[k].get(), dph[k]) < 1e-3


def _nan_empty(cp):
    """cupy.empty that returns NaN-filled arrays: outputs the kernels must overwrite."""
    real = cp.empty

    def empty(shape, dtype=float, order="C"):
        x = real(shape, dtype=dtype, order=order)
        if x.dtype == np.float32 or x.dtype == np.float16:
            x.fill(np.nan)
        elif x.dtype.itemsize == 2 and x.dtype.kind not in "iu":  # bfloat16: a NaN's bits
            x.view(np.uint16).fill(0x7FC0)
        return x

    return empty


@pytest.mark.parametrize("variant", ["rblocks", "blocks", "tokens"])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_native_packed_kernels_poisoned(cp, rng, monkeypatch, per_head, hops, dtype, variant):
    """The native BLHD kernels (no padded image) write every token of y, da and du (NaN-filled
    before), for lengths 0, 1, below/at/above block_len and one longer than a thread's chunk."""
    from swr_array.numba_kernels import packed_walk

    from swr_array import packed

    monkeypatch.setattr(packed_walk, "_VARIANT", [variant])
    lens = [0, 1, 15, 16, 17, 0, 300, 2] + list(rng.integers(0, 40, 30))
    cu, a, u = draw(rng, "BLHD", per_head, lens, 4, 16, dtype)
    S = len(lens)
    x0 = rng.standard_normal((S, 4, 16)).astype(np.float32)
    dy = rng.standard_normal(u.shape).astype(np.float32).astype(dtype)
    at, ut = to_time_last(a, "BLHD", per_head), to_time_last(u, "BLHD", False)
    want = from_time_last(reference.swr_packed(at, ut, cu, block_len=16, hops=hops, x0=x0), "BLHD")
    rda, rdu, rdx0 = reference.swr_vjp_packed(at, ut, to_time_last(dy, "BLHD", False), cu,
                                              block_len=16, hops=hops, x0=x0)
    if per_head:
        rda = rda.sum(axis=2, keepdims=True)
    rda, rdu = from_time_last(rda, "BLHD", per_head), from_time_last(rdu, "BLHD")

    def no_image(*args, **kwargs):
        raise AssertionError("the padded image was built")

    monkeypatch.setattr(packed, "_padded_inputs", no_image)
    monkeypatch.setattr(cp, "empty", _nan_empty(cp))
    kw = dict(block_len=16, hops=hops, layout="BLHD", x0=cp.asarray(x0), cu_seqlens=cp.asarray(cu))
    tol = 1e-5 if dtype == np.float32 else 1e-2
    y = sa.swr(cp.asarray(a), cp.asarray(u), **kw)
    assert rel(y.get(), want) < tol
    da, du, dx0 = sa.swr_vjp(cp.asarray(a), cp.asarray(u), cp.asarray(dy), **kw)
    assert rel(da.get(), rda) < 10 * tol and rel(du.get(), rdu) < tol
    if hops == 1:
        assert rel(dx0.get(), rdx0) < tol
    else:
        assert float(abs(dx0).max()) == 0.0
    # the same signature again: the cached plan (no checks), same numbers
    y2 = sa.swr(cp.asarray(a), cp.asarray(u), **kw)
    g2 = sa.swr_vjp(cp.asarray(a), cp.asarray(u), cp.asarray(dy), **kw)
    for got, want in zip((y2, *g2), (y, da, du, dx0)):
        assert got.get().tobytes() == want.get().tobytes()


@pytest.mark.parametrize("layout, variant", [("BLHD", "rblocks"), ("BHDL", "tokens")])
@pytest.mark.parametrize("n_docs", [16, 1000])
def test_native_matches_padded_at_headline_size(cp, rng, monkeypatch, n_docs, layout, variant):
    """32768 tokens, 128 heads x 16 channels, bfloat16, hops 1, x0: the native kernels give the
    padded image's numbers (same float32 accumulation order inside a block)."""
    from swr_array.numba_kernels import packed_walk

    from swr_array import packed

    monkeypatch.setattr(packed_walk, "_VARIANT", [variant])
    T, H, D = 32768, 128, 16
    cuts = np.sort(rng.choice(np.arange(1, T), size=n_docs - 1, replace=False))
    cu = cp.asarray(np.concatenate([[0], cuts, [T]]).astype(np.int32))
    us = (1, T, H, D) if layout == "BLHD" else (1, H, D, T)
    a_s = (1, T, H) if layout == "BLHD" else (1, H, T)
    a = cp.asarray(rng.uniform(0.5, 1.0, a_s).astype(np.float32).astype(BF16))
    u = cp.asarray(rng.standard_normal(us).astype(np.float32).astype(BF16))
    dy = cp.asarray(rng.standard_normal(us).astype(np.float32).astype(BF16))
    x0 = cp.asarray(rng.standard_normal((n_docs, H, D)).astype(np.float32))
    kw = dict(block_len=16, hops=1, layout=layout, x0=x0, cu_seqlens=cu)
    y = sa.swr(a, u, **kw).get().astype(np.float64)
    g = [v.get().astype(np.float64) for v in sa.swr_vjp(a, u, dy, **kw)]
    monkeypatch.setattr(packed, "native_forward_fits", lambda p, cu: False)
    monkeypatch.setattr(packed, "native_backward_fits", lambda *args: False)
    y_ref = sa.swr(a, u, **kw).get().astype(np.float64)
    g_ref = [v.get().astype(np.float64) for v in sa.swr_vjp(a, u, dy, **kw)]
    assert rel(y, y_ref) < 1e-2
    for got, want in zip(g, g_ref):
        assert rel(got, want) < 2e-2


@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_native_route_fullgraph(rng, dtype, layout):
    """CUDA, hops 1: the packed custom ops (the front's native kernels) under
    torch.compile(fullgraph=True), forward and gradients against the reference."""
    torch = pytest.importorskip("torch")
    from swr_array.adapters import torch as st

    lens = [0, 1, 17, 300, 5, 16, 0, 64]
    cu, a, u = draw(rng, layout, True, lens, 4, 16, np.float32)
    x0 = rng.standard_normal((len(lens), 4, 16)).astype(np.float32)
    dev, tdt = torch.device("cuda"), getattr(torch, dtype)
    ta = torch.tensor(a, device=dev).to(tdt).requires_grad_()
    tu = torch.tensor(u, device=dev).to(tdt).requires_grad_()
    tx = torch.tensor(x0, device=dev, requires_grad=True)
    tcu = torch.tensor(cu, device=dev)

    def f(a, u, x0, cu):
        return st.swr(a, u, block_len=16, hops=1, layout=layout, x0=x0, cu_seqlens=cu)

    y = torch.compile(f, fullgraph=True)(ta, tu, tx, tcu)
    y.float().sum().backward()
    a64 = ta.detach().float().cpu().numpy()
    u64 = tu.detach().float().cpu().numpy()
    at, ut = to_time_last(a64, layout, True), to_time_last(u64, layout, False)
    want = from_time_last(reference.swr_packed(at, ut, cu, block_len=16, hops=1, x0=x0), layout)
    rda, rdu, rdx0 = reference.swr_vjp_packed(at, ut, np.ones(ut.shape), cu, block_len=16,
                                              hops=1, x0=x0)
    rda = from_time_last(rda.sum(axis=2, keepdims=True), layout, True)
    rdu = from_time_last(rdu, layout)
    tol = 1e-5 if dtype == "float32" else 1e-2
    assert rel(y.detach().float().cpu().numpy(), want) < tol
    assert rel(ta.grad.float().cpu().numpy(), rda) < 10 * tol
    assert rel(tu.grad.float().cpu().numpy(), rdu) < tol
    assert rel(tx.grad.cpu().numpy(), rdx0) < tol


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("extra", [0, 3])  # T a multiple of 8 (vector accesses) or odd
def test_native_bhdl_poisoned(cp, rng, monkeypatch, per_head, hops, dtype, extra):
    """The native BHDL kernels (the token walks, no padded image) write every token of y, da
    and du (NaN-filled before), lengths 0, 1, below/at/above block_len and longer than a
    chunk."""
    from swr_array import packed

    lens = [0, 1, 15, 16, 17, 0, 600, 2] + list(rng.integers(0, 40, 30))
    lens[-1] += (-sum(lens)) % 8 + extra  # T a multiple of 8, or 3 more
    cu, a, u = draw(rng, "BHDL", per_head, lens, 4, 16, dtype)
    S = len(lens)
    x0 = rng.standard_normal((S, 4, 16)).astype(np.float32)
    at, ut = to_time_last(a, "BHDL", per_head), to_time_last(u, "BHDL", False)
    want = from_time_last(reference.swr_packed(at, ut, cu, block_len=16, hops=hops, x0=x0), "BHDL")
    dy = rng.standard_normal(u.shape).astype(np.float32).astype(dtype)
    rda, rdu, rdx0 = reference.swr_vjp_packed(at, ut, to_time_last(dy, "BHDL", False), cu,
                                              block_len=16, hops=hops, x0=x0)
    if per_head:
        rda = rda.sum(axis=2, keepdims=True)
    rda, rdu = from_time_last(rda, "BHDL", per_head), from_time_last(rdu, "BHDL")

    def no_image(*args, **kwargs):
        raise AssertionError("the padded image was built")

    monkeypatch.setattr(packed, "_padded_inputs", no_image)
    monkeypatch.setattr(cp, "empty", _nan_empty(cp))
    kw = dict(block_len=16, hops=hops, layout="BHDL", x0=cp.asarray(x0), cu_seqlens=cp.asarray(cu))
    tol = 1e-5 if dtype == np.float32 else 1e-2
    y = sa.swr(cp.asarray(a), cp.asarray(u), **kw)
    assert rel(y.get(), want) < tol
    da, du, dx0 = sa.swr_vjp(cp.asarray(a), cp.asarray(u), cp.asarray(dy), **kw)
    assert rel(da.get(), rda) < 10 * tol and rel(du.get(), rdu) < tol
    if hops == 1:
        assert rel(dx0.get(), rdx0) < tol
    else:
        assert float(abs(dx0).max()) == 0.0
    # the same signature again: the cached plan (no checks), same numbers
    y2 = sa.swr(cp.asarray(a), cp.asarray(u), **kw)
    g2 = sa.swr_vjp(cp.asarray(a), cp.asarray(u), cp.asarray(dy), **kw)
    for got, want in zip((y2, *g2), (y, da, du, dx0)):
        assert got.get().tobytes() == want.get().tobytes()
