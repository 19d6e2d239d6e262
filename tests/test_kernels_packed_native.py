"""The native packed kernels (numba_kernels/packed_walk.py: BLHD, hops 0/1, no padded image)
through swr_array/packed.py's GPU path, with NumPy arrays under the CUDA simulator or CuPy
arrays on a GPU, against the per-sequence float64 reference."""

from __future__ import annotations

import dataclasses
import zlib

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import gpu_available
from hypothesis import given, settings
from hypothesis import strategies as st

from swr_array import _checks, numba_kernels, packed, reference
from swr_array.ops import from_time_last, to_time_last

SIM = bool(numba.config.ENABLE_CUDASIM)
pytestmark = pytest.mark.skipif(not (SIM or gpu_available()),
                                reason="needs the CUDA simulator or a GPU")
BF16 = np.dtype(ml_dtypes.bfloat16)
packed_walk = numba_kernels.packed_walk
packed_scan = numba_kernels.packed_scan
packed_scan_bwd = numba_kernels.packed_scan_bwd


def xp():
    if SIM:
        return np
    import cupy

    return cupy


def to_np(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _no_image(*args, **kwargs):
    raise AssertionError("the padded image was built: the native path did not run")


def run_native(a, u, dy, cu, *, block_len, hops, x0, chunk, monkeypatch, variant="rblocks"):
    """Forward and backward through the native kernels of one BLHD family (the padded path is
    made to fail)."""
    X = xp()
    a_d, u_d, dy_d, cu_d = (X.asarray(v) for v in (a, u, dy, cu))
    x0_d = None if x0 is None else X.asarray(x0)
    p = _checks.check_swr(a_d, u_d, block_len=block_len, hops=hops, layout="BLHD")
    if SIM:
        p = dataclasses.replace(p, backend="cupy")
    with monkeypatch.context() as m:
        m.setattr(packed, "_padded_inputs", _no_image)
        m.setattr(packed_walk, "FORWARD_CHUNK", chunk)
        m.setattr(packed_walk, "BACKWARD_CHUNK", chunk)
        m.setattr(packed_walk, "RBLOCKS_CHUNK", chunk)
        m.setattr(packed_walk, "_VARIANT", [variant])
        y = X.asarray(np.full(u.shape, np.nan, dtype=u.dtype))  # poisoned: every token written
        y = packed.forward(a_d, u_d, p, cu_d, x0=x0_d, out=y, device=True)
        g = packed.backward(a_d, u_d, dy_d, p, cu_d, x0=x0_d, device=True)
    return to_np(y), [None if v is None else to_np(v) for v in g]


def check_against_reference(lens, *, per_head, H, D, bl, hops, with_x0, dtype, chunk, seed,
                            monkeypatch, variant="rblocks"):
    rng = np.random.default_rng(seed)
    S = len(lens)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1])
    us = (1, T, H, D)
    a_s = (1, T, H) if per_head else us
    a = rng.uniform(-1.05, 1.05, a_s).astype(np.float32).astype(dtype)
    u = rng.standard_normal(us).astype(np.float32).astype(dtype)
    dy = rng.standard_normal(us).astype(np.float32).astype(dtype)
    x0 = rng.standard_normal((S, H, D)).astype(np.float32) if with_x0 else None
    y, (da, du, dx0) = run_native(a, u, dy, cu, block_len=bl, hops=hops, x0=x0, chunk=chunk,
                                  monkeypatch=monkeypatch, variant=variant)
    at, ut = to_time_last(a, "BLHD", per_head), to_time_last(u, "BLHD", False)
    yr = from_time_last(reference.swr_packed(at, ut, cu, block_len=bl, hops=hops, x0=x0), "BLHD")
    rda, rdu, rdx0 = reference.swr_vjp_packed(at, ut, to_time_last(dy, "BLHD", False), cu,
                                              block_len=bl, hops=hops, x0=x0)
    if per_head:
        rda = rda.sum(axis=2, keepdims=True)
    rda, rdu = from_time_last(rda, "BLHD", per_head), from_time_last(rdu, "BLHD")
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


