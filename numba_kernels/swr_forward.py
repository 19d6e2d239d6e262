"""SWR forward: the fused sliding-window pass (hops 0/1), the block-carry pass and block carriers.

Notation of docs/spec.md#recurrence: per block of ``block_len`` (``l``) steps the local scan ``w``
(from 0), the attenuation ``g`` (from 1), the carrier ``v`` (``w`` at the block's last index) and
the carry ``S`` entering a block; the output is ``y_t = w_t + g_t * S``.

The forward is memory bound (a few flops per element), so both kernels are shaped around the
bytes: every element of ``a`` and ``u`` is read once from DRAM and ``y`` written once, with wide
coalesced accesses and several loads in flight per thread.

- ``BHDL`` (time contiguous): :func:`_make_lane_scan_kernel`. A warp owns ``rows_per_warp`` channel
  rows and a chunk of blocks; each lane holds ``vec`` consecutive steps (one 16-byte load), scans
  them serially, and the lanes combine their partial scans with a segmented warp-shuffle scan that
  restarts at block boundaries. The carrier of the block before a lane's block comes from the lane
  that ended it (a shuffle), or from the previous iteration, so nothing is re-read inside a chunk.
  On the 16-byte path the loads of the next ``bhdl_stages - 1`` iterations are in flight as
  ``cp.async`` copies into shared memory (no registers held for them) while one iteration computes.
  For hops 0/1 with per-head ``a`` from offset 0, :func:`_make_row_scan_kernel` does the same
  with what depends on ``a`` alone (its copy, unpack and products) once per iteration for the
  warp's rows of one head, one shuffle per row for the carrier, and no 64-bit division in
  its loop.
- ``BLHD`` (channel contiguous): :func:`_make_channel_walk_kernel`. A thread owns ``vec`` adjacent
  channels (one 16-byte load per step, coalesced across the warp) and walks a chunk of blocks in
  time, ``unroll`` steps of loads in flight at a time. Within the chunk the carrier is handed on in
  registers; only the block before the chunk is re-read (``l / chunk`` extra reads, a few percent).
  For hops=1 over whole blocks from offset 0, :func:`_make_shared_walk_kernel` puts consecutive
  chunks of the same channels in one thread block and hands each chunk's last carrier to the next
  in shared memory, so only one chunk in ``blhd_share_chunks`` re-reads a block.

Both run the same source in the CUDA simulator, with scalar twins of the vector loads and of the
warp shuffles. A ``vec == 1`` specialisation of each is the general kernel: any head dim, any
alignment, any ``offset``.

Which kernel runs is the table :data:`FORWARD` (one ordered list per layout). Entry points
:func:`swr_forward` and :func:`block_carriers` follow docs/internals.md. They take the
front's canonical arrays (CuPy on a GPU, NumPy in the simulator); bfloat16 arrives as uint16 bits.
The vector paths need 16-byte aligned ``a``, ``u`` (and ``y`` for its access width) and, BLHD,
``vec | H*D`` (per head also ``vec | D``); BHDL ``vec | N``, ``vec | block_len``, ``vec | offset``,
with ``vec`` = 8 for 16-bit inputs, 4 for float32. Anything else takes the ``vec == 1`` kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import cuda, types

from ._dtypes import ITEM_SIZE, SHARED_ALIGN, SIMULATOR
from ._launch import (
    FlatArray,
    Tuning,
    allow_shared_memory,
    data_pointer,
    launch,
    launch_with_pointers,
    prepare,
    sm_count,
)
from ._ptx import (
    STORAGE_TYPE,
    WORD_TYPE,
    async_commit,
    make_async_copy,
    make_async_wait,
    make_block_scan,
    make_shared_load,
    make_vector_load,
    make_vector_store,
    make_word_load,
    make_word_unpack,
    shfl_idx,
    shfl_up,
    words_per_access,
)

# --------------------------------------------------------------------------------------------
# Modes of the shared kernels. The mode is a compile-time constant of each specialisation.

HOPS0 = 0  # S = 0 for every block (block-diagonal only)
HOPS1 = 1  # S_j = v_{j-1}; the first touched block takes `carry`
BLOCK_CARRY = 2  # S_j = block_carry[..., j], computed outside (any hops, hops=None)
CARRIERS = 3  # write v_j, C_j per touched block instead of y

HALO_HOPS = range(2, 9)  # finite hops the BLHD channel walk runs in one pass (halo recompute)


def halo_mode(hops):
    """The mode of the single-pass BLHD walk for ``hops`` k in :data:`HALO_HOPS`: S of every block
    from a shift register of the k previous carriers, each chunk re-walking the k blocks before
    it (writing nothing there); the first block's ``v_{-1}`` is ``carry``."""
    return 4 + hops


def _mode_hops(mode):
    """k of a halo mode, else 0."""
    return mode - 4 if mode >= 4 + HALO_HOPS[0] else 0


MODE_NAMES = {HOPS0: "hops0", HOPS1: "hops1", BLOCK_CARRY: "block_carry", CARRIERS: "carriers"}
MODE_NAMES.update({halo_mode(k): f"hops{k}_halo" for k in HALO_HOPS})

# --------------------------------------------------------------------------------------------
# Kernel arguments (the same list for both layouts and every mode; unused arrays are 1-element
# dummies):
#   a, u, y, w0, g0, carry, block_carry, v_out, c_out   1-D views of the C-contiguous arrays
#   n            sequence length N (> 0)
#   channels     H * D
#   head_dim     D
#   block_len    l (power of two)
#   offset       in-block position of time index 0
#   nb           touched blocks, ceil((offset + N) / l)
#   chunk_blocks blocks per chunk (one chunk per thread or warp)
#   groups       BLHD: channel vectors per batch row (channels / vec); BHDL: row groups
#   nchunks      chunks per row
#   nwork        threads (BLHD) or warps (BHDL) doing work; the rest of the grid returns


def _make_advance(vec, a_width):
    """``advance_w(w, abuf, ubuf, i)``: one step of the local scan, ``w <- a w + u``, for the
    ``vec`` channels of a thread at step ``i`` of a batch (``a_width`` 1: one per-head ``a`` for
    all of them); ``advance_g(g, abuf, i)``: ``g <- g a``."""

    @cuda.jit(device=True, inline=True)
    def advance_w(w, abuf, ubuf, i):
        for k in range(vec):
            w[k] = abuf[i * a_width + k % a_width] * w[k] + ubuf[i * vec + k]

    @cuda.jit(device=True, inline=True)
    def advance_g(g, abuf, i):
        for q in range(a_width):
            g[q] = g[q] * abuf[i * a_width + q]

    return advance_w, advance_g


