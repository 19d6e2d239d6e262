"""Host cost per call on a tiny input (GPU machine): the front on CuPy, the torch adapter's `swr`
and its custom op called directly, then a cProfile of the torch forward+backward (what is left).

    python scripts/host_profile.py            # medians of 1000 single calls, perf_counter
    python scripts/host_profile.py --decode   # eager decoding steps (batch 1, dim 2048, bf16):
                                              # torch Phalanx.step (also batch 64), torch
                                              # swr_step, the CuPy front's swr_step /
                                              # swr_step_into, + cProfiles of Phalanx.step
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
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


def decode():
    """Eager decoding steps at batch 1, dim 2048 (128 heads of 16), bfloat16, ``out=`` given."""
    print(f"device: {torch.cuda.get_device_name()}")
    B, H, D = 1, 128, 16
    dt = torch.bfloat16
    layer = swr_torch.Phalanx(H * D, head_dim=D, device="cuda", dtype=dt)
    with torch.no_grad():
        state = layer.init_state(B)
        x = torch.randn(B, H * D, device="cuda", dtype=dt)
        out = torch.empty(B, H * D, device="cuda", dtype=dt)
        s = swr_torch.swr_init_state((B, H, D), device="cuda")
        a = torch.rand(B, H, device="cuda", dtype=dt)
        u = torch.randn(B, H, D, device="cuda", dtype=dt)
        y = torch.empty_like(u)
        cs = sa.swr_init_state((B, H, D), like=cp.zeros(1))
        ca, cu, cy = cp.from_dlpack(a), cp.from_dlpack(u), cp.from_dlpack(y)
        state64 = layer.init_state(64)
        x64 = torch.randn(64, H * D, device="cuda", dtype=dt)
        out64 = torch.empty(64, H * D, device="cuda", dtype=dt)
        state256 = layer.init_state(256)
        x256 = torch.randn(256, H * D, device="cuda", dtype=dt)
        out256 = torch.empty(256, H * D, device="cuda", dtype=dt)
        z256 = torch.empty(256, layer.in_proj_weight.shape[0], device="cuda", dtype=dt)
        rows = {
            "torch Phalanx.step (out=)": lambda: layer.step(x, state, out=out),
            "torch Phalanx.step B=64 (out=)": lambda: layer.step(x64, state64, out=out64),
            "torch Phalanx.step B=256 (out=)": lambda: layer.step(x256, state256, out=out256),
            "torch.mm B=256 x W_in^T (out=)": lambda: torch.mm(x256, layer.in_proj_weight.T,
                                                              out=z256),
            "torch F.linear B=256": lambda: torch.nn.functional.linear(x256,
                                                                      layer.in_proj_weight),
            "torch swr_step (out=)": lambda: swr_torch.swr_step(a, u, s, out=y),
            "front swr_step (CuPy, out=)": lambda: sa.swr_step(ca, cu, cs, layout="BLHD", out=cy),
            "front swr_step_into (CuPy)": lambda: sa.swr_step_into(ca, cu, cy, cs),
            "torch F.linear alone": lambda: torch.nn.functional.linear(x, layer.in_proj_weight),
        }
        for name, fn in rows.items():
            print(f"{name:<36s} {median_us(fn):8.1f} us")
        for name, (xx, st, oo) in (("batch 1", (x, state, out)),
                                   ("batch 64", (x64, state64, out64))):
            print(f"--- cProfile of 300 Phalanx.step calls, {name}")
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(300):
                layer.step(xx, st, out=oo)
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main():
    if "--decode" in sys.argv[1:]:
        decode()
        return
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
