"""Forward time of the BLHD halo walk (hops 2..8) against the memory floor, per chunk length.

``python scripts/hops_sweep.py``: bf16, 128 heads x 16 channels, per-head a, at 16x2048, 4x8192
and 1x32768, for ``TUNING["blhd_halo_chunk_blocks_per_hop"]`` in 2, 4, 8, 16 (the re-walked
share of reads against the threads in flight). The floor: a and u read and y written at the
device-to-device copy bandwidth measured here.
"""

from __future__ import annotations

import cupy as cp
import numpy as np
from swr_array.numba_kernels import swr_forward as F

import swr_array as sa
from swr_array.bench import _cast


def _time(fn, calls=20, runs=5):
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    fn()
    times = []
    for _ in range(runs):
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / calls)
    return float(np.median(times))


def main():
    buf = cp.empty(1 << 30, cp.uint8)
    dst = cp.empty_like(buf)
    bandwidth = 2 * buf.nbytes / _time(lambda: cp.copyto(dst, buf)) * 1e3  # bytes/s
    buf = dst = None  # give the 2 GiB back
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    H, D = 128, 16
    for B, L in ((16, 2048), (4, 8192), (1, 32768)):
        gen = cp.random.default_rng(0)
        u = _cast(cp, gen.standard_normal((B, L, H, D), dtype=cp.float32), "bfloat16")
        a = _cast(cp, gen.uniform(0.9, 1.0, (B, L, H)).astype(cp.float32), "bfloat16")
        y = cp.empty_like(u)
        floor_ms = (a.nbytes + 2 * u.nbytes) / bandwidth * 1e3
        for hops in (1, 2, 4, 8):
            row = []
            for per_hop in (8,) if hops == 1 else (2, 4, 8, 16):
                F.TUNING["blhd_halo_chunk_blocks_per_hop"] = per_hop
                kw = dict(block_len=16, hops=hops, layout="BLHD", out=y)
                ms = _time(lambda: sa.swr(a, u, **kw))  # noqa: B023
                row.append(f"per_hop {per_hop}: {ms:.4f} ms = {ms / floor_ms:.2f}x")
            print(f"{B}x{L} hops={hops} floor {floor_ms:.4f} ms | " + " | ".join(row), flush=True)
    F.TUNING["blhd_halo_chunk_blocks_per_hop"] = 8


if __name__ == "__main__":
    main()
