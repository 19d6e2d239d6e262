"""The halo walks of hops 2..8 (numba_kernels/halo_walk.py) against the reference.

1. A NumPy prototype of the reverse halo walk (one chunk of blocks at a time, walked backwards,
   with the forward carriers of the ``hops`` blocks before each block in a shift register and the
   adjoints ``(q, C)`` of the ``hops`` blocks after it in another) equals
   ``reference.swr_vjp``: the adjoint recurrences of the module docstring.
2. The Numba kernels in the CUDA simulator (this file runs them where NUMBA_ENABLE_CUDASIM=1):
   several chunks, lengths that are not multiples of block_len nor of the chunk, x0, per-head and
   per-channel coefficients, float32/float16/bfloat16, hops 2, 3 and 8, both layouts.
"""

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import gpu_available
from test_kernels_backward import (
    assert_close,
    expected,
    make_case,
    poisoned,
    time_last,
    to_np,
    xp,
)

from swr_array import reference

SIM = bool(numba.config.ENABLE_CUDASIM)


# ----------------------------------------------------------------------------------------------
# 1. NumPy prototype of the reverse halo walk (time-last arrays (M, N), per-channel a)
# ----------------------------------------------------------------------------------------------


def _block(a, u, lo, n):
    """Forward local scan of one block: (w_{t-1} per step, g_{t-1} per step, v, C)."""
    M = a.shape[0]
    w = np.zeros(M)
    g = np.ones(M)
    wp = np.empty((M, n))
    gp = np.empty((M, n))
    for i in range(n):
        wp[:, i], gp[:, i] = w, g
        w = a[:, lo + i] * w + u[:, lo + i]
        g = g * a[:, lo + i]
    return wp, gp, w, g


