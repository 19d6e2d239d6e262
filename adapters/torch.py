"""PyTorch adapter: autograd-aware ``swr`` and the ``Phalanx`` layer as an ``nn.Module``.

Thin by design (STYLE.md): tensors go to the framework-agnostic front (:func:`swr_array.swr`,
:func:`swr_array.swr_vjp`) and come back, with no math here.

- CPU tensors run the NumPy float64 reference (zero-copy views; bfloat16 through ``ml_dtypes``).
- CUDA tensors go zero-copy through DLPack to CuPy and the Numba kernels, on torch's current stream
  and the tensor's device, so no synchronisation is added.

``swr`` is registered as the ``torch.library`` custom op ``swr_array::swr`` (with a fake
implementation and autograd through ``swr_array::swr_vjp``), so ``torch.compile(fullgraph=True)``
traces models that use it without graph breaks.

Layout: the torch adapter defaults to ``layout="BLHD"`` (what a projection produces,
``(B, L, H, D)``), unlike the array front whose default is ``"BHDL"``.

Gradients flow through the stateless call. Calls with ``state``/``return_state`` and
:func:`swr_step` are for prefill and decoding: run them under ``torch.no_grad()`` (they raise if a
gradient would be needed).
"""

import contextlib
import dataclasses
import functools
import importlib
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.dlpack import to_dlpack as _to_dlpack

from swr_array import _checks
from swr_array import ops as _front
from swr_array._backend import bfloat16 as _np_bfloat16
from swr_array.state import SWRState

__all__ = [
    "Phalanx",
    "SWRState",
    "swr",
    "swr_init_state",
    "swr_step",
]

# ----------------------------------------------------------------------------------------------
# dtypes and devices
# ----------------------------------------------------------------------------------------------

_NP_DTYPES = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: _np_bfloat16,
}
_CPU_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# "meta" tensors (shape inference, deferred init) dispatch to the fake implementations
_DEVICE_TYPES = ("cpu", "cuda", "meta")


def _allowed_dtypes(device: torch.device) -> tuple:
    return _CUDA_DTYPES if device.type == "cuda" else _CPU_DTYPES


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _np_dtype(dtype):
    return None if dtype is None else _NP_DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
# tensors <-> front arrays (NumPy on the CPU, CuPy on CUDA), on torch's current stream
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cupy():
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - any import failure means "no GPU backend"
        raise RuntimeError(
            "CUDA tensors need CuPy and numba-cuda: pip install 'swr-array[cuda13]' "
            f"(or [cuda12]); importing cupy failed with: {exc}"
        ) from exc
    return cupy


_STREAMS: dict = {}


def _raw_stream(index: int) -> int:
    """The ``cudaStream_t`` of torch's current stream on GPU ``index`` (no Stream object made)."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get is not None:
        return get(index)
    return torch.cuda.current_stream(index).cuda_stream


def _cupy_stream(device: torch.device):
    """A CuPy view of torch's current stream on ``device`` (cached by device and stream handle:
    no ``ExternalStream`` is built per call)."""
    index = device.index
    # autograd runs backward passes on its own thread per device, where the driver API (our
    # launches) may find no current context: cudaSetDevice makes the device's primary one current
    # (CuPy's Device context skips it when the runtime's device already matches)
    _cupy().cuda.runtime.setDevice(index)
    ptr = _raw_stream(index)
    key = (index, ptr)
    stream = _STREAMS.get(key)
    if stream is None:
        if len(_STREAMS) > 256:  # many short-lived user streams: start over
            _STREAMS.clear()
        stream = _STREAMS[key] = _cupy().cuda.ExternalStream(ptr, device_id=index)
    return stream


@contextlib.contextmanager
def _front_context(device: torch.device):
    """Make the tensor's GPU and torch's current stream CuPy's current ones (no-op on the CPU)."""
    if device.type != "cuda":
        yield
        return
    with _cupy().cuda.Device(device.index), _cupy_stream(device):
        yield


def _cuda_view(t: Tensor):
    """Zero-copy CuPy view of a CUDA tensor through a DLPack capsule.

    The capsule route skips the stream handshake of ``__dlpack__`` (``torch.cuda.current_stream``,
    ``default_stream``, an event when the streams differ): every kernel here runs on torch's
    current stream, which is where the tensor's producers ran, so there is nothing to order. The
    capsule keeps the tensor's storage alive as long as the CuPy array (``requires_grad`` does not
    matter to the capsule, so nothing is detached).
    """
    return _cupy().from_dlpack(_to_dlpack(t))


def _to_front(t: Tensor | None):
    """Zero-copy NumPy (CPU) or CuPy (CUDA) view of a tensor; call inside ``_front_context``."""
    if t is None:
        return None
    if t.device.type == "cuda":
        return _cuda_view(t)
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_np_bfloat16)
    return t.numpy()


def _from_front(x, device: torch.device) -> Tensor:
    """Tensor view of a front result; call inside ``_front_context``."""
    if device.type == "cuda":
        return torch.from_dlpack(x)
    x = np.asarray(x)
    if not (x.flags.c_contiguous and x.flags.writeable):
        x = np.ascontiguousarray(x).copy()
    if x.dtype == _np_bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


# ----------------------------------------------------------------------------------------------
# argument checks (torch terms; they also run while torch.compile traces)
# ----------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_device(name: str, t: Tensor | None, device: torch.device, ref: str = "u") -> None:
    if t is not None and t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but {ref} is on {device}: move them to one device"
        )


def _check_dtype(name: str, dtype, device: torch.device) -> None:
    allowed = _allowed_dtypes(device)
    if dtype not in allowed:
        where = "CUDA" if device.type == "cuda" else "the CPU"
        raise TypeError(
            f"{name} has dtype {dtype}; expected one of {_dtype_names(allowed)} on {where}"
        )


def _check_out_dtype(out_dtype, device: torch.device) -> None:
    if out_dtype is None:
        return
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype must be a torch.dtype or None, got {out_dtype!r}")
    _check_dtype("out_dtype", out_dtype, device)


def _autocast(*tensors: Tensor | None) -> list:
    """Under ``torch.autocast``, floating tensors run in the autocast dtype (float64 stays).

    The recurrence is memory-bound and accumulates in float32 (float64 on the CPU reference), so
    it behaves like autocast's lower-precision ops: inputs in the autocast dtype, output in that
    dtype unless ``out_dtype`` says otherwise; gradients reach the original dtypes through the cast.
    """
    ref = next(t for t in tensors if t is not None)
    dev = ref.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return list(tensors)
    dt = torch.get_autocast_dtype(dev)
    return [
        t.to(dt) if t is not None and t.dtype in _CUDA_DTYPES and t.dtype != dt else t
        for t in tensors
    ]


