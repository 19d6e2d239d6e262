"""The JAX adapter on the CPU: numbers against the float64 reference, transformations, errors.

Oracles: the dense truncated transfer operator of ``swr_array.reference`` (forward), finite
differences in float64 (``jax.test_util.check_grads``, gradients) and, for Phalanx
(docs/spec.md#phalanx), ``reference.phalanx_reference`` / ``phalanx_vjp_reference`` and the
front's NumPy ``phalanx``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
import pathlib
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
sj = pytest.importorskip("swr_array.adapters.jax")

from jax.test_util import check_grads  # noqa: E402

import swr_array  # noqa: E402
from swr_array import reference  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def x64():
    """float64 for the duration of a block (jax_enable_x64 scoped, not global)."""
    enable = getattr(jax, "enable_x64", None)
    if enable is not None:
        return enable(True)
    from jax.experimental import enable_x64  # JAX before 0.10

    return enable_x64()


# ----------------------------------------------------------------------------------------------
# oracles
# ----------------------------------------------------------------------------------------------


def to_bhdl(x, layout, per_head):
    """(B,L,H[,D]) -> (B,H,D|1,L) float64; BHDL per head (B,H,L) -> (B,H,1,L)."""
    x = np.asarray(x, dtype=np.float64)
    if layout == "BLHD":
        x = np.moveaxis(x, 1, -1)
    return x[:, :, None, :] if per_head else x


def from_bhdl(y, layout):
    return np.moveaxis(y, -1, 1) if layout == "BLHD" else y


def dense_oracle(a, u, *, block_len, hops, layout, x0=None):
    """y = L_k u + col * x0 channel by channel from the explicit N x N operator."""
    per_head = np.ndim(a) == 3
    at = to_bhdl(a, layout, per_head)
    ut = to_bhdl(u, layout, False)
    B, H, D, N = ut.shape
    y = np.empty(ut.shape)
    for b in range(B):
        for h in range(H):
            for d in range(D):
                ad = at[b, h, 0 if per_head else d]
                y[b, h, d] = reference.dense_operator(ad, block_len, hops) @ ut[b, h, d]
                if x0 is not None:
                    col = reference.dense_x0_column(ad, block_len, hops)
                    y[b, h, d] += col * float(np.asarray(x0, np.float64)[b, h, d])
    return from_bhdl(y, layout)


def front_dict(params):
    """The front's NumPy parameter dict of a PhalanxParams."""
    return jax.tree.map(np.asarray, params.to_dict())


def phalanx_oracle(params, x, *, block_len=16, hops=1):
    """docs/spec.md#phalanx in float64: reference.phalanx_reference on the front's dict."""
    return reference.phalanx_reference(np.asarray(x, np.float64), front_dict(params),
                                       block_len=block_len, hops=hops)


def phalanx_vjp_oracle(params, x, dout, *, block_len=16, hops=1):
    """(dx, dparams dict) in float64: reference.phalanx_vjp_reference."""
    return reference.phalanx_vjp_reference(np.asarray(x, np.float64), front_dict(params),
                                           np.asarray(dout, np.float64), block_len=block_len,
                                           hops=hops)


def make_inputs(layout, per_head, *, B=2, N=37, H=3, D=4, seed=0, dtype=np.float64, x0=False):
    rng = np.random.default_rng(seed)
    ushape = (B, N, H, D) if layout == "BLHD" else (B, H, D, N)
    if per_head:
        ashape = (B, N, H) if layout == "BLHD" else (B, H, N)
    else:
        ashape = ushape
    # coefficients of both signs, a few above 1 (docs/spec.md#recurrence: any real a_t)
    a = rng.uniform(-1.15, 1.15, ashape).astype(dtype)
    u = rng.standard_normal(ushape).astype(dtype)
    x0v = rng.standard_normal((B, H, D)).astype(dtype) if x0 else None
    return a, u, x0v


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", [0, 1, 2, None])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_forward_matches_dense_operator(layout, per_head, hops):
    with x64():
        seed = zlib.crc32(f"{layout}-{per_head}".encode())
        a, u, x0 = make_inputs(layout, per_head, x0=True, seed=seed)
        for x0_ in (None, x0):
            y = sj.swr(jnp.asarray(a), jnp.asarray(u), block_len=8, hops=hops, layout=layout,
                       x0=None if x0_ is None else jnp.asarray(x0_))
            assert y.dtype == jnp.float64 and y.shape == u.shape
            want = dense_oracle(a, u, block_len=8, hops=hops, layout=layout, x0=x0_)
            np.testing.assert_allclose(np.asarray(y), want, rtol=1e-12, atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(
    B=st.integers(1, 2), N=st.integers(1, 40), H=st.integers(1, 2), D=st.integers(1, 3),
    log_block=st.integers(0, 4), hops=st.sampled_from([0, 1, 2, 3, None]),
    layout=st.sampled_from(["BLHD", "BHDL"]), per_head=st.booleans(),
)
def test_forward_random_shapes(B, N, H, D, log_block, hops, layout, per_head):
    with x64():
        a, u, x0 = make_inputs(layout, per_head, B=B, N=N, H=H, D=D, seed=N, x0=True)
        kw = dict(block_len=2**log_block, hops=hops, layout=layout)
        y = sj.swr(a, u, x0=x0, **kw)
        np.testing.assert_allclose(np.asarray(y), dense_oracle(a, u, x0=x0, **kw), rtol=1e-11,
                                   atol=1e-11)


def test_default_layout_is_blhd_and_defaults_match_spec():
    # block_len=16, hops=1, layout="BLHD" by default; N not a multiple of block_len
    a, u, _ = make_inputs("BLHD", True, N=45, dtype=np.float32)
    y = sj.swr(a, u)
    want = dense_oracle(a, u, block_len=16, hops=1, layout="BLHD")
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5)


