"""PyTorch adapter: autograd-aware ``swr`` and the ``Phalanx`` layer as an ``nn.Module``.

Thin by design (STYLE.md): tensors go to the framework-agnostic front (:func:`swr_array.swr`,
:func:`swr_array.swr_vjp`) and come back, with no math here.

- CPU tensors run the NumPy float64 reference (zero-copy views; bfloat16 through ``ml_dtypes``).
- CUDA tensors go zero-copy through DLPack to CuPy and the Numba kernels, on torch's current stream
  and the tensor's device, so no synchronisation is added.

One route per call: ``swr`` is the ``torch.library`` custom op ``swr_array::swr`` (autograd
through ``swr_array::swr_vjp``), eager and compiled alike; the Phalanx layer on CUDA is
``swr_array::phalanx`` / ``swr_array::phalanx_vjp`` over :mod:`swr_array.phalanx`. Every op
allocates its outputs with torch (the front writes into ``out=`` views, or allocates through
torch's caching allocator, see :func:`_torch_malloc`) and has a fake implementation of the same
shapes, dtypes and strides, so ``torch.compile(fullgraph=True)`` traces them, in the default mode
and with CUDA graphs (``mode="reduce-overhead"``). Argument checks are the front's
(:mod:`swr_array._checks`) plus torch's dtype and device rules.

Decoding: :class:`SWRState` holds torch tensors that keep their storage; :func:`swr_step` and
:meth:`Phalanx.step` advance it in place (custom ops that mutate it under ``torch.compile``).

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
from swr_array.state import SWRState as _FrontState

# the module (the package's ``swr_array.phalanx`` attribute is the function of that name)
_front_phalanx = importlib.import_module("swr_array.phalanx")

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


def _torch_malloc(nbytes: int):
    """CuPy's allocator inside the adapter's front calls: the memory is a torch tensor on CuPy's
    current device, from torch's caching allocator on torch's current stream (the stream the
    front runs on), so inside a CUDA graph capture it comes from the graph's pool and results
    handed back to torch are torch allocations, never CuPy pool blocks."""
    cupy = _cupy()
    index = cupy.cuda.runtime.getDevice()
    t = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=torch.device("cuda", index))
    mem = cupy.cuda.UnownedMemory(t.data_ptr(), t.numel(), t, index)
    return cupy.cuda.MemoryPointer(mem, 0)


@contextlib.contextmanager
def _front_context(device: torch.device):
    """On CUDA: the tensor's GPU, torch's current stream and torch's allocator become CuPy's
    current ones for the front call (no-op on the CPU)."""
    if device.type != "cuda":
        yield
        return
    cupy = _cupy()
    with (
        cupy.cuda.Device(device.index),
        _cupy_stream(device),
        cupy.cuda.using_allocator(_torch_malloc),
        _front_phalanx.gemm_with(_torch_matmul),
    ):
        yield


def _torch_matmul(a, b):
    """The front's Phalanx GEMMs through torch (capturable in torch's CUDA graphs)."""
    return _cupy().from_dlpack(torch.from_dlpack(a) @ torch.from_dlpack(b))


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
    """Validate an SWR call with the front's checks (layout, block_len, hops, shapes) and torch's
    dtype/device rules; returns (block_len, hops, layout, per_head)."""
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
    B, H, D, _, per_head = _checks.swr_dims(tuple(a.shape), tuple(u.shape), layout)
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
    """y from torch's allocator; the front writes into a zero-copy view of it (``out=``)."""
    y = torch.empty(u.shape, dtype=u.dtype if out_dtype is None else out_dtype, device=u.device)
    with _front_context(u.device):
        yf = _to_front(y)
        _front.swr(
            _to_front(a),
            _to_front(u),
            block_len=block_len,
            hops=hops,
            layout=layout,
            x0=_to_front(x0),
            # y's own front dtype, so the front's check of out= compares like with like
            out_dtype=None if out_dtype is None or out_dtype == u.dtype else yf.dtype,
            out=yf,
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
    """(da, du, dx0) from torch's allocator, written by one front ``swr_vjp`` call (``out=``);
    dx0 (the front's float32 on CUDA, float64 on the CPU) is cast to x0's dtype, and is an empty
    tensor when x0 is None (custom ops return no None)."""
    device = u.device
    da = torch.empty(a.shape, dtype=a.dtype, device=device)
    du = torch.empty(u.shape, dtype=u.dtype, device=device)
    acc = torch.float32 if device.type == "cuda" else torch.float64
    dx0 = None if x0 is None else torch.empty(x0.shape, dtype=acc, device=device)
    with _front_context(device):
        _front.swr_vjp(
            _to_front(a),
            _to_front(u),
            _to_front(dy),
            block_len=block_len,
            hops=hops,
            layout=layout,
            x0=_to_front(x0),
            out=(_to_front(da), _to_front(du), _to_front(dx0)),
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
    da, du, dx0 = torch.ops.swr_array.swr_vjp.default(a, u, dy.contiguous(), x0, *ctx.config)
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
    state: "SWRState | None" = None,
    return_state: bool = False,
    cp_group=None,
    cu_seqlens: Tensor | None = None,
):
    """Sliding window recurrence ``y = L_hops(a) u`` on torch tensors (docs/spec.md#recurrence).

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
        cp_group: a ``torch.distributed`` process group for context parallelism: each rank
            passes its contiguous shard along L (group-rank order, any lengths) and gets its
            shard of the full-sequence result (see docs/context_parallel.md).
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
    if cu_seqlens is not None and cp_group is not None:
        raise ValueError("cp_group and cu_seqlens do not combine (shard packed documents by "
                         "document)")
    if cu_seqlens is not None:
        from . import _torch_packed

        if state is not None:
            raise ValueError("state cannot be combined with cu_seqlens: give each sequence its "
                             "initial carry with x0 of shape (S, H, D)")
        if _checks.check_bool("return_state", return_state):
            _forbid_grad("swr with return_state", a, u, x0)
            y, st = _torch_packed.swr_packed_state(
                _front_context, _to_front, _from_front, a, u, cu_seqlens, block_len=block_len,
                hops=hops, layout=layout, x0=x0, out_dtype=out_dtype, np_dtype=_np_dtype)
            return y, SWRState(st, u.device)
        return _torch_packed.swr_packed(
            swr, a, u, cu_seqlens, block_len=block_len, hops=hops, layout=layout, x0=x0,
            out_dtype=out_dtype, check_swr=_check_swr)
    block_len, hops, layout, per_head = _check_swr(
        a, u, x0, block_len=block_len, hops=hops, layout=layout, out_dtype=out_dtype
    )
    return_state = _checks.check_bool("return_state", return_state)
    if cp_group is not None:
        if state is not None or return_state:
            raise ValueError("cp_group does not combine with state or return_state")
        from swr_array.adapters import torch_cp

        return torch_cp.swr(a, u, x0, block_len, hops, layout, out_dtype, per_head, cp_group)
    if state is not None or return_state:
        if state is not None and x0 is not None:
            raise ValueError("pass either x0 or state, not both: a state already holds its carry")
        return _swr_stateful(a, u, x0, block_len, hops, layout, out_dtype, state, return_state)
    # the op's overload itself: the same dispatch as calling _swr_op, minus a Python layer
    return torch.ops.swr_array.swr.default(a, u, x0, block_len, hops, layout, out_dtype)


# ----------------------------------------------------------------------------------------------
# the decoding state: torch tensors, updated in place through the front's views of them
# ----------------------------------------------------------------------------------------------


def _tensor_of(x, device: torch.device) -> Tensor:
    """The tensor sharing a front array's memory (on CUDA, memory from torch's allocator)."""
    if device.type == "cuda":
        return torch.from_dlpack(x)
    return torch.from_numpy(x)


class SWRState:
    """A torch decoding state: what ``swr(state=...)``, :func:`swr_step` and
    :meth:`Phalanx.step` continue from, for every batch row.

    Tensors (float64 on the CPU, float32 on CUDA; ``position`` int64), on one device, whose
    storage stays the same for the state's whole life: prefill continuations, steps and row
    changes write into them, so a decode loop can be captured in a CUDA graph:

    - ``position`` ``(B,)``: tokens consumed by each row (rows may be at different positions);
    - ``w``, ``g`` ``(B, H, D)``: the current partial block's local solve and attenuation;
    - ``carry_v``, ``carry_C`` ``(B, H, D, K)``: the carriers of the latest complete blocks.

    ``front`` is the array front's :class:`swr_array.SWRState` over zero-copy views of these
    tensors (NumPy on the CPU, CuPy on CUDA): the front's in-place updates are the tensors'.
    Build one with :func:`swr_init_state`, :meth:`Phalanx.init_state` or a prefill
    (``return_state=True``).
    """

    __slots__ = ("front", "device", "position", "w", "g", "carry_v", "carry_C", "__weakref__")

    def __init__(self, front: _FrontState, device: torch.device):
        self.front = front
        self.device = device
        for name, x in zip(("position", "w", "g", "carry_v", "carry_C"), front.arrays()):
            setattr(self, name, _tensor_of(x, device))

    @property
    def block_len(self) -> int:
        return self.front.block_len

    @property
    def hops(self) -> int | None:
        return self.front.hops

    @property
    def layer(self):
        """None (the plain recurrence) or the configuration of the layer the state belongs to."""
        return self.front.layer

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, H, D)``."""
        return tuple(self.w.shape)

    def tensors(self) -> tuple[Tensor, ...]:
        """``(position, w, g, carry_v, carry_C)``."""
        return self.position, self.w, self.g, self.carry_v, self.carry_C

    def __repr__(self) -> str:
        return (f"SWRState(shape={self.shape}, block_len={self.block_len}, hops={self.hops}, "
                f"layer={self.layer!r}, device={self.device})")

    def reset_rows(self, rows, x0: Tensor | None = None) -> "SWRState":
        """Put ``rows`` (an int or a sequence of row indices) back before their first token, with
        the initial carry ``x0`` ``(len(rows), H, D)`` (default 0); other rows are untouched.
        Returns self."""
        _check_tensor("x0", x0, optional=True)
        _check_device("x0", x0, self.device, ref="the state")
        with _front_context(self.device):
            self.front.reset_rows(rows, x0=None if x0 is None else _to_front(x0.to(self.w.dtype)))
        return self

    def load_rows(self, rows, other: "SWRState", src_rows=None) -> "SWRState":
        """Copy rows ``src_rows`` of ``other`` (default: all, in order) into ``rows`` of this state,
        e.g. a new prompt's prefill state into a free slot; other rows are untouched. ``other``
        needs this state's configuration and device (its batch may differ). Returns self."""
        if not isinstance(other, SWRState):
            raise TypeError(f"other must be an SWRState, got {type(other).__name__}")
        _check_device("other", other.w, self.device, ref="the state")
        with _front_context(self.device):
            self.front.load_rows(rows, other.front, src_rows)
        return self


