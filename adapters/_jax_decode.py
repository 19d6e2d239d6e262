"""JAX decoding: the state as a pytree and a one-token step, jittable with donated buffers.

JAX stays functional: :func:`swr_step` returns ``(y_t, new_state)``; under ``jax.jit`` with the
state donated (:func:`swr_decode_step`, ``donate_argnums``) XLA writes the new state into the old
state's buffers, so a decode loop allocates nothing per token. :func:`swr_scan` runs steps with
:func:`jax.lax.scan` (a prefill from any state, or a whole decode).

The step is written in ``jnp`` (one fused XLA computation on any platform): the same per-channel
update as ``swr_array.reference.step`` and the CUDA kernel ``numba_kernels/swr_step.py``, with a
per-row position, so rows at different positions step together. The state's arrays are
float32 (``position`` int32); :func:`state_from_front` / :func:`state_to_front` convert to and
from the front's :class:`swr_array.SWRState` (e.g. a prefill on NumPy or CuPy).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swr_array import _checks

__all__ = ["JaxSWRState", "swr_init_state", "swr_step", "swr_decode_step", "swr_scan",
           "state_from_front", "state_to_front", "phalanx_step"]


@jax.tree_util.register_pytree_node_class
class JaxSWRState:
    """The decoding state of ``B`` rows (a pytree; see ``swr_array.SWRState`` for the fields).

    Leaves: ``position`` ``(B,)`` int32, ``w``, ``g`` ``(B, H, D)`` float32, ``carry_v``,
    ``carry_C`` ``(B, H, D, K)`` float32 (K = hops, or 1 for hops=None, newest first; absent
    carriers are 0). Static (pytree metadata): ``block_len``, ``hops``.
    """

    __slots__ = ("position", "w", "g", "carry_v", "carry_C", "block_len", "hops")

    def __init__(self, position, w, g, carry_v, carry_C, *, block_len: int, hops: int | None):
        self.position, self.w, self.g = position, w, g
        self.carry_v, self.carry_C = carry_v, carry_C
        self.block_len, self.hops = block_len, hops

    def tree_flatten(self):
        return (self.position, self.w, self.g, self.carry_v, self.carry_C), (self.block_len,
                                                                              self.hops)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        return cls(*leaves, block_len=aux[0], hops=aux[1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.w.shape)

    def arrays(self) -> tuple:
        return self.position, self.w, self.g, self.carry_v, self.carry_C

    def __repr__(self) -> str:
        return f"JaxSWRState(shape={self.shape}, block_len={self.block_len}, hops={self.hops})"


def _num_carriers(hops):
    return 1 if hops is None else hops


def swr_init_state(shape, *, block_len: int = 16, hops: int | None = 1, x0=None) -> JaxSWRState:
    """The state before every row's first token; ``x0`` ``(B, H, D)`` an initial carry."""
    block_len = _checks.check_block_len(block_len)
    hops = _checks.check_hops(hops)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (B, H, D), got {shape}")
    K = _num_carriers(hops)
    cv = jnp.zeros(shape + (K,), jnp.float32)
    if x0 is not None:
        if tuple(x0.shape) != shape:
            raise ValueError(f"x0 must have shape {shape}, got {tuple(x0.shape)}")
        if K:
            cv = cv.at[..., 0].set(jnp.asarray(x0, jnp.float32))
    return JaxSWRState(jnp.zeros(shape[:1], jnp.int32), jnp.zeros(shape, jnp.float32),
                       jnp.ones(shape, jnp.float32), cv, jnp.zeros(shape + (K,), jnp.float32),
                       block_len=block_len, hops=hops)


def state_from_front(state) -> JaxSWRState:
    """A :class:`JaxSWRState` holding a front ``swr_array.SWRState``'s values (float32)."""
    def host(x):
        return np.asarray(x.get() if hasattr(x, "get") else x)

    return JaxSWRState(jnp.asarray(host(state.position).astype(np.int32)),
                       *(jnp.asarray(host(x).astype(np.float32))
                         for x in (state.w, state.g, state.carry_v, state.carry_C)),
                       block_len=state.block_len, hops=state.hops)


def state_to_front(state: JaxSWRState):
    """A NumPy ``swr_array.SWRState`` (float64) holding this state's values."""
    from swr_array.state import SWRState

    return SWRState(block_len=state.block_len, hops=state.hops,
                    position=np.asarray(state.position).astype(np.int64),
                    **{k: np.asarray(getattr(state, k), np.float64)
                       for k in ("w", "g", "carry_v", "carry_C")})


def _check_step(a_t, u_t, state):
    if not isinstance(state, JaxSWRState):
        raise TypeError(f"state must be a JaxSWRState, got {type(state).__name__}")
    shape = state.shape
    per_head = not _checks.step_shapes(a_t.shape, u_t.shape, shape)
    B = shape[0]
    dtype = _checks.check_float_dtype("u_t", np.dtype(u_t.dtype), "numpy")
    if np.dtype(a_t.dtype) != dtype:
        raise TypeError(f"a_t and u_t must share one dtype, got {a_t.dtype} and {u_t.dtype}")
    for name, x in (("state.w", state.w), ("state.g", state.g)):
        if tuple(x.shape) != shape or x.dtype != jnp.float32:
            raise TypeError(f"{name} must be float32 {shape}")
    K = _num_carriers(state.hops)
    if tuple(state.carry_v.shape) != shape + (K,) or tuple(state.position.shape) != (B,):
        raise ValueError(f"state arrays do not match hops={state.hops} and batch {B}")
    return per_head, dtype