def test_empty_sequence():
    a, u, _ = make_inputs("BLHD", True, N=0, dtype=np.float32)
    y = sj.swr(a, u)
    assert y.shape == u.shape
    da, du = jax.grad(lambda a, u: sj.swr(a, u).sum(), argnums=(0, 1))(a, u)
    assert da.shape == a.shape and du.shape == u.shape


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,per_head,hops,with_x0",
    [
        ("BLHD", True, 1, True),
        ("BHDL", False, 1, False),
        ("BHDL", True, 0, True),
        ("BLHD", False, 2, True),
        ("BLHD", True, None, True),
        ("BHDL", False, 3, False),
    ],
)
def test_gradients_match_finite_differences(layout, per_head, hops, with_x0):
    with x64():
        a, u, x0 = make_inputs(layout, per_head, B=1, N=21, H=2, D=3, seed=3, x0=with_x0)
        f = functools.partial(sj.swr, block_len=4, hops=hops, layout=layout)
        if with_x0:
            args = (jnp.asarray(a), jnp.asarray(u), jnp.asarray(x0))
            fn = lambda a, u, x0: f(a, u, x0=x0)  # noqa: E731
        else:
            args = (jnp.asarray(a), jnp.asarray(u))
            fn = f
        check_grads(fn, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_gradient_with_other_out_dtype():
    # out_dtype=float64 from float32 inputs: the cotangent arrives in float64, grads in float32
    with x64():
        a, u, _ = make_inputs("BLHD", True, N=19, dtype=np.float32)
        loss = lambda a, u: jnp.sum(sj.swr(a, u, block_len=4, out_dtype=jnp.float64) ** 2)  # noqa: E731
        da, du = jax.grad(loss, argnums=(0, 1))(a, u)
        assert da.dtype == jnp.float32 and du.dtype == jnp.float32
        da64, du64 = jax.grad(loss, argnums=(0, 1))(a.astype(np.float64), u.astype(np.float64))
        np.testing.assert_allclose(np.asarray(du), np.asarray(du64), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(da), np.asarray(da64), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# transformations
# ----------------------------------------------------------------------------------------------


def _loss(a, u, x0, **kw):
    y = sj.swr(a, u, x0=x0, **kw)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)


def test_jit_and_grad_under_jit_match_eager():
    a, u, x0 = make_inputs("BLHD", False, dtype=np.float32, x0=True)
    kw = dict(block_len=8, hops=2)
    y = sj.swr(a, u, x0=x0, **kw)
    yj = jax.jit(functools.partial(sj.swr, **kw))(a, u, x0=x0)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(yj))
    g = jax.grad(functools.partial(_loss, **kw), argnums=(0, 1, 2))(a, u, x0)
    gj = jax.jit(jax.grad(functools.partial(_loss, **kw), argnums=(0, 1, 2)))(a, u, x0)
    for x, xj in zip(g, gj):
        np.testing.assert_allclose(np.asarray(x), np.asarray(xj), rtol=1e-6, atol=1e-6)
    with x64():
        ga = jax.grad(functools.partial(_loss, **kw), argnums=(0, 1, 2))(
            *(jnp.asarray(t, jnp.float64) for t in (a, u, x0)))
    for x, x64v in zip(g, ga):
        np.testing.assert_allclose(np.asarray(x), np.asarray(x64v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("in_axes", [0, 1, (None, 0, 0), (0, None, None)])
def test_vmap_matches_loop(in_axes):
    V = 3
    a, u, x0 = make_inputs("BLHD", True, dtype=np.float32, x0=True, N=21)
    rng = np.random.default_rng(5)
    ax = (in_axes,) * 3 if isinstance(in_axes, int) else in_axes

    def stack(x, axis):
        if axis is None:
            return x
        xs = [x * (1 + 0.5 * i) + 0.1 * rng.standard_normal(x.shape).astype(x.dtype)
              for i in range(V)]
        return np.stack(xs, axis=axis)

    args = [stack(x, d) for x, d in zip((a, u, x0), ax)]
    f = lambda a, u, x0: sj.swr(a, u, x0=x0, block_len=4)  # noqa: E731
    y = jax.vmap(f, in_axes=ax)(*args)
    for i in range(V):
        sl = [x if d is None else np.take(x, i, axis=d) for x, d in zip(args, ax)]
        np.testing.assert_allclose(np.asarray(y[i]), np.asarray(f(*sl)), rtol=1e-6, atol=1e-6)


def test_nested_vmap_and_per_example_gradients():
    a, u, x0 = make_inputs("BHDL", False, B=1, N=13, H=2, D=2, dtype=np.float32, x0=True)
    rng = np.random.default_rng(1)
    us = rng.standard_normal((2, 3) + u.shape).astype(np.float32)
    f = lambda u: sj.swr(a, u, x0=x0, layout="BHDL", block_len=4)  # noqa: E731
    y = jax.vmap(jax.vmap(f))(us)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(np.asarray(y[i, j]), np.asarray(f(us[i, j])), atol=1e-6)
    # per-example gradients w.r.t. the shared a: vmap of grad, not the sum
    g = jax.vmap(jax.grad(lambda a, u: _loss(a, u, x0, layout="BHDL", block_len=4)),
                 in_axes=(None, 0))(a, us[0])
    for j in range(3):
        gj = jax.grad(lambda a, j=j: _loss(a, us[0, j], x0, layout="BHDL", block_len=4))(a)
        np.testing.assert_allclose(np.asarray(g[j]), np.asarray(gj), rtol=1e-5, atol=1e-6)


def test_checkpoint_matches_plain_gradient():
    a, u, x0 = make_inputs("BLHD", True, dtype=np.float32, x0=True)

    def block(a, u, x0):
        h = sj.swr(a, u, x0=x0, block_len=8)
        return sj.swr(a, jnp.tanh(h), block_len=8, hops=None)

    loss = lambda f: lambda a, u, x0: jnp.sum(f(a, u, x0) ** 2)  # noqa: E731
    g = jax.grad(loss(block), argnums=(0, 1, 2))(a, u, x0)
    for f in (jax.checkpoint(block),
              jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)):
        gc = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(a, u, x0)
        for x, xc in zip(g, gc):
            np.testing.assert_allclose(np.asarray(x), np.asarray(xc), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.float16, 2e-2),
                                       (jnp.bfloat16, 6e-2)])
