"""Launch-plan sweep of the decoding step kernels, and the small-batch GEMV step, on the GPU.

    python scripts/step_plan_sweep.py [--batches 1,8,64,256] [--gemv-batches 1,2,4,8,16]
                                      [--runs 5] [--calls 50] [--json FILE]

At dim 2048 = 128 heads x 16, bfloat16, hops=1, block_len=16 (the Phalanx defaults), each
time is a CUDA graph of ``--calls`` back-to-back launches, replayed ``--runs`` times (median,
microseconds per launch):

- the fused middle kernel (``phalanx_step_kernel``) and ``swr_step_kernel`` under each plan
  ``(tpb, cpt)`` (threads per block, channels per thread; ``nchunks`` blocks per row follows),
  each plan's output checked against the first plan's (512x4) from the same state (within
  bfloat16 rounding: specialisations may contract multiply-adds differently);
- the GEMV step (``numba_kernels/phalanx_gemv.py``: input GEMV + gates + state update, output
  GEMV) under a few splits, and each of its two kernels alone, against the two cuBLAS GEMMs
  alone and the graph-captured GEMM-path step (``Phalanx.step`` with the GEMV path off), its
  output checked against that step's.

Kernels are compiled up front in worker processes into the PTX disk cache. Prints tables, then
one line ``SWEEP_JSON {...}`` with every number.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

PLANS = [(512, 4), (256, 4), (128, 4), (64, 4), (256, 2), (128, 2), (64, 2), (128, 1), (64, 1),
         (32, 1), (256, 8), (1024, 2)]
SWR_PLANS = [(512, 4), (128, 4), (64, 2), (32, 1)]
SPLITS = [
    None,  # phalanx_gemv.split_for(B, 16): the default
    {"rpw": 2, "unroll": 4, "nwb": 8, "out_rpw": 1, "out_unroll": 8},
    {"rpw": 4, "unroll": 4, "nwb": 8, "out_rpw": 2, "out_unroll": 4},
    {"rpw": 4, "unroll": 2, "nwb": 4, "out_rpw": 4, "out_unroll": 2},
]
H, D, DIM, BLOCK_LEN, HOPS = 128, 16, 2048, 16, 1


def _ints(text):
    return [int(t) for t in text.split(",") if t]


def _compile(job):
    """Compile one kernel specialisation into the PTX disk cache (worker process)."""
    import numba
    import numpy as np
    from numba import types
    from swr_array.numba_kernels import _launch, phalanx_gemv, swr_step

    module, factory, key, argspec, cc = job
    mod = {"swr_step": swr_step, "phalanx_gemv": phalanx_gemv}[module]
    kernel = getattr(mod, factory)(*key)
    sig = []
    for a in argspec:
        if a == "f4":
            sig.append(types.float32)
        else:
            sig.append(types.Array(numba.from_dtype(np.dtype(a)), 1, "C"))
    t = time.time()
    try:
        _launch._cached_ptx(kernel, tuple(sig), cc)
    except Exception as exc:  # noqa: BLE001 - reported, the launch recompiles and raises
        return f"{factory}{key}: {type(exc).__name__}: {exc}"[:300]
    return time.time() - t


def precompile(jobs, cc):
    t = time.time()
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) - 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        res = list(pool.map(_compile, [j + (cc,) for j in jobs]))
    errors = [r for r in res if isinstance(r, str)]
    print(f"compiled {len(jobs)} kernels in {time.time() - t:.1f} s" +
          "".join(f"\n  ERROR {e}" for e in errors), flush=True)


def graph_us(fn, runs, calls):
    """Median per-call microseconds of a CUDA graph of ``calls`` calls of ``fn``."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,64,256", type=_ints)
    ap.add_argument("--gemv-batches", default="1,2,4,8,16", type=_ints)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    import cupy
    import torch
    from swr_array.adapters import torch as swr_torch
    from swr_array.adapters.torch import Phalanx
    from swr_array.numba_kernels import phalanx_gemv as PG
    from swr_array.numba_kernels import swr_step as KS

    dev = cupy.cuda.Device()
    cc = tuple(int(c) for c in (dev.compute_capability[:-1], dev.compute_capability[-1]))
    mode, K = KS.hops_mode(HOPS)
    st = ["int64", "float32", "float32", "float32", "float32", "int32"]
    jobs = []
    for tpb, cpt in PLANS:
        n = -(-H * D // (tpb * cpt))
        jobs.append(("swr_step", "phalanx_step_kernel", ("bf16", H, D, 1, mode, K, BLOCK_LEN, tpb,
                                                          cpt, n), ["uint16"] * 5 + st + ["f4"]))
    for tpb, cpt in SWR_PLANS:
        n = -(-H * D // (tpb * cpt))
        jobs.append(("swr_step", "swr_step_kernel", ("bf16", "bf16", H * D, D, False, mode, K,
                                                      BLOCK_LEN, tpb, cpt, n),
                     ["uint16"] * 3 + st))
    gemv_cases = [(B, sp or PG.split_for(B, D)) for B in args.gemv_batches
                  for k, sp in enumerate(SPLITS) if k == 0 or B in (1, 8)]
    for B, sp in gemv_cases:
        jobs.append(("phalanx_gemv", "in_step_kernel", ("bf16", DIM, H, D, 1, mode, K, BLOCK_LEN,
                                                         B, sp["rpw"], sp["unroll"]),
                     ["uint16"] * 6 + st + ["f4"]))
        jobs.append(("phalanx_gemv", "out_kernel", ("bf16", H * D, DIM, B, sp["nwb"],
                                                     sp["out_rpw"], sp["out_unroll"]),
                     ["uint16"] * 3))
    precompile(jobs, cc)

    dtype = torch.bfloat16
    torch.manual_seed(0)
    layer = Phalanx(DIM, head_dim=D, device="cuda", dtype=dtype)
    c = layer.config
    W = layer.in_proj_weight.shape[0]
    b_a, b_b, b_c = swr_torch._bias_parts(layer.in_proj_bias, c)
    results = {"device": torch.cuda.get_device_name(), "dim": DIM, "heads": H, "head_dim": D,
               "hops": HOPS, "dtype": "bfloat16", "default_plan": list(KS.plan(H * D, K)),
               "middle": [], "swr_step": [], "gemv": []}
    index = torch.cuda.current_device()

    def cur():  # torch's current stream (a capture's own stream inside torch.cuda.graph)
        return swr_torch._raw_stream(index)

    def fresh_state(B):  # the same state at every call: rows at mixed positions
        s = layer.init_state(B)
        gen = torch.Generator(device="cuda").manual_seed(B)
        s.position.copy_(torch.arange(B, device="cuda") * 5 % 37)
        s.w.normal_(generator=gen)
        s.carry_v.normal_(generator=gen)
        return s

    with torch.no_grad():
        print("\n== fused middle kernel (graph, us per launch) by plan (tpb, cpt, nchunks)")
        for B in args.batches:
            z = torch.randn(B, W, device="cuda", dtype=dtype)
            ref_y = None
            row = {"batch": B, "plans": {}}
            for tpb, cpt in PLANS:
                s = fresh_state(B)
                y = torch.full((B, H * D), float("nan"), device="cuda", dtype=dtype)
                run = KS.phalanx_step_launch(z, y, b_a, b_b, b_c, s.front.arrays(),
                                             s.front._arrivals(), heads=H, head_dim=D,
                                             kv_heads=c.kv_heads, decay_max=c.decay_max,
                                             hops=HOPS, block_len=BLOCK_LEN, tpb_cpt=(tpb, cpt))
                run.run(z, y, stream=cur())
                torch.cuda.synchronize()
                if ref_y is None:
                    ref_y = y.float().clone()
                diff = float((y.float() - ref_y).abs().max())  # contraction may differ
                ok = diff <= 1e-2 * float(ref_y.abs().max())
                us = graph_us(lambda run=run, y=y, z=z: run.run(z, y, stream=cur()), args.runs,
                              args.calls)
                n = -(-H * D // (tpb * cpt))
                row["plans"][f"{tpb}x{cpt}x{n}"] = {"us": us, "same_as_first": ok,
                                                     "max_diff": diff}
            row["default"] = "{}x{}x{}".format(*KS.spread(B, H * D, *KS.plan(H * D, K),
                                                          KS.SPREAD_THREADS["phalanx"]))
            results["middle"].append(row)
            print(f"B={B:4d} (default {row['default']}): " + "  ".join(
                f"{k} {v['us']:.2f}{'' if v['same_as_first'] else ' (DIFFERS)'}"
                for k, v in row["plans"].items()), flush=True)

        print("\n== swr_step kernel (graph, us per launch) by plan")
        for B in args.batches:
            a = torch.rand(B, H, device="cuda", dtype=dtype)
            u = torch.randn(B, H, D, device="cuda", dtype=dtype)
            row = {"batch": B, "plans": {}}
            for tpb, cpt in SWR_PLANS:
                s = fresh_state(B)
                y = torch.empty(B, H, D, device="cuda", dtype=dtype)
                run = KS.swr_step_launch(a, u, y, s.front.arrays(), s.front._arrivals(),
                                         hops=HOPS, block_len=BLOCK_LEN, per_channel=False,
                                         tpb_cpt=(tpb, cpt))
                us = graph_us(lambda run=run, y=y, a=a, u=u: run.run(a, u, y, stream=cur()),
                              args.runs, args.calls)
                n = -(-H * D // (tpb * cpt))
                row["plans"][f"{tpb}x{cpt}x{n}"] = {"us": us}
            results["swr_step"].append(row)
            print(f"B={B:4d}: " + "  ".join(f"{k} {v['us']:.2f}" for k, v in row["plans"].items()),
                  flush=True)

        print("\n== GEMV step vs cuBLAS (graph, us per step)")
        w_in, w_out = layer.in_proj_weight, layer.out_proj_weight
        bw_bytes = (w_in.numel() + w_out.numel()) * 2
        for B in args.gemv_batches:
            x = torch.randn(B, DIM, device="cuda", dtype=dtype)
            out = torch.empty(B, DIM, device="cuda", dtype=dtype)
            z = torch.empty(B, W, device="cuda", dtype=dtype)
            yy = torch.randn(B, H * D, device="cuda", dtype=dtype)

            def gemms(x=x, z=z, yy=yy, out=out):
                torch.mm(x, w_in.T, out=z)
                torch.mm(yy, w_out.T, out=out)

            row = {"batch": B, "gemms_us": graph_us(gemms, args.runs, args.calls)}
            s_ref = fresh_state(B)
            out_ref = torch.empty(B, DIM, device="cuda", dtype=dtype)
            old = getattr(swr_torch, "GEMV_MAX_BATCH", None)
            if old is not None:
                swr_torch.GEMV_MAX_BATCH = 0
            layer.step(x, s_ref, out=out_ref)
            torch.cuda.synchronize()
            s2 = fresh_state(B)
            row["gemm_step_us"] = graph_us(lambda s2=s2, x=x, out=out: layer.step(x, s2, out=out),
                                           args.runs, args.calls)
            if old is not None:
                swr_torch.GEMV_MAX_BATCH = old
            row["splits"] = {}
            for b_, sp in gemv_cases:
                if b_ != B:
                    continue
                name = "/".join(str(sp[k]) for k in ("rpw", "unroll", "nwb", "out_rpw",
                                                    "out_unroll"))
                s = fresh_state(B)
                y = torch.full((B, H * D), float("nan"), device="cuda", dtype=dtype)
                o = torch.full((B, DIM), float("nan"), device="cuda", dtype=dtype)
                try:
                    run = PG.GemvStep(x, y, o, w_in, b_a, b_b, b_c, w_out, s.front.arrays(),
                                      s.front._arrivals(), heads=H, head_dim=D,
                                      kv_heads=c.kv_heads, decay_max=c.decay_max, hops=HOPS,
                                      block_len=BLOCK_LEN, split=sp)
                    run.run(x, y, o, stream=cur())
                    torch.cuda.synchronize()
                    err = float((o.float() - out_ref.float()).abs().max())
                    scale = float(out_ref.float().abs().max())
                    pos_ok = bool(torch.equal(s.position, s_ref.position))
                    us = graph_us(lambda run=run, y=y, o=o, x=x: run.run(x, y, o, stream=cur()),
                                  args.runs, args.calls)
                    ptrs = (x.data_ptr(), y.data_ptr(), o.data_ptr())
                    in_us = graph_us(lambda run=run, p=ptrs: run.launch_in.run(p[:2], cur()),
                                     args.runs, args.calls)
                    out_us = graph_us(lambda run=run, p=ptrs: run.launch_out.run(p[1:], cur()),
                                      args.runs, args.calls)
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    print(f"  B={B} split {name}: {type(exc).__name__}: {exc}"[:400], flush=True)
                    continue
                row["splits"][name] = {"us": us, "in_us": in_us, "out_us": out_us,
                                       "max_err": err, "scale": scale, "position_ok": pos_ok,
                                       "weight_gbs": bw_bytes / (us * 1e-6) / 1e9}
            results["gemv"].append(row)
            best = min(row["splits"].items(), key=lambda kv: kv[1]["us"], default=(None, None))
            print(f"B={B:3d}: cuBLAS GEMMs {row['gemms_us']:.2f}, GEMM-path step "
                  f"{row['gemm_step_us']:.2f}; GEMV " + "  ".join(
                      f"[{k}] {v['us']:.2f} (in {v['in_us']:.2f} + out {v['out_us']:.2f}; "
                      f"{v['weight_gbs']:.0f} GB/s, err "
                      f"{v['max_err']:.3g}/{v['scale']:.3g}, "
                      f"pos {'ok' if v['position_ok'] else 'BAD'})"
                      for k, v in row["splits"].items()) + f"; best {best[0]}", flush=True)
    print("SWEEP_JSON " + json.dumps(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
