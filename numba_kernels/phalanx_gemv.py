"""The Phalanx decoding step at small batch as two GEMV kernels that read each weight once.

At a handful of batch rows a decoding step is bound by reading the weights (``W_in`` and
``W_out``); these kernels replace the input GEMM, the fused middle kernel and the output GEMM
of the GEMM path (``numba_kernels/swr_step.py``) with two launches:

- ``in_step_kernel`` -> ``(x, y, w_in, b_a, b_b, b_c, position, w, g, cv, cC, arrivals,
  decay_max)``: one thread block per head h computes that head's columns of ``z = x W_in^T``
  for every batch row (``D`` V rows ``h*D + d``, the ``D`` Bg and ``D`` C rows of its kv head
  ``h // G``, its A row: ``3D + 1`` rows of ``w_in``, the layer's ``in_proj_weight``
  ``(H*D + 2*KV*D + H, dim)`` with rows ``[V | Bg | C | A]``), keeps them in shared memory
  (float32, never in global memory), then runs the gates and the state update of its ``D``
  channels for every row (the Phalanx step kernel's epilogue: ``A = decay_max * sigmoid(z_a +
  b_a)``, ``u = sigmoid(z_b + b_b) * V``, ``y = s * (z_c + b_c) + V``) and writes ``y`` (B, H*D)
  in the storage dtype. Every block reads each row's position; the blocks count themselves in
  the row's ``arrivals`` counter after a barrier and the last one advances the position and
  resets the counter (the arrivals protocol of ``swr_step.py``).
- ``out_kernel`` -> ``(y, out, w_out)``: ``out = y W_out^T`` with ``w_out`` ``(dim, H*D)``
  (the layer's ``out_proj_weight``), each block ``NWB * RPW`` output columns.

Both stage their input rows (x, or y) in dynamic shared memory at their storage size with
16-byte ``cp.async`` copies (all in flight at once), read back as 16-byte vectors (a warp's
lanes on consecutive vectors). Each warp takes ``RPW`` weight rows and walks them together,
its lanes on consecutive 16-byte vectors (coalesced 512-byte warp accesses), ``U`` vectors per
lane per row issued before any arithmetic; float32 accumulation; a row's sum is a warp shuffle
reduction. The weights are read once per launch whatever the batch, but the arithmetic grows
with it: the kernels beat two cuBLAS GEMMs only at small batch (the torch layer picks the path
by batch).

Specialised at compile time on the storage kind, the shapes, the batch ``B``, hops, block
length and the split (``RPW``, ``U``, ``NWB``). Assumes: rows of ``w_in`` (``dim``) and
``w_out`` (``H*D``) a multiple of 16 bytes, and 16-byte aligned ``w_in``, ``w_out``, ``x`` and
``y`` (the callers check and otherwise keep the GEMM path). bfloat16 arrays arrive as uint16 views.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import cuda, types
from numba.cuda import cgutils

from ._dtypes import ITEM_SIZE, KINDS, LOAD, SIMULATOR, STORE
from ._ptx import (
    _load_words,
    _words_to_f32,
    async_commit,
    make_async_copy,
    warp_sync,
)
from .swr_step import _make_channel_step, _make_load_state, _pointer, _sigmoid, hops_mode

__all__ = ["GemvStep", "in_step_kernel", "out_kernel", "in_step_geometry", "out_geometry",
           "split_for", "unsupported", "kernel_signatures", "DEFAULT_SPLIT"]

F0 = np.float32(0.0)
_STORAGE = {"f32": types.float32, "f16": types.float16, "bf16": types.uint16}

DEFAULT_SPLIT = {"rpw": 4, "unroll": 2, "nwb": 8, "out_rpw": 1, "out_unroll": 8}
"""Default split: weight rows per warp and vectors per lane in flight of the input kernel,
warps per block, rows per warp and vectors in flight of the output kernel."""


if SIMULATOR:  # no warp shuffles: lanes exchange through a per-block mailbox between barriers

    def _sim_lane_sum(x):
        thread = threading.current_thread()
        phase = getattr(thread, "_swr_gemv_phase", 0)
        thread._swr_gemv_phase = phase ^ 1
        boxes = thread._manager.__dict__.setdefault("_swr_gemv_boxes", ({}, {}))
        tid = thread.thread_id
        boxes[phase][tid] = x
        thread.syncthreads()
        first = tid - tid % 32
        total = np.float32(0.0)
        for k in range(32):
            total += boxes[phase].get(first + k, np.float32(0.0))
        return total

    lane_sum = cuda.jit(device=True)(_sim_lane_sum)
else:

    @cuda.jit(device=True, inline=True)
    def lane_sum(x):
        """Sum of x over the warp's 32 lanes, on every lane."""
        for off in (16, 8, 4, 2, 1):
            x += cuda.shfl_xor_sync(0xFFFFFFFF, x, off)
        return x