def test_low_precision_inputs(dtype, tol):
    a, u, _ = make_inputs("BLHD", True, N=40, dtype=np.float32)
    a = np.clip(a, -0.98, 0.98)  # keep |y| moderate so the tolerance is relative to O(1)
    a_l, u_l = jnp.asarray(a, dtype), jnp.asarray(u, dtype)
    want = dense_oracle(np.asarray(a_l, np.float64), np.asarray(u_l, np.float64), block_len=16,
                        hops=1, layout="BLHD")
    y = sj.swr(a_l, u_l)
    assert y.dtype == dtype
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=tol, atol=tol)
    # float32 output from low-precision inputs: only the input rounding remains
    y32 = sj.swr(a_l, u_l, out_dtype=jnp.float32)
    assert y32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y32), want, rtol=1e-5, atol=1e-5)
    da, du = jax.grad(lambda a, u: jnp.sum(sj.swr(a, u).astype(jnp.float32) ** 2),
                      argnums=(0, 1))(a_l, u_l)
    assert da.dtype == dtype and du.dtype == dtype
    with x64():
        da64, du64 = jax.grad(lambda a, u: jnp.sum(sj.swr(a, u) ** 2), argnums=(0, 1))(
            jnp.asarray(np.asarray(a_l, np.float64)), jnp.asarray(np.asarray(u_l, np.float64)))
    scale = float(np.abs(np.asarray(du64)).max())
    np.testing.assert_allclose(np.asarray(du, np.float64), np.asarray(du64),
                               atol=8 * tol * scale, rtol=0)


def test_bf16_out_dtype_string():
    a, u, _ = make_inputs("BLHD", True, dtype=np.float32)
    assert sj.swr(a, u, out_dtype="bfloat16").dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------
