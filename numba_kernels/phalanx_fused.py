"""Fused Phalanx kernels: everything between the layer's two GEMMs in one pass.

The input GEMM produces ``z = x W_in`` as a 2-D ``(B*L, W)`` array (rows are tokens, channel
contiguous: the "BLHD" order), columns ``[V (H*D) | Bg (KV*D) | C (KV*D) | A (H)]``. These kernels
read it as it is, with no transposes:

- ``phalanx_mix_forward``: ``Y = swr(A, sigmoid(Bg) * V, hops) * C + V`` with
  ``A = decay_max * sigmoid(z_a + b_a)`` per head, biases added in registers, hops 0 or 1, any
  block length up to ``LMAX``, optionally continuing a state and writing the state after the last
  token.
- ``phalanx_mix_backward``: recomputes the gates and the recurrence and writes ``dz`` (the
  gradient of the GEMM output), ``Y`` (needed for the output GEMM's weight gradient) and
  partial sums of the bias gradients (one row per chunk of blocks), so the layer's backward is
  four GEMMs, this kernel and one small reduction. ``phalanx_mix_backward_rows*`` (TUNING
  ``bwd_kernel="rows"``) compute the same with one thread per block.

One-token decoding is ``numba_kernels/swr_step.py`` (the state updated in place).

Work split (forward and backward): one thread owns ``VEC`` adjacent channels of one head (up to
16 bytes of each array per access) over a chunk of consecutive blocks of one batch row; a row's
threads are consecutive, so a warp reads contiguous bytes of one token row at each step. The
forward walks its chunk in time order (with hops=1 after re-walking the block before it for the
first carrier); the backward walks its chunk's blocks from the last to the first (see
``_make_backward``). Loads of a few steps are issued together before their arithmetic, so that
many are in flight per thread. Launch knobs live in ``TUNING`` (scripts/phalanx_dev.py sweeps
them).

Backward math per channel (hops=1, S = carrier of the previous block, ds = dY * C):
    lam_t = ds_t + a_{t+1} lam_{t+1},  lam_end = ds_end + q_{j+1}     (du = lam)
    z_t   = ds_t + a_{t+1} z_{t+1},    z_end = ds_end,   q_j = a_first z_first
    a_t da_t = (a_t w_{t-1}) lam_t + g_t S z_t
and with A = decay_max * sigmoid(z_a), dz_a = da * A * (1 - sigmoid) = (a_t da_t) (1 - sigmoid):
no division by a_t. The per-head sum of a_t da_t over the head's lanes goes through warp
shuffles (in the simulator, which has none, a thread block is one head's lanes).

bfloat16 arrays arrive as uint16 views.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import cuda, types

from ._dtypes import (
    ITEM_SIZE,
    LOAD,
    SIMULATOR,
    STORE,
    storage_kind,
    storage_view,
)
from ._launch import launch as _launch
from ._ptx import (
    STORAGE_TYPE,
    _array_op,
    _element_address,
    async_commit,
    head_sum,
    make_async_copy,
    make_async_wait,
    make_shared_load,
    make_vector_load,
    make_vector_store,
    scalar_load_loop,
    scalar_store_loop,
    shfl_idx,
)

__all__ = [
    "LMAX",
    "phalanx_forward",
    "phalanx_backward",
    "forward_kernel",
    "backward_kernel",
    "forward_config",
    "backward_config",
    "kernel_signatures",
]

LMAX = 64
"""Largest block_len the fused kernels take (the backward's checkpoint buffers are sized by it)."""

F0 = np.float32(0.0)
F1 = np.float32(1.0)
f32 = numba.float32
u64 = numba.uint64  # per-step element indices: unsigned, so Numba emits no wraparound code


@cuda.jit(device=True, inline=True)
def _sigmoid(x):
    return F1 / (F1 + math.exp(-x))


if SIMULATOR:
    _sigmoid_fast = _sigmoid
else:

    @cuda.jit(device=True, inline=True)
    def _sigmoid_fast(x):
        """sigmoid with libdevice's approximate exp and division (a few ulp off _sigmoid)."""
        return cuda.libdevice.fast_fdividef(F1, F1 + cuda.libdevice.fast_expf(-x))


def _make_prefetch():
    """``prefetch(array, index, unused, 0)``: ask for the line holding ``array[index]`` in L2
    (``prefetch.global.L2``: no register, nothing waits on it). Does nothing in the simulator."""
    if SIMULATOR:

        @cuda.jit(device=True, inline=True)
        def nothing(array, index, unused, j):
            pass

        return nothing

    def body(context, builder, sig, args):
        address = _element_address(context, builder, sig.args[0], args[0], args[1])
        fn = ir.FunctionType(ir.VoidType(), [ir.IntType(64)])
        builder.asm(fn, "prefetch.global.L2 [$0];", "l", [address], True)

    return _array_op(body)


_prefetch = _make_prefetch()


# ----------------------------------------------------------------------------------------------
# Forward: one thread per (batch, VEC adjacent channels of one head, chunk of blocks)
# ----------------------------------------------------------------------------------------------


def _make_forward(kind: str, vec: int, unroll: int, bounds=None, fast=False, ahead=0):
    """The forward walk: a thread walks ``chunk_blocks`` consecutive blocks of its channels (and,
    with hops=1, the block before them first, storing nothing, for the chunk's first carrier).
    Each batch of ``unroll`` steps issues all its loads (VEC-wide, one access each) before any
    arithmetic, so they are in flight together; steps past the chunk's end load its last step
    again and are skipped. ``ahead`` > 0: before a batch's arithmetic, the thread also asks L2
    for its rows ``ahead`` batches later (``prefetch.global.L2``), so more of the walk's reads
    are on their way without holding registers."""
    load = LOAD[kind]
    prefetch = _prefetch
    AHEAD = ahead * unroll
    load_v = make_vector_load(kind, vec)
    store_v = make_vector_store(kind, vec)
    sigmoid = _sigmoid_fast if fast else _sigmoid
    VEC, U = vec, unroll
    UV = unroll * vec  # local array sizes must be constants

    def phalanx_mix_forward(z, b_a, b_b, b_c, y, w0, g0, cv0, cC0, w_out, g_out, cv_out, cC_out,
                            L, H, D, G, decay_max, offset, block_len, hops, nvec, nb,
                            chunk_blocks, nchunks, total, has_carry, write_state):
        tid = numba.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        if tid >= total:
            return
        rest = tid // nvec
        c0 = (tid - rest * nvec) * VEC
        b = rest // nchunks
        jj0 = (rest - b * nchunks) * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        h = c0 // D
        d0 = c0 - h * D
        HD = H * D
        KD = (H // G) * D
        W = HD + 2 * KD + H
        kc0 = (h // G) * D + d0
        col_b = HD + kc0
        col_c = col_b + KD
        col_a = HD + 2 * KD + h
        lb = block_len
        t_lo = max(jj0 * lb - offset, 0)  # first step whose y this thread writes
        t_hi = min(jj1 * lb - offset, L)
        if hops == 1 and jj0 > 0:
            t_walk = max((jj0 - 1) * lb - offset, 0)
            first = jj0 == 1
        else:
            t_walk = t_lo
            first = jj0 == 0
        resume = first and offset > 0  # the first walked block was begun by an earlier call
        carried = hops == 1 and jj0 == 0 and has_carry != 0
        st = b * HD + c0  # flat (b, h, d0) of the (B, H, D) state arrays
        ba = load(b_a[h])
        bb = cuda.local.array(VEC, f32)
        bc = cuda.local.array(VEC, f32)
        w = cuda.local.array(VEC, f32)
        g = cuda.local.array(VEC, f32)
        S = cuda.local.array(VEC, f32)
        Cp = cuda.local.array(VEC, f32)
        out = cuda.local.array(VEC, f32)
        za = cuda.local.array(U, f32)
        zb = cuda.local.array(UV, f32)
        zc = cuda.local.array(UV, f32)
        zv = cuda.local.array(UV, f32)
        for k in range(VEC):
            bb[k] = load(b_b[kc0 + k])
            bc[k] = load(b_c[kc0 + k])
            w[k] = w0[st + k] if resume else F0
            g[k] = g0[st + k] if resume else F1
            S[k] = cv0[st + k] if carried else F0
            Cp[k] = cC0[st + k] if carried else F0
        pos = (t_walk + offset) % lb
        for t0 in range(t_walk, t_hi, U):
            for i in range(U):
                m = (b * L + min(t0 + i, t_hi - 1)) * W
                za[i] = load(z[u64(m + col_a)])
                load_v(z, m + col_b, zb, i * VEC)
                load_v(z, m + col_c, zc, i * VEC)
                load_v(z, m + c0, zv, i * VEC)
            if AHEAD > 0:
                for i in range(U):
                    tp = t0 + AHEAD + i
                    if tp < t_hi:
                        mp = (b * L + tp) * W
                        prefetch(z, mp + col_b, zb, 0)
                        prefetch(z, mp + col_c, zb, 0)
                        prefetch(z, mp + c0, zb, 0)
            for i in range(U):
                t = t0 + i
                if t < t_hi:
                    if pos == 0 and t > t_walk:  # a block starts: the previous one is the carrier
                        for k in range(VEC):
                            if hops == 1:
                                S[k] = w[k]
                                Cp[k] = g[k]
                            w[k] = F0
                            g[k] = F1
                    a = decay_max * sigmoid(za[i] + ba)
                    for k in range(VEC):
                        v = zv[i * VEC + k]
                        w[k] = a * w[k] + sigmoid(zb[i * VEC + k] + bb[k]) * v
                        g[k] = a * g[k]
                        out[k] = (w[k] + g[k] * S[k]) * (zc[i * VEC + k] + bc[k]) + v
                    if t >= t_lo:
                        store_v(y, (b * L + t) * HD + c0, out, 0)
                    pos += 1
                    if pos == lb:
                        pos = 0
        if write_state != 0 and jj1 == nb:
            if (offset + L) % lb == 0:  # the last block is complete: it becomes the newest carrier
                for k in range(VEC):
                    w_out[st + k] = F0
                    g_out[st + k] = F1
                    if hops == 1:
                        cv_out[st + k] = w[k]
                        cC_out[st + k] = g[k]
            else:
                for k in range(VEC):
                    w_out[st + k] = w[k]
                    g_out[st + k] = g[k]
                    if hops == 1:
                        cv_out[st + k] = S[k]
                        cC_out[st + k] = Cp[k]

    phalanx_mix_forward.__name__ = phalanx_mix_forward.__qualname__ = (
        f"phalanx_mix_forward_{kind}_vec{vec}_unroll{unroll}{_bounds_suffix(bounds)}"
        f"{'_fastsig' if fast else ''}{f'_ahead{ahead}' if ahead else ''}")
    return _jit(phalanx_mix_forward, bounds)


# ----------------------------------------------------------------------------------------------
# Backward: one thread per (batch, VEC adjacent channels of one head, chunk of blocks), walking
# the chunk's blocks from the last to the first
# ----------------------------------------------------------------------------------------------

BUF = 128
"""block_len * VEC <= BUF in the backward (bounds its registers and checkpoints)."""

def _accessors(kind: str, vec: int, vector: bool):
    if vector:
        return make_vector_load(kind, vec), make_vector_store(kind, vec)
    return scalar_load_loop(kind, vec), scalar_store_loop(kind, vec)


def _make_backward(kind: str, vec: int, vector: bool, unroll: int, bounds=None,
                   fast=False):
    """The backward walk.

    Block j's reverse sweep needs its forward states (a_t w_{t-1}, g_t), the carrier S_j (the
    previous block's last state) and q_{j+1} (the next block's sum of g_t dS_t). Walking the
    chunk's blocks backwards, one forward walk of block j-1 gives S_j and checkpoints of block
    j-1's state before each group of ``unroll`` steps (kept in the other half of a two-block
    buffer); block j's reverse sweep takes its groups last to first, recomputes each group's
    forward states from its checkpoint into registers (from the loads it needs anyway) and ends
    with q_j = a_first z_first for block j-1. The chunk reads one block beyond each end: the one
    before it (hops=1: the first carrier) and the one after it (q). A group's loads are issued
    together, VEC elements per access. The head's sum of a_t da_t over its lanes goes through
    warp shuffles (lph lanes per head, a power of two up to 32).
    """
    load = LOAD[kind]
    store = STORE[kind]
    load_v, store_v = _accessors(kind, vec, vector)
    sigmoid = _sigmoid_fast if fast else _sigmoid
    VEC, U = vec, unroll
    UV = unroll * vec
    NG = -(-LMAX // unroll)  # groups per block, at most
    CKW = 2 * NG * vec  # checkpoints of w, two blocks
    CKG = 2 * NG  # checkpoints of g

    @cuda.jit(device=True, inline=True)
    def walk(z, m0, n, W, col_a, col_b, c0, ba, bb, decay_max, ckw, ckg, half, w, za, zb, zv):
        """Forward through one block of n steps from flat row m0, checkpointing (w, g) before
        each group of U steps into buffer half ``half``; w ends as the block's last state."""
        for k in range(VEC):
            w[k] = F0
        gh = F1
        gi = half * NG
        for t0 in range(0, n, U):
            for k in range(VEC):
                ckw[gi * VEC + k] = w[k]
            ckg[gi] = gh
            gi += 1
            for i in range(U):
                m = (m0 + min(t0 + i, n - 1)) * W
                za[i] = load(z[u64(m + col_a)])
                load_v(z, m + col_b, zb, i * VEC)
                load_v(z, m + c0, zv, i * VEC)
            for i in range(U):
                if t0 + i < n:
                    a = decay_max * sigmoid(za[i] + ba)
                    for k in range(VEC):
                        w[k] = a * w[k] + sigmoid(zb[i * VEC + k] + bb[k]) * zv[i * VEC + k]
                    gh = a * gh

    def phalanx_mix_backward(z, dy, b_a, b_b, b_c, dz, y, dbias, acc_b, acc_c,
                             L, H, D, G, decay_max, block_len, hops, nvec, nb, chunk_blocks,
                             nchunks, total, lph):
        tid = numba.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        if tid >= total:
            return
        rest = tid // nvec
        c0 = (tid - rest * nvec) * VEC
        b = rest // nchunks
        jj0 = (rest - b * nchunks) * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        h = c0 // D
        d0 = c0 - h * D
        HD = H * D
        KD = (H // G) * D
        W = HD + 2 * KD + H
        NBW = 2 * KD + H  # dbias row width
        kc0 = (h // G) * D + d0
        col_b = HD + kc0
        col_c = col_b + KD
        col_a = HD + 2 * KD + h
        lb = block_len
        lead = d0 == 0  # the head's first lane writes its dz_a
        lane = numba.int64(cuda.threadIdx.x) % 32
        mask = numba.uint32(((numba.int64(1) << lph) - 1) << (lane - lane % lph))
        ba = load(b_a[h])
        bb = cuda.local.array(VEC, f32)
        bc = cuda.local.array(VEC, f32)
        q = cuda.local.array(VEC, f32)
        S = cuda.local.array(VEC, f32)
        w = cuda.local.array(VEC, f32)
        lam = cuda.local.array(VEC, f32)
        zzv = cuda.local.array(VEC, f32)
        pb = cuda.local.array(VEC, f32)
        pc = cuda.local.array(VEC, f32)
        ov = cuda.local.array(VEC, f32)
        ob = cuda.local.array(VEC, f32)
        oc = cuda.local.array(VEC, f32)
        oy = cuda.local.array(VEC, f32)
        za = cuda.local.array(U, f32)
        sgs = cuda.local.array(U, f32)  # sigmoid(z_a + b_a) of the group's steps
        ghs = cuda.local.array(U, f32)  # g_t
        zb = cuda.local.array(UV, f32)
        zc = cuda.local.array(UV, f32)
        zv = cuda.local.array(UV, f32)
        zd = cuda.local.array(UV, f32)
        bgs = cuda.local.array(UV, f32)  # sigmoid(Bg + b_b)
        aws = cuda.local.array(UV, f32)  # a_t w_{t-1}
        ckw = cuda.local.array(CKW, f32)
        ckg = cuda.local.array(CKG, f32)
        for k in range(VEC):
            bb[k] = load(b_b[kc0 + k])
            bc[k] = load(b_c[kc0 + k])
            q[k] = F0
        # q of the block after the chunk
        if hops == 1 and jj1 < nb:
            lo = jj1 * lb
            n = min(lb, L - lo)
            gq = F1
            for t0 in range(0, n, U):
                for i in range(U):
                    m = b * L + lo + min(t0 + i, n - 1)
                    za[i] = load(z[u64(m * W + col_a)])
                    load_v(z, m * W + col_c, zc, i * VEC)
                    load_v(dy, m * HD + c0, zd, i * VEC)
                for i in range(U):
                    if t0 + i < n:
                        gq *= decay_max * sigmoid(za[i] + ba)
                        for k in range(VEC):
                            q[k] += gq * zd[i * VEC + k] * (zc[i * VEC + k] + bc[k])
        # the chunk's bias sums (one row of dbias per chunk)
        for k in range(VEC):
            pb[k] = F0
            pc[k] = F0
        pah = F0
        # checkpoints of the chunk's last block
        half = 0
        j = jj1 - 1
        walk(z, b * L + j * lb, min(lb, L - j * lb), W, col_a, col_b, c0, ba, bb, decay_max,
             ckw, ckg, half, w, za, zb, zv)
        while j >= jj0:
            lo = j * lb
            n = min(lb, L - lo)
            for k in range(VEC):
                S[k] = F0
            if j > 0 and (hops == 1 or j > jj0):
                # block j-1: its checkpoints (next iteration) and its last state, S_j
                walk(z, b * L + lo - lb, lb, W, col_a, col_b, c0, ba, bb, decay_max, ckw, ckg,
                     1 - half, w, za, zb, zv)
                if hops == 1:
                    for k in range(VEC):
                        S[k] = w[k]
            # reverse sweep of block j, a group of U steps at a time
            for k in range(VEC):
                lam[k] = q[k]
                zzv[k] = F0
            a_next = F1
            ng = -(-n // U)
            for gg in range(ng):
                gi = ng - 1 - gg
                t0 = gi * U
                cnt = min(U, n - t0)
                for i in range(U):
                    m = b * L + lo + t0 + min(i, cnt - 1)
                    za[i] = load(z[u64(m * W + col_a)])
                    load_v(z, m * W + col_b, zb, i * VEC)
                    load_v(z, m * W + col_c, zc, i * VEC)
                    load_v(z, m * W + c0, zv, i * VEC)
                    load_v(dy, m * HD + c0, zd, i * VEC)
                # the group's forward states, from its checkpoint
                ck = half * NG + gi
                for k in range(VEC):
                    w[k] = ckw[ck * VEC + k]
                gh = ckg[ck]
                for i in range(U):
                    if i < cnt:
                        sg = sigmoid(za[i] + ba)
                        sgs[i] = sg
                        a = decay_max * sg
                        for k in range(VEC):
                            bgv = sigmoid(zb[i * VEC + k] + bb[k])
                            bgs[i * VEC + k] = bgv
                            awk = a * w[k]
                            aws[i * VEC + k] = awk
                            w[k] = awk + bgv * zv[i * VEC + k]
                        gh = a * gh
                        ghs[i] = gh
                for ii in range(U):
                    i = U - 1 - ii
                    if i < cnt:
                        m = b * L + lo + t0 + i
                        pa = F0
                        for k in range(VEC):
                            bg = bgs[i * VEC + k]
                            v = zv[i * VEC + k]
                            c = zc[i * VEC + k] + bc[k]
                            dyv = zd[i * VEC + k]
                            ds = dyv * c
                            lam[k] = ds + a_next * lam[k]
                            zzv[k] = ds + a_next * zzv[k]
                            awk = aws[i * VEC + k]
                            ghs_k = ghs[i] * S[k]
                            sv = awk + bg * v + ghs_k
                            ov[k] = dyv + lam[k] * bg
                            ob[k] = lam[k] * v * bg * (F1 - bg)
                            oc[k] = dyv * sv
                            oy[k] = sv * c + v
                            pa += awk * lam[k] + ghs_k * zzv[k]
                            pb[k] += ob[k]
                            pc[k] += oc[k]
                        store_v(dz, m * W + c0, ov, 0)
                        store_v(y, m * HD + c0, oy, 0)
                        if G == 1:
                            store_v(dz, m * W + col_b, ob, 0)
                            store_v(dz, m * W + col_c, oc, 0)
                        else:  # heads of one kv group share these columns
                            for k in range(VEC):
                                cuda.atomic.add(acc_b, m * KD + kc0 + k, ob[k])
                                cuda.atomic.add(acc_c, m * KD + kc0 + k, oc[k])
                        sg = sgs[i]
                        pa = head_sum(pa * (F1 - sg), lph, mask)
                        if lead:
                            dz[u64(m * W + col_a)] = store(pa)
                        pah += pa
                        a_next = decay_max * sg
            for k in range(VEC):
                q[k] = a_next * zzv[k] if hops == 1 else F0  # q_j, for block j-1
            half = 1 - half
            j -= 1
        row = rest * NBW  # (batch, chunk)
        for k in range(VEC):
            if G == 1:
                dbias[row + kc0 + k] = pb[k]
                dbias[row + KD + kc0 + k] = pc[k]
            else:
                cuda.atomic.add(dbias, row + kc0 + k, pb[k])
                cuda.atomic.add(dbias, row + KD + kc0 + k, pc[k])
        if lead:
            dbias[row + 2 * KD + h] = pah

    phalanx_mix_backward.__name__ = phalanx_mix_backward.__qualname__ = (
        f"phalanx_mix_backward_{kind}_vec{vec}_{'vector' if vector else 'scalar'}_unroll{unroll}"
        f"{_bounds_suffix(bounds)}{'_fastsig' if fast else ''}")
    return _jit(phalanx_mix_backward, bounds)


# ----------------------------------------------------------------------------------------------
# Backward, block rows: one thread per (batch, one 32-bit word of channels, ONE block); a thread
# block holds consecutive blocks of the same channels, one row of threads each, and passes the
# carriers between them through shared memory
# ----------------------------------------------------------------------------------------------

ROWS_LMAX = 16
"""Largest block_len of the block-row backward (a thread keeps its block's inputs in registers)."""

if SIMULATOR:  # no warp shuffles there: sum the head's lanes through the block-wide exchange

    def _sim_lane_head_sum(x, lph, mask):
        lane = cuda.threadIdx.x % 32
        base = lane - lane % lph
        total = F0
        for k in range(lph):
            total += shfl_idx(x, base + k)
        return total

    _lane_head_sum = cuda.jit(device=True)(_sim_lane_head_sum)
else:
    _lane_head_sum = head_sum


def rows_vec(kind: str) -> int:
    """Channels a thread of the block-row backward owns: one 32-bit word of them."""
    return 4 // ITEM_SIZE[kind]


def _make_bias_sums(vec: int, rows: int):
    """``bias_sums(...)``: the block-row kernels' last step. Each row's thread has its block's
    sums of the Bg and C gradients (``pb``, ``pc``, per channel) and of the decay logit's
    (``pah``, on the head's first lane); the thread block adds its ``rows`` blocks' sums in
    shared memory and row 1 writes them as one row ``orow`` of dbias (kv groups: float32 atomics,
    heads of a group share the columns). A barrier first: the exchange arrays are reused."""
    VEC = vec

    @cuda.jit(device=True, inline=True)
    def bias_sums(sh_w, sh_q, sh_a, dbias, pb, pc, pah, own, lead, row, r, R, ci, nvec, orow,
                  kc0, KD, h, G):
        cuda.syncthreads()
        base = (row * R + r) * VEC
        for k in range(VEC):
            sh_w[base + k] = pb[k] if own else F0
            sh_q[base + k] = pc[k] if own else F0
        sh_a[row * R + r] = pah if own else F0
        cuda.syncthreads()
        if row == 1 and ci < nvec:
            ta = F0
            for k in range(VEC):
                tb = F0
                tc = F0
                for rr in range(1, rows + 1):
                    tb += sh_w[(rr * R + r) * VEC + k]
                    tc += sh_q[(rr * R + r) * VEC + k]
                if G == 1:
                    dbias[orow + kc0 + k] = tb
                    dbias[orow + KD + kc0 + k] = tc
                else:
                    cuda.atomic.add(dbias, orow + kc0 + k, tb)
                    cuda.atomic.add(dbias, orow + KD + kc0 + k, tc)
            if lead:
                for rr in range(1, rows + 1):
                    ta += sh_a[rr * R + r]
                dbias[orow + 2 * KD + h] = ta

    return bias_sums


ROWS_GROUP = 4
"""Steps the block-row backward reverses at a time (from a checkpoint of w and g)."""


def rows_stage_bytes(kind: str, block_len: int, threads: int) -> int:
    """Dynamic shared memory of the block-row backward: V, Bg, C and dY of every thread's
    block, one 32-bit word a step and array."""
    return 4 * block_len * threads * 4


def _make_backward_rows(kind: str, rows: int, bounds=None, fast=False):
    """The block-row backward (hops 0 and 1, block_len <= ROWS_LMAX).

    With hops=1 block j's backward needs only two numbers per channel from outside the block:
    S_j, the last state of block j-1 started from zero (its carrier), and q_{j+1} = sum_t g_t
    ds_t over block j+1. Both depend on one neighbouring block alone, so every block is its own
    thread's work. A thread block has ``rows + 2`` rows of R threads (R <= 32 channel words of
    one batch row, a 32-bit word of channels each): rows 1..rows take consecutive blocks, row 0
    the block before them (it loads V, Bg, A and computes only its last state) and row rows+1
    the block after them (A, C, dY: only its q); those two halo blocks are interior blocks of
    the neighbouring thread blocks, so their second read mostly hits L2.

    A thread starts ``cp.async`` copies of its block's V, Bg, C and dY words into dynamic
    shared memory (``rows_stage_bytes``: word (step, array, thread), so a warp's accesses are
    consecutive words), all in flight at once without holding registers; only the decay logits
    go to registers. Pass 1 walks the block forward from shared memory, keeping w and g at
    the start of each group of ``ROWS_GROUP`` steps, and publishes the block's last state and q
    in shared memory. After one barrier, pass 2 takes S from the row above and q from the row
    below, takes the groups last to first, recomputes each group's a_t w_{t-1}, g_t and
    sigmoid(Bg) from its checkpoint and walks it backwards, writing dz and Y. Each thread reads
    back only the stage words it copied itself; the thread block adds its blocks' bias sums
    (:func:`_make_bias_sums`). Every element of z and dY is read from DRAM once.
    """
    load = LOAD[kind]
    store = STORE[kind]
    VEC = rows_vec(kind)
    LB = ROWS_LMAX
    U = ROWS_GROUP
    NG = -(-LB // U)
    UV = U * VEC
    NGV = NG * VEC
    ROWS = rows + 2
    SH = ROWS * 32 * VEC
    SA = ROWS * 32
    bias_sums = _make_bias_sums(VEC, rows)
    ST = STORAGE_TYPE[kind]
    copy = make_async_copy(kind, VEC)
    wait_all = make_async_wait(0)
    sload = make_shared_load(kind, VEC)
    store_v = make_vector_store(kind, VEC)
    sigmoid = _sigmoid_fast if fast else _sigmoid
    lane_sum = _lane_head_sum

    def phalanx_mix_backward_rows(z, dy, b_a, b_b, b_c, dz, y, dbias, acc_b, acc_c,
                                         L, H, D, G, decay_max, block_len, hops, nvec, nb,
                                         nruns, ncg, R, lph):
        sh_w = cuda.shared.array(SH, f32)
        sh_q = cuda.shared.array(SH, f32)
        sh_a = cuda.shared.array(SA, f32)
        stage = cuda.shared.array(0, ST)
        x = numba.int64(cuda.threadIdx.x)
        T = numba.int64(cuda.blockDim.x)
        row = x // R
        r = x - row * R
        cta = numba.int64(cuda.blockIdx.x)
        rest = cta // ncg
        ci = (cta - rest * ncg) * R + r  # this thread's channel word
        b = rest // nruns
        run = rest - b * nruns
        j = run * rows + row - 1  # this row's block
        lb = block_len
        n = numba.int64(0)
        if ci < nvec and j >= 0 and j < nb and (hops == 1 or (row > 0 and row <= rows)):
            n = min(lb, L - j * lb)
        own = row > 0 and row <= rows and n > 0  # writes its block's gradients
        need_vb = n > 0 and row <= rows  # loads V and Bg (the block's last state)
        need_cd = n > 0 and row > 0  # loads C and dY
        c0 = ci * VEC if ci < nvec else numba.int64(0)
        h = c0 // D
        d0 = c0 - h * D
        HD = H * D
        KD = (H // G) * D
        W = HD + 2 * KD + H
        NBW = 2 * KD + H
        kc0 = (h // G) * D + d0
        col_b = HD + kc0
        col_c = col_b + KD
        col_a = HD + 2 * KD + h
        lead = d0 == 0
        lane = x % 32
        mask = numba.uint32(((numba.int64(1) << lph) - 1) << (lane - lane % lph))
        ba = load(b_a[h])
        bb = cuda.local.array(VEC, f32)
        bc = cuda.local.array(VEC, f32)
        w = cuda.local.array(VEC, f32)
        q = cuda.local.array(VEC, f32)
        S = cuda.local.array(VEC, f32)
        lam = cuda.local.array(VEC, f32)
        zzv = cuda.local.array(VEC, f32)
        pb = cuda.local.array(VEC, f32)
        pc = cuda.local.array(VEC, f32)
        ov = cuda.local.array(VEC, f32)
        ob = cuda.local.array(VEC, f32)
        oc = cuda.local.array(VEC, f32)
        oy = cuda.local.array(VEC, f32)
        vv = cuda.local.array(VEC, f32)
        vb = cuda.local.array(VEC, f32)
        vc = cuda.local.array(VEC, f32)
        vd = cuda.local.array(VEC, f32)
        sgs = cuda.local.array(LB, f32)  # z_a, then sigmoid(z_a + b_a)
        ckw = cuda.local.array(NGV, f32)  # w at each group's start
        ckg = cuda.local.array(NG, f32)  # g at each group's start
        bgs = cuda.local.array(UV, f32)  # the group's sigmoid(Bg + b_b)
        aws = cuda.local.array(UV, f32)  # ... a_t w_{t-1}
        ghs = cuda.local.array(U, f32)  # ... g_t
        for k in range(VEC):
            bb[k] = load(b_b[kc0 + k])
            bc[k] = load(b_c[kc0 + k])
            w[k] = F0
            q[k] = F0
        # stage word (step i, array s) of this thread at element ((i * 4 + s) * T + x) * VEC
        m0 = b * L + j * lb
        for i in range(LB):  # every copy of the block in flight together
            if i < n:
                m = m0 + i
                sgs[i] = load(z[u64(m * W + col_a)])
                e = i * 4 * T + x
                if need_vb:
                    copy(z, m * W + c0, stage, e * VEC)
                    copy(z, m * W + col_b, stage, (e + T) * VEC)
                if need_cd:
                    copy(z, m * W + col_c, stage, (e + 2 * T) * VEC)
                    copy(dy, m * HD + c0, stage, (e + 3 * T) * VEC)
        async_commit()
        wait_all()
        gh = F1
        for i in range(LB):
            if i < n:
                if i % U == 0:
                    for k in range(VEC):
                        ckw[(i // U) * VEC + k] = w[k]
                    ckg[i // U] = gh
                sg = sigmoid(sgs[i] + ba)
                sgs[i] = sg
                a = decay_max * sg
                gh = a * gh
                e = i * 4 * T + x
                if need_vb:
                    sload(stage, e * VEC, vv, 0)
                    sload(stage, (e + T) * VEC, vb, 0)
                    for k in range(VEC):
                        w[k] = a * w[k] + sigmoid(vb[k] + bb[k]) * vv[k]
                if need_cd and hops == 1:
                    sload(stage, (e + 2 * T) * VEC, vc, 0)
                    sload(stage, (e + 3 * T) * VEC, vd, 0)
                    for k in range(VEC):
                        q[k] += gh * vd[k] * (vc[k] + bc[k])
        base = (row * R + r) * VEC
        for k in range(VEC):
            sh_w[base + k] = w[k]
            sh_q[base + k] = q[k]
        cuda.syncthreads()
        for k in range(VEC):
            S[k] = sh_w[base - R * VEC + k] if hops == 1 and row > 0 else F0
            lam[k] = sh_q[base + R * VEC + k] if hops == 1 and row < ROWS - 1 else F0
            zzv[k] = F0
            pb[k] = F0
            pc[k] = F0
        pah = F0
        a_next = F1
        for gg in range(NG):  # every thread calls lane_sum LB times (uniform for shuffles)
            gi = NG - 1 - gg
            t0 = gi * U
            cnt = min(U, n - t0) if own else 0
            if cnt > 0:  # the group's forward states from its checkpoint
                for k in range(VEC):
                    w[k] = ckw[gi * VEC + k]
                gh = ckg[gi]
                for i in range(U):
                    if i < cnt:
                        e = (t0 + i) * 4 * T + x
                        sload(stage, e * VEC, vv, 0)
                        sload(stage, (e + T) * VEC, vb, 0)
                        a = decay_max * sgs[t0 + i]
                        gh = a * gh
                        ghs[i] = gh
                        for k in range(VEC):
                            bgv = sigmoid(vb[k] + bb[k])
                            bgs[i * VEC + k] = bgv
                            awk = a * w[k]
                            aws[i * VEC + k] = awk
                            w[k] = awk + bgv * vv[k]
            for ii in range(U):
                i = U - 1 - ii
                t = t0 + i
                m = m0 + t
                pa = F0
                sg = F0
                go = i < cnt
                if go:
                    sg = sgs[t]
                    e = t * 4 * T + x
                    sload(stage, e * VEC, vv, 0)
                    sload(stage, (e + 2 * T) * VEC, vc, 0)
                    sload(stage, (e + 3 * T) * VEC, vd, 0)
                    gi_ = ghs[i]
                    for k in range(VEC):
                        bg = bgs[i * VEC + k]
                        v = vv[k]
                        c = vc[k] + bc[k]
                        dyv = vd[k]
                        ds = dyv * c
                        lam[k] = ds + a_next * lam[k]
                        zzv[k] = ds + a_next * zzv[k]
                        awk = aws[i * VEC + k]
                        ghs_k = gi_ * S[k]
                        sv = awk + bg * v + ghs_k
                        ov[k] = dyv + lam[k] * bg
                        ob[k] = lam[k] * v * bg * (F1 - bg)
                        oc[k] = dyv * sv
                        oy[k] = sv * c + v
                        pa += awk * lam[k] + ghs_k * zzv[k]
                        pb[k] += ob[k]
                        pc[k] += oc[k]
                    store_v(dz, m * W + c0, ov, 0)
                    store_v(y, m * HD + c0, oy, 0)
                    if G == 1:
                        store_v(dz, m * W + col_b, ob, 0)
                        store_v(dz, m * W + col_c, oc, 0)
                    else:  # heads of one kv group share these columns
                        for k in range(VEC):
                            cuda.atomic.add(acc_b, m * KD + kc0 + k, ob[k])
                            cuda.atomic.add(acc_c, m * KD + kc0 + k, oc[k])
                    pa = pa * (F1 - sg)
                pa = lane_sum(pa, lph, mask)
                if go:
                    if lead:
                        dz[u64(m * W + col_a)] = store(pa)
                    pah += pa
                    a_next = decay_max * sg
        bias_sums(sh_w, sh_q, sh_a, dbias, pb, pc, pah, own, lead, row, r, R, ci, nvec,
                  (b * nruns + run) * NBW, kc0, KD, h, G)

    phalanx_mix_backward_rows.__name__ = phalanx_mix_backward_rows.__qualname__ = (
        f"phalanx_mix_backward_rows_{kind}_vec{VEC}_rows{rows}{_bounds_suffix(bounds)}"
        f"{'_fastsig' if fast else ''}")
    return _jit(phalanx_mix_backward_rows, bounds)


# ----------------------------------------------------------------------------------------------
# Specialisations, signatures and launch helpers
# ----------------------------------------------------------------------------------------------

TUNING = {
    # forward: bytes one thread moves per access (16: one 16-byte load), steps whose loads are in
    # flight together, steps per chunk (longer: fewer re-walked blocks, fewer threads)
    "fwd_access_bytes": 16,
    "fwd_unroll": 2,
    "fwd_chunk_steps": 128,
    "fwd_threads_per_block": 256,
    # thread blocks each SM must be able to hold (launch bounds: the compiler keeps the registers
    # per thread at most 65536 / (threads_per_block * min_blocks)); 0: no bound
    "fwd_min_blocks": 0,
    # sigmoids through libdevice's approximate exp and division (a few float32 ulp off; fewer
    # instructions per element): 0 never, 1 always, 2 for 16-bit storage only (where the
    # difference is below the storage's precision)
    "fwd_fast_sigmoid": 2,
    # L2 prefetch of the rows this many load batches ahead (0: none)
    "fwd_prefetch_ahead": 0,
    # backward: the same knobs
    "bwd_access_bytes": 16,
    "bwd_unroll": 4,
    "bwd_chunk_steps": 256,
    "bwd_threads_per_block": 256,
    "bwd_min_blocks": 0,
    "bwd_fast_sigmoid": 2,
    # backward kernel: "rows" (one thread a block, consecutive blocks in rows of one thread block,
    # for block_len <= ROWS_LMAX and heads that split into 2**k <= 32 lanes of 32-bit words) or
    # "walk" (one thread a chunk of blocks, walked backwards); "rows" falls back to "walk" for
    # shapes it does not take
    "bwd_kernel": "walk",
    # rows kernel: blocks a thread block takes (it has bwd_rows + 2 rows of up to 32 threads)
    "bwd_rows": 8,
}
"""Launch tuning of the fused kernels (swept by scripts/phalanx_dev.py)."""


def fast_sigmoid(direction: str, kind: str) -> bool:
    """Whether the ``direction`` ("fwd" or "bwd") kernel for storage ``kind`` uses the approximate
    sigmoid (TUNING's ``{direction}_fast_sigmoid``: 0 never, 1 always, 2 16-bit storage only)."""
    v = int(TUNING[f"{direction}_fast_sigmoid"])
    return v == 1 or (v == 2 and kind != "f32")


def rows_bounds():
    """The block-row backward's launch bounds: ``(32 * (bwd_rows + 2), bwd_min_blocks)``, or
    None when ``bwd_min_blocks`` is 0."""
    m = int(TUNING["bwd_min_blocks"])
    return None if m <= 0 else (32 * (int(TUNING["bwd_rows"]) + 2), m)


def launch_bounds(direction: str):
    """``(threads_per_block, min_blocks)`` of the current TUNING for ``direction`` ("fwd" or
    "bwd"), or None when ``{direction}_min_blocks`` is 0: the kernels' ``launch_bounds`` (part
    of their cache key and name)."""
    m = int(TUNING[f"{direction}_min_blocks"])
    return None if m <= 0 else (int(TUNING[f"{direction}_threads_per_block"]), m)


def _bounds_suffix(bounds) -> str:
    return "" if bounds is None else f"_lb{bounds[0]}x{bounds[1]}"


def _jit(fn, bounds):
    """``cuda.jit(fn)`` with ``launch_bounds=bounds`` (the simulator ignores launch bounds)."""
    if bounds is None or SIMULATOR:
        return cuda.jit(fn)
    return cuda.jit(fn, launch_bounds=bounds)


_CACHE: dict = {}


def forward_kernel(kind: str, vec: int, unroll: int, bounds=None, fast=False, ahead=0):
    """The forward specialisation (compiled once per key): ``bounds`` are its launch bounds
    (:func:`launch_bounds`), ``fast`` its approximate sigmoid (TUNING's ``fwd_fast_sigmoid``),
    ``ahead`` its L2 prefetch distance in batches (``fwd_prefetch_ahead``)."""
    key = ("fwd", kind, vec, unroll, bounds, bool(fast), int(ahead))
    if key not in _CACHE:
        _CACHE[key] = _make_forward(kind, vec, unroll, bounds, bool(fast), int(ahead))
    return _CACHE[key]


def backward_kernel(kind: str, vec: int, vector: bool, unroll: int, bounds=None, fast=False):
    """The backward specialisation; ``bounds`` and ``fast`` as for :func:`forward_kernel`."""
    key = ("bwd", kind, vec, vector, unroll, bounds, bool(fast))
    if key not in _CACHE:
        _CACHE[key] = _make_backward(kind, vec, vector, unroll, bounds, bool(fast))
    return _CACHE[key]


def backward_rows_kernel(kind: str, rows: int, bounds=None, fast=False):
    """The block-row backward specialisation; ``bounds`` (:func:`rows_bounds`) and ``fast`` as
    for :func:`forward_kernel`."""
    key = ("bwd_rows", kind, int(rows), bounds, bool(fast))
    if key not in _CACHE:
        _CACHE[key] = _make_backward_rows(kind, int(rows), bounds, bool(fast))
    return _CACHE[key]


def _widths(kind: str, access_bytes: int):
    return [v for v in (8, 4, 2, 1) if v * ITEM_SIZE[kind] <= access_bytes]


def vector_width(kind: str, heads: int, head_dim: int, access_bytes: int, aligned=True) -> int:
    """Elements per access: the widest of at most ``access_bytes`` that divides head_dim and
    heads (so every row and column start is a multiple of it); 1 when a base pointer is not
    aligned to 16 bytes."""
    if not aligned:
        return 1
    for v in _widths(kind, access_bytes):
        if head_dim % v == 0 and heads % v == 0:
            return v
    return 1


def forward_config(kind: str, heads: int, head_dim: int, aligned=True):
    """(vec, unroll) of the forward kernel for these shapes."""
    return vector_width(kind, heads, head_dim, TUNING["fwd_access_bytes"], aligned), \
        TUNING["fwd_unroll"]


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def backward_config(kind: str, heads: int, head_dim: int, block_len: int, aligned=True):
    """(vec, vector, unroll, lph) of the backward kernel: channels per thread, whether they are
    read with one access, steps per load batch, threads per head (a power of two up to 32);
    None when it does not take these shapes (block_len > LMAX, or no vec splits the head into a
    power of two of lanes, up to 32: then the layer composes swr_vjp and CuPy elementwise ops)."""
    if block_len > LMAX:
        return None
    unroll = TUNING["bwd_unroll"]
    if aligned:
        for v in _widths(kind, TUNING["bwd_access_bytes"]):
            lph = head_dim // v
            if (v > 1 and head_dim % v == 0 and heads % v == 0 and _pow2(lph) and lph <= 32
                    and block_len * v <= BUF):
                return v, True, unroll, lph
    if _pow2(head_dim) and head_dim <= 32:
        return 1, False, unroll, head_dim
    return None


def rows_config(kind: str, heads: int, head_dim: int, block_len: int, aligned=True):
    """(vec, lph) of the block-row backward, or None when it does not take these shapes:
    block_len above ROWS_LMAX, a head_dim or head count that is not a multiple of the channels
    of a 32-bit word (``rows_vec``), a head not split into a power of two of words up to 32, or
    arrays not aligned to 16 bytes. Then :func:`phalanx_backward` runs the walking kernel."""
    vec = rows_vec(kind)
    if block_len > ROWS_LMAX or not aligned or head_dim % vec or heads % vec:
        return None
    lph = head_dim // vec
    if not (_pow2(lph) and lph <= 32):
        return None
    return vec, lph


def bias_rows(kind: str, batch: int, length: int, heads: int, head_dim: int, block_len: int,
              aligned=True) -> int:
    """Rows of the ``dbias`` array :func:`phalanx_backward` writes for these shapes (with the
    current TUNING): one per chunk of blocks with the walking kernel, one per thread block of
    ``bwd_rows`` consecutive blocks with the block-row kernel."""
    nb = -(-length // block_len)
    if TUNING["bwd_kernel"] == "rows" and rows_config(kind, heads, head_dim, block_len,
                                                      aligned) is not None:
        return batch * -(-nb // int(TUNING["bwd_rows"]))
    chunk_blocks = max(1, min(nb, TUNING["bwd_chunk_steps"] // block_len))
    return batch * -(-nb // chunk_blocks)


def aligned(*arrays) -> bool:
    """Whether every array's data starts at a multiple of 16 bytes (always, in the simulator)."""
    if SIMULATOR:
        return True
    return all(a.data.ptr % 16 == 0 for a in arrays)


_STORAGE = {"f32": types.float32, "f16": types.float16, "bf16": types.uint16}


def kernel_signatures():
    """Every specialisation the launch helpers can use with the current TUNING: a list of
    (kernel, signature) pairs, for compiling them all ahead
    (``numba.cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))``)."""
    i64, fl = types.int64, types.float32
    f1 = types.Array(fl, 1, "C")
    fb, bb = launch_bounds("fwd"), launch_bounds("bwd")
    fa = int(TUNING["fwd_prefetch_ahead"])
    out = []
    for kind, el in _STORAGE.items():
        ff, bf = fast_sigmoid("fwd", kind), fast_sigmoid("bwd", kind)
        v1 = types.Array(el, 1, "C")
        for vec in _widths(kind, TUNING["fwd_access_bytes"]):
            sig = (v1,) * 5 + (f1,) * 8 + (i64,) * 4 + (fl,) + (i64,) * 10
            out.append((forward_kernel(kind, vec, TUNING["fwd_unroll"], fb, ff, fa), sig))
        bsig = (v1,) * 7 + (f1,) * 3 + (i64,) * 4 + (fl,) + (i64,) * 8
        un = TUNING["bwd_unroll"]
        for vec in _widths(kind, TUNING["bwd_access_bytes"]):
            if vec > 1:
                out.append((backward_kernel(kind, vec, True, un, bb, bf), bsig))
        out.append((backward_kernel(kind, 1, False, un, bb, bf), bsig))
        rsig = (v1,) * 7 + (f1,) * 3 + (i64,) * 4 + (fl,) + (i64,) * 8
        out.append((backward_rows_kernel(kind, TUNING["bwd_rows"], rows_bounds(), bf), rsig))
    return out


def launch(kernel, grid, block, args, stream=None, shared_mem=0):
    """``_launch.launch`` (``shared_mem``: bytes of dynamic shared memory). In the simulator,
    NumPy arrays are wrapped without a copy (the simulator otherwise copies each NumPy argument
    in and back out on its own)."""
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        args = tuple(FakeCUDAArray(a) if isinstance(a, np.ndarray) else a for a in args)
        kernel[grid, block, 0, shared_mem](*args)
        return
    _launch(kernel, grid, block, args, stream, shared_mem)


_DUMMIES: dict = {}


def _dummy(x):
    """A one-element float32 array on x's device for the arrays a launch does not use (the
    kernels never touch it); one per device, not a new allocation and memset per launch."""
    if isinstance(x, np.ndarray):
        return np.zeros(1, np.float32)
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    d = _DUMMIES.get(dev)
    if d is None:
        d = _DUMMIES[dev] = cupy.zeros(1, np.float32)
    return d


def _flat(x, kind):
    """x's storage view (uint16 bits for bfloat16), 1-D, no copy (x is C-contiguous)."""
    return storage_view(x, kind).reshape(-1)


def phalanx_forward(z, b_a, b_b, b_c, y, *, batch, length, heads, head_dim, kv_heads, decay_max,
                    block_len, hops, offset=0, w0=None, g0=None, carry_v=None, carry_C=None,
                    state_out=None, stream=None):
    """Launch ``phalanx_mix_forward``: y (B*L, H*D) from z (B*L, W) (both C-contiguous, one dtype).

    hops in {0, 1}, block_len <= LMAX. ``offset``, ``w0``, ``g0`` (B, H, D) float32 continue a
    block begun earlier; ``carry_v``/``carry_C`` (B, H, D) float32 are the newest carrier and its
    compound attenuation (hops=1; None means no carry, the start of a sequence). ``state_out`` =
    (w, g, cv, cC) (B, H, D) float32 receive the state after the last token.
    """
    kind = storage_kind(z.dtype)
    vec, unroll = forward_config(kind, heads, head_dim, aligned(z, y))
    nvec = heads * head_dim // vec
    nb = -(-(offset + length) // block_len)
    chunk_blocks = max(1, min(nb, TUNING["fwd_chunk_steps"] // block_len))
    nchunks = -(-nb // chunk_blocks)
    total = batch * nchunks * nvec
    if total == 0:
        return
    dummy = _dummy(z)

    def st(x):
        return dummy if x is None else x.reshape(-1)

    has_carry = carry_v is not None
    outs = state_out if state_out is not None else (None,) * 4
    i64 = np.int64
    args = (_flat(z, kind), _flat(b_a, kind), _flat(b_b, kind), _flat(b_c, kind), _flat(y, kind),
            st(w0), st(g0), st(carry_v), st(carry_C), *(st(o) for o in outs),
            i64(length), i64(heads), i64(head_dim), i64(heads // kv_heads),
            np.float32(decay_max), i64(offset), i64(block_len), i64(hops), i64(nvec), i64(nb),
            i64(chunk_blocks), i64(nchunks), i64(total), i64(has_carry),
            i64(state_out is not None))
    tpb = 32 if SIMULATOR else TUNING["fwd_threads_per_block"]
    kernel = forward_kernel(kind, vec, unroll, launch_bounds("fwd"),
                            fast_sigmoid("fwd", kind), int(TUNING["fwd_prefetch_ahead"]))
    launch(kernel, (-(-total // tpb),), (tpb,), args, stream)


def phalanx_backward(z, dy, b_a, b_b, b_c, dz, y, dbias, *, batch, length, heads, head_dim,
                     kv_heads, decay_max, block_len, hops, acc_b=None, acc_c=None, stream=None):
    """Launch the fused backward (from position 0): the block-row kernel when TUNING's
    ``bwd_kernel`` is "rows" and :func:`rows_config` takes the shapes, else the walking one.

    Inputs z (B*L, W), dy (B*L, H*D); outputs dz (B*L, W), y (B*L, H*D) (all one dtype,
    C-contiguous) and dbias (:func:`bias_rows`, 2*KV*D + H) float32: partial sums of the
    gradients of [b_b | b_c | b_a], one row per (batch, chunk of ``bwd_chunk_steps`` tokens) or,
    with the block-row kernel, per (batch, thread block of ``bwd_rows`` blocks); their column
    sums are the gradients.
    With kv groups (kv_heads < heads) the Bg and C columns of dz are summed over heads with
    atomics into acc_b, acc_c (B*L, KV*D) float32, which must be zeroed (and so must dbias);
    the caller copies them into dz. Use :func:`backward_config` (with
    :func:`aligned` of z, dy, dz, y) to check the shapes.
    """
    kind = storage_kind(z.dtype)
    ok = aligned(z, dy, dz, y)
    cfg = backward_config(kind, heads, head_dim, block_len, ok)
    if cfg is None:
        raise ValueError(f"the fused backward does not take head_dim={head_dim}, "
                         f"block_len={block_len} with these arrays (see backward_config)")
    nb = -(-length // block_len)
    if nb == 0 or batch == 0:
        return
    dummy = _dummy(z)
    i64 = np.int64
    arrays = (_flat(z, kind), _flat(dy, kind), _flat(b_a, kind), _flat(b_b, kind),
              _flat(b_c, kind), _flat(dz, kind), _flat(y, kind), dbias.reshape(-1),
              dummy if acc_b is None else acc_b.reshape(-1),
              dummy if acc_c is None else acc_c.reshape(-1))
    common = (i64(length), i64(heads), i64(head_dim), i64(heads // kv_heads),
              np.float32(decay_max), i64(block_len), i64(hops))
    fast = fast_sigmoid("bwd", kind)
    rcfg = rows_config(kind, heads, head_dim, block_len, ok)
    if TUNING["bwd_kernel"] == "rows" and rcfg is not None:
        vec, lph = rcfg
        rows = int(TUNING["bwd_rows"])
        nvec = heads * head_dim // vec
        R = min(32, nvec)
        nruns = -(-nb // rows)
        ncg = -(-nvec // R)
        kernel = backward_rows_kernel(kind, rows, rows_bounds(), fast)
        args = arrays + common + (i64(nvec), i64(nb), i64(nruns), i64(ncg), i64(R), i64(lph))
        threads = R * (rows + 2)
        shared = rows_stage_bytes(kind, block_len, threads)
        launch(kernel, (batch * nruns * ncg,), (threads,), args, stream, shared)
        return
    vec, vector, unroll, lph = cfg
    nvec = heads * head_dim // vec
    chunk_blocks = max(1, min(nb, TUNING["bwd_chunk_steps"] // block_len))
    nchunks = -(-nb // chunk_blocks)
    total = batch * nchunks * nvec
    args = arrays + common + (i64(nvec), i64(nb), i64(chunk_blocks), i64(nchunks), i64(total),
                              i64(lph))
    # the simulator has no warp shuffles: there a thread block is one head's lanes
    tpb = lph if SIMULATOR else TUNING["bwd_threads_per_block"]
    kernel = backward_kernel(kind, vec, vector, unroll, launch_bounds("bwd"), fast)
    launch(kernel, (-(-total // tpb),), (tpb,), args, stream)
