"""Argument checks: every public entry point validates here, before any kernel runs."""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import array_backend, bfloat16, dtype_name

LAYOUTS = ("BHDL", "BLHD")
DEFAULT_LAYOUT = "BLHD"  # channels contiguous: what a projection produces (adapters too)
MIN_COMPUTE_CAPABILITY = (8, 0)  # the kernels copy with cp.async (sm_80 and later)
BLOCK_LENS = tuple(2**i for i in range(9))  # 1 .. 256
GPU_DTYPES = ("float32", "float16", "bfloat16")
CPU_DTYPES = GPU_DTYPES + ("float64",)


@dataclass(frozen=True)
class Problem:
    """A checked SWR call in canonical terms: logical dims (B, H, D, N) and the backend."""

    backend: str  # "numpy" or "cupy"
    layout: str
    B: int
    H: int
    D: int
    N: int
    per_head: bool
    dtype: Any
    out_dtype: Any
    block_len: int
    hops: int | None
    device: int | None = None  # the CUDA device of the inputs (CuPy backend)


def check_block_len(block_len) -> int:
    if isinstance(block_len, bool) or not isinstance(block_len, numbers.Integral):
        raise TypeError(f"block_len must be an int, got {type(block_len).__name__}")
    if int(block_len) not in BLOCK_LENS:
        raise ValueError(f"block_len must be a power of two from 1 to 256, got {block_len}")
    return int(block_len)


def check_hops(hops) -> int | None:
    if hops is None:
        return None
    if isinstance(hops, bool) or not isinstance(hops, numbers.Integral):
        raise TypeError(f"hops must be a non-negative int or None, got {type(hops).__name__}")
    if hops < 0:
        raise ValueError(f"hops must be >= 0 or None (exact recurrence), got {hops}")
    return int(hops)


# A state keeps one carrier per hop for every channel; beyond this many carrier values a state
# with finite hops is refused (hops=None keeps one).
MAX_STATE_CARRIERS = 1 << 28


def check_state_hops(hops, B, H, D) -> None:
    """A state of ``hops`` carriers per channel must fit: ``hops * B * H * D`` at most
    :data:`MAX_STATE_CARRIERS` (stateless calls take the exact path for such hops instead)."""
    if hops is not None and hops * max(B * H * D, 1) > MAX_STATE_CARRIERS:
        raise ValueError(
            f"hops={hops} with a state keeps {hops} carriers per channel "
            f"({hops * B * H * D} values for {B * H * D} channels), more than "
            f"{MAX_STATE_CARRIERS}: use hops=None for the exact recurrence (its state keeps one)"
        )


