"""The hops=None forward in two passes (numba_kernels/swr_exact.py) against the float64 reference.

Runs under the CUDA simulator (tests/test_simulator.py) or on a GPU. Chunks are shrunk so that
tiny shapes split into several (each chunk folds the maps of those before it).
"""

from __future__ import annotations

import importlib

import numba
import numpy as np
import pytest
from conftest import gpu_available
from test_kernels_forward import (
    TOL,
    backend,
    bits,
    f32,
    make_case,
    poisoned,
    rel_err,
    time_last,
    to_host,
)

from swr_array import reference

SIM = bool(numba.config.ENABLE_CUDASIM)
pytestmark = pytest.mark.skipif(not (SIM or gpu_available()),
                                reason="needs the CUDA simulator or a GPU")  # fmt: skip


@pytest.fixture
def small_chunks(monkeypatch):
    E = importlib.import_module("swr_array.numba_kernels.swr_exact")

    def set_chunks(min_steps, max_chunks=256, unroll=4):
        monkeypatch.setitem(E.TUNING, "min_chunk_steps", min_steps)
        monkeypatch.setitem(E.TUNING, "max_chunks", max_chunks)
        monkeypatch.setitem(E.TUNING, "unroll", unroll)
        monkeypatch.setitem(E.TUNING, "bhdl_unroll", 2)

    return set_chunks


def run_exact(a, u, *, out_kind, x0, layout="BLHD"):
    from swr_array.numba_kernels.swr_exact import swr_forward_exact

    xp = backend()
    per_head = a.ndim == 3
    a_tl, u_tl = time_last(a, layout, per_head), time_last(u, layout)
    ref = reference.swr(a_tl, u_tl, block_len=16, hops=None, x0=x0)
    y = poisoned(u.shape, out_kind, xp)
    swr_forward_exact(bits(xp.asarray(a)), bits(xp.asarray(u)), bits(y), layout=layout,
                      carry=f32(x0, xp))  # fmt: skip
    return time_last(to_host(y).astype(np.float64), layout), ref


@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
@pytest.mark.parametrize("kinds,head_dim,n,min_steps", [
    (("bf16", "bf16"), 8, 45, 8), (("f32", "f32"), 4, 77, 12), (("f16", "f32"), 8, 64, 16),
    (("bf16", "f16"), 8, 150, 40), (("f32", "bf16"), 3, 37, 8),
], ids=lambda x: "-".join(x) if isinstance(x, tuple) else str(x))
def test_exact_matches_reference(rng, small_chunks, per_head, kinds, head_dim, n, min_steps):
    """BLHD: several chunks a row (chunk length not a multiple of the batch, a short last chunk),
    the vector path (D=8, 4 for float32) and the general one (D=3), x0 entering the first chunk."""
    in_kind, out_kind = kinds
    small_chunks(min_steps)
    shape = (2, 2, head_dim, n)
    a, u = make_case(rng, "BLHD", shape, per_head, in_kind)
    a = (a.astype(np.float32) * 0.9).astype(a.dtype)  # keep the exact recurrence bounded
    y, ref = run_exact(a, u, out_kind=out_kind, x0=rng.standard_normal(shape[:3]))
    assert rel_err(y, ref) < TOL[out_kind]


@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
@pytest.mark.parametrize("kinds,n,min_steps", [
    (("bf16", "bf16"), 96, 16), (("f32", "f32"), 44, 8), (("f16", "f32"), 77, 8),
    (("f32", "bf16"), 60, 24),
], ids=lambda x: "-".join(x) if isinstance(x, tuple) else str(x))
def test_exact_bhdl_matches_reference(rng, small_chunks, per_head, kinds, n, min_steps):
    """BHDL: a thread per row, steps in vectors along time (8 | N for 16-bit, 4 | N for float32)
    or one at a time (N = 77), chunks rounded up to whole batches of accesses, a short last one."""
    in_kind, out_kind = kinds
    small_chunks(min_steps)
    shape = (2, 2, 3, n)
    a, u = make_case(rng, "BHDL", shape, per_head, in_kind)
    a = (a.astype(np.float32) * 0.9).astype(a.dtype)
    y, ref = run_exact(a, u, out_kind=out_kind, x0=rng.standard_normal(shape[:3]),
                       layout="BHDL")  # fmt: skip
    assert rel_err(y, ref) < TOL[out_kind]


