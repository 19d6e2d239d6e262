"""The packing kernels (numba_kernels/packing.py) and the native packed kernels
(numba_kernels/packed_walk.py) compile to PTX for sm_80 and sm_90 for every
storage width they are launched with, without local memory, with the launcher's flat ABI."""

from __future__ import annotations

import numba
import pytest
from ptx_arches import nvvm_or_skip

pytestmark = pytest.mark.skipif(
    bool(numba.config.ENABLE_CUDASIM),
    reason="compile_ptx needs the real CUDA target, not the simulator",
)


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
@pytest.mark.parametrize("gather", [False, True])
def test_packing_kernels_compile(cc, gather):
    nvvm_or_skip()
    from numba import types
    from swr_array.numba_kernels import compile_for, packing
    from swr_array.numba_kernels._launch import entry_and_params

    kernel = packing.gather_kernel() if gather else packing.scatter_kernel()
    for storage in (types.float32, types.uint16):  # 4 and 2 bytes (float16/bf16 bits)
        arr = types.Array(storage, 1, "C")
        sig = (arr, arr, types.Array(types.int64, 1, "C"), types.int64, types.int64,
               types.int64, types.int64, arr)
        ptx = compile_for(kernel, sig, cc)
        entry, params = entry_and_params(ptx)
        assert "move_tokens" in entry
        assert params == ["u64"] * (4 * 7 + 4)  # 4 arrays (7 words each), 4 int64 scalars
        assert ".local" not in ptx
        # the gather has the poisoned branch (fill) and the scatter a guarded store
        assert ("setp.lt.s64" in ptx) or ("setp.gt.s64" in ptx) or ("setp.ge.s64" in ptx)


# native packed kernels (numba_kernels/packed_walk.py): the headline specialisations (bfloat16,
# per head, hops 0/1, 16-byte forward and 4-byte backward vectors) and the general ones
# (vec 1, float16/float32 storage, a float32 dy, per-channel coefficients)
FORWARD_CASES = [  # in, out, per_head, hops, x0, vec
    ("bf16", "bf16", True, 1, True, 8),
    ("bf16", "bf16", True, 0, False, 8),
    ("f32", "f32", False, 1, False, 4),
    ("f16", "f32", True, 1, True, 1),
]
BACKWARD_CASES = [  # in, dy, per_head, hops, x0, vec, block_len, lph
    ("bf16", "bf16", True, 1, True, 2, 16, 8),
    ("bf16", "bf16", True, 0, False, 2, 16, 8),
    ("f32", "f32", False, 1, False, 1, 16, 1),
    ("f16", "f32", True, 1, True, 1, 8, 16),
    ("bf16", "bf16", True, 1, True, 4, 16, 32),  # head dim 128
]
_STORE = {"f32": "float32", "f16": "float16", "bf16": "uint16"}


def _arr(kind):
    from numba import types

    return types.Array(getattr(types, _STORE.get(kind, kind)), 1, "C")


def _check_ptx(ptx_by_cc, name):
    from swr_array.numba_kernels._launch import entry_and_params

    for cc, ptx in ptx_by_cc.items():
        assert ".target sm_{}{}".format(*cc) in ptx
        entry, _ = entry_and_params(ptx)
        assert name in entry
        assert ".local" not in ptx  # the per-thread arrays stay in registers (fully unrolled)
    return ptx_by_cc[(9, 0)]


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_native_forward_compiles(case):
    nvvm_or_skip()
    from numba import types
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import packed_walk

    ik, ok, per_head, hops, x0, vec = case
    kernel = packed_walk.forward_kernel(ik, ok, per_head, hops, x0, vec)
    sig = [_arr(ik)] * 2 + [_arr(ok), _arr("float32"), _arr("int32"), _arr("int32")]
    ptx = _check_ptx(compile_arches(kernel.py_func, sig + [types.int64] * 8), "packed_forward")
    if vec * (2 if ik != "f32" else 4) == 16:
        assert "ld.global.v4.u32" in ptx  # one 16-byte access per step
    assert "shfl" not in ptx


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_native_backward_compiles(case):
    nvvm_or_skip()
    from numba import types
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import packed_walk

    ik, dk, per_head, hops, x0, vec, bl, lph = case
    kernel = packed_walk.backward_kernel(ik, dk, per_head, hops, x0, vec, bl, lph)
    sig = [_arr(ik)] * 2 + [_arr(dk), _arr(ik), _arr(ik), _arr("float32"), _arr("float32"),
                            _arr("int64"), _arr("int32")]
    ptx = _check_ptx(compile_arches(kernel.py_func, sig + [types.int64] * 8), "packed_backward")
    rounds = lph.bit_length() - 1
    assert ptx.count("shfl.sync.bfly") == bl * rounds  # the per-head da sum, once per step


