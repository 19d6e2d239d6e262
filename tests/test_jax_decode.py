"""JAX decoding (adapters/_jax_decode.py): the state as a pytree, jitted steps with donated
buffers, lax.scan over steps, rows at different positions, against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from swr_array.adapters import jax as sj  # noqa: E402

import swr_array as sa  # noqa: E402

TOL = dict(rtol=2e-5, atol=2e-5)


def inputs(rng, B, L, H, D, per_head):
    a = rng.uniform(0.3, 1.05, (B, L, H) if per_head else (B, L, H, D)).astype(np.float32)
    u = rng.standard_normal((B, L, H, D)).astype(np.float32)
    return a, u


@pytest.mark.parametrize("hops,per_head,layout", [(0, False, "BLHD"), (1, True, "BHDL"),
                                                   (2, False, "BHDL"), (None, True, "BLHD")])
def test_scan_over_steps_equals_the_forward(rng, hops, per_head, layout):
    B, L, H, D = 2, 19, 2, 3
    a, u = inputs(rng, B, L, H, D, per_head)
    x0 = rng.standard_normal((B, H, D)).astype(np.float32)
    full = sa.swr(a.astype(np.float64), u.astype(np.float64), x0=x0.astype(np.float64),
                  block_len=4, hops=hops, layout="BLHD")
    if layout == "BHDL":
        a = np.moveaxis(a, 1, -1)
        u = np.moveaxis(u, 1, -1)
    state = sj.swr_init_state((B, H, D), block_len=4, hops=hops, x0=jnp.asarray(x0))
    y, state = jax.jit(lambda a, u, s: sj.swr_scan(a, u, s, layout=layout))(a, u, state)
    y = np.asarray(y)
    np.testing.assert_allclose(np.moveaxis(y, -1, 1) if layout == "BHDL" else y, full, **TOL)
    np.testing.assert_array_equal(np.asarray(state.position), [L, L])
    # the state after the scan is the front's state after the whole prefill
    _, ref = sa.swr(a.astype(np.float64), u.astype(np.float64), x0=x0.astype(np.float64),
                    block_len=4, hops=hops, layout=layout, return_state=True)
    for k in ("w", "g", "carry_v", "carry_C"):
        np.testing.assert_allclose(np.asarray(getattr(state, k)), getattr(ref, k), **TOL)


@pytest.mark.parametrize("hops", [3, None])
def test_donated_steps_with_rows_at_different_positions(rng, hops):
    B, L, H, D, l = 3, 24, 2, 2, 4
    prompts = [0, 6, 11]
    a, u = inputs(rng, B, L, H, D, per_head=True)
    a64, u64 = a.astype(np.float64), u.astype(np.float64)
    full = sa.swr(a64, u64, block_len=l, hops=hops, layout="BLHD")
    front = sa.swr_init_state((B, H, D), block_len=l, hops=hops)
    for b, p in enumerate(prompts):
        _, s = sa.swr(a64[b:b + 1, :p], u64[b:b + 1, :p], block_len=l, hops=hops,
                      layout="BLHD", return_state=True)
        front.load_rows([b], s)
    state = sj.state_from_front(front)
    rows = np.arange(B)
    for t in range(9):
        idx = np.array(prompts) + t
        old = state.w
        y, state = sj.swr_decode_step(a[rows, idx], u[rows, idx], state, layout="BLHD")
        assert old.is_deleted()  # donated: XLA reused the buffers
        np.testing.assert_allclose(np.asarray(y), full[rows, idx], **TOL)
    np.testing.assert_array_equal(np.asarray(state.position), np.array(prompts) + 9)
    back = sj.state_to_front(state)
    np.testing.assert_array_equal(back.position, np.array(prompts) + 9)


def test_the_state_is_a_pytree():
    s = sj.swr_init_state((2, 3, 4), block_len=8, hops=2)
    leaves, tree = jax.tree.flatten(s)
    assert [x.shape for x in leaves] == [(2,), (2, 3, 4), (2, 3, 4), (2, 3, 4, 2), (2, 3, 4, 2)]
    t = jax.tree.unflatten(tree, [x + 1 for x in leaves])
    assert isinstance(t, sj.JaxSWRState) and (t.block_len, t.hops) == (8, 2)
    np.testing.assert_array_equal(np.asarray(t.position), [1, 1])


def test_phalanx_step_equals_the_layer():
    dim, B, L = 24, 2, 13
    params = sa.init_phalanx(dim, head_dim=4, kv_heads=3, dtype=np.float32, seed=2)
    x = np.random.default_rng(1).standard_normal((B, L, dim)).astype(np.float32)
    full = sa.phalanx(x.astype(np.float64), {k: np.asarray(v, np.float64) if k != "decay_max"
                                             else v for k, v in params.items()},
                      block_len=4, hops=1)
    p = sj.PhalanxParams.from_dict(params)
    state = sj.swr_init_state((B, p.heads, p.head_dim), block_len=4, hops=1)
    step = jax.jit(sj.phalanx_step, donate_argnums=(2,))
    for t in range(L):
        out, state = step(p, jnp.asarray(x[:, t]), state)
        np.testing.assert_allclose(np.asarray(out), full[:, t], rtol=1e-4, atol=1e-4)


def test_bad_steps_are_refused():
    s = sj.swr_init_state((2, 3, 4), block_len=8, hops=1)
    a, u = jnp.ones((2, 3)), jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="u_t must have shape"):
        sj.swr_step(a, u[:1], s)
    with pytest.raises(ValueError, match="a_t must have shape"):
        sj.swr_step(a[:, :2], u, s)
    with pytest.raises(TypeError, match="share one dtype"):
        sj.swr_step(a.astype(jnp.float16), u, s)
    with pytest.raises(TypeError, match="JaxSWRState"):
        sj.swr_step(a, u, "state")
    with pytest.raises(ValueError, match="block_len"):
        sj.swr_init_state((2, 3, 4), block_len=3)
