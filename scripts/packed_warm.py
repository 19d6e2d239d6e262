"""Compile the kernels that scripts/packed_profile.py and benchmarks/packed_bench.py launch, in
parallel processes, into the on-disk PTX cache (``$SWR_ARRAY_CACHE_DIR``), so that the timed
scripts that follow find them compiled.

    python scripts/packed_warm.py [--jobs 12]

One process a (layout, kernel family, x0) case: the packed forward and backward of bfloat16,
per-head coefficients, 16 channels a head, block_len 16, hops 1, on a small problem with the
headline problem's specialisations (the kernels depend on dtypes, the head dim and the
alignment, not on T or H), and the dense calls at the headline size. Prints the seconds each
case took.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def case(args):
    layout, family, with_x0 = args
    t0 = time.perf_counter()
    import cupy as cp
    import ml_dtypes
    import numpy as np
    from swr_array.numba_kernels import packed_walk

    import swr_array as sa

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    if family == "dense":
        T, H, D = 32768, 128, 16
    else:
        T, H, D = 1024, 4, 16
    us = (1, T, H, D) if layout == "BLHD" else (1, H, D, T)
    a_s = (1, T, H) if layout == "BLHD" else (1, H, T)
    a = cp.asarray(rng.uniform(0.5, 1.0, a_s).astype(np.float32).astype(bf16))
    u = cp.asarray(rng.standard_normal(us).astype(np.float32).astype(bf16))
    kw = dict(block_len=16, hops=1, layout=layout)
    if family == "dense":
        sa.swr(a, u, **kw)
        sa.swr_vjp(a, u, u, **kw)
        sa.swr(a, u, out=cp.empty(us, bf16), **kw)
        sa.swr_vjp(a, u, u, out=(cp.empty(a_s, bf16), cp.empty(us, bf16), None), **kw)
    else:
        cu = cp.asarray(np.array([0, 100, 117, 600, T], np.int32))
        x0 = cp.asarray(rng.standard_normal((4, H, D)).astype(np.float32)) if with_x0 else None
        packed_walk.BHDL_TILE = family == "tile"
        packed_walk.BHDL_SCAN = packed_walk.BHDL_SCAN_BWD = family == "scan"
        with packed_walk.variant(family if layout == "BLHD" else "tokens"):
            sa.swr(a, u, cu_seqlens=cu, x0=x0, **kw)
            sa.swr_vjp(a, u, u, cu_seqlens=cu, x0=x0, **kw)
    cp.cuda.Device().synchronize()
    return f"{layout} {family} x0={with_x0}: {time.perf_counter() - t0:.1f} s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=12)
    args = ap.parse_args(argv)
    cases = [("BLHD", "dense", False), ("BHDL", "dense", False)]
    for x0 in (False, True):
        cases += [("BLHD", "rblocks", x0), ("BHDL", "scan", x0)]
    # the profile's others
    cases += [("BLHD", "blocks", False), ("BLHD", "tokens", False), ("BHDL", "tokens", False),
              ("BHDL", "tile", False)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(min(args.jobs, len(cases))) as pool:
        for line in pool.imap_unordered(case, cases):
            print(line, flush=True)
    print(f"warm: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
