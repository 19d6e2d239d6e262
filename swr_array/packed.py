"""Packed variable-length sequences (``cu_seqlens``): checks, the native and the padded evaluation.

Native (the GPU path, both layouts, hops 0 and 1, :func:`native_forward_fits` /
:func:`native_backward_fits`): the kernels of numba_kernels/packed_walk.py walk each sequence's
blocks in the packed array itself, one launch for all sequences after a one-block check of
``cu`` (no padded image, no token moves, no host read of ``cu``; an invalid ``cu`` gives NaN in
every output). BHDL first marks each token's sequence and block start (:func:`_marks`, one
small launch) for the warp-scan kernels of numba_kernels/packed_scan.py and packed_scan_bwd.py,
where they fit. Sequences exchange no values, non-finite ones included. Repeated CuPy calls of
one signature skip the checks (:func:`plan_key`, as plain calls do). ``return_state`` keeps its
per-sequence host loop (below). Everything else takes the padded evaluation.

A packed batch has B == 1 and ``T`` tokens of ``S`` sequences back to back, sequence s holding
tokens ``cu[s]:cu[s+1]``. Each sequence is its own recurrence (docs/spec.md, packed sequences):
blocks aligned at its first token, no carry from the sequence before, initial carry ``x0[s]``.

Evaluation: the tokens are moved into a padded image of static length
``Lp = round_up(T + S * block_len, block_len)`` in which sequence s starts at the block boundary
``P_s`` (``P_0 = block_len``, ``P_{s+1} = round_up(P_s + n_s + 1, block_len)``), and the token
just before it, ``P_s - 1`` (the last of the block before), is a carry slot with ``a = 0`` and
``u = x0[s]`` (or 0). Every other padding token has ``a = u = 0``. The block before sequence s
then has carrier ``v = x0[s]`` and compound attenuation ``C = 0``: exactly the dense call's
``v_{-1} = x0`` with no term for earlier blocks, for every ``hops`` (0, k and None). The dense
kernels run once on the image and the real tokens are moved back. The gradient is the dense
gradient of the image: ``dy`` moved in (zeros elsewhere), ``da``/``du`` moved back, and
``dx0[s]`` is ``du`` at the carry slot of s. The carry slots hold u's dtype, so when ``x0`` is
given with a 16-bit dtype the image is float32 (x0 is not rounded).

Finite inputs are isolated exactly (the carry slot's ``a = 0`` multiplies what came before).
A non-finite value (inf/NaN) of one sequence can reach the start of the next through
``0 * inf = NaN`` there: when it lies in the block holding the next carry slot, or (hops >= 2,
hops=None) in a carrier the window of the next sequence's first block multiplies by that 0.
Separate calls would keep it inside its own sequence.

The positions are computed from ``cu`` with array operations on its own device (no host copy);
``Lp`` depends only on T, S and block_len. On the NumPy backend the values of ``cu`` are
checked; on the GPU they are not read by the host: a ``cu`` that does not start at 0, decreases
or does not end at T makes every output NaN (a device-side check poisons the positions).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from ._backend import array_backend, get_xp

INT_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def check_cu_seqlens(cu, p, name: str = "cu_seqlens") -> int:
    """Check ``cu_seqlens`` against the checked problem ``p``; return the number of sequences S.

    Needs B == 1. Dtype int32/int64, 1-D, at least one entry, same backend (and device) as u.
    NumPy: values start at 0, never decrease and end at T (checked here). CuPy: values are
    not read by the host (see the module docstring).
    """
    if p.B != 1:
        raise ValueError(f"{name} needs batch B == 1 (the sequences are packed along time), "
                         f"got B = {p.B}")
    if cu is None or not hasattr(cu, "dtype") or not hasattr(cu, "shape"):
        raise TypeError(f"{name} must be an int32 or int64 array, got {type(cu).__name__}")
    backend = array_backend(cu, name=name)
    if backend != p.backend:
        raise TypeError(f"{name} is a {backend} array but the inputs are {p.backend} arrays")
    if backend == "cupy" and cu.device.id != p.device:
        raise ValueError(f"{name} is on device {cu.device.id}, the inputs on device {p.device}")
    if np.dtype(cu.dtype) not in INT_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D [0, n_1, n_1 + n_2, ..., T] with at least one "
                         f"entry, got shape {tuple(cu.shape)}")
    if backend == "numpy":
        check_cu_values(cu, p.N, name)
    return int(cu.shape[0]) - 1


def check_cu_values(cu, T: int, name: str = "cu_seqlens") -> None:
    """Values of a host ``cu``: starts at 0, non-decreasing, ends at T."""
    c = np.asarray(cu)
    if int(c[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(c[0])}")
    d = np.diff(c)
    if d.size and int(d.min()) < 0:
        i = int(np.argmax(d < 0))
        raise ValueError(f"{name} must be non-decreasing, got {int(c[i])} then {int(c[i + 1])}")
    if int(c[-1]) != T:
        raise ValueError(f"{name} must end at the number of tokens T = {T}, got {int(c[-1])}")


def check_packed_x0(x0, p, S: int, name: str = "x0"):
    """x0 of a packed call: ``(S, H, D)``, float, same backend and device."""
    if x0 is None:
        return None
    from . import _checks

    _checks.same_backend([(name, x0)], p.backend, p.device)
    if tuple(x0.shape) != (S, p.H, p.D):
        raise ValueError(f"{name} must have shape (S, H, D) = {(S, p.H, p.D)} with cu_seqlens "
                         f"(one initial carry per sequence), got {tuple(x0.shape)}")
    _checks.check_float_dtype(name, x0.dtype, p.backend)
    return x0


def padded_length(T: int, S: int, block_len: int) -> int:
    """Length of the padded image: ``round_up(T + S * block_len, block_len)`` (0 when S == 0)."""
    n = T + S * block_len
    return -(-n // block_len) * block_len


def plan(cu, T: int, block_len: int, xp):
    """``(pos, starts)``: padded position of every token ``(T,)`` and of every sequence's first
    token ``(S,)``, int64 on cu's device, from array operations only. A ``cu`` whose values are
    invalid gives ``pos = -1`` everywhere and ``starts = block_len`` (see the module)."""
    cu = cu.astype(np.int64)
    l = block_len
    n = cu[1:] - cu[:-1]
    m = (n + l) // l * l  # round_up(n + 1, l)
    starts = l + xp.cumsum(m) - m
    t = xp.arange(T, dtype=np.int64)
    seq = xp.searchsorted(cu[1:], t, side="right")
    seq = xp.minimum(seq, max(cu.shape[0] - 2, 0))
    S = cu.shape[0] - 1
    if S == 0:
        return xp.full((T,), -1, np.int64), starts
    pos = starts[seq] + t - cu[seq]
    ok = (cu[0] == 0) & (cu[-1] == T) & (n.min() >= 0)
    pos = xp.where(ok, pos, -1)
    starts = xp.where(ok, starts, l)
    return pos, starts


# ----------------------------------------------------------------------------------------------
# moving tokens: NumPy indexing on the reference backend, the packing kernels on the GPU
# ----------------------------------------------------------------------------------------------


def _grid(p, per_head: bool, n: int):
    """(R, n, C) of a time axis of length n in p's layout."""
    ch = p.H if per_head else p.H * p.D
    return (1, n, ch) if p.layout == "BLHD" else (ch, n, 1)


