"""Decode benchmark: one Phalanx decoding step per token, per layer, on torch (CUDA).

    python benchmarks/decode_bench.py --out DIR [--batches 1,8,64,256] [--dim 2048]
                                      [--contexts 4096,32768] [--runs 15] [--calls 20]
    python benchmarks/decode_bench.py --from-json DIR/decode_bench.json --markdown PAGE.md

For each batch (dim 2048 = 128 heads x 16, bfloat16, hops=1, block_len=16), in one process:

- ``Phalanx.step`` captured in a CUDA graph (``torch.cuda.graph``) and eager (host included),
  and which path it ran: ``gemv`` (the two GEMV kernels, batch up to the torch adapter's
  ``GEMV_MAX_BATCH``) or ``gemm`` (torch's GEMMs around the fused middle kernel);
- the host cost of one eager ``Phalanx.step`` and of one eager torch ``swr_step`` (the step's
  shapes, ``out=`` given): the median wall time of single calls (``--host-calls`` of them, no
  synchronisation inside);
- the step's two GEMMs alone (``x_t W_in^T``, ``Y W_out^T``), captured in a graph, and its
  fused middle kernel alone (gates, state update, read-out), captured in a graph;
- the same step written as plain torch ops (GEMM, gates, the hops=1 state update with the
  position on the device, read-out, GEMM), captured in a graph;
- the floor: bytes of the weights, the state (read and written) and the step's input and output,
  over the device-to-device copy bandwidth measured in the same run;
- an attention layer (fused QKV projection, the new key and value written into a static KV
  cache, SDPA over the cache, output projection; 16 heads of 128) decoding at each context of
  ``--contexts``, captured in a graph (skipped where the cache would exceed ``--max-cache-gb``).

Times: CUDA events around ``--calls`` back-to-back calls (graph replays or eager calls) after a
warm-up; the median over ``--runs`` runs of the per-call time, in microseconds. Writes
``decode_bench.json`` into ``--out`` and prints the Markdown table last (``--markdown`` also
writes it to a file; ``--from-json`` re-renders a saved run without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys


def _ints(text):
    return [int(t) for t in text.split(",") if t]


def timed(fn, *, runs, calls, warmup=3):
    """Median over runs of (event time of ``calls`` back-to-back calls) / calls, in us."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls * 1e3)
    return statistics.median(times)


