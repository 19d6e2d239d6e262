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

The Phalanx layer takes its parameters in the front's layout (:class:`PhalanxParams`, the arrays
of ``swr_array.init_phalanx``'s dict). On CUDA it is one buffer_callback into the front's fused
``swr_array.phalanx`` (and ``phalanx_vjp``, fed the forward's ``x W_in``); elsewhere the GEMMs and
gates run in jnp around the SWR op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

try:  # the GPU path; the CPU path does not need it
    from jax.experimental import buffer_callback as _bc
except ImportError:  # a JAX without buffer_callback
    _bc = None

import swr_array
from swr_array import _checks, _plans

__all__ = [
    "Phalanx",  # noqa: F822 - built on first access by __getattr__ (keeps Flax optional)
    "PhalanxParams",
    "fused_phalanx_available",
    "init_phalanx",
    "phalanx",
    "swr",
]

# decoding: the state as a pytree, a jittable step with donated buffers (adapters/_jax_decode.py)
from ._jax_decode import (  # noqa: E402
    JaxSWRState,
    phalanx_step,
    state_from_front,
    state_to_front,
    swr_decode_step,
    swr_init_state,
    swr_scan,
    swr_step,
)

__all__ += ["JaxSWRState", "phalanx_step", "state_from_front", "state_to_front",
            "swr_decode_step", "swr_init_state", "swr_scan", "swr_step"]

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


def _run_swr(cfg: _Config, a, u, x0, out=None):
    y = swr_array.swr(
        _fold(a, _a_ndim(cfg)), _fold(u, 4), block_len=cfg.block_len, hops=cfg.hops,
        layout=cfg.layout, x0=_fold(x0, 3), out_dtype=cfg.out_dtype, out=_fold(out, 4),
    )
    return y.reshape(u.shape)


def _run_swr_vjp(cfg: _Config, a, u, x0, dy, out=None):
    if out is not None:
        out = (_fold(out[0], _a_ndim(cfg)), _fold(out[1], 4), _fold(out[2], 3))
    da, du, dx0 = swr_array.swr_vjp(
        _fold(a, _a_ndim(cfg)), _fold(u, 4), _fold(dy, 4), block_len=cfg.block_len,
        hops=cfg.hops, layout=cfg.layout, x0=_fold(x0, 3), out=out,
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


# The GPU path runs once per program execution, on the host, between XLA's kernels: the GPU idles
# while it runs, so everything per call is kept to lookups (stream objects, checked problems) and
# zero-copy views.
_STREAMS: dict = {}  # (stream pointer, device) -> cupy.cuda.ExternalStream
_LEGACY_CAPSULE = [True]  # whether cupy.from_dlpack takes a bare (unversioned) DLPack capsule


def _external_stream(cupy, ptr: int, device_id: int):
    """XLA's stream as a CuPy stream, built once per stream pointer (CuPy's current-stream stack is
    thread-local, so one object serves every thread)."""
    key = (ptr, device_id)
    stream = _STREAMS.get(key)
    if stream is None:
        if len(_STREAMS) > 64:
            _STREAMS.clear()
        stream = _STREAMS[key] = cupy.cuda.ExternalStream(ptr, device_id)
    return stream


def _cupy_view(cupy, b):
    """A zero-copy CuPy view of an XLA buffer.

    Inputs are exported read-only in the versioned DLPack protocol; the unversioned capsule
    (``b.__dlpack__()`` with no ``max_version``) is the same pointer, shape and dtype without that
    flag, so inputs and outputs take one path: no BufferError to raise and catch, no detour
    through the CUDA array interface. (XLA's buffers are ready on XLA's stream, on which
    everything here is enqueued: no stream handshake is needed.)"""
    if b is None:
        return None
    if _LEGACY_CAPSULE[0]:
        try:
            return cupy.from_dlpack(b.__dlpack__())
        except (TypeError, ValueError, AttributeError, BufferError, NotImplementedError):
            _LEGACY_CAPSULE[0] = False  # a CuPy without bare-capsule import: the protocol path
    try:
        return cupy.from_dlpack(b)  # zero copy
    except BufferError:  # an input flagged read-only: the CUDA array interface instead
        return cupy.asarray(b)


@contextlib.contextmanager
def _buffers(ctx, probe):
    """Yield a function wrapping XLA buffers as NumPy (CPU) or CuPy (GPU) arrays; on the GPU the
    body runs on XLA's stream and device, so CuPy and the kernels enqueue in program order."""
    kind, device_id = probe.__dlpack_device__()
    if kind == _DLPACK_CPU:
        yield lambda b: None if b is None else np.asarray(b)
        return
    import cupy

    stream = _external_stream(cupy, int(_ctx_attr(ctx, "stream")), device_id)
    with cupy.cuda.Device(device_id), stream:
        yield functools.partial(_cupy_view, cupy)


def _executing(ctx) -> bool:
    return _ctx_attr(ctx, "stage") == _bc.ExecutionStage.EXECUTE


def _xp_of(view):
    if isinstance(view, np.ndarray):
        return np
    import cupy

    return cupy


def _out_slot(view, dtype):
    """``(array the front writes, whether it must be copied into view afterwards)``: the view of
    XLA's buffer itself when it has the dtype the front produces and is C-contiguous (the front's
    ``out=`` then writes the result in place), else a temporary of that dtype."""
    if view.dtype == np.dtype(dtype) and view.flags.c_contiguous:
        return view, False
    return _xp_of(view).empty(view.shape, dtype), True


# Checked problems of the GPU path, per call signature, in the front's one cache of checked calls
# (swr_array._plans.PLANS). The first call of a signature goes through the front's public swr /
# swr_vjp (all of its checks); later ones, whose arguments can only differ in their data (XLA's
# buffers: same shapes, dtypes, device, C-contiguous), go straight to the CuPy backend that those
# functions call, with the problem checked then.


def _sig(x):
    return None if x is None else (tuple(x.shape), x.dtype)


def _cuda_backend():
    from swr_array import _cuda

    return _cuda


def _remember(key, p):
    _plans.PLANS.put(key, p)


def _plain(p, x0, *arrays) -> bool:
    """Whether a signature can take the front's plain hot path (no x0, hops 0/1, C-contiguous
    arrays): XLA hands later calls of a signature buffers of the same layout."""
    return x0 is None and p.hops in (0, 1) and all(x.flags.c_contiguous for x in arrays)


def _device_swr(cfg, a, u, x0, out):
    """swr(a, u, x0=x0, out=out) on CuPy views (vmapped axes folded into B)."""
    a, u, x0, out = _fold(a, _a_ndim(cfg)), _fold(u, 4), _fold(x0, 3), _fold(out, 4)
    key = ("jax-swr", cfg, _sig(a), _sig(u), _sig(x0), _sig(out), u.data.device_id)
    hit = _plans.PLANS.get(key)
    if hit is not None:
        p, plain = hit
        if plain:
            _cuda_backend().swr_forward_plain(a, u, p, out)
        else:
            _cuda_backend().swr_forward(a, u, p, x0=x0, state=None, return_state=False, out=out)
        return
    swr_array.swr(a, u, block_len=cfg.block_len, hops=cfg.hops, layout=cfg.layout, x0=x0,
                  out_dtype=cfg.out_dtype, out=out)
    p = _checks.check_swr(a, u, block_len=cfg.block_len, hops=cfg.hops, layout=cfg.layout,
                          out_dtype=cfg.out_dtype)
    _remember(key, (p, _plain(p, x0, a, u, out)))


def _device_swr_vjp(cfg, a, u, x0, dy, out):
    """swr_vjp(a, u, dy, x0=x0, out=out) on CuPy views (vmapped axes folded into B)."""
    a, u, x0, dy = _fold(a, _a_ndim(cfg)), _fold(u, 4), _fold(x0, 3), _fold(dy, 4)
    out = (_fold(out[0], _a_ndim(cfg)), _fold(out[1], 4), _fold(out[2], 3))
    key = ("jax-vjp", cfg, _sig(a), _sig(u), _sig(x0), _sig(dy), tuple(_sig(o) for o in out),
           u.data.device_id)
    hit = _plans.PLANS.get(key)
    if hit is not None:
        p, plain = hit
        if plain:
            _cuda_backend().swr_backward_plain(a, u, dy, p, out)
        else:
            _cuda_backend().swr_backward(a, u, dy, p, x0=x0, out=out)
        return
    swr_array.swr_vjp(a, u, dy, block_len=cfg.block_len, hops=cfg.hops, layout=cfg.layout,
                      x0=x0, out=out)
    p = _checks.check_swr(a, u, block_len=cfg.block_len, hops=cfg.hops, layout=cfg.layout)
    _remember(key, (p, _plain(p, x0, a, u, dy, *out[:2])))


def _buffer_swr(cfg, ctx, out, a, u, x0):
    if not _executing(ctx):
        return
    with _buffers(ctx, out) as wrap:
        o = wrap(out)
        dst, copy = _out_slot(o, cfg.out_dtype)
        if isinstance(o, np.ndarray):  # the CPU test path: the front's NumPy reference
            _run_swr(cfg, wrap(a), wrap(u), wrap(x0), out=dst)
        else:  # y written straight into XLA's buffer (dst is o unless dtypes differ)
            _device_swr(cfg, wrap(a), wrap(u), wrap(x0), dst)
        if copy:
            o[...] = dst


def _buffer_swr_vjp(cfg, ctx, outs, a, u, x0, dy):
    if not _executing(ctx):
        return
    with _buffers(ctx, outs[0]) as wrap:
        views = [wrap(o) for o in outs]
        on_cpu = isinstance(views[0], np.ndarray)
        # the front's dx0 is float32 on CuPy (float64 on NumPy); da, du have a's and u's dtypes
        dtypes = [views[0].dtype, views[1].dtype]
        if x0 is not None:
            dtypes.append(np.float64 if on_cpu else np.float32)
        slots = [_out_slot(v, dt) for v, dt in zip(views, dtypes)]
        dsts = tuple([s[0] for s in slots] + [None] * (3 - len(slots)))
        run = _run_swr_vjp if on_cpu else _device_swr_vjp
        run(cfg, wrap(a), wrap(u), wrap(x0), wrap(dy), out=dsts)
        for v, (dst, copy) in zip(views, slots):
            if copy:
                v[...] = dst


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
    from swr_array.adapters.jax_cp import vary_like  # inside shard_map

    return vary_like(_dispatch(cfg, _fwd_host, _fwd_buffer, a, u, x0), a, u, x0)


def _swr_op_fwd(cfg, a, u, x0):
    return _swr_op(cfg, a, u, x0), (a, u, x0)


def _swr_op_bwd(cfg, res, dy):
    a, u, x0 = res
    grads = _dispatch(cfg, _bwd_host, _bwd_buffer, a, u, x0, dy)
    grads = tuple(grads) if x0 is not None else (grads[0], grads[1], None)
    from swr_array.adapters.jax_cp import match_cotangents  # inside shard_map

    return match_cotangents(grads, (a, u, x0), (a, u, x0, dy))


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
    cp_axis=None,
    cu_seqlens: Array | None = None,
) -> Array:
    """Sliding window recurrence ``y = L_hops(a) u`` on JAX arrays (docs/spec.md#recurrence),
    differentiable.

    Works eagerly and under ``jax.jit``, ``jax.grad`` / ``jax.vjp``, ``jax.vmap`` and
    ``jax.checkpoint``. The gradient is the front's ``swr_vjp``
    (docs/spec.md#gradients); forward-mode (``jax.jvp``) is not defined.

    Args:
        a: coefficients, per head ``(B, L, H)`` / ``(B, H, L)`` or per channel (u's shape).
        u: inputs ``(B, L, H, D)`` for ``layout="BLHD"`` (the default here: what a projection
            produces) or ``(B, H, D, L)`` for ``"BHDL"``.
        block_len: block length l, a power of two (1..256 on the CPU; 8..64 on the GPU kernels).
        hops: carrier hops k (0: block diagonal, 1: SWR, None: exact recurrence).
        layout: ``"BLHD"`` or ``"BHDL"``.
        x0: initial carry ``(B, H, D)`` (default 0), differentiable.
        out_dtype: dtype of y (default: the input dtype).
        cp_axis: inside :func:`jax.shard_map`, the mesh axis the sequence axis is sharded over
            (context parallelism): a and u are this device's shard, y its shard of the
            full-sequence result (see docs/context_parallel.md).
        cu_seqlens: packed sequences (B == 1): int32/int64 ``[0, n_1, ..., T]``, may be traced;
            each sequence runs alone and x0 is ``(S, H, D)`` (see swr_array/packed.py).

    Returns:
        y with u's shape and dtype ``out_dtype``. a and u share one dtype among float32, float16,
        bfloat16 (and float64 on the CPU with ``jax_enable_x64``); gradients come back in the
        dtypes of a, u and x0.
    """
    a = _as_jax("a", a)
    u = _as_jax("u", u)
    x0 = None if x0 is None else _as_jax("x0", x0)
    if cp_axis is not None and cu_seqlens is not None:
        raise ValueError(
            "cp_axis and cu_seqlens do not combine (shard packed documents by document)"
        )
    if cu_seqlens is not None:
        from . import _jax_packed

        return _jax_packed.swr_packed(
            swr, a, u, cu_seqlens, block_len=block_len, hops=hops, layout=layout, x0=x0,
            out_dtype=out_dtype, check_swr=_check_swr)
    cfg = _check_swr(
        a, u, x0, block_len=block_len, hops=hops, layout=layout, out_dtype=out_dtype
    )
    if cp_axis is not None:
        from swr_array.adapters import jax_cp

        return jax_cp.swr(swr, a, u, x0, block_len=cfg.block_len, hops=cfg.hops,
                          layout=cfg.layout, per_head=cfg.per_head, out_dtype=cfg.out_dtype,
                          axis=cp_axis)
    return _swr_jit(cfg, a, u, x0)


# ----------------------------------------------------------------------------------------------
# Phalanx (docs/spec.md#phalanx)
# ----------------------------------------------------------------------------------------------

_WEIGHTS = ("W_in", "b_a", "b_b", "b_c", "W_out")  # the trainable leaves, in the front's order


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=list(_WEIGHTS),
    meta_fields=["heads", "head_dim", "kv_heads", "decay_max"],
)
@dataclasses.dataclass(frozen=True)
class PhalanxParams:
    """Parameters of one Phalanx layer: a pytree whose leaves are the five weight arrays.

    The arrays are those of the front's parameter dict (``swr_array.init_phalanx``, see
    :mod:`swr_array.phalanx`), same names, shapes and column order. With H heads, D = head_dim
    and KV kv heads:

    - ``W_in`` ``(dim, H*D + 2*KV*D + H)``: the fused input projection, columns
      ``[V (H*D) | Bg (KV*D) | C (KV*D) | A (H)]``, each group head-major (column ``h*D + e`` of
      a group is head h, channel e);
    - ``b_a`` ``(H,)``, ``b_b`` ``(KV*D,)``, ``b_c`` ``(KV*D,)``: the biases of A, Bg, C (V has
      none);
    - ``W_out`` ``(H*D, dim)``: the output projection.

    ``heads``, ``head_dim``, ``kv_heads`` and ``decay_max`` are static (pytree metadata), so
    optimisers and ``jax.grad`` see only the arrays. Head h reads kv head ``h // (H // KV)``.
    :meth:`to_dict` / :meth:`from_dict` convert to and from the front's dict.
    """

    W_in: Any
    b_a: Any
    b_b: Any
    b_c: Any
    W_out: Any
    heads: int
    head_dim: int
    kv_heads: int
    decay_max: float = 1.0

    @property
    def dim(self) -> int:
        return int(self.W_in.shape[0])

    def to_dict(self) -> dict:
        """The front's parameter dict: the five JAX arrays and ``decay_max`` (a NumPy 0-d float64
        array, as ``swr_array.init_phalanx`` makes it).

        ``jax.tree.map(np.asarray, params.to_dict())`` is what ``swr_array.phalanx`` takes on NumPy
        and what ``numpy.savez(path, **...)`` saves.
        """
        d = {k: getattr(self, k) for k in _WEIGHTS}
        d["decay_max"] = np.asarray(float(self.decay_max), dtype=np.float64)
        return d

    @classmethod
    def from_dict(cls, params: Mapping, *, dtype=None) -> PhalanxParams:
        """From the front's parameter dict (``swr_array.init_phalanx(...)`` on NumPy or CuPy,
        ``dict(numpy.load(path))``, or :meth:`to_dict`'s output).

        heads, head_dim and kv_heads are read off the shapes, as the front does; the dict is
        checked by the front's own checks. ``dtype`` casts the arrays (default: kept).
        """
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of arrays (swr_array.init_phalanx), got "
                            f"{type(params).__name__}")
        arrays = {k: _to_jax(f"params[{k!r}]", params[k]) for k in _WEIGHTS if k in params}
        # the front's checks see zero-byte NumPy stand-ins: shapes, dtypes, keys, decay_max
        probe = dict(params)
        probe.update({k: _placeholder(v) for k, v in arrays.items()})
        cfg = _front_phalanx_module()._check_params(probe)
        if dtype is not None:
            dtype = jnp.dtype(dtype)
            _checks.check_float_dtype("dtype", dtype, "numpy")
            arrays = {k: v.astype(dtype) for k, v in arrays.items()}
        return cls(*(arrays[k] for k in _WEIGHTS), cfg.heads, cfg.head_dim, cfg.kv_heads,
                   cfg.decay_max)


