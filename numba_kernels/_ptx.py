"""Inline PTX and LLVM helpers shared by the kernels: wide global loads and stores, packed words,
``cp.async`` copies into shared memory, shared-memory loads and warp shuffles.

Each ``make_*`` factory returns a Numba device function (or intrinsic) for one storage kind and
access width, so a kernel's unrolled loops compile to straight-line PTX. Every helper has a
simulator twin (``NUMBA_ENABLE_CUDASIM=1``) that computes the same values with scalar code.
"""

from __future__ import annotations

import threading

import numba
from llvmlite import ir
from numba import cuda, types

from ._dtypes import ITEM_SIZE, LOAD, SIMULATOR, STORE

F0 = numba.float32(0.0)

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


def scalar_load_loop(kind, width):
    load = LOAD[kind]

    @cuda.jit(device=True, inline=True)
    def load_loop(array, index, dst, offset):
        for k in range(width):
            # an unsigned index: Numba wraps negative signed ones around (3-4 more 64-bit
            # instructions an access)
            dst[offset + k] = load(array[numba.uint64(index + k)])

    return load_loop


def scalar_store_loop(kind, width):
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
    nbytes = width * ITEM_SIZE[kind]
    if SIMULATOR or width == 1:
        return scalar_load_loop(kind, width)
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
    nbytes = width * ITEM_SIZE[kind]
    if SIMULATOR or width == 1:
        return scalar_store_loop(kind, width)
    piece = min(16, nbytes)
    per_piece = piece // ITEM_SIZE[kind]

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
    return width if simulated else width * ITEM_SIZE[kind] // 4


def make_word_load(kind, width):
    """``load_words(array, index, dst, offset)``: ``width`` elements from ``array[index:]`` into
    ``dst[offset:]`` as packed words (one 4/8/16-byte access; aligned as make_vector_load)."""
    if SIMULATOR or width == 1:
        return scalar_load_loop(kind, width)
    nbytes = width * ITEM_SIZE[kind]

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

STORAGE_TYPE = {"f32": types.float32, "f16": types.float16, "bf16": types.uint16}


def make_async_copy(kind, width):
    """``copy(array, index, smem, sindex)``: start copying ``array[index:index + width]`` (4, 8
    or 16 bytes, aligned) into the shared array ``smem[sindex:]`` (same storage type)."""
    if SIMULATOR:

        @cuda.jit(device=True, inline=True)
        def copy_now(array, index, smem, sindex):
            for k in range(width):
                smem[sindex + k] = array[index + k]

        return copy_now
    nbytes = width * ITEM_SIZE[kind]
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


if SIMULATOR:  # no warp shuffles there: the launch makes a thread block of one head's lanes

    def _sim_head_sum(x, lph, mask):
        total = F0
        for k in range(lph):
            total += shfl_idx(x, k)
        return total

    head_sum = cuda.jit(device=True)(_sim_head_sum)

else:

    @cuda.jit(device=True, inline=True)
    def head_sum(x, lph, mask):
        """Sum of x over the lph (a power of two) lanes of this lane's head, on all of them."""
        off = lph >> 1
        while off > 0:
            x += cuda.shfl_xor_sync(mask, x, off)
            off >>= 1
        return x


# A warp's lanes synchronise (the simulator runs a thread block of one warp: a block barrier).
if SIMULATOR:

    @cuda.jit(device=True)
    def warp_sync():
        cuda.syncthreads()

else:

    @cuda.jit(device=True, inline=True)
    def warp_sync():
        cuda.syncwarp()
