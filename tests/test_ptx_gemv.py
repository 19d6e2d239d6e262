"""Every representative specialisation of the small-batch GEMV step kernels
(numba_kernels/phalanx_gemv.py) compiles to PTX for sm_80 and sm_90 (no GPU needed), keeps
nothing in local memory, reads the weights with 16-byte loads and reduces with warp shuffles."""

from __future__ import annotations

import functools

import numba
import pytest
from ptx_arches import compile_in_workers

pytestmark = pytest.mark.skipif(bool(numba.config.ENABLE_CUDASIM),
                                reason="compile_ptx needs the real CUDA target, not the simulator")

CCS = [(8, 0), (9, 0)]
if not numba.config.ENABLE_CUDASIM:
    from swr_array.numba_kernels import phalanx_gemv as PG

    SPECS = [(i, cc) for i in range(len(PG.kernel_signatures())) for cc in CCS]
else:
    SPECS = []


def _compile(i):
    """{cc: PTX} of specialisation i, or the error it raised as text (in a worker process)."""
    from ptx_arches import compile_arches
    from swr_array.numba_kernels import phalanx_gemv

    kernel, sig = phalanx_gemv.kernel_signatures()[i]
    try:
        return compile_arches(kernel.py_func, sig)
    except Exception as exc:  # noqa: BLE001 - reported by the tests of this specialisation
        return RuntimeError(f"{type(exc).__name__}: {str(exc)[:2000]}")


@functools.lru_cache(maxsize=1)
def all_ptx():
    return compile_in_workers(_compile, range(len(SPECS) // len(CCS)))



def _id(job):
    i, cc = job
    kernel, sig = PG.kernel_signatures()[i]
    return f"{i}-{kernel.py_func.__name__}-{sig[0].dtype}-sm{cc[0]}{cc[1]}"


@pytest.mark.parametrize("j", range(len(SPECS)), ids=[_id(s) for s in SPECS])
def test_compiles_to_ptx(j):
    i, cc = SPECS[j]
    ptx = all_ptx()[i]
    if isinstance(ptx, Exception):
        raise ptx
    ptx = ptx[cc]
    assert ".entry" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx
    assert "ld.global.v4.u32" in ptx  # 16-byte weight loads
    assert "shfl.sync.bfly" in ptx  # the rows' warp reductions


def test_splits_and_support():
    """The default split fits a head's rows in 32 warps; shapes the kernels do not take are
    named (the torch layer then keeps the GEMM path)."""
    for D in (4, 16, 32, 64, 85):
        sp = PG.split_for(8, D)
        assert sp is not None and 32 * -(-(3 * D + 1) // sp["rpw"]) <= 1024
    assert PG.split_for(1, 86) is None
    assert PG.unsupported("bf16", 1, 2048, 128, 16, (0, 256)) is None
    assert "batch" in PG.unsupported("bf16", PG.MAX_BATCH + 1, 2048, 128, 16, (0, 0))
    assert "16 bytes" in PG.unsupported("bf16", 1, 2052, 128, 16, (0, 0))
    assert "aligned" in PG.unsupported("f32", 1, 2048, 128, 16, (0, 8))
    assert "warps" in PG.unsupported("f32", 1, 4096, 16, 256, (0, 0))
    assert "shared memory" in PG.unsupported("f32", 16, 8192, 512, 16, (0, 0))