def _check_state_arg(state, device: torch.device, ref: str) -> None:
    if not isinstance(state, SWRState):
        raise TypeError(f"state must be an SWRState (swr_init_state, init_state or "
                        f"return_state=True), got {type(state).__name__}")
    _check_device("state", state.w, device, ref=ref)


@torch.compiler.disable
def _swr_stateful(a, u, x0, block_len, hops, layout, out_dtype, state, return_state):
    _forbid_grad("swr with state or return_state", a, u, x0)
    if u.device.type == "meta":
        raise ValueError("state and return_state need CPU or CUDA tensors, not meta tensors")
    if state is not None:
        _check_state_arg(state, u.device, "u")
    y = torch.empty(u.shape, dtype=u.dtype if out_dtype is None else out_dtype, device=u.device)
    with _front_context(u.device):
        yf = _to_front(y)
        res = _front.swr(
            _to_front(a),
            _to_front(u),
            block_len=block_len,
            hops=hops,
            layout=layout,
            x0=_to_front(x0),
            state=None if state is None else state.front,
            return_state=return_state,
            out_dtype=None if out_dtype is None or out_dtype == u.dtype else yf.dtype,
            out=yf,
        )
        if not return_state:
            return y
        if state is not None:  # advanced in place
            return y, state
        return y, SWRState(res[1], u.device)


