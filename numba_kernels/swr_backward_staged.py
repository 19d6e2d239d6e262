"""BLHD backward of hops 0/1 with the data staged in shared memory by ``cp.async``
(:func:`staged_kernel`).

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
  memory, where the plain channel kernel reads them twice.
- Shared memory is read back with ``ld.shared``.

``block_len`` is a constant of each specialisation (:data:`BLOCK_LENS`), so the checkpoints of a
block live in registers: the reverse sweep reads the last one and shifts the others up (no local
memory). Each thread reads back only what it copied itself (after its own
``cp.async.wait_group``), so no barrier is needed. Needs per-head coefficients, N a multiple of
block_len, 16-byte accesses of ``u`` and ``dy`` (aligned), ``a`` 4-byte aligned, and the shared
memory of :func:`staged_bytes` per thread block. Its numbers are bitwise those of the channel
kernel.
"""

from __future__ import annotations

import numba
from numba import cuda

from ._dtypes import ITEM_SIZE, LOAD, STORE
from ._ptx import (
    STORAGE_TYPE,
    async_commit,
    head_sum,
    make_async_copy,
    make_async_wait,
    make_shared_load,
    make_vector_load,
    make_vector_store,
)
from .swr_backward_channel import (
    F0,
    F1,
    make_next_q,
    make_reverse_step,
    split_load,
)

__all__ = ["BLOCK_LENS", "staged_bytes", "staged_config", "staged_kernel"]

BLOCK_LENS = (8, 16)
"""block_len values with a staged specialisation (longer blocks go to the channel kernel: one
thread block of 128 threads per SM fits the shared memory of block_len 32)."""

SHARED_LIMIT = 227 * 1024
"""Dynamic shared memory one thread block may opt in to on sm_90 (H100, H200)."""

f32 = numba.float32
_CACHE: dict = {}


def staged_bytes(ku, kd, vec, block_len, threads):
    """(u, dy, a) offsets in bytes and the total bytes of the dynamic shared memory: two blocks
    of ``u`` (the one reversed, the one walked), one of ``dy``, two blocks of ``a`` (4 bytes a
    step: one 4-byte copy)."""
    u_block = block_len * threads * vec * ITEM_SIZE[ku]
    d_block = block_len * threads * vec * ITEM_SIZE[kd]
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
    if vec * ITEM_SIZE[ku] != 16 or vec * ITEM_SIZE[kd] % 16:
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
    DW = 16 // ITEM_SIZE[kd]  # dy elements per 16-byte copy
    DP = VEC // DW  # copies of dy per step
    AE = 4 // ITEM_SIZE[ku]  # elements of a per 4-byte copy
    AM = AE - 1
    copy_u = make_async_copy(ku, VEC)
    copy_d = make_async_copy(kd, DW)
    copy_a = make_async_copy(ku, AE)
    wait_all = make_async_wait(0)
    wait_older = make_async_wait(1)
    load_su = make_shared_load(ku, VEC)
    load_sd = split_load(kd, VEC, ".shared")
    load_s = LOAD[ku]
    load_a = make_vector_load(ku, 1)
    load_d = split_load(kd, VEC)
    store_v = make_vector_store(ku, VEC)
    store_s = STORE[ku]
    SU, SD = STORAGE_TYPE[ku], STORAGE_TYPE[kd]
    ITU, ITD = ITEM_SIZE[ku], ITEM_SIZE[kd]
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
                    pa = head_sum(pa, lph, mask)
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
