"""The packed BHDL warp-chain backward (numba_kernels/packed_scan_bwd.py) launched directly, with
NumPy arrays under the CUDA simulator or CuPy arrays on a GPU, against the per-sequence float64
reference; and its PTX for every specialisation (without the simulator)."""

from __future__ import annotations

import functools
import zlib

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import gpu_available
from hypothesis import given, settings
from hypothesis import strategies as st

from swr_array import reference
from swr_array.ops import from_time_last, to_time_last

SIM = bool(numba.config.ENABLE_CUDASIM)
BF16 = np.dtype(ml_dtypes.bfloat16)
needs_device = pytest.mark.skipif(not (SIM or gpu_available()),
                                  reason="needs the CUDA simulator or a GPU")
needs_nvvm = pytest.mark.skipif(SIM, reason="compile_ptx needs the real CUDA target")
KIND = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", BF16: "bf16"}


def xp():
    if SIM:
        return np
    import cupy

    return cupy


def to_np(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _storage(x):
    """The array a kernel receives (bfloat16 as its uint16 bits), flat, on the device."""
    x = np.ascontiguousarray(x).reshape(-1)
    return xp().asarray(x.view(np.uint16) if x.dtype == BF16 else x)


def run_backward(a, u, dy, cu, x0, *, block_len, hops, chunk, vec=None, nacc=None, ok=1):
    """(da, du, dx0) of the warp-chain backward for BHDL arrays (a ``(1, H, T)`` per head or
    ``(1, H, D, T)``); ``vec``/``nacc`` None: :func:`packed_scan_bwd.config`'s. Outputs start as
    NaN (da, du: every token must be written) and dx0 as zeros (the caller's duty)."""
    from swr_array.numba_kernels import packed_scan, packed_scan_bwd
    from swr_array.numba_kernels._launch import launch

    X = xp()
    _, H, D, T = u.shape
    per_head = a.ndim == 3
    S = len(cu) - 1
    in_kind, dy_kind = KIND[u.dtype], KIND[dy.dtype]
    if vec is None:
        vec, nacc0 = packed_scan_bwd.config(in_kind, dy_kind, T, block_len)
        nacc = nacc0 if nacc is None else nacc
    cu_d = X.asarray(np.asarray(cu, np.int32))
    marks = X.zeros(T, np.int32)
    packed_scan.mark_tokens(cu_d, T, block_len, marks)
    if ok:
        np.testing.assert_array_equal(to_np(marks), packed_scan.marks_reference(cu, T, block_len))
    has_x0 = x0 is not None and hops == 1
    da = _storage(np.full(a.shape, np.nan, u.dtype))
    du = _storage(np.full(u.shape, np.nan, u.dtype))
    dummy = X.zeros(1, np.float32)
    x0_d = X.asarray(np.ascontiguousarray(x0, np.float32).reshape(-1)) if has_x0 else dummy
    dx0 = X.zeros(S * H * D, np.float32) if has_x0 else dummy
    grid, block, scalars = packed_scan_bwd.launch_args(T, S, H * D, D, block_len, per_head, vec,
                                                       nacc, chunk)
    kernel = packed_scan_bwd.backward_kernel(in_kind, dy_kind, per_head, hops, has_x0, vec,
                                             nacc)
    args = (_storage(a), _storage(u), _storage(dy), da, du, x0_d, dx0, marks,
            X.asarray(np.array([ok], np.int32))) + scalars
    launch(kernel, grid, block, args)

    def back(x, shape):
        x = to_np(x)
        return (x.view(BF16) if u.dtype == BF16 else x).reshape(shape)

    return back(da, a.shape), back(du, u.shape), (to_np(dx0).reshape(S, H, D) if has_x0
                                                  else None)


def case(lens, *, per_head, H, D, bl, hops, with_x0, dtype, chunk, seed, vec=None, nacc=None):
    """One problem against ``reference.swr_vjp_packed``."""
    rng = np.random.default_rng(seed)
    S = len(lens)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    T = int(cu[-1])
    us = (1, H, D, T)
    a = rng.uniform(-1.05, 1.05, (1, H, T) if per_head else us).astype(np.float32)
    a = a.astype(dtype)
    u = rng.standard_normal(us).astype(np.float32).astype(dtype)
    dy = rng.standard_normal(us).astype(np.float32).astype(dtype)
    x0 = rng.standard_normal((S, H, D)).astype(np.float32) if with_x0 else None
    da, du, dx0 = run_backward(a, u, dy, cu, x0, block_len=bl, hops=hops, chunk=chunk, vec=vec,
                               nacc=nacc)
    at = to_time_last(a.astype(np.float64), "BHDL", per_head)
    ut = to_time_last(u.astype(np.float64), "BHDL", False)
    dyt = to_time_last(dy.astype(np.float64), "BHDL", False)
    rda, rdu, rdx0 = reference.swr_vjp_packed(at, ut, dyt, cu, block_len=bl, hops=hops, x0=x0)
    if per_head:
        rda = rda.sum(axis=2, keepdims=True)
    rda, rdu = from_time_last(rda, "BHDL", per_head), from_time_last(rdu, "BHDL")
    tol = 1e-4 if dtype == np.float32 else 4e-2
    assert da.dtype == dtype and du.dtype == dtype
    for got, want in ((da, rda), (du, rdu)):
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol,
                                   atol=tol * (1 + np.abs(want).max()))
    if with_x0 and hops == 1:
        np.testing.assert_allclose(dx0, rdx0, rtol=tol, atol=tol * (1 + np.abs(rdx0).max()))