def _make_stage(kind, ncols, B, nthreads):
    """``stage(x, xs)``: starts copying rows ``(B, ncols)`` of a storage array into the shared
    storage array ``xs`` (same layout), 16-byte ``cp.async`` copies all in flight; the GEMV
    (``_make_gemv``) waits for them and holds the barrier after its first weight loads."""
    epv = 16 // ITEM_SIZE[kind]
    nvec = B * ncols // epv
    copy = make_async_copy(kind, epv)

    @cuda.jit(device=True, inline=True)
    def stage(x, xs):
        for v in range(cuda.threadIdx.x, nvec, nthreads):
            copy(x, v * epv, xs, v * epv)
        async_commit()

    return stage


def _make_gemv(kind, ncols, B, rpw, unroll):
    """``gemv(W, rows, xs, lane, red, roff)``: for each of the warp's ``rpw`` weight rows
    ``rows[q]`` of the row-major ``W`` (``ncols`` columns) and each staged row b of ``xs`` (the
    shared storage array ``(B, ncols)``, read as 16-byte vectors), the
    dot product over all columns (the lane's 16-byte vectors ``lane + 32 k``, ``unroll`` of them
    per row loaded before any arithmetic, then a warp reduction); lane 0 writes it to
    ``red[roff + q * B + b]`` (float32, shared memory). Every thread of the block must call it:
    after its first round of weight loads it waits for the block's staging copies
    (``_make_stage``) and holds a block barrier.

    On the device the body is LLVM IR generated here (an intrinsic): the ``rpw * B`` accumulators
    are scalars and every index into the loaded vectors is a constant, so nothing depends on the
    compiler's unrolling heuristics to stay in registers, and the generated code costs Numba's
    front end nothing. The simulator runs the same arithmetic as Python loops."""
    epv = 16 // ITEM_SIZE[kind]
    nvec = ncols // epv
    kv = -(-nvec // 32)
    nacc = rpw * B
    if SIMULATOR:
        load = LOAD[kind]

        def sim_gemv(W, rows, xs, lane, red, roff):
            cuda.syncthreads()  # the staged rows are visible (the copies were immediate)
            acc = [np.float32(0.0)] * nacc
            for j in range(lane, nvec, 32):
                for q in range(rpw):
                    for b in range(B):
                        for e in range(epv):
                            acc[q * B + b] += (load(W[rows[q] * ncols + j * epv + e])
                                               * load(xs[(b * nvec + j) * epv + e]))
            for k in range(nacc):
                total = lane_sum(acc[k])
                if lane == 0:
                    red[roff + k] = total

        return cuda.jit(device=True)(sim_gemv)

    nrounds = -(-kv // unroll)

    @numba.cuda.extending.intrinsic
    def gemv_core(typingctx, W, rows, xs, lane, red, roff):
        sig = types.void(W, rows, xs, types.int64, red, types.int64)

        def codegen(context, builder, sig, args):
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)

            def c64(v):
                return ir.Constant(i64, v)

            w_t, rows_t, xs_t, _, red_t, _ = sig.args
            wv, rowsv, xsv, lane, redv, roff = args
            w_data = context.make_array(w_t)(context, builder, value=wv).data
            rows_data = context.make_array(rows_t)(context, builder, value=rowsv).data
            xs_data = context.make_array(xs_t)(context, builder, value=xsv).data
            red_data = context.make_array(red_t)(context, builder, value=redv).data
            bases = [builder.mul(builder.load(builder.gep(rows_data, [c64(q)])), c64(ncols))
                     for q in range(rpw)]
            accs = [cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0))
                    for _ in range(nacc)]

            def loads(k0):  # the round's weight vectors, every load issued before any use
                cols, vals = [], {}
                for u in range(unroll):
                    j = builder.add(lane, builder.mul(builder.add(k0, c64(u)), c64(32)))
                    inside = builder.icmp_signed("<", j, c64(nvec))
                    col = builder.select(inside, j, c64(nvec - 1))
                    cols.append((j, inside))
                    for q in range(rpw):
                        idx = builder.add(bases[q], builder.mul(col, c64(epv)))
                        addr = builder.ptrtoint(builder.gep(w_data, [idx]), i64)
                        vals[u, q] = _words_to_f32(builder, kind, _load_words(builder, addr, 16))
                return cols, vals

            def arithmetic(cols, vals):
                for u in range(unroll):
                    j, inside = cols[u]
                    with builder.if_then(inside):
                        for b in range(B):
                            idx = builder.mul(builder.add(j, c64(b * nvec)), c64(epv))
                            addr = builder.ptrtoint(builder.gep(xs_data, [idx]), i64)
                            xv = _words_to_f32(builder, kind,
                                               _load_words(builder, addr, 16, ".shared"))
                            for e in range(epv):
                                for q in range(rpw):
                                    acc = accs[q * B + b]
                                    builder.store(builder.fadd(builder.load(acc), builder.fmul(
                                        vals[u, q][e], xv[e])), acc)

            # the first round's weight loads go out before the wait for the staged rows (the
            # block's cp.async copies) and the barrier that makes them visible
            first_round = loads(c64(0))
            builder.asm(ir.FunctionType(ir.VoidType(), []), "cp.async.wait_group 0;",
                        "~{memory}", [], True)
            barrier = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.nvvm.barrier0")
            builder.call(barrier, [])
            arithmetic(*first_round)
            if nrounds > 1:
                with cgutils.for_range(builder, c64(nrounds - 1)) as loop:
                    k0 = builder.mul(builder.add(loop.index, c64(1)), c64(unroll))
                    arithmetic(*loads(k0))
            shfl = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(f32, [i32, f32, i32, i32]),
                "llvm.nvvm.shfl.sync.bfly.f32")
            first = builder.icmp_signed("==", lane, c64(0))
            for k in range(nacc):
                v = builder.load(accs[k])
                for off in (16, 8, 4, 2, 1):
                    v = builder.fadd(v, builder.call(shfl, [ir.Constant(i32, -1), v,
                                                            ir.Constant(i32, off),
                                                            ir.Constant(i32, 31)]))
                with builder.if_then(first):
                    builder.store(v, builder.gep(red_data, [builder.add(roff, c64(k))]))
            return context.get_dummy_value()

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def gemv(W, rows, xs, lane, red, roff):
        gemv_core(W, rows, xs, numba.int64(lane), red, numba.int64(roff))

    return gemv