def _check_step(a_t, u_t, state, out_dtype, out):
    """The torch-side checks of a step (the front checks shapes and the state's arrays)."""
    _check_tensor("a_t", a_t)
    _check_tensor("u_t", u_t)
    _check_tensor("out", out, optional=True)
    if u_t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"u_t is on {u_t.device}; swr_step runs on CPU and CUDA tensors")
    _check_device("a_t", a_t, u_t.device, ref="u_t")
    _check_device("out", out, u_t.device, ref="u_t")
    _check_dtype("u_t", u_t.dtype, u_t.device)
    if a_t.dtype != u_t.dtype:
        raise TypeError(f"a_t and u_t must share one dtype, got {a_t.dtype} and {u_t.dtype}")
    _check_out_dtype(out_dtype, u_t.device)
    _check_state_arg(state, u_t.device, "u_t")
    _forbid_grad("swr_step", a_t, u_t)


def swr_step(
    a_t: Tensor,
    u_t: Tensor,
    state: SWRState,
    *,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, SWRState]:
    """One decoding step for every row: ``(y_t, state)``, equal to :func:`swr` at each row's
    position; ``state`` is advanced in place and returned (the same object).

    Args:
        a_t: ``(B, H)`` per head or ``(B, H, D)`` per channel.
        u_t: ``(B, H, D)``, same dtype and device as ``a_t``.
        state: the state after each row's previous token (:func:`swr_init_state` or a prefill
            with ``return_state=True``) on the same device.
        out_dtype: dtype of y_t (default: u_t's).
        out: optional preallocated C-contiguous y_t ``(B, H, D)`` of that dtype.

    On CUDA the step is one kernel on torch's current stream that reads each row's position on
    the device; with ``out`` nothing is allocated, so after a first (warm-up) call steps can be
    captured with ``torch.cuda.graph``. Under ``torch.compile`` the step is the custom op
    ``swr_array::swr_step``, which mutates the state's tensors. Not differentiable.
    """
    a_t, u_t = _autocast(a_t, u_t)
    _check_step(a_t, u_t, state, out_dtype, out)
    if torch.compiler.is_compiling():
        y = _swr_step_op(a_t, u_t, *state.tensors(), state.block_len, state.hops, out_dtype)
        if out is not None:
            out.copy_(y)
            y = out
        return y, state
    if u_t.device.type == "cuda":
        return _cuda_step(a_t, u_t, state, out_dtype, out), state
    if out is None:
        dt = u_t.dtype if out_dtype is None else out_dtype
        out = torch.empty(u_t.shape, dtype=dt, device=u_t.device)
    with _front_context(u_t.device):
        yf = _to_front(out)
        _front.swr_step(
            _to_front(a_t),
            _to_front(u_t),
            state.front,
            out_dtype=None if out_dtype is None or out_dtype == u_t.dtype else yf.dtype,
            out=yf,
        )
    return out, state