@pytest.mark.parametrize("cu_type", ["int32", "int64"])
def test_native_check_kernel_compiles(cu_type):
    nvvm_or_skip()
    from numba import types
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import packed_walk

    kernel = packed_walk.check_kernel()
    sig = [_arr(cu_type), types.int64, types.int64, _arr("int32")]
    _check_ptx(compile_arches(kernel.py_func, sig), "packed_check_cu")


TOKENS_FORWARD_CASES = [  # layout, in, out, per_head, hops, x0, vec
    ("BHDL", "bf16", "bf16", True, 1, True, 8),
    ("BLHD", "f32", "f32", False, 0, False, 4),
]


@pytest.mark.parametrize("case", TOKENS_FORWARD_CASES)
def test_tokens_forward_compiles(case):
    nvvm_or_skip()
    from numba import types
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import packed_walk

    layout, ik, ok, per_head, hops, x0, vec = case
    kernel = packed_walk.tokens_forward_kernel(layout, ik, ok, per_head, hops, x0, vec)
    sig = [_arr(ik)] * 2 + [_arr(ok), _arr("float32"), _arr("int32"), _arr("int32")]
    ptx = _check_ptx(compile_arches(kernel.py_func, sig + [types.int64] * 8),
                     "packed_tokens_forward")
    if vec * (2 if ik != "f32" else 4) == 16:
        assert "ld.global.v4.u32" in ptx  # 16-byte accesses
    assert "shfl" not in ptx


TOKENS_BACKWARD_CASES = [  # layout, in, dy, per_head, hops, x0, vec, lph, chunk
    ("BHDL", "f16", "f32", True, 1, True, 4, 8, 256),
    ("BHDL", "bf16", "bf16", True, 1, True, 8, 16, 512),  # the default chunk, 16-byte accesses
    ("BLHD", "bf16", "bf16", True, 1, True, 2, 8, 256),
]


