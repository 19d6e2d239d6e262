"""The fused Phalanx kernels against the float64 reference, on tiny shapes.

Runs under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, NumPy arrays) or on a GPU (CuPy
arrays); skipped otherwise. Every output is poisoned with NaN before the launch.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest
from kernel_side import RUNS, dev, host, needs_kernels

from swr_array import reference as R

pytestmark = needs_kernels

if RUNS:
    from swr_array.numba_kernels import phalanx_fused as PF

DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}
TOL = {"f32": 2e-6, "f16": 2e-3, "bf16": 1.2e-2}


def rel(a, b):
    a = host(a).astype(np.float64)
    assert np.isfinite(a).all(), "an output element was not written"
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


class Case:
    def __init__(self, kind, B, L, H, D, KV, block_len, hops, seed, decay_max=0.97):
        self.kind, self.B, self.L, self.H, self.D, self.KV = kind, B, L, H, D, KV
        self.block_len, self.hops, self.decay_max = block_len, hops, decay_max
        dt = DTYPES[kind]
        rng = np.random.default_rng(seed)
        self.W = H * D + 2 * KV * D + H
        self.z = rng.normal(size=(B * L, self.W)).astype(dt)
        self.z[:, -H:] = (rng.normal(size=(B * L, H)) + 2.0).astype(dt)  # decays near 0.9
        self.b_a = rng.normal(scale=0.5, size=H).astype(dt)
        self.b_b = rng.normal(size=KV * D).astype(dt)
        self.b_c = rng.normal(size=KV * D).astype(dt)
        self.dy = rng.normal(size=(B * L, H * D)).astype(dt)
        self.dtype = dt

    @property
    def kw(self):
        return dict(heads=self.H, head_dim=self.D, kv_heads=self.KV, decay_max=self.decay_max,
                    block_len=self.block_len, hops=self.hops)

    def f64(self, x):
        return np.asarray(x, np.float64)

    def ref_forward(self, **cont):
        z = self.f64(self.z).reshape(self.B, self.L, self.W)
        return R.phalanx_mix(z, self.f64(self.b_a), self.f64(self.b_b), self.f64(self.b_c),
                             return_parts=bool(cont), **cont, **self.kw)

    def poisoned(self, shape, dtype=None):
        return dev(np.full(shape, np.nan, dtype or self.dtype))

    def biases(self):
        return dev(self.b_a), dev(self.b_b), dev(self.b_c)


CASES = [
    # kind, B, L, H, D, KV, block_len, hops
    ("f32", 2, 13, 2, 4, 2, 4, 1),
    ("f32", 1, 16, 4, 2, 2, 4, 1),  # kv groups, L a multiple of block_len
    ("f32", 2, 9, 3, 3, 1, 2, 0),  # hops 0, odd head_dim, one kv head
    ("f32", 1, 7, 2, 1, 2, 1, 1),  # block_len 1, head_dim 1
    ("f32", 1, 40, 2, 4, 2, 32, 1),  # block_len 32: two vectors per thread in the backward
    ("f32", 1, 5, 3, 5, 3, 8, 1),  # a single partial block
    ("f16", 1, 10, 2, 6, 1, 8, 1),
    ("bf16", 2, 11, 4, 4, 4, 4, 1),  # uint64 word loads
    ("bf16", 1, 12, 2, 2, 2, 4, 1),  # uint32 word loads
    ("bf16", 1, 9, 3, 4, 3, 2, 0),  # heads not a multiple of 4: element loads
]


def _seed(case) -> int:
    """A per-case seed that is the same in every process (crc32, not ``hash``)."""
    return zlib.crc32(repr(case).encode())


def check_forward(c, tol=None):
    y = c.poisoned((c.B * c.L, c.H * c.D))
    PF.phalanx_forward(dev(c.z), *c.biases(), y, batch=c.B, length=c.L, **c.kw)
    assert rel(y, c.ref_forward().reshape(c.B * c.L, -1)) < (tol or TOL[c.kind])


def check_backward(c, tol=None):
    z = c.f64(c.z).reshape(c.B, c.L, c.W)
    dz_ref, y_ref = R.phalanx_mix_vjp(z, c.f64(c.b_a), c.f64(c.b_b), c.f64(c.b_c),
                                      c.f64(c.dy).reshape(c.B, c.L, -1), **c.kw)
    dz_ref = dz_ref.reshape(c.B * c.L, -1)
    nrows = PF.bias_rows(c.kind, c.B, c.L, c.H, c.D, c.block_len)
    grouped = c.KV < c.H
    hd, kd = c.H * c.D, c.KV * c.D
    dz = c.poisoned((c.B * c.L, c.W))
    y = c.poisoned((c.B * c.L, hd))
    parts = dev(np.zeros((nrows, c.W - hd), np.float32)) if grouped else \
        c.poisoned((nrows, c.W - hd), np.float32)
    acc = [dev(np.zeros((c.B * c.L, kd), np.float32)) if grouped else None for _ in range(2)]
    PF.phalanx_backward(dev(c.z), dev(c.dy), *c.biases(), dz, y, parts, batch=c.B, length=c.L,
                        acc_b=acc[0], acc_c=acc[1], **c.kw)
    dz = host(dz).astype(np.float64)
    if grouped:
        dz[:, hd:hd + kd] = host(acc[0])
        dz[:, hd + kd:hd + 2 * kd] = host(acc[1])
    tol = tol or TOL[c.kind]
    assert rel(dz, dz_ref) < tol
    assert rel(y, y_ref.reshape(c.B * c.L, -1)) < tol
    # bias gradients: the partial sums add up to the column sums of dz
    assert rel(host(parts).sum(axis=0), dz_ref[:, hd:].sum(axis=0)) < tol


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_matches_reference(case):
    check_forward(Case(*case, seed=_seed(case)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_backward_matches_reference(case):
    c = Case(*case, seed=_seed(case) + 1)
    if not PF._pow2(c.D):  # not taken by the fused backward: the layer composes swr_vjp
        assert PF.backward_config(c.kind, c.H, c.D, c.block_len) is None
        return
    check_backward(c)


@pytest.fixture
def small_tiles(monkeypatch):
    """Launch tuning that splits tiny shapes into many chunks of two blocks (forward and
    backward), with steps past a chunk's end (or, backwards, its start) in its last load batch."""
    def use(**kw):
        for k, v in kw.items():
            monkeypatch.setitem(PF.TUNING, k, v)
    return use


