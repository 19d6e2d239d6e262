"""The CUDA simulator as the kernel tests use it: tests/conftest.py makes its shared-array
allocation atomic, so all threads of a block share one array per call site."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
from numba import cuda  # a module global: the simulator swaps it for its fake module

pytestmark = pytest.mark.skipif(not numba.config.ENABLE_CUDASIM,
                                reason="checks the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")


def test_threads_of_a_block_share_each_shared_array():
    import sys

    from numba.cuda.simulator import kernelapi

    assert getattr(kernelapi.FakeCUDAShared.array, "_swr_serialised", False)
    n = 64

    def one_block():
        shared = kernelapi.FakeCUDAShared(0)
        start = threading.Barrier(n)
        got = [None] * n

        def thread(i):
            start.wait()
            first = shared.array((4,), np.float32)  # call sites are told apart by their line
            second = shared.array((4,), np.float32)
            got[i] = (first, second)

        threads = [threading.Thread(target=thread, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {id(g[0]) for g in got}, {id(g[1]) for g in got}

    # switching threads every microsecond opens the look-up/insert window (without the lock,
    # about one block in 20 ends up with two arrays for one call site)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        blocks = [one_block() for _ in range(20)]
    finally:
        sys.setswitchinterval(interval)
    for firsts, seconds in blocks:
        # one array per call site for the whole block, and two call sites never alias
        assert len(firsts) == 1 and len(seconds) == 1 and firsts != seconds


def test_a_kernel_exchanges_through_two_shared_arrays():
    @cuda.jit
    def rotate(out):
        s1 = cuda.shared.array(32, numba.float32)
        s2 = cuda.shared.array(32, numba.float32)
        t = cuda.threadIdx.x
        s1[t] = t
        s2[t] = -2 * t
        cuda.syncthreads()
        out[t] = s1[(t + 1) % 32] + s2[(t + 3) % 32]

    out = np.full(32, np.nan, np.float32)
    rotate[1, 32](out)
    t = np.arange(32)
    np.testing.assert_array_equal(out, ((t + 1) % 32) - 2 * ((t + 3) % 32))
