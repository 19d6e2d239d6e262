"""The backward kernels (numba_kernels/swr_backward.py, block_scan.py) against swr_array.reference.

Runs under the CUDA simulator on tiny shapes (one Python thread per CUDA thread: a few hundred
threads per case), or with CuPy on a GPU. Inputs are drawn per test, coefficients in [-1.2, 1.2]
(negatives included), every output is poisoned with NaN before the launch.
"""

from __future__ import annotations

import importlib
import sys

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import gpu_available

from swr_array import reference as ref

SIM = bool(numba.config.ENABLE_CUDASIM)
pytestmark = pytest.mark.skipif(not (SIM or gpu_available()),
                                reason="needs the CUDA simulator or a GPU")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]


@pytest.fixture(autouse=True, scope="module")
def _fast_simulator_barriers():
    # The simulator's block manager busy-polls its threads: with the default 5 ms GIL switch
    # interval every syncthreads (one per warp exchange) costs ~9 ms, with 0.1 ms ~1.5 ms.
    old = sys.getswitchinterval()
    if SIM:
        sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)


def kernels():
    from swr_array import numba_kernels as nk

    return nk


def xp():
    if SIM:
        return np
    import cupy

    return cupy


def to_np(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def tol(dtype):
    """Relative (to the largest magnitude) error allowed: float32 accumulation, one rounding."""
    return {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}[np.dtype(dtype).name]


def canonical(x, layout, per_head=False):
    """Time-last (B, H, D, N) (per head: (B, H, 1, N)) -> the kernels' layout."""
    if per_head:
        x = x[:, :, 0]
    return np.ascontiguousarray(x if layout == "BHDL" else np.moveaxis(x, -1, 1))


def time_last(x, layout, per_head=False):
    """The kernels' layout -> time-last float64, per-head coefficients as (B, H, 1, N)."""
    x = np.asarray(x, dtype=np.float64)
    if layout == "BLHD":
        x = np.moveaxis(x, 1, -1)
    return x[:, :, None] if per_head else x


def make_case(rng, layout, per_head, dtype, *, B=1, H=2, D=4, N=21, dy_dtype=None):
    """Canonical a, u, dy (NumPy, stored dtypes) and x0 (B, H, D) float32."""
    u = rng.standard_normal((B, H, D, N))
    a = rng.uniform(-1.2, 1.2, (B, H, 1 if per_head else D, N))
    dy = rng.standard_normal((B, H, D, N))
    x0 = rng.standard_normal((B, H, D)).astype(np.float32)
    return (canonical(a, layout, per_head).astype(dtype), canonical(u, layout).astype(dtype),
            canonical(dy, layout).astype(dy_dtype or dtype), x0)


_NAN_BITS = {"float16": 0x7E00, "bfloat16": 0x7FC0}


def poisoned(shape, dtype):
    """An array of NaNs (built from bits: CuPy need not convert to bfloat16)."""
    X = xp()
    dtype = np.dtype(dtype)
    if dtype.name in _NAN_BITS:
        return X.full(shape, _NAN_BITS[dtype.name], dtype=np.uint16).view(dtype)
    return X.full(shape, np.nan, dtype=dtype)


def expected(a, u, dy, layout, per_head, block_len, hops, x0):
    """(da, du, dcarry) from the reference, da summed over D for per-head coefficients."""
    at, ut, dyt = (time_last(a, layout, per_head), time_last(u, layout), time_last(dy, layout))
    carry = np.zeros(ut.shape[:-1]) if x0 is None else np.asarray(x0, np.float64)
    da, du, dx0 = ref.swr_vjp(at, ut, dyt, block_len=block_len, hops=hops, x0=carry)
    if per_head:
        da = da.sum(axis=2)
    return da, du, dx0


def run_backward(a, u, dy, layout, block_len, hops, x0, *, want_dcarry=True, **options):
    """Launch swr_backward on poisoned outputs; returns NumPy (da, du, dcarry or None)."""
    X = xp()
    B, H, D = (u.shape[0], u.shape[1], u.shape[2]) if layout == "BHDL" else (
        u.shape[0], u.shape[2], u.shape[3])
    aX, uX, dyX = X.asarray(a), X.asarray(u), X.asarray(dy)
    du = poisoned(u.shape, u.dtype)
    da = poisoned(a.shape, a.dtype)
    carry = X.asarray(np.zeros((B, H, D), np.float32) if x0 is None else x0)
    dcarry = poisoned((B, H, D), np.float32) if want_dcarry else None
    kernels().swr_backward.swr_backward(aX, uX, dyX, du, da, layout=layout, block_len=block_len,
                                        hops=hops, carry=carry, dcarry=dcarry, **options)
    return to_np(da), to_np(du), (to_np(dcarry) if want_dcarry else None)


def assert_close(got, want, dtype, what):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{what}: unwritten or non-finite outputs"
    scale = max(np.abs(want).max(), 1e-30) if want.size else 1.0
    err = np.abs(got - want).max() / scale if want.size else 0.0
    assert err <= tol(dtype), f"{what}: max error {err:.3g} (relative to {scale:.3g})"


def check_backward(rng, layout, per_head, dtype, hops, *, block_len, B=1, H=2, D=4, N=21,
                   x0_given=True, want_dcarry=True, dy_dtype=None, **options):
    a, u, dy, x0 = make_case(rng, layout, per_head, dtype, B=B, H=H, D=D, N=N,
                             dy_dtype=dy_dtype)
    x0 = x0 if x0_given else None
    da, du, dcarry = run_backward(a, u, dy, layout, block_len, hops, x0,
                                  want_dcarry=want_dcarry, **options)
    da_r, du_r, dx0_r = expected(a, u, dy, layout, per_head, block_len, hops, x0)
    assert_close(time_last(du, layout), du_r, dtype, "du")
    da_t = time_last(da, layout)  # per head: (B, H, N), like the summed reference
    assert_close(da_t, da_r, dtype, "da")
    if want_dcarry:
        assert_close(dcarry, dx0_r if hops else np.zeros_like(dx0_r), np.float32, "dcarry")


# ----------------------------------------------------------------------------------------------
# The fused walk kernel: every layout, dtype, hops 0/1, per-head / per-channel
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("per_head", [True, False], ids=["head", "channel"])
def test_walk_kernel(rng, layout, dtype, hops, per_head):
    # BLHD per head with D=8 puts a head on 2 (16-bit) or 4 (float32) lane groups, so the
    # shuffle reduce-scatter runs; N=37 (BLHD) / 36 (BHDL: rows of whole words) leaves a partial
    # block; chunks of 2 blocks make lead-in steps re-read the previous block.
    D, N = (8, 37) if layout == "BLHD" else (4, 36)
    check_backward(rng, layout, per_head, dtype, hops, block_len=8, D=D, N=N,
                   x0_given=per_head, variant="walk", blocks_per_chunk=2, threads=32)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("block_len", [4, 16, 32, 64])
def test_walk_block_lengths(rng, layout, block_len):
    # lanes per block from 1 to 16, time steps per lane from 2 to 16; N spans several chunks
    dtype = BF16 if block_len in (16, 64) else np.dtype(np.float32)
    N = 3 * block_len + 4
    check_backward(rng, layout, True, dtype, 1, block_len=block_len, D=4, N=N,
                   variant="walk", blocks_per_chunk=2, threads=32)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
def test_walk_mixed_dy_dtype(rng, layout):
    # dy float32 with bfloat16 a, u: two words of dy per word of u
    check_backward(rng, layout, True, BF16, 1, block_len=8, D=4, N=28,
                   dy_dtype=np.float32, variant="walk", blocks_per_chunk=3, threads=32)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
def test_walk_short_and_without_dcarry(rng, layout):
    # N shorter than one block, several batches, no dcarry
    check_backward(rng, layout, False, np.float32, 1, block_len=16, B=2, D=2, N=6,
                   want_dcarry=False, variant="walk", threads=32)


# ----------------------------------------------------------------------------------------------
# The BLHD channel kernel (swr_backward_channel.py): a thread per channel vector walking blocks
# from the last to the first
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def channel_tuning():
    """The backward's TUNING, with 16-step chunks: tiny cases span several chunks (carrier and q
    handed across chunk ends), and the staged kernel off. Restored after the test."""
    import importlib

    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    saved = dict(mod.TUNING)
    mod.TUNING["channel_chunk_steps"] = 16
    mod.TUNING["staged"] = False  # the staged kernels' tests ask for them
    yield mod.TUNING
    for k, v in saved.items():
        mod.TUNING[k] = v


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("per_head", [True, False], ids=["head", "channel"])
@pytest.mark.parametrize("N", [40, 45], ids=["whole", "partial"])
def test_channel_kernel(rng, channel_tuning, dtype, hops, per_head, N):
    # D=16: a head on 2 (16-bit, 8 channels per thread) or 4 (float32) threads, so the head sum
    # of da runs; block_len 8 with 4-step groups (two checkpoints per block); N=40: whole blocks
    # (the unclamped specialisation), 45: a partial last block
    channel_tuning["channel_unroll"] = 4
    check_backward(rng, "BLHD", per_head, dtype, hops, block_len=8, D=16, N=N,
                   x0_given=per_head, variant="channel")


@pytest.mark.parametrize("block_len,unroll", [(16, 8), (32, 8), (64, 4), (8, 16)])
def test_channel_block_lengths(rng, channel_tuning, block_len, unroll):
    # groups of 8 or 4 steps over longer blocks (chunks of one block); 16-step groups over
    # 8-step blocks take the clamped path
    channel_tuning["channel_unroll"] = unroll
    check_backward(rng, "BLHD", True, BF16, 1, block_len=block_len, H=1, D=16,
                   N=3 * block_len, variant="channel")


def test_channel_mixed_dy_and_lanes(rng, channel_tuning):
    # dy float32 with bfloat16 a, u (two 16-byte loads of dy per step), 8 threads per head, no
    # dcarry, two batches
    check_backward(rng, "BLHD", True, BF16, 1, block_len=8, B=2, H=1, D=64, N=24,
                   dy_dtype=np.float32, want_dcarry=False, variant="channel")


# The staged BLHD kernel (swr_backward_staged.py): the channel kernel's walk with each block's u and
# dy copied into shared memory (cp.async on a GPU, plain copies in the simulator)


def staged_name(a, u, dy, block_len, hops, x0):
    import importlib

    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    X = xp()
    call = mod._launch_args(X.asarray(a), X.asarray(u), X.asarray(dy), X.asarray(u).copy(),
                            X.asarray(a).copy(), "BLHD", block_len, hops, X.asarray(x0), None,
                            "channel", None, 128, None)
    return call[0].py_func.__name__, call[4]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("hops", [0, 1])
def test_staged_kernel(rng, channel_tuning, dtype, hops):
    # block_len 16 with 8-step groups (two checkpoints per block), 64-step chunks: the carrier
    # and q cross chunk ends, and the copies of blocks j-1 / j-2 land in the slots freed by
    # block j's reverse sweep, through both slot orders; 3 heads (16-bit a: both halves of its
    # 4-byte copies); bitwise the numbers of the plain channel kernel (the same sums in the
    # same order)
    channel_tuning["staged"] = True
    channel_tuning["staged_chunk_steps"] = 64
    block_len, N = 16, 112
    a, u, dy, x0 = make_case(rng, "BLHD", True, dtype, H=3, D=16, N=N)
    name, shared = staged_name(a, u, dy, block_len, hops, x0)
    assert name.startswith("swr_backward_staged")
    assert shared > 0
    got = run_backward(a, u, dy, "BLHD", block_len, hops, x0, variant="channel")
    da_r, du_r, dx0_r = expected(a, u, dy, "BLHD", True, block_len, hops, x0)
    assert_close(time_last(got[1], "BLHD"), du_r, dtype, "du")
    assert_close(time_last(got[0], "BLHD"), da_r, dtype, "da")
    assert_close(got[2], dx0_r if hops else np.zeros_like(dx0_r), np.float32, "dcarry")
    channel_tuning["staged"] = False
    plain = run_backward(a, u, dy, "BLHD", block_len, hops, x0, variant="channel")
    for g, p, what in zip(got, plain, ("da", "du", "dcarry")):
        np.testing.assert_array_equal(g.view(np.uint8), p.view(np.uint8), err_msg=what)


@pytest.mark.parametrize("block_len,D", [(8, 64), (16, 16), (16, 32)])
def test_staged_kernel_shapes(rng, channel_tuning, block_len, D):
    # one group per block (l=8) or two (l=16); 8, 2 or 4 threads per head; dy float32 with
    # bfloat16 a, u (two 16-byte copies of dy per step); two batches, no dcarry
    channel_tuning["staged"] = True
    channel_tuning["staged_chunk_steps"] = 2 * block_len
    dy_dtype = np.float32 if block_len != 16 or D == 32 else None
    a, u, dy, x0 = make_case(rng, "BLHD", True, BF16, B=2, H=1, D=D, N=5 * block_len,
                             dy_dtype=dy_dtype)
    assert staged_name(a, u, dy, block_len, 1, x0)[0].startswith("swr_backward_staged")
    check_backward(rng, "BLHD", True, BF16, 1, block_len=block_len, B=2, H=1, D=D,
                   N=5 * block_len, dy_dtype=dy_dtype, want_dcarry=False, variant="channel")


def test_staged_kernel_where_it_does_not_fit(rng, channel_tuning):
    # per-channel coefficients, a partial last block, block_len 64, block_len 32 (not in the
    # staged kernel's BLOCK_LENS): the plain channel kernel
    channel_tuning["staged"] = True
    for per_head, N, block_len in ((False, 32, 16), (True, 36, 16), (True, 128, 64),
                                   (True, 64, 32)):
        a, u, dy, x0 = make_case(rng, "BLHD", per_head, BF16, D=16, N=N)
        name, shared = staged_name(a, u, dy, block_len, 1, x0)
        assert name.startswith("swr_backward_channel") and shared == 0, (per_head, N)
    # 16-bit a two bytes off a 4-byte boundary (the staged kernel copies it 4 bytes at a time)
    a, u, dy, x0 = make_case(rng, "BLHD", True, BF16, D=16, N=32)
    X = xp()
    buf = X.zeros(a.size + 1, a.dtype)
    shifted = buf[1:].reshape(a.shape)
    shifted[...] = X.asarray(a)
    assert staged_name(a, u, dy, 16, 1, x0)[0].startswith("swr_backward_staged")
    name, shared = staged_name(shifted, u, dy, 16, 1, x0)
    assert name.startswith("swr_backward_channel") and shared == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("per_head", [True, False], ids=["head", "channel"])
def test_rows_kernel(rng, channel_tuning, dtype, hops, per_head):
    # BHDL: a thread per channel row; D=4 lanes per head run the reduce-scatter of da over
    # 16 (16-bit: two 8-step vectors) or 8 (float32) steps; 16-step chunks of 16-step blocks:
    # the carrier and q cross every chunk end; two batches
    channel_tuning["rows_chunk_steps"] = 16
    check_backward(rng, "BHDL", per_head, dtype, hops, block_len=16, B=2, D=4, N=48,
                   x0_given=per_head, variant="channel")


@pytest.mark.parametrize("depth,block_len,D", [(1, 8, 8), (2, 32, 2), (2, 64, 32)])
def test_rows_kernel_shapes(rng, channel_tuning, depth, block_len, D):
    # one or two vectors per group, several groups per block (checkpoints), 2 to 32 lanes per
    # head (from two rounds of halving to single-value rounds), dy float32 with bfloat16 a, u
    channel_tuning["rows_depth"] = depth
    channel_tuning["rows_chunk_steps"] = 2 * block_len
    check_backward(rng, "BHDL", True, BF16, 1, block_len=block_len, H=1, D=D,
                   N=3 * block_len, dy_dtype=np.float32 if D == 2 else None, variant="channel")


def test_channel_kernel_is_chosen(rng, monkeypatch):
    """Under TUNING with the BHDL row scan off (test_row_scan_kernel checks where it runs)."""
    import importlib

    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    monkeypatch.setitem(mod.TUNING, "row_scan", False)
    X = xp()
    names = {}
    for layout in ("BLHD", "BHDL"):
        for D, N in ((16, 32), (3, 32), (16, 36)):
            a, u, dy, x0 = make_case(rng, layout, True, BF16, D=D, N=N)
            aX, uX, dyX = X.asarray(a), X.asarray(u), X.asarray(dy)
            kernel = mod._launch_args(aX, uX, dyX, uX.copy(), aX.copy(), layout, 16, 1,
                                      X.asarray(x0), None, "auto", None, 128, None)[0]
            names[layout, D, N] = kernel.py_func.__name__
    # whole blocks, per head: the staged kernel (TUNING's default mode)
    assert names["BLHD", 16, 32].startswith("swr_backward_staged_bf16_dy_bf16_per_head_hops1")
    assert names["BLHD", 16, 36].startswith("swr_backward_channel")  # clamped partial block
    assert not names["BLHD", 3, 32].startswith("swr_backward_channel")  # no vector fits D=3
    assert names["BHDL", 16, 32].startswith("swr_backward_rows_bf16_dy_bf16_per_head_hops1")
    assert "rows" not in names["BHDL", 3, 32]  # D=3: no power of two of lanes per head
    assert "rows" not in names["BHDL", 16, 36]  # rows need whole 8-step vectors
    # BHDL takes the row kernel only where it measured faster than the lane-walk kernel (16-bit
    # u, per head), and neither layout for hops=0
    cases = [("BHDL", BF16, 0, 16, True), ("BHDL", np.float32, 1, 16, True),
             ("BHDL", BF16, 1, 8, True), ("BHDL", BF16, 1, 16, False), ("BLHD", BF16, 0, 16, True)]
    for layout, dtype, hops, block_len, per_head in cases:
        a, u, dy, x0 = make_case(rng, layout, per_head, dtype, D=16, N=32)
        aX, uX, dyX = X.asarray(a), X.asarray(u), X.asarray(dy)
        kernel = mod._launch_args(aX, uX, dyX, uX.copy(), aX.copy(), layout, block_len, hops,
                                  X.asarray(x0), None, "auto", None, 128, None)[0]
        assert "walk" in kernel.py_func.__name__, (layout, dtype, hops, block_len, per_head)
    a, u, dy, x0 = make_case(rng, "BLHD", True, BF16, D=16, N=64)  # BLHD hops=0 from l=32
    aX, uX, dyX = X.asarray(a), X.asarray(u), X.asarray(dy)
    kernel = mod._launch_args(aX, uX, dyX, uX.copy(), aX.copy(), "BLHD", 32, 0, X.asarray(x0),
                              None, "auto", None, 128, None)[0]
    # (block_len 32: the plain channel kernel, over the staged kernel's default block_len cap)
    assert kernel.py_func.__name__.startswith("swr_backward_channel"), kernel.py_func.__name__
    # asked for by name, the row kernel still runs where it fits
    a, u, dy, x0 = make_case(rng, "BHDL", True, BF16, D=16, N=32)
    aX, uX, dyX = X.asarray(a), X.asarray(u), X.asarray(dy)
    kernel = mod._launch_args(aX, uX, dyX, uX.copy(), aX.copy(), "BHDL", 16, 0, X.asarray(x0),
                              None, "channel", None, 128, None)[0]
    assert "rows" in kernel.py_func.__name__


def test_channel_kernel_where_the_lane_walk_does_not_fit(rng, monkeypatch):
    """hops=0 prefers the lane walk, but takes the channel kernel rather than the general one
    where the lane walk does not fit."""
    import importlib

    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    monkeypatch.setattr(mod, "walk_plan", lambda *args: None)
    monkeypatch.setitem(mod.TUNING, "row_scan", False)
    X = xp()
    for layout in ("BLHD", "BHDL"):
        a, u, dy, x0 = make_case(rng, layout, True, BF16, D=16, N=32)
        aX, uX, dyX = X.asarray(a), X.asarray(u), X.asarray(dy)
        kernel = mod._launch_args(aX, uX, dyX, uX.copy(), aX.copy(), layout, 16, 0,
                                  X.asarray(x0), None, "auto", None, 128, None)[0]
        name = kernel.py_func.__name__
        assert name.startswith(("swr_backward_staged", "swr_backward_rows")), name


# ----------------------------------------------------------------------------------------------
# The general kernel: odd head dims, any block length, unaligned arrays
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("per_head", [True, False], ids=["head", "channel"])
def test_general_kernel(rng, layout, dtype, hops, per_head):
    check_backward(rng, layout, per_head, dtype, hops, block_len=4, B=2, D=3, N=21,
                   x0_given=not per_head, variant="general")


@pytest.mark.parametrize("block_len", [1, 2, 128, 256])
def test_general_block_lengths(rng, block_len):
    check_backward(rng, "BLHD", True, np.float32, 1, block_len=block_len, D=3,
                   N=block_len * 2 + 3)


def test_auto_falls_back_for_odd_shapes(rng):
    # D=3 per head cannot share a word between heads, N=21 is no whole number of BHDL words
    nk = kernels()
    assert nk.walk_plan("BLHD", True, "bf16", "bf16", 16, 21, 2, 3) is None
    assert nk.walk_plan("BHDL", False, "bf16", "bf16", 16, 21, 2, 4) is None
    assert nk.walk_plan("BLHD", True, "bf16", "bf16", 16, 8192, 128, 16) == (4, 4)
    assert nk.walk_plan("BHDL", True, "bf16", "bf16", 16, 8192, 128, 16) == (2, 16)
    check_backward(rng, "BHDL", False, BF16, 1, block_len=8, D=4, N=21)


def test_unaligned_arrays_use_the_general_kernel(rng):
    X = xp()
    a, u, dy, x0 = make_case(rng, "BLHD", False, np.float32, D=4, N=19)
    # the same values at an address 4 bytes past an 8-byte boundary
    u_off = X.empty(u.size + 1, np.float32)[1:].reshape(u.shape)
    u_off[...] = X.asarray(u)
    assert kernels().walk_plan("BLHD", False, "f32", "f32", 8, 19, 2, 4, (u_off,)) is None
    du = poisoned(u.shape, u.dtype)
    da = poisoned(a.shape, a.dtype)
    kernels().swr_backward.swr_backward(X.asarray(a), u_off, X.asarray(dy), du, da, layout="BLHD",
                           block_len=8, hops=1, carry=X.asarray(x0))
    da_r, du_r, _ = expected(a, u, dy, "BLHD", False, 8, 1, x0)
    assert_close(time_last(to_np(du), "BLHD"), du_r, np.float32, "du")
    assert_close(time_last(to_np(da), "BLHD"), da_r, np.float32, "da")


@pytest.mark.parametrize("variant", ["walk", "general"])
@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
def test_empty_sequence(layout, variant):
    X = xp()
    shape = (1, 2, 4, 0) if layout == "BHDL" else (1, 0, 2, 4)
    a = X.zeros(shape[:3] if layout == "BHDL" else shape[:3], np.float32)
    u = X.zeros(shape, np.float32)
    du = X.zeros(shape, np.float32)
    da = X.zeros(a.shape, np.float32)
    dcarry = poisoned((1, 2, 4), np.float32)
    kernels().swr_backward.swr_backward(a, u, u, du, da, layout=layout, block_len=16, hops=1,
                           carry=X.zeros((1, 2, 4), np.float32), dcarry=dcarry, variant=variant)
    assert (to_np(dcarry) == 0).all()


# ----------------------------------------------------------------------------------------------
# General hops: the block-level pieces
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("per_head", [True, False], ids=["head", "channel"])
def test_block_grad_sums(rng, layout, per_head):
    X = xp()
    a, _, dy, _ = make_case(rng, layout, per_head, BF16, D=3, N=23)
    q = poisoned((1, 2, 3, 6), np.float32)
    kernels().block_grad_sums(X.asarray(a), X.asarray(dy), q, layout=layout, block_len=4)
    want = ref.block_grad_sums(time_last(a, layout, per_head), time_last(dy, layout), 4)
    assert_close(to_np(q), want, np.float32, "q")


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
@pytest.mark.parametrize("hops", [2, 3, None])
@pytest.mark.parametrize("per_head", [True, False], ids=["head", "channel"])
def test_backward_blocks(rng, layout, hops, per_head):
    """swr_backward_blocks with S, dv, dC from the reference's block algebra == swr_vjp."""
    X = xp()
    L, N = 4, 22
    a, u, dy, x0 = make_case(rng, layout, per_head, np.float32, D=3, N=N)
    at, ut, dyt = time_last(a, layout, per_head), time_last(u, layout), time_last(dy, layout)
    v, C = ref.block_carriers(at, ut, L)
    q = ref.block_grad_sums(at, dyt, L)
    S = ref.block_carry(v, C, hops, ref.initial_carriers(v.shape[:-1], hops, x0))
    dv, dC, _ = ref.block_adjoints(v, C, q, hops, x0)
    f32 = [X.asarray(np.ascontiguousarray(x, dtype=np.float32)) for x in (S, dv, dC)]
    du = poisoned(u.shape, u.dtype)
    da = poisoned(a.shape, a.dtype)
    kernels().swr_backward_blocks(X.asarray(a), X.asarray(u), X.asarray(dy), du, da,
                                  layout=layout, block_len=L, block_carry=f32[0],
                                  block_dv=f32[1], block_dC=f32[2])
    da_r, du_r, _ = ref.swr_vjp(at, ut, dyt, block_len=L, hops=hops, x0=x0)
    if per_head:
        da_r = da_r.sum(axis=2)
    assert_close(time_last(to_np(du), layout), du_r, np.float32, "du")
    assert_close(time_last(to_np(da), layout), da_r, np.float32, "da")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(5, 70), (1, 1), (3, 32), (6, 0)])
