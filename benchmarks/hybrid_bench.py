"""Hybrid-model benchmark: training-step throughput and peak memory of decoder LMs whose mixers
are attention, Phalanx, or both.

    python benchmarks/hybrid_bench.py --out DIR [--layers 12] [--dim 2048]
                                      [--contexts 4096,8192,16384,32768] [--tokens 32768]
                                      [--spear-build DIR --spear-wait S]
    python benchmarks/hybrid_bench.py --from-json DIR/hybrid_bench.json [--markdown PAGE.md]
                                      [--plot PNG]

The model is examples/generate.py's ``DecoderLM`` (token embedding, pre-RMSNorm residual blocks
each followed by a SwiGLU MLP of 3 x dim, final RMSNorm, LM head), all parameters in
``--dtype`` (bfloat16). Its mixers, one model per row:

- ``transformer``: causal attention in every block (16 heads of dim/16 = 128 at dim 2048; torch
  ``scaled_dot_product_attention`` on its flash backend);
- ``hybrid 1:1`` / ``hybrid 1:3``: one attention block per 2 / per 4 blocks, Phalanx in the
  others (``swr_array.adapters.torch.Phalanx``: heads of 16, hops=1, block_len 16);
- ``phalanx``: Phalanx in every block;
- ``hybrid 1:3 (spear)``: the 1:3 hybrid with spear-python's Phalanx layer (its BTP kernel), when
  spear imports (``--spear-build``: the folder benchmarks/build_spear.sh builds into); otherwise
  its rows are skipped and the reason printed and kept in the JSON.

Every context length runs the same tokens per step (``--tokens``; batch = tokens / context). A
training step is the forward, the cross-entropy loss, the backward and a fused AdamW step. Times:
CUDA events around each step; the median over ``--steps`` steps after ``--warmup`` steps (on the
CPU: ``time.perf_counter``). Peak memory: ``torch.cuda.max_memory_allocated`` over those steps.
At 24 x 2048 the models have about 1.4 B parameters (12 layers: 0.78 B); the default ``--layers
12`` keeps the whole run near 100-200 s on one H200. The output says which depth was run: the
embedding, LM head and loss cost the same at any depth, a larger share of a 12-layer step, so
the mixers' differences show somewhat more at 24 layers than at 12.

Writes ``hybrid_bench.json`` into ``--out`` and prints the Markdown table; ``--from-json``
re-renders a saved run without a GPU (``--markdown`` and ``--plot`` write the table and a
tokens/s plot; the plot needs matplotlib and is skipped with a message without it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: row name -> (attn_every of DecoderLM, which Phalanx layer)
MODELS = {
    "transformer": (1, "ours"),
    "hybrid 1:1": (2, "ours"),
    "hybrid 1:3": (4, "ours"),
    "phalanx": (0, "ours"),
    "hybrid 1:3 (spear)": (4, "spear"),
}
BASELINE = "transformer"
PAPER_CLAIM = ("paper: 1B-parameter multi-hybrids train 10-40% faster than optimized "
               "Transformers from 4K to 32K context")  # fmt: skip


def _ints(text):
    return [int(t) for t in text.split(",") if t]


def load_model_module():
    """examples/generate.py as a module (its ``DecoderLM`` is the model benchmarked here)."""
    spec = importlib.util.spec_from_file_location("generate_example",
                                                  ROOT / "examples" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_spear_phalanx(build_dir, wait_s):
    """spear's Phalanx module class, or (None, why it is unavailable)."""
    try:
        if build_dir and (os.path.isdir(build_dir) or wait_s > 0):
            from swr_array import bench_peers

            bench_peers._load_spear_from_build(build_dir, wait_s)
        from spear.nn.phalanx.swr import Phalanx

        return Phalanx, None
    except Exception as exc:  # noqa: BLE001 - any failure: skip spear's rows, say why
        return None, f"{type(exc).__name__}: {exc}"


