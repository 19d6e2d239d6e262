"""The exact recurrence (hops=None) in one pass: a chained scan with decoupled look-back.

``x_t = a_t x_{t-1} + u_t`` per channel, ``x_{-1} = x0`` (docs/spec.md#recurrence, ``hops=None``:
the block decomposition collapses to the plain recurrence, so ``block_len`` plays no part).

Work is cut into tiles: a group of channels (a *chain*) times a chunk of tokens. A thread block is
one tile. It takes its chunk's index from a per-chain ticket counter (an atomic add), so the
chunks of a chain start in sequence order whatever order the hardware schedules blocks in, and a
tile that waits for an earlier one never waits for a tile that has not started. A tile

1. loads its chunk of ``a`` and ``u`` once into registers (each thread a segment of ``steps``
   tokens of its channels, all loads in flight together);
2. scans them with carry 0: per segment, then across the tile's segments in shared memory, giving
   each channel's aggregate ``(A, X)`` (``A`` the product of ``a``, ``X`` the local ``x``), and
   publishes the aggregate with the flag AGGREGATE (chunk 0 publishes its inclusive value ``x``
   at once, from ``x0``);
3. looks back over its predecessors: each aggregate found is composed into the carry's map, until
   an INCLUSIVE value ``x`` ends the walk; publishes its own inclusive ``x`` with that flag;
4. re-walks its registers from the carry and writes ``y``.

So ``a`` and ``u`` are read once and ``y`` written once; the status traffic is three float32
values per channel and tile (a few per mille of the data).

Status buffers (``flags`` int64, ``vals`` float32, from :func:`workspace`) never need clearing:
``flags[g]`` is chain g's ticket word, ``epoch << 32 | ticket``; the tile that draws the chain's
last ticket moves it to ``(epoch + 1) << 32``, so the next launch on the same stream starts at
ticket 0 of the next epoch. A tile flag holds ``4 * epoch + status`` (1 aggregate, 2 inclusive),
so flags left by earlier launches never match. Nothing is read back to the host and nothing is
launched besides the kernel: calls can be captured in a CUDA graph. Launches sharing one
workspace must run one after the other (the front keeps one per device and shape).

Flags are read with atomics and values with ``ld.global.cg`` (L2, not the SM's L1) after a fence,
and written before a fence, a barrier and the flag (the CUB pattern).

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

from ._dtypes import ITEM_SIZE, LOAD, SIMULATOR
from ._launch import (
    FlatArray,
    Tuning,
    data_pointer,
    launch,
    launch_with_pointers,
    prepare,
)
from ._ptx import WORD_TYPE, make_vector_store, make_word_load, make_word_unpack

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
    "bhdl_nv": 2,
    "access_bytes": 16,
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


def _make_tile_scan(nch, a_width, nt, segs, seg_stride):
    """``scan(X, A, sm_x, sm_a, tx, seg)``: inclusive scan of the per-thread segment aggregates
    across the ``segs`` segments of each column (Hillis-Steele in shared memory); afterwards the
    shared arrays hold every thread's inclusive value (``sm_x[k * nt + tx]``)."""
    levels = max(0, (segs - 1).bit_length())

    @cuda.jit(device=True, inline=True)
    def scan(X, A, sm_x, sm_a, tx, seg):
        for i in range(levels):
            lev = 1 << i
            for k in range(nch):
                sm_x[k * nt + tx] = X[k]
            for q in range(a_width):
                sm_a[q * nt + tx] = A[q]
            cuda.syncthreads()
            if seg >= lev:
                src = tx - lev * seg_stride
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


