"""The small-batch Phalanx GEMV step (numba_kernels/phalanx_gemv.py) against the float64 reference.

Runs under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, NumPy arrays) or on a GPU (CuPy
arrays); skipped otherwise. Rows of one state sit at different positions and step together;
outputs and the scratch read-out are poisoned with NaN before each launch. The reference is the
full forward (``swr_array.phalanx`` on float64) at each row's position.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from kernel_side import SIM, dev, device_state, host, needs_kernels

import swr_array as sa

pytestmark = needs_kernels

DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}
TOL = {"f32": 2e-5, "f16": 4e-3, "bf16": 3e-2}


# few simulated threads: 2-3 warps per head (8 rows a warp), one warp of 8 output rows a block
SPLIT = {"rpw": 8, "unroll": 2, "nwb": 1, "out_rpw": 8, "out_unroll": 1}


@pytest.mark.parametrize("kind,B,H,D,KV,hops,block_len", [
    ("f32", 3, 4, 4, 4, 1, 4),
    ("f32", 2, 2, 4, 1, None, 2),
    ("f32", 1, 2, 8, 1, 0, 4),
    ("bf16", 2, 4, 4, 2, 2, 2),
    ("f16", 2, 2, 8, 2, 1, 4),
])
def test_gemv_step_equals_the_forward(rng, monkeypatch, kind, B, H, D, KV, hops, block_len):
    from swr_array.numba_kernels import phalanx_gemv as PG

    if kind == "f16":  # the epilogue that loads the state after the GEMV (many channels a block)
        monkeypatch.setattr(PG, "PREFETCH_STATE", False)
    dim, steps, decay_max = 32, 3, 0.95
    dt, f = DTYPES[kind], np.float64
    params = sa.init_phalanx(dim, heads=H, head_dim=D, kv_heads=KV, decay_max=decay_max,
                             dtype=dt, seed=int(rng.integers(1 << 30)))
    p64 = {k: np.asarray(v, f) for k, v in params.items()}
    prompts = [int(p) for p in rng.integers(0, 7, B)]
    L = max(prompts) + steps
    x = rng.standard_normal((B, L, dim)).astype(dt)
    full = sa.phalanx(x.astype(f), p64, block_len=block_len, hops=hops)
    ref = sa.swr_init_state((B, H, D), block_len=block_len, hops=hops)
    ref.layer = ("phalanx", dim, H, D, KV, decay_max)
    for b, p in enumerate(prompts):
        if p:
            _, s = sa.phalanx(x[b:b + 1, :p].astype(f), p64, block_len=block_len, hops=hops,
                              return_state=True)
            ref.load_rows([b], s)
    state = device_state(ref)
    w_in = dev(np.ascontiguousarray(np.asarray(params["W_in"]).T))  # (W, dim), rows V|Bg|C|A
    w_out = dev(np.ascontiguousarray(np.asarray(params["W_out"]).T))  # (dim, H*D)
    b_a, b_b, b_c = (dev(np.asarray(params[k])) for k in ("b_a", "b_b", "b_c"))
    assert PG.unsupported(kind, B, dim, H, D, (0, 0)) is None
    xs = [dev(np.ascontiguousarray(x[np.arange(B), np.array(prompts) + t])) for t in range(steps)]
    y = dev(np.full((B, H * D), np.nan, dt))
    out = dev(np.full((B, dim), np.nan, dt))
    run = PG.GemvStep(xs[0], y, out, w_in, b_a, b_b, b_c, w_out, state.arrays(),
                      state._arrivals(), heads=H, head_dim=D, kv_heads=KV, decay_max=decay_max,
                      hops=hops, block_len=block_len, split=SPLIT if SIM else None)
    for t in range(steps):
        y[...] = np.nan
        out[...] = np.nan
        run.run(xs[t], y, out)
        got = host(out).astype(f)
        want = full[np.arange(B), np.array(prompts) + t]
        assert np.isfinite(got).all()
        assert np.abs(got - want).max() <= TOL[kind] * 4 * max(1.0, np.abs(want).max()), t
    np.testing.assert_array_equal(host(state.position), np.array(prompts) + steps)
    np.testing.assert_array_equal(host(state._arrivals()), 0)  # ready for the next launch
