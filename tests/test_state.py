"""The split-anywhere state contract and one-token decoding (docs/spec.md#state)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import swr_array as sa
from swr_array.ops import from_time_last

HOPS = [0, 1, 2, 3, None]


def inputs(seed, layout, per_head, n, D=2):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((2, 2, D, n))
    a = rng.uniform(-1.2, 1.2, (2, 2, 1, n) if per_head else (2, 2, D, n))
    return (np.ascontiguousarray(from_time_last(a, layout, per_head)),
            np.ascontiguousarray(from_time_last(u, layout)), rng.standard_normal((2, 2, D)))


def tslice(x, layout, sl):
    return x[..., sl] if layout == "BHDL" else x[:, sl]


@settings(max_examples=25, deadline=None)
@given(
    splits=st.lists(st.integers(0, 45), min_size=1, max_size=4),
    hops=st.sampled_from(HOPS),
    block_len=st.sampled_from([1, 2, 4, 8]),
    layout=st.sampled_from(["BHDL", "BLHD"]),
    per_head=st.booleans(),
    seed=st.integers(0, 2**31),
    with_x0=st.booleans(),
)
def test_split_anywhere(splits, hops, block_len, layout, per_head, seed, with_x0):
    n = 45
    a, u, x0 = inputs(seed, layout, per_head, n)
    x0 = x0 if with_x0 else None
    kw = dict(block_len=block_len, hops=hops, layout=layout)
    full = sa.swr(a, u, x0=x0, **kw)
    cuts = [0] + sorted(splits) + [n]
    parts, state = [], None
    for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        y, state = sa.swr(tslice(a, layout, slice(lo, hi)), tslice(u, layout, slice(lo, hi)),
                          x0=x0 if i == 0 else None, state=state, return_state=True, **kw)
        parts.append(y)
    assert state.common_position() == n
    joined = np.concatenate(parts, axis=-1 if layout == "BHDL" else 1)
    np.testing.assert_array_equal(joined, full)


@pytest.mark.parametrize("hops", HOPS)
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("prompt", [0, 1, 7, 8, 13])
def test_prefill_then_decode(hops, per_head, prompt):
    n, l = 30, 4
    a, u, x0 = inputs(prompt * 7 + (hops or 9), "BHDL", per_head, n)
    full = sa.swr(a, u, block_len=l, hops=hops, x0=x0, layout="BHDL")
    y, state = sa.swr(a[..., :prompt], u[..., :prompt], block_len=l, hops=hops, x0=x0,
                      return_state=True, layout="BHDL")
    ys = [y]
    for t in range(prompt, n):
        at = a[..., t]
        yt, state = sa.swr_step(at, u[..., t], state)
        ys.append(yt[..., None])
    np.testing.assert_allclose(np.concatenate(ys, axis=-1), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hops", HOPS)
def test_decode_from_scratch(hops):
    n, l = 19, 4
    a, u, x0 = inputs(3, "BHDL", False, n)
    full = sa.swr(a, u, block_len=l, hops=hops, x0=x0, layout="BHDL")
    state = sa.swr_init_state((2, 2, 2), block_len=l, hops=hops, x0=x0)
    out = []
    for t in range(n):
        y, state = sa.swr_step(a[..., t], u[..., t], state)
        out.append(y)
    np.testing.assert_allclose(np.stack(out, -1), full, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# the graph-ready state: in place, per-row positions, row management (docs/decoding.md)
# ----------------------------------------------------------------------------------------------


def mixed_state(a, u, x0, prompts, **kw):
    """A state whose row b has consumed its first prompts[b] tokens (BHDL inputs), built row by
    row with prefills and load_rows."""
    B, H, D, _ = u.shape
    state = sa.swr_init_state((B, H, D), block_len=kw["block_len"], hops=kw["hops"])
    for b, p in enumerate(prompts):
        _, s = sa.swr(a[b:b + 1, ..., :p], u[b:b + 1, ..., :p], x0=x0[b:b + 1],
                      return_state=True, layout="BHDL", **kw)
        state.load_rows([b], s)
    return state


@settings(max_examples=25, deadline=None)
@given(
    prompts=st.lists(st.integers(0, 20), min_size=3, max_size=3),
    hops=st.sampled_from(HOPS),
    block_len=st.sampled_from([1, 2, 4]),
    per_head=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_step_with_rows_at_different_positions(prompts, hops, block_len, per_head, seed):
    """Rows at different positions step together; each row's y_t is the full forward's at that
    row's position, and the state stays the same object with the same arrays."""
    rng = np.random.default_rng(seed)
    B, H, D, n, steps = 3, 2, 2, 30, 7
    u = rng.standard_normal((B, H, D, n))
    a4 = rng.uniform(-1.1, 1.1, (B, H, 1 if per_head else D, n))
    a = a4[:, :, 0] if per_head else a4
    x0 = rng.standard_normal((B, H, D))
    kw = dict(block_len=block_len, hops=hops)
    full = sa.swr(a, u, x0=x0, layout="BHDL", **kw)
    state = mixed_state(a, u, x0, prompts, **kw)
    ids = [id(x) for x in state.arrays()]
    rows = np.arange(B)
    for t in range(steps):
        idx = np.array(prompts) + t
        at = a4[rows, :, :, idx]
        at = at[..., 0] if per_head else at
        y, same = sa.swr_step(at, u[rows, :, :, idx], state, layout="BHDL")
        assert same is state and [id(x) for x in state.arrays()] == ids
        np.testing.assert_allclose(y, full[rows, :, :, idx], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(state.position, np.array(prompts) + steps)


def test_prefill_with_a_state_advances_it_in_place():
    a, u, x0 = inputs(5, "BHDL", False, 20)
    s0 = sa.swr_init_state((2, 2, 2), block_len=4, hops=2, x0=x0)
    ids = [id(x) for x in s0.arrays()]
    y1, s1 = sa.swr(a[..., :7], u[..., :7], state=s0, return_state=True, block_len=4, hops=2,
                    layout="BHDL")
    assert s1 is s0 and [id(x) for x in s1.arrays()] == ids
    y2 = sa.swr(a[..., 7:], u[..., 7:], state=s1, block_len=4, hops=2, layout="BHDL")
    full = sa.swr(a, u, x0=x0, block_len=4, hops=2, layout="BHDL")
    np.testing.assert_array_equal(np.concatenate([y1, y2], -1), full)
    # without return_state a given state is only read
    np.testing.assert_array_equal(s1.position, [7, 7])


def test_multi_token_call_needs_one_position():
    a, u, x0 = inputs(6, "BHDL", False, 10)
    s = mixed_state(a, u, x0, [3, 5], block_len=4, hops=1)
    with pytest.raises(ValueError, match="different positions"):
        sa.swr(a[..., :2], u[..., :2], state=s, block_len=4, hops=1, layout="BHDL")


def test_reset_and_load_rows_leave_other_rows_alone():
    a, u, x0 = inputs(8, "BHDL", False, 20)
    kw = dict(block_len=4, hops=2)
    s = mixed_state(a, u, x0, [6, 9], **kw)
    before = [x.copy() for x in s.arrays()]
    s.reset_rows([0], x0=x0[:1])
    fresh = sa.swr_init_state((2, 2, 2), x0=x0, **kw)
    for new, old, ref in zip(s.arrays(), before, fresh.arrays()):
        np.testing.assert_array_equal(new[1], old[1])
        np.testing.assert_array_equal(new[0], ref[0])
    # load row 1 of another prefill into row 0: row 0 then continues that sequence
    _, other = sa.swr(a[..., :11], u[..., :11], x0=x0, return_state=True, layout="BHDL", **kw)
    s.load_rows([0], other, src_rows=[1])
    for new, old, ref in zip(s.arrays(), before, other.arrays()):
        np.testing.assert_array_equal(new[1], old[1])
        np.testing.assert_array_equal(new[0], ref[1])
    full = sa.swr(a, u, x0=x0, layout="BHDL", **kw)
    # both rows now hold prefixes of sequence 1: row 0 at token 11, row 1 at token 9
    y, _ = sa.swr_step(np.stack([a[1, ..., 11], a[1, ..., 9]]),
                       np.stack([u[1, ..., 11], u[1, ..., 9]]), s, layout="BHDL")
    np.testing.assert_allclose(y, np.stack([full[1, ..., 11], full[1, ..., 9]]), rtol=1e-12)


@pytest.mark.parametrize("bad", ["batch", "heads", "dtype", "block_len", "hops", "a_t", "out"])
def test_a_refused_step_leaves_the_state_unchanged(bad):
    B, H, D = 2, 3, 2
    rng = np.random.default_rng(4)
    s = sa.swr_init_state((B, H, D), block_len=4, hops=1)
    for _ in range(3):
        sa.swr_step(rng.uniform(0, 1, (B, H)), rng.standard_normal((B, H, D)), s, layout="BLHD")
    before = [x.copy() for x in s.arrays()]
    a, u, kw = rng.uniform(0, 1, (B, H)), rng.standard_normal((B, H, D)), {}
    if bad == "batch":
        a, u = a[:1], u[:1]
    elif bad == "heads":
        a, u = a[:, :2], u[:, :2]
    elif bad == "dtype":
        a, u = a.astype(np.float32), u.astype(np.int32)
    elif bad == "a_t":
        a = a[:, :, None, None]
    elif bad == "out":
        kw = dict(out=np.empty((B, H, D + 1)))
    else:
        s.block_len, s.hops = (8, 1) if bad == "block_len" else (4, 2)
        with pytest.raises(ValueError, match="block_len"):
            sa.swr(a[..., None], u[..., None], state=s, block_len=4, hops=1, layout="BHDL")
        return
    with pytest.raises((ValueError, TypeError)):
        sa.swr_step(a, u, s, layout="BLHD", **kw)
    for new, old in zip(s.arrays(), before):
        np.testing.assert_array_equal(new, old)


def test_row_arguments_are_checked():
    s = sa.swr_init_state((2, 1, 1), block_len=4, hops=1)
    with pytest.raises(ValueError, match="rows must be in"):
        s.reset_rows([2])
    with pytest.raises(TypeError, match="rows must be"):
        s.reset_rows([0.5])
    with pytest.raises(ValueError, match="block_len"):
        s.load_rows([0], sa.swr_init_state((1, 1, 1), block_len=8, hops=1))
    with pytest.raises(ValueError, match="heads x head_dim"):
        s.load_rows([0], sa.swr_init_state((1, 2, 1), block_len=4, hops=1))
    with pytest.raises(ValueError, match="one length"):
        s.load_rows([0, 1], sa.swr_init_state((1, 1, 1), block_len=4, hops=1))


def test_a_state_of_another_layer_configuration_is_refused():
    """Phalanx states carry their layer's configuration; another layer with the same state
    shape refuses them before computing anything, and the state is left as it was."""
    p1 = sa.init_phalanx(16, head_dim=4, dtype=np.float64, seed=1)
    p2 = sa.init_phalanx(16, head_dim=4, dtype=np.float64, decay_max=0.9, seed=1)
    x = np.random.default_rng(2).standard_normal((2, 5, 16))
    _, s = sa.phalanx(x, p1, block_len=4, return_state=True)
    assert s.layer == ("phalanx", 16, 4, 4, 4, 1.0)
    before = [v.copy() for v in s.arrays()]
    with pytest.raises(ValueError, match="made by the layer"):
        sa.phalanx_step(x[:, 0], p2, s, block_len=4)
    with pytest.raises(ValueError, match="made by the layer"):
        sa.phalanx(x, p2, state=s, block_len=4)
    for new, old in zip(s.arrays(), before):
        np.testing.assert_array_equal(new, old)
    out, same = sa.phalanx_step(x[:, 0], p1, s, block_len=4)
    assert same is s
    np.testing.assert_array_equal(s.position, [6, 6])