def _make_blhd_kernel(in_kind, out_kind, per_head, vec, cols, segs, steps):
    """BLHD: ``u``, ``y`` (B, N, H, D) flat; ``a`` (B, N, H) per head (``vec | D``) or u's shape;
    ``x0`` (B, H, D) float32. A tile: ``cols * vec`` channels of one batch row times
    ``segs * steps`` tokens; grid ``nchains * nchunks`` blocks of ``cols * segs`` threads."""
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

    def kernel(a, u, y, x0, flags, vals, n, channels, head_dim, ngroups, nchunks):
        tx = cuda.threadIdx.x
        col = tx % cols
        seg = tx // cols
        nchains = cuda.gridDim.x // nchunks
        g = cuda.blockIdx.x % nchains
        sm_t = cuda.shared.array(1, numba.int64)
        sm_x = cuda.shared.array(sx_size, f32)
        sm_a = cuda.shared.array(sa_size, f32)
        sm_c = cuda.shared.array(G, f32)
        if tx == 0:
            raw_t = cuda.atomic.add(flags, g, 1)
            sm_t[0] = raw_t
            if (raw_t & 0xFFFFFFFF) == nchunks - 1:  # the chain's last ticket: next epoch
                cuda.atomic.add(flags, g, (i64(1) << EPOCH_SHIFT) - nchunks)
        cuda.syncthreads()
        raw_t = sm_t[0]
        epoch = raw_t >> EPOCH_SHIFT
        chunk = raw_t & 0xFFFFFFFF
        b = g // ngroups
        c0 = (g % ngroups) * G + col * vec
        active = c0 < channels
        if per_head:
            a_stride = channels // head_dim
            a_col = c0 // head_dim
        else:
            a_stride = channels
            a_col = c0
        t0 = (chunk * segs + seg) * steps

        ubuf = cuda.local.array(u_size, raw)
        abuf = cuda.local.array(a_size, raw)
        af1 = cuda.local.array(steps, f32)
        if active:
            for i in range(steps):
                tc = min(t0 + i, n - 1)
                load_u(u, (b * n + tc) * channels + c0, ubuf, i * uw)
                if per_head:
                    af1[i] = load_a1(a[(b * n + tc) * a_stride + a_col])
                else:
                    load_a(a, (b * n + tc) * a_stride + a_col, abuf, i * aw)

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
        if last and active:
            if chunk > 0:
                lookback(flags, vals, fbase + chunk - 1, vbase - 3 * G, 3 * G, off, G, epoch,
                         carry)
                publish_inclusive(vals, vbase, off, G, A, X, carry)
                cuda.threadfence()
            for k in range(vec):
                sm_c[off + k] = carry[k]
        cuda.syncthreads()
        if tx == 0 and chunk > 0:
            cuda.atomic.max(flags, fbase + chunk, epoch * 4 + INCLUSIVE)
        if not active:
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

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_exact_blhd_{in_kind}_to_{out_kind}_{'per_head' if per_head else 'per_channel'}"
        f"_vec{vec}_cols{cols}_segs{segs}_steps{steps}"
    )
    return cuda.jit(kernel)


def _make_bhdl_kernel(in_kind, out_kind, per_head, vec, rows, segs, nv):
    """BHDL: ``u``, ``y`` (B, H, D, N) flat; ``a`` (B, H, N) per head or u's shape; ``x0``
    (B, H, D) float32. A tile: ``rows`` channel rows times ``segs * nv * vec`` tokens; ``vec > 1``
    needs ``vec | N`` and aligned rows."""
    load_v, unpack_v, vw, raw = _raw_access(in_kind, vec)
    store_y = make_vector_store(out_kind, vec)
    nt = rows * segs
    steps = nv * vec
    buf_size = nv * vw
    scan = _make_tile_scan(1, 1, nt, segs, 1)
    lookback = _make_lookback(1, 1)
    publish_aggregate, publish_inclusive, f32 = _make_publish(1, 1)
    i64 = numba.int64

    def kernel(a, u, y, x0, flags, vals, n, channels, head_dim, ngroups, nchunks):
        tx = cuda.threadIdx.x
        col = tx // segs
        seg = tx % segs
        nchains = cuda.gridDim.x // nchunks
        g = cuda.blockIdx.x % nchains
        sm_t = cuda.shared.array(1, numba.int64)
        sm_x = cuda.shared.array(nt, f32)
        sm_a = cuda.shared.array(nt, f32)
        sm_c = cuda.shared.array(rows, f32)
        if tx == 0:
            raw_t = cuda.atomic.add(flags, g, 1)
            sm_t[0] = raw_t
            if (raw_t & 0xFFFFFFFF) == nchunks - 1:
                cuda.atomic.add(flags, g, (i64(1) << EPOCH_SHIFT) - nchunks)
        cuda.syncthreads()
        raw_t = sm_t[0]
        epoch = raw_t >> EPOCH_SHIFT
        chunk = raw_t & 0xFFFFFFFF
        row = g * rows + col  # flat (b, h, d)
        active = row < ngroups  # ngroups: the number of rows B * H * D here
        a_row = row // head_dim if per_head else row
        t0 = (chunk * segs + seg) * steps

        ubuf = cuda.local.array(buf_size, raw)
        abuf = cuda.local.array(buf_size, raw)
        if active:
            for i in range(nv):
                tc = min(t0 + i * vec, n - vec)
                load_v(u, row * n + tc, ubuf, i * vw)
                load_v(a, a_row * n + tc, abuf, i * vw)

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
        if last and active:
            if chunk > 0:
                lookback(flags, vals, fbase + chunk - 1, vbase - 3 * rows, 3 * rows, col, rows,
                         epoch, carry)
                publish_inclusive(vals, vbase, col, rows, A, X, carry)
                cuda.threadfence()
            sm_c[col] = carry[0]
        cuda.syncthreads()
        if tx == 0 and chunk > 0:
            cuda.atomic.max(flags, fbase + chunk, epoch * 4 + INCLUSIVE)
        if not active:
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
                if vec == 1 or t + vec <= n:
                    store_y(y, row * n + t, out, 0)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_exact_bhdl_{in_kind}_to_{out_kind}_{'per_head' if per_head else 'per_channel'}"
        f"_vec{vec}_rows{rows}_segs{segs}_nv{nv}"
    )
    return cuda.jit(kernel)


