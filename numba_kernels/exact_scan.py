"""The exact recurrence (hops=None) in one pass: a chained scan with decoupled look-back.

``x_t = a_t x_{t-1} + u_t`` per channel, ``x_{-1} = x0`` (docs/spec.md#recurrence, ``hops=None``:
the block decomposition collapses to the plain recurrence, so ``block_len`` plays no part).

Work is cut into tiles: a group of channels (a *chain*) times a chunk of tokens. A thread block is
one tile. It takes its chunk's index from a per-chain ticket counter (an atomic add), so the
chunks of a chain start in sequence order whatever order the hardware schedules blocks in, and a
tile that waits for an earlier one never waits for a tile that has not started. A tile

1. loads its chunk of ``a`` and ``u`` once into registers (each thread a segment of ``steps``
   tokens of its channels, all loads in flight together; with ``TUNING["speculate"]`` the loads
   of the chunk its block index suggests start before the ticket arrives, and are made again
   only when the ticket differs);
2. scans them with carry 0: per segment, then across the tile's segments (warp shuffles, then
   the warps' totals in shared memory), giving each channel's aggregate ``(A, X)`` (``A`` the
   product of ``a``, ``X`` the local ``x``), and publishes the aggregate with the flag AGGREGATE
   (chunk 0 publishes its inclusive value ``x`` at once, from ``x0``);
3. looks back over its predecessors (``TUNING["lookback_window"]``: the whole block reads as
   many predecessors at once as the tile has segments): aggregates are composed into the
   carry's map until an INCLUSIVE value ``x`` ends the walk; publishes its own inclusive ``x``
   with that flag;
4. re-walks its registers from the carry and writes ``y``.

So ``a`` and ``u`` are read once and ``y`` written once; the status traffic is three float32
values per channel and tile (a few per mille of the data).

Status buffers (``flags`` int64, ``vals`` float32, from :func:`workspace`) never need clearing:
``flags[g]`` is chain g's ticket word, ``epoch << 32 | ticket``; the tile that draws the chain's
last ticket moves it to ``(epoch + 1) << 32``, so the next launch on the same stream starts at
ticket 0 of the next epoch. A tile flag holds ``4 * epoch + status`` (1 aggregate, 2 inclusive),
so flags left by earlier launches never match. Nothing is read back to the host and nothing is
launched besides the kernel: calls can be captured in a CUDA graph. Launches sharing one
workspace must run one after the other: the front keeps one per device, stream, role and sizes,
so calls on different streams never share one, and keeps them for the process's life (a few bytes
a tile), so a CUDA graph that captured a launch keeps valid status buffers.

Flags are read with atomics or volatile loads and values with ``ld.global.cg`` (L2, not the
SM's L1) after a fence, and written before a fence, a barrier and the flag (the CUB pattern).

Layouts:

- ``BLHD`` (:func:`_make_blhd_kernel`): a thread owns ``vec`` adjacent channels (one 16-byte
  access a token); a tile is ``cols`` such vectors (``cols * vec * itemsize`` contiguous bytes a
  row) times ``segs`` segments of ``steps`` tokens; thread ``seg * cols + col``.
- ``BHDL`` (:func:`_make_bhdl_kernel`): a thread owns ``nv * vec`` consecutive tokens of one
  channel row (``nv`` 16-byte accesses); a tile is ``rows`` rows times ``segs`` segments;
  thread ``row * segs + seg`` (a row's segments are adjacent lanes: coalesced along time).

``vec == 1`` specialisations take any shapes and alignments. Tested in the CUDA simulator, which
runs thread blocks one after the other in index order (the tickets then follow block order).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda, types

from ._dtypes import ITEM_SIZE, LOAD, SIMULATOR, STORE
from ._launch import (
    FlatArray,
    Tuning,
    data_pointer,
    launch,
    launch_with_pointers,
    prepare,
)
from ._ptx import WORD_TYPE, make_vector_store, make_word_load, make_word_unpack, shfl_idx

AGGREGATE, INCLUSIVE = 1, 2
EPOCH_SHIFT = 32
STATUS_VALUES = 3  # per channel and tile: A, X (aggregate), x (inclusive)

TUNING = Tuning({
    # BLHD: 16-byte channel vectors per tile row, segments (time) per tile, tokens per segment
    "blhd_cols": 8,
    "blhd_segs": 16,
    "blhd_steps": 8,
    # BHDL: rows per tile, segments per row, 16-byte accesses per segment
    "bhdl_rows": 4,
    "bhdl_segs": 32,
    "bhdl_nv": 4,
    # the backward (its tiles also set the carries kernel's): tokens a BLHD segment, 16-byte
    # accesses a BHDL segment
    "blhd_bwd_steps": 4,
    "bhdl_bwd_nv": 2,
    "access_bytes": 16,
    # look back at blhd_segs / bhdl_segs tiles at once (the whole thread block; False: one
    # tile at a time, by the threads holding the tile's aggregate)
    "lookback_window": True,
    # the tile scan by warp shuffles and one exchange of the warps' totals (False: Hillis-Steele
    # in shared memory)
    "warp_scan": True,
    # a block loads the chunk its index suggests while it draws its ticket (False: after)
    "speculate": True,
    # False (tests only): tiles after the first never flag their inclusive value, so every
    # look-back composes aggregates back to the first tile: the path that the simulator, whose
    # thread blocks run one after the other, never takes otherwise
    "inclusive_flags": True,
})
"""Tile shapes of the exact-scan kernels."""

_KINDS = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.uint16): "bf16"}

# --------------------------------------------------------------------------------------------
# coherent loads of the status values (another SM wrote them: read through L2, not L1)

if SIMULATOR:

    def _load_cg(array, index):
        return array[index]

    load_cg = cuda.jit(device=True)(_load_cg)
else:
    from llvmlite import ir

    @numba.cuda.extending.intrinsic
    def _load_cg_intrinsic(typingctx, array, index):
        sig = types.float32(array, types.int64)

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, value=args[0])
            ptr = builder.gep(ary.data, [args[1]])
            address = builder.ptrtoint(ptr, ir.IntType(64))
            fn = ir.FunctionType(ir.FloatType(), [ir.IntType(64)])
            return builder.asm(fn, "ld.global.cg.f32 $0, [$1];", "=f,l,~{memory}", [address],
                               True)

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def load_cg(array, index):
        return _load_cg_intrinsic(array, numba.int64(index))


if SIMULATOR:

    def _load_flag(array, index):
        return array[index]

    load_flag = cuda.jit(device=True)(_load_flag)
else:

    @numba.cuda.extending.intrinsic
    def _load_flag_intrinsic(typingctx, array, index):
        sig = types.int64(array, types.int64)

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, value=args[0])
            ptr = builder.gep(ary.data, [args[1]])
            address = builder.ptrtoint(ptr, ir.IntType(64))
            fn = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
            return builder.asm(fn, "ld.volatile.global.s64 $0, [$1];", "=l,l,~{memory}",
                               [address], True)

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def load_flag(array, index):
        return _load_flag_intrinsic(array, numba.int64(index))


def _make_window_lookback(nch, a_width, nt, segs, seg_stride, composer):
    """``lookback(flags, vals, fi, vbase, stride, off, G, epoch, avail, tx, seg, active, sm_wx,
    sm_wa, sm_st, out)``: the carry entering a tile from the tiles before it, looked at
    ``segs`` at a time by the whole thread block (every thread calls it): the thread of
    segment ``s`` reads the flag and values of the tile ``s + 1`` places back (of ``avail``),
    and the column's thread of segment ``composer`` (which holds the tile's aggregate) composes
    the window in shared memory up to the nearest inclusive value; windows further back follow
    until one holds an inclusive value. ``out[k]`` receives the carry in the composing
    threads."""
    f32 = numba.float32

    @cuda.jit(device=True, inline=True)
    def lookback(flags, vals, fi, vbase, stride, off, G, epoch, avail, tx, seg, active, sm_wx,
                 sm_wa, sm_st, out):
        acc_a = cuda.local.array(a_width, f32)
        acc_x = cuda.local.array(nch, f32)
        for q in range(a_width):
            acc_a[q] = f32(1.0)
        for k in range(nch):
            acc_x[k] = f32(0.0)
        agg = epoch * 4 + AGGREGATE
        inc = epoch * 4 + INCLUSIVE
        d0 = 0
        found = False
        while not found:
            d = d0 + seg
            st = 0
            if d < avail:
                f = load_flag(flags, fi - d)
                while f != agg and f != inc:
                    f = load_flag(flags, fi - d)
                cuda.threadfence()
                st = INCLUSIVE if f == inc else AGGREGATE
                if active:
                    vb = vbase - d * stride
                    if st == INCLUSIVE:
                        for k in range(nch):
                            sm_wx[k * nt + tx] = load_cg(vals, vb + 2 * G + off + k)
                    else:
                        for k in range(nch):
                            sm_wx[k * nt + tx] = load_cg(vals, vb + G + off + k)
                        for q in range(a_width):
                            sm_wa[q * nt + tx] = load_cg(vals, vb + off + q)
            sm_st[seg] = st  # the same value from every thread of the segment
            cuda.syncthreads()
            if seg == composer and active:
                done = False
                for s in range(segs):
                    src = tx + (s - composer) * seg_stride
                    st = sm_st[s]
                    if not done and st == INCLUSIVE:
                        for k in range(nch):
                            out[k] = acc_a[k % a_width] * sm_wx[k * nt + src] + acc_x[k]
                        done = True
                    elif not done and st == AGGREGATE:
                        for k in range(nch):
                            acc_x[k] = acc_a[k % a_width] * sm_wx[k * nt + src] + acc_x[k]
                        for q in range(a_width):
                            acc_a[q] = acc_a[q] * sm_wa[q * nt + src]
            for s in range(segs):
                if sm_st[s] == INCLUSIVE:
                    found = True
            cuda.syncthreads()
            d0 += segs

    return lookback


def _raw_access(kind, vec):
    """(load, unpack, words, raw dtype): a ``vec``-element access kept as raw words in registers
    (unpacked to float32 when used), or as float32 values for ``vec == 1`` and the simulator."""
    plain = SIMULATOR or vec == 1
    words = vec if plain else vec * ITEM_SIZE[kind] // 4
    raw = numba.float32 if plain else WORD_TYPE
    return make_word_load(kind, vec), make_word_unpack(kind, vec), words, raw


def _make_lookback(nch, a_width):
    """``lookback(flags, vals, fi, vbase, stride, off, G, epoch, out)``: the carry entering a
    tile, for this thread's ``nch`` channels, from the tiles before it in its chain: the nearest
    one's flag is ``flags[fi]`` and its values start at ``vals[vbase]`` (``stride`` further back
    per tile; A, X, x blocks of ``G`` values, this thread's at ``off``). Aggregates are composed
    until an inclusive value is found; ``out[k]`` receives the carry."""
    f32 = numba.float32

    @cuda.jit(device=True, inline=True)
    def lookback(flags, vals, fi, vbase, stride, off, G, epoch, out):
        acc_a = cuda.local.array(nch, f32)
        acc_x = cuda.local.array(nch, f32)
        for k in range(nch):
            acc_a[k] = f32(1.0)
            acc_x[k] = f32(0.0)
        agg = epoch * 4 + AGGREGATE
        inc = epoch * 4 + INCLUSIVE
        while True:
            f = cuda.atomic.add(flags, fi, 0)
            while f != agg and f != inc:
                f = cuda.atomic.add(flags, fi, 0)
            cuda.threadfence()
            if f == inc:
                for k in range(nch):
                    xin = load_cg(vals, vbase + 2 * G + off + k)
                    out[k] = acc_a[k] * xin + acc_x[k]
                return
            for k in range(nch):
                aj = load_cg(vals, vbase + off + k)
                xj = load_cg(vals, vbase + G + off + k)
                acc_x[k] = acc_a[k] * xj + acc_x[k]
                acc_a[k] = acc_a[k] * aj
            fi -= 1
            vbase -= stride

    return lookback


def _make_tile_scan(nch, a_width, nt, segs, seg_stride, reverse=False):
    """``scan(X, A, sm_x, sm_a, tx, seg)``: inclusive scan of the per-thread segment aggregates
    across the ``segs`` segments of each column, from the first segment, or with ``reverse``
    from the last (the backward's adjoint runs back in time); afterwards the shared arrays hold
    every thread's inclusive value (``sm_x[k * nt + tx]``). A column's segments are threads
    ``seg_stride`` apart. With ``TUNING["warp_scan"]``: warp shuffles inside each warp, then the
    warps' totals through shared memory (two barriers); else Hillis-Steele in shared memory
    (two barriers a level)."""
    if TUNING["warp_scan"] and nt % 32 == 0 and (seg_stride == 1 or 32 % seg_stride == 0):
        return _make_warp_tile_scan(nch, a_width, nt, segs, seg_stride, reverse)
    levels = max(0, (segs - 1).bit_length())
    step = -seg_stride if reverse else seg_stride

    @cuda.jit(device=True, inline=True)
    def scan(X, A, sm_x, sm_a, tx, seg):
        for i in range(levels):
            lev = 1 << i
            for k in range(nch):
                sm_x[k * nt + tx] = X[k]
            for q in range(a_width):
                sm_a[q * nt + tx] = A[q]
            cuda.syncthreads()
            if (segs - 1 - seg if reverse else seg) >= lev:
                src = tx - lev * step
                for k in range(nch):
                    X[k] = A[k % a_width] * sm_x[k * nt + src] + X[k]
                for q in range(a_width):
                    A[q] = A[q] * sm_a[q * nt + src]
            cuda.syncthreads()
        for k in range(nch):
            sm_x[k * nt + tx] = X[k]
        for q in range(a_width):
            sm_a[q * nt + tx] = A[q]
        cuda.syncthreads()

    return scan


def _make_warp_tile_scan(nch, a_width, nt, segs, seg_stride, reverse):
    """:func:`_make_tile_scan` by warp shuffles: a column's segments in one warp combine through
    ``shfl_idx`` levels, then each thread composes the totals of the column's warps before it
    (after it, ``reverse``) from shared memory."""
    spw = min(segs, 32 // seg_stride)  # a column's segments in one warp
    nwc = segs // spw  # warps holding one column
    ncols = nt // segs
    wlevels = max(0, (spw - 1).bit_length())
    f32 = numba.float32

    @cuda.jit(device=True, inline=True)
    def scan(X, A, sm_x, sm_a, tx, seg):
        lane = tx % 32
        wseg = min(seg, lane // seg_stride)  # the column's segments before this one in the warp
        if reverse:
            wseg = spw - 1 - wseg
        xn = cuda.local.array(nch, f32)
        an = cuda.local.array(a_width, f32)
        for i in range(wlevels):
            lev = 1 << i
            src = lane
            if wseg >= lev:
                src = lane + lev * seg_stride if reverse else lane - lev * seg_stride
            for k in range(nch):
                xn[k] = shfl_idx(X[k], src)
            for q in range(a_width):
                an[q] = shfl_idx(A[q], src)
            if wseg >= lev:
                for k in range(nch):
                    X[k] = A[k % a_width] * xn[k] + X[k]
                for q in range(a_width):
                    A[q] = A[q] * an[q]
        if nwc > 1:
            col = tx % seg_stride if seg_stride > 1 else tx // segs
            widx = seg // spw
            if wseg == spw - 1:  # the warp's total for this column
                slot = widx * ncols + col
                for k in range(nch):
                    sm_x[k * nt + slot] = X[k]
                for q in range(a_width):
                    sm_a[q * nt + slot] = A[q]
            cuda.syncthreads()
            px = cuda.local.array(nch, f32)
            pa = cuda.local.array(a_width, f32)
            for k in range(nch):
                px[k] = f32(0.0)
            for q in range(a_width):
                pa[q] = f32(1.0)
            for j in range(nwc):
                w = nwc - 1 - j if reverse else j
                if (w > widx) if reverse else (w < widx):
                    slot = w * ncols + col
                    for q in range(a_width):
                        an[q] = sm_a[q * nt + slot]
                    for k in range(nch):
                        px[k] = an[k % a_width] * px[k] + sm_x[k * nt + slot]
                    for q in range(a_width):
                        pa[q] = pa[q] * an[q]
            for k in range(nch):
                X[k] = A[k % a_width] * px[k] + X[k]
            for q in range(a_width):
                A[q] = A[q] * pa[q]
            cuda.syncthreads()
        for k in range(nch):
            sm_x[k * nt + tx] = X[k]
        for q in range(a_width):
            sm_a[q * nt + tx] = A[q]
        cuda.syncthreads()

    return scan


def _make_publish(nch, a_width):
    """The tile's side of the protocol, for the thread that holds a column's tile aggregate."""
    f32 = numba.float32

    @cuda.jit(device=True, inline=True)
    def publish_aggregate(vals, vbase, off, G, A, X):
        for k in range(nch):
            vals[vbase + off + k] = A[k % a_width]
            vals[vbase + G + off + k] = X[k]

    @cuda.jit(device=True, inline=True)
    def publish_inclusive(vals, vbase, off, G, A, X, carry):
        for k in range(nch):
            vals[vbase + 2 * G + off + k] = A[k % a_width] * carry[k] + X[k]

    return publish_aggregate, publish_inclusive, f32


def _make_blhd_kernel(in_kind, out_kind, per_head, vec, cols, segs, steps, store=True):
    """BLHD: ``u``, ``y`` (B, N, H, D) flat; ``a`` (B, N, H) per head (``vec | D``) or u's shape;
    ``x0``, ``x_probe`` (B, H, D) float32: ``x_probe`` receives x at step ``probe`` (a float32
    copy for a state; -1: none). A tile: ``cols * vec`` channels of one batch row times
    ``segs * steps`` tokens; grid ``nchains * nchunks`` blocks of ``cols * segs`` threads."""
    inclusive_flags = TUNING["inclusive_flags"]
    load_u, unpack_u, uw, raw = _raw_access(in_kind, vec)
    a_width = 1 if per_head else vec
    load_a, unpack_a, aw, _ = _raw_access(in_kind, a_width)
    load_a1 = LOAD[in_kind]
    store_y = make_vector_store(out_kind, vec)
    nt = cols * segs
    G = cols * vec
    sx_size, sa_size = nt * vec, nt * a_width  # shared and local array sizes: constants
    u_size, a_size = steps * uw, steps * aw
    scan = _make_tile_scan(vec, a_width, nt, segs, cols)
    lookback = _make_lookback(vec, a_width)
    publish_aggregate, publish_inclusive, f32 = _make_publish(vec, a_width)
    i64 = numba.int64

    window = TUNING["lookback_window"]
    wlookback = _make_window_lookback(vec, a_width, nt, segs, cols, segs - 1)
    wx_size, wa_size = (sx_size, sa_size) if window else (1, 1)

    speculate = TUNING["speculate"]

    @cuda.jit(device=True, inline=True)
    def load_tile(a, u, ubuf, abuf, af1, row0, t0, n, channels, a_stride, a_col, c0):
        for i in range(steps):
            tc = min(t0 + i, n - 1)
            load_u(u, (row0 + tc) * channels + c0, ubuf, i * uw)
            if per_head:
                af1[i] = load_a1(a[(row0 + tc) * a_stride + a_col])
            else:
                load_a(a, (row0 + tc) * a_stride + a_col, abuf, i * aw)

    def kernel(a, u, y, x0, flags, vals, x_probe, n, channels, head_dim, ngroups, nchunks,
               probe):
        tx = cuda.threadIdx.x
        col = tx % cols
        seg = tx // cols
        nchains = cuda.gridDim.x // nchunks
        g = cuda.blockIdx.x % nchains
        sm_t = cuda.shared.array(1, numba.int64)
        sm_x = cuda.shared.array(sx_size, f32)
        sm_a = cuda.shared.array(sa_size, f32)
        sm_c = cuda.shared.array(G, f32)
        sm_wx = cuda.shared.array(wx_size, f32)
        sm_wa = cuda.shared.array(wa_size, f32)
        sm_st = cuda.shared.array(segs, numba.int64)
        b = g // ngroups
        c0 = (g % ngroups) * G + col * vec
        active = c0 < channels
        if per_head:
            a_stride = channels // head_dim
            a_col = c0 // head_dim
        else:
            a_stride = channels
            a_col = c0
        ubuf = cuda.local.array(u_size, raw)
        abuf = cuda.local.array(a_size, raw)
        af1 = cuda.local.array(steps, f32)
        # the loads of the chunk the ticket will most likely give (blocks start in index order)
        # are in flight while the ticket is drawn; a different ticket loads again
        guess = cuda.blockIdx.x // nchains if speculate else -1
        if active and guess >= 0:
            load_tile(a, u, ubuf, abuf, af1, b * n, (guess * segs + seg) * steps, n, channels,
                      a_stride, a_col, c0)
        if tx == 0:
            raw_t = cuda.atomic.add(flags, g, 1)
            sm_t[0] = raw_t
            if (raw_t & 0xFFFFFFFF) == nchunks - 1:  # the chain's last ticket: next epoch
                cuda.atomic.add(flags, g, (i64(1) << EPOCH_SHIFT) - nchunks)
        cuda.syncthreads()
        raw_t = sm_t[0]
        epoch = raw_t >> EPOCH_SHIFT
        chunk = raw_t & 0xFFFFFFFF
        t0 = (chunk * segs + seg) * steps
        if active and chunk != guess:
            load_tile(a, u, ubuf, abuf, af1, b * n, t0, n, channels, a_stride, a_col, c0)

        X = cuda.local.array(vec, f32)
        A = cuda.local.array(a_width, f32)
        uf = cuda.local.array(vec, f32)
        af = cuda.local.array(a_width, f32)
        for k in range(vec):
            X[k] = f32(0.0)
        for q in range(a_width):
            A[q] = f32(1.0)
        if active:
            for i in range(steps):
                if t0 + i < n:
                    unpack_u(ubuf, i * uw, uf, 0)
                    if per_head:
                        af[0] = af1[i]
                    else:
                        unpack_a(abuf, i * aw, af, 0)
                    for k in range(vec):
                        X[k] = af[k % a_width] * X[k] + uf[k]
                    for q in range(a_width):
                        A[q] = A[q] * af[q]
        scan(X, A, sm_x, sm_a, tx, seg)

        fbase = nchains + g * nchunks  # this tile's flag
        vbase = (g * nchunks + chunk) * (3 * G)
        off = col * vec
        carry = cuda.local.array(vec, f32)
        last = seg == segs - 1
        if last and active:
            if chunk == 0:
                for k in range(vec):
                    carry[k] = x0[b * channels + c0 + k]
                publish_inclusive(vals, vbase, off, G, A, X, carry)
            else:
                publish_aggregate(vals, vbase, off, G, A, X)
            cuda.threadfence()
        cuda.syncthreads()
        if tx == 0:
            cuda.atomic.max(flags, fbase + chunk,
                            epoch * 4 + (INCLUSIVE if chunk == 0 else AGGREGATE))
        if window and chunk > 0:
            wlookback(flags, vals, fbase + chunk - 1, vbase - 3 * G, 3 * G, off, G, epoch, chunk,
                      tx, seg, active, sm_wx, sm_wa, sm_st, carry)
        if last and active:
            if chunk > 0:
                if not window:
                    lookback(flags, vals, fbase + chunk - 1, vbase - 3 * G, 3 * G, off, G, epoch,
                             carry)
                publish_inclusive(vals, vbase, off, G, A, X, carry)
                cuda.threadfence()
            for k in range(vec):
                sm_c[off + k] = carry[k]
        cuda.syncthreads()
        if tx == 0 and chunk > 0 and inclusive_flags:
            cuda.atomic.max(flags, fbase + chunk, epoch * 4 + INCLUSIVE)
        if not (active and store):
            return
        # this segment's carry: the tile's, through the segments before it
        for k in range(vec):
            c = sm_c[off + k]
            if seg > 0:
                c = sm_a[(k % a_width) * nt + tx - cols] * c + sm_x[k * nt + tx - cols]
            X[k] = c
        out = cuda.local.array(vec, f32)
        for i in range(steps):
            t = t0 + i
            if t < n:
                unpack_u(ubuf, i * uw, uf, 0)
                if per_head:
                    af[0] = af1[i]
                else:
                    unpack_a(abuf, i * aw, af, 0)
                for k in range(vec):
                    X[k] = af[k % a_width] * X[k] + uf[k]
                    out[k] = X[k]
                store_y(y, (b * n + t) * channels + c0, out, 0)
                if t == probe:
                    for k in range(vec):
                        x_probe[b * channels + c0 + k] = X[k]

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_exact_blhd_{in_kind}_to_{out_kind}_{'per_head' if per_head else 'per_channel'}"
        f"_vec{vec}_cols{cols}_segs{segs}_steps{steps}{'' if store else '_carries'}"
    )
    return cuda.jit(kernel)


def _make_bhdl_kernel(in_kind, out_kind, per_head, vec, rows, segs, nv, store=True):
    """BHDL: ``u``, ``y`` (B, H, D, N) flat; ``a`` (B, H, N) per head or u's shape; ``x0``,
    ``x_probe`` (B, H, D) float32 (x at step ``probe``, as the BLHD kernel). A tile: ``rows``
    channel rows times ``segs * nv * vec`` tokens; ``vec > 1``
    needs ``vec | N`` and aligned rows."""
    inclusive_flags = TUNING["inclusive_flags"]
    load_v, unpack_v, vw, raw = _raw_access(in_kind, vec)
    store_y = make_vector_store(out_kind, vec)
    nt = rows * segs
    steps = nv * vec
    buf_size = nv * vw
    scan = _make_tile_scan(1, 1, nt, segs, 1)
    lookback = _make_lookback(1, 1)
    publish_aggregate, publish_inclusive, f32 = _make_publish(1, 1)
    i64 = numba.int64

    window = TUNING["lookback_window"]
    wlookback = _make_window_lookback(1, 1, nt, segs, 1, segs - 1)
    wx_size, wa_size = (nt, nt) if window else (1, 1)

    speculate = TUNING["speculate"]

    @cuda.jit(device=True, inline=True)
    def load_tile(a, u, ubuf, abuf, row, a_row, t0, n):
        for i in range(nv):
            tc = min(t0 + i * vec, n - vec)
            load_v(u, row * n + tc, ubuf, i * vw)
            load_v(a, a_row * n + tc, abuf, i * vw)

    def kernel(a, u, y, x0, flags, vals, x_probe, n, channels, head_dim, ngroups, nchunks,
               probe):
        tx = cuda.threadIdx.x
        col = tx // segs
        seg = tx % segs
        nchains = cuda.gridDim.x // nchunks
        g = cuda.blockIdx.x % nchains
        sm_t = cuda.shared.array(1, numba.int64)
        sm_x = cuda.shared.array(nt, f32)
        sm_a = cuda.shared.array(nt, f32)
        sm_c = cuda.shared.array(rows, f32)
        sm_wx = cuda.shared.array(wx_size, f32)
        sm_wa = cuda.shared.array(wa_size, f32)
        sm_st = cuda.shared.array(segs, numba.int64)
        row = g * rows + col  # flat (b, h, d)
        active = row < ngroups  # ngroups: the number of rows B * H * D here
        a_row = row // head_dim if per_head else row
        ubuf = cuda.local.array(buf_size, raw)
        abuf = cuda.local.array(buf_size, raw)
        guess = cuda.blockIdx.x // nchains if speculate else -1  # as the BLHD kernel
        if active and guess >= 0:
            load_tile(a, u, ubuf, abuf, row, a_row, (guess * segs + seg) * steps, n)
        if tx == 0:
            raw_t = cuda.atomic.add(flags, g, 1)
            sm_t[0] = raw_t
            if (raw_t & 0xFFFFFFFF) == nchunks - 1:
                cuda.atomic.add(flags, g, (i64(1) << EPOCH_SHIFT) - nchunks)
        cuda.syncthreads()
        raw_t = sm_t[0]
        epoch = raw_t >> EPOCH_SHIFT
        chunk = raw_t & 0xFFFFFFFF
        t0 = (chunk * segs + seg) * steps
        if active and chunk != guess:
            load_tile(a, u, ubuf, abuf, row, a_row, t0, n)

        X = cuda.local.array(1, f32)
        A = cuda.local.array(1, f32)
        uf = cuda.local.array(vec, f32)
        af = cuda.local.array(vec, f32)
        X[0] = f32(0.0)
        A[0] = f32(1.0)
        if active:
            for i in range(nv):
                unpack_v(ubuf, i * vw, uf, 0)
                unpack_v(abuf, i * vw, af, 0)
                for k in range(vec):
                    if t0 + i * vec + k < n:
                        X[0] = af[k] * X[0] + uf[k]
                        A[0] = A[0] * af[k]
        scan(X, A, sm_x, sm_a, tx, seg)

        fbase = nchains + g * nchunks
        vbase = (g * nchunks + chunk) * (3 * rows)
        carry = cuda.local.array(1, f32)
        last = seg == segs - 1
        if last and active:
            if chunk == 0:
                carry[0] = x0[row]
                publish_inclusive(vals, vbase, col, rows, A, X, carry)
            else:
                publish_aggregate(vals, vbase, col, rows, A, X)
            cuda.threadfence()
        cuda.syncthreads()
        if tx == 0:
            cuda.atomic.max(flags, fbase + chunk,
                            epoch * 4 + (INCLUSIVE if chunk == 0 else AGGREGATE))
        if window and chunk > 0:
            wlookback(flags, vals, fbase + chunk - 1, vbase - 3 * rows, 3 * rows, col, rows, epoch,
                      chunk, tx, seg, active, sm_wx, sm_wa, sm_st, carry)
        if last and active:
            if chunk > 0:
                if not window:
                    lookback(flags, vals, fbase + chunk - 1, vbase - 3 * rows, 3 * rows, col, rows,
                             epoch, carry)
                publish_inclusive(vals, vbase, col, rows, A, X, carry)
                cuda.threadfence()
            sm_c[col] = carry[0]
        cuda.syncthreads()
        if tx == 0 and chunk > 0 and inclusive_flags:
            cuda.atomic.max(flags, fbase + chunk, epoch * 4 + INCLUSIVE)
        if not (active and store):
            return
        c = sm_c[col]
        if seg > 0:
            c = sm_a[tx - 1] * c + sm_x[tx - 1]
        x = c
        out = cuda.local.array(vec, f32)
        for i in range(nv):
            t = t0 + i * vec
            if t < n:
                unpack_v(ubuf, i * vw, uf, 0)
                unpack_v(abuf, i * vw, af, 0)
                for k in range(vec):
                    x = af[k] * x + uf[k]
                    out[k] = x
                    if t + k == probe:
                        x_probe[row] = x
                if vec == 1 or t + vec <= n:
                    store_y(y, row * n + t, out, 0)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_exact_bhdl_{in_kind}_to_{out_kind}_{'per_head' if per_head else 'per_channel'}"
        f"_vec{vec}_rows{rows}_segs{segs}_nv{nv}{'' if store else '_carries'}"
    )
    return cuda.jit(kernel)


# --------------------------------------------------------------------------------------------
# backward: the adjoint scan in reverse, from the forward's per-tile carries
#
# With mu_t = a_t lam_t, the adjoint lam_t = dy_t + a_{t+1} lam_{t+1} of docs/spec.md#gradients
# (hops=None) becomes lam_t = dy_t + mu_{t+1}, mu_t = a_t lam_t: a segment maps the mu after it
# to the mu at its start by (prod a, local mu), the forward's operator run back in time. Then
# du_t = lam_t, da_t = lam_t x_{t-1} (x_{-1} = x0; per head summed over the head's channels) and
# dx0 = mu_0. The x the tile needs come from the carries kernel (the forward kernel storing no y:
# ``carries[tile c - 1]`` is x at the end of the tile before, ``x0`` for the first), walked
# forward through the registers; the mu entering each tile comes from the decoupled look-back
# over the tiles after it (tickets hand chunks out last first).


def _make_blhd_backward(kind, per_head, vec, cols, segs, steps):
    """BLHD backward tile: as the forward (``cols * vec`` channels times ``segs * steps`` tokens),
    reading ``a``, ``u``, ``dy`` (one storage kind) and writing ``du`` (u's), ``da`` (a's; per
    head the sum over the head's ``D / vec`` threads, through shared memory: the tile holds
    whole heads)."""
    inclusive_flags = TUNING["inclusive_flags"]
    load_u, unpack_u, uw, raw = _raw_access(kind, vec)
    a_width = 1 if per_head else vec
    load_a, unpack_a, aw, _ = _raw_access(kind, a_width)
    load_a1 = LOAD[kind]
    store_v = make_vector_store(kind, vec)
    store_1 = STORE[kind]
    nt = cols * segs
    G = cols * vec
    sx_size, sa_size = nt * vec, nt * a_width
    u_size, a_size, x_size, d_size = steps * uw, steps * aw, steps * vec, steps * nt
    scan_f = _make_tile_scan(vec, a_width, nt, segs, cols)
    scan_r = _make_tile_scan(vec, a_width, nt, segs, cols, reverse=True)
    lookback = _make_lookback(vec, a_width)
    publish_aggregate, publish_inclusive, f32 = _make_publish(vec, a_width)
    i64 = numba.int64

    window = TUNING["lookback_window"]
    wlookback = _make_window_lookback(vec, a_width, nt, segs, cols, 0)
    wx_size, wa_size = (sx_size, sa_size) if window else (1, 1)

    speculate = TUNING["speculate"]

    @cuda.jit(device=True, inline=True)
    def load_tile(a, u, dy, ubuf, dbuf, abuf, af1, row0, t0, n, channels, a_stride, a_col, c0):
        for i in range(steps):
            tc = min(t0 + i, n - 1)
            load_u(u, (row0 + tc) * channels + c0, ubuf, i * uw)
            load_u(dy, (row0 + tc) * channels + c0, dbuf, i * uw)
            if per_head:
                af1[i] = load_a1(a[(row0 + tc) * a_stride + a_col])
            else:
                load_a(a, (row0 + tc) * a_stride + a_col, abuf, i * aw)

    def kernel(a, u, dy, du, da, x0, dx0, carries, flags, vals, n, channels, head_dim, ngroups,
               nchunks, want_dx0):
        tx = cuda.threadIdx.x
        col = tx % cols
        seg = tx // cols
        nchains = cuda.gridDim.x // nchunks
        g = cuda.blockIdx.x % nchains
        sm_t = cuda.shared.array(1, numba.int64)
        sm_x = cuda.shared.array(sx_size, f32)
        sm_a = cuda.shared.array(sa_size, f32)
        sm_c = cuda.shared.array(G, f32)
        sm_wx = cuda.shared.array(wx_size, f32)
        sm_wa = cuda.shared.array(wa_size, f32)
        sm_st = cuda.shared.array(segs, numba.int64)
        sm_d = cuda.shared.array(d_size, f32)
        b = g // ngroups
        c0 = (g % ngroups) * G + col * vec
        active = c0 < channels
        if per_head:
            a_stride = channels // head_dim
            a_col = c0 // head_dim
        else:
            a_stride = channels
            a_col = c0
        ubuf = cuda.local.array(u_size, raw)
        dbuf = cuda.local.array(u_size, raw)
        abuf = cuda.local.array(a_size, raw)
        af1 = cuda.local.array(steps, f32)
        # as the forward: the likely chunk's loads in flight while the ticket is drawn
        guess = nchunks - 1 - cuda.blockIdx.x // nchains if speculate else -1
        if active and guess >= 0:
            load_tile(a, u, dy, ubuf, dbuf, abuf, af1, b * n, (guess * segs + seg) * steps, n,
                      channels, a_stride, a_col, c0)
        if tx == 0:
            raw_t = cuda.atomic.add(flags, g, 1)
            sm_t[0] = raw_t
            if (raw_t & 0xFFFFFFFF) == nchunks - 1:
                cuda.atomic.add(flags, g, (i64(1) << EPOCH_SHIFT) - nchunks)
        cuda.syncthreads()
        raw_t = sm_t[0]
        epoch = raw_t >> EPOCH_SHIFT
        ticket = raw_t & 0xFFFFFFFF
        chunk = nchunks - 1 - ticket  # the last chunk first
        t0 = (chunk * segs + seg) * steps
        if active and chunk != guess:
            load_tile(a, u, dy, ubuf, dbuf, abuf, af1, b * n, t0, n, channels, a_stride, a_col,
                      c0)

        X = cuda.local.array(vec, f32)
        A = cuda.local.array(a_width, f32)
        uf = cuda.local.array(vec, f32)
        af = cuda.local.array(a_width, f32)
        # forward: x entering each segment, from the carry entering the tile
        for k in range(vec):
            X[k] = f32(0.0)
        for q in range(a_width):
            A[q] = f32(1.0)
        if active:
            for i in range(steps):
                if t0 + i < n:
                    unpack_u(ubuf, i * uw, uf, 0)
                    if per_head:
                        af[0] = af1[i]
                    else:
                        unpack_a(abuf, i * aw, af, 0)
                    for k in range(vec):
                        X[k] = af[k % a_width] * X[k] + uf[k]
                    for q in range(a_width):
                        A[q] = A[q] * af[q]
        scan_f(X, A, sm_x, sm_a, tx, seg)
        xs = cuda.local.array(x_size, f32)  # x_{t-1} of each token
        x = cuda.local.array(vec, f32)
        if active:
            for k in range(vec):
                if chunk == 0:
                    c = x0[b * channels + c0 + k]
                else:
                    c = carries[(g * nchunks + chunk - 1) * (3 * G) + 2 * G + col * vec + k]
                if seg > 0:
                    c = sm_a[(k % a_width) * nt + tx - cols] * c + sm_x[k * nt + tx - cols]
                x[k] = c
            for i in range(steps):
                unpack_u(ubuf, i * uw, uf, 0)
                if per_head:
                    af[0] = af1[i]
                else:
                    unpack_a(abuf, i * aw, af, 0)
                for k in range(vec):
                    xs[i * vec + k] = x[k]
                    x[k] = af[k % a_width] * x[k] + uf[k]
        cuda.syncthreads()  # the shared arrays are reused by the reverse scan

        # reverse: the segment's (prod a, local mu)
        for k in range(vec):
            X[k] = f32(0.0)
        for q in range(a_width):
            A[q] = f32(1.0)
        if active:
            for j in range(steps):
                i = steps - 1 - j
                if t0 + i < n:
                    unpack_u(dbuf, i * uw, uf, 0)
                    if per_head:
                        af[0] = af1[i]
                    else:
                        unpack_a(abuf, i * aw, af, 0)
                    for k in range(vec):
                        X[k] = af[k % a_width] * (uf[k] + X[k])
                    for q in range(a_width):
                        A[q] = A[q] * af[q]
        scan_r(X, A, sm_x, sm_a, tx, seg)

        fbase = nchains + g * nchunks
        vbase = (g * nchunks + ticket) * (3 * G)
        off = col * vec
        carry = cuda.local.array(vec, f32)
        first = seg == 0
        if first and active:
            if ticket == 0:
                for k in range(vec):
                    carry[k] = f32(0.0)
                publish_inclusive(vals, vbase, off, G, A, X, carry)
            else:
                publish_aggregate(vals, vbase, off, G, A, X)
            cuda.threadfence()
        cuda.syncthreads()
        if tx == 0:
            cuda.atomic.max(flags, fbase + ticket,
                            epoch * 4 + (INCLUSIVE if ticket == 0 else AGGREGATE))
        if window and ticket > 0:
            wlookback(flags, vals, fbase + ticket - 1, vbase - 3 * G, 3 * G, off, G, epoch, ticket,
                      tx, seg, active, sm_wx, sm_wa, sm_st, carry)
        if first and active:
            if ticket > 0:
                if not window:
                    lookback(flags, vals, fbase + ticket - 1, vbase - 3 * G, 3 * G, off, G, epoch,
                             carry)
                publish_inclusive(vals, vbase, off, G, A, X, carry)
                cuda.threadfence()
            for k in range(vec):
                sm_c[off + k] = carry[k]
        cuda.syncthreads()
        if tx == 0 and ticket > 0 and inclusive_flags:
            cuda.atomic.max(flags, fbase + ticket, epoch * 4 + INCLUSIVE)

        out = cuda.local.array(vec, f32)
        dav = cuda.local.array(vec, f32)
        if active:
            for k in range(vec):
                c = sm_c[off + k]
                if seg < segs - 1:
                    c = sm_a[(k % a_width) * nt + tx + cols] * c + sm_x[k * nt + tx + cols]
                X[k] = c  # mu after the segment
            for j in range(steps):
                i = steps - 1 - j
                t = t0 + i
                if t < n:
                    unpack_u(dbuf, i * uw, uf, 0)
                    if per_head:
                        af[0] = af1[i]
                    else:
                        unpack_a(abuf, i * aw, af, 0)
                    part = f32(0.0)
                    for k in range(vec):
                        lam = uf[k] + X[k]
                        out[k] = lam
                        dav[k] = lam * xs[i * vec + k]
                        part += dav[k]
                        X[k] = af[k % a_width] * lam
                    store_v(du, (b * n + t) * channels + c0, out, 0)
                    if per_head:
                        sm_d[i * nt + tx] = part
                    else:
                        store_v(da, (b * n + t) * a_stride + a_col, dav, 0)
            if want_dx0 != 0 and chunk == 0 and seg == 0:
                for k in range(vec):
                    dx0[b * channels + c0 + k] = X[k]
        if per_head:
            cuda.syncthreads()
            lph = head_dim // vec
            if active and col % lph == 0:
                for i in range(steps):
                    t = t0 + i
                    if t < n:
                        total = f32(0.0)
                        for m in range(lph):
                            total += sm_d[i * nt + tx + m]
                        da[(b * n + t) * a_stride + a_col] = store_1(total)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_exact_backward_blhd_{kind}_{'per_head' if per_head else 'per_channel'}"
        f"_vec{vec}_cols{cols}_segs{segs}_steps{steps}"
    )
    return cuda.jit(kernel)


def _make_bhdl_backward(kind, per_head, vec, rows, segs, nv):
    """BHDL backward tile: ``rows`` channel rows (per head: one head's ``D`` rows, so the head's
    ``da`` is summed in shared memory) times ``segs * nv * vec`` tokens."""
    inclusive_flags = TUNING["inclusive_flags"]
    load_v, unpack_v, vw, raw = _raw_access(kind, vec)
    store_v = make_vector_store(kind, vec)
    store_1 = STORE[kind]
    nt = rows * segs
    steps = nv * vec
    tile_t = segs * steps
    buf_size, d_size = nv * vw, rows * tile_t
    scan_f = _make_tile_scan(1, 1, nt, segs, 1)
    scan_r = _make_tile_scan(1, 1, nt, segs, 1, reverse=True)
    lookback = _make_lookback(1, 1)
    publish_aggregate, publish_inclusive, f32 = _make_publish(1, 1)
    i64 = numba.int64

    window = TUNING["lookback_window"]
    wlookback = _make_window_lookback(1, 1, nt, segs, 1, 0)
    wx_size, wa_size = (nt, nt) if window else (1, 1)

    speculate = TUNING["speculate"]

    @cuda.jit(device=True, inline=True)
    def load_tile(a, u, dy, ubuf, dbuf, abuf, row, a_row, t0, n):
        for i in range(nv):
            tc = min(t0 + i * vec, n - vec)
            load_v(u, row * n + tc, ubuf, i * vw)
            load_v(dy, row * n + tc, dbuf, i * vw)
            load_v(a, a_row * n + tc, abuf, i * vw)

    def kernel(a, u, dy, du, da, x0, dx0, carries, flags, vals, n, channels, head_dim, ngroups,
               nchunks, want_dx0):
        tx = cuda.threadIdx.x
        col = tx // segs
        seg = tx % segs
        nchains = cuda.gridDim.x // nchunks
        g = cuda.blockIdx.x % nchains
        sm_t = cuda.shared.array(1, numba.int64)
        sm_x = cuda.shared.array(nt, f32)
        sm_a = cuda.shared.array(nt, f32)
        sm_c = cuda.shared.array(rows, f32)
        sm_wx = cuda.shared.array(wx_size, f32)
        sm_wa = cuda.shared.array(wa_size, f32)
        sm_st = cuda.shared.array(segs, numba.int64)
        sm_d = cuda.shared.array(d_size, f32)
        row = g * rows + col
        active = row < ngroups
        a_row = row // head_dim if per_head else row
        ubuf = cuda.local.array(buf_size, raw)
        dbuf = cuda.local.array(buf_size, raw)
        abuf = cuda.local.array(buf_size, raw)
        guess = nchunks - 1 - cuda.blockIdx.x // nchains if speculate else -1
        if active and guess >= 0:
            load_tile(a, u, dy, ubuf, dbuf, abuf, row, a_row, (guess * segs + seg) * steps, n)
        if tx == 0:
            raw_t = cuda.atomic.add(flags, g, 1)
            sm_t[0] = raw_t
            if (raw_t & 0xFFFFFFFF) == nchunks - 1:
                cuda.atomic.add(flags, g, (i64(1) << EPOCH_SHIFT) - nchunks)
        cuda.syncthreads()
        raw_t = sm_t[0]
        epoch = raw_t >> EPOCH_SHIFT
        ticket = raw_t & 0xFFFFFFFF
        chunk = nchunks - 1 - ticket
        t0 = (chunk * segs + seg) * steps
        if active and chunk != guess:
            load_tile(a, u, dy, ubuf, dbuf, abuf, row, a_row, t0, n)

        X = cuda.local.array(1, f32)
        A = cuda.local.array(1, f32)
        uf = cuda.local.array(vec, f32)
        af = cuda.local.array(vec, f32)
        X[0] = f32(0.0)
        A[0] = f32(1.0)
        if active:
            for i in range(nv):
                unpack_v(ubuf, i * vw, uf, 0)
                unpack_v(abuf, i * vw, af, 0)
                for k in range(vec):
                    if t0 + i * vec + k < n:
                        X[0] = af[k] * X[0] + uf[k]
                        A[0] = A[0] * af[k]
        scan_f(X, A, sm_x, sm_a, tx, seg)
        xs = cuda.local.array(steps, f32)
        if active:
            if chunk == 0:
                x = x0[row]
            else:
                x = carries[(g * nchunks + chunk - 1) * (3 * rows) + 2 * rows + col]
            if seg > 0:
                x = sm_a[tx - 1] * x + sm_x[tx - 1]
            for i in range(nv):
                unpack_v(ubuf, i * vw, uf, 0)
                unpack_v(abuf, i * vw, af, 0)
                for k in range(vec):
                    xs[i * vec + k] = x
                    x = af[k] * x + uf[k]
        cuda.syncthreads()

        X[0] = f32(0.0)
        A[0] = f32(1.0)
        if active:
            for j in range(nv):
                i = nv - 1 - j
                unpack_v(dbuf, i * vw, uf, 0)
                unpack_v(abuf, i * vw, af, 0)
                for kk in range(vec):
                    k = vec - 1 - kk
                    if t0 + i * vec + k < n:
                        X[0] = af[k] * (uf[k] + X[0])
                        A[0] = A[0] * af[k]
        scan_r(X, A, sm_x, sm_a, tx, seg)

        fbase = nchains + g * nchunks
        vbase = (g * nchunks + ticket) * (3 * rows)
        carry = cuda.local.array(1, f32)
        first = seg == 0
        if first and active:
            if ticket == 0:
                carry[0] = f32(0.0)
                publish_inclusive(vals, vbase, col, rows, A, X, carry)
            else:
                publish_aggregate(vals, vbase, col, rows, A, X)
            cuda.threadfence()
        cuda.syncthreads()
        if tx == 0:
            cuda.atomic.max(flags, fbase + ticket,
                            epoch * 4 + (INCLUSIVE if ticket == 0 else AGGREGATE))
        if window and ticket > 0:
            wlookback(flags, vals, fbase + ticket - 1, vbase - 3 * rows, 3 * rows, col, rows,
                      epoch, ticket, tx, seg, active, sm_wx, sm_wa, sm_st, carry)
        if first and active:
            if ticket > 0:
                if not window:
                    lookback(flags, vals, fbase + ticket - 1, vbase - 3 * rows, 3 * rows, col,
                             rows, epoch, carry)
                publish_inclusive(vals, vbase, col, rows, A, X, carry)
                cuda.threadfence()
            sm_c[col] = carry[0]
        cuda.syncthreads()
        if tx == 0 and ticket > 0 and inclusive_flags:
            cuda.atomic.max(flags, fbase + ticket, epoch * 4 + INCLUSIVE)

        out = cuda.local.array(vec, f32)
        dav = cuda.local.array(vec, f32)
        if active:
            mu = sm_c[col]
            if seg < segs - 1:
                mu = sm_a[tx + 1] * mu + sm_x[tx + 1]
            for j in range(nv):
                i = nv - 1 - j
                t = t0 + i * vec
                unpack_v(dbuf, i * vw, uf, 0)
                unpack_v(abuf, i * vw, af, 0)
                for kk in range(vec):
                    k = vec - 1 - kk
                    if t + k < n:
                        lam = uf[k] + mu
                        out[k] = lam
                        dav[k] = lam * xs[i * vec + k]
                        mu = af[k] * lam
                    else:
                        out[k] = f32(0.0)
                        dav[k] = f32(0.0)
                    if per_head:
                        sm_d[col * tile_t + seg * steps + i * vec + k] = dav[k]
                if t < n:
                    store_v(du, row * n + t, out, 0)
                    if not per_head:
                        store_v(da, row * n + t, dav, 0)
            if want_dx0 != 0 and chunk == 0 and seg == 0:
                dx0[row] = mu
        if per_head:
            # the tile is one head's rows: sum them per token, coalesced along time
            cuda.syncthreads()
            head = g
            tbase = chunk * tile_t
            for p in range(tx, tile_t, nt):
                t = tbase + p
                if t < n:
                    total = f32(0.0)
                    for r in range(rows):
                        total += sm_d[r * tile_t + p]
                    da[head * n + t] = store_1(total)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_exact_backward_bhdl_{kind}_{'per_head' if per_head else 'per_channel'}"
        f"_vec{vec}_rows{rows}_segs{segs}_nv{nv}"
    )
    return cuda.jit(kernel)


# --------------------------------------------------------------------------------------------
# plans and entry point

_kernels: dict = {}


def get_backward_kernel(layout, kind, per_head, vec, *shape):
    key = ("backward", layout, kind, per_head, vec, TUNING["inclusive_flags"],
           TUNING["lookback_window"], TUNING["warp_scan"], TUNING["speculate"]) + tuple(shape)
    kernel = _kernels.get(key)
    if kernel is None:
        factory = _make_blhd_backward if layout == "BLHD" else _make_bhdl_backward
        kernel = _kernels[key] = factory(kind, per_head, vec, *shape)
    return kernel


def get_kernel(layout, in_kind, out_kind, per_head, vec, *shape):
    key = (layout, in_kind, out_kind, per_head, vec, TUNING["inclusive_flags"],
           TUNING["lookback_window"], TUNING["warp_scan"], TUNING["speculate"]) + tuple(shape)
    kernel = _kernels.get(key)
    if kernel is None:
        factory = _make_blhd_kernel if layout == "BLHD" else _make_bhdl_kernel
        kernel = _kernels[key] = factory(in_kind, out_kind, per_head, vec, *shape)
    return kernel


def _vec_for(kind):
    return max(1, TUNING["access_bytes"] // ITEM_SIZE[kind])


def choose_vec(layout, in_kind, out_kind, per_head, n, channels, head_dim, align=(0, 0)):
    """Elements per access: 16 bytes where shapes and the data addresses allow it, else 1.
    ``align``: the addresses modulo 16 of the inputs (a | u) and of y."""
    vec = _vec_for(in_kind)
    in_bytes, out_bytes = vec * ITEM_SIZE[in_kind], min(16, vec * ITEM_SIZE[out_kind])
    if align[0] % in_bytes or align[1] % out_bytes:
        return 1
    if layout == "BLHD":
        ok = channels % vec == 0 and (not per_head or head_dim % vec == 0)
    else:
        ok = n % vec == 0
    return vec if ok else 1


def _general_blhd(cols, segs, in_kind):
    """(cols, segs) of the one-channel BLHD kernel: the tile's bytes a row, its thread count."""
    wide = cols * _vec_for(in_kind)
    return wide, max(1, (cols * segs) // wide)


class Plan:
    """One launch's kernel, grid, block and scalars, and the workspace sizes it needs."""

    __slots__ = ("kernel", "grid", "block", "scalars", "nchains", "nchunks", "nvals", "entry",
                 "values")

    def __init__(self, kernel, grid, block, scalars, nchains, nchunks, nvals):
        self.kernel, self.grid, self.block, self.scalars = kernel, grid, block, scalars
        self.nchains, self.nchunks, self.nvals = nchains, nchunks, nvals
        self.entry = self.values = None

    @property
    def nflags(self):
        return self.nchains * (1 + self.nchunks)


def _dims(layout, shape):
    """(batch, n, heads, head_dim) of u's canonical shape."""
    if layout == "BHDL":
        batch, heads, head_dim, n = shape
    else:
        batch, n, heads, head_dim = shape
    return batch, n, heads, head_dim


def _geometry(layout, in_kind, vec, per_head, head_dim, backward):
    """The tile shape: BLHD (cols, segs, steps), BHDL (rows, segs, nv). The backward keeps
    ``x_{t-1}`` of its tokens in registers, so its segments are shorter (``*_bwd_*``); its BHDL
    per-head tiles are one head's rows (the head's da is summed in the tile)."""
    if layout == "BLHD":
        cols, segs = TUNING["blhd_cols"], TUNING["blhd_segs"]
        steps = TUNING["blhd_bwd_steps" if backward else "blhd_steps"]
        if vec == 1:  # one channel a thread: more columns, as many threads
            cols, segs = _general_blhd(cols, segs, in_kind)
        return cols, segs, steps
    rows, segs = TUNING["bhdl_rows"], TUNING["bhdl_segs"]
    nv = TUNING["bhdl_bwd_nv" if backward else "bhdl_nv"]
    if backward and per_head:
        rows, segs = head_dim, max(1, rows * segs // head_dim)
    if vec == 1:
        nv = nv * _vec_for(in_kind)
    return rows, segs, nv


def _plan_of(kernel, layout, shape, geometry, vec):
    batch, n, heads, head_dim = _dims(layout, shape)
    channels = heads * head_dim
    if layout == "BLHD":
        cols, segs, steps = geometry
        group = cols * vec
        ngroups = -(-channels // group)
        nchains = batch * ngroups
        nchunks = -(-n // (segs * steps))
        block = cols * segs
        scalar_groups = ngroups
    else:
        group, segs, nv = geometry
        nrows = batch * channels
        nchains = -(-nrows // group)
        nchunks = -(-n // (segs * nv * vec))
        block = group * segs
        scalar_groups = nrows
    nvals = nchains * nchunks * STATUS_VALUES * group
    scalars = [np.int64(x) for x in (n, channels, head_dim, scalar_groups, nchunks)]
    return Plan(kernel, nchains * nchunks, block, scalars, nchains, nchunks, nvals)


def make_plan(layout, shape, per_head, in_kind, out_kind, align=(0, 0)):
    """The launch of the exact scan for canonical ``shape`` (u's) and storage kinds."""
    _, n, heads, head_dim = _dims(layout, shape)
    vec = choose_vec(layout, in_kind, out_kind, per_head, n, heads * head_dim, head_dim, align)
    geometry = _geometry(layout, in_kind, vec, per_head, head_dim, False)
    kernel = get_kernel(layout, in_kind, out_kind, per_head, vec, *geometry)
    return _plan_of(kernel, layout, shape, geometry, vec)


def backward_fits(layout, shape, per_head, kind, align=0):
    """Whether :func:`swr_exact_vjp` takes this problem: per-head coefficients need the head's
    channels inside one tile (BLHD: the tile's channel group a multiple of D; BHDL: D <= 32)."""
    if not per_head:
        return True
    _, n, heads, head_dim = _dims(layout, shape)
    if layout == "BHDL":
        return head_dim <= 32
    vec = choose_vec(layout, kind, kind, per_head, n, heads * head_dim, head_dim, (align, align))
    cols = _geometry(layout, kind, vec, per_head, head_dim, True)[0]
    return (cols * vec) % head_dim == 0


def make_backward_plans(layout, shape, per_head, kind, align=0):
    """(carries plan, backward plan): the forward kernel storing no y at the backward's tiles,
    then the reverse scan. ``align``: every data address OR-ed, modulo 16."""
    _, n, heads, head_dim = _dims(layout, shape)
    vec = choose_vec(layout, kind, kind, per_head, n, heads * head_dim, head_dim, (align, align))
    geometry = _geometry(layout, kind, vec, per_head, head_dim, True)
    carries = get_kernel(layout, kind, kind, per_head, vec, *geometry, False)
    backward = get_backward_kernel(layout, kind, per_head, vec, *geometry)
    return (_plan_of(carries, layout, shape, geometry, vec),
            _plan_of(backward, layout, shape, geometry, vec))


_workspaces: dict = {}


def _stream_id(stream):
    """The CUDA stream handle a launch on ``stream`` uses (CuPy's current one for None)."""
    if stream is None:
        import cupy

        return cupy.cuda.get_current_stream().ptr
    return getattr(stream, "ptr", stream)


def workspace(xp, plan, device=None, role="forward", stream=0):
    """(flags, vals) for ``plan``: zeroed once, then kept per (device, stream, role, sizes) and
    reused by every launch on that stream (the epochs in the flags make clearing unnecessary).
    Never freed: a CUDA graph that captured a launch keeps pointing at them. The backward's two
    kernels take roles "carries" and "backward": the second reads the first's values."""
    key = (device, stream, role, plan.nchains, plan.nchunks, plan.nvals)
    ws = _workspaces.get(key)
    if ws is None:
        if xp is np:
            ws = (np.zeros(plan.nflags, np.int64), np.zeros(max(1, plan.nvals), np.float32))
        else:
            with xp.cuda.using_allocator(xp.get_default_memory_pool().malloc):
                ws = (xp.zeros(plan.nflags, np.int64), xp.zeros(max(1, plan.nvals), np.float32))
        _workspaces[key] = ws
    return ws


def _host_flat(x):
    x = x.reshape(-1)
    return x.view(np.uint16) if x.dtype.name == "bfloat16" else x


_plans: dict = {}


def swr_exact(a, u, y, x0, *, layout, probe=-1, x_probe=None, stream=None):
    """``y`` = the exact recurrence over ``u`` with coefficients ``a`` from ``x0``.

    Canonical C-contiguous arrays (docs/internals.md): BLHD ``u``, ``y`` (B, N, H, D), ``a``
    (B, N, H) or u's shape; BHDL ``u``, ``y`` (B, H, D, N), ``a`` (B, H, N) or u's shape; ``x0``
    (B, H, D) float32. ``a``/``u`` float32, float16 or bfloat16 (uint16 bits), ``y`` any of the
    three, not overlapping the inputs. With ``x_probe`` ((B, H, D) float32), x at step ``probe``
    (0 <= probe < N) is written there in float32 (what a state needs). One launch on ``stream``
    (CuPy's current one by default); NumPy arrays run in the CUDA simulator. Returns None.
    """
    shape = u.shape
    if 0 in shape:
        return
    per_head = len(a.shape) == 3
    if x_probe is None:
        x_probe, probe = x0, -1  # never written
    probe = np.int64(probe)
    if isinstance(u, np.ndarray):
        args = [_host_flat(x) for x in (a, u, y, x0)]
        in_kind, out_kind = _KINDS[args[1].dtype], _KINDS[args[2].dtype]
        plan = make_plan(layout, shape, per_head, in_kind, out_kind)
        flags, vals = workspace(np, plan)
        launch(plan.kernel, plan.grid, plan.block,
               args + [flags, vals, x_probe.reshape(-1)] + plan.scalars + [probe])
        return
    import cupy

    device = cupy.cuda.runtime.getDevice()
    sid = _stream_id(stream)
    arrays = [a, u, y, x0]
    ptrs = [data_pointer(x) for x in arrays]
    align = ((ptrs[0] | ptrs[1]) & 15, ptrs[2] & 15)
    key = (device, layout, shape, per_head, u.dtype, y.dtype, align, TUNING.version)
    plan = _plans.get(key)
    if plan is None:
        in_kind = _KINDS[np.dtype(FlatArray(0, 0, u.dtype).dtype)]
        out_kind = _KINDS[np.dtype(FlatArray(0, 0, y.dtype).dtype)]
        plan = make_plan(layout, shape, per_head, in_kind, out_kind, align)
        flags, vals = workspace(cupy, plan, device, stream=sid)
        plan.entry, plan.values = prepare(
            plan.kernel, [FlatArray.of(x) for x in arrays] + [flags, vals, FlatArray.of(x0)]
            + plan.scalars + [np.int64(-1)])
        if len(_plans) > 256:
            _plans.clear()
        _plans[key] = plan
    flags, vals = workspace(cupy, plan, device, stream=sid)
    values = plan.values
    if probe >= 0:
        values = values[:]
        values[-1] = probe
    launch_with_pointers(plan.entry, plan.grid, plan.block, values,
                         ptrs + [flags.data.ptr, vals.data.ptr, data_pointer(x_probe)], stream)


_bwd_plans: dict = {}


def swr_exact_vjp(a, u, dy, du, da, x0, dx0, *, layout, stream=None):
    """Gradients of ``sum(dy * y)`` for the exact recurrence (docs/spec.md#gradients): writes
    ``du`` (u's shape and dtype), ``da`` (a's; per head summed over the head's channels) and,
    when ``dx0`` is not None, ``dx0`` (B, H, D) float32.

    Canonical C-contiguous arrays as :func:`swr_exact`; ``a``, ``u``, ``dy`` of one storage kind;
    ``x0`` (B, H, D) float32 (zeros for none). Assumes :func:`backward_fits`. Two launches on
    ``stream``: the forward kernel storing no y (each tile's final x, the carries), then the
    reverse chained scan reading a, u, dy once and writing du, da. Returns None.
    """
    shape = u.shape
    if 0 in shape:
        return
    per_head = len(a.shape) == 3
    want = np.int64(0 if dx0 is None else 1)
    if isinstance(u, np.ndarray):
        dx0 = np.zeros(1, np.float32) if dx0 is None else dx0
        flat = [_host_flat(x) for x in (a, u, dy, du, da, x0, dx0)]
        kind = _KINDS[flat[1].dtype]
        fplan, bplan = make_backward_plans(layout, shape, per_head, kind)
        f_flags, f_vals = workspace(np, fplan, role="carries")
        b_flags, b_vals = workspace(np, bplan, role="backward")
        launch(fplan.kernel, fplan.grid, fplan.block,
               [flat[0], flat[1], flat[1], flat[5], f_flags, f_vals, flat[5]] + fplan.scalars
               + [np.int64(-1)])
        launch(bplan.kernel, bplan.grid, bplan.block,
               flat + [f_vals, b_flags, b_vals] + bplan.scalars + [want])
        return
    import cupy

    device = cupy.cuda.runtime.getDevice()
    sid = _stream_id(stream)
    if dx0 is None:
        dx0 = x0  # not written (want_dx0 0)
    arrays = [a, u, dy, du, da, x0, dx0]
    ptrs = [data_pointer(x) for x in arrays]
    align = (ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3] | ptrs[4]) & 15
    key = (device, layout, shape, per_head, u.dtype, align, TUNING.version)
    plans = _bwd_plans.get(key)
    if plans is None:
        kind = _KINDS[np.dtype(FlatArray(0, 0, u.dtype).dtype)]
        fplan, bplan = make_backward_plans(layout, shape, per_head, kind, align)
        f_flags, f_vals = workspace(cupy, fplan, device, "carries", sid)
        b_flags, b_vals = workspace(cupy, bplan, device, "backward", sid)
        flat = [FlatArray.of(x) for x in arrays]
        fplan.entry, fplan.values = prepare(
            fplan.kernel, [flat[0], flat[1], flat[1], flat[5], f_flags, f_vals, flat[5]]
            + fplan.scalars + [np.int64(-1)])
        bplan.entry, bplan.values = prepare(
            bplan.kernel, flat + [f_vals, b_flags, b_vals] + bplan.scalars + [np.int64(0)])
        if len(_bwd_plans) > 256:
            _bwd_plans.clear()
        plans = _bwd_plans[key] = (fplan, bplan)
    fplan, bplan = plans
    f_flags, f_vals = workspace(cupy, fplan, device, "carries", sid)
    b_flags, b_vals = workspace(cupy, bplan, device, "backward", sid)
    launch_with_pointers(fplan.entry, fplan.grid, fplan.block, fplan.values,
                         [ptrs[0], ptrs[1], ptrs[1], ptrs[5], f_flags.data.ptr,
                          f_vals.data.ptr, ptrs[5]], stream)
    values = bplan.values[:]
    values[-1] = want
    launch_with_pointers(bplan.entry, bplan.grid, bplan.block, values,
                         ptrs + [f_vals.data.ptr, b_flags.data.ptr, b_vals.data.ptr], stream)


def signature(in_kind, out_kind):
    """The Numba signature of every exact-scan kernel for these storage kinds."""
    f32 = types.Array(types.float32, 1, "C")
    storage = {"f32": f32, "f16": types.Array(types.float16, 1, "C"),
               "bf16": types.Array(types.uint16, 1, "C")}  # fmt: skip
    return tuple([storage[in_kind]] * 2 + [storage[out_kind], f32,
                                           types.Array(types.int64, 1, "C"), f32, f32]
                 + [types.int64] * 6)


def specialisations():
    """``(name, kernel, signature)`` of the kernels the entry points launch under the current
    TUNING, for the PTX tests. Per layout: the forward of bf16 per head and per channel, three
    other dtype pairs (f32, f16 and bf16 loads and stores among them) and the one-channel
    kernel; the backward for every kind per head, bf16 per channel and its one-channel kernel;
    the carries kernel (the forward storing nothing) of bf16 per head. Then the BLHD forward and
    the BHDL backward with the other look-back and the other tile scan (names suffixed
    ``_window`` or ``_one``). The rest differ from these only in which loads or stores a kind or
    the per-head/per-channel choice compiles to."""
    fwd = [("bf16", "bf16", None, True), ("bf16", "bf16", None, False)]
    fwd += [("bf16", "f32", None, True), ("f32", "bf16", None, True), ("f16", "bf16", None, True),
            ("bf16", "bf16", 1, False)]
    bwd = [(i, None, True) for i in ("f32", "f16", "bf16")]
    bwd += [("bf16", None, False), ("bf16", 1, False)]
    for layout in ("BLHD", "BHDL"):
        for in_kind, out_kind, vec, per_head in fwd:
            vec = vec or _vec_for(in_kind)
            geometry = _geometry(layout, in_kind, vec, per_head, 16, False)
            kernel = get_kernel(layout, in_kind, out_kind, per_head, vec, *geometry)
            yield kernel.py_func.__name__, kernel, signature(in_kind, out_kind)
        for kind, vec, per_head in bwd:
            vec = vec or _vec_for(kind)
            geometry = _geometry(layout, kind, vec, per_head, 16, True)
            kernel = get_backward_kernel(layout, kind, per_head, vec, *geometry)
            yield kernel.py_func.__name__, kernel, backward_signature(kind)
        vec = _vec_for("bf16")
        geometry = _geometry(layout, "bf16", vec, True, 16, True)
        kernel = get_kernel(layout, "bf16", "bf16", True, vec, *geometry, False)
        yield kernel.py_func.__name__, kernel, signature("bf16", "bf16")
    # the other look-back (one tile at a time, or a window) and the other tile scan, bf16 per
    # head, forward and backward
    window, warp = TUNING["lookback_window"], TUNING["warp_scan"]
    built = []
    try:
        TUNING["lookback_window"] = not window
        TUNING["warp_scan"] = not warp
        vec = _vec_for("bf16")
        geometry = _geometry("BLHD", "bf16", vec, True, 16, False)
        built.append((get_kernel("BLHD", "bf16", "bf16", True, vec, *geometry),
                      signature("bf16", "bf16")))
        geometry = _geometry("BHDL", "bf16", vec, True, 16, True)
        built.append((get_backward_kernel("BHDL", "bf16", True, vec, *geometry),
                      backward_signature("bf16")))
    finally:
        TUNING["lookback_window"], TUNING["warp_scan"] = window, warp
    for kernel, sig in built:
        yield kernel.py_func.__name__ + ("_one" if window else "_window"), kernel, sig


def backward_signature(kind):
    """The Numba signature of the backward kernels for a storage kind."""
    f32 = types.Array(types.float32, 1, "C")
    storage = {"f32": f32, "f16": types.Array(types.float16, 1, "C"),
               "bf16": types.Array(types.uint16, 1, "C")}[kind]  # fmt: skip
    return tuple([storage] * 5 + [f32, f32, f32, types.Array(types.int64, 1, "C"), f32]
                 + [types.int64] * 6)


__all__ = ["TUNING", "backward_fits", "make_backward_plans", "make_plan", "specialisations",
           "swr_exact", "swr_exact_vjp", "workspace"]