@settings(max_examples=12 if SIM else 40, deadline=None)
@given(lens=st.lists(st.integers(0, 19), min_size=1, max_size=8).filter(lambda v: sum(v) > 0),
       bl=st.sampled_from([1, 4, 8, 16, 32]), hops=st.sampled_from([0, 1]),
       per_head=st.booleans(), with_x0=st.booleans(), chunk=st.sampled_from([3, 8, 64]),
       variant=st.sampled_from(["rblocks", "blocks"]))
def test_native_matches_reference_for_any_lengths(lens, bl, hops, per_head, with_x0, chunk,
                                                  variant):
    """Lengths 0, 1, below, at and above block_len, chunks that cut blocks and sequences, the
    block walks of both families (block_len 32: "blocks" hands the backward to the token
    walk)."""
    seed = zlib.crc32(repr((lens, bl, hops, per_head, with_x0, chunk, variant)).encode())
    with pytest.MonkeyPatch.context() as mp:
        check_against_reference(lens, per_head=per_head, H=2, D=2, bl=bl, hops=hops,
                                with_x0=with_x0, dtype=np.float32, chunk=chunk, seed=seed,
                                monkeypatch=mp, variant=variant)


VECTOR_CASES = [  # per_head, hops, x0, dtype, H, D, family: channel vectors wider than one
    (True, 1, True, np.float32, 2, 4, "rblocks"),  # forward vec 4 (16 bytes), backward vec 2
    (True, 1, True, BF16, 2, 8, "rblocks"),  # forward vec 8, backward vec 4 (lph 2)
    (False, 1, False, BF16, 1, 8, "rblocks"),  # per channel, vectors of a too
    (True, 0, True, BF16, 1, 16, "rblocks"),  # hops 0: x0 does not enter, dx0 = 0
    (True, 1, True, BF16, 2, 8, "blocks"),  # backward vec 2 (lph 4)
    (False, 1, False, BF16, 1, 8, "blocks"),
]


@pytest.mark.parametrize("per_head, hops, with_x0, dtype, H, D, variant", VECTOR_CASES)
def test_native_vector_paths(rng, monkeypatch, per_head, hops, with_x0, dtype, H, D, variant):
    lens = [5, 0, 1, 9, 8, 3]
    seed = int(rng.integers(1 << 30))
    check_against_reference(lens, per_head=per_head, H=H, D=D, bl=4, hops=hops,
                            with_x0=with_x0, dtype=dtype, chunk=5, seed=seed,
                            monkeypatch=monkeypatch, variant=variant)


@pytest.mark.parametrize("lens, bl, chunk", [
    ([4, 1], 8, 3),  # the chunk [3, 5) holds no block of sequence 0, only sequence 1's start
    ([0, 2, 0, 0, 9, 1], 4, 5),
    ([17, 16, 15], 16, 16),
])
def test_native_chunks_starting_inside_blocks(rng, monkeypatch, lens, bl, chunk):
    for hops in (0, 1):
        check_against_reference(lens, per_head=False, H=2, D=2, bl=bl, hops=hops, with_x0=True,
                                dtype=np.float32, chunk=chunk, seed=int(rng.integers(1 << 30)),
                                monkeypatch=monkeypatch)


def test_native_many_tiny_sequences(rng, monkeypatch):
    """Many sequences of 0..2 tokens: every thread walks across several sequence starts."""
    lens = list(rng.integers(0, 3, 40))
    lens[0] = 1
    check_against_reference(lens, per_head=True, H=1, D=2, bl=4, hops=1, with_x0=True,
                            dtype=np.float32, chunk=7, seed=int(rng.integers(1 << 30)),
                            monkeypatch=monkeypatch)


@pytest.mark.parametrize("bad", [[0, 5, 3, 9], [1, 4, 6, 9], [0, 4, 6, 8]])
def test_native_invalid_cu_poisons_every_output(rng, monkeypatch, bad):
    """A device cu that decreases, does not start at 0 or does not end at T gives NaN in y, da,
    du and dx0 (its values are not read by the host)."""
    cu = np.array(bad, np.int64)
    a = rng.uniform(-1, 1, (1, 9, 2)).astype(np.float32)
    u = rng.standard_normal((1, 9, 2, 2)).astype(np.float32)
    x0 = rng.standard_normal((3, 2, 2)).astype(np.float32)
    y, (da, du, dx0) = run_native(a, u, u, cu, block_len=4, hops=1, x0=x0, chunk=4,
                                  monkeypatch=monkeypatch)
    for v in (y, da, du, dx0):
        assert np.isnan(v).all()


