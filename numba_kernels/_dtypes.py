"""Scalar load/store conversions between storage dtypes and float32 registers.

Storage kinds: ``"f32"`` (float32 arrays), ``"f16"`` (float16 arrays) and ``"bf16"``
(bfloat16 handed over as ``uint16`` raw bits: Numba has no bfloat16 array type). Kernels are built
by factories that close over ``LOAD[kind]`` / ``STORE[kind]``, so each specialisation compiles
to straight-line conversions with no branches on the dtype.

The CUDA simulator has no libdevice, so the bit casts have a pure-Python twin used only there.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
SHARED_ALIGN = None if SIMULATOR else 16
"""Alignment of static shared arrays that take 16-byte ``cp.async`` copies and ``ld.shared.v4``
(a kernel's static arrays are laid out one after the other; the simulator takes no alignment)."""

KINDS = ("f32", "f16", "bf16")

ITEM_SIZE = {"f32": 4, "f16": 2, "bf16": 2}
"""Bytes per element of each storage kind."""


def storage_kind(dtype) -> str:
    """Map a NumPy/ml_dtypes dtype to a storage kind."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return "f32"
    if dtype == np.float16:
        return "f16"
    if dtype.name == "bfloat16":
        return "bf16"
    raise TypeError(f"no kernel storage for dtype {dtype}")


def storage_view(x, kind: str):
    """The view a kernel receives: bfloat16 arrays as their uint16 bits."""
    return x.view(np.uint16) if kind == "bf16" else x


if SIMULATOR:

    def _bits_to_f32(b):
        return np.array(np.uint32(b) << np.uint32(16), dtype=np.uint32).view(np.float32)[()]

    def _f32_to_bits(x):
        bits = int(np.array(np.float32(x), dtype=np.float32).view(np.uint32))
        if x != x:
            return np.uint16(0x7FC0)
        rounding = ((bits >> 16) & 1) + 0x7FFF
        return np.uint16(((bits + rounding) >> 16) & 0xFFFF)

    bf16_to_f32 = cuda.jit(device=True)(_bits_to_f32)
    f32_to_bf16 = cuda.jit(device=True)(_f32_to_bits)

else:

    @cuda.jit(device=True, inline=True)
    def bf16_to_f32(b):
        return cuda.libdevice.int_as_float(numba.int32(numba.uint32(b) << numba.uint32(16)))

    @cuda.jit(device=True, inline=True)
    def f32_to_bf16(x):
        # round to nearest even; NaN stays a quiet NaN
        if x != x:
            return numba.uint16(0x7FC0)
        bits = numba.uint32(cuda.libdevice.float_as_int(x))
        rounding = ((bits >> numba.uint32(16)) & numba.uint32(1)) + numba.uint32(0x7FFF)
        return numba.uint16((bits + rounding) >> numba.uint32(16))


@cuda.jit(device=True, inline=True)
def _load_f32(x):
    return numba.float32(x)


@cuda.jit(device=True, inline=True)
def _load_f16(x):
    return numba.float32(x)


@cuda.jit(device=True, inline=True)
def _store_f32(x):
    return numba.float32(x)


if SIMULATOR:

    def _to_f16(x):
        return np.float16(x)

    _store_f16 = cuda.jit(device=True)(_to_f16)
else:

    @cuda.jit(device=True, inline=True)
    def _store_f16(x):
        return numba.types.float16(x)


LOAD = {"f32": _load_f32, "f16": _load_f16, "bf16": bf16_to_f32}
"""LOAD[kind](element) -> float32 value of one stored element."""

STORE = {"f32": _store_f32, "f16": _store_f16, "bf16": f32_to_bf16}
"""STORE[kind](float32) -> the element to store (uint16 bits for bf16)."""
