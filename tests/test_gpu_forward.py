"""The forward kernels at real sizes on a GPU, against the float64 reference on sampled channels.

(tests/test_kernels_forward.py runs its small cases on the GPU too when one is present.)
Large inputs are drawn on the GPU as bfloat16 bits; the reference runs on the CPU for a random
sample of channels (hops=1: for time windows, from the block before the window on).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gpu_available

from swr_array import reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU")]  # fmt: skip

BF16_NAN = 0x7FC0


def _cp():
    import cupy

    return cupy


def random_bf16_bits(shape, rng_seed, low=None, high=None, zero_frac=0.03):
    """bfloat16 bits of random numbers, drawn on the GPU in slices (uniform or normal)."""
    cp = _cp()
    gen = cp.random.default_rng(rng_seed)
    out = cp.empty(int(np.prod(shape)), dtype=cp.uint16)
    step = 1 << 28
    for start in range(0, out.size, step):
        n = min(step, out.size - start)
        if low is None:
            x = gen.standard_normal(n, dtype=cp.float32)
        else:
            x = gen.uniform(low, high, n).astype(cp.float32)
        x[gen.random(n, dtype=cp.float32) < zero_frac] = 0
        out[start : start + n] = (x.view(cp.uint32) >> 16).astype(cp.uint16)
        del x
    return out.reshape(shape)


def bits_to_f64(bits):
    bits = np.asarray(bits)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def assert_all_written(y_bits):
    """No NaN left from the poison (inputs are finite)."""
    assert not bool(((y_bits & 0x7FFF) > 0x7F80).any()), "unwritten or NaN outputs"


def channel_series(x, layout, b, h, d, per_head_a=False, t0=0, t1=None):
    """One channel's time series of a (B,H,D,N)/(B,N,H,D) array (a: (B,H,N)/(B,N,H)), on host."""
    if layout == "BHDL":
        s = x[b, h, t0:t1] if per_head_a else x[b, h, d, t0:t1]
    else:
        s = x[b, t0:t1, h] if per_head_a else x[b, t0:t1, h, d]
    return s.get()


def run(a, u, y, *, layout, block_len=16, hops=1, stream=None):
    from swr_array.numba_kernels.swr_forward import swr_forward

    cp = _cp()
    if layout == "BHDL":
        B, H, D, _ = u.shape
    else:
        B, _, H, D = u.shape
    z = cp.zeros((B, H, D), cp.float32)
    o = cp.ones((B, H, D), cp.float32)
    swr_forward(a, u, y, layout=layout, block_len=block_len, hops=hops, offset=0, w0=z, g0=o,
                carry=z, stream=stream)  # fmt: skip


def check_sampled(a, u, y, *, layout, block_len, hops, nsamples, seed, window=None):
    """Compare sampled channels (optionally a time window [t0, t1) of each) with the reference."""
    rng = np.random.default_rng(seed)
    per_head = a.ndim == 3
    if layout == "BHDL":
        B, H, D, N = u.shape
    else:
        B, N, H, D = u.shape
    worst = 0.0
    for _ in range(nsamples):
        b, h, d = rng.integers(B), rng.integers(H), rng.integers(D)
        t0, t1 = (0, N) if window is None else window(rng, N)
        # hops=1: y in the window needs the block before it, nothing earlier
        first_block = t0 // block_len - (1 if hops == 1 else 0)
        s0 = max(0, first_block * block_len)
        av = bits_to_f64(channel_series(a, layout, b, h, d, per_head, s0, t1))
        uv = bits_to_f64(channel_series(u, layout, b, h, d, False, s0, t1))
        ref = reference.swr(av, uv, block_len=block_len, hops=hops)[t0 - s0 :]
        got = bits_to_f64(channel_series(y, layout, b, h, d, False, t0, t1))
        err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
        worst = max(worst, err)
    assert worst < 1.2e-2, worst