def _image_shape(p, per_head: bool, n: int):
    if p.layout == "BLHD":
        return (1, n, p.H) if per_head else (1, n, p.H, p.D)
    return (1, p.H, n) if per_head else (1, p.H, p.D, n)


def _scatter(src, pos, p, per_head, Lp, dtype, device: bool):
    """The zero padded image ``(.., Lp, ..)`` of ``dtype`` holding src's tokens at ``pos``."""
    xp = _xp(src, device)
    R, T, C = _grid(p, per_head, p.N)
    dst = xp.zeros(_image_shape(p, per_head, Lp), dtype=dtype)
    src = xp.ascontiguousarray(src, dtype=dtype)
    if device:
        from . import numba_kernels

        numba_kernels.packing.scatter_tokens(src, dst, pos, R, T, Lp, C)
    else:
        dst.reshape(R, Lp, C)[:, pos, :] = src.reshape(R, T, C)
    return dst


def _gather(img, pos, p, per_head, dtype, device: bool, out=None):
    """The tokens of the padded image at ``pos``, in the packed shape (into ``out`` if given)."""
    xp = _xp(img, device)
    R, T, C = _grid(p, per_head, p.N)
    Lp = img.shape[-1] if p.layout == "BHDL" else img.shape[1]
    img = xp.ascontiguousarray(img, dtype=dtype)
    if out is None:
        out = xp.empty(_image_shape(p, per_head, p.N), dtype=dtype)
    if device:
        from . import numba_kernels

        fill = xp.full((1,), np.nan, dtype=dtype)
        numba_kernels.packing.gather_tokens(img, out, pos, R, T, Lp, C, fill)
    else:
        out.reshape(R, T, C)[...] = img.reshape(R, Lp, C)[:, pos, :]
    return out


