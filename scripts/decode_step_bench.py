"""Host cost and GPU time of one decoding step on CuPy: swr_step (one launch) and the Phalanx
step (GEMM, phalanx_step_mix, GEMM), eager and replayed from a CUDA graph (stream capture).

    python scripts/decode_step_bench.py [--dim 2048] [--head-dim 16] [--dtype bfloat16]
    python scripts/decode_step_bench.py --ncu [--batches 1,64,256]

Prints one JSON line per (op, batch): host microseconds per eager call (the loop's wall time
with no synchronisation inside, which the launches' host work bounds when the GPU keeps up),
and GPU microseconds per step eager and graph-replayed (CUDA events over many steps). CuPy's
cuBLAS calls cannot be stream-captured, so the graph holds the fused middle kernel
(``phalanx_step_mix``) alone; the two GEMMs are timed eagerly beside it.

``--ncu``: for each batch, one warm-up and one more launch of each step kernel (swr_step and
phalanx_step_mix) and nothing else, for ``ncu -k regex:step_kernel``
(the second launch of each kernel per batch is the warm one).
"""

from __future__ import annotations

import argparse
import json
import time

import ml_dtypes
import numpy as np

import swr_array as sa

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def timed(cp, fn, n):
    """(host us per call, device us per call) over n calls."""
    fn()
    cp.cuda.get_current_stream().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    t0 = time.perf_counter()
    start.record()
    for _ in range(n):
        fn()
    stop.record()
    host = (time.perf_counter() - t0) / n * 1e6
    stop.synchronize()
    return host, cp.cuda.get_elapsed_time(start, stop) / n * 1e3


def captured(cp, fn):
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        fn()
        graph = stream.end_capture()

    def replay():
        graph.launch(stream)

    return replay, stream


def main():
    import cupy as cp

    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--ncu", action="store_true", help="only two launches per kernel and batch")
    args = ap.parse_args()
    dt = DTYPES[args.dtype]
    H, D = args.dim // args.head_dim, args.head_dim
    params = sa.init_phalanx(args.dim, head_dim=D, dtype=dt, xp=cp)
    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    for B in (int(b) for b in args.batches.split(",")):
        if args.ncu:
            ncu_batch(cp, args, params, dt, H, D, B)
        else:
            run_batch(cp, args, params, dt, H, D, B, device)


def run_batch(cp, args, params, dt, H, D, B, device):
    rng = np.random.default_rng(0)
    # swr_step
    state = sa.swr_init_state((B, H, D), block_len=16, hops=1, like=cp.zeros(1))
    a = cp.asarray(rng.uniform(0.5, 1, (B, H)).astype(dt))
    u = cp.asarray(rng.standard_normal((B, H, D)).astype(dt))
    y = cp.empty((B, H, D), dt)

    def step():
        sa.swr_step(a, u, state, layout="BLHD", out=y)

    def step_into():
        sa.swr_step_into(a, u, y, state)

    host, gpu = timed(cp, step, args.steps)
    host_into, _ = timed(cp, step_into, args.steps)
    replay, stream = captured(cp, step)
    with stream:
        _, graph_gpu = timed(cp, replay, args.steps)
    print(json.dumps(dict(device=device, op="swr_step", batch=B, dtype=args.dtype,
                          host_us=round(host, 2), host_into_us=round(host_into, 2),
                          gpu_eager_us=round(gpu, 2), gpu_graph_us=round(graph_gpu, 2))))
    # Phalanx step: eager phalanx_step, and the captured GEMM + fused kernel + GEMM
    x = cp.asarray(rng.standard_normal((B, args.dim)).astype(dt))
    _, pstate = sa.phalanx(x[:, None], params, return_state=True)
    host_p, gpu_p = timed(cp, lambda: sa.phalanx_step(x, params, pstate), args.steps)
    z = cp.asarray(rng.standard_normal((B, params["W_in"].shape[1])).astype(dt))
    yy = cp.empty((B, H * D), dt)
    out = cp.empty((B, args.dim), dt)

    def mix():
        sa.phalanx_step_mix(z, yy, params["b_a"], params["b_b"], params["b_c"], pstate,
                            kv_heads=H, decay_max=float(params["decay_max"]))

    def gemms():
        cp.matmul(x, params["W_in"], out=z)
        cp.matmul(yy, params["W_out"], out=out)

    host_mix, gpu_mix = timed(cp, mix, args.steps)
    replay, stream = captured(cp, mix)
    with stream:
        _, graph_mix = timed(cp, replay, args.steps)
    _, gpu_gemms = timed(cp, gemms, args.steps)
    print(json.dumps(dict(device=device, op="phalanx_step", batch=B, dtype=args.dtype,
                          dim=args.dim, host_us=round(host_p, 2), gpu_eager_us=round(gpu_p, 2),
                          host_mix_us=round(host_mix, 2), gpu_eager_mix_us=round(gpu_mix, 2),
                          gpu_graph_mix_us=round(graph_mix, 2),
                          gpu_eager_gemms_us=round(gpu_gemms, 2))))


def ncu_batch(cp, args, params, dt, H, D, B):
    """Two launches of each step kernel at batch B (the first compiles and prepares)."""
    rng = np.random.default_rng(0)
    state = sa.swr_init_state((B, H, D), block_len=16, hops=1, like=cp.zeros(1))
    a = cp.asarray(rng.uniform(0.5, 1, (B, H)).astype(dt))
    u = cp.asarray(rng.standard_normal((B, H, D)).astype(dt))
    y = cp.empty((B, H, D), dt)
    pstate = sa.swr_init_state((B, H, D), block_len=16, hops=1, like=cp.zeros(1))
    z = cp.asarray(rng.standard_normal((B, params["W_in"].shape[1])).astype(dt))
    yy = cp.empty((B, H * D), dt)
    for _ in range(2):
        sa.swr_step_into(a, u, y, state)
        sa.phalanx_step_mix(z, yy, params["b_a"], params["b_b"], params["b_c"], pstate,
                            kv_heads=H, decay_max=float(params["decay_max"]))
        cp.cuda.runtime.deviceSynchronize()
    print(f"ncu launches done: batch {B}", flush=True)


if __name__ == "__main__":
    main()
