"""Launching Numba kernels cheaply (placeholder: plain Numba dispatch until the fast path lands).

``launch(kernel, grid, block, args, stream=None, shared_mem=0)``: ``kernel`` is a ``@cuda.jit``
dispatcher; ``args`` holds arrays (CuPy on a GPU, NumPy in the simulator) and NumPy scalars
(``np.int64``, ``np.float32``: scalar types are explicit so one specialisation serves every call).
"""

from __future__ import annotations


def launch(kernel, grid, block, args, stream=None, shared_mem=0):
    kernel[grid, block](*args)