def _to_jax(name, x):
    """A JAX array from a NumPy / JAX array, or from a CuPy (any DLPack) array, zero copy."""
    if isinstance(x, jax.Array):
        return x
    if isinstance(x, np.ndarray | np.generic | numbers.Number):
        return jnp.asarray(x)
    if hasattr(x, "__dlpack__"):
        return jnp.from_dlpack(x)
    raise TypeError(f"{name} must be a NumPy, CuPy or JAX array, got "
                    f"{type(x).__module__}.{type(x).__name__}")


def _front_phalanx_module():
    # the module: the package attribute swr_array.phalanx is the function
    return importlib.import_module("swr_array.phalanx")


def _check_int(name, x, minimum=1) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def _check_decay_max(decay_max) -> float:
    return _checks.check_decay_max(decay_max)


def _head_config(dim, heads, head_dim, kv_heads):
    dim = _check_int("dim", dim)
    head_dim = _check_int("head_dim", head_dim)
    if heads is None:
        if dim % head_dim:
            raise ValueError(f"dim={dim} is not a multiple of head_dim={head_dim}: pass heads")
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
    """Random Phalanx parameters, initialised like the front's ``swr_array.init_phalanx``.

    Every weight and bias is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's
    ``nn.Linear`` default, which spear uses): fan_in = dim for ``W_in`` and the biases, H*D for
    ``W_out``; the draws come from ``key`` (the front draws from a NumPy seed, so the numbers
    differ). ``heads`` defaults to ``dim // head_dim`` and ``kv_heads`` to ``heads``. To start
    from the front's numbers instead: ``PhalanxParams.from_dict(swr_array.init_phalanx(...))``.
    """
    dim, heads, head_dim, kv_heads = _head_config(dim, heads, head_dim, kv_heads)
    decay_max = _check_decay_max(decay_max)
    dtype = jnp.dtype(dtype)
    _checks.check_float_dtype("dtype", dtype, "numpy")
    arrays = _init_arrays(key, dim, heads, head_dim, kv_heads, dtype)
    return PhalanxParams(*arrays, heads, head_dim, kv_heads, decay_max)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _init_arrays(key, dim, heads, head_dim, kv_heads, dtype):
    hd, kd = heads * head_dim, kv_heads * head_dim
    shapes = ((dim, hd + 2 * kd + heads), (heads,), (kd,), (kd,), (hd, dim))
    bounds = (dim**-0.5,) * 4 + (hd**-0.5,)
    keys = jax.random.split(key, len(shapes))
    return tuple(
        jax.random.uniform(k, s, jnp.float32, -b, b).astype(dtype)
        for k, s, b in zip(keys, shapes, bounds)
    )