def test_native_fits_only_hops_0_1():
    """Other hops keep the padded image; past the block walks' block_len the BLHD backward is
    the token walk; per head, the lanes of a head must split into a power of two up to 32."""
    u = np.zeros((1, 4, 2, 2), np.float32)
    a = np.zeros((1, 4, 2), np.float32)
    cu = np.array([0, 4], np.int32)
    p = _checks.check_swr(a, u, block_len=4, hops=1, layout="BLHD")
    assert packed.native_forward_fits(p, cu) and packed.native_backward_fits(p, cu, a, u, u)
    for change in (dict(hops=2), dict(hops=None)):
        q = dataclasses.replace(p, **change)
        assert not packed.native_forward_fits(q, cu)
    q = dataclasses.replace(p, layout="BHDL")
    ub = np.zeros((1, 2, 2, 4), np.float32)
    ab = np.zeros((1, 2, 4), np.float32)
    assert packed.native_forward_fits(q, cu) and packed.native_backward_fits(q, cu, ab, ub, ub)
    q = dataclasses.replace(p, block_len=64)  # past the block walks' backward: the token walk
    assert packed.native_forward_fits(q, cu) and packed.native_backward_fits(q, cu, a, u, u)
    assert packed_walk.backward_family(a, u, u, 64) == ("tokens", 1, 2)
    assert packed_walk.backward_family(a, u, u, 16) == ("rblocks", 2, 1)
    with packed_walk.variant("blocks"):
        assert packed_walk.backward_family(a, u, u, 32) == ("tokens", 1, 2)
        assert packed_walk.backward_family(a, u, u, 16) == ("blocks", 1, 2)
    u6 = np.zeros((1, 4, 2, 6), np.float32)  # 6 lanes a head: no shuffle sum fits
    assert not packed.native_backward_fits(p, cu, a, u6, u6)
    assert not packed.native_forward_fits(p, np.array([0], np.int32))


@pytest.mark.parametrize("kinds, per_head, D, want", [
    (("bf16", "bf16"), True, 16, (2, 8)),
    (("bf16", "bf16"), True, 64, (2, 32)),
    (("bf16", "bf16"), True, 128, (4, 32)),
    (("f32", "f32"), True, 16, (1, 16)),
    (("f32", "f32"), True, 128, (4, 32)),
    (("bf16", "f32"), True, 8, (1, 8)),
    (("bf16", "bf16"), True, 6, None),  # 3 or 6 lanes a head: not a power of two
    (("bf16", "bf16"), True, 256, None),  # more than 32 lanes a head even at vec 4
    (("bf16", "bf16"), False, 3, (2, 1)),  # per channel: vectors may cross heads
])
def test_backward_config(kinds, per_head, D, want):
    assert packed_walk.backward_config(*kinds, per_head, 2, D, 16) == want
    # misaligned pointers: vec 1 only
    got = packed_walk.backward_config(*kinds, per_head, 2, D, 16, lambda v: False)
    assert got == (None if D > 32 or D == 6 else (1, D if per_head else 1))


# ----------------------------------------------------------------------------------------------
# the token walks (packed_walk.VARIANTS "tokens"; layout BHDL always)
# ----------------------------------------------------------------------------------------------