# errors, raised at trace time
# ----------------------------------------------------------------------------------------------


def _specs(ushape=(2, 10, 3, 4), ashape=(2, 10, 3), dtype=jnp.float32, adtype=None):
    return (jax.ShapeDtypeStruct(ashape, adtype or dtype), jax.ShapeDtypeStruct(ushape, dtype))


@pytest.mark.parametrize(
    "kwargs,specs,exc,match",
    [
        (dict(block_len=3), _specs(), ValueError, "block_len"),
        (dict(block_len=4.0), _specs(), TypeError, "block_len"),
        (dict(hops=-1), _specs(), ValueError, "hops"),
        (dict(hops=1.5), _specs(), TypeError, "hops"),
        (dict(layout="BTHD"), _specs(), ValueError, "layout"),
        (dict(), _specs(ushape=(2, 10, 12)), ValueError, "u must be 4-D"),
        (dict(), _specs(ashape=(2, 9, 3)), ValueError, "a must have shape"),
        (dict(), _specs(dtype=jnp.int32), TypeError, "u has dtype int32"),
        (dict(), _specs(adtype=jnp.float16), TypeError, "a and u must share one dtype"),
        (dict(out_dtype=jnp.int8), _specs(), TypeError, "out_dtype"),
        (dict(x0=jax.ShapeDtypeStruct((2, 3, 5), jnp.float32)), _specs(), ValueError, "x0"),
    ],
)
def test_bad_input_raises_at_trace_time(kwargs, specs, exc, match):
    x0 = kwargs.pop("x0", None)

    def f(a, u, x0):
        return sj.swr(a, u, x0=x0, **kwargs)

    with pytest.raises(exc, match=match):
        jax.eval_shape(f, *specs, x0)  # abstract values only: nothing runs


def test_gpu_only_checks_at_trace_time(monkeypatch):
    # what a JAX GPU backend gets: float64 refused, a missing CuPy named, before anything runs
    import swr_array._backend as backend

    monkeypatch.setattr(sj, "_platform_guess", lambda *xs: "gpu")
    monkeypatch.setattr(backend, "cupy_or_none", lambda: object())
    with x64():
        with pytest.raises(TypeError, match="u has dtype float64"):
            jax.eval_shape(sj.swr, *_specs(dtype=jnp.float64))
        with pytest.raises(TypeError, match="out_dtype has dtype float64"):
            jax.eval_shape(functools.partial(sj.swr, out_dtype=jnp.float64), *_specs())
    jax.eval_shape(lambda a, u: sj.swr(a, u), *_specs())  # float32 passes
    monkeypatch.setattr(backend, "cupy_or_none", lambda: None)
    with pytest.raises(ImportError, match="CuPy"):  # a fresh function: eval_shape caches traces
        jax.eval_shape(lambda a, u: sj.swr(a, u), *_specs())


def test_bad_input_type():
    with pytest.raises(TypeError, match="u must be a JAX array"):
        sj.swr(jnp.zeros((1, 4, 1)), "not an array")


# ----------------------------------------------------------------------------------------------
# the device code path (buffer_callback), lowered on the CPU with NumPy views of XLA's buffers
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def buffer_callback_path(monkeypatch):
    monkeypatch.setattr(sj, "_CPU_CALLBACK", "buffer_callback")


def test_buffer_callback_path_matches_reference(buffer_callback_path):
    a, u, x0 = make_inputs("BLHD", True, N=29, dtype=np.float32, x0=True)
    kw = dict(block_len=8, hops=2)
    want = dense_oracle(a, u, x0=x0, layout="BLHD", **kw)
    np.testing.assert_allclose(np.asarray(sj.swr(a, u, x0=x0, **kw)), want, rtol=2e-5, atol=2e-5)
    g = jax.jit(jax.grad(functools.partial(_loss, **kw), argnums=(0, 1, 2)))(a, u, x0)
    with x64():
        g64 = jax.grad(functools.partial(_loss, **kw), argnums=(0, 1, 2))(
            *(jnp.asarray(t, jnp.float64) for t in (a, u, x0)))
    for x, x64v in zip(g, g64):
        np.testing.assert_allclose(np.asarray(x), np.asarray(x64v), rtol=1e-4, atol=1e-5)
    us = np.stack([u, 2 * u])
    yv = jax.vmap(lambda u: sj.swr(a, u, x0=x0, **kw))(us)
    np.testing.assert_allclose(np.asarray(yv[1]), dense_oracle(a, 2 * u, x0=x0, layout="BLHD",
                                                                **kw), rtol=2e-5, atol=4e-5)
    yb = sj.swr(jnp.asarray(a, jnp.bfloat16), jnp.asarray(u, jnp.bfloat16), **kw)
    assert yb.dtype == jnp.bfloat16