def halo_backward_prototype(a, u, dy, block_len, hops, x0, chunk_blocks):
    """(da, du, dx0) of the sliding window with ``hops`` k, chunk by chunk, each chunk walking
    its blocks backwards with only its own inputs and a halo of k blocks on each side."""
    M, N = u.shape
    k, lb = hops, block_len
    nb = -(-N // lb)
    du = np.zeros((M, N))
    da = np.zeros((M, N))
    dx0 = np.zeros(M)
    x0 = np.zeros(M) if x0 is None else x0

    def blen(j):
        return min(lb, N - j * lb)

    def carrier(i):  # (v_i, C_i) of any block index, v_{-1} = x0, nothing before
        if i < -1:
            return np.zeros(M), np.ones(M)
        if i == -1:
            return x0.copy(), np.ones(M)
        _, _, v, C = _block(a, u, i * lb, blen(i))
        return v, C

    for j0 in range(0, nb, chunk_blocks):
        j1 = min(j0 + chunk_blocks, nb)
        # future register: (q, C) of blocks j1 .. j1+k-1, newest-adjoint first (index m: j+1+m)
        fq = [np.zeros(M) for _ in range(k)]
        fC = [np.ones(M) for _ in range(k)]
        for i in range(min(j1 + k, nb) - 1, j1 - 1, -1):
            _, gp, _, C = _block(a, u, i * lb, blen(i))
            g = gp * a[:, i * lb:i * lb + blen(i)]
            q = (g * dy[:, i * lb:i * lb + blen(i)]).sum(axis=1)
            fq = [q] + fq[:-1]
            fC = [C] + fC[:-1]
        # past register: (v, C) of blocks j-k .. j-1, oldest first
        pv, pC = zip(*[carrier(j1 - 1 - k + m) for m in range(k)])
        pv, pC = list(pv), list(pC)
        for j in range(j1 - 1, j0 - 1, -1):
            # W(n): the carry entering block j cut after n hops; T = W(k)
            W = [np.zeros(M)]
            P = np.ones(M)
            for e in range(1, k + 1):
                W.append(W[-1] + P * pv[k - e])
                P = P * pC[k - e]
            T = W[k]
            # dv_j = sum_m (C_{j+1} .. C_{j+m}) q_{j+1+m}   (Horner, newest last)
            dv = fq[k - 1].copy()
            for m in range(k - 2, -1, -1):
                dv = fq[m] + fC[m] * dv
            # dC_j = sum_{d=1}^{k-1} q_{j+d} (C_{j+1} .. C_{j+d-1}) W(k-d)
            dC = np.zeros(M)
            R = np.ones(M)
            for d in range(1, k):
                dC += fq[d - 1] * R * W[k - d]
                R = R * fC[d - 1]
            lo, n = j * lb, blen(j)
            wp, gp, _, C = _block(a, u, lo, n)
            lam, mu, zz, an = dv.copy(), dC.copy(), np.zeros(M), np.ones(M)
            for i in range(n - 1, -1, -1):
                d = dy[:, lo + i]
                lam = d + an * lam
                mu = d * T + an * mu
                zz = d + an * zz
                du[:, lo + i] = lam
                da[:, lo + i] = lam * wp[:, i] + mu * gp[:, i]
                an = a[:, lo + i]
            q = an * zz
            fq = [q] + fq[:-1]
            fC = [C] + fC[:-1]
            pv = [carrier(j - 1 - k)[0]] + pv[:-1]
            pC = [carrier(j - 1 - k)[1]] + pC[:-1]
        if j0 == 0:
            dx = fq[k - 1].copy()
            for m in range(k - 2, -1, -1):
                dx = fq[m] + fC[m] * dx
            dx0 = dx
    return da, du, dx0


@pytest.mark.parametrize("hops", [2, 3, 5, 8])
@pytest.mark.parametrize("N,block_len,chunk", [(77, 4, 3), (64, 8, 2), (13, 4, 8), (100, 2, 7)])
def test_prototype_matches_reference_vjp(rng, hops, N, block_len, chunk):
    M = 3
    a = rng.uniform(-1.2, 1.2, (M, N))
    u = rng.standard_normal((M, N))
    dy = rng.standard_normal((M, N))
    x0 = rng.standard_normal(M)
    da, du, dx0 = halo_backward_prototype(a, u, dy, block_len, hops, x0, chunk)
    rda, rdu, rdx0 = reference.swr_vjp(a, u, dy, block_len=block_len, hops=hops, x0=x0)
    np.testing.assert_allclose(du, rdu, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(da, rda, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx0, rdx0, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# 2. The Numba kernels (CUDA simulator, or a GPU) against the reference
# ----------------------------------------------------------------------------------------------

needs_kernels = pytest.mark.skipif(
    not (SIM or gpu_available()), reason="needs the CUDA simulator or a GPU")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]


def run_halo_backward(a, u, dy, layout, block_len, hops, x0, *, want_dcarry=True, chunk=None):
    """halo_walk.halo_backward on poisoned outputs; NumPy (da, du, dcarry or None)."""
    from swr_array.numba_kernels import halo_walk

    X = xp()
    B, H, D = (u.shape[0], u.shape[1], u.shape[2]) if layout == "BHDL" else (
        u.shape[0], u.shape[2], u.shape[3])
    du = poisoned(u.shape, u.dtype)
    da = poisoned(a.shape, a.dtype)
    carry = X.asarray(np.zeros((B, H, D), np.float32) if x0 is None else x0)
    dcarry = poisoned((B, H, D), np.float32) if want_dcarry else None
    halo_walk.halo_backward(X.asarray(a), X.asarray(u), X.asarray(dy), du, da, layout=layout,
                            block_len=block_len, hops=hops, carry=carry, dcarry=dcarry,
                            chunk_blocks=chunk)
    return to_np(da), to_np(du), (to_np(dcarry) if want_dcarry else None)


def check_halo_backward(rng, layout, per_head, dtype, hops, *, block_len, B=1, H=2, D=4, N=21,
                        x0_given=True, want_dcarry=True, dy_dtype=None, chunk=None):
    a, u, dy, x0 = make_case(rng, layout, per_head, dtype, B=B, H=H, D=D, N=N,
                             dy_dtype=dy_dtype)
    x0 = x0 if x0_given else None
    da, du, dcarry = run_halo_backward(a, u, dy, layout, block_len, hops, x0,
                                       want_dcarry=want_dcarry, chunk=chunk)
    da_r, du_r, dx0_r = expected(a, u, dy, layout, per_head, block_len, hops, x0)
    assert_close(time_last(du, layout), du_r, dtype, "du")
    assert_close(time_last(da, layout), da_r, dtype, "da")
    if want_dcarry:
        assert_close(dcarry, dx0_r, np.float32, "dcarry")


@needs_kernels
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
@pytest.mark.parametrize("hops", [2, 3, 8])
@pytest.mark.parametrize("per_head", [True, False], ids=["head", "channel"])
def test_backward_kernel(rng, layout, hops, per_head):
    # block_len 4, N = 45: 12 blocks, the last partial; chunks of 5 blocks (not a multiple of
    # hops, nor dividing 12): halos on both sides cross chunk ends; D = 8 in float32 puts a
    # head on two lanes (vec 4) in BLHD, on 8 in BHDL
    check_halo_backward(rng, layout, per_head, np.dtype(np.float32), hops, block_len=4, D=8,
                        N=45, chunk=5)


@needs_kernels
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=lambda d: d.name)
def test_backward_kernel_16bit(rng, layout, dtype):
    # 16-bit storage, two batches, no x0, block_len 8 with groups of 8 steps
    check_halo_backward(rng, layout, True, dtype, 2, block_len=8, B=2, D=4, N=53,
                        x0_given=False, chunk=3)


@needs_kernels
@pytest.mark.parametrize("dtype,per_head,hops,block_len,N", [
    (BF16, True, 3, 16, 96), (np.dtype(np.float32), False, 2, 8, 40)], ids=["bf16", "f32"])
def test_backward_kernel_bhdl_time_vectors(rng, dtype, per_head, hops, block_len, N):
    # BHDL groups of one 32-byte access per row along time (N and block_len multiples of it)
    check_halo_backward(rng, "BHDL", per_head, dtype, hops, block_len=block_len, D=4, N=N,
                        chunk=2)


@needs_kernels
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_backward_kernel_checkpointed_groups(rng, layout):
    # block_len 16 > the 8 steps of a group: each block's groups restart from checkpoints of a
    # forward walk; N = 77 ends in a block of 13 steps (a partial group)
    check_halo_backward(rng, layout, False, np.dtype(np.float32), 2, block_len=16, D=2, N=77,
                        chunk=2)


@needs_kernels
@pytest.mark.parametrize("layout,dtype,block_len,N", [
    ("BLHD", np.dtype(np.float32), 16, 77), ("BHDL", np.dtype(np.float32), 16, 77),
    ("BHDL", BF16, 16, 96)], ids=["BLHD-groups", "BHDL-scalar", "BHDL-time-vectors"])
def test_backward_kernel_fused_lead(rng, monkeypatch, layout, dtype, block_len, N):
    # the lead walk's groups beside the sweep's (bwd_fuse_lead): checkpointed groups, the last
    # block partial (BLHD, BHDL scalar), and BHDL time vectors
    from swr_array.numba_kernels import halo_walk

    monkeypatch.setitem(halo_walk.TUNING, "bwd_fuse_lead", True)
    monkeypatch.setitem(halo_walk.TUNING, "bwd_bhdl_fuse_lead", True)
    check_halo_backward(rng, layout, True, dtype, 3, block_len=block_len, D=4, N=N, chunk=3)


@needs_kernels
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_backward_kernel_short(rng, layout):
    # fewer blocks than hops (every window reaches x0), the tuned chunk, dy float32
    check_halo_backward(rng, layout, False, BF16, 5, block_len=4, N=14, dy_dtype=np.float32)


@pytest.fixture(autouse=True, scope="module")
def _fast_simulator_barriers():
    # as in test_kernels_backward: the simulator's threads switch every 0.1 ms, not 5 ms
    import sys

    old = sys.getswitchinterval()
    if SIM:
        sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def check_bhdl_forward(rng, per_head, dtype, hops, *, block_len, N, B=1, H=2, D=4,
                       x0_given=True, out_dtype=None, chunk=None):
    from swr_array.numba_kernels import halo_walk

    a, u, _, x0 = make_case(rng, "BHDL", per_head, dtype, B=B, H=H, D=D, N=N)
    X = xp()
    y = poisoned(u.shape, out_dtype or dtype)
    carry = x0 if x0_given else np.zeros_like(x0)
    halo_walk.halo_forward(X.asarray(a), X.asarray(u), y, layout="BHDL", block_len=block_len,
                           hops=hops, carry=X.asarray(carry), chunk_blocks=chunk)
    at, ut = time_last(a, "BHDL", per_head), time_last(u, "BHDL")
    want = reference.swr(at, ut, block_len=block_len, hops=hops, x0=carry.astype(np.float64))
    assert_close(to_np(y), want, out_dtype or dtype, "y")


@needs_kernels
@pytest.mark.parametrize("hops", [2, 3, 8])
@pytest.mark.parametrize("per_head", [True, False], ids=["head", "channel"])
def test_bhdl_forward_kernel(rng, hops, per_head):
    # scalar groups: N = 45 (12 blocks of 4, the last partial), chunks of 5 blocks
    check_bhdl_forward(rng, per_head, np.dtype(np.float32), hops, block_len=4, N=45, chunk=5)


@needs_kernels
@pytest.mark.parametrize("dtype,out_dtype", [(BF16, BF16), (np.dtype(np.float16), np.float32),
                                             (np.dtype(np.float32), BF16)],
                         ids=["bf16", "f16-to-f32", "f32-to-bf16"])
def test_bhdl_forward_kernel_time_vectors(rng, dtype, out_dtype):
    # groups of one 32-byte access per row along time (N a multiple of 16), two batches, no x0
    check_bhdl_forward(rng, True, dtype, 3, block_len=16, N=96, B=2, x0_given=False,
                       out_dtype=np.dtype(out_dtype), chunk=2)


# ----------------------------------------------------------------------------------------------
# 3. GPU: the front's swr_vjp through the halo walk, poisoned outputs, against the reference
# ----------------------------------------------------------------------------------------------

GPU_CASES = [  # (layout, per_head, dtype, hops): the benchmark's bf16 kernels, then per channel
    ("BLHD", True, BF16, 2), ("BLHD", True, BF16, 4), ("BHDL", True, BF16, 2),
    ("BHDL", True, BF16, 4), ("BLHD", False, np.dtype(np.float32), 3),
    ("BHDL", False, np.dtype(np.float32), 3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("layout,per_head,dtype,hops", GPU_CASES,
                         ids=[f"{c[0]}-{'head' if c[1] else 'channel'}-{c[2].name}-hops{c[3]}"
                              for c in GPU_CASES])
def test_gpu_vjp_through_the_front(rng, monkeypatch, layout, per_head, dtype, hops):
    cp = pytest.importorskip("cupy")
    from swr_array.numba_kernels import halo_walk

    import swr_array as sa

    calls = []
    for name in ("halo_backward", "halo_forward"):
        run = getattr(halo_walk, name)
        monkeypatch.setattr(halo_walk, name, lambda *args, _run=run, _name=name, **kw:
                            calls.append(_name) or _run(*args, **kw))
    # BLHD and BHDL float32: 63 blocks of 16, the last partial; BHDL bf16: whole 32-byte groups
    B, H, D, N = 2, 4, 16, 1008 if layout == "BHDL" and dtype == BF16 else 1000
    us = (B, H, D, N) if layout == "BHDL" else (B, N, H, D)
    as_ = ((B, H, N) if layout == "BHDL" else (B, N, H)) if per_head else us
    a = rng.uniform(-1.05, 1.05, as_).astype(dtype)
    u = rng.standard_normal(us).astype(dtype)
    dy = rng.standard_normal(us).astype(dtype)
    x0 = rng.standard_normal((B, H, D)).astype(np.float32)
    out = (poisoned(as_, dtype), poisoned(us, dtype), cp.full((B, H, D), np.nan, np.float32))
    kw = dict(block_len=16, hops=hops, layout=layout)
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    # the forward of the same call (its kernels compile here, in parallel with other cases)
    y = poisoned(us, dtype)
    sa.swr(cp.asarray(a), cp.asarray(u), out=y, **kw)
    assert_close(to_np(y), sa.swr(f64(a), f64(u), **kw), dtype, "y")
    da, du, dx0 = sa.swr_vjp(cp.asarray(a), cp.asarray(u), cp.asarray(dy), x0=cp.asarray(x0),
                             out=out, **kw)
    want = ["halo_forward", "halo_backward"] if layout == "BHDL" else ["halo_backward"]
    assert calls == want, calls
    eda, edu, edx0 = sa.swr_vjp(f64(a), f64(u), f64(dy), x0=f64(x0), **kw)
    assert_close(to_np(du), edu, dtype, "du")
    assert_close(to_np(da), eda, dtype, "da")
    assert_close(to_np(dx0), edx0, np.float32, "dx0")


@needs_kernels
@pytest.mark.parametrize("hops", [2, 4, 8])
def test_bhdl_forward_chunk_length(hops):
    """The BHDL forward's chunks: TUNING's fwd_bhdl_chunk_blocks, at least 16 per hop, at most
    the blocks there are (one chunk then)."""
    from swr_array.numba_kernels import halo_walk

    X = xp()
    want = max(halo_walk.TUNING["fwd_bhdl_chunk_blocks"], 16 * hops)
    for N, nb in ((16 * 300, 300), (16 * 20 + 3, 21)):
        a = X.zeros((1, 1, N), np.float32)
        u = X.zeros((1, 1, 2, N), np.float32)
        carry = X.zeros((1, 1, 2), np.float32)
        *_, args = halo_walk._forward_launch_args(a, u, u.copy(), 16, hops, carry)
        chunk_blocks, nchunks = int(args[9]), int(args[10])
        assert chunk_blocks == min(want, nb)
        assert nchunks == -(-nb // chunk_blocks)
