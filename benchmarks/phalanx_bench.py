"""Phalanx layer benchmark: our layer against the same GEMMs alone, in the same process.

    python benchmarks/phalanx_bench.py --out DIR [--sizes 16x2048,4x8192,1x32768] [--dim 2048]
                                       [--dtype bfloat16] [--runs 20] [--calls 3] [--warmup 3]
                                       [--tuning bwd_kernel=rows,bwd_rows=8]

For each size (B x L tokens, dim 2048, bfloat16 by default, H = dim/16 heads of 16):
- fwd: ``swr_array.phalanx(x, params)`` vs the two GEMMs it runs (x W_in, Y W_out);
- fwd+bwd: ``phalanx(..., return_residuals=True)`` + ``phalanx_vjp(..., residuals=...)`` vs the
  six GEMMs of a layer's forward and backward (x W_in, Y W_out, dout W_out^T, Y^T dout,
  dZ W_in^T, x^T dZ); also fwd+bwd without residuals (the input GEMM recomputed);
- the fused kernels alone, with their bytes moved and bandwidth.
Decode: ``phalanx_step`` for a batch of 64 (after a prefill), per token, vs a PyTorch
implementation of the same step (when torch imports), both checked against each other.

Times: CUDA events around ``--calls`` back-to-back calls, after ``--warmup`` calls; the median
over ``--runs`` runs of the per-call time, the runs of a layer measurement and of its GEMM
baseline interleaved. Writes ``phalanx_bench.json`` into ``--out`` and prints
a Markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse_sizes(text):
    out = []
    for item in text.split(","):
        B, L = (int(p) for p in item.lower().split("x"))
        out.append((B, L))
    return out


def gpu_time(fn, *, runs, calls, warmup):
    """Median over runs of (event time of `calls` back-to-back calls) / calls, in ms."""
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


def paired_times(fns, *, runs, calls, warmup):
    """gpu_time of each of ``fns``, their runs interleaved (run i of every fn, then run i + 1):
    the median over runs of each fn's per-call time, in ms."""
    import cupy as cp

    for fn in fns:
        for _ in range(warmup):
            fn()
    cp.cuda.Device().synchronize()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            out.append(cp.cuda.get_elapsed_time(start, end) / calls)
    return [statistics.median(t) for t in times]


