"""The exact recurrence (hops=None) forward in two passes over the data, both layouts.

docs/spec.md#recurrence: with ``hops=None`` the output is the plain recurrence
``x_t = a_t x_{t-1} + u_t`` from ``x_{-1} = x0``; the block decomposition is the same number in
exact arithmetic, so these kernels do not cut time into blocks at all. Time is cut into chunks of
``chunk_steps`` steps. BLHD: one thread owns ``vec`` adjacent channels (one 16-byte access a step,
coalesced across the warp) and one chunk. BHDL: one thread owns one channel row and one chunk and
reads ``vec`` consecutive steps an access, ``bhdl_unroll`` accesses in flight (a 32-byte sector
at the default 2; neighbouring threads read neighbouring rows, so the accesses of a warp are not
coalesced, but every sector fetched is used whole).

- pass 1 (:func:`_make_exact_kernel` with ``AGG``): the scan of the chunk from 0 and the product
  of its ``a``, the chunk's affine map ``x_end = V + P x_begin``, written to ``agg_v``, ``agg_p``
  ((B, H, D, nchunks) float32, per channel);
- pass 2 (``SCAN``): the thread folds the maps of the chunks before its own,
  ``s = V_c + P_c s`` from ``s = carry`` (x0; the loads of :data:`FOLD` maps in flight at a
  time), then scans its chunk from ``s`` and writes ``y``.

The aggregates are small (two floats per chunk and channel) and read from L2; the inputs are
read twice from DRAM, ``y`` written once (about 1.5x the forward's memory floor for 16-bit data
with per-head ``a``). The plan caps the chunks per row (``TUNING["max_chunks"]``) so that the fold
stays short, and picks the chunk length to fill the GPU (``TUNING["threads_per_sm"]``).

Entry point :func:`swr_forward_exact`. Arrays are the front's canonical forms
(docs/internals.md); bfloat16 arrives as uint16 bits. The vector paths need 16-byte aligned
``a``, ``u`` and ``y`` (for its access width); BLHD ``vec | H*D`` and, per head, ``vec | D``;
BHDL ``vec | N``. Anything else runs the ``vec == 1`` specialisation.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import cuda, types

from ._dtypes import ITEM_SIZE, SIMULATOR
from ._launch import Tuning, data_pointer, launch, sm_count
from ._ptx import make_vector_load, make_vector_store

AGG = 0  # pass 1: per chunk (V, P)
SCAN = 1  # pass 2: fold the earlier chunks' maps, scan, write y
MODE_NAMES = {AGG: "agg", SCAN: "scan"}
FOLD = 4  # chunk maps whose loads are in flight together in pass 2's fold

TUNING = Tuning({
    # bytes one thread moves per step, steps whose loads are in flight together
    "access_bytes": 16,
    "unroll": 8,
    "bhdl_unroll": 2,  # BHDL: accesses of `vec` steps in flight together (2: a 32-byte sector)
    # shortest chunk in steps; most chunks per channel row (each folds the maps before it)
    "min_chunk_steps": 128,
    "max_chunks": 256,
    # resident threads to aim for per SM (chunks are shortened down to min_chunk_steps for it)
    "threads_per_sm": 2048,
    "threads_per_block": 256,
})
"""Launch tuning of the hops=None forward."""

# Kernel arguments: a, u, y, carry, agg_v, agg_p, snap (1-D views of C-contiguous arrays; y and
# snap are 1-element dummies in pass 1), then int64 n, channels, head_dim, chunk_steps, groups,
# nchunks, nwork, t_snap (pass 2 writes x_{t_snap} to snap, float32 (B, H, D); -1: none).


def _make_exact_kernel(layout, in_kind, out_kind, per_head, mode, vec, unroll):
    """One thread per (batch, channels, chunk of time); see the module doc.

    BLHD: ``u``, ``y`` (B, N, H, D) flat, ``a`` (B, N, H) per head (``head_dim % vec == 0``) or
    (B, N, H, D); a thread owns ``vec`` adjacent channels, one access a step.
    BHDL: ``u``, ``y`` (B, H, D, N) flat, ``a`` (B, H, N) per head or (B, H, D, N); a thread owns
    one channel row and loads ``vec`` consecutive steps an access (``vec | N``,
    ``vec | chunk_steps``). ``carry``: (B, H, D); ``agg_v``, ``agg_p``: (B, H, D, nchunks).
    """
    blhd = layout == "BLHD"
    load_u = make_vector_load(in_kind, vec)
    load_a = make_vector_load(in_kind, 1 if (per_head and blhd) else vec)
    store_y = make_vector_store(out_kind, vec)
    a_width = 1 if per_head else vec  # BLHD: a values a step; BHDL: a thread has one channel
    lanes = vec if blhd else 1  # channels a thread owns
    a_lanes = a_width if blhd else 1
    u_buffer = unroll * vec  # local array sizes must be constants
    a_buffer = unroll * (a_width if blhd else vec)
    fold_buffer = FOLD * lanes
    f32 = numba.float32

    def kernel(a, u, y, carry, agg_v, agg_p, snap, n, channels, head_dim, chunk_steps, groups,
               nchunks, nwork, t_snap):  # fmt: skip
        tid = cuda.grid(1)
        if tid >= nwork:
            return
        c0 = (tid % groups) * lanes
        rest = tid // groups
        chunk = rest % nchunks
        b = rest // nchunks
        ch0 = b * channels + c0  # flat (b, h, d) of the first channel
        if per_head:
            a_stride = channels // head_dim
            a_col = c0 // head_dim
        else:
            a_stride = channels
            a_col = c0
        t_lo = chunk * chunk_steps
        t_hi = min(t_lo + chunk_steps, n)

        x = cuda.local.array(lanes, f32)
        p = cuda.local.array(a_lanes, f32)
        fv = cuda.local.array(fold_buffer, f32)
        fp = cuda.local.array(fold_buffer, f32)
        for q in range(a_lanes):
            p[q] = f32(1.0)
        if mode == SCAN:
            for k in range(lanes):
                x[k] = carry[ch0 + k]
            # fold the maps of the chunks before this one, FOLD maps' loads in flight at a time
            for c_batch in range(0, chunk, FOLD):
                for k in range(lanes):
                    for f in range(FOLD):
                        at = (ch0 + k) * nchunks + min(c_batch + f, chunk - 1)
                        fv[k * FOLD + f] = agg_v[at]
                        fp[k * FOLD + f] = agg_p[at]
                for k in range(lanes):
                    for f in range(FOLD):
                        if c_batch + f < chunk:
                            x[k] = fv[k * FOLD + f] + fp[k * FOLD + f] * x[k]
        else:
            for k in range(lanes):
                x[k] = f32(0.0)

        ubuf = cuda.local.array(u_buffer, f32)
        abuf = cuda.local.array(a_buffer, f32)
        out = cuda.local.array(vec, f32)
        if blhd:
            for t_batch in range(t_lo, t_hi, unroll):
                # all loads of the batch first (clamped into the chunk), in flight together
                for i in range(unroll):
                    tc = min(t_batch + i, t_hi - 1)
                    load_u(u, (b * n + tc) * channels + c0, ubuf, i * vec)
                    load_a(a, (b * n + tc) * a_stride + a_col, abuf, i * a_width)
                for i in range(unroll):
                    t = t_batch + i
                    if t < t_hi:
                        for k in range(vec):
                            x[k] = abuf[i * a_width + k % a_width] * x[k] + ubuf[i * vec + k]
                        if mode == SCAN:
                            store_y(y, (b * n + t) * channels + c0, x, 0)
                            if t == t_snap:
                                for k in range(vec):
                                    snap[ch0 + k] = x[k]
                        else:
                            for q in range(a_width):
                                p[q] = p[q] * abuf[i * a_width + q]
        else:
            row_u = ch0 * n
            row_a = ((ch0 // head_dim) if per_head else ch0) * n
            span = unroll * vec
            for t_batch in range(t_lo, t_hi, span):
                # `unroll` accesses of `vec` steps each (t_hi - t_lo is a multiple of vec)
                for i in range(unroll):
                    tc = min(t_batch + i * vec, t_hi - vec)
                    load_u(u, row_u + tc, ubuf, i * vec)
                    load_a(a, row_a + tc, abuf, i * vec)
                for i in range(unroll):
                    t = t_batch + i * vec
                    if t < t_hi:
                        for e in range(vec):
                            x[0] = abuf[i * vec + e] * x[0] + ubuf[i * vec + e]
                            out[e] = x[0]
                            if mode == AGG:
                                p[0] = p[0] * abuf[i * vec + e]
                            elif t + e == t_snap:
                                snap[ch0] = x[0]
                        if mode == SCAN:
                            store_y(y, row_u + t, out, 0)
        if mode == AGG:
            for k in range(lanes):
                at = (ch0 + k) * nchunks + chunk
                agg_v[at] = x[k]
                agg_p[at] = p[k % a_lanes]

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_exact_{MODE_NAMES[mode]}_{layout.lower()}_{in_kind}_to_{out_kind}_"
        f"{'per_head' if per_head else 'per_channel'}_vec{vec}_unroll{unroll}"
    )
    return cuda.jit(kernel)


_kernels: dict = {}


def get_kernel(layout, in_kind, out_kind, per_head, mode, vec, unroll):
    """The compiled-on-demand dispatcher of one specialisation (pass 1 has no ``y``: its
    ``out_kind`` is "f32")."""
    key = (layout, in_kind, out_kind, per_head, mode, vec, unroll)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = _make_exact_kernel(*key)
    return kernel


def signature(in_kind, out_kind):
    """The Numba signature of both passes for these storage kinds (7 arrays, 8 int64)."""
    f32 = types.Array(types.float32, 1, "C")
    storage = {"f32": f32, "f16": types.Array(types.float16, 1, "C"),
               "bf16": types.Array(types.uint16, 1, "C")}  # fmt: skip
    return tuple([storage[in_kind]] * 2 + [storage[out_kind]] + [f32] * 4 + [types.int64] * 8)


_KINDS = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.uint16): "bf16"}


def _kind(dtype):
    dtype = np.dtype(dtype)
    return "bf16" if dtype.name == "bfloat16" else _KINDS[dtype]


def access_vec(layout, in_kind, out_kind, per_head, n, channels, head_dim, align):
    """The widest vector these shapes and pointer alignments (addresses modulo 16 of a | u and of
    y) allow, else 1 (the general kernel). BLHD: channels (``vec | H*D``, per head ``vec | D``);
    BHDL: steps along time (``vec | N``)."""
    vec = max(1, TUNING["access_bytes"] // ITEM_SIZE[in_kind])
    if layout == "BLHD":
        ok = channels % vec == 0 and (not per_head or head_dim % vec == 0)
    else:
        ok = n % vec == 0
    ok = ok and align[0] % (vec * ITEM_SIZE[in_kind]) == 0
    ok = ok and align[1] % min(16, vec * ITEM_SIZE[out_kind]) == 0
    return vec if ok else 1


def _unroll(layout):
    return TUNING["unroll" if layout == "BLHD" else "bhdl_unroll"]


@functools.lru_cache(maxsize=256)
def plan(layout, shape, per_head, in_kind, out_kind, align, sms, version):
    """(vec, unroll, chunk_steps, groups, nchunks, nwork, grid, block) of both passes for a
    problem of ``shape`` (the layout's) on a GPU of ``sms`` SMs."""
    if layout == "BLHD":
        batch, n, heads, head_dim = shape
    else:
        batch, heads, head_dim, n = shape
    channels = heads * head_dim
    vec = access_vec(layout, in_kind, out_kind, per_head, n, channels, head_dim, align)
    groups = channels // vec if layout == "BLHD" else channels
    step = _unroll(layout) * (1 if layout == "BLHD" else vec)  # steps of one batch of loads
    target = sms * TUNING["threads_per_sm"]
    want = max(1, min(TUNING["max_chunks"], -(-target // (batch * groups))))
    chunk_steps = max(TUNING["min_chunk_steps"], -(-n // want))
    chunk_steps = -(-chunk_steps // step) * step
    nchunks = -(-n // chunk_steps)
    # a longer chunk where the cap on chunks per row binds
    while nchunks > TUNING["max_chunks"]:
        chunk_steps *= 2
        nchunks = -(-n // chunk_steps)
    nwork = batch * groups * nchunks
    block = 32 if SIMULATOR else TUNING["threads_per_block"]
    return vec, _unroll(layout), chunk_steps, groups, nchunks, nwork, -(-nwork // block), block


def _flat(x):
    x = x.reshape(-1)
    return x.view(np.uint16) if x.dtype.name == "bfloat16" else x


def swr_forward_exact(a, u, y, *, layout, carry, snap=None, t_snap=-1, stream=None):
    """The exact recurrence ``y_t = x_t``, ``x_t = a_t x_{t-1} + u_t``, ``x_{-1} = carry``.

    With ``snap`` ((B, H, D) float32) and ``0 <= t_snap < N``, also ``snap = x_{t_snap}`` in
    float32 (what a state keeps; ``y`` may be of a narrower dtype).

    BLHD: ``u``, ``y`` (B, N, H, D); ``a`` (B, N, H) per head or (B, N, H, D) per channel.
    BHDL: ``u``, ``y`` (B, H, D, N); ``a`` (B, H, N) or (B, H, D, N). C-contiguous;
    ``carry`` (B, H, D) float32 (x0, zeros without one). ``a``/``u`` float32, float16 or
    bfloat16 (as uint16 bits); ``y`` any of the three, not overlapping the inputs. Two launches
    on ``stream`` (None: CuPy's current stream) and a 2*B*H*D*nchunks (+1) float32 scratch array.
    Returns None.
    """
    if layout not in ("BLHD", "BHDL"):
        raise ValueError(f"layout must be 'BLHD' or 'BHDL', got {layout!r}")
    if 0 in u.shape:
        return
    simulated = isinstance(u, np.ndarray)
    if simulated:
        xp, align, sms = np, (0, 0), 1
    else:
        import cupy as xp

        align = ((data_pointer(a) | data_pointer(u)) & 15, data_pointer(y) & 15)
        sms = sm_count()
    per_head = a.ndim == 3
    in_kind, out_kind = _kind(u.dtype), _kind(y.dtype)
    vec, unroll, chunk_steps, groups, nchunks, nwork, grid, block = plan(
        layout, tuple(u.shape), per_head, in_kind, out_kind, align, sms, TUNING.version)
    if layout == "BLHD":
        batch, n, heads, head_dim = u.shape
    else:
        batch, heads, head_dim, n = u.shape
    maps = batch * heads * head_dim * nchunks
    scratch = xp.empty(2 * maps + 1, np.float32)  # the maps' V, P and a dummy of its own
    agg_v, agg_p, dummy = scratch[:maps], scratch[maps : 2 * maps], scratch[2 * maps :]
    if snap is None:
        t_snap = -1
    scalars = [np.int64(x) for x in (n, heads * head_dim, head_dim, chunk_steps, groups,
                                     nchunks, nwork, t_snap)]  # fmt: skip
    fa, fu, fy, fc = _flat(a), _flat(u), _flat(y), carry.reshape(-1)
    fs = dummy if snap is None else snap.reshape(-1)
    agg = get_kernel(layout, in_kind, "f32", per_head, AGG, vec, unroll)
    launch(agg, grid, block, [fa, fu, dummy, fc, agg_v, agg_p, dummy] + scalars, stream=stream)
    scan = get_kernel(layout, in_kind, out_kind, per_head, SCAN, vec, unroll)
    launch(scan, grid, block, [fa, fu, fy, fc, agg_v, agg_p, fs] + scalars, stream=stream)


def specialisations():
    """Yield ``(name, kernel, argument types)`` for the specialisations the PTX tests compile.
    BLHD: pass 2 per head on the widest vector for every input x output dtype, pass 1 per head on
    the widest vector for every input dtype; per channel and the general ``vec == 1`` (which
    change only the width of ``a`` and of the accesses) for one dtype pair a pass. BHDL (the same
    source with one row a thread): both passes for bfloat16, pass 2 for float32, per channel and
    ``vec == 1`` for bfloat16."""
    widest = {k: max(1, TUNING["access_bytes"] // ITEM_SIZE[k]) for k in ("f32", "f16", "bf16")}
    cases = []
    for in_kind in ("f32", "f16", "bf16"):
        cases += [("BLHD", in_kind, out_kind, SCAN, True, widest[in_kind])
                  for out_kind in ("f32", "f16", "bf16")]  # fmt: skip
        cases += [("BLHD", in_kind, "f32", AGG, True, widest[in_kind])]
    for layout in ("BLHD", "BHDL"):
        cases += [(layout, "bf16", "bf16", SCAN, False, 8), (layout, "bf16", "f32", AGG, False, 8),
                  (layout, "bf16", "bf16", SCAN, True, 1), (layout, "bf16", "f32", AGG, False, 1)]
    cases += [("BHDL", "bf16", "bf16", SCAN, True, 8), ("BHDL", "bf16", "f32", AGG, True, 8),
              ("BHDL", "f32", "f32", SCAN, True, 4)]
    for layout, in_kind, out_kind, mode, per_head, vec in cases:
        kernel = get_kernel(layout, in_kind, out_kind, per_head, mode, vec, _unroll(layout))
        yield kernel.py_func.__name__, kernel, signature(in_kind, out_kind)


__all__ = ["swr_forward_exact", "TUNING", "specialisations", "get_kernel"]