def _xp(x, device):
    if device:
        from ._cuda import _xp_of

        return _xp_of(x)
    return np


def _carry_slots(img, starts, p):
    """View-index of the carry slots ``P_s - 1``: (S, H, D) values of a (.., Lp, H, D) image."""
    if p.layout == "BLHD":
        return img[0, starts - 1]
    return img[0][..., starts - 1].transpose(2, 0, 1)


def _set_carry_slots(img, starts, x0, p):
    xp = get_xp(array_backend(img, name="u")) if not isinstance(img, np.ndarray) else np
    x0 = xp.asarray(x0).astype(img.dtype)
    if p.layout == "BLHD":
        img[0, starts - 1] = x0
    else:
        img[0][..., starts - 1] = x0.transpose(1, 2, 0)


def _image_dtype(p, x0, device):
    if x0 is None:
        return p.dtype
    if not device:
        return np.dtype(np.float64)
    return np.dtype(np.float32) if np.dtype(p.dtype).itemsize < 4 else p.dtype


# ----------------------------------------------------------------------------------------------
# forward and gradient
# ----------------------------------------------------------------------------------------------


class _Image(NamedTuple):
    S: int
    Lp: int
    pos: Any
    starts: Any
    dtype: Any
    a: Any
    u: Any


def _padded_inputs(a, u, p, cu, x0, device: bool) -> _Image:
    """The padded problem of a packed call: token positions, a and u moved into their padded
    rows, x0 in the carry slots."""
    S = cu.shape[0] - 1
    Lp = padded_length(p.N, S, p.block_len)
    pos, starts = plan(cu, p.N, p.block_len, _xp(u, device))
    dt = _image_dtype(p, x0, device)
    ap = _scatter(a, pos, p, p.per_head, Lp, dt, device)
    up = _scatter(u, pos, p, False, Lp, dt, device)
    if x0 is not None and S:
        _set_carry_slots(up, starts, x0, p)
    return _Image(S, Lp, pos, starts, dt, ap, up)


def forward(a, u, p, cu, *, x0, out=None, device: bool | None = None):
    """y of a checked packed call (``check_cu_seqlens``/``check_packed_x0`` done).

    ``device``: run the padded problem through the GPU path (``_cuda`` and the packing
    kernels); default: for CuPy inputs. Under the CUDA simulator the GPU path takes NumPy
    arrays (tests).
    """
    device = p.backend == "cupy" if device is None else device
    if device and native_forward_fits(p, cu):
        return _native_forward(a, u, p, cu, x0, out)
    img = _padded_inputs(a, u, p, cu, x0, device)
    pos, ap, up = img.pos, img.a, img.u
    pp = dataclasses.replace(p, N=img.Lp, dtype=img.dtype)
    if device:
        from . import _cuda

        yp = _cuda.swr_forward(ap, up, pp, x0=None, state=None, return_state=False)
    else:
        from .ops import _swr_numpy

        yp = _swr_numpy(ap, up, pp, x0=None, state=None, return_state=False)
    return _gather(yp, pos, p, False, p.out_dtype, device, out=out)