TILED = [
    # kind, B, L, H, D, KV, block_len, hops
    ("f32", 2, 23, 3, 2, 3, 4, 1),  # 6 blocks, the last partial
    ("f32", 1, 32, 3, 2, 1, 4, 1),  # kv groups (atomics)
    ("f32", 2, 19, 3, 2, 3, 2, 0),  # hops 0
    ("bf16", 1, 21, 4, 2, 4, 4, 1),
    ("f32", 1, 21, 2, 16, 2, 4, 1),  # backward: one channel a lane, 16 lanes a head
    ("f16", 1, 18, 4, 16, 2, 4, 1),  # backward: 4-wide accesses, 4 lanes a head, kv groups
]


@pytest.mark.parametrize("case", TILED, ids=lambda c: "-".join(map(str, c)))
def test_chunks_match_reference(case, small_tiles):
    small_tiles(fwd_chunk_steps=2 * case[6], fwd_unroll=3, bwd_chunk_steps=2 * case[6],
                bwd_unroll=3)
    c = Case(*case, seed=_seed(case))
    check_forward(c)
    check_backward(c)


@pytest.mark.parametrize("split", [3, 5, 9])
def test_forward_continues_a_state_across_chunks(split, small_tiles):
    """A continued launch (offset, w0/g0, carry) whose chunks start past its first block."""
    small_tiles(fwd_chunk_steps=4, fwd_unroll=3)
    test_forward_continues_a_state(1, split)