def in_step_geometry(kind, dim, D, B, rpw):
    """``(threads per block, dynamic shared bytes)`` of the input kernel."""
    nwarps = -(-(3 * D + 1) // rpw)
    return 32 * nwarps, B * dim * ITEM_SIZE[kind] + 4 * nwarps * rpw * B


def out_geometry(kind, hd, dim, B, nwb, rpw):
    """``(blocks, threads per block, dynamic shared bytes)`` of the output kernel."""
    return -(-dim // (nwb * rpw)), 32 * nwb, B * hd * ITEM_SIZE[kind] + 4 * nwb * rpw * B


def _make_in_step(kind, dim, H, D, G, mode, K, block_len, B, rpw, unroll, prefetch):
    load = LOAD[kind]
    store = STORE[kind]
    HD = H * D
    KD = (H // G) * D
    R = 3 * D + 1
    nthreads, _ = in_step_geometry(kind, dim, D, B, rpw)
    XS = B * dim * ITEM_SIZE[kind] // 4  # z (float32) after the staged x in shared memory
    STYPE = _STORAGE[kind]
    KK = max(K, 1)
    ONE = prefetch and B * D <= nthreads  # a thread a channel: its state loaded up front
    stage = _make_stage(kind, dim, B, nthreads)
    gemv = _make_gemv(kind, dim, B, rpw, unroll)
    channel_step = _make_channel_step(mode, K, block_len)
    load_state = _make_load_state(mode, K)
    f4, i8 = numba.float32, numba.int64

    def phalanx_gemv_in_kernel(x, y, w_in, b_a, b_b, b_c, position, w, g, cv, cC, arrivals,
                               decay_max):
        xs = cuda.shared.array(0, STYPE)  # x (B, dim), then (as float32) z (rows, B)
        smem = cuda.shared.array(0, f4)
        h = i8(cuda.blockIdx.x)
        t = cuda.threadIdx.x
        warp = t // 32
        lane = t - warp * 32
        kvh = h // G
        stage(x, xs)
        rows = cuda.local.array(rpw, i8)
        for q in range(rpw):
            r = warp * rpw + q
            if r > R - 1:
                r = R - 1
            if r < D:
                rows[q] = h * D + r
            elif r < 2 * D:
                rows[q] = HD + kvh * D + (r - D)
            elif r < 3 * D:
                rows[q] = HD + KD + kvh * D + (r - 2 * D)
            else:
                rows[q] = HD + 2 * KD + h
        pb = i8(0)
        if t < B:
            pb = position[t]
        rw = cuda.local.array(1, f4)
        rg = cuda.local.array(1, f4)
        rcv = cuda.local.array(KK, f4)
        rcC = cuda.local.array(KK, f4)
        ba = load(b_a[h])
        # one channel (b, d) a thread: its state, position and biases are loaded before the GEMV,
        # so their latency hides behind it
        b1 = t // D
        d1 = t - b1 * D
        kc1 = kvh * D + d1
        i1 = b1 * HD + h * D + d1
        off1 = i8(0)
        rb1 = F0
        rc1 = F0
        if ONE and t < B * D:
            off1 = position[b1] % block_len
            load_state(0, i1, w, g, cv, cC, rw, rg, rcv, rcC)
            rb1 = load(b_b[kc1])
            rc1 = load(b_c[kc1])
        gemv(w_in, rows, xs, lane, smem, XS + warp * (rpw * B))  # z at [XS + r * B + b]
        cuda.syncthreads()
        if ONE:
            if t < B * D:
                zr = XS + b1
                v = smem[zr + d1 * B]
                a = decay_max * _sigmoid(smem[zr + 3 * D * B] + ba)
                u = _sigmoid(smem[zr + (D + d1) * B] + rb1) * v
                s = channel_step(a, u, off1, 0, rw, rg, rcv, rcC, i1, w, g, cv, cC)
                y[i1] = store(s * (smem[zr + (2 * D + d1) * B] + rc1) + v)
        else:
            for idx in range(t, B * D, nthreads):  # the gates and the state update of (b, d)
                b = idx // D
                d = idx - b * D
                off = position[b] % block_len
                kc = kvh * D + d
                i = b * HD + h * D + d
                load_state(0, i, w, g, cv, cC, rw, rg, rcv, rcC)
                zr = XS + b
                v = smem[zr + d * B]
                rb = smem[zr + (D + d) * B] + load(b_b[kc])
                rc = smem[zr + (2 * D + d) * B] + load(b_c[kc])
                a = decay_max * _sigmoid(smem[zr + 3 * D * B] + ba)
                s = channel_step(a, _sigmoid(rb) * v, off, 0, rw, rg, rcv, rcC, i, w, g, cv, cC)
                y[i] = store(s * rc + v)
        cuda.syncthreads()  # every thread of the block has read the positions
        if t < B:
            cuda.threadfence()
            if cuda.atomic.add(arrivals, t, numba.int32(1)) == H - 1:
                arrivals[t] = numba.int32(0)
                position[t] = pb + 1

    return cuda.jit(phalanx_gemv_in_kernel)


def _make_out(kind, hd, dim, B, nwb, rpw, unroll):
    store = STORE[kind]
    _, nthreads, _ = out_geometry(kind, hd, dim, B, nwb, rpw)
    stage = _make_stage(kind, hd, B, nthreads)
    gemv = _make_gemv(kind, hd, B, rpw, unroll)
    YS = B * hd * ITEM_SIZE[kind] // 4  # the sums (float32) after the staged y
    STYPE = _STORAGE[kind]
    NACC = rpw * B
    f4, i8 = numba.float32, numba.int64

    def phalanx_gemv_out_kernel(yin, out, w_out):
        ys = cuda.shared.array(0, STYPE)  # y (B, hd), then (as float32) the warps' sums
        smem = cuda.shared.array(0, f4)
        t = cuda.threadIdx.x
        warp = t // 32
        lane = t - warp * 32
        first = i8(cuda.blockIdx.x) * (nwb * rpw) + warp * rpw
        stage(yin, ys)
        rows = cuda.local.array(rpw, i8)
        for q in range(rpw):
            r = first + q
            rows[q] = r if r < dim else dim - 1
        red = YS + warp * NACC
        gemv(w_out, rows, ys, lane, smem, red)
        warp_sync()
        for k in range(lane, NACC, 32):  # lane k writes sum k: out[b, first + q]
            q = k // B
            b = k - q * B
            if first + q < dim:
                out[b * dim + first + q] = store(smem[red + k])

    return cuda.jit(phalanx_gemv_out_kernel)


_CACHE: dict = {}


def in_step_kernel(kind: str, dim: int, H: int, D: int, G: int, mode: int, K: int,
                   block_len: int, B: int, rpw: int, unroll: int):
    """The input GEMV + step kernel for these shapes, batch and split (compiled once per key)."""
    key = ("in", kind, int(dim), int(H), int(D), int(G), int(mode), int(K), int(block_len),
           int(B), int(rpw), int(unroll), bool(PREFETCH_STATE))
    if key not in _CACHE:
        _CACHE[key] = _make_in_step(*key[1:])
    return _CACHE[key]


def out_kernel(kind: str, hd: int, dim: int, B: int, nwb: int, rpw: int, unroll: int):
    """The output GEMV kernel ``out (B, dim) = y (B, hd) W_out^T`` (compiled once per key)."""
    key = ("out", kind, int(hd), int(dim), int(B), int(nwb), int(rpw), int(unroll))
    if key not in _CACHE:
        _CACHE[key] = _make_out(*key[1:])
    return _CACHE[key]


def kernel_signatures():
    """Representative specialisations for compile tests: every storage kind, every hops mode,
    grouped kv heads, batch 1, 2, 4, 8 and 16, the default splits and a narrower one, head_dim 16
    and 64."""
    f1, p1 = types.Array(types.float32, 1, "C"), types.Array(types.int64, 1, "C")
    n1 = types.Array(types.int32, 1, "C")
    out = []
    alt = {"rpw": 2, "unroll": 4, "nwb": 8, "out_rpw": 2, "out_unroll": 4}
    cases = (("bf16", 1, 1, 1, None, 16), ("bf16", 4, None, 8, None, 16),
             ("f16", 1, 0, 16, None, 16), ("f32", 2, 2, 4, None, 16), ("bf16", 1, 1, 2, alt, 16),
             ("bf16", 2, 1, 16, None, 64))  # head_dim 64 at batch 16: the looping epilogue
    for kind, G, hops, B, sp, D in cases:
        sp = sp or split_for(B, D)
        v1 = types.Array(_STORAGE[kind], 1, "C")
        mode, K = hops_mode(hops)
        sig = (v1,) * 6 + (p1,) + (f1,) * 4 + (n1, types.float32)
        out.append((in_step_kernel(kind, 2048, 2048 // D, D, G, mode, K, 16, B, sp["rpw"],
                                   sp["unroll"]), sig))
        out.append((out_kernel(kind, 2048, 2048, B, sp["nwb"], sp["out_rpw"], sp["out_unroll"]),
                    (v1, v1, v1)))  # fmt: skip
    assert {k for k, *_ in cases} == set(KINDS)
    return out


# ----------------------------------------------------------------------------------------------
# Launching: both kernels prepared once per (state, weights, batch), relaunched with new pointers
# ----------------------------------------------------------------------------------------------

PREFETCH_STATE = True
"""Where a block has a thread per channel of its head and batch (``B * D`` threads or more), the
input kernel loads those channels' state and biases before its GEMV; False (tests) always takes
the looping epilogue that loads them after it."""

MAX_SHARED = 160 * 1024
"""Largest dynamic shared memory either kernel may ask for (the staged rows)."""

MAX_BATCH = 16
"""Largest batch the kernels are built for (their arithmetic grows with the batch, the weight
reads do not; the caller's threshold is usually lower)."""


def split_for(B: int, D: int) -> dict | None:
    """The split of batch ``B`` and head_dim ``D``: rows per warp such that a head's ``3D + 1``
    rows fit 32 warps (None where that needs more than 8 rows per warp); above batch 4, where
    the accumulators grow, 8 rows a warp (fewer threads a block) and fewer vectors in flight."""
    rows = 3 * D + 1
    rpw = max(DEFAULT_SPLIT["rpw"], -(-rows // 32))
    if rpw > 8:
        return None
    sp = dict(DEFAULT_SPLIT, rpw=rpw)
    if B > 4:  # 8 rows a warp: at most 8 warps a block (D <= 21), which launch at any register
        sp.update(rpw=max(rpw, 8), unroll=1, out_unroll=4)  # count, one vector a row in flight
    return sp


def unsupported(kind: str, B: int, dim: int, H: int, D: int, pointers) -> str | None:
    """Why the GEMV step cannot run these shapes (None: it can). ``pointers``: data pointers
    of ``w_in`` and ``w_out`` (16-byte aligned needed)."""
    item = ITEM_SIZE[kind]
    if not 1 <= B <= MAX_BATCH:
        return f"batch {B} is not in 1..{MAX_BATCH}"
    if (dim * item) % 16 or (H * D * item) % 16:
        return "rows of W_in or W_out are not a multiple of 16 bytes"
    if any(int(p) % 16 for p in pointers):
        return "W_in or W_out is not 16-byte aligned"
    sp = split_for(B, D)
    if sp is None:
        return f"head_dim {D} needs more than 32 warps per head"
    _, shared_in = in_step_geometry(kind, dim, D, B, sp["rpw"])
    _, _, shared_out = out_geometry(kind, H * D, dim, B, sp["nwb"], sp["out_rpw"])
    if max(shared_in, shared_out) > MAX_SHARED:
        return f"the staged rows need more than {MAX_SHARED} bytes of shared memory"
    return None


def _fits(entry, threads: int) -> bool:
    """Whether the compiled kernel launches with ``threads`` threads a block: its registers per
    thread allow it (the driver's ``CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK``). Where the driver
    cannot be asked, only blocks of up to 256 threads, which fit whatever the register count
    (255 a thread at most)."""
    try:
        from cupy_backends.cuda.api import driver

        return driver.funcGetAttribute(0, entry.function_ptr) >= threads
    except Exception:  # noqa: BLE001 - no answer: the size that always fits
        return threads <= 256


class GemvStep:
    """The two GEMV launches of one small-batch Phalanx step, prepared once for a state, its
    weights and biases: ``run(x, y, out, stream=None)`` with x ``(B, dim)``, y ``(B, H*D)``
    (scratch, the read-out ``Y``) and out ``(B, dim)``, all of the weights' dtype, C-contiguous
    (torch tensors, CuPy arrays or device pointers as ints; NumPy arrays in the simulator).
    Nothing is allocated and nothing synchronises, so it can be captured in a CUDA graph.
    ``fits`` is False where a compiled kernel needs too many registers for its block size (it
    would not launch): the caller then keeps the GEMM path."""

    __slots__ = ("k_in", "k_out", "grid_in", "block_in", "shared_in", "grid_out", "block_out",
                 "shared_out", "fixed_in", "fixed_out", "launch_in", "launch_out", "fits")

    def __init__(self, x, y, out, w_in, b_a, b_b, b_c, w_out, state_arrays, arrivals, *,
                 heads, head_dim, kv_heads, decay_max, hops, block_len, split=None):
        from . import swr_step as ks

        B, dim = x.shape
        H, D = heads, head_dim
        kind = ks._kind(x.dtype)
        sp = split or split_for(B, D)
        st, mode, K = ks._state_args(state_arrays, arrivals, hops)
        self.k_in = in_step_kernel(kind, dim, H, D, H // kv_heads, mode, K, block_len, B,
                                   sp["rpw"], sp["unroll"])
        self.k_out = out_kernel(kind, H * D, dim, B, sp["nwb"], sp["out_rpw"], sp["out_unroll"])
        nt, self.shared_in = in_step_geometry(kind, dim, D, B, sp["rpw"])
        self.grid_in, self.block_in = (H,), (nt,)
        gout, nto, self.shared_out = out_geometry(kind, H * D, dim, B, sp["nwb"], sp["out_rpw"])
        self.grid_out, self.block_out = (gout,), (nto,)
        f = ks._flat
        self.fixed_in = (f(w_in), f(b_a), f(b_b), f(b_c)) + st + (np.float32(decay_max),)
        self.fixed_out = (f(w_out),)
        self.launch_in = self.launch_out = None
        self.fits = True
        if SIMULATOR:
            return
        from ._launch import allow_shared_memory, prepare

        entry, values = prepare(self.k_in, (f(x), f(y)) + self.fixed_in)
        allow_shared_memory(entry, self.shared_in)
        self.fits = _fits(entry, self.block_in[0])
        self.launch_in = ks.PackedLaunch(entry, values, self.grid_in, self.block_in, 2,
                                         self.shared_in)
        entry, values = prepare(self.k_out, (f(y), f(out)) + self.fixed_out)
        allow_shared_memory(entry, self.shared_out)
        self.fits = self.fits and _fits(entry, self.block_out[0])
        self.launch_out = ks.PackedLaunch(entry, values, self.grid_out, self.block_out, 2,
                                          self.shared_out)

    def run(self, x, y, out, stream=None):
        if SIMULATOR:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

            from . import swr_step as ks

            def sim(args):
                return tuple(FakeCUDAArray(a) if isinstance(a, np.ndarray) else a for a in args)

            self.k_in[self.grid_in, self.block_in, 0, self.shared_in](
                *sim((ks._flat(x), ks._flat(y)) + self.fixed_in))
            self.k_out[self.grid_out, self.block_out, 0, self.shared_out](
                *sim((ks._flat(y), ks._flat(out)) + self.fixed_out))
            return
        py = _pointer(y)
        self.launch_in.run((_pointer(x), py), stream)
        self.launch_out.run((py, _pointer(out)), stream)
