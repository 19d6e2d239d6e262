"""SWR forward: the fused sliding-window pass (hops 0/1), the block-carry pass and block carriers.

Notation as in SPEC.md: per block of ``block_len`` (``l``) steps the local scan ``w`` (from 0), the
attenuation ``g`` (from 1), the carrier ``v`` (``w`` at the block's last index) and the carry ``S``
entering a block; the output is ``y_t = w_t + g_t * S``.

The forward is memory bound (a few flops per element), so both kernels are shaped around the
bytes: every element of ``a`` and ``u`` is read once from DRAM and ``y`` written once, with wide
coalesced accesses and several loads in flight per thread.

- ``BHDL`` (time contiguous): :func:`_make_lane_scan_kernel`. A warp owns ``rows_per_warp`` channel
  rows and a chunk of blocks; each lane holds ``vec`` consecutive steps (one 16-byte load), scans
  them serially, and the lanes combine their partial scans with a segmented warp-shuffle scan that
  restarts at block boundaries. The carrier of the block before a lane's block comes from the lane
  that ended it (a shuffle), or from the previous iteration, so nothing is re-read inside a chunk.
  On the 16-byte path the loads of the next ``bhdl_stages - 1`` iterations are in flight as
  ``cp.async`` copies into shared memory (no registers held for them) while one iteration computes.
  For hops 0/1 with per-head ``a`` from offset 0, :func:`_make_row_scan_kernel` does the same
  with what depends on ``a`` alone (its copy, unpack and products) once per iteration for the
  warp's rows of one head, one shuffle per row for the carrier, and no 64-bit division in
  its loop: Nsight Compute found the lane scan issue bound (0.78 warps
  issued per scheduler per cycle, SM 74%, DRAM 53%).
- ``BLHD`` (channel contiguous): :func:`_make_channel_walk_kernel`. A thread owns ``vec`` adjacent
  channels (one 16-byte load per step, coalesced across the warp) and walks a chunk of blocks in
  time, ``unroll`` steps of loads in flight at a time. Within the chunk the carrier is handed on in
  registers; only the block before the chunk is re-read (``l / chunk`` extra reads, a few percent).
  For hops=1 over whole blocks from offset 0, :func:`_make_shared_walk_kernel` puts consecutive
  chunks of the same channels in one thread block and hands each chunk's last carrier to the next
  in shared memory, so only one chunk in ``blhd_share_chunks`` re-reads a block.

Both run the same source in the CUDA simulator, with scalar twins of the vector loads and of the
warp shuffles. A ``vec == 1`` specialisation of each is the general kernel: any head dim, any
alignment, any ``offset``.

Entry points :func:`swr_forward` and :func:`block_carriers` follow docs/internals.md. They take the
front's canonical arrays (CuPy on a GPU, NumPy in the simulator); bfloat16 arrives as uint16 bits.
The vector paths need 16-byte aligned ``a``, ``u`` (and ``y`` for its access width) and, BLHD,
``vec | H*D`` (per head also ``vec | D``); BHDL ``vec | N``, ``vec | block_len``, ``vec | offset``,
with ``vec`` = 8 for 16-bit inputs, 4 for float32. Anything else takes the ``vec == 1`` kernels.

Measured on an H100 80GB HBM3 (scripts/kfwd_bench.py; device-to-device copy 2.98 TB/s), bf16,
hops=1, block_len=16, H=128 x D=16, per-head a, through ``swr_forward``, median of CUDA events
around 20 back-to-back calls: BLHD 109-112 us (1.18-1.21 x the 93 us memory floor) and BHDL
114-120 us (1.23-1.29 x) at B x L = 16x2048, 4x8192, 1x32768. BLHD is limited by the few threads
its chunking leaves (32768: ~8 warps per SM) against the re-read per chunk; BHDL by the serial
shuffle chain of each warp iteration at 80 registers (24 warps per SM).
On an H200 (2026-11-30, copy 4.1-4.2 TB/s, swr_forward alone, scripts/swr_sweep.py): BLHD
0.083 ms with the plain walk, 0.080 ms with the shared walk (4 chunks of 64 steps per thread block;
at block_len 32 and 64 its shared memory costs more occupancy than the re-read, so those keep the
plain walk; a ptxas register cap on the shared walk for 5 blocks per SM instead of 4: 0.093
vs 0.079 ms at 96 registers); BHDL 0.104-0.116 ms with register loads, 0.096-0.102 ms with 4
cp.async stages, 0.075-0.076 ms with the row scan (4 x 8192, 1 x 32768; 2 rows per warp, 4 stages;
4 and 8 rows: 0.076-0.080). BLHD with 8 steps of loads in flight instead of 4: 0.0775 vs 0.0885 ms
on 2026-11-30's H200, whose copy measured 4.08-4.18 TB/s. BLHD hops=1 at block_len 32 / 64 (the
plain walk; per head, 16-bit): 256-step chunks of 16-step batches 0.086 / 0.092 ms against 128-step
chunks of 8 at 0.089 / 0.099 ms (H200, 2026-12-01, 4 x 8192). Unsigned indices for the scalar
loads and stores (no code for Numba's wraparound of negative indices): the shared walk 167 -> 127
registers, 0.0795-0.0811 -> 0.0774-0.0775 ms (H200, 2026-12-01, 4 x 8192 and 16 x 2048); launch
bounds of 4 blocks per SM before that (128 registers and spills): 0.086-0.087 ms.
Tried and dropped: narrower accesses (8/4 bytes: 8-40% slower), longer batches (unroll 16) and
software prefetch of the next batch/iteration (registers 110 -> 205 BLHD, 80 -> 117 BHDL; 5-20%
slower), longer or shorter chunks (fewer threads, or more re-read).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import cuda, types

from ._dtypes import LOAD, SHARED_ALIGN, SIMULATOR, STORE
from ._launch import (
    FlatArray,
    allow_shared_memory,
    data_pointer,
    launch,
    launch_with_pointers,
    prepare,
)

# --------------------------------------------------------------------------------------------
# Modes of the shared kernels. The mode is a compile-time constant of each specialisation.

HOPS0 = 0  # S = 0 for every block (block-diagonal only)
HOPS1 = 1  # S_j = v_{j-1}; the first touched block takes `carry`
BLOCK_CARRY = 2  # S_j = block_carry[..., j], computed outside (any hops, hops=None)
CARRIERS = 3  # write v_j, C_j per touched block instead of y

MODE_NAMES = {HOPS0: "hops0", HOPS1: "hops1", BLOCK_CARRY: "block_carry", CARRIERS: "carriers"}

_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}

# --------------------------------------------------------------------------------------------
# Wide loads and stores.
#
# Numba has no 128-bit scalar type and LLVM splits a vector load of halves into 8-byte pieces, so
# the 4/8/16-byte accesses are written as inline PTX (`ld.global.v4.u32` ...) and unpacked to
# float32 in registers; the float32 -> 16-bit packing uses one `cvt.rn.{bf16,f16}x2.f32` per pair
# (round to nearest even, as _dtypes.STORE). Width-1 accesses use _dtypes.LOAD/STORE directly.
# The helpers move values between a global array and a local float32 array at a flat offset, so a
# kernel's unrolled loops index registers with constants only.

_WORD_ASM_LOAD = {
    16: ("ld.global.v4.u32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l"),
    8: ("ld.global.v2.u32 {$0, $1}, [$2];", "=r,=r,l"),
    4: ("ld.global.u32 $0, [$1];", "=r,l"),
}
_WORD_ASM_STORE = {
    16: ("st.global.v4.u32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r"),
    8: ("st.global.v2.u32 [$0], {$1, $2};", "l,r,r"),
    4: ("st.global.u32 [$0], $1;", "l,r"),
}


def _element_address(context, builder, array_type, array_value, index):
    """i64 address of element ``index`` (flat, elements) of a C-contiguous array."""
    ary = context.make_array(array_type)(context, builder, value=array_value)
    ptr = builder.gep(ary.data, [index])
    return builder.ptrtoint(ptr, ir.IntType(64))


def _local_pointer(context, builder, array_type, array_value, offset, k):
    ary = context.make_array(array_type)(context, builder, value=array_value)
    idx = builder.add(offset, ir.Constant(offset.type, k))
    return builder.gep(ary.data, [idx])


def _load_words(builder, address, nbytes, space=".global"):
    """``space`` ".shared": ``address`` is a generic address of shared memory, converted in the
    asm (``cvta.to.shared``) so that the load is an ``LDS``, not a generic ``LD`` (which waits on
    the long scoreboard as a global load does); "" a generic load. Both are volatile, so kept
    in order with the other volatile asm (a load from shared memory must stay after the
    ``cp.async.wait_group`` that makes its data ready)."""
    i32 = ir.IntType(32)
    nwords = nbytes // 4
    text, constraints = _WORD_ASM_LOAD[nbytes]
    text = text.replace("ld.global", "ld" + space)
    if space == ".shared":
        text = (f"{{ .reg .u64 sa; cvta.to.shared.u64 sa, ${nwords}; "
                + text.replace(f"[${nwords}]", "[sa]") + " }")
    volatile = space != ".global"
    if nwords == 1:
        fn = ir.FunctionType(i32, [ir.IntType(64)])
        return [builder.asm(fn, text, constraints, [address], volatile)]
    fn = ir.FunctionType(ir.LiteralStructType([i32] * nwords), [ir.IntType(64)])
    packed = builder.asm(fn, text, constraints, [address], volatile)
    return [builder.extract_value(packed, k) for k in range(nwords)]


def _store_words(builder, address, words):
    i32 = ir.IntType(32)
    nbytes = 4 * len(words)
    text, constraints = _WORD_ASM_STORE[nbytes]
    fn = ir.FunctionType(ir.VoidType(), [ir.IntType(64)] + [i32] * len(words))
    builder.asm(fn, text, constraints, [address] + list(words), True)


def _words_to_f32(builder, kind, words):
    """Unpack 32-bit words into float32 values, element order as in memory (little endian)."""
    f32, i32, i16 = ir.FloatType(), ir.IntType(32), ir.IntType(16)
    out = []
    for word in words:
        if kind == "f32":
            out.append(builder.bitcast(word, f32))
        elif kind == "bf16":
            lo = builder.shl(word, ir.Constant(i32, 16))
            hi = builder.and_(word, ir.Constant(i32, 0xFFFF0000))
            out += [builder.bitcast(lo, f32), builder.bitcast(hi, f32)]
        else:  # f16
            lo = builder.trunc(word, i16)
            hi = builder.trunc(builder.lshr(word, ir.Constant(i32, 16)), i16)
            for half in (lo, hi):
                out.append(builder.fpext(builder.bitcast(half, ir.HalfType()), f32))
    return out


def _f32_to_words(builder, kind, values):
    """Pack float32 values into 32-bit words of the storage kind (round to nearest even)."""
    f32, i32 = ir.FloatType(), ir.IntType(32)
    if kind == "f32":
        return [builder.bitcast(v, i32) for v in values]
    op = "cvt.rn.bf16x2.f32" if kind == "bf16" else "cvt.rn.f16x2.f32"
    fn = ir.FunctionType(i32, [f32, f32])
    # the first operand lands in the upper half: the higher address
    return [
        builder.asm(fn, f"{op} $0, $1, $2;", "=r,f,f", [values[k + 1], values[k]], False)
        for k in range(0, len(values), 2)
    ]


def _scalar_load_loop(kind, width):
    load = LOAD[kind]

    @cuda.jit(device=True, inline=True)
    def load_loop(array, index, dst, offset):
        for k in range(width):
            # an unsigned index: Numba wraps negative signed ones around (3-4 more 64-bit
            # instructions an access)
            dst[offset + k] = load(array[numba.uint64(index + k)])

    return load_loop


def _scalar_store_loop(kind, width):
    store = STORE[kind]

    @cuda.jit(device=True, inline=True)
    def store_loop(array, index, src, offset):
        for k in range(width):
            array[numba.uint64(index + k)] = store(src[offset + k])  # see _scalar_load_loop

    return store_loop


def _array_op(body):
    """A device function ``op(x, i, y, j)`` over two arrays and two element indices, whose code
    is ``body(context, builder, sig, args)`` (LLVM IR; the indices arrive as int64). The wide
    accesses below are all of this shape."""

    @numba.cuda.extending.intrinsic
    def op_intrinsic(typingctx, x, i, y, j):
        sig = types.void(x, types.int64, y, types.int64)

        def codegen(context, builder, sig, args):
            body(context, builder, sig, args)
            return context.get_dummy_value()

        return sig, codegen

    @cuda.jit(device=True, inline=True)
    def op(x, i, y, j):
        op_intrinsic(x, numba.int64(i), y, numba.int64(j))

    return op


def make_vector_load(kind, width, space=".global"):
    """``load(array, index, dst, offset)``: ``dst[offset + k] = float32(array[index + k])``.

    ``array`` is a 1-D storage array (uint16 bits for bf16), ``dst`` a local float32 array. For
    width > 1 one access of ``width * itemsize`` bytes: the address must be aligned to that.
    ``space`` ".shared" reads a shared array (kept in order with the cp.async waits).
    """
    nbytes = width * _ITEMSIZE[kind]
    if SIMULATOR or width == 1:
        return _scalar_load_loop(kind, width)
    assert nbytes in (4, 8, 16), (kind, width)

    def body(context, builder, sig, args):
        address = _element_address(context, builder, sig.args[0], args[0], args[1])
        values = _words_to_f32(builder, kind, _load_words(builder, address, nbytes, space))
        for k, value in enumerate(values):
            builder.store(value, _local_pointer(context, builder, sig.args[2], args[2], args[3], k))

    return _array_op(body)


def make_vector_store(kind, width):
    """``store(array, index, src, offset)``: ``array[index + k] = src[offset + k]``, k < width.

    Converts float32 to the storage kind; stores of more than 16 bytes are split into 16-byte
    pieces, so the address must be aligned to ``min(16, width * itemsize)``.
    """
    nbytes = width * _ITEMSIZE[kind]
    if SIMULATOR or width == 1:
        return _scalar_store_loop(kind, width)
    piece = min(16, nbytes)
    per_piece = piece // _ITEMSIZE[kind]

    def body(context, builder, sig, args):
        f32 = ir.FloatType()
        values = [
            builder.load(_local_pointer(context, builder, sig.args[2], args[2], args[3], k))
            for k in range(width)
        ]
        for p in range(0, width, per_piece):
            first = builder.add(args[1], ir.Constant(ir.IntType(64), p))
            address = _element_address(context, builder, sig.args[0], args[0], first)
            chunk = [builder.bitcast(v, f32) for v in values[p : p + per_piece]]
            _store_words(builder, address, _f32_to_words(builder, kind, chunk))

    return _array_op(body)


# Raw words: a 16-byte access kept packed (4 uint32 words), so it can be parked in shared memory
# at its storage size and unpacked to float32 later. In the simulator a "word" is simply the
# float32 value (WORD_TYPE float32, one per element).

WORD_TYPE = numba.float32 if SIMULATOR else numba.uint32


def words_per_access(kind, width, simulated=SIMULATOR):
    """Words :func:`make_word_load` fills for ``width`` elements of ``kind``."""
    return width if simulated else width * _ITEMSIZE[kind] // 4


def make_word_load(kind, width):
    """``load_words(array, index, dst, offset)``: ``width`` elements from ``array[index:]`` into
    ``dst[offset:]`` as packed words (one 4/8/16-byte access; aligned as make_vector_load)."""
    if SIMULATOR or width == 1:
        return _scalar_load_loop(kind, width)
    nbytes = width * _ITEMSIZE[kind]

    def body(context, builder, sig, args):
        address = _element_address(context, builder, sig.args[0], args[0], args[1])
        for k, word in enumerate(_load_words(builder, address, nbytes)):
            builder.store(word, _local_pointer(context, builder, sig.args[2], args[2], args[3], k))

    return _array_op(body)


def make_word_unpack(kind, width, stride=1):
    """``unpack(src, offset, dst, doffset)``: the words of one access at ``src[offset + j *
    stride]`` (j < words) as ``width`` float32 values in ``dst[doffset:]``; ``src`` in registers or
    shared memory (``stride``: its layout, e.g. interleaved across threads)."""
    nwords = words_per_access(kind, width)
    if SIMULATOR or width == 1:

        @cuda.jit(device=True, inline=True)
        def copy(src, offset, dst, doffset):
            for k in range(width):
                dst[doffset + k] = src[offset + k * stride]

        return copy

    def body(context, builder, sig, args):
        words = [
            builder.load(_local_pointer(context, builder, sig.args[0], args[0], args[1],
                                        j * stride))
            for j in range(nwords)
        ]
        for k, value in enumerate(_words_to_f32(builder, kind, words)):
            builder.store(value, _local_pointer(context, builder, sig.args[2], args[2], args[3], k))

    return _array_op(body)


# Asynchronous copies (sm_80+ `cp.async`): 16 bytes from global to shared memory without passing
# through registers, so a thread can have several iterations of loads in flight at no register
# cost. Each thread later reads back only what it copied itself, after `cp.async.wait_group`, so no
# barrier is needed. In the simulator the copy is immediate and commit/wait do nothing.

_STORAGE_TYPE = {"f32": types.float32, "f16": types.float16, "bf16": types.uint16}


def make_async_copy(kind, width):
    """``copy(array, index, smem, sindex)``: start copying ``array[index:index + width]`` (4, 8
    or 16 bytes, aligned) into the shared array ``smem[sindex:]`` (same storage type)."""
    if SIMULATOR:

        @cuda.jit(device=True, inline=True)
        def copy_now(array, index, smem, sindex):
            for k in range(width):
                smem[sindex + k] = array[index + k]

        return copy_now
    nbytes = width * _ITEMSIZE[kind]
    assert nbytes in (4, 8, 16), (kind, width)
    cache = "cg" if nbytes == 16 else "ca"  # .cg (L2 only) takes 16-byte copies only

    def body(context, builder, sig, args):
        src = _element_address(context, builder, sig.args[0], args[0], args[1])
        dst = _element_address(context, builder, sig.args[2], args[2], args[3])
        fn = ir.FunctionType(ir.VoidType(), [ir.IntType(64), ir.IntType(64)])
        builder.asm(fn, "{ .reg .u64 s; cvta.to.shared.u64 s, $0; "
                        f"cp.async.{cache}.shared.global [s], [$1], {nbytes}; }}",
                    "l,l,~{memory}", [dst, src], True)  # fmt: skip

    return _array_op(body)


def _asm_statement(text):
    @numba.cuda.extending.intrinsic
    def statement(typingctx):
        sig = types.void()

        def codegen(context, builder, sig, args):
            builder.asm(ir.FunctionType(ir.VoidType(), []), text, "~{memory}", [], True)
            return context.get_dummy_value()

        return sig, codegen

    return statement


def make_async_wait(pending):
    """``wait()``: this thread's copies are done except for the ``pending`` newest groups."""
    if SIMULATOR:
        return cuda.jit(device=True)(lambda: None)
    wait_group = _asm_statement(f"cp.async.wait_group {int(pending)};")

    @cuda.jit(device=True, inline=True)
    def wait():
        wait_group()

    return wait


