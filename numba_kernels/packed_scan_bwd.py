"""Packed sequences, BHDL backward by warp chains: coalesced accesses along each channel row.

The backward of the packed sliding window recurrence (hops 0 and 1, docs/spec.md#gradients) in
the BHDL layout, a candidate to ``packed_walk.tokens_backward_kernel`` (one row a thread). A
warp owns a *group* of rows (a head's D rows when ``a`` is per head, else one row) and a chunk
of ``chunk`` tokens; each lane holds ``E = vec * nacc`` consecutive tokens (``nacc`` accesses
of ``vec`` elements, 16 bytes of the wider of u and dy), so a warp iteration covers a window of
``span = 32 * E`` contiguous tokens of a row. Per head the warp loops over the head's D rows
inside each iteration: ``a`` and the marks are read once an iteration, ``da`` is summed over
the rows in registers and stored once.

Per block ``[b0, b1]`` of a sequence s (blocks start at each sequence start, the last one may
be short; ``marks`` from ``packed_scan.mark_tokens`` say where), with ``w`` block-local
(``w_{b0-1} := 0``), ``g_t = prod_{i=b0..t} a_i`` and ``c_b`` the carrier (the previous
block's last ``w``, or ``x0[s]`` / 0 at a sequence's first block; hops 0: none):

    z_t   = dy_t + a_{t+1} z_{t+1}        (t < b1),   z_{b1}   = dy_{b1}
    lam_t = dy_t + a_{t+1} lam_{t+1}      (t < b1),   lam_{b1} = dy_{b1} + q_next
    q_b   = a_{b0} z_{b0}                 (q_next: of the next block in the same sequence, else
                                           0; hops 0: 0)
    du_t  = lam_t,   da_t = lam_t w_{t-1} + c_b z_t g_{t-1}   (w_{b0-1} = 0, g_{b0-1} = 1;
                                                              hops 0: the first term only)
    dx0[s] = q of the sequence's first block  (hops 1 with x0; the caller zeroes dx0)

Chains across lanes. Each quantity crossing a lane boundary is affine in what enters the lane:
forward (from the lane before) ``w_out = A w_in + Bw``, ``g_out = A g_in + Bg`` and ``c_out =
c_in`` or a lane-local carrier, reverse (from the lane after) ``Z_out = A Z_in + Qz`` and
``L_out = A L_in + Ql`` with one multiplier ``A``: the product of the lane's ``a`` where no block
starts in the lane; where one does, the outgoing value is the lane's own (chosen, not
multiplied by 0: an inf or NaN of another block does not pass, so sequences exchange no
values, non-finite ones included, as in the reference). A *round* hands
each lane its neighbour's outgoing value (one shuffle per quantity) and recomputes its own. A
lane whose block starts ``k`` lanes before it gets exact incoming values after ``k`` rounds;
the token before a lane's first token lies in a block that starts at most ``block_len`` tokens
earlier, and the block holding a lane's last token's successor ends at most ``block_len``
tokens later (tokens past T count as sequence starts), so ``rounds = ceil(block_len / E)``
rounds suffice for every chain: g (a only; once an iteration), then per row w, c (hops 1,
after w: a lane's carrier needs the exact w before it), z, then lam (after z: ``q`` is ``a z``
at a block start). Shuffles a row and iteration: ``4 * rounds`` (hops 1), ``3 * rounds``
(hops 0), plus ``rounds`` for g.

Windows. No state crosses warp iterations: a token's forward state depends on at most the
``2 * block_len - 1`` tokens before it (its block and the carrier's block), its reverse state on
at most the ``2 * block_len - 1`` after it (its block and the next block's q). An iteration
storing tokens ``[ts, te)`` reads the window ``[tw, tw + span)`` with ``tw = ts - halo``
(``halo = E * ceil(2 * block_len / E)``; at least 0: token 0 starts a sequence) and stores up
to ``halo`` tokens before the window's end (all of it where the window reaches T); the next
iteration starts at ``te``. So ``32 - 2 * ceil(2 * block_len / E)`` lanes an iteration store
(:func:`config` asks for at least :data:`MIN_STORED_LANES`).

``ok[0] == 0`` (invalid ``cu``, see ``packed_walk.check_cu``): the warp writes NaN to every
``da`` and ``du`` it owns, and the warps of the first chunk to all of ``dx0``; it reads
nothing else.

Arrays are 1-D views of C-contiguous arrays: u, dy, du ``(1, H, D, T)`` (flat ``row * T + t``,
``C = H * D`` rows), a, da ``(1, H, T)`` per head (flat ``head * T + t``) or ``(1, H, D, T)``;
bfloat16 as uint16 bits; x0, dx0 float32 ``(S, H, D)`` (flat ``s * C + row``; one-element
dummies where unused); marks int32 ``(T,)``; ok int32 ``(1,)``. ``vec > 1`` needs
``T % vec == 0`` and the arrays aligned to the access (rows then are). Accumulation in float32.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from ._dtypes import ITEM_SIZE, SIMULATOR
from ._ptx import (
    _array_op,
    _element_address,
    _load_words,
    _local_pointer,
    make_vector_load,
    make_vector_store,
    shfl_idx,
    shfl_up,
)
from .packed_scan import BLOCK, SEQUENCE
from .packed_walk import _device

__all__ = ["MAX_E", "MIN_STORED_LANES", "THREADS", "backward_kernel", "config", "fits",
           "halo_lanes", "launch_args", "rounds"]

THREADS = 32 if SIMULATOR else 128
"""Threads per block (whole warps; the simulator's shuffles span one block: one warp)."""

MAX_E = 16
"""Most tokens a lane (registers: about a dozen float32 arrays of E per lane)."""
MIN_STORED_LANES = 16
"""Fewest lanes of a warp iteration that store (the others read the halos)."""
PREFERRED_STORED_LANES = 24
""":func:`config` widens a lane's tokens (more accesses) until this many lanes store, within
:data:`MAX_E`."""

NAN = np.float32(np.nan)
F0 = np.float32(0.0)
F1 = np.float32(1.0)
FAR = np.int32(BLOCK | SEQUENCE)
"""The mark of a token past T: a sequence start of its own (nothing flows across it)."""
f32 = numba.float32


def rounds(block_len, E):
    """Chain rounds of one quantity with E tokens a lane: ``ceil(block_len / E)``."""
    return -(-block_len // E)


def halo_lanes(block_len, E):
    """Lanes of each halo of a warp iteration (before and after the stored lanes):
    ``ceil(2 * block_len / E)``."""
    return -(-2 * block_len // E)


def config(in_kind, dy_kind, T, block_len, aligned=None):
    """``(vec, nacc)`` of the backward for these kinds, T and block_len, or None where it does
    not run. ``vec``: elements of a 16-byte access of the wider of u and dy, halved until T is a
    multiple and ``aligned(vec)`` allows (None: any alignment). ``nacc``: accesses a lane, the
    fewest (powers of two, ``vec * nacc <= MAX_E``) with :data:`PREFERRED_STORED_LANES` lanes
    storing, else the fewest with :data:`MIN_STORED_LANES`; None if even ``MAX_E`` tokens a
    lane leave fewer."""
    vec = max(1, 16 // max(ITEM_SIZE[in_kind], ITEM_SIZE[dy_kind]))
    while vec > 1 and (T % vec or (aligned is not None and not aligned(vec))):
        vec //= 2
    for need in (PREFERRED_STORED_LANES, MIN_STORED_LANES):
        nacc = 1
        while vec * nacc <= MAX_E:
            if 32 - 2 * halo_lanes(block_len, vec * nacc) >= need:
                return vec, nacc
            nacc *= 2
    return None


def fits(in_kind, dy_kind, T, block_len, S, aligned=None):
    """Whether this backward takes the call (else the token walk): :func:`config` finds a lane
    width, and sequence numbers fit the marks (``S < 2**29``)."""
    return S < (1 << 29) and config(in_kind, dy_kind, T, block_len, aligned) is not None


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


def _make_marks_load(width):
    """``load(marks, index, dst, offset)``: ``dst[offset + k] = marks[index + k]`` (int32, one
    access of ``4 * width`` bytes, aligned to it)."""
    if SIMULATOR or width == 1:

        @_device
        def load_loop(marks, index, dst, offset):
            for k in range(width):
                dst[offset + k] = marks[numba.uint64(index + k)]

        return load_loop

    def body(context, builder, sig, args):
        address = _element_address(context, builder, sig.args[0], args[0], args[1])
        for k, word in enumerate(_load_words(builder, address, 4 * width)):
            builder.store(word, _local_pointer(context, builder, sig.args[2], args[2], args[3], k))

    return _array_op(body)


@_device
def _chain_up(A, B, K, n_rounds, lane):
    """The value entering this lane from the lane before (lane 0: 0) after ``n_rounds`` rounds
    of ``out = A * in + B``, or ``out = B`` where a block starts in the lane (``K == 0``): a
    select, so an inf or NaN entering such a lane (another block's) does not pass on."""
    vin = F0
    for _ in range(n_rounds):
        v = shfl_up(A * vin + B if K != F0 else B, 1)
        vin = v if lane > 0 else F0
    return vin


@_device
def _chain_down(A, B, K, n_rounds, lane):
    """The value entering this lane from the lane after (lane 31: 0) after ``n_rounds`` rounds
    of ``out = A * in + B``, or ``out = B`` where a block starts in the lane (``K == 0``)."""
    vin = F0
    for _ in range(n_rounds):
        v = shfl_idx(A * vin + B if K != F0 else B, min(lane + 1, 31))
        vin = v if lane < 31 else F0
    return vin


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------


def _make_backward(in_kind, dy_kind, per_head, hops, has_x0, vec, nacc):
    E = vec * nacc
    MW = min(vec, 4)  # marks an access (at most 16 bytes; T % vec == 0 keeps it inside T)
    NM = E // MW
    load_in = make_vector_load(in_kind, vec)
    load_dy = make_vector_load(dy_kind, vec)
    store_in = make_vector_store(in_kind, vec)
    load_marks = _make_marks_load(MW)
    HOPS1 = hops == 1
    X0 = has_x0 and HOPS1
    PH = per_head
    span = 32 * E

    def kernel(a, u, dy, da, du, x0, dx0, marks, ok, T, S, C, D, block_len, chunk, n_rounds,
               nwork):
        warp = cuda.grid(1) // 32
        if warp >= nwork:
            return
        lane = cuda.threadIdx.x % 32
        nrows = D if PH else 1  # rows of the warp's group
        groups = C // nrows
        grp = warp % groups
        t_lo = (warp // groups) * chunk
        t_hi = min(t_lo + chunk, T)
        a_base = grp * T  # a's row: the head (per head) or the channel row
        row0 = grp * nrows
        obuf = cuda.local.array(E, f32)  # du of a row, then da
        if ok[0] == 0:
            for e in range(E):
                obuf[e] = NAN
            if X0 and t_lo == 0:
                for s in range(lane, S, 32):
                    for r in range(nrows):
                        dx0[s * C + row0 + r] = NAN
            for t in range(t_lo + lane * E, t_hi, span):
                for k in range(nacc):
                    tk = t + k * vec
                    if tk < t_hi:
                        store_in(da, a_base + tk, obuf, k * vec)
                        for r in range(nrows):
                            store_in(du, (row0 + r) * T + tk, obuf, k * vec)
            return
        abuf = cuda.local.array(E, f32)
        mk = cuda.local.array(E, numba.int32)
        ubuf = cuda.local.array(E, f32)
        dbuf = cuda.local.array(E, f32)
        gp = cuda.local.array(E, f32)  # g_{t-1} (1 at a block start)
        wp = cuda.local.array(E, f32)  # w_{t-1} (0 at a block start)
        cb = cuda.local.array(E, f32)  # the carrier of t's block
        zb = cuda.local.array(E, f32)  # z_t
        lb = cuda.local.array(E, f32)  # lam_t without what enters the lane from after it
        dab = cuda.local.array(E, f32)  # da summed over the group's rows
        halo = E * (-(-2 * block_len // E))
        ts = t_lo
        while ts < t_hi:
            tw = max(ts - halo, 0)
            we = tw + span
            te = t_hi if we >= T else min(t_hi, we - halo)
            t0 = tw + lane * E
            for k in range(nacc):
                tk = t0 + k * vec
                if tk < T:
                    load_in(a, a_base + tk, abuf, k * vec)
                else:
                    for j in range(vec):
                        abuf[k * vec + j] = F0
            for k in range(NM):
                tk = t0 + k * MW
                if tk < T:
                    load_marks(marks, tk, mk, k * MW)
                else:
                    for j in range(MW):
                        mk[k * MW + j] = FAR
            # the lane's multiplier A (0 when a block starts in it) and g from g_in = 0
            A = F1
            K = F1  # 0 when a block starts in the lane (A may be 0 without one)
            g = F0
            for e in range(E):
                if mk[e] & BLOCK:
                    A = F0
                    K = F0
                    g = abuf[e]
                else:
                    A *= abuf[e]
                    g *= abuf[e]
            gin = _chain_up(A, g, K, n_rounds, lane)
            g = gin
            for e in range(E):
                if mk[e] & BLOCK:
                    gp[e] = F1
                    g = abuf[e]
                else:
                    gp[e] = g
                    g *= abuf[e]
                dab[e] = F0
            for r in range(nrows):
                row = row0 + r
                for k in range(nacc):
                    tk = t0 + k * vec
                    if tk < T:
                        load_in(u, row * T + tk, ubuf, k * vec)
                        load_dy(dy, row * T + tk, dbuf, k * vec)
                    else:
                        for j in range(vec):
                            ubuf[k * vec + j] = F0
                            dbuf[k * vec + j] = F0
                # forward: w from w_in = 0, chained; then w_{t-1} and the lane's carriers
                w = F0
                for e in range(E):
                    if mk[e] & BLOCK:
                        w = ubuf[e]
                    else:
                        w = abuf[e] * w + ubuf[e]
                w = _chain_up(A, w, K, n_rounds, lane)
                c = F0
                for e in range(E):
                    # x0 of the token's sequence at every token (s is valid at each, FAR too):
                    # no branch around the load
                    xv = x0[(mk[e] >> 2) * C + row] if X0 else F0
                    if mk[e] & BLOCK:
                        if HOPS1:
                            c = xv if mk[e] & SEQUENCE else w
                        wp[e] = F0
                        w = ubuf[e]
                    else:
                        wp[e] = w
                        w = abuf[e] * w + ubuf[e]
                    cb[e] = c
                if HOPS1:
                    # the carrier entering the lane: the lane's own where a block starts in it
                    cin = _chain_up(F1, c, K, n_rounds, lane)
                    pre = True
                    for e in range(E):
                        if mk[e] & BLOCK:
                            pre = False
                        if pre:
                            cb[e] = cin
                # reverse: Z from Z_in = 0, chained; then z_t and lam_t from L_in = 0, chained
                Z = F0
                for q in range(E):
                    e = E - 1 - q
                    if mk[e] & BLOCK:
                        Z = F0
                    else:
                        Z = abuf[e] * (dbuf[e] + Z)
                Z = _chain_down(A, Z, K, n_rounds, lane)
                L = F0
                for q in range(E):
                    e = E - 1 - q
                    z = dbuf[e] + Z
                    lam = dbuf[e] + L
                    zb[e] = z
                    lb[e] = lam
                    if X0 and mk[e] & SEQUENCE:
                        tk = t0 + e  # q of the sequence's first block
                        if tk >= ts and tk < te:
                            dx0[(mk[e] >> 2) * C + row] = abuf[e] * z
                    if mk[e] & BLOCK:
                        L = abuf[e] * z if HOPS1 and not (mk[e] & SEQUENCE) else F0
                        Z = F0
                    else:
                        L = abuf[e] * lam
                        Z = abuf[e] * z
                L = _chain_down(A, L, K, n_rounds, lane)
                # lam_t = lb + (what enters from after the lane, through the a's to t)
                for q in range(E):
                    e = E - 1 - q
                    lam = lb[e] + L
                    obuf[e] = lam
                    d = lam * wp[e]
                    if HOPS1:
                        d += cb[e] * zb[e] * gp[e]
                    dab[e] += d
                    if mk[e] & BLOCK:
                        L = F0
                    else:
                        L = abuf[e] * L
                for k in range(nacc):
                    tk = t0 + k * vec
                    if tk >= ts and tk < te:
                        store_in(du, row * T + tk, obuf, k * vec)
            for k in range(nacc):
                tk = t0 + k * vec
                if tk >= ts and tk < te:
                    store_in(da, a_base + tk, dab, k * vec)
            ts = te

    kernel.__name__ = kernel.__qualname__ = (
        f"packed_scan_backward_bhdl_{in_kind}_dy_{dy_kind}"
        f"_{'per_head' if per_head else 'per_channel'}_hops{hops}{'_x0' if X0 else ''}"
        f"_vec{vec}_nacc{nacc}"
    )
    return kernel


_CACHE: dict = {}


def backward_kernel(in_kind, dy_kind, per_head, hops, has_x0, vec, nacc):
    """The ``@cuda.jit`` warp-chain backward of one specialisation (cached); ``E = vec * nacc``
    tokens a lane, ``vec`` elements an access."""
    key = (in_kind, dy_kind, bool(per_head), int(hops), bool(has_x0 and hops == 1), int(vec),
           int(nacc))
    k = _CACHE.get(key)
    if k is None:
        k = _CACHE[key] = cuda.jit(_make_backward(*key))
    return k


def launch_args(T, S, C, D, block_len, per_head, vec, nacc, chunk):
    """``(grid, block, scalars)`` of the backward for T tokens of C rows (``D`` a head's rows):
    a warp owns a group of rows (a head per head, else a row) and ``chunk`` tokens (rounded up
    to a whole window, ``32 * vec * nacc``). ``scalars``: ``(T, S, C, D, block_len, chunk,
    rounds, nwork)`` as int64, the kernel's arguments after ``ok``."""
    E = vec * nacc
    span = 32 * E
    chunk = -(-max(chunk, 1) // span) * span
    groups = C // D if per_head else C
    nwork = groups * -(-T // chunk)
    scalars = tuple(np.int64(v) for v in (T, S, C, D, block_len, chunk,
                                          rounds(block_len, E), nwork))
    return -(-nwork * 32 // THREADS), THREADS, scalars
