"""Native packed kernels (``cu_seqlens``), hops 0 and 1, both layouts: forward and backward.

A packed batch holds ``T`` tokens of ``S`` sequences back to back, sequence s holding tokens
``cu[s]:cu[s+1]``; each sequence is its own recurrence with blocks of ``block_len`` (``l``)
aligned at its first token (docs/spec.md#packed). These kernels walk those *virtual* blocks in
the packed array itself: no padded image, no token moves, one launch for all sequences.

Work split: a thread owns ``vec`` adjacent channels (one access of ``vec`` elements per step,
coalesced across the warp: BLHD rows are channel contiguous) and a chunk of ``chunk`` tokens,
``[t_lo, t_lo + chunk)``. It handles every virtual block whose *first token* lies in its chunk
(the last one may run past the chunk's end), so every token belongs to exactly one thread. The
sequence of ``t_lo`` comes from a binary search of ``cu`` (``log2 S`` loads); after that the
thread follows sequence boundaries as it walks (``cu[s+1]``), skipping empty sequences. A
block is ``[bs, be)`` with ``be = min(bs + l, cu[s+1])``: a sequence's last block is partial
(its tail beyond the valid length is neither loaded nor stored). The host sizes the grid from
T alone (``ceil(T / chunk)`` chunks), so nothing reads ``cu`` on the host.

Carry entering a block (hops=1): ``x0[s]`` (or 0) for a sequence's first block; else the
carrier of the block before, handed on in registers from the thread's previous block, or, for
the thread's first block, re-walked (``l`` extra reads of ``a`` and ``u`` per chunk). hops=0:
no carry (x0 does not enter).

Forward (:func:`forward_kernel`): ``y_t = w_t + g_t * S`` per block, steps in batches of
``unroll`` loads in flight (clamped into the block).

Backward (:func:`backward_kernel`), the math of docs/spec.md#gradients per virtual block j:
``q_{j+1} = sum_{t in block j+1} g_t dy_t`` (0 for a sequence's last block) from a walk of the
next block's ``a`` and ``dy``; a forward walk of the block keeping ``w_{t-1}``, ``g_{t-1}`` and
``dy_t`` of each step in registers (arrays indexed by compile-time constants: ``block_len`` is
a constant of the specialisation, at most :data:`BACKWARD_LMAX`); then the reverse sweep

    lam_t = dy_t + a_{t+1} lam_{t+1},  lam_end = dy_end + q_{j+1}      (du_t = lam_t)
    z_t   = dy_t + a_{t+1} z_{t+1},    z_end = dy_end
    da_t  = lam_t w_{t-1} + S z_t g_{t-1}

and ``dx0[s] = a_first z_first`` of the sequence's first block (hops=1 with x0). Per-head ``da``
is summed over the head's ``lph = D / vec`` lanes with butterfly shuffles (``_ptx.head_sum``;
the simulator launches thread blocks of one head's lanes instead).

Validity of ``cu``: :func:`check_kernel` (one thread block, a loop over S) writes ``ok[0] = 1``
when ``cu`` starts at 0, never decreases and ends at T, else 0; the walk kernels then write NaN
to every output (``y``; ``da``, ``du`` and ``dx0``) instead of walking. ``dx0`` must be zeroed by
the caller (empty sequences and hops=0 keep 0).

Token walks (:func:`tokens_forward_kernel`, :func:`tokens_backward_kernel`; layout "BHDL"
always, "BLHD" with the "tokens" family of :data:`VARIANTS` and for the backward past
:data:`BACKWARD_LMAX`): a thread owns a channel vector (BLHD) or one channel row (BHDL, accesses
of consecutive tokens along the row) and a chunk of tokens ``[t_lo, t_lo + chunk)``
(:func:`token_chunk`), and steps through them in groups of U tokens (loads in flight), following
block and sequence boundaries token by token (:func:`_boundary`), so blocks need no alignment to
the accesses. The walk starts at the block before the one holding ``t_lo`` (its carrier; nothing
stored there). The backward first walks the chunk in reverse from the end of the block after the
one holding the chunk's end, keeping the reverse state at every group boundary, then walks
forward recomputing each group's reverse quantities from its checkpoint
(:func:`_make_tokens_backward`).

Reverse block walk (:func:`rblocks_kernel`, the BLHD backward of the default family
"rblocks"): the blocks of the chunk from the last to the first, as the dense channel kernel.
BHDL tile walks (:func:`tile_forward_kernel`, :func:`tile_backward_kernel`; with
:data:`BHDL_TILE`): a warp stages tiles of 32 channel rows x :data:`TILE_TOKENS` tokens in
shared memory with whole row segments and each lane walks its row there.

Arrays are 1-D views of C-contiguous arrays (bfloat16 as uint16 bits); ``x0`` and ``dx0`` are
float32 ``(S, H, D)``; ``cu`` int32 or int64, ``ok`` int32 of one element. Vector accesses need
their address aligned to their size; ``vec == 1`` specialisations take any alignment.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
from numba import cuda

from ._dtypes import ITEM_SIZE, SIMULATOR, STORE
from ._launch import FlatArray, data_pointer, launch, launch_with_pointers, prepare
from ._ptx import head_sum, make_vector_load, make_vector_store, shfl_idx

__all__ = ["BACKWARD_LMAX", "VARIANTS", "backward", "backward_config", "backward_family",
           "backward_kernel", "backward_plan", "check_cu", "check_kernel", "forward",
           "forward_config", "forward_kernel", "variant"]

f32 = numba.float32
NAN = np.float32(np.nan)

BACKWARD_LMAX = 16
"""Largest block_len of the native backward (its per-block registers grow with it)."""

FORWARD_ACCESS_BYTES = 16
BACKWARD_ACCESS_BYTES = 4
BACKWARD_MAX_VEC = 4
FORWARD_UNROLL = 8
FORWARD_CHUNK = 128
BACKWARD_CHUNK = 256
"""Tokens per thread (forward, backward): a chunk re-walks at most one block, ``l / chunk``
extra reads of ``a`` and ``u``; shorter chunks make more threads."""
THREADS = 32 if SIMULATOR else 256
CHECK_THREADS = 32 if SIMULATOR else 256

_CACHE: dict = {}

VARIANTS = ("rblocks", "blocks", "tokens")
"""Kernel families of the BLHD path (scripts/packed_profile.py times each): "blocks", a thread
walks the blocks whose first token lies in its chunk ("rblocks": the backward takes them from
the last to the first, as the dense channel kernel, the forward is "blocks"'s); "tokens", a
thread steps through the tokens of its chunk (the token walks; BHDL always runs these)."""
_VARIANT = ["rblocks"]


@contextlib.contextmanager
def variant(name):
    """Run the BLHD kernels of family ``name`` (one of :data:`VARIANTS`) inside the block."""
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
    old = _VARIANT[0]
    _VARIANT[0] = name
    try:
        yield
    finally:
        _VARIANT[0] = old


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


_device = cuda.jit(device=True) if SIMULATOR else cuda.jit(device=True, inline=True)


@_device
def _seq_of(cu, S, t):
    """The sequence holding token t: the largest s < S with ``cu[s] <= t`` (valid cu, t < T)."""
    lo = numba.int64(0)
    hi = numba.int64(S - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if numba.int64(cu[mid]) <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _check(cu, S, T, ok):
    tx = cuda.threadIdx.x
    bad = cuda.shared.array(1, numba.int32)
    if tx == 0:
        bad[0] = 0
    cuda.syncthreads()
    if tx == 0 and (numba.int64(cu[0]) != 0 or numba.int64(cu[S]) != T):
        bad[0] = 1
    s = numba.int64(tx)
    while s < S:
        if cu[s + 1] < cu[s]:
            bad[0] = 1
        s += CHECK_THREADS
    cuda.syncthreads()
    if tx == 0:
        ok[0] = 1 - bad[0]


def check_kernel():
    """The ``@cuda.jit`` dispatcher of :func:`check_cu` (for PTX tests)."""
    k = _CACHE.get("check")
    if k is None:
        _check.__name__ = _check.__qualname__ = "packed_check_cu"
        k = _CACHE["check"] = cuda.jit(_check)
    return k


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


def _make_forward(in_kind, out_kind, per_head, hops, has_x0, vec, unroll):
    load_u = make_vector_load(in_kind, vec)
    aw = 1 if per_head else vec
    load_av = make_vector_load(in_kind, aw)
    store_y = make_vector_store(out_kind, vec)
    HOPS1 = hops == 1
    X0 = has_x0 and HOPS1
    u_size, a_size = unroll * vec, unroll * aw  # local array sizes must be constants

    def kernel(a, u, y, x0, cu, ok, T, S, channels, head_dim, block_len, chunk, groups, nwork):
        tid = cuda.grid(1)
        if tid >= nwork:
            return
        c0 = (tid % groups) * vec
        t_lo = (tid // groups) * chunk
        t_hi = min(t_lo + chunk, T)
        if per_head:
            a_stride = channels // head_dim
            a_col = c0 // head_dim
        else:
            a_stride = channels
            a_col = c0
        out = cuda.local.array(vec, f32)
        if ok[0] == 0:
            for k in range(vec):
                out[k] = NAN
            for t in range(t_lo, t_hi):
                store_y(y, t * channels + c0, out, 0)
            return
        w = cuda.local.array(vec, f32)
        car = cuda.local.array(vec, f32)
        g = cuda.local.array(aw, f32)
        ubuf = cuda.local.array(u_size, f32)
        abuf = cuda.local.array(a_size, f32)

        s = _seq_of(cu, S, t_lo)
        cs = numba.int64(cu[s])
        cn = numba.int64(cu[s + 1])
        # the first block start at or after t_lo: in this sequence, or the next one's first token
        bs = min(cs + (t_lo - cs + block_len - 1) // block_len * block_len, cn)
        have_prev = False
        while bs < t_hi:
            if bs >= cn:  # the next sequence (empty ones are passed over one by one)
                bs = cn
                if bs >= t_hi:
                    break
                s += 1
                cs = cn
                cn = numba.int64(cu[s + 1])
                have_prev = False
                continue
            be = min(bs + block_len, cn)
            first = bs == cs
            # the carry S entering the block, into car
            if HOPS1:
                if first:
                    for k in range(vec):
                        car[k] = x0[s * channels + c0 + k] if X0 else f32(0.0)
                elif have_prev:
                    for k in range(vec):
                        car[k] = w[k]
                else:  # re-walk the block before (whole: it is not a sequence's last block)
                    for k in range(vec):
                        w[k] = f32(0.0)
                    for tb in range(bs - block_len, bs, unroll):
                        for i in range(unroll):
                            tc = min(tb + i, bs - 1)
                            load_u(u, tc * channels + c0, ubuf, i * vec)
                            load_av(a, tc * a_stride + a_col, abuf, i * aw)
                        for i in range(unroll):
                            if tb + i < bs:
                                for k in range(vec):
                                    w[k] = abuf[i * aw + k % aw] * w[k] + ubuf[i * vec + k]
                    for k in range(vec):
                        car[k] = w[k]
            for k in range(vec):
                w[k] = f32(0.0)
            for q in range(aw):
                g[q] = f32(1.0)
            for tb in range(bs, be, unroll):
                for i in range(unroll):
                    tc = min(tb + i, be - 1)
                    load_u(u, tc * channels + c0, ubuf, i * vec)
                    load_av(a, tc * a_stride + a_col, abuf, i * aw)
                for i in range(unroll):
                    if tb + i < be:
                        for k in range(vec):
                            w[k] = abuf[i * aw + k % aw] * w[k] + ubuf[i * vec + k]
                        for q in range(aw):
                            g[q] = g[q] * abuf[i * aw + q]
                        for k in range(vec):
                            if HOPS1:
                                out[k] = w[k] + g[k % aw] * car[k]
                            else:
                                out[k] = w[k]
                        store_y(y, (tb + i) * channels + c0, out, 0)
            have_prev = True
            bs = be

    kernel.__name__ = kernel.__qualname__ = (
        f"packed_forward_blhd_{in_kind}_to_{out_kind}_{'per_head' if per_head else 'per_channel'}"
        f"_hops{hops}{'_x0' if X0 else ''}_vec{vec}_unroll{unroll}"
    )
    return kernel


def forward_kernel(in_kind, out_kind, per_head, hops, has_x0, vec, unroll=FORWARD_UNROLL):
    """The ``@cuda.jit`` forward kernel of one specialisation (cached)."""
    key = ("fwd", in_kind, out_kind, per_head, hops, bool(has_x0 and hops == 1), vec, unroll)
    k = _CACHE.get(key)
    if k is None:
        k = _CACHE[key] = cuda.jit(_make_forward(in_kind, out_kind, per_head, hops,
                                                 has_x0, vec, unroll))
    return k


# ----------------------------------------------------------------------------------------------
# token walks (both layouts): a thread steps through its chunk token by token
# ----------------------------------------------------------------------------------------------


TOKENS_CHUNK = 256
"""Tokens per thread of the BLHD token walks (a multiple of every group length)."""
BHDL_TOKENS_CHUNK = {"fwd": 1024, "bwd": 512}
"""Tokens per thread of the BHDL token walks, forward and backward (rounded up to a multiple of
the access). Longer chunks re-walk less; the backward's checkpoints in shared memory grow with
its chunk (at 512 tokens of bfloat16 they fill 48 KiB at :data:`BHDL_BACKWARD_THREADS`)."""
BHDL_BACKWARD_THREADS = 32 if SIMULATOR else 128
"""Threads per block of the BHDL token backward (its checkpoints live in shared memory:
``chunk / U * 3 * 4`` bytes a thread)."""


def token_chunk(layout, direction, vec):
    """Tokens per thread of a token walk: :data:`TOKENS_CHUNK` (BLHD), else
    :data:`BHDL_TOKENS_CHUNK` of ``direction`` ("fwd" or "bwd") rounded up to ``vec``."""
    if layout == "BLHD":
        return TOKENS_CHUNK
    return -(-BHDL_TOKENS_CHUNK[direction] // vec) * vec


def token_layout(layout, kind, vec):
    """``(VEC, V, U)`` of a token walk: channels a thread owns, elements per access and tokens a
    group. BLHD: ``vec`` channels an access, 8 tokens a group (8 accesses of each array in
    flight). BHDL: one channel row a thread, accesses of ``vec`` consecutive tokens, two of
    them a group (at least 8 tokens)."""
    if layout == "BLHD":
        return vec, 1, 8
    return 1, vec, max(8, 2 * vec)


@_device
def _boundary(cu, t, s, cs, cn, l):
    """At a block boundary t (``t == nb``): the sequence of t (passing over empty ones when t
    ends sequence s) and the next boundary; returns ``(s, cs, cn, nb, first)`` with ``first``
    whether t is its sequence's first token."""
    if t == cn:
        s += 1
        cn = numba.int64(cu[s + 1])
        while cn == t:
            s += 1
            cn = numba.int64(cu[s + 1])
        cs = t
    return s, cs, cn, min(t + l, cn), t == cs


def _make_token_loaders(layout, in_kind, per_head, VEC, V, U):
    """``load(arr, kind_is_a, ...)`` helpers of one group of U tokens into ``buf[i * W + k]``."""
    AW = 1 if per_head else VEC
    if layout == "BLHD":
        load_v = make_vector_load(in_kind, VEC)
        load_a = make_vector_load(in_kind, AW)

        @_device
        def load_group(arr, tb, t_last, C, c0, buf):
            for i in range(U):
                t = min(tb + i, t_last)
                load_v(arr, t * C + c0, buf, i * VEC)

        @_device
        def load_agroup(arr, tb, t_last, a_stride, a_col, buf):
            for i in range(U):
                t = min(tb + i, t_last)
                load_a(arr, t * a_stride + a_col, buf, i * AW)

        return load_group, load_agroup
    load_t = make_vector_load(in_kind, V)
    NV = U // V

    @_device
    def load_rows(arr, tb, t_last, row, T, buf):
        # row-major (rows, T): vectors of V tokens; past the end, the last vector (not used)
        for p in range(NV):
            t = min(tb + p * V, t_last - t_last % V)
            load_t(arr, row * T + t, buf, p * V)

    return load_rows, load_rows


def _make_tokens_forward(layout, in_kind, out_kind, per_head, hops, has_x0, vec):
    VEC, V, U = token_layout(layout, in_kind, vec)
    AW = 1 if per_head else VEC
    HOPS1 = hops == 1
    X0 = has_x0 and HOPS1
    BLHD = layout == "BLHD"
    load_u, load_a = _make_token_loaders(layout, in_kind, per_head, VEC, V, U)
    store_y = make_vector_store(out_kind, VEC if BLHD else V)
    NV = U // V
    UV, UA = U * VEC, U * AW  # local array sizes must be constants

    def kernel(a, u, y, x0, cu, ok, T, S, C, D, block_len, chunk, groups, nwork):
        tid = cuda.grid(1)
        if tid >= nwork:
            return
        c0 = (tid % groups) * VEC  # BLHD: first channel; BHDL: the channel row
        t_lo = (tid // groups) * chunk
        t_hi = min(t_lo + chunk, T)
        if per_head:
            a_stride = C // D
            a_col = c0 // D
        else:
            a_stride = C
            a_col = c0
        out = cuda.local.array(UV, f32)
        if ok[0] == 0:
            for k in range(UV):
                out[k] = NAN
            if BLHD:
                for t in range(t_lo, t_hi):
                    store_y(y, t * C + c0, out, 0)
            else:
                for t in range(t_lo, t_hi, V):
                    store_y(y, c0 * T + t, out, 0)
            return
        w = cuda.local.array(VEC, f32)
        car = cuda.local.array(VEC, f32)
        g = cuda.local.array(AW, f32)
        ub = cuda.local.array(UV, f32)
        ab = cuda.local.array(UA, f32)
        l = block_len
        s = _seq_of(cu, S, t_lo)
        cs = numba.int64(cu[s])
        cn = numba.int64(cu[s + 1])
        # the walk starts at the block before t_lo's block (its carrier), in t_lo's sequence
        bs = cs + (t_lo - cs) // l * l
        p0 = max(cs, bs - l) if HOPS1 else bs
        nb = p0  # the next block boundary
        for k in range(VEC):
            w[k] = f32(0.0)
            car[k] = f32(0.0)
        for q in range(AW):
            g[q] = f32(1.0)
        tstart = p0 if BLHD else p0 - p0 % V
        for tb in range(tstart, t_hi, U):
            if BLHD:
                load_u(u, tb, t_hi - 1, C, c0, ub)
                load_a(a, tb, t_hi - 1, a_stride, a_col, ab)
            else:
                load_u(u, tb, t_hi - 1, c0, T, ub)
                load_a(a, tb, t_hi - 1, a_col, T, ab)
            for i in range(U):
                t = tb + i
                if t >= p0 and t < t_hi:
                    if t == nb:
                        s, cs, cn, nb, first = _boundary(cu, t, s, cs, cn, l)
                        if HOPS1:
                            for k in range(VEC):
                                if first:
                                    car[k] = x0[s * C + c0 + k] if X0 else f32(0.0)
                                else:
                                    car[k] = w[k]
                        for k in range(VEC):
                            w[k] = f32(0.0)
                        for q in range(AW):
                            g[q] = f32(1.0)
                    for k in range(VEC):
                        w[k] = ab[i * AW + k % AW] * w[k] + ub[i * VEC + k]
                    for q in range(AW):
                        g[q] = g[q] * ab[i * AW + q]
                    for k in range(VEC):
                        if HOPS1:
                            out[i * VEC + k] = w[k] + g[k % AW] * car[k]
                        else:
                            out[i * VEC + k] = w[k]
                    if BLHD and t >= t_lo:
                        store_y(y, t * C + c0, out, i * VEC)
            if not BLHD:
                for pv in range(NV):
                    t = tb + pv * V
                    if t >= t_lo and t < t_hi:
                        store_y(y, c0 * T + t, out, pv * V)

    kernel.__name__ = kernel.__qualname__ = (
        f"packed_tokens_forward_{layout.lower()}_{in_kind}_to_{out_kind}"
        f"_{'per_head' if per_head else 'per_channel'}_hops{hops}{'_x0' if X0 else ''}_vec{vec}"
    )
    return kernel


BHDL_SCAN = True
"""BHDL forward: the warp-scan kernel of ``packed_scan`` (a warp a channel row, coalesced along
time, over token marks) where it fits, else the token walk. On by default: on the H200 it took
well under the token walk's time (docs/benchmarks.md#packed-sequences)."""
BHDL_SCAN_CHUNK = 4096
"""Tokens of a row one warp of the warp-scan forward owns (each chunk re-walks 2 block_len)."""
BHDL_SCAN_BWD = True
"""BHDL backward: the warp-chain kernel of ``packed_scan_bwd`` (a warp a head's rows, coalesced
along time, over token marks) where it fits, else the token walk. On by default, as
:data:`BHDL_SCAN`."""
BHDL_SCAN_BWD_CHUNK = 2048
"""Tokens of a row one warp of the warp-chain backward owns."""
BHDL_TILE = False
"""BHDL: the tile walks (:func:`tile_forward_kernel`, :func:`tile_backward_kernel`) where they
fit, instead of the token walks. Off by default: on the H200 they were slower than the token
walks in both directions (scripts/packed_profile.py times both)."""
TILE_TOKENS = 64
TILE_CHUNK = 256


def _make_tile_forward(in_kind, out_kind, per_head, hops, has_x0):
    """The BHDL forward through shared memory: a thread block is one warp and owns 32 channel
    rows and a chunk of tokens, walked a tile of :data:`TILE_TOKENS` tokens at a time. The warp
    copies the tile of u (and of a: each row's head row, or its own row) into shared memory with
    16-byte accesses along the rows (every access instruction covers whole 128-byte row
    segments), then each lane walks its own row through the tile token by token, following
    block and sequence boundaries as the token walk does, and leaves y in the tile, which the
    warp stores as it loaded. Rows are padded to ``TILE_TOKENS + 1`` floats (no bank
    conflicts in the walk). Needs T a multiple of the access's tokens and aligned rows."""
    V = 16 // ITEM_SIZE[in_kind]
    TT = TILE_TOKENS
    LPR = TT // V  # lanes a row segment
    RPI = 32 // LPR  # rows an access instruction
    NI = 32 // RPI  # instructions a tile
    SW = TT + 1
    SMN = 32 * SW  # shared array sizes must be constants
    HOPS1 = hops == 1
    X0 = has_x0 and HOPS1
    load_v = make_vector_load(in_kind, V)
    store_v = make_vector_store(out_kind, V)

    def kernel(a, u, y, x0, cu, ok, T, S, C, D, block_len, chunk, nrg, nwork):
        wid = numba.int64(cuda.blockIdx.x)
        if wid >= nwork:
            return
        lane = numba.int64(cuda.threadIdx.x)
        r0 = (wid % nrg) * 32
        t_lo = (wid // nrg) * chunk
        t_hi = min(t_lo + chunk, T)
        row = r0 + lane
        row_ok = row < C
        sm_u = cuda.shared.array(SMN, f32)
        sm_a = cuda.shared.array(SMN, f32)
        tmp = cuda.local.array(V, f32)
        seg = lane % LPR
        if ok[0] == 0:
            for k in range(V):
                tmp[k] = NAN
            for ii in range(NI):
                rr = r0 + ii * RPI + lane // LPR
                if rr < C:
                    for t in range(t_lo + seg * V, t_hi, TT):
                        store_v(y, rr * T + t, tmp, 0)
            return
        l = block_len
        s = _seq_of(cu, S, t_lo)
        cs = numba.int64(cu[s])
        cn = numba.int64(cu[s + 1])
        bs = cs + (t_lo - cs) // l * l
        p0 = max(cs, bs - l) if HOPS1 else bs
        nb = p0
        w = f32(0.0)
        g = f32(1.0)
        car = f32(0.0)
        base = numba.uint32(lane * SW)
        for tb in range(p0 - p0 % TT, t_hi, TT):
            for ii in range(NI):
                ri = ii * RPI + lane // LPR
                rr = r0 + ri
                t = tb + seg * V
                if rr < C and t < T:
                    load_v(u, rr * T + t, tmp, 0)
                    for k in range(V):
                        sm_u[numba.uint32(ri * SW + seg * V + k)] = tmp[k]
                    if per_head:
                        load_v(a, rr // D * T + t, tmp, 0)
                    else:
                        load_v(a, rr * T + t, tmp, 0)
                    for k in range(V):
                        sm_a[numba.uint32(ri * SW + seg * V + k)] = tmp[k]
            cuda.syncthreads()
            for i in range(TT):
                t = tb + i
                if t >= p0 and t < t_hi:
                    if t == nb:
                        s, cs, cn, nb, first = _boundary(cu, t, s, cs, cn, l)
                        if HOPS1:
                            if first:
                                car = x0[s * C + row] if X0 and row_ok else f32(0.0)
                            else:
                                car = w
                        w = f32(0.0)
                        g = f32(1.0)
                    if row_ok:  # (rows past C: nothing loaded)
                        at = base + numba.uint32(i)
                        av = sm_a[at]
                        w = av * w + sm_u[at]
                        g = g * av
                        sm_u[at] = w + g * car if HOPS1 else w
            cuda.syncthreads()
            for ii in range(NI):
                ri = ii * RPI + lane // LPR
                rr = r0 + ri
                t = tb + seg * V
                if rr < C and t >= t_lo and t < t_hi:
                    for k in range(V):
                        tmp[k] = sm_u[numba.uint32(ri * SW + seg * V + k)]
                    store_v(y, rr * T + t, tmp, 0)
            cuda.syncthreads()

    kernel.__name__ = kernel.__qualname__ = (
        f"packed_tile_forward_bhdl_{in_kind}_to_{out_kind}"
        f"_{'per_head' if per_head else 'per_channel'}_hops{hops}{'_x0' if X0 else ''}"
    )
    return kernel


def tile_forward_kernel(in_kind, out_kind, per_head, hops, has_x0):
    """The ``@cuda.jit`` BHDL tile forward of one specialisation (cached)."""
    key = ("tile", in_kind, out_kind, per_head, hops, bool(has_x0 and hops == 1))
    k = _CACHE.get(key)
    if k is None:
        k = _CACHE[key] = cuda.jit(_make_tile_forward(in_kind, out_kind, per_head, hops,
                                                      has_x0))
    return k


def _make_tile_backward(in_kind, dy_kind, per_head, hops, has_x0, D):
    """The BHDL backward through shared memory (the tile forward's layout: a warp, 32 rows, a
    chunk walked a tile of :data:`TILE_TOKENS` tokens at a time, tiles copied in and out with
    whole row segments), in the token backward's two passes: a reverse pass over tiles of dy
    and a from the end of the block after the one holding the chunk's end, keeping each lane's
    reverse state (L, Z, A) at every tile start of the chunk; then a forward pass over tiles of
    u, dy and a from the block before the chunk's first block: per tile the block and sequence
    starts of its tokens (once, for the warp), the reverse quantities from the tile's
    checkpoint (lam in place of dy, z beside it), the forward walk giving da of each row in
    place of a and ``dx0``, per head the sums of da over the head's D rows (D divides 32), and
    the copies out of du and da."""
    V = 16 // max(ITEM_SIZE[in_kind], ITEM_SIZE[dy_kind])
    TT = TILE_TOKENS
    LPR = TT // V
    RPI = 32 // LPR
    NI = 32 // RPI
    SW = TT + 1
    SMN = 32 * SW
    NT = TILE_CHUNK // TT
    CKN = NT * 3 * 32
    HOPS1 = hops == 1
    X0 = has_x0 and HOPS1
    PH = per_head
    HPW = 32 // D if per_head else 32  # heads (da rows) a warp
    NIH = -(-HPW // RPI)
    load_u = make_vector_load(in_kind, V)
    load_d = make_vector_load(dy_kind, V)
    store_v = make_vector_store(in_kind, V)

    def kernel(a, u, dy, da, du, x0, dx0, cu, ok, T, S, C, Dr, block_len, nrg, nwork):
        wid = numba.int64(cuda.blockIdx.x)
        if wid >= nwork:
            return
        lane = numba.int64(cuda.threadIdx.x)
        r0 = (wid % nrg) * 32
        t_lo = (wid // nrg) * TILE_CHUNK
        t_hi = min(t_lo + TILE_CHUNK, T)
        row = r0 + lane
        row_ok = row < C
        H = C // Dr
        sm_u = cuda.shared.array(SMN, f32)
        sm_d = cuda.shared.array(SMN, f32)
        sm_a = cuda.shared.array(SMN, f32)
        sm_z = cuda.shared.array(SMN, f32)
        sm_ck = cuda.shared.array(CKN, f32)
        sm_code = cuda.shared.array(TT, numba.int64)
        tmp = cuda.local.array(V, f32)
        seg = lane % LPR
        base = numba.uint32(lane * SW)
        if ok[0] == 0:
            for k in range(V):
                tmp[k] = NAN
            for ii in range(NI):
                rr = r0 + ii * RPI + lane // LPR
                if rr < C:
                    for t in range(t_lo + seg * V, t_hi, TT):
                        store_v(du, rr * T + t, tmp, 0)
                        if not PH:
                            store_v(da, rr * T + t, tmp, 0)
            if PH:
                for ii in range(NIH):
                    hr = r0 // Dr + ii * RPI + lane // LPR
                    if ii * RPI + lane // LPR < HPW and hr < H:
                        for t in range(t_lo + seg * V, t_hi, TT):
                            store_v(da, hr * T + t, tmp, 0)
            if X0 and t_lo == 0 and row_ok:
                for s in range(S):
                    dx0[s * C + row] = NAN
            return
        l = block_len

        # ---- pass 1: reverse, tiles of dy and a from pe down to t_lo
        pe = T
        if t_hi < T:
            s2 = _seq_of(cu, S, t_hi)
            cs2 = numba.int64(cu[s2])
            cn2 = numba.int64(cu[s2 + 1])
            bk = cs2 + (t_hi - cs2) // l * l
            if t_hi == cs2:
                pe = t_hi
            elif t_hi == bk:
                pe = min(bk + l, cn2)
            else:
                pe = min(bk + 2 * l, cn2)
        s = _seq_of(cu, S, pe - 1)
        cs = numba.int64(cu[s])
        pb = cs + (pe - 1 - cs) // l * l
        L = f32(0.0)
        Z = f32(0.0)
        A = f32(1.0)
        ntl = (pe - t_lo + TT - 1) // TT
        for ti in range(ntl - 1, -1, -1):
            tb = t_lo + ti * TT
            if ti < NT:
                at = numba.uint32(ti * 96 + lane)
                sm_ck[at] = L
                sm_ck[at + 32] = Z
                sm_ck[at + 64] = A
            for ii in range(NI):
                ri = ii * RPI + lane // LPR
                rr = r0 + ri
                t = tb + seg * V
                if rr < C and t < T:
                    load_d(dy, rr * T + t, tmp, 0)
                    for k in range(V):
                        sm_d[numba.uint32(ri * SW + seg * V + k)] = tmp[k]
                    load_u(a, (rr // Dr if PH else rr) * T + t, tmp, 0)
                    for k in range(V):
                        sm_a[numba.uint32(ri * SW + seg * V + k)] = tmp[k]
            cuda.syncthreads()
            for r in range(TT):
                i = TT - 1 - r
                t = tb + i
                if t < pe:
                    dv = sm_d[base + numba.uint32(i)] if row_ok else f32(0.0)
                    lam = dv + A * L
                    zk = dv + A * Z
                    av = sm_a[base + numba.uint32(i)] if row_ok else f32(0.0)
                    if t == pb:
                        L = av * zk if HOPS1 and t != cs else f32(0.0)
                        Z = f32(0.0)
                        A = f32(1.0)
                        if t == cs:
                            if t > 0:
                                s -= 1
                                while numba.int64(cu[s]) == t:
                                    s -= 1
                                cs = numba.int64(cu[s])
                                pb = cs + (t - 1 - cs) // l * l
                        else:
                            pb = t - l
                    else:
                        L = lam
                        Z = zk
                        A = av
            cuda.syncthreads()

        # ---- pass 2: forward, from the block before t_lo's block
        s = _seq_of(cu, S, t_lo)
        cs = numba.int64(cu[s])
        cn = numba.int64(cu[s + 1])
        bs = cs + (t_lo - cs) // l * l
        p0 = max(cs, bs - l) if HOPS1 else bs
        nb = p0
        w = f32(0.0)
        g = f32(1.0)
        car = f32(0.0)
        for tb in range(p0 - p0 % TT, t_hi, TT):
            inside = tb >= t_lo
            for ii in range(NI):
                ri = ii * RPI + lane // LPR
                rr = r0 + ri
                t = tb + seg * V
                if rr < C and t < T:
                    load_u(u, rr * T + t, tmp, 0)
                    for k in range(V):
                        sm_u[numba.uint32(ri * SW + seg * V + k)] = tmp[k]
                    load_u(a, (rr // Dr if PH else rr) * T + t, tmp, 0)
                    for k in range(V):
                        sm_a[numba.uint32(ri * SW + seg * V + k)] = tmp[k]
                    if inside:
                        load_d(dy, rr * T + t, tmp, 0)
                        for k in range(V):
                            sm_d[numba.uint32(ri * SW + seg * V + k)] = tmp[k]
            # block and sequence starts of the tile's tokens (-1 inside a block, -2 a block
            # start, s at a sequence's first token): every lane follows them, lane 0 writes
            for i in range(TT):
                t = tb + i
                code = numba.int64(-1)
                if t >= p0 and t < pe and t == nb:
                    s, cs, cn, nb, first = _boundary(cu, t, s, cs, cn, l)
                    code = s if first else numba.int64(-2)
                if lane == 0:
                    sm_code[i] = code
            cuda.syncthreads()
            if not inside:
                for i in range(TT):
                    t = tb + i
                    if t >= p0 and t < t_lo and row_ok:
                        code = sm_code[i]
                        if code != -1:
                            if HOPS1:
                                if code >= 0:
                                    car = x0[code * C + row] if X0 and row_ok else f32(0.0)
                                else:
                                    car = w
                            w = f32(0.0)
                            g = f32(1.0)
                        at = base + numba.uint32(i)
                        av = sm_a[at]
                        w = av * w + sm_u[at]
                        g = g * av
                cuda.syncthreads()
                continue
            # the reverse quantities of the tile from its checkpoint: lam in place of dy, z
            ti = (tb - t_lo) // TT
            ck = numba.uint32(ti * 96 + lane)
            L = sm_ck[ck]
            Z = sm_ck[ck + 32]
            A = sm_ck[ck + 64]
            for r in range(TT):
                i = TT - 1 - r
                if tb + i < pe and row_ok:
                    at = base + numba.uint32(i)
                    dv = sm_d[at]
                    lam = dv + A * L
                    zk = dv + A * Z
                    sm_d[at] = lam
                    sm_z[at] = zk
                    code = sm_code[i]
                    if code != -1:
                        L = sm_a[at] * zk if HOPS1 and code < 0 else f32(0.0)
                        Z = f32(0.0)
                        A = f32(1.0)
                    else:
                        L = lam
                        Z = zk
                        A = sm_a[at]
            # the forward walk: da of this row in place of a, dx0
            for i in range(TT):
                t = tb + i
                if t < t_hi and row_ok:
                    at = base + numba.uint32(i)
                    code = sm_code[i]
                    av = sm_a[at]
                    zk = sm_z[at]
                    if code != -1:
                        if HOPS1:
                            if code >= 0:
                                car = x0[code * C + row] if X0 and row_ok else f32(0.0)
                            else:
                                car = w
                        w = f32(0.0)
                        g = f32(1.0)
                        if X0 and code >= 0:
                            dx0[code * C + row] = av * zk
                    dk = sm_d[at] * w
                    if HOPS1:
                        dk += car * zk * g
                    w = av * w + sm_u[at]
                    g = g * av
                    sm_a[at] = dk
            cuda.syncthreads()
            if PH:  # per head: da summed over the head's D rows, into sm_z's first rows
                for pi in range(lane, HPW * TT, 32):
                    hh = pi // TT
                    i = pi - hh * TT
                    tot = f32(0.0)
                    for dd in range(D):
                        tot += sm_a[numba.uint32((hh * D + dd) * SW + i)]
                    sm_z[numba.uint32(hh * SW + i)] = tot
                cuda.syncthreads()
            for ii in range(NI):
                ri = ii * RPI + lane // LPR
                rr = r0 + ri
                t = tb + seg * V
                if rr < C and t < t_hi:
                    for k in range(V):
                        tmp[k] = sm_d[numba.uint32(ri * SW + seg * V + k)]
                    store_v(du, rr * T + t, tmp, 0)
                    if not PH:
                        for k in range(V):
                            tmp[k] = sm_a[numba.uint32(ri * SW + seg * V + k)]
                        store_v(da, rr * T + t, tmp, 0)
            if PH:
                for ii in range(NIH):
                    hi = ii * RPI + lane // LPR
                    hr = r0 // Dr + hi
                    t = tb + seg * V
                    if hi < HPW and hr < H and t < t_hi:
                        for k in range(V):
                            tmp[k] = sm_z[numba.uint32(hi * SW + seg * V + k)]
                        store_v(da, hr * T + t, tmp, 0)
            cuda.syncthreads()

    kernel.__name__ = kernel.__qualname__ = (
        f"packed_tile_backward_bhdl_{in_kind}_dy_{dy_kind}"
        f"_{'per_head' if per_head else 'per_channel'}_hops{hops}{'_x0' if X0 else ''}_d{D}"
        f"_chunk{TILE_CHUNK}"
    )
    return kernel


def tile_backward_kernel(in_kind, dy_kind, per_head, hops, has_x0, D):
    """The ``@cuda.jit`` BHDL tile backward of one specialisation (cached; D matters per head
    only)."""
    D = D if per_head else 1
    key = ("tileb", in_kind, dy_kind, per_head, hops, bool(has_x0 and hops == 1), D,
           TILE_CHUNK)
    k = _CACHE.get(key)
    if k is None:
        k = _CACHE[key] = cuda.jit(_make_tile_backward(in_kind, dy_kind, per_head, hops,
                                                       has_x0, D))
    return k


def tile_backward_fits(in_kind, dy_kind, per_head, D, T, aligned=None):
    """The BHDL tile backward: accesses of 16 bytes of the wider of u and dy, T a multiple of
    their tokens, ``aligned(vec)``; per head D divides 32 (a warp's rows are whole heads)."""
    V = 16 // max(ITEM_SIZE[in_kind], ITEM_SIZE[dy_kind])
    if per_head and (D > 32 or 32 % D):
        return False
    return BHDL_TILE and T % V == 0 and (aligned is None or aligned(V))


def tile_forward_fits(in_kind, out_kind, T, aligned=None):
    """The tile walk's accesses: 16 bytes of u (at most 16 bytes of y a piece), T a multiple of
    their tokens, ``aligned(vec)`` (u, y and a)."""
    V = 16 // ITEM_SIZE[in_kind]
    return BHDL_TILE and T % V == 0 and (aligned is None or aligned(V))


def tokens_forward_kernel(layout, in_kind, out_kind, per_head, hops, has_x0, vec):
    """The ``@cuda.jit`` token-walk forward of one specialisation (cached)."""
    key = ("tfwd", layout, in_kind, out_kind, per_head, hops, bool(has_x0 and hops == 1), vec)
    k = _CACHE.get(key)
    if k is None:
        k = _CACHE[key] = cuda.jit(_make_tokens_forward(layout, in_kind, out_kind, per_head,
                                                        hops, has_x0, vec))
    return k


if SIMULATOR:  # a thread block is one head's lanes there

    def _sim_xor(x, bit, mask):
        return shfl_idx(x, (cuda.threadIdx.x % 32) ^ bit)

    _xor = cuda.jit(device=True)(_sim_xor)

else:

    @cuda.jit(device=True, inline=True)
    def _xor(x, bit, mask):
        return cuda.shfl_xor_sync(mask, x, bit)


def _make_head_scatter(steps, lph, kind):
    """``scatter(red, lane, mask, da, at, n)``: the sums over a head's ``lph`` lanes (a power
    of two) of ``red[:steps]`` (each lane's values of ``steps`` consecutive tokens), stored as
    ``da[at + i]`` for ``i < n``, by a shuffle reduce-scatter: each round halves the tokens a
    lane holds (``steps - 1`` shuffles a lane in all where ``steps >= lph``, against
    ``steps * log2(lph)`` for a butterfly sum per token), and each sum is stored once by the
    lane that owns it (the idea of the dense BHDL backward's scatter)."""
    rounds = lph.bit_length() - 1
    store_s = STORE[kind]

    @_device
    def scatter(red, lane, mask, da, at, n):
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
                if off + i < n:
                    da[at + off + i] = store_s(red[i])

    return scatter


def _make_tokens_backward(layout, in_kind, dy_kind, per_head, hops, has_x0, vec, lph, chunk):
    """The token-walk backward (docs/spec.md#gradients, per virtual block as
    :func:`backward_kernel`), in two passes over the thread's chunk:

    1. reverse, from the end of the block after the one holding the chunk's end (or the end of
       that sequence) down to the chunk's first token: the reverse state entering each token t
       as ``lam_t = dy_t + A L``, ``z_t = dy_t + A Z`` (``A = a_{t+1}``, ``L = lam_{t+1}``,
       ``Z = z_{t+1}`` inside a block; at a block's last token ``A = 1``, ``Z = 0`` and
       ``L = q_{j+1} = a z`` at the next block's first token, 0 before a sequence start), kept
       at every group boundary of the chunk (``chunk / U`` checkpoints);
    2. forward, from the block before the one holding the chunk's first token: per group of U
       tokens, the reverse quantities of the group again from its checkpoint (in registers),
       then the forward walk (``w_{t-1}``, ``g_{t-1}``, the carry S) giving ``du_t = lam_t``
       and ``da_t = lam_t w_{t-1} + S z_t g_{t-1}``, and ``dx0[s] = a z`` at a sequence's first
       token.

    dy and a are read twice (once a pass), u once; per-head ``da`` is summed over the head's
    ``lph`` lanes with shuffles."""
    VEC, V, U = token_layout(layout, in_kind, vec)
    AW = 1 if per_head else VEC
    HOPS1 = hops == 1
    X0 = has_x0 and HOPS1
    BLHD = layout == "BLHD"
    load_u, load_a = _make_token_loaders(layout, in_kind, per_head, VEC, V, U)
    load_d, _ = _make_token_loaders(layout, dy_kind, per_head, VEC, V, U)
    SW = VEC if BLHD else V  # elements a store
    store_u = make_vector_store(in_kind, SW)
    store_a = make_vector_store(in_kind, AW if BLHD else V)
    NV = U // V
    UV, UA = U * VEC, U * AW
    NG = -(-chunk // U)
    SCATTER = per_head and layout != "BLHD"  # BHDL per head: da of a group by a reduce-scatter
    head_scatter = _make_head_scatter(U, lph, in_kind)
    CKL, CKA = NG * VEC, NG * AW  # checkpoints (run-time indexed: local memory)
    TB = BHDL_BACKWARD_THREADS
    CKS = 1 if BLHD else NG * 3 * TB  # BHDL: the checkpoints in shared memory
    OA = UA if BLHD else U
    PH = per_head

    def kernel(a, u, dy, da, du, x0, dx0, cu, ok, T, S, C, D, block_len, groups, nwork):
        tid = cuda.grid(1)
        if tid >= nwork:
            return
        c0 = (tid % groups) * VEC  # BLHD: first channel; BHDL: the channel row
        t_lo = (tid // groups) * chunk
        t_hi = min(t_lo + chunk, T)
        if PH:
            a_stride = C // D
            a_col = c0 // D
            lead = c0 % D == 0
        else:
            a_stride = C
            a_col = c0
            lead = True
        lane = cuda.threadIdx.x % 32
        mask = numba.uint32(((numba.int64(1) << lph) - 1) << (lane - lane % lph))
        ov = cuda.local.array(UV, f32)
        oa = cuda.local.array(OA, f32)
        if ok[0] == 0:
            for k in range(UV):
                ov[k] = NAN
            for k in range(OA):
                oa[k] = NAN
            if BLHD:
                for t in range(t_lo, t_hi):
                    store_u(du, t * C + c0, ov, 0)
                    if lead:
                        store_a(da, t * a_stride + a_col, oa, 0)
            else:
                for t in range(t_lo, t_hi, V):
                    store_u(du, c0 * T + t, ov, 0)
                    if lead:
                        store_a(da, a_col * T + t, oa, 0)
            if X0 and t_lo == 0:
                for s in range(S):
                    for k in range(VEC):
                        dx0[s * C + c0 + k] = NAN
            return
        l = block_len
        ub = cuda.local.array(UV, f32)
        db = cuda.local.array(UV, f32)
        ab = cuda.local.array(UA, f32)
        lamp = cuda.local.array(UV, f32)
        zp = cuda.local.array(UV, f32)
        code = cuda.local.array(U, numba.int64)  # -1 inside a block, -2 a block start, s >= 0
        L = cuda.local.array(VEC, f32)
        Z = cuda.local.array(VEC, f32)
        A = cuda.local.array(AW, f32)
        ckL = cuda.local.array(CKL if BLHD else 1, f32)
        ckZ = cuda.local.array(CKL if BLHD else 1, f32)
        ckA = cuda.local.array(CKA if BLHD else 1, f32)
        cks = cuda.shared.array(CKS, f32)  # [(group * 3 + (L, Z, A)) * TB + thread]
        tx = numba.uint32(cuda.threadIdx.x)
        w = cuda.local.array(VEC, f32)
        car = cuda.local.array(VEC, f32)
        g = cuda.local.array(AW, f32)

        # ---- pass 1: reverse, from pe down to t_lo
        pe = T
        if t_hi < T:
            s2 = _seq_of(cu, S, t_hi)
            cs2 = numba.int64(cu[s2])
            cn2 = numba.int64(cu[s2 + 1])
            bk = cs2 + (t_hi - cs2) // l * l
            if t_hi == cs2:
                pe = t_hi
            elif t_hi == bk:
                pe = min(bk + l, cn2)
            else:
                pe = min(bk + 2 * l, cn2)
        s = _seq_of(cu, S, pe - 1)
        cs = numba.int64(cu[s])
        pb = cs + (pe - 1 - cs) // l * l  # first token of the block being walked
        for k in range(VEC):
            L[k] = f32(0.0)
            Z[k] = f32(0.0)
        for q in range(AW):
            A[q] = f32(1.0)
        ngr = (pe - t_lo + U - 1) // U
        for gr in range(ngr - 1, -1, -1):
            tb = t_lo + gr * U
            if gr < NG:
                if BLHD:
                    for k in range(VEC):
                        ckL[gr * VEC + k] = L[k]
                        ckZ[gr * VEC + k] = Z[k]
                    for q in range(AW):
                        ckA[gr * AW + q] = A[q]
                else:
                    at = numba.uint32(gr * 3 * TB) + tx
                    cks[at] = L[0]
                    cks[at + TB] = Z[0]
                    cks[at + 2 * TB] = A[0]
            if BLHD:
                load_d(dy, tb, pe - 1, C, c0, db)
                load_a(a, tb, pe - 1, a_stride, a_col, ab)
            else:
                load_d(dy, tb, T - 1, c0, T, db)
                load_a(a, tb, T - 1, a_col, T, ab)
            for r in range(U):
                i = U - 1 - r
                t = tb + i
                if t < pe:
                    for k in range(VEC):
                        lam = db[i * VEC + k] + A[k % AW] * L[k]
                        zk = db[i * VEC + k] + A[k % AW] * Z[k]
                        if t == pb:
                            L[k] = ab[i * AW + k % AW] * zk if HOPS1 and t != cs else f32(0.0)
                            Z[k] = f32(0.0)
                        else:
                            L[k] = lam
                            Z[k] = zk
                    if t == pb:
                        for q in range(AW):
                            A[q] = f32(1.0)
                        if t == cs:
                            if t > 0:
                                s -= 1
                                while numba.int64(cu[s]) == t:
                                    s -= 1
                                cs = numba.int64(cu[s])
                                pb = cs + (t - 1 - cs) // l * l
                        else:
                            pb = t - l
                    else:
                        for q in range(AW):
                            A[q] = ab[i * AW + q]

        # ---- pass 2: forward, from the block before t_lo's block
        s = _seq_of(cu, S, t_lo)
        cs = numba.int64(cu[s])
        cn = numba.int64(cu[s + 1])
        bs = cs + (t_lo - cs) // l * l
        p0 = max(cs, bs - l) if HOPS1 else bs
        nb = p0
        for k in range(VEC):
            w[k] = f32(0.0)
            car[k] = f32(0.0)
        for q in range(AW):
            g[q] = f32(1.0)
        tstart = p0 if BLHD else p0 - p0 % V
        for tb in range(tstart, t_lo, U):  # the walk before the chunk: the state at t_lo
            if BLHD:
                load_u(u, tb, t_lo - 1, C, c0, ub)
                load_a(a, tb, t_lo - 1, a_stride, a_col, ab)
            else:
                load_u(u, tb, T - 1, c0, T, ub)
                load_a(a, tb, T - 1, a_col, T, ab)
            for i in range(U):
                t = tb + i
                if t >= p0 and t < t_lo:
                    if t == nb:
                        s, cs, cn, nb, first = _boundary(cu, t, s, cs, cn, l)
                        for k in range(VEC):
                            if HOPS1:
                                if first:
                                    car[k] = x0[s * C + c0 + k] if X0 else f32(0.0)
                                else:
                                    car[k] = w[k]
                            w[k] = f32(0.0)
                        for q in range(AW):
                            g[q] = f32(1.0)
                    for k in range(VEC):
                        w[k] = ab[i * AW + k % AW] * w[k] + ub[i * VEC + k]
                    for q in range(AW):
                        g[q] = g[q] * ab[i * AW + q]
        for gr in range(NG):
            tb = t_lo + gr * U
            if tb >= t_hi:
                break
            if BLHD:
                load_u(u, tb, pe - 1, C, c0, ub)
                load_d(dy, tb, pe - 1, C, c0, db)
                load_a(a, tb, pe - 1, a_stride, a_col, ab)
            else:
                load_u(u, tb, T - 1, c0, T, ub)
                load_d(dy, tb, T - 1, c0, T, db)
                load_a(a, tb, T - 1, a_col, T, ab)
            # block and sequence starts of the group's tokens
            for i in range(U):
                t = tb + i
                code[i] = -1
                if t < pe and t == nb:
                    s, cs, cn, nb, first = _boundary(cu, t, s, cs, cn, l)
                    code[i] = s if first else -2
            # the reverse quantities from the group's checkpoint
            if BLHD:
                for k in range(VEC):
                    L[k] = ckL[gr * VEC + k]
                    Z[k] = ckZ[gr * VEC + k]
                for q in range(AW):
                    A[q] = ckA[gr * AW + q]
            else:
                at = numba.uint32(gr * 3 * TB) + tx
                L[0] = cks[at]
                Z[0] = cks[at + TB]
                A[0] = cks[at + 2 * TB]
            for r in range(U):
                i = U - 1 - r
                if tb + i < pe:
                    for k in range(VEC):
                        lam = db[i * VEC + k] + A[k % AW] * L[k]
                        zk = db[i * VEC + k] + A[k % AW] * Z[k]
                        lamp[i * VEC + k] = lam
                        zp[i * VEC + k] = zk
                        if code[i] != -1:
                            L[k] = ab[i * AW + k % AW] * zk if HOPS1 and code[i] < 0 \
                                else f32(0.0)
                            Z[k] = f32(0.0)
                        else:
                            L[k] = lam
                            Z[k] = zk
                    for q in range(AW):
                        A[q] = f32(1.0) if code[i] != -1 else ab[i * AW + q]
            # the forward walk and the gradients
            for i in range(U):
                t = tb + i
                if t < t_hi:
                    if code[i] != -1:
                        for k in range(VEC):
                            if HOPS1:
                                if code[i] >= 0:
                                    car[k] = x0[code[i] * C + c0 + k] if X0 else f32(0.0)
                                else:
                                    car[k] = w[k]
                            w[k] = f32(0.0)
                        for q in range(AW):
                            g[q] = f32(1.0)
                        if X0 and code[i] >= 0:
                            for k in range(VEC):
                                dx0[code[i] * C + c0 + k] = ab[i * AW + k % AW] * zp[i * VEC + k]
                    pa = f32(0.0)
                    for k in range(VEC):
                        lam = lamp[i * VEC + k]
                        ov[i * VEC + k] = lam
                        dk = lam * w[k]
                        if HOPS1:
                            dk += car[k] * zp[i * VEC + k] * g[k % AW]
                        if PH:
                            pa += dk
                        elif BLHD:
                            oa[i * VEC + k] = dk
                        else:
                            oa[i] = dk
                    for k in range(VEC):
                        w[k] = ab[i * AW + k % AW] * w[k] + ub[i * VEC + k]
                    for q in range(AW):
                        g[q] = g[q] * ab[i * AW + q]
                    if SCATTER:
                        oa[i] = pa
                    elif PH:
                        pa = head_sum(pa, lph, mask)
                        oa[i] = pa
                    if BLHD:
                        store_u(du, t * C + c0, ov, i * VEC)
                        if lead:
                            store_a(da, t * a_stride + a_col, oa, i * AW)
            if not BLHD:
                for pv in range(NV):
                    t = tb + pv * V
                    if t < t_hi:
                        store_u(du, c0 * T + t, ov, pv * V)
                        if lead and not SCATTER:
                            store_a(da, a_col * T + t, oa, pv * V)
                if SCATTER:
                    for i in range(U):
                        if tb + i >= t_hi:
                            oa[i] = f32(0.0)
                    head_scatter(oa, lane, mask, da, a_col * T + tb, t_hi - tb)

    kernel.__name__ = kernel.__qualname__ = (
        f"packed_tokens_backward_{layout.lower()}_{in_kind}_dy_{dy_kind}"
        f"_{'per_head' if per_head else 'per_channel'}_hops{hops}{'_x0' if X0 else ''}"
        f"_vec{vec}_lph{lph}_chunk{chunk}"
    )
    return kernel


def tokens_backward_kernel(layout, in_kind, dy_kind, per_head, hops, has_x0, vec, lph, chunk):
    """The ``@cuda.jit`` token-walk backward of one specialisation (cached)."""
    key = ("tbwd", layout, in_kind, dy_kind, per_head, hops, bool(has_x0 and hops == 1), vec,
           lph, chunk)
    k = _CACHE.get(key)
    if k is None:
        k = _CACHE[key] = cuda.jit(_make_tokens_backward(layout, in_kind, dy_kind, per_head,
                                                         hops, has_x0, vec, lph, chunk))
    return k


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


def _make_backward(in_kind, dy_kind, per_head, hops, has_x0, vec, lb, lph):
    load_u = make_vector_load(in_kind, vec)
    load_dy = make_vector_load(dy_kind, vec)
    aw = 1 if per_head else vec
    load_av = make_vector_load(in_kind, aw)
    store_u = make_vector_store(in_kind, vec)
    store_a = make_vector_store(in_kind, aw)
    HOPS1 = hops == 1
    X0 = has_x0 and HOPS1
    la_size, lv_size = lb * aw, lb * vec  # local array sizes must be constants

    def kernel(a, u, dy, da, du, x0, dx0, cu, ok, T, S, channels, head_dim, block_len, chunk,
               groups, nwork):
        tid = cuda.grid(1)
        if tid >= nwork:
            return
        c0 = (tid % groups) * vec
        t_lo = (tid // groups) * chunk
        t_hi = min(t_lo + chunk, T)
        if per_head:
            a_stride = channels // head_dim
            a_col = c0 // head_dim
            lead = c0 % head_dim == 0  # the lane that stores the head's da
        else:
            a_stride = channels
            a_col = c0
            lead = True
        lane = cuda.threadIdx.x % 32
        mask = numba.uint32(((numba.int64(1) << lph) - 1) << (lane - lane % lph))
        ov = cuda.local.array(vec, f32)
        oa = cuda.local.array(aw, f32)
        if ok[0] == 0:
            for k in range(vec):
                ov[k] = NAN
            for q in range(aw):
                oa[q] = NAN
            for t in range(t_lo, t_hi):
                store_u(du, t * channels + c0, ov, 0)
                if lead:
                    store_a(da, t * a_stride + a_col, oa, 0)
            if X0 and t_lo == 0:
                for s in range(S):
                    for k in range(vec):
                        dx0[s * channels + c0 + k] = NAN
            return
        w = cuda.local.array(vec, f32)
        car = cuda.local.array(vec, f32)
        g = cuda.local.array(aw, f32)
        q = cuda.local.array(vec, f32)
        lam = cuda.local.array(vec, f32)
        zz = cuda.local.array(vec, f32)
        an = cuda.local.array(aw, f32)
        ab = cuda.local.array(la_size, f32)
        wp = cuda.local.array(lv_size, f32)
        gp = cuda.local.array(la_size, f32)
        db = cuda.local.array(lv_size, f32)
        ub = cuda.local.array(lv_size, f32)

        s = _seq_of(cu, S, t_lo)
        cs = numba.int64(cu[s])
        cn = numba.int64(cu[s + 1])
        # the first block start at or after t_lo: in this sequence, or the next one's first token
        bs = min(cs + (t_lo - cs + block_len - 1) // block_len * block_len, cn)
        have_prev = False
        while bs < t_hi:
            if bs >= cn:
                bs = cn
                if bs >= t_hi:
                    break
                s += 1
                cs = cn
                cn = numba.int64(cu[s + 1])
                have_prev = False
                continue
            be = min(bs + block_len, cn)
            n = be - bs
            first = bs == cs
            if HOPS1:
                # S entering the block
                if first:
                    for k in range(vec):
                        car[k] = x0[s * channels + c0 + k] if X0 else f32(0.0)
                elif have_prev:
                    for k in range(vec):
                        car[k] = w[k]
                else:
                    p0 = bs - block_len
                    for i in range(lb):
                        load_u(u, (p0 + i) * channels + c0, ub, i * vec)
                        load_av(a, (p0 + i) * a_stride + a_col, ab, i * aw)
                    for k in range(vec):
                        w[k] = f32(0.0)
                    for i in range(lb):
                        for k in range(vec):
                            w[k] = ab[i * aw + k % aw] * w[k] + ub[i * vec + k]
                    for k in range(vec):
                        car[k] = w[k]
                # q of the next block of the sequence (0 after its last block)
                for k in range(vec):
                    q[k] = f32(0.0)
                if be < cn:
                    m = min(be + block_len, cn) - be
                    for i in range(lb):
                        tc = be + min(i, m - 1)
                        load_dy(dy, tc * channels + c0, db, i * vec)
                        load_av(a, tc * a_stride + a_col, ab, i * aw)
                    for qq in range(aw):
                        g[qq] = f32(1.0)
                    for i in range(lb):
                        if i < m:
                            for qq in range(aw):
                                g[qq] = g[qq] * ab[i * aw + qq]
                            for k in range(vec):
                                q[k] += g[k % aw] * db[i * vec + k]
            # the block: loads (clamped into it), then the forward states before each step
            for i in range(lb):
                tc = bs + min(i, n - 1)
                load_u(u, tc * channels + c0, ub, i * vec)
                load_dy(dy, tc * channels + c0, db, i * vec)
                load_av(a, tc * a_stride + a_col, ab, i * aw)
            for k in range(vec):
                w[k] = f32(0.0)
            for qq in range(aw):
                g[qq] = f32(1.0)
            for i in range(lb):
                if i < n:
                    for k in range(vec):
                        wp[i * vec + k] = w[k]
                        w[k] = ab[i * aw + k % aw] * w[k] + ub[i * vec + k]
                    for qq in range(aw):
                        gp[i * aw + qq] = g[qq]
                        g[qq] = g[qq] * ab[i * aw + qq]
            # reverse sweep
            for k in range(vec):
                lam[k] = q[k] if HOPS1 else f32(0.0)
                zz[k] = f32(0.0)
            for qq in range(aw):
                an[qq] = f32(1.0)
            for r in range(lb):
                i = lb - 1 - r
                if i < n:
                    pa = f32(0.0)
                    for qq in range(aw):
                        oa[qq] = f32(0.0)
                    for k in range(vec):
                        lam[k] = db[i * vec + k] + an[k % aw] * lam[k]
                        ov[k] = lam[k]
                        d = lam[k] * wp[i * vec + k]
                        if HOPS1:
                            zz[k] = db[i * vec + k] + an[k % aw] * zz[k]
                            d += car[k] * zz[k] * gp[i * aw + k % aw]
                        if per_head:
                            pa += d
                        else:
                            oa[k] = d
                    t = bs + i
                    store_u(du, t * channels + c0, ov, 0)
                    if per_head:
                        pa = head_sum(pa, lph, mask)
                        oa[0] = pa
                    if lead:
                        store_a(da, t * a_stride + a_col, oa, 0)
                    for qq in range(aw):
                        an[qq] = ab[i * aw + qq]
            if X0 and first:
                for k in range(vec):
                    dx0[s * channels + c0 + k] = an[k % aw] * zz[k]
            have_prev = True
            bs = be

    kernel.__name__ = kernel.__qualname__ = (
        f"packed_backward_blhd_{in_kind}_dy_{dy_kind}_{'per_head' if per_head else 'per_channel'}"
        f"_hops{hops}{'_x0' if X0 else ''}_vec{vec}_l{lb}_lph{lph}"
    )
    return kernel


def backward_kernel(in_kind, dy_kind, per_head, hops, has_x0, vec, lb, lph):
    """The ``@cuda.jit`` backward kernel of one specialisation (cached)."""
    key = ("bwd", in_kind, dy_kind, per_head, hops, bool(has_x0 and hops == 1), vec, lb, lph)
    k = _CACHE.get(key)
    if k is None:
        k = _CACHE[key] = cuda.jit(_make_backward(in_kind, dy_kind, per_head, hops, has_x0,
                                                  vec, lb, lph))
    return k


# ----------------------------------------------------------------------------------------------
# reverse block walk (BLHD backward): the dense channel kernel's order, blocks per sequence
# ----------------------------------------------------------------------------------------------


RBLOCKS_ACCESS_BYTES = 8
"""Bytes of u a thread moves per step in the reverse block walk (its registers grow with it)."""
RBLOCKS_UNROLL = 8
RBLOCKS_CHUNK = 256


def _make_rblocks(in_kind, dy_kind, per_head, hops, has_x0, vec, lb, lph, unroll):
    """The BLHD backward as the dense channel kernel (swr_backward_channel) walks it, on the
    virtual blocks of each sequence: a thread takes the blocks whose first token lies in its
    chunk from the last to the first; the reverse sweep of block j gives ``q_j = a z`` at its
    first token, handed to block j-1 of the same sequence in registers (the chunk's last block,
    and each sequence's last block in the chunk, take q from a walk of the block after it, or 0
    at a sequence's end); the forward walk of block j-1 gives the carry S of block j and the
    checkpoints (w, g before each group of ``unroll`` steps) that block j-1's sweep starts its
    groups from (a sequence's last block in the chunk walks itself for them); a sequence's first
    block takes ``x0[s]`` (or 0) and writes ``dx0[s] = q``. Each step's loads of a group are in
    flight together; per-head da is summed over the head's ``lph`` lanes by shuffles."""
    VEC, U = vec, unroll
    AW = 1 if per_head else VEC
    NG = -(-lb // U)
    HOPS1 = hops == 1
    X0 = has_x0 and HOPS1
    load_u = make_vector_load(in_kind, VEC)
    load_d = make_vector_load(dy_kind, VEC)
    load_a = make_vector_load(in_kind, AW)
    store_u = make_vector_store(in_kind, VEC)
    store_a = make_vector_store(in_kind, AW)
    UV, UA, CKV, CKA = U * VEC, U * AW, NG * VEC, NG * AW  # local array sizes: constants

    @_device
    def walk(a, u, bs, n, C, c0, a_stride, a_col, ckw, ckg, w, g, ab, ub):
        """Forward through the n tokens from bs, keeping (w, g) before each group; w ends as the
        carrier."""
        for k in range(VEC):
            w[k] = f32(0.0)
        for q in range(AW):
            g[q] = f32(1.0)
        for gi in range(NG):
            t0 = gi * U
            for k in range(VEC):
                ckw[gi * VEC + k] = w[k]
            for q in range(AW):
                ckg[gi * AW + q] = g[q]
            if t0 < n:
                for i in range(U):
                    t = bs + min(t0 + i, n - 1)
                    load_a(a, t * a_stride + a_col, ab, i * AW)
                    load_u(u, t * C + c0, ub, i * VEC)
                for i in range(U):
                    if t0 + i < n:
                        for k in range(VEC):
                            w[k] = ab[i * AW + k % AW] * w[k] + ub[i * VEC + k]
                        for q in range(AW):
                            g[q] = g[q] * ab[i * AW + q]

    @_device
    def next_q(a, dy, bs, n, C, c0, a_stride, a_col, an, zz, ab, db, q):
        """q (the sum over a block of g_t dy_t) of the n tokens from bs, summed in the reverse
        sweep's order."""
        for k in range(AW):
            an[k] = f32(1.0)
        for k in range(VEC):
            zz[k] = f32(0.0)
        for gg in range(NG):
            t0 = (NG - 1 - gg) * U
            if t0 < n:
                for i in range(U):
                    t = bs + min(t0 + i, n - 1)
                    load_a(a, t * a_stride + a_col, ab, i * AW)
                    load_d(dy, t * C + c0, db, i * VEC)
                for ii in range(U):
                    i = U - 1 - ii
                    if t0 + i < n:
                        for k in range(VEC):
                            zz[k] = db[i * VEC + k] + an[k % AW] * zz[k]
                        for k in range(AW):
                            an[k] = ab[i * AW + k]
        for k in range(VEC):
            q[k] = an[k % AW] * zz[k]

    def kernel(a, u, dy, da, du, x0, dx0, cu, ok, T, S, C, D, block_len, chunk, groups, nwork):
        tid = cuda.grid(1)
        if tid >= nwork:
            return
        c0 = (tid % groups) * VEC
        t_lo = (tid // groups) * chunk
        t_hi = min(t_lo + chunk, T)
        if per_head:
            a_stride = C // D
            a_col = c0 // D
            lead = c0 % D == 0
        else:
            a_stride = C
            a_col = c0
            lead = True
        lane = cuda.threadIdx.x % 32
        mask = numba.uint32(((numba.int64(1) << lph) - 1) << (lane - lane % lph))
        ov = cuda.local.array(VEC, f32)
        oa = cuda.local.array(VEC, f32)
        if ok[0] == 0:
            for k in range(VEC):
                ov[k] = NAN
                oa[k] = NAN
            for t in range(t_lo, t_hi):
                store_u(du, t * C + c0, ov, 0)
                if lead:
                    store_a(da, t * a_stride + a_col, oa, 0)
            if X0 and t_lo == 0:
                for s in range(S):
                    for k in range(VEC):
                        dx0[s * C + c0 + k] = NAN
            return
        l = block_len
        q = cuda.local.array(VEC, f32)
        Sc = cuda.local.array(VEC, f32)
        w = cuda.local.array(VEC, f32)
        g = cuda.local.array(AW, f32)
        lam = cuda.local.array(VEC, f32)
        zz = cuda.local.array(VEC, f32)
        an = cuda.local.array(AW, f32)
        ab = cuda.local.array(UA, f32)
        ub = cuda.local.array(UV, f32)
        db = cuda.local.array(UV, f32)
        wp = cuda.local.array(UV, f32)
        gp = cuda.local.array(UA, f32)
        ckw = cuda.local.array(CKV, f32)
        ckg = cuda.local.array(CKA, f32)
        nkw = cuda.local.array(CKV, f32)
        nkg = cuda.local.array(CKA, f32)

        # the chunk's last block start
        s = _seq_of(cu, S, t_hi - 1)
        cs = numba.int64(cu[s])
        cn = numba.int64(cu[s + 1])
        bs = cs + (t_hi - 1 - cs) // l * l
        have_next = False  # q and the checkpoints of block bs come from the block after it
        for k in range(VEC):
            q[k] = f32(0.0)
        while bs >= t_lo:
            be = min(bs + l, cn)
            n = be - bs
            if not have_next:
                for k in range(VEC):
                    q[k] = f32(0.0)
                if HOPS1 and be < cn:
                    next_q(a, dy, be, min(be + l, cn) - be, C, c0, a_stride, a_col, an, zz, ab,
                           db, q)
                walk(a, u, bs, n, C, c0, a_stride, a_col, ckw, ckg, w, g, ab, ub)
            first = bs == cs
            for k in range(VEC):
                Sc[k] = f32(0.0)
            if HOPS1:
                if first:
                    if X0:
                        for k in range(VEC):
                            Sc[k] = x0[s * C + c0 + k]
                else:
                    walk(a, u, bs - l, l, C, c0, a_stride, a_col, nkw, nkg, w, g, ab, ub)
                    for k in range(VEC):
                        Sc[k] = w[k]
            # reverse sweep of the block, a group of U steps at a time
            for k in range(VEC):
                lam[k] = q[k]
                zz[k] = f32(0.0)
            for k in range(AW):
                an[k] = f32(1.0)
            for gg in range(NG):
                gi = NG - 1 - gg
                t0 = gi * U
                if t0 < n:
                    for i in range(U):
                        t = bs + min(t0 + i, n - 1)
                        load_a(a, t * a_stride + a_col, ab, i * AW)
                        load_u(u, t * C + c0, ub, i * VEC)
                        load_d(dy, t * C + c0, db, i * VEC)
                    for k in range(VEC):
                        w[k] = ckw[gi * VEC + k]
                    for k in range(AW):
                        g[k] = ckg[gi * AW + k]
                    for i in range(U):
                        for k in range(VEC):
                            wp[i * VEC + k] = w[k]
                            w[k] = ab[i * AW + k % AW] * w[k] + ub[i * VEC + k]
                        for k in range(AW):
                            gp[i * AW + k] = g[k]
                            g[k] = g[k] * ab[i * AW + k]
                    for ii in range(U):
                        i = U - 1 - ii
                        if t0 + i < n:
                            pa = f32(0.0)
                            for k in range(VEC):
                                dv = db[i * VEC + k]
                                lam[k] = dv + an[k % AW] * lam[k]
                                ov[k] = lam[k]
                                dk = lam[k] * wp[i * VEC + k]
                                if HOPS1:
                                    zz[k] = dv + an[k % AW] * zz[k]
                                    dk += Sc[k] * zz[k] * gp[i * AW + k % AW]
                                oa[k] = dk
                                pa += dk
                            t = bs + t0 + i
                            store_u(du, t * C + c0, ov, 0)
                            if per_head:
                                pa = head_sum(pa, lph, mask)
                                oa[0] = pa
                            if lead:
                                store_a(da, t * a_stride + a_col, oa, 0)
                            for k in range(AW):
                                an[k] = ab[i * AW + k]
            for k in range(VEC):
                q[k] = an[k % AW] * zz[k] if HOPS1 else f32(0.0)  # q of this block, for bs - l
            if X0 and first:
                for k in range(VEC):
                    dx0[s * C + c0 + k] = q[k]
            if first:  # the previous sequence holding tokens: its last block
                if bs == 0:
                    break
                s -= 1
                while numba.int64(cu[s]) == bs:
                    s -= 1
                cn = bs
                cs = numba.int64(cu[s])
                bs = cs + (cn - 1 - cs) // l * l
                have_next = False
            else:
                bs -= l
                have_next = HOPS1
                if HOPS1:
                    for k in range(CKV):
                        ckw[k] = nkw[k]
                    for k in range(CKA):
                        ckg[k] = nkg[k]

    kernel.__name__ = kernel.__qualname__ = (
        f"packed_rblocks_backward_{in_kind}_dy_{dy_kind}"
        f"_{'per_head' if per_head else 'per_channel'}_hops{hops}{'_x0' if X0 else ''}"
        f"_vec{vec}_l{lb}_lph{lph}_unroll{unroll}"
    )
    return kernel


def rblocks_kernel(in_kind, dy_kind, per_head, hops, has_x0, vec, lb, lph,
                   unroll=RBLOCKS_UNROLL):
    """The ``@cuda.jit`` reverse block walk of one specialisation (cached)."""
    unroll = min(unroll, lb)
    key = ("rbwd", in_kind, dy_kind, per_head, hops, bool(has_x0 and hops == 1), vec, lb, lph,
           unroll)
    k = _CACHE.get(key)
    if k is None:
        k = _CACHE[key] = cuda.jit(_make_rblocks(in_kind, dy_kind, per_head, hops, has_x0, vec,
                                                 lb, lph, unroll))
    return k


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


_KINDS = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.uint16): "bf16"}


def _flat(x):
    if SIMULATOR or isinstance(x, np.ndarray):
        y = x.reshape(-1)
        return y.view(np.uint16) if y.dtype.name == "bfloat16" else y
    return FlatArray.of(x)


def _kind(x):
    return _KINDS[np.dtype(_flat_dtype(x.dtype))]


def _flat_dtype(dtype):
    return np.dtype(np.uint16) if np.dtype(dtype).name == "bfloat16" or \
        np.dtype(dtype).str in ("<V2", "|V2") else np.dtype(dtype)


def _aligned(x, nbytes):
    if SIMULATOR or isinstance(x, np.ndarray) or nbytes <= 1:
        return True
    return FlatArray.of(x).ptr % nbytes == 0


def forward_config(in_kind, out_kind, per_head, H, D):
    """The widest channel vector of the forward for these kinds and shapes (pointers aside)."""
    vec = max(1, FORWARD_ACCESS_BYTES // ITEM_SIZE[in_kind])
    if (H * D) % vec or (per_head and D % vec):
        return 1
    return vec


def backward_config(in_kind, dy_kind, per_head, H, D, block_len, aligned=None):
    """``(vec, lph)`` of the native backward, or None where it does not run: block_len above
    :data:`BACKWARD_LMAX`, or (per head) no channel vector of at most :data:`BACKWARD_MAX_VEC`
    that splits D into a power of two of lanes up to 32. ``aligned(vec)``: whether the arrays
    allow accesses of ``vec`` elements (None: any); the smallest fitting vector wins (fewest
    registers), vec 1 last."""
    if block_len > BACKWARD_LMAX:
        return None
    base = max(1, BACKWARD_ACCESS_BYTES // max(ITEM_SIZE[in_kind], ITEM_SIZE[dy_kind]))
    cands = [v for v in (base, 2 * base, 4 * base) if v <= BACKWARD_MAX_VEC]
    if 1 not in cands:
        cands.append(1)
    for v in cands:
        if (H * D) % v or (aligned is not None and v > 1 and not aligned(v)):
            continue
        if not per_head:
            return v, 1
        if D % v:
            continue
        lph = D // v
        if lph & (lph - 1) == 0 and lph <= 32:
            return v, lph
    return None


def tokens_backward_config(layout, in_kind, dy_kind, per_head, H, D, T, aligned=None):
    """``(vec, lph)`` of the token-walk backward, or None where it does not run. BLHD: as
    :func:`backward_config` without its block_len limit. BHDL: accesses of ``vec`` consecutive
    tokens (16 bytes of the wider of u and dy, halved until T is a multiple and ``aligned(vec)``
    allows), per head the head's D rows summed by shuffles (D a power of two up to 32)."""
    if layout == "BLHD":
        return backward_config(in_kind, dy_kind, per_head, H, D, 1, aligned)
    if per_head and (D & (D - 1) or D > 32):
        return None
    vec = max(1, 16 // max(ITEM_SIZE[in_kind], ITEM_SIZE[dy_kind]))
    while vec > 1 and (T % vec or (aligned is not None and not aligned(vec))):
        vec //= 2
    return vec, (D if per_head else 1)


RBLOCKS_LMAX = 32
"""Largest block_len of the reverse block walk (its checkpoints grow with it)."""


def rblocks_config(in_kind, dy_kind, per_head, H, D, block_len, aligned=None):
    """``(vec, lph)`` of the reverse block walk, or None where it does not run: block_len above
    :data:`RBLOCKS_LMAX`; else the widest channel vector of at most
    :data:`RBLOCKS_ACCESS_BYTES` of u (and 16 bytes of dy) that divides the channels, per head
    splits D into a power of two of lanes up to 32, and ``aligned(vec)`` allows."""
    if block_len > RBLOCKS_LMAX:
        return None
    vec = max(1, RBLOCKS_ACCESS_BYTES // ITEM_SIZE[in_kind])
    while vec >= 1:
        fits = (H * D) % vec == 0 and vec * ITEM_SIZE[dy_kind] <= 16
        if fits and per_head:
            lph = D // vec
            fits = D % vec == 0 and lph & (lph - 1) == 0 and lph <= 32
        if fits and (vec == 1 or aligned is None or aligned(vec)):
            return vec, (D // vec if per_head else 1)
        vec //= 2
    return None


def backward_plan(a, u, dy, block_len, layout="BLHD"):
    """``(vec, lph)`` of the backward for these arrays (their kinds, shapes and pointer
    alignment; the gradients are fresh allocations), or None where no native backward runs:
    see :func:`backward_family`."""
    fam = backward_family(a, u, dy, block_len, layout)
    return None if fam is None else fam[1:]


def backward_family(a, u, dy, block_len, layout="BLHD"):
    """``(family, vec, lph)`` of the backward: BLHD with the "blocks" family chosen
    (:func:`variant`), :func:`backward_config` where it fits (block_len up to
    :data:`BACKWARD_LMAX`), else the token walk; the token walk otherwise
    (:func:`tokens_backward_config`). None where neither fits."""
    T, H, D = _shape(u, layout)
    per_head = a.ndim == 3
    in_kind, dy_kind = _kind(u), _kind(dy)

    def aligned(v):
        nb = v * ITEM_SIZE[in_kind]
        return (_aligned(u, nb) and _aligned(dy, v * ITEM_SIZE[dy_kind])
                and (per_head and layout == "BLHD" or _aligned(a, nb)))

    if layout == "BLHD" and _VARIANT[0] == "rblocks":
        cfg = rblocks_config(in_kind, dy_kind, per_head, H, D, block_len, aligned)
        if cfg is not None:
            return ("rblocks",) + cfg
    if layout == "BLHD" and _VARIANT[0] in ("blocks", "rblocks"):
        cfg = backward_config(in_kind, dy_kind, per_head, H, D, block_len, aligned)
        if cfg is not None:
            return ("blocks",) + cfg
    if layout == "BHDL" and tile_backward_fits(in_kind, dy_kind, per_head, D, T, aligned):
        return "tile", 16 // max(ITEM_SIZE[in_kind], ITEM_SIZE[dy_kind]), D if per_head else 1
    cfg = tokens_backward_config(layout, in_kind, dy_kind, per_head, H, D, T, aligned)
    return None if cfg is None else ("tokens",) + cfg


def check_cu(cu, T, ok, *, stream=None):
    """``ok[0] = 1`` if ``cu`` (S + 1 entries) starts at 0, never decreases and ends at T, else
    0; one thread block, nothing read by the host."""
    S = cu.shape[0] - 1
    launch(check_kernel(), 1, CHECK_THREADS, (_flat(cu), np.int64(S), np.int64(T), _flat(ok)),
           stream)


def _shape(u, layout):
    """(T, H, D) of a B == 1 array in ``layout``."""
    if layout == "BLHD":
        _, T, H, D = u.shape
    else:
        _, H, D, T = u.shape
    return T, H, D


def tokens_forward_config(layout, in_kind, out_kind, per_head, H, D, T, aligned=None):
    """The access width ``vec`` of the token-walk forward: BLHD as :func:`forward_config`; BHDL
    the widest vector of consecutive tokens (16 bytes of u, at most 16 bytes of y) that T is a
    multiple of (every row then starts aligned) and that ``aligned(vec)`` allows."""
    if layout == "BLHD":
        vec = forward_config(in_kind, out_kind, per_head, H, D)
    else:
        vec = max(1, 16 // max(ITEM_SIZE[in_kind], ITEM_SIZE[out_kind]))
        while vec > 1 and T % vec:
            vec //= 2
    while vec > 1 and aligned is not None and not aligned(vec):
        vec = 1 if layout == "BLHD" else vec // 2
    return vec


def _forward_aligned(a, u, y, layout):
    """``aligned(vec)``: whether the arrays' pointers allow accesses of ``vec`` elements."""
    per_head = a.ndim == 3
    in_kind, out_kind = _kind(u), _kind(y)

    def aligned(v):
        return (_aligned(u, v * ITEM_SIZE[in_kind]) and _aligned(y, min(16, v * ITEM_SIZE[
            out_kind])) and (per_head and layout == "BLHD" or _aligned(a, v * ITEM_SIZE[
                in_kind])))

    return aligned


def scan_forward_fits(a, u, y, cu, block_len):
    """Whether the BHDL warp-scan forward takes these arrays (``packed_scan.fits`` at the access
    width their alignment allows)."""
    from . import packed_scan

    T, H, D = _shape(u, "BHDL")
    vec = tokens_forward_config("BHDL", _kind(u), _kind(y), a.ndim == 3, H, D, T,
                                _forward_aligned(a, u, y, "BHDL"))
    return packed_scan.fits(block_len, vec, cu.shape[0] - 1)


def _forward_launch(a, u, y, x0, cu, ok, dummy, hops, block_len, layout, marks=None):
    """(kernel, grid, block, args) of :func:`forward`; with ``marks`` (BHDL) the warp-scan
    forward where it fits."""
    T, H, D = _shape(u, layout)
    per_head = a.ndim == 3
    in_kind, out_kind = _kind(u), _kind(y)
    S = cu.shape[0] - 1
    has_x0 = x0 is not None and hops == 1
    tokens = layout == "BHDL" or _VARIANT[0] == "tokens"

    aligned = _forward_aligned(a, u, y, layout)
    if marks is not None:
        from . import packed_scan

        vec = tokens_forward_config(layout, in_kind, out_kind, per_head, H, D, T, aligned)
        kernel = packed_scan.forward_kernel(in_kind, out_kind, per_head, hops, has_x0, vec)
        grid, block, scalars = packed_scan.launch_args(T, H * D, D, block_len, vec,
                                                       BHDL_SCAN_CHUNK)
        args = (_flat(a), _flat(u), _flat(y), _flat(x0 if has_x0 else dummy), _flat(marks),
                _flat(ok)) + scalars
        return kernel, grid, block, args
    if layout == "BHDL" and tile_forward_fits(in_kind, out_kind, T, aligned):
        kernel = tile_forward_kernel(in_kind, out_kind, per_head, hops, has_x0)
        chunk = TILE_CHUNK
        nrg = -(-(H * D) // 32)
        nwork = nrg * (-(-T // chunk))
        args = (_flat(a), _flat(u), _flat(y), _flat(x0 if has_x0 else dummy), _flat(cu),
                _flat(ok), np.int64(T), np.int64(S), np.int64(H * D), np.int64(D),
                np.int64(block_len), np.int64(chunk), np.int64(nrg), np.int64(nwork))
        return kernel, nwork, 32, args
    if tokens:
        vec = tokens_forward_config(layout, in_kind, out_kind, per_head, H, D, T, aligned)
        kernel = tokens_forward_kernel(layout, in_kind, out_kind, per_head, hops, has_x0, vec)
        chunk = token_chunk(layout, "fwd", vec)
    else:
        vec = forward_config(in_kind, out_kind, per_head, H, D)
        if vec > 1 and not aligned(vec):
            vec = 1
        kernel = forward_kernel(in_kind, out_kind, per_head, hops, has_x0, vec)
        chunk = FORWARD_CHUNK
    groups = H * D // vec if layout == "BLHD" else H * D
    nwork = groups * (-(-T // chunk))
    args = (_flat(a), _flat(u), _flat(y), _flat(x0 if has_x0 else dummy), _flat(cu), _flat(ok),
            np.int64(T), np.int64(S), np.int64(H * D), np.int64(D), np.int64(block_len),
            np.int64(chunk), np.int64(groups), np.int64(nwork))
    return kernel, -(-nwork // THREADS), THREADS, args


_PLANS: dict = {}
"""Launch plans of the device path: (kind, layout, family, shapes, dtypes, options, pointer
alignments, device) -> (compiled entry, grid, block, parameter values); a call writes its data
pointers into the values and launches (``_launch.launch_with_pointers``)."""


def _align(x):
    return data_pointer(x) % 16


def _cached_launch(key, build, arrays, n_aligned, stream):
    """Launch through the plan of ``key`` and the 16-byte alignment of the first ``n_aligned``
    arrays (built by ``build()`` on a miss); the simulator and NumPy arrays launch through
    ``_launch.launch``."""
    if SIMULATOR or isinstance(arrays[1], np.ndarray):
        kernel, grid, block, args = build()
        launch(kernel, grid, block, args, stream)
        return
    from cupy.cuda import runtime

    key = key + tuple(_align(x) for x in arrays[:n_aligned]) + (runtime.getDevice(),)
    plan = _PLANS.get(key)
    if plan is None:
        kernel, grid, block, args = build()
        entry, values = prepare(kernel, args)
        if len(_PLANS) > 256:
            _PLANS.clear()
        plan = _PLANS[key] = (entry, grid, block, values)
    entry, grid, block, values = plan
    launch_with_pointers(entry, grid, block, values, [data_pointer(x) for x in arrays], stream)


def wants_marks(layout, direction="fwd"):
    """Whether a packed call in ``layout`` computes token marks (:func:`mark_tokens`) for the
    BHDL warp-scan kernels of ``direction`` ("fwd": :data:`BHDL_SCAN`, "bwd":
    :data:`BHDL_SCAN_BWD`)."""
    return layout == "BHDL" and (BHDL_SCAN if direction == "fwd" else BHDL_SCAN_BWD)


def mark_tokens(cu, T, block_len, marks, *, stream=None):
    """``packed_scan.mark_tokens`` through a cached launch plan (after :func:`check_cu` on the
    same stream)."""
    from . import packed_scan

    def build():
        S = cu.shape[0] - 1
        return (packed_scan.marks_kernel(), -(-T // packed_scan.MARK_THREADS),
                packed_scan.MARK_THREADS,
                (_flat(cu), _flat(marks), np.int64(S), np.int64(T), np.int64(block_len)))

    key = ("marks", T, block_len, cu.shape, cu.dtype, marks.shape)
    _cached_launch(key, build, (cu, marks), 0, stream)


def forward(a, u, y, x0, cu, ok, dummy, *, hops, block_len, layout="BLHD", marks=None,
            stream=None):
    """``y`` of the packed problem (B == 1, T >= 1, S >= 1; hops 0 or 1); ``x0`` float32
    ``(S, H, D)`` or None; ``ok`` from :func:`check_cu` (same stream); ``dummy`` a float32 array
    of one element (passed where x0 is not read); ``marks`` from :func:`mark_tokens` or None.
    BLHD runs the :data:`VARIANTS` family chosen (:func:`variant`), BHDL the warp-scan forward
    (with marks, where ``packed_scan.fits``), else the token walk. Repeated calls of one
    signature launch from a cached plan."""
    xa = dummy if x0 is None or hops != 1 else x0
    scan = layout == "BHDL" and marks is not None and scan_forward_fits(a, u, y, cu, block_len)
    arrays = (a, u, y, xa, marks if scan else cu, ok)
    key = ("fwd", layout, _VARIANT[0], TOKENS_CHUNK, BHDL_TOKENS_CHUNK["fwd"], FORWARD_CHUNK,
           scan, BHDL_SCAN_CHUNK, BHDL_TILE, TILE_CHUNK, THREADS, hops, block_len, a.shape,
           u.shape, y.shape, cu.shape, xa.shape, a.dtype, u.dtype, y.dtype, cu.dtype, xa.dtype)
    _cached_launch(key, lambda: _forward_launch(a, u, y, x0, cu, ok, dummy, hops, block_len,
                                                layout, marks if scan else None),
                   arrays, 3, stream)


def _backward_aligned(a, u, dy, da, du):
    """``aligned(vec)`` of the BHDL warp-chain backward: accesses of ``vec`` elements of every
    array."""

    def aligned(v):
        return all(_aligned(x, v * x.dtype.itemsize) for x in (a, u, dy, da, du))

    return aligned


def scan_backward_config(a, u, dy, da, du, cu, block_len):
    """``(vec, nacc)`` of the BHDL warp-chain backward for these arrays, or None where it does
    not take them (``packed_scan_bwd.fits``)."""
    from . import packed_scan_bwd

    T = _shape(u, "BHDL")[0]
    aligned = _backward_aligned(a, u, dy, da, du)
    if not packed_scan_bwd.fits(_kind(u), _kind(dy), T, block_len, cu.shape[0] - 1, aligned):
        return None
    return packed_scan_bwd.config(_kind(u), _kind(dy), T, block_len, aligned)


def _backward_launch(a, u, dy, da, du, x0, dx0, cu, ok, dummy, hops, block_len, layout,
                     marks=None):
    """(kernel, grid, block, args) of :func:`backward`; with ``marks`` (BHDL, where
    :func:`scan_backward_config` takes the arrays) the warp-chain backward."""
    T, H, D = _shape(u, layout)
    per_head = a.ndim == 3
    in_kind, dy_kind = _kind(u), _kind(dy)
    family, vec, lph = backward_family(a, u, dy, block_len, layout)
    S = cu.shape[0] - 1
    has_x0 = x0 is not None and hops == 1
    x_arg = x0 if has_x0 else dummy
    dx_arg = dx0 if has_x0 else dummy
    groups = H * D // vec if layout == "BLHD" else H * D
    tpb = lph if SIMULATOR else THREADS
    if family == "tokens" and layout == "BHDL" and not SIMULATOR:
        tpb = BHDL_BACKWARD_THREADS
    head = (_flat(a), _flat(u), _flat(dy), _flat(da), _flat(du), _flat(x_arg), _flat(dx_arg),
            _flat(cu), _flat(ok), np.int64(T), np.int64(S), np.int64(H * D), np.int64(D),
            np.int64(block_len))
    if marks is not None:
        from . import packed_scan_bwd

        vec, nacc = scan_backward_config(a, u, dy, da, du, cu, block_len)
        kernel = packed_scan_bwd.backward_kernel(in_kind, dy_kind, per_head, hops, has_x0, vec,
                                                 nacc)
        grid, block, scalars = packed_scan_bwd.launch_args(T, S, H * D, D, block_len, per_head,
                                                           vec, nacc, BHDL_SCAN_BWD_CHUNK)
        return kernel, grid, block, head[:7] + (_flat(marks), _flat(ok)) + scalars
    if family == "tile":
        kernel = tile_backward_kernel(in_kind, dy_kind, per_head, hops, has_x0, D)
        nrg = -(-(H * D) // 32)
        nwork = nrg * (-(-T // TILE_CHUNK))
        return kernel, nwork, 32, head + (np.int64(nrg), np.int64(nwork))
    if family == "rblocks":
        kernel = rblocks_kernel(in_kind, dy_kind, per_head, hops, has_x0, vec, block_len, lph)
        chunk = RBLOCKS_CHUNK
        nwork = groups * (-(-T // chunk))
        args = head + (np.int64(chunk), np.int64(groups), np.int64(nwork))
    elif family == "tokens":
        chunk = token_chunk(layout, "bwd", vec)
        kernel = tokens_backward_kernel(layout, in_kind, dy_kind, per_head, hops, has_x0, vec,
                                        lph, chunk)
        nwork = groups * (-(-T // chunk))
        args = head + (np.int64(groups), np.int64(nwork))
    else:
        kernel = backward_kernel(in_kind, dy_kind, per_head, hops, has_x0, vec, block_len, lph)
        chunk = BACKWARD_CHUNK
        nwork = groups * (-(-T // chunk))
        args = head + (np.int64(chunk), np.int64(groups), np.int64(nwork))
    return kernel, -(-nwork // tpb), tpb, args


def backward(a, u, dy, da, du, x0, dx0, cu, ok, dummy, *, hops, block_len, layout="BLHD",
             marks=None, stream=None):
    """``da``, ``du`` (and ``dx0`` float32 ``(S, H, D)``, zeroed by the caller, with x0 and
    hops=1) of the packed problem; :func:`backward_plan` must not be None. BLHD runs the
    :data:`VARIANTS` family chosen (:func:`variant`), BHDL the token walk. Repeated calls of one
    signature launch from a cached plan."""
    has_x0 = x0 is not None and hops == 1
    xa = x0 if has_x0 else dummy
    dxa = dx0 if has_x0 else dummy
    scan = (layout == "BHDL" and marks is not None
            and scan_backward_config(a, u, dy, da, du, cu, block_len) is not None)
    arrays = (a, u, dy, da, du, xa, dxa, marks if scan else cu, ok)
    key = ("bwd", layout, _VARIANT[0], TOKENS_CHUNK, BHDL_TOKENS_CHUNK["bwd"], BACKWARD_CHUNK,
           RBLOCKS_CHUNK, scan, BHDL_SCAN_BWD_CHUNK, BHDL_TILE, TILE_CHUNK, THREADS, hops,
           block_len, has_x0, a.shape, u.shape, cu.shape, xa.shape, a.dtype, u.dtype, dy.dtype,
           cu.dtype)
    _cached_launch(key, lambda: _backward_launch(a, u, dy, da, du, x0, dx0, cu, ok, dummy, hops,
                                                 block_len, layout, marks if scan else None),
                   arrays, 5, stream)
