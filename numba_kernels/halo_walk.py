"""Deep windows (hops k = 2..8) in one pass: the reverse halo walk (the backward, both layouts)
and the BHDL forward halo walk.

Notation of docs/spec.md#recurrence: per block j of ``block_len`` (l) steps the local scan ``w``
(from 0), the attenuation ``g`` (from 1), the carrier ``v_j`` and compound attenuation ``C_j``
(``w``, ``g`` at the block's last step); the carry entering block j with ``hops`` = k is

    T_j = sum_{m=0..k-1} (C_{j-1} ... C_{j-m}) v_{j-1-m},   v_{-1} = x0, no term before -1,

and ``y_t = w_t + g_t T_j``. With ``dy`` given, ``q_j = sum_{t in j} g_t dy_t`` (= dLoss/dT_j).

The adjoints (docs/spec.md#gradients; the same numbers as ``reference.swr_vjp``):

    dv_j   = sum_{m=0..k-1} (C_{j+1} ... C_{j+m}) q_{j+1+m}       (no q beyond block nb-1)
    W_j(n) = sum_{e=1..n} (C_{j-1} ... C_{j-e+1}) v_{j-e}        (the carry cut after n hops)
    dC_j   = sum_{d=1..k-1} q_{j+d} (C_{j+1} ... C_{j+d-1}) W_j(k-d)
    dx0    = dv_{-1}

with ``W_j(k) = T_j``, and inside block j, walked from its last step to its first (``a_{t+1}``
:= 1 at the last step):

    lam_t = dy_t + a_{t+1} lam_{t+1},      lam_end = dy_end + dv_j        du_t = lam_t
    mu_t  = dy_t T_j + a_{t+1} mu_{t+1},   mu_end  = dy_end T_j + dC_j
    z_t   = dy_t + a_{t+1} z_{t+1},        z_end   = dy_end               q_j = a_first z_first
    da_t  = lam_t w_{t-1} + mu_t g_{t-1}   (w_{-1} = 0, g_{-1} = 1 at the block's start)

summed over the head's channels for per-head coefficients.

**The walk.** A thread owns ``vec`` channels (BLHD: adjacent channels, one access of up to 16
bytes per step; BHDL: ``vec`` = 1, one channel row) and a chunk of blocks ``[j0, j1)``, and walks
the chunk from its last block to its first, holding two shift registers of k entries:

- the future ``(q, C)`` of blocks j+1 .. j+k (from which dv_j and dC_j come by Horner's rule),
  started by a reverse walk of the k blocks after the chunk (reading a and dy there), then fed
  by each block's own reverse sweep (q_j, and C_j as the product of its a's in the same order);
- the past ``(v, C)`` of blocks j-k .. j-1 (from which W_j and T_j come): a lead walk, k blocks
  ahead of the block being differentiated, walks block j-1-k forward (a and u) for the entry that
  replaces block j-1's when the walk moves on (``x0`` as v_{-1}, zeros before it).

The reverse sweep of block j takes groups of ``unroll`` steps from last to first; each group's
forward states ``w_{t-1}``, ``g_{t-1}`` are recomputed from a checkpoint of (w, g) at the group's
start, taken by a forward walk of block j just before its sweep (no walk where the block is one
group: ``unroll >= block_len``). With ``TUNING["bwd_fuse_lead"]`` (BHDL
``["bwd_bhdl_fuse_lead"]``) the lead walk goes group by group beside the sweep, its loads issued
with the sweep's. So the chunk reads k blocks beyond each end (a and u before it, a and dy after
it), and u of every block two or three times (the lead walk k+1 blocks earlier, then the
checkpoint walk and the sweep back to back). Chunks do not depend on each other: one launch.
k is a compile-time constant; the registers are indexed by constants after unrolling (only the
checkpoints, indexed by group, are in local memory).

**The BHDL forward** (:func:`halo_forward`): a thread per (channel row, chunk of blocks) walks
forward from k blocks before its chunk (writing nothing there) with the last k carriers in a
shift register and the carry of each block by Horner's rule, as ``swr_forward``'s BLHD halo
mode does for channel vectors.

Entry points :func:`halo_backward`, :func:`halo_forward`; :func:`fits` says where the backward
applies. Launch knobs: :data:`TUNING`.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from ._dtypes import ITEM_SIZE, SIMULATOR, STORE
from ._launch import (
    FlatArray,
    Tuning,
    allow_shared_memory,
    data_pointer,
    launch,
    launch_with_pointers,
    prepare,
)
from ._ptx import head_sum, make_vector_load, make_vector_store
from .swr_backward_channel import make_head_scatter, split_load

__all__ = ["HALO_HOPS", "LMAX", "TUNING", "backward_kernel", "fits", "fits_backward",
           "forward_kernel", "halo_backward", "halo_forward"]

HALO_HOPS = range(2, 9)
"""The finite hops the halo walks take (larger k: the block-carry path)."""

LMAX = 64
"""Largest block_len of the backward walk (its checkpoint buffer is sized by it)."""

TUNING = Tuning({
    # the front takes the halo walks where they fit (False: the block-carry path, to compare)
    "backward": True,
    "forward_bhdl": True,
    # backward (BLHD): bytes of u one thread moves per step for hops <= 4 and for hops > 4 (the
    # shift registers hold 2 k (vec + coefficient) floats), steps per checkpointed group, chunk
    # length in blocks (at least 2 per hop), threads per block
    "bwd_access_bytes": 16,
    "bwd_access_bytes_deep": 8,
    "bwd_unroll": 8,
    "bwd_chunk_blocks": 16,
    "bwd_threads_per_block": 256,
    # the lead walk's loads issued with the sweep's, group by group (BLHD, BHDL)
    "bwd_fuse_lead": False,
    "bwd_bhdl_fuse_lead": False,
    # backward, BHDL (one channel row per thread): chunk length in blocks (at least 2 per hop),
    # threads per block
    "bwd_bhdl_chunk_blocks": 32,
    "bwd_bhdl_threads_per_block": 128,
    # BHDL: bytes of u per row and group, one vector access (16-byte pieces) along time
    "bwd_bhdl_group_bytes": 32,
    # forward, BHDL (one channel row per thread): bytes per row and group (one vector access
    # along time), steps per group otherwise, chunk length in blocks (at least 16 per hop),
    # threads per block
    "fwd_bhdl_group_bytes": 32,
    "fwd_bhdl_unroll": 8,
    "fwd_bhdl_chunk_blocks": 64,
    "fwd_bhdl_threads_per_block": 128,
})
"""Launch knobs of the halo walks (scripts/halo_sweep.py sweeps them)."""

F0 = np.float32(0.0)
F1 = np.float32(1.0)
f32 = numba.float32
_CACHE: dict = {}


def _kind(x) -> str:
    from ._dtypes import storage_kind

    return "bf16" if x.dtype == np.uint16 else storage_kind(x.dtype)


def _make_backward(ku, kd, layout, per_head, hops, vec, unroll, tvec=0, fuse=False):
    """The reverse halo walk for one specialisation (see the module docstring). ``tvec`` > 0
    (BHDL): a group of ``unroll`` steps is one vector access along time per array (N and
    block_len multiples of it, aligned rows), its du stored as a vector, and per head its da
    summed over the head's ``tvec`` lanes (D, a power of two) by a shuffle reduce-scatter (one
    shuffle per step and lane) instead of a butterfly per step. ``fuse``: the lead walk of block
    j-1-k goes group by group beside the sweep of block j, its loads issued with the sweep's (one
    wait per group for both)."""
    BLHD = layout == "BLHD"
    assert BLHD or vec == 1
    TV = tvec > 0
    K = hops
    VEC, U = vec, unroll
    AW = 1 if per_head else vec  # coefficient values per step
    UV, UA = U * VEC, U * AW  # local array sizes must be constants
    NG = -(-LMAX // U)  # groups per block, at most
    KV, KA = K * VEC, K * AW
    CKW, CKG = NG * VEC, NG * AW
    FUSE = bool(fuse)
    LA, LV = (UA, UV) if FUSE else (1, 1)
    load_u = make_vector_load(ku, VEC)
    load_a = make_vector_load(ku, AW)
    load_d = split_load(kd, VEC)
    store_v = make_vector_store(ku, VEC)
    store_s = STORE[ku]
    load_ut = split_load(ku, U)  # TV: a group of each array in one access (or 16-byte pieces)
    load_dt = split_load(kd, U)
    store_ut = make_vector_store(ku, U)
    head_scatter = make_head_scatter(U, tvec if (TV and per_head) else 1, STORE[ku])

    @cuda.jit(device=True, inline=True)
    def walk(a, u, ua0, ad0, us, as_, lo, n, ck, ckw, ckg, w, g, ab, ub):
        """Forward through the block of ``n`` steps from step ``lo`` (u of step t at
        ``ua0 + t * us``, a at ``ad0 + t * as_``); with ``ck``, (w, g) before each group of U
        steps into ckw, ckg. Ends with w = v, g = C of the block."""
        for k in range(VEC):
            w[k] = F0
        for k in range(AW):
            g[k] = F1
        gi = 0
        for t0 in range(0, n, U):
            if ck:
                for k in range(VEC):
                    ckw[gi * VEC + k] = w[k]
                for k in range(AW):
                    ckg[gi * AW + k] = g[k]
            gi += 1
            if TV:
                load_ut(a, ad0 + lo + t0, ab, 0)
                load_ut(u, ua0 + lo + t0, ub, 0)
            else:
                for i in range(U):
                    t = lo + min(t0 + i, n - 1)
                    load_a(a, ad0 + t * as_, ab, i * AW)
                    load_u(u, ua0 + t * us, ub, i * VEC)
            for i in range(U):
                if t0 + i < n:
                    for k in range(VEC):
                        w[k] = ab[i * AW + k % AW] * w[k] + ub[i * VEC + k]
                    for k in range(AW):
                        g[k] = g[k] * ab[i * AW + k]

    @cuda.jit(device=True, inline=True)
    def future(a, dy, ua0, ad0, us, as_, lo, n, qn, cn, an, zz, ab, db):
        """q (into qn) and C (the product of a in reverse order, into cn) of one block, in the
        order of the reverse sweep (so that numbers do not depend on where chunks end)."""
        for k in range(AW):
            an[k] = F1
            cn[k] = F1
        for k in range(VEC):
            zz[k] = F0
        ng = -(-n // U)
        for gg in range(ng):
            t0 = (ng - 1 - gg) * U
            if TV:
                load_ut(a, ad0 + lo + t0, ab, 0)
                load_dt(dy, ua0 + lo + t0, db, 0)
            else:
                for i in range(U):
                    t = lo + min(t0 + i, n - 1)
                    load_a(a, ad0 + t * as_, ab, i * AW)
                    load_d(dy, ua0 + t * us, db, i * VEC)
            for ii in range(U):
                i = U - 1 - ii
                if t0 + i < n:
                    for k in range(VEC):
                        zz[k] = db[i * VEC + k] + an[k % AW] * zz[k]
                    for k in range(AW):
                        an[k] = ab[i * AW + k]
                        cn[k] = cn[k] * an[k]
        for k in range(VEC):
            qn[k] = an[k % AW] * zz[k]

    @cuda.jit(device=True, inline=True)
    def push_future(fq, fC, qn, cn):
        """The future register gains block j (q, C) as its newest-adjoint entry 0."""
        for mm in range(K - 1):
            m = K - 1 - mm
            for k in range(VEC):
                fq[m * VEC + k] = fq[(m - 1) * VEC + k]
            for k in range(AW):
                fC[m * AW + k] = fC[(m - 1) * AW + k]
        for k in range(VEC):
            fq[k] = qn[k]
        for k in range(AW):
            fC[k] = cn[k]

    @cuda.jit(device=True, inline=True)
    def horner_future(out, fq, fC):
        """out = sum_m (C_{j+1} .. C_{j+m}) q_{j+1+m} over the future register (dv_j)."""
        for k in range(VEC):
            acc = fq[(K - 1) * VEC + k]
            for mm in range(K - 1):
                m = K - 2 - mm
                acc = fq[m * VEC + k] + fC[m * AW + k % AW] * acc
            out[k] = acc

    def kernel(a, u, dy, du, da, carry, dcarry, N, C, D, nb, block_len, chunk_blocks, groups,
               nchunks, nwork, lph, has_dcarry):
        tid = numba.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        if tid >= nwork:
            return
        rest = tid // groups
        c0 = (tid - rest * groups) * VEC
        b = rest // nchunks
        jj0 = (rest - b * nchunks) * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        H = C // D
        # flat index of (step t, the thread's first channel): base + t * stride
        if BLHD:
            ua0 = b * N * C + c0
            us = C
            if per_head:
                ad0 = b * N * H + c0 // D
                as_ = H
            else:
                ad0 = ua0
                as_ = C
        else:
            ua0 = (b * C + c0) * N
            us = numba.int64(1)
            ad0 = (b * H + c0 // D) * N if per_head else ua0
            as_ = numba.int64(1)
        lb = block_len
        ch0 = b * C + c0  # flat (b, h, d) of the (B, H, D) carry arrays
        lead = (c0 % D) == 0  # per head: the head's first lane stores da
        lane = numba.int64(cuda.threadIdx.x) % 32
        mask = numba.uint32(((numba.int64(1) << lph) - 1) << (lane - lane % lph))

        fq = cuda.local.array(KV, f32)  # q_{j+1+m}, m = 0 .. K-1
        fC = cuda.local.array(KA, f32)  # C_{j+1+m}
        pv = cuda.local.array(KV, f32)  # v_{j-K+m}, oldest first
        pC = cuda.local.array(KA, f32)
        qn = cuda.local.array(VEC, f32)
        cn = cuda.local.array(AW, f32)
        dv = cuda.local.array(VEC, f32)
        dC = cuda.local.array(VEC, f32)
        T = cuda.local.array(VEC, f32)
        Wn = cuda.local.array(VEC, f32)
        tm = cuda.local.array(KV, f32)
        P = cuda.local.array(AW, f32)
        R = cuda.local.array(AW, f32)
        w = cuda.local.array(VEC, f32)
        g = cuda.local.array(AW, f32)
        lam = cuda.local.array(VEC, f32)
        mu = cuda.local.array(VEC, f32)
        zz = cuda.local.array(VEC, f32)
        an = cuda.local.array(AW, f32)  # a of the step after the current one
        ov = cuda.local.array(VEC, f32)
        oa = cuda.local.array(VEC, f32)
        ab = cuda.local.array(UA, f32)
        ub = cuda.local.array(UV, f32)
        db = cuda.local.array(UV, f32)
        gp = cuda.local.array(UA, f32)  # g_{t-1}
        ckw = cuda.local.array(CKW, f32)
        ckg = cuda.local.array(CKG, f32)
        dub = cuda.local.array(U, f32)  # TV: the group's du and da
        abl = cuda.local.array(LA, f32)  # FUSE: the lead group's a, u, and its walk's w, g
        ubl = cuda.local.array(LV, f32)
        wl = cuda.local.array(VEC, f32)
        gl = cuda.local.array(AW, f32)
        dab = cuda.local.array(U, f32)

        # the future register: (q, C) of the K blocks after the chunk (none beyond nb - 1)
        for m in range(K):
            for k in range(VEC):
                fq[m * VEC + k] = F0
            for k in range(AW):
                fC[m * AW + k] = F1
        i = min(jj1 + K, nb) - 1
        while i >= jj1:
            future(a, dy, ua0, ad0, us, as_, i * lb, min(lb, N - i * lb), qn, cn, an, zz, ab, db)
            push_future(fq, fC, qn, cn)
            i -= 1
        # the past register: (v, C) of blocks jj1-1-K .. jj1-2, each entering as the newest (a
        # shift with constant indices: the loop around the walk is not unrolled)
        for m in range(K):
            i = jj1 - 1 - K + m
            if i >= 0:
                walk(a, u, ua0, ad0, us, as_, i * lb, lb, False, ckw, ckg, w, g, ab, ub)
            for mm in range(K - 1):
                for k in range(VEC):
                    pv[mm * VEC + k] = pv[(mm + 1) * VEC + k]
                for k in range(AW):
                    pC[mm * AW + k] = pC[(mm + 1) * AW + k]
            for k in range(VEC):
                pv[(K - 1) * VEC + k] = w[k] if i >= 0 else (carry[ch0 + k] if i == -1 else F0)
            for k in range(AW):
                pC[(K - 1) * AW + k] = g[k] if i >= 0 else F1

        j = jj1 - 1
        while j >= jj0:
            lo = j * lb
            n = min(lb, N - lo)
            # T_j = W_j(K) and dC_j = sum_d q_{j+d} (C_{j+1} .. C_{j+d-1}) W_j(K-d)
            # tm[d-1] = q_{j+d} (C_{j+1} .. C_{j+d-1}), d = 1 .. K-1
            for k in range(AW):
                R[k] = F1
            for d in range(1, K):
                for k in range(VEC):
                    tm[(d - 1) * VEC + k] = fq[(d - 1) * VEC + k] * R[k % AW]
                for k in range(AW):
                    R[k] = R[k] * fC[(d - 1) * AW + k]
            # W_j(e) for e = 1 .. K, and dC_j += tm[K-e-1] W_j(e) for e < K
            for k in range(VEC):
                Wn[k] = F0
                dC[k] = F0
            for k in range(AW):
                P[k] = F1
            for e in range(1, K + 1):
                for k in range(VEC):
                    Wn[k] = Wn[k] + P[k % AW] * pv[(K - e) * VEC + k]
                for k in range(AW):
                    P[k] = P[k] * pC[(K - e) * AW + k]
                if e < K:
                    for k in range(VEC):
                        dC[k] = dC[k] + tm[(K - e - 1) * VEC + k] * Wn[k]
            for k in range(VEC):
                T[k] = Wn[k]
            horner_future(dv, fq, fC)

            if lb > U:  # checkpoints of the block's groups (one group: the block's start)
                walk(a, u, ua0, ad0, us, as_, lo, n, True, ckw, ckg, w, g, ab, ub)
            else:
                for k in range(VEC):
                    ckw[k] = F0
                for k in range(AW):
                    ckg[k] = F1
            # the reverse sweep of block j, a group of U steps at a time
            for k in range(VEC):
                lam[k] = dv[k]
                mu[k] = dC[k]
                zz[k] = F0
            for k in range(AW):
                an[k] = F1
                cn[k] = F1
            ng = -(-n // U)
            il = j - 1 - K  # FUSE: the lead block, walked forward in the sweep's iterations
            ngl = -(-lb // U) if (FUSE and il >= 0) else 0
            for k in range(VEC):
                wl[k] = F0
            for k in range(AW):
                gl[k] = F1
            for gg in range(max(ng, ngl)):
                tl = gg * U
                if gg < ngl:  # the lead group's loads go out with the sweep group's
                    if TV:
                        load_ut(a, ad0 + il * lb + tl, abl, 0)
                        load_ut(u, ua0 + il * lb + tl, ubl, 0)
                    else:
                        for i in range(U):
                            t = il * lb + min(tl + i, lb - 1)
                            load_a(a, ad0 + t * as_, abl, i * AW)
                            load_u(u, ua0 + t * us, ubl, i * VEC)
                if gg < ng:
                    gi = ng - 1 - gg
                    t0 = gi * U
                    if TV:
                        load_ut(a, ad0 + lo + t0, ab, 0)
                        load_ut(u, ua0 + lo + t0, ub, 0)
                        load_dt(dy, ua0 + lo + t0, db, 0)
                    else:
                        for i in range(U):
                            t = lo + min(t0 + i, n - 1)
                            load_a(a, ad0 + t * as_, ab, i * AW)
                            load_u(u, ua0 + t * us, ub, i * VEC)
                            load_d(dy, ua0 + t * us, db, i * VEC)
                    for k in range(VEC):
                        w[k] = ckw[gi * VEC + k]
                    for k in range(AW):
                        g[k] = ckg[gi * AW + k]
                    # the group's forward states, w_{t-1} in place of u (ub becomes w_{t-1})
                    for i in range(U):
                        if t0 + i < n:
                            for k in range(VEC):
                                uk = ub[i * VEC + k]
                                ub[i * VEC + k] = w[k]
                                w[k] = ab[i * AW + k % AW] * w[k] + uk
                            for k in range(AW):
                                gp[i * AW + k] = g[k]
                                g[k] = g[k] * ab[i * AW + k]
                    for ii in range(U):
                        i = U - 1 - ii
                        if t0 + i < n:
                            t = lo + t0 + i
                            pa = F0
                            for k in range(VEC):
                                dyk = db[i * VEC + k]
                                ank = an[k % AW]
                                lam[k] = dyk + ank * lam[k]
                                mu[k] = dyk * T[k] + ank * mu[k]
                                zz[k] = dyk + ank * zz[k]
                                ov[k] = lam[k]
                                dak = lam[k] * ub[i * VEC + k] + mu[k] * gp[i * AW + k % AW]
                                oa[k] = dak
                                pa += dak
                            if per_head and not TV:
                                pa = head_sum(pa, lph, mask)
                            if TV:  # VEC = 1: the group's du and da go out below
                                dub[i] = ov[0]
                                dab[i] = pa
                            else:
                                store_v(du, ua0 + t * us, ov, 0)
                                if not per_head:
                                    store_v(da, ad0 + t * as_, oa, 0)
                                elif lead:
                                    da[ad0 + t * as_] = store_s(pa)
                            for k in range(AW):
                                an[k] = ab[i * AW + k]
                                cn[k] = cn[k] * an[k]
                    if TV:
                        store_ut(du, ua0 + lo + t0, dub, 0)
                        if per_head:
                            head_scatter(dab, lane, mask, da, ad0 + lo + t0)
                        else:
                            store_ut(da, ad0 + lo + t0, dab, 0)
                if gg < ngl:
                    for i in range(U):
                        if tl + i < lb:
                            for k in range(VEC):
                                wl[k] = abl[i * AW + k % AW] * wl[k] + ubl[i * VEC + k]
                            for k in range(AW):
                                gl[k] = gl[k] * abl[i * AW + k]
            for k in range(VEC):
                qn[k] = an[k % AW] * zz[k]
            push_future(fq, fC, qn, cn)
            # the past register loses block j-1 and gains block j-1-K as its oldest entry
            for mm in range(K - 1):
                m = K - 1 - mm
                for k in range(VEC):
                    pv[m * VEC + k] = pv[(m - 1) * VEC + k]
                for k in range(AW):
                    pC[m * AW + k] = pC[(m - 1) * AW + k]
            i = j - 1 - K
            if FUSE:
                for k in range(VEC):
                    w[k] = wl[k]
                for k in range(AW):
                    g[k] = gl[k]
            elif i >= 0:
                walk(a, u, ua0, ad0, us, as_, i * lb, lb, False, ckw, ckg, w, g, ab, ub)
            for k in range(VEC):
                pv[k] = w[k] if i >= 0 else (carry[ch0 + k] if i == -1 else F0)
            for k in range(AW):
                pC[k] = g[k] if i >= 0 else F1
            j -= 1
        if jj0 == 0 and has_dcarry != 0:
            horner_future(dv, fq, fC)  # dx0 = dv_{-1}
            for k in range(VEC):
                dcarry[ch0 + k] = dv[k]

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_halo_backward_{layout.lower()}_{ku}_dy_{kd}_"
        f"{'per_head' if per_head else 'per_channel'}_hops{hops}_vec{vec}_unroll{unroll}"
        + (f"_tvec{tvec}" if TV else "") + ("_fuse" if FUSE else ""))
    return cuda.jit(kernel)


def _make_forward_bhdl(ku, ko, per_head, hops, unroll, tvec):
    """BHDL forward of hops k = ``hops`` in one pass: a thread per (channel row, chunk of
    blocks) walks its chunk forward, starting k blocks before it (writing nothing there), with
    the last k carriers ``(v, C)`` in a shift register and the carry of each block by Horner's
    rule (the BLHD channel walk's halo mode along rows). ``tvec``: a group of ``unroll`` steps is
    one vector access per array along time (N and block_len multiples of it, aligned rows);
    otherwise ``unroll`` scalar steps with clamped loads."""
    K, U, TV = hops, unroll, bool(tvec)
    load_t = split_load(ku, U)
    store_t = make_vector_store(ko, U)
    load_s = make_vector_load(ku, 1)
    store_s = STORE[ko]

    def kernel(a, u, y, carry, N, C, D, nb, block_len, chunk_blocks, nchunks, nwork):
        tid = numba.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        if tid >= nwork:
            return
        rest = tid // C
        c = tid - rest * C
        b = rest // nchunks
        jj0 = (rest - b * nchunks) * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        ua0 = (b * C + c) * N
        ad0 = (b * (C // D) + c // D) * N if per_head else ua0
        lb = block_len
        rv = cuda.local.array(K, f32)  # v of the last K blocks, oldest first
        rc = cuda.local.array(K, f32)
        ab = cuda.local.array(U, f32)
        ub = cuda.local.array(U, f32)
        yb = cuda.local.array(U, f32)
        jw = max(jj0 - K, 0)
        for m in range(K):
            rv[m] = carry[b * C + c] if (jw == 0 and m == K - 1) else F0  # v_{-1} = x0
            rc[m] = F1
        for j in range(jw, jj1):
            S = rv[0]
            for m in range(1, K):
                S = rv[m] + rc[m] * S
            lo = j * lb
            n = min(lb, N - lo)
            w = F0
            g = F1
            for t0 in range(0, n, U):
                if TV:
                    load_t(a, ad0 + lo + t0, ab, 0)
                    load_t(u, ua0 + lo + t0, ub, 0)
                else:
                    for i in range(U):
                        t = lo + min(t0 + i, n - 1)
                        load_s(a, ad0 + t, ab, i)
                        load_s(u, ua0 + t, ub, i)
                for i in range(U):
                    if TV or t0 + i < n:
                        w = ab[i] * w + ub[i]
                        g = g * ab[i]
                        yb[i] = w + g * S
                        if not TV and j >= jj0:
                            y[ua0 + lo + t0 + i] = store_s(yb[i])
                if TV and j >= jj0:
                    store_t(y, ua0 + lo + t0, yb, 0)
            for m in range(K - 1):
                rv[m] = rv[m + 1]
                rc[m] = rc[m + 1]
            rv[K - 1] = w
            rc[K - 1] = g

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_halo_forward_bhdl_{ku}_to_{ko}_{'per_head' if per_head else 'per_channel'}"
        f"_hops{hops}_unroll{unroll}" + ("_tvec" if TV else ""))
    return cuda.jit(kernel)


def forward_kernel(ku, ko, per_head, hops, unroll, tvec):
    """The compiled-on-demand dispatcher of one BHDL forward specialisation."""
    key = ("fwd", ku, ko, per_head, hops, unroll, bool(tvec))
    if key not in _CACHE:
        _CACHE[key] = _make_forward_bhdl(ku, ko, per_head, hops, unroll, tvec)
    return _CACHE[key]


def _forward_launch_args(a, u, y, block_len, hops, carry, chunk_blocks=None):
    """(kernel, grid, block, args) of the BHDL forward walk."""
    B, H, D, N = u.shape
    per_head = a.ndim == 3
    ku, ko = _kind(u), _kind(y)
    nb = -(-N // block_len)
    steps = TUNING["fwd_bhdl_group_bytes"] // max(ITEM_SIZE[ku], ITEM_SIZE[ko])
    aligned = (all(_address(x) % 16 == 0 for x in (a, u, y))
               and (N * ITEM_SIZE[ku]) % 16 == 0 and (N * ITEM_SIZE[ko]) % 16 == 0)
    tvec = steps >= 2 and block_len % steps == 0 and N % steps == 0 and aligned
    unroll = steps if tvec else min(TUNING["fwd_bhdl_unroll"], block_len)
    kernel = forward_kernel(ku, ko, per_head, hops, unroll, tvec)
    if chunk_blocks is None:
        chunk_blocks = max(TUNING["fwd_bhdl_chunk_blocks"], 16 * hops)
    chunk_blocks = max(1, min(nb, int(chunk_blocks)))
    C = H * D
    nchunks = -(-nb // chunk_blocks)
    nwork = B * nchunks * C
    tpb = 32 if SIMULATOR else TUNING["fwd_bhdl_threads_per_block"]
    i64 = np.int64
    args = (_flat(a, ku), _flat(u, ku), _flat(y, ko), _flat(carry, "f32"), i64(N), i64(C),
            i64(D), i64(nb), i64(block_len), i64(chunk_blocks), i64(nchunks), i64(nwork))
    return kernel, -(-nwork // tpb), tpb, args


_fplans: dict = {}


def halo_forward(a, u, y, *, layout, block_len, hops, carry, stream=None, chunk_blocks=None):
    """BHDL forward of ``hops`` in :data:`HALO_HOPS` from offset 0 in one launch:
    ``y_t = w_t + g_t T_j`` (docs/spec.md#recurrence), ``carry`` (``(B, H, D)`` float32) is
    ``v_{-1}`` (x0, or zeros). Canonical BHDL arrays (bfloat16 as uint16 bits; NumPy in the
    simulator); ``y`` of any of the three kinds. ``chunk_blocks`` overrides the tuned chunk."""
    if layout != "BHDL":
        raise ValueError("halo_forward is the BHDL walk (BLHD: swr_forward's halo mode)")
    B, H, D, N = u.shape
    if B * H * D * N == 0:
        return
    if SIMULATOR or isinstance(u, np.ndarray) or chunk_blocks is not None:
        kernel, grid, block, args = _forward_launch_args(a, u, y, block_len, hops, carry,
                                                         chunk_blocks)
        launch(kernel, grid, block, args, stream)
        return
    from cupy.cuda import runtime

    ptrs = [data_pointer(x) for x in (a, u, y, carry)]
    misaligned = (ptrs[0] | ptrs[1] | ptrs[2]) & 15
    key = (runtime.getDevice(), u.shape, a.shape, u.dtype, y.dtype, block_len, hops, misaligned,
           TUNING.version)
    plan = _fplans.get(key)
    if plan is None:
        kernel, grid, block, args = _forward_launch_args(a, u, y, block_len, hops, carry)
        entry, values = prepare(kernel, args)
        if len(_fplans) > 256:
            _fplans.clear()
        plan = _fplans[key] = (entry, grid, block, values)
    entry, grid, block, values = plan
    launch_with_pointers(entry, grid, block, values, ptrs, stream, 0)


def backward_kernel(ku, kd, layout, per_head, hops, vec, unroll, tvec=0, fuse=False):
    """The compiled-on-demand dispatcher of one backward specialisation."""
    key = ("bwd", ku, kd, layout, per_head, hops, vec, unroll, int(tvec), bool(fuse))
    if key not in _CACHE:
        _CACHE[key] = _make_backward(ku, kd, layout, per_head, hops, vec, unroll, tvec, fuse)
    return _CACHE[key]


def backward_config(layout, ku, kd, per_head, hops, block_len, H, D, addresses=(0, 0, 0, 0, 0)):
    """``(vec, lph)`` of the backward walk for a shape, or None where it does not fit:
    ``hops`` in :data:`HALO_HOPS`, ``block_len <= LMAX``; BLHD ``vec`` channels per thread (the
    widest vector of at most the tuned access bytes of u that divides the channels, and per head
    the head dim, with ``addresses`` (a, u, dy, du, da) aligned to its accesses), BHDL one;
    ``lph`` threads per head (per head a power of two up to 32; 1 per channel)."""
    if hops not in HALO_HOPS or block_len > LMAX:
        return None
    if layout == "BHDL":
        if per_head:
            return (1, D) if D & (D - 1) == 0 and D <= 32 else None
        return 1, 1
    C = H * D
    access = TUNING["bwd_access_bytes" if hops <= 4 else "bwd_access_bytes_deep"]
    a_addr, u_addr, dy_addr, du_addr, da_addr = addresses
    for vec in (8, 4, 2, 1):
        nbytes = vec * ITEM_SIZE[ku]
        if vec > 1 and nbytes > access:
            continue
        vec_addrs = (u_addr, du_addr) if per_head else (u_addr, du_addr, a_addr, da_addr)
        if any(x % nbytes for x in vec_addrs) or dy_addr % min(16, vec * ITEM_SIZE[kd]):
            continue
        if per_head:
            lph = D // vec
            if D % vec == 0 and lph & (lph - 1) == 0 and lph <= 32:
                return vec, lph
        elif C % vec == 0:
            return vec, 1
    return None


def fits_backward(layout, ku, kd, per_head, hops, block_len, H, D, addresses=(0, 0, 0, 0, 0)):
    """Whether :func:`halo_backward` takes this call."""
    return backward_config(layout, ku, kd, per_head, hops, block_len, H, D, addresses) is not None


def fits(a, u, dy, du, da, *, layout, block_len, hops):
    """Whether :func:`halo_backward` takes these canonical arrays (and ``TUNING["backward"]``)."""
    if not TUNING["backward"]:
        return False
    B, N, H, D, per_head = _dims(u, a, layout)
    return fits_backward(layout, _kind(u), _kind(dy), per_head, hops, block_len, H, D,
                         tuple(_address(x) for x in (a, u, dy, du, da)))


def _dims(u, a, layout):
    if layout == "BHDL":
        B, H, D, N = u.shape
    else:
        B, N, H, D = u.shape
    return B, N, H, D, a.ndim == 3


def _flat(x, kind):
    if SIMULATOR or isinstance(x, np.ndarray):
        x = x.reshape(-1)
        return x.view(np.uint16) if kind == "bf16" and x.dtype != np.uint16 else x
    return FlatArray.of(x)


def _address(x) -> int:
    if hasattr(x, "__cuda_array_interface__"):
        return x.__cuda_array_interface__["data"][0]
    return x.__array_interface__["data"][0]


def _launch_args(a, u, dy, du, da, layout, block_len, hops, carry, dcarry, chunk_blocks=None):
    """(kernel, grid, block, args) of the backward walk (it must fit: :func:`fits_backward`)."""
    B, N, H, D, per_head = _dims(u, a, layout)
    ku, kd = _kind(u), _kind(dy)
    cfg = backward_config(layout, ku, kd, per_head, hops, block_len, H, D,
                          tuple(_address(x) for x in (a, u, dy, du, da)))
    if cfg is None:
        raise ValueError(f"the halo backward does not fit layout={layout}, hops={hops}, "
                         f"block_len={block_len}, D={D} with these arrays")
    vec, lph = cfg
    nb = -(-N // block_len)
    unroll = min(TUNING["bwd_unroll"], block_len)
    tvec = 0
    if layout == "BHDL":
        # a group: one access of up to bwd_bhdl_group_bytes of each array along time, where N,
        # block_len and the rows allow it
        steps = TUNING["bwd_bhdl_group_bytes"] // ITEM_SIZE[ku]
        row_bytes = N * ITEM_SIZE[ku]
        addrs = tuple(_address(x) for x in (a, u, dy, du, da))
        aligned = (all(x % 16 == 0 for x in addrs) and row_bytes % 16 == 0
                   and (N * ITEM_SIZE[kd]) % 16 == 0)
        if steps >= 2 and block_len % steps == 0 and N % steps == 0 and aligned:
            unroll, tvec = steps, lph
    fuse = TUNING["bwd_fuse_lead" if layout == "BLHD" else "bwd_bhdl_fuse_lead"]
    kernel = backward_kernel(ku, kd, layout, per_head, hops, vec, unroll, tvec, fuse)
    # the simulator has no warp shuffles: there a thread block is one head's lanes
    if layout == "BLHD":
        tuned, tpb = TUNING["bwd_chunk_blocks"], TUNING["bwd_threads_per_block"]
    else:
        tuned, tpb = TUNING["bwd_bhdl_chunk_blocks"], TUNING["bwd_bhdl_threads_per_block"]
    if SIMULATOR:
        tpb = lph if per_head else 32
    if chunk_blocks is None:
        chunk_blocks = max(tuned, 2 * hops)
    chunk_blocks = max(1, min(nb, int(chunk_blocks)))
    groups = H * D // vec
    nchunks = -(-nb // chunk_blocks)
    nwork = B * nchunks * groups
    has_dcarry = dcarry is not None
    dc = _flat(dcarry if has_dcarry else carry, "f32")
    i64 = np.int64
    args = (_flat(a, ku), _flat(u, ku), _flat(dy, kd), _flat(du, ku), _flat(da, ku),
            _flat(carry, "f32"), dc, i64(N), i64(H * D), i64(D), i64(nb), i64(block_len),
            i64(chunk_blocks), i64(groups), i64(nchunks), i64(nwork), i64(lph),
            i64(1 if has_dcarry else 0))
    return kernel, -(-nwork // tpb), tpb, args


_plans: dict = {}


def halo_backward(a, u, dy, du, da, *, layout, block_len, hops, carry, dcarry=None, stream=None,
                  chunk_blocks=None):
    """Gradients of the sliding window with ``hops`` in :data:`HALO_HOPS` from offset 0 in one
    launch: writes ``du``, ``da`` (per head: summed over the head's channels) and, where given,
    ``dcarry`` (the gradient of ``carry`` = x0). Arrays as in ``swr_backward.swr_backward``
    (canonical layouts, bfloat16 as uint16 bits; NumPy arrays in the simulator). ``chunk_blocks``
    overrides the tuned chunk length (blocks per thread)."""
    B, N, H, D, _ = _dims(u, a, layout)
    if B * H * D == 0:
        return
    if N == 0:
        if dcarry is not None:
            dcarry[...] = 0
        return
    if SIMULATOR or isinstance(u, np.ndarray) or chunk_blocks is not None:
        kernel, grid, block, args = _launch_args(a, u, dy, du, da, layout, block_len, hops, carry,
                                                 dcarry, chunk_blocks)
        launch(kernel, grid, block, args, stream)
        return
    from cupy.cuda import runtime

    arrays = (a, u, dy, du, da, carry, carry if dcarry is None else dcarry)
    ptrs = [data_pointer(x) for x in arrays]
    misaligned = (ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3] | ptrs[4]) & 15
    key = (runtime.getDevice(), layout, u.shape, a.shape, u.dtype, dy.dtype, block_len, hops,
           dcarry is None, misaligned, TUNING.version)
    plan = _plans.get(key)
    if plan is None:
        kernel, grid, block, args = _launch_args(a, u, dy, du, da, layout, block_len, hops, carry,
                                                 dcarry)
        entry, values = prepare(kernel, args)
        allow_shared_memory(entry, 0)
        if len(_plans) > 256:
            _plans.clear()
        plan = _plans[key] = (entry, grid, block, values)
    entry, grid, block, values = plan
    launch_with_pointers(entry, grid, block, values, ptrs, stream, 0)