def build_model(gen, name, context, args, spear_cls):
    import torch

    attn_every, impl = MODELS[name]
    factory = None
    if impl == "spear":
        dtype = getattr(torch, args.dtype)

        def factory(dim):
            return spear_cls(dim, length=context, dtype=dtype)

    model = gen.DecoderLM(vocab_size=args.vocab, dim=args.dim, depth=args.layers,
                          attn_every=attn_every, attn_heads=args.attn_heads, head_dim=16,
                          block_len=16, hops=1, mlp_mult=3, phalanx_factory=factory)  # fmt: skip
    return model.to(dtype=getattr(torch, args.dtype))


def bench_row(gen, name, context, args, spear_cls, log):
    """Step time (median ms), tokens/s and peak memory of one model at one context."""
    import torch
    import torch.nn.functional as F

    cuda = args.device.startswith("cuda")
    batch = args.tokens // context
    gc.collect()  # the previous row's model and optimizer
    if cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = build_model(gen, name, context, args, spear_cls)
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None)
        tokens = torch.randint(args.vocab, (batch, context + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, args.vocab).float(), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ctx = _attention_backend() if cuda else contextlib.nullcontext()
    times = []
    with ctx:
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))  # fmt: skip
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    r = {"model": name, "context": context, "batch": batch, "params": n_params,
         "step_ms": ms, "step_ms_all": times, "tokens_per_s": batch * context / (ms * 1e-3),
         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}  # fmt: skip
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
    log(f"  {name:20s} {context:6d} x batch {batch:3d}: {ms:8.1f} ms/step, "
        f"{r['tokens_per_s']:9.0f} tokens/s, peak {peak}")
    return r


def _attention_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def run(args, log):
    import torch

    gen = load_model_module()
    cuda = args.device.startswith("cuda")
    results = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})",
        "torch": torch.__version__, "python": platform.python_version(),
        "config": {"layers": args.layers, "dim": args.dim, "vocab": args.vocab,
                   "dtype": args.dtype, "attn_heads": args.attn_heads, "phalanx_head_dim": 16,
                   "hops": 1, "block_len": 16, "mlp_hidden": 3 * args.dim,
                   "tokens_per_step": args.tokens, "contexts": args.contexts,
                   "warmup": args.warmup, "steps": args.steps},
        "models": list(args.models), "rows": [], "skipped": {},
    }  # fmt: skip
    log(f"device: {results['device']}; {args.layers} layers x dim {args.dim}, {args.dtype}, "
        f"{args.tokens} tokens per step")
    for context in args.contexts:
        if args.tokens % context:
            raise SystemExit(f"--tokens ({args.tokens}) must be a multiple of each context")
    start = time.monotonic()

    def measure(names, spear_cls=None):
        for context in args.contexts:
            for name in names:
                if time.monotonic() - start > args.time_budget:
                    log(f"  {name} at {context}: skipped (past --time-budget "
                        f"{args.time_budget:.0f} s)")  # fmt: skip
                    results["rows"].append({"model": name, "context": context,
                                            "error": "past the time budget"})  # fmt: skip
                    continue
                try:
                    results["rows"].append(bench_row(gen, name, context, args, spear_cls, log))
                except Exception as exc:  # noqa: BLE001 - keep the other rows (OOM, peer errors)
                    msg = f"{type(exc).__name__}: {str(exc)[:300]}"
                    log(f"  {name} at {context}: failed ({msg})")
                    results["rows"].append({"model": name, "context": context, "error": msg})
                    if cuda:
                        torch.cuda.empty_cache()
                if args.out:
                    with open(os.path.join(args.out, "hybrid_bench.json"), "w") as f:
                        json.dump(results, f, indent=2)

    measure([m for m in args.models if MODELS[m][1] == "ours"])
    # spear's rows last: its extension may still be building (build_spear.sh in the background)
    spear_rows = [m for m in args.models if MODELS[m][1] == "spear"]
    if spear_rows:
        spear_cls, why = load_spear_phalanx(args.spear_build, args.spear_wait)
        if spear_cls is None:
            for m in spear_rows:
                results["skipped"][m] = why
                log(f"skipping {m}: spear's Phalanx layer is unavailable ({why})")
        else:
            measure(spear_rows, spear_cls)
    results["seconds"] = time.monotonic() - start
    return results


