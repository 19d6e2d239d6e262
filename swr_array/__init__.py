"""swr-array: Sliding Window Recurrences and the Phalanx layer for NumPy, CuPy, PyTorch and JAX.

NumPy inputs run the float64 reference (:mod:`swr_array.reference`); CuPy inputs run Numba CUDA
kernels. PyTorch and JAX users go through :mod:`swr_array.adapters`.
"""

from . import reference
from ._version import __version__ as __version__
from .ops import horizon, swr, swr_init_state, swr_step, swr_step_into, swr_vjp
from .state import SWRState

__all__ = [
    "SWRState",
    "horizon",
    "reference",
    "swr",
    "swr_init_state",
    "swr_step",
    "swr_step_into",
    "swr_vjp",
]
from .phalanx import (  # noqa: E402
    init_phalanx,
    phalanx,
    phalanx_step,
    phalanx_step_mix,
    phalanx_vjp,
)

__all__ += ["init_phalanx", "phalanx", "phalanx_step", "phalanx_step_mix", "phalanx_vjp"]