def test_buffer_callback_path_writes_into_xlas_buffers(buffer_callback_path, monkeypatch):
    """swr(..., out=) / swr_vjp(..., out=) receive views of XLA's output buffers."""
    import swr_array as front

    seen = []
    real_swr, real_vjp = front.swr, front.swr_vjp

    def spy_swr(*args, out=None, **kw):
        seen.append(("swr", out is not None and out.dtype == kw["out_dtype"]))
        return real_swr(*args, out=out, **kw)

    def spy_vjp(*args, out=None, **kw):
        seen.append(("vjp", out is not None and all(o is not None for o in out)))
        return real_vjp(*args, out=out, **kw)

    monkeypatch.setattr(front, "swr", spy_swr)
    monkeypatch.setattr(front, "swr_vjp", spy_vjp)
    a, u, x0 = make_inputs("BLHD", True, N=11, dtype=np.float32, x0=True)
    jax.jit(jax.grad(functools.partial(_loss, block_len=4), argnums=(0, 1, 2)))(a, u, x0)
    assert seen == [("swr", True), ("vjp", True)]


# ----------------------------------------------------------------------------------------------
# Phalanx
# ----------------------------------------------------------------------------------------------


# jitted once per configuration: eager op-by-op dispatch would compile every primitive
phalanx_jit = jax.jit(sj.phalanx, static_argnames=("block_len", "hops"))


def small_phalanx(dtype=jnp.float32, *, kv_heads=1, decay_max=0.95, seed=0):
    # init_phalanx draws the biases too (U(-1/sqrt(dim), 1/sqrt(dim))), so the tests see them
    return sj.init_phalanx(jax.random.key(seed), 8, head_dim=4, kv_heads=kv_heads,
                           decay_max=decay_max, dtype=dtype)


def _assert_dparams_close(gp, want_dp, rtol, atol, what=""):
    for k, w in want_dp.items():
        np.testing.assert_allclose(np.asarray(getattr(gp, k), np.float64), w, rtol=rtol,
                                   atol=atol, err_msg=f"{what} d{k}")


def _assert_grads_close(g, want, rtol, atol, what=""):
    """g: (PhalanxParams, dx) from jax.grad; want: (dx, dparams dict) from the reference."""
    np.testing.assert_allclose(np.asarray(g[1], np.float64), want[0], rtol=rtol, atol=atol,
                               err_msg=f"{what} dx")
    _assert_dparams_close(g[0], want[1], rtol, atol, what)


def _linear_loss(c, **kw):
    return lambda p, x: jnp.sum(sj.phalanx(p, x, **kw) * c)


def test_phalanx_params_layout_matches_the_front():
    p = sj.init_phalanx(jax.random.key(0), 12, head_dim=2, kv_heads=2, decay_max=0.9)
    fp = swr_array.init_phalanx(12, head_dim=2, kv_heads=2, decay_max=0.9)
    assert (p.heads, p.head_dim, p.kv_heads, p.dim) == (6, 2, 2, 12)
    assert jax.tree.leaves(p) == [p.W_in, p.b_a, p.b_b, p.b_c, p.W_out]  # static: the rest
    d = p.to_dict()
    assert list(d) == list(fp)
    for k, v in fp.items():
        assert tuple(np.shape(d[k])) == tuple(np.shape(v)) and d[k].dtype == v.dtype, k
    # the front's initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases included
    for k, bound in (("W_in", 12**-0.5), ("b_a", 12**-0.5), ("b_b", 12**-0.5),
                     ("b_c", 12**-0.5), ("W_out", 12**-0.5)):
        v = np.asarray(d[k])
        assert np.abs(v).max() <= bound and np.abs(v).max() > bound / 4, k
    assert float(d["decay_max"]) == 0.9 and d["decay_max"].dtype == np.float64
    q = sj.PhalanxParams.from_dict(d)  # round trip, arrays untouched
    assert (q.heads, q.head_dim, q.kv_heads, q.decay_max) == (6, 2, 2, 0.9)
    assert all(a is b for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(p)))
    assert sj.PhalanxParams.from_dict(d, dtype=jnp.bfloat16).W_in.dtype == jnp.bfloat16


