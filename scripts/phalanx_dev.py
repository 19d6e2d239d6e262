# ruff: noqa: B023 - the closures run within the iteration that makes them
"""Launch-tuning sweep of the fused Phalanx kernels on the GPU (dim 2048, bf16, hops=1, l=16).

    python scripts/phalanx_dev.py [--sizes 16x2048,1x32768] [--old path/to/old_phalanx_fused.py]

For each size: the device-to-device copy bandwidth, then the forward and backward kernels for
each TUNING variant (CUDA events, median of runs of back-to-back calls), their bytes moved over
time, and the largest relative difference of their outputs from the first variant's (and from an
older version of the module when ``--old`` names one). Prints one line per variant.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16x2048,1x32768")
    ap.add_argument("--old", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
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

        def fwd(mod):
            y = cp.full((M, hd), cp.nan, cp.float32).astype(bf16)
            f = lambda: mod.phalanx_forward(z, b_a, b_b, b_c, y, **kw)  # noqa: E731
            f()
            return gpu_time(f), y

        def bwd(mod):
            dz = cp.full((M, width), cp.nan, cp.float32).astype(bf16)
            y = cp.full((M, hd), cp.nan, cp.float32).astype(bf16)
            parts = cp.zeros((B * nb, width - hd), cp.float32)
            f = lambda: mod.phalanx_backward(z, dy, b_a, b_b, b_c, dz, y, parts, **kw)  # noqa
            f()
            return gpu_time(f), (dz, y, parts.sum(0))

        ref_f = ref_b = None
        if old is not None:
            tf, ref_f = fwd(old)
            tb, ref_b = bwd(old)
            print(f"  old fwd {tf:.4f} ms {fwd_bytes / tf / 1e9:.2f} TB/s | "
                  f"old bwd {tb:.4f} ms {bwd_bytes / tb / 1e9:.2f} TB/s", flush=True)
        saved = dict(PF.TUNING)
        fwd_grid = [(16, 2, 128)] if args.quick else itertools.product(
            (16, 8), (1, 2, 4), (64, 128, 256))
        for ab, un, cs in fwd_grid:
            PF.TUNING.update(saved, fwd_access_bytes=ab, fwd_unroll=un, fwd_chunk_steps=cs)
            try:
                tf, yv = fwd(PF)
            except Exception as exc:  # noqa: BLE001
                print(f"  fwd bytes={ab} unroll={un} chunk={cs}: failed {exc}", flush=True)
                continue
            if ref_f is None:
                ref_f = yv
            print(f"  fwd bytes={ab} unroll={un} chunk={cs}: {tf:.4f} ms "
                  f"{fwd_bytes / tf / 1e9:.2f} TB/s ({fwd_bytes / tf / 1e9 / bw:.0%} of copy) "
                  f"diff {rel(yv, ref_f):.1e}", flush=True)
        bwd_grid = [(16, 4, 256, 256)] if args.quick else itertools.product(
            (16, 8), (1, 2, 4), (128, 256, 512), (256,))
        for ab, un, cs, th in bwd_grid:
            PF.TUNING.update(saved, bwd_access_bytes=ab, bwd_unroll=un, bwd_chunk_steps=cs,
                             bwd_threads_per_block=th)
            cfg = PF.backward_config("bf16", H, D, 16)
            label = f"bwd bytes={ab} unroll={un} chunk={cs} threads={th} cfg={cfg}"
            try:
                tb, outs = bwd(PF)
            except Exception as exc:  # noqa: BLE001
                print(f"  {label}: failed {exc}", flush=True)
                continue
            if ref_b is None:
                ref_b = outs
            diffs = " ".join(f"{rel(o, r):.1e}" for o, r in zip(outs, ref_b))
            print(f"  {label}: {tb:.4f} ms {bwd_bytes / tb / 1e9:.2f} TB/s "
                  f"({bwd_bytes / tb / 1e9 / bw:.0%} of copy) diff {diffs}", flush=True)
        PF.TUNING.update(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
