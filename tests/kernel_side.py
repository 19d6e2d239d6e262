"""Where a kernel test's arrays live: the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, NumPy
arrays) or a GPU (CuPy arrays). Shared by the test modules that run in both places."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from conftest import gpu_available

SIM = bool(numba.config.ENABLE_CUDASIM)
RUNS = SIM or gpu_available()
"""Whether kernels can run here (the simulator, or a GPU that CuPy sees)."""

needs_kernels = pytest.mark.skipif(not RUNS, reason="needs NUMBA_ENABLE_CUDASIM=1 or a GPU")


def dev(x):
    """``x`` (NumPy) on the kernels' side: contiguous NumPy in the simulator, CuPy on a GPU."""
    if SIM:
        return np.ascontiguousarray(x)
    import cupy

    return cupy.asarray(x)


def host(x):
    return x if isinstance(x, np.ndarray) else x.get()


def device_state(ref):
    """A float32 copy of a reference ``SWRState`` on the kernels' side."""
    from swr_array.state import SWRState

    return SWRState(block_len=ref.block_len, hops=ref.hops, layer=ref.layer,
                    position=dev(ref.position.astype(np.int64)),
                    **{k: dev(getattr(ref, k).astype(np.float32))
                       for k in ("w", "g", "carry_v", "carry_C")})