def _check_swr(a, u, x0, *, block_len, hops, layout, out_dtype):
    """Validate an SWR call; returns (block_len, hops, layout, per_head)."""
    layout = _checks.check_layout(layout)
    block_len = _checks.check_block_len(block_len)
    hops = _checks.check_hops(hops)
    device = u.device
    if device.type not in _DEVICE_TYPES:
        raise ValueError(f"u is on {device}; swr runs on CPU and CUDA tensors")
    _check_device("a", a, device)
    _check_device("x0", x0, device)
    _check_dtype("u", u.dtype, device)
    _check_dtype("a", a.dtype, device)
    if a.dtype != u.dtype:
        raise TypeError(f"a and u must share one dtype, got {a.dtype} and {u.dtype}")
    if u.dim() != 4:
        dims = "(B, H, D, L)" if layout == "BHDL" else "(B, L, H, D)"
        raise ValueError(f"u must be 4-D {dims} for layout {layout!r}, got shape {tuple(u.shape)}")
    if layout == "BHDL":
        B, H, D, N = u.shape
        per_head_shape = (B, H, N)
    else:
        B, N, H, D = u.shape
        per_head_shape = (B, N, H)
    channel_shape = tuple(u.shape)
    if tuple(a.shape) == per_head_shape:
        per_head = True
    elif tuple(a.shape) == channel_shape:
        per_head = False
    else:
        raise ValueError(
            f"a must have shape {per_head_shape} (per head) or {channel_shape} (per channel) "
            f"for u of shape {channel_shape} in layout {layout!r}, got {tuple(a.shape)}"
        )
    if x0 is not None:
        if tuple(x0.shape) != (B, H, D):
            raise ValueError(f"x0 must have shape (B, H, D) = {(B, H, D)}, got {tuple(x0.shape)}")
        _check_dtype("x0", x0.dtype, device)
    _check_out_dtype(out_dtype, device)
    return block_len, hops, layout, per_head