def _make_channel_walk_kernel(in_kind, out_kind, per_head, mode, vec, unroll):
    """BLHD: one thread per (batch, ``vec`` adjacent channels, chunk of blocks), walking time.

    ``u``, ``y``: (B, N, H, D) flat; ``a``: (B, N, H) (per head, ``head_dim % vec == 0``) or
    (B, N, H, D) flat; ``w0``, ``g0``, ``carry``: (B, H, D); ``block_carry``, ``v_out``, ``c_out``:
    (B, H, D, nb). Accesses of ``vec`` elements must be aligned to their size.
    """
    load_u = make_vector_load(in_kind, vec)
    load_a = make_vector_load(in_kind, 1 if per_head else vec)
    store_y = make_vector_store(out_kind, vec)
    a_width = 1 if per_head else vec  # a values per step (per head: one for the thread's channels)
    advance_w, advance_g = _make_advance(vec, a_width)
    u_buffer, a_buffer = unroll * vec, unroll * a_width  # local array sizes must be constants
    f32 = numba.float32
    hops = _mode_hops(mode)
    ring_v, ring_c = max(1, hops) * vec, max(1, hops) * a_width

    @cuda.jit(device=True, inline=True)
    def _carry_sum(s, rv, rc):
        # S = v_{j-1} + C_{j-1} (v_{j-2} + C_{j-2} (... v_{j-hops})), docs/spec.md#recurrence
        for k in range(vec):
            acc = rv[k]
            for m in range(1, hops):
                acc = rv[m * vec + k] + rc[m * a_width + k % a_width] * acc
            s[k] = acc

    def kernel(
        a, u, y, w0, g0, carry, block_carry, v_out, c_out,
        n, channels, head_dim, block_len, offset, nb, chunk_blocks, groups, nchunks, nwork, nrows,
    ):  # fmt: skip
        tid = cuda.grid(1)
        if tid >= nwork:
            return
        c0 = (tid % groups) * vec
        rest = tid // groups
        jj0 = (rest % nchunks) * chunk_blocks
        b = rest // nchunks
        ch0 = b * channels + c0  # flat (b, h, d) of the first channel
        if per_head:
            a_stride = channels // head_dim
            a_col = c0 // head_dim
        else:
            a_stride = channels
            a_col = c0
        jj1 = min(jj0 + chunk_blocks, nb)
        t_lo = max(jj0 * block_len - offset, 0)  # first step whose y this thread writes
        t_hi = min(jj1 * block_len - offset, n)
        mask = block_len - 1

        w = cuda.local.array(vec, f32)
        s = cuda.local.array(vec, f32)
        g = cuda.local.array(a_width, f32)
        # halo modes: the last `hops` carriers (v, C), oldest first, as a shift register
        rv = cuda.local.array(ring_v, f32)
        rc = cuda.local.array(ring_c, f32)
        if hops > 0:
            # re-walk the `hops` blocks before the chunk (from block 0 at most), storing nothing;
            # a walk from block 0 starts with v_{-1} = carry (its C never multiplies anything)
            t_walk = max((jj0 - hops) * block_len - offset, 0)
            first = jj0 <= hops
            for m in range(hops):
                for k in range(vec):
                    rv[m * vec + k] = carry[ch0 + k] if first and m == hops - 1 else f32(0.0)
                for q in range(a_width):
                    rc[m * a_width + q] = f32(1.0)
            _carry_sum(s, rv, rc)
        elif mode == HOPS1 and jj0 > 0:
            # re-walk the block before the chunk, storing nothing, for its carrier v_{jj0-1}
            t_walk = max((jj0 - 1) * block_len - offset, 0)
            first = jj0 == 1
        else:
            t_walk = t_lo
            first = jj0 == 0
        for k in range(vec):
            w[k] = w0[ch0 + k] if first else f32(0.0)
            if mode == HOPS1:
                s[k] = carry[ch0 + k] if jj0 == 0 else f32(0.0)
            elif mode == BLOCK_CARRY:
                s[k] = block_carry[(ch0 + k) * nb + jj0]
            elif hops == 0:
                s[k] = f32(0.0)
        for q in range(a_width):
            g[q] = g0[ch0 + q] if first else f32(1.0)

        ubuf = cuda.local.array(u_buffer, f32)
        abuf = cuda.local.array(a_buffer, f32)
        out = cuda.local.array(vec, f32)
        for t_batch in range(t_walk, t_hi, unroll):
            # all loads of the batch first (clamped into the chunk), so they are in flight together
            for i in range(unroll):
                tc = min(t_batch + i, t_hi - 1)
                load_u(u, (b * n + tc) * channels + c0, ubuf, i * vec)
                load_a(a, (b * n + tc) * a_stride + a_col, abuf, i * a_width)
            for i in range(unroll):
                t = t_batch + i
                if t < t_hi:
                    if ((t + offset) & mask) == 0 and t > t_walk:
                        # a block starts: its carry S, and the local scan restarts
                        if hops > 0:
                            # the finished block's carrier enters the register, the oldest leaves
                            for m in range(hops - 1):
                                for k in range(vec):
                                    rv[m * vec + k] = rv[(m + 1) * vec + k]
                                for q in range(a_width):
                                    rc[m * a_width + q] = rc[(m + 1) * a_width + q]
                            for k in range(vec):
                                rv[(hops - 1) * vec + k] = w[k]
                            for q in range(a_width):
                                rc[(hops - 1) * a_width + q] = g[q]
                            _carry_sum(s, rv, rc)
                        for k in range(vec):
                            if mode == HOPS1:
                                s[k] = w[k]
                            elif mode == BLOCK_CARRY:
                                s[k] = block_carry[(ch0 + k) * nb + (t + offset) // block_len]
                            w[k] = f32(0.0)
                        for q in range(a_width):
                            g[q] = f32(1.0)
                    advance_w(w, abuf, ubuf, i)
                    advance_g(g, abuf, i)
                    if mode == CARRIERS:
                        if ((t + offset + 1) & mask) == 0 or t == n - 1:
                            jj = (t + offset) // block_len
                            for k in range(vec):
                                v_out[(ch0 + k) * nb + jj] = w[k]
                                c_out[(ch0 + k) * nb + jj] = g[k % a_width]
                    elif t >= t_lo:
                        for k in range(vec):
                            if mode == HOPS0:
                                out[k] = w[k]
                            else:
                                out[k] = w[k] + g[k % a_width] * s[k]
                        store_y(y, (b * n + t) * channels + c0, out, 0)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_{MODE_NAMES[mode]}_blhd_channel_walk_{in_kind}_to_{out_kind}_"
        f"{'per_head' if per_head else 'per_channel'}_vec{vec}_unroll{unroll}"
    )
    return cuda.jit(kernel)


def shared_walk_words(in_kind, per_head, vec, steps, tpb, simulated=SIMULATOR):
    """(u, a, carrier) word offsets and the total words of the shared-walk kernel's dynamic shared
    memory (4-byte words; in the simulator a word holds one element)."""
    uw = words_per_access(in_kind, vec, simulated)
    a_at = steps * uw * tpb
    carrier_at = a_at + steps * (1 if per_head else uw) * tpb
    return 0, a_at, carrier_at, carrier_at + vec * tpb


