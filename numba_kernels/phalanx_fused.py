"""Fused Phalanx kernels: everything between the layer's two GEMMs in one pass.

The input GEMM produces ``z = x W_in`` as a 2-D ``(B*L, W)`` array (rows are tokens, channel
contiguous: the "BLHD" order), columns ``[V (H*D) | Bg (KV*D) | C (KV*D) | A (H)]``. These kernels
read it as it is, with no transposes:

- ``phalanx_mix_forward``: ``Y = swr(A, sigmoid(Bg) * V, hops) * C + V`` with
  ``A = decay_max * sigmoid(z_a + b_a)`` per head, biases added in registers, hops 0 or 1, any
  block length up to ``LMAX``, optionally continuing a state and writing the state after the last
  token.
- ``phalanx_mix_backward``: recomputes the gates and the recurrence and writes ``dz`` (the
  gradient of the GEMM output), ``Y`` (needed for the output GEMM's weight gradient) and per-block
  partial sums of the bias gradients, so the layer's backward is four GEMMs and this kernel.
- ``phalanx_decode_step``: one token for a batch, the state updated out of place.

Work split: one thread owns ``VEC`` adjacent channels of one head for one block of ``block_len``
tokens (a "row" is one (batch, block) pair; a row's threads are consecutive, so a warp reads
contiguous bytes of one token row at each step). With hops=1 a thread recomputes the previous
block's carrier (forward) or the next block's gradient sum q (backward) instead of communicating
with other threads: blocks stay independent, at the cost of re-reading neighbouring blocks,
which the L2 cache serves.

Backward math per channel (hops=1, S = carrier of the previous block, ds = dY * C):
    lam_t = ds_t + a_{t+1} lam_{t+1},  lam_end = ds_end + q_{j+1}     (du = lam)
    z_t   = ds_t + a_{t+1} z_{t+1},    z_end = ds_end
    a_t da_t = (a_t w_{t-1}) lam_t + g_t S z_t
and with A = decay_max * sigmoid(z_a), dz_a = da * A * (1 - sigmoid) = (a_t da_t) (1 - sigmoid):
no division by a_t, no w_{t-1} needed. The per-head sum of a_t da_t over the head's channels
goes through shared memory (one barrier per thread block).

bfloat16 arrays arrive as uint16 views; with ``VEC`` 2 or 4 and aligned rows they are also read
and written through uint32 / uint64 views (two or four values per access).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda, types

from ._dtypes import (
    LOAD,
    SIMULATOR,
    STORE,
    bf16_to_f32,
    f32_to_bf16,
    storage_kind,
    storage_view,
)
from ._launch import launch as _launch
from .swr_forward import make_vector_load, make_vector_store

__all__ = [
    "LMAX",
    "phalanx_forward",
    "phalanx_backward",
    "phalanx_decode",
    "forward_kernel",
    "backward_kernel",
    "decode_kernel",
    "forward_config",
    "backward_config",
    "kernel_signatures",
]

LMAX = 64
"""Largest block_len the fused kernels take (local buffers hold LMAX values per thread)."""

TPB = 128
"""Threads per block (the backward kernel uses the largest multiple of D/VEC not above it)."""

F0 = np.float32(0.0)
F1 = np.float32(1.0)
f32 = numba.float32


@cuda.jit(device=True, inline=True)
def _sigmoid(x):
    return F1 / (F1 + math.exp(-x))


# ----------------------------------------------------------------------------------------------
# Vector loads and stores: VEC adjacent elements of a row, into / from a float32 local array
# ----------------------------------------------------------------------------------------------


def _vector_io(kind: str, vec: int, vload: bool):
    """(load_vec(A, Aw, m, col, out), store_vec(A, Aw, m, col, vals)) for one specialisation.

    ``A`` is the element view, ``Aw`` the word view (uint64 for 4 bf16, uint32 for 2 bf16; the
    element view again when ``vload`` is off); ``col`` is a multiple of VEC when ``vload``.
    """
    load, store = LOAD[kind], STORE[kind]
    VEC = vec
    if vload and vec == 4:

        @cuda.jit(device=True, inline=True)
        def load_vec(A, Aw, m, col, out):
            word = Aw[m, col // 4]
            for k in range(4):
                out[k] = bf16_to_f32((word >> numba.uint64(16 * k)) & numba.uint64(0xFFFF))

        @cuda.jit(device=True, inline=True)
        def store_vec(A, Aw, m, col, vals):
            word = numba.uint64(0)
            for k in range(4):
                word |= numba.uint64(f32_to_bf16(vals[k])) << numba.uint64(16 * k)
            Aw[m, col // 4] = word

    elif vload and vec == 2:

        @cuda.jit(device=True, inline=True)
        def load_vec(A, Aw, m, col, out):
            word = Aw[m, col // 2]
            for k in range(2):
                out[k] = bf16_to_f32((word >> numba.uint32(16 * k)) & numba.uint32(0xFFFF))

        @cuda.jit(device=True, inline=True)
        def store_vec(A, Aw, m, col, vals):
            word = numba.uint32(0)
            for k in range(2):
                word |= numba.uint32(f32_to_bf16(vals[k])) << numba.uint32(16 * k)
            Aw[m, col // 2] = word

    else:

        @cuda.jit(device=True, inline=True)
        def load_vec(A, Aw, m, col, out):
            for k in range(VEC):
                out[k] = load(A[m, col + k])

        @cuda.jit(device=True, inline=True)
        def store_vec(A, Aw, m, col, vals):
            for k in range(VEC):
                A[m, col + k] = store(vals[k])

    return load_vec, store_vec


# ----------------------------------------------------------------------------------------------
# Forward: one thread per (batch, VEC adjacent channels of one head, chunk of blocks)
# ----------------------------------------------------------------------------------------------


def _make_forward(kind: str, vec: int, unroll: int, min_blocks: int = 0):
    """The forward walk: a thread walks ``chunk_blocks`` consecutive blocks of its channels (and,
    with hops=1, the block before them first, storing nothing, for the chunk's first carrier).
    Each batch of ``unroll`` steps issues all its loads (VEC-wide, one access each) before any
    arithmetic, so they are in flight together; steps past the chunk's end load its last step
    again and are skipped."""
    load = LOAD[kind]
    load_v = make_vector_load(kind, vec)
    store_v = make_vector_store(kind, vec)
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
                za[i] = load(z[m + col_a])
                load_v(z, m + col_b, zb, i * VEC)
                load_v(z, m + col_c, zc, i * VEC)
                load_v(z, m + c0, zv, i * VEC)
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
                    a = decay_max * _sigmoid(za[i] + ba)
                    for k in range(VEC):
                        v = zv[i * VEC + k]
                        w[k] = a * w[k] + _sigmoid(zb[i * VEC + k] + bb[k]) * v
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
        f"phalanx_mix_forward_{kind}_vec{vec}_unroll{unroll}_min{min_blocks}")
    if min_blocks and not SIMULATOR:  # at least min_blocks blocks per SM: caps the registers
        bounds = (TUNING["fwd_threads_per_block"], min_blocks)
        return cuda.jit(phalanx_mix_forward, launch_bounds=bounds)
    return cuda.jit(phalanx_mix_forward)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


def _make_backward(kind: str, vec: int, vload: bool):
    load = LOAD[kind]
    store = STORE[kind]
    load_vec, store_vec = _vector_io(kind, vec, vload)
    VEC = vec

    def phalanx_mix_backward(z, zw, dy, dyw, b_a, b_b, b_c, dz, dzw, y, yw, dbias, acc_b,
                             acc_c, L, H, D, G, decay_max, block_len, hops, nvec, nb, total,
                             lph):
        # a_t da_t (1 - sigmoid) per (step, thread): block_len * blockDim floats, dynamic
        part = cuda.shared.array(0, f32)
        tx = cuda.threadIdx.x
        tpb = cuda.blockDim.x
        first = numba.int64(cuda.blockIdx.x) * tpb
        tid = first + tx
        lb = block_len
        HD = H * D
        KD = (H // G) * D
        if tid < total:
            row = tid // nvec
            c0 = (tid - row * nvec) * VEC
            b = row // nb
            j = row - b * nb
            h = c0 // D
            d0 = c0 - h * D
            kc0 = (h // G) * D + d0
            col_b = HD + kc0
            col_c = col_b + KD
            col_a = HD + 2 * KD + h
            lo = j * lb
            n = min(lo + lb, L) - lo
            ba = load(b_a[h])
            bb = cuda.local.array(VEC, f32)
            bc = cuda.local.array(VEC, f32)
            S = cuda.local.array(VEC, f32)
            q = cuda.local.array(VEC, f32)
            w = cuda.local.array(VEC, f32)
            lam = cuda.local.array(VEC, f32)
            zz = cuda.local.array(VEC, f32)
            pb = cuda.local.array(VEC, f32)
            pc = cuda.local.array(VEC, f32)
            zb = cuda.local.array(VEC, f32)
            zc = cuda.local.array(VEC, f32)
            zv = cuda.local.array(VEC, f32)
            dyv = cuda.local.array(VEC, f32)
            o_v = cuda.local.array(VEC, f32)
            o_b = cuda.local.array(VEC, f32)
            o_c = cuda.local.array(VEC, f32)
            o_y = cuda.local.array(VEC, f32)
            aw = cuda.local.array(LMAX, f32)  # a_t w_{t-1}, [step * VEC + k]
            gbuf = cuda.local.array(LMAX, f32)  # g_t (per head)
            sbuf = cuda.local.array(LMAX, f32)  # sigmoid(z_a + b_a)
            for k in range(VEC):
                bb[k] = load(b_b[kc0 + k])
                bc[k] = load(b_c[kc0 + k])
                S[k] = F0
                q[k] = F0
                w[k] = F0
            if hops == 1 and j > 0:  # carrier of the previous block
                for t in range(lo - lb, lo):
                    m = b * L + t
                    a = decay_max * _sigmoid(load(z[m, col_a]) + ba)
                    load_vec(z, zw, m, col_b, zb)
                    load_vec(z, zw, m, c0, zv)
                    for k in range(VEC):
                        S[k] = a * S[k] + _sigmoid(zb[k] + bb[k]) * zv[k]
            hi = lo + n
            if hops == 1 and hi < L:  # q_{j+1}: the next block's sum of g_t ds_t
                gq = F1
                for t in range(hi, min(hi + lb, L)):
                    m = b * L + t
                    gq *= decay_max * _sigmoid(load(z[m, col_a]) + ba)
                    load_vec(z, zw, m, col_c, zc)
                    load_vec(dy, dyw, m, c0, dyv)
                    for k in range(VEC):
                        q[k] += gq * dyv[k] * (zc[k] + bc[k])
            # forward through the block, keeping what the reverse sweep needs
            gh = F1
            for i in range(n):
                m = b * L + lo + i
                sg = _sigmoid(load(z[m, col_a]) + ba)
                a = decay_max * sg
                sbuf[i] = sg
                load_vec(z, zw, m, col_b, zb)
                load_vec(z, zw, m, c0, zv)
                for k in range(VEC):
                    awk = a * w[k]
                    aw[i * VEC + k] = awk
                    w[k] = awk + _sigmoid(zb[k] + bb[k]) * zv[k]
                gh = a * gh
                gbuf[i] = gh
            # reverse sweep
            for k in range(VEC):
                lam[k] = q[k]
                zz[k] = F0
                pb[k] = F0
                pc[k] = F0
            a_next = F1
            for ii in range(n):
                i = n - 1 - ii
                m = b * L + lo + i
                load_vec(z, zw, m, col_b, zb)
                load_vec(z, zw, m, col_c, zc)
                load_vec(z, zw, m, c0, zv)
                load_vec(dy, dyw, m, c0, dyv)
                gh = gbuf[i]
                pa = F0
                for k in range(VEC):
                    bg = _sigmoid(zb[k] + bb[k])
                    v = zv[k]
                    c = zc[k] + bc[k]
                    ds = dyv[k] * c
                    lam[k] = ds + a_next * lam[k]
                    zz[k] = ds + a_next * zz[k]
                    awk = aw[i * VEC + k]
                    s = awk + bg * v + gh * S[k]
                    o_v[k] = dyv[k] + lam[k] * bg
                    o_b[k] = lam[k] * v * bg * (F1 - bg)
                    o_c[k] = dyv[k] * s
                    o_y[k] = s * c + v
                    pa += awk * lam[k] + gh * S[k] * zz[k]
                    pb[k] += o_b[k]
                    pc[k] += o_c[k]
                store_vec(dz, dzw, m, c0, o_v)
                store_vec(y, yw, m, c0, o_y)
                if G == 1:
                    store_vec(dz, dzw, m, col_b, o_b)
                    store_vec(dz, dzw, m, col_c, o_c)
                else:  # heads of one kv group share these columns
                    for k in range(VEC):
                        cuda.atomic.add(acc_b, (m, kc0 + k), o_b[k])
                        cuda.atomic.add(acc_c, (m, kc0 + k), o_c[k])
                part[i * tpb + tx] = pa * (F1 - sbuf[i])
                a_next = decay_max * sbuf[i]
            for k in range(VEC):
                if G == 1:
                    dbias[row, kc0 + k] = pb[k]
                    dbias[row, KD + kc0 + k] = pc[k]
                else:
                    cuda.atomic.add(dbias, (row, kc0 + k), pb[k])
                    cuda.atomic.add(dbias, (row, KD + kc0 + k), pc[k])
        cuda.syncthreads()
        # one thread per head of this thread block sums the head's lanes: dz_a and its bias part
        lane0 = first + tx * lph
        if tx * lph < tpb and lane0 < total:
            row = lane0 // nvec
            h = ((lane0 - row * nvec) * VEC) // D
            b = row // nb
            lo = (row - b * nb) * lb
            n = min(lo + lb, L) - lo
            col_a = HD + 2 * KD + h
            acc = F0
            for i in range(n):
                s = F0
                for k in range(lph):
                    s += part[i * tpb + tx * lph + k]
                dz[b * L + lo + i, col_a] = store(s)
                acc += s
            dbias[row, 2 * KD + h] = acc

    return cuda.jit(phalanx_mix_backward)


# ----------------------------------------------------------------------------------------------
# Decode: one token
# ----------------------------------------------------------------------------------------------


def _make_decode(kind: str):
    load = LOAD[kind]
    store = STORE[kind]

    def phalanx_decode_step(z, b_a, b_b, b_c, y, w_in, g_in, cv_in, cC_in, w_out, g_out, cv_out,
                            cC_out, H, D, G, decay_max, offset, block_len, hops, total):
        tid = numba.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        if tid >= total:
            return
        HD = H * D
        KD = (H // G) * D
        b = tid // HD
        c = tid - b * HD
        h = c // D
        d = c - h * D
        kc = (h // G) * D + d
        a = decay_max * _sigmoid(load(z[b, HD + 2 * KD + h]) + load(b_a[h]))
        v = load(z[b, c])
        u = _sigmoid(load(z[b, HD + kc]) + load(b_b[kc])) * v
        cc = load(z[b, HD + KD + kc]) + load(b_c[kc])
        if offset == 0:
            w = u
            g = a
        else:
            w = a * w_in[b, h, d] + u
            g = a * g_in[b, h, d]
        S = F0
        if hops == 1:
            S = cv_in[b, h, d]
        y[b, c] = store((w + g * S) * cc + v)
        if offset == block_len - 1:  # this token closes its block
            w_out[b, h, d] = F0
            g_out[b, h, d] = F1
            if hops == 1:
                cv_out[b, h, d] = w
                cC_out[b, h, d] = g
        else:
            w_out[b, h, d] = w
            g_out[b, h, d] = g
            if hops == 1:
                cv_out[b, h, d] = cv_in[b, h, d]
                cC_out[b, h, d] = cC_in[b, h, d]

    return cuda.jit(phalanx_decode_step)


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
    "fwd_min_blocks": 0,  # > 0: launch bounds asking for this many blocks per SM (fewer registers)
}
"""Launch tuning of the fused kernels, chosen by scripts/phalanx_dev.py on an H200."""

_CACHE: dict = {}
_ITEM = {"f32": 4, "f16": 2, "bf16": 2}


def forward_kernel(kind: str, vec: int, unroll: int):
    min_blocks = TUNING["fwd_min_blocks"]
    key = ("fwd", kind, vec, unroll, min_blocks, TUNING["fwd_threads_per_block"])
    if key not in _CACHE:
        _CACHE[key] = _make_forward(kind, vec, unroll, min_blocks)
    return _CACHE[key]


def backward_kernel(kind: str, vec: int, vload: bool):
    key = ("bwd", kind, vec, vload)
    if key not in _CACHE:
        _CACHE[key] = _make_backward(kind, vec, vload)
    return _CACHE[key]


def decode_kernel(kind: str):
    key = ("dec", kind)
    if key not in _CACHE:
        _CACHE[key] = _make_decode(kind)
    return _CACHE[key]


def _widths(kind: str, access_bytes: int):
    return [v for v in (8, 4, 2, 1) if v * _ITEM[kind] <= access_bytes]


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


def _widest(head_dim: int, limit: int = 4) -> int:
    for v in (4, 2, 1):
        if v <= limit and head_dim % v == 0:
            return v
    return 1


def backward_config(kind: str, heads: int, head_dim: int, block_len: int):
    """(vec, vload, lph, tpb) of the backward kernel, or None when the fused backward
    does not take these shapes (block_len > LMAX, or a head wider than a thread block)."""
    if block_len > LMAX:
        return None
    vec = _widest(head_dim, max(1, min(4, LMAX // block_len)))
    lph = head_dim // vec
    if lph > TPB:
        return None
    vload = kind == "bf16" and vec > 1 and heads % vec == 0
    return vec, vload, lph, lph * (TPB // lph)


_STORAGE = {"f32": types.float32, "f16": types.float16, "bf16": types.uint16}
_WORD = {2: types.uint32, 4: types.uint64}


def kernel_signatures():
    """Every specialisation the launch helpers can use with the current TUNING: a list of
    (kernel, signature) pairs, for compiling them all ahead
    (``numba.cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))``)."""
    i64, fl = types.int64, types.float32
    f1 = types.Array(fl, 1, "C")
    out = []
    for kind, el in _STORAGE.items():
        v1, m2 = types.Array(el, 1, "C"), types.Array(el, 2, "C")
        for vec in _widths(kind, TUNING["fwd_access_bytes"]):
            sig = (v1,) * 5 + (f1,) * 8 + (i64,) * 4 + (fl,) + (i64,) * 10
            out.append((forward_kernel(kind, vec, TUNING["fwd_unroll"]), sig))
        f2 = types.Array(fl, 2, "C")
        for vec in (1, 2, 4):
            for vload in ((False, True) if kind == "bf16" and vec > 1 else (False,)):
                w2 = types.Array(_WORD[vec], 2, "C") if vload else m2
                sig = ((m2, w2, m2, w2, v1, v1, v1, m2, w2, m2, w2, f2, f2, f2)
                       + (i64,) * 4 + (fl,) + (i64,) * 6)
                out.append((backward_kernel(kind, vec, vload), sig))
        st3 = types.Array(fl, 3, "C")
        sig = (m2, v1, v1, v1, m2) + (st3,) * 8 + (i64,) * 3 + (fl,) + (i64,) * 4
        out.append((decode_kernel(kind), sig))
    return out


def launch(kernel, grid, block, args, stream=None, shared_mem=0):
    """``_launch.launch``. In the simulator, NumPy arrays are wrapped without a copy so that two
    views of one buffer (element and word views) stay one buffer (the simulator otherwise copies
    each NumPy argument in and back out on its own, and the last copy wins), and the dynamic
    shared memory size is passed on."""
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        args = tuple(FakeCUDAArray(a) if isinstance(a, np.ndarray) else a for a in args)
        kernel[grid, block, 0, shared_mem](*args)
        return
    _launch(kernel, grid, block, args, stream, shared_mem)


def _like(x, shape, dtype=np.float32):
    """A small scratch array on x's device (NumPy in the simulator)."""
    if isinstance(x, np.ndarray):
        return np.zeros(shape, dtype)
    import cupy

    return cupy.zeros(shape, dtype)