def test_front_init_params_load_and_match_the_front():
    fp = swr_array.init_phalanx(16, head_dim=4, kv_heads=2, decay_max=0.8, seed=3)
    p = sj.PhalanxParams.from_dict(fp)
    assert (p.heads, p.head_dim, p.kv_heads, p.decay_max) == (4, 4, 2, 0.8)
    x = np.random.default_rng(0).standard_normal((2, 21, 16)).astype(np.float32)
    want = swr_array.phalanx(x, fp, block_len=8)  # the front on NumPy (the float64 reference)
    out = phalanx_jit(p, jnp.asarray(x), block_len=8)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    # and back: the JAX parameters run in the front
    np.testing.assert_allclose(swr_array.phalanx(x, front_dict(p), block_len=8), want, rtol=0,
                               atol=0)
    # a file saved from the front loads as well
    import io

    buf = io.BytesIO()
    np.savez(buf, **fp)
    buf.seek(0)
    q = sj.PhalanxParams.from_dict(dict(np.load(buf)))
    np.testing.assert_array_equal(np.asarray(phalanx_jit(q, jnp.asarray(x), block_len=8)),
                                  np.asarray(out))


@pytest.mark.parametrize(
    "params,exc,match",
    [
        ({"W_in": np.zeros((4, 9))}, ValueError, "lacks"),
        ("not a dict", TypeError, "dict of arrays"),
    ],
)
def test_from_dict_errors(params, exc, match):
    with pytest.raises(exc, match=match):
        sj.PhalanxParams.from_dict(params)


def test_from_dict_uses_the_fronts_shape_checks():
    fp = swr_array.init_phalanx(8, head_dim=4)
    bad = dict(fp, b_c=fp["b_c"][:-1])
    with pytest.raises(ValueError, match=r"params\['b_c'\] must have shape"):
        sj.PhalanxParams.from_dict(bad)
    with pytest.raises(ValueError, match="unexpected keys"):
        sj.PhalanxParams.from_dict(dict(fp, b_in=fp["b_a"]))


@pytest.mark.parametrize("hops,kv_heads", [(1, 1), (None, 2), (0, 2)])
def test_phalanx_matches_reference(hops, kv_heads):
    with x64():
        p = small_phalanx(jnp.float64, kv_heads=kv_heads)
        x = jax.random.normal(jax.random.key(2), (2, 19, 8), jnp.float64)
        out = phalanx_jit(p, x, block_len=4, hops=hops)
        assert out.shape == x.shape and out.dtype == jnp.float64
        want = phalanx_oracle(p, x, block_len=4, hops=hops)
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("hops,kv_heads", [(1, 2), (2, 1)])
def test_phalanx_gradients_match_reference(hops, kv_heads):
    with x64():
        p = small_phalanx(jnp.float64, kv_heads=kv_heads)
        x = jax.random.normal(jax.random.key(3), (2, 17, 8), jnp.float64)
        c = jax.random.normal(jax.random.key(4), x.shape, jnp.float64)
        g = jax.jit(jax.grad(_linear_loss(c, block_len=4, hops=hops), argnums=(0, 1)))(p, x)
        _assert_grads_close(g, phalanx_vjp_oracle(p, x, c, block_len=4, hops=hops), 1e-10,
                            1e-10)


def test_phalanx_gradients_match_finite_differences():
    with x64():
        p = small_phalanx(jnp.float64)
        x = jax.random.normal(jax.random.key(3), (1, 11, 8), jnp.float64)
        check_grads(jax.jit(functools.partial(sj.phalanx, block_len=4)), (p, x), order=1,
                    modes=["rev"], atol=1e-6, rtol=1e-6)


def test_phalanx_low_precision():
    p = small_phalanx()
    x = jax.random.normal(jax.random.key(4), (2, 24, 8))
    ref = phalanx_jit(p, x, block_len=8)
    out = phalanx_jit(p, x.astype(jnp.bfloat16), block_len=8)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.1, rtol=0.1)
    g = jax.jit(jax.grad(lambda p: jnp.sum(sj.phalanx(p, x.astype(jnp.bfloat16), block_len=8)
                                           .astype(jnp.float32) ** 2)))(p)
    assert g.W_in.dtype == jnp.float32 and np.isfinite(np.asarray(g.W_in)).all()


def test_phalanx_bad_input():
    p = small_phalanx()
    with pytest.raises(ValueError, match="x must have shape"):
        sj.phalanx(p, jnp.zeros((2, 5, 7)))
    with pytest.raises(TypeError, match="PhalanxParams.from_dict converts"):
        sj.phalanx(p.to_dict(), jnp.zeros((2, 5, 8)))
    with pytest.raises(ValueError, match="block_len"):
        sj.phalanx(p, jnp.zeros((2, 5, 8)), block_len=6)
    with pytest.raises(ValueError, match=r"params.b_b must have shape \(4,\)"):
        sj.phalanx(dataclasses.replace(p, b_b=p.b_c[:3]), jnp.zeros((2, 5, 8)))
    with pytest.raises(ValueError, match="kv_heads"):
        sj.init_phalanx(jax.random.key(0), 12, head_dim=4, kv_heads=2)


