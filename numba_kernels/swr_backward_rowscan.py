"""BHDL backward with the lanes along time: the forward row scan's layout, run both ways.

docs/spec.md#gradients (hops 0/1, per-head ``a``, offset 0). A warp owns one head (all its ``D``
rows) and a chunk of time. Each lane holds ``vec`` consecutive steps of a row (one 16-byte load), so
every load and store of a warp is 512 contiguous bytes. Per iteration of ``32 * vec`` steps, what
depends on ``a`` alone is computed once for the head's rows: the lane's running products forward
(``g``) and backward (``a_{t+1} ... a_end``), and their segmented products across the block's lanes.
Per row the lane then

- scans forward (``w``) and combines with the block's earlier lanes (``log2(lanes)`` shuffles);
  the carrier of the block before (hops=1) comes from the lane that ended it;
- scans ``dy`` backward (``z``) and combines with the block's later lanes;
- sums ``g dy`` over its block (``q``, shuffles within the block) and takes ``q`` of the block
  after from the lanes that hold it;
- writes ``du = z + (a_{t+1} ... a_end) q_{j+1}`` and adds its row's share of
  ``da_t = w_{t-1} du_t + g_{t-1} v_{j-1} z_t`` to the head's sum, kept in registers over the
  rows and stored once per iteration.

An iteration's last block only feeds ``q`` to the one before it: iterations step by ``32 * vec -
block_len``, so that block is the first of the next iteration (its bytes are read twice, the
second time from L2). Lane ``31 - lanes`` ends the last block an iteration writes; it keeps that
block's carrier (per row, in shared memory) and sends it to the next iteration's first block. A
chunk after the first (hops=1) first walks the block before it, for every row at once (``lanes``
lanes a row, ``32 / lanes`` rows a pass), for that block's carriers.

With ``stages`` > 0 the rows' ``u`` and ``dy`` and each iteration's ``a`` arrive through a ring
of ``stages`` rows per warp in shared memory, copied by ``cp.async`` that many rows ahead, so
the loads in flight hold no registers.
"""

from __future__ import annotations

import numba
from numba import cuda

from ._dtypes import ITEM_SIZE, SHARED_ALIGN
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
    warp_sync,
    words_per_access,
)

_CACHE: dict = {}

F0 = numba.float32(0.0)
F1 = numba.float32(1.0)


def row_scan_config(ku, kd, per_head, block_len, N, D, addresses, vec_bytes=16):
    """``vec`` of the BHDL backward row scan, or None where it does not fit: per head, u and dy
    of one item size, ``vec | N``, ``vec <= block_len <= 16 vec`` (at least two blocks per
    iteration), D up to 64, 16-byte aligned arrays."""
    if not per_head or ITEM_SIZE[ku] != ITEM_SIZE[kd]:
        return None
    vec = vec_bytes // ITEM_SIZE[ku]
    if N % vec or not vec <= block_len <= 16 * vec or D > 64:
        return None
    if any(x % vec_bytes for x in addresses):
        return None
    return vec


