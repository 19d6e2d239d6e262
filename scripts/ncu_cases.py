"""One launch of each SWR kernel at one size, for Nsight Compute (bf16, hops=1, l=16, 128 x 16,
per-head a):

    ncu --clock-control none --section SpeedOfLight --section Occupancy ... \\
        python3 scripts/ncu_cases.py [--size 4x8192] [--tuning staged=0]

Each kernel runs twice (the first call compiles and warms up); profile with ``--launch-skip``
or ``--kernel-name`` to take the second.
"""

from __future__ import annotations

import argparse
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="4x8192")
    ap.add_argument("--tuning", action="append", default=[], metavar="KEY=VALUE",
                    help="set a backward TUNING knob (int or string), e.g. staged=0")
    args = ap.parse_args()
    import importlib

    import cupy as cp
    import ml_dtypes

    SB = importlib.import_module("swr_array.numba_kernels.swr_backward")
    SF = importlib.import_module("swr_array.numba_kernels.swr_forward")

    for item in args.tuning:
        key, value = item.split("=", 1)
        SB.TUNING[key] = int(value) if value.lstrip("-").isdigit() else value
    B, L = (int(p) for p in args.size.split("x"))
    H, D = 128, 16
    rng = cp.random.default_rng(1)
    for layout in ("BLHD", "BHDL"):
        shape = (B, L, H, D) if layout == "BLHD" else (B, H, D, L)
        ashape = (B, L, H) if layout == "BLHD" else (B, H, L)
        u = rng.standard_normal(shape, dtype=cp.float32).astype(ml_dtypes.bfloat16)
        dy = rng.standard_normal(shape, dtype=cp.float32).astype(ml_dtypes.bfloat16)
        a = (0.5 + 0.5 * rng.random(ashape, dtype=cp.float32)).astype(ml_dtypes.bfloat16)
        y, du, da = cp.empty_like(u), cp.empty_like(u), cp.empty_like(a)
        carry = cp.zeros((B, H, D), cp.float32)
        ones = cp.ones((B, H, D), cp.float32)
        for _ in range(2):
            SF.swr_forward(a, u, y, layout=layout, block_len=16, hops=1, offset=0, w0=carry,
                           g0=ones, carry=carry)
        for _ in range(2):
            SB.swr_backward(a, u, dy, du, da, layout=layout, block_len=16, hops=1, carry=carry)
        cp.cuda.Device().synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