def _forbid_grad(what: str, *tensors: Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{what} is not differentiable (the gradient of a continued sequence is not "
            "implemented): run prefill and decoding under torch.no_grad() or "
            "torch.inference_mode(), or call swr without state/return_state to train"
        )


# ----------------------------------------------------------------------------------------------
# custom ops: swr_array::swr and swr_array::swr_vjp
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("swr_array::swr", mutates_args=())
def _swr_op(
    a: Tensor,
    u: Tensor,
    x0: Tensor | None,
    block_len: int,
    hops: int | None,
    layout: str,
    out_dtype: torch.dtype | None,
) -> Tensor:
    if u.device.type == "cuda":
        return _swr_cuda(a, u, x0, block_len, hops, layout, out_dtype)
    with _front_context(u.device):
        y = _front.swr(
            _to_front(a),
            _to_front(u),
            block_len=block_len,
            hops=hops,
            layout=layout,
            x0=_to_front(x0),
            out_dtype=_np_dtype(out_dtype),
        )
        return _from_front(y, u.device)


def _swr_cuda(a, u, x0, block_len, hops, layout, out_dtype) -> Tensor:
    """The forward on CUDA: y comes from torch's allocator (on torch's current stream) and the
    front writes into a CuPy view of it (``out=``); nothing is copied or converted afterwards."""
    device = u.device
    y = torch.empty(u.shape, dtype=u.dtype if out_dtype is None else out_dtype, device=device)
    cupy = _cupy()
    with cupy.cuda.Device(device.index), _cupy_stream(device):
        yc = _cuda_view(y)
        _front.swr(
            _cuda_view(a),
            _cuda_view(u),
            block_len=block_len,
            hops=hops,
            layout=layout,
            x0=None if x0 is None else _cuda_view(x0),
            # y's own (CuPy) dtype, so the front's check of out= compares like with like
            out_dtype=None if out_dtype is None or out_dtype == u.dtype else yc.dtype,
            out=yc,
        )
    return y


@_swr_op.register_fake
def _swr_fake(a, u, x0, block_len, hops, layout, out_dtype):
    return u.new_empty(u.shape, dtype=out_dtype or u.dtype)


@torch.library.custom_op("swr_array::swr_vjp", mutates_args=())
def _swr_vjp_op(
    a: Tensor,
    u: Tensor,
    dy: Tensor,
    x0: Tensor | None,
    block_len: int,
    hops: int | None,
    layout: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(da, du, dx0); dx0 is an empty tensor when x0 is None (custom ops return no None)."""
    if u.device.type == "cuda":
        return _swr_vjp_cuda(a, u, dy, x0, block_len, hops, layout)
    with _front_context(u.device):
        da, du, dx0 = _front.swr_vjp(
            _to_front(a),
            _to_front(u),
            _to_front(dy),
            block_len=block_len,
            hops=hops,
            layout=layout,
            x0=_to_front(x0),
        )
        da = _from_front(da, u.device).to(a.dtype)
        du = _from_front(du, u.device).to(u.dtype)
        if x0 is None:
            return da, du, u.new_empty(0)
        return da, du, _from_front(dx0, u.device).to(x0.dtype)


def _swr_vjp_cuda(a, u, dy, x0, block_len, hops, layout):
    """The backward on CUDA: one ``swr_vjp`` call writing into torch-allocated gradients
    (``out=``); only dx0 ((B, H, D), float32 from the front) may need a cast to x0's dtype."""
    device = u.device
    da = torch.empty(a.shape, dtype=a.dtype, device=device)
    du = torch.empty(u.shape, dtype=u.dtype, device=device)
    dx0 = None if x0 is None else torch.empty(x0.shape, dtype=torch.float32, device=device)
    cupy = _cupy()
    with cupy.cuda.Device(device.index), _cupy_stream(device):
        _front.swr_vjp(
            _cuda_view(a),
            _cuda_view(u),
            _cuda_view(dy),
            block_len=block_len,
            hops=hops,
            layout=layout,
            x0=None if x0 is None else _cuda_view(x0),
            out=(_cuda_view(da), _cuda_view(du), None if dx0 is None else _cuda_view(dx0)),
        )
    if x0 is None:
        return da, du, u.new_empty(0)
    return da, du, dx0.to(x0.dtype)


@_swr_vjp_op.register_fake
def _swr_vjp_fake(a, u, dy, x0, block_len, hops, layout):
    dx0 = u.new_empty(0) if x0 is None else x0.new_empty(x0.shape)
    return a.new_empty(a.shape), u.new_empty(u.shape), dx0


def _swr_setup_context(ctx, inputs, output):
    a, u, x0, block_len, hops, layout, _ = inputs
    ctx.save_for_backward(a, u, x0)
    ctx.config = (block_len, hops, layout)


def _swr_backward(ctx, dy):
    a, u, x0 = ctx.saved_tensors
    # a gradient may arrive expanded (stride 0, e.g. from a sum): hand the front plain memory
    da, du, dx0 = _swr_vjp_op(a, u, dy.contiguous(), x0, *ctx.config)
    return da, du, (dx0 if x0 is not None else None), None, None, None, None


_swr_op.register_autograd(_swr_backward, setup_context=_swr_setup_context)


# ----------------------------------------------------------------------------------------------
# public functional API
# ----------------------------------------------------------------------------------------------


def swr(
    a: Tensor,
    u: Tensor,
    *,
    block_len: int = 16,
    hops: int | None = 1,
    layout: str = "BLHD",
    x0: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    state: SWRState | None = None,
    return_state: bool = False,
    cu_seqlens: Tensor | None = None,
):
    """Sliding window recurrence ``y = L_hops(a) u`` on torch tensors (SPEC section 1).

    Args:
        a: coefficients, per head ``(B, L, H)`` / ``(B, H, L)`` or per channel (u's shape).
        u: inputs ``(B, L, H, D)`` for ``layout="BLHD"`` (default) or ``(B, H, D, L)`` for
            ``"BHDL"``. float32, float16, bfloat16 (and float64 on the CPU); a shares u's dtype.
        block_len: block length l, a power of two (1..256 on the CPU; 8..64 at least on CUDA).
        hops: carrier hops k (0: block diagonal, 1: SWR/Phalanx default, None: exact recurrence).
        layout: ``"BLHD"`` or ``"BHDL"``.
        x0: initial carry ``(B, H, D)`` (default 0); differentiable.
        out_dtype: dtype of y (default: the input dtype, or the autocast dtype under autocast).
        state: an :class:`SWRState` from an earlier ``return_state=True`` call to continue from
            (not differentiable).
        return_state: also return the state after the last token (not differentiable).
        cu_seqlens: packed sequences (B == 1): int32/int64 ``[0, n_1, ..., T]`` on u's device;
            each sequence runs alone, x0 is ``(S, H, D)``; never synchronises with the host
            (see docs/guide_torch.md, packing documents).

    Returns:
        y with u's shape, or ``(y, state)`` with ``return_state``. Differentiable in a, u and x0
        (per-head ``a`` gets the sum over its channels) unless a state is involved.
    """
    _check_tensor("a", a)
    _check_tensor("u", u)
    _check_tensor("x0", x0, optional=True)
    a, u = _autocast(a, u)
    if cu_seqlens is not None:
        from . import _torch_packed

        if state is not None:
            raise ValueError("state cannot be combined with cu_seqlens: give each sequence its "
                             "initial carry with x0 of shape (S, H, D)")
        if _checks.check_bool("return_state", return_state):
            _forbid_grad("swr with return_state", a, u, x0)
            return _torch_packed.swr_packed_state(
                _front_context, _to_front, _from_front, a, u, cu_seqlens, block_len=block_len,
                hops=hops, layout=layout, x0=x0, out_dtype=out_dtype, np_dtype=_np_dtype)
        return _torch_packed.swr_packed(
            swr, a, u, cu_seqlens, block_len=block_len, hops=hops, layout=layout, x0=x0,
            out_dtype=out_dtype, check_swr=_check_swr)
    block_len, hops, layout, _ = _check_swr(
        a, u, x0, block_len=block_len, hops=hops, layout=layout, out_dtype=out_dtype
    )
    return_state = _checks.check_bool("return_state", return_state)
    if state is not None or return_state:
        if state is not None and x0 is not None:
            raise ValueError("pass either x0 or state, not both: a state already holds its carry")
        return _swr_stateful(a, u, x0, block_len, hops, layout, out_dtype, state, return_state)
    if x0 is None and u.device.type == "cuda":
        launch = _eager_launcher(a, u, block_len, hops, layout, out_dtype)
        if launch is not None:
            if torch.is_grad_enabled() and (a.requires_grad or u.requires_grad):
                return _EagerSWR.apply(a, u, launch)
            return launch.forward(a, u)
    return _swr_op(a, u, x0, block_len, hops, layout, out_dtype)


# ----------------------------------------------------------------------------------------------
# the eager CUDA fast path
#
# Outside torch.compile, tracing, torch.func transforms and dispatch modes, a plain CUDA call
# (contiguous tensors on the current device, no x0) skips the custom op's dispatch and the DLPack
# views: the checks of its first call through the custom op are remembered per shape/dtype/
# options, and later calls hand the tensors' data pointers and torch's current stream straight to
# the kernels' cached launch plans (swr_array.numba_kernels). Same kernels, same numbers; the
# custom op stays what torch.compile sees.
# ----------------------------------------------------------------------------------------------


class _Ptr:
    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


class _Raw:
    """What the kernels' launchers read of an array: shape, dtype, size, data pointer."""

    __slots__ = ("shape", "dtype", "size", "data")

    def __init__(self, t: Tensor, dtype):
        self.shape = tuple(t.shape)
        self.dtype = dtype
        self.size = t.numel()
        self.data = _Ptr(t.data_ptr())

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False),
                "strides": None, "version": 3}  # fmt: skip


