"""The state that lets a later call continue a sliding window recurrence exactly."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import reference


@dataclass(frozen=True)
class SWRState:
    """What a later ``swr``/``swr_step`` call needs to continue exactly (docs/spec.md#state).

    All arrays share the backend of the inputs (NumPy or CuPy) and have the canonical channel
    shape ``(B, H, D)``; float64 on the NumPy reference, float32 on the GPU.

    Attributes:
        position: tokens consumed so far (absolute index of the next token).
        block_len, hops: the configuration the state belongs to.
        w: local solve of the current partial block at the last consumed token (0 at a boundary).
        g: attenuation of the current partial block at the last consumed token (1 at a boundary).
        carry_v: ``(B, H, D, K)`` carriers of the most recent complete blocks, newest first
            (x0 is the carrier of block -1); for hops=None ``carry_v[..., 0]`` is the running s.
        carry_C: ``(B, H, D, K)`` their compound attenuations, newest first.
    """

    position: int
    block_len: int
    hops: int | None
    w: Any
    g: Any
    carry_v: Any
    carry_C: Any

    @property
    def offset(self) -> int:
        """In-block position of the next token."""
        return self.position % self.block_len

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.w.shape)

    @classmethod
    def initial(cls, shape, *, block_len=16, hops=1, x0=None, xp=np, dtype=np.float64):
        """The state before the first token, optionally with an initial carry ``x0`` (B, H, D)."""
        shape = tuple(shape)
        cv, cC = reference.initial_carriers(shape, hops, x0, xp=xp, dtype=dtype)
        return cls(
            position=0,
            block_len=block_len,
            hops=hops,
            w=xp.zeros(shape, dtype=dtype),
            g=xp.ones(shape, dtype=dtype),
            carry_v=cv,
            carry_C=cC,
        )

    def carry(self):
        return self.carry_v, self.carry_C

    def advanced(self, n, v, C, S, xp):
        """The state after ``n`` more tokens whose touched blocks had carriers v, C and carries S
        (``(B, H, D, nb)``, possibly only the trailing blocks)."""
        if n == 0:
            return self
        end = self.position + n
        cv, cC = reference.advance_carriers(
            self.carry(),
            v,
            C,
            S,
            position=self.position,
            n=n,
            block_len=self.block_len,
            hops=self.hops,
            xp=xp,
        )
        if end % self.block_len:
            w, g = xp.ascontiguousarray(v[..., -1]), xp.ascontiguousarray(C[..., -1])
        else:
            w, g = xp.zeros_like(self.w), xp.ones_like(self.g)
        return replace(self, position=end, w=w, g=g, carry_v=cv, carry_C=cC)
