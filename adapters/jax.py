"""JAX adapter: the SWR op with a custom VJP, and the Phalanx layer (functional and Flax NNX).

No math lives here. Every number comes from :mod:`swr_array`:

- on the CPU, a :func:`jax.pure_callback` runs the NumPy float64 reference
  (``swr_array.swr`` / ``swr_array.swr_vjp`` on NumPy arrays);
- on a CUDA GPU, a :func:`jax.experimental.buffer_callback.buffer_callback` runs the Numba CUDA
  kernels (``swr_array.swr`` / ``swr_array.swr_vjp`` on CuPy views of XLA's buffers) on XLA's own
  stream, inside the compiled program: no host round trip, no device synchronisation.

The choice is made by :func:`jax.lax.platform_dependent` when XLA lowers the program for a
platform, not from the default backend at trace time, so ``jax.jit(..., device=cpu)`` on a GPU
machine still runs the reference. Arguments are checked at trace time by the same checks the
front uses (``ValueError`` / ``TypeError`` naming the argument).

Under :func:`jax.vmap` the callbacks receive the vmapped axes in front of ``B`` (vmap method
``"broadcast_all"``) and fold them into the batch axis: one call for the whole vmapped batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

try:  # the GPU path; the CPU path does not need it
    from jax.experimental import buffer_callback as _bc
except ImportError:  # a JAX without buffer_callback
    _bc = None

import swr_array
from swr_array import _checks

__all__ = [
    "Phalanx",  # noqa: F822 - built on first access by __getattr__ (keeps Flax optional)
    "PhalanxParams",
    "fused_phalanx_available",
    "init_phalanx",
    "params_from_swr_array",
    "phalanx",
    "swr",
]

Array = jax.Array

_DLPACK_CPU = 1  # DLDeviceType kDLCPU (kDLCUDA is 2)

# Which callback runs on the CPU: "pure_callback" (the default, the NumPy reference through
# jax.pure_callback) or "buffer_callback" (the GPU code path, lowered on the CPU with NumPy views
# of XLA's buffers). Tests set the latter to exercise the device path's logic without a GPU.
_CPU_CALLBACK = "pure_callback"


# ----------------------------------------------------------------------------------------------
# argument checks (trace time)
# ----------------------------------------------------------------------------------------------


class _Config(NamedTuple):
    """The static part of one SWR call (hashable: a jit and custom_vjp static argument)."""

    block_len: int
    hops: int | None
    layout: str
    per_head: bool
    out_dtype: np.dtype
    cpu_callback: str


def _as_jax(name: str, x):
    if isinstance(x, jax.Array):
        return x
    if isinstance(x, np.ndarray | np.generic | numbers.Number | list | tuple):
        return jnp.asarray(x)
    raise TypeError(
        f"{name} must be a JAX array (or a NumPy array to convert), got "
        f"{type(x).__module__}.{type(x).__name__}"
    )


def _placeholder(x):
    """A zero-byte NumPy array with x's shape and dtype: the front's checks read only those."""
    return np.broadcast_to(np.zeros((), dtype=np.dtype(x.dtype)), tuple(x.shape))


def _platform_guess(*xs) -> str:
    """Where the arrays live when that is known now (concrete arrays), else the default backend."""
    for x in xs:
        if x is None:
            continue
        try:
            return next(iter(x.devices())).platform
        except jax.errors.ConcretizationTypeError:  # a tracer: placed later
            continue
    return jax.default_backend()


def _require_gpu_stack():
    from swr_array._backend import cupy_or_none

    if _bc is None:
        raise ImportError(
            "swr_array.adapters.jax on a JAX GPU backend needs jax.experimental.buffer_callback, "
            f"which jax {jax.__version__} lacks: upgrade JAX, or place the arrays on the CPU"
        )
    if cupy_or_none() is None:
        raise ImportError(
            "swr_array.adapters.jax on a JAX GPU backend runs the Numba CUDA kernels through "
            "CuPy, which is not installed: pip install 'swr-array[cuda13]' (or [cuda12]); "
            "or place the arrays on the CPU to run the NumPy reference"
        )


def _check_swr(a, u, x0, *, block_len, hops, layout, out_dtype) -> _Config:
    p = _checks.check_swr(
        _placeholder(a), _placeholder(u), block_len=block_len, hops=hops, layout=layout,
        out_dtype=out_dtype,
    )
    if x0 is not None:
        _checks.check_channel_array("x0", _placeholder(x0), p)
    if _platform_guess(a, u, x0) != "cpu":
        _require_gpu_stack()
        for name, dt in (("u", p.dtype), ("x0", None if x0 is None else x0.dtype),
                         ("out_dtype", p.out_dtype)):
            if dt is not None:
                _checks.check_float_dtype(name, dt, "cupy")
    return _Config(p.block_len, p.hops, p.layout, p.per_head, p.out_dtype, _CPU_CALLBACK)


# ----------------------------------------------------------------------------------------------
# running swr_array on NumPy or CuPy views (the body of every callback)
# ----------------------------------------------------------------------------------------------


def _fold(x, base_ndim: int):
    """(V..., B, rest) -> (prod(V) * B, rest): vmapped axes join the batch axis."""
    if x is None or x.ndim == base_ndim:
        return x
    lead = x.ndim - base_ndim
    return x.reshape((math.prod(x.shape[: lead + 1]),) + tuple(x.shape[lead + 1 :]))


def _a_ndim(cfg: _Config) -> int:
    return 3 if cfg.per_head else 4


def _run_swr(cfg: _Config, a, u, x0):
    y = swr_array.swr(
        _fold(a, _a_ndim(cfg)), _fold(u, 4), block_len=cfg.block_len, hops=cfg.hops,
        layout=cfg.layout, x0=_fold(x0, 3), out_dtype=cfg.out_dtype,
    )
    return y.reshape(u.shape)


def _run_swr_vjp(cfg: _Config, a, u, x0, dy):
    da, du, dx0 = swr_array.swr_vjp(
        _fold(a, _a_ndim(cfg)), _fold(u, 4), _fold(dy, 4), block_len=cfg.block_len,
        hops=cfg.hops, layout=cfg.layout, x0=_fold(x0, 3),
    )
    grads = (da.reshape(a.shape), du.reshape(u.shape))
    if x0 is not None:
        grads += (dx0.reshape(x0.shape),)
    return grads


def _host_swr(cfg, a, u, x0):
    return _run_swr(cfg, a, u, x0), cfg.out_dtype


def _host_swr_vjp(cfg, a, u, x0, dy):
    dtypes = (a.dtype, u.dtype) + (() if x0 is None else (x0.dtype,))
    return _run_swr_vjp(cfg, a, u, x0, dy), dtypes


# 64-bit arrays cross a pure_callback as uint32 pairs. jax.pure_callback canonicalises the
# callback's arguments and results with the jax_enable_x64 setting of the thread that runs it, and
# XLA's callback thread does not see a thread-local ``with jax.enable_x64(True):``: float64 inputs
# would arrive rounded to float32 and float64 results be refused.


def _is64(dtype) -> bool:
    return np.dtype(dtype).itemsize == 8


def _pack(x):
    """jax side: float64 (...) -> uint32 (..., 2)."""
    if x is not None and _is64(x.dtype):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return x


def _unpack(x, dtype):
    """NumPy side: the inverse of :func:`_pack`."""
    if x is None:
        return None
    x = np.asarray(x)
    return np.ascontiguousarray(x).view(dtype)[..., 0] if _is64(dtype) else x


def _pack_np(x, dtype):
    x = np.ascontiguousarray(x, dtype=dtype)
    return x.view(np.uint32).reshape(x.shape + (2,)) if _is64(dtype) else x


def _packed_spec(spec):
    if _is64(spec.dtype):
        return jax.ShapeDtypeStruct(tuple(spec.shape) + (2,), np.uint32)
    return spec


def _unpack_result(r, spec):
    return jax.lax.bitcast_convert_type(r, spec.dtype) if _is64(spec.dtype) else r


def _host_call(fn, in_dtypes, *args):
    out, out_dtypes = fn(*(_unpack(x, dt) for x, dt in zip(args, in_dtypes)))
    if isinstance(out, tuple):
        return tuple(_pack_np(x, dt) for x, dt in zip(out, out_dtypes))
    return _pack_np(out, out_dtypes)


def _pure_callback(fn, specs, *args):
    """jax.pure_callback of ``fn(*numpy_args) -> (results, result_dtypes)``; under vmap ``fn``
    gets the vmapped axes in front ("broadcast_all"), which it folds into the batch axis."""
    in_dtypes = tuple(None if x is None else np.dtype(x.dtype) for x in args)
    out = jax.pure_callback(
        functools.partial(_host_call, fn, in_dtypes), jax.tree.map(_packed_spec, specs),
        *(_pack(x) for x in args), vmap_method="broadcast_all",
    )
    return jax.tree.map(_unpack_result, out, specs)


def _ctx_attr(ctx, name):
    v = getattr(ctx, name)  # a property in jax 0.10/0.11, a method in some versions
    return v() if callable(v) else v


@contextlib.contextmanager
def _buffers(ctx, probe):
    """Yield a function wrapping XLA buffers as NumPy (CPU) or CuPy (GPU) arrays; on the GPU the
    body runs on XLA's stream and device, so CuPy and the kernels enqueue in program order."""
    kind, device_id = probe.__dlpack_device__()
    if kind == _DLPACK_CPU:
        yield lambda b: None if b is None else np.asarray(b)
        return
    import cupy

    def view(b):
        if b is None:
            return None
        try:
            return cupy.from_dlpack(b)  # zero copy, on the current (XLA's) stream
        except BufferError:  # an input flagged read-only: the CUDA array interface instead
            return cupy.asarray(b)

    stream = cupy.cuda.ExternalStream(int(_ctx_attr(ctx, "stream")), device_id)
    with cupy.cuda.Device(device_id), stream:
        yield view


