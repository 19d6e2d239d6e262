"""Context parallelism for the torch adapter: ``swr(..., cp_group=group)`` and
``Phalanx.forward(x, cp_group=group)``.

Each rank of ``group`` passes its contiguous shard of the sequence (ranks in group-rank order,
any lengths, zero included) and gets its shard of the full-sequence result. The math is
:mod:`swr_array.context_parallel`; this module moves its summaries with ``torch.distributed``:

- forward: one all-gather of the shard lengths (and whether x0 was passed: it must be passed on
  every rank or on none), then one all-gather of every rank's summary, ``2 (k + 1)`` channel maps
  for ``hops = k`` (C per head when ``a`` is per head) or ``(prod a, X)`` for ``hops = None``,
  float32 (float64 for float64 inputs);
- backward: one reduce-scatter (NCCL) or all-reduce (other backends, e.g. gloo) of the
  gradients of the gathered summaries, so each rank gets the gradient of its own summary.

Every rank of the group must make the call, and run the backward when one does (the backward
holds a collective). x0 is replicated: pass the same ``(B, H, D)`` x0 on every rank; like a
replicated weight's, its gradient on each rank is that rank's share, and the full gradient is their
sum over the group (what data-parallel gradient reduction over the group computes).

A shard's output is the plain SWR op on its tokens behind ``hops`` virtual carrier blocks and the
``p mod l`` prefix slots (the shard is copied once into that padded sequence); 16-bit inputs are
padded in float32 so the carriers cross shards unrounded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from swr_array import context_parallel as _cp

# ----------------------------------------------------------------------------------------------
# layout helpers: the time axis and the canonical (B, H, D|1, T) view
# ----------------------------------------------------------------------------------------------


def _time_dim(layout: str, per_head: bool, is_a: bool) -> int:
    if layout == "BLHD":
        return 1
    return 2 if (is_a and per_head) else 3


def _to_canon(x: Tensor, layout: str, per_head: bool, is_a: bool) -> Tensor:
    """(B, H, D|1, T) view of a u-like or a-like tensor."""
    if layout == "BLHD":
        if is_a and per_head:  # (B, T, H)
            return x.permute(0, 2, 1)[:, :, None, :]
        return x.permute(0, 2, 3, 1)
    if is_a and per_head:  # (B, H, T)
        return x[:, :, None, :]
    return x


def _from_canon(x: Tensor, layout: str, per_head: bool, is_a: bool) -> Tensor:
    if is_a and per_head:
        x = x[:, :, 0, :]
        return x.permute(0, 2, 1) if layout == "BLHD" else x
    return x.permute(0, 3, 1, 2) if layout == "BLHD" else x


# ----------------------------------------------------------------------------------------------
# collectives
# ----------------------------------------------------------------------------------------------


def _gather(x: Tensor, group) -> Tensor:
    """(world, *x.shape): every rank's x."""
    world = dist.get_world_size(group)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.stack(out)


def _reduce_scatter(g: Tensor, group) -> Tensor:
    """The adjoint of :func:`_gather`: the sum over ranks of ``g[rank]``."""
    rank = dist.get_rank(group)
    g = g.contiguous()
    if dist.get_backend(group) == "nccl":
        out = torch.empty_like(g[0])
        dist.reduce_scatter_tensor(out, g, group=group)
        return out
    dist.all_reduce(g, group=group)  # gloo has no reduce-scatter
    return g[rank]


def _lengths(n: int, has_x0: bool, device, group) -> list[int]:
    """Every rank's shard length (one small all-gather); checks that x0 is passed everywhere."""
    dev = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    info = _gather(torch.tensor([n, int(has_x0)], dtype=torch.int64, device=dev), group).tolist()
    flags = {f for _, f in info}
    if len(flags) > 1:
        raise ValueError(
            "x0 must be passed on every rank of cp_group or on none (it is replicated)"
        )
    return [m for m, _ in info]


# ----------------------------------------------------------------------------------------------
# the per-shard pieces (differentiable torch ops)
# ----------------------------------------------------------------------------------------------


class _Cfg:
    def __init__(self, block_len, hops, layout, per_head, out_dtype, lengths, rank, wd):
        self.block_len, self.hops, self.layout, self.per_head = block_len, hops, layout, per_head
        self.out_dtype, self.lengths, self.rank, self.wd = out_dtype, lengths, rank, wd
        self.p = _cp.shard_starts(lengths)[rank]
        self.n = lengths[rank]