def test_phalanx_nnx_module_matches_functional():
    nnx = pytest.importorskip("flax.nnx")
    model = sj.Phalanx(8, head_dim=4, kv_heads=1, decay_max=0.9, block_len=4, hops=1,
                       rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(6), (2, 13, 8))
    p = model.params
    assert (p.heads, p.head_dim, p.kv_heads, p.decay_max) == (2, 4, 1, 0.9)
    out = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(phalanx_jit(p, x, block_len=4)))
    np.testing.assert_allclose(np.asarray(out), phalanx_oracle(p, x, block_len=4), rtol=1e-4,
                               atol=1e-4)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(model)
    gf = jax.jit(jax.grad(lambda p: jnp.sum(sj.phalanx(p, x, block_len=4) ** 2)))(p)
    for name in ("W_in", "b_a", "b_b", "b_c", "W_out"):
        np.testing.assert_allclose(np.asarray(grads[name][...]), np.asarray(getattr(gf, name)),
                                   rtol=1e-5, atol=1e-6)
    # from the front's parameters
    fp = swr_array.init_phalanx(8, head_dim=4, kv_heads=1, decay_max=0.9, seed=1)
    layer = sj.Phalanx.from_params(fp, block_len=4)
    xn = np.asarray(x)
    np.testing.assert_allclose(np.asarray(layer(x)), swr_array.phalanx(xn, fp, block_len=4),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="from_params"):
        sj.Phalanx(8, head_dim=2, params=fp)


# ----------------------------------------------------------------------------------------------
# Phalanx: the fused path (buffer_callback into swr_array.phalanx / phalanx_vjp), lowered on the
# CPU with NumPy views of XLA's buffers, i.e. the front's NumPy reference
# ----------------------------------------------------------------------------------------------


def test_fused_phalanx_available_checks_the_fronts_api(monkeypatch):
    mod = importlib.import_module("swr_array.phalanx")
    assert sj.fused_phalanx_available()

    def old_vjp(x, params, dout, *, block_len=16, hops=1):  # no residuals=
        raise AssertionError("not called")

    monkeypatch.setattr(mod, "phalanx_vjp", old_vjp)
    assert not sj.fused_phalanx_available()
    monkeypatch.delattr(mod, "phalanx_vjp")
    assert not sj.fused_phalanx_available()


def test_fused_phalanx_path(buffer_callback_path):
    p = small_phalanx(kv_heads=2)
    x = jax.random.normal(jax.random.key(7), (2, 13, 8))
    c = jax.random.normal(jax.random.key(8), x.shape)
    # fresh jits: phalanx_jit may hold a composite trace of the same shapes
    out = jax.jit(lambda p, x: sj.phalanx(p, x, block_len=4))(p, x)
    np.testing.assert_allclose(np.asarray(out), phalanx_oracle(p, x, block_len=4), rtol=1e-5,
                               atol=1e-5)
    g = jax.jit(jax.grad(_linear_loss(c, block_len=4), argnums=(0, 1)))(p, x)
    _assert_grads_close(g, phalanx_vjp_oracle(p, x, c, block_len=4), 1e-4, 1e-5, "fused")
    # mixed precision: float32 weights cast to bfloat16 x, gradients back in float32
    gb = jax.jit(jax.grad(lambda p: jnp.sum(sj.phalanx(p, x.astype(jnp.bfloat16))
                                            .astype(jnp.float32) * c)))(p)
    assert gb.W_in.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(gb.W_out), np.asarray(g[0].W_out), rtol=0.1,
                               atol=0.1 * float(np.abs(np.asarray(g[0].W_out)).max()))
    # vmap over inputs and over parameters (an ensemble): one call per element ("sequential")
    xs = jnp.stack([x, 2 * x])
    outs = jax.jit(jax.vmap(lambda x: sj.phalanx(p, x, block_len=4)))(xs)
    np.testing.assert_allclose(np.asarray(outs[1]), phalanx_oracle(p, xs[1], block_len=4),
                               rtol=1e-5, atol=1e-5)
    ps = jax.tree.map(lambda a: jnp.stack([a, -a]), p)
    gs = jax.jit(jax.vmap(jax.grad(_linear_loss(c, block_len=4)), in_axes=(0, None)))(ps, x)
    p1 = jax.tree.map(lambda a: a[1], ps)
    _assert_dparams_close(jax.tree.map(lambda a: a[1], gs),
                          phalanx_vjp_oracle(p1, x, c, block_len=4)[1], 1e-4, 1e-5, "vmapped")