def _check_phalanx(params, x):
    if not isinstance(params, PhalanxParams):
        hint = " (PhalanxParams.from_dict converts the front's dict)" if isinstance(
            params, Mapping) else ""
        raise TypeError(f"params must be a PhalanxParams (init_phalanx / "
                        f"PhalanxParams.from_dict), got {type(params).__name__}{hint}")
    H = _check_int("params.heads", params.heads)
    D = _check_int("params.head_dim", params.head_dim)
    KV = _check_int("params.kv_heads", params.kv_heads)
    if H % KV:
        raise ValueError(f"params.kv_heads={KV} must divide params.heads={H}")
    _check_decay_max(params.decay_max)
    if getattr(params.W_in, "ndim", None) != 2:
        raise ValueError(f"params.W_in must be 2-D (dim, H*D + 2*KV*D + H), got "
                         f"{getattr(params.W_in, 'shape', params.W_in)}")
    dim = params.dim
    hd, kd = H * D, KV * D
    shapes = {"W_in": (dim, hd + 2 * kd + H), "b_a": (H,), "b_b": (kd,), "b_c": (kd,),
              "W_out": (hd, dim)}
    for k, shape in shapes.items():
        arr = getattr(params, k)
        if tuple(getattr(arr, "shape", ())) != shape:
            raise ValueError(f"params.{k} must have shape {shape} (dim={dim}, heads={H}, "
                             f"head_dim={D}, kv_heads={KV}), got {getattr(arr, 'shape', arr)}")
        _checks.check_float_dtype(f"params.{k}", arr.dtype, "numpy")
    x = _as_jax("x", x)
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (B, L, dim={dim}), got {tuple(x.shape)}")
    _checks.check_float_dtype("x", x.dtype, "numpy")
    return x


