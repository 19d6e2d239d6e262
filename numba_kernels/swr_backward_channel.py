"""Backward of hops 0/1 with one thread per channel vector (BLHD) or channel row (BHDL).

The math is that of ``swr_backward`` (docs/spec.md#gradients): per block j, with S the carry
entering it (hops=1: the previous block's carrier ``v_{j-1}``, ``carry`` for j = 0) and ``q_{j+1}``
the next block's sum of ``g_t dy_t``, a reverse sweep

    lam_t = dy_t + a_{t+1} lam_{t+1},  lam_end = dy_end + q_{j+1}      (du_t = lam_t)
    z_t   = dy_t + a_{t+1} z_{t+1},    z_end = dy_end,   q_j = a_first z_first
    da_t  = lam_t w_{t-1} + S z_t g_{t-1}   (w_{-1} = 0, g_{-1} = 1 at a block start)

summed over the head's channels for per-head coefficients; hops=0 has S = 0 and q = 0.

Work split (as the fused Phalanx backward): a thread owns ``vec`` adjacent channels (one 16-byte
access per step, coalesced across the warp: BLHD rows are channel contiguous) and walks its
chunk's blocks from the last to the first. One forward walk of block j-1 gives S for block j and
checkpoints of block j-1's state (w, g) before each group of ``unroll`` steps, kept in the other
half of a two-block buffer; block j's reverse sweep takes its groups last to first, recomputes
each group's forward states from its checkpoint in registers (from the loads it makes anyway),
and ends with q_j, carried to block j-1 in registers. The chunk reads one block beyond each end:
the one before it (its carrier) and the one after it (q). No shuffles inside a block; per-head
``da`` is summed over the head's ``lph`` lanes (a power of two up to 32) with log2(lph) butterfly
shuffles, once per step for ``vec`` channels (the simulator, which has none, makes a
thread block of one head's lanes).

BHDL (``rows_kernel``): the same walk with one channel row per thread; a group is one or two
16-byte vectors of consecutive steps of each array (so block_len and N must be multiples of its
8 or 16 steps for 16-bit data), and per-head ``da`` of a group is summed over the head's D lanes
with a shuffle reduce-scatter (one shuffle per step and lane).

Launch knobs are in ``swr_backward.TUNING`` (scripts/swr_sweep.py sweeps them). Where N is a
multiple of block_len (and block_len of the group length) a specialisation without any clamping
of steps runs.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from ._dtypes import ITEM_SIZE, SIMULATOR, STORE
from ._ptx import head_sum, make_vector_load, make_vector_store, shfl_idx

__all__ = ["LMAX", "channel_kernel", "channel_config", "rows_kernel", "rows_config"]

LMAX = 64
"""Largest block_len of this kernel (its checkpoint buffer is sized by it)."""

F0 = np.float32(0.0)
F1 = np.float32(1.0)
f32 = numba.float32
_CACHE: dict = {}


def split_load(kind, vec, space=".global"):
    """``load(array, index, dst, offset)`` of ``vec`` elements in accesses of at most 16 bytes
    (``space`` as make_vector_load's: ".shared" reads a shared array)."""
    width = min(vec, 16 // ITEM_SIZE[kind])
    pieces = vec // width
    one = make_vector_load(kind, width, space)

    @cuda.jit(device=True, inline=True)
    def load(array, index, dst, offset):
        for p in range(pieces):
            one(array, index + p * width, dst, offset + p * width)

    return load


def make_reverse_step(vec, aw, hops):
    """``pa = step(db, doff, an, lam, zz, S, wp, gp, i, ov, oa)``: one step i of a block's
    reverse sweep for ``vec`` channels (``aw`` coefficients per step: 1 per head, else ``vec``):
    lam <- dy + a_{t+1} lam into ``ov`` (du), z likewise (hops=1), da_t = lam w_{t-1} +
    S z g_{t-1} per channel into ``oa``; returns the sum of the latter."""
    HOPS1 = hops == 1

    @cuda.jit(device=True, inline=True)
    def step(db, doff, an, lam, zz, S, wp, gp, i, ov, oa):
        pa = F0
        for k in range(vec):
            dv = db[doff + k]
            lam[k] = dv + an[k % aw] * lam[k]
            ov[k] = lam[k]
            dak = lam[k] * wp[i * vec + k]
            if HOPS1:
                zz[k] = dv + an[k % aw] * zz[k]
                dak += S[k] * zz[k] * gp[i * aw + k % aw]
            oa[k] = dak
            pa += dak
        return pa

    return step


def make_next_q(vec, aw, unroll, full, load_a, load_d):
    """``next_q(a, dy, m0, n, C, c0, a_stride, a_col, an, zz, ab, db, q)``: q (the sum over a
    block of g_t dy_t) of the block of ``n`` steps at flat row ``m0``, for ``vec`` channels, summed
    in the reverse sweep's order (so that the numbers do not depend on where chunks end), in
    groups of ``unroll`` steps (``full``: whole groups, no clamps). ``an``, ``zz``, ``ab``, ``db``
    are scratch (aw, vec, unroll * aw, unroll * vec)."""
    U = unroll

    @cuda.jit(device=True, inline=True)
    def next_q(a, dy, m0, n, C, c0, a_stride, a_col, an, zz, ab, db, q):
        for k in range(aw):
            an[k] = F1
        for k in range(vec):
            zz[k] = F0
        ng = -(-n // U)
        for gg in range(ng):
            t0 = (ng - 1 - gg) * U
            cnt = U if full else min(U, n - t0)
            for i in range(U):
                m = m0 + t0 + (i if full else min(i, cnt - 1))
                load_a(a, m * a_stride + a_col, ab, i * aw)
                load_d(dy, m * C + c0, db, i * vec)
            for ii in range(U):
                i = U - 1 - ii
                if full or i < cnt:
                    for k in range(vec):
                        zz[k] = db[i * vec + k] + an[k % aw] * zz[k]
                    for k in range(aw):
                        an[k] = ab[i * aw + k]
        for k in range(vec):
            q[k] = an[k % aw] * zz[k]

    return next_q


def make_row_group(steps, hops):
    """``lam, zz, an = group(ab, ub, db, w, g, S, lam, zz, an, wp, gp, ov, red)``: one group of
    ``steps`` steps of a channel row's reverse sweep: its forward states from the checkpoint
    (w, g), then the reverse sweep from (lam, zz, an) writing du into ``ov`` and the unsummed
    da into ``red``."""
    HOPS1 = hops == 1

    @cuda.jit(device=True, inline=True)
    def group(ab, ub, db, w, g, S, lam, zz, an, wp, gp, ov, red):
        for i in range(steps):
            wp[i] = w
            w = ab[i] * w + ub[i]
            gp[i] = g
            g = g * ab[i]
        for ii in range(steps):
            i = steps - 1 - ii
            lam = db[i] + an * lam
            ov[i] = lam
            dak = lam * wp[i]
            if HOPS1:
                zz = db[i] + an * zz
                dak += S * zz * gp[i]
            red[i] = dak
            an = ab[i]
        return lam, zz, an

    return group


def _make(ku, kd, per_head, hops, vec, unroll, full=False):
    load_u = make_vector_load(ku, vec)
    load_a = make_vector_load(ku, 1 if per_head else vec)
    load_d = split_load(kd, vec)
    store_v = make_vector_store(ku, vec)
    store_s = STORE[ku]
    VEC, U = vec, unroll
    AW = 1 if per_head else vec  # coefficient values per step
    UV, UA = U * VEC, U * AW  # local array sizes must be constants
    NG = -(-LMAX // U)  # groups per block, at most
    CKW, CKG = 2 * NG * VEC, 2 * NG * AW
    HOPS1 = hops == 1
    FULL = full  # every block has block_len steps (N a multiple of it): no clamps
    reverse_step = make_reverse_step(VEC, AW, hops)
    next_q = make_next_q(VEC, AW, U, FULL, load_a, load_d)

    @cuda.jit(device=True, inline=True)
    def walk(a, u, m0, n, C, c0, a_stride, a_col, ckw, ckg, half, w, g, ab, ub):
        """Forward through one block of n steps from flat row m0 (= b * N + first step),
        checkpointing (w, g) before each group of U steps into buffer half ``half``; w ends as
        the block's carrier."""
        for k in range(VEC):
            w[k] = F0
        for k in range(AW):
            g[k] = F1
        gi = half * NG
        for t0 in range(0, n, U):
            for k in range(VEC):
                ckw[gi * VEC + k] = w[k]
            if HOPS1:
                for k in range(AW):
                    ckg[gi * AW + k] = g[k]
            gi += 1
            for i in range(U):
                m = m0 + (t0 + i if FULL else min(t0 + i, n - 1))
                load_a(a, m * a_stride + a_col, ab, i * AW)
                load_u(u, m * C + c0, ub, i * VEC)
            for i in range(U):
                if FULL or t0 + i < n:
                    for k in range(VEC):
                        w[k] = ab[i * AW + k % AW] * w[k] + ub[i * VEC + k]
                    if HOPS1:
                        for k in range(AW):
                            g[k] = g[k] * ab[i * AW + k]

    def swr_backward_channel(a, u, dy, du, da, carry, dcarry, N, C, D, nb, block_len,
                             chunk_blocks, groups, nchunks, nwork, lph, has_dcarry):
        tid = numba.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        if tid >= nwork:
            return
        rest = tid // groups
        c0 = (tid - rest * groups) * VEC
        b = rest // nchunks
        jj0 = (rest - b * nchunks) * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        if per_head:
            a_stride = C // D
            a_col = c0 // D
        else:
            a_stride = C
            a_col = c0
        lb = block_len
        ch0 = b * C + c0  # flat (b, h, d) of the (B, H, D) carry arrays
        lead = (c0 % D) == 0  # per head: the head's first lane stores da
        lane = numba.int64(cuda.threadIdx.x) % 32
        mask = numba.uint32(((numba.int64(1) << lph) - 1) << (lane - lane % lph))

        q = cuda.local.array(VEC, f32)
        S = cuda.local.array(VEC, f32)
        w = cuda.local.array(VEC, f32)
        g = cuda.local.array(AW, f32)
        lam = cuda.local.array(VEC, f32)
        zz = cuda.local.array(VEC, f32)
        an = cuda.local.array(AW, f32)  # a of the step after the current one
        ov = cuda.local.array(VEC, f32)
        oa = cuda.local.array(VEC, f32)
        ab = cuda.local.array(UA, f32)
        ub = cuda.local.array(UV, f32)
        db = cuda.local.array(UV, f32)
        wp = cuda.local.array(UV, f32)  # w_{t-1} of the group's steps
        gp = cuda.local.array(UA, f32)  # g_{t-1}
        ckw = cuda.local.array(CKW, f32)
        ckg = cuda.local.array(CKG, f32)

        for k in range(VEC):
            q[k] = F0
        if HOPS1 and jj1 < nb:
            # q of the block after the chunk, summed in the reverse sweep's order (so that the
            # numbers do not depend on where chunks end)
            n = lb if FULL else min(lb, N - jj1 * lb)
            next_q(a, dy, b * N + jj1 * lb, n, C, c0, a_stride, a_col, an, zz, ab, db, q)
        half = 0
        j = jj1 - 1
        walk(a, u, b * N + j * lb, lb if FULL else min(lb, N - j * lb), C, c0, a_stride, a_col,
             ckw, ckg, half, w, g, ab, ub)
        while j >= jj0:
            lo = j * lb
            n = lb if FULL else min(lb, N - lo)
            for k in range(VEC):
                S[k] = F0
            if j > 0 and (HOPS1 or j > jj0):
                # block j-1: its checkpoints (next iteration) and, hops=1, its carrier S
                walk(a, u, b * N + lo - lb, lb, C, c0, a_stride, a_col, ckw, ckg, 1 - half, w, g,
                     ab, ub)
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
            for k in range(AW):
                an[k] = F1
            ng = -(-n // U)
            for gg in range(ng):
                gi = ng - 1 - gg
                t0 = gi * U
                cnt = U if FULL else min(U, n - t0)
                for i in range(U):
                    m = b * N + lo + t0 + (i if FULL else min(i, cnt - 1))
                    load_a(a, m * a_stride + a_col, ab, i * AW)
                    load_u(u, m * C + c0, ub, i * VEC)
                    load_d(dy, m * C + c0, db, i * VEC)
                # the group's forward states w_{t-1}, g_{t-1}, from its checkpoint
                ck = half * NG + gi
                for k in range(VEC):
                    w[k] = ckw[ck * VEC + k]
                if HOPS1:
                    for k in range(AW):
                        g[k] = ckg[ck * AW + k]
                for i in range(U):
                    if FULL or i < cnt:
                        for k in range(VEC):
                            wp[i * VEC + k] = w[k]
                            w[k] = ab[i * AW + k % AW] * w[k] + ub[i * VEC + k]
                        if HOPS1:
                            for k in range(AW):
                                gp[i * AW + k] = g[k]
                                g[k] = g[k] * ab[i * AW + k]
                for ii in range(U):
                    i = U - 1 - ii
                    if FULL or i < cnt:
                        m = b * N + lo + t0 + i
                        pa = reverse_step(db, i * VEC, an, lam, zz, S, wp, gp, i, ov, oa)
                        store_v(du, m * C + c0, ov, 0)
                        if per_head:
                            pa = head_sum(pa, lph, mask)
                            if lead:
                                da[m * a_stride + a_col] = store_s(pa)
                        else:
                            store_v(da, m * C + c0, oa, 0)
                        for k in range(AW):
                            an[k] = ab[i * AW + k]
            if HOPS1:
                for k in range(VEC):
                    q[k] = an[k % AW] * zz[k]  # q_j, for block j-1
            if j == 0 and has_dcarry != 0:
                for k in range(VEC):
                    dcarry[ch0 + k] = q[k]  # hops=0: zeros
            half = 1 - half
            j -= 1

    swr_backward_channel.__name__ = swr_backward_channel.__qualname__ = (
        f"swr_backward_channel_{ku}_dy_{kd}_{'per_head' if per_head else 'per_channel'}"
        f"_hops{hops}_vec{vec}_unroll{unroll}" + ("_full" if full else ""))
    return cuda.jit(swr_backward_channel)


# ----------------------------------------------------------------------------------------------
# BHDL: one thread per (channel row, chunk of blocks); groups of steps are vector loads along time
# ----------------------------------------------------------------------------------------------

if SIMULATOR:  # a thread block is one head's lanes there (see _head_sum)

    def _sim_xor(x, bit, mask):
        return shfl_idx(x, (cuda.threadIdx.x % 32) ^ bit)

    _xor = cuda.jit(device=True)(_sim_xor)

else:

    @cuda.jit(device=True, inline=True)
    def _xor(x, bit, mask):
        return cuda.shfl_xor_sync(mask, x, bit)


def make_head_scatter(steps, lph, store_s):
    """``scatter(red, lane, mask, da, at)``: the sums over a head's ``lph`` lanes (a power of
    two) of ``red[:steps]`` (each lane's values for ``steps`` consecutive steps), stored as
    ``da[at:at + steps]`` by a shuffle reduce-scatter: each round halves the steps a lane holds,
    the last rounds add single values, and each sum is stored once by the lane that owns it."""
    rounds = lph.bit_length() - 1

    @cuda.jit(device=True, inline=True)
    def scatter(red, lane, mask, da, at):
        nn = steps
        off = 0
        owner = True
        for sround in range(rounds):
            bit = 1 << sround
            hi = (lane & bit) != 0
            if nn > 1:
                hf = nn // 2
                for i in range(hf):
                    lo_v = red[i]
                    hi_v = red[i + hf]
                    got = _xor(lo_v if hi else hi_v, bit, mask)
                    red[i] = (hi_v if hi else lo_v) + got
                if hi:
                    off += hf
                nn = hf
            else:
                red[0] = red[0] + _xor(red[0], bit, mask)
                owner = owner and not hi
        if owner:
            for i in range(nn):
                da[at + off + i] = store_s(red[i])

    return scatter


def _make_rows(ku, kd, per_head, hops, depth, lph):
    """The BHDL kernel: a thread owns one channel row and walks its chunk's blocks from the last
    to the first as the BLHD kernel does; a group is ``depth`` 16-byte vectors of consecutive
    steps of each array (U = depth * 16 / itemsize steps, block_len and N multiples of U, so
    nothing is clamped). Per head, da of a group is summed over the head's ``lph`` (= D) lanes
    with a shuffle reduce-scatter: log2(lph) rounds, U shuffles per lane in all."""
    V = 16 // ITEM_SIZE[ku]
    VD = 16 // ITEM_SIZE[kd]
    U = depth * V
    load_u = make_vector_load(ku, V)
    load_d = make_vector_load(kd, VD)
    store_v = make_vector_store(ku, V)
    store_s = STORE[ku]
    NG = -(-LMAX // U)
    CK = 2 * NG  # local array sizes must be constants
    HOPS1 = hops == 1
    head_scatter = make_head_scatter(U, lph if per_head else 1, store_s)
    row_group = make_row_group(U, hops)

    @cuda.jit(device=True, inline=True)
    def load_group(arr, base, dst, load, width):
        for p in range(U // width):
            load(arr, base + p * width, dst, p * width)

    @cuda.jit(device=True, inline=True)
    def walk(a, u, ra, ru, lo, n, ckw, ckg, half, ab, ub):
        """Forward through one block (steps lo .. lo+n of row offsets ra (a), ru (u)),
        checkpointing (w, g) before each group; returns the block's carrier."""
        w = F0
        g = F1
        gi = half * NG
        for t0 in range(lo, lo + n, U):
            ckw[gi] = w
            ckg[gi] = g
            gi += 1
            load_group(a, ra + t0, ab, load_u, V)
            load_group(u, ru + t0, ub, load_u, V)
            for i in range(U):
                w = ab[i] * w + ub[i]
                g = g * ab[i]
        return w

    def swr_backward_rows(a, u, dy, du, da, carry, dcarry, N, C, D, nb, block_len,
                          chunk_blocks, groups, nchunks, nwork, lph_arg, has_dcarry):
        # lph_arg: the BLHD kernel's argument list; here lph is a constant of the specialisation
        tid = numba.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        if tid >= nwork:
            return
        rest = tid // groups
        c = tid - rest * groups  # channel (h, d) of the row
        b = rest // nchunks
        jj0 = (rest - b * nchunks) * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        row = b * C + c
        ru = row * N
        ra = (b * (C // D) + c // D) * N if per_head else ru
        lb = block_len
        lane = numba.int64(cuda.threadIdx.x) % 32
        mask = numba.uint32(((numba.int64(1) << lph) - 1) << (lane - lane % lph))

        ab = cuda.local.array(U, f32)
        ub = cuda.local.array(U, f32)
        db = cuda.local.array(U, f32)
        wp = cuda.local.array(U, f32)
        gp = cuda.local.array(U, f32)
        ov = cuda.local.array(U, f32)
        red = cuda.local.array(U, f32)
        ckw = cuda.local.array(CK, f32)
        ckg = cuda.local.array(CK, f32)

        q = F0
        if HOPS1 and jj1 < nb:
            # q of the block after the chunk, in the reverse sweep's order
            lo = jj1 * lb
            n = min(lb, N - lo)
            an = F1
            zz = F0
            for gg in range(n // U):
                t0 = lo + n - (gg + 1) * U
                load_group(a, ra + t0, ab, load_u, V)
                load_group(dy, ru + t0, db, load_d, VD)
                for ii in range(U):
                    i = U - 1 - ii
                    zz = db[i] + an * zz
                    an = ab[i]
            q = an * zz
        half = 0
        j = jj1 - 1
        walk(a, u, ra, ru, j * lb, min(lb, N - j * lb), ckw, ckg, half, ab, ub)
        while j >= jj0:
            lo = j * lb
            n = min(lb, N - lo)
            S = F0
            if j > 0 and (HOPS1 or j > jj0):
                v = walk(a, u, ra, ru, lo - lb, lb, ckw, ckg, 1 - half, ab, ub)
                if HOPS1:
                    S = v
            elif HOPS1 and j == 0:
                S = carry[row]
            lam = q
            zz = F0
            an = F1
            ng = n // U
            for gg in range(ng):
                gi = ng - 1 - gg
                t0 = lo + gi * U
                load_group(a, ra + t0, ab, load_u, V)
                load_group(u, ru + t0, ub, load_u, V)
                load_group(dy, ru + t0, db, load_d, VD)
                lam, zz, an = row_group(ab, ub, db, ckw[half * NG + gi], ckg[half * NG + gi], S,
                                        lam, zz, an, wp, gp, ov, red)
                for p in range(depth):
                    store_v(du, ru + t0 + p * V, ov, p * V)
                if per_head:
                    head_scatter(red, lane, mask, da, ra + t0)
                else:
                    for p in range(depth):
                        store_v(da, ra + t0 + p * V, red, p * V)
            if HOPS1:
                q = an * zz
            if j == 0 and has_dcarry != 0:
                dcarry[row] = q
            half = 1 - half
            j -= 1

    swr_backward_rows.__name__ = swr_backward_rows.__qualname__ = (
        f"swr_backward_rows_{ku}_dy_{kd}_{'per_head' if per_head else 'per_channel'}"
        f"_hops{hops}_depth{depth}_lph{lph}")
    return cuda.jit(swr_backward_rows)


def rows_kernel(ku, kd, per_head, hops, depth, lph):
    """The compiled-on-demand dispatcher of one BHDL specialisation."""
    key = ("rows", ku, kd, per_head, hops, depth, lph)
    if key not in _CACHE:
        _CACHE[key] = _make_rows(ku, kd, per_head, hops, depth, lph)
    return _CACHE[key]


def rows_config(ku, kd, per_head, block_len, N, D, depth, addresses=()):
    """``(depth, steps per group, lph)`` of the BHDL kernel, or None where it does not fit:
    groups of ``depth`` (else 1) 16-byte vectors that divide block_len and N, aligned arrays
    (every address a multiple of 16 bytes), per head D a power of two up to 32."""
    if block_len > LMAX or any(x % 16 for x in addresses):
        return None
    if per_head and (D & (D - 1) or D > 32):
        return None
    lph = D if per_head else 1
    for dp in sorted({depth, 1}, reverse=True):
        steps = dp * 16 // ITEM_SIZE[ku]
        whole_dy = steps * ITEM_SIZE[kd] % 16 == 0  # dy of a group: whole 16-byte vectors
        if whole_dy and block_len % steps == 0 and N % steps == 0:
            return dp, steps, lph
    return None


def channel_kernel(ku, kd, per_head, hops, vec, unroll, full=False):
    """The compiled-on-demand dispatcher of one specialisation (``full``: N is a multiple of
    block_len and of ``unroll``, no clamps)."""
    key = (ku, kd, per_head, hops, vec, unroll, full)
    if key not in _CACHE:
        _CACHE[key] = _make(ku, kd, per_head, hops, vec, unroll, full)
    return _CACHE[key]


def channel_config(ku, kd, per_head, block_len, H, D, access_bytes, u_addresses=(),
                   dy_address=0):
    """``(vec, lph)`` of this kernel for a BLHD shape, or None where it does not fit: ``vec``
    channels per thread (the widest of at most ``access_bytes`` of u that divides the channels,
    and per head the head dim, with every address aligned to its accesses: ``u_addresses`` those
    of the arrays accessed ``vec`` elements of u's kind at a time, ``dy_address`` that of dy),
    ``lph`` threads per head (per head a power of two up to 32; 1 per channel)."""
    if block_len > LMAX:
        return None
    C = H * D
    for vec in (8, 4, 2):
        if vec * ITEM_SIZE[ku] > access_bytes:
            continue
        if any(x % (vec * ITEM_SIZE[ku]) for x in u_addresses):
            continue
        if dy_address % min(16, vec * ITEM_SIZE[kd]):
            continue
        if per_head:
            lph = D // vec
            if D % vec == 0 and lph & (lph - 1) == 0 and lph <= 32:
                return vec, lph
        elif C % vec == 0:
            return vec, 1
    return None