def shapes(layout, B, N, H, D, per_head):
    if layout == "BHDL":
        u = (B, H, D, N)
        a = (B, H, N) if per_head else u
    else:
        u = (B, N, H, D)
        a = (B, N, H) if per_head else u
    return a, u


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
def test_4x8192_heads128_dim16_bf16(layout, hops, per_head):
    cp = _cp()
    a_shape, u_shape = shapes(layout, 4, 8192, 128, 16, per_head)
    a = random_bf16_bits(a_shape, 1, -1.2, 1.2)
    u = random_bf16_bits(u_shape, 2)
    y = cp.full(u_shape, BF16_NAN, cp.uint16)
    run(a, u, y, layout=layout, hops=hops)
    cp.cuda.get_current_stream().synchronize()
    assert_all_written(y)
    check_sampled(a, u, y, layout=layout, block_len=16, hops=hops, nsamples=24, seed=3)


@pytest.mark.parametrize("hops", [2, 4, 8])
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
def test_halo_walk_4x8192_bf16(hops, per_head):
    """BLHD hops 2..8 in one pass (each chunk re-walks the hops blocks before it)."""
    cp = _cp()
    a_shape, u_shape = shapes("BLHD", 4, 8192, 128, 16, per_head)
    a = random_bf16_bits(a_shape, 4, -1.2, 1.2)
    u = random_bf16_bits(u_shape, 5)
    y = cp.full(u_shape, BF16_NAN, cp.uint16)
    run(a, u, y, layout="BLHD", hops=hops)
    cp.cuda.get_current_stream().synchronize()
    assert_all_written(y)
    check_sampled(a, u, y, layout="BLHD", block_len=16, hops=hops, nsamples=16, seed=6)


@pytest.mark.parametrize("hops", [2, 4])
def test_halo_walk_through_the_front(hops):
    """swr on CuPy (BLHD, hops 2..8): the halo walk, its cached plain path and x0 as v_{-1}."""
    import swr_array as sa

    cp = _cp()
    rng = np.random.default_rng(7 + hops)
    u = rng.standard_normal((2, 3000, 4, 16)).astype(np.float32)
    a = rng.uniform(-1.1, 1.1, (2, 3000, 4)).astype(np.float32)
    x0 = rng.standard_normal((2, 4, 16)).astype(np.float32)
    kw = dict(block_len=16, hops=hops, layout="BLHD")
    for x in (None, x0):
        want = sa.swr(a.astype(np.float64), u.astype(np.float64),
                      x0=None if x is None else x.astype(np.float64), **kw)  # fmt: skip
        for _ in range(2):  # the second plain call takes the cached path
            out = cp.full(u.shape, np.nan, cp.float32)
            got = sa.swr(cp.asarray(a), cp.asarray(u), x0=None if x is None else cp.asarray(x),
                         out=out, **kw)  # fmt: skip
            err = np.linalg.norm(got.get() - want) / np.linalg.norm(want)
            assert err < 1e-5, err