def _phalanx_composite(params: PhalanxParams, x, block_len, hops, cp_axis=None,
                       cu_seqlens=None):
    """GEMMs and gates in jnp, the recurrence through :func:`swr`."""
    H, D, KV = params.heads, params.head_dim, params.kv_heads
    Bsz, L, _ = x.shape
    hd, kd = H * D, KV * D
    cd = x.dtype  # compute dtype of the GEMMs and of the SWR inputs
    gd = jnp.promote_types(cd, jnp.float32)  # gates in float32 (float64 stays float64)
    z = (x @ params.W_in.astype(cd)).astype(gd)
    zv, zb, zc, za = jnp.split(z, [hd, hd + kd, hd + 2 * kd], axis=-1)  # [V | Bg | C | A]
    A = params.decay_max * jax.nn.sigmoid(za + params.b_a.astype(gd))  # (B, L, H)
    Bg = jax.nn.sigmoid(zb + params.b_b.astype(gd)).reshape(Bsz, L, KV, D)
    Cg = (zc + params.b_c.astype(gd)).reshape(Bsz, L, KV, D)
    group = H // KV
    if group > 1:
        Bg = jnp.repeat(Bg, group, axis=2)
        Cg = jnp.repeat(Cg, group, axis=2)
    V = zv.reshape(Bsz, L, H, D)
    y = swr(A.astype(cd), (Bg * V).astype(cd), block_len=block_len, hops=hops, layout="BLHD",
            cp_axis=cp_axis, cu_seqlens=cu_seqlens)
    Y = (y.astype(gd) * Cg + V).astype(cd).reshape(Bsz, L, hd)
    return Y @ params.W_out.astype(cd)


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _front_phalanx():
    """The front's Phalanx module when it has the fused API the GPU path calls
    (``phalanx(..., return_residuals=)`` and ``phalanx_vjp(..., residuals=)``), else None."""
    try:
        mod = _front_phalanx_module()
    except ImportError:
        return None
    fwd, vjp = getattr(mod, "phalanx", None), getattr(mod, "phalanx_vjp", None)
    if (callable(fwd) and callable(vjp) and _accepts(fwd, "return_residuals")
            and _accepts(vjp, "residuals")):
        return mod
    return None


