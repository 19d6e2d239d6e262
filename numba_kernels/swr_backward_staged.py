"""Backward of hops 0/1 with the data staged in shared memory by ``cp.async``: BLHD
(:func:`staged_kernel`) and BHDL (:func:`rows_coop_kernel`, described at its factory; H200, bf16,
4 x 8192, 128 x 16, the kernel alone: 0.190 ms against 0.219 ms for the row kernel; each lane
copying its own row instead measured 0.228-0.235 ms).

BLHD:

The math and the work split are those of ``swr_backward_channel`` (a thread owns ``vec`` adjacent
channels of one head-sharing group and walks its chunk's blocks from the last to the first; one
forward walk of block j-1 gives S for block j and checkpoints of block j-1; block j's reverse
sweep recomputes each group of ``unroll`` steps from its checkpoint; per-head ``da`` is summed by
butterfly shuffles over the head's lanes). What changes is where the data comes from:

- A block's ``u``, ``a`` and ``dy`` are copied into shared memory with ``cp.async`` (16 bytes a
  step of ``u`` and ``dy``; ``a`` 4 bytes a step, the aligned pair holding this head's 16-bit
  value), so no registers are held by loads in flight.
- The copies for the next iteration are issued during this one's reverse sweep, into the slots it
  frees (:func:`_make`): the walk and the reverse sweep never wait for a copy issued in the same
  iteration.
- ``u`` and ``a`` of block j-1 are read from DRAM once: the walk of block j-1 (while block j is
  reversed) and the reverse sweep of block j-1 (next iteration) both read the copy in shared
  memory. The plain channel kernel reads ``u`` and ``a`` twice (the second time mostly from L2:
  Nsight Compute showed L2 at 80% of its throughput there).
- Shared memory is read back with ``ld.shared`` (an ``LDS``, short scoreboard).

``block_len`` is a constant of each specialisation (8, 16 or 32), so the checkpoints of a block
live in registers: the reverse sweep reads the last one and shifts the others up (indexed by the
group, they were an 80-byte local-memory array; Nsight Compute on that version: DRAM 62%, L2
78%, 0.44 warps issued per scheduler per cycle at 7.6 warps per SM, 240 registers). Each
thread reads back only what it copied itself (after its own ``cp.async.wait_group``), so no
barrier is needed. Needs per-head coefficients, N a multiple of block_len, 16-byte accesses of
``u`` and ``dy`` (aligned), ``a`` 4-byte aligned, and the shared memory of
:func:`staged_bytes` per thread block.

Measured on an H200 (bf16, hops=1, l=16, 128 x 16, the kernel alone; scripts/swr_sweep.py):
0.1305 ms at 4 x 8192 and 16 x 2048 (2026-12-01; 0.133-0.134 ms at the three sizes before
the scalar accesses took unsigned indices), against 0.147-0.153 ms with
each iteration's copies issued at its start and the checkpoints in local memory, 0.1466 ms with
the copies ahead but the checkpoints still in local memory, and 0.173 ms for the channel kernel.
Chunks of 256 steps and 128 threads per block (two blocks of 112 KiB of shared memory per SM,
211 registers, 235 before the unsigned indices: 8 warps; 64 threads within 1%; 192-step
chunks 0.196 ms, 4-step groups 0.138-0.140 ms; the thread count as a compile-time constant,
within 1%). Tried and dropped
earlier: three blocks of ``u`` and two of ``dy`` in shared memory, so half the warps (0.245-0.25
ms); 8-byte accesses (4 channels per thread, 12 warps per SM but twice the shuffles and per-step
work: 0.21-0.26 ms); block_len 32 (one block of 128 threads per SM: 0.240 against 0.187 ms for the
channel kernel, so TUNING caps the staged kernel at block_len 16).
"""

from __future__ import annotations

import numba
from numba import cuda

from ._dtypes import LOAD, SIMULATOR, STORE
from .phalanx_fused import _head_sum
from .swr_backward_channel import (
    _ITEM,
    F0,
    F1,
    _split_load,
    make_head_scatter,
    make_next_q,
    make_reverse_step,
    make_row_group,
)
from .swr_forward import (
    _STORAGE_TYPE,
    async_commit,
    make_async_copy,
    make_async_wait,
    make_shared_load,
    make_vector_load,
    make_vector_store,
)