def _executing(ctx) -> bool:
    return _ctx_attr(ctx, "stage") == _bc.ExecutionStage.EXECUTE


def _buffer_swr(cfg, ctx, out, a, u, x0):
    if not _executing(ctx):
        return
    with _buffers(ctx, out) as wrap:
        # TODO(front): swr(..., out=y) writing into XLA's buffer would save this copy of y
        wrap(out)[...] = _run_swr(cfg, wrap(a), wrap(u), wrap(x0))


def _buffer_swr_vjp(cfg, ctx, outs, a, u, x0, dy):
    if not _executing(ctx):
        return
    with _buffers(ctx, outs[0]) as wrap:
        # TODO(front): swr_vjp(..., out=(da, du, dx0)) would save these copies
        for o, g in zip(outs, _run_swr_vjp(cfg, wrap(a), wrap(u), wrap(x0), wrap(dy))):
            wrap(o)[...] = g


# ----------------------------------------------------------------------------------------------
# the op: platform dispatch and custom VJP
# ----------------------------------------------------------------------------------------------


def _grad_specs(a, u, x0):
    specs = (jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(u.shape, u.dtype))
    if x0 is not None:
        specs += (jax.ShapeDtypeStruct(x0.shape, x0.dtype),)
    return specs


def _fwd_host(cfg, a, u, x0):
    spec = jax.ShapeDtypeStruct(u.shape, cfg.out_dtype)
    return _pure_callback(functools.partial(_host_swr, cfg), spec, a, u, x0)