def bench_size(B, L, dim, dtype, args, log):
    import cupy as cp
    import numpy as np

    import swr_array
    from swr_array import numba_kernels as nk

    head_dim = 16
    params = swr_array.init_phalanx(dim, head_dim=head_dim, dtype=dtype, xp=cp, seed=0)
    H = dim // head_dim
    hd, width = H * head_dim, params["W_in"].shape[1]
    M = B * L
    rng = cp.random.default_rng(0)
    x = rng.standard_normal((B, L, dim), dtype=cp.float32).astype(dtype)
    dout = rng.standard_normal((B, L, dim), dtype=cp.float32).astype(dtype)
    x2, dout2 = x.reshape(M, dim), dout.reshape(M, dim)
    W_in, W_out = params["W_in"], params["W_out"]
    y = rng.standard_normal((M, hd), dtype=cp.float32).astype(dtype)
    dz = rng.standard_normal((M, width), dtype=cp.float32).astype(dtype)
    t = dict(runs=args.runs, calls=args.calls, warmup=args.warmup)

    def gemm_fwd():
        x2 @ W_in
        y @ W_out

    def gemm_fwdbwd():
        gemm_fwd()
        dout2 @ W_out.T
        y.T @ dout2
        dz @ W_in.T
        x2.T @ dz

    def ours_fwd():
        swr_array.phalanx(x, params)

    def ours_fwdbwd():
        _, res = swr_array.phalanx(x, params, return_residuals=True)
        swr_array.phalanx_vjp(x, params, dout, residuals=res)

    def ours_fwdbwd_recompute():
        swr_array.phalanx(x, params)
        swr_array.phalanx_vjp(x, params, dout)

    z = x2 @ W_in
    dy = dout2 @ W_out.T
    kw = dict(batch=B, length=L, heads=H, head_dim=head_dim, kv_heads=H, decay_max=1.0,
              block_len=16, hops=1)
    pf = nk.phalanx_fused
    nrows = pf.bias_rows(pf.storage_kind(dtype), B, L, H, head_dim, 16)  # what it writes
    parts = cp.empty((nrows, width - hd), cp.float32)
    y_out = cp.empty((M, hd), dtype)
    dz_out = cp.empty((M, width), dtype)

    def kernel_fwd():
        nk.phalanx_forward(z, params["b_a"], params["b_b"], params["b_c"], y_out, **kw)

    def kernel_bwd():
        nk.phalanx_backward(z, dy, params["b_a"], params["b_b"], params["b_c"], dz_out, y_out,
                            parts, **kw)

    r = {"B": B, "L": L, "dim": dim, "heads": H, "head_dim": head_dim, "width": width}
    spear_layer = getattr(args, "spear_layer", None)
    if spear_layer is not None:
        try:
            r.update(bench_spear(spear_layer, B, L, dim, t, log))
        except Exception as exc:  # noqa: BLE001 - keep ours if spear's layer fails
            r["spear_error"] = f"{type(exc).__name__}: {exc}"
            log(f"  spear layer failed: {r['spear_error']}")
    # each layer measurement and its GEMM baseline alternate run by run (paired_times), so a
    # drift of the GPU's clocks during the benchmark moves both alike
    for pair in [[("gemm_fwd", gemm_fwd), ("ours_fwd", ours_fwd)],
                 [("gemm_fwdbwd", gemm_fwdbwd), ("ours_fwdbwd", ours_fwdbwd),
                  ("ours_fwdbwd_recompute", ours_fwdbwd_recompute)],
                 [("kernel_fwd", kernel_fwd)], [("kernel_bwd", kernel_bwd)]]:
        for name, ms in zip([n for n, _ in pair], paired_times([f for _, f in pair], **t)):
            r[name + "_ms"] = ms
            log(f"  {B}x{L} {name}: {ms:.3f} ms")
    item = np.dtype(dtype).itemsize
    r["kernel_fwd_bytes"] = M * (width + hd) * item
    r["kernel_bwd_bytes"] = M * (2 * width + 2 * hd) * item + parts.nbytes
    r["kernel_fwd_TBps"] = r["kernel_fwd_bytes"] / r["kernel_fwd_ms"] / 1e9
    r["kernel_bwd_TBps"] = r["kernel_bwd_bytes"] / r["kernel_bwd_ms"] / 1e9
    r["fwd_ratio"] = r["ours_fwd_ms"] / r["gemm_fwd_ms"]
    r["fwdbwd_ratio"] = r["ours_fwdbwd_ms"] / r["gemm_fwdbwd_ms"]
    flops_fwd = 2 * M * dim * (width + hd)
    r["gemm_fwd_TFLOPs"] = flops_fwd / r["gemm_fwd_ms"] / 1e9
    return r


def load_spear_layer(build_dir, wait_s):
    """spear's Phalanx module class (spear.nn.phalanx.swr.Phalanx) from build_spear.sh's build,
    or the reason it is unavailable."""
    try:
        from swr_array import bench_peers as peers

        if build_dir and (os.path.isdir(build_dir) or wait_s > 0):
            peers._load_spear_from_build(build_dir, wait_s)
        from spear.nn.phalanx.swr import Phalanx

        return Phalanx, None
    except Exception as exc:  # noqa: BLE001 - any failure: no spear column, say why
        return None, f"{type(exc).__name__}: {exc}"


