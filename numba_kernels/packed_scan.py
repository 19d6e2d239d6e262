"""Packed sequences, BHDL forward by warp scans: coalesced accesses along each channel row.

A candidate to the token walk of ``packed_walk`` (one channel row a thread, whose accesses a
warp spreads over 32 rows): here a warp owns ONE channel row and a chunk of ``chunk`` tokens,
each lane ``E`` consecutive tokens of it (one access of up to 16 bytes), so a warp reads
``32 * E`` contiguous tokens of the row at a time, as the dense BHDL lane scan does. Blocks
start at each sequence's first token (docs/spec.md#packed), so they do not line up with the
lanes; the recurrence goes through the lanes as an associative scan instead.

State after token t, for hops 1 (docs/spec.md#recurrence): ``w`` and ``g`` of the block in
progress and ``c``, the carry S of that block (the carrier of the block before it in the same
sequence, ``x0[s]`` or 0 for a sequence's first block); ``y_t = w_t + g_t c_t`` (hops 0:
``y_t = w_t``). One token maps the state before it to the state after it affinely,

    w' = A w + u          A  = 0 at a block start, else a
    g' = A g + G          G  = a at a block start, else 0
    c' = K c + L w + M    K  = 0 at a block start, else 1; L = 1 at a block start that is not
                          a sequence start (c' = w of the previous token: the carrier), else 0;
                          M = x0[s] at a sequence start (with x0), else 0

and maps of that shape (A, Bw, Bg, K, L, M) compose into one of the same shape, so each lane
composes its E tokens' maps, the warp scans the lanes' maps with shuffles (Hillis-Steele, 6
values a step), and each lane then walks its tokens again from the state the scan gives it.
The state entering a warp iteration is the last lane's state after the previous one.

Chunks: a chunk's first state needs no carry from the chunk before: the warp starts walking
``2 * block_len`` tokens earlier (rounded down to a lane's access; stores nothing there). A
block is at most ``block_len`` tokens, so a block start, after which w and g are exact, and the
start of the block before (its carrier) both lie in that halo; token 0 starts a sequence.

A token's sequence: a binary search of ``cu`` for the lane's first token, then ``cu[s + 1]``
followed token by token (empty sequences passed over). ``ok[0] == 0`` (invalid ``cu``, see
``packed_walk.check_cu``) makes the kernel write NaN to its tokens instead.

Arrays are 1-D views of C-contiguous ``(1, H, D, T)`` arrays (``a`` ``(1, H, T)`` per head),
bfloat16 as uint16 bits; ``x0`` float32 ``(S, H, D)``. ``E > 1`` needs ``T % E == 0`` and the
rows aligned to the access.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from ._dtypes import SIMULATOR
from ._ptx import make_vector_load, make_vector_store, shfl_idx, shfl_up
from .packed_walk import _seq_of

__all__ = ["THREADS", "forward_kernel", "launch_args"]

THREADS = 32 if SIMULATOR else 128
"""Threads per block (whole warps; the simulator's shuffles span one block: one warp)."""

NAN = np.float32(np.nan)
F0 = np.float32(0.0)
F1 = np.float32(1.0)


def _make_forward(in_kind, out_kind, per_head, hops, has_x0, E):
    load_a = make_vector_load(in_kind, E)
    load_u = make_vector_load(in_kind, E)
    store_y = make_vector_store(out_kind, E)
    f32 = numba.float32
    HOPS1 = hops == 1
    X0 = has_x0 and HOPS1
    span = 32 * E

    def kernel(a, u, y, x0, cu, ok, T, S, C, D, block_len, chunk, nwork):
        warp = cuda.grid(1) // 32
        if warp >= nwork:
            return
        lane = cuda.threadIdx.x % 32
        row = warp % C
        t_lo = (warp // C) * chunk
        t_hi = min(t_lo + chunk, T)
        a_base = ((row // D) if per_head else row) * T
        u_base = row * T
        ybuf = cuda.local.array(E, f32)
        if ok[0] == 0:
            for e in range(E):
                ybuf[e] = NAN
            for t in range(t_lo + lane * E, t_hi, span):
                store_y(y, u_base + t, ybuf, 0)
            return
        t_first = max(t_lo - 2 * block_len, 0)
        t_first -= t_first % E
        mask = block_len - 1
        abuf = cuda.local.array(E, f32)
        ubuf = cuda.local.array(E, f32)
        mbuf = cuda.local.array(E, f32)  # M of each token
        flags = cuda.local.array(E, numba.int32)  # 1: block start, 2: sequence start too
        cw = F0  # the state entering the warp's iteration (any value before the halo)
        cg = F0
        cc = F0
        n_iters = (t_hi - t_first + span - 1) // span
        s = numba.int64(0)
        cn = numba.int64(0)
        for it in range(n_iters):
            t0 = t_first + it * span + lane * E
            live = t0 < T
            if live:
                load_a(a, a_base + t0, abuf, 0)
                load_u(u, u_base + t0, ubuf, 0)
                s = _seq_of(cu, S, t0)
                cn = numba.int64(cu[s + 1])
            # the lane's map, composed token by token from the identity
            A = F1
            Bw = F0
            Bg = F0
            K = F1
            L = F0
            M = F0
            for e in range(E):
                flags[e] = 0
                mbuf[e] = F0
                if live:
                    t = t0 + e
                    while cn <= t:  # the sequence of t (passing over empty ones)
                        s += 1
                        cn = numba.int64(cu[s + 1])
                    off = t - numba.int64(cu[s])
                    av = abuf[e]
                    if (off & mask) == 0:
                        flags[e] = 2 if off == 0 else 1
                        if X0 and off == 0:
                            mbuf[e] = x0[s * C + row]
                    if flags[e] != 0:
                        At, Gt, Kt = F0, av, F0
                        Lt = F1 if flags[e] == 1 else F0
                    else:
                        At, Gt, Kt, Lt = av, F0, F1, F0
                    Mt = mbuf[e]
                    L = Kt * L + Lt * A
                    M = Kt * M + Lt * Bw + Mt
                    K = Kt * K
                    Bw = At * Bw + ubuf[e]
                    Bg = At * Bg + Gt
                    A = At * A
            # inclusive scan of the lanes' maps (this lane's map after the earlier lanes')
            k = 1
            while k < 32:
                uA = shfl_up(A, k)
                uBw = shfl_up(Bw, k)
                uBg = shfl_up(Bg, k)
                uK = shfl_up(K, k)
                uL = shfl_up(L, k)
                uM = shfl_up(M, k)
                if lane >= k:
                    M = K * uM + L * uBw + M
                    L = K * uL + L * uA
                    K = K * uK
                    Bw = A * uBw + Bw
                    Bg = A * uBg + Bg
                    A = A * uA
                k *= 2
            # the state entering this lane: the earlier lanes' map applied to the warp's state
            eA = shfl_up(A, 1)
            eBw = shfl_up(Bw, 1)
            eBg = shfl_up(Bg, 1)
            eK = shfl_up(K, 1)
            eL = shfl_up(L, 1)
            eM = shfl_up(M, 1)
            if lane == 0:
                eA, eBw, eBg, eK, eL, eM = F1, F0, F0, F1, F0, F0
            w = eA * cw + eBw
            g = eA * cg + eBg
            c = eK * cc + eL * cw + eM
            for e in range(E):
                if flags[e] != 0:
                    c = mbuf[e] if flags[e] == 2 else w
                    w = ubuf[e]
                    g = abuf[e]
                else:
                    w = abuf[e] * w + ubuf[e]
                    g = abuf[e] * g
                ybuf[e] = w + g * c if HOPS1 else w
            if live and t0 >= t_lo and t0 < t_hi:
                store_y(y, u_base + t0, ybuf, 0)
            cw = shfl_idx(w, 31)
            cg = shfl_idx(g, 31)
            cc = shfl_idx(c, 31)

    kernel.__name__ = kernel.__qualname__ = (
        f"packed_scan_forward_bhdl_{in_kind}_to_{out_kind}"
        f"_{'per_head' if per_head else 'per_channel'}_hops{hops}{'_x0' if X0 else ''}_e{E}"
    )
    return cuda.jit(kernel)


_CACHE: dict = {}


def forward_kernel(in_kind, out_kind, per_head, hops, has_x0, E):
    """The ``@cuda.jit`` warp-scan forward of one specialisation (cached)."""
    key = (in_kind, out_kind, bool(per_head), int(hops), bool(has_x0 and hops == 1), int(E))
    if key not in _CACHE:
        _CACHE[key] = _make_forward(*key)
    return _CACHE[key]


def launch_args(T, S, C, D, block_len, E, chunk):
    """``(grid, block, scalars)`` of the warp-scan forward for T tokens of C rows, a warp
    owning ``chunk`` tokens of a row (rounded up to a whole warp iteration, ``32 * E``)."""
    span = 32 * E
    chunk = -(-chunk // span) * span
    nwork = C * -(-T // chunk)
    scalars = tuple(np.int64(v) for v in (T, S, C, D, block_len, chunk, nwork))
    return -(-nwork * 32 // THREADS), THREADS, scalars