class _Launcher:
    """A checked plain call's configuration: runs its forward and backward on raw pointers."""

    __slots__ = ("p", "np_in", "np_out", "y_dtype", "zeros", "ones", "index")

    def __init__(self, p, u_dtype, y_dtype, index):
        from swr_array import _cuda

        self.p = p
        self.np_in = _NP_DTYPES[u_dtype]
        self.np_out = _NP_DTYPES[y_dtype]
        self.y_dtype = y_dtype
        self.index = index
        with _cupy().cuda.Device(index):
            self.zeros, self.ones = _cuda._plain_zeros(_cupy(), p)

    def forward(self, a: Tensor, u: Tensor) -> Tensor:
        from swr_array import numba_kernels as nk

        p = self.p
        y = torch.empty(u.shape, dtype=self.y_dtype, device=u.device)
        _cupy().cuda.runtime.setDevice(self.index)  # a current context on this thread (see below)
        nk.swr_forward(_Raw(a, self.np_in), _Raw(u, self.np_in), _Raw(y, self.np_out),
                       layout=p.layout, block_len=p.block_len, hops=p.hops, offset=0,
                       w0=self.zeros, g0=self.ones, carry=self.zeros,
                       stream=_raw_stream(self.index))  # fmt: skip
        return y

    def backward(self, a: Tensor, u: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
        from swr_array import numba_kernels as nk

        p = self.p
        dy = dy.contiguous()
        kd = _NP_DTYPES.get(dy.dtype)
        if kd is None or kd == np.dtype(np.float64) or dy.device != u.device:
            # not what autograd hands back for this op; let the custom op check and run it
            return _swr_vjp_op(a, u, dy, None, p.block_len, p.hops, p.layout)[:2]
        da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
        du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        # autograd may run this on its own thread for the device, where the driver API (the
        # launch) finds no current context until the runtime makes the device's one current
        _cupy().cuda.runtime.setDevice(self.index)
        nk.swr_backward(_Raw(a, self.np_in), _Raw(u, self.np_in), _Raw(dy, kd),
                        _Raw(du, self.np_in), _Raw(da, self.np_in), layout=p.layout,
                        block_len=p.block_len, hops=p.hops, carry=self.zeros, dcarry=None,
                        stream=_raw_stream(self.index))  # fmt: skip
        return da, du


class _EagerSWR(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, u, launch):
        ctx.save_for_backward(a, u)
        ctx.launch = launch
        return launch.forward(a, u)

    @staticmethod
    def backward(ctx, dy):
        a, u = ctx.saved_tensors
        da, du = ctx.launch.backward(a, u, dy)
        return da, du, None


def _modes_active() -> bool:
    """A dispatch mode or a torch.func transform is active (or torch cannot tell us)."""
    try:
        return bool(torch._C._len_torch_dispatch_stack()) or (
            torch._C._functorch.peek_interpreter_stack() is not None
        )
    except AttributeError:  # private hooks of another torch version: always the custom op
        return True


_LAUNCHERS: dict = {}
_PLAIN_TENSORS = (Tensor, nn.Parameter)


def _eager_launcher(a, u, block_len, hops, layout, out_dtype):
    """The cached :class:`_Launcher` of a plain eager CUDA call, or None (use the custom op)."""
    if (
        type(u) not in _PLAIN_TENSORS
        or type(a) not in _PLAIN_TENSORS
        or torch.compiler.is_compiling()
        or _modes_active()
        or hops not in (0, 1)
        or not (u.is_contiguous() and a.is_contiguous())
    ):
        return None
    index = u.device.index
    key = (index, tuple(a.shape), tuple(u.shape), a.dtype, u.dtype, a.device, block_len, hops,
           layout, out_dtype)  # fmt: skip
    launch = _LAUNCHERS.get(key)
    if launch is None:
        if 0 in u.shape or len(_LAUNCHERS) > 256:
            return None
        # the first call of a configuration: the front's full checks, then remember them
        cupy = _cupy()
        with cupy.cuda.Device(index):
            p = _checks.check_swr(_cuda_view(a), _cuda_view(u), block_len=block_len, hops=hops,
                                  layout=layout, out_dtype=_np_dtype(out_dtype))  # fmt: skip
        launch = _LAUNCHERS[key] = _Launcher(p, u.dtype, out_dtype or u.dtype, index)
    if _cupy().cuda.runtime.getDevice() != index:
        return None
    return launch


@torch.compiler.disable
def _swr_stateful(a, u, x0, block_len, hops, layout, out_dtype, state, return_state):
    _forbid_grad("swr with state or return_state", a, u, x0)
    if u.device.type == "meta":
        raise ValueError("state and return_state need CPU or CUDA tensors, not meta tensors")
    with _front_context(u.device):
        res = _front.swr(
            _to_front(a),
            _to_front(u),
            block_len=block_len,
            hops=hops,
            layout=layout,
            x0=_to_front(x0),
            state=state,
            return_state=return_state,
            out_dtype=_np_dtype(out_dtype),
        )
        if return_state:
            y, new_state = res
            return _from_front(y, u.device), new_state
        return _from_front(res, u.device)


@torch.compiler.disable
def swr_step(
    a_t: Tensor, u_t: Tensor, state: SWRState, *, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, SWRState]:
    """One decoding step: ``(y_t, next_state)``, equal to :func:`swr` at that position.

    Args:
        a_t: ``(B, H)`` per head or ``(B, H, D)`` per channel.
        u_t: ``(B, H, D)``, same dtype and device as ``a_t``.
        state: the state after the previous token (from :func:`swr_init_state` or a prefill with
            ``return_state=True``) on the same device.
    """
    _check_tensor("a_t", a_t)
    _check_tensor("u_t", u_t)
    a_t, u_t = _autocast(a_t, u_t)
    if u_t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"u_t is on {u_t.device}; swr_step runs on CPU and CUDA tensors")
    _check_device("a_t", a_t, u_t.device, ref="u_t")
    _check_dtype("u_t", u_t.dtype, u_t.device)
    if a_t.dtype != u_t.dtype:
        raise TypeError(f"a_t and u_t must share one dtype, got {a_t.dtype} and {u_t.dtype}")
    _check_out_dtype(out_dtype, u_t.device)
    if not isinstance(state, SWRState):
        raise TypeError(f"state must be an SWRState, got {type(state).__name__}")
    _forbid_grad("swr_step", a_t, u_t)
    with _front_context(u_t.device):
        y, new_state = _front.swr_step(
            _to_front(a_t), _to_front(u_t), state, out_dtype=_np_dtype(out_dtype)
        )
        return _from_front(y, u_t.device), new_state


def swr_init_state(
    shape: Sequence[int],
    *,
    block_len: int = 16,
    hops: int | None = 1,
    x0: Tensor | None = None,
    device: torch.device | str | None = None,
) -> SWRState:
    """The state before the first token, for decoding from scratch with :func:`swr_step`.

    ``shape`` is ``(B, H, D)``. The state lives with the front: NumPy float64 for CPU tensors,
    CuPy float32 on the GPU of ``device`` (default: x0's device, else the CPU).
    """
    _check_tensor("x0", x0, optional=True)
    if device is None:
        device = x0.device if x0 is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    _check_device("x0", x0, device, ref="device")
    with _front_context(device):
        like = None if device.type == "cpu" else _cupy().empty(0, dtype=np.float32)
        return _front.swr_init_state(
            tuple(shape), block_len=block_len, hops=hops, x0=_to_front(x0), like=like
        )