def _fwd_buffer(cfg, a, u, x0):
    spec = jax.ShapeDtypeStruct(u.shape, cfg.out_dtype)
    call = _bc.buffer_callback(
        functools.partial(_buffer_swr, cfg), spec, vmap_method="broadcast_all"
    )
    return call(a, u, x0)


def _bwd_host(cfg, a, u, x0, dy):
    return _pure_callback(functools.partial(_host_swr_vjp, cfg), _grad_specs(a, u, x0), a, u,
                          x0, dy)


def _bwd_buffer(cfg, a, u, x0, dy):
    call = _bc.buffer_callback(
        functools.partial(_buffer_swr_vjp, cfg), _grad_specs(a, u, x0),
        vmap_method="broadcast_all",
    )
    return call(a, u, x0, dy)


def _dispatch(cfg: _Config, host, device, *args):
    """The device path on CUDA, the NumPy reference elsewhere; resolved when XLA lowers."""
    if cfg.cpu_callback == "buffer_callback":  # tests: the device path on the CPU
        return device(cfg, *args)
    if _bc is None:
        return host(cfg, *args)
    return jax.lax.platform_dependent(
        *args, cuda=functools.partial(device, cfg), default=functools.partial(host, cfg)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _swr_op(cfg, a, u, x0):
    return _dispatch(cfg, _fwd_host, _fwd_buffer, a, u, x0)


def _swr_op_fwd(cfg, a, u, x0):
    return _swr_op(cfg, a, u, x0), (a, u, x0)


def _swr_op_bwd(cfg, res, dy):
    a, u, x0 = res
    grads = _dispatch(cfg, _bwd_host, _bwd_buffer, a, u, x0, dy)
    return tuple(grads) if x0 is not None else (grads[0], grads[1], None)


_swr_op.defvjp(_swr_op_fwd, _swr_op_bwd)
# one compiled program per (config, shapes): eager calls hit jit's cache instead of re-lowering
_swr_jit = jax.jit(_swr_op, static_argnums=(0,))


def swr(
    a: Array,
    u: Array,
    *,
    block_len: int = 16,
    hops: int | None = 1,
    layout: str = "BLHD",
    x0: Array | None = None,
    out_dtype=None,
) -> Array:
    """Sliding window recurrence ``y = L_hops(a) u`` on JAX arrays (SPEC section 1), differentiable.

    Works eagerly and under ``jax.jit``, ``jax.grad`` / ``jax.vjp``, ``jax.vmap`` and
    ``jax.checkpoint``. The gradient is the front's ``swr_vjp`` (SPEC section 4); forward-mode
    (``jax.jvp``) is not defined.

    Args:
        a: coefficients, per head ``(B, L, H)`` / ``(B, H, L)`` or per channel (u's shape).
        u: inputs ``(B, L, H, D)`` for ``layout="BLHD"`` (the default here: what a projection
            produces) or ``(B, H, D, L)`` for ``"BHDL"``.
        block_len: block length l, a power of two (1..256 on the CPU; 8..64 on the GPU kernels).
        hops: carrier hops k (0: block diagonal, 1: SWR, None: exact recurrence).
        layout: ``"BLHD"`` or ``"BHDL"``.
        x0: initial carry ``(B, H, D)`` (default 0), differentiable.
        out_dtype: dtype of y (default: the input dtype).

    Returns:
        y with u's shape and dtype ``out_dtype``. a and u share one dtype among float32, float16,
        bfloat16 (and float64 on the CPU with ``jax_enable_x64``); gradients come back in the
        dtypes of a, u and x0.
    """
    a = _as_jax("a", a)
    u = _as_jax("u", u)
    x0 = None if x0 is None else _as_jax("x0", x0)
    cfg = _check_swr(
        a, u, x0, block_len=block_len, hops=hops, layout=layout, out_dtype=out_dtype
    )
    return _swr_jit(cfg, a, u, x0)


# ----------------------------------------------------------------------------------------------
# Phalanx (SPEC section 5)
# ----------------------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["w_in", "b_in", "w_out"],
    meta_fields=["heads", "head_dim", "kv_heads", "decay_max"],
)
@dataclasses.dataclass(frozen=True)
class PhalanxParams:
    """Parameters of one Phalanx layer: a pytree whose leaves are the three arrays.

    With ``P = heads * head_dim`` and ``Q = kv_heads * head_dim``:

    - ``w_in`` ``(dim, heads + 2 Q + P)``: the fused input projection, columns
      ``[W_a (heads) | W_b (Q) | W_c (Q) | W_v (P)]``, each group head-major
      (column ``h * head_dim + e`` is head h, channel e);
    - ``b_in`` ``(heads + 2 Q,)``: the biases ``[b_a | b_b | b_c]`` (V has none);
    - ``w_out`` ``(P, dim)``: the output projection.

    ``heads``, ``head_dim``, ``kv_heads``, ``decay_max`` are static (pytree metadata). Head h reads
    kv head ``h // (heads // kv_heads)``.
    """

    w_in: Any
    b_in: Any
    w_out: Any
    heads: int
    head_dim: int
    kv_heads: int
    decay_max: float = 1.0

    @property
    def dim(self) -> int:
        return int(self.w_in.shape[0])


