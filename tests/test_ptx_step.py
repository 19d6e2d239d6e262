"""Every specialisation of the in-place decoding kernels (numba_kernels/swr_step.py) compiles to
PTX for sm_80 and sm_90 (no GPU needed); the kernels keep nothing in local memory.

The hops mode (0, window K >= 1, exact) and per-head/per-channel coefficients are kernel
arguments, so the storage dtypes are the whole set of specialisations.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numba
import pytest

pytestmark = pytest.mark.skipif(bool(numba.config.ENABLE_CUDASIM),
                                reason="compile_ptx needs the real CUDA target, not the simulator")

CCS = [(8, 0), (9, 0)]
if not numba.config.ENABLE_CUDASIM:
    from swr_array.numba_kernels import swr_step as KS

    SPECS = [(i, cc) for i in range(len(KS.kernel_signatures())) for cc in CCS]
else:
    SPECS = []


def _nvvm_or_skip():
    try:
        from numba.cuda.cudadrv.nvvm import NVVM

        NVVM()
    except Exception as exc:  # noqa: BLE001 - no NVVM library: nothing to compile with
        pytest.skip(f"NVVM is not available ({exc}); install numba-cuda[cu13]")


def _compile(job):
    """PTX of one (specialisation, cc), or the error it raised as text (in a worker process)."""
    from numba import cuda
    from swr_array.numba_kernels import swr_step

    i, cc = job
    kernel, sig = swr_step.kernel_signatures()[i]
    try:
        return cuda.compile_ptx(kernel.py_func, sig, cc=cc)[0]
    except Exception as exc:  # noqa: BLE001 - reported by the test of this specialisation
        return RuntimeError(f"{type(exc).__name__}: {str(exc)[:2000]}")


@functools.lru_cache(maxsize=1)
def all_ptx():
    _nvvm_or_skip()
    workers = max(1, min(len(SPECS), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile, SPECS))


def _id(job):
    i, cc = job
    kernel, sig = KS.kernel_signatures()[i]
    return f"{i}-{kernel.py_func.__name__}-{sig[0].dtype}-{sig[2].dtype}-sm{cc[0]}{cc[1]}"


@pytest.mark.parametrize("j", range(len(SPECS)), ids=[_id(s) for s in SPECS])
def test_compiles_to_ptx(j):
    ptx = all_ptx()[j]
    if isinstance(ptx, Exception):
        raise ptx
    assert ".entry" in ptx
    assert "bar.sync" in ptx  # the row's position advances after a barrier
    assert "ld.local" not in ptx and "st.local" not in ptx


def test_every_launch_has_a_specialisation():
    """The kernels the launch helpers pick, for every dtype pair, are in kernel_signatures()."""
    have = {id(k) for k, _ in KS.kernel_signatures()}
    for kind in ("f32", "f16", "bf16"):
        assert id(KS.phalanx_step_kernel(kind)) in have
        for out_kind in ("f32", "f16", "bf16"):
            assert id(KS.swr_step_kernel(kind, out_kind)) in have
    assert KS.hops_mode(0) == (KS.MODE_NONE, 0)
    assert KS.hops_mode(None) == (KS.MODE_EXACT, 1)
    assert KS.hops_mode(3) == (KS.MODE_WINDOW, 3)
