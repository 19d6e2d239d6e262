"""The CuPy backend: allocates outputs, runs the block-level algebra, launches the kernels.

Arguments arrive checked (``_checks.Problem``). Inputs that are not C-contiguous in their layout
are copied to contiguous arrays on the same device first (kernels index contiguous layouts).
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import reference
from .state import SWRState

F32 = np.float32


def _nk():
    from . import numba_kernels

    return numba_kernels


def _xp_of(x):
    """CuPy for CuPy arrays; NumPy under the CUDA simulator (whose kernels take NumPy arrays)."""
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def _view(x):
    """The array a kernel receives: bfloat16 as its uint16 bits."""
    return x.view(np.uint16) if x.dtype.name == "bfloat16" else x


def _time_slice(x, start, layout):
    """x[..., start:] along time for either layout, as a contiguous copy."""
    xp = _xp_of(x)
    if layout == "BHDL":
        return xp.ascontiguousarray(x[..., start:])
    return xp.ascontiguousarray(x[:, start:])


def _exact_block_carry(v, C, s0):
    """hops=None: S_j = s_{j-1} with s_j = v_j + C_j s_{j-1}, s_{-1} = s0 (linear_scan kernel)."""
    cp = _xp_of(v)
    B, H, D, nb = v.shape
    s = cp.empty_like(v)
    _nk().linear_scan(
        C.reshape(-1, nb),
        v.reshape(-1, nb),
        s.reshape(-1, nb),
        cp.ascontiguousarray(s0.reshape(-1)),
        reverse=False,
    )
    return cp.concatenate([s0[..., None], s[..., :-1]], axis=-1)


def _exact_block_adjoints(C, q, S, x0_given):
    """hops=None: r_j = q_{j+1} + C_{j+1} r_{j+1}; dv = r, dC = r S, dx0 = q_0 + C_0 r_0."""
    cp = _xp_of(q)
    nb = q.shape[-1]
    zeros = cp.zeros(q.shape[:-1] + (1,), F32)
    coef = cp.ascontiguousarray(cp.concatenate([C[..., 1:], zeros], axis=-1))
    x = cp.ascontiguousarray(cp.concatenate([q[..., 1:], zeros], axis=-1))
    r = cp.empty_like(q)
    _nk().linear_scan(
        coef.reshape(-1, nb),
        x.reshape(-1, nb),
        r.reshape(-1, nb),
        cp.zeros(coef.shape[:-1], F32).reshape(-1),
        reverse=True,
    )
    dx0 = q[..., 0] + C[..., 0] * r[..., 0] if x0_given else cp.zeros(q.shape[:-1], F32)
    return r, r * S, dx0


def _block_carry(v, C, hops, state, position):
    valid = reference._valid_carriers(position, state.block_len, hops)
    if hops is None:
        return _exact_block_carry(v, C, cp_ascontig(state.carry_v[..., 0]))
    return reference.block_carry(
        v, C, hops, (state.carry_v[..., :valid], state.carry_C[..., :valid]), xp=_xp_of(v)
    )


_CONSTANTS: dict = {}


def cupy_pool(cp):
    """Allocations in the block come from CuPy's own memory pool, whatever allocator the caller
    set: for arrays the front caches across calls, which must not live in a framework's pool
    (torch's CUDA-graph pools track every allocation made while they are active). NumPy (the
    kernels under the CUDA simulator): nothing to do."""
    if cp is np:
        return contextlib.nullcontext()
    return cp.cuda.using_allocator(cp.get_default_memory_pool().malloc)


def _constant(xp, shape, value):
    """A cached read-only float32 array of ``value`` (kernels only read start values)."""
    dev = None if xp is np else xp.cuda.Device().id
    key = (xp.__name__, dev, shape, value)
    arr = _CONSTANTS.get(key)
    if arr is None:
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        if xp is np:
            arr = np.full(shape, value, dtype=F32)
        else:
            with cupy_pool(xp):
                arr = xp.full(shape, value, dtype=F32)
        _CONSTANTS[key] = arr
    return arr


def cp_ascontig(x):
    return _xp_of(x).ascontiguousarray(x, dtype=F32)


_PLAIN_CONSTANTS: dict = {}

FUSED_HOPS = range(2, 9)  # numba_kernels.swr_forward.HALO_HOPS (not imported: no Numba here)


def one_pass(p):
    """Whether a call without x0/state/return_state takes the hot path (:func:`swr_forward_plain`)
    with one forward kernel: hops 0/1 and hops=None (the exact scan) in both layouts, BLHD hops
    2..8 (the halo walk). :func:`swr_forward` also runs hops 2..8 in one pass, both layouts, for
    calls with x0 or return_state (no state given)."""
    return p.hops is None or p.hops in (0, 1) or (p.layout == "BLHD" and p.hops in FUSED_HOPS)


def swr_forward_plain(a, u, p, out=None, stream=None):
    """The hot path: a checked, C-contiguous CuPy call with no x0 or state and :func:`one_pass`
    hops (``stream``: a CUDA stream handle, or None for CuPy's current stream)."""
    cp = _xp_of(u)
    if cp.cuda.runtime.getDevice() != p.device:
        with cp.cuda.Device(p.device):
            return swr_forward_plain(a, u, p, out, stream)
    y = cp.empty(u.shape, dtype=p.out_dtype) if out is None else out
    if p.N == 0:
        return y
    zeros, ones = _plain_zeros(cp, p)
    if p.hops is None:
        _nk().exact_scan.swr_exact(a, u, y, zeros, layout=p.layout, stream=stream)
        return y
    _nk().swr_forward.swr_forward(a, u, y, layout=p.layout, block_len=p.block_len, hops=p.hops,
                                  offset=0, w0=zeros, g0=ones, carry=zeros, stream=stream)
    return y


def _plain_zeros(cp, p):
    shape = (p.B, p.H, p.D)
    key = (p.device, shape)
    consts = _PLAIN_CONSTANTS.get(key)
    if consts is None:
        if len(_PLAIN_CONSTANTS) > 64:
            _PLAIN_CONSTANTS.clear()
        with cupy_pool(cp):
            consts = _PLAIN_CONSTANTS[key] = (cp.zeros(shape, F32), cp.ones(shape, F32))
    return consts


def exact_backward_fits(p, dy_dtype):
    """Whether the gradient of hops=None runs as the exact scan's two launches
    (numba_kernels/exact_scan.py ``swr_exact_vjp``): dy of u's dtype, and per-head coefficients
    whose head fits in one tile (``backward_fits``); else the block-carrier path."""
    if p.hops is not None or np.dtype(dy_dtype) != np.dtype(p.dtype):
        return False
    from .numba_kernels._dtypes import storage_kind

    shape = (p.B, p.N, p.H, p.D) if p.layout == "BLHD" else (p.B, p.H, p.D, p.N)
    return _nk().exact_scan.backward_fits(p.layout, shape, p.per_head, storage_kind(p.dtype))


def swr_backward_plain(a, u, dy, p, out=None, stream=None):
    """The hot path of the gradient: a checked, C-contiguous CuPy call with no x0, hops 0 or 1
    (or None where :func:`exact_backward_fits`); ``out`` is None or ``(da, du, None)``;
    ``stream`` as in :func:`swr_forward_plain`."""
    cp = _xp_of(u)
    if cp.cuda.runtime.getDevice() != p.device:
        with cp.cuda.Device(p.device):
            return swr_backward_plain(a, u, dy, p, out, stream)
    if out is None:
        da = cp.empty(a.shape, dtype=a.dtype)
        du = cp.empty(u.shape, dtype=u.dtype)
    else:
        da, du = out[0], out[1]
    if p.N == 0:
        da[...] = 0
        return da, du, None
    zeros, _ = _plain_zeros(cp, p)
    if p.hops is None:
        _nk().exact_scan.swr_exact_vjp(a, u, dy, du, da, zeros, None, layout=p.layout,
                                       stream=stream)
        return da, du, None
    _nk().swr_backward.swr_backward(a, u, dy, du, da, layout=p.layout, block_len=p.block_len,
                                    hops=p.hops, carry=zeros, dcarry=None,
                                    stream=stream)  # fmt: skip
    return da, du, None


def swr_forward(a, u, p, *, x0, state, return_state, out=None):
    cp = _xp_of(u)
    nk = _nk()
    a = cp.ascontiguousarray(a)
    u = cp.ascontiguousarray(u)
    y = cp.empty(u.shape, dtype=p.out_dtype) if out is None else out
    shape = (p.B, p.H, p.D)
    position = 0 if state is None else state.common_position()
    fresh = state is None
    if p.hops is None:
        return _exact_forward(a, u, y, p, x0, state, return_state, position)
    if fresh and p.N and p.hops in FUSED_HOPS and (
            p.layout == "BLHD" or _halo_walk().TUNING["forward_bhdl"]):
        # one pass: the halo walk (BLHD: swr_forward's halo mode; BHDL: numba_kernels/halo_walk.py),
        # x0 the carrier before block 0; a state from the last hops + 1 blocks of the inputs
        zeros, ones = _plain_zeros(cp, p)
        carry = zeros if x0 is None else cp_ascontig(x0)
        if p.layout == "BHDL":
            _halo_walk().halo_forward(_view(a), _view(u), _view(y), layout="BHDL",
                                      block_len=p.block_len, hops=p.hops, carry=carry)
        else:
            nk.swr_forward.swr_forward(_view(a), _view(u), _view(y), layout=p.layout,
                                       block_len=p.block_len, hops=p.hops, offset=0, w0=zeros,
                                       g0=ones, carry=carry)  # fmt: skip
        if not return_state:
            return y
        state = SWRState.initial(shape, block_len=p.block_len, hops=p.hops,
                                 x0=None if x0 is None else carry, xp=cp, dtype=F32)
        return y, _advance_from_tail(a, u, p, state, position)
    if fresh and (return_state or p.hops not in (0, 1)):
        x0f = None if x0 is None else cp_ascontig(x0)
        state = SWRState.initial(
            shape, block_len=p.block_len, hops=p.hops, x0=x0f, xp=cp, dtype=F32
        )
    if p.N == 0:
        return (y, state) if return_state else y
    av, uv = _view(a), _view(u)
    if state is None:
        # the common call: no state object, shared read-only constants for the start values
        kw = dict(
            layout=p.layout,
            block_len=p.block_len,
            offset=0,
            w0=_constant(cp, shape, 0.0),
            g0=_constant(cp, shape, 1.0),
        )
    else:
        kw = dict(
            layout=p.layout,
            block_len=p.block_len,
            offset=position % p.block_len,
            w0=cp_ascontig(state.w),
            g0=cp_ascontig(state.g),
        )
    if p.hops in (0, 1):
        if p.hops == 0:
            carry = _constant(cp, shape, 0.0)
        elif state is None:
            carry = _constant(cp, shape, 0.0) if x0 is None else cp_ascontig(x0)
        else:
            carry = cp_ascontig(state.carry_v[..., 0])
        nk.swr_forward.swr_forward(av, uv, _view(y), hops=p.hops, carry=carry, **kw)
        if not return_state:
            return y
        return y, _advance_from_tail(a, u, p, state, position)
    nb = -(-(position % p.block_len + p.N) // p.block_len)
    v = cp.empty(shape + (nb,), F32)
    C = cp.empty(shape + (nb,), F32)
    nk.block_carriers(av, uv, v, C, **kw)
    S = cp.ascontiguousarray(_block_carry(v, C, p.hops, state, position), dtype=F32)
    nk.swr_forward.swr_forward(av, uv, _view(y), hops=p.hops, carry=S[..., 0].copy(),
                               block_carry=S, **kw)
    if not return_state:
        return y
    return y, state.advanced(p.N, v, C, S, cp, position)


def _exact_forward(a, u, y, p, x0, state, return_state, position):
    """hops=None: the exact scan in one pass (numba_kernels/exact_scan.py) from x0, or from a
    state's x (``w + g * s``); with ``return_state`` the kernel also keeps x in float32 just
    before the last two blocks (at most), whose carriers a short tail of the inputs gives."""
    cp = _xp_of(u)
    nk = _nk()
    shape = (p.B, p.H, p.D)
    l = p.block_len
    if state is None:
        x_in = _plain_zeros(cp, p)[0] if x0 is None else cp_ascontig(x0)
    else:
        x_in = cp_ascontig(state.w + state.g * state.carry_v[..., 0])
    end = position + p.N
    tail_abs = max(position, ((end - 1) // l - 1) * l)
    ts = tail_abs - position  # the tail: the last complete block (if any) and a partial one
    x_probe = cp.empty(shape, F32) if return_state and ts > 0 else None
    if p.N:
        nk.exact_scan.swr_exact(_view(a), _view(u), _view(y), x_in, layout=p.layout,
                                probe=ts - 1, x_probe=x_probe)
    if not return_state:
        return y
    if state is None:
        state = SWRState.initial(shape, block_len=l, hops=None,
                                 x0=None if x0 is None else cp_ascontig(x0), xp=cp, dtype=F32)
    if p.N == 0:
        return y, state
    if ts == 0:
        at, ut = a, u
        kw = dict(offset=position % l, w0=cp_ascontig(state.w), g0=cp_ascontig(state.g))
        s0 = cp_ascontig(state.carry_v[..., 0])
    else:
        at, ut = _time_slice(a, ts, p.layout), _time_slice(u, ts, p.layout)
        zeros, ones = _plain_zeros(cp, p)
        kw = dict(offset=0, w0=zeros, g0=ones)
        s0 = x_probe
    nb = -(-(kw["offset"] + p.N - ts) // l)
    v = cp.empty(shape + (nb,), F32)
    C = cp.empty_like(v)
    nk.block_carriers(_view(at), _view(ut), v, C, layout=p.layout, block_len=l, **kw)
    S = cp.ascontiguousarray(_exact_block_carry(v, C, s0))
    return y, state.advanced(p.N, v, C, S, cp, position)


def _advance_from_tail(a, u, p, state, position):
    """The next state for finite hops K: only the trailing partial block and the K complete
    blocks before it matter (their block carriers; the carries S do not enter the state), so
    their carriers are recomputed from a short tail of the inputs."""
    cp = _xp_of(u)
    l, K = p.block_len, p.hops
    start_abs = position
    end = start_abs + p.N
    tail_abs = max(start_abs, ((end - 1) // l - K) * l)
    ts = tail_abs - start_abs
    if ts == 0:
        at, ut = a, u
        kw = dict(offset=position % l, w0=cp_ascontig(state.w), g0=cp_ascontig(state.g))
    else:
        at = _time_slice(a, ts, p.layout)
        ut = _time_slice(u, ts, p.layout)
        shape = (p.B, p.H, p.D)
        kw = dict(offset=0, w0=cp.zeros(shape, F32), g0=cp.ones(shape, F32))
    nb = -(-(kw["offset"] + p.N - ts) // l)
    v = cp.empty((p.B, p.H, p.D, nb), F32)
    C = cp.empty_like(v)
    _nk().block_carriers(_view(at), _view(ut), v, C, layout=p.layout, block_len=l, **kw)
    return state.advanced(p.N, v, C, cp.zeros_like(v), cp, position)


def swr_backward(a, u, dy, p, *, x0, out=None):
    cp = _xp_of(u)
    nk = _nk()
    a = cp.ascontiguousarray(a)
    u = cp.ascontiguousarray(u)
    dy = cp.ascontiguousarray(dy)  # any of the three float dtypes, read as it is
    da, du, dcarry = (None, None, None) if out is None else out
    du = cp.empty_like(u) if du is None else du
    da = cp.empty_like(a) if da is None else da
    shape = (p.B, p.H, p.D)
    if p.N == 0:
        da[...] = 0
        if dcarry is not None:
            dcarry[...] = 0
        return da, du, (None if x0 is None else cp.zeros(shape, F32) if dcarry is None else dcarry)
    carry = _constant(cp, shape, 0.0) if x0 is None else cp_ascontig(x0)
    av, uv, dyv = _view(a), _view(u), _view(dy)
    kw = dict(layout=p.layout, block_len=p.block_len)
    nb = -(-p.N // p.block_len)
    hops = p.hops
    if p.hops in FUSED_HOPS:  # one pass where it fits: the reverse halo walk
        res = _halo_backward(av, uv, dyv, da, du, p, carry, dcarry, x0)
        if res is not None:
            return res
    if hops is not None and hops >= nb:
        hops = None  # every window reaches x0: the exact recurrence, same numbers
    if hops is None and exact_backward_fits(p, dy.dtype):
        # the exact scan's backward (numba_kernels/exact_scan.py): the forward's per-tile
        # carries, then one reverse pass over a, u, dy
        if dcarry is None and x0 is not None:
            dcarry = cp.empty(shape, F32)
        nk.exact_scan.swr_exact_vjp(av, uv, dyv, _view(du), _view(da), carry,
                                    dcarry if x0 is not None else None, layout=p.layout)
        return da, du, (dcarry if x0 is not None else None)
    if hops in (0, 1):
        if dcarry is None and x0 is not None:
            dcarry = cp.empty(shape, F32)
        nk.swr_backward.swr_backward(
            av, uv, dyv, _view(du), _view(da), hops=hops, carry=carry, dcarry=dcarry, **kw
        )
        return da, du, (dcarry if x0 is not None else None)
    v = cp.empty(shape + (nb,), F32)
    C = cp.empty_like(v)
    q = cp.empty_like(v)
    ones = cp.ones(shape, F32)
    nk.block_carriers(av, uv, v, C, offset=0, w0=cp.zeros(shape, F32), g0=ones, **kw)
    nk.block_grad_sums(av, dyv, q, **kw)
    if hops is None:
        S = _exact_block_carry(v, C, carry)
        dv, dC, dx0 = _exact_block_adjoints(C, q, S, x0 is not None)
    else:
        state = SWRState.initial(
            shape, block_len=p.block_len, hops=hops, x0=carry, xp=cp, dtype=F32
        )
        S = _block_carry(v, C, hops, state, 0)
        dv, dC, dx0 = reference.block_adjoints(
            v, C, q, hops, carry if x0 is not None else None, xp=cp
        )
    c = cp.ascontiguousarray
    nk.swr_backward_blocks(
        av,
        uv,
        dyv,
        _view(du),
        _view(da),
        block_carry=c(S, dtype=F32),
        block_dv=c(dv, dtype=F32),
        block_dC=c(dC, dtype=F32),
        **kw,
    )
    if x0 is None:
        return da, du, None
    if dcarry is None:
        return da, du, c(dx0, dtype=F32)
    dcarry[...] = dx0
    return da, du, dcarry


def _halo_walk():
    """numba_kernels/halo_walk.py, imported on first use (as :func:`_nk`)."""
    from .numba_kernels import halo_walk

    return halo_walk


def _halo_backward(av, uv, dyv, da, du, p, carry, dcarry, x0):
    """hops 2..8 from offset 0 in one launch (numba_kernels/halo_walk.py) where it fits: returns
    ``(da, du, dx0)``, else None (nothing written)."""
    halo_walk = _halo_walk()
    if not halo_walk.fits(av, uv, dyv, _view(du), _view(da), layout=p.layout,
                          block_len=p.block_len, hops=p.hops):
        return None
    if dcarry is None and x0 is not None:
        dcarry = _xp_of(uv).empty((p.B, p.H, p.D), F32)
    halo_walk.halo_backward(av, uv, dyv, _view(du), _view(da), layout=p.layout,
                            block_len=p.block_len, hops=p.hops, carry=carry, dcarry=dcarry)
    return da, du, (dcarry if x0 is not None else None)


def swr_step(a, u, y, state, per_channel, stream=None):
    """One token for every row (checked arrays on one device, a and u C-contiguous, y
    C-contiguous): one launch of numba_kernels.swr_step's kernel, the state updated in place.
    The launch is prepared once per state and dtypes and kept on the state."""
    key = ("swr", _dt(a.dtype), per_channel, _dt(u.dtype), _dt(y.dtype))
    run = state._launch_cache.get(key)
    if run is None:
        from .numba_kernels import swr_step as ks

        run = state._launch_cache[key] = ks.swr_step_launch(
            a, u, y, state.arrays(), state._arrivals(), hops=state.hops,
            block_len=state.block_len,
            per_channel=per_channel)
    run.run(a, u, y, stream=stream)


def _dt(dtype):
    from .phalanx import _np_dtype

    return _np_dtype(dtype)
