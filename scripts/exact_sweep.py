"""Forward time of the one-pass exact scan (hops=None) against the memory floor, per tile shape.

``python scripts/exact_sweep.py [seconds]``: bf16, 128 heads x 16 channels, per-head a, at 16x2048
and 1x32768, both layouts, over a few ``exact_scan.TUNING`` tile shapes (BLHD: channel vectors
a row ``blhd_cols``, segments ``blhd_segs``, tokens a segment ``blhd_steps``; BHDL: rows
``bhdl_rows``, segments ``bhdl_segs``, 16-byte accesses a segment ``bhdl_nv``; then whether the
look-back reads a window of tiles at once, ``lookback_window``); stops after the
given seconds (default 25). The floor: a and u read and y written at the device-to-device copy
bandwidth measured here. Each shape's y is compared with the first shape's (relative difference).
"""

from __future__ import annotations

import sys
import time

import cupy as cp
import numpy as np
from swr_array.numba_kernels import exact_scan as E

from swr_array.bench import _cast

# tile shape, then TUNING["lookback_window"]
BLHD = [(8, 16, 8, False), (8, 16, 8, True), (4, 32, 8, True), (8, 32, 4, True), (16, 8, 8, False)]
BHDL = [(4, 32, 2, False), (4, 32, 2, True), (8, 16, 2, True), (2, 32, 4, False)]


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
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 25.0
    t0 = time.time()
    buf = cp.empty(1 << 30, cp.uint8)
    dst = cp.empty_like(buf)
    bandwidth = 2 * buf.nbytes / _time(lambda: cp.copyto(dst, buf)) * 1e3  # bytes/s
    buf = dst = None
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    H, D = 128, 16
    saved = dict(E.TUNING)
    for B, L in ((1, 32768), (16, 2048)):
        gen = cp.random.default_rng(0)
        for layout in ("BLHD", "BHDL"):
            shape = (B, L, H, D) if layout == "BLHD" else (B, H, D, L)
            ashape = (B, L, H) if layout == "BLHD" else (B, H, L)
            u = _cast(cp, gen.standard_normal(shape, dtype=cp.float32), "bfloat16")
            a = _cast(cp, gen.uniform(0.9, 1.0, ashape).astype(cp.float32), "bfloat16")
            x0 = cp.zeros((B, H, D), cp.float32)
            y = cp.empty_like(u)
            floor_ms = (a.nbytes + 2 * u.nbytes) / bandwidth * 1e3
            ref = None
            keys = (("blhd_cols", "blhd_segs", "blhd_steps") if layout == "BLHD"
                    else ("bhdl_rows", "bhdl_segs", "bhdl_nv")) + ("lookback_window",)
            row = []
            for shape_t in BLHD if layout == "BLHD" else BHDL:
                if time.time() - t0 > budget:
                    row.append("(out of time)")
                    break
                for k, v in zip(keys, shape_t):
                    E.TUNING[k] = v
                uv, av, yv = u.view(cp.uint16), a.view(cp.uint16), y.view(cp.uint16)
                try:
                    ms = _time(lambda: E.swr_exact(av, uv, yv, x0, layout=layout))  # noqa: B023
                except Exception as exc:  # noqa: BLE001
                    row.append(f"{shape_t}: {type(exc).__name__}")
                    continue
                got = (y.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32)
                if ref is None:
                    ref = got
                diff = float(cp.max(cp.abs(got - ref) / (1 + cp.abs(ref))))
                row.append(f"{shape_t}: {ms:.4f} ms = {ms / floor_ms:.2f}x (diff {diff:.1e})")
            print(f"{B}x{L} {layout} floor {floor_ms:.4f} ms | " + " | ".join(row), flush=True)
            for k, v in saved.items():
                E.TUNING[k] = v


if __name__ == "__main__":
    main()