def _check_int(name, x, minimum=1) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def _head_config(dim, heads, head_dim, kv_heads):
    dim = _check_int("dim", dim)
    head_dim = _check_int("head_dim", head_dim)
    if heads is None:
        if dim % head_dim:
            raise ValueError(f"dim={dim} is not a multiple of head_dim={head_dim}; pass heads")
        heads = dim // head_dim
    heads = _check_int("heads", heads)
    kv_heads = heads if kv_heads is None else _check_int("kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    return dim, heads, head_dim, kv_heads


def init_phalanx(
    key: Array,
    dim: int,
    *,
    heads: int | None = None,
    head_dim: int = 16,
    kv_heads: int | None = None,
    decay_max: float = 1.0,
    dtype=jnp.float32,
) -> PhalanxParams:
    """Random Phalanx parameters: LeCun-normal projections, zero biases.

    ``heads`` defaults to ``dim // head_dim`` and ``kv_heads`` to ``heads``. To start from the
    front's initialisation instead, use ``params_from_swr_array(swr_array.init_phalanx(...))``.
    """
    dim, heads, head_dim, kv_heads = _head_config(dim, heads, head_dim, kv_heads)
    w_in, b_in, w_out = _init_arrays(key, dim, heads, heads * head_dim, kv_heads * head_dim,
                                     jnp.dtype(dtype))
    return PhalanxParams(w_in, b_in, w_out, heads, head_dim, kv_heads, float(decay_max))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _init_arrays(key, dim, heads, P, Q, dtype):
    k_in, k_out = jax.random.split(key)
    w_in = jax.random.normal(k_in, (dim, heads + 2 * Q + P), dtype) * dim**-0.5
    w_out = jax.random.normal(k_out, (P, dim), dtype) * P**-0.5
    return w_in, jnp.zeros((heads + 2 * Q,), dtype), w_out


def params_from_swr_array(params) -> PhalanxParams:
    """Convert the front's Phalanx parameters (``swr_array.init_phalanx``, NumPy or CuPy) to JAX.

    Reads the fields ``w_in``, ``b_in``, ``w_out``, ``heads``, ``head_dim``, ``kv_heads``,
    ``decay_max`` as attributes or mapping keys.
    """

    def field(name):
        if isinstance(params, dict):
            return params[name]
        return getattr(params, name)

    arrays = [jnp.asarray(field(n)) for n in ("w_in", "b_in", "w_out")]
    meta = [int(field(n)) for n in ("heads", "head_dim", "kv_heads")]
    return PhalanxParams(*arrays, *meta, float(field("decay_max")))


def _check_phalanx(params, x):
    if not isinstance(params, PhalanxParams):
        raise TypeError(
            f"params must be a PhalanxParams (init_phalanx / params_from_swr_array), "
            f"got {type(params).__name__}"
        )
    H, E, K = params.heads, params.head_dim, params.kv_heads
    dim = params.dim
    P, Q = H * E, K * E
    for name, arr, shape in (("params.w_in", params.w_in, (dim, H + 2 * Q + P)),
                             ("params.b_in", params.b_in, (H + 2 * Q,)),
                             ("params.w_out", params.w_out, (P, dim))):
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(arr.shape)}")
    if H % K:
        raise ValueError(f"params.kv_heads={K} must divide params.heads={H}")
    x = _as_jax("x", x)
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (B, L, dim={dim}), got {tuple(x.shape)}")
    _checks.check_float_dtype("x", x.dtype, "numpy")
    return x