def _cuda_step(a_t, u_t, state, out_dtype, out) -> Tensor:
    """The eager CUDA step (torch-side checks done): shapes and ``out`` checked, then ONE launch
    of the state's prepared plan (``swr_array.ops.step_plan``, made on the first call with
    these dtypes and kept on the state) on torch's current stream, with the tensors' data
    pointers; no DLPack view and no CuPy context."""
    shape = state.shape
    per_channel = _checks.step_shapes(a_t.shape, u_t.shape, shape)
    dt = u_t.dtype if out_dtype is None else out_dtype
    if out is None:
        out = torch.empty(shape, dtype=dt, device=u_t.device)
    else:
        if tuple(out.shape) != shape:
            raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
        if out.dtype != dt:
            raise TypeError(f"out must have dtype {dt}, got {out.dtype}")
        if not out.is_contiguous():
            raise ValueError("out must be C-contiguous")
    a_t, u_t = a_t.contiguous(), u_t.contiguous()
    index = u_t.device.index
    _cupy().cuda.runtime.setDevice(index)  # a current context for the launch on this thread
    cache = state.front._launch_cache
    key = ("torch", a_t.dtype, per_channel, u_t.dtype, out.dtype)
    run = cache.get(key)
    if run is None:
        run = _front.step_plan(a_t, u_t, out, state.front)
        if run is None:  # first launch with these dtypes: prepares the plan
            _front.swr_step_into(a_t, u_t, out, state.front, stream=_raw_stream(index))
            run = _front.step_plan(a_t, u_t, out, state.front)
            cache[key] = run
            return out
        cache[key] = run
    run.run(a_t, u_t, out, stream=_raw_stream(index))
    return out


_FRONT_STATES: dict = {}


def _front_state_of(tensors, block_len, hops) -> _FrontState:
    """The front's state over views of ``tensors`` (cached by their data pointers and shapes, so
    a compiled step reuses the front's prepared launches); call inside ``_front_context``."""
    key = (block_len, hops, *((t.device, t.data_ptr(), tuple(t.shape)) for t in tensors))
    fs = _FRONT_STATES.get(key)
    if fs is None:
        if len(_FRONT_STATES) >= 64:
            _FRONT_STATES.clear()
        pos, w, g, cv, cC = (_to_front(t) for t in tensors)
        fs = _FRONT_STATES[key] = _FrontState(
            block_len=block_len, hops=hops, position=pos, w=w, g=g, carry_v=cv, carry_C=cC
        )
    return fs


@torch.library.custom_op(
    "swr_array::swr_step", mutates_args=("position", "w", "g", "carry_v", "carry_C")
)
def _swr_step_op(
    a_t: Tensor,
    u_t: Tensor,
    position: Tensor,
    w: Tensor,
    g: Tensor,
    carry_v: Tensor,
    carry_C: Tensor,
    block_len: int,
    hops: int | None,
    out_dtype: torch.dtype | None,
) -> Tensor:
    """y_t from torch's allocator; the state's tensors advanced in place by the front's step."""
    y = torch.empty(u_t.shape, dtype=u_t.dtype if out_dtype is None else out_dtype,
                    device=u_t.device)  # fmt: skip
    with _front_context(u_t.device):
        yf = _to_front(y)
        fs = _front_state_of((position, w, g, carry_v, carry_C), block_len, hops)
        _front.swr_step(
            _to_front(a_t),
            _to_front(u_t),
            fs,
            out_dtype=None if out_dtype is None or out_dtype == u_t.dtype else yf.dtype,
            out=yf,
        )
    return y


@_swr_step_op.register_fake
def _swr_step_fake(a_t, u_t, position, w, g, carry_v, carry_C, block_len, hops, out_dtype):
    return torch.empty(u_t.shape, dtype=out_dtype or u_t.dtype, device=u_t.device)