def swr_step(a_t, u_t, state: JaxSWRState, *, layout: str = "BLHD", out_dtype=None):
    """One token for every row: ``(y_t, new_state)``, each row at its own position.

    ``a_t`` ``(B, H)`` or ``(B, H, D)``, ``u_t`` ``(B, H, D)`` (one token of either ``layout``),
    one float dtype; y_t in ``out_dtype`` (default u_t's). Pure: jit it with the state donated
    (:func:`swr_decode_step`) to update the buffers in place.
    """
    _checks.check_layout(layout)
    per_head, dtype = _check_step(a_t, u_t, state)
    odt = _checks.check_out_dtype(out_dtype, dtype, "numpy")
    l, hops = state.block_len, state.hops
    a = a_t.astype(jnp.float32)
    a = a[..., None] if per_head else a
    u = u_t.astype(jnp.float32)
    off = (state.position % l)[:, None, None]
    first = off == 0
    w = jnp.where(first, u, a * state.w + u)
    g = jnp.where(first, a, a * state.g)
    cv, cC = state.carry_v, state.carry_C
    if hops == 0:
        S = jnp.zeros_like(w)
    elif hops is None:
        S = cv[..., 0]
    else:  # S = sum_m (cC_0 ... cC_{m-1}) cv_m
        R = jnp.concatenate([jnp.ones_like(cC[..., :1]), jnp.cumprod(cC[..., :-1], axis=-1)], -1)
        S = jnp.sum(R * cv, axis=-1)
    s = w + g * S
    close = off == l - 1  # the token closes its block: it becomes the newest carrier
    if hops is None:
        cv = jnp.where(close[..., None], s[..., None], cv)
    elif hops:
        cv = jnp.where(close[..., None], jnp.concatenate([w[..., None], cv[..., :-1]], -1), cv)
        cC = jnp.where(close[..., None], jnp.concatenate([g[..., None], cC[..., :-1]], -1), cC)
    new = JaxSWRState(state.position + 1, jnp.where(close, 0.0, w), jnp.where(close, 1.0, g),
                      cv, cC, block_len=l, hops=hops)
    return s.astype(odt), new


@functools.partial(jax.jit, donate_argnums=(2,), static_argnames=("layout", "out_dtype"))
def swr_decode_step(a_t, u_t, state: JaxSWRState, *, layout: str = "BLHD", out_dtype=None):
    """:func:`swr_step` jitted with the state donated: the new state reuses its buffers (the
    state passed in is consumed: use the returned one)."""
    return swr_step(a_t, u_t, state, layout=layout, out_dtype=out_dtype)


def swr_scan(a, u, state: JaxSWRState, *, layout: str = "BLHD", out_dtype=None):
    """Steps over a sequence with :func:`jax.lax.scan`: ``(y, state)`` with y of u's shape.

    ``a``, ``u`` in ``layout`` (``"BLHD"``: ``(B, L, H)``/``(B, L, H, D)``, ``(B, L, H, D)``;
    ``"BHDL"``: ``(B, H, L)``/``(B, H, D, L)``, ``(B, H, D, L)``); each row continues from its
    own position, so from :func:`swr_init_state` this equals ``swr`` on the whole sequence.
    """
    layout = _checks.check_layout(layout)
    t_axis = 1 if layout == "BLHD" else u.ndim - 1
    a_axis = 1 if layout == "BLHD" else a.ndim - 1
    xs = (jnp.moveaxis(a, a_axis, 0), jnp.moveaxis(u, t_axis, 0))

    def body(st, x):
        y, st = swr_step(x[0], x[1], st, layout=layout, out_dtype=out_dtype)
        return st, y

    state, ys = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(ys, 0, t_axis), state


def phalanx_step(params: Any, x_t, state: JaxSWRState):
    """One Phalanx decoding step in jnp: ``(out_t, new_state)`` for ``x_t`` ``(B, dim)`` and a
    :class:`~swr_array.adapters.jax.PhalanxParams` (GEMMs, gates and read-out as the adapter's
    composite forward, the recurrence through :func:`swr_step`). Jit it with the state donated
    to decode in place."""
    H, D, KV = params.heads, params.head_dim, params.kv_heads
    B = x_t.shape[0]
    if state.shape != (B, H, D):
        raise ValueError(f"state is for {state.shape}, not {(B, H, D)}")
    hd, kd = H * D, KV * D
    cd = x_t.dtype
    gd = jnp.promote_types(cd, jnp.float32)
    z = (x_t @ params.W_in.astype(cd)).astype(gd)
    zv, zb, zc, za = jnp.split(z, [hd, hd + kd, hd + 2 * kd], axis=-1)
    A = params.decay_max * jax.nn.sigmoid(za + params.b_a.astype(gd))
    Bg = jax.nn.sigmoid(zb + params.b_b.astype(gd)).reshape(B, KV, D)
    Cg = (zc + params.b_c.astype(gd)).reshape(B, KV, D)
    if H // KV > 1:
        Bg = jnp.repeat(Bg, H // KV, axis=1)
        Cg = jnp.repeat(Cg, H // KV, axis=1)
    V = zv.reshape(B, H, D)
    y, state = swr_step(A.astype(cd), (Bg * V).astype(cd), state, layout="BLHD")
    Y = (y.astype(gd) * Cg + V).astype(cd).reshape(B, hd)
    return Y @ params.W_out.astype(cd), state
