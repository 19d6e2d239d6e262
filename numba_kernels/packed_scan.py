"""Packed sequences, BHDL by warp scans: coalesced accesses along each channel row.

A candidate to the token walk of ``packed_walk`` (one channel row a thread, whose accesses a
warp spreads over 32 rows): here a warp owns ONE channel row and a chunk of ``chunk`` tokens,
each lane ``E`` consecutive tokens of it (one access of up to 16 bytes), so a warp reads
``32 * E`` contiguous tokens of the row at a time, as the dense BHDL lane scan does. Blocks
start at each sequence's first token (docs/spec.md#packed), so they do not line up with the
lanes.

Token marks. Where blocks and sequences start is the same for every channel row, so one small
kernel (:func:`mark_tokens`) writes it once a call: ``marks[t] = 4 s + BLOCK + SEQUENCE`` (the
bits where t starts a block, a sequence), s the sequence of t. The scan kernels read a lane's
marks (from cache: every row reads the same T words) instead of searching ``cu``.

Forward, hops 1 (docs/spec.md#recurrence): in a block, ``w_t = a_t w_{t-1} + u_t`` from 0 and
``g_t = a_{b0} ... a_t``; ``y_t = w_t + g_t c``, the carrier c the last w of the block before
in the same sequence (``x0[s]`` or 0 at a sequence's first block); hops 0: ``y_t = w_t``.
A lane walks its E tokens from w = 0, g = 1 (exact from its first block start on), then takes
w and g of the token before its first token from the lane before (``shfl_up``); a lane without
a block start passes its own on, so after r rounds every lane within r lanes of a block start
has them exact. A block of at most ``block_len`` tokens reaches from its first token to the
token after its last over at most ``ceil(block_len / E)`` lanes (:func:`rounds`), so that many
rounds make every lane exact; the carrier goes through the same rounds. Lane 0 takes the state
after the previous warp iteration's last token (``shfl_idx`` of lane 31). No associative scan:
``rounds`` shuffles of three values, against ``5 * 6`` for a scan of the affine maps.

Chunks: a chunk's first state needs no carry from the chunk before: the warp starts walking
``2 * block_len`` tokens earlier (rounded down to a lane's access; stores nothing there). A
block is at most ``block_len`` tokens, so a block start, after which w and g are exact, and the
start of the block before (its carrier) both lie in that halo; token 0 starts a sequence.

``ok[0] == 0`` (invalid ``cu``, see ``packed_walk.check_cu``) makes the kernel write NaN to its
tokens instead, reading no marks.

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

__all__ = ["THREADS", "forward_kernel", "launch_args", "mark_tokens", "marks_kernel",
           "marks_reference"]

THREADS = 32 if SIMULATOR else 128
"""Threads per block (whole warps; the simulator's shuffles span one block: one warp)."""

NAN = np.float32(np.nan)
F0 = np.float32(0.0)
F1 = np.float32(1.0)
MARK_THREADS = 32 if SIMULATOR else 256
BLOCK = 1
"""Bit of a token's mark: the token starts a block."""
SEQUENCE = 2
"""Bit of a token's mark: the token starts a sequence (and so a block)."""


# ----------------------------------------------------------------------------------------------
# token marks: where blocks and sequences start, computed once for every channel row
# ----------------------------------------------------------------------------------------------


def _marks(cu, marks, S, T, block_len):
    t = cuda.grid(1)
    if t >= T:
        return
    s = _seq_of(cu, S, t)
    off = t - numba.int64(cu[s])
    m = s * 4
    if off % block_len == 0:
        m += BLOCK
    if off == 0:
        m += SEQUENCE
    marks[t] = m


_CACHE: dict = {}


def marks_kernel():
    """The ``@cuda.jit`` dispatcher of :func:`mark_tokens` (for PTX tests)."""
    k = _CACHE.get("marks")
    if k is None:
        _marks.__name__ = _marks.__qualname__ = "packed_mark_tokens"
        k = _CACHE["marks"] = cuda.jit(_marks)
    return k


def mark_tokens(cu, T, block_len, marks, *, stream=None):
    """``marks[t] = 4 s + BLOCK (t starts a block) + SEQUENCE (t starts a sequence)`` for each
    of the T tokens, s its sequence (``cu[s] <= t < cu[s + 1]``, empty sequences passed over);
    ``marks`` int32 of T entries (``S < 2**29``). ``cu`` must be valid (the scan kernels read
    the marks only when ``ok[0]`` says so; an invalid cu gives marks of no meaning but reads
    within ``cu``)."""
    from ._launch import launch

    S = cu.shape[0] - 1
    launch(marks_kernel(), -(-T // MARK_THREADS), MARK_THREADS,
           (cu, marks, np.int64(S), np.int64(T), np.int64(block_len)), stream)


def marks_reference(cu, T, block_len):
    """The marks of :func:`mark_tokens` in NumPy (int32, T entries), from a valid ``cu``."""
    cu = np.asarray(cu, np.int64)
    t = np.arange(T)
    s = np.searchsorted(cu, t, side="right") - 1
    off = t - cu[s]
    return (4 * s + BLOCK * (off % block_len == 0) + SEQUENCE * (off == 0)).astype(np.int32)


def rounds(block_len, E):
    """Chain rounds of a warp iteration with E tokens a lane: ``ceil(block_len / E)``, the
    most lanes between a block's first token and the token after its last (see the module
    docstring)."""
    return -(-block_len // E)


MAX_ROUNDS = 8
"""Most chain rounds a scan kernel runs (:func:`fits`); longer blocks keep the token walk."""


def fits(block_len, E, S):
    """Whether the scan kernels take this call: at most :data:`MAX_ROUNDS` rounds and
    sequence numbers that fit the marks (``S < 2**29``)."""
    return rounds(block_len, E) <= MAX_ROUNDS and S < (1 << 29)


def _make_forward(in_kind, out_kind, per_head, hops, has_x0, E):
    load_a = make_vector_load(in_kind, E)
    load_u = make_vector_load(in_kind, E)
    store_y = make_vector_store(out_kind, E)
    f32 = numba.float32
    HOPS1 = hops == 1
    X0 = has_x0 and HOPS1
    span = 32 * E

    def kernel(a, u, y, x0, marks, ok, T, C, D, block_len, chunk, n_rounds, nwork):
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
        abuf = cuda.local.array(E, f32)
        ubuf = cuda.local.array(E, f32)
        gbuf = cuda.local.array(E, f32)
        cbuf = cuda.local.array(E, f32)
        mk = cuda.local.array(E, numba.int32)
        cw = F0  # w, g, c after the previous iteration's last token (any value before the halo)
        cg = F1
        cc = F0
        n_iters = (t_hi - t_first + span - 1) // span
        for it in range(n_iters):
            t0 = t_first + it * span + lane * E
            live = t0 < T
            if live:
                load_a(a, a_base + t0, abuf, 0)
                load_u(u, u_base + t0, ubuf, 0)
                for e in range(E):
                    mk[e] = marks[t0 + e]
            else:
                for e in range(E):
                    abuf[e] = F0
                    ubuf[e] = F0
                    mk[e] = BLOCK
            # block-local w and g of each token from the lane's first token (w 0, g 1 there)
            first = E  # the lane's first block start (E: none)
            w = F0
            g = F1
            for e in range(E):
                if mk[e] & BLOCK:
                    w = ubuf[e]
                    g = abuf[e]
                    first = min(first, e)
                else:
                    w = abuf[e] * w + ubuf[e]
                    g = abuf[e] * g
                ybuf[e] = w
                gbuf[e] = g
            # chain rounds: w and g before the lane's first token, from the lane before
            win = cw
            gin = cg
            for _ in range(n_rounds):
                wo = ybuf[E - 1]
                go = gbuf[E - 1]
                if first == E:
                    wo += go * win
                    go *= gin
                pw = shfl_up(wo, 1)
                pg = shfl_up(go, 1)
                if lane > 0:
                    win = pw
                    gin = pg
            # w and g of every token; the carrier of each block starting in the lane
            wprev = win
            cl = F0
            for e in range(E):
                if e < first:
                    ybuf[e] += gbuf[e] * win
                    gbuf[e] *= gin
                if HOPS1:
                    # x0 of the token's sequence, read at every token (s is valid at each) so
                    # the loop stays free of branches around loads
                    xv = x0[(mk[e] >> 2) * C + row] if X0 else F0
                    if mk[e] & BLOCK:
                        cl = xv if mk[e] & SEQUENCE else wprev
                wprev = ybuf[e]
                cbuf[e] = cl
            if HOPS1:
                # chain rounds: the carrier of the block in progress at the lane's first token
                cin = cc
                for _ in range(n_rounds):
                    co = cl if first < E else cin
                    pc = shfl_up(co, 1)
                    if lane > 0:
                        cin = pc
                for e in range(E):
                    if e < first:
                        cbuf[e] = cin
                cc = shfl_idx(cbuf[E - 1], 31)
            cw = shfl_idx(ybuf[E - 1], 31)
            cg = shfl_idx(gbuf[E - 1], 31)
            if HOPS1:
                for e in range(E):
                    ybuf[e] += gbuf[e] * cbuf[e]
            if live and t0 >= t_lo and t0 < t_hi:
                store_y(y, u_base + t0, ybuf, 0)

    kernel.__name__ = kernel.__qualname__ = (
        f"packed_scan_forward_bhdl_{in_kind}_to_{out_kind}"
        f"_{'per_head' if per_head else 'per_channel'}_hops{hops}{'_x0' if X0 else ''}_e{E}"
    )
    return cuda.jit(kernel)


def forward_kernel(in_kind, out_kind, per_head, hops, has_x0, E):
    """The ``@cuda.jit`` warp-scan forward of one specialisation (cached)."""
    key = (in_kind, out_kind, bool(per_head), int(hops), bool(has_x0 and hops == 1), int(E))
    if key not in _CACHE:
        _CACHE[key] = _make_forward(*key)
    return _CACHE[key]


def launch_args(T, C, D, block_len, E, chunk):
    """``(grid, block, scalars)`` of the warp-scan forward for T tokens of C rows, a warp
    owning ``chunk`` tokens of a row (rounded up to a whole warp iteration, ``32 * E``)."""
    span = 32 * E
    chunk = -(-chunk // span) * span
    nwork = C * -(-T // chunk)
    scalars = tuple(np.int64(v) for v in (T, C, D, block_len, chunk, rounds(block_len, E),
                                          nwork))
    return -(-nwork * 32 // THREADS), THREADS, scalars
