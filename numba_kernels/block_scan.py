"""Warp-level exchange and the row-wise linear scan (the block-level exact recurrence).

``warp_exchange(scratch, counter, tid, value, src_lane)`` returns ``value`` as held by lane
``src_lane`` of the calling thread's warp. On a GPU it is one ``shfl.sync`` (``scratch`` and
``counter`` are unused); the CUDA simulator has no warp shuffles, so there it goes through a
double-buffered shared-memory scratch of shape ``(2, threads_per_block)`` and one
``syncthreads`` per exchange. Every thread of a block must make the same sequence of calls
(the kernels here never exchange inside divergent code), which shfl.sync with a full mask
requires anyway. Kernels allocate the scratch with :func:`scratch_shape`.

``linear_scan(coef, x, out, init, *, reverse=False, stream=None)`` on ``(M, n)`` float32:
``out[:, i] = coef[:, i] * out[:, i - 1] + x[:, i]`` with ``out[:, -1] := init``, or with
``reverse=True`` ``out[:, i] = coef[:, i] * out[:, i + 1] + x[:, i]`` with ``out[:, n] := init``.
One warp per row walks it in tiles of 32 (coalesced loads, a five-step shuffle scan of the
affine maps ``s -> coef * s + x`` per tile, the running value broadcast from the tile's end).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda

from ._dtypes import SIMULATOR
from ._launch import FlatArray, launch

_FULL_MASK = 0xFFFFFFFF


def scratch_shape(threads: int):
    """Shared scratch a kernel of ``threads`` threads per block allocates for warp_exchange."""
    return (2, threads) if SIMULATOR else (2, 1)


if SIMULATOR:

    def _exchange_sim(scratch, counter, tid, value, src_lane):
        # double buffering: the write of exchange k+2 into buffer k%2 happens after every
        # thread has passed barrier k+1, hence after every read of exchange k
        parity = counter[0] % 2
        scratch[parity, tid] = value
        cuda.syncthreads()
        got = scratch[parity, tid - tid % 32 + src_lane]
        counter[0] += 1
        return got

    warp_exchange = cuda.jit(device=True)(_exchange_sim)

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    @intrinsic
    def warp_exchange(typingctx, scratch, counter, tid, value, src_lane):
        # an intrinsic rather than an inlined device function: kernels make dozens of these
        # calls, and every Numba-IR inlining costs compile time
        sig = types.float32(scratch, counter, types.int64, types.float32, types.int64)

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType((i32, ir.IntType(1))), (i32,) * 5)
            shfl = cgutils.get_or_insert_function(builder.module, fnty, "llvm.nvvm.shfl.sync.i32")
            value = builder.bitcast(args[3], i32)
            src = builder.trunc(args[4], i32)
            mask, mode_idx, clamp = (ir.Constant(i32, c) for c in (_FULL_MASK, 0, 0x1F))
            got = builder.call(shfl, (mask, mode_idx, value, src, clamp))
            return builder.bitcast(builder.extract_value(got, 0), ir.FloatType())

        return sig, codegen


_THREADS = 128
_ROWS_PER_BLOCK = _THREADS // 32
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)

_kernels: dict = {}


def _scan_kernel(reverse: bool):
    if reverse in _kernels:
        return _kernels[reverse]
    xchg = warp_exchange
    scr_shape = scratch_shape(_THREADS)

    @cuda.jit
    def linear_scan_rows(coef, x, out, init, M, n):
        scr = cuda.shared.array(scr_shape, numba.float32)
        xc = cuda.local.array(1, numba.int64)
        xc[0] = 0
        tid = numba.int64(cuda.threadIdx.x)
        lane = tid % 32
        row = numba.int64(cuda.blockIdx.x) * _ROWS_PER_BLOCK + tid // 32
        live_row = row < M
        r = row if live_row else 0
        carry = init[numba.uint64(r)] if live_row else _F0
        for tile in range((n + 31) // 32):
            # reverse: lane k of tile `tile` holds element n-1-(32*tile+k), so that the same
            # forward lane scan applies to the time-reversed row
            k = tile * 32 + lane
            i = n - 1 - k if reverse else k
            live = live_row and k < n
            c = coef[numba.uint64(r * n + i)] if live else _F1
            v = x[numba.uint64(r * n + i)] if live else _F0
            # inclusive scan of maps s -> c s + v over the warp: X_k <- X_k o X_{k-d}
            for s in range(5):
                d = 1 << s
                src = lane - d if lane >= d else lane
                pc = xchg(scr, xc, tid, c, src)
                pv = xchg(scr, xc, tid, v, src)
                if lane >= d:
                    v = c * pv + v
                    c = c * pc
            y = c * carry + v
            if live:
                out[numba.uint64(r * n + i)] = y
            carry = xchg(scr, xc, tid, y, 31)

    _kernels[reverse] = linear_scan_rows
    return linear_scan_rows


def linear_scan(coef, x, out, init, *, reverse=False, stream=None):
    """Row-wise first-order linear scan of ``(M, n)`` float32 arrays (see the module docstring).

    ``init`` is ``(M,)`` float32. All arrays C-contiguous; ``out`` may be ``x`` (each element is
    read before it is written).
    """
    M, n = x.shape
    if M == 0 or n == 0:
        return
    kernel = _scan_kernel(bool(reverse))
    grid = (M + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    flat = (lambda y: y.reshape(-1)) if SIMULATOR or isinstance(x, np.ndarray) else FlatArray.of
    args = (flat(coef), flat(x), flat(out), flat(init), np.int64(M), np.int64(n))
    launch(kernel, grid, _THREADS, args, stream)
