"""Packed variable-length sequences (``cu_seqlens``) for the JAX adapter.

The padded evaluation of swr_array/packed.py (which documents it) in ``jax.numpy``: the tokens
move into a block-aligned zero image of static length ``round_up(T + S*block_len, block_len)``
(T from u's shape, S from cu's shape) with a carry slot (``a = 0``, ``u = x0[s]``) before every
sequence, the adapter's dense ``swr`` runs on it once and the real tokens move back. JAX
differentiates the moves, so gradients (dx0 through the carry slots) need nothing more; ``cu``
may be a traced array under ``jax.jit``.

The values of a concrete host ``cu`` are checked; a traced ``cu`` (or one on a GPU) is not read
by the host: one that does not start at 0, decreases or does not end at T makes every output
NaN (a device-side check).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import packed as _packed


def check_cu(cu, B: int, T: int) -> int:
    """Checks of ``cu_seqlens`` that need no host read of a traced or device array; returns S."""
    if not hasattr(cu, "dtype") or not hasattr(cu, "shape"):
        raise TypeError(f"cu_seqlens must be an int32 or int64 array, got {type(cu).__name__}")
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch B == 1 (the sequences are packed along time), "
                         f"got B = {B}")
    if np.dtype(cu.dtype) not in _packed.INT_DTYPES:
        raise TypeError(f"cu_seqlens must have dtype int32 or int64, got {cu.dtype}")
    if len(cu.shape) != 1 or cu.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D [0, n_1, n_1 + n_2, ..., T] with at least one "
                         f"entry, got shape {tuple(cu.shape)}")
    if isinstance(cu, np.ndarray):
        _packed.check_cu_values(cu, T)
    elif not isinstance(cu, jax.core.Tracer):
        if all(d.platform == "cpu" for d in cu.devices()):
            _packed.check_cu_values(np.asarray(cu), T)
    return int(cu.shape[0]) - 1


def _plan(cu, T: int, block_len: int):
    cu = jnp.asarray(cu).astype(jnp.int32 if T + 2 * cu.shape[0] * block_len < 2**31
                                else jnp.int64)
    l = block_len
    S = cu.shape[0] - 1
    Lp = _packed.padded_length(T, S, l)
    n = cu[1:] - cu[:-1]
    m = (n + l) // l * l
    starts = l + jnp.cumsum(m) - m
    t = jnp.arange(T, dtype=cu.dtype)
    ok = (cu[0] == 0) & (cu[-1] == T)
    if S:
        ok = ok & (jnp.min(n) >= 0)
        seq = jnp.clip(jnp.searchsorted(cu[1:], t, side="right"), 0, S - 1)
        pos = starts[seq] + t - cu[seq]
    else:
        pos = jnp.zeros_like(t)
    pos = jnp.where(ok & (pos >= 0) & (pos < Lp), pos, 0)
    starts = jnp.where(ok & (starts >= 1) & (starts <= Lp), starts, l)
    return pos, starts, ok, Lp


def swr_packed(swr, a, u, cu, *, block_len, hops, layout, x0, out_dtype, check_swr):
    """``swr(a, u, ..., cu_seqlens=cu)``; ``swr`` is the adapter's dense function."""
    cfg = check_swr(a, u, None, block_len=block_len, hops=hops, layout=layout,
                    out_dtype=out_dtype)
    if layout == "BLHD":
        B, T, H, D = u.shape
    else:
        B, H, D, T = u.shape
    S = check_cu(cu, B, T)
    if x0 is not None:
        if tuple(x0.shape) != (S, H, D):
            raise ValueError(f"x0 must have shape (S, H, D) = {(S, H, D)} with cu_seqlens (one "
                             f"initial carry per sequence), got {tuple(x0.shape)}")
        if not jnp.issubdtype(x0.dtype, jnp.floating):
            raise TypeError(f"x0 must have a float dtype, got {x0.dtype}")
    pos, starts, ok, Lp = _plan(cu, T, cfg.block_len)
    dt = u.dtype
    if x0 is not None and jnp.dtype(dt).itemsize < 4:
        dt = jnp.float32  # the carry slots hold x0 unrounded
    ta = 1 if layout == "BLHD" else a.ndim - 1
    tu = 1 if layout == "BLHD" else 3

    def image(x, dim):
        shape = list(x.shape)
        shape[dim] = Lp
        idx = (slice(None),) * dim + (pos,)
        return jnp.zeros(shape, dt).at[idx].set(x.astype(dt))

    ap = image(a, ta)
    up = image(u, tu)
    if x0 is not None and S:
        slots = (slice(None),) * tu + (starts - 1,)
        xs = x0.astype(dt)[None] if layout == "BLHD" else jnp.transpose(x0.astype(dt),
                                                                         (1, 2, 0))[None]
        up = up.at[slots].set(xs)
    yp = swr(ap, up, block_len=cfg.block_len, hops=cfg.hops, layout=layout,
             out_dtype=cfg.out_dtype)
    y = jnp.take(yp, pos, axis=tu)
    return jnp.where(ok, y, jnp.asarray(jnp.nan, y.dtype))
