"""Packed variable-length sequences (``cu_seqlens``) for the torch adapter.

CUDA tensors, hops 0 or 1 (the cases swr_array/packed.py runs with its native kernels,
numba_kernels/packed_walk.py): the custom ops ``swr_array::swr_packed`` and
``swr_array::swr_packed_vjp`` hand the tensors to the front's packed call (zero-copy, torch's
stream and allocator), which walks each sequence's blocks in the packed tensor itself: no padded
image, no host read of ``cu_seqlens``, and ``torch.compile(fullgraph=True)`` sees two opaque ops
with fake implementations. Everything else (the CPU, other hops) takes:

the same padded evaluation as the front (swr_array/packed.py, which documents it): the tokens
move into a block-aligned zero image of static length ``round_up(T + S*block_len, block_len)``
with a carry slot (``a = 0``, ``u = x0[s]``) before every sequence, the adapter's dense ``swr``
runs on it once and the real tokens move back. Everything is torch indexing on the tensors'
device (``searchsorted``, ``cumsum``, ``index_copy``, ``index_select``), so autograd gives the
gradients (dx0 through the carry slots), the host never reads ``cu_seqlens`` (no
synchronisation) and ``torch.compile(fullgraph=True)`` traces it.

The values of ``cu_seqlens`` are checked in eager mode on the CPU; on CUDA and under
``torch.compile`` they are not read by the host: a ``cu_seqlens`` that does not start at 0,
decreases or does not end at T makes every output NaN (a device-side check).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import packed as _packed

_INT = (torch.int32, torch.int64)


def check_cu(cu, u: Tensor, B: int, T: int) -> int:
    """Checks of ``cu_seqlens`` that need no host read of a device tensor; returns S."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu).__name__}")
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch B == 1 (the sequences are packed along time), "
                         f"got B = {B}")
    if cu.dtype not in _INT:
        raise TypeError(f"cu_seqlens must have dtype torch.int32 or torch.int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D [0, n_1, n_1 + n_2, ..., T] with at least one "
                         f"entry, got shape {tuple(cu.shape)}")
    if cu.device != u.device:
        raise ValueError(f"cu_seqlens is on {cu.device} but u is on {u.device}: move them to "
                         "one device")
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        _packed.check_cu_values(cu.numpy(), T)
    return int(cu.shape[0]) - 1


def _plan(cu: Tensor, T: int, block_len: int):
    """(pos (T,), starts (S,), ok): as swr_array.packed.plan, with a 0-d validity flag."""
    cu = cu.to(torch.int64)
    l = block_len
    n = cu[1:] - cu[:-1]
    m = torch.div(n + l, l, rounding_mode="floor") * l
    starts = l + torch.cumsum(m, 0) - m
    t = torch.arange(T, device=cu.device, dtype=torch.int64)
    seq = torch.searchsorted(cu[1:].contiguous(), t, right=True)
    seq = torch.clamp(seq, max=max(cu.shape[0] - 2, 0))
    ok = (cu[0] == 0) & (cu[-1] == T)
    if n.shape[0]:
        ok = ok & (n.min() >= 0)
    Lp = _packed.padded_length(T, cu.shape[0] - 1, l)
    if cu.shape[0] > 1:
        pos = starts[seq] + t - cu[seq]
    else:
        pos = torch.zeros_like(t)
    # an invalid cu keeps every index in range; the output is poisoned with NaN instead
    pos = torch.where(ok & (pos >= 0) & (pos < Lp), pos, 0)
    starts = torch.where(ok & (starts >= 1) & (starts < Lp + 1), starts, l)
    return pos, starts, ok, Lp


# ----------------------------------------------------------------------------------------------
# the native route: custom ops over the front's packed call (CUDA, hops 0/1)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("swr_array::swr_packed", mutates_args=())
def _swr_packed_op(a: Tensor, u: Tensor, cu: Tensor, x0: Tensor | None, block_len: int,
                   hops: int, layout: str, out_dtype: torch.dtype | None) -> Tensor:
    """y from torch's allocator, written by the front's packed call (``out=``)."""
    from . import torch as _ta

    y = torch.empty(u.shape, dtype=u.dtype if out_dtype is None else out_dtype, device=u.device)
    with _ta._front_context(u.device):
        yf = _ta._to_front(y)
        _ta._front.swr(_ta._to_front(a), _ta._to_front(u), block_len=block_len, hops=hops,
                       layout=layout, x0=_ta._to_front(x0), cu_seqlens=_ta._to_front(cu),
                       out_dtype=None if out_dtype is None or out_dtype == u.dtype else yf.dtype,
                       out=yf)
    return y


@_swr_packed_op.register_fake
def _swr_packed_fake(a, u, cu, x0, block_len, hops, layout, out_dtype):
    return u.new_empty(u.shape, dtype=out_dtype or u.dtype)


@torch.library.custom_op("swr_array::swr_packed_vjp", mutates_args=())
def _swr_packed_vjp_op(a: Tensor, u: Tensor, dy: Tensor, cu: Tensor, x0: Tensor | None,
                       block_len: int, hops: int, layout: str) -> tuple[Tensor, Tensor, Tensor]:
    """(da, du, dx0) of the front's packed gradient; dx0 (float32 there) in x0's dtype, an empty
    tensor without x0 (custom ops return no None)."""
    from . import torch as _ta

    with _ta._front_context(u.device):
        da, du, dx0 = _ta._front.swr_vjp(
            _ta._to_front(a), _ta._to_front(u), _ta._to_front(dy), block_len=block_len,
            hops=hops, layout=layout, x0=_ta._to_front(x0), cu_seqlens=_ta._to_front(cu))
        da = _ta._from_front(da, u.device)
        du = _ta._from_front(du, u.device)
        dx0 = u.new_empty(0) if x0 is None else _ta._from_front(dx0, u.device).to(x0.dtype)
    return da, du, dx0