if SIMULATOR:
    async_commit = cuda.jit(device=True)(lambda: None)
else:
    _commit_group = _asm_statement("cp.async.commit_group;")

    @cuda.jit(device=True, inline=True)
    def async_commit():
        """Close the group of copies started since the last commit."""
        _commit_group()


def make_shared_load(kind, width):
    """``load(smem, index, dst, offset)``: make_vector_load for a shared array (one 16-byte
    ``ld.shared``)."""
    return make_vector_load(kind, width, space=".shared")


# --------------------------------------------------------------------------------------------
# Warp shuffles (float32 / int32). The simulator has none: its twins exchange values through a
# per-block dictionary between two barriers, which is a warp exchange when a block is one warp
# (the simulator launches the lane-scan kernel with 32-thread blocks).

_FULL_MASK = 0xFFFFFFFF

if SIMULATOR:

    def _sim_exchange(value, source_lane):
        # two alternating mailboxes: a thread rewrites a box only after the next barrier, which
        # every reader of its previous contents has passed, so one barrier per exchange suffices
        thread = threading.current_thread()
        phase = getattr(thread, "_swr_phase", 0)
        thread._swr_phase = phase ^ 1
        boxes = thread._manager.__dict__.setdefault("_swr_lanes", ({}, {}))
        lane = thread.thread_id % 32
        boxes[phase][thread.thread_id] = value
        thread.syncthreads()
        if 0 <= source_lane < 32:
            return boxes[phase].get(thread.thread_id - lane + source_lane, value)
        return value

    def _sim_shfl_up(value, delta):
        lane = threading.current_thread().thread_id % 32
        return _sim_exchange(value, lane - delta if lane >= delta else lane)

    def _sim_shfl_idx(value, source_lane):
        return _sim_exchange(value, source_lane)

    shfl_up = cuda.jit(device=True)(_sim_shfl_up)
    shfl_idx = cuda.jit(device=True)(_sim_shfl_idx)