def _shuffles(layout, U, lph):
    """Shuffles of the per-head da of a group of U tokens: BLHD a butterfly sum per token; BHDL
    a reduce-scatter over the head's rows (halving the tokens each round)."""
    rounds = lph.bit_length() - 1
    if layout == "BLHD":
        return U * rounds
    n, total = U, 0
    for _ in range(rounds):
        total += n // 2 if n > 1 else 1
        n = max(1, n // 2)
    return total


@pytest.mark.parametrize("case", TOKENS_BACKWARD_CASES)
def test_tokens_backward_compiles(case):
    """Local memory holds the reverse pass's checkpoints only (``chunk / U`` of (L, Z, A); BHDL
    keeps them in shared memory); the per-head da sum is a butterfly per token (BLHD) or a
    reduce-scatter (BHDL)."""
    nvvm_or_skip()
    import re

    from numba import types
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import packed_walk

    layout, ik, dk, per_head, hops, x0, vec, lph, chunk = case
    kernel = packed_walk.tokens_backward_kernel(*case)
    sig = [_arr(ik)] * 2 + [_arr(dk), _arr(ik), _arr(ik), _arr("float32"), _arr("float32"),
                            _arr("int32"), _arr("int32")]
    ptx_by_cc = compile_arches(kernel.py_func, sig + [types.int64] * 7)
    VEC, V, U = packed_walk.token_layout(layout, ik, vec)
    # BLHD: the checkpoints in local memory; BHDL: in shared memory, nothing local
    ck_bytes = -(-chunk // U) * (2 * VEC + (1 if per_head else VEC)) * 4 if layout == "BLHD" \
        else 0
    for cc, ptx in ptx_by_cc.items():
        assert ".target sm_{}{}".format(*cc) in ptx
        assert "packed_tokens_backward" in ptx
        depots = [int(n) for n in re.findall(r"__local_depot\d+\[(\d+)\]", ptx)]
        assert sum(depots) <= ck_bytes, (depots, ck_bytes)
        if per_head and lph > 1:
            assert ptx.count("shfl.sync.bfly") == _shuffles(layout, U, lph)
        if V * (2 if ik != "f32" else 4) == 16:
            assert "ld.global.v4.u32" in ptx


RBLOCKS_CASES = [  # in, dy, per_head, hops, x0, vec, block_len, lph
    ("bf16", "bf16", True, 1, True, 4, 16, 4),  # the headline: 8-byte accesses, 4 lanes a head
    ("f32", "f32", False, 0, False, 2, 32, 1),
]


@pytest.mark.parametrize("case", RBLOCKS_CASES)
def test_rblocks_backward_compiles(case):
    """The reverse block walk: no local memory (checkpoints indexed by unrolled constants),
    log2(lph) shuffles a step, accesses of ``vec`` elements."""
    nvvm_or_skip()
    from numba import types
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import packed_walk

    ik, dk, per_head, hops, x0, vec, bl, lph = case
    kernel = packed_walk.rblocks_kernel(*case)
    sig = [_arr(ik)] * 2 + [_arr(dk), _arr(ik), _arr(ik), _arr("float32"), _arr("float32"),
                            _arr("int32"), _arr("int32")]
    ptx = _check_ptx(compile_arches(kernel.py_func, sig + [types.int64] * 8), "packed_rblocks")
    assert ptx.count("shfl.sync.bfly") == bl * (lph.bit_length() - 1)
    width = vec * (2 if ik != "f32" else 4)
    assert f"ld.global.v{width // 4}.u32" in ptx


@pytest.mark.parametrize("case", [("bf16", "bf16", True, 1, True)])
def test_tile_forward_compiles(case):
    """The BHDL tile forward: 16-byte accesses of u and y, shared memory tiles, no local
    memory."""
    nvvm_or_skip()
    from numba import types
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import packed_walk

    ik, ok, per_head, hops, x0 = case
    kernel = packed_walk.tile_forward_kernel(*case)
    sig = [_arr(ik)] * 2 + [_arr(ok), _arr("float32"), _arr("int32"), _arr("int32")]
    ptx = _check_ptx(compile_arches(kernel.py_func, sig + [types.int64] * 8),
                     "packed_tile_forward")
    assert "ld.global.v4.u32" in ptx and "st.global.v4.u32" in ptx
    assert ".shared" in ptx and "bar.sync" in ptx


@pytest.mark.parametrize("case", [("bf16", "bf16", True, 1, True, 16)])
def test_tile_backward_compiles(case):
    """The BHDL tile backward: 16-byte accesses, shared memory tiles, no local memory."""
    nvvm_or_skip()
    from numba import types
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import packed_walk

    ik, dk, per_head, hops, x0, D = case
    kernel = packed_walk.tile_backward_kernel(*case)
    sig = [_arr(ik)] * 2 + [_arr(dk), _arr(ik), _arr(ik), _arr("float32"), _arr("float32"),
                            _arr("int32"), _arr("int32")]
    ptx = _check_ptx(compile_arches(kernel.py_func, sig + [types.int64] * 7),
                     "packed_tile_backward")
    assert "ld.global.v4.u32" in ptx and "st.global.v4.u32" in ptx
    assert ".shared" in ptx and "bar.sync" in ptx


SCAN_CASES = [  # in, out, per_head, hops, x0, E (tokens a lane)
    ("bf16", "bf16", True, 1, True, 8),  # the headline: 16-byte accesses
    ("bf16", "bf16", True, 0, False, 8),
    ("f32", "f32", False, 1, False, 4),
    ("f16", "f32", True, 1, True, 4),
    ("bf16", "f16", False, 1, True, 1),
]


@pytest.mark.parametrize("case", SCAN_CASES)
def test_scan_forward_compiles(case):
    """The BHDL warp-scan forward (numba_kernels/packed_scan.py): no local memory, 16-byte
    loads where a lane's tokens fill them, the lanes' states passed on by shuffles."""
    nvvm_or_skip()
    from numba import types
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import packed_scan

    ik, ok, per_head, hops, x0, E = case
    kernel = packed_scan.forward_kernel(ik, ok, per_head, hops, x0, E)
    sig = [_arr(ik)] * 2 + [_arr(ok), _arr("float32"), _arr("int32"), _arr("int32")]
    ptx = _check_ptx(compile_arches(kernel.py_func, sig + [types.int64] * 7),
                     "packed_scan_forward")
    if E * (2 if ik != "f32" else 4) == 16:
        assert "ld.global.v4.u32" in ptx
    assert ptx.count("shfl.sync.up") >= (3 if hops == 1 else 2)  # chain rounds: w, g (and c)
    assert "shfl.sync.idx" in ptx  # the last lane's state into the next iteration


@pytest.mark.parametrize("cu_dtype", ["int32", "int64"])
def test_marks_kernel_compiles(cu_dtype):
    """The token marks of the scan kernels (packed_scan.mark_tokens): a binary search of cu."""
    nvvm_or_skip()
    from numba import types
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import packed_scan

    sig = [_arr(cu_dtype), _arr("int32")] + [types.int64] * 3
    _check_ptx(compile_arches(packed_scan.marks_kernel().py_func, sig), "packed_mark_tokens")