def _phalanx_composite(params: PhalanxParams, x, block_len, hops):
    """GEMMs and gates in jnp, the recurrence through :func:`swr`."""
    H, E, K = params.heads, params.head_dim, params.kv_heads
    Bsz, L, _ = x.shape
    P, Q = H * E, K * E
    cd = x.dtype  # compute dtype of the GEMMs and of the SWR inputs
    gd = jnp.promote_types(cd, jnp.float32)  # gates in float32 (float64 stays float64)
    z = (x @ params.w_in.astype(cd)).astype(gd)
    b = params.b_in.astype(gd)
    za, zb, zc, zv = jnp.split(z, [H, H + Q, H + 2 * Q], axis=-1)
    ba, bb, bc = jnp.split(b, [H, H + Q])
    A = params.decay_max * jax.nn.sigmoid(za + ba)  # (B, L, H)
    Bg = jax.nn.sigmoid(zb + bb).reshape(Bsz, L, K, E)
    Cg = (zc + bc).reshape(Bsz, L, K, E)
    group = H // K
    if group > 1:
        Bg = jnp.repeat(Bg, group, axis=2)
        Cg = jnp.repeat(Cg, group, axis=2)
    V = zv.reshape(Bsz, L, H, E)
    y = swr(A.astype(cd), (Bg * V).astype(cd), block_len=block_len, hops=hops, layout="BLHD")
    Y = (y.astype(gd) * Cg + V).astype(cd).reshape(Bsz, L, P)
    return Y @ params.w_out.astype(cd)