def _row(results, model, context):
    for r in results["rows"]:
        if r["model"] == model and r["context"] == context and "step_ms" in r:
            return r
    return None


def _ctx(x) -> str:
    return f"{x // 1024}K" if x % 1024 == 0 else str(x)


def table(results) -> str:
    """Markdown, one row per context and model: ms per step, tokens/s, speedup over the
    Transformer at that context (its step time / this one's; the percentage gained) and peak
    memory."""
    c = results["config"]
    lines = [
        f"Training step (forward, backward, AdamW) of a {c['layers']}-layer decoder LM, dim "
        f"{c['dim']}, SwiGLU {c['mlp_hidden']}, vocab {c['vocab']}, {c['dtype']}, "
        f"{c['tokens_per_step']} tokens per step: {results['device']}. Median of {c['steps']} "
        f"steps after {c['warmup']}.",
        "",
        "| context | model | params (M) | batch | ms/step | tokens/s | vs Transformer | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in sorted(c["contexts"]):
        base = _row(results, BASELINE, x)
        for model in results["models"]:
            r = _row(results, model, x)
            if r is None:
                continue
            speed = "-" if base is None else base["step_ms"] / r["step_ms"]
            cells = [_ctx(x), model, f"{r['params'] / 1e6:.4g}", str(r["batch"]),
                     f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:.0f}",
                     speed if speed == "-" else f"{speed:.2f}x ({(speed - 1) * 100:+.0f}%)",
                     "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"({PAPER_CLAIM}.)"]
    for model, why in results.get("skipped", {}).items():
        lines.append(f"{model}: not measured ({why}).")
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"{r['model']} at {_ctx(r['context'])}: not measured ({r['error']}).")
    return "\n".join(lines) + "\n"


def plot(results, path, log=print) -> bool:
    """Tokens/s against context, one line per model; False (and a message) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return False
    ctxs = sorted(results["config"]["contexts"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in results["models"]:
        pts = [(x, _row(results, model, x)) for x in ctxs]
        pts = [(x, r["tokens_per_s"] / 1e3) for x, r in pts if r is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ctxs, [_ctx(x) for x in ctxs])
    ax.set_xlabel("context length")
    ax.set_ylabel("training throughput (K tokens/s)")
    ax.set_title(f"{results['config']['layers']} layers x {results['config']['dim']}, "
                 f"{results['device']}", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for hybrid_bench.json")
    ap.add_argument("--from-json", help="render a saved hybrid_bench.json (no GPU needed)")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--plot", help="also plot tokens/s against context into this PNG")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--attn-heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--contexts", default="4096,8192,16384,32768", type=_ints,
                    help="measured in this order (the table sorts them)")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per step")
    ap.add_argument("--models", default=",".join(MODELS),
                    type=lambda s: [m.strip() for m in s.split(",") if m.strip()])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--time-budget", type=float, default=180.0, metavar="S",
                    help="skip the remaining rows once this many seconds have passed")
    ap.add_argument("--spear-build", default=None, metavar="DIR",
                    help="benchmarks/build_spear.sh's build folder for the spear rows")
    ap.add_argument("--spear-wait", type=float, default=0.0, metavar="S",
                    help="after our rows, wait up to S seconds for that build to finish")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
    else:
        if not args.out:
            ap.error("--out is required unless --from-json is given")
        unknown = [m for m in args.models if m not in MODELS]
        if unknown:
            ap.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
        os.makedirs(args.out, exist_ok=True)

        def log(msg):
            print(msg, flush=True)

        results = run(args, log)
        with open(os.path.join(args.out, "hybrid_bench.json"), "w") as f:
            json.dump(results, f, indent=2)
    text = table(results)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.plot:
        plot(results, args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