def test_fused_phalanx_passes_z_to_the_backward(buffer_callback_path, monkeypatch):
    """The forward asks the front for its residuals only when differentiated, and the backward
    hands z = x W_in back to phalanx_vjp."""
    mod = importlib.import_module("swr_array.phalanx")
    calls = []
    real_fwd, real_vjp = mod.phalanx, mod.phalanx_vjp

    @functools.wraps(real_fwd)
    def spy_fwd(x, params, **kw):
        calls.append(("fwd", kw.get("return_residuals", False)))
        return real_fwd(x, params, **kw)

    @functools.wraps(real_vjp)
    def spy_vjp(x, params, dout, **kw):
        z = kw["residuals"]["z"]
        np.testing.assert_allclose(z, x.astype(np.float64) @ params["W_in"], rtol=1e-5,
                                   atol=1e-5)
        calls.append(("vjp", z.shape))
        return real_vjp(x, params, dout, **kw)

    monkeypatch.setattr(mod, "phalanx", spy_fwd)
    monkeypatch.setattr(mod, "phalanx_vjp", spy_vjp)
    p = small_phalanx()
    x = jax.random.normal(jax.random.key(9), (2, 5, 8))
    jax.jit(lambda p, x: sj.phalanx(p, x, block_len=2))(p, x).block_until_ready()
    assert calls == [("fwd", False)]
    calls.clear()
    jax.jit(jax.grad(lambda p, x: jnp.sum(sj.phalanx(p, x, block_len=2))))(p, x)
    assert calls == [("fwd", True), ("vjp", (2, 5, p.W_in.shape[1]))]


# ----------------------------------------------------------------------------------------------
# the guide's training example
# ----------------------------------------------------------------------------------------------


def test_example_trains():
    pytest.importorskip("flax.nnx")
    pytest.importorskip("optax")
    spec = importlib.util.spec_from_file_location("jax_train", ROOT / "examples" / "jax_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    losses = mod.main(steps=3)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_device_path_checks_once_per_signature(monkeypatch):
    """The GPU path runs the front's public swr / swr_vjp (all checks) on the first call of a
    signature and the CuPy backend directly, with the checked problem, on later ones."""
    import types

    import swr_array as front

    class DeviceArray(np.ndarray):  # stands in for a CuPy view: .data.device_id
        @property
        def data(self):
            return types.SimpleNamespace(device_id=0)

    calls = []
    monkeypatch.setattr(front, "swr", lambda *a, **k: calls.append("swr"))
    monkeypatch.setattr(front, "swr_vjp", lambda *a, **k: calls.append("swr_vjp"))
    backend = types.SimpleNamespace(
        swr_forward=lambda a, u, p, **k: calls.append(("fwd", p.B, k["out"] is not None)),
        swr_backward=lambda a, u, dy, p, **k: calls.append(("bwd", p.B, len(k["out"]))),
        swr_forward_plain=lambda a, u, p, out: calls.append(("plain fwd", p.B, out is not None)),
        swr_backward_plain=lambda a, u, dy, p, out: calls.append(("plain bwd", p.B, len(out))),
    )
    monkeypatch.setattr(sj, "_cuda_backend", lambda: backend)
    from swr_array import _plans

    monkeypatch.setattr(_plans, "PLANS", _plans.BoundedCache(8))
    a, u, _ = make_inputs("BLHD", True, N=7, dtype=np.float32)
    cfg = sj._check_swr(jnp.asarray(a), jnp.asarray(u), None, block_len=4, hops=1,
                        layout="BLHD", out_dtype=None)
    a, u = np.asarray(a).view(DeviceArray), np.asarray(u).view(DeviceArray)
    y = np.empty_like(u)
    for _ in range(2):
        sj._device_swr(cfg, a, u, None, y)
        sj._device_swr_vjp(cfg, a, u, None, u, (np.empty_like(a), np.empty_like(u), None))
    B = u.shape[0]
    # no x0, hops 1, contiguous: the front's plain hot paths
    assert calls == ["swr", "swr_vjp", ("plain fwd", B, True), ("plain bwd", B, 3)]
    sj._device_swr(cfg, a[None], u[None], None, y[None])  # vmapped axes fold into B: same key
    assert calls[-1] == ("plain fwd", B, True)
    # with x0 the general backend entry points, still checked once
    x0 = np.zeros((B,) + u.shape[2:], np.float32).view(DeviceArray)
    del calls[:]
    for _ in range(2):
        sj._device_swr(cfg, a, u, x0, y)
        sj._device_swr_vjp(cfg, a, u, x0, u, (np.empty_like(a), np.empty_like(u), x0.copy()))
    assert calls == ["swr", "swr_vjp", ("fwd", B, True), ("bwd", B, 3)]
