"""The Phalanx layer on a real GPU (CuPy): forward, gradients, prefill and decode, against the
float64 reference on the same (rounded) inputs. Skipped without a CUDA GPU."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import swr_array
from swr_array import reference as R


def _gpu():
    try:
        import cupy

        return cupy.cuda.is_available()
    except Exception:  # noqa: BLE001 - no CuPy or no driver: no GPU
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU + CuPy")]

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
FWD_TOL = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 1.5e-2}
BWD_TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2.5e-2}


def _swr_kernels():
    from swr_array import numba_kernels

    return hasattr(numba_kernels, "swr_forward") and hasattr(numba_kernels, "swr_backward")


def _setup(dim, head_dim, kv_heads, dtype, B, L, seed=0, decay_max=1.0):
    import cupy as cp

    params = swr_array.init_phalanx(dim, head_dim=head_dim, kv_heads=kv_heads, dtype=dtype,
                                    decay_max=decay_max, seed=seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.normal(size=(B, L, dim)).astype(dtype)
    dout = rng.normal(size=(B, L, dim)).astype(dtype)
    gpu = {k: (cp.asarray(v) if k != "decay_max" else v) for k, v in params.items()}
    host64 = {k: (np.asarray(v, np.float64) if k != "decay_max" else v) for k, v in params.items()}
    return params, gpu, host64, x, dout, cp.asarray(x), cp.asarray(dout)


def rel(a, b):
    a = np.asarray(a.get() if hasattr(a, "get") else a, np.float64)
    assert np.isfinite(a).all()
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


CONFIGS = [
    # dim, head_dim, kv_heads, B, L, block_len
    (64, 16, None, 2, 77, 16),
    (48, 4, 3, 3, 50, 8),  # kv groups
    (30, 3, 5, 2, 41, 4),  # odd head_dim (element loads)
    (64, 16, None, 1, 130, 64),
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_forward_and_vjp_match_reference(cfg, hops, dtype):
    dim, head_dim, kv_heads, B, L, block_len = cfg
    _, gpu, p64, x, dout, xg, dg = _setup(dim, head_dim, kv_heads, DTYPES[dtype], B, L,
                                          decay_max=0.99)
    kw = dict(block_len=block_len, hops=hops)
    out, res = swr_array.phalanx(xg, gpu, return_residuals=True, **kw)
    assert out.dtype == xg.dtype and out.shape == xg.shape
    x64, d64 = np.asarray(x, np.float64), np.asarray(dout, np.float64)
    assert rel(out, R.phalanx_reference(x64, p64, **kw)) < FWD_TOL[dtype]
    dx, dp = swr_array.phalanx_vjp(xg, gpu, dg, residuals=res, **kw)
    dx_ref, dp_ref = R.phalanx_vjp_reference(x64, p64, d64, **kw)
    assert dx.dtype == xg.dtype
    assert rel(dx, dx_ref) < BWD_TOL[dtype]
    for k in dp_ref:
        assert dp[k].dtype == gpu[k].dtype and dp[k].shape == gpu[k].shape
        assert rel(dp[k], dp_ref[k]) < BWD_TOL[dtype], k
    dx2, _ = swr_array.phalanx_vjp(xg, gpu, dg, **kw)  # without residuals: recomputed
    # (kv groups sum with atomics: the order, and so the last bit, may differ between calls)
    assert rel(dx2, dx.get().astype(np.float64)) < BWD_TOL[dtype] / 10


@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("prompt", [0, 1, 15, 16, 17, 40])
def test_prefill_then_decode(hops, prompt):
    import cupy as cp

    _, gpu, p64, x, _, xg, _ = _setup(32, 8, 2, np.float32, 3, 45, seed=prompt)
    kw = dict(block_len=16, hops=hops)
    full = R.phalanx_reference(np.asarray(x, np.float64), p64, **kw)
    out, state = swr_array.phalanx(xg[:, :prompt], gpu, return_state=True, **kw)
    outs = [out.get()]
    for t in range(prompt, 45):
        o, state = swr_array.phalanx_step(xg[:, t], gpu, state, **kw)
        outs.append(o.get()[:, None])
    assert rel(np.concatenate(outs, axis=1), full) < 1e-5
    # chunked prefill: the rest of the sequence in one more call
    _, state = swr_array.phalanx(xg[:, :prompt], gpu, return_state=True, **kw)
    rest = swr_array.phalanx(xg[:, prompt:], gpu, state=state, **kw)
    assert rel(rest, full[:, prompt:]) < 1e-5
    assert isinstance(state.w, cp.ndarray)


@pytest.mark.skipif(not _swr_kernels(), reason="the SWR kernels (swr_forward/backward) are absent")
@pytest.mark.parametrize("hops", [2, None])
def test_composed_path_for_more_hops(hops):
    _, gpu, p64, x, dout, xg, dg = _setup(32, 8, 2, np.float32, 2, 70, seed=3)
    kw = dict(block_len=8, hops=hops)
    x64, d64 = np.asarray(x, np.float64), np.asarray(dout, np.float64)
    assert rel(swr_array.phalanx(xg, gpu, **kw), R.phalanx_reference(x64, p64, **kw)) < 1e-5
    dx, dp = swr_array.phalanx_vjp(xg, gpu, dg, **kw)
    dx_ref, dp_ref = R.phalanx_vjp_reference(x64, p64, d64, **kw)
    assert rel(dx, dx_ref) < 1e-4
    for k in dp_ref:
        assert rel(dp[k], dp_ref[k]) < 1e-4, k
    out, state = swr_array.phalanx(xg[:, :21], gpu, return_state=True, **kw)
    o, _ = swr_array.phalanx_step(xg[:, 21], gpu, state, **kw)
    assert rel(o, R.phalanx_reference(x64, p64, **kw)[:, 21]) < 1e-5


@pytest.fixture(params=["walk", "rows"])
def bwd_kernel(request, monkeypatch):
    """Each fused backward kernel in turn (TUNING bwd_kernel)."""
    from swr_array.numba_kernels import phalanx_fused as PF

    monkeypatch.setitem(PF.TUNING, "bwd_kernel", request.param)
    return request.param


@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_backward_kernels_through_the_layer(dtype, hops, bwd_kernel):
    """phalanx_vjp with either backward kernel: 128 heads of 16 (the benchmark's shape), a
    length that is not a multiple of block_len and several thread blocks of block rows."""
    _, gpu, p64, x, dout, xg, dg = _setup(2048, 16, None, DTYPES[dtype], 2, 301, seed=4,
                                          decay_max=0.99)
    x64, d64 = np.asarray(x, np.float64), np.asarray(dout, np.float64)
    dx, dp = swr_array.phalanx_vjp(xg, gpu, dg, hops=hops)
    dx_ref, dp_ref = R.phalanx_vjp_reference(x64, p64, d64, hops=hops)
    assert rel(dx, dx_ref) < BWD_TOL[dtype]
    for k in dp_ref:
        assert rel(dp[k], dp_ref[k]) < BWD_TOL[dtype], k


def test_dim_2048_bfloat16(bwd_kernel):
    """The benchmark's layer (H=128 heads of 16), fwd, bwd and decode against float64."""
    _, gpu, p64, x, dout, xg, dg = _setup(2048, 16, None, ml_dtypes.bfloat16, 2, 200, seed=9)
    x64, d64 = np.asarray(x, np.float64), np.asarray(dout, np.float64)
    out, res = swr_array.phalanx(xg, gpu, return_residuals=True)
    ref = R.phalanx_reference(x64, p64)
    assert rel(out, ref) < 1.5e-2
    dx, dp = swr_array.phalanx_vjp(xg, gpu, dg, residuals=res)
    dx_ref, dp_ref = R.phalanx_vjp_reference(x64, p64, d64)
    assert rel(dx, dx_ref) < 2.5e-2
    for k in dp_ref:
        assert rel(dp[k], dp_ref[k]) < 2.5e-2, k
    _, state = swr_array.phalanx(xg[:, :190], gpu, return_state=True)
    for t in range(190, 200):
        o, state = swr_array.phalanx_step(xg[:, t], gpu, state)
        assert rel(o, ref[:, t]) < 1.5e-2


def test_gpu_errors():
    import cupy as cp

    _, gpu, _, x, _, xg, _ = _setup(32, 8, None, np.float32, 1, 5)
    with pytest.raises(TypeError, match="x is a numpy array but params holds cupy"):
        swr_array.phalanx(x, gpu)
    with pytest.raises(TypeError, match="float64"):
        swr_array.phalanx(xg.astype(cp.float64), {k: (v.astype(cp.float64) if k != "decay_max"
                                                      else v) for k, v in gpu.items()})
    with pytest.raises(TypeError, match="x has dtype"):
        swr_array.phalanx(xg.astype(cp.float16), gpu)