def fused_phalanx_available() -> bool:
    """Whether the front provides the fused Phalanx API (``swr_array.phalanx`` with residuals and
    ``swr_array.phalanx_vjp``) that the GPU path calls."""
    return _front_phalanx() is not None


class _PhalanxConfig(NamedTuple):
    decay_max: float  # heads, head_dim, kv_heads: the front reads them off the shapes
    block_len: int
    hops: int | None


def _front_params(cfg: _PhalanxConfig, wrap, weights) -> dict:
    d = {k: wrap(w) for k, w in zip(_WEIGHTS, weights)}
    d["decay_max"] = np.asarray(cfg.decay_max, dtype=np.float64)
    return d


def _buffer_phalanx(cfg, ctx, outs, x, *weights):
    """outs: ``(out,)``, or ``(out, z)`` with z = x W_in kept for the backward."""
    if not _executing(ctx):
        return
    with _buffers(ctx, outs[0]) as wrap:
        with_z = len(outs) == 2
        res = _front_phalanx().phalanx(
            wrap(x), _front_params(cfg, wrap, weights), block_len=cfg.block_len, hops=cfg.hops,
            return_residuals=with_z,
        )
        # the front's phalanx has no out=: one copy of out (and of z) into XLA's buffers
        if with_z:
            res, residuals = res
            wrap(outs[1])[...] = residuals["z"]
        wrap(outs[0])[...] = res


