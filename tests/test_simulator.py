"""Runs the kernel tests (tests/test_kernels_*.py) under the CUDA simulator in a subprocess.

The simulator must be chosen before Numba's CUDA module is imported, and the PTX-compile tests in
this process need the real one, so the simulated kernel tests get a process of their own. On a
machine with a GPU the same kernel tests run for real in this process instead.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
from conftest import gpu_available

HERE = os.path.dirname(os.path.abspath(__file__))


def _workers() -> list[str]:
    """pytest-xdist options spreading the simulated tests over the cores (up to 4), if installed:
    the simulator is pure Python, one core per process."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    n = min(os.cpu_count() or 1, 4)
    return ["-n", str(n)] if n > 1 else []


@pytest.mark.skipif(gpu_available(), reason="kernel tests run on the real GPU here")
def test_kernels_under_cuda_simulator():
    files = sorted(glob.glob(os.path.join(HERE, "test_kernels_*.py")))
    if not files:
        pytest.skip("no kernel test modules")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_workers(), *files],
        cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=1800,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    print(tail)
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout, tail
