"""The decoding state of a sliding window recurrence: device-resident, updated in place.

A :class:`SWRState` holds what a later ``swr``/``swr_step`` call needs to continue exactly
(docs/spec.md, sections 3 and 8). Its arrays keep their storage for the state's whole life: a
decoding step (:func:`swr_array.swr_step`, :func:`swr_array.phalanx_step`) writes into them and
returns the same object, and nothing on the host changes between steps, so a decode loop can be
captured in a CUDA graph. The position is kept per batch row, on the arrays' device, so rows at
different positions decode together (continuous batching); :meth:`SWRState.reset_rows` and
:meth:`SWRState.load_rows` replace some rows in place and leave the others as they are.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import reference

__all__ = ["SWRState"]


def _xp_of(x):
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


class SWRState:
    """The state after a row's last consumed token, for every batch row (docs/spec.md#state).

    Static configuration (plain attributes, never changed by a step):

    - ``block_len``, ``hops``: the recurrence the state belongs to.
    - ``layer``: None for a state of the plain recurrence, or a hashable description of the layer
      that made it (e.g. a Phalanx layer's ``("phalanx", dim, heads, head_dim, kv_heads,
      decay_max)``); a layer refuses a state made by another configuration.

    Arrays (one backend and device: NumPy on the CPU reference, CuPy on the GPU):

    - ``position`` ``(B,)`` int64: tokens consumed by each row (the absolute index of its next
      token; its in-block offset is ``position % block_len``).
    - ``w`` ``(B, H, D)``: local solve of the row's current partial block at its last token
      (0 at a block boundary).
    - ``g`` ``(B, H, D)``: attenuation of that partial block (1 at a boundary).
    - ``carry_v`` ``(B, H, D, K)``: carriers of the most recent complete blocks, newest first
      (x0 is the carrier of block -1; K = hops, or 1 for hops=None where ``carry_v[..., 0]`` is
      the running s; carriers a row does not have yet are 0).
    - ``carry_C`` ``(B, H, D, K)``: their compound attenuations, newest first (0 where absent).

    ``w``, ``g``, ``carry_v``, ``carry_C`` are float64 on NumPy and float32 on the GPU; all arrays
    are C-contiguous. Build one with :func:`swr_array.swr_init_state` or a prefill
    (``return_state=True``).
    """

    __slots__ = ("block_len", "hops", "layer", "position", "w", "g", "carry_v", "carry_C",
                 "_launch_cache", "__weakref__")

    def __init__(self, *, block_len: int, hops: int | None, position, w, g, carry_v, carry_C,
                 layer=None):
        self.block_len = block_len
        self.hops = hops
        self.layer = layer
        self.position = position
        self.w = w
        self.g = g
        self.carry_v = carry_v
        self.carry_C = carry_C
        self._launch_cache: dict = {}  # prepared kernel launches over these arrays

    # ------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def initial(cls, shape, *, block_len=16, hops=1, x0=None, xp=np, dtype=np.float64,
                layer=None) -> SWRState:
        """The state before the first token of every row, optionally with an initial carry
        ``x0`` ``(B, H, D)``."""
        shape = tuple(int(s) for s in shape)
        cv, cC = reference.initial_carriers(shape, hops, x0, xp=xp, dtype=dtype)
        return cls(
            block_len=block_len,
            hops=hops,
            position=xp.zeros(shape[:1], dtype=np.int64),
            w=xp.zeros(shape, dtype=dtype),
            g=xp.ones(shape, dtype=dtype),
            carry_v=cv,
            carry_C=cC,
            layer=layer,
        )

    # ------------------------------------------------------------------------------------------
    # static description

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, H, D)``."""
        return tuple(self.w.shape)

    @property
    def dtype(self):
        """The float dtype of the state arrays (float64 on NumPy, float32 on the GPU)."""
        return self.w.dtype

    @property
    def backend(self) -> str:
        return "numpy" if isinstance(self.w, np.ndarray) else "cupy"

    @property
    def device(self) -> int | None:
        """The CUDA device of the arrays (None on NumPy)."""
        return None if isinstance(self.w, np.ndarray) else self.w.device.id

    def arrays(self) -> tuple:
        """``(position, w, g, carry_v, carry_C)``."""
        return self.position, self.w, self.g, self.carry_v, self.carry_C

    def _arrivals(self):
        """The step kernels' per-row arrival counters ``(B,)`` int32 (0 between steps),
        allocated on the first step."""
        arr = self._launch_cache.get("arrivals")
        if arr is None:
            xp = _xp_of(self.w)
            if xp is np:
                arr = np.zeros(self.shape[:1], np.int32)
            else:
                from ._cuda import cupy_pool

                with xp.cuda.Device(self.w.device.id), cupy_pool(xp):
                    arr = xp.zeros(self.shape[:1], np.int32)
            self._launch_cache["arrivals"] = arr
        return arr

    def __repr__(self) -> str:
        return (f"SWRState(shape={self.shape}, block_len={self.block_len}, hops={self.hops}, "
                f"layer={self.layer!r}, backend={self.backend}, dtype={self.dtype})")

    # ------------------------------------------------------------------------------------------
    # the prefill path: rows that share one position (reads the position on the host)

    def common_position(self) -> int:
        """The position every row shares, as a Python int (a host read of ``position``).

        Raises ValueError when rows are at different positions: a multi-token ``swr``/``phalanx``
        call continues all rows from one position (decode mixed rows with a step).
        """
        pos = np.asarray(self.position.get() if hasattr(self.position, "get") else self.position)
        if pos.size == 0:
            return 0
        first = int(pos[0])
        if not (pos == first).all():
            raise ValueError("state rows are at different positions "
                             f"({sorted(set(pos.tolist()))[:8]}...): a multi-token call needs "
                             "rows that share one position; decode them with a step")
        return first

    @property
    def offset(self) -> int:
        """In-block position of the next token of every row (rows must share a position)."""
        return self.common_position() % self.block_len

    def carry(self):
        return self.carry_v, self.carry_C

    def advanced(self, n, v, C, S, xp, position=None) -> SWRState:
        """A new state: this one after ``n`` more tokens (every row at ``position``, default
        :meth:`common_position`) whose touched blocks had carriers v, C and carries S
        (``(B, H, D, nb)``, possibly only the trailing blocks)."""
        start = self.common_position() if position is None else position
        new = SWRState(block_len=self.block_len, hops=self.hops, layer=self.layer,
                       position=self.position + n, w=self.w.copy(), g=self.g.copy(),
                       carry_v=self.carry_v, carry_C=self.carry_C)
        if n == 0:
            new.carry_v, new.carry_C = self.carry_v.copy(), self.carry_C.copy()
            return new
        end = start + n
        new.carry_v, new.carry_C = reference.advance_carriers(
            self.carry(), v, C, S, position=start, n=n, block_len=self.block_len,
            hops=self.hops, xp=xp)
        if end % self.block_len:
            new.w = xp.ascontiguousarray(v[..., -1], dtype=self.dtype)
            new.g = xp.ascontiguousarray(C[..., -1], dtype=self.dtype)
        else:
            new.w, new.g = xp.zeros_like(self.w), xp.ones_like(self.g)
        new.carry_v = xp.ascontiguousarray(new.carry_v, dtype=self.dtype)
        new.carry_C = xp.ascontiguousarray(new.carry_C, dtype=self.dtype)
        return new

    def assign(self, other: SWRState) -> SWRState:
        """Copy ``other``'s arrays into this state's storage (same configuration and shapes);
        returns self."""
        for dst, src in zip(self.arrays(), other.arrays()):
            dst[...] = src
        return self

    # ------------------------------------------------------------------------------------------
    # row management (continuous batching): in place, other rows untouched

    def _rows(self, rows, name="rows"):
        xp = _xp_of(self.w)
        B = self.shape[0]
        if isinstance(rows, numbers.Integral) and not isinstance(rows, bool):
            rows = [rows]
        idx = np.asarray(rows.get() if hasattr(rows, "get") else rows)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise TypeError(f"{name} must be an int or a 1-D sequence of ints, got {rows!r}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= B):
            raise ValueError(f"{name} must be in [0, {B}), got {idx.tolist()}")
        return idx if xp is np else xp.asarray(idx)

    def reset_rows(self, rows, x0=None) -> SWRState:
        """Put ``rows`` (an int or a 1-D sequence of row indices) back before their first token,
        with the initial carry ``x0`` (``(len(rows), H, D)``; default 0); returns self."""
        idx = self._rows(rows)
        n = int(idx.shape[0])
        xp = _xp_of(self.w)
        if x0 is not None:
            if _xp_of(x0) is not xp:
                raise TypeError("x0 must live on the state's backend")
            if tuple(x0.shape) != (n,) + self.shape[1:]:
                raise ValueError(f"x0 must have shape {(n,) + self.shape[1:]}, got {x0.shape}")
        if n == 0:
            return self
        self.position[idx] = 0
        self.w[idx] = 0.0
        self.g[idx] = 1.0
        self.carry_v[idx] = 0.0
        self.carry_C[idx] = 0.0
        if x0 is not None and self.carry_v.shape[-1]:
            self.carry_v[idx, ..., 0] = x0
        return self

    def load_rows(self, rows, other: SWRState, src_rows=None) -> SWRState:
        """Copy rows ``src_rows`` of ``other`` (default: all of them, in order) into ``rows`` of
        this state, e.g. a new prompt's prefill state into a free slot; returns self.

        ``other`` must have this state's configuration (block_len, hops, layer, H, D, dtype,
        backend and device); its batch may differ.
        """
        if not isinstance(other, SWRState):
            raise TypeError(f"other must be an SWRState, got {type(other).__name__}")
        check_compatible(other, self, name="other")
        idx = self._rows(rows)
        src = (self._rows_of(other, range(other.shape[0])) if src_rows is None
               else other._rows(src_rows, name="src_rows"))
        if int(idx.shape[0]) != int(src.shape[0]):
            raise ValueError(f"rows and src_rows must have one length, got {int(idx.shape[0])} "
                             f"and {int(src.shape[0])}")
        for dst, s in zip(self.arrays(), other.arrays()):
            dst[idx] = s[src]
        return self

    @staticmethod
    def _rows_of(state, rows):
        return state._rows(list(rows))


def check_compatible(state: SWRState, like: SWRState, *, name="state") -> None:
    """Raise unless ``state`` has ``like``'s configuration (all but the batch size)."""
    if state.block_len != like.block_len or state.hops != like.hops:
        raise ValueError(f"{name} was made with block_len={state.block_len}, hops={state.hops}, "
                         f"not block_len={like.block_len}, hops={like.hops}")
    if state.layer != like.layer:
        raise ValueError(f"{name} was made by {state.layer!r}, not {like.layer!r}")
    if state.shape[1:] != like.shape[1:]:
        raise ValueError(f"{name} has heads x head_dim {state.shape[1:]}, not {like.shape[1:]}")
    if state.backend != like.backend or state.device != like.device:
        raise TypeError(f"{name} lives on {state.backend} device {state.device}, not "
                        f"{like.backend} device {like.device}")
    if state.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {state.dtype}, not {like.dtype}")