def swr_init_state(
    shape: Sequence[int],
    *,
    block_len: int = 16,
    hops: int | None = 1,
    x0: Tensor | None = None,
    device: torch.device | str | None = None,
) -> SWRState:
    """The state before the first token of every row, for decoding with :func:`swr_step`.

    ``shape`` is ``(B, H, D)``; the tensors are float64 on the CPU and float32 on CUDA, on
    ``device`` (default: x0's device, else the CPU), positions 0.
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
        front = _front.swr_init_state(
            tuple(shape), block_len=block_len, hops=hops, x0=_to_front(x0), like=like
        )
        return SWRState(front, device)


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
    Y = y.view(v5.shape) * c5 + v5
    return F.linear(Y.flatten(-3), w_out)  # flatten, not reshape(-1): L or B may be 0


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

# Device types on which Phalanx.forward runs the fused custom op (the front's CuPy kernels). The
# CPU runs the composition; the custom op also runs there, through the front's NumPy reference.
_FUSED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


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


def _own(x, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A front result as a ``dtype`` tensor in torch's memory; call inside ``_front_context``.

    On CUDA the front's arrays already come from torch's allocator (see :func:`_torch_malloc`);
    on the CPU the NumPy result is copied into a ``torch.empty`` (the cast is torch's)."""
    if device.type == "cuda":
        return torch.from_dlpack(x).to(dtype)
    t = _from_front(x, device)
    return torch.empty(t.shape, dtype=dtype).copy_(t)


def _fused_forward(x, w_in, b_in, w_out, cfg) -> tuple[Tensor, Tensor]:
    """``(out, z)`` from the front's phalanx; z = x W_in is kept for the backward."""
    with _front_context(x.device):
        params = _front_params(_to_front(w_in), _to_front(b_in), _to_front(w_out), cfg)
        out, residuals = _front_phalanx.phalanx(
            _to_front(x), params, block_len=cfg.block_len, hops=cfg.hops, return_residuals=True
        )
        return _own(out, x.device, x.dtype), _own(residuals["z"], x.device, x.dtype)


def _fused_backward(x, w_in, b_in, w_out, dout, z, cfg) -> tuple[Tensor, ...]:
    """``(dx, d in_proj_weight, d in_proj_bias, d out_proj_weight)`` from the front."""
    dev = x.device
    with _front_context(dev):
        params = _front_params(_to_front(w_in), _to_front(b_in), _to_front(w_out), cfg)
        dx, dp = _front_phalanx.phalanx_vjp(
            _to_front(x),
            params,
            _to_front(dout),
            block_len=cfg.block_len,
            hops=cfg.hops,
            residuals={"z": _to_front(z)},
            linear_layout=True,
        )
        db_in = torch.cat([_own(dp[k], dev, b_in.dtype) for k in ("b_b", "b_c", "b_a")])
        return (
            _own(dx, dev, x.dtype),
            _own(dp["W_in"], dev, w_in.dtype),
            db_in,
            _own(dp["W_out"], dev, w_out.dtype),
        )


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
    return _fused_forward(x, w_in, b_in, w_out, cfg)


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
    return _fused_backward(x, w_in, b_in, w_out, dout, z, cfg)


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
    grads = torch.ops.swr_array.phalanx_vjp.default(x, w_in, b_in, w_out, dout.contiguous(), z,
                                                    *ctx.config)
    return (*grads, None, None, None, None, None, None)


_phalanx_op.register_autograd(_phalanx_backward, setup_context=_phalanx_setup_context)


# ----------------------------------------------------------------------------------------------
# Phalanx decoding on CUDA: the front's fused step kernel between torch's two GEMMs
# ----------------------------------------------------------------------------------------------


def _bias_parts(b_in: Tensor, cfg: _PhalanxConfig) -> tuple[Tensor, Tensor, Tensor]:
    """``(b_a, b_b, b_c)``: contiguous views of the fused bias ``Bg | C | A``."""
    kv = cfg.kv_heads * cfg.head_dim
    return b_in[2 * kv :], b_in[:kv], b_in[kv : 2 * kv]


def _phalanx_mix(z: Tensor, y: Tensor | None, b_in: Tensor, front: _FrontState, cfg) -> Tensor:
    """``y = swr_step(A, Bg * V) * C + V`` from ``z = x_t W_in`` (made by the caller: ``(B, W)``
    C-contiguous) into ``y`` (``(B, H*D)``; None: a buffer kept with the plan, reused by every
    call, which the caller consumes before the next step), ONE kernel launch on torch's current
    stream; the front state (views of the torch state's tensors) advances in place. Returns y.

    The launch plan (``swr_array.phalanx.phalanx_step_plan``, which checks the arrays) is made
    on the first call per biases and kept on the front state with views of the biases (a view
    holds its tensor, so no other tensor can take that address while it is cached); later calls
    pass z's and y's data pointers to it, with no DLPack view and no CuPy context."""
    index = z.device.index
    _cupy().cuda.runtime.setDevice(index)  # a current context for the launch on this thread
    plans = front._launch_cache.get("torch-phalanx")
    if plans is None:
        plans = front._launch_cache["torch-phalanx"] = {}
    key = (index, z.dtype, b_in.data_ptr(), b_in.dtype, cfg)
    entry = plans.get(key)
    if entry is None:
        if len(plans) >= 16:  # e.g. biases cast anew by autocast at every call: start over
            plans.clear()
        biases = _bias_parts(b_in, cfg)
        buf = torch.empty((z.shape[0], cfg.heads * cfg.head_dim), dtype=z.dtype, device=z.device)
        run = _front_phalanx.phalanx_step_plan(z, buf if y is None else y, *biases, front,
                                               kv_heads=cfg.kv_heads, decay_max=cfg.decay_max)
        entry = plans[key] = (run, biases, buf)
    if y is None:
        y = entry[2]
    entry[0].run(z, y, stream=_raw_stream(index))
    return y