def tokens_case(lens, *, layout, per_head, H, D, bl, hops, with_x0, dtype, chunk, seed,
                monkeypatch, scan=False):
    """Forward and backward of the token walks (BHDL with ``scan``: the warp-scan kernels where
    they fit) against the per-sequence reference."""
    rng = np.random.default_rng(seed)
    S = len(lens)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1])
    us = (1, T, H, D) if layout == "BLHD" else (1, H, D, T)
    a_s = ((1, T, H) if layout == "BLHD" else (1, H, T)) if per_head else us
    a = rng.uniform(-1.05, 1.05, a_s).astype(np.float32).astype(dtype)
    u = rng.standard_normal(us).astype(np.float32).astype(dtype)
    dy = rng.standard_normal(us).astype(np.float32).astype(dtype)
    x0 = rng.standard_normal((S, H, D)).astype(np.float32) if with_x0 else None
    X = xp()
    a_d, u_d, dy_d, cu_d = (X.asarray(v) for v in (a, u, dy, cu))
    x0_d = None if x0 is None else X.asarray(x0)
    p = _checks.check_swr(a_d, u_d, block_len=bl, hops=hops, layout=layout)
    if SIM:
        p = dataclasses.replace(p, backend="cupy")
    with monkeypatch.context() as m, packed_walk.variant("tokens"):
        m.setattr(packed, "_padded_inputs", _no_image)
        m.setattr(packed_walk, "TOKENS_CHUNK", chunk)
        m.setattr(packed_walk, "BHDL_TOKENS_CHUNK", {"fwd": chunk, "bwd": chunk})
        m.setattr(packed_walk, "BHDL_TILE", False)
        m.setattr(packed_walk, "BHDL_SCAN", scan)
        m.setattr(packed_walk, "BHDL_SCAN_BWD", scan)
        y = X.asarray(np.full(u.shape, np.nan, dtype=u.dtype))  # poisoned: every token written
        y = to_np(packed.forward(a_d, u_d, p, cu_d, x0=x0_d, out=y, device=True))
        da, du, dx0 = (None if v is None else to_np(v) for v in packed.backward(
            a_d, u_d, dy_d, p, cu_d, x0=x0_d, device=True))
    at, ut = to_time_last(a, layout, per_head), to_time_last(u, layout, False)
    want = from_time_last(reference.swr_packed(at, ut, cu, block_len=bl, hops=hops, x0=x0),
                          layout)
    rda, rdu, rdx0 = reference.swr_vjp_packed(at, ut, to_time_last(dy, layout, False), cu,
                                              block_len=bl, hops=hops, x0=x0)
    if per_head:
        rda = rda.sum(axis=2, keepdims=True)
    rda, rdu = from_time_last(rda, layout, per_head), from_time_last(rdu, layout)
    tol = 1e-4 if dtype == np.float32 else 4e-2
    assert y.dtype == dtype and da.dtype == dtype and du.dtype == dtype
    for got, ref in ((y, want), (da, rda), (du, rdu)):
        np.testing.assert_allclose(got.astype(np.float64), ref, rtol=tol,
                                   atol=tol * (1 + np.abs(ref).max()))
    if with_x0:
        assert dx0.shape == (S, H, D) and dx0.dtype == np.float32
        np.testing.assert_allclose(dx0, rdx0, rtol=tol, atol=tol * (1 + np.abs(rdx0).max()))
    else:
        assert dx0 is None


@settings(max_examples=12 if SIM else 40, deadline=None)
@given(lens=st.lists(st.integers(0, 19), min_size=1, max_size=8).filter(lambda v: sum(v) > 0),
       layout=st.sampled_from(["BLHD", "BHDL"]), bl=st.sampled_from([1, 4, 8, 16, 32]),
       hops=st.sampled_from([0, 1]), per_head=st.booleans(), with_x0=st.booleans(),
       chunk=st.sampled_from([4, 8, 16, 64]))
def test_tokens_match_reference(lens, layout, bl, hops, per_head, with_x0, chunk):
    """The token walks, forward and backward: lengths 0, 1, below, at and above block_len,
    chunks cutting blocks and sequences (BHDL: rows of any T, one-token accesses)."""
    seed = zlib.crc32(repr((lens, layout, bl, hops, per_head, with_x0, chunk)).encode())
    with pytest.MonkeyPatch.context() as mp:
        tokens_case(lens, layout=layout, per_head=per_head, H=2, D=2, bl=bl, hops=hops,
                    with_x0=with_x0, dtype=np.float32, chunk=chunk, seed=seed, monkeypatch=mp)


