"""The public SWR operations: one signature for NumPy (reference) and CuPy (Numba CUDA kernels)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _checks, packed, reference
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
    layout: str = "BHDL",
    x0: Array | None = None,
    state: SWRState | None = None,
    return_state: bool = False,
    out_dtype=None,
    out: Array | None = None,
    cu_seqlens: Array | None = None,
):
    """Sliding window recurrence y = L_hops(a) u (SPEC section 1).

    Args:
        a: coefficients, per head ``(B, H, L)`` / ``(B, L, H)`` or per channel (u's shape), any
            real values.
        u: inputs ``(B, H, D, L)`` for ``layout="BHDL"`` or ``(B, L, H, D)`` for ``"BLHD"``.
        block_len: block length l, a power of two in 1..256.
        hops: carrier hops k (0: block diagonal, 1: SWR default, None: exact recurrence).
        layout: ``"BHDL"`` (time contiguous) or ``"BLHD"`` (channels contiguous).
        x0: initial carry ``(B, H, D)`` (default 0). Not combined with ``state``.
        state: an :class:`SWRState` from an earlier ``return_state=True`` call to continue from.
        return_state: also return the state after the last token.
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
        p = _CHECKED.get(key)
        if p is not None:
            from . import _cuda

            return _cuda.swr_forward_plain(a, u, p, out)
    p = _checks.check_swr(a, u, block_len=block_len, hops=hops, layout=layout, out_dtype=out_dtype)
    if cu_seqlens is not None:
        _checks.check_state(state, p)
        return_state = _checks.check_bool("return_state", return_state)
        _checks.check_out("out", out, tuple(u.shape), p.out_dtype, p)
        return packed.swr(a, u, p, cu_seqlens, x0=x0, state=state, return_state=return_state,
                          out=out)
    _checks.check_channel_array("x0", x0, p)
    _checks.check_state(state, p)
    return_state = _checks.check_bool("return_state", return_state)
    if x0 is not None and state is not None:
        raise ValueError("pass either x0 or state, not both: a state already holds its carry")
    _checks.check_out("out", out, tuple(u.shape), p.out_dtype, p)
    if p.backend == "cupy":
        import cupy

        from . import _cuda

        if plain and key is not None and p.hops in (0, 1):
            contiguous = a.flags.c_contiguous and u.flags.c_contiguous
            if contiguous and len(_CHECKED) < 1024:
                _CHECKED[key] = p
        with cupy.cuda.Device(p.device):
            return _cuda.swr_forward(
                a, u, p, x0=x0, state=state, return_state=return_state, out=out
            )
    res = _swr_numpy(a, u, p, x0=x0, state=state, return_state=return_state)
    if out is None:
        return res
    y = res[0] if return_state else res
    np.copyto(out, y)
    return (out, res[1]) if return_state else out


_CHECKED: dict = {}


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
        position=state.position,
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
    layout: str = "BHDL",
    x0: Array | None = None,
    out: tuple | None = None,
    cu_seqlens: Array | None = None,
):
    """Gradients of ``sum(dy * swr(a, u, x0=x0))`` (SPEC section 4).

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
        p = _CHECKED.get(key)
        if p is not None:
            from . import _cuda

            return _cuda.swr_backward_plain(a, u, dy, p, out)
    p = _checks.check_swr(a, u, block_len=block_len, hops=hops, layout=layout)
    _checks.same_backend([("dy", dy)], p.backend, u.device.id if p.backend == "cupy" else None)
    if tuple(dy.shape) != tuple(u.shape):
        raise ValueError(f"dy must have u's shape {tuple(u.shape)}, got {tuple(dy.shape)}")
    _checks.check_float_dtype("dy", dy.dtype, p.backend)
    if cu_seqlens is not None:
        return packed.swr_vjp(a, u, dy, p, cu_seqlens, x0=x0, out=out)
    _checks.check_channel_array("x0", x0, p)
    if out is not None:
        if not isinstance(out, tuple | list) or len(out) != 3:
            raise TypeError("out must be a tuple (da, du, dx0)")
        _checks.check_out("out[0] (da)", out[0], tuple(a.shape), a.dtype, p)
        _checks.check_out("out[1] (du)", out[1], tuple(u.shape), u.dtype, p)
        if x0 is None and out[2] is not None:
            raise ValueError("out[2] (dx0) must be None when x0 is None")
        if x0 is not None:
            f = np.float32 if p.backend == "cupy" else np.float64
            _checks.check_out("out[2] (dx0)", out[2], (p.B, p.H, p.D), f, p)
    if p.backend == "cupy":
        import cupy

        from . import _cuda

        if plain and key is not None and p.hops in (0, 1):
            contiguous = a.flags.c_contiguous and u.flags.c_contiguous and dy.flags.c_contiguous
            if contiguous and len(_CHECKED) < 1024:
                _CHECKED[key] = p
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


def swr_init_state(
    shape, *, block_len: int = 16, hops: int | None = 1, x0: Array | None = None, like=None
) -> SWRState:
    """The state before the first token, for decoding from scratch with :func:`swr_step`.

    ``shape`` is ``(B, H, D)``; ``like`` (an array) picks the backend (NumPy by default).
    """
    block_len = _checks.check_block_len(block_len)
    hops = _checks.check_hops(hops)
    if len(tuple(shape)) != 3:
        raise ValueError(f"shape must be (B, H, D), got {shape}")
    xp = np if like is None else get_xp(_checks.array_backend(like, name="like"))
    dtype = np.float64 if xp is np else np.float32
    return SWRState.initial(shape, block_len=block_len, hops=hops, x0=x0, xp=xp, dtype=dtype)


def swr_step(a_t: Array, u_t: Array, state: SWRState, *, out_dtype=None):
    """One decoding step: y_t and the next state, equal to the parallel form at that position.

    Args:
        a_t: ``(B, H)`` per head or ``(B, H, D)`` per channel.
        u_t: ``(B, H, D)``.
        state: the state after the previous token.
    """
    if not isinstance(state, SWRState):
        raise TypeError(f"state must be an SWRState, got {type(state).__name__}")
    backend = _checks.array_backend(u_t, name="u_t")
    _checks.same_backend([("a_t", a_t)], backend)
    if u_t.ndim != 3 or tuple(u_t.shape) != tuple(state.w.shape):
        raise ValueError(f"u_t must have shape (B, H, D) = {tuple(state.w.shape)}, got {u_t.shape}")
    B, H, D = u_t.shape
    if tuple(a_t.shape) == (B, H):
        a_c = a_t[:, :, None]
    elif tuple(a_t.shape) == (B, H, D):
        a_c = a_t
    else:
        raise ValueError(f"a_t must have shape (B, H) or (B, H, D) = {(B, H, D)}, got {a_t.shape}")
    dtype = _checks.check_float_dtype("u_t", u_t.dtype, backend)
    if np.dtype(a_t.dtype) != dtype:
        raise TypeError(f"a_t and u_t must share one dtype, got {a_t.dtype} and {u_t.dtype}")
    out = _checks.check_out_dtype(out_dtype, dtype, backend)
    if _checks.array_backend(state.w, name="state") != backend:
        raise TypeError("state and u_t live on different frameworks")
    xp = get_xp(backend)
    f = state.w.dtype
    a_c = xp.broadcast_to(a_c.astype(f), (B, H, D))
    w, g, carry, y = reference.step(
        a_c,
        u_t.astype(f),
        state.w,
        state.g,
        state.carry(),
        state.position,
        state.block_len,
        state.hops,
        xp=xp,
    )
    new = SWRState(state.position + 1, state.block_len, state.hops, w, g, carry[0], carry[1])
    return y.astype(out), new


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
