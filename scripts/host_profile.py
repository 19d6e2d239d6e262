"""Host cost per call on a tiny input (GPU machine): the front on CuPy, the torch adapter's `swr`
and its custom op called directly, then a cProfile of the torch forward+backward (what is left).

    python scripts/host_profile.py        # medians of 1000 single calls, perf_counter
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time

import cupy as cp
import torch
from swr_array.adapters import torch as swr_torch

import swr_array as sa


def median_us(fn, n=1000, warm=50):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main():
    print(f"device: {torch.cuda.get_device_name()}")
    B, N, H, D = 1, 64, 4, 16
    u = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
    a = torch.rand(B, N, H, device="cuda", dtype=torch.bfloat16) * 0.1 + 0.9
    dy = torch.randn_like(u)
    ag, ug = a.clone().requires_grad_(), u.clone().requires_grad_()
    ca, cu, cdy = cp.from_dlpack(a), cp.from_dlpack(u), cp.from_dlpack(dy)
    kw = dict(layout="BLHD")

    def torch_fb():
        y = swr_torch.swr(ag, ug, **kw)
        torch.autograd.grad(y, (ag, ug), dy)

    def op_fb():  # the custom op (what torch.compile sees), called eagerly
        y = swr_torch._swr_op(ag, ug, None, 16, 1, "BLHD", None)
        torch.autograd.grad(y, (ag, ug), dy)

    rows = {
        "front swr (CuPy)": lambda: sa.swr(ca, cu, **kw),
        "front swr_vjp (CuPy)": lambda: sa.swr_vjp(ca, cu, cdy, **kw),
        "torch swr, no grad": lambda: swr_torch.swr(a, u, **kw),
        "torch swr fwd+bwd (autograd.grad)": torch_fb,
        "torch custom op, no grad": lambda: swr_torch._swr_op(a, u, None, 16, 1, "BLHD", None),
        "torch custom op fwd+bwd": op_fb,
        "torch elementwise u * 2": lambda: u * 2,
        "torch elementwise fwd+bwd (autograd.grad)": lambda: torch.autograd.grad(ug * 2, ug, dy),
    }
    for name, fn in rows.items():
        print(f"{name:<36s} {median_us(fn):8.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        torch_fb()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