def backward(a, u, dy, p, cu, *, x0, device: bool | None = None):
    """``(da, du, dx0)`` of a checked packed call; dx0 ``(S, H, D)`` float32 on the GPU path
    (float64 on NumPy), None without x0."""
    device = p.backend == "cupy" if device is None else device
    if device and native_backward_fits(p, cu, a, u, dy):
        return _native_backward(a, u, dy, p, cu, x0)
    xp = _xp(u, device)
    img = _padded_inputs(a, u, p, cu, x0, device)
    S, Lp, pos, starts, dt, ap, up = img.S, img.Lp, img.pos, img.starts, img.dtype, img.a, img.u
    dyp = _scatter(dy, pos, p, False, Lp, dy.dtype if x0 is None else dt, device)
    pp = dataclasses.replace(p, N=Lp, dtype=dt, out_dtype=dt)
    if device:
        from . import _cuda

        dap, dup, _ = _cuda.swr_backward(ap, up, dyp, pp, x0=None)
    else:
        dap, dup, _ = _dense_vjp_numpy(ap, up, dyp, pp)
    da = _gather(dap, pos, p, p.per_head, a.dtype, device)
    du = _gather(dup, pos, p, False, u.dtype, device)
    dx0 = None
    if x0 is not None:
        f = np.float32 if device else np.float64
        if S:
            dx0 = xp.ascontiguousarray(_carry_slots(dup, starts, p), dtype=f)
        else:
            dx0 = xp.zeros((0, p.H, p.D), f)
    return da, du, dx0


# ----------------------------------------------------------------------------------------------
# the native path: kernels that walk each sequence's blocks in the packed array itself
# ----------------------------------------------------------------------------------------------


def native_forward_fits(p, cu) -> bool:
    """The native forward (numba_kernels/packed_walk.py) runs for both layouts, hops 0 and 1,
    at least one token and one sequence; everything else takes the padded image."""
    return p.layout in ("BLHD", "BHDL") and p.hops in (0, 1) and p.N >= 1 \
        and cu.shape[0] >= 2 and p.H * p.D >= 1


def native_backward_fits(p, cu, a, u, dy) -> bool:
    """As :func:`native_forward_fits`, with a channel vector the arrays' alignment allows whose
    lanes, per head, split D into a power of two up to 32 (``packed_walk.backward_plan``)."""
    if not native_forward_fits(p, cu):
        return False
    from .numba_kernels import packed_walk

    return packed_walk.backward_plan(a, u, dy, p.block_len, p.layout) is not None


def plan_key(base, cu, x0):
    """The plan-cache key of a packed CuPy call: the plain call's key ``base`` (None: not
    cacheable) with cu's and x0's type, shape, dtype, device and contiguity."""
    if base is None or not type(cu).__module__.startswith("cupy"):
        return None
    try:
        xk = None if x0 is None else (type(x0), x0.shape, x0.dtype, x0.data.device_id,
                                      x0.flags.c_contiguous)
        return ("packed", base, type(cu), cu.shape, cu.dtype, cu.data.device_id,
                cu.flags.c_contiguous, xk)
    except AttributeError:
        return None


