# ruff: noqa: B023 - the closures run within the iteration that makes them
"""Launch-tuning sweep of the fused Phalanx kernels on the GPU (dim 2048, bf16, hops=1, l=16).

    python scripts/phalanx_dev.py [--sizes 16x2048,1x32768] [--grid quick|promising|full]
                                  [--fwd "bytes=16,8 unroll=2,4 chunk=64,128 threads=256
                                          minblocks=0,4"] [--bwd "..."] [--old OLD.py]
                                  [--profile]

For each size: the device-to-device copy bandwidth, then the forward and backward kernels for
each TUNING variant (CUDA events, median of runs of back-to-back calls), their bytes moved over
time as TB/s and as a fraction of the copy bandwidth measured in the same run, and the largest
relative difference of their outputs from the first variant's (and from an older version of the
module when ``--old`` names one). Prints one line per variant and the fastest of each kernel
per size last.

Knobs (``phalanx_fused.TUNING``, ``{fwd,bwd}_`` prefixed): ``bytes`` (access_bytes), ``unroll``,
``chunk`` (chunk_steps), ``threads`` (threads_per_block), ``minblocks`` (min_blocks: launch
bounds, 0 none), ``fast`` (fast_sigmoid: libdevice's approximate exp and division), ``ahead``
(forward only: prefetch_ahead, L2 prefetches that many load batches ahead), and backward only
``kernel`` (walk or rows) and ``rows`` (blocks a thread block of the rows kernel takes).
``--fwd`` / ``--bwd`` give a grid (every combination of the listed values; unlisted knobs keep
TUNING's value); otherwise ``--grid`` picks a preset: ``quick`` (TUNING as it is), ``promising`` (a
short list aimed at the occupancy, loads-in-flight and instruction limits ncu showed), ``rows``
(the forward as TUNING has it, the backward kernels side by side), ``full`` (a wide grid).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import sys


def gpu_time(fn, runs=15, calls=10):
    """Median ms per call of ``calls`` back-to-back calls (swr_array.bench's CUDA-event timing)."""
    from swr_array.bench import CupyTimer, time_calls

    return statistics.median(time_calls(lambda _: fn(), 1, CupyTimer(), runs=runs, calls=calls,
                                        warmup=1))


def load_old(path):
    text = open(path).read()
    text = text.replace("from ._dtypes", "from swr_array.numba_kernels._dtypes")
    text = text.replace("from ._launch", "from swr_array.numba_kernels._launch")
    text = text.replace("from ._ptx", "from swr_array.numba_kernels._ptx")
    spec = importlib.util.spec_from_loader("phalanx_fused_old", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(text, path, "exec"), mod.__dict__)
    return mod


def rel(a, b):
    import cupy as cp

    a, b = a.astype(cp.float32), b.astype(cp.float32)
    return float(cp.abs(a - b).max() / cp.maximum(cp.abs(b).max(), 1e-30))


KNOBS = {"bytes": "access_bytes", "unroll": "unroll", "chunk": "chunk_steps",
         "threads": "threads_per_block", "minblocks": "min_blocks", "fast": "fast_sigmoid",
         "ahead": "prefetch_ahead", "kernel": "kernel", "rows": "rows"}
TEXT_KNOBS = {"kernel"}

# TUNING updates: TUNING itself first, then variants aimed at ncu's limits (119 registers: 2
# blocks of 256 an SM, 25% occupancy; 1 wave of blocks; loads in flight only between batches;
# sigmoids most of the instructions)
PROMISING = {
    "fwd": [{}, {"fwd_fast_sigmoid": 1}, {"fwd_prefetch_ahead": 1}, {"fwd_prefetch_ahead": 2},
            {"fwd_fast_sigmoid": 1, "fwd_min_blocks": 3, "fwd_chunk_steps": 64},
            {"fwd_fast_sigmoid": 1, "fwd_min_blocks": 3, "fwd_prefetch_ahead": 2},
            {"fwd_fast_sigmoid": 1, "fwd_min_blocks": 4, "fwd_unroll": 1, "fwd_chunk_steps": 64,
             "fwd_prefetch_ahead": 2},
            {"fwd_fast_sigmoid": 1, "fwd_min_blocks": 4, "fwd_access_bytes": 8,
             "fwd_unroll": 4}],
    "bwd": [{"bwd_kernel": "walk"},
            {"bwd_kernel": "walk", "bwd_access_bytes": 8, "bwd_threads_per_block": 128},
            {"bwd_kernel": "walk", "bwd_access_bytes": 8, "bwd_threads_per_block": 128,
             "bwd_chunk_steps": 128},
            {"bwd_kernel": "walk", "bwd_access_bytes": 4},
            {"bwd_kernel": "walk", "bwd_chunk_steps": 128, "bwd_unroll": 2},
            {"bwd_kernel": "rows", "bwd_rows": 8, "bwd_min_blocks": 2}],
}
# the backward kernels side by side (the walking kernel as TUNING has it; with 8-byte accesses,
# 168 registers, in thread blocks of 128 (three an SM), chunks of 256 or 128 tokens; with 4-byte
# accesses, 128 registers, a warp's access 128 bytes as in the block-row kernel; chunks of 128
# tokens in two-token batches; block rows), the forward as TUNING has it
ROWS = {"fwd": [{}], "bwd": PROMISING["bwd"]}
FULL = {
    "fwd": "bytes=16,8 unroll=1,2,4 chunk=32,64,128,256 threads=128,256 minblocks=0,3,4 fast=0,1 "
           "ahead=0,1,2",
    "bwd": "kernel=walk bytes=16,8 unroll=1,2,4 chunk=128,256,512 threads=128,256 minblocks=0,2,3 "
           "fast=0,1",
}


def parse_grid(text, direction):
    """``"bytes=16,8 unroll=2"`` -> list of TUNING updates (every combination)."""
    axes = []
    for item in text.split():
        key, _, values = item.partition("=")
        if key not in KNOBS or not values:
            raise SystemExit(f"--{direction}: unknown knob {item!r} (knobs: {', '.join(KNOBS)})")
        axes.append([(f"{direction}_{KNOBS[key]}", v if key in TEXT_KNOBS else int(v))
                     for v in values.split(",") if v])
    return [dict(combo) for combo in itertools.product(*axes)]


def variants(args, direction):
    spec = getattr(args, direction)
    if spec:
        return parse_grid(spec, direction)
    if args.grid == "quick" or (args.quick and args.grid is None):
        return [{}]
    if args.grid == "full":
        return parse_grid(FULL[direction], direction)
    if args.grid == "rows":
        return [dict(u) for u in ROWS[direction]]
    return [dict(u) for u in PROMISING[direction]]


def label(update):
    return " ".join(f"{k.split('_', 1)[1]}={v}" for k, v in update.items()) or "TUNING"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16x2048,1x32768")
    ap.add_argument("--old", default=None)
    ap.add_argument("--quick", action="store_true", help="the same as --grid quick")
    ap.add_argument("--grid", choices=["quick", "promising", "rows", "full"], default=None,
                    help="preset grid (default: promising)")
    ap.add_argument("--fwd", default=None, help="forward grid, e.g. 'bytes=16 unroll=2,4'")
    ap.add_argument("--bwd", default=None, help="backward grid")
    ap.add_argument("--profile", action="store_true",
                    help="launch each variant once, untimed (for ncu -k ... --launch-count)")
    args = ap.parse_args(argv)
    import cupy as cp
    import ml_dtypes
    from swr_array.numba_kernels import phalanx_fused as PF

    old = load_old(args.old) if args.old else None
    bf16 = ml_dtypes.bfloat16
    dim, D = 2048, 16
    H = dim // D
    hd, width = H * D, 3 * H * D + H
    print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), flush=True)
    for size in args.sizes.split(","):
        B, L = (int(p) for p in size.split("x"))
        M = B * L
        rng = cp.random.default_rng(0)
        z = rng.standard_normal((M, width), dtype=cp.float32).astype(bf16)
        dy = rng.standard_normal((M, hd), dtype=cp.float32).astype(bf16)
        b_a, b_b, b_c = (rng.standard_normal(n, dtype=cp.float32).astype(bf16)
                         for n in (H, hd, hd))
        kw = dict(batch=B, length=L, heads=H, head_dim=D, kv_heads=H, decay_max=1.0,
                  block_len=16, hops=1)
        nb = -(-L // 16)
        buf = cp.empty(2 * M * (width + hd) * 2 // 4, cp.float32)
        dst = cp.empty_like(buf)
        t = gpu_time(lambda: dst.__setitem__(Ellipsis, buf))
        bw = 2 * buf.nbytes / t / 1e9
        print(f"{size}: copy {bw:.2f} TB/s", flush=True)
        fwd_bytes = M * (width + hd) * 2
        bwd_bytes = M * (2 * width + 2 * hd) * 2

        def timed(f):
            if args.profile:  # the one launch above is what ncu profiles
                cp.cuda.Device().synchronize()
                return float("nan")
            return gpu_time(f)

        def fwd(mod):
            y = cp.full((M, hd), cp.nan, cp.float32).astype(bf16)
            f = lambda: mod.phalanx_forward(z, b_a, b_b, b_c, y, **kw)  # noqa: E731
            f()
            return timed(f), y

        def bwd(mod):
            dz = cp.full((M, width), cp.nan, cp.float32).astype(bf16)
            y = cp.full((M, hd), cp.nan, cp.float32).astype(bf16)
            parts = cp.zeros((B * nb, width - hd), cp.float32)
            f = lambda: mod.phalanx_backward(z, dy, b_a, b_b, b_c, dz, y, parts, **kw)  # noqa
            f()
            return timed(f), (dz, y, parts.sum(0))

        ref_f = ref_b = None
        if old is not None:
            tf, ref_f = fwd(old)
            tb, ref_b = bwd(old)
            print(f"  old fwd {tf:.4f} ms {fwd_bytes / tf / 1e9:.2f} TB/s | "
                  f"old bwd {tb:.4f} ms {bwd_bytes / tb / 1e9:.2f} TB/s", flush=True)
        saved = dict(PF.TUNING)
        for direction in ("fwd", "bwd"):
            for update in variants(args, direction):
                if set(update) - set(saved):
                    raise SystemExit(f"--{direction}: {sorted(set(update) - set(saved))} are not "
                                     f"knobs of this direction's kernel")
        best = {}
        for update in variants(args, "fwd"):
            PF.TUNING.update(saved, **update)
            name = f"fwd {label(update)} bounds={PF.launch_bounds('fwd')}"
            try:
                tf, yv = fwd(PF)
            except Exception as exc:  # noqa: BLE001
                print(f"  {name}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            if ref_f is None:
                ref_f = yv
            tbs = fwd_bytes / tf / 1e9
            print(f"  {name}: {tf:.4f} ms {tbs:.2f} TB/s ({tbs / bw:.0%} of copy) "
                  f"diff {rel(yv, ref_f):.1e}", flush=True)
            if tf < best.get("fwd", (1e9,))[0]:
                best["fwd"] = (tf, name, tbs)
        for update in variants(args, "bwd"):
            PF.TUNING.update(saved, **update)
            if PF.TUNING["bwd_kernel"] == "rows":
                cfg = ("rows", PF.rows_config("bf16", H, D, 16))
                bounds = PF.rows_bounds()
            else:
                cfg = PF.backward_config("bf16", H, D, 16)
                bounds = PF.launch_bounds("bwd")
            name = f"bwd {label(update)} bounds={bounds} cfg={cfg}"
            try:
                tb, outs = bwd(PF)
            except Exception as exc:  # noqa: BLE001
                print(f"  {name}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            if ref_b is None:
                ref_b = outs
            diffs = " ".join(f"{rel(o, r):.1e}" for o, r in zip(outs, ref_b))
            tbs = bwd_bytes / tb / 1e9
            print(f"  {name}: {tb:.4f} ms {tbs:.2f} TB/s ({tbs / bw:.0%} of copy) "
                  f"diff {diffs}", flush=True)
            if tb < best.get("bwd", (1e9,))[0]:
                best["bwd"] = (tb, name, tbs)
        PF.TUNING.update(saved)
        for ms, name, tbs in best.values():
            print(f"{size} best {name}: {ms:.4f} ms {tbs:.2f} TB/s ({tbs / bw:.0%} of copy "
                  f"{bw:.2f} TB/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
