"""Context parallelism: one sequence split along time over ranks, the math shared by the adapters.

Rank r holds the contiguous shard of tokens ``[p_r, p_r + n_r)`` (ranks in order, any lengths,
``p_r = n_0 + ... + n_{r-1}``). Blocks stay aligned to token 0 of the whole sequence: block j is
``[j l, (j + 1) l)`` whichever ranks hold its tokens. A shard's output is the SWR continued from
the state at its start (docs/spec.md, the state of a continued call), and that state depends on
earlier shards only through small summaries:

- ``hops = k`` (k >= 0): the affine maps ``x -> C x + v`` of the k blocks before the shard's
  first block (its carriers, newest first; x0 is the carrier of block -1 with C = 0, blocks
  before it are ``(0, 0)``) and the map ``(w, g)`` of the part of that first block before ``p_r``.
  Every rank publishes the partial maps of the last ``min(k + 1, touched)`` blocks it touches
  (:func:`summary_blocks`); a block split over several ranks is the composition of their pieces
  in rank order (:func:`compose`). One all-gather of ``(k + 1)`` maps per rank.
- ``hops = None`` (the exact recurrence): the state at ``p_r`` is the exact ``x_{p_r - 1}``. Each
  rank publishes ``(prod a, X)`` over its shard (X: the exact recurrence from 0 at its last
  token); the incoming state is the prefix ``x_in = X_{r-1} + P_{r-1} (X_{r-2} + ...)`` over
  ranks (:func:`exact_prefix`) with ``x_{-1} = x0``. One all-gather of two values per channel.

A shard then evaluates (:func:`padded_layout`) the plain SWR of its tokens behind k virtual
blocks that reproduce the carriers (block i: ``a = (1, ..., 1, C_i)``, ``u = (0, ..., 0, v_i)``,
whose local solve ends exactly at ``(v_i, C_i)``) and ``o = p_r mod l`` prefix slots whose last
one carries ``(g, w)`` (``a = g``, ``u = w``, the rest ``a = 1``, ``u = 0``). For hops=None it
adds ``G_t x_in`` (``G_t = a_{p_r} ... a_t``) to its local exact recurrence.

Gradients: every step above is differentiable in the summaries, so the reverse pass is the
adjoint of the all-gather: each rank receives the sum, over the later ranks that read them, of
the gradients of its own published summary (a reduce-scatter), and back-propagates it into its
own ``a`` and ``u``. x0 is read on the first rank only; its gradient appears there.

This module holds the index bookkeeping (Python ints) and a NumPy float64 simulation of the
protocol (:func:`swr_sharded`) against which the adapters' collectives are checked.
"""

from __future__ import annotations

import numpy as np

from . import reference

__all__ = [
    "shard_starts",
    "summary_blocks",
    "touched_blocks",
    "incoming_plan",
    "compose",
    "exact_prefix",
    "padded_layout",
    "swr_sharded",
]


def shard_starts(lengths) -> list[int]:
    """Start token ``p_r`` of every shard, from the shard lengths in rank order."""
    starts, p = [], 0
    for n in lengths:
        starts.append(p)
        p += int(n)
    return starts