def plannable(p, a, u, cu, x0, dy=None) -> bool:
    """Whether a checked packed call may be repeated from its plan (:func:`forward_planned`,
    :func:`backward_planned`): CuPy, the native kernels (forward and, with ``dy``, backward),
    C-contiguous arrays and a float32 x0 (or none)."""
    if p.backend != "cupy" or not native_forward_fits(p, cu):
        return False
    if dy is not None and not native_backward_fits(p, cu, a, u, dy):
        return False
    arrays = (a, u, cu) + (() if dy is None else (dy,)) + (() if x0 is None else (x0,))
    if x0 is not None and np.dtype(x0.dtype) != np.float32:
        return False
    return all(x.flags.c_contiguous for x in arrays)


def _on_device(fn, p, *args):
    from ._cuda import _xp_of

    cp = _xp_of(args[1])
    if cp.cuda.runtime.getDevice() != p.device:
        with cp.cuda.Device(p.device):
            return fn(*args)
    return fn(*args)


def forward_planned(a, u, p, cu, x0, out):
    """y of a packed call whose checks passed before for the same signature (the plan ``p``)."""
    return _on_device(_native_forward, p, a, u, p, cu, x0, out)


def backward_planned(a, u, dy, p, cu, x0):
    """``(da, du, dx0)`` of a packed call whose checks passed before (the plan ``p``)."""
    return _on_device(_native_backward, p, a, u, dy, p, cu, x0)


_dummies: dict = {}


def _native_scratch(xp, cu):
    """(ok flag (1,) int32, a float32 (1,) dummy) on cu's device."""
    if xp is np:
        return np.empty(1, np.int32), np.zeros(1, np.float32)
    dev = cu.device.id
    dummy = _dummies.get(dev)
    if dummy is None:
        dummy = _dummies[dev] = xp.zeros(1, np.float32)
    return xp.empty(1, np.int32), dummy


def _marks(xp, cu, p, direction="fwd"):
    """The token marks of the BHDL warp-scan kernels of ``direction`` (int32, one a token; after
    the ``cu`` check on the same stream), or None where they do not run."""
    from .numba_kernels import packed_walk

    if not packed_walk.wants_marks(p.layout, direction):
        return None
    marks = xp.empty(p.N, np.int32)
    packed_walk.mark_tokens(cu, p.N, p.block_len, marks)
    return marks


def _native_forward(a, u, p, cu, x0, out):
    from .numba_kernels import packed_walk

    xp = _xp(u, True)
    a = xp.ascontiguousarray(a)
    u = xp.ascontiguousarray(u)
    y = xp.empty(u.shape, dtype=p.out_dtype) if out is None else out
    ok, dummy = _native_scratch(xp, cu)
    x0f = None
    if x0 is not None and p.hops == 1:
        x0f = xp.ascontiguousarray(x0, dtype=np.float32)
    packed_walk.check_cu(cu, p.N, ok)
    marks = _marks(xp, cu, p)
    packed_walk.forward(a, u, y, x0f, cu, ok, dummy, hops=p.hops, block_len=p.block_len,
                        layout=p.layout, marks=marks)
    return y


def _native_backward(a, u, dy, p, cu, x0):
    from .numba_kernels import packed_walk

    xp = _xp(u, True)
    a = xp.ascontiguousarray(a)
    u = xp.ascontiguousarray(u)
    dy = xp.ascontiguousarray(dy)
    da = xp.empty(a.shape, dtype=a.dtype)
    du = xp.empty(u.shape, dtype=u.dtype)
    ok, dummy = _native_scratch(xp, cu)
    S = cu.shape[0] - 1
    dx0 = x0f = None
    if x0 is not None:
        dx0 = xp.zeros((S, p.H, p.D), np.float32)
        if p.hops == 1:
            x0f = xp.ascontiguousarray(x0, dtype=np.float32)
    packed_walk.check_cu(cu, p.N, ok)
    marks = _marks(xp, cu, p, "bwd")
    packed_walk.backward(a, u, dy, da, du, x0f, dx0, cu, ok, dummy, hops=p.hops,
                         block_len=p.block_len, layout=p.layout, marks=marks)
    return da, du, dx0