@needs_device
@settings(max_examples=15 if SIM else 60, deadline=None)
@given(lens=st.lists(st.integers(0, 40), min_size=1, max_size=8).filter(lambda v: sum(v) > 0),
       bl=st.sampled_from([1, 2, 4, 8, 16, 32]), hops=st.sampled_from([0, 1]),
       per_head=st.booleans(), with_x0=st.booleans(), chunk=st.sampled_from([1, 200]),
       nacc=st.sampled_from([None, 1, 2]))
def test_matches_reference_for_any_lengths(lens, bl, hops, per_head, with_x0, chunk, nacc):
    """Lengths 0, 1, below, at and above block_len; T of any length (one-token accesses where T
    is odd); chunks of one window (several warps, each with halos) or longer (several
    iterations a warp); one or two accesses a lane where the halos leave lanes to store."""
    from swr_array.numba_kernels import packed_scan_bwd

    seed = zlib.crc32(repr((lens, bl, hops, per_head, with_x0, chunk, nacc)).encode())
    T = sum(lens)
    vec, _ = packed_scan_bwd.config("f32", "f32", T, bl)
    if nacc is not None and 32 - 2 * packed_scan_bwd.halo_lanes(bl, vec * nacc) < 1:
        nacc = None  # no lane left to store: config's width
    case(lens, per_head=per_head, H=2, D=2, bl=bl, hops=hops, with_x0=with_x0,
         dtype=np.float32, chunk=chunk, seed=seed, nacc=nacc, vec=vec if nacc else None)


VECTOR_CASES = [  # per_head, hops, x0, dtype, lens, bl, vec, nacc
    (True, 1, True, np.float32, [5, 0, 1, 9, 8, 1, 40, 3, 61], 4, 4, 1),  # T = 128
    (True, 1, True, np.float32, [5, 0, 1, 9, 8, 1, 40, 3, 61], 4, 4, 2),  # 8 tokens a lane
    (False, 1, False, BF16, [13, 0, 3, 16, 0, 200, 24], 16, 8, 1),  # T = 256: 16-byte bf16
    (True, 0, True, BF16, [7, 9, 1, 2, 5, 100, 38, 94], 8, 8, 2),  # 16 tokens a lane, hops 0
    (True, 1, True, BF16, [1] * 40 + [3, 0, 2] * 20 + [116], 2, 8, 1),  # many tiny ones
    (True, 1, True, BF16, [300, 17, 3, 200], 32, 8, 2),  # block_len 32: 4 halo lanes a side
    (False, 1, True, BF16, [33, 0, 70, 1, 100, 52], 16, 4, 1),  # T = 256 bf16 in 8-byte pieces
]