@_swr_packed_vjp_op.register_fake
def _swr_packed_vjp_fake(a, u, dy, cu, x0, block_len, hops, layout):
    dx0 = u.new_empty(0) if x0 is None else x0.new_empty(x0.shape)
    return a.new_empty(a.shape), u.new_empty(u.shape), dx0


def _packed_setup_context(ctx, inputs, output):
    a, u, cu, x0, block_len, hops, layout, _ = inputs
    ctx.save_for_backward(a, u, cu, x0)
    ctx.config = (block_len, hops, layout)


def _packed_backward(ctx, dy):
    a, u, cu, x0 = ctx.saved_tensors
    da, du, dx0 = torch.ops.swr_array.swr_packed_vjp.default(a, u, dy.contiguous(), cu, x0,
                                                             *ctx.config)
    return da, du, None, (dx0 if x0 is not None else None), None, None, None, None


_swr_packed_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


def _native_route(a, u, cu, x0, *, hops, layout, per_head, block_len, H, D, T) -> bool:
    """The custom ops take CUDA tensors with hops 0 or 1 where the front's native kernels run
    forward and backward (``packed_walk.backward_config`` in BLHD,
    ``packed_walk.tokens_backward_config`` in BHDL; the front still takes the padded image for
    pointers too misaligned for every channel vector)."""
    if u.device.type != "cuda" or hops not in (0, 1) or cu.shape[0] < 2 or T == 0:
        return False
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    from swr_array.numba_kernels import packed_walk

    kind = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[u.dtype]
    if layout == "BHDL":
        return packed_walk.tokens_backward_config(layout, kind, kind, per_head, H, D,
                                                  T) is not None
    return packed_walk.backward_config(kind, kind, per_head, H, D, 1) is not None


def swr_packed(swr, a, u, cu, *, block_len, hops, layout, x0, out_dtype, check_swr):
    """``swr(a, u, ..., cu_seqlens=cu)``; ``swr`` is the adapter's dense function."""
    block_len, hops, layout, per_head = check_swr(
        a, u, None, block_len=block_len, hops=hops, layout=layout, out_dtype=out_dtype
    )
    if layout == "BLHD":
        B, T, H, D = u.shape
    else:
        B, H, D, T = u.shape
    S = check_cu(cu, u, B, T)
    if x0 is not None:
        if not isinstance(x0, Tensor):
            raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        if tuple(x0.shape) != (S, H, D):
            raise ValueError(f"x0 must have shape (S, H, D) = {(S, H, D)} with cu_seqlens (one "
                             f"initial carry per sequence), got {tuple(x0.shape)}")
        if x0.device != u.device:
            raise ValueError(f"x0 is on {x0.device} but u is on {u.device}: move them to one "
                             "device")
        if not x0.is_floating_point():
            raise TypeError(f"x0 must be a floating tensor, got {x0.dtype}")
    if _native_route(a, u, cu, x0, hops=hops, layout=layout, per_head=per_head,
                     block_len=block_len, H=H, D=D, T=T):
        if x0 is not None and x0.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            x0 = x0.to(torch.float32)  # the kernels read x0 as float32 (the padded path: u's)
        return _swr_packed_op(a.contiguous(), u.contiguous(), cu, x0, block_len, hops, layout,
                              out_dtype)
    pos, starts, ok, Lp = _plan(cu, T, block_len)
    dt = u.dtype
    if x0 is not None and dt in (torch.float16, torch.bfloat16):
        dt = torch.float32  # the carry slots hold x0 unrounded
    out_dt = u.dtype if out_dtype is None else out_dtype
    ta = 1 if layout == "BLHD" else a.dim() - 1
    tu = 1 if layout == "BLHD" else 3

    def image(x, dim):
        shape = list(x.shape)
        shape[dim] = Lp
        return x.new_zeros(shape, dtype=dt).index_copy(dim, pos, x.to(dt))

    ap = image(a, ta)
    up = image(u, tu)
    if x0 is not None and S:
        xs = x0.to(dt)[None] if layout == "BLHD" else x0.to(dt).permute(1, 2, 0)[None]
        up = up.index_copy(tu, starts - 1, xs)
    yp = swr(ap, up, block_len=block_len, hops=hops, layout=layout, out_dtype=out_dt)
    y = yp.index_select(tu, pos)
    return torch.where(ok, y, torch.full((), float("nan"), dtype=y.dtype, device=y.device))


@torch.compiler.disable
def swr_packed_state(front_ctx, to_front, from_front, a, u, cu, *, block_len, hops, layout, x0,
                     out_dtype, np_dtype):
    """``return_state=True`` with cu_seqlens: through the front (reads cu on the host)."""
    from .. import ops as _front

    with front_ctx(u.device):
        y, st = _front.swr(
            to_front(a), to_front(u), block_len=block_len, hops=hops, layout=layout,
            x0=to_front(x0), return_state=True, out_dtype=np_dtype(out_dtype),
            cu_seqlens=to_front(cu),
        )
        return from_front(y, u.device), st