def _summary(at: Tensor, ut: Tensor, cfg: _Cfg) -> tuple[Tensor, Tensor | None]:
    """This shard's published summary, flat, in the work dtype (at, ut canonical), and for
    hops=None the shard's exact recurrence from 0 (reused by :func:`_output`)."""
    l, k, p, n = cfg.block_len, cfg.hops, cfg.p, cfg.n
    if k is None:
        if n == 0:
            P, X, local = at.new_ones(at.shape[:-1]), ut.new_zeros(ut.shape[:-1]), None
        else:
            P = torch.prod(at, dim=-1)
            local = _exact_local(at, ut, cfg)
            X = local[..., -1]
        return torch.cat([X.reshape(-1), P.reshape(-1)]), local
    start, blocks = _cp.summary_blocks(p, n, l, k)
    lead_u, lead_a = ut.shape[:-1], at.shape[:-1]
    v = ut.new_zeros(lead_u + (k + 1,))
    C = at.new_ones(lead_a + (k + 1,))
    if blocks:
        s, o = start - p, start % l
        ta, tu = at[..., s:], ut[..., s:]
        nb = len(blocks)
        back = nb * l - o - ta.shape[-1]
        ta = F.pad(ta, (o, back), value=1.0).reshape(lead_a + (nb, l))
        tu = F.pad(tu, (o, back), value=0.0).reshape(lead_u + (nb, l))
        # R_s = a_{s+1} ... a_{l-1} inside each block: the weight of u_s in the block's carrier
        nxt = torch.cat([ta[..., 1:], torch.ones_like(ta[..., :1])], dim=-1)
        R = torch.flip(torch.cumprod(torch.flip(nxt, (-1,)), dim=-1), (-1,))
        vb = (R * tu).sum(-1)
        Cb = torch.prod(ta, dim=-1)
        v = torch.cat([vb, v[..., nb:]], dim=-1)
        C = torch.cat([Cb, C[..., nb:]], dim=-1)
    return torch.cat([v.reshape(-1), C.reshape(-1)]), None


def _split(flat: Tensor, lead_u, lead_a, slots: int):
    nu = int(torch.Size(lead_u).numel()) * slots
    return flat[:nu].reshape(tuple(lead_u) + (slots,)), flat[nu:].reshape(tuple(lead_a) + (slots,))


def _exact_local(at: Tensor, ut: Tensor, cfg: _Cfg) -> Tensor:
    """The exact recurrence of the shard from 0, canonical, work dtype."""
    from swr_array.adapters import torch as _t

    a = _from_canon(at, cfg.layout, cfg.per_head, True)
    u = _from_canon(ut, cfg.layout, False, False)
    y = _t.swr(a, u, block_len=cfg.block_len, hops=None, layout=cfg.layout)
    return _to_canon(y, cfg.layout, False, False)


def _output(at, ut, x0, gathered, local, cfg: _Cfg) -> Tensor:
    """This shard's output (canonical, work dtype) from the gathered summaries."""
    from swr_array.adapters import torch as _t

    l, k, n, r = cfg.block_len, cfg.hops, cfg.n, cfg.rank
    lead_u, lead_a = ut.shape[:-1], at.shape[:-1]
    if n == 0:
        return ut * 1.0
    if k is None:
        nu = int(torch.Size(lead_u).numel())
        X = [gathered[q][:nu].reshape(lead_u) for q in range(r)]
        P = [gathered[q][nu:].reshape(lead_a) for q in range(r)]
        x_in = x0 if x0 is not None else ut.new_zeros(lead_u)
        for q in range(r):
            x_in = P[q] * x_in + X[q]
        G = torch.cumprod(at, dim=-1)
        return local + G * x_in[..., None]
    maps = [_split(gathered[q], lead_u, lead_a, k + 1) for q in range(r)]
    pieces, carrier_blocks, first, o = _cp.incoming_plan(cfg.lengths, r, l, k)
    composed = {}
    for j, src in pieces.items():
        m = None
        for q, slot in src:
            piece = (maps[q][0][..., slot], maps[q][1][..., slot])
            m = piece if m is None else _cp.compose(m, piece)
        composed[j] = m
    virtual = k * l
    pa = [at.new_ones(lead_a + (virtual + o,))]
    pu = [ut.new_zeros(lead_u + (virtual + o,))]
    ends, cvs, cCs = [], [], []
    for i, j in enumerate(carrier_blocks):  # carrier i (newest first) is virtual block k - 1 - i
        if j >= 0 and composed[j] is not None:
            v, C = composed[j]
        elif j == -1 and x0 is not None:
            v, C = x0, at.new_zeros(lead_a)
        else:
            continue
        ends.append((k - i) * l - 1)
        cvs.append(v)
        cCs.append(C)
    if o and composed[first] is not None:
        ends.append(virtual + o - 1)
        cvs.append(composed[first][0])
        cCs.append(composed[first][1])
    if ends:
        idx = torch.tensor(ends, device=ut.device)
        pa = pa[0].index_copy(-1, idx, torch.stack(cCs, -1))
        pu = pu[0].index_copy(-1, idx, torch.stack(cvs, -1))
    else:
        pa, pu = pa[0], pu[0]
    # concatenated along the layout's own time axis: the padded arrays come out contiguous
    lay, ph = cfg.layout, cfg.per_head
    a = torch.cat([_from_canon(pa, lay, ph, True), _from_canon(at, lay, ph, True)],
                  dim=_time_dim(lay, ph, True))
    u = torch.cat([_from_canon(pu, lay, False, False), _from_canon(ut, lay, False, False)],
                  dim=_time_dim(lay, ph, False))
    y = _t.swr(a, u, block_len=l, hops=k, layout=lay)
    return _to_canon(y, lay, False, False)[..., virtual + o:]