__all__ = ["BLOCK_LENS", "rows_coop_config", "rows_coop_kernel", "staged_bytes",
           "staged_config", "staged_kernel"]

BLOCK_LENS = (8, 16, 32)
"""block_len values with a staged specialisation."""

SHARED_LIMIT = 227 * 1024
"""Dynamic shared memory one thread block may opt in to on sm_90 (H100, H200)."""

f32 = numba.float32
_CACHE: dict = {}


def staged_bytes(ku, kd, vec, block_len, threads):
    """(u, dy, a) offsets in bytes and the total bytes of the dynamic shared memory: two blocks
    of ``u`` (the one reversed, the one walked), one of ``dy``, two blocks of ``a`` (4 bytes a
    step: one 4-byte copy)."""
    u_block = block_len * threads * vec * _ITEM[ku]
    d_block = block_len * threads * vec * _ITEM[kd]
    d_at = 2 * u_block
    a_at = d_at + d_block
    return 0, d_at, a_at, a_at + 2 * block_len * threads * 4


def staged_config(ku, kd, per_head, block_len, N, vec, unroll, threads, a_address):
    """``(threads, shared bytes)`` of the staged kernel, or None where it does not fit: per-head
    coefficients, ``block_len`` in :data:`BLOCK_LENS` and a multiple of ``unroll``, ``N`` a
    multiple of ``block_len``, one 16-byte access of ``u`` per step (``vec`` elements; the caller
    checked the alignment), whole 16-byte pieces of ``dy`` and ``a`` at a 4-byte aligned address
    (``a_address``: it comes by 4-byte copies). ``threads`` per block halve until the shared
    memory fits (down to 32; the simulator passes a head's lanes)."""
    if not per_head or block_len not in BLOCK_LENS or block_len % unroll or N % block_len:
        return None
    if a_address % 4:
        return None
    if vec * _ITEM[ku] != 16 or vec * _ITEM[kd] % 16:
        return None
    while threads > 32 and staged_bytes(ku, kd, vec, block_len, threads)[3] > SHARED_LIMIT:
        threads //= 2
    total = staged_bytes(ku, kd, vec, block_len, threads)[3]
    return (threads, total) if total <= SHARED_LIMIT else None