def _fused_api():
    """The front's fused Phalanx (``swr_array.phalanx``, ``phalanx_vjp``, ``PhalanxParams``)."""
    names = ("phalanx", "phalanx_vjp", "PhalanxParams")
    if all(callable(getattr(swr_array, n, None)) for n in names):
        return tuple(getattr(swr_array, n) for n in names)
    return None


def fused_phalanx_available() -> bool:
    """Whether the front provides the fused Phalanx kernels the GPU path uses."""
    return _fused_api() is not None


class _PhalanxConfig(NamedTuple):
    heads: int
    head_dim: int
    kv_heads: int
    decay_max: float
    block_len: int
    hops: int | None


def _front_params(cfg: _PhalanxConfig, w_in, b_in, w_out):
    return _fused_api()[2](
        w_in=w_in, b_in=b_in, w_out=w_out, heads=cfg.heads, head_dim=cfg.head_dim,
        kv_heads=cfg.kv_heads, decay_max=cfg.decay_max,
    )


def _buffer_phalanx(cfg, ctx, out, x, w_in, b_in, w_out):
    if not _executing(ctx):
        return
    with _buffers(ctx, out) as wrap:
        p = _front_params(cfg, wrap(w_in), wrap(b_in), wrap(w_out))
        y = _fused_api()[0](wrap(x), p, block_len=cfg.block_len, hops=cfg.hops)
        wrap(out)[...] = y


def _buffer_phalanx_vjp(cfg, ctx, outs, x, w_in, b_in, w_out, dout):
    if not _executing(ctx):
        return
    with _buffers(ctx, outs[0]) as wrap:
        p = _front_params(cfg, wrap(w_in), wrap(b_in), wrap(w_out))
        dx, dp = _fused_api()[1](wrap(x), p, wrap(dout), block_len=cfg.block_len, hops=cfg.hops)
        for o, g in zip(outs, (dx, dp.w_in, dp.b_in, dp.w_out)):
            wrap(o)[...] = g