def bench_spear(Phalanx, B, L, dim, t, log):
    """spear's Phalanx layer (bf16, its BTP kernel, k=2 i.e. hops=1, block 16), forward and
    forward+backward (out.backward(dout): input and parameter gradients), CUDA events."""
    import torch

    torch.manual_seed(0)
    layer = Phalanx(dim, length=L, dtype=torch.bfloat16).cuda()
    x = torch.randn(B, L, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(B, L, dim, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            layer(x)

    def fwdbwd():
        layer(x).backward(dout)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    r = {"spear_fwd_ms": gpu_time(fwd, **t), "spear_fwdbwd_ms": gpu_time(fwdbwd, **t)}
    log(f"  {B}x{L} spear layer fwd {r['spear_fwd_ms']:.3f} ms, "
        f"fwd+bwd {r['spear_fwdbwd_ms']:.3f} ms")
    return r


def bench_decode(batch, dim, dtype, args, log):
    import cupy as cp

    import swr_array

    head_dim = 16
    params = swr_array.init_phalanx(dim, head_dim=head_dim, dtype=dtype, xp=cp, seed=1)
    H = dim // head_dim
    prompt, steps = 37, 64
    rng = cp.random.default_rng(1)
    xs = rng.standard_normal((batch, prompt + steps + 1, dim), dtype=cp.float32).astype(dtype)
    _, state0 = swr_array.phalanx(xs[:, :prompt], params, return_state=True)
    tokens = [cp.ascontiguousarray(xs[:, prompt + i]) for i in range(steps)]
    r = {"batch": batch, "dim": dim, "prompt": prompt}

    def ours():
        state = state0
        for x_t in tokens:
            _, state = swr_array.phalanx_step(x_t, params, state)

    r["ours_step_ms"] = gpu_time(ours, runs=args.runs, calls=1, warmup=2) / steps
    log(f"  decode ours: {r['ours_step_ms'] * 1e3:.1f} us/token")
    # host time of one step (what a Python decode loop waits for when the GPU is idle)
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    state = state0
    for x_t in tokens:
        _, state = swr_array.phalanx_step(x_t, params, state)
    r["ours_step_host_us"] = (time.perf_counter() - t0) / steps * 1e6
    cp.cuda.Device().synchronize()
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        r["torch"] = f"skipped: {exc}"
        return r
    try:
        return _torch_decode(r, torch, params, state0, tokens, prompt, steps, H, head_dim, dtype,
                             args, log)
    except Exception as exc:  # noqa: BLE001
        r["torch"] = f"failed: {exc!r}"
        return r


def _torch_decode(r, torch, params, state0, tokens, prompt, steps, H, head_dim, dtype, args, log):
    import cupy as cp
    import numpy as np

    import swr_array

    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        np.dtype(dtype).name]
    dev = torch.device("cuda")
    P = {k: torch.from_dlpack(v) for k, v in params.items() if k != "decay_max"}
    dm = float(params["decay_max"])
    hd = H * head_dim

    def torch_step(x_t, st, position):
        w, g, cv = st
        z = x_t @ P["W_in"]
        v = z[:, :hd].float().view(-1, H, head_dim)
        bg = torch.sigmoid(z[:, hd:2 * hd].float() + P["b_b"].float()).view(-1, H, head_dim)
        c = (z[:, 2 * hd:3 * hd].float() + P["b_c"].float()).view(-1, H, head_dim)
        a = (dm * torch.sigmoid(z[:, 3 * hd:].float() + P["b_a"].float()))[..., None]
        u = bg * v
        off = position % 16
        if off == 0:
            w, g = u, a.expand_as(u)
        else:
            w, g = a * w + u, a * g
        yv = ((w + g * cv) * c + v).to(tdt).view(-1, hd)
        if off == 15:
            cv, w, g = w, torch.zeros_like(w), torch.ones_like(g)
        return yv @ P["W_out"], (w, g, cv)

    st0 = (torch.from_dlpack(state0.w), torch.from_dlpack(state0.g),
           torch.from_dlpack(cp.ascontiguousarray(state0.carry_v[..., 0])))
    ttok = [torch.from_dlpack(x_t) for x_t in tokens]
    # agreement with ours on the first tokens
    st, state = st0, state0
    worst = 0.0
    for i in range(8):
        o_t, st = torch_step(ttok[i], st, prompt + i)
        o, state = swr_array.phalanx_step(tokens[i], params, state)
        a, b = o_t.float().cpu().numpy(), cp.asnumpy(o).astype(np.float32)
        worst = max(worst, float(np.linalg.norm(a - b) / np.linalg.norm(a)))
    r["torch_vs_ours_rel_err"] = worst

    def torch_loop():
        st = st0
        for i, x_t in enumerate(ttok):
            _, st = torch_step(x_t, st, prompt + i)

    for _ in range(2):
        torch_loop()
    torch.cuda.synchronize(dev)
    times = []
    for _ in range(args.runs):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch_loop()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / steps)
    r["torch_step_ms"] = statistics.median(times)
    log(f"  decode torch: {r['torch_step_ms'] * 1e3:.1f} us/token")
    return r