else:

    @cuda.jit(device=True, inline=True)
    def shfl_up(value, delta):
        return cuda.shfl_up_sync(_FULL_MASK, value, delta)

    @cuda.jit(device=True, inline=True)
    def shfl_idx(value, source_lane):
        return cuda.shfl_sync(_FULL_MASK, value, source_lane)


def make_block_scan(lanes):
    """Segmented scans across the ``lanes`` lanes of a block (``lanes`` a power of two up to 32;
    blocks start at lanes ``seg == 0``), for kernels whose blocks are whole lanes:

    - ``scan_g(g, gk, seg) -> (inclusive, exclusive)``: products of the lanes' ``g``; ``gk[i]``
      receives this lane's product before level ``i`` (what :func:`scan_w` needs);
    - ``scan_w(w, gk, seg) -> (inclusive, exclusive)``: the running ``w`` (``w <- w + g w_before``).

    The exclusive value entering a block's first lane is the identity (1 or 0). With two lanes a
    block the first level's shuffle already holds it (the first lane's inclusive value is its
    own), so it costs no extra shuffle.
    """
    levels = lanes.bit_length() - 1

    @cuda.jit(device=True, inline=True)
    def scan_g(g, gk, seg):
        g_in = numba.float32(1.0)
        for i in range(levels):
            gk[i] = g
            up = shfl_up(g, 1 << i)
            if seg >= (1 << i):
                g = g * up
            if lanes == 2 and seg > 0:
                g_in = up
        if lanes > 2:
            up = shfl_up(g, 1)
            if seg > 0:
                g_in = up
        return g, g_in

    @cuda.jit(device=True, inline=True)
    def scan_w(w, gk, seg):
        w_in = numba.float32(0.0)
        for i in range(levels):
            up = shfl_up(w, 1 << i)
            if seg >= (1 << i):
                w = w + gk[i] * up
            if lanes == 2 and seg > 0:
                w_in = up
        if lanes > 2:
            up = shfl_up(w, 1)
            if seg > 0:
                w_in = up
        return w, w_in

    return scan_g, scan_w


# --------------------------------------------------------------------------------------------
# Kernel arguments (the same list for both layouts and every mode; unused arrays are 1-element
# dummies):
#   a, u, y, w0, g0, carry, block_carry, v_out, c_out   1-D views of the C-contiguous arrays
#   n            sequence length N (> 0)
#   channels     H * D
#   head_dim     D
#   block_len    l (power of two)
#   offset       in-block position of time index 0
#   nb           touched blocks, ceil((offset + N) / l)
#   chunk_blocks blocks per chunk (one chunk per thread or warp)
#   groups       BLHD: channel vectors per batch row (channels / vec); BHDL: row groups
#   nchunks      chunks per row
#   nwork        threads (BLHD) or warps (BHDL) doing work; the rest of the grid returns


def _make_advance(vec, a_width):
    """``advance_w(w, abuf, ubuf, i)``: one step of the local scan, ``w <- a w + u``, for the
    ``vec`` channels of a thread at step ``i`` of a batch (``a_width`` 1: one per-head ``a`` for
    all of them); ``advance_g(g, abuf, i)``: ``g <- g a``."""

    @cuda.jit(device=True, inline=True)
    def advance_w(w, abuf, ubuf, i):
        for k in range(vec):
            w[k] = abuf[i * a_width + k % a_width] * w[k] + ubuf[i * vec + k]

    @cuda.jit(device=True, inline=True)
    def advance_g(g, abuf, i):
        for q in range(a_width):
            g[q] = g[q] * abuf[i * a_width + q]

    return advance_w, advance_g


def _make_channel_walk_kernel(in_kind, out_kind, per_head, mode, vec, unroll):
    """BLHD: one thread per (batch, ``vec`` adjacent channels, chunk of blocks), walking time.

    ``u``, ``y``: (B, N, H, D) flat; ``a``: (B, N, H) (per head, ``head_dim % vec == 0``) or
    (B, N, H, D) flat; ``w0``, ``g0``, ``carry``: (B, H, D); ``block_carry``, ``v_out``, ``c_out``:
    (B, H, D, nb). Accesses of ``vec`` elements must be aligned to their size.
    """
    load_u = make_vector_load(in_kind, vec)
    load_a = make_vector_load(in_kind, 1 if per_head else vec)
    store_y = make_vector_store(out_kind, vec)
    a_width = 1 if per_head else vec  # a values per step (per head: one for the thread's channels)
    advance_w, advance_g = _make_advance(vec, a_width)
    u_buffer, a_buffer = unroll * vec, unroll * a_width  # local array sizes must be constants
    f32 = numba.float32

    def kernel(
        a, u, y, w0, g0, carry, block_carry, v_out, c_out,
        n, channels, head_dim, block_len, offset, nb, chunk_blocks, groups, nchunks, nwork, nrows,
    ):  # fmt: skip
        tid = cuda.grid(1)
        if tid >= nwork:
            return
        c0 = (tid % groups) * vec
        rest = tid // groups
        jj0 = (rest % nchunks) * chunk_blocks
        b = rest // nchunks
        ch0 = b * channels + c0  # flat (b, h, d) of the first channel
        if per_head:
            a_stride = channels // head_dim
            a_col = c0 // head_dim
        else:
            a_stride = channels
            a_col = c0
        jj1 = min(jj0 + chunk_blocks, nb)
        t_lo = max(jj0 * block_len - offset, 0)  # first step whose y this thread writes
        t_hi = min(jj1 * block_len - offset, n)
        mask = block_len - 1

        w = cuda.local.array(vec, f32)
        s = cuda.local.array(vec, f32)
        g = cuda.local.array(a_width, f32)
        if mode == HOPS1 and jj0 > 0:
            # re-walk the block before the chunk, storing nothing, for its carrier v_{jj0-1}
            t_walk = max((jj0 - 1) * block_len - offset, 0)
            first = jj0 == 1
        else:
            t_walk = t_lo
            first = jj0 == 0
        for k in range(vec):
            w[k] = w0[ch0 + k] if first else f32(0.0)
            if mode == HOPS1:
                s[k] = carry[ch0 + k] if jj0 == 0 else f32(0.0)
            elif mode == BLOCK_CARRY:
                s[k] = block_carry[(ch0 + k) * nb + jj0]
            else:
                s[k] = f32(0.0)
        for q in range(a_width):
            g[q] = g0[ch0 + q] if first else f32(1.0)

        ubuf = cuda.local.array(u_buffer, f32)
        abuf = cuda.local.array(a_buffer, f32)
        out = cuda.local.array(vec, f32)
        for t_batch in range(t_walk, t_hi, unroll):
            # all loads of the batch first (clamped into the chunk), so they are in flight together
            for i in range(unroll):
                tc = min(t_batch + i, t_hi - 1)
                load_u(u, (b * n + tc) * channels + c0, ubuf, i * vec)
                load_a(a, (b * n + tc) * a_stride + a_col, abuf, i * a_width)
            for i in range(unroll):
                t = t_batch + i
                if t < t_hi:
                    if ((t + offset) & mask) == 0 and t > t_walk:
                        # a block starts: its carry S, and the local scan restarts
                        for k in range(vec):
                            if mode == HOPS1:
                                s[k] = w[k]
                            elif mode == BLOCK_CARRY:
                                s[k] = block_carry[(ch0 + k) * nb + (t + offset) // block_len]
                            w[k] = f32(0.0)
                        for q in range(a_width):
                            g[q] = f32(1.0)
                    advance_w(w, abuf, ubuf, i)
                    advance_g(g, abuf, i)
                    if mode == CARRIERS:
                        if ((t + offset + 1) & mask) == 0 or t == n - 1:
                            jj = (t + offset) // block_len
                            for k in range(vec):
                                v_out[(ch0 + k) * nb + jj] = w[k]
                                c_out[(ch0 + k) * nb + jj] = g[k % a_width]
                    elif t >= t_lo:
                        for k in range(vec):
                            if mode == HOPS0:
                                out[k] = w[k]
                            else:
                                out[k] = w[k] + g[k % a_width] * s[k]
                        store_y(y, (b * n + t) * channels + c0, out, 0)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_{MODE_NAMES[mode]}_blhd_channel_walk_{in_kind}_to_{out_kind}_"
        f"{'per_head' if per_head else 'per_channel'}_vec{vec}_unroll{unroll}"
    )
    return cuda.jit(kernel)


