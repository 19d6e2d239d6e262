"""Context parallelism for the JAX adapter: ``swr(..., cp_axis=name)`` and
``phalanx(..., cp_axis=name)`` inside :func:`jax.shard_map`, the sequence axis sharded over the
mesh axis ``name`` (every device holds ``L / size`` consecutive tokens, in axis-index order).

The math is :mod:`swr_array.context_parallel`. Under ``shard_map`` every shard has the same static
length n, so shard q starts at ``q n``; its in-block offset differs from shard to shard, so the
per-shard computation is traced once per axis index (static offsets in each branch) and picked by
:func:`jax.lax.switch` on ``axis_index``. One ``all_gather`` over ``name`` moves the summaries
(``2 (k + 1)`` channel maps for ``hops = k``, ``(prod a, X)`` for ``hops = None``); its transpose
under ``jax.grad`` is the reduce-scatter that returns every shard the gradient of its summary.

x0 is replicated (``in_specs=P()``): every device reads its own copy, and shard_map's transpose
sums the per-device shares of its gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from swr_array import context_parallel as _cp


def _vma(x) -> frozenset:
    try:
        return frozenset(jax.typeof(x).mat.varying)
    except AttributeError:  # not traced inside shard_map, or a JAX without manual-axis types
        return frozenset()


def vary_like(y, *inputs):
    """``y`` typed as varying over every manual mesh axis an input varies over: a host
    callback's result inside :func:`jax.shard_map` is typed invariant whatever its inputs; the
    value is unchanged."""
    axes = frozenset().union(*(_vma(x) for x in inputs if x is not None)) - _vma(y)
    return jax.lax.pcast(y, tuple(sorted(axes)), to="varying") if axes else y


def match_cotangents(grads, primals, inputs):
    """The cotangents of a host callback's VJP typed like their primals: summed over the axes
    the callback's ``inputs`` vary over but the primal does not (a replicated x0 used by every
    shard), and marked varying where the primal varies."""
    out = []
    for g, x in zip(grads, primals):
        if g is not None and x is not None:
            g = vary_like(g, *inputs)
            extra = _vma(g) - _vma(x)
            if extra:
                g = jax.lax.psum(g, tuple(sorted(extra)))
            g = vary_like(g, x)
        out.append(g)
    return tuple(out)


def _to_canon(x, layout, per_head, is_a):
    if layout == "BLHD":
        if is_a and per_head:
            return jnp.transpose(x, (0, 2, 1))[:, :, None, :]
        return jnp.transpose(x, (0, 2, 3, 1))
    return x[:, :, None, :] if (is_a and per_head) else x


def _from_canon(x, layout, per_head, is_a):
    if is_a and per_head:
        x = x[:, :, 0, :]
        return jnp.transpose(x, (0, 2, 1)) if layout == "BLHD" else x
    return jnp.transpose(x, (0, 3, 1, 2)) if layout == "BLHD" else x


def _exact_local(swr, at, ut, cfg):
    a = _from_canon(at, cfg["layout"], cfg["per_head"], True)
    u = _from_canon(ut, cfg["layout"], False, False)
    y = swr(a, u, block_len=cfg["block_len"], hops=None, layout=cfg["layout"])
    return _to_canon(y, cfg["layout"], False, False)


def _summary(swr, cfg, q, at, ut):
    """Shard q's flat summary (static offsets) and, for hops=None, its local exact recurrence."""
    l, k, n = cfg["block_len"], cfg["hops"], ut.shape[-1]
    p = q * n
    lead_u, lead_a = ut.shape[:-1], at.shape[:-1]
    if k is None:
        local = _exact_local(swr, at, ut, cfg)
        P = jnp.prod(at, axis=-1)
        return jnp.concatenate([local[..., -1].reshape(-1), P.reshape(-1)]), local
    start, blocks = _cp.summary_blocks(p, n, l, k)
    nb = len(blocks)
    s, o = start - p, start % l
    back = nb * l - o - (n - s)
    pad = [(0, 0)] * (len(lead_a)) + [(o, back)]
    ta = jnp.pad(at[..., s:], pad, constant_values=1.0).reshape(lead_a + (nb, l))
    pad = [(0, 0)] * (len(lead_u)) + [(o, back)]
    tu = jnp.pad(ut[..., s:], pad).reshape(lead_u + (nb, l))
    nxt = jnp.concatenate([ta[..., 1:], jnp.ones_like(ta[..., :1])], axis=-1)
    R = jnp.flip(jnp.cumprod(jnp.flip(nxt, -1), axis=-1), -1)
    v = jnp.concatenate([(R * tu).sum(-1), jnp.zeros(lead_u + (k + 1 - nb,), ut.dtype)], -1)
    C = jnp.concatenate([jnp.prod(ta, -1), jnp.ones(lead_a + (k + 1 - nb,), at.dtype)], -1)
    return jnp.concatenate([v.reshape(-1), C.reshape(-1)]), jnp.zeros((0,), ut.dtype)