def _buffer_phalanx_vjp(cfg, ctx, outs, x, *rest):
    """outs: ``(dx, dW_in, db_a, db_b, db_c, dW_out)``; rest: the five weights, z, dout."""
    if not _executing(ctx):
        return
    *weights, z, dout = rest
    with _buffers(ctx, outs[0]) as wrap:
        dx, dp = _front_phalanx().phalanx_vjp(
            wrap(x), _front_params(cfg, wrap, weights), wrap(dout), block_len=cfg.block_len,
            hops=cfg.hops, residuals={"z": wrap(z)},  # the backward skips x W_in
        )
        for o, g in zip(outs, (dx, *(dp[k] for k in _WEIGHTS))):
            wrap(o)[...] = g


def _spec(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


# The fused layer's callbacks fold nothing under vmap ("sequential"): parameters may be vmapped
# too (ensembles, per-example gradients), and the front's phalanx_vjp sums dparams over B.
def _fused_call(cfg, body, specs, *args):
    return _bc.buffer_callback(functools.partial(body, cfg), specs,
                               vmap_method="sequential")(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _phalanx_fused(cfg, x, *weights):
    return _fused_call(cfg, _buffer_phalanx, (_spec(x),), x, *weights)[0]


def _phalanx_fused_fwd(cfg, x, *weights):
    Bsz, L, _ = x.shape
    z_spec = jax.ShapeDtypeStruct((Bsz, L, weights[0].shape[1]), x.dtype)
    out, z = _fused_call(cfg, _buffer_phalanx, (_spec(x), z_spec), x, *weights)
    return out, (x, *weights, z)


def _phalanx_fused_bwd(cfg, res, dout):
    specs = tuple(_spec(r) for r in res[:-1])  # dx and the five weight gradients
    return tuple(_fused_call(cfg, _buffer_phalanx_vjp, specs, *res, dout))


_phalanx_fused.defvjp(_phalanx_fused_fwd, _phalanx_fused_bwd)


def phalanx(
    params: PhalanxParams,
    x: Array,
    *,
    block_len: int = 16,
    hops: int | None = 1,
    cp_axis=None,
    cu_seqlens: Array | None = None,
) -> Array:
    """The Phalanx layer (docs/spec.md#phalanx), functional: ``(B, L, dim) -> (B, L, dim)``.

    ``[V | Bg | C | A] = x W_in``; ``A = decay_max sigmoid(A + b_a)``, ``Bg = sigmoid(Bg + b_b)``,
    ``C = C + b_c``; ``Y = swr(A, Bg V, hops) C + V``; ``out = Y W_out``. Parameters are cast to
    x's dtype (float32 master weights with bfloat16 activations work); the GEMMs run in that
    dtype, the gates in float32 (float64 with float64 inputs).

    On a CUDA GPU, when the front provides the fused API (:func:`fused_phalanx_available`), the
    layer runs as ``swr_array.phalanx`` (one GEMM, one fused kernel, one GEMM) and its gradient as
    ``swr_array.phalanx_vjp`` fed with the forward's ``x W_in``; elsewhere (and always on the CPU)
    the GEMMs and gates run in jnp and the recurrence through :func:`swr`.

    With ``cp_axis`` (inside :func:`jax.shard_map`, x sharded along L over that mesh axis) the
    composition runs with the context-parallel :func:`swr` (docs/context_parallel.md).
    ``cu_seqlens`` (B == 1): packed documents, each its own sequence (see :func:`swr`); always
    the jnp composition (not the fused kernel).
    """
    x = _check_phalanx(params, x)
    block_len = _checks.check_block_len(block_len)
    hops = _checks.check_hops(hops)
    if cp_axis is not None and cu_seqlens is not None:
        raise ValueError(
            "cp_axis and cu_seqlens do not combine (shard packed documents by document)"
        )
    if cp_axis is not None or cu_seqlens is not None:
        return _phalanx_composite(params, x, block_len, hops, cp_axis, cu_seqlens)
    composite = functools.partial(_phalanx_composite, block_len=block_len, hops=hops)
    on_cpu_test_path = _CPU_CALLBACK == "buffer_callback"
    if _bc is None or not fused_phalanx_available() or not (
        on_cpu_test_path or _cuda_backend_present()
    ):
        return composite(params, x)
    if _platform_guess(x) == "gpu":
        _checks.check_float_dtype("x", x.dtype, "cupy")  # no float64 on the GPU
    cfg = _PhalanxConfig(float(params.decay_max), block_len, hops)

    def fused(p, x):
        return _phalanx_fused(cfg, x, *(getattr(p, k).astype(x.dtype) for k in _WEIGHTS))

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

        Holds ``W_in``, ``b_a``, ``b_b``, ``b_c``, ``W_out`` as :class:`flax.nnx.Param` (shapes
        and column order of :class:`PhalanxParams`, i.e. of the front's dict) and calls the
        functional :func:`phalanx`. ``rngs`` draws the initial parameters (as
        :func:`init_phalanx`); ``params`` (a :class:`PhalanxParams` or the front's dict) starts
        from given ones instead, and must agree with dim, heads, head_dim, kv_heads and
        decay_max (:meth:`from_params` reads those off it).
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
            rngs: nnx.Rngs | None = None,
            params: PhalanxParams | Mapping | None = None,
        ):
            dim, heads, head_dim, kv_heads = _head_config(dim, heads, head_dim, kv_heads)
            decay_max = _check_decay_max(decay_max)
            if params is None:
                if rngs is None:
                    raise TypeError("Phalanx needs rngs (to draw the parameters) or params")
                p = init_phalanx(rngs.params(), dim, heads=heads, head_dim=head_dim,
                                 kv_heads=kv_heads, decay_max=decay_max, dtype=param_dtype)
            else:
                p = params if isinstance(params, PhalanxParams) else PhalanxParams.from_dict(
                    params)
                got = (p.dim, p.heads, p.head_dim, p.kv_heads, float(p.decay_max))
                want = (dim, heads, head_dim, kv_heads, decay_max)
                if got != want:
                    raise ValueError(
                        f"params have (dim, heads, head_dim, kv_heads, decay_max) = {got}, the "
                        f"module {want}: use Phalanx.from_params(params)"
                    )
            for k in _WEIGHTS:
                setattr(self, k, nnx.Param(getattr(p, k)))
            self.heads, self.head_dim, self.kv_heads = p.heads, p.head_dim, p.kv_heads
            self.decay_max = float(p.decay_max)
            self.block_len = _checks.check_block_len(block_len)
            self.hops = _checks.check_hops(hops)

        @classmethod
        def from_params(cls, params, *, block_len: int = 16, hops: int | None = 1):
            """The layer holding ``params`` (a :class:`PhalanxParams` or the front's dict, e.g.
            ``swr_array.init_phalanx(...)``)."""
            p = params if isinstance(params, PhalanxParams) else PhalanxParams.from_dict(params)
            return cls(p.dim, heads=p.heads, head_dim=p.head_dim, kv_heads=p.kv_heads,
                       decay_max=float(p.decay_max), block_len=block_len, hops=hops, params=p)

        @property
        def params(self) -> PhalanxParams:
            return PhalanxParams(*(getattr(self, k)[...] for k in _WEIGHTS), self.heads,
                                 self.head_dim, self.kv_heads, self.decay_max)

        def __call__(self, x: Array, *, cu_seqlens: Array | None = None) -> Array:
            return phalanx(self.params, x, block_len=self.block_len, hops=self.hops,
                           cu_seqlens=cu_seqlens)

    Phalanx.__module__, Phalanx.__qualname__ = __name__, "Phalanx"
    return Phalanx


def __getattr__(name):
    if name == "Phalanx":
        return _phalanx_module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
