"""Times the hops=None two-pass forward (numba_kernels/swr_exact.py) per launch setting on a GPU.

    python scripts/hops_exact_sweep.py [--seconds 25]

16-bit inputs (float16 values passed as 16-bit words), 128 heads x 16, per-head a, both
layouts, 16x2048 / 4x8192 / 1x32768: for each TUNING variant the median of CUDA-event timings
of one call, and that time over the floor (the bytes of a and u read and y written once, at the
bandwidth of a device-to-device copy of u measured here). Prints one line a case; stops
starting new cases after --seconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

VARIANTS = (
    {},
    {"min_chunk_steps": 64},
    {"min_chunk_steps": 256},
    {"max_chunks": 64},
    {"threads_per_sm": 1024},
    {"threads_per_sm": 4096},
    {"unroll": 16},
    {"bhdl_unroll": 4},
)


def _time(fn, cp, reps=15):
    fn()
    times = []
    for _ in range(reps):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=25.0)
    args = parser.parse_args()
    import cupy as cp
    from swr_array.numba_kernels import swr_exact as E

    t_end = time.time() + args.seconds
    H, D = 128, 16
    defaults = dict(E.TUNING)
    for B, N in ((16, 2048), (4, 8192), (1, 32768)):
        for layout in ("BLHD", "BHDL"):
            u_shape = (B, N, H, D) if layout == "BLHD" else (B, H, D, N)
            a_shape = (B, N, H) if layout == "BLHD" else (B, H, N)
            gen = cp.random.default_rng(0)
            u = gen.standard_normal(u_shape, dtype=cp.float32).astype(cp.float16).view(cp.uint16)
            a = (gen.random(a_shape, dtype=cp.float32) * 0.99).astype(cp.float16).view(cp.uint16)
            y = cp.empty_like(u)
            carry = cp.zeros((B, H, D), cp.float32)
            copy_ms = _time(lambda: cp.copyto(y, u), cp)  # noqa: B023 - timed at once
            bandwidth = 2 * u.nbytes / copy_ms  # bytes per ms
            floor_ms = (2 * u.nbytes + a.nbytes) / bandwidth
            for variant in VARIANTS:
                if time.time() > t_end:
                    print("out of time")
                    return
                for key, value in {**defaults, **variant}.items():
                    E.TUNING[key] = value  # item by item: each bumps TUNING.version

                def call():
                    E.swr_forward_exact(a, u, y, layout=layout, carry=carry)  # noqa: B023

                ms = _time(call, cp)
                name = ",".join(f"{k}={v}" for k, v in variant.items()) or "default"
                print(f"{B}x{N} {layout} {name:24s} {ms:8.4f} ms  floor {floor_ms:.4f} ms  "
                      f"x{ms / floor_ms:.2f}", flush=True)
    for key, value in defaults.items():
        E.TUNING[key] = value


if __name__ == "__main__":
    main()