def _make_shared_walk_kernel(in_kind, out_kind, per_head, vec, unroll, lanes, chunks, steps):
    """BLHD, hops=1, whole blocks, ``offset`` 0: the channel walk with the carriers of neighbouring
    chunks handed over in shared memory instead of re-read.

    A thread block is ``chunks`` warps-worth (``lanes`` threads each, one ``vec``-channel group per
    thread) of consecutive time chunks over the same channels. Each thread first walks the last
    block of its chunk (``steps`` = block_len steps), parking the raw words it loads in shared
    memory and publishing that block's carrier; after one barrier, the thread of chunk k takes
    S for its first block from the thread of chunk k - 1, walks its chunk, and reads its last block
    back from shared memory. Only the first chunk of each thread block re-reads the block before
    it (1 / ``chunks`` of the re-reads of the plain walk). Needs ``N % block_len == 0`` and
    ``block_len % unroll == 0``; the shared memory is :func:`shared_walk_words` words.
    """
    load_u = make_vector_load(in_kind, vec)
    load_a = make_vector_load(in_kind, 1 if per_head else vec)
    load_uw = make_word_load(in_kind, vec)
    load_aw = make_word_load(in_kind, vec)  # per-channel a only
    tpb = lanes * chunks
    uw = words_per_access(in_kind, vec)
    aw = 1 if per_head else uw
    unpack_reg = make_word_unpack(in_kind, vec)
    unpack_smem = make_word_unpack(in_kind, vec, stride=tpb)
    store_y = make_vector_store(out_kind, vec)
    a_width = 1 if per_head else vec
    advance_w, advance_g = _make_advance(vec, a_width)
    _, a_at, carrier_at, _ = shared_walk_words(in_kind, per_head, vec, steps, tpb)
    # local array sizes must be constants
    u_buffer, a_buffer = unroll * vec, unroll * a_width
    uw_buffer, aw_buffer = unroll * uw, unroll * aw
    f32, word = numba.float32, WORD_TYPE

    def kernel(
        a, u, y, w0, g0, carry, block_carry, v_out, c_out,
        n, channels, head_dim, block_len, offset, nb, chunk_blocks, groups, nchunks, nwork, nrows,
    ):  # fmt: skip
        tx = cuda.threadIdx.x
        lane = tx % lanes
        k = tx // lanes
        ctiles = (groups + lanes - 1) // lanes
        nsuper = (nchunks + chunks - 1) // chunks
        bid = cuda.blockIdx.x
        grp = (bid % ctiles) * lanes + lane
        rest = bid // ctiles
        chunk = (rest % nsuper) * chunks + k
        b = rest // nsuper
        active = grp < groups and chunk < nchunks
        sm_w = cuda.shared.array(0, word)
        sm_f = cuda.shared.array(0, f32)  # the same memory, seen as float32

        c0 = grp * vec
        ch0 = b * channels + c0
        if per_head:
            a_stride = channels // head_dim
            a_col = c0 // head_dim
        else:
            a_stride = channels
            a_col = c0
        jj0 = chunk * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        t_lo = jj0 * steps
        t_last = (jj1 - 1) * steps
        t_hi = jj1 * steps
        mask = steps - 1

        w = cuda.local.array(vec, f32)
        s = cuda.local.array(vec, f32)
        g = cuda.local.array(a_width, f32)
        out = cuda.local.array(vec, f32)
        ubuf = cuda.local.array(u_buffer, f32)
        abuf = cuda.local.array(a_buffer, f32)
        ubuf_w = cuda.local.array(uw_buffer, word)
        abuf_w = cuda.local.array(aw_buffer, word)

        if active:
            # the chunk's last block: park its words, publish its carrier v (w from 0, or w0)
            for q in range(vec):
                w[q] = w0[ch0 + q] if jj1 == 1 else f32(0.0)
            for t_batch in range(t_last, t_hi, unroll):
                for i in range(unroll):
                    row = b * n + t_batch + i
                    load_uw(u, row * channels + c0, ubuf_w, i * uw)
                    if per_head:
                        load_a(a, row * a_stride + a_col, abuf, i)
                    else:
                        load_aw(a, row * a_stride + a_col, abuf_w, i * aw)
                for i in range(unroll):
                    p = t_batch - t_last + i
                    for j in range(uw):
                        sm_w[(p * uw + j) * tpb + tx] = ubuf_w[i * uw + j]
                    unpack_reg(ubuf_w, i * uw, ubuf, i * vec)
                    if per_head:
                        sm_f[a_at + p * tpb + tx] = abuf[i]
                    else:
                        for j in range(aw):
                            sm_w[a_at + (p * aw + j) * tpb + tx] = abuf_w[i * aw + j]
                        unpack_reg(abuf_w, i * aw, abuf, i * vec)
                    advance_w(w, abuf, ubuf, i)
            for q in range(vec):
                sm_f[carrier_at + q * tpb + tx] = w[q]
        cuda.syncthreads()
        if not active:
            return

        # S entering the chunk's first block
        if jj0 == 0:
            for q in range(vec):
                s[q] = carry[ch0 + q]
        elif k > 0:
            for q in range(vec):
                s[q] = sm_f[carrier_at + q * tpb + tx - lanes]
        else:
            # the first chunk of the thread block re-walks the block before it
            for q in range(vec):
                w[q] = w0[ch0 + q] if jj0 == 1 else f32(0.0)
            for t_batch in range(t_lo - steps, t_lo, unroll):
                for i in range(unroll):
                    row = b * n + t_batch + i
                    load_u(u, row * channels + c0, ubuf, i * vec)
                    load_a(a, row * a_stride + a_col, abuf, i * a_width)
                for i in range(unroll):
                    advance_w(w, abuf, ubuf, i)
            for q in range(vec):
                s[q] = w[q]

        for q in range(vec):
            w[q] = w0[ch0 + q] if jj0 == 0 else f32(0.0)
        for q in range(a_width):
            g[q] = g0[ch0 + q] if jj0 == 0 else f32(1.0)
        for t_batch in range(t_lo, t_hi, unroll):
            if t_batch < t_last:
                for i in range(unroll):
                    row = b * n + t_batch + i
                    load_u(u, row * channels + c0, ubuf, i * vec)
                    load_a(a, row * a_stride + a_col, abuf, i * a_width)
            else:
                for i in range(unroll):
                    p = t_batch - t_last + i
                    unpack_smem(sm_w, p * uw * tpb + tx, ubuf, i * vec)
                    if per_head:
                        abuf[i] = sm_f[a_at + p * tpb + tx]
                    else:
                        unpack_smem(sm_w, a_at + p * aw * tpb + tx, abuf, i * vec)
            for i in range(unroll):
                t = t_batch + i
                if (t & mask) == 0 and t > t_lo:
                    for q in range(vec):
                        s[q] = w[q]
                        w[q] = f32(0.0)
                    for q in range(a_width):
                        g[q] = f32(1.0)
                advance_w(w, abuf, ubuf, i)
                advance_g(g, abuf, i)
                for q in range(vec):
                    out[q] = w[q] + g[q % a_width] * s[q]
                store_y(y, (b * n + t) * channels + c0, out, 0)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_hops1_blhd_shared_walk_{in_kind}_to_{out_kind}_"
        f"{'per_head' if per_head else 'per_channel'}_vec{vec}_unroll{unroll}_lanes{lanes}_"
        f"chunks{chunks}_l{steps}"
    )
    return cuda.jit(kernel)


