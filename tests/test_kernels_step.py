"""The in-place decoding kernels (numba_kernels/swr_step.py) against the float64 reference.

Runs under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, NumPy arrays) or on a GPU (CuPy
arrays); skipped otherwise. Outputs are poisoned with NaN before each launch. Rows of one state
sit at different positions (mixed prompt lengths) and step together.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from kernel_side import dev, device_state, host, needs_kernels

import swr_array as sa
from swr_array import reference as R

pytestmark = needs_kernels

DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}
TOL = {"f32": 3e-6, "f16": 3e-3, "bf16": 2e-2}


@pytest.fixture(params=["rows_over_blocks", "row_per_block"])
def split(request, monkeypatch):
    """The kernels' work split: the default plan (simulator: 2 threads of 2 channels, so a row of
    H*D = 6 channels spans 2 blocks, the last thread masked), or one block per row (4 threads of 2
    channels; the position advances after a barrier, no arrival counter)."""
    if request.param == "row_per_block":
        from swr_array.numba_kernels import swr_step as ks

        monkeypatch.setattr(ks, "plan", lambda hd, K: (4, 2, -(-hd // 8)))
    return request.param


def mixed_reference_state(a, u, x0, prompts, block_len, hops):
    """Reference state (BHDL inputs) whose row b consumed prompts[b] tokens."""
    B, H, D, _ = u.shape
    state = sa.swr_init_state((B, H, D), block_len=block_len, hops=hops)
    for b, p in enumerate(prompts):
        _, s = sa.swr(a[b:b + 1, ..., :p], u[b:b + 1, ..., :p], x0=x0[b:b + 1],
                      return_state=True, layout="BHDL", block_len=block_len, hops=hops)
        state.load_rows([b], s)
    return state


@pytest.mark.parametrize("kind,out_kind,per_head,hops,block_len", [
    ("f32", "f32", True, 1, 4),
    ("f32", "f32", False, 0, 4),
    ("f32", "f32", False, 2, 2),
    ("f32", "f32", True, None, 4),
    ("f16", "f32", False, 1, 4),
    ("bf16", "bf16", True, 3, 1),
])
def test_swr_step_kernel_equals_the_forward(rng, split, kind, out_kind, per_head, hops, block_len):
    from swr_array import _cuda

    B, H, D, n, steps = 3, 2, 3, 16, 5
    prompts = [0, 5, 9]
    dt, odt = DTYPES[kind], DTYPES[out_kind]
    u = rng.standard_normal((B, H, D, n)).astype(dt).astype(np.float64)
    a = rng.uniform(-1.0, 1.0, (B, H, n) if per_head else (B, H, D, n)).astype(dt)
    a = a.astype(np.float64)
    x0 = rng.standard_normal((B, H, D))
    full = sa.swr(a, u, x0=x0, block_len=block_len, hops=hops, layout="BHDL")
    ref = mixed_reference_state(a, u, x0, prompts, block_len, hops)
    state = device_state(ref)
    ids = [id(x) for x in state.arrays()]
    rows = np.arange(B)
    for t in range(steps):
        idx = np.array(prompts) + t
        at = a[rows, :, idx] if per_head else a[rows, :, :, idx]
        y = dev(np.full((B, H, D), np.nan, odt))
        _cuda.swr_step(dev(at.astype(dt)), dev(u[rows, :, :, idx].astype(dt)), y, state,
                       not per_head)
        sa.swr_step(at, u[rows, :, :, idx], ref, layout="BHDL")
        got = host(y).astype(np.float64)
        want = full[rows, :, :, idx]
        assert np.isfinite(got).all()
        assert np.abs(got - want).max() <= TOL[kind] * max(1.0, np.abs(want).max()) * 4
    assert [id(x) for x in state.arrays()] == ids
    np.testing.assert_array_equal(host(state.position), np.array(prompts) + steps)
    np.testing.assert_array_equal(host(state._arrivals()), 0)  # ready for the next launch
    for k in ("w", "g", "carry_v", "carry_C"):
        np.testing.assert_allclose(host(getattr(state, k)), getattr(ref, k), rtol=TOL[kind] * 8,
                                   atol=TOL[kind] * 8)


@pytest.mark.parametrize("kind,hops,KV", [("f32", 1, 2), ("f32", 0, 1), ("f32", None, 1),
                                          ("f32", 2, 2), ("bf16", 1, 1), ("f16", 1, 2)])
def test_phalanx_step_mix_equals_the_forward(rng, split, kind, hops, KV):
    B, L, H, D, block_len, decay_max = 3, 12, 2, 3, 4, 0.97
    prompts = [0, 3, 6]
    steps = L - max(prompts)
    dt = DTYPES[kind]
    W = H * D + 2 * KV * D + H
    z = rng.normal(size=(B, L, W)).astype(dt)
    z[..., -H:] = (rng.normal(size=(B, L, H)) + 2.0).astype(dt)
    b_a = rng.normal(scale=0.5, size=H).astype(dt)
    b_b = rng.normal(size=KV * D).astype(dt)
    b_c = rng.normal(size=KV * D).astype(dt)
    f = np.float64
    kw = dict(heads=H, head_dim=D, kv_heads=KV, decay_max=decay_max, block_len=block_len,
              hops=hops)
    full = R.phalanx_mix(z.astype(f), b_a.astype(f), b_b.astype(f), b_c.astype(f), **kw)
    full = full.reshape(B, L, H * D)
    # the recurrence's own inputs give the mixed-position state
    _, A, Bg, C, V = R._phalanx_gates(z.astype(f), b_a, b_b, b_c, H, D, KV, decay_max)
    a_t = np.ascontiguousarray(A.transpose(0, 2, 1))  # (B, H, L)
    u_t = np.ascontiguousarray((Bg * V).transpose(0, 2, 3, 1))  # (B, H, D, L)
    ref = mixed_reference_state(a_t, u_t, np.zeros((B, H, D)), prompts, block_len, hops)
    state = device_state(ref)
    biases = dev(b_a), dev(b_b), dev(b_c)
    rows = np.arange(B)
    for t in range(steps):
        idx = np.array(prompts) + t
        y = dev(np.full((B, H * D), np.nan, dt))
        sa.phalanx_step_mix(dev(np.ascontiguousarray(z[rows, idx])), y, *biases, state,
                            kv_heads=KV, decay_max=decay_max)
        got = host(y).astype(f)
        want = full[rows, idx]
        assert np.isfinite(got).all()
        assert np.abs(got - want).max() <= TOL[kind] * 4 * max(1.0, np.abs(want).max())
    np.testing.assert_array_equal(host(state.position), np.array(prompts) + steps)


def test_phalanx_step_mix_checks_before_launching():
    B, H, D, KV = 2, 2, 2, 1
    state = device_state(sa.swr_init_state((B, H, D), block_len=4, hops=1))
    W = H * D + 2 * KV * D + H
    z, y = dev(np.zeros((B, W), np.float32)), dev(np.zeros((B, H * D), np.float32))
    b = dev(np.zeros(H, np.float32)), dev(np.zeros(KV * D, np.float32))
    before = [host(x).copy() for x in state.arrays()]
    with pytest.raises(ValueError, match="z must have shape"):
        sa.phalanx_step_mix(z[:1], y, b[0], b[1], b[1], state, kv_heads=KV, decay_max=1.0)
    with pytest.raises(ValueError, match="kv_heads"):
        sa.phalanx_step_mix(z, y, b[0], b[1], b[1], state, kv_heads=2, decay_max=1.0)
    with pytest.raises(TypeError, match="one dtype"):
        sa.phalanx_step_mix(z, dev(np.zeros((B, H * D), np.float16)), b[0], b[1], b[1], state,
                            kv_heads=KV, decay_max=1.0)
    for new, old in zip(state.arrays(), before):
        np.testing.assert_array_equal(host(new), old)


def test_swr_step_into_equals_swr_step_and_checks_first(rng):
    """The framework-neutral launch (what the torch adapter calls) gives swr_step's numbers;
    bad arrays are refused before the launch, leaving the state as it was."""
    B, H, D = 2, 2, 3
    ref = sa.swr_init_state((B, H, D), block_len=2, hops=2)
    state = device_state(ref)
    for _ in range(5):
        a = rng.uniform(0.2, 1.0, (B, H))
        u = rng.standard_normal((B, H, D))
        y = dev(np.full((B, H, D), np.nan, np.float32))
        sa.swr_step_into(dev(a.astype(np.float32)), dev(u.astype(np.float32)), y, state)
        want, _ = sa.swr_step(a.astype(np.float32).astype(np.float64),
                              u.astype(np.float32).astype(np.float64), ref, layout="BLHD")
        np.testing.assert_allclose(host(y), want, rtol=1e-5, atol=1e-5)
    before = [host(x).copy() for x in state.arrays()]
    a32, u32 = dev(np.ones((B, H), np.float32)), dev(np.ones((B, H, D), np.float32))
    with pytest.raises(ValueError, match="state's shape"):
        sa.swr_step_into(a32, u32[:1], dev(np.empty((1, H, D), np.float32)), state)
    with pytest.raises(TypeError, match="one dtype"):
        sa.swr_step_into(dev(np.ones((B, H), np.float16)), u32, dev(np.empty((B, H, D),
                                                                             np.float32)), state)
    with pytest.raises(ValueError, match="a_t must have shape"):
        sa.swr_step_into(a32[:, :1], u32, dev(np.empty((B, H, D), np.float32)), state)
    for new, old in zip(state.arrays(), before):
        np.testing.assert_array_equal(host(new), old)


def test_empty_batch_launches_nothing():
    state = device_state(sa.swr_init_state((0, 2, 3), block_len=4, hops=1))
    y = dev(np.empty((0, 2, 3), np.float32))
    sa.swr_step_into(dev(np.empty((0, 2), np.float32)), dev(np.empty((0, 2, 3), np.float32)), y,
                     state)
    assert host(state.position).shape == (0,)