def table(results):
    lines = ["| B x L | GEMMs fwd ms | ours fwd ms | ratio | GEMMs fwd+bwd ms | ours fwd+bwd ms "
             "| ratio | fused fwd kernel ms (TB/s) | fused bwd kernel ms (TB/s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    spear = [r for r in results["sizes"] if "spear_fwd_ms" in r]
    for r in results["sizes"]:
        lines.append(
            f"| {r['B']} x {r['L']} | {r['gemm_fwd_ms']:.3f} | {r['ours_fwd_ms']:.3f} | "
            f"{r['fwd_ratio']:.2f} | {r['gemm_fwdbwd_ms']:.3f} | {r['ours_fwdbwd_ms']:.3f} | "
            f"{r['fwdbwd_ratio']:.2f} | {r['kernel_fwd_ms']:.3f} ({r['kernel_fwd_TBps']:.2f}) | "
            f"{r['kernel_bwd_ms']:.3f} ({r['kernel_bwd_TBps']:.2f}) |")
    if spear:
        lines += ["", "| B x L | spear layer fwd ms | ours fwd ms | spear / ours | spear layer "
                  "fwd+bwd ms | ours fwd+bwd ms | spear / ours |", "|---|---|---|---|---|---|---|"]
        for r in spear:
            lines.append(
                f"| {r['B']} x {r['L']} | {r['spear_fwd_ms']:.3f} | {r['ours_fwd_ms']:.3f} | "
                f"{r['spear_fwd_ms'] / r['ours_fwd_ms']:.2f} | {r['spear_fwdbwd_ms']:.3f} | "
                f"{r['ours_fwdbwd_ms']:.3f} | {r['spear_fwdbwd_ms'] / r['ours_fwdbwd_ms']:.2f} |")
    elif results.get("spear_unavailable"):
        lines += ["", f"spear's layer: not measured ({results['spear_unavailable']})"]
    d = results.get("decode")
    if d:
        lines.append("")
        torch_ms = d.get("torch_step_ms")
        lines.append(f"decode, batch {d['batch']}, dim {d['dim']}: ours "
                     f"{d['ours_step_ms'] * 1e3:.1f} us/token (host {d['ours_step_host_us']:.1f} "
                     "us/token)" + (f", torch {torch_ms * 1e3:.1f} us/token" if torch_ms else ""))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for phalanx_bench.json")
    ap.add_argument("--sizes", default="16x2048,4x8192,1x32768", type=parse_sizes)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--spear-build", default=None, metavar="DIR",
                    help="time spear's Phalanx layer too, with the extension that "
                         "benchmarks/build_spear.sh built into DIR")
    ap.add_argument("--spear-wait", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds for that build to finish")
    ap.add_argument("--tuning", default="", metavar="KEY=VALUE,...",
                    help="phalanx_fused.TUNING settings for this run, e.g. bwd_kernel=rows")
    args = ap.parse_args(argv)

    import cupy as cp
    import ml_dtypes
    import numpy as np

    dtype = np.dtype(ml_dtypes.bfloat16) if args.dtype in ("bf16", "bfloat16") else \
        np.dtype(args.dtype)

    def log(msg):
        print(msg, flush=True)

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    results = {
        "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "python": platform.python_version(), "cupy": cp.__version__,
        "numpy": np.__version__, "dtype": dtype.name, "runs": args.runs, "calls": args.calls,
        "sizes": [],
    }
    if args.tuning:
        from swr_array.numba_kernels import phalanx_fused as PF

        for item in args.tuning.split(","):
            key, _, value = item.partition("=")
            if key not in PF.TUNING:
                raise SystemExit(f"--tuning: {key!r} is not a TUNING knob")
            PF.TUNING[key] = value if isinstance(PF.TUNING[key], str) else int(value)
        results["tuning"] = args.tuning
    try:
        import numba_cuda

        results["numba_cuda"] = numba_cuda.__version__
    except Exception:  # noqa: BLE001
        pass
    log(f"device: {results['device']}")
    os.makedirs(args.out, exist_ok=True)
    args.spear_layer = None
    if args.spear_build:
        args.spear_layer, why = load_spear_layer(args.spear_build, args.spear_wait)
        if why:
            results["spear_unavailable"] = why
            log(f"spear's layer unavailable: {why}")

    def save():
        with open(os.path.join(args.out, "phalanx_bench.json"), "w") as f:
            json.dump(results, f, indent=2)

    for B, L in args.sizes:
        results["sizes"].append(bench_size(B, L, args.dim, dtype, args, log))
        save()
    if not args.no_decode:
        try:
            results["decode"] = bench_decode(args.decode_batch, args.dim, dtype, args, log)
        except Exception as exc:  # noqa: BLE001 - keep the layer's numbers if decode fails
            results["decode_error"] = repr(exc)
            log(f"decode failed: {exc!r}")
        save()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