@needs_device
@pytest.mark.parametrize("per_head, hops, with_x0, dtype, lens, bl, vec, nacc", VECTOR_CASES)
def test_vector_paths(per_head, hops, with_x0, dtype, lens, bl, vec, nacc):
    """Accesses of several tokens, several accesses a lane, blocks and sequences starting inside
    a lane's tokens, windows of one chunk each (several warps a row) and per head D = 4 rows a
    warp."""
    seed = zlib.crc32(repr((per_head, hops, with_x0, str(dtype), lens, bl, vec, nacc)).encode())
    case(lens, per_head=per_head, H=1, D=4 if per_head else 2, bl=bl, hops=hops,
         with_x0=with_x0, dtype=dtype, chunk=1, seed=seed, vec=vec, nacc=nacc)


HALO_CASES = [  # lens, bl, vec, nacc, chunk, per_head, D
    ([10, 47, 36, 9], 1, 2, 1, 1, False, 3),
    ([15, 6, 17, 24, 48, 27, 5], 3, 2, 1, 1 << 20, True, 3),
    ([58, 54, 55, 52, 14, 47], 3, 4, 1, 1 << 20, True, 3),
    ([58, 54, 55, 52, 14, 47], 5, 2, 2, 1, False, 1),
]


@needs_device
@pytest.mark.parametrize("lens, bl, vec, nacc, chunk, per_head, D", HALO_CASES)
def test_halos_hold_every_dependency(lens, bl, vec, nacc, chunk, per_head, D):
    """Block lengths that are not a multiple of the lane's tokens (and 1): a halo of one lane
    less than ``ceil(2 * block_len / E)`` loses a carrier or a next block's q here."""
    seed = zlib.crc32(repr((lens, bl, vec, nacc, chunk, per_head, D)).encode())
    for hops in (0, 1):
        case(lens, per_head=per_head, H=1, D=D, bl=bl, hops=hops, with_x0=True,
             dtype=np.float32, chunk=chunk, seed=seed + hops, vec=vec, nacc=nacc)


@needs_device
def test_many_tiny_sequences_long_chunk():
    """Sequences of 0..2 tokens, one warp a row walking many windows (chunk past T)."""
    rng = np.random.default_rng(zlib.crc32(b"tiny"))
    lens = [1] + list(rng.integers(0, 3, 150))
    case(lens, per_head=True, H=1, D=2, bl=4, hops=1, with_x0=True, dtype=np.float32,
         chunk=1 << 20, seed=zlib.crc32(repr(lens).encode()), vec=1, nacc=1)


@needs_device
@pytest.mark.parametrize("per_head", [True, False])
def test_invalid_cu_poisons_gradients(per_head):
    """``ok[0] == 0``: NaN in every da and du the warps own and in all of dx0 (the sequences
    of an invalid cu mean nothing), as the token walk does."""
    rng = np.random.default_rng(zlib.crc32(repr(per_head).encode()))
    T = 70
    a = rng.uniform(-1, 1, (1, 2, T) if per_head else (1, 2, 2, T)).astype(np.float32)
    u = rng.standard_normal((1, 2, 2, T)).astype(np.float32)
    x0 = rng.standard_normal((3, 2, 2)).astype(np.float32)
    cu = np.array([0, 40, 60, 70], np.int64)
    da, du, dx0 = run_backward(a, u, u, cu, x0, block_len=4, hops=1, chunk=1, ok=0)
    assert np.isnan(da).all() and np.isnan(du).all() and np.isnan(dx0).all()


