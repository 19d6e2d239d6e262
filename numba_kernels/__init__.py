"""Numba CUDA kernels of swr-array and their launch helpers (no argument checking: the front
checks and normalises, see docs/internals.md)."""

from ._launch import FlatArray, compile_for, launch
from .swr_forward import block_carriers, swr_forward

__all__ = ["FlatArray", "block_carriers", "compile_for", "launch", "swr_forward"]

# swr_backward.py exports are appended below by its author.

# Phalanx layer: fused kernels (numba_kernels/phalanx_fused.py)
from . import phalanx_fused  # noqa: E402
from .phalanx_fused import phalanx_backward, phalanx_decode, phalanx_forward  # noqa: E402

__all__ += ["phalanx_backward", "phalanx_decode", "phalanx_forward", "phalanx_fused"]

# Backward pass (numba_kernels/swr_backward.py) and the row-wise linear scan (block_scan.py)
from .block_scan import linear_scan  # noqa: E402
from .swr_backward import block_grad_sums, swr_backward, swr_backward_blocks, walk_plan  # noqa: E402

__all__ += ["block_grad_sums", "linear_scan", "swr_backward", "swr_backward_blocks", "walk_plan"]

# Packed sequences: token moves into and out of the padded image (numba_kernels/packing.py)
from . import packing  # noqa: E402

__all__ += ["packing"]