def shared_walk_words(in_kind, per_head, vec, steps, tpb, simulated=SIMULATOR):
    """(u, a, carrier) word offsets and the total words of the shared-walk kernel's dynamic shared
    memory (4-byte words; in the simulator a word holds one element)."""
    uw = words_per_access(in_kind, vec, simulated)
    a_at = steps * uw * tpb
    carrier_at = a_at + steps * (1 if per_head else uw) * tpb
    return 0, a_at, carrier_at, carrier_at + vec * tpb


def _make_shared_walk_kernel(in_kind, out_kind, per_head, vec, unroll, lanes, chunks, steps):
    """BLHD, hops=1, whole blocks, ``offset`` 0: the channel walk with the carriers of neighbouring
    chunks handed over in shared memory instead of re-read.

    A thread block is ``chunks`` warps-worth (``lanes`` threads each, one ``vec``-channel group per
    thread) of consecutive time chunks over the same channels. Each thread first walks the last
    block of its chunk (``steps`` = block_len steps), parking the raw words it loads in shared
    memory and publishing that block's carrier; after one barrier, the thread of chunk k takes
    S for its first block from the thread of chunk k - 1, walks its chunk, and reads its last block
    back from shared memory. Only the first chunk of each thread block re-reads the block before
    it (1 / ``chunks`` of the re-reads of the plain walk). Needs ``N % block_len == 0`` and
    ``block_len % unroll == 0``; the shared memory is :func:`shared_walk_words` words.
    """
    load_u = make_vector_load(in_kind, vec)
    load_a = make_vector_load(in_kind, 1 if per_head else vec)
    load_uw = make_word_load(in_kind, vec)
    load_aw = make_word_load(in_kind, vec)  # per-channel a only
    tpb = lanes * chunks
    uw = words_per_access(in_kind, vec)
    aw = 1 if per_head else uw
    unpack_reg = make_word_unpack(in_kind, vec)
    unpack_smem = make_word_unpack(in_kind, vec, stride=tpb)
    store_y = make_vector_store(out_kind, vec)
    a_width = 1 if per_head else vec
    advance_w, advance_g = _make_advance(vec, a_width)
    _, a_at, carrier_at, _ = shared_walk_words(in_kind, per_head, vec, steps, tpb)
    # local array sizes must be constants
    u_buffer, a_buffer = unroll * vec, unroll * a_width
    uw_buffer, aw_buffer = unroll * uw, unroll * aw
    f32, word = numba.float32, WORD_TYPE

    def kernel(
        a, u, y, w0, g0, carry, block_carry, v_out, c_out,
        n, channels, head_dim, block_len, offset, nb, chunk_blocks, groups, nchunks, nwork, nrows,
    ):  # fmt: skip
        tx = cuda.threadIdx.x
        lane = tx % lanes
        k = tx // lanes
        ctiles = (groups + lanes - 1) // lanes
        nsuper = (nchunks + chunks - 1) // chunks
        bid = cuda.blockIdx.x
        grp = (bid % ctiles) * lanes + lane
        rest = bid // ctiles
        chunk = (rest % nsuper) * chunks + k
        b = rest // nsuper
        active = grp < groups and chunk < nchunks
        sm_w = cuda.shared.array(0, word)
        sm_f = cuda.shared.array(0, f32)  # the same memory, seen as float32

        c0 = grp * vec
        ch0 = b * channels + c0
        if per_head:
            a_stride = channels // head_dim
            a_col = c0 // head_dim
        else:
            a_stride = channels
            a_col = c0
        jj0 = chunk * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        t_lo = jj0 * steps
        t_last = (jj1 - 1) * steps
        t_hi = jj1 * steps
        mask = steps - 1

        w = cuda.local.array(vec, f32)
        s = cuda.local.array(vec, f32)
        g = cuda.local.array(a_width, f32)
        out = cuda.local.array(vec, f32)
        ubuf = cuda.local.array(u_buffer, f32)
        abuf = cuda.local.array(a_buffer, f32)
        ubuf_w = cuda.local.array(uw_buffer, word)
        abuf_w = cuda.local.array(aw_buffer, word)

        if active:
            # the chunk's last block: park its words, publish its carrier v (w from 0, or w0)
            for q in range(vec):
                w[q] = w0[ch0 + q] if jj1 == 1 else f32(0.0)
            for t_batch in range(t_last, t_hi, unroll):
                for i in range(unroll):
                    row = b * n + t_batch + i
                    load_uw(u, row * channels + c0, ubuf_w, i * uw)
                    if per_head:
                        load_a(a, row * a_stride + a_col, abuf, i)
                    else:
                        load_aw(a, row * a_stride + a_col, abuf_w, i * aw)
                for i in range(unroll):
                    p = t_batch - t_last + i
                    for j in range(uw):
                        sm_w[(p * uw + j) * tpb + tx] = ubuf_w[i * uw + j]
                    unpack_reg(ubuf_w, i * uw, ubuf, i * vec)
                    if per_head:
                        sm_f[a_at + p * tpb + tx] = abuf[i]
                    else:
                        for j in range(aw):
                            sm_w[a_at + (p * aw + j) * tpb + tx] = abuf_w[i * aw + j]
                        unpack_reg(abuf_w, i * aw, abuf, i * vec)
                    advance_w(w, abuf, ubuf, i)
            for q in range(vec):
                sm_f[carrier_at + q * tpb + tx] = w[q]
        cuda.syncthreads()
        if not active:
            return

        # S entering the chunk's first block
        if jj0 == 0:
            for q in range(vec):
                s[q] = carry[ch0 + q]
        elif k > 0:
            for q in range(vec):
                s[q] = sm_f[carrier_at + q * tpb + tx - lanes]
        else:
            # the first chunk of the thread block re-walks the block before it
            for q in range(vec):
                w[q] = w0[ch0 + q] if jj0 == 1 else f32(0.0)
            for t_batch in range(t_lo - steps, t_lo, unroll):
                for i in range(unroll):
                    row = b * n + t_batch + i
                    load_u(u, row * channels + c0, ubuf, i * vec)
                    load_a(a, row * a_stride + a_col, abuf, i * a_width)
                for i in range(unroll):
                    advance_w(w, abuf, ubuf, i)
            for q in range(vec):
                s[q] = w[q]

        for q in range(vec):
            w[q] = w0[ch0 + q] if jj0 == 0 else f32(0.0)
        for q in range(a_width):
            g[q] = g0[ch0 + q] if jj0 == 0 else f32(1.0)
        for t_batch in range(t_lo, t_hi, unroll):
            if t_batch < t_last:
                for i in range(unroll):
                    row = b * n + t_batch + i
                    load_u(u, row * channels + c0, ubuf, i * vec)
                    load_a(a, row * a_stride + a_col, abuf, i * a_width)
            else:
                for i in range(unroll):
                    p = t_batch - t_last + i
                    unpack_smem(sm_w, p * uw * tpb + tx, ubuf, i * vec)
                    if per_head:
                        abuf[i] = sm_f[a_at + p * tpb + tx]
                    else:
                        unpack_smem(sm_w, a_at + p * aw * tpb + tx, abuf, i * vec)
            for i in range(unroll):
                t = t_batch + i
                if (t & mask) == 0 and t > t_lo:
                    for q in range(vec):
                        s[q] = w[q]
                        w[q] = f32(0.0)
                    for q in range(a_width):
                        g[q] = f32(1.0)
                advance_w(w, abuf, ubuf, i)
                advance_g(g, abuf, i)
                for q in range(vec):
                    out[q] = w[q] + g[q % a_width] * s[q]
                store_y(y, (b * n + t) * channels + c0, out, 0)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_hops1_blhd_shared_walk_{in_kind}_to_{out_kind}_"
        f"{'per_head' if per_head else 'per_channel'}_vec{vec}_unroll{unroll}_lanes{lanes}_"
        f"chunks{chunks}_l{steps}"
    )
    return cuda.jit(kernel)