def test_chunk_cap_lengthens_chunks(rng, small_chunks):
    """With at most 2 chunks a row the plan doubles the chunk length until they fit."""
    from swr_array.numba_kernels import swr_exact as E

    small_chunks(4, max_chunks=2)
    plan = E.plan("BLHD", (1, 40, 2, 8), True, "f32", "f32", (0, 0), 1, E.TUNING.version)
    assert plan[4] <= 2 and plan[2] * plan[4] >= 40
    a, u = make_case(rng, "BLHD", (1, 2, 8, 40), True, "f32")
    y, ref = run_exact(a * np.float32(0.9), u, out_kind="f32", x0=np.zeros((1, 2, 8)))
    assert rel_err(y, ref) < TOL["f32"]


def test_exact_refuses_an_unknown_layout():
    from swr_array.numba_kernels.swr_exact import swr_forward_exact

    z = np.zeros((1, 1, 1), np.float32)
    a = np.zeros((1, 1, 1, 4), np.float32)
    with pytest.raises(ValueError, match="layout"):
        swr_forward_exact(a, a, a.copy(), layout="BLDH", carry=z)


@pytest.mark.parametrize("layout,cut,per_head", [
    ("BLHD", 0, True), ("BLHD", 5, False), ("BLHD", 8, True), ("BHDL", 0, False),
    ("BHDL", 8, True),
])
def test_backend_continues_a_state_and_x0(rng, small_chunks, layout, cut, per_head):
    """_cuda.swr_forward with hops=None (no return_state) runs the two passes: from x0, and from
    a prefill's state at any cut (x just before it is w + g s), equal to the reference on the
    whole sequence; the prefill's own state (return_state) equals the reference's."""
    from swr_array import _checks, _cuda

    small_chunks(8)
    B, H, D, N = 2, 2, 8, 37
    a, u = make_case(rng, layout, (B, H, D, N), per_head, "f32")
    a = a * np.float32(0.9)
    x0 = rng.standard_normal((B, H, D)).astype(np.float32)
    a_tl, u_tl = time_last(a, layout, per_head), time_last(u, layout)
    expect = reference.swr(a_tl, u_tl, block_len=4, hops=None, x0=x0)
    xp = backend()

    def run(a_part, u_part, **kw):
        p = _checks.check_swr(a_part, u_part, block_len=4, hops=None, layout=layout)
        return _cuda.swr_forward(a_part, u_part, p, **kw)

    A, U = xp.asarray(a), xp.asarray(u)
    if cut == 0:
        y = run(A, U, x0=xp.asarray(x0), state=None, return_state=False)
        assert rel_err(time_last(to_host(y), layout), expect) < 2e-5
        return

    def part(x, s):
        mod = np if isinstance(x, np.ndarray) else xp
        return mod.ascontiguousarray(x[..., s] if layout == "BHDL" else x[:, s])

    y1, st = run(part(A, slice(None, cut)), part(U, slice(None, cut)), x0=xp.asarray(x0),
                 state=None, return_state=True)  # fmt: skip
    # the prefill's state (its running s kept in float32 by pass 2 past the first block)
    import swr_array as sa

    _, ref_state = sa.swr(part(a.astype(np.float64), slice(None, cut)),
                          part(u.astype(np.float64), slice(None, cut)), block_len=4, hops=None,
                          layout=layout, x0=x0.astype(np.float64), return_state=True)  # fmt: skip
    for name in ("w", "g", "carry_v"):
        got, want = to_host(getattr(st, name)), getattr(ref_state, name)
        assert np.allclose(got, np.broadcast_to(want, got.shape), rtol=1e-5, atol=1e-5), name
    y2 = run(part(A, slice(cut, None)), part(U, slice(cut, None)), x0=None, state=st,
             return_state=False)  # fmt: skip
    y = np.concatenate([to_host(y1), to_host(y2)], axis=-1 if layout == "BHDL" else 1)
    assert rel_err(time_last(y, layout), expect) < 2e-5
