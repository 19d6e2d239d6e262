"""Numba CUDA kernels of swr-array and their launch helpers (no argument checking: the front
checks and normalises, see docs/internals.md).

The SWR entry points live in their modules, ``swr_forward.swr_forward`` and
``swr_backward.swr_backward`` (the package does not re-export them under the modules' names).
Which kernel each launches is the table ``swr_forward.FORWARD`` / ``swr_backward.BACKWARD``.
Shared pieces: ``_ptx`` (inline PTX/LLVM helpers), ``_dtypes`` (storage kinds, item sizes,
conversions), ``_launch`` (compilation, launches on data pointers, ``Tuning``).
"""

from . import exact_scan, packing, phalanx_fused, swr_backward, swr_forward, swr_step
from ._launch import FlatArray, compile_for, launch
from .block_scan import linear_scan
from .phalanx_fused import phalanx_backward, phalanx_forward
from .swr_backward import block_grad_sums, swr_backward_blocks, walk_plan
from .swr_forward import block_carriers

__all__ = [
    "FlatArray",
    "block_carriers",
    "block_grad_sums",
    "compile_for",
    "exact_scan",
    "launch",
    "linear_scan",
    "packing",
    "phalanx_backward",
    "phalanx_forward",
    "phalanx_fused",
    "swr_backward",
    "swr_backward_blocks",
    "swr_forward",
    "swr_step",
    "walk_plan",
]

from . import (
    packed_scan,  # noqa: E402  (BHDL packed kernels by warp scans)
    packed_scan_bwd,  # noqa: E402  (their backward)
    packed_walk,  # noqa: E402  (native packed kernels, swr_array/packed.py)
)

__all__ += ["packed_scan", "packed_scan_bwd", "packed_walk"]