# --------------------------------------------------------------------------------------------
# plans and entry point

_kernels: dict = {}


def get_kernel(layout, in_kind, out_kind, per_head, vec, *shape):
    key = (layout, in_kind, out_kind, per_head, vec) + tuple(shape)
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


def make_plan(layout, shape, per_head, in_kind, out_kind, align=(0, 0)):
    """The launch of the exact scan for canonical ``shape`` (u's) and storage kinds."""
    if layout == "BHDL":
        batch, heads, head_dim, n = shape
    else:
        batch, n, heads, head_dim = shape
    channels = heads * head_dim
    vec = choose_vec(layout, in_kind, out_kind, per_head, n, channels, head_dim, align)
    if layout == "BLHD":
        cols, segs, steps = TUNING["blhd_cols"], TUNING["blhd_segs"], TUNING["blhd_steps"]
        if vec == 1:  # one channel a thread: more columns, as many threads
            cols, segs = _general_blhd(cols, segs, in_kind)
        group = cols * vec
        ngroups = -(-channels // group)
        nchains = batch * ngroups
        nchunks = -(-n // (segs * steps))
        kernel = get_kernel(layout, in_kind, out_kind, per_head, vec, cols, segs, steps)
        block = cols * segs
        nvals = nchains * nchunks * STATUS_VALUES * group
        scalar_groups = ngroups
    else:
        rows, segs, nv = TUNING["bhdl_rows"], TUNING["bhdl_segs"], TUNING["bhdl_nv"]
        if vec == 1:
            nv = nv * _vec_for(in_kind)
        nrows = batch * channels
        nchains = -(-nrows // rows)
        nchunks = -(-n // (segs * nv * vec))
        kernel = get_kernel(layout, in_kind, out_kind, per_head, vec, rows, segs, nv)
        block = rows * segs
        nvals = nchains * nchunks * STATUS_VALUES * rows
        scalar_groups = nrows
    scalars = [np.int64(x) for x in (n, channels, head_dim, scalar_groups, nchunks)]
    return Plan(kernel, nchains * nchunks, block, scalars, nchains, nchunks, nvals)


_workspaces: dict = {}


def workspace(xp, plan, device=None):
    """(flags, vals) for ``plan``: zeroed once, then kept per (device, sizes) and reused by every
    launch (the epochs in the flags make clearing unnecessary)."""
    key = (device, plan.nchains, plan.nchunks, plan.nvals)
    ws = _workspaces.get(key)
    if ws is None:
        if len(_workspaces) > 32:
            _workspaces.clear()
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


def swr_exact(a, u, y, x0, *, layout, stream=None):
    """``y`` = the exact recurrence over ``u`` with coefficients ``a`` from ``x0``.

    Canonical C-contiguous arrays (docs/internals.md): BLHD ``u``, ``y`` (B, N, H, D), ``a``
    (B, N, H) or u's shape; BHDL ``u``, ``y`` (B, H, D, N), ``a`` (B, H, N) or u's shape; ``x0``
    (B, H, D) float32. ``a``/``u`` float32, float16 or bfloat16 (uint16 bits), ``y`` any of the
    three, not overlapping the inputs. One launch on ``stream`` (CuPy's current one by default);
    NumPy arrays run in the CUDA simulator. Returns None.
    """
    shape = u.shape
    if 0 in shape:
        return
    per_head = len(a.shape) == 3
    if isinstance(u, np.ndarray):
        args = [_host_flat(x) for x in (a, u, y, x0)]
        in_kind, out_kind = _KINDS[args[1].dtype], _KINDS[args[2].dtype]
        plan = make_plan(layout, shape, per_head, in_kind, out_kind)
        flags, vals = workspace(np, plan)
        launch(plan.kernel, plan.grid, plan.block, args + [flags, vals] + plan.scalars)
        return
    import cupy

    device = cupy.cuda.runtime.getDevice()
    arrays = [a, u, y, x0]
    ptrs = [data_pointer(x) for x in arrays]
    align = ((ptrs[0] | ptrs[1]) & 15, ptrs[2] & 15)
    key = (device, layout, shape, per_head, u.dtype, y.dtype, align, TUNING.version)
    plan = _plans.get(key)
    if plan is None:
        in_kind = _KINDS[np.dtype(FlatArray(0, 0, u.dtype).dtype)]
        out_kind = _KINDS[np.dtype(FlatArray(0, 0, y.dtype).dtype)]
        plan = make_plan(layout, shape, per_head, in_kind, out_kind, align)
        flags, vals = workspace(cupy, plan, device)
        plan.entry, plan.values = prepare(
            plan.kernel, [FlatArray.of(x) for x in arrays] + [flags, vals] + plan.scalars)
        if len(_plans) > 256:
            _plans.clear()
        _plans[key] = plan
    flags, vals = workspace(cupy, plan, device)
    launch_with_pointers(plan.entry, plan.grid, plan.block, plan.values,
                         ptrs + [flags.data.ptr, vals.data.ptr], stream)


def signature(in_kind, out_kind):
    """The Numba signature of every exact-scan kernel for these storage kinds."""
    f32 = types.Array(types.float32, 1, "C")
    storage = {"f32": f32, "f16": types.Array(types.float16, 1, "C"),
               "bf16": types.Array(types.uint16, 1, "C")}  # fmt: skip
    return tuple([storage[in_kind]] * 2 + [storage[out_kind], f32,
                                           types.Array(types.int64, 1, "C"), f32]
                 + [types.int64] * 5)


def specialisations():
    """``(name, kernel, signature)`` of the kernels :func:`swr_exact` can launch under the
    current TUNING, for the PTX tests: per layout, every input kind per head and per channel
    at the widest vector storing its own kind; the output kind changes only the final store and
    per head only the loads of a, so three other pairs (per head) and the one-channel kernels of
    f32 and bf16 (per channel) stand for the rest."""
    cases = [(i, i, None, h) for i in ("f32", "f16", "bf16") for h in (True, False)]
    cases += [(i, o, None, True) for i, o in (("bf16", "f32"), ("f32", "bf16"), ("f16", "bf16"))]
    cases += [(i, i, 1, False) for i in ("f32", "bf16")]
    for layout in ("BLHD", "BHDL"):
        for in_kind, out_kind, vec, per_head in cases:
            vec = vec or _vec_for(in_kind)
            if layout == "BLHD":
                cols, segs = TUNING["blhd_cols"], TUNING["blhd_segs"]
                if vec == 1:
                    cols, segs = _general_blhd(cols, segs, in_kind)
                shape = (cols, segs, TUNING["blhd_steps"])
            else:
                nv = TUNING["bhdl_nv"] * (_vec_for(in_kind) if vec == 1 else 1)
                shape = (TUNING["bhdl_rows"], TUNING["bhdl_segs"], nv)
            kernel = get_kernel(layout, in_kind, out_kind, per_head, vec, *shape)
            yield kernel.py_func.__name__, kernel, signature(in_kind, out_kind)


__all__ = ["TUNING", "swr_exact", "make_plan", "specialisations", "workspace"]