@torch.library.custom_op(
    "swr_array::phalanx_step_mix", mutates_args=("position", "w", "g", "carry_v", "carry_C")
)
def _phalanx_mix_op(
    z: Tensor,
    b_in: Tensor,
    position: Tensor,
    w: Tensor,
    g: Tensor,
    carry_v: Tensor,
    carry_C: Tensor,
    heads: int,
    head_dim: int,
    kv_heads: int,
    decay_max: float,
    block_len: int,
    hops: int | None,
) -> Tensor:
    """The fused middle of a compiled Phalanx step: y ``(B, heads*head_dim)`` from torch's
    allocator, the state's tensors advanced in place."""
    cfg = _PhalanxConfig(0, heads, head_dim, kv_heads, decay_max, block_len, hops)
    y = torch.empty((z.shape[0], heads * head_dim), dtype=z.dtype, device=z.device)
    with _front_context(z.device):
        front = _front_state_of((position, w, g, carry_v, carry_C), block_len, hops)
    _phalanx_mix(z.contiguous(), y, b_in, front, cfg)
    return y


@_phalanx_mix_op.register_fake
def _phalanx_mix_fake(z, b_in, position, w, g, carry_v, carry_C, heads, head_dim, *config):
    return torch.empty((z.shape[0], heads * head_dim), dtype=z.dtype, device=z.device)


GEMV_MAX_BATCH = 4
"""Largest batch at which :meth:`Phalanx.step` on CUDA runs the GEMV step (two kernels that read
each weight once, ``numba_kernels/phalanx_gemv.py``) instead of torch's two GEMMs around the
fused middle kernel; 0 turns the GEMV step off. Set to the largest batch at which the GEMV step
was measured faster than the GEMM path (docs/decoding.md)."""


def _gemv_step(x_t: Tensor, out: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor,
               front: _FrontState, cfg) -> bool:
    """The small-batch step as the two GEMV launches, on torch's current stream: x_t ``(B,
    dim)`` (C-contiguous) -> out ``(B, dim)`` (C-contiguous, made by the caller), the state
    advanced in place. False (nothing launched) where the GEMV kernels do not take these shapes,
    dtypes or alignments (``phalanx_gemv.unsupported``, x_t 16-byte aligned); the caller then
    runs the GEMM path.

    The plan (both launches prepared, a scratch ``Y`` ``(B, H*D)`` from torch's allocator,
    views of the weights and biases that keep them alive) is made on the first call per
    weights and kept on the front state, like the GEMM path's plan."""
    plans = front._launch_cache.get("torch-gemv")
    if plans is None:
        plans = front._launch_cache["torch-gemv"] = {}
    index = x_t.device.index
    key = (index, x_t.dtype, w_in.data_ptr(), b_in.data_ptr(), w_out.data_ptr(), cfg)
    entry = plans.get(key)
    if entry is None:
        if len(plans) >= 16:  # e.g. weights cast anew by autocast at every call: start over
            plans.clear()
        entry = plans[key] = _gemv_plan(x_t, out, w_in, b_in, w_out, front, cfg)
    if entry is False or x_t.data_ptr() % 16:  # (x is copied in 16-byte pieces)
        return False
    _cupy().cuda.runtime.setDevice(index)  # a current context for the launches on this thread
    entry[0].run(x_t, entry[1], out, stream=_raw_stream(index))
    return True


def _gemv_plan(x_t, out, w_in, b_in, w_out, front: _FrontState, cfg):
    """``(GemvStep, Y scratch, kept views)`` for :func:`_gemv_step`, or False."""
    from swr_array.numba_kernels import phalanx_gemv as pg

    B = x_t.shape[0]
    kind = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[x_t.dtype]
    if not (w_in.dtype == b_in.dtype == w_out.dtype == x_t.dtype and w_in.is_contiguous()
            and w_out.is_contiguous() and b_in.is_contiguous()):
        return False
    if pg.unsupported(kind, B, cfg.dim, cfg.heads, cfg.head_dim,
                      (w_in.data_ptr(), w_out.data_ptr())) is not None:
        return False
    _cupy().cuda.runtime.setDevice(x_t.device.index)
    y = torch.empty((B, cfg.heads * cfg.head_dim), dtype=x_t.dtype, device=x_t.device)
    biases = _bias_parts(b_in, cfg)
    run = pg.GemvStep(x_t, y, out, w_in, *biases, w_out, front.arrays(), front._arrivals(),
                      heads=cfg.heads, head_dim=cfg.head_dim, kv_heads=cfg.kv_heads,
                      decay_max=cfg.decay_max, hops=front.hops, block_len=front.block_len)
    if not run.fits:  # too many registers a thread for the block: it would not launch
        return False
    return run, y, (w_in, w_out, biases)