# ----------------------------------------------------------------------------------------------
# the autograd Function: forward and backward each hold their collectives, on every rank
# ----------------------------------------------------------------------------------------------


class _ContextParallelSWR(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, u, x0, cfg, group):
        need = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(g)
                      for t, g in zip((a, u, x0), need)]
            a_, u_, x0_ = leaves
            at = _to_canon(a_.to(cfg.wd), cfg.layout, cfg.per_head, True)
            ut = _to_canon(u_.to(cfg.wd), cfg.layout, False, False)
            x0w = None if x0_ is None else x0_.to(cfg.wd)
            summary, local = _summary(at, ut, cfg)
        gathered = _gather(summary.detach(), group).requires_grad_(any(need))
        with torch.enable_grad():
            y = _output(at, ut, x0w, gathered, local, cfg)
            y = _from_canon(y, cfg.layout, False, False).to(cfg.out_dtype)
        ctx.graph = (leaves, summary, gathered, y)
        ctx.group = group
        return y.detach().clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, dy):
        leaves, summary, gathered, y = ctx.graph
        del ctx.graph
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = {}
        if dy is None:
            dy = torch.zeros_like(y)
        if y.requires_grad:
            # the summary may share nodes with y (hops=None: the local recurrence)
            got = torch.autograd.grad(y, wanted + [gathered], dy, allow_unused=True,
                                      retain_graph=summary.requires_grad)
            for t, g in zip(wanted, got[:-1]):
                grads[id(t)] = g
            dg = got[-1] if got[-1] is not None else torch.zeros_like(gathered)
        else:
            dg = torch.zeros_like(gathered)
        dsum = _reduce_scatter(dg, ctx.group)  # every rank calls it, whatever it needs
        if summary.requires_grad:
            src = [t for t in wanted if t is not leaves[2]]
            got = torch.autograd.grad(summary, src, dsum, allow_unused=True)
            for t, g in zip(src, got):
                if g is not None:
                    prev = grads.get(id(t))
                    grads[id(t)] = g if prev is None else prev + g
        out = []
        for t in leaves:
            g = None if t is None else grads.get(id(t))
            if t is not None and t.requires_grad and g is None:
                g = torch.zeros_like(t)
            out.append(g)
        return (*out, None, None)


@torch.compiler.disable
def swr(a, u, x0, block_len, hops, layout, out_dtype, per_head, group):
    """The context-parallel SWR of this rank's shard (arguments checked by the caller)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("cp_group needs an initialised torch.distributed process group")
    t = _time_dim(layout, per_head, False)
    lengths = _lengths(int(u.shape[t]), x0 is not None, u.device, group)
    wd = torch.promote_types(u.dtype, torch.float32)
    cfg = _Cfg(block_len, hops, layout, per_head, out_dtype or u.dtype, lengths,
               dist.get_rank(group), wd)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (a, u, x0)):
        return _ContextParallelSWR.apply(a, u, x0, cfg, group)
    with torch.no_grad():
        at = _to_canon(a.to(wd), layout, per_head, True)
        ut = _to_canon(u.to(wd), layout, False, False)
        summary, local = _summary(at, ut, cfg)
        gathered = _gather(summary, group)
        y = _output(at, ut, None if x0 is None else x0.to(wd), gathered, local, cfg)
        return _from_canon(y, layout, False, False).to(cfg.out_dtype).contiguous()


def phalanx(layer, x: Tensor, group) -> Tensor:
    """``Phalanx.forward`` on this rank's shard ``x (B, L_r, dim)``: the composition (GEMMs and
    gates are per token) around the context-parallel SWR. Weight gradients are this rank's share
    (sum them over the group, as data parallelism over the group does)."""
    from swr_array.adapters import torch as _t

    cfg = layer.config
    z = F.linear(x, layer.in_proj_weight, _t._input_bias(layer.in_proj_bias, cfg))
    A, U, c5, v5 = _t._gates(z, cfg)
    y = _t.swr(A, U, block_len=cfg.block_len, hops=cfg.hops, layout="BLHD", cp_group=group)
    return _t._readout(y, c5, v5, layer.out_proj_weight)
