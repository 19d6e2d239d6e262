"""Checked launch plans of the GPU hot path, in one bounded cache.

A plan is what a repeated call needs besides its data: the checked problem (``_checks.Problem``)
of a call signature (array types, shapes, dtypes, device, contiguity, options). ``swr``,
``swr_vjp`` and the adapters look a signature up here and, on a hit, launch on the data pointers
of the new arrays without repeating the checks (``LaunchPlan.forward`` / ``LaunchPlan.backward``,
on the caller's stream). The kernels' own launch configurations are cached per plan signature in
``numba_kernels`` (bounded the same way).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from . import _checks


class BoundedCache:
    """A least-recently-used mapping of at most ``maxsize`` entries."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()

    def get(self, key, default=None):
        try:
            value = self._data[key]
        except (KeyError, TypeError):  # TypeError: an unhashable key is never cached
            return default
        self._data.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        try:
            self._data[key] = value
        except TypeError:
            return
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


PLANS = BoundedCache(512)
"""The one cache of checked calls: the front (``ops.swr``, ``ops.swr_vjp``) and the adapters."""


class LaunchPlan:
    """A checked CuPy-backend call for one signature: hops 0/1, no x0 or state, C-contiguous.

    ``forward(a, u, y, stream=None)`` writes ``y = swr(a, u)``; ``backward(a, u, dy, da, du,
    stream=None)`` writes the gradients of ``sum(dy * swr(a, u))``. The arrays may be any objects
    with ``shape``, ``dtype`` and ``__cuda_array_interface__`` (CuPy arrays, or thin views of a
    framework's buffers) of the signature's shapes and dtypes on its device; ``stream`` is a CUDA
    stream handle (int) or None for CuPy's current stream.
    """

    __slots__ = ("problem",)

    def __init__(self, problem):
        self.problem = problem

    def forward(self, a, u, y, stream=None):
        from . import _cuda

        return _cuda.swr_forward_plain(a, u, self.problem, y, stream=stream)

    def backward(self, a, u, dy, da, du, stream=None):
        from . import _cuda

        return _cuda.swr_backward_plain(a, u, dy, self.problem, (da, du, None), stream=stream)


def launch_plan(a: Any, u: Any, *, block_len: int, hops: int | None, layout: str,
                out_dtype=None, dy: Any = None) -> LaunchPlan | None:
    """The checked plan of ``swr(a, u, ...)`` (and, with ``dy``, of ``swr_vjp(a, u, dy, ...)``)
    for CuPy-compatible arrays, from :data:`PLANS`; None where the call needs the general path
    (hops not in {0, 1}, arrays not C-contiguous). Raises the front's ValueError / TypeError for
    bad arguments, the first time a signature is seen."""
    key = ("plan", _signature(a), _signature(u), _signature(dy), block_len, type(block_len), hops,
           type(hops), layout, str(out_dtype))
    plan = PLANS.get(key)
    if plan is not None:
        return plan
    p = _checks.check_swr(a, u, block_len=block_len, hops=hops, layout=layout,
                          out_dtype=out_dtype)
    if dy is not None:
        _checks.same_backend([("dy", dy)], p.backend, p.device)
        if tuple(dy.shape) != tuple(u.shape):
            raise ValueError(f"dy must have u's shape {tuple(u.shape)}, got {tuple(dy.shape)}")
        _checks.check_float_dtype("dy", dy.dtype, p.backend)
    arrays = (a, u) if dy is None else (a, u, dy)
    if p.backend != "cupy" or p.hops not in (0, 1) or not all(_contiguous(x) for x in arrays):
        return None
    plan = LaunchPlan(p)
    PLANS.put(key, plan)
    return plan


def _signature(x):
    if x is None:
        return None
    device = getattr(getattr(x, "device", None), "id", None)
    return (type(x), tuple(x.shape), str(x.dtype), device, _contiguous(x))


def _contiguous(x) -> bool:
    flags = getattr(x, "flags", None)
    if flags is not None:
        return bool(flags.c_contiguous)
    cai = getattr(x, "__cuda_array_interface__", None)
    return cai is not None and cai.get("strides") is None
