"""The public SWR operations: one signature for NumPy (reference) and CuPy (Numba CUDA kernels)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

from . import _checks, _plans, packed, reference
from ._backend import get_xp
from .state import SWRState

Array = Any


# ----------------------------------------------------------------------------------------------
# layout helpers: canonical time-last view (B, H, D|1, N)
# ----------------------------------------------------------------------------------------------


def to_time_last(x, layout: str, per_head: bool):
    """(B,H,D,N)/(B,N,H,D) -> (B,H,D,N); per-head a (B,H,N)/(B,N,H) -> (B,H,1,N)."""
    if layout == "BHDL":
        return x[:, :, None, :] if per_head else x
    if per_head:  # (B, N, H)
        return x.transpose(0, 2, 1)[:, :, None, :]
    return x.transpose(0, 2, 3, 1)


def from_time_last(x, layout: str, per_head: bool = False):
    """Inverse of :func:`to_time_last`."""
    if per_head:
        x = x[:, :, 0, :]
        return x if layout == "BHDL" else x.transpose(0, 2, 1)
    return x if layout == "BHDL" else x.transpose(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def swr(
    a: Array,
    u: Array,
    *,
    block_len: int = 16,
    hops: int | None = 1,
    layout: str = _checks.DEFAULT_LAYOUT,
    x0: Array | None = None,
    state: SWRState | None = None,
    return_state: bool = False,
    out_dtype=None,
    out: Array | None = None,
    cu_seqlens: Array | None = None,
):
    """Sliding window recurrence y = L_hops(a) u (docs/spec.md#recurrence).

    Args:
        a: coefficients, per head ``(B, H, L)`` / ``(B, L, H)`` or per channel (u's shape), any
            real values.
        u: inputs ``(B, L, H, D)`` for ``layout="BLHD"`` (the default) or ``(B, H, D, L)`` for
            ``"BHDL"``.
        block_len: block length l, a power of two in 1..256.
        hops: carrier hops k (0: block diagonal, 1: SWR default, None: exact recurrence). Without
            ``state``/``return_state``, hops at or beyond the number of blocks runs the exact path
            (the same result, no per-hop memory).
        layout: ``"BLHD"`` (channels contiguous, the default) or ``"BHDL"`` (time contiguous).
            Shapes that fit only the other layout are refused; per-channel ``a`` (and per-head
            ``a`` when H == D) fits both, so the layout of such arrays cannot be checked.
        x0: initial carry ``(B, H, D)`` (default 0). Not combined with ``state``.
        state: an :class:`SWRState` from an earlier ``return_state=True`` call (or steps) to
            continue from; all its rows must be at one position (else ValueError).
        return_state: also return the state after the last token: a new state, or with
            ``state`` that same object advanced in place (without ``return_state`` a given state
            is only read).
        out_dtype: dtype of y (default: the input dtype).
        out: optional preallocated C-contiguous y (u's shape, ``out_dtype``) to write into.
        cu_seqlens: packed sequences (B == 1): int32/int64 ``[0, n_1, n_1 + n_2, ..., T]``;
            sequence s (tokens ``cu[s]:cu[s+1]``) runs alone, blocks aligned at its first token,
            with initial carry ``x0[s]`` (x0 ``(S, H, D)``); ``return_state`` returns a state
            of batch S. See swr_array/packed.py (GPU: values of cu are not read by the host).

    Returns:
        y with u's shape (and the new state with ``return_state``). NumPy inputs run the float64
        reference; CuPy inputs run the Numba CUDA kernels on the current device and stream.
    """
    plain = x0 is None and state is None and return_state is False and cu_seqlens is None
    if plain:
        # Repeated plain calls on CuPy skip the checks: everything they depend on is in the key.
        key = _plain_key(a, u, block_len, hops, layout, out_dtype, out)
        p = _plans.PLANS.get(key)
        if p is not None:
            from . import _cuda

            return _cuda.swr_forward_plain(a, u, p, out)
    packed_key = None
    if cu_seqlens is not None and state is None and return_state is False:
        # repeated packed CuPy calls of the native path skip the checks, as plain ones do
        packed_key = packed.plan_key(_plain_key(a, u, block_len, hops, layout, out_dtype, out),
                                     cu_seqlens, x0)
        p = _plans.PLANS.get(packed_key)
        if p is not None:
            return packed.forward_planned(a, u, p, cu_seqlens, x0, out)
    p = _checks.check_swr(a, u, block_len=block_len, hops=hops, layout=layout, out_dtype=out_dtype)
    if cu_seqlens is not None:
        _checks.check_state(state, p)
        return_state = _checks.check_bool("return_state", return_state)
        _checks.check_out("out", out, tuple(u.shape), p.out_dtype, p)
        if return_state:
            _checks.check_state_hops(p.hops, cu_seqlens.shape[0] - 1, p.H, p.D)
        res = packed.swr(a, u, p, cu_seqlens, x0=x0, state=state, return_state=return_state,
                         out=out)
        if packed_key is not None and packed.plannable(p, a, u, cu_seqlens, x0):
            _plans.PLANS.put(packed_key, p)
        return res
    _checks.check_channel_array("x0", x0, p)
    _checks.check_state(state, p)
    return_state = _checks.check_bool("return_state", return_state)
    if return_state and state is None:
        _checks.check_state_hops(p.hops, p.B, p.H, p.D)
    if x0 is not None and state is not None:
        raise ValueError("pass either x0 or state, not both: a state already holds its carry")
    _checks.check_out("out", out, tuple(u.shape), p.out_dtype, p)
    if state is None and not return_state:
        p = _exact_beyond_blocks(p)
    if p.backend == "cupy":
        import cupy

        from . import _cuda

        if plain and key is not None and _cuda.one_pass(p):
            contiguous = a.flags.c_contiguous and u.flags.c_contiguous
            if contiguous:
                _plans.PLANS.put(key, p)
        with cupy.cuda.Device(p.device):
            res = _cuda.swr_forward(
                a, u, p, x0=x0, state=state, return_state=return_state, out=out
            )
        return _filled(res, state, return_state)
    res = _filled(_swr_numpy(a, u, p, x0=x0, state=state, return_state=return_state), state,
                  return_state)
    if out is None:
        return res
    y = res[0] if return_state else res
    np.copyto(out, y)
    return (out, res[1]) if return_state else out


def _exact_beyond_blocks(p):
    """hops >= the number of blocks reaches back to the first block (and x0): that is the exact
    recurrence, computed without one carrier per hop. Only for calls that neither take nor return
    a state (a state keeps the configuration it was made with)."""
    if p.hops is not None and p.hops > 1 and p.hops >= -(-p.N // p.block_len):
        return dataclasses.replace(p, hops=None)
    return p


def _filled(res, state, return_state):
    """A continued state is advanced in place: its arrays keep their storage."""
    if not return_state or state is None or res[1] is state:
        return res
    return res[0], state.assign(res[1])


def _plain_key(a, u, block_len, hops, layout, out_dtype, out):
    """What the checks of a plain CuPy call depend on; None for any other arrays."""
    if not (type(u).__module__.startswith("cupy") and type(a).__module__.startswith("cupy")):
        return None
    try:
        if out is None:
            out_key = None
        elif type(out).__module__.startswith("cupy"):
            out_key = _array_key(out)
        else:
            return None
        return (
            "swr",
            out_key,
            out_dtype if isinstance(out_dtype, str | type(None)) else np.dtype(out_dtype),
            type(a),
            type(u),
            a.shape,
            u.shape,
            a.dtype,
            u.dtype,
            a.data.device_id,
            u.data.device_id,
            a.flags.c_contiguous,
            u.flags.c_contiguous,
            type(block_len),
            block_len,
            type(hops),
            hops,
            layout,
        )
    except (AttributeError, TypeError):  # not array-like, or an invalid out_dtype: full checks
        return None


def _array_key(x):
    return (type(x), x.shape, x.dtype, x.data.device_id, x.flags.c_contiguous)


def _vjp_key(a, u, dy, block_len, hops, layout, out):
    """What the checks of a plain CuPy ``swr_vjp`` call depend on; None for any other call."""
    base = _plain_key(a, u, block_len, hops, layout, None, None)
    if base is None or not type(dy).__module__.startswith("cupy"):
        return None
    try:
        if out is None:
            out_key = None
        elif (type(out) is tuple and len(out) == 3 and out[2] is None
              and type(out[0]).__module__.startswith("cupy")
              and type(out[1]).__module__.startswith("cupy")):
            out_key = (_array_key(out[0]), _array_key(out[1]))
        else:
            return None
        return ("vjp", base, _array_key(dy), out_key)
    except (AttributeError, TypeError):
        return None


def _swr_numpy(a, u, p, *, x0, state, return_state):
    at = to_time_last(a, p.layout, p.per_head)
    ut = to_time_last(u, p.layout, False)
    if state is None:
        state = SWRState.initial((p.B, p.H, p.D), block_len=p.block_len, hops=p.hops, x0=x0)
    y, v, C, S = reference.swr(
        at,
        ut,
        block_len=p.block_len,
        hops=p.hops,
        position=state.common_position(),
        w0=state.w if state.offset else None,
        g0=state.g if state.offset else None,
        carry=state.carry(),
        return_parts=True,
    )
    y = np.ascontiguousarray(from_time_last(y, p.layout)).astype(p.out_dtype, copy=False)
    if not return_state:
        return y
    return y, state.advanced(p.N, v, C, S, np)


def swr_vjp(
    a: Array,
    u: Array,
    dy: Array,
    *,
    block_len: int = 16,
    hops: int | None = 1,
    layout: str = _checks.DEFAULT_LAYOUT,
    x0: Array | None = None,
    out: tuple | None = None,
    cu_seqlens: Array | None = None,
):
    """Gradients of ``sum(dy * swr(a, u, x0=x0))`` (docs/spec.md#gradients).

    Returns ``(da, du, dx0)``: ``da`` with a's shape and dtype (per-head coefficients get the sum
    over the head's channels), ``du`` with u's shape and dtype, ``dx0`` ``(B, H, D)`` float32
    (float64 on NumPy), or None when x0 is None. ``out=(da, du, dx0)`` writes into preallocated
    C-contiguous arrays of those shapes and dtypes (``dx0`` None when x0 is None).
    ``cu_seqlens``: packed sequences as in :func:`swr`; ``x0`` and ``dx0`` are ``(S, H, D)``.
    """
    plain = x0 is None and cu_seqlens is None
    if plain:
        # as in swr: repeated plain CuPy calls skip the checks (all they depend on is in the key)
        key = _vjp_key(a, u, dy, block_len, hops, layout, out)
        p = _plans.PLANS.get(key)
        if p is not None:
            from . import _cuda

            return _cuda.swr_backward_plain(a, u, dy, p, out)
    packed_key = None
    if cu_seqlens is not None and out is None:
        packed_key = packed.plan_key(_vjp_key(a, u, dy, block_len, hops, layout, None),
                                     cu_seqlens, x0)
        p = _plans.PLANS.get(packed_key)
        if p is not None:
            return packed.backward_planned(a, u, dy, p, cu_seqlens, x0)
    p = _checks.check_swr(a, u, block_len=block_len, hops=hops, layout=layout)
    _checks.check_array("dy", dy, p.backend, p.device)
    if tuple(dy.shape) != tuple(u.shape):
        raise ValueError(f"dy must have u's shape {tuple(u.shape)}, got {tuple(dy.shape)}")
    _checks.check_float_dtype("dy", dy.dtype, p.backend)
    if cu_seqlens is not None:
        res = packed.swr_vjp(a, u, dy, p, cu_seqlens, x0=x0, out=out)
        if packed_key is not None and packed.plannable(p, a, u, cu_seqlens, x0, dy):
            _plans.PLANS.put(packed_key, p)
        return res
    _checks.check_channel_array("x0", x0, p)
    _checks.check_vjp_out(out, a, u, x0, p, p.B)
    p = _exact_beyond_blocks(p)
    if p.B * p.H * p.D == 0:  # no channels: nothing to launch, every gradient is empty
        return _empty_vjp(a, u, x0, p, out)
    if p.backend == "cupy":
        import cupy

        from . import _cuda

        fused = p.hops in (0, 1) or _cuda.exact_backward_fits(p, dy.dtype)
        if plain and key is not None and fused:
            contiguous = a.flags.c_contiguous and u.flags.c_contiguous and dy.flags.c_contiguous
            if contiguous:
                _plans.PLANS.put(key, p)
        with cupy.cuda.Device(p.device):
            return _cuda.swr_backward(a, u, dy, p, x0=x0, out=out)
    at = to_time_last(a, p.layout, p.per_head)
    ut = to_time_last(u, p.layout, False)
    dyt = to_time_last(dy, p.layout, False)
    da, du, dx0 = reference.swr_vjp(at, ut, dyt, block_len=p.block_len, hops=p.hops, x0=x0)
    if p.per_head:
        da = da.sum(axis=2, keepdims=True)
    da = np.ascontiguousarray(from_time_last(da, p.layout, p.per_head)).astype(a.dtype, copy=False)
    du = np.ascontiguousarray(from_time_last(du, p.layout)).astype(u.dtype, copy=False)
    if out is not None:
        res = []
        for dst, src in zip(out, (da, du, dx0)):
            if dst is not None:
                np.copyto(dst, src)
            res.append(src if dst is None else dst)
        return tuple(res)
    return da, du, dx0


def _empty_vjp(a, u, x0, p, out):
    """swr_vjp without channels (B, H or D is 0): zero gradients (per-head da sums no channels)."""
    xp = get_xp(p.backend)
    f = np.float32 if p.backend == "cupy" else np.float64
    res = (xp.zeros(a.shape, a.dtype), xp.zeros(u.shape, u.dtype),
           None if x0 is None else xp.zeros((p.B, p.H, p.D), f))
    if out is None:
        return res
    for dst in out:
        if dst is not None:
            dst[...] = 0
    return tuple(src if dst is None else dst for dst, src in zip(out, res))


def swr_init_state(
    shape, *, block_len: int = 16, hops: int | None = 1, x0: Array | None = None, like=None
) -> SWRState:
    """The state before the first token, for decoding from scratch with :func:`swr_step`.

    ``shape`` is ``(B, H, D)``; ``like`` (an array) picks the backend and device (NumPy by
    default): float64 arrays on NumPy, float32 on CuPy, ``position`` int64 zeros. ``x0``
    ``(B, H, D)`` is an initial carry on that backend.
    """
    block_len = _checks.check_block_len(block_len)
    hops = _checks.check_hops(hops)
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, numbers.Integral) and s >= 0 for s in shape):
        raise ValueError(f"shape must be (B, H, D) of non-negative ints, got {shape}")
    _checks.check_state_hops(hops, *shape)
    backend = "numpy" if like is None else _checks.array_backend(like, name="like")
    xp = get_xp(backend)
    dtype = np.float64 if xp is np else np.float32
    if x0 is not None:
        if _checks.array_backend(x0, name="x0") != backend:
            raise TypeError(f"x0 must be a {backend} array")
        if tuple(x0.shape) != shape:
            raise ValueError(f"x0 must have shape {shape}, got {tuple(x0.shape)}")
    if backend == "cupy":
        with xp.cuda.Device(like.device.id):
            return SWRState.initial(shape, block_len=block_len, hops=hops, x0=x0, xp=xp,
                                    dtype=dtype)
    return SWRState.initial(shape, block_len=block_len, hops=hops, x0=x0, xp=xp, dtype=dtype)


def swr_step(
    a_t: Array,
    u_t: Array,
    state: SWRState,
    *,
    layout: str = "BLHD",
    out_dtype=None,
    out: Array | None = None,
):
    """One decoding step for every batch row: writes y_t and advances ``state`` in place.

    Each row continues from its own position (``state.position``), so rows at different
    positions step together; y_t equals the parallel form :func:`swr` at that row's position.

    Args:
        a_t: ``(B, H)`` per head or ``(B, H, D)`` per channel, u_t's dtype.
        u_t: ``(B, H, D)``: one token of either layout (``layout`` is checked for a uniform
            signature; a token has the same shape in both).
        state: the state after each row's previous token (from :func:`swr_init_state` or a
            prefill with ``return_state=True``); updated in place.
        out_dtype: dtype of y_t (default: u_t's dtype).
        out: optional preallocated C-contiguous y_t ``(B, H, D)`` of ``out_dtype`` to write.

    Returns:
        ``(y_t, state)``: y_t ``(B, H, D)`` and the same state object, advanced by one token.

    On CuPy the step is one kernel launch on the current stream (numba_kernels/swr_step.py)
    that reads each row's position on the device: with ``out`` given nothing is allocated and
    nothing synchronises, so steps can be captured in a CUDA graph (the kernel launch is
    prepared on the first call with these dtypes; capture after it). All checks run before the
    launch; a refused call leaves the state unchanged.
    """
    if not isinstance(state, SWRState):
        raise TypeError(f"state must be an SWRState, got {type(state).__name__}")
    _checks.check_layout(layout)
    if u_t is None:
        raise TypeError("u_t must be a NumPy or CuPy array, got None")
    backend = _checks.array_backend(u_t, name="u_t")
    device = u_t.device.id if backend == "cupy" else None
    _checks.check_array("a_t", a_t, backend, device)
    per_channel = _checks.step_shapes(a_t.shape, u_t.shape, state.w.shape)
    shape = tuple(state.w.shape)
    B, H, D = shape
    dtype = _checks.check_float_dtype("u_t", u_t.dtype, backend)
    if np.dtype(a_t.dtype) != dtype:
        raise TypeError(f"a_t and u_t must share one dtype, got {a_t.dtype} and {u_t.dtype}")
    odt = _checks.check_out_dtype(out_dtype, dtype, backend)
    sb = _checks.array_backend(state.w, name="state")
    if sb != backend:
        raise TypeError(f"state holds {sb} arrays but u_t is a {backend} array")
    if backend == "cupy" and state.w.device.id != device:
        raise ValueError(f"state is on GPU {state.w.device.id} but u_t is on GPU {device}")
    want = np.float64 if backend == "numpy" else np.float32
    if state.w.dtype != want:
        raise TypeError(f"state has dtype {state.w.dtype}, expected {np.dtype(want)}")
    if out is not None:
        p = _checks.Problem(backend, "BHDL", B, H, D, 1, not per_channel, dtype, odt,
                            state.block_len, state.hops, device)
        _checks.check_out("out", out, shape, odt, p)
    if backend == "cupy":
        import cupy

        from . import _cuda

        if not (a_t.flags.c_contiguous and u_t.flags.c_contiguous):
            a_t, u_t = cupy.ascontiguousarray(a_t), cupy.ascontiguousarray(u_t)
        with cupy.cuda.Device(device):
            y = cupy.empty(shape, odt) if out is None else out
            _cuda.swr_step(a_t, u_t, y, state, per_channel)
        return y, state
    y = _step_numpy(a_t if per_channel else a_t[:, :, None], u_t, state)
    y = y.astype(odt, copy=False)
    if out is None:
        return y, state
    np.copyto(out, y)
    return out, state


def swr_step_into(a_t, u_t, y, state: SWRState, *, stream=None) -> None:
    """The GPU step as one kernel launch on arrays of any framework: writes y_t into ``y`` and
    advances ``state`` in place (what :func:`swr_step` does on CuPy, without its full checks).

    Args:
        a_t: ``(B, H)`` per head or ``(B, H, D)`` per channel, C-contiguous.
        u_t: ``(B, H, D)`` C-contiguous, a_t's dtype (float32, float16 or bfloat16).
        y: ``(B, H, D)`` C-contiguous, any of those dtypes: receives y_t.
        state: a GPU :class:`SWRState` ``(B, H, D)`` (float32 arrays) on the arrays' device.
        stream: a ``cupy.cuda.Stream``, a raw ``cudaStream_t`` as an int (e.g.
            ``torch.cuda.current_stream().cuda_stream``), or None for CuPy's current stream.

    Arrays may be CuPy arrays or anything exposing ``__cuda_array_interface__`` (torch CUDA
    tensors; NumPy arrays under the CUDA simulator). Shapes, dtypes and contiguity are checked
    (not the device: the caller keeps everything on the state's device) before the launch. No
    allocation, no host synchronisation, no host-side change: the call can be captured in a CUDA
    graph once it has run eagerly (the first call with given dtypes prepares the launch and keeps
    it on the state).
    """
    run = step_plan(a_t, u_t, y, state)
    if run is None:  # the first call with these dtypes: prepared and launched together
        from . import _cuda

        _cuda.swr_step(a_t, u_t, y, state, _checks.step_shapes(a_t.shape, u_t.shape,
                                                               state.w.shape), stream=stream)
        return
    run.run(a_t, u_t, y, stream=stream)


def step_plan(a_t, u_t, y, state: SWRState):
    """The checks of :func:`swr_step_into` (shapes, dtypes, contiguity of these arrays), then the
    launch it keeps on the state for these dtypes (a ``numba_kernels.swr_step.StepLaunch`` to
    ``.run(a_t, u_t, y, stream=...)``), or None before the first launch with them. A caller that
    checks and makes its arrays itself (the torch adapter's step) keeps the plan and relaunches
    it without checking them again."""
    if not isinstance(state, SWRState):
        raise TypeError(f"state must be an SWRState, got {type(state).__name__}")
    shape = tuple(state.w.shape)
    if tuple(y.shape) != shape:
        raise ValueError(f"y must have the state's shape {shape}, got {tuple(y.shape)}")
    per_channel = _checks.step_shapes(a_t.shape, u_t.shape, shape)
    from .phalanx import _c_contiguous, _np_dtype

    da, du, dy = _np_dtype(a_t.dtype), _np_dtype(u_t.dtype), _np_dtype(y.dtype)
    if da != du:
        raise TypeError(f"a_t and u_t must share one dtype, got {da} and {du}")
    for name, d in (("u_t", du), ("y", dy)):
        if d.name not in ("float32", "float16", "bfloat16"):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {d}")
    if state.w.dtype != np.float32:
        raise TypeError(f"state must hold float32 arrays (a GPU state), got {state.w.dtype}")
    if not (_c_contiguous(a_t) and _c_contiguous(u_t) and _c_contiguous(y)):
        raise ValueError("a_t, u_t and y must be C-contiguous")
    return state._launch_cache.get(("swr", da, per_channel, du, dy))


def _step_numpy(a_c, u_t, state):
    """The reference step, rows grouped by position; writes the state in place."""
    B, H, D = state.shape
    y = np.empty((B, H, D), np.float64)
    a_c = np.broadcast_to(np.asarray(a_c, np.float64), (B, H, D))
    u_t = np.asarray(u_t, np.float64)
    for pos in np.unique(state.position):
        rows = np.flatnonzero(state.position == pos)
        w, g, (cv, cC), y[rows] = reference.step(
            a_c[rows], u_t[rows], state.w[rows], state.g[rows],
            (state.carry_v[rows], state.carry_C[rows]), int(pos), state.block_len, state.hops)
        state.w[rows], state.g[rows] = w, g
        state.carry_v[rows], state.carry_C[rows] = cv, cC
    state.position += 1
    return y


def horizon(rho: float, eps: float) -> int:
    """The paper's computational horizon: the smallest k with rho**(k+1) / (1 - rho) < eps.

    With decay bounded by ``rho`` (|a_t| <= rho < 1) inputs older than k steps change the output
    by less than ``eps`` relative to the input scale; pick ``block_len * hops >= k``.
    """
    for name, x in (("rho", rho), ("eps", eps)):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1), got {rho}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if rho == 0.0:
        return 0
    k = max(0, math.ceil(math.log(eps * (1.0 - rho)) / math.log(rho) - 1.0))
    # settle the float rounding of the closed form on the exact strict inequality
    while k > 0 and rho**k / (1.0 - rho) < eps:
        k -= 1
    while rho ** (k + 1) / (1.0 - rho) >= eps:
        k += 1
    return k