def _spec(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


# The fused layer's callbacks fold nothing under vmap ("sequential"): parameters may be vmapped
# too (ensembles, per-example gradients), and the front's phalanx_vjp sums dparams over B.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _phalanx_fused(cfg, x, w_in, b_in, w_out):
    call = _bc.buffer_callback(
        functools.partial(_buffer_phalanx, cfg), _spec(x), vmap_method="sequential"
    )
    return call(x, w_in, b_in, w_out)


def _phalanx_fused_fwd(cfg, x, w_in, b_in, w_out):
    return _phalanx_fused(cfg, x, w_in, b_in, w_out), (x, w_in, b_in, w_out)


def _phalanx_fused_bwd(cfg, res, dout):
    specs = tuple(_spec(r) for r in res)
    call = _bc.buffer_callback(
        functools.partial(_buffer_phalanx_vjp, cfg), specs, vmap_method="sequential"
    )
    return tuple(call(*res, dout))


_phalanx_fused.defvjp(_phalanx_fused_fwd, _phalanx_fused_bwd)


def phalanx(params: PhalanxParams, x: Array, *, block_len: int = 16, hops: int | None = 1) -> Array:
    """The Phalanx layer (SPEC section 5), functional: ``(B, L, dim) -> (B, L, dim)``.

    ``A = decay_max sigmoid(x W_a + b_a)``, ``Bg = sigmoid(x W_b + b_b)``, ``C = x W_c + b_c``,
    ``V = x W_v``, ``Y = swr(A, Bg V, hops) C + V``, ``out = Y W_out``. GEMMs run in x's dtype
    (parameters are cast to it), gates in float32 (float64 with float64 inputs).

    On a CUDA GPU, when the front provides the fused kernels (:func:`fused_phalanx_available`),
    the whole layer and its gradient run through them; otherwise (and always on the CPU) the GEMMs
    run in jnp and the recurrence through :func:`swr`.
    """
    x = _check_phalanx(params, x)
    block_len = _checks.check_block_len(block_len)
    hops = _checks.check_hops(hops)
    composite = functools.partial(_phalanx_composite, block_len=block_len, hops=hops)
    on_cpu_test_path = _CPU_CALLBACK == "buffer_callback"
    if _bc is None or _fused_api() is None or not (on_cpu_test_path or _cuda_backend_present()):
        return composite(params, x)
    cfg = _PhalanxConfig(params.heads, params.head_dim, params.kv_heads, params.decay_max,
                         block_len, hops)

    def fused(p, x):
        return _phalanx_fused(cfg, x, p.w_in.astype(x.dtype), p.b_in.astype(x.dtype),
                              p.w_out.astype(x.dtype))

    if on_cpu_test_path:
        return fused(params, x)
    return jax.lax.platform_dependent(params, x, cuda=fused, default=composite)


def _cuda_backend_present() -> bool:
    """Whether a CUDA program may be lowered here (otherwise the fused branch is not traced)."""
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


# ----------------------------------------------------------------------------------------------
# Flax NNX module (built on first access so that the op works without Flax installed)
# ----------------------------------------------------------------------------------------------


@functools.cache
def _phalanx_module():
    from flax import nnx

    class Phalanx(nnx.Module):
        """Phalanx layer as a Flax NNX module: ``(B, L, dim) -> (B, L, dim)``.

        Holds ``w_in``, ``b_in``, ``w_out`` as :class:`flax.nnx.Param` (see :class:`PhalanxParams`
        for their shapes) and calls the functional :func:`phalanx`.
        """

        def __init__(
            self,
            dim: int,
            *,
            heads: int | None = None,
            head_dim: int = 16,
            kv_heads: int | None = None,
            decay_max: float = 1.0,
            block_len: int = 16,
            hops: int | None = 1,
            param_dtype=jnp.float32,
            rngs: nnx.Rngs,
        ):
            p = init_phalanx(rngs.params(), dim, heads=heads, head_dim=head_dim,
                             kv_heads=kv_heads, decay_max=decay_max, dtype=param_dtype)
            self.w_in = nnx.Param(p.w_in)
            self.b_in = nnx.Param(p.b_in)
            self.w_out = nnx.Param(p.w_out)
            self.heads, self.head_dim, self.kv_heads = p.heads, p.head_dim, p.kv_heads
            self.decay_max = p.decay_max
            self.block_len = _checks.check_block_len(block_len)
            self.hops = _checks.check_hops(hops)

        @property
        def params(self) -> PhalanxParams:
            return PhalanxParams(self.w_in[...], self.b_in[...], self.w_out[...], self.heads,
                                 self.head_dim, self.kv_heads, self.decay_max)

        def __call__(self, x: Array) -> Array:
            return phalanx(self.params, x, block_len=self.block_len, hops=self.hops)

    Phalanx.__module__, Phalanx.__qualname__ = __name__, "Phalanx"
    return Phalanx


def __getattr__(name):
    if name == "Phalanx":
        return _phalanx_module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
