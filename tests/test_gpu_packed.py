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