def test_shared_walk_over_48_kib_of_shared_memory(monkeypatch):
    """Eight chunks per thread block (88 KiB of dynamic shared memory, which a kernel must opt
    into): the reference on sampled channels, and bit for bit the default four chunks."""
    import importlib

    F = importlib.import_module("swr_array.numba_kernels.swr_forward")
    cp = _cp()
    a_shape, u_shape = shapes("BLHD", 2, 4096, 128, 16, True)
    a = random_bf16_bits(a_shape, 7, -1.1, 1.1)
    u = random_bf16_bits(u_shape, 8)
    y_default = cp.full(u_shape, BF16_NAN, cp.uint16)
    run(a, u, y_default, layout="BLHD")
    monkeypatch.setitem(F.TUNING, "blhd_share_chunks", 8)
    monkeypatch.setitem(F.TUNING, "blhd_share_max_bytes", 100 * 1024)
    plan = F._make_plan("BLHD", u_shape, True, "bf16", "bf16", 16, 0, F.HOPS1,
                        (0, 0))  # fmt: skip
    assert "chunks8" in plan.kernel.py_func.__name__ and plan.shared > 48 * 1024
    y = cp.full(u_shape, BF16_NAN, cp.uint16)
    run(a, u, y, layout="BLHD")
    cp.cuda.get_current_stream().synchronize()
    assert_all_written(y)
    check_sampled(a, u, y, layout="BLHD", block_len=16, hops=1, nsamples=12, seed=9)
    assert bool((y == y_default).all())


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("block_len", [8, 32, 64, 256])
def test_block_lengths_at_size(layout, block_len):
    cp = _cp()
    a_shape, u_shape = shapes(layout, 2, 4096 + 3 * block_len // 2, 16, 16, True)
    a = random_bf16_bits(a_shape, 4, -1.05, 1.05)
    u = random_bf16_bits(u_shape, 5)
    y = cp.full(u_shape, BF16_NAN, cp.uint16)
    run(a, u, y, layout=layout, block_len=block_len)
    assert_all_written(y)
    check_sampled(a, u, y, layout=layout, block_len=block_len, hops=1, nsamples=12, seed=6)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("dims", [(3, 1001, 7, 3), (2, 777, 5, 1), (1, 4099, 3, 24)],
                         ids=lambda d: "x".join(map(str, d)))  # fmt: skip
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
def test_odd_shapes_and_unaligned_pointers(layout, dims, per_head):
    """N not a multiple of block_len, odd head dims, and arrays that start 2 bytes past a 16-byte
    boundary (views into a larger buffer): the general kernels take them."""
    cp = _cp()
    B, N, H, D = dims
    a_shape, u_shape = shapes(layout, B, N, H, D, per_head)
    na, nu = int(np.prod(a_shape)), int(np.prod(u_shape))
    for shift in (0, 1):
        a = random_bf16_bits((na + 1,), 7, -1.2, 1.2)[shift : shift + na].reshape(a_shape)
        u = random_bf16_bits((nu + 1,), 8)[shift : shift + nu].reshape(u_shape)
        y = cp.full(nu + 1, BF16_NAN, cp.uint16)[shift : shift + nu].reshape(u_shape)
        run(a, u, y, layout=layout)
        assert_all_written(y)
        check_sampled(a, u, y, layout=layout, block_len=16, hops=1, nsamples=6, seed=9)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
def test_more_than_2_31_elements(layout):
    """64-bit indexing: u has more than 2**31 elements; windows near the end are checked."""
    cp = _cp()
    if layout == "BHDL":
        B, N, H, D = 1, (1 << 30) + 4096 + 8, 1, 2
    else:
        B, N, H, D = 1, (1 << 24) + 40, 8, 16
    a_shape, u_shape = shapes(layout, B, N, H, D, True)
    assert int(np.prod(u_shape)) > 2**31
    a = random_bf16_bits(a_shape, 10, -1.1, 1.1)
    u = random_bf16_bits(u_shape, 11)
    y = cp.full(u_shape, BF16_NAN, cp.uint16)
    run(a, u, y, layout=layout)
    cp.cuda.get_current_stream().synchronize()
    assert_all_written(y)

    def window(rng, n):
        # the end (beyond 2**31 elements), the middle and the start of the sequence
        start = int(rng.choice([n - 3000, n // 2, 0, n - 70]))
        return start, min(n, start + 2000)

    check_sampled(a, u, y, layout=layout, block_len=16, hops=1, nsamples=12, seed=12, window=window)
    del a, u, y
    cp.get_default_memory_pool().free_all_blocks()


def test_runs_on_the_given_stream():
    cp = _cp()
    a_shape, u_shape = shapes("BLHD", 2, 3000, 8, 16, True)
    a = random_bf16_bits(a_shape, 13, -1.2, 1.2)
    u = random_bf16_bits(u_shape, 14)
    y = cp.full(u_shape, BF16_NAN, cp.uint16)
    cp.cuda.get_current_stream().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    run(a, u, y, layout="BLHD", stream=stream)
    stream.synchronize()
    assert_all_written(y)
    check_sampled(a, u, y, layout="BLHD", block_len=16, hops=1, nsamples=4, seed=15)
