"""Which framework an array belongs to, and the optional GPU stack."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)


def dtype_name(dtype) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


@functools.lru_cache(maxsize=1)
def cupy_or_none():
    """CuPy if it imports and sees a GPU (or the CUDA simulator is off), else None."""
    try:
        import cupy
    except Exception:  # noqa: BLE001 - any import failure means "no CuPy backend"
        return None
    return cupy


def array_backend(x, name="u") -> str:
    """'numpy' or 'cupy'; other frameworks get a TypeError pointing at the adapters."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__
    if mod.startswith("cupy"):
        return "cupy"
    if mod.startswith("torch"):
        raise TypeError(f"{name} is a torch tensor: use swr_array.adapters.torch")
    if mod.startswith("jax") or mod.startswith("jaxlib"):
        raise TypeError(f"{name} is a JAX array: use swr_array.adapters.jax")
    raise TypeError(
        f"{name} must be a NumPy or CuPy array (wrap other CUDA arrays with cupy.from_dlpack), "
        f"got {type(x).__module__}.{type(x).__name__}"
    )


def get_xp(backend: str):
    if backend == "numpy":
        return np
    import cupy

    return cupy