def _make_lane_scan_kernel(in_kind, out_kind, per_head, mode, vec, rows_per_warp, stages=1,
                           warps_per_block=1):
    """BHDL: one warp per (``rows_per_warp`` channel rows, chunk of blocks); lanes along time.

    ``u``, ``y``: (B, H, D, N) flat; ``a``: (B, H, N) per head or (B, H, D, N) flat; ``w0``,
    ``g0``, ``carry``: (B, H, D); ``block_carry``, ``v_out``, ``c_out``: (B, H, D, nb).
    Needs ``vec | block_len``, ``vec | offset`` and ``vec | N`` (a lane's steps lie in one block;
    vector accesses are aligned when the base pointers are).
    """
    load_u = make_vector_load(in_kind, vec)
    load_a = make_vector_load(in_kind, vec)
    store_y = make_vector_store(out_kind, vec)
    span = 32 * vec  # steps one warp iteration covers
    row_buffer = rows_per_warp * vec  # local array sizes must be constants
    f32, i32 = numba.float32, numba.int32
    # stages > 1: the loads of the next stages - 1 iterations are in flight (cp.async into shared
    # memory) while one iteration computes; shared memory per warp: stages x rows x (u, a) spans
    pipelined = stages > 1
    copy = make_async_copy(in_kind, vec) if pipelined else None
    wait = make_async_wait(stages - 1) if pipelined else None
    load_shared = make_shared_load(in_kind, vec) if pipelined else None
    storage = _STORAGE_TYPE[in_kind]
    smem_elems = max(1, warps_per_block * stages * rows_per_warp * span) if pipelined else 1
    prologue = max(stages - 1, 0)

    def kernel(
        a, u, y, w0, g0, carry, block_carry, v_out, c_out,
        n, channels, head_dim, block_len, offset, nb, chunk_blocks, groups, nchunks, nwork, nrows,
    ):  # fmt: skip
        warp = cuda.grid(1) // 32
        if warp >= nwork:
            return
        lane = i32(cuda.threadIdx.x % 32)
        r0 = (warp % groups) * rows_per_warp
        jj0 = (warp // groups) * chunk_blocks
        jj1 = min(jj0 + chunk_blocks, nb)
        t_lo = max(jj0 * block_len - offset, 0)
        t_hi = min(jj1 * block_len - offset, n)
        mask = block_len - 1
        lanes_per_block = min(32, block_len // vec)
        if mode == HOPS1 and jj0 > 0:
            t_walk = max((jj0 - 1) * block_len - offset, 0)
        else:
            t_walk = t_lo

        # the scan state entering each iteration: (w, g) of the block in progress and its carry S
        w_run = cuda.local.array(rows_per_warp, f32)
        g_run = cuda.local.array(rows_per_warp, f32)
        s_run = cuda.local.array(rows_per_warp, f32)
        for q in range(rows_per_warp):
            r = min(r0 + q, nrows - 1)  # a last group may be short: it repeats the last row
            w_run[q] = w0[r] if t_walk == 0 else f32(0.0)
            g_run[q] = g0[r] if t_walk == 0 else f32(1.0)
            if mode == HOPS1:
                s_run[q] = carry[r] if jj0 == 0 else f32(0.0)
            elif mode == BLOCK_CARRY:
                s_run[q] = block_carry[r * nb + jj0]
            else:
                s_run[q] = f32(0.0)

        ubuf = cuda.local.array(row_buffer, f32)
        abuf = cuda.local.array(row_buffer, f32)
        wl = cuda.local.array(vec, f32)
        gl = cuda.local.array(vec, f32)
        out = cuda.local.array(vec, f32)
        sm_u = cuda.shared.array(smem_elems, storage, alignment=SHARED_ALIGN)
        sm_a = cuda.shared.array(smem_elems, storage, alignment=SHARED_ALIGN)
        n_iters = (t_hi - t_walk + span - 1) // span
        warp_base = (cuda.threadIdx.x // 32) * stages * rows_per_warp * span + lane * vec
        if pipelined:
            for it in range(prologue):
                if it < n_iters:
                    tc = min(t_walk + it * span + lane * vec, t_hi - vec)
                    for q in range(rows_per_warp):
                        r = min(r0 + q, nrows - 1)
                        at = warp_base + (it * rows_per_warp + q) * span
                        copy(a, ((r // head_dim) if per_head else r) * n + tc, sm_a, at)
                        copy(u, r * n + tc, sm_u, at)
                async_commit()
        for it in range(n_iters):
            t_iter = t_walk + it * span
            t0 = t_iter + lane * vec  # this lane's first step
            valid = t0 < t_hi
            tc = min(t0, t_hi - vec)
            pos = (t0 + offset) & mask
            starts = valid and pos == 0 and t0 > t_walk  # a block starts at this lane
            if pipelined:
                ahead = it + prologue
                if ahead < n_iters:
                    tc_ahead = min(t_walk + ahead * span + lane * vec, t_hi - vec)
                    for q in range(rows_per_warp):
                        r = min(r0 + q, nrows - 1)
                        at = warp_base + ((ahead % stages) * rows_per_warp + q) * span
                        copy(a, ((r // head_dim) if per_head else r) * n + tc_ahead, sm_a, at)
                        copy(u, r * n + tc_ahead, sm_u, at)
                async_commit()
                wait()
                for q in range(rows_per_warp):
                    at = warp_base + ((it % stages) * rows_per_warp + q) * span
                    load_shared(sm_a, at, abuf, q * vec)
                    load_shared(sm_u, at, ubuf, q * vec)
            else:
                for q in range(rows_per_warp):
                    r = min(r0 + q, nrows - 1)
                    # rows of one head load the same `a`: the repeats hit L1, not DRAM
                    load_a(a, ((r // head_dim) if per_head else r) * n + tc, abuf, q * vec)
                    load_u(u, r * n + tc, ubuf, q * vec)
            for q in range(rows_per_warp):
                r = min(r0 + q, nrows - 1)
                real_row = r0 + q < nrows
                # serial scan of the lane's steps from (w, g) = (0, 1); past the end: identity
                w_acc = f32(0.0)
                g_acc = f32(1.0)
                for e in range(vec):
                    if valid:
                        w_acc = abuf[q * vec + e] * w_acc + ubuf[q * vec + e]
                        g_acc = g_acc * abuf[q * vec + e]
                    wl[e] = w_acc
                    gl[e] = g_acc
                # segmented inclusive scan across lanes; lane 0 first absorbs the running state
                big_w = w_acc
                big_g = g_acc
                done = i32(1) if starts else i32(0)
                if lane == 0 and not starts:
                    big_w = big_w + big_g * w_run[q]
                    big_g = big_g * g_run[q]
                    done = i32(1)
                k = 1
                while k < lanes_per_block:
                    w_up = shfl_up(big_w, k)
                    g_up = shfl_up(big_g, k)
                    done_up = shfl_up(done, k)
                    if lane >= k and done == 0:
                        big_w = big_w + big_g * w_up
                        big_g = big_g * g_up
                        done = done_up
                    k *= 2
                # exclusive prefix (w, g) entering this lane's first step
                w_in = shfl_up(big_w, 1)
                g_in = shfl_up(big_g, 1)
                if starts:
                    w_in = f32(0.0)
                    g_in = f32(1.0)
                elif lane == 0:
                    w_in = w_run[q]
                    g_in = g_run[q]
                # carry S of this lane's block
                carry_s = f32(0.0)
                if mode == HOPS1:
                    start_lane = lane - pos // vec  # lane where this block started (< 0: earlier)
                    fresh = start_lane >= 0 and t_iter + start_lane * vec > t_walk
                    w_end = shfl_idx(big_w, max(start_lane - 1, 0))  # v of the block before
                    if not fresh:
                        carry_s = s_run[q]
                    elif start_lane > 0:
                        carry_s = w_end
                    else:
                        carry_s = w_run[q]  # the previous block ended with the last iteration
                elif mode == BLOCK_CARRY:
                    if valid:
                        carry_s = block_carry[r * nb + (t0 + offset) // block_len]
                if mode == CARRIERS:
                    ends = ((t0 + vec + offset) & mask) == 0 or t0 + vec == n
                    if valid and real_row and ends:
                        jj = (t0 + offset) // block_len
                        v_out[r * nb + jj] = big_w
                        c_out[r * nb + jj] = big_g
                else:
                    # y = w + g S with w = wl + gl w_in, g = gl g_in
                    z = w_in + g_in * carry_s
                    for e in range(vec):
                        out[e] = wl[e] + gl[e] * z
                    if valid and real_row and t0 >= t_lo:
                        store_y(y, r * n + t0, out, 0)
                w_run[q] = shfl_idx(big_w, 31)
                g_run[q] = shfl_idx(big_g, 31)
                if mode == HOPS1:
                    s_run[q] = shfl_idx(carry_s, 31)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_{MODE_NAMES[mode]}_bhdl_lane_scan_{in_kind}_to_{out_kind}_"
        f"{'per_head' if per_head else 'per_channel'}_vec{vec}_rows{rows_per_warp}"
        + (f"_stages{stages}_warps{warps_per_block}" if pipelined else "")
    )
    return cuda.jit(kernel)


def _make_row_scan_kernel(in_kind, out_kind, mode, vec, rows, block_len, stages,
                          warps_per_block):
    """BHDL fast path: hops 0/1, per-head ``a``, offset 0, the 16-byte path; ``block_len`` a
    compile-time constant with ``vec | block_len | 32 * vec`` (a block is ``lanes`` whole lanes
    of one warp iteration).

    A warp owns ``rows`` consecutive rows of one head and a chunk of whole iterations (``span``
    steps each, from ``t_lo``). Everything that depends on ``a`` only is computed once per
    iteration for all rows (it is the same ``a``): the copy, the unpack, each lane's running
    product ``g`` and the segmented product across the block's lanes. Per row that leaves the
    lane's local scan, ``log2(lanes)`` shuffles for the block's running ``w`` and one for its
    carry: the carrier of the block before comes from the lane that ended it, and lanes 0..lanes-1
    take it from lane 31, which sends last iteration's value (no lane of this iteration needs
    lane 31's). Indexing is hoisted out of the loop, and the loads run ``stages - 1`` iterations
    ahead as ``cp.async`` copies into shared memory, as in the lane scan.

    A chunk after the first (hops=1) starts with one iteration that only its last ``lanes``
    lanes load (the block before the chunk; the other lanes read the same 16 bytes) and that
    stores nothing. The same numbers, bit for bit, as :func:`_make_lane_scan_kernel` (each sum
    in the same order).
    """
    span = 32 * vec
    lanes = block_len // vec
    assert vec > 1 and stages > 1 and block_len % vec == 0 and 1 <= lanes <= 32, (vec, block_len)
    gk_size = max(lanes.bit_length() - 1, 1)  # shuffle levels of the segmented scans
    scan_g, scan_w = make_block_scan(lanes)
    f32, i32 = numba.float32, numba.int32
    copy = make_async_copy(in_kind, vec)
    wait = make_async_wait(stages - 1)
    load_shared = make_shared_load(in_kind, vec)
    store_y = make_vector_store(out_kind, vec)
    storage = _STORAGE_TYPE[in_kind]
    slot = (rows + 1) * span  # one ring slot of a warp: a, then the rows' u
    smem_elems = warps_per_block * stages * slot
    hops1 = mode == HOPS1
    prologue = stages - 1

    def kernel(
        a, u, y, w0, g0, carry, block_carry, v_out, c_out,
        n, channels, head_dim, block_len_, offset, nb, chunk_blocks, groups, nchunks, nwork, nrows,
    ):  # fmt: skip
        warp = cuda.grid(1) // 32
        if warp >= nwork:
            return
        lane = i32(cuda.threadIdx.x % 32)
        seg = lane & i32(lanes - 1)  # this lane's place in its block
        src = (lane - seg - i32(1)) & i32(31)  # the lane that ends the block before
        r0 = (warp % groups) * rows
        chunk = warp // groups
        t_lo = chunk * chunk_blocks * block_len
        t_hi = min(t_lo + chunk_blocks * block_len, n)
        pre = hops1 and chunk > 0  # one iteration for the block before the chunk
        t_first = t_lo - span if pre else t_lo
        t_min = t_lo - block_len if pre else t_lo  # the pre-iteration's lanes read from here
        n_iters = (t_hi - t_first + span - 1) // span
        a_row = (r0 // head_dim) * n
        u_row = r0 * n
        w_prev = cuda.local.array(rows, f32)  # lane 31: the last carrier of the last iteration
        for q in range(rows):
            w_prev[q] = carry[r0 + q] if hops1 and chunk == 0 else f32(0.0)
        af = cuda.local.array(vec, f32)
        gl = cuda.local.array(vec, f32)
        wl = cuda.local.array(vec, f32)
        uf = cuda.local.array(vec, f32)
        out = cuda.local.array(vec, f32)
        gk = cuda.local.array(gk_size, f32)
        sm = cuda.shared.array(smem_elems, storage, alignment=SHARED_ALIGN)
        warp_base = (cuda.threadIdx.x // 32) * stages * slot + lane * vec
        for it in range(prologue):
            if it < n_iters:
                tc = min(max(t_first + it * span + lane * vec, t_min), t_hi - vec)
                at = warp_base + it * slot
                copy(a, a_row + tc, sm, at)
                for q in range(rows):
                    copy(u, u_row + q * n + tc, sm, at + (q + 1) * span)
            async_commit()
        for it in range(n_iters):
            t0 = t_first + it * span + lane * vec
            ahead = it + prologue
            if ahead < n_iters:
                tc = min(max(t_first + ahead * span + lane * vec, t_min), t_hi - vec)
                at = warp_base + (ahead % stages) * slot
                copy(a, a_row + tc, sm, at)
                for q in range(rows):
                    copy(u, u_row + q * n + tc, sm, at + (q + 1) * span)
            async_commit()
            wait()
            at = warp_base + (it % stages) * slot
            load_shared(sm, at, af, 0)
            # what depends on a only: the lane's running product, the block's across lanes
            g_acc = f32(1.0)
            for e in range(vec):
                g_acc = g_acc * af[e]
                gl[e] = g_acc
            big_g, g_in = scan_g(g_acc, gk, seg)
            store = t0 >= t_lo and t0 < t_hi
            for q in range(rows):
                load_shared(sm, at + (q + 1) * span, uf, 0)
                w_acc = f32(0.0)
                for e in range(vec):
                    w_acc = af[e] * w_acc + uf[e]
                    wl[e] = w_acc
                big_w, w_in = scan_w(w_acc, gk, seg)
                z = w_in
                if hops1:
                    carrier = shfl_idx(w_prev[q] if lane == 31 else big_w, src)
                    z = w_in + g_in * carrier
                    w_prev[q] = big_w
                for e in range(vec):
                    out[e] = wl[e] + gl[e] * z
                if store:
                    store_y(y, u_row + q * n + t0, out, 0)

    kernel.__name__ = kernel.__qualname__ = (
        f"swr_{MODE_NAMES[mode]}_bhdl_row_scan_{in_kind}_to_{out_kind}_per_head_vec{vec}"
        f"_rows{rows}_l{block_len}_stages{stages}_warps{warps_per_block}"
    )
    return cuda.jit(kernel)


# --------------------------------------------------------------------------------------------
# Specialisations and launch plans

class _Tuning(dict):
    """A dict whose ``version`` changes with every assignment (launch plans depend on it)."""

    version = 0

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.version += 1


TUNING = _Tuning({
    # BLHD: bytes one thread moves per step (16: one 16-byte access), steps whose loads are in
    # flight together (H200 2026-11-30, shared walk, bf16 4 x 8192: 8 steps 0.0775 ms, 4 steps
    # 0.0885 ms), chunk length in steps (longer: fewer re-read blocks but fewer threads)
    "blhd_access_bytes": 16,
    "blhd_unroll": 8,
    "blhd_chunk_steps": 128,
    "blhd_chunk_steps_f32": 256,  # float32 inputs: half the channels per thread, twice the steps
    "blhd_threads_per_block": 256,
    # ... hops=1, per head, 16-bit, block_len from blhd_long_block_len (the plain walk): H200
    # 2026-12-01, 4 x 8192, l=64 / 32: 256-step chunks of 16-step batches 0.092 / 0.086 ms,
    # 128-step chunks of 8 (the defaults above) 0.099 / 0.089 ms, 512 steps 0.128 / 0.124 ms
    "blhd_long_block_len": 32,
    "blhd_long_chunk_steps": 256,
    "blhd_long_unroll": 16,
    # BLHD hops=1 over whole blocks: consecutive chunks per thread block whose carriers are handed
    # over in shared memory (1: off), channel groups per chunk, and the most shared memory a
    # thread block may take for it (above: the plain walk)
    "blhd_share_chunks": 4,
    "blhd_share_lanes": 32,
    "blhd_share_chunk_steps": 64,
    "blhd_share_chunk_steps_f32": 256,
    "blhd_share_max_bytes": 48 * 1024,
    # BHDL: channel rows per warp (their per-head `a` loads hit L1), resident threads to aim for
    # per SM when rows are split into chunks, shortest chunk in warp iterations
    "bhdl_access_bytes": 16,
    "bhdl_rows_per_warp": 2,
    "threads_per_sm": 2048,
    "threads_per_sm_f32": 4096,  # float32: more, shorter chunks (H200: 0.169 vs 0.175 ms)
    "bhdl_min_chunk_iters": 8,
    "bhdl_chunk_blocks": 0,  # fixed blocks per chunk (0: chosen per launch; tests set it)
    "bhdl_threads_per_block": 128,
    # BHDL 16-byte path: iterations whose loads are in flight (cp.async into shared memory; 1: plain
    # loads into registers). Shared memory per block: stages x 8 KiB at 128 threads. H200, bf16,
    # 2 rows per warp: 4 stages 0.096-0.102 ms, 2: 0.098-0.103, 3: 0.102-0.109, 1: 0.104-0.116.
    "bhdl_stages": 4,
    # BHDL hops 0/1, per head, offset 0, 16-byte path: the row scan (a's work once per iteration
    # for `bhdl_scan_rows` rows of one head; False: the lane scan)
    "bhdl_row_scan": True,
    "bhdl_scan_rows": 2,
})
"""Launch tuning, chosen by scripts/kfwd_bench.py on an H100 and retuned with scripts/swr_sweep.py
on an H200 (BLHD unroll 4 over 128-step chunks: 0.083 vs 0.090 ms at 16 x 2048; float32 over
256-step chunks: 0.152 vs 0.172 ms at 4 x 8192)."""

_kernels: dict = {}
_shared_kernels: dict = {}


def get_shared_kernel(in_kind, out_kind, per_head, vec, unroll, lanes, chunks, steps):
    """The compiled-on-demand dispatcher of one shared-walk specialisation."""
    key = (in_kind, out_kind, per_head, vec, unroll, lanes, chunks, steps)
    kernel = _shared_kernels.get(key)
    if kernel is None:
        kernel = _shared_kernels[key] = _make_shared_walk_kernel(*key)
    return kernel


def get_row_scan_kernel(in_kind, out_kind, mode, vec, rows, block_len, stages, warps_per_block):
    """The compiled-on-demand dispatcher of one BHDL row-scan specialisation."""
    key = ("row_scan", in_kind, out_kind, mode, vec, rows, block_len, stages, warps_per_block)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = _make_row_scan_kernel(*key[1:])
    return kernel


def _row_scan(in_kind, per_head, mode, vec, block_len, offset, head_dim, block):
    """Rows per warp when the BHDL row scan takes this launch, else None."""
    rows = TUNING["bhdl_scan_rows"]
    stages = _bhdl_pipeline(vec, block)
    if not (TUNING["bhdl_row_scan"] and per_head and mode in (HOPS0, HOPS1) and stages):
        return None
    if offset != 0 or head_dim % rows or not vec <= block_len <= 32 * vec:
        return None
    return rows


def get_kernel(layout, in_kind, out_kind, per_head, mode, vec, depth, *pipeline):
    """The compiled-on-demand dispatcher of one specialisation (``depth``: BLHD unroll, BHDL rows
    per warp; BHDL ``pipeline``: stages, warps per block)."""
    key = (layout, in_kind, out_kind, per_head, mode, vec, depth) + pipeline
    kernel = _kernels.get(key)
    if kernel is None:
        factory = _make_channel_walk_kernel if layout == "BLHD" else _make_lane_scan_kernel
        kernel = _kernels[key] = factory(in_kind, out_kind, per_head, mode, vec, depth, *pipeline)
    return kernel


def _bhdl_pipeline(vec, block):
    """(stages, warps per block) of the BHDL lane scan: cp.async stages for the 16-byte path."""
    stages = TUNING["bhdl_stages"] if vec > 1 else 1
    return (stages, block // 32) if stages > 1 else ()


_KINDS = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.uint16): "bf16"}


def _vec_for(access_bytes, kind):
    return max(1, access_bytes // _ITEMSIZE[kind])


def _unroll(mode, vec, block_len=None):
    """BLHD steps per batch. The block-carry mode re-reads S at every block start; its larger loop
    body makes NVVM stop unrolling (then the batch buffers go to local memory) above 32 values.
    With ``block_len`` (the shared walk, whose batches stay inside a block): at most that."""
    unroll = TUNING["blhd_unroll"]
    if block_len is not None:
        unroll = max(1, min(unroll, block_len))
    return max(1, min(unroll, 32 // vec)) if mode == BLOCK_CARRY else unroll


def signature(in_kind, out_kind):
    """The Numba signature of every forward kernel for these storage kinds (9 arrays, 11 int64)."""
    f32 = types.Array(types.float32, 1, "C")
    storage = {"f32": f32, "f16": types.Array(types.float16, 1, "C"),
               "bf16": types.Array(types.uint16, 1, "C")}  # fmt: skip
    arrays = [storage[in_kind]] * 2 + [storage[out_kind]] + [f32] * 6
    return tuple(arrays + [types.int64] * 11)


def _channel_vec(in_kind, out_kind, per_head, channels, head_dim, misaligned):
    """BLHD: the widest channel vector if these shapes and pointers allow it, else 1 (general)."""
    vec = _vec_for(TUNING["blhd_access_bytes"], in_kind)
    ok = channels % vec == 0 and (not per_head or head_dim % vec == 0)
    ok = ok and not misaligned(vec * _ITEMSIZE[in_kind], min(16, vec * _ITEMSIZE[out_kind]))
    return vec if ok else 1


def _time_vec(in_kind, out_kind, n, block_len, offset, misaligned):
    """BHDL: the widest time vector if every lane's steps stay in one block and aligned, else 1."""
    vec = _vec_for(TUNING["bhdl_access_bytes"], in_kind)
    ok = n % vec == 0 and block_len % vec == 0 and offset % vec == 0
    ok = ok and not misaligned(vec * _ITEMSIZE[in_kind], min(16, vec * _ITEMSIZE[out_kind]))
    return vec if ok else 1


_sm_counts: dict = {}


def _sm_count() -> int:
    if SIMULATOR:
        return 1
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    count = _sm_counts.get(dev)
    if count is None:
        count = _sm_counts[dev] = cupy.cuda.Device(dev).attributes["MultiProcessorCount"]
    return count


class _Plan:
    """What one launch needs besides the data pointers, cached per shape/dtype/alignment."""

    __slots__ = ("kernel", "grid", "block", "scalars", "shared", "entry", "values")

    def __init__(self, kernel, grid, block, scalars, shared=0):
        self.kernel, self.grid, self.block, self.scalars = kernel, grid, block, scalars
        self.shared = shared  # bytes of dynamic shared memory
        self.entry = self.values = None


def _shared_walk(in_kind, per_head, mode, vec, n, block_len, offset, nb):
    """(lanes, chunks, shared bytes, blocks per chunk) when the shared-walk kernel takes this
    BLHD launch, else None: hops=1 over whole blocks from offset 0, the vector path, at least two
    chunks, and its shared memory within TUNING's limit."""
    chunks, lanes = TUNING["blhd_share_chunks"], TUNING["blhd_share_lanes"]
    unroll = _unroll(mode, vec, block_len)
    if chunks < 2 or mode != HOPS1 or vec == 1 or offset != 0:
        return None
    if n % block_len or block_len % unroll:
        return None
    steps = TUNING["blhd_share_chunk_steps_f32" if in_kind == "f32" else "blhd_share_chunk_steps"]
    chunk_blocks = max(1, min(nb, steps // block_len))
    if nb <= chunk_blocks:
        return None
    words = shared_walk_words(in_kind, per_head, vec, block_len, lanes * chunks, False)[3]
    if 4 * words > TUNING["blhd_share_max_bytes"]:  # judged by what a GPU needs
        return None
    return lanes, chunks, 4 * shared_walk_words(in_kind, per_head, vec, block_len,
                                                lanes * chunks)[3], chunk_blocks


def _make_plan(layout, shape, per_head, in_kind, out_kind, block_len, offset, mode, misaligned):
    if layout == "BHDL":
        batch, heads, head_dim, n = shape
    else:
        batch, n, heads, head_dim = shape
    channels = heads * head_dim
    nrows = batch * channels
    nb = -(-(offset + n) // block_len)
    target = _sm_count() * TUNING["threads_per_sm_f32" if in_kind == "f32" else "threads_per_sm"]
    # the simulator's warp shuffles exchange values across a whole block: keep blocks one warp
    block = 32 if SIMULATOR else TUNING[f"{layout.lower()}_threads_per_block"]
    shared_bytes = 0  # dynamic shared memory (the shared walk)
    if layout == "BLHD":
        vec = _channel_vec(in_kind, out_kind, per_head, channels, head_dim, misaligned)
        groups = channels // vec
        shared = _shared_walk(in_kind, per_head, mode, vec, n, block_len, offset, nb)
        if shared:
            lanes, chunks, shared_bytes, chunk_blocks = shared
            kernel = get_shared_kernel(in_kind, out_kind, per_head, vec,
                                       _unroll(mode, vec, block_len),
                                       lanes, chunks, block_len)  # fmt: skip
            block = lanes * chunks
        else:
            # hops=1 with long blocks: longer chunks (each re-walks the block before it) and
            # more steps of loads in flight
            long = (mode == HOPS1 and per_head and in_kind != "f32" and vec > 1
                    and block_len >= TUNING["blhd_long_block_len"])  # fmt: skip
            unroll = TUNING["blhd_long_unroll"] if long else _unroll(mode, vec)
            kernel = get_kernel(layout, in_kind, out_kind, per_head, mode, vec, unroll)
            if long:
                steps = TUNING["blhd_long_chunk_steps"]
            else:
                steps = TUNING["blhd_chunk_steps_f32" if in_kind == "f32" else "blhd_chunk_steps"]
            chunk_blocks = max(1, min(nb, steps // block_len))
        nchunks = -(-nb // chunk_blocks)
        nwork = batch * groups * nchunks
        if shared:  # a thread block: `chunks` consecutive chunks of `lanes` channel groups
            grid = batch * -(-groups // lanes) * -(-nchunks // chunks)
        else:
            grid = -(-nwork // block)
    else:
        vec = _time_vec(in_kind, out_kind, n, block_len, offset, misaligned)
        rows_per_warp = _row_scan(in_kind, per_head, mode, vec, block_len, offset, head_dim,
                                  block)  # fmt: skip
        if rows_per_warp:
            kernel = get_row_scan_kernel(in_kind, out_kind, mode, vec, rows_per_warp, block_len,
                                         *_bhdl_pipeline(vec, block))  # fmt: skip
        else:
            rows_per_warp = TUNING["bhdl_rows_per_warp"]
            kernel = get_kernel(layout, in_kind, out_kind, per_head, mode, vec, rows_per_warp,
                                *_bhdl_pipeline(vec, block))  # fmt: skip
        groups = -(-nrows // rows_per_warp)
        # whole rows per warp unless that leaves the GPU short of warps; chunks stay long enough
        # that re-walking the block before each (hops=1) costs little, and are whole iterations
        per_iter = max(1, 32 * vec // block_len)
        min_blocks = max(1, TUNING["bhdl_min_chunk_iters"] * per_iter)
        want_chunks = max(1, -(-target // (32 * groups)))
        chunk_blocks = max(min_blocks, -(-nb // want_chunks))
        chunk_blocks = -(-chunk_blocks // per_iter) * per_iter
        chunk_blocks = min(TUNING["bhdl_chunk_blocks"] or chunk_blocks, nb)
        nchunks = -(-nb // chunk_blocks)
        nwork = groups * nchunks
        grid = -(-nwork * 32 // block)
    scalars = (n, channels, head_dim, block_len, offset, nb, chunk_blocks, groups, nchunks, nwork,
               nrows)  # fmt: skip
    return _Plan(kernel, grid, block, [np.int64(x) for x in scalars], shared_bytes)


def _arrays(a, u, y, v_out, c_out, w0, g0, carry, block_carry, mode, dummy):
    """The nine kernel arrays in argument order (a dummy where the mode reads nothing)."""
    return [a, u, dummy if y is None else y, w0, g0,
            carry if mode == HOPS1 else dummy,
            block_carry if mode == BLOCK_CARRY else dummy,
            dummy if v_out is None else v_out, dummy if c_out is None else c_out]  # fmt: skip


def _kinds(in_dtype, out_dtype, mode):
    in_kind = _KINDS[np.dtype(FlatArray(0, 0, in_dtype).dtype)]
    out_kind = "f32" if mode == CARRIERS else _KINDS[np.dtype(FlatArray(0, 0, out_dtype).dtype)]
    return in_kind, out_kind


def _host_flat(x):
    x = x.reshape(-1)
    return x.view(np.uint16) if x.dtype.name == "bfloat16" else x


def _run_simulated(layout, a, u, y, v_out, c_out, *, block_len, offset, w0, g0, carry,
                   block_carry, mode, stream):  # fmt: skip
    """NumPy arrays in the simulator: plain launches, alignment not observable."""
    arrays = _arrays(a, u, y, v_out, c_out, w0, g0, carry, block_carry, mode,
                     np.zeros(1, np.float32))  # fmt: skip
    args = [_host_flat(x) for x in arrays]
    in_kind, out_kind = _kinds(args[1].dtype, args[2].dtype, mode)
    plan = _make_plan(layout, u.shape, a.ndim == 3, in_kind, out_kind, block_len, offset, mode,
                      lambda in_bytes, out_bytes: False)  # fmt: skip
    launch(plan.kernel, plan.grid, plan.block, args + plan.scalars, stream=stream,
           shared_mem=plan.shared)  # fmt: skip


_plans: dict = {}
_dummies: dict = {}
_cupy = None


def _device_setup():
    """(cupy module, current device, a 1-element float32 dummy array on it)."""
    global _cupy
    if _cupy is None:
        import cupy

        _cupy = cupy
    device = _cupy.cuda.runtime.getDevice()
    dummy = _dummies.get(device)
    if dummy is None:
        dummy = _dummies[device] = _cupy.zeros(1, np.float32)
    return device, dummy


def _run(layout, a, u, y, v_out, c_out, *, block_len, offset, w0, g0, carry, block_carry, mode,
         stream):  # fmt: skip
    shape = u.shape
    if 0 in shape:
        return
    if isinstance(u, np.ndarray):
        _run_simulated(layout, a, u, y, v_out, c_out, block_len=block_len, offset=offset,
                       w0=w0, g0=g0, carry=carry, block_carry=block_carry, mode=mode,
                       stream=stream)  # fmt: skip
        return
    # The GPU path is the per-call host cost users see: everything but the data pointers is
    # looked up in a plan cached per (device, shapes, dtypes, options, pointer alignment).
    device, dummy = _device_setup()
    arrays = _arrays(a, u, y, v_out, c_out, w0, g0, carry, block_carry, mode, dummy)
    ptrs = [data_pointer(x) for x in arrays]
    align = ((ptrs[0] | ptrs[1]) & 15, ptrs[2] & 15)  # the vector paths need aligned bases
    out_dtype = None if y is None else y.dtype
    key = (device, layout, shape, len(a.shape), u.dtype, out_dtype, block_len, offset, mode,
           align, TUNING.version)  # fmt: skip
    plan = _plans.get(key)
    if plan is None:

        def misaligned(in_bytes, out_bytes):
            return align[0] % in_bytes != 0 or align[1] % out_bytes != 0

        in_kind, out_kind = _kinds(u.dtype, y.dtype if y is not None else np.float32, mode)
        plan = _make_plan(layout, shape, len(a.shape) == 3, in_kind, out_kind, block_len, offset,
                          mode, misaligned)  # fmt: skip
        plan.entry, plan.values = prepare(plan.kernel, [FlatArray.of(x) for x in arrays]
                                          + plan.scalars)  # fmt: skip
        allow_shared_memory(plan.entry, plan.shared)
        _plans[key] = plan
    launch_with_pointers(plan.entry, plan.grid, plan.block, plan.values, ptrs, stream,
                         plan.shared)  # fmt: skip


def swr_forward(a, u, y, *, layout, block_len, hops, offset, w0, g0, carry, block_carry=None,
                stream=None):  # fmt: skip
    """Sliding-window forward ``y_t = w_t + g_t * S`` into the preallocated ``y``.

    Shapes (canonical, C-contiguous, see docs/internals.md):
      BHDL: ``u``, ``y`` (B, H, D, N); ``a`` (B, H, N) per head or (B, H, D, N) per channel.
      BLHD: ``u``, ``y`` (B, N, H, D); ``a`` (B, N, H) per head or (B, N, H, D) per channel.
      ``w0``, ``g0``, ``carry``: (B, H, D) float32; ``block_carry``: (B, H, D, nb) float32,
      ``nb = ceil((offset + N) / block_len)``.
    ``hops`` 0 (S = 0; ``carry`` is not read) or 1 (S of the first touched block is ``carry``,
    then the previous block's carrier). With ``block_carry`` the kernel reads S of every touched
    block from it instead (any hops). ``a``/``u`` float32, float16 or bfloat16 (as uint16 bits);
    ``y`` any of the three. ``y`` must not overlap the inputs. Returns None.
    """
    if block_carry is not None:
        mode = BLOCK_CARRY
    else:
        mode = HOPS0 if hops == 0 else HOPS1
    _run(layout, a, u, y, None, None, block_len=block_len, offset=offset, w0=w0, g0=g0,
         carry=carry, block_carry=block_carry, mode=mode, stream=stream)  # fmt: skip


def block_carriers(a, u, v, C, *, layout, block_len, offset, w0, g0, stream=None):
    """Per touched block ``j``: ``v[..., j]`` = w and ``C[..., j]`` = g at its last index.

    Shapes as :func:`swr_forward`; ``v``, ``C``: (B, H, D, nb) float32. The first block continues
    from ``w0``, ``g0``; a final partial block ends at index N - 1. Returns None.
    """
    _run(layout, a, u, None, v, C, block_len=block_len, offset=offset, w0=w0, g0=g0, carry=None,
         block_carry=None, mode=CARRIERS, stream=stream)  # fmt: skip


# --------------------------------------------------------------------------------------------
# For tests: every specialisation the entry points can launch, as (kernel, numba signature).


def specialisations():
    """Yield ``(name, kernel, argument types)`` for every kernel the entry points can pick under
    the current TUNING: layout x input x output dtype x per-head/per-channel x mode x the widest
    vector or the general ``vec == 1``; then the shared-walk kernels (see the comment there)."""
    for layout in ("BLHD", "BHDL"):
        for in_kind in ("f32", "f16", "bf16"):
            widest = _vec_for(TUNING[f"{layout.lower()}_access_bytes"], in_kind)
            for mode in (HOPS0, HOPS1, BLOCK_CARRY, CARRIERS):
                for out_kind in ("f32",) if mode == CARRIERS else ("f32", "f16", "bf16"):
                    for per_head in (True, False):
                        for vec in sorted({1, widest}):
                            if layout == "BLHD":
                                depth = _unroll(mode, vec)
                            else:
                                depth = TUNING["bhdl_rows_per_warp"]
                            pipeline = () if layout == "BLHD" else _bhdl_pipeline(
                                vec, TUNING["bhdl_threads_per_block"])
                            kernel = get_kernel(layout, in_kind, out_kind, per_head, mode, vec,
                                                depth, *pipeline)  # fmt: skip
                            yield kernel.py_func.__name__, kernel, signature(in_kind, out_kind)
    # the BLHD plain walk's hops=1 batches for long blocks (16-bit inputs, per head)
    for in_kind in ("f16", "bf16"):
        vec = _vec_for(TUNING["blhd_access_bytes"], in_kind)
        for out_kind in ("f32", "f16", "bf16"):
            kernel = get_kernel("BLHD", in_kind, out_kind, True, HOPS1, vec,
                                TUNING["blhd_long_unroll"])  # fmt: skip
            yield kernel.py_func.__name__, kernel, signature(in_kind, out_kind)
    # the BHDL row scan: block_len 16 for every input dtype in both modes and every output
    # dtype in hops=1 (the modes differ only in the carrier); the other block lengths only change
    # the segmented scan's depth, so one dtype pair stands for them
    rows = TUNING["bhdl_scan_rows"]
    for in_kind in ("f32", "f16", "bf16"):
        vec = _vec_for(TUNING["bhdl_access_bytes"], in_kind)
        stages = _bhdl_pipeline(vec, TUNING["bhdl_threads_per_block"])
        if not stages:
            continue
        cases = [(out_kind, HOPS1, 16) for out_kind in ("f32", "f16", "bf16")]
        cases += [(in_kind, HOPS0, 16)]
        if in_kind == "bf16":
            cases += [("bf16", HOPS1, 8), ("bf16", HOPS1, 32), ("bf16", HOPS1, 64)]
        for out_kind, mode, block_len in cases:
            kernel = get_row_scan_kernel(in_kind, out_kind, mode, vec, rows, block_len, *stages)
            yield kernel.py_func.__name__, kernel, signature(in_kind, out_kind)
    # the shared walk (BLHD hops=1): block_len 16 per head for every dtype pair; the other block
    # lengths it fits (per head 4 and 8, per channel 4 and 8 at 48 KiB) only change trip counts
    # and shared-memory offsets, so one dtype pair stands for them
    lanes, chunks = TUNING["blhd_share_lanes"], TUNING["blhd_share_chunks"]
    for in_kind in ("f32", "f16", "bf16"):
        vec = _vec_for(TUNING["blhd_access_bytes"], in_kind)
        cases = [(out_kind, True, 16) for out_kind in ("f32", "f16", "bf16")]
        if in_kind == "bf16":
            cases += [("bf16", True, 4), ("bf16", True, 8), ("bf16", False, 4), ("bf16", False, 8)]
        for out_kind, per_head, steps in cases:
            kernel = get_shared_kernel(in_kind, out_kind, per_head, vec,
                                       _unroll(HOPS1, vec, steps),
                                       lanes, chunks, steps)  # fmt: skip
            yield kernel.py_func.__name__, kernel, signature(in_kind, out_kind)


__all__ = ["swr_forward", "block_carriers", "TUNING", "specialisations", "get_kernel"]

