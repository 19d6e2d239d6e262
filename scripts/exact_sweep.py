"""The one-pass exact scan (hops=None) against the memory floor, per tile shape and look-back.

``python scripts/exact_sweep.py [seconds]``: bf16, 128 heads x 16 channels, per-head a, at
1x32768 (the longest chains of the benchmark's sizes), both layouts: the forward (``swr_exact``;
floor: a and u read, y written) and the gradient (``swr_exact_vjp``; floor: a, u, dy read, du,
da written) for a few settings of ``exact_scan.TUNING`` (tile shapes, ``lookback_window``,
``warp_scan``, ``speculate``); the first row of each list is the defaults. The floor uses the
device-to-device copy bandwidth measured here. Every kernel is first compiled in a process pool
(the PTX disk cache), then timed one after the other; stops after the given seconds (default
40). Each output is compared with the first setting's (relative difference).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

FWD = {
    "BLHD": [dict(blhd_cols=c, blhd_segs=s, blhd_steps=t, lookback_window=w, warp_scan=x)
             for c, s, t, w, x in ((8, 16, 8, 1, 1), (8, 16, 8, 0, 1), (8, 16, 8, 1, 0),
                                   (4, 32, 8, 1, 1), (8, 16, 16, 1, 1), (4, 64, 8, 1, 1))],
    "BHDL": [dict(bhdl_rows=r, bhdl_segs=s, bhdl_nv=v, lookback_window=w, warp_scan=x)
             for r, s, v, w, x in ((4, 32, 4, 1, 1), (4, 32, 4, 0, 1), (4, 32, 4, 1, 0),
                                   (4, 32, 2, 1, 1), (4, 32, 8, 1, 1))],
}
BWD = {
    "BLHD": [dict(blhd_cols=c, blhd_segs=s, blhd_bwd_steps=t, lookback_window=w, warp_scan=x)
             for c, s, t, w, x in ((8, 16, 4, 1, 1), (8, 16, 4, 0, 1), (8, 16, 4, 1, 0),
                                   (4, 32, 4, 1, 1), (8, 16, 8, 1, 1))],
    "BHDL": [dict(bhdl_rows=r, bhdl_segs=s, bhdl_bwd_nv=v, lookback_window=w, warp_scan=x)
             for r, s, v, w, x in ((4, 32, 2, 1, 1), (4, 32, 2, 0, 1), (4, 32, 2, 1, 0),
                                   (4, 32, 4, 1, 1))],
}
# the defaults loading only after the ticket (the label's last value)
for _table in (FWD, BWD):
    for _cfgs in _table.values():
        _cfgs.insert(1, dict(_cfgs[0], speculate=False))
H, D = 128, 16
SIZES = ((1, 32768),)


def _shape(layout, B, L):
    return (B, L, H, D) if layout == "BLHD" else (B, H, D, L)


def _compile(job):
    """Compile (into the PTX disk cache) the kernels of one setting (in a worker process)."""
    direction, layout, cfg = job
    from swr_array.numba_kernels import _launch
    from swr_array.numba_kernels import exact_scan as E

    for k, v in cfg.items():
        E.TUNING[k] = v
    shape = _shape(layout, 1, 32768)
    out = []
    try:
        if direction == "fwd":
            plan = E.make_plan(layout, shape, True, "bf16", "bf16")
            kernels = [(plan.kernel, E.signature("bf16", "bf16"))]
        else:
            fplan, bplan = E.make_backward_plans(layout, shape, True, "bf16")
            kernels = [(fplan.kernel, E.signature("bf16", "bf16")),
                       (bplan.kernel, E.backward_signature("bf16"))]
        for kernel, sig in kernels:
            _launch._cached_ptx(kernel, sig, (9, 0))
            out.append(kernel.py_func.__name__)
    except Exception as exc:  # noqa: BLE001 - reported, the timing skips it
        out.append(f"{type(exc).__name__}: {exc}")
    return out


def _runner(E, cp, direction, layout, av, uv, dyv, y, du, da, x0):
    """(the call to time, the output to compare)."""
    if direction == "fwd":
        return (lambda: E.swr_exact(av, uv, y.view(cp.uint16), x0, layout=layout)), y
    return (lambda: E.swr_exact_vjp(av, uv, dyv, du.view(cp.uint16), da.view(cp.uint16), x0,
                                    None, layout=layout)), du


def _time(cp, fn, calls=20, runs=5):
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
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 40.0
    t0 = time.time()
    jobs = [("fwd", lay, c) for lay in FWD for c in FWD[lay]]
    jobs += [("bwd", lay, c) for lay in BWD for c in BWD[lay]]
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) - 1))
    with ProcessPoolExecutor(workers) as pool:
        for job, names in zip(jobs, pool.map(_compile, jobs)):
            if any(":" in n for n in names):
                print("compile failed:", job, names, flush=True)
    print(f"compiled {len(jobs)} settings in {time.time() - t0:.1f} s", flush=True)

    import cupy as cp
    from swr_array.numba_kernels import exact_scan as E

    from swr_array.bench import _cast

    buf = cp.empty(1 << 30, cp.uint8)
    dst = cp.empty_like(buf)
    bandwidth = 2 * buf.nbytes / _time(cp, lambda: cp.copyto(dst, buf)) * 1e3  # bytes/s
    buf = dst = None
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    saved = dict(E.TUNING)
    bits = lambda x: (x.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32)  # noqa: E731
    for B, L in SIZES:
        gen = cp.random.default_rng(0)
        for direction, table in (("fwd", FWD), ("bwd", BWD)):
            for layout, cfgs in table.items():
                shape = _shape(layout, B, L)
                ashape = (B, L, H) if layout == "BLHD" else (B, H, L)
                u = _cast(cp, gen.standard_normal(shape, dtype=cp.float32), "bfloat16")
                dy = _cast(cp, gen.standard_normal(shape, dtype=cp.float32), "bfloat16")
                a = _cast(cp, gen.uniform(0.9, 1.0, ashape).astype(cp.float32), "bfloat16")
                x0 = cp.zeros((B, H, D), cp.float32)
                y, du, da = cp.empty_like(u), cp.empty_like(u), cp.empty_like(a)
                uv, av, dyv = u.view(cp.uint16), a.view(cp.uint16), dy.view(cp.uint16)
                nbytes = a.nbytes + 2 * u.nbytes
                if direction == "bwd":
                    nbytes = 2 * a.nbytes + 3 * u.nbytes
                floor_ms = nbytes / bandwidth * 1e3
                row, ref = [], None
                for cfg in cfgs:
                    if time.time() - t0 > budget:
                        row.append("(out of time)")
                        break
                    for k, v in cfg.items():
                        E.TUNING[k] = v
                    fn, out = _runner(E, cp, direction, layout, av, uv, dyv, y, du, da, x0)
                    label = ",".join(str(int(v)) for v in cfg.values())
                    try:
                        ms = _time(cp, fn)
                    except Exception as exc:  # noqa: BLE001
                        row.append(f"({label}): {type(exc).__name__}")
                        continue
                    got = bits(out)
                    if ref is None:
                        ref = got.copy()
                    diff = float(cp.max(cp.abs(got - ref) / (1 + cp.abs(ref))))
                    row.append(f"({label}) {ms:.4f} ms {ms / floor_ms:.2f}x d{diff:.0e}")
                    print(f"  {direction} {B}x{L} {layout} {row[-1]}", flush=True)
                    for k, v in saved.items():
                        E.TUNING[k] = v
                keys = ",".join(k.split("_", 1)[1] for k in cfgs[0])
                print(f"{direction} {B}x{L} {layout} floor {floor_ms:.4f} ms [{keys}] | "
                      + " | ".join(row), flush=True)
                u = dy = a = y = du = da = None
    for k, v in saved.items():
        E.TUNING[k] = v


if __name__ == "__main__":
    main()
