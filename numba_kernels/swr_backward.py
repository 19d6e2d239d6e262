"""Backward pass of the sliding window recurrence (docs/spec.md#gradients, docs/internals.md).

Per block j (notation of ``swr_array.reference``): the forward local scan ``w``, ``g``; the incoming
carry ``S_{j-1}``; the adjoint of the carrier ``dv_j`` and of the compound attenuation ``dC_j``.
The backward is two reverse local scans per block,

    lam_t = dy_t + a_{t+1} lam_{t+1},   lam_end = dy_end + dv_j          (du_t = lam_t)
    mu_t  = dy_t S_{j-1} + a_{t+1} mu_{t+1},  mu_end = dy_end S_{j-1} + dC_j
    da_t  = lam_t w_{t-1} + mu_t g_{t-1}   (w_{-1} = 0, g_{-1} = 1 at a block start),

summed over the D channels of a head for per-head coefficients. For hops=1 (offset 0)
``S_{j-1} = v_{j-1}`` (``carry`` for j = 0), ``dv_j = q_{j+1} = sum_{t in j+1} g_t dy_t``,
``dC_j = 0`` and ``d carry = q_0``; for hops=0 everything but the local scans vanishes.

Which kernel runs for hops 0/1 is the table :data:`BACKWARD` (one ordered list per layout):

* ``row_scan`` (``swr_backward_rowscan.py``, BHDL): lanes along time as in the forward's row
  scan, a warp per (head, chunk), da summed over the head's rows in registers, the rows' u and dy
  (and a) through a ``cp.async`` ring in shared memory.
* ``rows`` (``swr_backward_channel.py``, BHDL): a thread per channel row, 16-byte vectors along
  time, walking its chunk's blocks from the last to the first.
* ``staged`` (``swr_backward_staged.py``, BLHD): the channel walk with each block's u, a and dy
  copied into shared memory by ``cp.async``; bitwise the channel kernel's numbers.
* ``channel`` (``swr_backward_channel.py``, BLHD): a thread owns a vector of 2-8 channels and walks
  its chunk's blocks from the last to the first, no shuffles inside a block.
* ``walk`` (this module): a group of ``lanes`` consecutive threads holds one block of a *unit*
  (BLHD: one 64-bit word of channels at every time step; BHDL: one channel, its time steps packed
  into 64-bit words), each lane ``block_len / lanes`` consecutive time steps in registers. The
  lanes combine their partial scans with warp shuffles, and the group walks a chunk of blocks
  forward in time: ``v_j`` becomes the next block's carry in registers, and block j+1's
  coefficients and ``dy``, loaded one step ahead to form ``q_{j+1}``, are kept for the next step.
  Per-head ``da`` is reduced over the head's lanes with a shuffle reduce-scatter in float32 and
  rounded once.
* ``general``: one thread per (batch, head or channel, block), any shape, any block length,
  bfloat16 / float16 / float32 element loads; also the local backward of general hops from
  per-block ``S``, ``dv``, ``dC`` (``swr_backward_blocks``).
* ``grad_sums``: ``q_j`` per (channel, block) for the block-level adjoint of general hops.

Array conventions (the front's canonical forms, docs/internals.md): BHDL ``u`` ``(B, H, D, N)``,
``a`` ``(B, H, N)`` or ``(B, H, D, N)``; BLHD ``u`` ``(B, N, H, D)``, ``a`` ``(B, N, H)`` or
``(B, N, H, D)``; C-contiguous; bfloat16 as ``ml_dtypes.bfloat16`` or its ``uint16`` bits.
``carry``, ``dcarry`` ``(B, H, D)`` and the block arrays ``(B, H, D, nb)`` are float32.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import cuda

from ._dtypes import LOAD, SIMULATOR, STORE, f32_to_bf16, storage_kind
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
from .block_scan import scratch_shape, warp_exchange
from .swr_backward_channel import channel_config, channel_kernel, rows_config, rows_kernel
from .swr_backward_rowscan import row_scan_config, row_scan_kernel
from .swr_backward_staged import staged_config, staged_kernel

__all__ = ["swr_backward", "block_grad_sums", "swr_backward_blocks", "walk_plan", "TUNING"]

TUNING = Tuning({
    # BLHD channel kernel (swr_backward_channel): bytes of u one thread moves per step, steps whose
    # loads are in flight together, chunk length in steps, threads per block
    "channel_access_bytes": 16,
    "channel_unroll": 8,
    "channel_chunk_steps": 256,
    "channel_threads_per_block": 256,
    # BHDL row kernel (swr_backward_channel.rows_kernel): 16-byte vectors per group and array,
    # chunk length in steps, threads per block
    "rows_depth": 2,
    "rows_chunk_steps": 512,
    "rows_threads_per_block": 128,
    # BLHD staged kernel (swr_backward_staged): on where it fits (else the channel kernel), chunk
    # length in steps, threads per block (fewer where the shared memory does not fit)
    "staged": True,
    "staged_chunk_steps": 256,
    "staged_threads_per_block": 128,
    "staged_unroll": 8,  # steps per checkpointed group
    # BHDL row scan (swr_backward_rowscan): lanes along time, a warp per (head, chunk); on where
    # it fits (hops 0/1, per head), warps per thread block, resident threads to aim for per SM,
    # shortest chunk in iterations
    "row_scan": True,
    "row_scan_warps": 2,
    "row_scan_threads_per_sm": 2048,
    "row_scan_min_iters": 2,
    "row_scan_depth": 1,  # rows whose loads are in flight (2 or 3: more registers, slower)
    # > 0: loads through a cp.async ring of that many rows (no registers held for them)
    "row_scan_stages": 4,
    "row_scan_min_blocks": 0,  # > 0: launch bounds of that many resident blocks per SM
    "row_scan_chunk_blocks": 0,  # fixed blocks per chunk (0: chosen per launch; tests set it)
})
"""Launch tuning of the backward kernels (swept by scripts/swr_sweep.py; the figures are in
docs/benchmarks.md)."""

f32 = numba.float32
i64 = numba.int64

# device helpers are inlined (Numba IR) into the kernels: their local arrays become registers,
# and compile_ptx needs no GPU to type them
_device = cuda.jit(device=True) if SIMULATOR else cuda.jit(device=True, inline=True)

# unsigned indices: Numba wraps negative signed indices around (a compare and an add per access)
U64 = numba.uint64

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_W0 = np.uint64(0)

# ----------------------------------------------------------------------------------------------
# 64-bit words: four 16-bit or two 32-bit elements, element e in bits [e*width, (e+1)*width)
#
# Conversions are a large share of this kernel's instructions, so they are the cheap forms: a
# 16-bit pair is packed with one ``cvt.rn.{bf16,f16}x2.f32`` (round to nearest even, as
# _dtypes.STORE), bfloat16 is unpacked with one shift or mask, half with one ``cvt.f32.f16``. The
# simulator runs NumPy twins of the same conversions.
# ----------------------------------------------------------------------------------------------

ELEMS_PER_WORD = {"f32": 2, "f16": 4, "bf16": 4}
_FILL_ONE = {"f32": np.uint64(0x3F800000_3F800000), "f16": np.uint64(0x3C003C00_3C003C00),
             "bf16": np.uint64(0x3F803F80_3F803F80)}  # a word of 1.0s

if SIMULATOR:

    def _py_bits(x):
        return np.array(np.float32(x), dtype=np.float32).view(np.uint32)[()]

    def _word_codec(kind):
        """(unpack(word, e) -> float32 element e, pack(x0, x1, x2, x3) -> word: four 16-bit
        elements, or the first two as float32)."""
        width = 32 if kind == "f32" else 16
        mask = np.uint64((1 << width) - 1)

        def unpack(word, e):
            bits = (np.uint64(word) >> np.uint64(width * e)) & mask
            if kind == "f32":
                return np.array(np.uint32(bits), dtype=np.uint32).view(np.float32)[()]
            if kind == "f16":
                h = np.array(np.uint16(bits), dtype=np.uint16).view(np.float16)[()]
                return np.float32(h)
            return np.array(np.uint32(bits) << np.uint32(16), dtype=np.uint32).view(
                np.float32)[()]

        def to_bits(x):
            if kind == "f32":
                return np.uint64(_py_bits(x))
            if kind == "f16":
                return np.uint64(np.array(np.float32(x)).astype(np.float16).view(np.uint16))
            return np.uint64(f32_to_bf16(x))

        def pack(x0, x1, x2, x3):
            if kind == "f32":
                return to_bits(x0) | (to_bits(x1) << np.uint64(32))
            word = np.uint64(0)
            for e, x in enumerate((x0, x1, x2, x3)):
                word |= to_bits(x) << np.uint64(16 * e)
            return word

        return cuda.jit(device=True)(unpack), cuda.jit(device=True)(pack)

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    # intrinsics rather than inlined device functions: every Numba-IR inlining costs compile
    # time, and these are called from every load and store of the kernels

    def _word_codec(kind):
        """(unpack(word, e) -> float32 element e, pack(x0, x1, x2, x3) -> word: four 16-bit
        elements, or the first two as float32)."""
        width = 32 if kind == "f32" else 16

        @intrinsic
        def unpack(typingctx, word, e):
            sig = types.float32(types.uint64, types.int64)

            def codegen(context, builder, sig, args):
                i64, i32 = ir.IntType(64), ir.IntType(32)
                shift = builder.mul(args[1], ir.Constant(i64, width))
                bits = builder.lshr(args[0], shift)
                if kind == "f32":
                    return builder.bitcast(builder.trunc(bits, i32), ir.FloatType())
                if kind == "f16":
                    half = builder.bitcast(builder.trunc(bits, ir.IntType(16)), ir.HalfType())
                    return builder.fpext(half, ir.FloatType())
                high = builder.shl(builder.trunc(bits, i32), ir.Constant(i32, 16))
                return builder.bitcast(high, ir.FloatType())

            return sig, codegen

        @intrinsic
        def pack(typingctx, x0, x1, x2, x3):
            sig = types.uint64(types.float32, types.float32, types.float32, types.float32)

            def codegen(context, builder, sig, args):
                i64, i32, f32t = ir.IntType(64), ir.IntType(32), ir.FloatType()
                if kind == "f32":
                    lo, hi = (builder.bitcast(x, i32) for x in args[:2])
                else:
                    op = "cvt.rn.bf16x2.f32" if kind == "bf16" else "cvt.rn.f16x2.f32"
                    fn = ir.FunctionType(i32, [f32t, f32t])
                    # the first operand lands in the upper half, i.e. the higher address
                    lo, hi = (builder.asm(fn, f"{op} $0, $1, $2;", "=r,f,f", [y, x], False)
                              for x, y in (args[0:2], args[2:4]))
                hi = builder.shl(builder.zext(hi, i64), ir.Constant(i64, 32))
                return builder.or_(builder.zext(lo, i64), hi)

            return sig, codegen

        return unpack, pack


_CODECS = {k: _word_codec(k) for k in ELEMS_PER_WORD}


def _tile_io(kind, layout, slots, cols):
    """(load, put) for one lane's tile: ``slots`` consecutive time steps x ``cols`` channels.

    Word indices: BLHD ``base + t * stride + wi`` (``cols / E`` words of channels per step);
    BHDL ``base + t // E`` (one channel, ``E`` time steps per word; ``cols == 1``).
    ``load(arr, vals, base, stride, tbase, N, ok, fill)`` fills ``vals[slots, cols]``; steps with
    ``t >= N`` or a dead lane (``ok`` false) get the word ``fill`` (zeros or ``_FILL_ONE``).
    ``put(arr, vals, r, base, stride, tbase, N, ok)`` stores what step ``r`` of ``vals``
    completes (BLHD its words; BHDL, walking r downwards, the word whose lowest step is r), so
    that a caller can store results as they come instead of holding them in registers.
    """
    E = ELEMS_PER_WORD[kind]
    Q = 2 * (E // 4)  # offset of the third and fourth values a word packs (float32 words: two)
    unpack, pack = _CODECS[kind]
    if layout == "BLHD":
        words_per_step = cols // E

        @_device
        def load(arr, vals, base, stride, tbase, N, ok, fill):
            for r in range(slots):
                t = tbase + r
                for wi in range(words_per_step):
                    word = arr[U64(base + t * stride + wi)] if ok and t < N else fill
                    for e in range(E):
                        vals[r, wi * E + e] = unpack(word, e)

        @_device
        def put(arr, vals, r, base, stride, tbase, N, ok):
            t = tbase + r
            if ok and t < N:
                for wi in range(words_per_step):
                    c = wi * E
                    arr[U64(base + t * stride + wi)] = pack(
                        vals[r, c], vals[r, c + 1], vals[r, c + Q], vals[r, c + 1 + Q])

    else:
        words_per_lane = slots // E

        @_device
        def load(arr, vals, base, stride, tbase, N, ok, fill):
            for k in range(words_per_lane):
                t = tbase + k * E
                word = arr[U64(base + t // E)] if ok and t < N else fill
                for e in range(E):
                    vals[k * E + e, 0] = unpack(word, e)

        @_device
        def put(arr, vals, r, base, stride, tbase, N, ok):
            if r % E == 0:
                t = tbase + r
                if ok and t < N:
                    arr[U64(base + t // E)] = pack(vals[r, 0], vals[r + 1, 0], vals[r + Q, 0],
                                                   vals[r + 1 + Q, 0])

    return load, put


# ----------------------------------------------------------------------------------------------
# The fused walk kernel (hops 0 and 1)
# ----------------------------------------------------------------------------------------------


def _log2(n: int) -> int:
    return n.bit_length() - 1


_walk_cache: dict = {}


def _walk_kernel(ku, kd, layout, per_head, block_len, lanes, hops, uph, threads):
    """Build the fused backward for one specialisation (see the module docstring).

    ku: kind of a, u, du, da; kd: kind of dy; lanes (M): lanes per block; uph: units per head
    (per-head only); threads: threads per CTA.
    """
    key = (ku, kd, layout, per_head, block_len, lanes, hops, uph, threads)
    if key in _walk_cache:
        return _walk_cache[key]
    L, M = block_len, lanes
    R = L // M  # time steps per lane
    EU, ED = ELEMS_PER_WORD[ku], ELEMS_PER_WORD[kd]
    BLHD = layout == "BLHD"
    EC = max(EU, ED) if BLHD else 1  # channels per lane
    AC = 1 if per_head else EC  # coefficient columns per lane
    AS = 0 if per_head else 1  # column of a that multiplies channel c is c * AS
    LOG_M = _log2(M)
    LOG_UPH = _log2(uph) if per_head else 0
    UPC = threads // M  # units per CTA
    A_ELEMS = per_head and BLHD  # (B, N, H) coefficients: one element per step, not words
    HOPS1 = hops == 1
    scr_shape = scratch_shape(threads)
    xchg = warp_exchange
    load_u, put_u = _tile_io(ku, layout, R, EC)
    load_d, _ = _tile_io(kd, layout, R, EC)
    load_aw, put_a = _tile_io(ku, layout, R, AC)
    load_ae, store_ae = LOAD[ku], STORE[ku]
    FILL_A = _FILL_ONE[ku]

    @_device
    def load_a(arr, vals, base, stride, tbase, N, ok):
        if A_ELEMS:
            for r in range(R):
                t = tbase + r
                vals[r, 0] = load_ae(arr[U64(base + t * stride)]) if ok and t < N else _F1
        else:
            load_aw(arr, vals, base, stride, tbase, N, ok, FILL_A)

    @_device
    def forward(a_s, u_s, wp, gp, lane_g, v, scr, xc, tid, lane, gi, gb):
        """w_{t-1}, g_{t-1} of every step into wp, gp; the lane's product of a into lane_g;
        the block's carrier v (every lane of the group)."""
        wl = cuda.local.array(EC, f32)
        gl = cuda.local.array(AC, f32)
        win = cuda.local.array(EC, f32)
        gin = cuda.local.array(AC, f32)
        for c in range(EC):
            wl[c] = _F0
        for k in range(AC):
            gl[k] = _F1
        for r in range(R):
            for c in range(EC):
                wp[r, c] = wl[c]
                wl[c] = a_s[r, c * AS] * wl[c] + u_s[r, c]
            for k in range(AC):
                gp[r, k] = gl[k]
                gl[k] = gl[k] * a_s[r, k]
        for k in range(AC):
            lane_g[k] = gl[k]
        if M > 1:
            # inclusive scan of the lanes' maps w -> G w + W: X_i <- X_i o X_{i-d}
            for s in range(LOG_M):
                d = 1 << s
                take = gi >= d
                src = lane - d if take else lane
                for c in range(EC):
                    pw = xchg(scr, xc, tid, wl[c], src)
                    if take:
                        wl[c] = gl[c * AS] * pw + wl[c]
                for k in range(AC):
                    pg = xchg(scr, xc, tid, gl[k], src)
                    if take:
                        gl[k] = gl[k] * pg
            first = gi == 0
            src = lane if first else lane - 1
            for c in range(EC):
                x = xchg(scr, xc, tid, wl[c], src)
                win[c] = _F0 if first else x
                v[c] = xchg(scr, xc, tid, wl[c], gb + M - 1)
            for k in range(AC):
                x = xchg(scr, xc, tid, gl[k], src)
                gin[k] = _F1 if first else x
            for r in range(R):
                for c in range(EC):
                    wp[r, c] = wp[r, c] + gp[r, c * AS] * win[c]
                for k in range(AC):
                    gp[r, k] = gin[k] * gp[r, k]
        else:
            for c in range(EC):
                v[c] = wl[c]

    @_device
    def grad_sum(a_s, d_s, q, zl, pl, scr, xc, tid, lane, gi):
        """q = sum over the block of g_t dy_t (every lane of the group). Also the lane's own
        parts, which block's reverse reuses: zl = sum over the lane of (a from the lane's first
        step to t) dy_t, pl = the lane's product of a."""
        gl = cuda.local.array(AC, f32)
        for k in range(AC):
            gl[k] = _F1
        for c in range(EC):
            zl[c] = _F0
        for r in range(R):
            for k in range(AC):
                gl[k] = gl[k] * a_s[r, k]
            for c in range(EC):
                zl[c] = zl[c] + gl[c * AS] * d_s[r, c]
        for k in range(AC):
            pl[k] = gl[k]
        if M > 1:
            # exclusive prefix product of the lanes' products of a
            for s in range(LOG_M):
                d = 1 << s
                take = gi >= d
                src = lane - d if take else lane
                for k in range(AC):
                    pg = xchg(scr, xc, tid, gl[k], src)
                    if take:
                        gl[k] = gl[k] * pg
            first = gi == 0
            src = lane if first else lane - 1
            for k in range(AC):
                x = xchg(scr, xc, tid, gl[k], src)
                gl[k] = _F1 if first else x
            for c in range(EC):
                x = gl[c * AS] * zl[c]
                for s in range(LOG_M):
                    x = x + xchg(scr, xc, tid, x, lane ^ (1 << s))
                q[c] = x
        else:
            for c in range(EC):
                q[c] = zl[c]

    @_device
    def reverse(a_s, d_s, zl, pl, dv, S, wp, gp, red, du, da, base_u, st_u, base_a, st_a, tbase,
                N, ok, scr, xc, tid, lane, gi):
        """lam (= du) and da of every step, given the lane's parts (zl, pl) from grad_sum, the
        block's dv and incoming carry S; du and per-channel da are stored step by step, per-head
        da is summed over the lane's channels into red. Overwrites zl, pl."""
        cz = cuda.local.array(EC, f32)
        cl = cuda.local.array(EC, f32)
        du_t = cuda.local.array((R, EC), f32)
        da_t = cuda.local.array((R, EC), f32)
        if M > 1:
            # the lane maps c -> P c + Z carry a_t lam_t leftwards; suffix scan X_i <- X_i o X_{i+d}
            for s in range(LOG_M):
                d = 1 << s
                take = gi + d < M
                src = lane + d if take else lane
                for c in range(EC):
                    pz = xchg(scr, xc, tid, zl[c], src)
                    if take:
                        zl[c] = pl[c * AS] * pz + zl[c]
                for k in range(AC):
                    pp = xchg(scr, xc, tid, pl[k], src)
                    if take:
                        pl[k] = pl[k] * pp
            last = gi == M - 1
            src = lane if last else lane + 1
            for c in range(EC):
                x = xchg(scr, xc, tid, zl[c], src)
                cz[c] = _F0 if last else x
            for k in range(AC):
                x = xchg(scr, xc, tid, pl[k], src)
                pl[k] = _F1 if last else x
            for c in range(EC):
                cl[c] = pl[c * AS] * dv[c] + cz[c]
        else:
            for c in range(EC):
                cz[c] = _F0
                cl[c] = dv[c]
        for rr in range(R):
            r = R - 1 - rr
            hsum = _F0
            for c in range(EC):
                dr = d_s[r, c]
                z = dr + cz[c]
                lam = dr + cl[c]
                dav = lam * wp[r, c] + S[c] * z * gp[r, c * AS]
                ar = a_s[r, c * AS]
                cz[c] = ar * z
                cl[c] = ar * lam
                du_t[r, c] = lam
                da_t[r, c] = dav
                hsum = hsum + dav
            red[r] = hsum
            put_u(du, du_t, r, base_u, st_u, tbase, N, ok)
            if not per_head:
                put_a(da, da_t, r, base_a, st_a, tbase, N, ok)

    @_device
    def store_head_da(red, da, base, stride, tbase, N, ok, scr, xc, tid, lane):
        """Sum the lanes' per-step da over the head with a shuffle reduce-scatter (float32), round
        once, store one element per step."""
        n = R
        off = 0
        owner = True
        for s in range(LOG_UPH):
            bit = M << s
            hi = (lane & bit) != 0
            if n > 1:
                # halve: the low lane keeps steps [0, n/2), the high lane [n/2, n)
                half = n // 2
                for i in range(half):
                    lo_v = red[i]
                    hi_v = red[i + half]
                    got = xchg(scr, xc, tid, lo_v if hi else hi_v, lane ^ bit)
                    red[i] = (hi_v if hi else lo_v) + got
                if hi:
                    off += half
                n = half
            else:
                red[0] = red[0] + xchg(scr, xc, tid, red[0], lane ^ bit)
                owner = owner and not hi
        if owner and ok:
            for i in range(n):
                t = tbase + off + i
                if t < N:
                    if BLHD:
                        da[U64(base + t * stride)] = store_ae(red[i])
                    else:
                        da[U64(base + t)] = store_ae(red[i])

    @cuda.jit
    def swr_backward_walk(a, u, dy, du, da, carry, dcarry, N, H, D, nb, K, has_dcarry):
        scr = cuda.shared.array(scr_shape, f32)
        xc = cuda.local.array(1, i64)
        xc[0] = 0
        a_s = cuda.local.array((R, AC), f32)
        d_s = cuda.local.array((R, EC), f32)
        an_s = cuda.local.array((R, AC), f32)
        dn_s = cuda.local.array((R, EC), f32)
        u_s = cuda.local.array((R, EC), f32)
        wp = cuda.local.array((R, EC), f32)
        gp = cuda.local.array((R, AC), f32)
        red = cuda.local.array(R, f32)
        lane_g = cuda.local.array(AC, f32)
        zl = cuda.local.array(EC, f32)
        pl = cuda.local.array(AC, f32)
        zn = cuda.local.array(EC, f32)
        pn = cuda.local.array(AC, f32)
        S = cuda.local.array(EC, f32)
        v = cuda.local.array(EC, f32)
        dv = cuda.local.array(EC, f32)

        tid = i64(cuda.threadIdx.x)
        lane = tid % 32
        gi = tid % M
        gb = lane - gi
        C = H * D
        units = C // EC
        n_ucta = (units + UPC - 1) // UPC
        nchunks = (nb + K - 1) // K
        bid = i64(cuda.blockIdx.x)
        ucta = bid % n_ucta
        rest = bid // n_ucta
        chunk = rest % nchunks
        b = rest // nchunks
        unit = ucta * UPC + tid // M
        ok = unit < units
        uu = unit if ok else 0
        head = uu // uph if per_head else 0
        j0 = chunk * K
        j1 = min(j0 + K, nb)

        # word bases (see _tile_io); BLHD: per time step stride, BHDL: row * N / E
        if BLHD:
            base_u = b * N * (C // EU) + uu * (EC // EU)
            st_u = C // EU
            base_d = b * N * (C // ED) + uu * (EC // ED)
            st_d = C // ED
            if per_head:
                base_a = b * N * H + head
                st_a = H
            else:
                base_a = base_u
                st_a = st_u
        else:
            row = b * C + uu
            base_u = row * N // EU
            st_u = 0
            base_d = row * N // ED
            st_d = 0
            if per_head:
                base_a = (b * H + head) * N // EU
            else:
                base_a = base_u
            st_a = 0
        base_da = base_a
        if per_head and not BLHD:
            base_da = (b * H + head) * N  # per-head da is stored as elements
        chan0 = b * C + uu * EC

        for c in range(EC):
            S[c] = _F0
            dv[c] = _F0
        if HOPS1:
            # Step j runs the forward of block j (its carrier becomes the next block's carry) and
            # the gradient sum of block j+1 (whose coefficients, dy and lane parts it keeps for
            # step j+1); from j0 on it also runs block j's reverse. The lead-in step j0-1 yields
            # the carry of the chunk's first block (for j0 = 0 its loads are masked, the carry
            # comes in, and its gradient sum is q_0 = d carry).
            load_a(a, a_s, base_a, st_a, (j0 - 1) * L + gi * R, N, ok and j0 > 0)
            jstart = j0 - 1
        else:
            if j0 == 0 and has_dcarry != 0 and gi == 0 and ok:
                for c in range(EC):
                    dcarry[U64(chan0 + c)] = _F0
            jstart = j0
        for j in range(jstart, j1):
            tb = j * L + gi * R
            load_u(u, u_s, base_u, st_u, tb, N, ok and j >= 0, _W0)
            if HOPS1:
                # steps past N load a = 1, dy = 0, so q_{nb} = 0 for the last block
                load_a(a, an_s, base_a, st_a, tb + L, N, ok)
                load_d(dy, dn_s, base_d, st_d, tb + L, N, ok, _W0)
            else:
                load_a(a, a_s, base_a, st_a, tb, N, ok)
                load_d(dy, d_s, base_d, st_d, tb, N, ok, _W0)
            forward(a_s, u_s, wp, gp, lane_g, v, scr, xc, tid, lane, gi, gb)
            if HOPS1:
                grad_sum(an_s, dn_s, dv, zn, pn, scr, xc, tid, lane, gi)
                if j >= j0:
                    reverse(a_s, d_s, zl, pl, dv, S, wp, gp, red, du, da, base_u, st_u, base_a,
                            st_a, tb, N, ok, scr, xc, tid, lane, gi)
                elif j0 == 0 and has_dcarry != 0 and gi == 0 and ok:
                    for c in range(EC):
                        dcarry[U64(chan0 + c)] = dv[c]
            else:
                # hops 0: no neighbour, the lane parts of this block's own dy
                for c in range(EC):
                    z = _F0
                    for rr in range(R):
                        z = a_s[R - 1 - rr, c * AS] * (d_s[R - 1 - rr, c] + z)
                    zl[c] = z
                for k in range(AC):
                    pl[k] = lane_g[k]
                reverse(a_s, d_s, zl, pl, dv, S, wp, gp, red, du, da, base_u, st_u, base_a,
                        st_a, tb, N, ok, scr, xc, tid, lane, gi)
            if per_head and j >= j0:
                store_head_da(red, da, base_da, st_a, tb, N, ok, scr, xc, tid, lane)
            if HOPS1:
                for c in range(EC):
                    S[c] = v[c] if j >= 0 else (carry[U64(chan0 + c)] if ok else _F0)
                    zl[c] = zn[c]
                for k in range(AC):
                    pl[k] = pn[k]
                for r in range(R):
                    for k in range(AC):
                        a_s[r, k] = an_s[r, k]
                    for c in range(EC):
                        d_s[r, c] = dn_s[r, c]

    _walk_cache[key] = swr_backward_walk
    return swr_backward_walk


# ----------------------------------------------------------------------------------------------
# The general kernel: one thread per (batch, head or channel, block)
# ----------------------------------------------------------------------------------------------

MODE_HOPS0, MODE_HOPS1, MODE_BLOCKS = 0, 1, 2
_general_cache: dict = {}


def _element_index(layout, per_head):
    """(u_index(b, h, d, t, N, H, D), a_index(...)) into the flattened canonical arrays.

    The layout is a closure constant of both (not two different bodies): the launcher's PTX disk
    cache tells specialisations apart by their closures, not by their code.
    """
    BLHD = layout == "BLHD"

    @_device
    def u_index(b, h, d, t, N, H, D):
        if BLHD:
            return U64(((b * N + t) * H + h) * D + d)
        return U64(((b * H + h) * D + d) * N + t)

    @_device
    def a_index(b, h, d, t, N, H, D):
        if not per_head:
            return u_index(b, h, d, t, N, H, D)
        if BLHD:
            return U64((b * N + t) * H + h)
        return U64((b * H + h) * N + t)

    return u_index, a_index


def _general_kernel(ku, kd, layout, per_head, block_len, mode):
    key = (ku, kd, layout, per_head, block_len, mode)
    if key in _general_cache:
        return _general_cache[key]
    L = block_len
    load_u, store_u = LOAD[ku], STORE[ku]
    load_d = LOAD[kd]
    u_index, a_index = _element_index(layout, per_head)

    @cuda.jit
    def swr_backward_general(a, u, dy, du, da, carry, dcarry, S_blk, dv_blk, dC_blk,
                             B, N, H, D, nb, has_dcarry):
        gid = i64(cuda.blockIdx.x) * i64(cuda.blockDim.x) + i64(cuda.threadIdx.x)
        groups = H if per_head else H * D
        if gid >= B * groups * nb:
            return
        j = gid % nb
        rest = gid // nb
        grp = rest % groups
        b = rest // groups
        if per_head:
            h = grp
            d0 = i64(0)
            nd = D
        else:
            h = grp // D
            d0 = grp % D
            nd = i64(1)
        t0 = j * L
        t1 = min(t0 + L, N)
        wp = cuda.local.array(L, f32)
        gp = cuda.local.array(L, f32)
        acc = cuda.local.array(L, f32)
        for i in range(L):
            acc[i] = _F0
        for dd in range(nd):
            d = d0 + dd
            ch = (b * H + h) * D + d
            S = _F0
            dv = _F0
            dC = _F0
            if mode == MODE_BLOCKS:
                S = S_blk[U64(ch * nb + j)]
                dv = dv_blk[U64(ch * nb + j)]
                dC = dC_blk[U64(ch * nb + j)]
            elif mode == MODE_HOPS1:
                if j == 0:
                    S = carry[U64(ch)]
                else:
                    for t in range(t0 - L, t0):
                        S = load_u(a[a_index(b, h, d, t, N, H, D)]) * S + load_u(
                            u[u_index(b, h, d, t, N, H, D)])
                g = _F1
                for t in range(t1, min(t1 + L, N)):
                    g = g * load_u(a[a_index(b, h, d, t, N, H, D)])
                    dv = dv + g * load_d(dy[u_index(b, h, d, t, N, H, D)])
            w = _F0
            g = _F1
            q = _F0
            for t in range(t0, t1):
                i = t - t0
                at = load_u(a[a_index(b, h, d, t, N, H, D)])
                wp[i] = w
                gp[i] = g
                w = at * w + load_u(u[u_index(b, h, d, t, N, H, D)])
                g = at * g
                q = q + g * load_d(dy[u_index(b, h, d, t, N, H, D)])
            if j == 0 and has_dcarry != 0 and mode != MODE_BLOCKS:
                dcarry[U64(ch)] = q if mode == MODE_HOPS1 else _F0
            # lam, mu hold a_{t+1} lam_{t+1}, a_{t+1} mu_{t+1} (dv, dC past the block's end)
            lam = dv
            mu = dC
            for tt in range(t1 - t0):
                t = t1 - 1 - tt
                i = t - t0
                dyt = load_d(dy[u_index(b, h, d, t, N, H, D)])
                lam = dyt + lam
                mu = dyt * S + mu
                du[u_index(b, h, d, t, N, H, D)] = store_u(lam)
                dat = lam * wp[i] + mu * gp[i]
                if per_head:
                    acc[i] = acc[i] + dat
                else:
                    da[a_index(b, h, d, t, N, H, D)] = store_u(dat)
                at = load_u(a[a_index(b, h, d, t, N, H, D)])
                lam = at * lam
                mu = at * mu
        if per_head:
            for t in range(t0, t1):
                da[a_index(b, h, d0, t, N, H, D)] = store_u(acc[t - t0])

    _general_cache[key] = swr_backward_general
    return swr_backward_general


_sums_cache: dict = {}


def _grad_sums_kernel(ka, kd, layout, per_head, block_len):
    key = (ka, kd, layout, per_head, block_len)
    if key in _sums_cache:
        return _sums_cache[key]
    L = block_len
    load_a, load_d = LOAD[ka], LOAD[kd]
    u_index, a_index = _element_index(layout, per_head)

    @cuda.jit
    def block_grad_sums_kernel(a, dy, q, B, N, H, D, nb):
        gid = i64(cuda.blockIdx.x) * i64(cuda.blockDim.x) + i64(cuda.threadIdx.x)
        if gid >= B * H * D * nb:
            return
        j = gid % nb
        ch = gid // nb
        d = ch % D
        h = (ch // D) % H
        b = ch // (D * H)
        g = _F1
        s = _F0
        for t in range(j * L, min(j * L + L, N)):
            g = g * load_a(a[a_index(b, h, d, t, N, H, D)])
            s = s + g * load_d(dy[u_index(b, h, d, t, N, H, D)])
        q[U64(gid)] = s

    _sums_cache[key] = block_grad_sums_kernel
    return block_grad_sums_kernel


# ----------------------------------------------------------------------------------------------
# Host side: shapes, kinds, plans, launches
# ----------------------------------------------------------------------------------------------


def _kind(x) -> str:
    return "bf16" if x.dtype == np.uint16 else storage_kind(x.dtype)


def _flat(x, kind):
    """1-D element view handed to a kernel (bfloat16 as its uint16 bits)."""
    if SIMULATOR or isinstance(x, np.ndarray):
        x = x.reshape(-1)
        return x.view(np.uint16) if kind == "bf16" and x.dtype != np.uint16 else x
    return FlatArray.of(x)  # no CuPy view objects on the launch path


def _words(x, kind):
    """1-D uint64 view: four 16-bit or two 32-bit elements per word."""
    if SIMULATOR or isinstance(x, np.ndarray):
        return _flat(x, kind).view(np.uint64)
    f = FlatArray.of(x)
    return FlatArray(f.ptr, f.size * f.dtype.itemsize // 8, np.uint64)


def _address(x) -> int:
    """The data address of an array (an int is taken as an address already)."""
    if isinstance(x, (int, np.integer)):
        return int(x)
    if hasattr(x, "__cuda_array_interface__"):
        return x.__cuda_array_interface__["data"][0]
    return x.__array_interface__["data"][0]


def _dims(u, a, layout):
    if layout == "BHDL":
        B, H, D, N = u.shape
    else:
        B, N, H, D = u.shape
    return B, N, H, D, a.ndim == 3


def walk_plan(layout, per_head, ku, kd, block_len, N, H, D, arrays=()):
    """Lane layout of the fused kernel for a shape, or None where only the general kernel fits.

    Returns ``(lanes, uph)``: lanes per block and units (lane groups) per head. ``arrays`` (or
    their addresses) are checked for 8-byte alignment (the kernel reads them as 64-bit words).
    """
    E = max(ELEMS_PER_WORD[ku], ELEMS_PER_WORD[kd])
    C = H * D
    L = block_len
    if any(_address(x) % 8 for x in arrays):
        return None
    if layout == "BLHD":
        EC = E
        if C % EC:
            return None
        if per_head:
            if D % EC:
                return None
            uph = D // EC
        else:
            uph = 1
        # four time steps per lane keep the tile in registers; more where the head needs it
        slots = min(L, 4)
        lanes = L // slots
        while lanes * uph > 32 and slots < 16 and slots < L:
            slots *= 2
            lanes = L // slots
        if lanes * uph > 32 or uph & (uph - 1):
            return None
        return lanes, uph
    # BHDL: time steps packed in words along each row
    if N % E or L < E:
        return None
    uph = D if per_head else 1
    if uph & (uph - 1) or uph > 32:
        return None
    # a head's lanes share a warp (lanes * uph <= 32); four lanes (four words side by side per
    # row) where they fit, more for long blocks so that a lane holds at most 16 steps
    lanes_max = min(L // E, 32 // uph)
    lanes = min(lanes_max, max(min(4, L // E), L // 16))
    slots = L // lanes
    if slots > 32:
        return None
    return lanes, uph


def swr_backward(a, u, dy, du, da, *, layout, block_len, hops, carry, dcarry=None, stream=None,
                 variant="auto", blocks_per_chunk=None, threads=128, lanes=None):
    """Fused backward of hops 0/1 from offset 0 (docs/spec.md#gradients); writes du, da (and
    dcarry).

    a: BHDL ``(B, H, N)`` / ``(B, H, D, N)``, BLHD ``(B, N, H)`` / ``(B, N, H, D)``; u, du: BHDL
    ``(B, H, D, N)``, BLHD ``(B, N, H, D)``; dy like u (any of the three dtypes); da like a.
    ``carry``: ``(B, H, D)`` float32, the initial carry (x0, or zeros). ``dcarry``: ``(B, H, D)``
    float32 receiving d carry (zeros for hops=0), or None.
    ``variant``: "auto" (the first row of :data:`BACKWARD` that fits), "channel" (BLHD staged or
    channel kernel, BHDL row kernel), "row_scan" (BHDL), "walk" or "general".
    ``blocks_per_chunk``: blocks each lane group of the walk kernel walks (default: 32 for BHDL,
    8 for BLHD).
    ``threads``: threads per CTA of the walk kernel (a multiple of 32). ``lanes``: lanes per
    block of the walk kernel instead of :func:`walk_plan`'s choice (a tuning knob).
    """
    tuned = variant == "auto" and blocks_per_chunk is None and threads == 128 and lanes is None
    if tuned and not (SIMULATOR or isinstance(u, np.ndarray)) and 0 not in u.shape:
        _run_cached(a, u, dy, du, da, layout, block_len, hops, carry, dcarry, stream)
        return
    call = _launch_args(a, u, dy, du, da, layout, block_len, hops, carry, dcarry, variant,
                        blocks_per_chunk, threads, lanes)
    if call is not None:
        kernel, grid, block, args, shared = call
        launch(kernel, grid, block, args, stream, shared)


# The GPU path is the per-call host cost users see: everything but the data pointers is looked
# up in a plan cached per (device, shapes, dtypes, options, pointer alignment), as in
# swr_forward._run.
_plans: dict = {}


def _run_cached(a, u, dy, du, da, layout, block_len, hops, carry, dcarry, stream):
    from cupy.cuda import runtime

    arrays = (a, u, dy, du, da, carry, carry if dcarry is None else dcarry)
    ptrs = [data_pointer(x) for x in arrays]
    misaligned = (ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3] | ptrs[4]) & 15
    key = (runtime.getDevice(), layout, u.shape, a.shape, u.dtype, dy.dtype, block_len, hops,
           dcarry is None, misaligned, TUNING.version)  # fmt: skip
    plan = _plans.get(key)
    if plan is None:
        call = _launch_args(a, u, dy, du, da, layout, block_len, hops, carry, dcarry, "auto",
                            None, 128, None)  # fmt: skip
        if call is None:  # nothing to launch (only for shapes that are never cached)
            return
        kernel, grid, block, args, shared = call
        entry, values = prepare(kernel, args)
        allow_shared_memory(entry, shared)
        if len(_plans) > 256:
            _plans.clear()
        plan = _plans[key] = (entry, grid, block, values, shared)
    # every backward kernel takes a, u, dy, du, da, carry, dcarry first
    entry, grid, block, values, shared = plan
    launch_with_pointers(entry, grid, block, values, ptrs, stream, shared)


class Case(NamedTuple):
    """What the choice of a backward kernel depends on (no arrays: a test can enumerate it).
    ``addresses``: the data addresses of a, u, dy, du, da."""

    layout: str
    per_head: bool
    ku: str
    kd: str
    hops: int
    block_len: int
    N: int
    H: int
    D: int
    addresses: tuple = (0, 0, 0, 0, 0)


def _fit_row_scan(c):
    return TUNING["row_scan"] and row_scan_config(c.ku, c.kd, c.per_head, c.block_len, c.N, c.D,
                                                  c.addresses)


def _fit_rows(c):
    return rows_config(c.ku, c.kd, c.per_head, c.block_len, c.N, c.D, TUNING["rows_depth"],
                       c.addresses)


def _fit_rows_first(c):
    if c.hops != 1 or not c.per_head or c.ku == "f32":
        return None
    cfg = _fit_rows(c)
    return cfg if cfg is not None and cfg[0] == TUNING["rows_depth"] else None


def _fit_walk(c):
    return walk_plan(c.layout, c.per_head, c.ku, c.kd, c.block_len, c.N, c.H, c.D, c.addresses)


def _fit_channel(c):
    a, u, dy, du, da = c.addresses
    return channel_config(c.ku, c.kd, c.per_head, c.block_len, c.H, c.D,
                          TUNING["channel_access_bytes"], (u, du) if c.per_head else (u, du, a, da),
                          dy)


def _fit_staged(c):
    cfg = _fit_channel(c) if TUNING["staged"] else None
    if cfg is None:
        return None
    vec, lph = cfg
    # the simulator has no warp shuffles: there a thread block is one head's lanes
    threads = lph if SIMULATOR else TUNING["staged_threads_per_block"]
    staged = staged_config(c.ku, c.kd, c.per_head, c.block_len, c.N, vec,
                           min(TUNING["staged_unroll"], c.block_len), threads, c.addresses[0])
    return None if not staged else (vec, lph) + staged


def _channel_first(c):
    return c.hops == 1 or c.block_len >= 32


def _fit_general(c):
    return True


BACKWARD = {
    "BHDL": (
        ("row_scan", _fit_row_scan,
         "per head, u and dy of one item size, 16-byte aligned, block_len 8-128 (16-bit): lanes "
         "along time, a warp per (head, chunk), da summed in registers"),
        ("rows", _fit_rows_first,
         "hops=1, per head, 16-bit u, two 16-byte vectors per group: a thread per channel row "
         "beats the lane walk there"),
        ("walk", _fit_walk,
         "8-byte aligned, N a multiple of a word's elements: lane groups walk blocks forward"),
        ("rows", _fit_rows, "16-byte aligned rows that the lane walk does not take"),
        ("general", _fit_general, "anything else: a thread per (batch, head or channel, block)"),
    ),
    "BLHD": (
        ("staged", lambda c: _channel_first(c) and _fit_staged(c),
         "hops=1 or block_len >= 32, per head, whole blocks, block_len in BLOCK_LENS: the "
         "channel walk with u, a, dy staged in shared memory"),
        ("channel", lambda c: _channel_first(c) and _fit_channel(c),
         "hops=1 or block_len >= 32, vectors of 2-8 channels: a thread walks its channels' "
         "blocks backwards"),
        ("walk", _fit_walk, "8-byte aligned words of channels: lane groups walk blocks forward"),
        ("staged", _fit_staged, "where the lane walk does not fit, as above"),
        ("channel", _fit_channel, "where the lane walk does not fit, as above"),
        ("general", _fit_general, "anything else: a thread per (batch, head or channel, block)"),
    ),
}
"""The backward's choice, per layout: the first row whose fits-check passes is launched (under
``variant="auto"``). Each fits-check returns the launch configuration, or a false value."""

_VARIANTS = {"channel": ("staged", "channel", "rows"), "row_scan": ("row_scan",),
             "walk": ("walk",), "general": ("general",)}


def choose(c: Case, variant: str = "auto"):
    """``(kernel name, configuration)`` of the backward for ``c``: the first row of
    :data:`BACKWARD` that fits (``variant="auto"``), or the first row of the named variant that
    fits (ValueError where none does)."""
    rows = BACKWARD[c.layout]
    if variant != "auto":
        # a named variant: the last row of each of its kernels (the row without a preference)
        rows = list({r[0]: r for r in rows if r[0] in _VARIANTS[variant]}.values())
    for name, fits, _ in rows:
        cfg = fits(c)
        if cfg:
            return name, cfg
    raise ValueError(f"the {variant} kernel does not fit layout={c.layout}, D={c.D}, N={c.N}, "
                     f"block_len={c.block_len}, dtypes {c.ku}/{c.kd} with these arrays")


def _launch_args(a, u, dy, du, da, layout, block_len, hops, carry, dcarry, variant,
                 blocks_per_chunk, threads, lanes):  # fmt: skip
    """(kernel, grid, block, args, dynamic shared memory bytes) of the backward launch, or None
    when there is nothing to run (dcarry is zeroed here for N = 0)."""
    B, N, H, D, per_head = _dims(u, a, layout)
    nb = -(-N // block_len)
    has_dcarry = dcarry is not None
    if B * H * D == 0:
        return None
    if nb == 0:
        if has_dcarry:
            dcarry[...] = 0
        return None
    ku, kd = _kind(u), _kind(dy)
    c = Case(layout, per_head, ku, kd, int(hops), block_len, N, H, D,
             tuple(_address(x) for x in (a, u, dy, du, da)))
    name, cfg = choose(c, variant)
    # absent optional arrays are replaced by carry: the kernels never touch them then
    dc = _flat(dcarry, "f32") if has_dcarry else _flat(carry, "f32")
    flag = np.int64(1 if has_dcarry else 0)
    common = (a, u, dy, du, da, carry, dc, flag, B, N, H, D, nb, per_head, ku, kd, block_len,
              int(hops))
    if name == "row_scan":
        return _row_scan_args(*common, cfg)
    if name == "rows":
        return _rows_args(*common, cfg)
    if name in ("staged", "channel"):
        return _channel_args(*common, cfg, name == "staged")
    if name == "walk":
        return _walk_args(*common, cfg, blocks_per_chunk, threads, lanes, layout)
    mode = MODE_HOPS1 if hops == 1 else MODE_HOPS0
    kernel = _general_kernel(ku, kd, layout, per_head, block_len, mode)
    dummy = _flat(carry, "f32")
    return _general_args(kernel, a, u, dy, du, da, _flat(carry, "f32"), dc, dummy, dummy, dummy,
                         B, N, H, D, nb, flag, per_head, ku, kd)


def _walk_args(a, u, dy, du, da, carry, dc, flag, B, N, H, D, nb, per_head, ku, kd, block_len,
               hops, plan, blocks_per_chunk, threads, lanes, layout):  # fmt: skip
    """(kernel, grid, block, args, 0) of the lane-walk kernel (``lanes``: a tuning override)."""
    E = max(ELEMS_PER_WORD[ku], ELEMS_PER_WORD[kd])
    if lanes is not None:
        fits = (lanes & (lanes - 1) == 0 and block_len % lanes == 0 and lanes * plan[1] <= 32
                and (layout == "BLHD" or (block_len // lanes) % E == 0))
        if not fits:
            raise ValueError(f"lanes={lanes} does not fit block_len={block_len} here")
        plan = (lanes, plan[1])
    lanes, uph = plan
    kernel = _walk_kernel(ku, kd, layout, per_head, block_len, lanes, hops, uph, threads)
    # blocks each lane group walks, per layout
    K = (32 if layout == "BHDL" else 8) if blocks_per_chunk is None else int(blocks_per_chunk)
    units = H * D // (E if layout == "BLHD" else 1)
    upc = threads // lanes
    grid = (-(-units // upc)) * (-(-nb // K)) * B
    a_arg = _flat(a, ku) if (per_head and layout == "BLHD") else _words(a, ku)
    da_arg = _flat(da, ku) if per_head else _words(da, ku)
    args = (a_arg, _words(u, ku), _words(dy, kd), _words(du, ku), da_arg,
            _flat(carry, "f32"), dc, np.int64(N), np.int64(H), np.int64(D), np.int64(nb),
            np.int64(K), flag)
    return kernel, grid, threads, args, 0


def _channel_args(a, u, dy, du, da, carry, dc, flag, B, N, H, D, nb, per_head, ku, kd,
                  block_len, hops, cfg, staged):  # fmt: skip
    """(kernel, grid, block, args, shared bytes) of the BLHD channel kernel or its staged twin
    (``cfg``: ``(vec, lph)``, staged ``(vec, lph, threads, shared bytes)``)."""
    vec, lph = cfg[:2]
    unroll = TUNING["channel_unroll"]
    # the simulator has no warp shuffles: there a thread block is one head's lanes
    sim_tpb = lph if per_head else 32
    shared = 0
    if staged:
        tpb, shared = cfg[2:]
        kernel = staged_kernel(ku, kd, hops, vec, block_len, min(TUNING["staged_unroll"],
                                                                  block_len))
        steps = TUNING["staged_chunk_steps"]
    else:
        full = N % block_len == 0 and block_len % unroll == 0
        kernel = channel_kernel(ku, kd, per_head, hops, vec, unroll, full)
        tpb = sim_tpb if SIMULATOR else TUNING["channel_threads_per_block"]
        steps = TUNING["channel_chunk_steps"]
    groups = H * D // vec
    chunk_blocks = max(1, min(nb, steps // block_len))
    nchunks = -(-nb // chunk_blocks)
    nwork = B * nchunks * groups
    i64 = np.int64
    args = (_flat(a, ku), _flat(u, ku), _flat(dy, kd), _flat(du, ku), _flat(da, ku),
            _flat(carry, "f32"), dc, i64(N), i64(H * D), i64(D), i64(nb), i64(block_len),
            i64(chunk_blocks), i64(groups), i64(nchunks), i64(nwork), i64(lph), flag)
    return kernel, -(-nwork // tpb), tpb, args, shared


def _rows_args(a, u, dy, du, da, carry, dc, flag, B, N, H, D, nb, per_head, ku, kd, block_len,
               hops, cfg):  # fmt: skip
    """(kernel, grid, block, args, 0) of the BHDL row kernel (``cfg``: ``rows_config``'s)."""
    C = H * D
    chunk_blocks = max(1, min(nb, TUNING["rows_chunk_steps"] // block_len))
    depth, _, lph = cfg
    kernel = rows_kernel(ku, kd, per_head, hops, depth, lph)
    # (the simulator has no warp shuffles: there a thread block is one head's lanes)
    tpb = (lph if per_head else 32) if SIMULATOR else TUNING["rows_threads_per_block"]
    nchunks = -(-nb // chunk_blocks)
    nwork = B * nchunks * C
    i64 = np.int64
    args = (_flat(a, ku), _flat(u, ku), _flat(dy, kd), _flat(du, ku), _flat(da, ku),
            _flat(carry, "f32"), dc, i64(N), i64(C), i64(D), i64(nb), i64(block_len),
            i64(chunk_blocks), i64(C), i64(nchunks), i64(nwork), i64(lph), flag)
    return kernel, -(-nwork // tpb), tpb, args, 0


def _row_scan_args(a, u, dy, du, da, carry, dc, flag, B, N, H, D, nb, per_head, ku, kd,
                   block_len, hops, vec):  # fmt: skip
    """(kernel, grid, block, args, 0) of the BHDL row scan (``vec``: row_scan_config's)."""
    warps = 1 if SIMULATOR else TUNING["row_scan_warps"]  # the simulator: a block is one warp
    kernel = row_scan_kernel(ku, kd, hops, vec, block_len, D, warps,
                             TUNING["row_scan_depth"], TUNING["row_scan_stages"],
                             0 if SIMULATOR else TUNING["row_scan_min_blocks"])
    groups = B * H
    per_iter = 32 * vec // block_len - 1  # blocks an iteration writes
    sms = 1 if isinstance(u, np.ndarray) else sm_count()  # NumPy: the simulator, or recorded
    target = sms * TUNING["row_scan_threads_per_sm"] // 32
    want = max(1, -(-target // groups))
    chunk_blocks = max(TUNING["row_scan_min_iters"] * per_iter, -(-nb // want))
    chunk_blocks = -(-chunk_blocks // per_iter) * per_iter
    chunk_blocks = min(TUNING["row_scan_chunk_blocks"] or chunk_blocks, nb)
    nchunks = -(-nb // chunk_blocks)
    nwork = groups * nchunks
    i64 = np.int64
    args = (_flat(a, ku), _flat(u, ku), _flat(dy, kd), _flat(du, ku), _flat(da, ku),
            _flat(carry, "f32"), dc, i64(N), i64(H * D), i64(D), i64(nb), i64(block_len),
            i64(chunk_blocks), i64(groups), i64(nchunks), i64(nwork), i64(D), flag)
    return kernel, -(-nwork // warps), 32 * warps, args, 0


def _general_args(kernel, a, u, dy, du, da, carry, dcarry, S, dv, dC, B, N, H, D, nb, flag,
                  per_head, ku, kd, threads=128):  # fmt: skip
    groups = H if per_head else H * D
    total = B * groups * nb
    grid = -(-total // threads)
    args = (_flat(a, ku), _flat(u, ku), _flat(dy, kd), _flat(du, ku), _flat(da, ku), carry,
            dcarry, S, dv, dC, np.int64(B), np.int64(N), np.int64(H), np.int64(D),
            np.int64(nb), flag)
    return kernel, grid, threads, args, 0


def block_grad_sums(a, dy, q, *, layout, block_len, stream=None):
    """q[b, h, d, j] = sum over block j of g_t dy_t (offset 0); q ``(B, H, D, nb)`` float32."""
    B, N, H, D, per_head = _dims(dy, a, layout)
    nb = -(-N // block_len)
    total = B * H * D * nb
    if total == 0:
        return
    ka, kd = _kind(a), _kind(dy)
    kernel = _grad_sums_kernel(ka, kd, layout, per_head, block_len)
    threads = 128
    args = (_flat(a, ka), _flat(dy, kd), _flat(q, "f32"), np.int64(B), np.int64(N), np.int64(H),
            np.int64(D), np.int64(nb))
    launch(kernel, -(-total // threads), threads, args, stream)


def swr_backward_blocks(a, u, dy, du, da, *, layout, block_len, block_carry, block_dv, block_dC,
                        stream=None):
    """Local backward of every block given its incoming carry ``S_{j-1}`` (``block_carry``) and
    the adjoints ``dv_j``, ``dC_j`` of its carrier and compound attenuation (all
    ``(B, H, D, nb)`` float32, offset 0): the general-hops and hops=None backward.
    Shapes as in :func:`swr_backward`.
    """
    B, N, H, D, per_head = _dims(u, a, layout)
    nb = -(-N // block_len)
    if B * H * D * nb == 0:
        return
    ku, kd = _kind(u), _kind(dy)
    kernel = _general_kernel(ku, kd, layout, per_head, block_len, MODE_BLOCKS)
    dummy = _flat(block_carry, "f32")  # stands in for carry / dcarry, never touched
    kernel, grid, block, args, _ = _general_args(
        kernel, a, u, dy, du, da, dummy, dummy, _flat(block_carry, "f32"), _flat(block_dv, "f32"),
        _flat(block_dC, "f32"), B, N, H, D, nb, np.int64(0), per_head, ku, kd)
    launch(kernel, grid, block, args, stream)