def _dense_vjp_numpy(a, u, dy, p):
    from . import reference
    from .ops import from_time_last, to_time_last

    at = to_time_last(a, p.layout, p.per_head)
    ut = to_time_last(u, p.layout, False)
    dyt = to_time_last(dy, p.layout, False)
    da, du, _ = reference.swr_vjp(at, ut, dyt, block_len=p.block_len, hops=p.hops)
    if p.per_head:
        da = da.sum(axis=2, keepdims=True)
    da = np.ascontiguousarray(from_time_last(da, p.layout, p.per_head))
    du = np.ascontiguousarray(from_time_last(du, p.layout))
    return da, du, None


def packed_state(states, xp):
    """Stack per-sequence end states (each of batch 1) into one state of batch S: row s is
    sequence s at its own position (rows of different lengths decode together)."""
    from .state import SWRState

    s0 = states[0]
    cat = xp.concatenate
    return SWRState(
        position=cat([s.position for s in states]),
        block_len=s0.block_len,
        hops=s0.hops,
        w=cat([s.w for s in states]),
        g=cat([s.g for s in states]),
        carry_v=cat([s.carry_v for s in states]),
        carry_C=cat([s.carry_C for s in states]),
    )


# ----------------------------------------------------------------------------------------------
# the front's entry points (called from ops.swr / ops.swr_vjp after their own checks)
# ----------------------------------------------------------------------------------------------


def swr(a, u, p, cu, *, x0, state, return_state, out):
    """``ops.swr(..., cu_seqlens=cu)`` for a problem ``p`` checked by ``_checks.check_swr``."""
    S = check_cu_seqlens(cu, p)
    check_packed_x0(x0, p, S)
    if state is not None:
        raise ValueError("state cannot be combined with cu_seqlens: give each sequence its "
                         "initial carry with x0 of shape (S, H, D)")
    if return_state:
        return _swr_with_states(a, u, p, cu, S, x0=x0, out=out)
    if p.backend == "cupy":
        import cupy

        with cupy.cuda.Device(p.device):
            return forward(a, u, p, cu, x0=x0, out=out)
    return forward(a, u, p, cu, x0=x0, out=out)


def _swr_with_states(a, u, p, cu, S, *, x0, out):
    """return_state: the per-sequence end states, from one call per sequence (host loop).

    Reads cu on the host (a device sync on CuPy); the packed output itself still comes from
    the single padded evaluation.
    """
    from . import ops

    if S == 0:
        raise ValueError("return_state with cu_seqlens needs at least one sequence")
    y = swr(a, u, p, cu, x0=x0, state=None, return_state=False, out=out)
    cuh = [int(c) for c in (cu.get() if p.backend == "cupy" else np.asarray(cu))]
    xp = get_xp(p.backend)
    states = []
    for s in range(S):
        lo, hi = cuh[s], cuh[s + 1]
        sl = (slice(None), slice(lo, hi)) if p.layout == "BLHD" else (Ellipsis, slice(lo, hi))
        _, st = ops.swr(a[sl], u[sl], block_len=p.block_len, hops=p.hops, layout=p.layout,
                        x0=None if x0 is None else x0[s:s + 1], return_state=True)
        states.append(st)
    return y, packed_state(states, xp)


def swr_vjp(a, u, dy, p, cu, *, x0, out):
    """``ops.swr_vjp(..., cu_seqlens=cu)`` after ops' own checks of a, u, dy."""
    from . import _checks

    S = check_cu_seqlens(cu, p)
    check_packed_x0(x0, p, S)
    _checks.check_vjp_out(out, a, u, x0, p, S)
    if p.backend == "cupy":
        import cupy

        with cupy.cuda.Device(p.device):
            res = backward(a, u, dy, p, cu, x0=x0)
    else:
        res = backward(a, u, dy, p, cu, x0=x0)
    if out is None:
        return res
    xp = get_xp(p.backend)
    done = []
    for dst, src in zip(out, res):
        if dst is not None and src is not None:
            xp.copyto(dst, src)
        done.append(src if dst is None else dst)
    return tuple(done)
