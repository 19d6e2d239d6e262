"""Quick launch-tuning sweep of the SWR kernels on the GPU (bf16, hops=1, l=16, H=128 x D=16,
per-head a), one size: the forward's TUNING knobs and the backward's (the channel kernels'
TUNING, against the lane-walk kernel).

    python scripts/swr_sweep.py [--size 16x2048]

CUDA events around 20 back-to-back kernel calls, median of 7 runs; every variant's output is
compared with the default's (max relative difference). The floor is bytes moved over the
device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import statistics
import sys


def gpu_time(fn, runs=7, calls=20):
    """Median ms per call of ``calls`` back-to-back calls (swr_array.bench's CUDA-event timing)."""
    from swr_array.bench import CupyTimer, time_calls

    return statistics.median(time_calls(lambda _: fn(), 1, CupyTimer(), runs=runs, calls=calls,
                                        warmup=1))


def rel(x, r):
    import cupy as cp

    x, r = x.astype(cp.float32), r.astype(cp.float32)
    return float(cp.abs(x - r).max() / cp.abs(r).max())


def try_knobs(label, tuning, grid, run, diff, floor):
    """Run and time ``run`` under each dict of ``grid`` set into ``tuning`` (restored after
    each); ``diff()`` compares the output it wrote with the default's."""
    saved = dict(tuning)
    for knobs in grid:
        for k, v in knobs.items():
            tuning[k] = v  # item by item: a TUNING's version counts assignments
        try:
            d = diff(run)
            t = gpu_time(run)
            print(f"  {label} {knobs}: {t:.4f} ms ({t / floor:.2f}x) diff {d:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"  {label} {knobs}: failed {exc}", flush=True)
        for k, v in saved.items():
            tuning[k] = v


def sweep(layout, B, L, bw, dtype="bf16", block_len=16, backward=True, forward=True, hops=1,
          per_channel=False, grids=True):
    import cupy as cp
    import ml_dtypes
    SB = importlib.import_module("swr_array.numba_kernels.swr_backward")
    SF = importlib.import_module("swr_array.numba_kernels.swr_forward")

    bf16 = ml_dtypes.bfloat16 if dtype == "bf16" else cp.float32
    H, D = 128, 16
    rng = cp.random.default_rng(1)
    shape = (B, L, H, D) if layout == "BLHD" else (B, H, D, L)
    ashape = shape if per_channel else ((B, L, H) if layout == "BLHD" else (B, H, L))
    u = rng.standard_normal(shape, dtype=cp.float32).astype(bf16)
    dy = rng.standard_normal(shape, dtype=cp.float32).astype(bf16)
    a = (0.5 + 0.5 * rng.random(ashape, dtype=cp.float32)).astype(bf16)
    y = cp.empty_like(u)
    du, da = cp.empty_like(u), cp.empty_like(a)
    carry = cp.zeros((B, H, D), cp.float32)
    ones = cp.ones((B, H, D), cp.float32)
    kw = dict(layout=layout, block_len=block_len, hops=hops, offset=0, w0=carry, g0=ones,
              carry=carry)
    floor_f = (u.nbytes * 2 + a.nbytes) / bw / 1e9
    floor_b = (u.nbytes * 3 + a.nbytes * 2) / bw / 1e9  # a, u, dy read; du, da written

    def fwd():
        SF.swr_forward(a, u, y, **kw)

    fwd()
    ref = y.copy()
    t = gpu_time(fwd)
    print(f"{layout} {dtype} hops={hops} l={block_len} fwd default: {t:.4f} ms "
          f"({t / floor_f:.2f}x floor {floor_f:.4f})", flush=True)

    def fwd_diff(run):
        y[...] = cp.nan
        run()
        return rel(y, ref)

    if not forward or not grids:
        grid = []
    elif layout == "BLHD":
        grid = [dict(blhd_share_chunks=ch, blhd_share_chunk_steps=cs, blhd_unroll=un,
                     blhd_share_lanes=ln)
                for ch, cs, un, ln in ((4, 64, 8, 32), (8, 64, 8, 32), (4, 128, 8, 32),
                                       (8, 64, 4, 32), (4, 48, 8, 32), (4, 96, 8, 32),
                                       (2, 64, 8, 64), (8, 32, 8, 16), (4, 64, 8, 64))]
        grid += [dict(blhd_unroll=un) for un in (8,)]
        if block_len >= 32:  # the plain walk's chunks (each re-walks a block), the shared walk
            grid += [dict(blhd_chunk_steps=cs, blhd_unroll=un, blhd_threads_per_block=tp)
                     for cs, un, tp in ((128, 8, 256), (256, 8, 256), (128, 16, 256),
                                        (256, 16, 256), (256, 16, 128), (512, 16, 256),
                                        (256, 32, 256))]
            grid += [dict(blhd_share_lanes=ln, blhd_share_chunks=ch, blhd_share_chunk_steps=cs,
                          blhd_share_max_bytes=200 * 1024)
                     for ln, ch, cs in ((16, 4, 2 * block_len), (32, 4, 2 * block_len),
                                        (16, 8, block_len))]
    else:
        # the lane scan, then the row scan (hops 0/1 per head) by rows, stages, threads
        grid = [dict(bhdl_row_scan=False, bhdl_stages=st, threads_per_sm=ts)
                for st, ts in itertools.product((4,), (2048, 4096))]
        grid += [dict(bhdl_row_scan=True, bhdl_scan_rows=r, bhdl_stages=st, threads_per_sm=ts)
                 for r, st, ts in itertools.product((2, 4, 8), (3, 4, 6), (2048, 4096))]
    try_knobs("fwd", SF.TUNING, grid, fwd, fwd_diff, floor_f)

    if not backward:
        return

    def bwd(**opt):
        SB.swr_backward(a, u, dy, du, da, layout=layout, block_len=block_len, hops=hops,
                        carry=carry, **opt)

    bwd()
    ref_du, ref_da = du.copy(), da.copy()
    t = gpu_time(bwd)
    print(f"{layout} bwd default: {t:.4f} ms ({t / floor_b:.2f}x floor {floor_b:.4f})",
          flush=True)

    def bwd_diff(run):
        du[...] = cp.nan
        run()
        return max(rel(du, ref_du), rel(da, ref_da))

    def walk():
        bwd(variant="walk")

    d = bwd_diff(walk)
    t = gpu_time(walk)
    print(f"  bwd lane-walk kernel: {t:.4f} ms ({t / floor_b:.2f}x) diff {d:.1e}", flush=True)
    if layout == "BLHD":
        grid = [dict(channel_chunk_steps=cs, channel_threads_per_block=tp, channel_unroll=un,
                     channel_access_bytes=ab, staged=False)
                for cs, tp, un, ab in ((256, 256, 8, 16), (128, 256, 8, 16))]
        # the staged kernel (swr_backward_staged)
        grid += [dict(staged=True, staged_chunk_steps=cs, staged_threads_per_block=tp,
                      staged_unroll=un)
                 for cs, tp, un in ((256, 128, 8), (256, 64, 8), (192, 128, 8), (256, 128, 4))]
    else:
        grid = [dict(row_scan=False, rows_depth=2, rows_chunk_steps=cs) for cs in (512,)]
        # the row scan (swr_backward_rowscan)
        grid += [dict(row_scan=True, row_scan_depth=dp, row_scan_threads_per_sm=ts,
                      row_scan_warps=wp, row_scan_stages=0)
                 for dp, ts, wp in ((1, 1024, 2), (2, 1024, 2))]
        # ... with its loads through the cp.async ring
        # (a power of two of rows), and launch bounds that cap its registers
        grid += [dict(row_scan=True, row_scan_stages=st, row_scan_threads_per_sm=ts,
                      row_scan_warps=wp, row_scan_min_blocks=mb)
                 for st, ts, wp, mb in ((4, 2048, 2, 0), (4, 1024, 2, 0), (8, 2048, 2, 0),
                                        (4, 4096, 2, 0), (4, 2048, 4, 0), (4, 2048, 2, 8))]
    try_knobs("bwd", SB.TUNING, grid if grids else [], bwd, bwd_diff, floor_b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="16x2048")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--block-len", type=int, default=16)
    ap.add_argument("--hops", type=int, default=1, choices=(0, 1))
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--layouts", default="BLHD,BHDL")
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--backward-only", action="store_true")
    ap.add_argument("--defaults-only", action="store_true",
                    help="time the default launches only, no knob grids")
    args = ap.parse_args()
    import cupy as cp

    B, L = (int(p) for p in args.size.split("x"))
    buf = cp.empty(256 * 2**20 // 4, cp.float32)
    dst = cp.empty_like(buf)
    t = gpu_time(lambda: dst.__setitem__(Ellipsis, buf))
    bw = 2 * buf.nbytes / t / 1e9
    print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), f"copy {bw:.2f} TB/s")
    for layout in args.layouts.split(","):
        sweep(layout, B, L, bw, args.dtype, args.block_len, not args.forward_only,
              not args.backward_only, args.hops, args.per_channel, not args.defaults_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