@pytest.mark.parametrize("layout, per_head, hops, with_x0, dtype, lens", [
    ("BHDL", True, 1, True, np.float32, [5, 0, 1, 9, 8, 1]),  # T = 24: 4-token accesses
    ("BHDL", False, 1, False, BF16, [13, 0, 3, 16, 0]),  # T = 32: 8-token accesses
    ("BHDL", True, 0, True, BF16, [7, 9, 1, 2, 5]),  # T = 24: 8-token accesses, hops 0
    ("BLHD", True, 1, True, BF16, [5, 0, 1, 9, 8, 3]),  # 8 channels an access
])
def test_tokens_vector_paths(rng, monkeypatch, layout, per_head, hops, with_x0, dtype,
                                     lens):
    tokens_case(lens, layout=layout, per_head=per_head, H=2, D=8, bl=4, hops=hops,
                with_x0=with_x0, dtype=dtype, chunk=8, seed=int(rng.integers(1 << 30)),
                monkeypatch=monkeypatch)


def test_tokens_many_tiny_sequences(rng, monkeypatch):
    """Many sequences of 0..2 tokens: several sequence starts inside one group of tokens."""
    lens = list(rng.integers(0, 3, 40))
    lens[0] = 1
    for layout in ("BLHD", "BHDL"):
        tokens_case(lens, layout=layout, per_head=True, H=1, D=2, bl=4, hops=1, with_x0=True,
                    dtype=np.float32, chunk=16, seed=int(rng.integers(1 << 30)),
                    monkeypatch=monkeypatch)


@pytest.mark.parametrize("bad", [[0, 5, 3, 9], [1, 4, 6, 9], [0, 4, 6, 8]])
def test_tokens_invalid_cu_poisons_every_output(rng, monkeypatch, bad):
    """The token walks (BHDL) give NaN in y, da, du and dx0 for an invalid device cu."""
    cu = np.array(bad, np.int64)
    X = xp()
    a = rng.uniform(-1, 1, (1, 2, 9)).astype(np.float32)
    u = rng.standard_normal((1, 2, 2, 9)).astype(np.float32)
    x0 = rng.standard_normal((3, 2, 2)).astype(np.float32)
    a_d, u_d, cu_d, x0_d = (X.asarray(v) for v in (a, u, cu, x0))
    p = _checks.check_swr(a_d, u_d, block_len=4, hops=1, layout="BHDL")
    if SIM:
        p = dataclasses.replace(p, backend="cupy")
    monkeypatch.setattr(packed, "_padded_inputs", _no_image)
    y = packed.forward(a_d, u_d, p, cu_d, x0=x0_d, device=True)
    g = packed.backward(a_d, u_d, u_d, p, cu_d, x0=x0_d, device=True)
    for v in (y, *g):
        assert np.isnan(to_np(v)).all()


@settings(max_examples=6 if SIM else 60, deadline=None)
@given(lens=st.lists(st.integers(0, 90), min_size=1, max_size=5),
       shape=st.sampled_from([(2, 2), (3, 16), (1, 1), (5, 8)]),
       bl=st.sampled_from([1, 4, 16, 32]),
       hops=st.sampled_from([0, 1]), per_head=st.booleans(), with_x0=st.booleans(),
       chunk=st.sampled_from([64, 128, 256]), bf16=st.booleans())
