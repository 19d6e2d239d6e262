"""The Phalanx layer's front on NumPy: the float64 reference path, its gradients, its state."""

from __future__ import annotations

import io
import types

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import swr_array
from swr_array import reference as R

HOPS = (0, 1, 2, None)


def _params(dim=12, head_dim=3, kv_heads=None, decay_max=0.9, seed=0, dtype=np.float64, **kw):
    return swr_array.init_phalanx(dim, head_dim=head_dim, kv_heads=kv_heads, decay_max=decay_max,
                                  dtype=dtype, seed=seed, **kw)


def _x(shape, seed=1, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _dense_layer(x, params, block_len, hops):
    """An independent oracle: every channel's recurrence as the explicit N x N operator."""
    _, H, D, KV, dm = R.phalanx_dims(params)
    z = x @ params["W_in"]
    hd, kd = H * D, KV * D
    sig = 1.0 / (1.0 + np.exp(-(z[..., hd + 2 * kd:] + params["b_a"])))
    Bg = 1.0 / (1.0 + np.exp(-(z[..., hd:hd + kd] + params["b_b"])))
    C = z[..., hd + kd:hd + 2 * kd] + params["b_c"]
    V = z[..., :hd]
    B, L, _ = x.shape
    Y = np.empty((B, L, hd))
    for b in range(B):
        for h in range(H):
            op = R.dense_operator(dm * sig[b, :, h], block_len, hops)
            for d in range(D):
                c, k = h * D + d, (h // (H // KV)) * D + d
                Y[b, :, c] = (op @ (Bg[b, :, k] * V[b, :, c])) * C[b, :, k] + V[b, :, c]
    return Y @ params["W_out"]


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", HOPS)
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_forward_matches_dense_operator(hops, kv_heads):
    params = _params(dim=12, head_dim=3, kv_heads=kv_heads, seed=hops or 7)
    x = _x((2, 19, 12), seed=3)
    out = swr_array.phalanx(x, params, block_len=4, hops=hops)
    np.testing.assert_allclose(out, _dense_layer(x, params, 4, hops), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out, R.phalanx_reference(x, params, block_len=4, hops=hops),
                               rtol=1e-12, atol=1e-13)


def test_window_is_local():
    """hops=1: an output at block j does not move when inputs before block j-1 change."""
    params = _params(dim=8, head_dim=4)
    x = _x((1, 40, 8))
    y = x.copy()
    y[:, :8] += 5.0  # blocks 0 and 1 (block_len 4)
    a = swr_array.phalanx(x, params, block_len=4, hops=1)
    b = swr_array.phalanx(y, params, block_len=4, hops=1)
    np.testing.assert_array_equal(a[:, 16:], b[:, 16:])  # block 4 on: the window starts at 8
    assert np.abs(a[:, 8:12] - b[:, 8:12]).max() > 1e-6  # block 2 still sees block 1


def test_hops_none_and_many_hops_agree():
    params = _params()
    x = _x((2, 23, 12))
    exact = swr_array.phalanx(x, params, block_len=4, hops=None)
    np.testing.assert_allclose(swr_array.phalanx(x, params, block_len=4, hops=6), exact,
                               rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_low_precision_inputs_return_their_dtype(dtype):
    params = _params(dtype=dtype)
    x = _x((2, 9, 12), dtype=dtype)
    out = swr_array.phalanx(x, params)
    assert out.dtype == np.dtype(dtype)
    p64 = {k: (np.asarray(v, np.float64) if k != "decay_max" else v) for k, v in params.items()}
    ref = R.phalanx_reference(x.astype(np.float64), p64)
    np.testing.assert_allclose(out.astype(np.float64), ref,
                               rtol=0, atol=ml_dtypes.finfo(dtype).eps * 4 * np.abs(ref).max())


def test_kv_groups_equal_repeated_full_heads():
    """kv_heads < heads is the full layer with Bg and C weights repeated over head groups."""
    H, D, KV = 4, 3, 2
    grouped = _params(dim=12, head_dim=D, kv_heads=KV, seed=5)
    col = R.phalanx_columns(H, D, KV)
    W = grouped["W_in"]
    rep = np.repeat(np.arange(KV), H // KV)  # kv head of every head

    def expand(cols, bias):
        blocks = cols.reshape(-1, KV, D)[:, rep].reshape(-1, H * D)
        return blocks, bias.reshape(KV, D)[rep].reshape(-1)

    Wb, bb = expand(W[:, col["b"][0]:col["b"][1]], grouped["b_b"])
    Wc, bc = expand(W[:, col["c"][0]:col["c"][1]], grouped["b_c"])
    full = dict(grouped, b_b=bb, b_c=bc, W_in=np.concatenate(
        [W[:, col["v"][0]:col["v"][1]], Wb, Wc, W[:, col["a"][0]:col["a"][1]]], axis=1))
    x = _x((2, 17, 12))
    np.testing.assert_allclose(swr_array.phalanx(x, grouped, block_len=4),
                               swr_array.phalanx(x, full, block_len=4), rtol=1e-12, atol=1e-13)


def test_empty_sequence():
    params = _params()
    out, state = swr_array.phalanx(np.zeros((2, 0, 12)), params, return_state=True)
    assert out.shape == (2, 0, 12) and state.common_position() == 0


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


def _loss(x, params, dout, **kw):
    return float((dout * swr_array.phalanx(x, params, **kw)).sum())


@pytest.mark.parametrize("hops", HOPS)
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_vjp_matches_finite_differences(hops, kv_heads):
    kw = dict(block_len=2, hops=hops)
    params = _params(dim=8, head_dim=2, kv_heads=kv_heads, seed=11)
    x = _x((2, 7, 8), seed=12)
    dout = _x((2, 7, 8), seed=13)
    dx, dparams = swr_array.phalanx_vjp(x, params, dout, **kw)
    assert set(dparams) == {"W_in", "b_a", "b_b", "b_c", "W_out"}
    rng = np.random.default_rng(14)
    eps = 1e-6
    for name, value, grad in [("x", x, dx)] + [(k, params[k], dparams[k]) for k in dparams]:
        assert grad.shape == value.shape and grad.dtype == value.dtype
        for _ in range(6):
            idx = tuple(int(rng.integers(s)) for s in value.shape)
            up, dn = value.copy(), value.copy()
            up[idx] += eps
            dn[idx] -= eps
            if name == "x":
                num = (_loss(up, params, dout, **kw) - _loss(dn, params, dout, **kw)) / (2 * eps)
            else:
                num = (_loss(x, dict(params, **{name: up}), dout, **kw)
                       - _loss(x, dict(params, **{name: dn}), dout, **kw)) / (2 * eps)
            assert abs(grad[idx] - num) <= 1e-6 * (1 + abs(num)), (name, idx, grad[idx], num)


def test_vjp_residuals_give_the_same_gradients():
    params = _params()
    x, dout = _x((2, 9, 12)), _x((2, 9, 12), seed=2)
    out, res = swr_array.phalanx(x, params, return_residuals=True)
    assert res["z"].shape == (2, 9, params["W_in"].shape[1])
    dx, dp = swr_array.phalanx_vjp(x, params, dout)
    dx2, dp2 = swr_array.phalanx_vjp(x, params, dout, residuals=res)
    np.testing.assert_array_equal(dx, dx2)
    for k in dp:
        np.testing.assert_array_equal(dp[k], dp2[k])



def test_vjp_linear_layout_gives_the_transposed_weight_gradients():
    params = _params()
    x, dout = _x((2, 9, 12)), _x((2, 9, 12), seed=2)
    dx, dp = swr_array.phalanx_vjp(x, params, dout)
    dx2, dp2 = swr_array.phalanx_vjp(x, params, dout, linear_layout=True)
    np.testing.assert_array_equal(dx, dx2)
    np.testing.assert_array_equal(dp2["W_in"], dp["W_in"].T)
    np.testing.assert_array_equal(dp2["W_out"], dp["W_out"].T)
    for k in ("b_a", "b_b", "b_c"):
        np.testing.assert_array_equal(dp2[k], dp[k])
    with pytest.raises(TypeError, match="linear_layout"):
        swr_array.phalanx_vjp(x, params, dout, linear_layout="yes")

# ----------------------------------------------------------------------------------------------
# state: chunked prefill and decoding
# ----------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(prompt=st.integers(0, 21), hops=st.sampled_from(HOPS), block_len=st.sampled_from([1, 4, 8]))
def test_prefill_then_decode_equals_full_sequence(prompt, hops, block_len):
    params = _params(dim=8, head_dim=2, kv_heads=2, seed=prompt)
    x = _x((2, 21, 8), seed=prompt + 100)
    kw = dict(block_len=block_len, hops=hops)
    full = swr_array.phalanx(x, params, **kw)
    out, state = swr_array.phalanx(x[:, :prompt], params, return_state=True, **kw)
    outs = [out]
    for t in range(prompt, 21):
        o, state = swr_array.phalanx_step(x[:, t], params, state, **kw)
        outs.append(o[:, None])
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-11, atol=1e-12)
    assert state.common_position() == 21


@settings(max_examples=20, deadline=None)
@given(split=st.integers(0, 19), hops=st.sampled_from(HOPS))
def test_chunked_prefill(split, hops):
    params = _params(seed=3)
    x = _x((1, 19, 12), seed=split)
    full = swr_array.phalanx(x, params, block_len=4, hops=hops)
    a, state = swr_array.phalanx(x[:, :split], params, block_len=4, hops=hops, return_state=True)
    b = swr_array.phalanx(x[:, split:], params, block_len=4, hops=hops, state=state)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), full, rtol=1e-11, atol=1e-12)


def test_decode_from_scratch():
    params = _params()
    x = _x((3, 10, 12))
    full = swr_array.phalanx(x, params, block_len=4)
    state = None
    for t in range(10):
        o, state = swr_array.phalanx_step(x[:, t], params, state, block_len=4)
        np.testing.assert_allclose(o, full[:, t], rtol=1e-11, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------


def test_init_shapes_bounds_and_seed():
    p = swr_array.init_phalanx(64, head_dim=16, kv_heads=2, decay_max=0.5, seed=3)
    H, D, KV = 4, 16, 2
    assert p["W_in"].shape == (64, H * D + 2 * KV * D + H)
    assert p["b_a"].shape == (H,) and p["b_b"].shape == (KV * D,) == p["b_c"].shape
    assert p["W_out"].shape == (H * D, 64)
    assert p["W_in"].dtype == np.float32 and float(p["decay_max"]) == 0.5
    assert np.abs(p["W_in"]).max() <= 1 / 8 and np.abs(p["W_in"]).max() > 0.1  # U(+-1/sqrt(64))
    assert np.abs(p["W_out"]).max() <= 1 / 8
    q = swr_array.init_phalanx(64, head_dim=16, kv_heads=2, decay_max=0.5, seed=3)
    r = swr_array.init_phalanx(64, head_dim=16, kv_heads=2, decay_max=0.5, seed=4)
    np.testing.assert_array_equal(p["W_in"], q["W_in"])
    assert not np.array_equal(p["W_in"], r["W_in"])
    assert swr_array.init_phalanx(30, heads=5, head_dim=4)["W_out"].shape == (20, 30)
    assert swr_array.init_phalanx(32, dtype="bfloat16")["W_in"].dtype.name == "bfloat16"


def test_params_save_and_load_roundtrip():
    params = _params(kv_heads=2)
    buf = io.BytesIO()
    np.savez(buf, **params)
    buf.seek(0)
    loaded = dict(np.load(buf))
    x = _x((2, 9, 12))
    np.testing.assert_array_equal(swr_array.phalanx(x, loaded), swr_array.phalanx(x, params))


# ----------------------------------------------------------------------------------------------
# errors: checked before any work, naming the argument
# ----------------------------------------------------------------------------------------------


def _bad(params, **change):
    out = dict(params)
    out.update(change)
    return out


P = _params(dim=12, head_dim=3, kv_heads=2)
X = _x((2, 5, 12))
BAD_CALLS = [
    (lambda: swr_array.phalanx(X, [1, 2]), TypeError, "params must be a dict"),
    (lambda: swr_array.phalanx(X, {k: v for k, v in P.items() if k != "b_a"}), ValueError,
     "lacks"),
    (lambda: swr_array.phalanx(X, _bad(P, W_q=P["W_in"])), ValueError, "unexpected keys"),
    (lambda: swr_array.phalanx(X, _bad(P, W_in=P["W_in"][:, :-1])), ValueError,
     r"params\['W_in'\] must have shape"),
    (lambda: swr_array.phalanx(X, _bad(P, b_b=P["b_b"][:-1])), ValueError, r"params\['b_b'\]"),
    (lambda: swr_array.phalanx(X, _bad(P, b_c=P["b_c"][:-3])), ValueError, r"params\['b_c'\]"),
    (lambda: swr_array.phalanx(X, _bad(P, W_out=P["W_out"][:-1])), ValueError,
     r"params\['W_out'\]"),
    (lambda: swr_array.phalanx(X, _bad(P, b_a=P["b_a"][:, None])), ValueError,
     r"params\['b_a'\] must be 1-D"),
    (lambda: swr_array.phalanx(X, _bad(P, b_a=P["b_a"].astype(np.float32))), TypeError,
     r"params\['b_a'\] has dtype"),
    (lambda: swr_array.phalanx(X, _bad(P, decay_max=np.inf)), ValueError, "decay_max"),
    (lambda: swr_array.phalanx(X, _bad(P, decay_max="one")), TypeError, "decay_max"),
    (lambda: swr_array.phalanx(X, _bad(P, W_in=P["W_in"].astype(np.int64))), TypeError,
     r"params\['W_in'\] has dtype"),
    (lambda: swr_array.phalanx(X[0], P), ValueError, "x must have shape"),
    (lambda: swr_array.phalanx(X[..., :-1], P), ValueError, "x must have shape"),
    (lambda: swr_array.phalanx(X.astype(np.float32), P), TypeError, "x has dtype"),
    (lambda: swr_array.phalanx(X.tolist(), P), TypeError, "x must be a NumPy or CuPy"),
    (lambda: swr_array.phalanx(X, P, block_len=3), ValueError, "block_len"),
    (lambda: swr_array.phalanx(X, P, hops=-1), ValueError, "hops"),
    (lambda: swr_array.phalanx(X, P, return_state=1), TypeError, "return_state"),
    (lambda: swr_array.phalanx(X, P, state="state"), TypeError, "state must be an SWRState"),
    (lambda: swr_array.phalanx(X, P, state=swr_array.swr_init_state((2, 4, 4))), ValueError,
     "state is for channels"),
    (lambda: swr_array.phalanx(X, P, block_len=8, state=swr_array.swr_init_state((2, 4, 3))),
     ValueError, "block_len=16"),
    (lambda: swr_array.phalanx_vjp(X, P, X[:, :-1]), ValueError, "dout must have x's shape"),
    (lambda: swr_array.phalanx_vjp(X, P, X, residuals={"y": X}), TypeError, "residuals"),
    (lambda: swr_array.phalanx_vjp(X, P, X, residuals={"z": X}), ValueError,
     r"residuals\['z'\] must have shape"),
    (lambda: swr_array.phalanx_step(X, P), ValueError, "x_t must have shape"),
    (lambda: swr_array.phalanx_step(X[:, 0], P, hops=1, block_len=8,
                                    state=swr_array.swr_init_state((2, 4, 3))),
     ValueError, "block_len"),
    (lambda: swr_array.init_phalanx(30), ValueError, "multiple of head_dim"),
    (lambda: swr_array.init_phalanx(32, kv_heads=3), ValueError, "kv_heads"),
    (lambda: swr_array.init_phalanx(32, heads=2.0), TypeError, "heads"),
    (lambda: swr_array.init_phalanx(32, dtype=np.int32), TypeError, "dtype"),
    (lambda: swr_array.init_phalanx(32, xp="cupy"), TypeError, "xp"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS)
def test_bad_calls_raise_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_phalanx_dev_sweep_grids():
    """scripts/phalanx_dev.py's knob grids become TUNING updates the kernels' module knows."""
    import importlib.util
    import pathlib

    from swr_array.numba_kernels.phalanx_fused import TUNING

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "phalanx_dev.py"
    spec = importlib.util.spec_from_file_location("phalanx_dev", path)
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    grid = dev.parse_grid("bytes=16,8 minblocks=0,3,4", "fwd")
    assert len(grid) == 6 and grid[0] == {"fwd_access_bytes": 16, "fwd_min_blocks": 0}
    assert grid[-1] == {"fwd_access_bytes": 8, "fwd_min_blocks": 4}
    with pytest.raises(SystemExit, match="unknown knob"):
        dev.parse_grid("regs=64", "bwd")
    for direction in ("fwd", "bwd"):
        for grid_name in ("quick", "promising", "rows", "full"):
            args = types.SimpleNamespace(fwd=None, bwd=None, quick=False, grid=grid_name)
            ups = dev.variants(args, direction)
            assert ups and all(set(u) <= set(TUNING) for u in ups)
    assert dev.label({"fwd_min_blocks": 4, "fwd_chunk_steps": 64}) == "min_blocks=4 chunk_steps=64"
    # the backward's kernel choice is a word, its other knobs numbers
    assert dev.parse_grid("kernel=walk,rows rows=4", "bwd") == [
        {"bwd_kernel": "walk", "bwd_rows": 4}, {"bwd_kernel": "rows", "bwd_rows": 4}]