@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("split", [0, 3, 4, 5, 11, 14])
def test_forward_continues_a_state(hops, split):
    """Two launches split at any token (with the state the first writes) equal one launch, and
    the state equals the reference's."""
    c = Case("f32", 2, 14, 2, 3, 1, 4, hops, seed=split)
    full = c.ref_forward().reshape(c.B * c.L, -1)
    B, H, D, L = c.B, c.H, c.D, c.L
    shape = (B, H, D)
    st = [c.poisoned(shape, np.float32) for _ in range(4)]
    y1 = c.poisoned((B * split, H * D))
    z = c.z.reshape(B, L, c.W)
    z1 = dev(np.ascontiguousarray(z[:, :split]).reshape(B * split, c.W))
    PF.phalanx_forward(z1, *c.biases(), y1, batch=B, length=split, state_out=tuple(st), **c.kw)
    # the state after `split` tokens, from the reference
    from swr_array.state import SWRState

    s0 = SWRState.initial(shape, block_len=4, hops=hops)
    _, v, C, S = R.phalanx_mix(c.f64(z[:, :split]), c.f64(c.b_a), c.f64(c.b_b), c.f64(c.b_c),
                               return_parts=True, **c.kw)
    ref_state = s0.advanced(split, v, C, S, np)
    if split:
        np.testing.assert_allclose(host(st[1]), ref_state.g, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(host(st[0]), ref_state.w, rtol=1e-5, atol=1e-6)
        if hops == 1:
            np.testing.assert_allclose(host(st[2]), ref_state.carry_v[..., 0], rtol=1e-5,
                                       atol=1e-6)
            np.testing.assert_allclose(host(st[3]), ref_state.carry_C[..., 0], rtol=1e-5,
                                       atol=1e-6)
    else:  # nothing consumed: the kernel does not launch, the caller keeps the initial state
        st = [dev(np.zeros(shape, np.float32)), dev(np.ones(shape, np.float32)),
              dev(np.zeros(shape, np.float32)), dev(np.zeros(shape, np.float32))]
    L2 = L - split
    y2 = c.poisoned((B * L2, H * D))
    z2 = dev(np.ascontiguousarray(z[:, split:]).reshape(B * L2, c.W))
    carry = dict(carry_v=st[2], carry_C=st[3]) if hops == 1 else {}
    PF.phalanx_forward(z2, *c.biases(), y2, batch=B, length=L2, offset=split % 4, w0=st[0],
                       g0=st[1], **carry, **c.kw)
    y = np.concatenate([host(y1).reshape(B, split, H * D), host(y2).reshape(B, L2, H * D)], 1)
    assert rel(y.reshape(B * L, H * D), full) < 1e-5


@pytest.mark.parametrize("case", [("bf16", 2, 11, 4, 4, 4, 4, 1), ("f32", 1, 32, 3, 2, 1, 4, 1)],
                         ids=lambda c: "-".join(map(str, c)))
def test_launch_bounded_fast_sigmoid_kernels_match_reference(case, small_tiles):
    """The specialisations TUNING's min_blocks and fast_sigmoid knobs select (launch bounds and
    libdevice's approximate exp and division on a GPU; the simulator ignores both but runs their
    own factories) compute the same numbers."""
    small_tiles(fwd_min_blocks=4, bwd_min_blocks=2, fwd_chunk_steps=2 * case[6],
                bwd_chunk_steps=2 * case[6], fwd_fast_sigmoid=1, bwd_fast_sigmoid=1)
    assert PF.launch_bounds("fwd") == (PF.TUNING["fwd_threads_per_block"], 4)
    c = Case(*case, seed=_seed(case))
    tol = max(TOL[c.kind], 2e-5)  # float32: the approximate exp and division, a few ulp each
    check_forward(c, tol)
    check_backward(c, tol)


@pytest.mark.parametrize("ahead", [1, 3])
def test_prefetching_forward_matches_reference(ahead, small_tiles):
    """The forward with L2 prefetches ``ahead`` batches on (past the chunk's end they are
    skipped) computes the same numbers; chunks of two blocks and batches of three steps."""
    small_tiles(fwd_prefetch_ahead=ahead, fwd_chunk_steps=8, fwd_unroll=3)
    for case in [("bf16", 2, 21, 4, 4, 4, 4, 1), ("f32", 1, 19, 2, 3, 1, 2, 0)]:
        check_forward(Case(*case, seed=_seed(case) + ahead))


ROWS_CASES = [
    # kind, B, L, H, D, KV, block_len, hops, bwd_rows
    ("bf16", 2, 11, 4, 4, 4, 4, 1, 2),  # two thread blocks a batch row: halo rows between them
    ("f16", 1, 10, 4, 16, 2, 4, 1, 2),  # kv groups (atomics), 8 lanes a head
    ("f32", 1, 21, 2, 4, 1, 2, 1, 3),  # one kv head, the last block partial
    ("f32", 2, 19, 3, 2, 3, 4, 0, 2),  # hops 0: no carriers across blocks
    ("f32", 1, 7, 2, 1, 2, 1, 1, 3),  # block_len 1, head_dim 1
    ("bf16", 1, 35, 2, 8, 2, 16, 1, 1),  # block_len ROWS_LMAX, one block a thread block
    ("f32", 1, 3, 5, 8, 5, 2, 1, 1),  # 40 channel words: a second, partly idle, group of 32
]


@pytest.mark.parametrize("case", ROWS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_rows_backward_matches_reference(case, small_tiles):
    """The block-row backward (TUNING bwd_kernel="rows"): each thread one block, staged in shared
    memory, carriers passed between rows through shared memory, the halo rows of neighbouring
    thread blocks, one row of bias sums a thread block; poisoned outputs, every dtype, hops 0
    and 1, kv groups, partial blocks."""
    *shape, rows = case
    small_tiles(bwd_kernel="rows", bwd_rows=rows)
    c = Case(*shape, seed=_seed(case))
    assert PF.rows_config(c.kind, c.H, c.D, c.block_len) is not None
    nb = -(-c.L // c.block_len)
    assert PF.bias_rows(c.kind, c.B, c.L, c.H, c.D, c.block_len) == c.B * -(-nb // rows)
    made = []
    orig = PF.backward_rows_kernel

    def spy(*a, **k):
        made.append(a[:2])
        return orig(*a, **k)

    PF.backward_rows_kernel = spy
    try:
        check_backward(c)
    finally:
        PF.backward_rows_kernel = orig
    assert made == [(c.kind, rows)], "the block-row kernel did not run"


def test_rows_backward_falls_back_to_walk(small_tiles):
    """Shapes the block-row kernel does not take (block_len above ROWS_LMAX, an odd bfloat16
    head_dim) run the walking kernel, with the same numbers."""
    small_tiles(bwd_kernel="rows", bwd_rows=2)
    assert PF.rows_config("f32", 2, 4, PF.ROWS_LMAX + 1) is None
    assert PF.rows_config("bf16", 2, 3, 4) is None
    assert PF.rows_config("bf16", 2, 4, 4, aligned=False) is None
    assert PF.rows_config("bf16", 2, 128, 4) is None  # 64 words a head: more than a warp
    assert PF.rows_config("bf16", 4, 16, 16) == (2, 8)
    assert PF.rows_config("f32", 4, 16, 16) == (1, 16)
    check_backward(Case("f32", 1, 40, 2, 4, 2, 32, 1, seed=5))