def touched_blocks(p: int, n: int, block_len: int) -> range:
    """Global indices of the blocks holding tokens ``[p, p + n)`` (empty for n = 0)."""
    if n == 0:
        return range(0)
    return range(p // block_len, (p + n - 1) // block_len + 1)


def summary_blocks(p: int, n: int, block_len: int, hops: int) -> tuple[int, list[int]]:
    """What a shard publishes for hops = k: ``(tail_start, blocks)``.

    ``blocks`` are the global indices of its last ``min(k + 1, touched)`` touched blocks (oldest
    first); ``tail_start`` is the first token of the shard inside the oldest of them: the maps are
    computed from tokens ``[tail_start, p + n)`` only. A summary always has ``k + 1`` slots; slots
    past ``len(blocks)`` hold the identity map ``(0, 1)``.
    """
    t = touched_blocks(p, n, block_len)
    blocks = list(t[-(hops + 1):]) if len(t) else []
    if not blocks:
        return p + n, []
    return max(p, blocks[0] * block_len), blocks


def incoming_plan(lengths, rank: int, block_len: int, hops: int):
    """How rank ``rank`` assembles its incoming state from the gathered summaries (hops = k).

    Returns ``(pieces, carrier_blocks, first_block, offset)``: ``pieces`` maps every global block
    in ``[first_block - k, first_block]`` to the ``(q, slot)`` pairs of earlier ranks' summaries
    that cover it, in rank order (compose them with :func:`compose`); ``carrier_blocks[i]`` is
    the block of carrier i (newest first, ``first_block - 1 - i``: -1 is x0, below -1 nothing);
    ``offset = p mod l`` (the partial map of ``first_block`` matters only when it is > 0).
    """
    starts = shard_starts(lengths)
    p = starts[rank]
    first = p // block_len
    wanted = set(range(first - hops, first + 1))
    pieces: dict[int, list[tuple[int, int]]] = {j: [] for j in sorted(wanted)}
    for q in range(rank):
        _, blocks = summary_blocks(starts[q], int(lengths[q]), block_len, hops)
        for slot, j in enumerate(blocks):
            if j in wanted:
                pieces[j].append((q, slot))
    carrier_blocks = [first - 1 - i for i in range(hops)]
    return pieces, carrier_blocks, first, p % block_len


def compose(first, second):
    """The affine map ``x -> C2 (C1 x + v1) + v2`` of ``first = (v1, C1)`` then ``second``."""
    v1, c1 = first
    v2, c2 = second
    return c2 * v1 + v2, c2 * c1


def exact_prefix(P, X, rank: int, x0=None):
    """Incoming exact state ``x_{p_rank - 1}`` from the gathered ``(P_q, X_q)`` of earlier ranks
    (sequences indexed by rank); x0 (or 0) before the first."""
    x = 0.0 * X[0] if x0 is None else x0 + 0.0 * X[0]
    for q in range(rank):
        x = P[q] * x + X[q]
    return x


def padded_layout(p: int, block_len: int, hops: int) -> tuple[int, int]:
    """``(virtual, offset)``: the shard's tokens sit behind ``virtual = k l`` tokens of carrier
    blocks and ``offset = p mod l`` prefix slots (the last one carries ``(g, w)``)."""
    return hops * block_len, p % block_len


# ----------------------------------------------------------------------------------------------
# NumPy simulation of the protocol (float64, time-last arrays (..., N) as in the reference)
# ----------------------------------------------------------------------------------------------


def _summary_np(a, u, p, block_len, hops):
    """The published maps of one shard: ``(v, C)`` each ``(..., k + 1)``."""
    n = u.shape[-1]
    start, blocks = summary_blocks(p, n, block_len, hops)
    lead = u.shape[:-1]
    v = np.zeros(lead + (hops + 1,))
    C = np.ones(lead + (hops + 1,))
    if blocks:
        s = start - p
        vb, Cb = reference.block_carriers(
            a[..., s:], u[..., s:], block_len, offset=start % block_len
        )
        v[..., : len(blocks)] = vb
        C[..., : len(blocks)] = Cb
    return v, C


def _shard_np(a, u, p, block_len, hops, carriers, partial):
    """The shard's output: the plain SWR of its tokens behind the virtual carrier blocks."""
    lead = u.shape[:-1]
    virtual, o = padded_layout(p, block_len, hops)
    pa = np.ones(lead + (virtual + o,))
    pu = np.zeros(lead + (virtual + o,))
    cv, cC = carriers
    for i in range(hops):  # carrier i (newest first) is virtual block k - 1 - i
        end = (hops - i) * block_len - 1
        pa[..., end], pu[..., end] = cC[..., i], cv[..., i]
    if o:
        pa[..., virtual + o - 1], pu[..., virtual + o - 1] = partial[1], partial[0]
    y = reference.swr(np.concatenate([pa, a], -1), np.concatenate([pu, u], -1),
                      block_len=block_len, hops=hops)
    return y[..., virtual + o:]


def swr_sharded(a, u, lengths, *, block_len=16, hops=1, x0=None):
    """The SWR of the whole sequence computed shard by shard through the published summaries
    only (what the collectives move), float64, time-last. Returns the list of shard outputs."""
    a, u = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(u, np.float64))
    starts = shard_starts(lengths)
    shards = [(a[..., p:p + n], u[..., p:p + n]) for p, n in zip(starts, lengths)]
    lead = u.shape[:-1]
    x0 = np.zeros(lead) if x0 is None else np.broadcast_to(np.asarray(x0, np.float64), lead)
    if hops is None:
        P = [np.prod(sa, axis=-1) for sa, _ in shards]
        X = [reference.sequential(sa, su)[..., -1] if su.shape[-1] else np.zeros(lead)
             for sa, su in shards]
        out = []
        for r, (sa, su) in enumerate(shards):
            x_in = exact_prefix(P, X, r, x0)
            out.append(reference.sequential(sa, su, x0=x_in))
        return out
    summaries = [_summary_np(sa, su, p, block_len, hops) for (sa, su), p in zip(shards, starts)]
    out = []
    for r, (sa, su) in enumerate(shards):
        pieces, carrier_blocks, first, _ = incoming_plan(lengths, r, block_len, hops)
        maps = {}
        for j, src in pieces.items():
            m = (np.zeros(lead), np.ones(lead))
            for q, slot in src:
                m = compose(m, (summaries[q][0][..., slot], summaries[q][1][..., slot]))
            maps[j] = m
        cv = np.zeros(lead + (hops,))
        cC = np.zeros(lead + (hops,))
        for i, j in enumerate(carrier_blocks):
            if j >= 0:
                cv[..., i], cC[..., i] = maps[j]
            elif j == -1:
                cv[..., i] = x0
        out.append(_shard_np(sa, su, starts[r], block_len, hops, (cv, cC), maps[first]))
    return out