# ----------------------------------------------------------------------------------------------
# Phalanx: the generic composition (torch GEMMs + the swr op)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PhalanxConfig:
    dim: int
    heads: int
    head_dim: int
    kv_heads: int
    decay_max: float
    block_len: int
    hops: int | None

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """Columns of the fused input projection, in the front's order ``V | Bg | C | A``."""
        kv = self.kv_heads * self.head_dim
        return self.heads * self.head_dim, kv, kv, self.heads


def _gates(z: Tensor, cfg: _PhalanxConfig):
    """Split the fused projection ``z (..., V|Bg|C|A)`` into ``(A, U, c5, v5)``.

    ``c5``/``v5`` have shape ``(..., kv_heads, group, head_dim)`` (c5 broadcast over the group):
    head h reads kv head ``h // group``, spear's KVRepeat order. Nothing is materialised per head.
    """
    lead = z.shape[:-1]
    kv, hd = cfg.kv_heads, cfg.head_dim
    group = cfg.heads // kv
    v, b_logit, c, a_logit = z.split(cfg.sizes, dim=-1)
    A = torch.sigmoid(a_logit)
    if cfg.decay_max != 1.0:
        A = A * cfg.decay_max
    v5 = v.view(*lead, kv, group, hd)
    U = (torch.sigmoid(b_logit).view(*lead, kv, 1, hd) * v5).view(*lead, cfg.heads, hd)
    return A, U, c.view(*lead, kv, 1, hd), v5


def _readout(y: Tensor, c5: Tensor, v5: Tensor, w_out: Tensor) -> Tensor:
    lead = v5.shape[:-3]
    Y = y.view(v5.shape) * c5 + v5
    return F.linear(Y.reshape(*lead, -1), w_out)


def _input_bias(b_in: Tensor, cfg: _PhalanxConfig) -> Tensor:
    return F.pad(b_in, (cfg.heads * cfg.head_dim, 0))  # V has no bias


def _phalanx_generic(x, w_in, b_in, w_out, cfg: _PhalanxConfig, state=None, return_state=False,
                     cu_seqlens=None):
    z = F.linear(x, w_in, _input_bias(b_in, cfg))
    A, U, c5, v5 = _gates(z, cfg)
    res = swr(
        A,
        U,
        block_len=cfg.block_len,
        hops=cfg.hops,
        layout="BLHD",
        state=state,
        return_state=return_state,
        cu_seqlens=cu_seqlens,
    )
    y, new_state = res if return_state else (res, None)
    out = _readout(y, c5, v5, w_out)
    return (out, new_state) if return_state else out


# ----------------------------------------------------------------------------------------------
# Phalanx: the fused front path (swr_array.phalanx / phalanx_vjp) when the front provides it
# ----------------------------------------------------------------------------------------------

# Device types on which Phalanx takes the fused front path when it is available. Tests add "cpu"
# to exercise the plumbing against a stand-in front.
_FAST_PATH_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
_FRONT_PHALANX_MODULE = "swr_array.phalanx"


def _front_params(w_in, b_in, w_out, cfg: _PhalanxConfig) -> dict:
    """The front's Phalanx ``params`` (see ``swr_array.reference.phalanx_reference``) as views of
    the module's parameters given as front arrays: ``W_in (dim, W)`` with columns V|Bg|C|A,
    ``b_a``, ``b_b``, ``b_c``, ``W_out (H*D, dim)`` and ``decay_max``."""
    kv = cfg.kv_heads * cfg.head_dim
    return {
        "W_in": w_in.T,
        "b_a": b_in[2 * kv :],
        "b_b": b_in[:kv],
        "b_c": b_in[kv : 2 * kv],
        "W_out": w_out.T,
        "decay_max": cfg.decay_max,
    }


def _module_grads(dparams: dict, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The front's ``dparams`` -> (d in_proj_weight, d in_proj_bias, d out_proj_weight)."""

    def get(key):
        return _from_front(dparams[key], device)

    db_in = torch.cat([get("b_b"), get("b_c"), get("b_a")])
    return get("W_in").T.contiguous(), db_in, get("W_out").T.contiguous()


def _probe(mod) -> None:
    """Check, on a small float64 problem on the CPU, that the front's phalanx and phalanx_vjp
    (with residuals, as the custom ops call them) compute what the torch composition computes:
    the output and every gradient."""
    cfg = _PhalanxConfig(
        dim=6, heads=2, head_dim=3, kv_heads=1, decay_max=0.75, block_len=2, hops=1
    )
    gen = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64, device="cpu", generator=gen)
    w_in = (0.5 * torch.randn(sum(cfg.sizes), cfg.dim, **f64)).requires_grad_()
    b_in = (0.5 * torch.randn(sum(cfg.sizes[1:]), **f64)).requires_grad_()
    w_out = (0.5 * torch.randn(cfg.dim, cfg.heads * cfg.head_dim, **f64)).requires_grad_()
    x = torch.randn(2, 7, cfg.dim, **f64).requires_grad_()
    dout = torch.randn(2, 7, cfg.dim, **f64)
    ref = _phalanx_generic(x, w_in, b_in, w_out, cfg)
    ref_grads = torch.autograd.grad(ref, (x, w_in, b_in, w_out), dout)
    out, dx, dw_in, db_in, dw_out = _fused_calls(mod, x, w_in, b_in, w_out, dout, cfg)
    got = {
        "out": out,
        "dx": dx,
        "d in_proj_weight": dw_in,
        "d in_proj_bias": db_in,
        "d out_proj_weight": dw_out,
    }
    for (name, t), r in zip(got.items(), (ref.detach(), *ref_grads)):
        if tuple(t.shape) != tuple(r.shape) or not torch.allclose(t, r, rtol=1e-9, atol=1e-9):
            raise LookupError(f"{name} differs from the torch composition")


def _fused_forward(mod, x, w_in, b_in, w_out, cfg) -> tuple[Tensor, Tensor]:
    """``(out, z)`` from the front's phalanx; z = x W_in is kept for the backward."""
    with _front_context(x.device):
        params = _front_params(_to_front(w_in), _to_front(b_in), _to_front(w_out), cfg)
        out, residuals = mod.phalanx(
            _to_front(x), params, block_len=cfg.block_len, hops=cfg.hops, return_residuals=True
        )
        out = _from_front(out, x.device).to(x.dtype)
        return out, _from_front(residuals["z"], x.device).to(x.dtype)


