"""The split-anywhere state contract and one-token decoding (SPEC section 3)."""

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
    full = sa.swr(a, u, block_len=l, hops=hops, x0=x0)
    y, state = sa.swr(a[..., :prompt], u[..., :prompt], block_len=l, hops=hops, x0=x0,
                      return_state=True)
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
    full = sa.swr(a, u, block_len=l, hops=hops, x0=x0)
    state = sa.swr_init_state((2, 2, 2), block_len=l, hops=hops, x0=x0)
    out = []
    for t in range(n):
        y, state = sa.swr_step(a[..., t], u[..., t], state)
        out.append(y)
    np.testing.assert_allclose(np.stack(out, -1), full, rtol=1e-12, atol=1e-12)