def test_tile_matches_reference(lens, shape, bl, hops, per_head, with_x0, chunk, bf16):
    """The BHDL tile walks, forward and backward (T a multiple of the 16-byte access): rows not
    filling a warp (4, 1) or two warps (48), chunks of one to four tiles, sequences across
    tiles and chunks."""
    seed = zlib.crc32(repr((lens, shape, bl, hops, per_head, with_x0, chunk, bf16)).encode())
    rng = np.random.default_rng(seed)
    dtype = BF16 if bf16 else np.dtype(np.float32)
    V = 16 // dtype.itemsize
    lens = list(lens)
    lens[-1] += (-sum(lens)) % V or (V if sum(lens) == 0 else 0)
    S = len(lens)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1])
    H, D = shape
    a = rng.uniform(-1.05, 1.05, (1, H, T) if per_head else (1, H, D, T))
    a = a.astype(np.float32).astype(dtype)
    u = rng.standard_normal((1, H, D, T)).astype(np.float32).astype(dtype)
    dy = rng.standard_normal((1, H, D, T)).astype(np.float32).astype(dtype)
    x0 = rng.standard_normal((S, H, D)).astype(np.float32) if with_x0 else None
    X = xp()
    a_d, u_d, dy_d, cu_d = X.asarray(a), X.asarray(u), X.asarray(dy), X.asarray(cu)
    x0_d = None if x0 is None else X.asarray(x0)
    p = _checks.check_swr(a_d, u_d, block_len=bl, hops=hops, layout="BHDL")
    if SIM:
        p = dataclasses.replace(p, backend="cupy")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(packed, "_padded_inputs", _no_image)
        m.setattr(packed_walk, "TILE_CHUNK", chunk)
        m.setattr(packed_walk, "BHDL_TILE", True)
        m.setattr(packed_walk, "BHDL_SCAN", False)
        m.setattr(packed_walk, "BHDL_SCAN_BWD", False)
        m.setattr(packed_walk, "tokens_forward_kernel", _no_image)  # the tile walks must run
        m.setattr(packed_walk, "tokens_backward_kernel", _no_image)
        y = X.asarray(np.full(u.shape, np.nan, dtype=dtype))  # poisoned: every token written
        y = to_np(packed.forward(a_d, u_d, p, cu_d, x0=x0_d, out=y, device=True))
        da, du, dx0 = (None if v is None else to_np(v) for v in packed.backward(
            a_d, u_d, dy_d, p, cu_d, x0=x0_d, device=True))
    at, ut = to_time_last(a, "BHDL", per_head), to_time_last(u, "BHDL", False)
    want = from_time_last(reference.swr_packed(at, ut, cu, block_len=bl, hops=hops, x0=x0),
                          "BHDL")
    rda, rdu, rdx0 = reference.swr_vjp_packed(at, ut, to_time_last(dy, "BHDL", False), cu,
                                              block_len=bl, hops=hops, x0=x0)
    if per_head:
        rda = rda.sum(axis=2, keepdims=True)
    rda, rdu = from_time_last(rda, "BHDL", per_head), from_time_last(rdu, "BHDL")
    tol = 1e-4 if dtype == np.float32 else 4e-2
    for got, ref in ((y, want), (da, rda), (du, rdu)):
        np.testing.assert_allclose(got.astype(np.float64), ref, rtol=tol,
                                   atol=tol * (1 + np.abs(ref).max()))
    if with_x0:
        np.testing.assert_allclose(dx0, rdx0, rtol=tol, atol=tol * (1 + np.abs(rdx0).max()))


# ----------------------------------------------------------------------------------------------
# the BHDL warp-scan forward (packed_walk.BHDL_SCAN; numba_kernels/packed_scan.py)
# ----------------------------------------------------------------------------------------------


def scan_case(lens, *, per_head, H, D, bl, hops, with_x0, dtype, chunk, seed, monkeypatch):
    """The warp-scan forward and the warp-chain backward (chunks of ``chunk`` tokens, rounded
    up to a warp iteration) through the API against the per-sequence reference."""
    monkeypatch.setattr(packed_walk, "BHDL_SCAN_CHUNK", chunk)
    monkeypatch.setattr(packed_walk, "BHDL_SCAN_BWD_CHUNK", chunk)
    monkeypatch.setattr(packed_scan, "MAX_ROUNDS", 64)  # every block length through the scan
    monkeypatch.setattr(packed_walk, "_PLANS", {})  # GPU: kernels built afresh, not from plans
    launched = []
    fwd, bwd = packed_scan.forward_kernel, packed_scan_bwd.backward_kernel
    monkeypatch.setattr(packed_scan, "forward_kernel",
                        lambda *k: launched.append("fwd") or fwd(*k))
    monkeypatch.setattr(packed_scan_bwd, "backward_kernel",
                        lambda *k: launched.append("bwd") or bwd(*k))
    tokens_case(lens, layout="BHDL", per_head=per_head, H=H, D=D, bl=bl, hops=hops,
                with_x0=with_x0, dtype=dtype, chunk=16, seed=seed, monkeypatch=monkeypatch,
                scan=True)
    assert "fwd" in launched, "the warp-scan forward did not run"
    T = sum(lens)
    if packed_scan_bwd.config("f32" if dtype == np.float32 else "bf16", "f32" if dtype ==
                              np.float32 else "bf16", T, bl) is not None:
        assert "bwd" in launched, "the warp-chain backward did not run"


