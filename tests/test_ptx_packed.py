"""The packing kernels (numba_kernels/packing.py) compile to PTX for sm_80 and sm_90 for every
storage width they are launched with, without local memory, with the launcher's flat ABI."""

from __future__ import annotations

import numba
import pytest

pytestmark = pytest.mark.skipif(
    bool(numba.config.ENABLE_CUDASIM),
    reason="compile_ptx needs the real CUDA target, not the simulator",
)


def _nvvm_or_skip():
    try:
        from numba.cuda.cudadrv.nvvm import NVVM

        NVVM()
    except Exception as exc:  # noqa: BLE001 - no NVVM library: nothing to compile with
        pytest.skip(f"NVVM is not available ({exc}); install numba-cuda[cu13]")


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
@pytest.mark.parametrize("gather", [False, True])
def test_packing_kernels_compile(cc, gather):
    _nvvm_or_skip()
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