def _views(x, kind, vload, vec):
    v = storage_view(x, kind)
    return v, (v.view(np.uint64 if vec == 4 else np.uint32) if vload else v)


def _flat(x, kind):
    """x's storage view (uint16 bits for bfloat16), 1-D, no copy (x is C-contiguous)."""
    return storage_view(x, kind).reshape(-1)


def _aligned(*arrays) -> bool:
    if SIMULATOR:
        return True
    return all(a.data.ptr % 16 == 0 for a in arrays)


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
    vec, unroll = forward_config(kind, heads, head_dim, _aligned(z, y))
    nvec = heads * head_dim // vec
    nb = -(-(offset + length) // block_len)
    chunk_blocks = max(1, min(nb, TUNING["fwd_chunk_steps"] // block_len))
    nchunks = -(-nb // chunk_blocks)
    total = batch * nchunks * nvec
    if total == 0:
        return
    dummy = _like(z, (1,))

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
    launch(forward_kernel(kind, vec, unroll), (-(-total // tpb),), (tpb,), args, stream)


def phalanx_backward(z, dy, b_a, b_b, b_c, dz, y, dbias, *, batch, length, heads, head_dim,
                     kv_heads, decay_max, block_len, hops, acc_b=None, acc_c=None, stream=None):
    """Launch ``phalanx_mix_backward`` (from position 0).

    Inputs z (B*L, W), dy (B*L, H*D); outputs dz (B*L, W), y (B*L, H*D) (all one dtype) and
    dbias (B*nb, 2*KV*D + H) float32: per (batch, block) row the partial sums of the gradients of
    [b_b | b_c | b_a]. With kv groups (kv_heads < heads) the Bg and C columns of dz are summed
    over heads with atomics into acc_b, acc_c (B*L, KV*D) float32, which must be zeroed (and so
    must dbias); the caller copies them into dz. Use :func:`backward_config` to check the shapes.
    """
    kind = storage_kind(z.dtype)
    vec, vload, lph, tpb = backward_config(kind, heads, head_dim, block_len)
    nvec = heads * head_dim // vec
    nb = -(-length // block_len)
    total = batch * nb * nvec
    if total == 0:
        return
    dummy = _like(z, (1, 1))
    zv, zw = _views(z, kind, vload, vec)
    dyv, dyw = _views(dy, kind, vload, vec)
    dzv, dzw = _views(dz, kind, vload, vec)
    yv, yw = _views(y, kind, vload, vec)
    i64 = np.int64
    args = (zv, zw, dyv, dyw, storage_view(b_a, kind), storage_view(b_b, kind),
            storage_view(b_c, kind), dzv, dzw, yv, yw, dbias,
            dummy if acc_b is None else acc_b, dummy if acc_c is None else acc_c,
            i64(length), i64(heads), i64(head_dim), i64(heads // kv_heads),
            np.float32(decay_max), i64(block_len), i64(hops), i64(nvec), i64(nb), i64(total),
            i64(lph))
    launch(backward_kernel(kind, vec, vload), (-(-total // tpb),), (tpb,), args, stream,
           shared_mem=block_len * tpb * 4)


def phalanx_decode(z, b_a, b_b, b_c, y, state_in, state_out, *, heads, head_dim, kv_heads,
                   decay_max, offset, block_len, hops, stream=None):
    """Launch ``phalanx_decode_step``: z (B, W) -> y (B, H*D) for the token at in-block position
    ``offset``; ``state_in``/``state_out`` = (w, g, cv, cC) (B, H, D) float32 (cv, cC: the newest
    carrier, hops=1; any (B, H, D) arrays for hops=0)."""
    kind = storage_kind(z.dtype)
    total = z.shape[0] * heads * head_dim
    if total == 0:
        return
    i64 = np.int64
    args = (storage_view(z, kind), storage_view(b_a, kind), storage_view(b_b, kind),
            storage_view(b_c, kind), storage_view(y, kind), *state_in, *state_out, i64(heads),
            i64(head_dim), i64(heads // kv_heads), np.float32(decay_max), i64(offset),
            i64(block_len), i64(hops), i64(total))
    launch(decode_kernel(kind), (-(-total // TPB),), (TPB,), args, stream)
