"""Time the PyTorch adapter against the front on CuPy, on the same GPU buffers (issue sizes).

    python benchmarks/adapters_bench.py      # GPU only; prints a table (CUDA events, medians)
"""

from __future__ import annotations

import statistics

import cupy as cp
import torch
from swr_array.adapters import torch as swr_torch

import swr_array as sa


def timed(fn, reps=20, runs=7):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / reps)
    return statistics.median(out)


def main():
    print(f"device: {torch.cuda.get_device_name()}")
    print("| B x L | path | fwd ms | fwd+bwd ms |")
    print("|---|---|---:|---:|")
    for B, L in ((16, 2048), (4, 8192), (1, 32768), (1, 64)):
        measure(B, L)


def measure(B, L):
    """One table row pair: the front and the torch adapter on the same buffers."""
    H, D = (128, 16) if L > 64 else (2, 16)
    u = torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16)
    a = torch.rand(B, L, H, device="cuda", dtype=torch.bfloat16) * 0.1 + 0.9
    dy = torch.randn_like(u)
    ut, at = u.clone().requires_grad_(), a.clone().requires_grad_()
    cu, ca, cdy = cp.from_dlpack(u), cp.from_dlpack(a), cp.from_dlpack(dy)
    stream = cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

    def front_fwd():
        with stream:
            sa.swr(ca, cu, layout="BLHD")

    def front_fb():
        with stream:
            sa.swr(ca, cu, layout="BLHD")
            sa.swr_vjp(ca, cu, cdy, layout="BLHD")

    def torch_fwd():
        with torch.no_grad():
            swr_torch.swr(a, u, layout="BLHD")

    def torch_fb():
        y = swr_torch.swr(at, ut, layout="BLHD")
        torch.autograd.grad(y, (at, ut), dy)

    rows = (
        ("front (CuPy)", front_fwd, front_fb),
        ("torch adapter", torch_fwd, torch_fb),
    )
    for name, f, fb in rows:
        print(f"| {B} x {L} | {name} | {timed(f):.3f} | {timed(fb):.3f} |")


if __name__ == "__main__":
    main()
