"""Shared fixtures. GPU tests (marked ``gpu``) are skipped where CuPy sees no GPU."""

from __future__ import annotations

import functools
import os
import threading
import zlib

import numpy as np
import pytest


def _serialise_simulator_shared_arrays() -> None:
    """Make the CUDA simulator's ``cuda.shared.array`` atomic.

    The simulator runs a block's threads as Python threads and finds a shared array by its call
    site: a look-up, then an insert, without a lock. When two threads of one block reach that
    point together, each can create an array of its own. The block then no longer shares that
    memory, and a thread reads another thread's slot from an array nobody wrote (rare, under
    load: seen as non-finite gradients in a CI run). One lock around the look-up and the insert
    gives every thread of the block the same array."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        return
    import sys
    import traceback

    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "_swr_serialised", False) or not hasattr(kernelapi, "numpy_support"):
        return
    lock = threading.Lock()
    unlocked = shared.array

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:
            return unlocked(self, shape, dtype, alignment)  # errors, dynamic shared memory
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        # as the simulator: one array per call site (file, line) and block
        caller = tuple(traceback.extract_stack(sys._getframe())[-2][0:2])
        with lock:
            found = self._allocations.get(caller)
            if found is None:
                found = self._allocations[caller] = np.empty(shape, dtype)
        return found

    array._swr_serialised = True
    shared.array = array


_serialise_simulator_shared_arrays()


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - no CuPy, no driver: no GPU
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (CuPy sees none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: fresh inputs per test, reproducible per test
    (crc32, not ``hash``: str hashes change from one process to the next)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