def check_layout(layout) -> str:
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a string, one of {LAYOUTS}, got {type(layout).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_float_dtype(name, dtype, backend) -> np.dtype:
    allowed = CPU_DTYPES if backend == "numpy" else GPU_DTYPES
    if dtype_name(dtype) not in allowed:
        raise TypeError(f"{name} has dtype {dtype_name(dtype)}; expected one of {allowed}")
    return np.dtype(dtype)


def check_out_dtype(out_dtype, default, backend) -> np.dtype:
    if out_dtype is None:
        return np.dtype(default)
    if isinstance(out_dtype, str) and out_dtype == "bfloat16":
        out_dtype = bfloat16
    try:
        dt = np.dtype(out_dtype)
    except TypeError as exc:
        raise TypeError(f"out_dtype must be a float dtype, got {out_dtype!r}") from exc
    return check_float_dtype("out_dtype", dt, backend)


def check_decay_max(decay_max, name="decay_max") -> float:
    """decay_max bounds the Phalanx decay A = decay_max * sigmoid(...): a finite real > 0.

    The one check behind init_phalanx, the front's phalanx parameters and both adapters' Phalanx.
    """
    if isinstance(decay_max, bool) or not isinstance(decay_max, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(decay_max).__name__}")
    if not (math.isfinite(decay_max) and decay_max > 0):
        raise ValueError(f"{name} must be finite and > 0, got {decay_max}")
    return float(decay_max)


def device_capability(device_id: int) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, as CuPy reports it."""
    return _device_capability(int(device_id))


@functools.cache
def _device_capability(device_id: int) -> tuple[int, int]:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    return int(props["major"]), int(props["minor"])


def capability_supported(cc) -> bool:
    return tuple(cc) >= MIN_COMPUTE_CAPABILITY


def check_gpu(device_id: int) -> None:
    """An unsupported GPU is refused before any kernel is compiled or launched."""
    cc = device_capability(device_id)
    if not capability_supported(cc):
        need = "sm_{}{}".format(*MIN_COMPUTE_CAPABILITY)
        raise RuntimeError(
            f"GPU {device_id} has compute capability {cc[0]}.{cc[1]} (sm_{cc[0]}{cc[1]}); the "
            f"swr-array CUDA kernels need {need} or later (they copy with cp.async). Use NumPy "
            "arrays for the CPU reference."
        )


def check_array(name, x, backend, device=None):
    """A required array argument: not None, on the inputs' framework (and GPU)."""
    if x is None:
        raise TypeError(f"{name} must be a NumPy or CuPy array, got None")
    same_backend([(name, x)], backend, device)


def same_backend(named_arrays, backend, device=None):
    """Every array must live on the same framework (and GPU) as the first input."""
    for name, x in named_arrays:
        if x is None:
            continue
        b = array_backend(x, name=name)
        if b != backend:
            raise TypeError(f"{name} is a {b} array but the inputs are {backend} arrays")
        if backend == "cupy" and device is not None and x.device.id != device:
            raise ValueError(f"{name} is on GPU {x.device.id} but the inputs are on GPU {device}")


def check_swr(a, u, *, block_len, hops, layout, out_dtype=None, name_u="u") -> Problem:
    layout = check_layout(layout)
    block_len = check_block_len(block_len)
    hops = check_hops(hops)
    if u is None:
        raise TypeError(f"{name_u} must be a NumPy or CuPy array, got None")
    backend = array_backend(u, name=name_u)
    device = u.device.id if backend == "cupy" else None
    check_array("a", a, backend, device)
    B, H, D, N, per_head = swr_dims(tuple(a.shape), tuple(u.shape), layout, name_u)
    dtype = check_float_dtype(name_u, u.dtype, backend)
    check_float_dtype("a", a.dtype, backend)
    if np.dtype(a.dtype) != dtype:
        raise TypeError(f"a and {name_u} must share one dtype, got {a.dtype} and {u.dtype}")
    out = check_out_dtype(out_dtype, dtype, backend)
    if backend == "cupy":
        check_gpu(device)
    return Problem(backend, layout, B, H, D, N, per_head, dtype, out, block_len, hops, device)


def refuse_other_layout(a_shape, u_shape, layout, name_u="u"):
    """a that does not fit u in ``layout`` but fits in the other one: the wrong-layout trap, named.

    (Arrays that fit both layouts, per-channel a or per-head a with H == D, cannot be told apart.)
    """
    other = "BLHD" if layout == "BHDL" else "BHDL"
    a_shape, u_shape = tuple(a_shape), tuple(u_shape)
    if len(u_shape) == 4 and a_shape in _a_shapes(u_shape, other):
        raise ValueError(
            f"a {a_shape} and {name_u} {u_shape} fit layout {other!r}, not "
            f"layout={layout!r}: pass layout={other!r} if that is how your arrays are laid out"
        )


def _bhdn(shape, layout):
    if layout == "BHDL":
        B, H, D, N = shape
    else:
        B, N, H, D = shape
    return B, H, D, N


def _a_shapes(shape, layout):
    """(per head, per channel) shapes of a for u of this shape in this layout."""
    B, H, D, N = _bhdn(shape, layout)
    if layout == "BHDL":
        return (B, H, N), (B, H, D, N)
    return (B, N, H), (B, N, H, D)


def swr_dims(a_shape, u_shape, layout, name_u="u"):
    """(B, H, D, N, per_head) of an SWR call from the shapes of a and u in ``layout`` (the array
    front's and the torch adapter's shape check); arrays that fit only the other layout are
    refused with a message that names it."""
    a_shape, u_shape = tuple(a_shape), tuple(u_shape)
    if len(u_shape) != 4:
        dims = "(B, H, D, L)" if layout == "BHDL" else "(B, L, H, D)"
        raise ValueError(f"{name_u} must be 4-D {dims} for layout {layout!r}, got shape {u_shape}")
    per_head_shape, channel_shape = _a_shapes(u_shape, layout)
    B, H, D, N = _bhdn(u_shape, layout)
    if a_shape == per_head_shape:
        return B, H, D, N, True
    if a_shape == channel_shape:
        return B, H, D, N, False
    refuse_other_layout(a_shape, u_shape, layout, name_u)
    raise ValueError(
        f"a must have shape {per_head_shape} (per head) or {channel_shape} (per channel) "
        f"for {name_u} of shape {u_shape} in layout {layout!r}, got {a_shape}"
    )


def check_vjp_out(out, a, u, x0, p: Problem, batch: int) -> None:
    """``out=(da, du, dx0)`` of a gradient call: preallocated C-contiguous arrays of a's and u's
    shapes and dtypes, and dx0 ``(batch, H, D)`` float32 (float64 on NumPy), None without x0."""
    if out is None:
        return
    if not isinstance(out, tuple | list) or len(out) != 3:
        raise TypeError("out must be a tuple (da, du, dx0)")
    check_out("out[0] (da)", out[0], tuple(a.shape), a.dtype, p)
    check_out("out[1] (du)", out[1], tuple(u.shape), u.dtype, p)
    if x0 is None and out[2] is not None:
        raise ValueError("out[2] (dx0) must be None when x0 is None")
    if x0 is not None:
        f = np.float32 if p.backend == "cupy" else np.float64
        check_out("out[2] (dx0)", out[2], (batch, p.H, p.D), f, p)


def step_shapes(a_shape, u_shape, state_shape) -> bool:
    """Whether one token's a is per channel: u ``(B, H, D)`` must match the state's shape, a is
    ``(B, H)`` (per head) or ``(B, H, D)``."""
    shape = tuple(state_shape)
    if tuple(u_shape) != shape:
        raise ValueError(f"u_t must have shape (B, H, D) = {shape} (the state's), got "
                         f"{tuple(u_shape)}")
    B, H, D = shape
    if tuple(a_shape) == (B, H):
        return False
    if tuple(a_shape) == shape:
        return True
    raise ValueError(f"a_t must have shape (B, H) or (B, H, D) = {shape}, got {tuple(a_shape)}")


def check_channel_array(name, x, p: Problem):
    """x0-like arrays: (B, H, D), float, same backend and device."""
    if x is None:
        return None
    same_backend([(name, x)], p.backend, p.device)
    if tuple(x.shape) != (p.B, p.H, p.D):
        raise ValueError(f"{name} must have shape (B, H, D) = {(p.B, p.H, p.D)}, got {x.shape}")
    check_float_dtype(name, x.dtype, p.backend)
    return x


def check_state(state, p: Problem, *, layer=None, common=True):
    """A state for this problem: configuration, shapes, dtype, backend and device; ``layer`` is
    the configuration of the layer that uses it: a state made by another layer is refused (a
    state of the plain recurrence, ``state.layer`` None, goes with any layer, and a call of the
    plain recurrence, ``layer`` None, takes any state). ``common``: the call consumes several tokens
    from one position, so every row must be at the same position (a host read)."""
    from .state import SWRState

    if state is None:
        return None
    if not isinstance(state, SWRState):
        raise TypeError(f"state must be an SWRState (from return_state=True), got {type(state)}")
    if state.block_len != p.block_len or state.hops != p.hops:
        raise ValueError(
            f"state was made with block_len={state.block_len}, hops={state.hops}; "
            f"this call has block_len={p.block_len}, hops={p.hops}"
        )
    if layer is not None and state.layer is not None and state.layer != layer:
        raise ValueError(f"state was made by the layer {state.layer!r}, not by {layer!r}")
    if tuple(state.w.shape) != (p.B, p.H, p.D):
        raise ValueError(f"state is for channels {tuple(state.w.shape)}, not {(p.B, p.H, p.D)}")
    b = array_backend(state.w, name="state")
    if b != p.backend:
        raise TypeError(f"state holds {b} arrays but the inputs are {p.backend} arrays")
    if b == "cupy" and p.device is not None and state.w.device.id != p.device:
        raise ValueError(f"state is on GPU {state.w.device.id} but the inputs are on GPU "
                         f"{p.device}")
    want = np.float64 if b == "numpy" else np.float32
    if state.w.dtype != want:
        raise TypeError(f"state has dtype {state.w.dtype}, expected {np.dtype(want)}")
    if common:
        state.common_position()
    return state


def check_bool(name, x) -> bool:
    if not isinstance(x, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return bool(x)


def check_out(name, out, shape, dtype, p: Problem):
    """A preallocated output: same backend and device, exact shape and dtype, C-contiguous."""
    if out is None:
        return None
    same_backend([(name, out)], p.backend, p.device)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if np.dtype(out.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return out