def _make_lane_scan_kernel(in_kind, out_kind, per_head, mode, vec, rows_per_warp, stages=1,
                           warps_per_block=1):
    """BHDL: one warp per (``rows_per_warp`` channel rows, chunk of blocks); lanes along time.

    ``u``, ``y``: (B, H, D, N) flat; ``a``: (B, H, N) per head or (B, H, D, N) flat; ``w0``,
    ``g0``, ``carry``: (B, H, D); ``block_carry``, ``v_out``, ``c_out``: (B, H, D, nb).
    Needs ``vec | block_len``, ``vec | offset`` and ``vec | N`` (a lane's steps lie in one block;
    vector accesses are aligned when the base pointers are).
    """
    load_u = make_vector_load(in_kind, vec)
    load_a = make_vector_load(in_kind, vec)
    store_y = make_vector_store(out_kind, vec)
    span = 32 * vec  # steps one warp iteration covers
    row_buffer = rows_per_warp * vec  # local array sizes must be constants
    f32, i32 = numba.float32, numba.int32
    # stages > 1: the loads of the next stages - 1 iterations are in flight (cp.async into shared
    # memory) while one iteration computes; shared memory per warp: stages x rows x (u, a) spans
    pipelined = stages > 1
    copy = make_async_copy(in_kind, vec) if pipelined else None
    wait = make_async_wait(stages - 1) if pipelined else None
    load_shared = make_shared_load(in_kind, vec) if pipelined else None
    storage = STORAGE_TYPE[in_kind]
    smem_elems = max(1, warps_per_block * stages * rows_per_warp * span) if pipelined else 1
    prologue = max(stages - 1, 0)

    def kernel(
        a, u, y, w0, g0, carry, block_carry, v_out, c_out,
        n, channels, head_dim, block_len, offset, nb, chunk_blocks, groups, nchunks, nwork, nrows,
    ):  # fmt: skip
        warp = cuda.grid(1) // 32
        if warp >= nwork:
            return
        lane = i32(cuda.threadIdx.x % 32)
        r0 = (warp % groups) * rows_per_warp
        jj0 = (warp // groups) * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        t_lo = max(jj0 * block_len - offset, 0)
        t_hi = min(jj1 * block_len - offset, n)
        mask = block_len - 1
        lanes_per_block = min(32, block_len // vec)
        if mode == HOPS1 and jj0 > 0:
            t_walk = max((jj0 - 1) * block_len - offset, 0)
        else:
            t_walk = t_lo

        # the scan state entering each iteration: (w, g) of the block in progress and its carry S
        w_run = cuda.local.array(rows_per_warp, f32)
        g_run = cuda.local.array(rows_per_warp, f32)
        s_run = cuda.local.array(rows_per_warp, f32)
        for q in range(rows_per_warp):
            r = min(r0 + q, nrows - 1)  # a last group may be short: it repeats the last row
            w_run[q] = w0[r] if t_walk == 0 else f32(0.0)
            g_run[q] = g0[r] if t_walk == 0 else f32(1.0)
            if mode == HOPS1:
                s_run[q] = carry[r] if jj0 == 0 else f32(0.0)
            elif mode == BLOCK_CARRY:
                s_run[q] = block_carry[r * nb + jj0]
            else:
                s_run[q] = f32(0.0)

        ubuf = cuda.local.array(row_buffer, f32)
        abuf = cuda.local.array(row_buffer, f32)
        wl = cuda.local.array(vec, f32)
        gl = cuda.local.array(vec, f32)
        out = cuda.local.array(vec, f32)
        sm_u = cuda.shared.array(smem_elems, storage, alignment=SHARED_ALIGN)
        sm_a = cuda.shared.array(smem_elems, storage, alignment=SHARED_ALIGN)
        n_iters = (t_hi - t_walk + span - 1) // span
        warp_base = (cuda.threadIdx.x // 32) * stages * rows_per_warp * span + lane * vec
        if pipelined:
            for it in range(prologue):
                if it < n_iters:
                    tc = min(t_walk + it * span + lane * vec, t_hi - vec)
                    for q in range(rows_per_warp):
                        r = min(r0 + q, nrows - 1)
                        at = warp_base + (it * rows_per_warp + q) * span
                        copy(a, ((r // head_dim) if per_head else r) * n + tc, sm_a, at)
                        copy(u, r * n + tc, sm_u, at)
                async_commit()
        for it in range(n_iters):
            t_iter = t_walk + it * span
            t0 = t_iter + lane * vec  # this lane's first step
            valid = t0 < t_hi
            tc = min(t0, t_hi - vec)
            pos = (t0 + offset) & mask
            starts = valid and pos == 0 and t0 > t_walk  # a block starts at this lane
            if pipelined:
                ahead = it + prologue
                if ahead < n_iters:
                    tc_ahead = min(t_walk + ahead * span + lane * vec, t_hi - vec)
                    for q in range(rows_per_warp):
                        r = min(r0 + q, nrows - 1)
                        at = warp_base + ((ahead % stages) * rows_per_warp + q) * span
                        copy(a, ((r // head_dim) if per_head else r) * n + tc_ahead, sm_a, at)
                        copy(u, r * n + tc_ahead, sm_u, at)
                async_commit()
                wait()
                for q in range(rows_per_warp):
                    at = warp_base + ((it % stages) * rows_per_warp + q) * span
                    load_shared(sm_a, at, abuf, q * vec)
                    load_shared(sm_u, at, ubuf, q * vec)
            else:
                for q in range(rows_per_warp):
                    r = min(r0 + q, nrows - 1)
                    # rows of one head load the same `a`: the repeats hit L1, not DRAM
                    load_a(a, ((r // head_dim) if per_head else r) * n + tc, abuf, q * vec)
                    load_u(u, r * n + tc, ubuf, q * vec)
            for q in range(rows_per_warp):
                r = min(r0 + q, nrows - 1)
                real_row = r0 + q < nrows
                # serial scan of the lane's steps from (w, g) = (0, 1); past the end: identity
                w_acc = f32(0.0)
                g_acc = f32(1.0)
                for e in range(vec):
                    if valid:
                        w_acc = abuf[q * vec + e] * w_acc + ubuf[q * vec + e]
                        g_acc = g_acc * abuf[q * vec + e]
                    wl[e] = w_acc
                    gl[e] = g_acc
                # segmented inclusive scan across lanes; lane 0 first absorbs the running state
                big_w = w_acc
                big_g = g_acc
                done = i32(1) if starts else i32(0)
                if lane == 0 and not starts:
                    big_w = big_w + big_g * w_run[q]
                    big_g = big_g * g_run[q]
                    done = i32(1)
                k = 1
                while k < lanes_per_block:
                    w_up = shfl_up(big_w, k)
                    g_up = shfl_up(big_g, k)
                    done_up = shfl_up(done, k)
                    if lane >= k and done == 0:
                        big_w = big_w + big_g * w_up
                        big_g = big_g * g_up
                        done = done_up
                    k *= 2
                # exclusive prefix (w, g) entering this lane's first step
                w_in = shfl_up(big_w, 1)
                g_in = shfl_up(big_g, 1)
                if starts:
                    w_in = f32(0.0)
                    g_in = f32(1.0)
                elif lane == 0:
                    w_in = w_run[q]
                    g_in = g_run[q]
                # carry S of this lane's block
                carry_s = f32(0.0)
                if mode == HOPS1:
                    start_lane = lane - pos // vec  # lane where this block started (< 0: earlier)
                    fresh = start_lane >= 0 and t_iter + start_lane * vec > t_walk
                    w_end = shfl_idx(big_w, max(start_lane - 1, 0))  # v of the block before
                    if not fresh:
                        carry_s = s_run[q]
                    elif start_lane > 0:
                        carry_s = w_end
                    else:
                        carry_s = w_run[q]  # the previous block ended with the last iteration
                elif mode == BLOCK_CARRY:
                    if valid:
                        carry_s = block_carry[r * nb + (t0 + offset) // block_len]
                if mode == CARRIERS:
                    ends = ((t0 + vec + offset) & mask) == 0 or t0 + vec == n
                    if valid and real_row and ends:
                        jj = (t0 + offset) // block_len
                        v_out[r * nb + jj] = big_w
                        c_out[r * nb + jj] = big_g
                else:
                    # y = w + g S with w = wl + gl w_in, g = gl g_in
                    z = w_in + g_in * carry_s
                    for e in range(vec):
                        out[e] = wl[e] + gl[e] * z
                    if valid and real_row and t0 >= t_lo:
                        store_y(y, r * n + t0, out, 0)
                w_run[q] = shfl_idx(big_w, 31)
                g_run[q] = shfl_idx(big_g, 31)
                if mode == HOPS1:
                    s_run[q] = shfl_idx(carry_s, 31)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_{MODE_NAMES[mode]}_bhdl_lane_scan_{in_kind}_to_{out_kind}_"
        f"{'per_head' if per_head else 'per_channel'}_vec{vec}_rows{rows_per_warp}"
        + (f"_stages{stages}_warps{warps_per_block}" if pipelined else "")
    )
    return cuda.jit(kernel)


def _make_row_scan_kernel(in_kind, out_kind, mode, vec, rows, block_len, stages,
                          warps_per_block):
    """BHDL fast path: hops 0/1, per-head ``a``, offset 0, the 16-byte path; ``block_len`` a
    compile-time constant with ``vec | block_len | 32 * vec`` (a block is ``lanes`` whole lanes
    of one warp iteration).

    A warp owns ``rows`` consecutive rows of one head and a chunk of whole iterations (``span``
    steps each, from ``t_lo``). Everything that depends on ``a`` only is computed once per
    iteration for all rows (it is the same ``a``): the copy, the unpack, each lane's running
    product ``g`` and the segmented product across the block's lanes. Per row that leaves the
    lane's local scan, ``log2(lanes)`` shuffles for the block's running ``w`` and one for its
    carry: the carrier of the block before comes from the lane that ended it, and lanes 0..lanes-1
    take it from lane 31, which sends last iteration's value (no lane of this iteration needs
    lane 31's). Indexing is hoisted out of the loop, and the loads run ``stages - 1`` iterations
    ahead as ``cp.async`` copies into shared memory, as in the lane scan.

    A chunk after the first (hops=1) starts with one iteration that only its last ``lanes``
    lanes load (the block before the chunk; the other lanes read the same 16 bytes) and that
    stores nothing. The same numbers, bit for bit, as :func:`_make_lane_scan_kernel` (each sum
    in the same order).
    """
    span = 32 * vec
    lanes = block_len // vec
    assert vec > 1 and stages > 1 and block_len % vec == 0 and 1 <= lanes <= 32, (vec, block_len)
    gk_size = max(lanes.bit_length() - 1, 1)  # shuffle levels of the segmented scans
    scan_g, scan_w = make_block_scan(lanes)
    f32, i32 = numba.float32, numba.int32
    copy = make_async_copy(in_kind, vec)
    wait = make_async_wait(stages - 1)
    load_shared = make_shared_load(in_kind, vec)
    store_y = make_vector_store(out_kind, vec)
    storage = STORAGE_TYPE[in_kind]
    slot = (rows + 1) * span  # one ring slot of a warp: a, then the rows' u
    smem_elems = warps_per_block * stages * slot
    hops1 = mode == HOPS1
    prologue = stages - 1

    def kernel(
        a, u, y, w0, g0, carry, block_carry, v_out, c_out,
        n, channels, head_dim, block_len_, offset, nb, chunk_blocks, groups, nchunks, nwork, nrows,
    ):  # fmt: skip
        warp = cuda.grid(1) // 32
        if warp >= nwork:
            return
        lane = i32(cuda.threadIdx.x % 32)
        seg = lane & i32(lanes - 1)  # this lane's place in its block
        src = (lane - seg - i32(1)) & i32(31)  # the lane that ends the block before
        r0 = (warp % groups) * rows
        chunk = warp // groups
        t_lo = chunk * chunk_blocks * block_len
        t_hi = min(t_lo + chunk_blocks * block_len, n)
        pre = hops1 and chunk > 0  # one iteration for the block before the chunk
        t_first = t_lo - span if pre else t_lo
        t_min = t_lo - block_len if pre else t_lo  # the pre-iteration's lanes read from here
        n_iters = (t_hi - t_first + span - 1) // span
        a_row = (r0 // head_dim) * n
        u_row = r0 * n
        w_prev = cuda.local.array(rows, f32)  # lane 31: the last carrier of the last iteration
        for q in range(rows):
            w_prev[q] = carry[r0 + q] if hops1 and chunk == 0 else f32(0.0)
        af = cuda.local.array(vec, f32)
        gl = cuda.local.array(vec, f32)
        wl = cuda.local.array(vec, f32)
        uf = cuda.local.array(vec, f32)
        out = cuda.local.array(vec, f32)
        gk = cuda.local.array(gk_size, f32)
        sm = cuda.shared.array(smem_elems, storage, alignment=SHARED_ALIGN)
        warp_base = (cuda.threadIdx.x // 32) * stages * slot + lane * vec
        for it in range(prologue):
            if it < n_iters:
                tc = min(max(t_first + it * span + lane * vec, t_min), t_hi - vec)
                at = warp_base + it * slot
                copy(a, a_row + tc, sm, at)
                for q in range(rows):
                    copy(u, u_row + q * n + tc, sm, at + (q + 1) * span)
            async_commit()
        for it in range(n_iters):
            t0 = t_first + it * span + lane * vec
            ahead = it + prologue
            if ahead < n_iters:
                tc = min(max(t_first + ahead * span + lane * vec, t_min), t_hi - vec)
                at = warp_base + (ahead % stages) * slot
                copy(a, a_row + tc, sm, at)
                for q in range(rows):
                    copy(u, u_row + q * n + tc, sm, at + (q + 1) * span)
            async_commit()
            wait()
            at = warp_base + (it % stages) * slot
            load_shared(sm, at, af, 0)
            # what depends on a only: the lane's running product, the block's across lanes
            g_acc = f32(1.0)
            for e in range(vec):
                g_acc = g_acc * af[e]
                gl[e] = g_acc
            big_g, g_in = scan_g(g_acc, gk, seg)
            store = t0 >= t_lo and t0 < t_hi
            for q in range(rows):
                load_shared(sm, at + (q + 1) * span, uf, 0)
                w_acc = f32(0.0)
                for e in range(vec):
                    w_acc = af[e] * w_acc + uf[e]
                    wl[e] = w_acc
                big_w, w_in = scan_w(w_acc, gk, seg)
                z = w_in
                if hops1:
                    carrier = shfl_idx(w_prev[q] if lane == 31 else big_w, src)
                    z = w_in + g_in * carrier
                    w_prev[q] = big_w
                for e in range(vec):
                    out[e] = wl[e] + gl[e] * z
                if store:
                    store_y(y, u_row + q * n + t0, out, 0)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_{MODE_NAMES[mode]}_bhdl_row_scan_{in_kind}_to_{out_kind}_per_head_vec{vec}"
        f"_rows{rows}_l{block_len}_stages{stages}_warps{warps_per_block}"
    )
    return cuda.jit(kernel)


# --------------------------------------------------------------------------------------------
# Specialisations and launch plans

TUNING = Tuning({
    # BLHD: bytes one thread moves per step (16: one 16-byte access), steps whose loads are in
    # flight together, chunk length in steps (longer: fewer re-read blocks but fewer threads)
    "blhd_access_bytes": 16,
    "blhd_unroll": 8,
    "blhd_chunk_steps": 128,
    "blhd_chunk_steps_f32": 256,  # float32 inputs: half the channels per thread, twice the steps
    "blhd_threads_per_block": 256,
    # ... hops=1, per head, 16-bit, block_len from blhd_long_block_len (the plain walk): chunk
    # length and steps in flight
    # the halo walk (BLHD hops k >= 2): chunks of this many blocks per hop (re-walking the k
    # blocks before a chunk reads 1/this more, against more chunks in flight)
    "blhd_halo_chunk_blocks_per_hop": 2,
    "blhd_long_block_len": 32,
    "blhd_long_chunk_steps": 256,
    "blhd_long_unroll": 16,
    # BLHD hops=1 over whole blocks: consecutive chunks per thread block whose carriers are handed
    # over in shared memory (1: off), channel groups per chunk, and the most shared memory a
    # thread block may take for it (above: the plain walk)
    "blhd_share_chunks": 4,
    "blhd_share_lanes": 32,
    "blhd_share_chunk_steps": 64,
    "blhd_share_chunk_steps_f32": 256,
    "blhd_share_max_bytes": 48 * 1024,
    # BHDL: channel rows per warp (their per-head `a` loads hit L1), resident threads to aim for
    # per SM when rows are split into chunks, shortest chunk in warp iterations
    "bhdl_access_bytes": 16,
    "bhdl_rows_per_warp": 2,
    "threads_per_sm": 2048,
    "threads_per_sm_f32": 4096,  # float32: more, shorter chunks
    "bhdl_min_chunk_iters": 8,
    "bhdl_chunk_blocks": 0,  # fixed blocks per chunk (0: chosen per launch; tests set it)
    "bhdl_threads_per_block": 128,
    # BHDL 16-byte path: iterations whose loads are in flight (cp.async into shared memory; 1: plain
    # loads into registers). Shared memory per block: stages x 8 KiB at 128 threads.
    "bhdl_stages": 4,
    # BHDL hops 0/1, per head, offset 0, 16-byte path: the row scan (a's work once per iteration
    # for `bhdl_scan_rows` rows of one head; False: the lane scan)
    "bhdl_row_scan": True,
    "bhdl_scan_rows": 2,
})
"""Launch tuning of the forward kernels (swept by scripts/swr_sweep.py; the figures are in
docs/benchmarks.md)."""

_kernels: dict = {}
_shared_kernels: dict = {}


def get_shared_kernel(in_kind, out_kind, per_head, vec, unroll, lanes, chunks, steps):
    """The compiled-on-demand dispatcher of one shared-walk specialisation."""
    key = (in_kind, out_kind, per_head, vec, unroll, lanes, chunks, steps)
    kernel = _shared_kernels.get(key)
    if kernel is None:
        kernel = _shared_kernels[key] = _make_shared_walk_kernel(*key)
    return kernel


def get_row_scan_kernel(in_kind, out_kind, mode, vec, rows, block_len, stages, warps_per_block):
    """The compiled-on-demand dispatcher of one BHDL row-scan specialisation."""
    key = ("row_scan", in_kind, out_kind, mode, vec, rows, block_len, stages, warps_per_block)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = _make_row_scan_kernel(*key[1:])
    return kernel


def _row_scan(in_kind, per_head, mode, vec, block_len, offset, head_dim, block):
    """Rows per warp when the BHDL row scan takes this launch, else None."""
    rows = TUNING["bhdl_scan_rows"]
    stages = _bhdl_pipeline(vec, block)
    if not (TUNING["bhdl_row_scan"] and per_head and mode in (HOPS0, HOPS1) and stages):
        return None
    if offset != 0 or head_dim % rows or not vec <= block_len <= 32 * vec:
        return None
    return rows


def get_kernel(layout, in_kind, out_kind, per_head, mode, vec, depth, *pipeline):
    """The compiled-on-demand dispatcher of one specialisation (``depth``: BLHD unroll, BHDL rows
    per warp; BHDL ``pipeline``: stages, warps per block)."""
    key = (layout, in_kind, out_kind, per_head, mode, vec, depth) + pipeline
    kernel = _kernels.get(key)
    if kernel is None:
        factory = _make_channel_walk_kernel if layout == "BLHD" else _make_lane_scan_kernel
        kernel = _kernels[key] = factory(in_kind, out_kind, per_head, mode, vec, depth, *pipeline)
    return kernel


def _bhdl_pipeline(vec, block):
    """(stages, warps per block) of the BHDL lane scan: cp.async stages for the 16-byte path."""
    stages = TUNING["bhdl_stages"] if vec > 1 else 1
    return (stages, block // 32) if stages > 1 else ()


_KINDS = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.uint16): "bf16"}


def _vec_for(access_bytes, kind):
    return max(1, access_bytes // ITEM_SIZE[kind])


def _unroll(mode, vec, block_len=None):
    """BLHD steps per batch. The block-carry mode re-reads S at every block start; its larger loop
    body makes NVVM stop unrolling (then the batch buffers go to local memory) above 32 values.
    With ``block_len`` (the shared walk, whose batches stay inside a block): at most that."""
    unroll = TUNING["blhd_unroll"]
    if block_len is not None:
        unroll = max(1, min(unroll, block_len))
    return max(1, min(unroll, 32 // vec)) if mode == BLOCK_CARRY or _mode_hops(mode) else unroll


def signature(in_kind, out_kind):
    """The Numba signature of every forward kernel for these storage kinds (9 arrays, 11 int64)."""
    f32 = types.Array(types.float32, 1, "C")
    storage = {"f32": f32, "f16": types.Array(types.float16, 1, "C"),
               "bf16": types.Array(types.uint16, 1, "C")}  # fmt: skip
    arrays = [storage[in_kind]] * 2 + [storage[out_kind]] + [f32] * 6
    return tuple(arrays + [types.int64] * 11)


def _channel_vec(in_kind, out_kind, per_head, channels, head_dim, misaligned):
    """BLHD: the widest channel vector if these shapes and pointers allow it, else 1 (general)."""
    vec = _vec_for(TUNING["blhd_access_bytes"], in_kind)
    ok = channels % vec == 0 and (not per_head or head_dim % vec == 0)
    ok = ok and not misaligned(vec * ITEM_SIZE[in_kind], min(16, vec * ITEM_SIZE[out_kind]))
    return vec if ok else 1


def _time_vec(in_kind, out_kind, n, block_len, offset, misaligned):
    """BHDL: the widest time vector if every lane's steps stay in one block and aligned, else 1."""
    vec = _vec_for(TUNING["bhdl_access_bytes"], in_kind)
    ok = n % vec == 0 and block_len % vec == 0 and offset % vec == 0
    ok = ok and not misaligned(vec * ITEM_SIZE[in_kind], min(16, vec * ITEM_SIZE[out_kind]))
    return vec if ok else 1


class _Plan:
    """What one launch needs besides the data pointers, cached per shape/dtype/alignment."""

    __slots__ = ("kernel", "grid", "block", "scalars", "shared", "entry", "values")

    def __init__(self, kernel, grid, block, scalars, shared=0):
        self.kernel, self.grid, self.block, self.scalars = kernel, grid, block, scalars
        self.shared = shared  # bytes of dynamic shared memory
        self.entry = self.values = None


def _shared_walk(in_kind, per_head, mode, vec, n, block_len, offset, nb):
    """(lanes, chunks, shared bytes, blocks per chunk) when the shared-walk kernel takes this
    BLHD launch, else None: hops=1 over whole blocks from offset 0, the vector path, at least two
    chunks, and its shared memory within TUNING's limit."""
    chunks, lanes = TUNING["blhd_share_chunks"], TUNING["blhd_share_lanes"]
    unroll = _unroll(mode, vec, block_len)
    if chunks < 2 or mode != HOPS1 or vec == 1 or offset != 0:
        return None
    if n % block_len or block_len % unroll:
        return None
    steps = TUNING["blhd_share_chunk_steps_f32" if in_kind == "f32" else "blhd_share_chunk_steps"]
    chunk_blocks = max(1, min(nb, steps // block_len))
    if nb <= chunk_blocks:
        return None
    words = shared_walk_words(in_kind, per_head, vec, block_len, lanes * chunks, False)[3]
    if 4 * words > TUNING["blhd_share_max_bytes"]:  # judged by what a GPU needs
        return None
    return lanes, chunks, 4 * shared_walk_words(in_kind, per_head, vec, block_len,
                                                lanes * chunks)[3], chunk_blocks


class Case(NamedTuple):
    """What the choice of a forward kernel depends on (no arrays: a test can enumerate it).
    ``align``: the data addresses modulo 16 of the inputs (a | u) and of the output."""

    layout: str
    per_head: bool
    in_kind: str
    out_kind: str
    mode: int
    block_len: int
    offset: int
    n: int
    head_dim: int
    channels: int
    align: tuple = (0, 0)

    def misaligned(self, in_bytes, out_bytes):
        return self.align[0] % in_bytes != 0 or self.align[1] % out_bytes != 0

    @property
    def nb(self):
        return -(-(self.offset + self.n) // self.block_len)

    @property
    def vec(self):
        """Elements per access: 16 bytes where shapes and alignment allow it, else 1."""
        if self.layout == "BLHD":
            return _channel_vec(self.in_kind, self.out_kind, self.per_head, self.channels,
                                self.head_dim, self.misaligned)
        return _time_vec(self.in_kind, self.out_kind, self.n, self.block_len, self.offset,
                         self.misaligned)


def _fit_shared_walk(c):
    return _shared_walk(c.in_kind, c.per_head, c.mode, c.vec, c.n, c.block_len, c.offset, c.nb)


def _fit_long_walk(c):
    return (c.mode == HOPS1 and c.per_head and c.in_kind != "f32" and c.vec > 1
            and c.block_len >= TUNING["blhd_long_block_len"])


def _fit_row_scan(c):
    block = 32 if SIMULATOR else TUNING["bhdl_threads_per_block"]
    return _row_scan(c.in_kind, c.per_head, c.mode, c.vec, c.block_len, c.offset, c.head_dim,
                     block)


FORWARD = {
    "BLHD": (
        ("shared_walk", _fit_shared_walk,
         "hops=1 over whole blocks from offset 0, 16-byte vectors, two or more chunks: chunks of "
         "one thread block hand their carriers on in shared memory, one chunk in "
         "blhd_share_chunks re-reads the block before it"),
        ("long_walk", _fit_long_walk,
         "hops=1, per head, 16-bit, 16-byte vectors, block_len >= blhd_long_block_len: the "
         "channel walk over longer chunks with more loads in flight"),
        ("channel_walk", lambda c: c.vec > 1,
         "16-byte vectors of channels (aligned, dividing the channels and the head): a thread "
         "walks its channels' blocks in time"),
        ("channel_walk_general", lambda c: True, "anything else: one channel a thread"),
    ),
    "BHDL": (
        ("row_scan", _fit_row_scan,
         "hops 0/1, per head, offset 0, 16-byte vectors through cp.async stages: a's work once "
         "per iteration for a warp's rows of one head"),
        ("lane_scan", lambda c: c.vec > 1,
         "16-byte vectors along time (aligned, dividing N, block_len and offset): lanes scan "
         "their steps and combine by warp shuffles"),
        ("lane_scan_general", lambda c: True, "anything else: one step a lane"),
    ),
}
"""The forward's choice, per layout: the first row whose fits-check passes is launched."""


def choose(c: Case):
    """``(kernel name, configuration)``: the first row of :data:`FORWARD` that fits ``c``."""
    for name, fits, _ in FORWARD[c.layout]:
        cfg = fits(c)
        if cfg:
            return name, cfg
    raise AssertionError("the last row of each table fits every case")


def _make_plan(layout, shape, per_head, in_kind, out_kind, block_len, offset, mode, align):
    if layout == "BHDL":
        batch, heads, head_dim, n = shape
    else:
        batch, n, heads, head_dim = shape
    channels = heads * head_dim
    nrows = batch * channels
    case = Case(layout, per_head, in_kind, out_kind, mode, block_len, offset, n, head_dim,
                channels, align)
    name, cfg = choose(case)
    vec, nb = case.vec, case.nb
    target = sm_count() * TUNING["threads_per_sm_f32" if in_kind == "f32" else "threads_per_sm"]
    # the simulator's warp shuffles exchange values across a whole block: keep blocks one warp
    block = 32 if SIMULATOR else TUNING[f"{layout.lower()}_threads_per_block"]
    shared_bytes = 0  # dynamic shared memory (the shared walk)
    if layout == "BLHD":
        groups = channels // vec
        if name == "shared_walk":
            lanes, chunks, shared_bytes, chunk_blocks = cfg
            kernel = get_shared_kernel(in_kind, out_kind, per_head, vec,
                                       _unroll(mode, vec, block_len),
                                       lanes, chunks, block_len)  # fmt: skip
            block = lanes * chunks
        else:
            # hops=1 with long blocks: longer chunks (each re-walks the block before it) and
            # more steps of loads in flight
            long = name == "long_walk"
            unroll = TUNING["blhd_long_unroll"] if long else _unroll(mode, vec)
            kernel = get_kernel(layout, in_kind, out_kind, per_head, mode, vec, unroll)
            if long:
                steps = TUNING["blhd_long_chunk_steps"]
            else:
                steps = TUNING["blhd_chunk_steps_f32" if in_kind == "f32" else "blhd_chunk_steps"]
            chunk_blocks = max(1, steps // block_len)
            if _mode_hops(mode):
                chunk_blocks = max(chunk_blocks,
                                   TUNING["blhd_halo_chunk_blocks_per_hop"] * _mode_hops(mode))
            chunk_blocks = min(nb, chunk_blocks)
        nchunks = -(-nb // chunk_blocks)
        nwork = batch * groups * nchunks
        if name == "shared_walk":  # a thread block: `chunks` consecutive chunks of `lanes` groups
            grid = batch * -(-groups // lanes) * -(-nchunks // chunks)
        else:
            grid = -(-nwork // block)
    else:
        if name == "row_scan":
            rows_per_warp = cfg
            kernel = get_row_scan_kernel(in_kind, out_kind, mode, vec, rows_per_warp, block_len,
                                         *_bhdl_pipeline(vec, block))  # fmt: skip
        else:
            rows_per_warp = TUNING["bhdl_rows_per_warp"]
            kernel = get_kernel(layout, in_kind, out_kind, per_head, mode, vec, rows_per_warp,
                                *_bhdl_pipeline(vec, block))  # fmt: skip
        groups = -(-nrows // rows_per_warp)
        # whole rows per warp unless that leaves the GPU short of warps; chunks stay long enough
        # that re-walking the block before each (hops=1) costs little, and are whole iterations
        per_iter = max(1, 32 * vec // block_len)
        min_blocks = max(1, TUNING["bhdl_min_chunk_iters"] * per_iter)
        want_chunks = max(1, -(-target // (32 * groups)))
        chunk_blocks = max(min_blocks, -(-nb // want_chunks))
        chunk_blocks = -(-chunk_blocks // per_iter) * per_iter
        chunk_blocks = min(TUNING["bhdl_chunk_blocks"] or chunk_blocks, nb)
        nchunks = -(-nb // chunk_blocks)
        nwork = groups * nchunks
        grid = -(-nwork * 32 // block)
    scalars = (n, channels, head_dim, block_len, offset, nb, chunk_blocks, groups, nchunks, nwork,
               nrows)  # fmt: skip
    return _Plan(kernel, grid, block, [np.int64(x) for x in scalars], shared_bytes)


def _arrays(a, u, y, v_out, c_out, w0, g0, carry, block_carry, mode, dummy):
    """The nine kernel arrays in argument order (a dummy where the mode reads nothing)."""
    return [a, u, dummy if y is None else y, w0, g0,
            carry if mode == HOPS1 or _mode_hops(mode) else dummy,
            block_carry if mode == BLOCK_CARRY else dummy,
            dummy if v_out is None else v_out, dummy if c_out is None else c_out]  # fmt: skip


def _kinds(in_dtype, out_dtype, mode):
    in_kind = _KINDS[np.dtype(FlatArray(0, 0, in_dtype).dtype)]
    out_kind = "f32" if mode == CARRIERS else _KINDS[np.dtype(FlatArray(0, 0, out_dtype).dtype)]
    return in_kind, out_kind


def _host_flat(x):
    x = x.reshape(-1)
    return x.view(np.uint16) if x.dtype.name == "bfloat16" else x


def _run_simulated(layout, a, u, y, v_out, c_out, *, block_len, offset, w0, g0, carry,
                   block_carry, mode, stream):  # fmt: skip
    """NumPy arrays in the simulator: plain launches, alignment not observable."""
    arrays = _arrays(a, u, y, v_out, c_out, w0, g0, carry, block_carry, mode,
                     np.zeros(1, np.float32))  # fmt: skip
    args = [_host_flat(x) for x in arrays]
    in_kind, out_kind = _kinds(args[1].dtype, args[2].dtype, mode)
    plan = _make_plan(layout, u.shape, a.ndim == 3, in_kind, out_kind, block_len, offset, mode,
                      (0, 0))  # fmt: skip
    launch(plan.kernel, plan.grid, plan.block, args + plan.scalars, stream=stream,
           shared_mem=plan.shared)  # fmt: skip


_plans: dict = {}
_dummies: dict = {}
_cupy = None


def _device_setup():
    """(cupy module, current device, a 1-element float32 dummy array on it)."""
    global _cupy
    if _cupy is None:
        import cupy

        _cupy = cupy
    device = _cupy.cuda.runtime.getDevice()
    dummy = _dummies.get(device)
    if dummy is None:
        dummy = _dummies[device] = _cupy.zeros(1, np.float32)
    return device, dummy


def _run(layout, a, u, y, v_out, c_out, *, block_len, offset, w0, g0, carry, block_carry, mode,
         stream):  # fmt: skip
    shape = u.shape
    if 0 in shape:
        return
    if isinstance(u, np.ndarray):
        _run_simulated(layout, a, u, y, v_out, c_out, block_len=block_len, offset=offset,
                       w0=w0, g0=g0, carry=carry, block_carry=block_carry, mode=mode,
                       stream=stream)  # fmt: skip
        return
    # The GPU path is the per-call host cost users see: everything but the data pointers is
    # looked up in a plan cached per (device, shapes, dtypes, options, pointer alignment).
    device, dummy = _device_setup()
    arrays = _arrays(a, u, y, v_out, c_out, w0, g0, carry, block_carry, mode, dummy)
    ptrs = [data_pointer(x) for x in arrays]
    align = ((ptrs[0] | ptrs[1]) & 15, ptrs[2] & 15)  # the vector paths need aligned bases
    out_dtype = None if y is None else y.dtype
    key = (device, layout, shape, len(a.shape), u.dtype, out_dtype, block_len, offset, mode,
           align, TUNING.version)  # fmt: skip
    plan = _plans.get(key)
    if plan is None:
        in_kind, out_kind = _kinds(u.dtype, y.dtype if y is not None else np.float32, mode)
        plan = _make_plan(layout, shape, len(a.shape) == 3, in_kind, out_kind, block_len, offset,
                          mode, align)  # fmt: skip
        plan.entry, plan.values = prepare(plan.kernel, [FlatArray.of(x) for x in arrays]
                                          + plan.scalars)  # fmt: skip
        allow_shared_memory(plan.entry, plan.shared)
        if len(_plans) > 256:
            _plans.clear()
        _plans[key] = plan
    launch_with_pointers(plan.entry, plan.grid, plan.block, plan.values, ptrs, stream,
                         plan.shared)  # fmt: skip


def swr_forward(a, u, y, *, layout, block_len, hops, offset, w0, g0, carry, block_carry=None,
                stream=None):  # fmt: skip
    """Sliding-window forward ``y_t = w_t + g_t * S`` into the preallocated ``y``.

    Shapes (canonical, C-contiguous, see docs/internals.md):
      BHDL: ``u``, ``y`` (B, H, D, N); ``a`` (B, H, N) per head or (B, H, D, N) per channel.
      BLHD: ``u``, ``y`` (B, N, H, D); ``a`` (B, N, H) per head or (B, N, H, D) per channel.
      ``w0``, ``g0``, ``carry``: (B, H, D) float32; ``block_carry``: (B, H, D, nb) float32,
      ``nb = ceil((offset + N) / block_len)``.
    ``hops`` 0 (S = 0; ``carry`` is not read) or 1 (S of the first touched block is ``carry``,
    then the previous block's carrier); BLHD also 2..8 in one pass (``carry`` is ``v_{-1}``, the
    carrier before block 0, so ``offset`` 0 with ``w0`` 0 and ``g0`` 1: no state continuation).
    With ``block_carry`` the kernel reads S of every touched
    block from it instead (any hops). ``a``/``u`` float32, float16 or bfloat16 (as uint16 bits);
    ``y`` any of the three. ``y`` must not overlap the inputs. Returns None.
    """
    if block_carry is not None:
        mode = BLOCK_CARRY
    elif hops in (0, 1):
        mode = HOPS0 if hops == 0 else HOPS1
    elif hops in HALO_HOPS and layout == "BLHD" and offset == 0:
        mode = halo_mode(hops)
    else:
        raise ValueError(f"hops={hops!r} needs block_carry (the fused walk takes hops 0/1, and "
                         f"BLHD hops {HALO_HOPS[0]}..{HALO_HOPS[-1]} from offset 0)")
    _run(layout, a, u, y, None, None, block_len=block_len, offset=offset, w0=w0, g0=g0,
         carry=carry, block_carry=block_carry, mode=mode, stream=stream)  # fmt: skip


def block_carriers(a, u, v, C, *, layout, block_len, offset, w0, g0, stream=None):
    """Per touched block ``j``: ``v[..., j]`` = w and ``C[..., j]`` = g at its last index.

    Shapes as :func:`swr_forward`; ``v``, ``C``: (B, H, D, nb) float32. The first block continues
    from ``w0``, ``g0``; a final partial block ends at index N - 1. Returns None.
    """
    _run(layout, a, u, None, v, C, block_len=block_len, offset=offset, w0=w0, g0=g0, carry=None,
         block_carry=None, mode=CARRIERS, stream=stream)  # fmt: skip


# --------------------------------------------------------------------------------------------
# For tests: every specialisation the entry points can launch, as (kernel, numba signature).


def specialisations():
    """Yield ``(name, kernel, argument types)`` for every kernel the entry points can pick under
    the current TUNING: layout x input x output dtype x per-head/per-channel x mode x the widest
    vector or the general ``vec == 1``; then the shared-walk kernels (see the comment there)."""
    for layout in ("BLHD", "BHDL"):
        for in_kind in ("f32", "f16", "bf16"):
            widest = _vec_for(TUNING[f"{layout.lower()}_access_bytes"], in_kind)
            modes = (HOPS0, HOPS1, BLOCK_CARRY, CARRIERS)
            if layout == "BLHD":  # the halo walk: k=2 here (dtypes as below), the other k later
                modes += (halo_mode(2),)
            for mode in modes:
                outs = ("f32", "f16", "bf16")
                if mode == CARRIERS:
                    outs = ("f32",)
                elif _mode_hops(mode):  # the stores are the channel walk's: one pair each
                    outs = (in_kind, "f32") if in_kind == "bf16" else (in_kind,)
                for out_kind in outs:
                    for per_head in (True, False):
                        for vec in sorted({1, widest}):
                            if layout == "BLHD":
                                depth = _unroll(mode, vec)
                            else:
                                depth = TUNING["bhdl_rows_per_warp"]
                            pipeline = () if layout == "BLHD" else _bhdl_pipeline(
                                vec, TUNING["bhdl_threads_per_block"])
                            kernel = get_kernel(layout, in_kind, out_kind, per_head, mode, vec,
                                                depth, *pipeline)  # fmt: skip
                            yield kernel.py_func.__name__, kernel, signature(in_kind, out_kind)
    # the BLHD halo walk for k = 3..8: k only sets the shift register's length and the unrolled
    # carrier sum, so bf16 -> bf16 at the widest vector stands for the dtype pairs (k=2 has all)
    vec = _vec_for(TUNING["blhd_access_bytes"], "bf16")
    for k in HALO_HOPS[1:]:
        for per_head in (True, False):
            kernel = get_kernel("BLHD", "bf16", "bf16", per_head, halo_mode(k), vec,
                                _unroll(halo_mode(k), vec))  # fmt: skip
            yield kernel.py_func.__name__, kernel, signature("bf16", "bf16")
    # the BLHD plain walk's hops=1 batches for long blocks (16-bit inputs, per head)
    for in_kind in ("f16", "bf16"):
        vec = _vec_for(TUNING["blhd_access_bytes"], in_kind)
        for out_kind in ("f32", "f16", "bf16"):
            kernel = get_kernel("BLHD", in_kind, out_kind, True, HOPS1, vec,
                                TUNING["blhd_long_unroll"])  # fmt: skip
            yield kernel.py_func.__name__, kernel, signature(in_kind, out_kind)
    # the BHDL row scan: block_len 16 for every input dtype in both modes and every output
    # dtype in hops=1 (the modes differ only in the carrier); the other block lengths only change
    # the segmented scan's depth, so one dtype pair stands for them
    rows = TUNING["bhdl_scan_rows"]
    for in_kind in ("f32", "f16", "bf16"):
        vec = _vec_for(TUNING["bhdl_access_bytes"], in_kind)
        stages = _bhdl_pipeline(vec, TUNING["bhdl_threads_per_block"])
        if not stages:
            continue
        cases = [(out_kind, HOPS1, 16) for out_kind in ("f32", "f16", "bf16")]
        cases += [(in_kind, HOPS0, 16)]
        if in_kind == "bf16":
            cases += [("bf16", HOPS1, 8), ("bf16", HOPS1, 32), ("bf16", HOPS1, 64)]
        for out_kind, mode, block_len in cases:
            kernel = get_row_scan_kernel(in_kind, out_kind, mode, vec, rows, block_len, *stages)
            yield kernel.py_func.__name__, kernel, signature(in_kind, out_kind)
    # the shared walk (BLHD hops=1): block_len 16 per head for every dtype pair; the other block
    # lengths it fits (per head 4 and 8, per channel 4 and 8 at 48 KiB) only change trip counts
    # and shared-memory offsets, so one dtype pair stands for them
    lanes, chunks = TUNING["blhd_share_lanes"], TUNING["blhd_share_chunks"]
    for in_kind in ("f32", "f16", "bf16"):
        vec = _vec_for(TUNING["blhd_access_bytes"], in_kind)
        cases = [(out_kind, True, 16) for out_kind in ("f32", "f16", "bf16")]
        if in_kind == "bf16":
            cases += [("bf16", True, 4), ("bf16", True, 8), ("bf16", False, 4), ("bf16", False, 8)]
        for out_kind, per_head, steps in cases:
            kernel = get_shared_kernel(in_kind, out_kind, per_head, vec,
                                       _unroll(HOPS1, vec, steps),
                                       lanes, chunks, steps)  # fmt: skip
            yield kernel.py_func.__name__, kernel, signature(in_kind, out_kind)


__all__ = ["swr_forward", "block_carriers", "TUNING", "specialisations", "get_kernel"]