@settings(max_examples=10 if SIM else 40, deadline=None)
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=8).filter(lambda v: sum(v) > 0),
       bl=st.sampled_from([1, 4, 8, 16, 32]), hops=st.sampled_from([0, 1]),
       per_head=st.booleans(), with_x0=st.booleans(), chunk=st.sampled_from([1, 64]))
def test_scan_forward_matches_reference(lens, bl, hops, per_head, with_x0, chunk):
    """Lengths 0, 1, below, at and above block_len; one token a lane (T of any length), chunks
    of one warp iteration (32 tokens: halos over chunk starts inside blocks) or longer."""
    seed = zlib.crc32(repr((lens, bl, hops, per_head, with_x0, chunk)).encode())
    with pytest.MonkeyPatch.context() as mp:
        scan_case(lens, per_head=per_head, H=2, D=2, bl=bl, hops=hops, with_x0=with_x0,
                  dtype=np.float32, chunk=chunk, seed=seed, monkeypatch=mp)


@pytest.mark.parametrize("per_head, hops, with_x0, dtype, lens, bl", [
    (True, 1, True, np.float32, [5, 0, 1, 9, 8, 1, 40, 3, 61], 4),  # T = 128: 4 tokens a lane
    (False, 1, False, BF16, [13, 0, 3, 16, 0, 200, 23], 16),  # T = 255 -> 1 a lane
    (True, 0, True, BF16, [7, 9, 1, 2, 5, 100, 38, 94], 8),  # T = 256: 8 tokens a lane, hops 0
    (True, 1, True, BF16, [1] * 40 + [3, 0, 2] * 20 + [116], 2),  # T = 256: many tiny ones
])
def test_scan_forward_vector_paths(rng, monkeypatch, per_head, hops, with_x0, dtype, lens, bl):
    """Accesses of several tokens a lane, sequences and blocks starting inside a lane's
    tokens, chunks of one warp iteration (so several, each with its halo)."""
    scan_case(lens, per_head=per_head, H=1, D=2, bl=bl, hops=hops, with_x0=with_x0,
              dtype=dtype, chunk=1, seed=int(rng.integers(1 << 30)), monkeypatch=monkeypatch)


def test_scan_invalid_cu_poisons_outputs(rng, monkeypatch):
    """ok[0] == 0 (invalid device cu): NaN in every y of the warp-scan forward, and in every da,
    du and dx0 of the warp-chain backward."""
    monkeypatch.setattr(packed_walk, "BHDL_SCAN", True)
    monkeypatch.setattr(packed_walk, "BHDL_SCAN_CHUNK", 1)
    X = xp()
    a = X.asarray(rng.uniform(-1, 1, (1, 2, 70)).astype(np.float32))
    u = X.asarray(rng.standard_normal((1, 2, 2, 70)).astype(np.float32))
    cu = X.asarray(np.array([0, 40, 30, 70], np.int64))
    p = _checks.check_swr(a, u, block_len=4, hops=1, layout="BHDL")
    if SIM:
        p = dataclasses.replace(p, backend="cupy")
    monkeypatch.setattr(packed, "_padded_inputs", _no_image)
    assert np.isnan(to_np(packed.forward(a, u, p, cu, x0=None, device=True))).all()
    monkeypatch.setattr(packed_walk, "BHDL_SCAN_BWD", True)
    dy = X.asarray(rng.standard_normal((1, 2, 2, 70)).astype(np.float32))
    x0 = X.asarray(rng.standard_normal((3, 2, 2)).astype(np.float32))
    for g in packed.backward(a, u, dy, p, cu, x0=x0, device=True):
        assert np.isnan(to_np(g)).all()