def _make(ku, kd, hops, vec, block_len, unroll):
    """The staged kernel: the next iteration's copies are issued during this one's reverse sweep.

    The reverse sweep of block j frees its shared memory a group of ``unroll`` steps at a time:
    once a group's forward states are recomputed, the group's slots of u and a take block j-2's
    (walked in the next iteration), and once its dy is consumed, its slots of dy take block j-1's
    (reversed in the next iteration). One commit group per group of steps; the next iteration
    waits for all of them. The walk and the reverse sweep never wait for a copy issued in the same
    iteration, and the shared memory stays two blocks of u and a and one of dy
    (:func:`staged_bytes`).

    The reverse sweep frees the groups of u from the last to the first and the walk wants them from
    the first: a block's groups are stored in reverse order every other pair of blocks (``flip``:
    bit 1 of the block index), so block j-2's group k lands where block j's group ``NGB - 1 - k``
    was. a comes by 4-byte copies into the staged kernel's space for it (16-bit: the aligned pair
    that holds this head's value, so a's address must be 4-byte aligned; N is even here, so the
    pair is inside the array); u and a of a group share their slot index.
    """
    VEC, LB, U = vec, block_len, unroll
    NGB = LB // U  # groups per block
    HOPS1 = hops == 1
    DW = 16 // _ITEM[kd]  # dy elements per 16-byte copy
    DP = VEC // DW  # copies of dy per step
    AE = 4 // _ITEM[ku]  # elements of a per 4-byte copy
    AM = AE - 1
    copy_u = make_async_copy(ku, VEC)
    copy_d = make_async_copy(kd, DW)
    copy_a = make_async_copy(ku, AE)
    wait_all = make_async_wait(0)
    wait_older = make_async_wait(1)
    load_su = make_shared_load(ku, VEC)
    load_sd = _split_load(kd, VEC, ".shared")
    load_s = LOAD[ku]
    load_a = make_vector_load(ku, 1)
    load_d = _split_load(kd, VEC)
    store_v = make_vector_store(ku, VEC)
    store_s = STORE[ku]
    SU, SD = _STORAGE_TYPE[ku], _STORAGE_TYPE[kd]
    ITU, ITD = _ITEM[ku], _ITEM[kd]
    CKN, UV = NGB * VEC, U * VEC  # local array sizes must be constants
    reverse_step = make_reverse_step(VEC, 1, hops)
    next_q = make_next_q(VEC, 1, U, True, load_a, load_d)

    @cuda.jit(device=True, inline=True)
    def walks_before(jb, jj0):
        """Whether the iteration of block jb walks block jb-1: for S (hops=1, any block but the
        sequence's first) or for its checkpoints (a block of the chunk)."""
        return jb > 0 and (HOPS1 or jb > jj0)

    @cuda.jit(device=True, inline=True)
    def slot_group(jb, k):
        """Where block jb keeps its group k of u and a."""
        return NGB - 1 - k if (jb >> 1) & 1 else k

    @cuda.jit(device=True, inline=True)
    def issue_ua(u, a, sm_u, b, N, C, c0, a_stride, a_col, jb, k, pk, a_at, tpb, tx):
        """Start the copies of u and a of block jb's group k into slot group pk."""
        m0 = b * N + jb * LB + k * U
        base = ((jb & 1) * LB + pk * U) * tpb + tx
        for i in range(U):
            p = base + i * tpb
            copy_u(u, (m0 + i) * C + c0, sm_u, p * VEC)
            ai = (m0 + i) * a_stride + a_col
            copy_a(a, ai - (ai & AM), sm_u, a_at + p * AE)

    @cuda.jit(device=True, inline=True)
    def issue_d(dy, sm_d, b, N, C, c0, jb, gi, d_at, tpb, tx):
        """Start the copies of dy of block jb's group gi (into its own slots)."""
        m0 = b * N + jb * LB + gi * U
        for i in range(U):
            for pp in range(DP):
                copy_d(dy, (m0 + i) * C + c0 + pp * DW, sm_d,
                       d_at + ((gi * U + i) * tpb + tx) * VEC + pp * DW)

    @cuda.jit(device=True, inline=True)
    def a_at_step(sm_u, a_at, p, m, a_stride, a_col):
        """a of flat row m from slot p (16-bit: the half of the pair that is this head's)."""
        # (an unsigned index: no wraparound code for negative ones)
        return load_s(sm_u[numba.uint64(a_at + p * AE + (((m & a_stride) ^ a_col) & AM))])

    @cuda.jit(device=True, inline=True)
    def walk(sm_u, b, N, jb, a_at, a_stride, a_col, tpb, tx, w, g, ckw, ckg, ub):
        """Forward through block jb from shared memory, checkpointing (w, g) before each group;
        w ends as the block's carrier."""
        for k in range(VEC):
            w[k] = F0
        g[0] = F1
        for gi in range(NGB):
            for k in range(VEC):
                ckw[gi * VEC + k] = w[k]
            ckg[gi] = g[0]
            base = ((jb & 1) * LB + slot_group(jb, gi) * U) * tpb + tx
            m0 = b * N + jb * LB + gi * U
            for i in range(U):
                p = base + i * tpb
                load_su(sm_u, p * VEC, ub, 0)
                av = a_at_step(sm_u, a_at, p, m0 + i, a_stride, a_col)
                for k in range(VEC):
                    w[k] = av * w[k] + ub[k]
                g[0] = g[0] * av

    def swr_backward_staged(a, u, dy, du, da, carry, dcarry, N, C, D, nb, block_len,
                            chunk_blocks, groups, nchunks, nwork, lph, has_dcarry):
        tx = numba.int64(cuda.threadIdx.x)
        tpb = numba.int64(cuda.blockDim.x)
        tid = numba.int64(cuda.blockIdx.x) * tpb + tx
        if tid >= nwork:
            return  # no barriers below: each thread reads back only its own copies
        rest = tid // groups
        c0 = (tid - rest * groups) * VEC
        b = rest // nchunks
        jj0 = (rest - b * nchunks) * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        a_stride = C // D
        a_col = c0 // D
        ch0 = b * C + c0
        lead_lane = (c0 % D) == 0  # the head's first lane stores da
        lane = tx % 32
        mask = numba.uint32(((numba.int64(1) << lph) - 1) << (lane - lane % lph))
        sm_u = cuda.shared.array(0, SU)
        sm_d = cuda.shared.array(0, SD)
        # region offsets in each view's elements (see staged_bytes): u, dy, a (u's kind)
        u_block = LB * tpb * VEC * ITU
        d_at = 2 * u_block // ITD
        a_at = (2 * u_block + LB * tpb * VEC * ITD) // ITU

        q = cuda.local.array(VEC, f32)
        S = cuda.local.array(VEC, f32)
        w = cuda.local.array(VEC, f32)
        g = cuda.local.array(1, f32)
        lam = cuda.local.array(VEC, f32)
        zz = cuda.local.array(VEC, f32)
        ov = cuda.local.array(VEC, f32)
        oa = cuda.local.array(VEC, f32)  # per-channel da of a step (summed here: unused)
        ub = cuda.local.array(VEC, f32)
        db = cuda.local.array(VEC, f32)
        ab = cuda.local.array(U, f32)
        gp = cuda.local.array(U, f32)
        wp = cuda.local.array(UV, f32)
        ckw = cuda.local.array(CKN, f32)  # checkpoints of the block being reversed
        ckg = cuda.local.array(NGB, f32)
        nkw = cuda.local.array(CKN, f32)  # ... and of the block walked
        nkg = cuda.local.array(NGB, f32)
        an = cuda.local.array(1, f32)
        dq = cuda.local.array(UV, f32)
        aq = cuda.local.array(U, f32)

        j = jj1 - 1
        # the chunk's last block (its checkpoints), then what the first iteration needs: the
        # block before it (walked) and dy of the last block
        for k in range(NGB):
            issue_ua(u, a, sm_u, b, N, C, c0, a_stride, a_col, j, k, slot_group(j, k), a_at,
                     tpb, tx)
        async_commit()
        if walks_before(j, jj0):
            for k in range(NGB):
                issue_ua(u, a, sm_u, b, N, C, c0, a_stride, a_col, j - 1, k,
                         slot_group(j - 1, k), a_at, tpb, tx)
        for gi in range(NGB):
            issue_d(dy, sm_d, b, N, C, c0, j, gi, d_at, tpb, tx)
        async_commit()

        for k in range(VEC):
            q[k] = F0
        if HOPS1 and jj1 < nb:
            # q of the block after the chunk (plain loads, once per chunk)
            next_q(a, dy, b * N + jj1 * LB, LB, C, c0, a_stride, a_col, an, zz, aq, dq, q)

        wait_older()
        walk(sm_u, b, N, j, a_at, a_stride, a_col, tpb, tx, w, g, ckw, ckg, ub)
        while j >= jj0:
            walking = walks_before(j, jj0)
            ahead_d = j - 1 >= jj0  # a next iteration, on block j-1
            ahead_u = ahead_d and walks_before(j - 1, jj0)  # ... that walks block j-2
            wait_all()  # u and a of block j-1, dy of block j
            for k in range(VEC):
                S[k] = F0
            if walking:
                walk(sm_u, b, N, j - 1, a_at, a_stride, a_col, tpb, tx, w, g, nkw, nkg, ub)
                if HOPS1:
                    for k in range(VEC):
                        S[k] = w[k]
            elif HOPS1 and j == 0:
                for k in range(VEC):
                    S[k] = carry[ch0 + k]
            # reverse sweep of block j, a group of U steps at a time
            for k in range(VEC):
                lam[k] = q[k]
                zz[k] = F0
            an[0] = F1
            m0 = b * N + j * LB
            for gg in range(NGB):
                gi = NGB - 1 - gg
                pk = slot_group(j, gi)
                base = ((j & 1) * LB + pk * U) * tpb + tx
                # the group's forward states w_{t-1}, g_{t-1}, from its checkpoint: always the
                # last one, the others shifted up after it is read (gi is a loop variable here,
                # and an array indexed by it would live in local memory)
                for k in range(VEC):
                    w[k] = ckw[(NGB - 1) * VEC + k]
                g[0] = ckg[NGB - 1]
                for c in range(NGB - 1, 0, -1):
                    for k in range(VEC):
                        ckw[c * VEC + k] = ckw[(c - 1) * VEC + k]
                    ckg[c] = ckg[c - 1]
                for i in range(U):
                    p = base + i * tpb
                    load_su(sm_u, p * VEC, ub, 0)
                    ab[i] = a_at_step(sm_u, a_at, p, m0 + gi * U + i, a_stride, a_col)
                    gp[i] = g[0]
                    g[0] = g[0] * ab[i]
                    for k in range(VEC):
                        wp[i * VEC + k] = w[k]
                        w[k] = ab[i] * w[k] + ub[k]
                if ahead_u:  # block j-2's group gg where this group was (see slot_group)
                    issue_ua(u, a, sm_u, b, N, C, c0, a_stride, a_col, j - 2, gg, pk, a_at,
                             tpb, tx)
                for ii in range(U):
                    i = U - 1 - ii
                    t = gi * U + i
                    m = m0 + t
                    load_sd(sm_d, d_at + (t * tpb + tx) * VEC, db, 0)
                    pa = reverse_step(db, 0, an, lam, zz, S, wp, gp, i, ov, oa)
                    store_v(du, m * C + c0, ov, 0)
                    pa = _head_sum(pa, lph, mask)
                    if lead_lane:
                        da[numba.uint64(m * a_stride + a_col)] = store_s(pa)
                    an[0] = ab[i]
                if ahead_d:
                    issue_d(dy, sm_d, b, N, C, c0, j - 1, gi, d_at, tpb, tx)
                async_commit()
            if HOPS1:
                for k in range(VEC):
                    q[k] = an[0] * zz[k]  # q_j, for block j-1
            if j == 0 and has_dcarry != 0:
                for k in range(VEC):
                    dcarry[ch0 + k] = q[k]  # hops=0: zeros
            for k in range(CKN):
                ckw[k] = nkw[k]
            for k in range(NGB):
                ckg[k] = nkg[k]
            j -= 1

    swr_backward_staged.__name__ = swr_backward_staged.__qualname__ = (
        f"swr_backward_staged_{ku}_dy_{kd}_per_head_hops{hops}_vec{vec}_l{block_len}"
        f"_unroll{unroll}")
    return cuda.jit(swr_backward_staged)


