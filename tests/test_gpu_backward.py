"""The backward kernels on a real GPU at full size (tests/test_kernels_backward.py runs the small
cases on the GPU too, where there is one).

The kernels run on whole arrays (every output poisoned with NaN first, every one checked written);
a few heads are compared with the float64 reference, which is exact per head.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels_backward import (
    BF16,
    assert_close,
    expected,
    kernels,
    poisoned,
    time_last,
    to_np,
)

pytestmark = pytest.mark.gpu


def _cupy():
    import cupy

    return cupy


def random_case(rng, layout, per_head, dtype, B, N, H, D, dy_dtype=None):
    """Canonical a, u, dy on the GPU and x0 (B, H, D) float32."""
    cp = _cupy()
    ushape = (B, H, D, N) if layout == "BHDL" else (B, N, H, D)
    ashape = ushape if not per_head else ((B, H, N) if layout == "BHDL" else (B, N, H))

    def draw(shape, dt, lo=None, hi=None):
        x = (rng.uniform(lo, hi, shape) if lo is not None else rng.standard_normal(shape))
        return cp.asarray(x.astype(np.float32).astype(dt))

    return (draw(ashape, dtype, -1.2, 1.2), draw(ushape, dtype), draw(ushape, dy_dtype or dtype),
            rng.standard_normal((B, H, D)).astype(np.float32))


def head_slice(x, layout, heads):
    """The given heads of a canonical array (any of a, u, dy, du, da), as NumPy."""
    return np.ascontiguousarray(to_np(x[:, heads] if layout == "BHDL" else x[:, :, heads]))


def all_finite(x):
    """No NaN or infinity (on the bits: CuPy need not compute in bfloat16)."""
    cp = _cupy()
    if x.dtype.itemsize == 2:
        exponent = 0x7F80 if x.dtype.name == "bfloat16" else 0x7C00
        return bool(((x.view(cp.uint16) & exponent) != exponent).all())
    return bool(cp.isfinite(x).all())


def check_full(rng, layout, per_head, dtype, *, B, N, H, D, block_len=16, hops=1, heads=(0, -1),
               dy_dtype=None, **options):
    cp = _cupy()
    a, u, dy, x0 = random_case(rng, layout, per_head, dtype, B, N, H, D, dy_dtype)
    du = poisoned(u.shape, u.dtype)
    da = poisoned(a.shape, a.dtype)
    dcarry = poisoned((B, H, D), np.float32)
    kernels().swr_backward.swr_backward(a, u, dy, du, da, layout=layout, block_len=block_len,
                                        hops=hops, carry=cp.asarray(x0), dcarry=dcarry, **options)
    cp.cuda.runtime.deviceSynchronize()
    for name, out in (("du", du), ("da", da), ("dcarry", dcarry)):
        assert all_finite(out), f"{name}: unwritten outputs"
    heads = cp.asarray([h % H for h in heads])
    sl = [head_slice(x, layout, heads) for x in (a, u, dy)]
    da_r, du_r, dx0_r = expected(*sl, layout, per_head, block_len, hops, x0[:, to_np(heads)])
    assert_close(time_last(head_slice(du, layout, heads), layout), du_r, dtype, "du")
    assert_close(time_last(head_slice(da, layout, heads), layout), da_r, dtype, "da")
    assert_close(to_np(dcarry[:, heads]), dx0_r if hops else 0 * dx0_r, np.float32, "dcarry")


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
def test_phalanx_size_bf16(rng, layout):
    """4 x 8192 x 2048 bfloat16, 128 heads of 16, per-head coefficients: the benchmark case."""
    check_full(rng, layout, True, BF16, B=4, N=8192, H=128, D=16, heads=(0, 77, -1))


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("per_head", [True, False], ids=["head", "channel"])
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16), BF16],
                         ids=lambda d: d.name)
def test_medium_every_dtype(rng, layout, per_head, dtype):
    check_full(rng, layout, per_head, dtype, B=2, N=4096, H=16, D=16, hops=1)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("N", [8191, 8188, 77])
def test_partial_last_block(rng, layout, N):
    # BHDL with N = 8191 (no whole words) takes the general kernel, 8188 the walk kernel
    check_full(rng, layout, True, BF16, B=2, N=N, H=8, D=16)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("D", [3, 1, 64])
def test_other_head_dims(rng, layout, D):
    check_full(rng, layout, True, BF16, B=2, N=1000, H=4, D=D)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("block_len", [8, 32, 64, 256])
def test_block_lengths(rng, layout, block_len):
    check_full(rng, layout, True, BF16, B=1, N=3000, H=4, D=16, block_len=block_len)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
def test_hops0_and_float32_dy(rng, layout):
    check_full(rng, layout, True, BF16, B=2, N=2048, H=8, D=16, hops=0)
    check_full(rng, layout, True, BF16, B=2, N=2048, H=8, D=16, dy_dtype=np.float32)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("lanes", [1, 2, 4, 8])
@pytest.mark.parametrize("blocks_per_chunk", [1, 4, 16])
def test_tuning_knobs(rng, layout, lanes, blocks_per_chunk):
    """Every lane count and chunk length the benchmark tries computes the same function."""
    nk = kernels()
    plan = nk.walk_plan(layout, True, "bf16", "bf16", 16, 4096, 32, 16)
    if lanes * plan[1] > 32 or (layout == "BHDL" and 16 // lanes < 4):
        pytest.skip("lane count does not fit this layout")
    check_full(rng, layout, True, BF16, B=1, N=4096, H=32, D=16, lanes=lanes,
               blocks_per_chunk=blocks_per_chunk, threads=64 if lanes == 2 else 128)


@pytest.mark.parametrize("dtype,block_len,dy_dtype,H", [
    (BF16, 16, None, 16), (BF16, 16, None, 15), (BF16, 8, None, 16), (BF16, 16, np.float32, 16),
    (np.dtype(np.float32), 16, None, 16), (np.dtype(np.float16), 16, None, 16)],
    ids=["bf16-l16", "bf16-l16-h15", "bf16-l8", "bf16-l16-dyf32", "f32", "f16"])
def test_staged_kernel(rng, dtype, block_len, dy_dtype, H):
    """The staged BLHD kernel (cp.async copies, real shared memory, threads per block cut to fit
    it) against the reference on a few heads, and bitwise against the plain channel kernel on
    every output. An odd head count puts a's heads on both halves of its 4-byte copies."""
    import importlib

    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    cp = _cupy()
    saved = dict(mod.TUNING)
    try:
        mod.TUNING["staged_chunk_steps"] = 4 * block_len  # many chunk ends
        B, N, D = 2, 64 * block_len, 16
        a, u, dy, x0 = random_case(rng, "BLHD", True, dtype, B, N, H, D, dy_dtype)
        outs = []
        for staged in (True, False):
            mod.TUNING["staged"] = staged
            du, da = poisoned(u.shape, u.dtype), poisoned(a.shape, a.dtype)
            dcarry = poisoned((B, H, D), np.float32)
            name = mod._launch_args(a, u, dy, du, da, "BLHD", block_len, 1, cp.asarray(x0),
                                    dcarry, "channel", None, 128, None)[0].py_func.__name__
            assert name.startswith("swr_backward_staged" if staged else "swr_backward_channel")
            mod.swr_backward(a, u, dy, du, da, layout="BLHD", block_len=block_len, hops=1,
                             carry=cp.asarray(x0), dcarry=dcarry, variant="channel")
            outs.append((du, da, dcarry))
        cp.cuda.runtime.deviceSynchronize()
        for got, want, what in zip(outs[0], outs[1], ("du", "da", "dcarry")):
            assert all_finite(got), f"{what}: unwritten outputs"
            assert bool((got.view(cp.uint8) == want.view(cp.uint8)).all()), what
        heads = cp.asarray([0, H - 1])
        sl = [head_slice(x, "BLHD", heads) for x in (a, u, dy)]
        da_r, du_r, dx0_r = expected(*sl, "BLHD", True, block_len, 1, x0[:, [0, H - 1]])
        du, da, dcarry = outs[0]
        assert_close(time_last(head_slice(du, "BLHD", heads), "BLHD"), du_r, dtype, "du")
        assert_close(time_last(head_slice(da, "BLHD", heads), "BLHD"), da_r, dtype, "da")
        assert_close(to_np(dcarry[:, heads]), dx0_r, np.float32, "dcarry")
    finally:
        for k, v in saved.items():
            mod.TUNING[k] = v