@settings(max_examples=10 if SIM else 40, deadline=None)
@given(lens=st.lists(st.integers(0, 20), min_size=1, max_size=10).filter(lambda v: sum(v) > 0),
       bl=st.sampled_from([1, 3, 4, 16]), cu_dtype=st.sampled_from([np.int32, np.int64]))
def test_marks_match_reference(lens, bl, cu_dtype):
    """Token marks (sequence, block start, sequence start) on the device against NumPy, empty
    sequences passed over."""
    X = xp()
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(cu_dtype)
    T = int(cu[-1])
    marks = X.asarray(np.full(T, -1, np.int32))  # poisoned: every token written
    packed_walk.mark_tokens(X.asarray(cu), T, bl, marks)
    want = packed_scan.marks_reference(cu, T, bl)
    np.testing.assert_array_equal(to_np(marks), want)
    s = want >> 2
    assert (cu[s] <= np.arange(T)).all() and (np.arange(T) < cu[s + 1]).all()


@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
@pytest.mark.parametrize("poison", ["u_inf", "a_nan"])
def test_sequences_exchange_no_nonfinite_values(layout, poison):
    """inf in every u (or NaN in every a) of the middle sequence stays in it: the other
    sequences' y, da, du and dx0 equal the per-sequence reference (finite), forward and
    backward, where lanes pass state across the sequence starts (inside a lane's tokens too:
    the last sequence starts at 63). Docs: sequences exchange no values."""
    rng = np.random.default_rng(zlib.crc32(f"nonfinite-{layout}-{poison}".encode()))
    lens, H, D, bl = [37, 26, 65], 1, 2, 4
    S = len(lens)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1])
    us = (1, T, H, D) if layout == "BLHD" else (1, H, D, T)
    a_s = (1, T, H) if layout == "BLHD" else (1, H, T)
    a = rng.uniform(-1, 1, a_s).astype(np.float32)
    u = rng.standard_normal(us).astype(np.float32)
    dy = rng.standard_normal(us).astype(np.float32)
    x0 = rng.standard_normal((S, H, D)).astype(np.float32)
    bad = slice(int(cu[1]), int(cu[2]))  # sequence 1
    if poison == "u_inf":
        (u[0, bad] if layout == "BLHD" else u[0, :, :, bad])[...] = np.inf
    else:
        (a[0, bad] if layout == "BLHD" else a[0, :, bad])[...] = np.nan
    X = xp()
    a_d, u_d, dy_d, cu_d, x0_d = (X.asarray(v) for v in (a, u, dy, cu, x0))
    p = _checks.check_swr(a_d, u_d, block_len=bl, hops=1, layout=layout)
    if SIM:
        p = dataclasses.replace(p, backend="cupy")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(packed, "_padded_inputs", _no_image)
        y = to_np(packed.forward(a_d, u_d, p, cu_d, x0=x0_d, device=True))
        da, du, dx0 = (to_np(v) for v in packed.backward(a_d, u_d, dy_d, p, cu_d, x0=x0_d,
                                                          device=True))
    at, ut = to_time_last(a, layout, True), to_time_last(u, layout, False)
    yr = from_time_last(reference.swr_packed(at, ut, cu, block_len=bl, hops=1, x0=x0), layout)
    rda, rdu, rdx0 = reference.swr_vjp_packed(at, ut, to_time_last(dy, layout, False), cu,
                                              block_len=bl, hops=1, x0=x0)
    rda = from_time_last(rda.sum(axis=2, keepdims=True), layout, True)
    rdu = from_time_last(rdu, layout)
    keep = np.ones(T, bool)
    keep[cu[1]:cu[2]] = False
    tk = (lambda x: x[0, keep]) if layout == "BLHD" else (lambda x: x[0, ..., keep])
    for got, ref in ((y, yr), (da, rda), (du, rdu)):
        assert np.isfinite(tk(ref)).all()
        np.testing.assert_allclose(tk(got), tk(ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx0[[0, 2]], rdx0[[0, 2]], rtol=1e-4, atol=1e-4)