def test_linear_scan(rng, reverse, shape):
    X = xp()
    M, n = shape
    coef = rng.uniform(-1.2, 1.2, shape).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    init = rng.standard_normal(M).astype(np.float32)
    want = np.zeros(shape)
    s = init.astype(np.float64)
    for i in (range(n - 1, -1, -1) if reverse else range(n)):
        s = coef[:, i] * s + x[:, i]
        want[:, i] = s
    out = poisoned(shape, np.float32)
    kernels().linear_scan(X.asarray(coef), X.asarray(x), out, X.asarray(init), reverse=reverse)
    if n:
        assert_close(to_np(out), want, np.float32, "out")


# ----------------------------------------------------------------------------------------------
# The BHDL row scan (swr_backward_rowscan): lanes along time, a warp per (head, chunk)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def row_scan_tuning():
    import importlib

    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    saved = dict(mod.TUNING)
    yield mod.TUNING
    for k, v in saved.items():
        mod.TUNING[k] = v


@pytest.mark.parametrize("dtype,hops,block_len,N,chunk_blocks,stages", [
    (np.dtype(ml_dtypes.bfloat16), 1, 16, 800, 0, 0),  # several iterations of one chunk
    (np.dtype(ml_dtypes.bfloat16), 1, 16, 1000, 15, 0),  # chunks of one iteration, partial block
    (np.dtype(ml_dtypes.bfloat16), 0, 16, 520, 4, 0),
    (np.dtype(np.float32), 1, 8, 264, 7, 0),  # two lanes per block (vec 4)
    (np.dtype(np.float16), 1, 32, 520, 3, 0),  # four lanes per block
    (np.dtype(ml_dtypes.bfloat16), 1, 8, 400, 31, 0),  # one lane per block
    (np.dtype(np.float32), 0, 64, 320, 0, 0),  # sixteen lanes per block
    (np.dtype(np.float32), 1, 64, 320, 2, 0),  # the block before a chunk: two rows a pass
    # the cp.async ring: fewer slots than rows (it wraps within and across iterations), as many
    (np.dtype(ml_dtypes.bfloat16), 1, 16, 800, 0, 2),
    (np.dtype(ml_dtypes.bfloat16), 1, 16, 1000, 15, 4),
    (np.dtype(np.float32), 0, 8, 264, 7, 2),
])
def test_row_scan_kernel(rng, row_scan_tuning, dtype, hops, block_len, N, chunk_blocks, stages):
    """The BHDL row scan against the reference: du, the per-head da summed over the warp's rows,
    dcarry; chunks of whole and part iterations (each after the first walks the block before
    it), a partial last block, one to sixteen lanes per block; loads through registers or
    through the shared-memory ring."""
    import importlib

    row_scan_tuning["row_scan_chunk_blocks"] = chunk_blocks
    row_scan_tuning["row_scan_stages"] = stages
    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    a, u, dy, x0 = make_case(rng, "BHDL", True, dtype, B=1, H=2, D=4, N=N)
    name = mod._launch_args(a, u, dy, u.copy(), a.copy(), "BHDL", block_len, hops,
                            np.zeros((1, 2, 4), np.float32), None, "auto", None, 128,
                            None)[0].py_func.__name__  # fmt: skip
    assert "row_scan" in name and ("stages" in name) == (stages > 0), name
    check_backward(rng, "BHDL", True, dtype, hops, block_len=block_len, D=4, N=N)


def _table_cases(layout):
    """Backward cases over the axes the choice reads (dtypes, coefficients, hops, block
    lengths, lengths, head dims, alignment)."""
    import itertools

    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    kinds = (("bf16", "bf16"), ("f32", "f32"), ("bf16", "f32"))
    for (ku, kd), per_head, hops, block_len, N, D, shift in itertools.product(
            kinds, (True, False), (0, 1), (8, 16, 32, 64), (64, 60, 1024), (2, 3, 16, 32, 256),
            (0, 2, 4, 8)):
        yield mod.Case(layout, per_head, ku, kd, hops, block_len, N, 4, D,
                       (0, shift, 0, 0, 0))


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
def test_every_backward_table_row_is_chosen(layout):
    """Under the default TUNING every row of the backward's table is the first that fits for
    some case (a row no input reaches would be dead code)."""
    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    rows = mod.BACKWARD[layout]
    chosen = set()
    for c in _table_cases(layout):
        first = next(i for i, (_, fits, _) in enumerate(rows) if fits(c))
        chosen.add(first)
        assert mod.choose(c)[0] == rows[first][0]
    missing = [rows[i][0] for i in range(len(rows)) if i not in chosen]
    assert not missing, f"{layout}: rows chosen by no case: {missing}"
