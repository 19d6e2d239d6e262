"""Packed variable-length sequences (cu_seqlens) on the CPU: the NumPy front, the torch and JAX
adapters and the Phalanx functions against the per-sequence reference and separate calls."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import swr_array as sa
from swr_array import packed, reference
from swr_array.ops import from_time_last, to_time_last

HOPS = [0, 1, 2, None]


def draw(rng, layout, per_head, lens, H=2, D=3):
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    T = int(cu[-1])
    us = (1, T, H, D) if layout == "BLHD" else (1, H, D, T)
    a_s = ((1, T, H) if layout == "BLHD" else (1, H, T)) if per_head else us
    return cu, rng.uniform(-1.1, 1.1, a_s), rng.standard_normal(us)


def ref_fwd(a, u, cu, layout, per_head, block_len, hops, x0):
    y = reference.swr_packed(to_time_last(a, layout, per_head), to_time_last(u, layout, False),
                             cu, block_len=block_len, hops=hops, x0=x0)
    return from_time_last(y, layout)


def ref_vjp(a, u, dy, cu, layout, per_head, block_len, hops, x0):
    da, du, dx0 = reference.swr_vjp_packed(
        to_time_last(a, layout, per_head), to_time_last(u, layout, False),
        to_time_last(dy, layout, False), cu, block_len=block_len, hops=hops, x0=x0)
    if per_head:
        da = da.sum(axis=2, keepdims=True)
    return from_time_last(da, layout, per_head), from_time_last(du, layout), dx0


def seq_slice(layout, lo, hi):
    return (slice(None), slice(lo, hi)) if layout == "BLHD" else (Ellipsis, slice(lo, hi))


def test_reference_packed_is_the_per_sequence_loop(rng):
    """The reference's definition against an independent evaluation: the sequential recurrence
    of each sequence (hops=None) and the dense operator (hops=1)."""
    lens = [3, 0, 7, 1]
    cu, a, u = draw(rng, "BHDL", False, lens)
    x0 = rng.standard_normal((4, 2, 3))
    y = reference.swr_packed(a, u, cu, block_len=2, hops=None, x0=x0)
    for s in range(4):
        lo, hi = cu[s], cu[s + 1]
        want = reference.sequential(a[..., lo:hi], u[..., lo:hi], x0=x0[s][None])
        np.testing.assert_allclose(y[..., lo:hi], want, rtol=1e-12, atol=1e-12)
    y1 = reference.swr_packed(a, u, cu, block_len=2, hops=1)
    for s in range(4):
        lo, hi = cu[s], cu[s + 1]
        if hi > lo:
            L = reference.dense_operator(a[0, 0, 0, lo:hi], 2, 1)
            np.testing.assert_allclose(y1[0, 0, 0, lo:hi], L @ u[0, 0, 0, lo:hi], atol=1e-12)


@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("hops", HOPS)
def test_numpy_front_equals_separate_calls_and_reference(rng, layout, per_head, hops):
    bl = 4
    lens = [0, 1, 5, bl, bl + 3, 0, 2 * bl + 1]
    S = len(lens)
    cu, a, u = draw(rng, layout, per_head, lens)
    for x0 in (None, rng.standard_normal((S, 2, 3))):
        y = sa.swr(a, u, block_len=bl, hops=hops, layout=layout, x0=x0, cu_seqlens=cu)
        np.testing.assert_allclose(y, ref_fwd(a, u, cu, layout, per_head, bl, hops, x0),
                                   rtol=1e-12, atol=1e-12)
        parts = [sa.swr(a[seq_slice(layout, lo, hi)], u[seq_slice(layout, lo, hi)],
                        block_len=bl, hops=hops, layout=layout,
                        x0=None if x0 is None else x0[s:s + 1])
                 for s, (lo, hi) in enumerate(zip(cu[:-1], cu[1:]))]
        sep = np.concatenate(parts, axis=1 if layout == "BLHD" else -1)
        np.testing.assert_allclose(y, sep, rtol=1e-12, atol=1e-12)
        dy = rng.standard_normal(u.shape)
        da, du, dx0 = sa.swr_vjp(a, u, dy, block_len=bl, hops=hops, layout=layout, x0=x0,
                                 cu_seqlens=cu)
        rda, rdu, rdx0 = ref_vjp(a, u, dy, cu, layout, per_head, bl, hops, x0)
        np.testing.assert_allclose(da, rda, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(du, rdu, rtol=1e-10, atol=1e-10)
        if x0 is None:
            assert dx0 is None
        else:
            np.testing.assert_allclose(dx0, rdx0, rtol=1e-10, atol=1e-10)
            if hops == 0:
                np.testing.assert_array_equal(dx0, 0.0)


@settings(max_examples=80, deadline=None)
@given(lens=st.lists(st.integers(0, 19), min_size=0, max_size=12),
       bl=st.sampled_from([1, 2, 4, 8]), hops=st.sampled_from(HOPS),
       layout=st.sampled_from(["BLHD", "BHDL"]), per_head=st.booleans(), with_x0=st.booleans())
def test_hypothesis_lengths(lens, bl, hops, layout, per_head, with_x0):
    rng = np.random.default_rng(len(lens) * 1000 + sum(lens))
    cu, a, u = draw(rng, layout, per_head, lens, H=1, D=2)
    x0 = rng.standard_normal((len(lens), 1, 2)) if with_x0 else None
    y = sa.swr(a, u, block_len=bl, hops=hops, layout=layout, x0=x0, cu_seqlens=cu)
    np.testing.assert_allclose(y, ref_fwd(a, u, cu, layout, per_head, bl, hops, x0),
                               rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(u.shape)
    g = sa.swr_vjp(a, u, dy, block_len=bl, hops=hops, layout=layout, x0=x0, cu_seqlens=cu)
    r = ref_vjp(a, u, dy, cu, layout, per_head, bl, hops, x0)
    for got, want in zip(g, r):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_many_tiny_sequences(rng):
    lens = list(rng.integers(0, 3, 200))
    cu, a, u = draw(rng, "BLHD", True, lens, H=1, D=1)
    y = sa.swr(a, u, block_len=16, hops=1, layout="BLHD", cu_seqlens=cu)
    np.testing.assert_allclose(y, ref_fwd(a, u, cu, "BLHD", True, 16, 1, None), atol=1e-12)


def test_padded_length_bound():
    # every sequence of the worst case (n = 0 mod l, plus one carry slot) fits
    for T, S, l in [(0, 0, 16), (0, 3, 16), (5, 1, 1), (33, 2, 16)]:
        assert packed.padded_length(T, S, l) % l == 0
        assert packed.padded_length(T, S, l) >= T + S


def test_return_state_batch_of_sequences(rng):
    lens = [5, 5, 5]
    cu, a, u = draw(rng, "BLHD", True, lens)
    y, st = sa.swr(a, u, block_len=4, hops=1, layout="BLHD", cu_seqlens=cu, return_state=True)
    assert st.shape == (3, 2, 3) and st.position.tolist() == [5, 5, 5]
    # continue every sequence with 3 more tokens, against the whole sequences run alone
    a2, u2 = rng.uniform(-1, 1, (3, 3, 2)), rng.standard_normal((3, 3, 2, 3))
    y2 = sa.swr(a2, u2, block_len=4, hops=1, layout="BLHD", state=st)
    for s in range(3):
        lo, hi = cu[s], cu[s + 1]
        full = sa.swr(np.concatenate([a[:, lo:hi], a2[s:s + 1]], 1),
                      np.concatenate([u[:, lo:hi], u2[s:s + 1]], 1),
                      block_len=4, hops=1, layout="BLHD")
        np.testing.assert_allclose(y2[s], full[0, 5:], atol=1e-12)


@pytest.mark.parametrize("hops", [0, 1, 2, None])
def test_return_state_rows_at_their_own_positions(rng, hops):
    # sequences of different lengths: each row of the state continues its sequence by steps
    lens = [2, 7, 0, 5]
    cu, a, u = draw(rng, "BLHD", True, lens)
    _, st = sa.swr(a, u, block_len=4, hops=hops, layout="BLHD", cu_seqlens=cu,
                   return_state=True)
    assert st.position.tolist() == lens
    a2, u2 = rng.uniform(-1, 1, (4, 3, 2)), rng.standard_normal((4, 3, 2, 3))
    ys = [sa.swr_step(a2[:, i], u2[:, i], st)[0] for i in range(3)]
    for s in range(4):
        lo, hi = cu[s], cu[s + 1]
        full = sa.swr(np.concatenate([a[:, lo:hi], a2[s:s + 1]], 1),
                      np.concatenate([u[:, lo:hi], u2[s:s + 1]], 1),
                      block_len=4, hops=hops, layout="BLHD")
        for i in range(3):
            np.testing.assert_allclose(ys[i][s], full[0, lens[s] + i], atol=1e-12)


@pytest.mark.parametrize(
    "cu, err, match",
    [
        (np.array([1, 3, 6]), ValueError, "start at 0"),
        (np.array([0, 4, 3, 6]), ValueError, "non-decreasing"),
        (np.array([0, 3, 5]), ValueError, "end at"),
        (np.array([0.0, 6.0]), TypeError, "int32 or int64"),
        (np.array([[0, 6]]), ValueError, "1-D"),
        (np.array([], np.int64), ValueError, "1-D"),
        ([0, 6], TypeError, "cu_seqlens"),
    ],
)
def test_bad_cu_seqlens(rng, cu, err, match):
    _, a, u = draw(rng, "BLHD", True, [6])
    with pytest.raises(err, match=match):
        sa.swr(a, u, layout="BLHD", cu_seqlens=cu)
    with pytest.raises(err, match=match):
        sa.swr_vjp(a, u, u, layout="BLHD", cu_seqlens=cu)


def test_bad_batch_and_x0(rng):
    u = rng.standard_normal((2, 6, 2, 3))
    a = rng.uniform(-1, 1, (2, 6, 2))
    with pytest.raises(ValueError, match="B == 1"):
        sa.swr(a, u, layout="BLHD", cu_seqlens=np.array([0, 6]))
    cu, a, u = draw(rng, "BLHD", True, [2, 4])
    with pytest.raises(ValueError, match=r"x0 must have shape \(S, H, D\)"):
        sa.swr(a, u, layout="BLHD", cu_seqlens=cu, x0=np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match=r"x0 must have shape \(S, H, D\)"):
        sa.swr_vjp(a, u, u, layout="BLHD", cu_seqlens=cu, x0=np.zeros((3, 2, 3)))


# ----------------------------------------------------------------------------------------------
# Phalanx
# ----------------------------------------------------------------------------------------------


def _phalanx_params_from(p):
    return {k: (np.asarray(v, np.float64) if hasattr(v, "shape") else v) for k, v in p.items()}


def _phalanx_params():
    return _phalanx_params_from(sa.init_phalanx(16, head_dim=4))


def test_phalanx_packed_equals_separate_calls(rng):
    p = _phalanx_params()
    lens = [3, 0, 9, 1]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    x = rng.standard_normal((1, int(cu[-1]), 16))
    out = sa.phalanx(x, p, block_len=4, hops=1, cu_seqlens=cu)
    for lo, hi in zip(cu[:-1], cu[1:]):
        want = reference.phalanx_reference(x[:, lo:hi], p, block_len=4, hops=1)
        np.testing.assert_allclose(out[:, lo:hi], want, atol=1e-12)
    dout = rng.standard_normal(x.shape)
    dx, dp = sa.phalanx_vjp(x, p, dout, block_len=4, hops=1, cu_seqlens=cu)
    acc = {k: 0.0 for k in dp}
    for lo, hi in zip(cu[:-1], cu[1:]):
        if hi == lo:
            continue
        dxs, dps = reference.phalanx_vjp_reference(x[:, lo:hi], p, dout[:, lo:hi], block_len=4,
                                                   hops=1)
        np.testing.assert_allclose(dx[:, lo:hi], dxs, atol=1e-10)
        for k in dp:
            acc[k] = acc[k] + dps[k]
    for k in dp:
        np.testing.assert_allclose(dp[k], acc[k], atol=1e-10)


# ----------------------------------------------------------------------------------------------
# torch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
@pytest.mark.parametrize("hops", [0, 1, None])
def test_torch_swr_packed_and_gradients(rng, layout, hops):
    torch = pytest.importorskip("torch")
    from swr_array.adapters import torch as st

    cu, a, u = draw(rng, layout, layout == "BLHD", [0, 1, 5, 8, 11, 0, 17])
    x0 = rng.standard_normal((7, 2, 3))
    dy = rng.standard_normal(u.shape)
    ta, tu, tx = (torch.tensor(v, requires_grad=True) for v in (a, u, x0))
    y = st.swr(ta, tu, block_len=8, hops=hops, layout=layout, x0=tx,
               cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    y.backward(torch.tensor(dy))
    per_head = layout == "BLHD"
    np.testing.assert_allclose(y.detach().numpy(),
                               ref_fwd(a, u, cu, layout, per_head, 8, hops, x0), atol=1e-12)
    for got, want in zip((ta.grad, tu.grad, tx.grad),
                         ref_vjp(a, u, dy, cu, layout, per_head, 8, hops, x0)):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-10)


def test_torch_compile_fullgraph_and_bad_cu(rng):
    torch = pytest.importorskip("torch")
    from swr_array.adapters import torch as st

    cu, a, u = draw(rng, "BLHD", True, [3, 0, 9, 4])
    cu_t = torch.tensor(cu, dtype=torch.int64)
    ta, tu = torch.tensor(a, dtype=torch.float32), torch.tensor(u, dtype=torch.float32)
    tx = torch.randn(4, 2, 3)

    def f(a, u, x0, cu):
        return st.swr(a, u, block_len=4, hops=1, layout="BLHD", x0=x0, cu_seqlens=cu)

    cf = torch.compile(f, fullgraph=True)
    want = ref_fwd(a.astype(np.float32), u.astype(np.float32), cu, "BLHD", True, 4, 1,
                   tx.numpy())
    np.testing.assert_allclose(cf(ta, tu, tx, cu_t).numpy(), want, rtol=1e-5, atol=1e-5)
    bad = cu_t.clone()
    bad[2] = 100
    assert torch.isnan(cf(ta, tu, tx, bad)).all()  # values of a traced cu: poisoned, not read
    with pytest.raises(ValueError, match="non-decreasing"):
        f(ta, tu, tx, bad)  # eager on the CPU: checked
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        f(ta, tu, tx, cu_t.float())
    with pytest.raises(ValueError, match=r"x0 must have shape \(S, H, D\)"):
        f(ta, tu, tx[:2], cu_t)


def test_torch_phalanx_forward_packed(rng):
    torch = pytest.importorskip("torch")
    from swr_array.adapters import torch as st

    torch.manual_seed(0)
    layer = st.Phalanx(16, head_dim=4, block_len=4).double()
    cu = torch.tensor([0, 3, 3, 12, 13])
    x = torch.randn(1, 13, 16, dtype=torch.float64)
    out = layer(x, cu_seqlens=cu)
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if hi > lo:
            torch.testing.assert_close(out[:, lo:hi], layer(x[:, lo:hi]), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, hops", [("BLHD", 1), ("BHDL", None)])
def test_jax_swr_packed_under_jit(rng, layout, hops):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from swr_array.adapters import jax as sj

    per_head = layout == "BHDL"
    cu, a, u = draw(rng, layout, per_head, [0, 1, 5, 8, 11, 0, 17])
    a, u = a.astype(np.float32), u.astype(np.float32)
    x0 = rng.standard_normal((7, 2, 3)).astype(np.float32)
    dy = rng.standard_normal(u.shape).astype(np.float32)

    @jax.jit
    def f(a, u, x0, cu):
        return sj.swr(a, u, block_len=8, hops=hops, layout=layout, x0=x0, cu_seqlens=cu)

    y, vjp = jax.vjp(f, jnp.asarray(a), jnp.asarray(u), jnp.asarray(x0),
                     jnp.asarray(cu, jnp.int32))
    g = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(np.asarray(y), ref_fwd(a, u, cu, layout, per_head, 8, hops, x0),
                               rtol=1e-5, atol=1e-5)
    for got, want in zip(g[:3], ref_vjp(a, u, dy, cu, layout, per_head, 8, hops, x0)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    bad = np.array(cu)
    bad[2] = 100
    assert bool(jnp.isnan(f(a, u, x0, jnp.asarray(bad, jnp.int32))).all())
    with pytest.raises(ValueError, match="non-decreasing"):
        sj.swr(a, u, block_len=8, layout=layout, cu_seqlens=bad)


def test_jax_phalanx_packed(rng):
    pytest.importorskip("jax")
    import jax.numpy as jnp
    from swr_array.adapters import jax as sj

    params = sa.init_phalanx(16, head_dim=4)
    p = sj.PhalanxParams.from_dict(params)
    cu = np.array([0, 3, 3, 12, 13], np.int32)
    x = rng.standard_normal((1, 13, 16)).astype(np.float32)
    out = sj.phalanx(p, jnp.asarray(x), block_len=4, cu_seqlens=jnp.asarray(cu))
    # the NumPy front's packed layer is checked against the per-sequence reference above
    want = sa.phalanx(x.astype(np.float64), _phalanx_params_from(params), block_len=4,
                      cu_seqlens=cu)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)


def test_out_arguments_with_cu_seqlens(rng):
    cu, a, u = draw(rng, "BHDL", False, [4, 0, 7])
    x0 = rng.standard_normal((3, 2, 3))
    dy = rng.standard_normal(u.shape)
    kw = dict(block_len=4, hops=2, layout="BHDL", x0=x0, cu_seqlens=cu)
    y = np.full(u.shape, np.nan)
    assert sa.swr(a, u, out=y, **kw) is y
    np.testing.assert_allclose(y, ref_fwd(a, u, cu, "BHDL", False, 4, 2, x0), atol=1e-12)
    out = (np.full(a.shape, np.nan), np.full(u.shape, np.nan), np.full((3, 2, 3), np.nan))
    res = sa.swr_vjp(a, u, dy, out=out, **kw)
    assert all(r is o for r, o in zip(res, out))
    for got, want in zip(res, ref_vjp(a, u, dy, cu, "BHDL", False, 4, 2, x0)):
        np.testing.assert_allclose(got, want, atol=1e-10)
    with pytest.raises(ValueError, match=r"out\[2\] \(dx0\) must have shape \(3, 2, 3\)"):
        sa.swr_vjp(a, u, dy, out=(out[0], out[1], np.zeros((1, 2, 3))), **kw)
