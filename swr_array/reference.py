"""The NumPy reference: every number swr-array returns is defined here.

Notation follows the paper (Secrieru et al., arXiv:2512.13921) and docs/concepts.md. Arrays are
time-last, ``(..., N)``; ``a`` broadcasts against ``u`` (a per-head coefficient has a size-1 channel
axis). Blocks of ``block_len`` (``l``) start at absolute multiples of ``l``.

Per block j:
    w_t = a_t w_{t-1} + u_t      (local solve, w := 0 before the block)
    g_t = a_{jl} ... a_t         (attenuation)
    v_j = w_end, C_j = g_end     (carrier, compound attenuation)
Sliding window recurrence with ``hops`` = k:
    y_t = w_t + g_t S_{j-1},  S_{j-1} = sum_{m<k} (C_{j-1} ... C_{j-m}) v_{j-1-m},  v_{-1} := x0
hops=None is the exact recurrence (S_{j-1} = s_{j-1}, s_j = v_j + C_j s_{j-1}).

The block-level functions (``block_carry``, ``block_adjoints``, ``advance_carriers``) take an array
namespace ``xp`` so the CuPy backend runs the very same algebra between its kernels.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "sequential",
    "dense_operator",
    "dense_x0_column",
    "decomposition",
    "local_scan",
    "block_carriers",
    "block_grad_sums",
    "block_carry",
    "block_adjoints",
    "swr",
    "swr_vjp",
    "swr_tokenwise",
    "initial_carriers",
    "advance_carriers",
    "num_carriers",
]


# ----------------------------------------------------------------------------------------------
# Plain forms: the exact recurrence and the dense transfer operator
# ----------------------------------------------------------------------------------------------


def _f64(*xs):
    return [np.asarray(x, dtype=np.float64) for x in xs]


def sequential(a, u, *, x0=None):
    """Exact recurrence x_t = a_t x_{t-1} + u_t along the last axis, x_{-1} = x0 (default 0)."""
    a, u = _f64(a, u)
    a, u = np.broadcast_arrays(a, u)
    x = np.zeros(u.shape[:-1]) if x0 is None else np.array(np.broadcast_to(x0, u.shape[:-1]), float)
    y = np.empty(u.shape)
    for t in range(u.shape[-1]):
        x = a[..., t] * x + u[..., t]
        y[..., t] = x
    return y


def _window_start(t: int, block_len: int, hops: int | None) -> int:
    """First input index (possibly -1 for x0) that output t sees; -1 means x0 is in the window."""
    if hops is None:
        return -1
    j = t // block_len
    return max((j - hops) * block_len, -1) if hops > 0 else j * block_len


def dense_operator(a, block_len: int = 16, hops: int | None = 1):
    """The N x N lower-triangular truncated transfer operator L_k of a 1-D coefficient sequence.

    ``y = L_k @ u + dense_x0_column(...) * x0``; L[t, s] = a_{s+1} ... a_t inside the window.
    """
    (a,) = _f64(a)
    n = a.shape[0]
    L = np.zeros((n, n))
    for t in range(n):
        start = max(_window_start(t, block_len, hops), 0)
        prod = 1.0
        for s in range(t, start - 1, -1):
            L[t, s] = prod
            prod *= a[s]
    return L


def dense_x0_column(a, block_len: int = 16, hops: int | None = 1):
    """The coefficient of x0 in every output: a_0 ... a_t where x0 is inside the window, else 0."""
    (a,) = _f64(a)
    n = a.shape[0]
    col = np.zeros(n)
    for t in range(n):
        if _window_start(t, block_len, hops) == -1:
            col[t] = np.prod(a[: t + 1])
    return col


def decomposition(a, block_len: int = 16, hops: int | None = 1):
    """The factors of L = blockdiag(L_j) + G Z T R for a 1-D coefficient sequence.

    Returns a dict with ``L_local`` (N x N, block diagonal), ``G`` (N x nb, attenuations),
    ``Z`` (nb x nb, down shift), ``T`` (nb x nb, sum_{m<k} (C Z)^m, or (I - C Z)^-1 for hops=None)
    and ``R`` (nb x N, carrier readout: v = R u).
    """
    (a,) = _f64(a)
    n = a.shape[0]
    nb = -(-n // block_len)
    L_local = np.zeros((n, n))
    G = np.zeros((n, nb))
    R = np.zeros((nb, n))
    Cd = np.zeros(nb)
    for j in range(nb):
        lo, hi = j * block_len, min((j + 1) * block_len, n)
        for t in range(lo, hi):
            G[t, j] = np.prod(a[lo : t + 1])
            for s in range(lo, t + 1):
                L_local[t, s] = np.prod(a[s + 1 : t + 1])
        for s in range(lo, hi):
            R[j, s] = np.prod(a[s + 1 : hi])
        Cd[j] = np.prod(a[lo:hi])
    Z = np.eye(nb, k=-1)
    CZ = np.diag(Cd) @ Z
    if hops is None:
        T = np.linalg.inv(np.eye(nb) - CZ)
    else:
        T = np.zeros((nb, nb))
        P = np.eye(nb)
        for _ in range(hops):
            T += P
            P = CZ @ P
    return {"L_local": L_local, "G": G, "Z": Z, "T": T, "R": R}


# ----------------------------------------------------------------------------------------------
# Block-local pieces
# ----------------------------------------------------------------------------------------------


def _blocked(a, u, block_len, offset=0, w0=None, g0=None, xp=np):
    """Pad to whole blocks and reshape to (..., nb, l).

    The first ``offset`` slots hold a virtual prefix whose last slot carries (g0, w0): with a=1, u=0
    elsewhere the local scan then reaches exactly w0, g0 just before index 0. The end is padded with
    a=1, u=0, so a partial last block keeps its w and g constant up to the block end.
    """
    n = u.shape[-1]
    nb = -(-(offset + n) // block_len)
    total = nb * block_len
    lead = u.shape[:-1]
    ab = xp.ones(lead + (total,), dtype=u.dtype)
    ub = xp.zeros(lead + (total,), dtype=u.dtype)
    ab[..., offset : offset + n] = a
    ub[..., offset : offset + n] = u
    if offset:
        ab[..., offset - 1] = 1.0 if g0 is None else g0
        ub[..., offset - 1] = 0.0 if w0 is None else w0
    return ab.reshape(lead + (nb, block_len)), ub.reshape(lead + (nb, block_len)), nb


def _scan_blocks(ab, ub, xp=np):
    """Local solve and attenuation inside each block of (..., nb, l) arrays."""
    w = xp.empty_like(ub)
    g = xp.empty_like(ab)
    wt = ub[..., 0]
    gt = ab[..., 0]
    w[..., 0], g[..., 0] = wt, gt
    for i in range(1, ub.shape[-1]):
        wt = ab[..., i] * wt + ub[..., i]
        gt = ab[..., i] * gt
        w[..., i], g[..., i] = wt, gt
    return w, g


def local_scan(a, u, block_len: int = 16, *, offset: int = 0, w0=None, g0=None):
    """Per-block local solve ``w`` and attenuation ``g``, time-last like ``u``.

    ``offset``, ``w0``, ``g0`` continue a block begun earlier (index 0 sits at in-block position
    ``offset``, after w0 and g0).
    """
    a, u = _f64(a, u)
    a, u = np.broadcast_arrays(a, u)
    n = u.shape[-1]
    ab, ub, _ = _blocked(a, u, block_len, offset, w0, g0)
    w, g = _scan_blocks(ab, ub)
    lead = u.shape[:-1]
    w = w.reshape(lead + (-1,))[..., offset : offset + n]
    g = g.reshape(lead + (-1,))[..., offset : offset + n]
    return w, g


def block_carriers(a, u, block_len: int = 16, *, offset: int = 0, w0=None, g0=None):
    """Carrier ``v`` and compound attenuation ``C`` of every touched block, ``(..., nb)``.

    A partial last block reports w and g at its last index.
    """
    a, u = _f64(a, u)
    a, u = np.broadcast_arrays(a, u)
    ab, ub, _ = _blocked(a, u, block_len, offset, w0, g0)
    w, g = _scan_blocks(ab, ub)
    return w[..., -1], g[..., -1]


def block_grad_sums(a, dy, block_len: int = 16):
    """q_j = sum over block j of g_t dy_t, ``(..., nb)`` (offset 0)."""
    a, dy = _f64(a, dy)
    a, dy = np.broadcast_arrays(a, dy)
    ab, db, _ = _blocked(a, dy, block_len)
    g = np.cumprod(ab, axis=-1)
    return (g * db).sum(axis=-1)


# ----------------------------------------------------------------------------------------------
# Block-level algebra (array-namespace generic)
# ----------------------------------------------------------------------------------------------


def num_carriers(hops: int | None) -> int:
    """How many carriers a state keeps: hops for k >= 0, one running s for hops=None."""
    return 1 if hops is None else hops


def block_carry(v, C, hops, carry_v=None, xp=np):
    """S entering every touched block, ``(..., nb)``.

    ``carry_v``/``carry_C`` come as a pair ``carry_v=(cv, cC)``: the valid carriers before the first
    touched block, newest first, ``(..., K)`` (x0 is the carrier of block -1). For hops=None
    ``cv[..., 0]`` is the running s.
    """
    nb = v.shape[-1]
    S = xp.zeros_like(v)
    if hops == 0 or nb == 0:
        return S
    if carry_v is None:
        cv = cC = xp.zeros(v.shape[:-1] + (0,), dtype=v.dtype)
    else:
        cv, cC = carry_v
    if hops is None:
        s = cv[..., 0] if cv.shape[-1] else xp.zeros(v.shape[:-1], dtype=v.dtype)
        for j in range(nb):
            S[..., j] = s
            s = v[..., j] + C[..., j] * s
        return S
    K = cv.shape[-1]
    # extended carrier sequences in time order: valid earlier carriers (oldest first), then v
    Vx = xp.concatenate([cv[..., ::-1], v], axis=-1)
    Cx = xp.concatenate([cC[..., ::-1], C], axis=-1)
    R = xp.ones_like(v)
    pos = xp.arange(nb) + K  # index of block j in the extended sequence
    # loop bounds come from Python ints: no device-to-host sync when xp is CuPy
    for m in range(min(hops, nb + K - 1)):
        src = pos - 1 - m
        valid = src >= 0
        srcc = xp.maximum(src, 0)
        S += xp.where(valid, R * Vx[..., srcc], 0.0)
        R = xp.where(valid, R * Cx[..., srcc], 0.0)
    return S


def block_adjoints(v, C, q, hops, x0=None, xp=np):
    """Adjoints of the block-level map (v, C, x0) -> S, given q = dLoss/dS, from position 0.

    Returns ``(dv, dC, dx0)``: ``dv``, ``dC`` ``(..., nb)`` and ``dx0`` ``(...)`` (zeros when x0 is
    None or does not enter, as for hops=0).
    """
    nb = v.shape[-1]
    lead = v.shape[:-1]
    zero = xp.zeros(lead, dtype=v.dtype)
    if hops == 0 or nb == 0:
        return xp.zeros_like(v), xp.zeros_like(v), zero
    x0v = zero if x0 is None else xp.broadcast_to(xp.asarray(x0, dtype=v.dtype), lead)
    if hops is None:
        # r_j = q_{j+1} + C_{j+1} r_{j+1} is the adjoint of s_j; s_{j-1} = S_j
        r = xp.zeros_like(v)
        acc = zero
        for j in range(nb - 1, -1, -1):
            r[..., j] = acc
            acc = q[..., j] + C[..., j] * acc
        S = block_carry(v, C, None, (x0v[..., None], xp.zeros_like(x0v)[..., None]), xp=xp)
        return r, r * S, (acc if x0 is not None else zero)
    one = xp.ones(lead + (1,), dtype=v.dtype)
    # dv_i = sum_{m<k} (C_{i+1} ... C_{i+m}) q_{i+1+m} for i = -1 .. nb-1 (i = -1: x0);
    # extended index e = i + 1, qe[e] = q_e, Ce[e] = C_{e-1}
    qe = xp.concatenate([q, 0 * one], axis=-1)
    Ce = xp.concatenate([0 * one, C], axis=-1)
    e = xp.arange(nb + 1)
    dve = xp.zeros(lead + (nb + 1,), dtype=v.dtype)
    R = xp.ones(lead + (nb + 1,), dtype=v.dtype)
    for m in range(min(hops, nb)):
        tgt = e + m
        valid = tgt <= nb - 1
        dve += xp.where(valid, R * qe[..., xp.minimum(tgt, nb)], 0.0)
        R = xp.where(tgt + 1 <= nb, R * Ce[..., xp.minimum(tgt + 1, nb)], 0.0)
    dv = dve[..., 1:]
    dx0 = dve[..., 0] if x0 is not None else zero
    # dC_i = sum_{d=1}^{k-1} q_{i+d} (C_{i+1} ... C_{i+d-1}) W_i(k-d), with the windowed partial
    # carry W_i(n) = sum_{e=1}^{n} (C_{i-e+1} ... C_{i-1}) v_{i-e}   (v_{-1} = x0)
    i = xp.arange(nb)
    Ve = xp.concatenate([x0v[..., None], v], axis=-1)  # Ve[i + 1] = v_i
    W = [xp.zeros_like(v)]
    P = xp.ones_like(v)
    for n in range(1, min(hops, nb + 1)):
        src = i - n
        W.append(W[-1] + xp.where(src >= -1, P * Ve[..., xp.maximum(src + 1, 0)], 0.0))
        P = xp.where(src >= 0, P * C[..., xp.maximum(src, 0)], 0.0)
    dC = xp.zeros_like(v)
    R = xp.ones_like(v)
    for d in range(1, min(hops, nb)):
        tgt = i + d
        valid = tgt <= nb - 1
        tc = xp.minimum(tgt, nb - 1)
        # W_i(n) stops growing once n passes the oldest carrier (x0)
        dC += xp.where(valid, q[..., tc] * R * W[min(hops - d, len(W) - 1)], 0.0)
        R = xp.where(valid, R * C[..., tc], 0.0)
    return dv, dC, dx0


# ----------------------------------------------------------------------------------------------
# Carriers kept by a state
# ----------------------------------------------------------------------------------------------


def initial_carriers(lead_shape, hops, x0=None, xp=np, dtype=np.float64):
    """(carry_v, carry_C) at position 0: newest first, x0 (or 0) as the carrier of block -1."""
    K = num_carriers(hops)
    cv = xp.zeros(tuple(lead_shape) + (K,), dtype=dtype)
    cC = xp.zeros(tuple(lead_shape) + (K,), dtype=dtype)
    if x0 is not None and K:
        cv[..., 0] = x0
    return cv, cC


def _valid_carriers(position: int, block_len: int, hops) -> int:
    """Carriers that exist before the block holding ``position`` (x0 counts as block -1)."""
    if hops is None:
        return 1
    return min(hops, position // block_len + 1)


def advance_carriers(carry, v, C, S, *, position: int, n: int, block_len: int, hops, xp=np):
    """Carriers after consuming ``n`` tokens from ``position``, given the chunk's per-block
    ``v``, ``C`` and incoming ``S`` (``(..., nb)``; only the last ``hops + 1`` blocks matter, so a
    caller may pass a tail of them, aligned to the end).

    Returns ``(carry_v, carry_C)`` newest first, ``(..., K)``.
    """
    cv, cC = carry
    K = cv.shape[-1]
    end = position + n
    if K == 0 or n == 0:
        return cv.copy(), cC.copy()
    # blocks completed inside the chunk: all touched ones but a final partial one
    complete = v.shape[-1] - (1 if end % block_len else 0)
    if hops is None:
        if complete == 0:
            return cv.copy(), cC.copy()
        j = complete - 1
        s = v[..., j] + C[..., j] * S[..., j]
        return s[..., None].copy(), xp.zeros_like(cC)
    take = min(K, complete)
    newv = v[..., :complete][..., ::-1][..., :take]
    newC = C[..., :complete][..., ::-1][..., :take]
    out_v = xp.concatenate([newv, cv], axis=-1)[..., :K]
    out_C = xp.concatenate([newC, cC], axis=-1)[..., :K]
    valid = _valid_carriers(end, block_len, hops)
    if valid < K:
        out_v[..., valid:] = 0.0
        out_C[..., valid:] = 0.0
    return xp.ascontiguousarray(out_v), xp.ascontiguousarray(out_C)


# ----------------------------------------------------------------------------------------------
# The sliding window recurrence, its continuation and its gradient
# ----------------------------------------------------------------------------------------------


def swr(
    a,
    u,
    *,
    block_len: int = 16,
    hops: int | None = 1,
    x0=None,
    position: int = 0,
    w0=None,
    g0=None,
    carry=None,
    return_parts: bool = False,
):
    """Block two-pass evaluation of the SWR, float64, time-last.

    A continuation starts at absolute ``position`` with the partial block's ``w0``, ``g0`` and the
    earlier ``carry`` = (carry_v, carry_C) (see :func:`advance_carriers`); without them the
    sequence starts at 0 with the initial carry ``x0``.

    Returns y, or with ``return_parts`` the tuple (y, v, C, S) of per-block quantities.
    """
    a, u = _f64(a, u)
    a, u = np.broadcast_arrays(a, u)
    n = u.shape[-1]
    lead = u.shape[:-1]
    offset = position % block_len
    if carry is None:
        carry = initial_carriers(lead, hops, x0)
    valid = _valid_carriers(position, block_len, hops)
    cv, cC = carry
    ab, ub, nb = _blocked(a, u, block_len, offset, w0, g0)
    w, g = _scan_blocks(ab, ub)
    v, C = w[..., -1], g[..., -1]
    S = block_carry(v, C, hops, (cv[..., :valid], cC[..., :valid]))
    y = (w + g * S[..., None]).reshape(lead + (nb * block_len,))[..., offset : offset + n]
    if return_parts:
        return y, v, C, S
    return y


def swr_vjp(a, u, dy, *, block_len: int = 16, hops: int | None = 1, x0=None):
    """Vector-Jacobian product of :func:`swr` (from position 0): returns (da, du, dx0).

    ``da`` and ``du`` have the broadcast shape of ``a`` and ``u`` (sum ``da`` over channels that
    share a coefficient); ``dx0`` is None when x0 is None.
    """
    a, u, dy = _f64(a, u, dy)
    a, u, dy = np.broadcast_arrays(a, u, dy)
    n = u.shape[-1]
    lead = u.shape[:-1]
    ab, ub, nb = _blocked(a, u, block_len)
    _, db, _ = _blocked(a, dy, block_len)
    w, g = _scan_blocks(ab, ub)
    v, C = w[..., -1], g[..., -1]
    q = (g * db).sum(axis=-1)
    carry = initial_carriers(lead, hops, x0)
    S = block_carry(v, C, hops, carry)
    dv, dC, dx0 = block_adjoints(v, C, q, hops, x0)
    # reverse local scans: lam (adjoint of w, seeded with dv at the block end) and mu (of g)
    lam = np.empty_like(db)
    mu = np.empty_like(db)
    lt, mt = db[..., -1] + dv, db[..., -1] * S + dC
    lam[..., -1], mu[..., -1] = lt, mt
    for i in range(block_len - 2, -1, -1):
        lt = db[..., i] + ab[..., i + 1] * lt
        mt = db[..., i] * S + ab[..., i + 1] * mt
        lam[..., i], mu[..., i] = lt, mt
    w_prev = np.concatenate([np.zeros_like(w[..., :1]), w[..., :-1]], axis=-1)
    g_prev = np.concatenate([np.ones_like(g[..., :1]), g[..., :-1]], axis=-1)
    da = lam * w_prev + mu * g_prev
    du = lam.reshape(lead + (-1,))[..., :n]
    da = da.reshape(lead + (-1,))[..., :n]
    return da, du, (dx0 if x0 is not None else None)


def swr_packed(a, u, cu_seqlens, *, block_len: int = 16, hops: int | None = 1, x0=None):
    """Packed sequences, time-last ``(..., T)``: each segment ``cu[s]:cu[s+1]`` run alone.

    The definition of ``cu_seqlens`` (docs/spec.md, packed sequences): sequence s is its own
    recurrence, blocks aligned at its first token, no carry from the sequence before, initial
    carry ``x0[s]`` (``x0``: ``(S, ...)`` with the leading dimension indexing sequences, the rest
    u's leading dims without the batch; None: 0). ``a`` and ``u`` have batch 1.
    """
    a, u = _f64(a, u)
    a, u = np.broadcast_arrays(a, u)
    cu = [int(c) for c in np.asarray(cu_seqlens)]
    y = np.empty(u.shape)
    for s in range(len(cu) - 1):
        lo, hi = cu[s], cu[s + 1]
        xs = None if x0 is None else np.asarray(x0, dtype=np.float64)[s][None]
        y[..., lo:hi] = swr(a[..., lo:hi], u[..., lo:hi], block_len=block_len, hops=hops, x0=xs)
    return y


def swr_vjp_packed(a, u, dy, cu_seqlens, *, block_len: int = 16, hops: int | None = 1, x0=None):
    """Vector-Jacobian product of :func:`swr_packed`: (da, du, dx0), dx0 ``(S, ...)`` or None."""
    a, u, dy = _f64(a, u, dy)
    a, u, dy = np.broadcast_arrays(a, u, dy)
    cu = [int(c) for c in np.asarray(cu_seqlens)]
    da, du = np.empty(u.shape), np.empty(u.shape)
    dx0 = None if x0 is None else np.empty(np.shape(x0))
    for s in range(len(cu) - 1):
        lo, hi = cu[s], cu[s + 1]
        xs = None if x0 is None else np.asarray(x0, dtype=np.float64)[s][None]
        da_s, du_s, dx_s = swr_vjp(
            a[..., lo:hi], u[..., lo:hi], dy[..., lo:hi], block_len=block_len, hops=hops, x0=xs
        )
        da[..., lo:hi], du[..., lo:hi] = da_s, du_s
        if dx0 is not None:
            dx0[s] = dx_s[0]
    return da, du, dx0


def swr_tokenwise(a, u, *, block_len: int = 16, hops: int | None = 1, x0=None):
    """The per-token (decode) form: one step per token, the state carried in between."""
    a, u = _f64(a, u)
    a, u = np.broadcast_arrays(a, u)
    lead = u.shape[:-1]
    w = np.zeros(lead)
    g = np.ones(lead)
    carry = initial_carriers(lead, hops, x0)
    y = np.empty(u.shape)
    for t in range(u.shape[-1]):
        w, g, carry, y[..., t] = step(a[..., t], u[..., t], w, g, carry, t, block_len, hops)
    return y


def step(a_t, u_t, w, g, carry, position, block_len, hops, xp=np):
    """Advance one token: returns (w, g, carry, y_t). ``position`` is that token's index."""
    if position % block_len == 0:
        w, g = u_t + 0.0 * w, a_t + 0.0 * g
    else:
        w, g = a_t * w + u_t, a_t * g
    cv, cC = carry
    valid = _valid_carriers(position, block_len, hops)
    S = block_carry(w[..., None], g[..., None], hops, (cv[..., :valid], cC[..., :valid]), xp=xp)
    y_t = w + g * S[..., 0]
    if (position + 1) % block_len == 0:
        carry = advance_carriers(
            carry,
            w[..., None],
            g[..., None],
            S,
            position=position - position % block_len,
            n=block_len,
            block_len=block_len,
            hops=hops,
            xp=xp,
        )
        w, g = xp.zeros_like(w), xp.ones_like(g)
    return w, g, carry, y_t


# ==============================================================================================
# Phalanx layer (docs/spec.md#phalanx; spear's SigmoidA parametrisation)
# ==============================================================================================
#
# Parameters (a dict of arrays, see swr_array.phalanx): one fused input projection W_in
# (dim, W) with W = H*D + 2*KV*D + H, its columns in the order [V | Bg | C | A]:
#     V  = x W_v                                 (H*D)   no bias
#     Bg = sigmoid(x W_b + b_b)                  (KV*D)  kv heads, repeated over head groups
#     C  = x W_c + b_c                           (KV*D)  kv heads, repeated over head groups
#     A  = decay_max * sigmoid(x W_a + b_a)      (H)     one coefficient per head
#     Y  = swr(A, Bg * V, hops) * C + V,   out = Y W_out   (W_out: (H*D, dim))
# Head h reads kv head h // (H // KV). The block `z -> Y` (everything between the two GEMMs) is
# `phalanx_mix`; it is what the fused GPU kernel computes.


def phalanx_dims(params):
    """(dim, heads, head_dim, kv_heads, decay_max) read off the parameter shapes."""
    heads = int(params["b_a"].shape[0])
    head_dim = int(params["W_out"].shape[0]) // heads
    kv_heads = int(params["b_b"].shape[0]) // head_dim
    return int(params["W_in"].shape[0]), heads, head_dim, kv_heads, float(params["decay_max"])


def phalanx_columns(heads: int, head_dim: int, kv_heads: int):
    """Column ranges of the fused projection: dict name -> (start, stop)."""
    hd, kd = heads * head_dim, kv_heads * head_dim
    return {"v": (0, hd), "b": (hd, hd + kd), "c": (hd + kd, hd + 2 * kd),
            "a": (hd + 2 * kd, hd + 2 * kd + heads)}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _phalanx_gates(z, b_a, b_b, b_c, heads, head_dim, kv_heads, decay_max):
    """z (B, L, W) -> sig_a (B, L, H), A (B, L, H), Bg, C, V (B, L, H, D), float64."""
    z, b_a, b_b, b_c = _f64(z, b_a, b_b, b_c)
    B, L = z.shape[:2]
    col = phalanx_columns(heads, head_dim, kv_heads)
    group = heads // kv_heads

    def section(name):
        lo, hi = col[name]
        return z[..., lo:hi]

    sig_a = _sigmoid(section("a") + b_a)
    V = section("v").reshape(B, L, heads, head_dim)
    Bg = _sigmoid(section("b") + b_b).reshape(B, L, kv_heads, head_dim)
    C = (section("c") + b_c).reshape(B, L, kv_heads, head_dim)
    Bg = np.repeat(Bg, group, axis=2)
    C = np.repeat(C, group, axis=2)
    return sig_a, decay_max * sig_a, Bg, C, V


def phalanx_mix(
    z, b_a, b_b, b_c, *, heads, head_dim, kv_heads, decay_max=1.0, block_len=16, hops=1,
    position=0, w0=None, g0=None, carry=None, return_parts=False,
):
    """Y = swr(A, Bg * V, hops) * C + V from the fused projection z (B, L, W), float64.

    Returns Y (B, L, H*D), or with ``return_parts`` the tuple (Y, v, C, S) where v, C, S are the
    per-block quantities of the inner SWR over channels (B, H, D, nb) (see :func:`swr`); the
    continuation arguments are those of :func:`swr` for the inner recurrence.
    """
    _, A, Bg, C, V = _phalanx_gates(z, b_a, b_b, b_c, heads, head_dim, kv_heads, decay_max)
    B, L = V.shape[:2]
    at = A.transpose(0, 2, 1)[:, :, None, :]  # (B, H, 1, L)
    ut = (Bg * V).transpose(0, 2, 3, 1)  # (B, H, D, L)
    y, v, Cb, S = swr(at, ut, block_len=block_len, hops=hops, position=position, w0=w0, g0=g0,
                      carry=carry, return_parts=True)
    Y = (y.transpose(0, 3, 1, 2) * C + V).reshape(B, L, heads * head_dim)
    return (Y, v, Cb, S) if return_parts else Y


def phalanx_mix_vjp(z, b_a, b_b, b_c, dy, *, heads, head_dim, kv_heads, decay_max=1.0,
                    block_len=16, hops=1):
    """Gradient of ``sum(dy * phalanx_mix(z, ...))`` with respect to z, from position 0.

    Returns ``(dz, Y)``: dz (B, L, W) and the forward output Y (B, L, H*D), float64. The bias
    gradients are the sums of dz's columns over (B, L).
    """
    sig_a, A, Bg, C, V = _phalanx_gates(z, b_a, b_b, b_c, heads, head_dim, kv_heads, decay_max)
    B, L = V.shape[:2]
    dY = np.asarray(dy, dtype=np.float64).reshape(B, L, heads, head_dim)
    at = A.transpose(0, 2, 1)[:, :, None, :]
    u = Bg * V
    ut = u.transpose(0, 2, 3, 1)
    s = swr(at, ut, block_len=block_len, hops=hops).transpose(0, 3, 1, 2)  # (B, L, H, D)
    ds = dY * C
    da, du, _ = swr_vjp(at, ut, ds.transpose(0, 2, 3, 1), block_len=block_len, hops=hops)
    da = da.sum(axis=2).transpose(0, 2, 1)  # (B, L, H): summed over the head's channels
    du = du.transpose(0, 3, 1, 2)
    group = heads // kv_heads

    def to_kv(x):  # sum over the heads that share a kv head
        return x.reshape(B, L, kv_heads, group, head_dim).sum(axis=3).reshape(B, L, -1)

    dz_v = dY + du * Bg
    dz_b = to_kv(du * V * Bg * (1.0 - Bg))
    dz_c = to_kv(dY * s)
    dz_a = da * decay_max * sig_a * (1.0 - sig_a)
    dz = np.concatenate([dz_v.reshape(B, L, -1), dz_b, dz_c, dz_a], axis=-1)
    Y = (s * C + V).reshape(B, L, heads * head_dim)
    return dz, Y


def phalanx_reference(x, params, *, block_len: int = 16, hops: int | None = 1, position=0,
                      w0=None, g0=None, carry=None, return_parts=False):
    """The Phalanx layer in float64: out = phalanx_mix(x W_in) W_out, x (B, L, dim).

    Continuation arguments and ``return_parts`` as in :func:`phalanx_mix` (the parts are those of
    the inner SWR).
    """
    _, heads, head_dim, kv_heads, decay_max = phalanx_dims(params)
    x, W_in, W_out = _f64(x, params["W_in"], params["W_out"])
    res = phalanx_mix(x @ W_in, params["b_a"], params["b_b"], params["b_c"], heads=heads,
                      head_dim=head_dim, kv_heads=kv_heads, decay_max=decay_max,
                      block_len=block_len, hops=hops, position=position, w0=w0, g0=g0,
                      carry=carry, return_parts=True)
    out = res[0] @ W_out
    return (out,) + tuple(res[1:]) if return_parts else out


def phalanx_vjp_reference(x, params, dout, *, block_len: int = 16, hops: int | None = 1):
    """Gradients of ``sum(dout * phalanx_reference(x, params))``: (dx, dparams), float64.

    dparams holds W_in, b_a, b_b, b_c and W_out (decay_max is a fixed hyperparameter).
    """
    _, heads, head_dim, kv_heads, decay_max = phalanx_dims(params)
    x, dout, W_in, W_out = _f64(x, dout, params["W_in"], params["W_out"])
    dim = x.shape[-1]
    dY = dout @ W_out.T
    dz, Y = phalanx_mix_vjp(x @ W_in, params["b_a"], params["b_b"], params["b_c"], dY,
                            heads=heads, head_dim=head_dim, kv_heads=kv_heads,
                            decay_max=decay_max, block_len=block_len, hops=hops)
    col = phalanx_columns(heads, head_dim, kv_heads)
    dz2 = dz.reshape(-1, dz.shape[-1])
    dsum = dz2.sum(axis=0)
    dparams = {
        "W_in": x.reshape(-1, dim).T @ dz2,
        "b_a": dsum[col["a"][0]:col["a"][1]],
        "b_b": dsum[col["b"][0]:col["b"][1]],
        "b_c": dsum[col["c"][0]:col["c"][1]],
        "W_out": Y.reshape(-1, Y.shape[-1]).T @ dout.reshape(-1, dim),
    }
    return dz @ W_in.T, dparams