def _output(swr, cfg, q, at, ut, x0, gathered, local):
    """Shard q's output (canonical) from the gathered summaries (static offsets)."""
    l, k, n = cfg["block_len"], cfg["hops"], ut.shape[-1]
    lead_u, lead_a = ut.shape[:-1], at.shape[:-1]
    nu = 1
    for d in lead_u:
        nu *= d
    if k is None:
        x_in = x0 if x0 is not None else jnp.zeros(lead_u, ut.dtype)
        for j in range(q):
            x_in = gathered[j, nu:].reshape(lead_a) * x_in + gathered[j, :nu].reshape(lead_u)
        return local + jnp.cumprod(at, axis=-1) * x_in[..., None]
    lengths = [n] * cfg["size"]
    pieces, carrier_blocks, first, o = _cp.incoming_plan(lengths, q, l, k)

    def piece(j, slot):
        g = gathered[j]
        return (g[: nu * (k + 1)].reshape(lead_u + (k + 1,))[..., slot],
                g[nu * (k + 1):].reshape(lead_a + (k + 1,))[..., slot])

    composed = {}
    for j, src in pieces.items():
        m = None
        for src_q, slot in src:
            m = piece(src_q, slot) if m is None else _cp.compose(m, piece(src_q, slot))
        composed[j] = m
    virtual = k * l
    pa = jnp.ones(lead_a + (virtual + o,), at.dtype)
    pu = jnp.zeros(lead_u + (virtual + o,), ut.dtype)
    for i, j in enumerate(carrier_blocks):  # carrier i (newest first) is virtual block k - 1 - i
        end = (k - i) * l - 1
        if j >= 0 and composed[j] is not None:
            pu = pu.at[..., end].set(composed[j][0])
            pa = pa.at[..., end].set(composed[j][1])
        elif j == -1 and x0 is not None:
            pu = pu.at[..., end].set(x0)
            pa = pa.at[..., end].set(0.0)
    if o and composed[first] is not None:
        pu = pu.at[..., virtual + o - 1].set(composed[first][0])
        pa = pa.at[..., virtual + o - 1].set(composed[first][1])
    a = _from_canon(jnp.concatenate([pa, at], -1), cfg["layout"], cfg["per_head"], True)
    u = _from_canon(jnp.concatenate([pu, ut], -1), cfg["layout"], False, False)
    y = swr(a, u, block_len=l, hops=k, layout=cfg["layout"])
    return _to_canon(y, cfg["layout"], False, False)[..., virtual + o:]


def swr(swr_fn, a, u, x0, *, block_len, hops, layout, per_head, out_dtype, axis):
    """The context-parallel SWR of this device's shard (inside shard_map; arguments checked by
    the caller). ``swr_fn`` is the adapter's single-device :func:`swr`."""
    try:
        size = jax.lax.axis_size(axis)
    except NameError as exc:
        raise ValueError(f"cp_axis {axis!r} is not a mapped axis here (call inside shard_map)"
                         ) from exc
    wd = jnp.promote_types(u.dtype, jnp.float32)
    cfg = dict(block_len=block_len, hops=hops, layout=layout, per_head=per_head, size=int(size))
    at = _to_canon(a.astype(wd), layout, per_head, True)
    ut = _to_canon(u.astype(wd), layout, False, False)
    x0w = None if x0 is None else x0.astype(wd)
    r = jax.lax.axis_index(axis)
    summaries = [functools.partial(_summary, swr_fn, cfg, q) for q in range(size)]
    summary, local = jax.lax.switch(r, summaries, at, ut)
    # the replicated operands turn varying here, outside the branches: the transposes of these
    # casts (sums over the axis) must run on every device, not inside one branch
    gathered = vary_like(jax.lax.all_gather(summary, axis), ut)
    x0w = None if x0w is None else vary_like(x0w, ut)
    outputs = [functools.partial(_output, swr_fn, cfg, q) for q in range(size)]
    y = jax.lax.switch(r, outputs, at, ut, x0w, gathered, local)
    return _from_canon(y, layout, False, False).astype(out_dtype)