def _make(ku, kd, hops, vec, block_len, rows, warps_per_block, depth, stages, min_blocks):
    span = 32 * vec
    lanes = block_len // vec
    levels = lanes.bit_length() - 1
    lv = max(levels, 1)
    scan_g, scan_w = make_block_scan(lanes)
    step = span - block_len  # iterations overlap by one block
    per_pass = 32 // lanes  # rows whose block before the chunk the warp walks at once
    passes = -(-rows // per_pass)
    last = 31 - lanes  # the lane that ends the last block an iteration writes
    HOPS1 = hops == 1
    depth = min(depth, rows)
    nbuf = depth * words_per_access(ku, vec)
    n_slots = warps_per_block * rows
    f32, i32 = numba.float32, numba.int32
    nw = words_per_access(ku, vec)
    load_a = make_vector_load(ku, vec)
    load_uw = make_word_load(ku, vec)
    load_dw = make_word_load(kd, vec)
    unpack_u = make_word_unpack(ku, vec)
    unpack_d = make_word_unpack(kd, vec)
    store_du = make_vector_store(ku, vec)
    store_da = make_vector_store(ku, vec)
    WT = WORD_TYPE
    # stages > 0: the rows' u and dy (and each iteration's a) come through a ring of `stages`
    # rows per warp in shared memory (a power of two dividing rows: a row's slot is q % S),
    # copied by cp.async `stages` rows ahead (no registers held)
    STAGED = stages > 0
    S = max(stages, 1)
    n_ring = warps_per_block * S * span
    n_aring = warps_per_block * 2 * span
    SU, SD = STORAGE_TYPE[ku], STORAGE_TYPE[kd]
    copy_u = make_async_copy(ku, vec)
    copy_d = make_async_copy(kd, vec)
    wait_row = make_async_wait(S - 1)
    load_su = make_shared_load(ku, vec)
    load_sd = make_shared_load(kd, vec)

    @cuda.jit(device=True, inline=True)
    def issue(u, dy, a, sm_u, sm_d, sm_a, at, off, a_off, a_at):
        """Start the copies of one row (u and dy at ``off``) into the ring at ``at``, and of the
        iteration's a (at ``a_off`` >= 0) into ``a_at``."""
        copy_u(u, off, sm_u, at)
        copy_d(dy, off, sm_d, at)
        if a_off >= 0:
            copy_u(a, a_off, sm_a, a_at)

    @cuda.jit(device=True, inline=True)
    def refill(u, dy, a, sm_u, sm_d, sm_a, at, q, it, n_iters, row_off, N, tc, tc_next, a_row,
               a_ring):
        """After row ``q`` of iteration ``it`` is read from ``at``: copy the row S steps ahead
        into it (this iteration's row q + S, else the next one's, with its a at row 0), as one
        commit group (empty past the last iteration)."""
        f = q + S
        if f < rows:
            issue(u, dy, a, sm_u, sm_d, sm_a, at, row_off + f * N + tc, -1, a_ring)
        elif it + 1 < n_iters:
            issue(u, dy, a, sm_u, sm_d, sm_a, at, row_off + (f - rows) * N + tc_next,
                  a_row + tc_next if f == rows else -1, a_ring + ((it + 1) & 1) * span)
        async_commit()

    def swr_backward_row_scan(a, u, dy, du, da, carry, dcarry, N, C, D, nb, block_len_,
                              chunk_blocks, groups, nchunks, nwork, lph, has_dcarry):
        warp = cuda.grid(1) // 32
        if warp >= nwork:
            return  # whole warps
        lane = i32(cuda.threadIdx.x % 32)
        seg = lane & i32(lanes - 1)
        src = lane - seg - i32(1)  # the lane that ends the block before
        if src < 0:
            src = i32(last)  # ... in the last iteration
        head = warp % groups
        chunk = warp // groups
        t_lo = chunk * chunk_blocks * block_len
        t_hi = min(t_lo + chunk_blocks * block_len, N)
        t_end = min(t_hi + block_len, N)  # loads: the block after the chunk gives its q
        n_iters = (t_hi - t_lo + step - 1) // step
        a_row = head * N
        row0 = head * rows
        sm_v = cuda.shared.array(n_slots, numba.float32, alignment=SHARED_ALIGN)
        sm_u = cuda.shared.array(n_ring if STAGED else 1, SU, alignment=SHARED_ALIGN)
        sm_d = cuda.shared.array(n_ring if STAGED else 1, SD, alignment=SHARED_ALIGN)
        sm_a = cuda.shared.array(n_aring if STAGED else 1, SU, alignment=SHARED_ALIGN)
        wslot = cuda.threadIdx.x // 32
        slot = wslot * rows
        ring = (wslot * S * 32 + lane) * vec  # the lane's 16 bytes in the warp's first slot
        a_ring = (wslot * 2 * 32 + lane) * vec
        row_off = row0 * N

        af = cuda.local.array(vec, f32)
        gl = cuda.local.array(vec, f32)  # a_0 ... a_e (the lane's steps)
        pl = cuda.local.array(vec, f32)  # a_{e+1} ... a_{vec-1}
        gk = cuda.local.array(lv, f32)
        pk = cuda.local.array(lv, f32)
        uf = cuda.local.array(vec, f32)
        df = cuda.local.array(vec, f32)
        wl = cuda.local.array(vec, f32)
        zl = cuda.local.array(vec, f32)
        ov = cuda.local.array(vec, f32)
        dacc = cuda.local.array(vec, f32)
        nu = cuda.local.array(nbuf, WT)  # the next `depth` rows' words, in flight
        nd = cuda.local.array(nbuf, WT)
        cu = cuda.local.array(nw, WT)
        cd = cuda.local.array(nw, WT)
        # the first `depth` rows' loads; later ones are issued `depth` rows ahead, across
        # iterations
        tc = min(t_lo + lane * vec, t_end - vec)
        if STAGED:  # iteration 0's first S rows (S <= rows), with its a
            for k in range(S):
                issue(u, dy, a, sm_u, sm_d, sm_a, ring + k * span, row_off + k * N + tc,
                      a_row + tc if k == 0 else -1, a_ring)
                async_commit()
        else:
            for d in range(depth):
                load_uw(u, (row0 + d) * N + tc, nu, d * nw)
                load_dw(dy, (row0 + d) * N + tc, nd, d * nw)
        if HOPS1:  # the carrier of the block before the chunk, per row, into sm_v
            if chunk == 0:
                if lane == last:
                    for q in range(rows):
                        sm_v[slot + q] = carry[row0 + q]
            else:  # `lanes` lanes walk a row's block, 32 // lanes rows at a time
                tb = t_lo - block_len + seg * vec
                load_a(a, a_row + tb, af, 0)
                g_acc = F1
                for e in range(vec):
                    g_acc = g_acc * af[e]
                scan_g(g_acc, gk, seg)
                for p in range(passes):
                    r = p * per_pass + lane // lanes
                    load_a(u, (row0 + min(r, rows - 1)) * N + tb, uf, 0)
                    w_acc = F0
                    for e in range(vec):
                        w_acc = af[e] * w_acc + uf[e]
                    big_w, _ = scan_w(w_acc, gk, seg)
                    if seg == lanes - 1 and r < rows:
                        sm_v[slot + r] = big_w
            warp_sync()  # lane `last` reads what the others wrote
        for it in range(n_iters):
            t0 = t_lo + it * step + lane * vec
            valid = t0 < t_end
            tc = min(t0, t_end - vec)
            tc_next = min(t0 + step, t_end - vec)
            writes = lane <= last and t0 < t_hi
            if STAGED:
                wait_row()
                load_su(sm_a, a_ring + (it & 1) * span, af, 0)
            else:
                load_a(a, a_row + tc, af, 0)
            if not valid:  # past the end: no dy, and nothing carried across
                for e in range(vec):
                    af[e] = F0
            # what depends on a only: products forward and backward, in the lane and the block
            g_acc = F1
            for e in range(vec):
                g_acc = g_acc * af[e]
                gl[e] = g_acc
            p_acc = F1
            for ee in range(vec):
                e = vec - 1 - ee
                pl[e] = p_acc
                p_acc = p_acc * af[e]
            _, g_in = scan_g(g_acc, gk, seg)
            # ... and backward: the lane's product with the block's later lanes'
            big_p = p_acc
            for i in range(levels):
                pk[i] = big_p
                p_down = shfl_idx(big_p, min(lane + (1 << i), 31))
                if seg + (1 << i) < lanes:
                    big_p = big_p * p_down
            p_after = F1  # product of a over the block's later lanes
            if lanes > 1:
                p_down = shfl_idx(big_p, min(lane + 1, 31))
                if seg < lanes - 1:
                    p_after = p_down
            for e in range(vec):
                dacc[e] = F0
            d_off = row_off + t0  # row q's du at t0
            for q in range(rows):
                row = row0 + q
                at = ring + (q & (S - 1)) * span  # rows % S == 0: slot q % S
                if STAGED:
                    wait_row()
                    load_su(sm_u, at, uf, 0)
                    load_sd(sm_d, at, df, 0)
                else:
                    for k in range(nw):
                        cu[k] = nu[k]
                        cd[k] = nd[k]
                    for k in range(nbuf - nw):
                        nu[k] = nu[k + nw]
                        nd[k] = nd[k + nw]
                    f = q + depth
                    if f < rows:
                        load_uw(u, (row0 + f) * N + tc, nu, nbuf - nw)
                        load_dw(dy, (row0 + f) * N + tc, nd, nbuf - nw)
                    elif it + 1 < n_iters:
                        load_uw(u, (row0 + f - rows) * N + tc_next, nu, nbuf - nw)
                        load_dw(dy, (row0 + f - rows) * N + tc_next, nd, nbuf - nw)
                    unpack_u(cu, 0, uf, 0)
                    unpack_d(cd, 0, df, 0)
                # forward: w in the lane, then across the block's lanes
                w_acc = F0
                for e in range(vec):
                    w_acc = af[e] * w_acc + uf[e]
                    wl[e] = w_acc
                big_w, w_in = scan_w(w_acc, gk, seg)
                carrier = F0
                if HOPS1:
                    carrier = shfl_idx(sm_v[slot + q] if lane == last else big_w, src)
                    if lane == last:
                        sm_v[slot + q] = big_w
                # backward: z in the lane, then across the block's later lanes
                if not valid:
                    for e in range(vec):
                        df[e] = F0
                z_acc = F0
                for ee in range(vec):
                    e = vec - 1 - ee
                    z_acc = df[e] + (af[e + 1] * z_acc if e + 1 < vec else F0)
                    zl[e] = z_acc
                big_z = af[0] * z_acc  # what this lane adds to the lane before it
                for i in range(levels):
                    z_down = shfl_idx(big_z, min(lane + (1 << i), 31))
                    if seg + (1 << i) < lanes:
                        big_z = big_z + pk[i] * z_down
                psi = F0  # a z of the next lane's first step, from the block's later lanes
                if lanes > 1:
                    z_down = shfl_idx(big_z, min(lane + 1, 31))
                    if seg < lanes - 1:
                        psi = z_down
                psi_du = psi
                if HOPS1:
                    # q of this lane's block, then of the block after
                    q_part = F0
                    for e in range(vec):
                        q_part = q_part + (g_in * gl[e]) * df[e]
                    for i in range(levels):
                        q_part = q_part + shfl_idx(q_part, lane ^ (1 << i))
                    if has_dcarry != 0 and chunk == 0 and it == 0 and lane == 0:
                        dcarry[row] = q_part
                    q_next = shfl_idx(q_part, min(lane + lanes, 31))
                    psi_du = psi + p_after * q_next
                for e in range(vec):
                    du_e = zl[e] + pl[e] * psi_du
                    ov[e] = du_e
                    if e == 0:
                        w_prev = w_in
                        g_prev = g_in
                    else:
                        w_prev = wl[e - 1] + gl[e - 1] * w_in
                        g_prev = g_in * gl[e - 1]
                    dacc[e] = dacc[e] + w_prev * du_e
                    if HOPS1:
                        z_e = zl[e] + pl[e] * psi
                        dacc[e] = dacc[e] + g_prev * (carrier * z_e)
                if writes:
                    store_du(du, d_off, ov, 0)
                d_off += N
                if STAGED:  # uf and df are used: refill their slot, S steps ahead
                    refill(u, dy, a, sm_u, sm_d, sm_a, at, q, it, n_iters, row_off, N, tc, tc_next,
                           a_row, a_ring)
                if not HOPS1 and has_dcarry != 0 and chunk == 0 and it == 0 and lane == 0:
                    dcarry[row] = F0
            if writes:
                store_da(da, a_row + t0, dacc, 0)

    swr_backward_row_scan.__name__ = swr_backward_row_scan.__qualname__ = (
        f"swr_backward_row_scan_{ku}_dy_{kd}_per_head_hops{hops}_vec{vec}_l{block_len}"
        f"_rows{rows}_warps{warps_per_block}_"
        + (f"stages{stages}" if STAGED else f"depth{depth}")
        + (f"_min{min_blocks}" if min_blocks else ""))
    if min_blocks:  # at least that many blocks resident per SM: caps the registers
        return cuda.jit(swr_backward_row_scan, launch_bounds=(32 * warps_per_block, min_blocks))
    return cuda.jit(swr_backward_row_scan)


def row_scan_kernel(ku, kd, hops, vec, block_len, rows, warps_per_block, depth, stages=0,
                    min_blocks=0):
    """The compiled-on-demand dispatcher of one specialisation. ``stages`` > 0: the loads go
    through a shared-memory ring of that many rows (rounded down to a power of two that divides
    ``rows``) and ``depth`` is unused; ``min_blocks`` > 0: launch bounds of that many resident
    blocks per SM."""
    if stages > 0:
        stages = min(1 << (stages.bit_length() - 1), rows & -rows)
    key = (ku, kd, hops, vec, block_len, rows, warps_per_block,
           1 if stages else min(depth, rows), stages, min_blocks)
    if key not in _CACHE:
        _CACHE[key] = _make(*key)
    return _CACHE[key]