def host_us(fn, calls):
    """Median wall time of one call, in us (single calls, no synchronisation inside)."""
    import time

    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def graphed(fn):
    """``fn`` captured once in a CUDA graph (after a warm-up call on a side stream); returns the
    graph's replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(args):
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), 1 GiB buffers."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = timed(lambda: dst.copy_(src), runs=args.runs, calls=5)
    return 2 * src.numel() / (us * 1e-6)


def plain_torch_step(layer, B):
    """The hops=1 Phalanx step as plain torch ops over its own state (float32 w, g, carrier,
    position on the device); returns a zero-argument step writing into fixed buffers."""
    import torch

    c = layer.config
    H, D, hd, dm, bl = c.heads, c.head_dim, c.heads * c.head_dim, c.decay_max, c.block_len
    kv = c.kv_heads * D
    dev, dt = layer.in_proj_weight.device, layer.in_proj_weight.dtype
    w_in, b_in, w_out = layer.in_proj_weight, layer.in_proj_bias, layer.out_proj_weight
    b_b, b_c, b_a = b_in[:kv].float(), b_in[kv:2 * kv].float(), b_in[2 * kv:].float()
    group = H // c.kv_heads
    x = torch.randn(B, c.dim, device=dev, dtype=dt)
    out = torch.empty(B, c.dim, device=dev, dtype=dt)
    w = torch.zeros(B, H, D, device=dev)
    g = torch.ones(B, H, D, device=dev)
    cv = torch.zeros(B, H, D, device=dev)
    pos = torch.zeros(B, device=dev, dtype=torch.int64)

    def step():
        z = x @ w_in.T
        v = z[:, :hd].float().view(B, H, D)
        bg = torch.sigmoid(z[:, hd:hd + kv].float() + b_b).view(B, c.kv_heads, 1, D)
        bg = bg.expand(B, c.kv_heads, group, D).reshape(B, H, D)
        cc = (z[:, hd + kv:hd + 2 * kv].float() + b_c).view(B, c.kv_heads, 1, D)
        cc = cc.expand(B, c.kv_heads, group, D).reshape(B, H, D)
        a = (dm * torch.sigmoid(z[:, hd + 2 * kv:].float() + b_a))[..., None]
        u = bg * v
        off = (pos % bl)[:, None, None]
        start, end = off == 0, off == bl - 1
        w_new = torch.where(start, u, a * w + u)
        g_new = torch.where(start, a.expand_as(u), a * g)
        y = ((w_new + g_new * cv) * cc + v).to(dt).view(B, hd)
        torch.mm(y, w_out.T, out=out)
        cv.copy_(torch.where(end, w_new, cv))
        w.copy_(torch.where(end, 0.0, w_new))
        g.copy_(torch.where(end, 1.0, g_new))
        pos.add_(1)

    return step


def attention_step(B, dim, context, dtype, heads=16):
    """One decoding step of an attention layer at ``context`` cached tokens (static cache)."""
    import torch
    import torch.nn.functional as F

    dev = "cuda"
    hd = dim // heads
    w_qkv = torch.randn(3 * dim, dim, device=dev, dtype=dtype) / dim**0.5
    w_o = torch.randn(dim, dim, device=dev, dtype=dtype) / dim**0.5
    k_cache = torch.randn(B, heads, context, hd, device=dev, dtype=dtype)
    v_cache = torch.randn(B, heads, context, hd, device=dev, dtype=dtype)
    x = torch.randn(B, dim, device=dev, dtype=dtype)
    out = torch.empty(B, dim, device=dev, dtype=dtype)
    pos = torch.tensor([context - 1], device=dev)

    def step():
        q, k, v = (x @ w_qkv.T).view(B, 3, heads, 1, hd).unbind(1)
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache)
        torch.mm(y.reshape(B, dim), w_o.T, out=out)

    return step


def bench_batch(B, args, bandwidth, log):
    import torch
    from swr_array.adapters import torch as swr_torch
    from swr_array.adapters.torch import Phalanx

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layer = Phalanx(args.dim, head_dim=16, device="cuda", dtype=dtype)
    c = layer.config
    r = {"batch": B}
    with torch.no_grad():
        state = layer.init_state(B)
        x = torch.randn(B, args.dim, device="cuda", dtype=dtype)
        out = torch.empty(B, args.dim, device="cuda", dtype=dtype)

        def step():
            layer.step(x, state, out=out)

        r["eager_us"] = timed(step, runs=args.runs, calls=args.calls)
        gemv = state.front._launch_cache.get("torch-gemv", {})
        r["path"] = "gemv" if any(e is not False for e in gemv.values()) else "gemm"
        r["gemv_max_batch"] = swr_torch.GEMV_MAX_BATCH
        r["graph_us"] = timed(graphed(step), runs=args.runs, calls=args.calls)
        z = torch.empty(B, layer.in_proj_weight.shape[0], device="cuda", dtype=dtype)
        y = torch.randn(B, c.heads * c.head_dim, device="cuda", dtype=dtype)
        w_in, w_out = layer.in_proj_weight, layer.out_proj_weight

        def gemms():
            torch.mm(x, w_in.T, out=z)
            torch.mm(y, w_out.T, out=out)

        r["gemms_graph_us"] = timed(graphed(gemms), runs=args.runs, calls=args.calls)
        r["host_step_us"] = host_us(step, args.host_calls)
        mstate = layer.init_state(B)
        ym = torch.empty(B, c.heads * c.head_dim, device="cuda", dtype=dtype)
        z.copy_(torch.randn_like(z))

        def mix():
            swr_torch._phalanx_mix(z, ym, layer.in_proj_bias, mstate.front, c)

        r["mix_graph_us"] = timed(graphed(mix), runs=args.runs, calls=args.calls)
        sstate = swr_torch.swr_init_state((B, c.heads, c.head_dim), device="cuda")
        a_t = torch.rand(B, c.heads, device="cuda", dtype=dtype)
        u_t = torch.randn(B, c.heads, c.head_dim, device="cuda", dtype=dtype)
        y_t = torch.empty_like(u_t)
        r["swr_step_host_us"] = host_us(lambda: swr_torch.swr_step(a_t, u_t, sstate, out=y_t),
                                        args.host_calls)
        r["torch_ops_graph_us"] = timed(graphed(plain_torch_step(layer, B)), runs=args.runs,
                                        calls=args.calls)  # fmt: skip
        item = torch.finfo(dtype).bits // 8
        weights = (w_in.numel() + layer.in_proj_bias.numel() + w_out.numel()) * item
        st = sum(t.numel() * t.element_size() for t in state.tensors())
        r["floor_bytes"] = weights + 2 * st + 2 * B * args.dim * item
        r["floor_us"] = r["floor_bytes"] / bandwidth * 1e6
        log(f"B={B} ({r['path']} path): graph {r['graph_us']:.1f} us, eager "
            f"{r['eager_us']:.1f} us, GEMMs {r['gemms_graph_us']:.1f} us, fused middle "
            f"{r['mix_graph_us']:.1f} us, torch ops "
            f"{r['torch_ops_graph_us']:.1f} us, floor {r['floor_us']:.1f} us; host: "
            f"Phalanx.step {r['host_step_us']:.1f} us, swr_step {r['swr_step_host_us']:.1f} us")
        for ctx in args.contexts:
            cache_gb = 2 * B * ctx * args.dim * item / 1e9
            key = f"attention_{ctx}_graph_us"
            if cache_gb > args.max_cache_gb:
                r[key] = None
                continue
            r[key] = timed(graphed(attention_step(B, args.dim, ctx, dtype)), runs=args.runs,
                           calls=args.calls)  # fmt: skip
            log(f"  attention at context {ctx}: {r[key]:.1f} us")
            torch.cuda.empty_cache()
    return r


def _us(t) -> str:
    return "-" if t is None else f"{t:.1f}"


def table(results) -> str:
    ctxs = results["contexts"]
    head = ("| batch | step path | Phalanx step, graph (us) | eager (us) | two GEMMs, graph (us) | "
            "step / GEMMs | fused middle, graph (us) | host: Phalanx.step (us) | "
            "host: swr_step (us) | torch ops step, graph (us) | floor (us) | step / floor |"
            + "".join(f" attention {c // 1024}K, graph (us) |" for c in ctxs))
    lines = [f"Decode, one layer per token: {results['device']}, dim {results['dim']}, "
             f"{results['dtype']}, hops=1, block_len=16 (copy bandwidth "
             f"{results['copy_bandwidth_gbs']:.0f} GB/s)", "", head,
             "|" + "---|" * (12 + len(ctxs))]
    for r in results["batches"]:
        att = [r.get(f"attention_{c}_graph_us") for c in ctxs]
        cells = [str(r["batch"]), r.get("path", "gemm"), f"{r['graph_us']:.1f}",
                 f"{r['eager_us']:.1f}",
                 f"{r['gemms_graph_us']:.1f}", f"{r['graph_us'] / r['gemms_graph_us']:.2f}x",
                 _us(r.get("mix_graph_us")), _us(r.get("host_step_us")),
                 _us(r.get("swr_step_host_us")),
                 f"{r['torch_ops_graph_us']:.1f}", f"{r['floor_us']:.1f}",
                 f"{r['graph_us'] / r['floor_us']:.2f}x"]
        cells += ["-" if t is None else f"{t:.1f}" for t in att]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for decode_bench.json")
    ap.add_argument("--from-json", help="render a saved decode_bench.json (no GPU needed)")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--batches", default="1,8,64,256", type=_ints)
    ap.add_argument("--contexts", default="4096,32768", type=_ints)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--host-calls", type=int, default=500)
    ap.add_argument("--max-cache-gb", type=float, default=40.0)
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
    else:
        if not args.out:
            ap.error("--out is required unless --from-json is given")
        import torch

        def log(msg):
            print(msg, flush=True)

        results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "python": platform.python_version(), "dim": args.dim, "dtype": args.dtype,
                   "runs": args.runs, "calls": args.calls, "contexts": args.contexts,
                   "batches": []}  # fmt: skip
        log(f"device: {results['device']}")
        bandwidth = copy_bandwidth(args)
        results["copy_bandwidth_gbs"] = bandwidth / 1e9
        os.makedirs(args.out, exist_ok=True)
        for B in args.batches:
            try:
                results["batches"].append(bench_batch(B, args, bandwidth, log))
            except Exception as exc:  # noqa: BLE001 - reported; the other batches still run
                log(f"B={B}: FAILED: {type(exc).__name__}: {exc}")
                results.setdefault("failed", {})[str(B)] = f"{type(exc).__name__}: {exc}"
            with open(os.path.join(args.out, "decode_bench.json"), "w") as f:
                json.dump(results, f, indent=2)
    text = table(results)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