def test_config_and_fits():
    from swr_array.numba_kernels import packed_scan_bwd as B

    assert B.config("bf16", "bf16", 256, 16) == (8, 1)  # 4 halo lanes a side: 24 store
    assert B.config("bf16", "bf16", 256, 32) == (8, 2)  # 16 tokens a lane
    assert B.config("f32", "f32", 256, 16) == (4, 2)
    assert B.config("bf16", "f32", 255, 4) == (1, 2)  # odd T: one-token accesses
    assert B.config("bf16", "bf16", 256, 16, lambda v: v <= 2) == (2, 4)
    assert B.config("bf16", "bf16", 256, 64) == (8, 2)  # 8 halo lanes a side: 16 store
    assert B.config("bf16", "bf16", 256, 128) is None
    assert B.fits("bf16", "bf16", 256, 64, 10) and not B.fits("bf16", "bf16", 256, 128, 10)
    assert not B.fits("bf16", "bf16", 256, 16, 1 << 29)
    for bl in (1, 2, 4, 8, 16, 32, 64):
        for E in (1, 2, 4, 8, 16):
            # the chain bound: a block (at most bl tokens) spans at most this many lane steps
            assert B.rounds(bl, E) * E >= bl > (B.rounds(bl, E) - 1) * E


# ----------------------------------------------------------------------------------------------
# PTX of every specialisation
# ----------------------------------------------------------------------------------------------

_STORE = {"f32": "float32", "f16": "float16", "bf16": "uint16"}


def _specs():
    out = []
    for kind, vecs in (("f32", (1, 2, 4)), ("bf16", (1, 2, 4, 8))):
        for per_head in (True, False):
            for hops, x0 in ((0, False), (1, False), (1, True)):
                for vec in vecs:
                    out.append((kind, kind, per_head, hops, x0, vec, 1))
    out += [("bf16", "bf16", True, 1, True, 8, 2), ("f32", "f32", False, 0, False, 4, 4),
            ("bf16", "f32", True, 1, True, 4, 2), ("f16", "f16", False, 1, True, 8, 1)]
    return out


SPECS = [] if SIM else _specs()


def _compile(spec):
    """{cc: PTX} of one specialisation, or the error it raised (in a worker process)."""
    from numba import types
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import packed_scan_bwd

    ik, dk = spec[:2]

    def arr(kind):
        return types.Array(getattr(types, _STORE.get(kind, kind)), 1, "C")

    sig = [arr(ik), arr(ik), arr(dk), arr(ik), arr(ik), arr("float32"), arr("float32"),
           arr("int32"), arr("int32")] + [types.int64] * 8
    try:
        return compile_arches(packed_scan_bwd.backward_kernel(*spec).py_func, sig)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        return RuntimeError(f"{type(exc).__name__}: {str(exc)[:2000]}")


@functools.lru_cache(maxsize=1)
def all_ptx():
    from ptx_arches import compile_in_workers

    return dict(zip(SPECS, compile_in_workers(_compile, SPECS)))


@needs_nvvm
def test_every_specialisation_compiles_without_local_memory():
    """Every (kind, per head, hops, x0, vec) and a few wider lanes: sm_80 and sm_90 PTX (sm_90
    assembled), no local memory (the per-lane arrays are indexed by unrolled constants only),
    16-byte accesses where ``vec`` fills them, shuffles of the chains."""
    problems = []
    for spec, res in all_ptx().items():
        if isinstance(res, Exception):
            problems.append(f"{spec}: {res}")
            continue
        ik, dk, per_head, hops, x0, vec, nacc = spec
        for cc, ptx in res.items():
            if ".target sm_{}{}".format(*cc) not in ptx:
                problems.append(f"{spec} {cc}: target")
            if "packed_scan_backward_bhdl" not in ptx:
                problems.append(f"{spec} {cc}: entry")
            if ".local" in ptx:
                problems.append(f"{spec} {cc}: local memory")
            if "shfl.sync.up" not in ptx or "shfl.sync.idx" not in ptx:
                problems.append(f"{spec} {cc}: no chain shuffles")
            if vec * 2 == 16 and ik == "bf16" and "ld.global.v4.u32" not in ptx:
                problems.append(f"{spec} {cc}: no 16-byte load")
    assert not problems, "\n".join(problems)