def staged_kernel(ku, kd, hops, vec, block_len, unroll):
    """The compiled-on-demand dispatcher of one specialisation."""
    key = (ku, kd, hops, vec, block_len, unroll)
    if key not in _CACHE:
        _CACHE[key] = _make(ku, kd, hops, vec, block_len, unroll)
    return _CACHE[key]


# ----------------------------------------------------------------------------------------------
# BHDL: the row kernel's walk with a warp's rows staged together (coalesced copies)
# ----------------------------------------------------------------------------------------------

SPAN_BLOCKS = 4
"""Blocks of 16 steps a BHDL warp copies at a time: 64 steps, 128 bytes of a 16-bit row."""

if SIMULATOR:  # a thread block is one warp there (see _rows_coop_args)

    @cuda.jit(device=True)
    def _warp_sync():
        cuda.syncthreads()

else:

    @cuda.jit(device=True, inline=True)
    def _warp_sync():
        cuda.syncwarp()


def _coop_layout(kind, lph):
    """(row stride, u, dy, a offsets, elements) of one warp's shared memory, in elements: two
    spans of its 32 rows of u and of dy, two of its heads' rows of a; rows padded by 16 bytes
    so that 16-byte reads of 32 different rows do not conflict."""
    v = 16 // _ITEM[kind]
    pad = SPAN_BLOCKS * 16 + v
    d_at = 2 * 32 * pad
    a_at = 2 * d_at
    return pad, 0, d_at, a_at, a_at + 2 * (32 // lph) * pad


def rows_coop_config(ku, kd, per_head, block_len, N, D, C, chunk_blocks, addresses, warps):
    """``(threads, shared bytes)`` of the cooperative BHDL kernel, or None where it does not
    fit: per head, 16-bit u and dy of one kind, block_len 16, N and the chunks whole spans of
    64 steps, D a power of two up to 32, whole warps of rows (C % 32), aligned arrays."""
    if not per_head or ku != kd or _ITEM[ku] != 2 or block_len != 16:
        return None
    if N % (16 * SPAN_BLOCKS) or chunk_blocks % SPAN_BLOCKS or C % 32:
        return None
    if D & (D - 1) or D > 32 or any(x % 16 for x in addresses):
        return None
    return 32 * warps, warps * _coop_layout(ku, D)[4] * _ITEM[ku]


def _make_rows_coop(ku, hops, lph):
    """A warp owns 32 consecutive channel rows of one chunk, each lane one row, and walks the
    chunk's blocks from the last to the first as the row kernel does (groups of 16 steps, per-head
    da by a shuffle reduce-scatter over the head's ``lph`` lanes). The warp copies u, dy and a
    into shared memory a span of four blocks at a time with ``cp.async``: each instruction moves
    four rows x 128 bytes (the row kernel's loads touch 32 lines each), u and a are read from
    memory once, and the next span is in flight while one computes. A lane reads its own row
    back; other lanes' copies become visible after ``cp.async.wait_group`` and ``__syncwarp``."""
    V = 16 // _ITEM[ku]
    LB = 16
    U = LB  # one group of 16 steps per block
    SB = SPAN_BLOCKS
    SP = SB * LB
    PR = SP // V  # 16-byte pieces of a row's span
    HPW = 32 // lph  # heads per warp
    PAD, U_AT, D_AT, A_AT, WARP = _coop_layout(ku, lph)
    HOPS1 = hops == 1
    head_scatter = make_head_scatter(U, lph, STORE[ku])
    row_group = make_row_group(U, hops)
    copy = make_async_copy(ku, V)
    wait_all = make_async_wait(0)
    wait_older = make_async_wait(1)
    load_s = make_shared_load(ku, V)
    load_g = make_vector_load(ku, V)
    store_v = make_vector_store(ku, V)
    ST = _STORAGE_TYPE[ku]

    @cuda.jit(device=True, inline=True)
    def issue(u, dy, a, sm, base, r0, h0, N, s, lane, with_u, with_d):
        """Copies of span s of the warp's rows (u and its heads' a, and/or dy) into slot s % 2;
        one commit group (empty when neither)."""
        z = s % 2
        t0 = s * SP
        for k in range(PR):
            p = k * 32 + lane
            rr = p // PR
            pc = p - rr * PR
            src = (r0 + rr) * N + t0 + pc * V
            dst = (z * 32 + rr) * PAD + pc * V
            if with_u:
                copy(u, src, sm, base + U_AT + dst)
            if with_d:
                copy(dy, src, sm, base + D_AT + dst)
        if with_u and lane < HPW * PR:
            hh = lane // PR
            pc = lane - hh * PR
            copy(a, (h0 + hh) * N + t0 + pc * V, sm, base + A_AT + (z * HPW + hh) * PAD + pc * V)
        async_commit()

    @cuda.jit(device=True, inline=True)
    def read(sm, at, dst):
        for p in range(U // V):
            load_s(sm, at + p * V, dst, p * V)

    def swr_backward_rows_coop(a, u, dy, du, da, carry, dcarry, N, C, D, nb, block_len,
                               chunk_blocks, groups, nchunks, nwork, lph_arg, has_dcarry):
        tx = numba.int64(cuda.threadIdx.x)
        tid = numba.int64(cuda.blockIdx.x) * cuda.blockDim.x + tx
        if tid >= nwork:
            return  # whole warps (nwork is a multiple of 32)
        rest = tid // C
        c = tid - rest * C
        b = rest // nchunks
        jj0 = (rest - b * nchunks) * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        row = b * C + c
        ru = row * N
        ra = (b * (C // D) + c // D) * N
        lane = tx % 32
        r0 = row - lane
        h0 = b * (C // D) + (c - lane) // D
        hw = lane // lph  # the lane's head in the warp
        base = (tx // 32) * WARP
        mask = numba.uint32(((numba.int64(1) << lph) - 1) << (lane - lane % lph))
        sm = cuda.shared.array(0, ST)

        ab = cuda.local.array(U, f32)
        ub = cuda.local.array(U, f32)
        db = cuda.local.array(U, f32)
        wp = cuda.local.array(U, f32)
        gp = cuda.local.array(U, f32)
        ov = cuda.local.array(U, f32)
        red = cuda.local.array(U, f32)

        s_hi = (jj1 - 1) // SB
        s_lo = jj0 // SB
        prev = HOPS1 and jj0 > 0  # the walk of block jj0 - 1 (span s_lo - 1) gives the carrier
        issue(u, dy, a, sm, base, r0, h0, N, s_hi, lane, True, True)
        if s_hi - 1 >= s_lo:
            issue(u, dy, a, sm, base, r0, h0, N, s_hi - 1, lane, True, True)
        else:
            issue(u, dy, a, sm, base, r0, h0, N, s_hi - 1, lane, prev, False)

        q = F0
        if HOPS1 and jj1 < nb:
            # q of the block after the chunk, in the reverse sweep's order; plain loads
            t0 = jj1 * LB
            for p in range(U // V):
                load_g(a, ra + t0 + p * V, ab, p * V)
                load_g(dy, ru + t0 + p * V, db, p * V)
            an = F1
            zz = F0
            for ii in range(U):
                i = U - 1 - ii
                zz = db[i] + an * zz
                an = ab[i]
            q = an * zz
        wait_older()
        _warp_sync()

        j = jj1 - 1
        while j >= jj0:
            s = j // SB
            walking = j > 0 and (HOPS1 or j > jj0)
            if j % SB == 0 and walking:
                wait_all()  # span s - 1: the walk below reads its last block
                _warp_sync()
            S = F0
            if walking and HOPS1:
                jb = j - 1
                zb = (jb // SB) % 2
                o = (jb % SB) * LB
                read(sm, base + U_AT + (zb * 32 + lane) * PAD + o, ub)
                read(sm, base + A_AT + (zb * HPW + hw) * PAD + o, ab)
                w = F0
                for i in range(U):
                    w = ab[i] * w + ub[i]
                S = w
            elif HOPS1 and j == 0:
                S = carry[row]
            # reverse sweep of block j (one group: its forward states from w = 0, g = 1)
            z = s % 2
            o = (j % SB) * LB
            read(sm, base + U_AT + (z * 32 + lane) * PAD + o, ub)
            read(sm, base + A_AT + (z * HPW + hw) * PAD + o, ab)
            read(sm, base + D_AT + (z * 32 + lane) * PAD + o, db)
            _, zz, an = row_group(ab, ub, db, F0, F1, S, q, F0, F1, wp, gp, ov, red)
            t0 = j * LB
            for p in range(U // V):
                store_v(du, ru + t0 + p * V, ov, p * V)
            head_scatter(red, lane, mask, da, ra + t0)
            if HOPS1:
                q = an * zz
            if j == 0 and has_dcarry != 0:
                dcarry[row] = q
            if j % SB == 0 and j > jj0:
                # span s is done: its slot takes span s - 2
                _warp_sync()
                if s - 2 >= s_lo:
                    issue(u, dy, a, sm, base, r0, h0, N, s - 2, lane, True, True)
                else:  # the span before the chunk: u and a of its last block's walk
                    issue(u, dy, a, sm, base, r0, h0, N, s - 2, lane,
                          prev and s - 2 == s_lo - 1, False)
            j -= 1

    swr_backward_rows_coop.__name__ = swr_backward_rows_coop.__qualname__ = (
        f"swr_backward_rows_coop_{ku}_per_head_hops{hops}_lph{lph}")
    return cuda.jit(swr_backward_rows_coop)


def rows_coop_kernel(ku, hops, lph):
    """The compiled-on-demand dispatcher of one specialisation."""
    key = ("coop", ku, hops, lph)
    if key not in _CACHE:
        _CACHE[key] = _make_rows_coop(ku, hops, lph)
    return _CACHE[key]