def _fused_backward(mod, x, w_in, b_in, w_out, dout, z, cfg) -> tuple[Tensor, ...]:
    """``(dx, d in_proj_weight, d in_proj_bias, d out_proj_weight)`` from the front."""
    with _front_context(x.device):
        params = _front_params(_to_front(w_in), _to_front(b_in), _to_front(w_out), cfg)
        dx, dparams = mod.phalanx_vjp(
            _to_front(x),
            params,
            _to_front(dout),
            block_len=cfg.block_len,
            hops=cfg.hops,
            residuals={"z": _to_front(z)},
        )
        dw_in, db_in, dw_out = _module_grads(dparams, x.device)
        return (
            _from_front(dx, x.device).to(x.dtype),
            dw_in.to(w_in.dtype),
            db_in.to(b_in.dtype),
            dw_out.to(w_out.dtype),
        )


def _fused_calls(mod, x, w_in, b_in, w_out, dout, cfg):
    out, z = _fused_forward(mod, x, w_in, b_in, w_out, cfg)
    return (out, *_fused_backward(mod, x, w_in, b_in, w_out, dout, z, cfg))


@functools.lru_cache(maxsize=1)
def _front_phalanx():
    """``(module, reason)``: the front's fused Phalanx API when it exists and agrees with the
    torch composition, else ``(None, why not)``. Checked once per process."""
    try:
        mod = importlib.import_module(_FRONT_PHALANX_MODULE)
    except Exception as exc:  # noqa: BLE001 - not there, or its GPU stack fails to import
        return None, f"{_FRONT_PHALANX_MODULE} is not importable ({exc})"
    missing = [n for n in ("phalanx", "phalanx_vjp") if not callable(getattr(mod, n, None))]
    if missing:
        return None, f"{_FRONT_PHALANX_MODULE} has no {', '.join(missing)}"
    try:
        # independent of the caller's grad mode, autocast and default device
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast("cpu", enabled=False),
        ):
            _probe(mod)
    except Exception as exc:  # noqa: BLE001 - any disagreement disables the fast path
        return None, f"{_FRONT_PHALANX_MODULE} does not match the torch layer: {exc}"
    return mod, "available"


def _fast_path_possible() -> bool:
    return any(
        d == "cpu" or (d == "cuda" and torch.cuda.is_available()) for d in _FAST_PATH_DEVICE_TYPES
    )


def _fused_api():
    mod, reason = _front_phalanx()
    if mod is None:
        raise RuntimeError(f"the fused Phalanx path is unavailable: {reason}")
    return mod


@torch.library.custom_op("swr_array::phalanx", mutates_args=())
def _phalanx_op(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor,
    w_out: Tensor,
    heads: int,
    head_dim: int,
    kv_heads: int,
    decay_max: float,
    block_len: int,
    hops: int | None,
) -> tuple[Tensor, Tensor]:
    """``(out, z)``: the layer's output and the input projection ``z = x W_in`` (B, L, W), a
    residual for the backward (not differentiable)."""
    cfg = _PhalanxConfig(x.shape[-1], heads, head_dim, kv_heads, decay_max, block_len, hops)
    return _fused_forward(_fused_api(), x, w_in, b_in, w_out, cfg)


@_phalanx_op.register_fake
def _phalanx_fake(x, w_in, b_in, w_out, heads, head_dim, kv_heads, decay_max, block_len, hops):
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], w_in.shape[0]))


@torch.library.custom_op("swr_array::phalanx_vjp", mutates_args=())
def _phalanx_vjp_op(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor,
    w_out: Tensor,
    dout: Tensor,
    z: Tensor,
    heads: int,
    head_dim: int,
    kv_heads: int,
    decay_max: float,
    block_len: int,
    hops: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = _PhalanxConfig(x.shape[-1], heads, head_dim, kv_heads, decay_max, block_len, hops)
    return _fused_backward(_fused_api(), x, w_in, b_in, w_out, dout, z, cfg)


@_phalanx_vjp_op.register_fake
def _phalanx_vjp_fake(x, w_in, b_in, w_out, dout, z, *config):
    return (
        x.new_empty(x.shape),
        w_in.new_empty(w_in.shape),
        b_in.new_empty(b_in.shape),
        w_out.new_empty(w_out.shape),
    )


def _phalanx_setup_context(ctx, inputs, output):
    x, w_in, b_in, w_out, *config = inputs
    _, z = output
    ctx.save_for_backward(x, w_in, b_in, w_out, z)
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)
    ctx.config = tuple(config)


def _phalanx_backward(ctx, dout, _dz):
    x, w_in, b_in, w_out, z = ctx.saved_tensors
    if dout is None:
        return (None,) * 10
    grads = _phalanx_vjp_op(x, w_in, b_in, w_out, dout.contiguous(), z, *ctx.config)
    return (*grads, None, None, None, None, None, None)


_phalanx_op.register_autograd(_phalanx_backward, setup_context=_phalanx_setup_context)


# ----------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------


def _positive_int(name, x) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return int(x)


# spear's Phalanx: SigmoidA under ``param.`` (proj_a/b/c with bias, proj_v without), proj_out
_SPEAR_KEYS = {
    "proj_a.weight": "param.proj_a.weight",
    "proj_a.bias": "param.proj_a.bias",
    "proj_b.weight": "param.proj_b.weight",
    "proj_b.bias": "param.proj_b.bias",
    "proj_c.weight": "param.proj_c.weight",
    "proj_c.bias": "param.proj_c.bias",
    "proj_v.weight": "param.proj_v.weight",
    "proj_out.weight": "proj_out.weight",
}