def _check_step_out(out: Tensor | None, z: Tensor, dim: int) -> None:
    """``out`` of a Phalanx step, before the state advances: ``(B, dim)`` on z's device, of the
    step's output dtype (z's: x_t's, or autocast's)."""
    if out is None:
        return
    want = (z.shape[0], dim)
    if tuple(out.shape) != want:
        raise ValueError(f"out must have shape (B, dim) = {want}, got {tuple(out.shape)}")
    _check_device("out", out, z.device, ref="x_t")
    if out.dtype != z.dtype:
        raise TypeError(f"out must have dtype {z.dtype} (the step's output), got {out.dtype}")


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
    """The Phalanx mixer (docs/spec.md#phalanx): a gated sliding window recurrence between two
    GEMMs.

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
        fast_path: on CUDA, run the forward and backward as the fused custom ops over
            ``swr_array.phalanx`` (the same math as the composition). The CPU always runs the
            composition.

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
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch dtype or None, got {dtype}")
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
        decay_max = _checks.check_decay_max(decay_max)
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
        """Whether forward runs the fused kernels on CUDA: ``"available"`` or why not."""
        if not self.fast_path:
            return "disabled by fast_path=False"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return "available"

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

    def _check_input(self, name: str, x, ndim: int, w: Tensor | None = None) -> None:
        _check_tensor(name, x)
        shape = x.shape
        if len(shape) != ndim or shape[-1] != self.config.dim:
            raise ValueError(f"{name} must have shape {'(B, L, dim)' if ndim == 3 else '(B, dim)'}"
                             f" with dim={self.dim}, got {tuple(shape)}")
        w = self.in_proj_weight if w is None else w
        _check_device(name, x, w.device, ref="the layer")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name} has dtype {x.dtype} but the layer's parameters are {w.dtype}")

    def forward(
        self,
        x: Tensor,
        *,
        state: SWRState | None = None,
        return_state: bool = False,
        cp_group=None,
        cu_seqlens: Tensor | None = None,
    ):
        """``x (B, L, dim) -> out (B, L, dim)``.

        With ``cp_group`` (a ``torch.distributed`` group) x is this rank's shard of the sequence
        and the output its shard of the full-sequence output (docs/context_parallel.md).

        With ``return_state`` also the state after the last token (prefill); with ``state`` the
        call continues from it (chunked prefill). Stateful calls are not differentiable: run them
        under ``torch.no_grad()``. ``cu_seqlens`` (B == 1): packed documents, each its own
        sequence (see :func:`swr`; the generic path, not the fused kernel).
        """
        self._check_input("x", x, 3)
        if cu_seqlens is not None and cp_group is not None:
            raise ValueError("cp_group and cu_seqlens do not combine (shard packed documents by "
                             "document)")
        if cp_group is not None:
            if state is not None or return_state:
                raise ValueError("cp_group does not combine with state or return_state")
            from swr_array.adapters import torch_cp

            return torch_cp.phalanx(self, x, cp_group)
        params = (self.in_proj_weight, self.in_proj_bias, self.out_proj_weight)
        if cu_seqlens is not None:
            return _phalanx_generic(x, *params, self.config, state=state,
                                    return_state=return_state, cu_seqlens=cu_seqlens)
        if state is not None:
            self._check_state(state, x.shape[0], x.device)
        if (
            self.fast_path
            and state is None
            and not return_state
            and x.device.type in _FUSED_DEVICE_TYPES
        ):
            x, *params = _autocast(x, *params)
            c = self.config
            out, _ = torch.ops.swr_array.phalanx.default(
                x, *params, c.heads, c.head_dim, c.kv_heads, c.decay_max, c.block_len, c.hops
            )
            return out
        res = _phalanx_generic(x, *params, self.config, state=state, return_state=return_state)
        if return_state and state is None:
            res[1].front.layer = self._layer
        return res

    @property
    def _layer(self) -> tuple:
        """The ``layer`` tag of this configuration's states (the front's Phalanx tag)."""
        c = self.config
        return ("phalanx", c.dim, c.heads, c.head_dim, c.kv_heads, c.decay_max)

    def _check_state(self, state, batch: int, device: torch.device) -> None:
        """A state of this layer's configuration, batch and device (before any launch).

        The configuration checks (block_len, hops, layer tag, heads, head_dim) run once per
        state and configuration: a state that passed them is marked in its launch cache with
        this configuration and its layer tag (its tensors keep their shapes for life), and later
        calls check only its type, device and batch."""
        _check_state_arg(state, device, "the input")
        front = state.front
        compiling = torch.compiler.is_compiling()  # (traced: no cache read or written)
        seen = None if compiling else front._launch_cache.get("phalanx-config")
        if seen is not None and seen[0] is self.config and seen[1] is front.layer:
            if state.w.shape[0] != batch:
                raise ValueError(f"state has shape {state.shape}; this call needs (B, H, D) = "
                                 f"{(batch, self.heads, self.head_dim)}")
            return
        if state.block_len != self.block_len or state.hops != self.hops:
            raise ValueError(
                f"state was made with block_len={state.block_len}, hops={state.hops}; this layer "
                f"has block_len={self.block_len}, hops={self.hops}"
            )
        if state.layer is not None and state.layer != self._layer:
            raise ValueError(f"state was made by the layer {state.layer!r}, not {self._layer!r}")
        want = (batch, self.heads, self.head_dim)
        if state.shape != want:
            raise ValueError(f"state has shape {state.shape}; this call needs (B, H, D) = {want}")
        if not compiling:
            front._launch_cache["phalanx-config"] = (self.config, front.layer)

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None) -> SWRState:
        """The decoding state before the first token of ``batch_size`` rows (default device: the
        parameters'), tagged with this layer's configuration."""
        batch_size = _positive_int("batch_size", batch_size)
        device = self.in_proj_weight.device if device is None else device
        state = swr_init_state(
            (batch_size, self.heads, self.head_dim),
            block_len=self.block_len,
            hops=self.hops,
            device=device,
        )
        state.front.layer = self._layer
        return state

    def step(
        self, x_t: Tensor, state: SWRState, *, out: Tensor | None = None
    ) -> tuple[Tensor, SWRState]:
        """One decoding step for every row: ``x_t (B, dim)`` (or ``(B, 1, dim)``) ->
        ``(out_t, state)``, equal to the full forward at each row's position; ``state`` is
        advanced in place and returned (the same object). Not differentiable.

        On CUDA (``fast_path``), at batch up to ``GEMV_MAX_BATCH`` (this module's, 4): two GEMV
        kernels that read each weight once (``numba_kernels/phalanx_gemv.py``: the input GEMV
        with the gates and the state update in its epilogue, then the output GEMV), where
        they take the shapes (rows of 16-byte multiples, 16-byte aligned weights, contiguous
        weights of x_t's dtype, head_dim up to 85); otherwise, and above that batch, torch's
        input GEMM ``z = x_t W_in``, ONE fused front kernel
        (``swr_array.phalanx.phalanx_step_mix``: gates, state update, read-out gate) and torch's
        output GEMM. Both run on torch's current stream; after a first (warm-up) call the step
        can be captured with ``torch.cuda.graph``. ``out`` (``(B, dim)``, x_t's dtype) receives
        out_t. The CPU composes torch ops with :func:`swr_step`.
        """
        if isinstance(x_t, Tensor) and x_t.dim() == 3 and x_t.shape[1] == 1:
            res, state = self.step(x_t[:, 0], state, out=None if out is None else out[:, 0])
            return (res[:, None] if out is None else out), state
        if torch.compiler.is_compiling():
            w_in, b_in, w_out = self.in_proj_weight, self.in_proj_bias, self.out_proj_weight
        else:  # (nn.Module attribute lookups cost microseconds a call)
            params = self._parameters
            w_in, b_in, w_out = (params["in_proj_weight"], params["in_proj_bias"],
                                 params["out_proj_weight"])
        self._check_input("x_t", x_t, 2, w_in)
        _check_tensor("out", out, optional=True)
        dev = x_t.device
        self._check_state(state, x_t.shape[0], dev)
        _forbid_grad("Phalanx.step", x_t)
        cfg = self.config
        if self.fast_path and dev.type in _FUSED_DEVICE_TYPES:
            if torch.is_autocast_enabled(dev.type):
                x_t, w_in, b_in, w_out = _autocast(x_t, w_in, b_in, w_out)
            _check_step_out(out, x_t, cfg.dim)
            compiling = torch.compiler.is_compiling()
            if x_t.shape[0] <= GEMV_MAX_BATCH and not compiling:
                res = out if out is not None and out.is_contiguous() else torch.empty_like(
                    x_t, memory_format=torch.contiguous_format)
                if _gemv_step(x_t.contiguous(), res, w_in, b_in, w_out, state.front, cfg):
                    if out is not None and res is not out:
                        out.copy_(res)
                    return (res if out is None else out), state
            z = F.linear(x_t, w_in)
            if compiling:
                y = _phalanx_mix_op(z, b_in, *state.tensors(), cfg.heads, cfg.head_dim,
                                    cfg.kv_heads, cfg.decay_max, state.block_len, state.hops)
            else:
                y = _phalanx_mix(z, None, b_in, state.front, cfg)
        else:
            z = F.linear(x_t, w_in, _input_bias(b_in, cfg))
            _check_step_out(out, z, self.dim)
            A, U, c5, v5 = _gates(z, cfg)
            u_t, state = swr_step(A, U, state)
            y = (u_t.view(v5.shape) * c5 + v5).reshape(x_t.shape[0], -1)
        if out is None:
            return F.linear(y, w_out), state
        torch.mm(y, w_out.T, out=out)
        return out, state

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
