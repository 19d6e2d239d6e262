"""Packed sequences benchmark: ``swr(..., cu_seqlens=cu)`` forward+backward against the dense
call on the same total tokens, in the same process.

    python benchmarks/packed_bench.py --out DIR [--tokens 32768] [--heads 128] [--head-dim 16]
                                      [--docs 16,1000] [--runs 20] [--calls 3] [--warmup 3]
                                      [--check-tokens 4096]

For each layout ("BLHD", "BHDL") and each document count (16 documents of random lengths and
1000 documents by default; lengths drawn uniformly, summing to ``--tokens``), bfloat16,
per-head coefficients, block_len 16, hops 1, on CuPy arrays through the front:
- dense: ``swr(a, u)`` + ``swr_vjp(a, u, dy)`` on (1, T) with no cu_seqlens;
- packed: the same with ``cu_seqlens`` (a device array), with and without ``x0``;
- the ratio packed / dense (the target is 1.1x).
The defaults are the project's headline width, 128 heads x 16 = 2048 channels. Each row says
which packed path ran ("native": numba_kernels/packed_walk.py, BLHD hops 0/1; "padded": the
padded image) and checks the packed output of the sequences inside the first
``--check-tokens`` tokens against the per-sequence float64 reference (max relative error).

Times: CUDA events around ``--calls`` back-to-back calls (forward then backward), after
``--warmup`` calls; the median over ``--runs`` runs of the per-call time. Writes
``packed_bench.json`` into ``--out`` and prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics


def gpu_time(fn, *, runs, calls, warmup):
    """Median over runs of (event time of ``calls`` back-to-back calls) / calls, in ms."""
    import cupy as cp

    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(runs):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / calls)
    return statistics.median(times)


def doc_lengths(rng, T, n_docs):
    """n_docs random positive lengths summing to T (uniform cut points)."""
    import numpy as np

    cuts = np.sort(rng.choice(np.arange(1, T), size=n_docs - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [T]]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for packed_bench.json")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--docs", default="16,1000")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--check-tokens", type=int, default=4096)
    args = ap.parse_args(argv)

    import cupy as cp
    import ml_dtypes
    import numpy as np

    import swr_array as sa
    from swr_array import _checks, reference
    from swr_array import packed as packed_mod
    from swr_array.ops import from_time_last, to_time_last

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    T, H, D = args.tokens, args.heads, args.head_dim
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    results = {"device": name, "platform": platform.platform(), "tokens": T, "heads": H,
               "head_dim": D, "dtype": "bfloat16", "block_len": 16, "hops": 1, "rows": []}
    for layout in ("BLHD", "BHDL"):
        us = (1, T, H, D) if layout == "BLHD" else (1, H, D, T)
        a_s = (1, T, H) if layout == "BLHD" else (1, H, T)
        a = rng.uniform(0.5, 1.0, a_s).astype(np.float32).astype(bf16)
        u = rng.standard_normal(us).astype(np.float32).astype(bf16)
        dy = rng.standard_normal(us).astype(np.float32).astype(bf16)
        ca, cu_, cdy = cp.asarray(a), cp.asarray(u), cp.asarray(dy)
        kw = dict(block_len=16, hops=1, layout=layout)

        def dense(ca=ca, cu_=cu_, cdy=cdy, kw=kw):
            sa.swr(ca, cu_, **kw)
            sa.swr_vjp(ca, cu_, cdy, **kw)

        t_dense = gpu_time(dense, runs=args.runs, calls=args.calls, warmup=args.warmup)
        for n_docs in (int(x) for x in args.docs.split(",")):
            lens = doc_lengths(rng, T, n_docs)
            cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            ccu = cp.asarray(cu)
            x0 = rng.standard_normal((n_docs, H, D)).astype(np.float32)
            cx0 = cp.asarray(x0)

            def packed(x0=None, ca=ca, cu_=cu_, cdy=cdy, ccu=ccu, kw=kw):
                sa.swr(ca, cu_, cu_seqlens=ccu, x0=x0, **kw)
                sa.swr_vjp(ca, cu_, cdy, cu_seqlens=ccu, x0=x0, **kw)

            t_packed = gpu_time(packed, runs=args.runs, calls=args.calls, warmup=args.warmup)
            t_x0 = gpu_time(lambda p=packed, x=cx0: p(x), runs=args.runs, calls=args.calls,
                            warmup=args.warmup)
            y = sa.swr(ca, cu_, cu_seqlens=ccu, x0=cx0, **kw).get().astype(np.float64)
            k = max(1, int(np.searchsorted(cu, args.check_tokens, side="right")) - 1)
            n = int(cu[k])  # the first k sequences, whole
            sl = (slice(None), slice(0, n)) if layout == "BLHD" else (Ellipsis, slice(0, n))
            want = from_time_last(reference.swr_packed(
                to_time_last(a[sl], layout, True), to_time_last(u[sl], layout, False),
                cu[:k + 1], block_len=16, hops=1, x0=x0[:k]), layout)
            err = float(np.abs(y[sl] - want).max() / (np.abs(want).max() + 1e-30))
            p = _checks.check_swr(ca, cu_, block_len=16, hops=1, layout=layout)
            native = (packed_mod.native_forward_fits(p, ccu)
                      and packed_mod.native_backward_fits(p, ccu, ca, cu_, cdy))
            path = "native" if native else "padded"
            row = {"layout": layout, "docs": n_docs, "path": path, "dense_fwd_bwd_ms": t_dense,
                   "packed_fwd_bwd_ms": t_packed, "packed_x0_fwd_bwd_ms": t_x0,
                   "ratio": t_packed / t_dense, "ratio_x0": t_x0 / t_dense,
                   "max_rel_err_vs_reference": err}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "packed_bench.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{name}, {T} tokens, H={H}, D={D}, bfloat16, block_len 16, hops 1 (fwd+bwd, ms)\n")
    print("| layout | docs | path | dense | packed | ratio | packed + x0 | ratio | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['layout']} | {r['docs']} | {r['path']} | {r['dense_fwd_bwd_ms']:.3f} | "
              f"{r['packed_fwd_bwd_ms']:.3f} | {r['ratio']:.2f}x | {r['packed_x0_fwd_bwd_ms']:.3f}"
              f" | {r['ratio_x0']:.2f}x | {r['max_rel_err_vs_reference']:.1e} |")


if __name__ == "__main__":
    main()