class Phalanx(nn.Module):
    """The Phalanx mixer (SPEC section 5): a gated sliding window recurrence between two GEMMs.

    ``x (B, L, dim) -> out (B, L, dim)``::

        V  = x W_v                                   (B, L, H, head_dim)
        Bg = sigmoid(x W_b + b_b)                    (B, L, kv_heads, head_dim), shared by groups
        C  = x W_c + b_c                             (B, L, kv_heads, head_dim), shared by groups
        A  = decay_max * sigmoid(x W_a + b_a)        (B, L, H)
        out = (swr(A, Bg * V, hops) * C + V) W_out

    Each output sees between ``hops * block_len + 1`` and ``(hops + 1) * block_len`` tokens
    (itself included), so the layer stands in for a causal sliding-window attention block with a
    window of about ``(hops + 1/2) * block_len``; it needs no mask and no positional encoding, and
    its decoding cache has a fixed size whatever the sequence length (see :meth:`step`).

    Args:
        dim: model width.
        heads: number of heads H (default ``dim // head_dim``).
        length: accepted for drop-in compatibility with spear's ``Phalanx``; unused (any sequence
            length works and nothing is padded).
        dtype, device: of the parameters (default: torch's default dtype, the CPU).
        block_size: spear's name for ``block_len``.
        kv_heads: heads of the Bg and C gates, each shared by ``heads // kv_heads`` heads
            (default: ``heads``).
        hops: carrier hops (spear's ``k`` is ``hops + 1``; None: the exact recurrence).
        decay_max: upper bound of the decay A (spear: 1.0).
        head_dim: channels per head (default 16, or ``dim // heads`` when heads is given).
        block_len: block length of the recurrence (default 16).
        fast_path: on CUDA, run the fused ``swr_array.phalanx`` kernels when the front provides
            them (checked once per process against this module's composition; see
            :attr:`fast_path_status`). The CPU always runs the composition.

    Parameters (nn.Linear's orientation and initialisation, the front's column order):
    ``in_proj_weight (H*head_dim + 2*kv_heads*head_dim + H, dim)``, rows ``V | Bg | C | A``;
    ``in_proj_bias (2*kv_heads*head_dim + H,)``, the biases of ``Bg | C | A``;
    ``out_proj_weight (dim, H*head_dim)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int | None = None,
        length: int | None = None,
        dtype: torch.dtype | None = None,
        block_size: int | None = None,
        kv_heads: int | None = None,
        *,
        hops: int | None = 1,
        decay_max: float = 1.0,
        head_dim: int | None = None,
        block_len: int | None = None,
        device: torch.device | str | None = None,
        fast_path: bool = True,
    ):
        super().__init__()
        dim = _positive_int("dim", dim)
        if heads is None:
            head_dim = 16 if head_dim is None else _positive_int("head_dim", head_dim)
            if dim % head_dim:
                raise ValueError(f"dim ({dim}) must be divisible by head_dim ({head_dim})")
            heads = dim // head_dim
        else:
            heads = _positive_int("heads", heads)
            if head_dim is None:
                if dim % heads:
                    raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
                head_dim = dim // heads
            head_dim = _positive_int("head_dim", head_dim)
            if heads * head_dim != dim:
                raise ValueError(
                    f"heads * head_dim must equal dim, got {heads} * {head_dim} != {dim}"
                )
        kv_heads = heads if kv_heads is None else _positive_int("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
        if length is not None:
            _positive_int("length", length)
        if block_size is not None and block_len is not None and block_size != block_len:
            raise ValueError(
                f"block_size ({block_size}) and block_len ({block_len}) name the same setting"
            )
        block_len = _checks.check_block_len(
            block_len if block_len is not None else (16 if block_size is None else block_size)
        )
        hops = _checks.check_hops(hops)
        if isinstance(decay_max, bool) or not isinstance(decay_max, numbers.Real):
            raise TypeError(f"decay_max must be a real number, got {type(decay_max).__name__}")
        if not (math.isfinite(decay_max) and decay_max > 0):
            raise ValueError(f"decay_max must be finite and > 0, got {decay_max}")
        self.config = _PhalanxConfig(
            dim, heads, head_dim, kv_heads, float(decay_max), block_len, hops
        )
        self.length = length
        factory = {"device": device, "dtype": dtype}
        nv, nb, nc, na = self.config.sizes
        self.in_proj_weight = nn.Parameter(torch.empty(nv + nb + nc + na, dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(nb + nc + na, **factory))
        self.out_proj_weight = nn.Parameter(torch.empty(dim, heads * head_dim, **factory))
        self.fast_path = bool(fast_path)
        # decided here, outside any torch.compile trace; forward only reads the flag
        self._fast = bool(
            self.fast_path and _fast_path_possible() and _front_phalanx()[0] is not None
        )
        self.reset_parameters()

    # -- configuration -------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def heads(self) -> int:
        return self.config.heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def kv_heads(self) -> int:
        return self.config.kv_heads

    @property
    def hops(self) -> int | None:
        return self.config.hops

    @property
    def block_len(self) -> int:
        return self.config.block_len

    @property
    def decay_max(self) -> float:
        return self.config.decay_max

    @property
    def fast_path_status(self) -> str:
        """Whether the fused path is used on CUDA: ``"available"`` or the reason it is not."""
        if not self.fast_path:
            return "disabled by fast_path=False"
        if not _fast_path_possible():
            return "no CUDA device"
        return _front_phalanx()[1]

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={c.dim}, heads={c.heads}, head_dim={c.head_dim}, kv_heads={c.kv_heads}, "
            f"block_len={c.block_len}, hops={c.hops}, decay_max={c.decay_max}"
        )

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation for each projection (spear's too)."""
        bound_in = 1.0 / math.sqrt(self.dim)
        bound_out = 1.0 / math.sqrt(self.heads * self.head_dim)
        with torch.no_grad():
            nn.init.uniform_(self.in_proj_weight, -bound_in, bound_in)
            nn.init.uniform_(self.in_proj_bias, -bound_in, bound_in)
            nn.init.uniform_(self.out_proj_weight, -bound_out, bound_out)

    def front_params(self) -> dict:
        """The weights as the array front's Phalanx ``params`` (NumPy copies): ``W_in``,
        ``b_a``, ``b_b``, ``b_c``, ``W_out``, ``decay_max`` (``swr_array.phalanx``, the JAX
        adapter and ``swr_array.reference.phalanx_reference`` take this dict)."""
        tensors = (self.in_proj_weight, self.in_proj_bias, self.out_proj_weight)
        arrays = [_to_front(t.cpu()) for t in tensors]
        params = _front_params(*arrays, self.config)
        return {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in params.items()}

    # -- forward, prefill, decoding ---------------------------------------------------------------

    def _check_input(self, name: str, x, ndim: int) -> None:
        _check_tensor(name, x)
        shape = "(B, L, dim)" if ndim == 3 else "(B, dim)"
        if x.dim() != ndim or x.shape[-1] != self.dim:
            raise ValueError(
                f"{name} must have shape {shape} with dim={self.dim}, got {tuple(x.shape)}"
            )
        w = self.in_proj_weight
        _check_device(name, x, w.device, ref="the layer")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name} has dtype {x.dtype} but the layer's parameters are {w.dtype}")

    def forward(self, x: Tensor, *, state: SWRState | None = None, return_state: bool = False,
                cu_seqlens: Tensor | None = None):
        """``x (B, L, dim) -> out (B, L, dim)``.

        With ``return_state`` also the state after the last token (prefill); with ``state`` the
        call continues from it (chunked prefill). Stateful calls are not differentiable: run them
        under ``torch.no_grad()``. ``cu_seqlens`` (B == 1): packed documents, each its own
        sequence (see :func:`swr`; the generic path, not the fused kernel).
        """
        self._check_input("x", x, 3)
        params = (self.in_proj_weight, self.in_proj_bias, self.out_proj_weight)
        if cu_seqlens is not None:
            return _phalanx_generic(x, *params, self.config, state=state,
                                    return_state=return_state, cu_seqlens=cu_seqlens)
        if (
            self._fast
            and state is None
            and not return_state
            and x.device.type in _FAST_PATH_DEVICE_TYPES
        ):
            x, *params = _autocast(x, *params)
            c = self.config
            out, _ = _phalanx_op(
                x, *params, c.heads, c.head_dim, c.kv_heads, c.decay_max, c.block_len, c.hops
            )
            return out
        return _phalanx_generic(x, *params, self.config, state=state, return_state=return_state)

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None) -> SWRState:
        """The decoding state before the first token (default device: the parameters')."""
        batch_size = _positive_int("batch_size", batch_size)
        device = self.in_proj_weight.device if device is None else device
        return swr_init_state(
            (batch_size, self.heads, self.head_dim),
            block_len=self.block_len,
            hops=self.hops,
            device=device,
        )

    def step(self, x_t: Tensor, state: SWRState) -> tuple[Tensor, SWRState]:
        """One decoding step: ``x_t (B, dim)`` (or ``(B, 1, dim)``) -> ``(out_t, next_state)``,
        equal to the full forward at that position. Not differentiable."""
        if isinstance(x_t, Tensor) and x_t.dim() == 3 and x_t.shape[1] == 1:
            out, state = self.step(x_t[:, 0], state)
            return out[:, None], state
        self._check_input("x_t", x_t, 2)
        cfg = self.config
        z = F.linear(x_t, self.in_proj_weight, _input_bias(self.in_proj_bias, cfg))
        A, U, c5, v5 = _gates(z, cfg)
        y, state = swr_step(A, U, state)
        return _readout(y, c5, v5, self.out_proj_weight), state

    # -- spear interoperability -----------------------------------------------------------------

    @staticmethod
    def _spear_tensors(state_dict, prefix: str) -> tuple[dict, set]:
        """spear's weights by Linear name (keys with or without ``param.``), and the keys read."""
        found, used = {}, set()
        for name, key in _SPEAR_KEYS.items():
            for k in dict.fromkeys((prefix + key, prefix + name)):
                if k in state_dict:
                    found[name] = state_dict[k]
                    used.add(k)
                    break
        missing = [k for k in _SPEAR_KEYS if k not in found]
        if missing:
            raise KeyError(f"spear state_dict lacks {missing} (prefix {prefix!r})")
        return found, used

    @classmethod
    def from_spear_state_dict(
        cls,
        state_dict,
        *,
        prefix: str = "",
        hops: int | None = 1,
        block_len: int = 16,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **kwargs,
    ) -> "Phalanx":
        """A Phalanx holding the weights of spear's ``Phalanx`` (``param.proj_a.weight``, ...,
        ``proj_out.weight`` under ``prefix``); the shapes give dim, heads, head_dim, kv_heads.

        spear's ``k=2`` is ``hops=1`` and its ``block_size`` is ``block_len``; spear's A is a plain
        sigmoid (``decay_max=1``). spear casts activations to bfloat16 inside its layer; this one
        computes in its parameters' dtype (default: the state_dict's).
        """
        found, _ = cls._spear_tensors(state_dict, prefix)
        wa, wb, wv = found["proj_a.weight"], found["proj_b.weight"], found["proj_v.weight"]
        heads, dim = wa.shape
        head_dim = wv.shape[0] // heads
        layer = cls(
            dim,
            heads=heads,
            head_dim=head_dim,
            kv_heads=wb.shape[0] // head_dim,
            hops=hops,
            block_len=block_len,
            dtype=wa.dtype if dtype is None else dtype,
            device=wa.device if device is None else device,
            **kwargs,
        )
        layer.load_spear_state_dict(state_dict, prefix=prefix)
        return layer

    def load_spear_state_dict(self, state_dict, *, prefix: str = "", strict: bool = True) -> None:
        """Copy the weights of spear's ``Phalanx`` into this layer (shapes must match).

        With ``strict``, other keys under ``prefix`` are an error (spear's ``kv_indices`` buffer
        is not persistent, so it never appears).
        """
        found, used = self._spear_tensors(state_dict, prefix)
        if strict:
            extra = sorted(k for k in state_dict if k.startswith(prefix) and k not in used)
            if extra:
                raise KeyError(f"unexpected keys in spear state_dict: {extra}")
        nv, nb, nc, na = self.config.sizes
        expect = {
            "proj_a.weight": (na, self.dim),
            "proj_a.bias": (na,),
            "proj_b.weight": (nb, self.dim),
            "proj_b.bias": (nb,),
            "proj_c.weight": (nc, self.dim),
            "proj_c.bias": (nc,),
            "proj_v.weight": (nv, self.dim),
            "proj_out.weight": (self.dim, nv),
        }
        for k, shape in expect.items():
            if tuple(found[k].shape) != shape:
                raise ValueError(
                    f"spear {k} has shape {tuple(found[k].shape)}, expected {shape} for {self!r}"
                )
        with torch.no_grad():
            w = [found[f"proj_{s}.weight"].to(self.in_proj_weight) for s in "vbca"]
            b = [found[f"proj_{s}.bias"].to(self.in_proj_bias) for s in "bca"]
            self.in_proj_weight.copy_(torch.cat(w))
            self.in_proj_bias.copy_(torch.cat(b))
            self.out_proj_weight.copy_(found["proj_out.weight"])

    def spear_state_dict(self) -> dict:
        """These weights under spear's ``Phalanx`` keys (detached copies)."""
        nv, nb, nc, na = self.config.sizes
        w = dict(zip("vbca", self.in_proj_weight.detach().split(self.config.sizes)))
        b = dict(zip("bca", self.in_proj_bias.detach().split((nb, nc, na))))
        sd = {f"param.proj_{s}.weight": w[s].clone() for s in "abcv"}
        sd.update({f"param.proj_{s}.bias": b[s].clone() for s in "abc"})
        sd["proj_out.weight"] = self.out_proj_weight.detach().clone()
        return sd
