"""Shared fixtures. GPU tests (marked ``gpu``) are skipped where CuPy sees no GPU."""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest


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
