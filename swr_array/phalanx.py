"""The Phalanx layer (docs/spec.md#phalanx) as functions over a dict of parameter arrays.

    Z   = x W_in                          one GEMM, columns [V | Bg | C | A]
    Y   = swr(A, sigmoid(Bg) * V, hops) * C + V,   A = decay_max * sigmoid(Z_a + b_a)
    out = Y W_out                         one GEMM

NumPy inputs run the float64 reference (:func:`swr_array.reference.phalanx_reference`) and return
x's dtype. CuPy inputs run one cuBLAS GEMM, one fused Numba kernel
(:mod:`swr_array.numba_kernels.phalanx_fused`) and the output GEMM; the backward is four GEMMs
and one fused kernel. hops >= 2 / None (and block lengths above the fused kernels' limit) compose
:func:`swr_array.swr` / :func:`swr_array.swr_vjp` with CuPy element-wise operations instead:
the same numbers, slower.

Parameters are a plain ``dict`` (save with ``numpy.savez(path, **params)``, load with
``dict(numpy.load(path))``):

    W_in   (dim, H*D + 2*KV*D + H)   fused input projection, columns [V | Bg | C | A]
    b_a    (H,)                      bias of the decay logits
    b_b    (KV*D,)                   bias of the input-gate logits
    b_c    (KV*D,)                   bias of the output gate
    W_out  (H*D, dim)                output projection
    decay_max  0-d array or float    A = decay_max * sigmoid(...) (a fixed hyperparameter)

H (heads), D (head_dim) and KV (kv_heads) are read off the shapes; head h uses kv head
h // (H // KV). The decoding state is the :class:`~swr_array.SWRState` of the inner recurrence,
shape (B, H, D).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _checks, reference
from . import packed as _packed
from ._backend import array_backend, bfloat16, dtype_name
from .state import SWRState

Array = Any

__all__ = ["init_phalanx", "phalanx", "phalanx_step", "phalanx_step_mix", "phalanx_vjp"]

PARAM_KEYS = ("W_in", "b_a", "b_b", "b_c", "W_out", "decay_max")
GRAD_KEYS = ("W_in", "b_a", "b_b", "b_c", "W_out")
F32 = np.float32


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


def _positive_int(name, x):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {x}")
    return int(x)


def init_phalanx(
    dim: int,
    *,
    heads: int | None = None,
    head_dim: int = 16,
    kv_heads: int | None = None,
    decay_max: float = 1.0,
    dtype=np.float32,
    xp=np,
    seed: int = 0,
) -> dict:
    """Parameters of a Phalanx layer, initialised like spear's ``Phalanx``/``SigmoidA``.

    Every weight and bias is drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's
    ``nn.Linear`` default, which spear uses): fan_in = dim for W_in and the biases, H*D for W_out.
    With these biases A starts near decay_max / 2.

    Args:
        dim: model width.
        heads: H (default dim // head_dim; dim must then be a multiple of head_dim).
        head_dim: D, channels per head (16 in the paper).
        kv_heads: heads of the Bg and C projections (default H); must divide H.
        decay_max: upper bound of A.
        dtype: float32, float16, bfloat16 (or float64 for the NumPy reference).
        xp: ``numpy`` or ``cupy``: where the weight arrays live (decay_max stays a NumPy 0-d
            array).
        seed: seed of the NumPy generator that draws the weights.

    Returns:
        dict with ``W_in``, ``b_a``, ``b_b``, ``b_c``, ``W_out`` and ``decay_max``.
    """
    dim = _positive_int("dim", dim)
    head_dim = _positive_int("head_dim", head_dim)
    if heads is None:
        if dim % head_dim:
            raise ValueError(f"dim={dim} is not a multiple of head_dim={head_dim}: pass heads")
        heads = dim // head_dim
    heads = _positive_int("heads", heads)
    kv_heads = heads if kv_heads is None else _positive_int("kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    decay_max = _checks.check_decay_max(decay_max)
    if isinstance(dtype, str) and dtype == "bfloat16":
        dtype = bfloat16
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be a float dtype, got {dtype!r}") from exc
    if dtype_name(dtype) not in _checks.CPU_DTYPES:
        raise TypeError(f"dtype must be one of {_checks.CPU_DTYPES}, got {dtype_name(dtype)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng = np.random.default_rng(int(seed))
    width = heads * head_dim + 2 * kv_heads * head_dim + heads
    bound_in = 1.0 / math.sqrt(dim)
    bound_out = 1.0 / math.sqrt(heads * head_dim)
    host = {
        "W_in": rng.uniform(-bound_in, bound_in, (dim, width)),
        "b_a": rng.uniform(-bound_in, bound_in, heads),
        "b_b": rng.uniform(-bound_in, bound_in, kv_heads * head_dim),
        "b_c": rng.uniform(-bound_in, bound_in, kv_heads * head_dim),
        "W_out": rng.uniform(-bound_out, bound_out, (heads * head_dim, dim)),
    }
    if xp is not np and getattr(xp, "__name__", "") != "cupy":
        raise TypeError(f"xp must be the numpy or cupy module, got {xp!r}")
    params = {k: xp.asarray(v.astype(dtype)) for k, v in host.items()}
    params["decay_max"] = np.asarray(float(decay_max), dtype=np.float64)
    return params


class _Config:
    """Checked layer configuration: shapes, dtype and backend of a parameter dict."""

    __slots__ = ("dim", "heads", "head_dim", "kv_heads", "decay_max", "dtype", "backend", "width")

    def __init__(self, dim, heads, head_dim, kv_heads, decay_max, dtype, backend):
        self.dim, self.heads, self.head_dim, self.kv_heads = dim, heads, head_dim, kv_heads
        self.decay_max, self.dtype, self.backend = decay_max, dtype, backend
        self.width = heads * head_dim + 2 * kv_heads * head_dim + heads

    @property
    def group(self):
        return self.heads // self.kv_heads

    @property
    def hd(self):
        return self.heads * self.head_dim

    @property
    def kd(self):
        return self.kv_heads * self.head_dim


def _check_params(params) -> _Config:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays (see init_phalanx), got "
                        f"{type(params).__name__}")
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"params lacks {missing}; expected keys {PARAM_KEYS}")
    extra = [k for k in params if k not in PARAM_KEYS]
    if extra:
        raise ValueError(f"params has unexpected keys {extra}; expected keys {PARAM_KEYS}")
    backend = array_backend(params["W_in"], name="params['W_in']")
    for k in GRAD_KEYS:
        _checks.same_backend([(f"params[{k!r}]", params[k])], backend)
    dtype = _checks.check_float_dtype("params['W_in']", params["W_in"].dtype, backend)
    for k in GRAD_KEYS[1:]:
        if np.dtype(params[k].dtype) != dtype:
            raise TypeError(f"params[{k!r}] has dtype {dtype_name(params[k].dtype)} but "
                            f"params['W_in'] has {dtype_name(dtype)}: all weights share one dtype")
    ndims = {"W_in": 2, "b_a": 1, "b_b": 1, "b_c": 1, "W_out": 2}
    for k, nd in ndims.items():
        if params[k].ndim != nd:
            raise ValueError(f"params[{k!r}] must be {nd}-D, got shape {tuple(params[k].shape)}")
    heads = int(params["b_a"].shape[0])
    if heads < 1:
        raise ValueError("params['b_a'] must have one entry per head (H >= 1), got shape (0,)")
    hd_total, dim = (int(s) for s in params["W_out"].shape)
    if hd_total == 0 or hd_total % heads or dim < 1:
        raise ValueError(f"params['W_out'] must have shape (H*D, dim) with H={heads} (from "
                         f"params['b_a']), D >= 1, dim >= 1; got {tuple(params['W_out'].shape)}")
    head_dim = hd_total // heads
    kd = int(params["b_b"].shape[0])
    if kd == 0 or kd % head_dim or heads % (kd // head_dim):
        raise ValueError(f"params['b_b'] must have shape (KV*D,) with D={head_dim} and KV "
                         f"dividing H={heads}; got {tuple(params['b_b'].shape)}")
    kv_heads = kd // head_dim
    if tuple(params["b_c"].shape) != (kd,):
        raise ValueError(f"params['b_c'] must have shape {(kd,)} like params['b_b'], got "
                         f"{tuple(params['b_c'].shape)}")
    cfg = _Config(dim, heads, head_dim, kv_heads, 0.0, dtype, backend)
    if tuple(params["W_in"].shape) != (dim, cfg.width):
        raise ValueError(f"params['W_in'] must have shape (dim, H*D + 2*KV*D + H) = "
                         f"{(dim, cfg.width)} for dim={dim}, H={heads}, D={head_dim}, "
                         f"KV={kv_heads}; got {tuple(params['W_in'].shape)}")
    dm = params["decay_max"]
    if isinstance(dm, bool) or not (isinstance(dm, numbers.Real) or getattr(dm, "ndim", 1) == 0):
        raise TypeError(f"params['decay_max'] must be a real number or a 0-d array, got {dm!r}")
    try:
        dm = float(dm)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"params['decay_max'] must be a real number, got {dm!r}") from exc
    dm = _checks.check_decay_max(dm, name="params['decay_max']")
    cfg.decay_max = dm
    return cfg


def _check_x(name, x, cfg: _Config, ndim: int):
    backend = array_backend(x, name=name)
    if backend != cfg.backend:
        raise TypeError(f"{name} is a {backend} array but params holds {cfg.backend} arrays")
    dims = "(B, L, dim)" if ndim == 3 else "(B, dim)"
    if x.ndim != ndim or x.shape[-1] != cfg.dim:
        raise ValueError(f"{name} must have shape {dims} with dim={cfg.dim}, got {tuple(x.shape)}")
    _checks.check_float_dtype(name, x.dtype, backend)
    if np.dtype(x.dtype) != cfg.dtype:
        raise TypeError(f"{name} has dtype {dtype_name(x.dtype)} but the params have "
                        f"{dtype_name(cfg.dtype)}: cast one of them")


def _checked(params, x, name, ndim):
    cfg = _check_params(params)
    if cfg.backend == "cupy":
        dev = params["W_in"].device.id
        _checks.check_gpu(dev)
        for k in GRAD_KEYS:
            if params[k].device.id != dev:
                raise ValueError(f"params[{k!r}] is on GPU {params[k].device.id} but "
                                 f"params['W_in'] is on GPU {dev}")
        _check_x_dev(name, x, dev)
    _check_x(name, x, cfg, ndim)
    return cfg


def _check_x_dev(name, x, dev):
    if array_backend(x, name=name) == "cupy" and x.device.id != dev:
        raise ValueError(f"{name} is on GPU {x.device.id} but params are on GPU {dev}")


def _packed_problem(cfg: _Config, x, B: int, N: int, block_len, hops):
    """_problem with x's CUDA device (for the device check of cu_seqlens)."""
    p = _problem(cfg, B, N, block_len, hops)
    if cfg.backend != "cupy":
        return p
    return dataclasses.replace(p, device=x.device.id)


def _problem(cfg: _Config, B: int, N: int, block_len, hops, params=None):
    dev = params["W_in"].device.id if cfg.backend == "cupy" and params is not None else None
    return _checks.Problem(cfg.backend, "BLHD", B, cfg.heads, cfg.head_dim, N, True, cfg.dtype,
                           cfg.dtype, block_len, hops, dev)


def _layer(cfg: _Config):
    """The ``SWRState.layer`` tag of states this layer configuration makes."""
    return ("phalanx", cfg.dim, cfg.heads, cfg.head_dim, cfg.kv_heads, cfg.decay_max)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def phalanx(
    x: Array,
    params: Mapping,
    *,
    block_len: int = 16,
    hops: int | None = 1,
    state: SWRState | None = None,
    return_state: bool = False,
    return_residuals: bool = False,
    cu_seqlens: Array | None = None,
):
    """The Phalanx layer, ``out = (swr(A, Bg*V, hops) * C + V) W_out`` with ``[V|Bg|C|A] = x W_in``.

    Args:
        x: ``(B, L, dim)``, params' dtype; NumPy (float64 reference) or CuPy (GPU).
        params: the dict of :func:`init_phalanx`.
        block_len, hops: of the inner sliding window recurrence (hops=1: Phalanx's SWR).
        state: an :class:`SWRState` (B, H, D) from an earlier ``return_state=True`` call or
            :func:`phalanx_step`, to continue a sequence (chunked prefill); all its rows must be
            at one position.
        return_state: also return the state after the last token: a new state tagged with
            this layer's configuration, or with ``state`` that same object advanced in place.
        return_residuals: also return ``{"z": x W_in}`` (B, L, W) for :func:`phalanx_vjp`,
            which then skips recomputing the input GEMM.
        cu_seqlens: packed sequences (B == 1), as in :func:`swr_array.swr`: each sequence's
            inner recurrence runs alone (on the GPU through the composed path, not the fused
            kernel). Not combined with ``state`` or ``return_state``.

    Returns:
        out ``(B, L, dim)`` in x's dtype; with ``return_state`` / ``return_residuals`` a tuple
        ``(out, state)``, ``(out, residuals)`` or ``(out, state, residuals)``.
    """
    cfg = _checked(params, x, "x", 3)
    block_len = _checks.check_block_len(block_len)
    hops = _checks.check_hops(hops)
    return_state = _checks.check_bool("return_state", return_state)
    return_residuals = _checks.check_bool("return_residuals", return_residuals)
    B, L, _ = x.shape
    _checks.check_state(state, _problem(cfg, B, L, block_len, hops, params), layer=_layer(cfg))
    if return_state and state is None:
        _checks.check_state_hops(hops, B, cfg.heads, cfg.head_dim)
    if cu_seqlens is not None:
        if state is not None or return_state:
            raise ValueError("phalanx with cu_seqlens takes no state and returns none")
        _packed.check_cu_seqlens(cu_seqlens, _packed_problem(cfg, x, B, L, block_len, hops))
        out, z = _forward_packed(x, params, cfg, block_len, hops, cu_seqlens)
        return (out, {"z": z}) if return_residuals else out
    if cfg.backend == "cupy":
        out, new, z = _forward_cupy(x, params, cfg, block_len, hops, state, return_state)
    else:
        out, new, z = _forward_numpy(x, params, cfg, block_len, hops, state, return_state)
    if new is not None:
        if state is not None and new is not state:
            new = state.assign(new)  # a continued state advances in place
        elif state is None:
            new.layer = _layer(cfg)
    res = (out,)
    if return_state:
        res += (new,)
    if return_residuals:
        res += ({"z": z},)
    return res[0] if len(res) == 1 else res


def phalanx_vjp(
    x: Array,
    params: Mapping,
    dout: Array,
    *,
    block_len: int = 16,
    hops: int | None = 1,
    residuals: Mapping | None = None,
    cu_seqlens: Array | None = None,
    linear_layout: bool = False,
):
    """Gradients of ``sum(dout * phalanx(x, params))`` (from position 0): ``(dx, dparams)``.

    ``dx`` has x's shape and dtype; ``dparams`` holds ``W_in``, ``b_a``, ``b_b``, ``b_c``,
    ``W_out`` in the params' dtype (decay_max is not trained). ``residuals`` from
    ``phalanx(..., return_residuals=True)`` on the same x and params saves the input GEMM.
    ``cu_seqlens``: packed sequences, as in :func:`phalanx`. ``linear_layout=True`` returns
    ``dparams["W_in"]`` ``(W, dim)`` and ``dparams["W_out"]`` ``(dim, H*D)``, the transposes, as
    ``nn.Linear`` stores weights (on CuPy the GEMMs produce them directly: no transpose copy).
    """
    cfg = _checked(params, x, "x", 3)
    linear_layout = _checks.check_bool("linear_layout", linear_layout)
    block_len = _checks.check_block_len(block_len)
    hops = _checks.check_hops(hops)
    if array_backend(dout, name="dout") != cfg.backend:
        raise TypeError(f"dout is a {array_backend(dout, name='dout')} array but x is a "
                        f"{cfg.backend} array")
    if tuple(dout.shape) != tuple(x.shape):
        raise ValueError(f"dout must have x's shape {tuple(x.shape)}, got {tuple(dout.shape)}")
    _checks.check_float_dtype("dout", dout.dtype, cfg.backend)
    z = None
    if residuals is not None:
        if not isinstance(residuals, Mapping) or "z" not in residuals:
            raise TypeError("residuals must be the dict returned by "
                            "phalanx(..., return_residuals=True)")
        z = residuals["z"]
        if array_backend(z, name="residuals['z']") != cfg.backend:
            raise TypeError(f"residuals['z'] is not a {cfg.backend} array")
        B, L, _ = x.shape
        if tuple(z.shape) != (B, L, cfg.width):
            raise ValueError(f"residuals['z'] must have shape {(B, L, cfg.width)}, got "
                             f"{tuple(z.shape)}")
    if cu_seqlens is not None:
        B, L, _ = x.shape
        _packed.check_cu_seqlens(cu_seqlens, _packed_problem(cfg, x, B, L, block_len, hops))
        dx, dp = _vjp_packed(x, params, dout, cfg, block_len, hops, z, cu_seqlens)
    elif cfg.backend == "cupy":
        return _vjp_cupy(x, params, dout, cfg, block_len, hops, z, linear_layout=linear_layout)
    else:
        dx, dp = reference.phalanx_vjp_reference(x, params, dout, block_len=block_len,
                                                 hops=hops)
        dx, dp = dx.astype(x.dtype), {k: np.asarray(dp[k]).astype(cfg.dtype) for k in GRAD_KEYS}
    if linear_layout:
        xp = _xp(cfg)
        dp = dict(dp, W_in=xp.ascontiguousarray(dp["W_in"].T),
                  W_out=xp.ascontiguousarray(dp["W_out"].T))
    return dx, dp


def phalanx_step(
    x_t: Array,
    params: Mapping,
    state: SWRState | None = None,
    *,
    block_len: int = 16,
    hops: int | None = 1,
):
    """One decoding step for every batch row: ``(out_t, state)`` for x_t ``(B, dim)``, equal to
    :func:`phalanx` at each row's position.

    ``state`` is the state after each row's previous token (from ``phalanx(...,
    return_state=True)``, :func:`swr_array.swr_init_state` or earlier steps); it is advanced in
    place and returned (the same object). None starts every row at position 0 (a new state).
    ``block_len`` and ``hops`` must match the state's, and a state made by another layer
    configuration is refused; all checks run before any launch.

    On CuPy the step is the input GEMM, one fused kernel (:func:`phalanx_step_mix`: gates, the
    state update of any hops, the read-out gate) and the output GEMM.
    """
    cfg = _checked(params, x_t, "x_t", 2)
    block_len = _checks.check_block_len(block_len)
    hops = _checks.check_hops(hops)
    B = x_t.shape[0]
    p = _problem(cfg, B, 1, block_len, hops, params)
    _checks.check_state(state, p, layer=_layer(cfg), common=False)
    if state is None:
        xp = _xp(cfg)
        dtype = np.float64 if cfg.backend == "numpy" else F32
        state = SWRState.initial((B, cfg.heads, cfg.head_dim), block_len=block_len, hops=hops,
                                 xp=xp, dtype=dtype, layer=_layer(cfg))
    if cfg.backend == "cupy":
        return _step_cupy(x_t, params, cfg, state), state
    from .ops import _step_numpy

    z = np.asarray(x_t, np.float64) @ np.asarray(params["W_in"], np.float64)
    sig_a, A, Bg, C, V = reference._phalanx_gates(
        z[:, None], params["b_a"], params["b_b"], params["b_c"], cfg.heads, cfg.head_dim,
        cfg.kv_heads, cfg.decay_max)
    y = _step_numpy(A[:, 0, :, None], (Bg * V)[:, 0], state)
    Y = (y * C[:, 0] + V[:, 0]).reshape(B, cfg.hd)
    out = Y @ np.asarray(params["W_out"], np.float64)
    return out.astype(x_t.dtype), state


def phalanx_step_mix(z, y, b_a, b_b, b_c, state: SWRState, *, kv_heads: int, decay_max: float,
                     stream=None) -> None:
    """The fused middle of a Phalanx decoding step: ``y = swr_step(A, Bg * V) * C + V`` from the
    input GEMM's output ``z``, written into ``y``, with ``state`` advanced in place.

    Args:
        z: ``(B, W)`` C-contiguous, ``W = H*D + 2*KV*D + H``, columns ``[V | Bg | C | A]``
            (``z = x_t W_in``); float32, float16 or bfloat16.
        y: ``(B, H*D)`` C-contiguous, z's dtype: receives ``Y`` (feed it to the output GEMM).
        b_a ``(H,)``, b_b ``(KV*D,)``, b_c ``(KV*D,)``: the layer's biases, z's dtype,
            C-contiguous.
        state: a GPU :class:`SWRState` ``(B, H, D)`` float32 (any hops, block_len); its rows may
            be at different positions.
        kv_heads: KV (dividing H); decay_max: the layer's ``decay_max``.
        stream: the CUDA stream to launch on: a ``cupy.cuda.Stream``, a raw ``cudaStream_t`` as
            an int (e.g. ``torch.cuda.current_stream().cuda_stream``), or None for CuPy's current
            stream.

    Arrays may be CuPy arrays or anything exposing ``__cuda_array_interface__`` (torch CUDA
    tensors; NumPy arrays under the CUDA simulator), on the state's device. This checks shapes,
    dtypes and contiguity (not the device: the caller keeps everything on one), then makes ONE
    kernel launch: no allocation, no host synchronisation, no host-side change, so it can be
    captured in a CUDA graph. The launch is prepared on the first call for a given set of biases
    and z dtype (kept on the state, keyed by the biases' data pointers); later calls only pass
    z's and y's data pointers.
    """
    phalanx_step_plan(z, y, b_a, b_b, b_c, state, kv_heads=kv_heads,
                      decay_max=decay_max).run(z, y, stream=stream)


def phalanx_step_plan(z, y, b_a, b_b, b_c, state: SWRState, *, kv_heads: int,
                      decay_max: float):
    """The checks of :func:`phalanx_step_mix` (shapes, dtypes, contiguity of these arrays), then
    its prepared launch: a ``numba_kernels.swr_step.StepLaunch`` to ``.run(z, y, stream=...)``
    with z and y of these shapes and dtype (kept on the state, keyed by the biases' data
    pointers). A caller that makes z and y itself (the torch layer's step) keeps the plan and
    relaunches it without checking them again."""
    if not isinstance(state, SWRState):
        raise TypeError(f"state must be an SWRState, got {type(state).__name__}")
    B, H, D = state.shape
    kd = int(b_b.shape[0])
    if (not isinstance(kv_heads, numbers.Integral) or kv_heads < 1 or H % kv_heads
            or kd != kv_heads * D):
        raise ValueError(f"kv_heads must divide H={H} with b_b of shape (KV*D,), got "
                         f"kv_heads={kv_heads}, b_b {tuple(b_b.shape)}")
    W = H * D + 2 * kd + H
    for name, x, shape in (("z", z, (B, W)), ("y", y, (B, H * D)), ("b_a", b_a, (H,)),
                           ("b_b", b_b, (kd,)), ("b_c", b_c, (kd,))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    dtypes = {_np_dtype(x.dtype) for x in (z, y, b_a, b_b, b_c)}
    if len(dtypes) != 1:
        raise TypeError(f"z, y and the biases must share one dtype, got {sorted(map(str, dtypes))}")
    if state.w.dtype != F32:
        raise TypeError(f"state must hold float32 arrays (a GPU state), got {state.w.dtype}")
    key = ("phalanx", _np_dtype(z.dtype), _ptr(b_a), _ptr(b_b), _ptr(b_c), kv_heads,
           float(decay_max))
    run = state._launch_cache.get(key)
    if run is None:
        from .numba_kernels import swr_step as ks

        for name, x in (("z", z), ("y", y), ("b_a", b_a), ("b_b", b_b), ("b_c", b_c)):
            if not _c_contiguous(x):
                raise ValueError(f"{name} must be C-contiguous")
        run = ks.phalanx_step_launch(
            z, y, b_a, b_b, b_c, state.arrays(), state._arrivals(), heads=H, head_dim=D,
            kv_heads=int(kv_heads),
            decay_max=float(decay_max), hops=state.hops, block_len=state.block_len)
        state._launch_cache[key] = run
    elif not (_c_contiguous(z) and _c_contiguous(y)):
        raise ValueError("z and y must be C-contiguous")
    return run


def _np_dtype(dtype):
    """NumPy dtype of an array's dtype (torch dtypes by name)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        name = str(dtype).replace("torch.", "")
        return bfloat16 if name == "bfloat16" else np.dtype(name)


def _ptr(x):
    if isinstance(x, np.ndarray):
        return x.ctypes.data
    data = getattr(x, "data", None)
    if hasattr(data, "ptr"):
        return data.ptr
    if hasattr(x, "data_ptr"):
        return x.data_ptr()
    return x.__cuda_array_interface__["data"][0]


def _c_contiguous(x):
    flags = getattr(x, "flags", None)
    if flags is not None:
        return bool(flags.c_contiguous)
    f = getattr(x, "is_contiguous", None)
    if f is not None:
        return bool(f())
    iface = x.__cuda_array_interface__
    return iface.get("strides") is None


# ----------------------------------------------------------------------------------------------
# NumPy: the float64 reference
# ----------------------------------------------------------------------------------------------


def _xp(cfg):
    if cfg.backend == "numpy":
        return np
    import cupy

    return cupy


def _forward_packed(x, params, cfg, block_len, hops, cu):
    """Packed sequences: NumPy runs each sequence alone (the definition); CuPy the composed
    path with the packed inner recurrence (one evaluation for all the sequences)."""
    if cfg.backend == "cupy":
        import cupy as cp

        B, L, dim = x.shape
        x2 = cp.ascontiguousarray(x).reshape(L, dim)
        z = _mm(x2, params["W_in"])
        y, _ = _composed_forward(z, params, cfg, B, L, block_len, hops, None, False, cu=cu)
        return _mm(y, params["W_out"]).reshape(B, L, dim), z.reshape(B, L, cfg.width)
    c = [int(v) for v in np.asarray(cu)]
    out = np.empty(x.shape, x.dtype)
    for lo, hi in zip(c[:-1], c[1:]):
        out[:, lo:hi] = phalanx(x[:, lo:hi], params, block_len=block_len, hops=hops)
    z = np.asarray(x, np.float64) @ np.asarray(params["W_in"], np.float64)
    return out, z


def _vjp_packed(x, params, dout, cfg, block_len, hops, z, cu):
    if cfg.backend == "cupy":
        return _vjp_cupy(x, params, dout, cfg, block_len, hops, z, cu=cu)
    c = [int(v) for v in np.asarray(cu)]
    dx = np.zeros(x.shape, x.dtype)
    acc = {k: np.zeros(np.shape(params[k]), np.float64) for k in GRAD_KEYS}
    for lo, hi in zip(c[:-1], c[1:]):
        if hi == lo:
            continue
        dxs, dps = reference.phalanx_vjp_reference(x[:, lo:hi], params, dout[:, lo:hi],
                                                   block_len=block_len, hops=hops)
        dx[:, lo:hi] = dxs
        for k in GRAD_KEYS:
            acc[k] += np.asarray(dps[k], np.float64)
    return dx, {k: acc[k].astype(cfg.dtype) for k in GRAD_KEYS}


def _forward_numpy(x, params, cfg, block_len, hops, state, return_state):
    B, L, _ = x.shape
    if state is None:
        state = SWRState.initial((B, cfg.heads, cfg.head_dim), block_len=block_len, hops=hops)
    out, v, C, S = reference.phalanx_reference(
        x, params, block_len=block_len, hops=hops, position=state.common_position(),
        w0=state.w if state.offset else None, g0=state.g if state.offset else None,
        carry=state.carry(), return_parts=True)
    z = np.asarray(x, np.float64) @ np.asarray(params["W_in"], np.float64)
    return out.astype(x.dtype), (state.advanced(L, v, C, S, np) if return_state else None), z


# ----------------------------------------------------------------------------------------------
# CuPy: GEMMs through cuBLAS, the fused kernels for hops 0/1, composition otherwise
# ----------------------------------------------------------------------------------------------


def _nk():
    from . import numba_kernels

    return numba_kernels


_GEMM_FALLBACK: set = set()


# A caller's GEMM for the CuPy path (see gemm_with); None: CuPy's cuBLAS.
_GEMM: contextvars.ContextVar = contextvars.ContextVar("swr_array_phalanx_gemm", default=None)


@contextlib.contextmanager
def gemm_with(matmul):
    """Within the block, the CuPy path's GEMMs call ``matmul(a, b)`` (2-D CuPy arrays in, a CuPy
    array out) instead of CuPy's cuBLAS. The torch adapter passes torch's matmul, so its GEMMs
    can be captured in a CUDA graph (CuPy refuses cuBLAS calls during stream capture) and use
    torch's cuBLAS handle and workspace."""
    token = _GEMM.set(matmul)
    try:
        yield
    finally:
        _GEMM.reset(token)


def _mm(a, b):
    """a @ b for 2-D CuPy arrays (cuBLAS; CuPy 14 sends 2-D float16/bfloat16 products to
    cublasGemmEx with float32 accumulation), or the GEMM set by :func:`gemm_with`. Should a CuPy
    build refuse a dtype, the product is done in float32 and rounded back, with a warning:
    correct, slower."""
    custom = _GEMM.get()
    if custom is not None:
        return custom(a, b)
    key = a.dtype.name
    if key == "float32":
        return a @ b
    if key not in _GEMM_FALLBACK:
        try:
            out = a @ b
            return out if out.dtype == a.dtype else out.astype(a.dtype)
        except Exception as exc:  # noqa: BLE001 - shapes are checked: this is the dtype
            import warnings

            _GEMM_FALLBACK.add(key)
            warnings.warn(f"CuPy cannot multiply {key} matrices ({exc}); using float32 GEMMs",
                          RuntimeWarning, stacklevel=3)
    return (a.astype(F32) @ b.astype(F32)).astype(a.dtype)


def _fused_forward_ok(cfg, block_len, hops):
    return hops in (0, 1) and block_len <= _nk().phalanx_fused.LMAX


def _forward_cupy(x, params, cfg, block_len, hops, state, return_state):
    import cupy as cp

    B, L, dim = x.shape
    M = B * L
    x2 = cp.ascontiguousarray(x).reshape(M, dim)
    # 2-D GEMMs only: CuPy 14 sends 2-D bf16/fp16 matmuls to cublasGemmEx (fp32 accumulate);
    # batched (>2-D) ones are slow for fp16 and fail for bf16.
    z = _mm(x2, params["W_in"])
    if L == 0 or B == 0:
        y = cp.empty((M, cfg.hd), cfg.dtype)
        new = state
        if new is None and return_state:
            new = SWRState.initial((B, cfg.heads, cfg.head_dim), block_len=block_len, hops=hops,
                                   xp=cp, dtype=F32)
    elif _fused_forward_ok(cfg, block_len, hops):
        y = cp.empty((M, cfg.hd), cfg.dtype)
        new = _fused_forward(z, params, cfg, B, L, y, block_len, hops, state, return_state)
    else:
        y, new = _composed_forward(z, params, cfg, B, L, block_len, hops, state, return_state)
    out = _mm(y, params["W_out"]).reshape(B, L, dim)
    return out, new, z.reshape(B, L, cfg.width)


def _fused_forward(z, params, cfg, B, L, y, block_len, hops, state, return_state):
    import cupy as cp

    shape = (B, cfg.heads, cfg.head_dim)
    kw = {}
    if state is not None:
        c = cp.ascontiguousarray
        offset = state.offset
        if offset:
            kw.update(offset=offset, w0=c(state.w, dtype=F32), g0=c(state.g, dtype=F32))
        if hops == 1:
            kw.update(carry_v=c(state.carry_v[..., 0], dtype=F32),
                      carry_C=c(state.carry_C[..., 0], dtype=F32))
    outs = None
    if return_state:
        outs = tuple(cp.empty(shape, F32) for _ in range(2 if hops == 0 else 4))
        if hops == 0:
            outs = outs + (outs[0], outs[1])  # unused by the kernel for hops=0
    _nk().phalanx_forward(
        z, params["b_a"], params["b_b"], params["b_c"], y, batch=B, length=L, heads=cfg.heads,
        head_dim=cfg.head_dim, kv_heads=cfg.kv_heads, decay_max=cfg.decay_max,
        block_len=block_len, hops=hops, state_out=outs, **kw)
    if not return_state:
        return None
    position = cp.full((B,), (0 if state is None else state.common_position()) + L, np.int64)
    if hops == 0:
        empty = cp.zeros(shape + (0,), F32)
        return SWRState(block_len=block_len, hops=hops, position=position, w=outs[0], g=outs[1],
                        carry_v=empty, carry_C=empty)
    return SWRState(block_len=block_len, hops=hops, position=position, w=outs[0], g=outs[1],
                    carry_v=outs[2][..., None], carry_C=outs[3][..., None])


def _gates_cupy(z, params, cfg, B, L):
    """float32 (sig_a, A, Bg, C, V): (B, L, H) and (B, L, H, D) from z (B*L, W)."""
    import cupy as cp

    zf = z.astype(F32).reshape(B, L, cfg.width)
    col = reference.phalanx_columns(cfg.heads, cfg.head_dim, cfg.kv_heads)

    def sec(name):
        lo, hi = col[name]
        return zf[..., lo:hi]

    def bias(k):
        return params[k].astype(F32)

    sig_a = 1.0 / (1.0 + cp.exp(-(sec("a") + bias("b_a"))))
    Bg = 1.0 / (1.0 + cp.exp(-(sec("b") + bias("b_b"))))
    C = sec("c") + bias("b_c")
    kv = (B, L, cfg.kv_heads, cfg.head_dim)
    Bg = cp.repeat(Bg.reshape(kv), cfg.group, axis=2)
    C = cp.repeat(C.reshape(kv), cfg.group, axis=2)
    V = cp.ascontiguousarray(sec("v")).reshape(B, L, cfg.heads, cfg.head_dim)
    return sig_a, F32(cfg.decay_max) * sig_a, Bg, C, V


def _composed_forward(z, params, cfg, B, L, block_len, hops, state, return_state, cu=None):
    from .ops import swr

    _, A, Bg, C, V = _gates_cupy(z, params, cfg, B, L)
    res = swr(A, Bg * V, block_len=block_len, hops=hops, layout="BLHD", state=state,
              return_state=return_state, cu_seqlens=cu)
    s, new = res if return_state else (res, None)
    y = (s * C + V).astype(cfg.dtype).reshape(B * L, cfg.hd)
    return y, new


def _vjp_cupy(x, params, dout, cfg, block_len, hops, z, cu=None, linear_layout=False):
    import cupy as cp

    B, L, dim = x.shape
    M = B * L
    x2 = cp.ascontiguousarray(x).reshape(M, dim)
    dout2 = cp.ascontiguousarray(dout, dtype=cfg.dtype).reshape(M, dim)
    z = _mm(x2, params["W_in"]) if z is None else cp.ascontiguousarray(z, cfg.dtype).reshape(M, -1)
    dy = _mm(dout2, params["W_out"].T)
    col = reference.phalanx_columns(cfg.heads, cfg.head_dim, cfg.kv_heads)
    cfg_b = None
    if hops in (0, 1) and cu is None:
        pf = _nk().phalanx_fused
        cfg_b = pf.backward_config(_kind(cfg.dtype), cfg.heads, cfg.head_dim, block_len,
                                   pf.aligned(z, dy))
    if M == 0:
        dz = cp.zeros((M, cfg.width), cfg.dtype)
        y = cp.zeros((M, cfg.hd), cfg.dtype)
        dbias = cp.zeros(cfg.width - cfg.hd, F32)
    elif cfg_b is not None:
        dz = cp.empty((M, cfg.width), cfg.dtype)
        y = cp.empty((M, cfg.hd), cfg.dtype)
        grouped = cfg.group > 1
        alloc = cp.zeros if grouped else cp.empty
        nrows = pf.bias_rows(_kind(cfg.dtype), B, L, cfg.heads, cfg.head_dim, block_len,
                             pf.aligned(z, dy, dz, y))
        parts = alloc((nrows, cfg.width - cfg.hd), F32)
        acc_b = cp.zeros((M, cfg.kd), F32) if grouped else None
        acc_c = cp.zeros((M, cfg.kd), F32) if grouped else None
        _nk().phalanx_backward(
            z, dy, params["b_a"], params["b_b"], params["b_c"], dz, y, parts, batch=B, length=L,
            heads=cfg.heads, head_dim=cfg.head_dim, kv_heads=cfg.kv_heads,
            decay_max=cfg.decay_max, block_len=block_len, hops=hops, acc_b=acc_b, acc_c=acc_c)
        if grouped:
            dz[:, col["b"][0]:col["b"][1]] = acc_b.astype(cfg.dtype)
            dz[:, col["c"][0]:col["c"][1]] = acc_c.astype(cfg.dtype)
        dbias = parts.sum(axis=0)
    else:
        dzf, yf = _composed_backward(z, dy, params, cfg, B, L, block_len, hops, cu)
        dbias = dzf[:, cfg.hd:].sum(axis=0)
        dz, y = dzf.astype(cfg.dtype), yf.astype(cfg.dtype)
    off = cfg.hd
    dbias = dbias.astype(cfg.dtype)  # one cast; the three biases are views of it
    dparams = {
        "W_in": _mm(dz.T, x2) if linear_layout else _mm(x2.T, dz),
        "b_a": dbias[col["a"][0] - off:col["a"][1] - off],
        "b_b": dbias[col["b"][0] - off:col["b"][1] - off],
        "b_c": dbias[col["c"][0] - off:col["c"][1] - off],
        "W_out": _mm(dout2.T, y) if linear_layout else _mm(y.T, dout2),
    }
    dx = _mm(dz, params["W_in"].T).reshape(B, L, dim)
    return dx, dparams


def _composed_backward(z, dy, params, cfg, B, L, block_len, hops, cu=None):
    """float32 dz (B*L, W) and Y (B*L, H*D) through swr / swr_vjp (any hops, any block_len)."""
    import cupy as cp

    from .ops import swr, swr_vjp

    sig_a, A, Bg, C, V = _gates_cupy(z, params, cfg, B, L)
    u = Bg * V
    s = swr(A, u, block_len=block_len, hops=hops, layout="BLHD", cu_seqlens=cu)
    dY = dy.astype(F32).reshape(B, L, cfg.heads, cfg.head_dim)
    da, du, _ = swr_vjp(A, u, dY * C, block_len=block_len, hops=hops, layout="BLHD",
                        cu_seqlens=cu)

    def to_kv(t):
        return t.reshape(B, L, cfg.kv_heads, cfg.group, cfg.head_dim).sum(axis=3).reshape(B * L, -1)

    dz = cp.concatenate([
        (dY + du * Bg).reshape(B * L, -1),
        to_kv(du * V * Bg * (1.0 - Bg)),
        to_kv(dY * s),
        (da * F32(cfg.decay_max) * sig_a * (1.0 - sig_a)).reshape(B * L, -1),
    ], axis=1)
    return dz, (s * C + V).reshape(B * L, cfg.hd)


def _kind(dtype):
    from .numba_kernels._dtypes import storage_kind

    return storage_kind(dtype)


def _step_cupy(x_t, params, cfg, state):
    """Input GEMM, one fused kernel (phalanx_step_mix), output GEMM; the state in place."""
    import cupy as cp

    with cp.cuda.Device(params["W_in"].device.id):
        z = _mm(cp.ascontiguousarray(x_t), params["W_in"])
        y = cp.empty((x_t.shape[0], cfg.hd), cfg.dtype)
        phalanx_step_mix(z, y, params["b_a"], params["b_b"], params["b_c"], state,
                         kv_heads=cfg.kv_heads, decay_max=cfg.decay_max)
        return _mm(y, params["W_out"])
