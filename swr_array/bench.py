"""``python -m swr_array bench``: time swr-array against the memory floor and its peers on one GPU.

Everything runs in one process. Each GPU time is taken with CUDA events: after a warm-up,
``--runs`` runs of ``--calls`` back-to-back calls through the public API, each run's time divided
by the number of calls, and the median over the runs is reported. Inputs rotate over several sets
whose bytes add up to more than twice the L2 cache, so that no call finds its inputs in L2.

- ours: ``swr_array.swr`` (forward) and ``swr`` + ``swr_vjp`` (forward+backward) on CuPy arrays;
- the floor: the bytes the calls must move (forward: a and u read, y written; forward+backward:
  that, then a, u and dy read and du, da written by the gradient call) over the device-to-device
  copy bandwidth measured here (bytes read + bytes written per second);
- peers (``swr_array/bench_peers.py``): spear's BTP kernel, accelerated-scan,
  flash-linear-attention's ``chunk_hgrn``, torch SDPA (flash, causal) and flex_attention sliding
  windows, each in its own natural layout and dtype, skipped with a reason when it does not
  import or run here;
- the host overhead of one call on a tiny input (median over ``--host-calls`` calls).

Writes ``bench.json`` and ``bench.png`` into ``--out`` and, with ``--markdown PATH``, the page PATH
with its plot next to it (``PATH`` with ``.png``). The pure parts (argument parsing, floor
arithmetic, tables, JSON, plot, page) run without a GPU; ``tests/test_bench.py`` covers them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_SIZES = ((16, 2048), (4, 8192), (1, 32768))
DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "f32": "float32", "fp32": "float32", "float32": "float32",
    "f16": "float16", "fp16": "float16", "float16": "float16",
}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
LAYOUTS = ("BLHD", "BHDL")
DEFAULT_PEERS = ("spear", "accelerated-scan", "chunk_hgrn", "sdpa")
DEFAULT_FLEX_WINDOWS = (128, 512)
#: order in which peers are measured: the slow-to-compile flex_attention last
MEASURE_ORDER = ("sdpa", "accelerated-scan", "chunk_hgrn", "spear")
DIRECTIONS = (("fwd", "Forward"), ("fwdbwd", "Forward + backward"))
FALLBACK_L2_BYTES = 50 * 2**20  # H100
HOST_PEERS = ("spear", "accelerated-scan", "sdpa")  # peers whose host overhead is also taken

# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
    return items


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"16x2048,4x8192"`` -> ((16, 2048), (4, 8192))."""
    out = []
    for item in _split(text):
        parts = item.lower().replace("*", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"size {item!r} is not BxL (e.g. 4x8192)")
        B, L = (int(p) for p in parts)
        if B < 1 or L < 1:
            raise argparse.ArgumentTypeError(f"size {item!r}: B and L must be >= 1")
        out.append((B, L))
    return tuple(out)


def parse_dtypes(text: str) -> tuple[str, ...]:
    out = []
    for item in _split(text):
        name = DTYPE_ALIASES.get(item.lower())
        if name is None:
            raise argparse.ArgumentTypeError(
                f"dtype {item!r} not one of {sorted(set(DTYPE_ALIASES))}"
            )
        out.append(name)
    return tuple(dict.fromkeys(out))


def parse_layouts(text: str) -> tuple[str, ...]:
    out = []
    for item in _split(text):
        if item.upper() not in LAYOUTS:
            raise argparse.ArgumentTypeError(f"layout {item!r} not one of {LAYOUTS}")
        out.append(item.upper())
    return tuple(dict.fromkeys(out))


def parse_hops(text: str) -> tuple[int | None, ...]:
    out: list[int | None] = []
    for item in _split(text):
        if item.lower() in ("none", "exact"):
            out.append(None)
        elif item.isdigit():
            out.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"hops {item!r}: a non-negative int or 'none'")
    return tuple(dict.fromkeys(out))


def parse_block_lens(text: str) -> tuple[int, ...]:
    out = []
    for item in _split(text):
        if not item.isdigit() or int(item) not in tuple(2**i for i in range(9)):
            raise argparse.ArgumentTypeError(f"block_len {item!r}: a power of two from 1 to 256")
        out.append(int(item))
    return tuple(dict.fromkeys(out))


def parse_windows(text: str) -> tuple[int, ...]:
    if str(text).strip().lower() in ("", "none"):
        return ()
    out = []
    for item in _split(text):
        if not item.isdigit() or int(item) < 1:
            raise argparse.ArgumentTypeError(f"window {item!r}: a positive int")
        out.append(int(item))
    return tuple(dict.fromkeys(out))


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from exc
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m swr_array bench``."""
    g = parser.add_argument_group("cases (the product of the lists is timed)")
    g.add_argument("--sizes", type=parse_sizes, default=DEFAULT_SIZES, metavar="BxL,...",
                   help="batch x sequence length (default: 16x2048,4x8192,1x32768)")
    g.add_argument("--dtypes", type=parse_dtypes, default=("bfloat16",), metavar="LIST",
                   help="bf16, fp16, fp32 (default: bf16)")
    g.add_argument("--layouts", type=parse_layouts, default=LAYOUTS, metavar="LIST",
                   help="BLHD and/or BHDL (default: both)")
    g.add_argument("--hops", type=parse_hops, default=(1,), metavar="LIST",
                   help="carrier hops, ints or 'none' for the exact recurrence (default: 1)")
    g.add_argument("--block-len", type=parse_block_lens, default=(16,), metavar="LIST",
                   help="block lengths (default: 16)")
    g.add_argument("--heads", type=_positive_int, default=128, help="heads H (default: 128)")
    g.add_argument("--head-dim", type=_positive_int, default=16, help="head dim D (default: 16)")
    g.add_argument("--per-channel", action="store_true",
                   help="per-channel coefficients a (u's shape) instead of per-head")
    t = parser.add_argument_group("timing")
    t.add_argument("--runs", type=_positive_int, default=7, help="timed runs, median (default: 7)")
    t.add_argument("--calls", type=_positive_int, default=20,
                   help="back-to-back calls per run (default: 20)")
    t.add_argument("--warmup", type=int, default=3,
                   help="untimed calls first, at least one per input set (default: 3)")
    t.add_argument("--host-calls", type=int, default=1000,
                   help="calls for the host-overhead median on a tiny input, 0 to skip "
                        "(default: 1000)")
    t.add_argument("--l2-bytes", type=int, default=None,
                   help="L2 size used to size the rotating input sets (default: the device's)")
    t.add_argument("--time-budget", type=float, default=0.0, metavar="S",
                   help="skip what is left after S seconds (0: no limit)")
    t.add_argument("--seed", type=int, default=0)
    p = parser.add_argument_group("peers")
    p.add_argument("--peers", default="all", metavar="LIST",
                   help="'all', 'none', or a list of spear, accelerated-scan, chunk_hgrn, sdpa, "
                        "flex<W> (default: all)")
    p.add_argument("--flex-windows", type=parse_windows, default=DEFAULT_FLEX_WINDOWS,
                   metavar="LIST",
                   help="flex_attention windows with --peers all (default: 128,512)")
    p.add_argument("--attn-head-dim", type=_positive_int, default=128,
                   help="attention head dim: H*D channels = heads x this (default: 128)")
    p.add_argument("--peers-file", default=None, metavar="PATH",
                   help="a replacement for swr_array/bench_peers.py (default: that module)")
    p.add_argument("--spear-build", default=".peers/build/spear", metavar="DIR",
                   help="where benchmarks/build_spear.sh builds spear "
                        "(default: .peers/build/spear)")
    p.add_argument("--spear-wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for a spear build running beside (default: 0)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default="bench_results", metavar="DIR",
                   help="folder for bench.json and bench.png (default: bench_results/)")
    o.add_argument("--markdown", default=None, metavar="PATH",
                   help="also write this page (e.g. docs/benchmarks.md) and its plot PATH.png")
    o.add_argument("--no-plot", action="store_true", help="write no PNG")
    o.add_argument("--from-json", default=None, metavar="PATH",
                   help="measure nothing: re-render the tables, plot and page from a bench.json")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def peer_names(args) -> tuple[str, ...]:
    """The peers asked for, in table order."""
    text = str(args.peers).strip().lower()
    if text in ("", "none"):
        return ()
    if text == "all":
        return DEFAULT_PEERS + tuple(f"flex{w}" for w in args.flex_windows)
    names = []
    for item in _split(args.peers):
        names.append("chunk_hgrn" if item in ("fla", "hgrn", "chunk-hgrn") else item)
    return tuple(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------
# cases and the memory floor
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    B: int
    L: int
    H: int
    D: int
    dtype: str
    layout: str
    hops: int | None
    block_len: int
    per_head: bool

    @property
    def group(self) -> tuple:
        """The cases of one table share this."""
        return (self.dtype, self.hops, self.block_len, self.per_head, self.H, self.D)

    @property
    def problem(self) -> tuple:
        """Everything but the layout (peers and the floor do not depend on it)."""
        return (self.B, self.L) + self.group

    def fields(self) -> dict:
        return asdict(self)


def make_cases(args) -> list[Case]:
    cases = []
    for dtype, hops, bl, (B, L), layout in itertools.product(
        args.dtypes, args.hops, args.block_len, args.sizes, args.layouts
    ):
        cases.append(Case(B, L, args.heads, args.head_dim, dtype, layout, hops, bl,
                          not args.per_channel))
    return cases


def floor_bytes(case: Case, direction: str) -> int:
    """Fewest bytes the calls move through device memory, each tensor read or written once per
    call.

    forward (``swr``): a and u read, y written. forward+backward: that, then the gradient call
    (``swr_vjp``), which reads a, u and dy and writes du and da: a and u are read by both calls.
    Per element of u (bf16, per-head a): 5 bytes of u-sized arrays and 3 of a-sized ones. A single
    pass reading a and u once (4 u + 2 a) is not possible through two calls.
    """
    item = ITEMSIZE[case.dtype]
    u = case.B * case.L * case.H * case.D * item
    a = case.B * case.L * case.H * item if case.per_head else u
    if direction == "fwd":
        return a + u + u
    if direction == "fwdbwd":
        return (a + u + u) + (a + u + u + u + a)
    raise ValueError(f"direction must be 'fwd' or 'fwdbwd', got {direction!r}")


def floor_ms(nbytes: int, bandwidth: float) -> float:
    """Milliseconds to move ``nbytes`` at ``bandwidth`` bytes/s (read + written)."""
    return nbytes / bandwidth * 1e3


def rotating_sets(set_bytes: int, l2_bytes: int, cap: int = 64) -> int:
    """How many input sets to rotate over: at least 2, and together over twice the L2 size."""
    need = math.ceil(2 * l2_bytes / max(1, set_bytes))
    return int(min(cap, max(2, need)))


# ----------------------------------------------------------------------------------------------
# timing (device-agnostic: a timer object provides start/stop/sync)
# ----------------------------------------------------------------------------------------------


class CupyTimer:
    """CUDA events on CuPy's current stream."""

    def __init__(self, cp=None):
        if cp is None:
            import cupy as cp
        self._cp = cp

    def sync(self):
        self._cp.cuda.get_current_stream().synchronize()

    def start(self):
        self._start = self._cp.cuda.Event()
        self._start.record()

    def stop(self) -> float:
        end = self._cp.cuda.Event()
        end.record()
        end.synchronize()
        return float(self._cp.cuda.get_elapsed_time(self._start, end))


class TorchTimer:
    """CUDA events on torch's current stream."""

    def __init__(self):
        import torch

        self._torch = torch

    def sync(self):
        self._torch.cuda.synchronize()

    def start(self):
        self._start = self._torch.cuda.Event(enable_timing=True)
        self._start.record()

    def stop(self) -> float:
        end = self._torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return float(self._start.elapsed_time(end))


def time_calls(fn: Callable[[int], Any], n_sets: int, timer, *, runs: int, calls: int,
               warmup: int) -> list[float]:
    """Per-call milliseconds of each run: ``calls`` back-to-back ``fn(i)`` between two events,
    ``i`` rotating over the input sets; the untimed warm-up covers every set at least once."""
    k = 0
    for _ in range(max(warmup, n_sets)):
        fn(k % n_sets)
        k += 1
    timer.sync()
    times = []
    for _ in range(runs):
        timer.start()
        for _ in range(calls):
            fn(k % n_sets)
            k += 1
        times.append(timer.stop() / calls)
    return times


def host_overhead(fn: Callable[[], Any], sync: Callable[[], Any], calls: int,
                  warmup: int = 20) -> dict:
    """Host microseconds of one call (no synchronisation inside the timed region)."""
    for _ in range(warmup):
        fn()
    sync()
    us = []
    for i in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        us.append((time.perf_counter_ns() - t0) / 1e3)
        if (i + 1) % 100 == 0:
            sync()
    sync()
    return summarize_us(us)


def summarize_us(us: Sequence[float]) -> dict:
    s = sorted(us)

    def q(p):
        return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]

    return {"median_us": statistics.median(s), "p10_us": q(0.1), "p90_us": q(0.9),
            "calls": len(s)}


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------


def new_payload(meta: dict) -> dict:
    return {"meta": meta, "results": [], "host_overhead": [], "peers": {}, "unavailable": {}}


def add_result(payload: dict, method: str, direction: str, case: Case | dict, *, ms=None,
               runs_ms=None, status: str = "ok", reason: str = "", **extra) -> dict:
    fields = case.fields() if isinstance(case, Case) else dict(case)
    rec = {"method": method, "direction": direction, **fields, "ms": ms,
           "runs_ms": list(runs_ms or []), "status": status, "reason": reason, **extra}
    payload["results"].append(rec)
    return rec


def _find(payload: dict, method: str, direction: str, case: Case, layout: str | None = None):
    for r in payload["results"]:
        if r["method"] != method or r["direction"] != direction:
            continue
        if (r["B"], r["L"], r["dtype"], r["hops"], r["block_len"], r["per_head"], r["H"],
                r["D"]) != (case.B, case.L, case.dtype, case.hops, case.block_len, case.per_head,
                            case.H, case.D):
            continue
        if layout is not None and r.get("layout") != layout:
            continue
        return r
    return None


def fmt_ms(ms: float | None) -> str:
    if ms is None or not math.isfinite(ms):
        return "—"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    if ms >= 0.01:
        return f"{ms:.3f}"
    return f"{ms:.4f}"


def fmt_ratio(r: float | None) -> str:
    if r is None or not math.isfinite(r):
        return "—"
    return f"{r:.2f}x"


def _cases_in(payload: dict) -> list[Case]:
    seen = {}
    for r in payload["results"]:
        if r["method"] != "swr":
            continue
        c = Case(r["B"], r["L"], r["H"], r["D"], r["dtype"], r["layout"], r["hops"],
                 r["block_len"], r["per_head"])
        seen.setdefault(c, None)
    return list(seen)


def _group_title(group: tuple) -> str:
    dtype, hops, bl, per_head, H, D = group
    h = "exact (hops=None)" if hops is None else f"hops={hops}"
    a = "per-head a" if per_head else "per-channel a"
    return f"{SHORT_DTYPE.get(dtype, dtype)}, {h}, block_len={bl}, H={H} x D={D}, {a}"


def _peer_order(payload: dict) -> list[str]:
    return list(payload["peers"])


def _cell_status(r: dict | None) -> str:
    if r is None:
        return "—"
    if r["status"] == "ok":
        return fmt_ms(r["ms"])
    return "skip" if r["status"] == "skipped" else "fail"


def format_tables(payload: dict) -> str:
    """Markdown tables: one per direction and case group; times in ms, ratios against the floor
    (swr / floor) and against each peer (peer / swr: above 1 means swr is faster)."""
    cases = _cases_in(payload)
    groups = list(dict.fromkeys(c.group for c in cases))
    peers = _peer_order(payload)
    labels = {name: payload["peers"][name].get("label", name) for name in peers}
    marks = {name: payload["peers"][name].get("mark", "") for name in peers}
    blocks = []
    for direction, title in DIRECTIONS:
        for group in groups:
            rows = sorted((c for c in cases if c.group == group),
                          key=lambda c: (c.B * c.L, c.L, LAYOUTS.index(c.layout)))
            used = [n for n in peers
                    if any(_find(payload, n, direction, c) is not None for c in rows)]
            head = ["B x L", "layout", "floor", "swr", "swr / floor"]
            head += [f"{labels[n]} {marks[n]}".strip() for n in used]
            lines = [f"**{title}, ms** ({_group_title(group)})", "",
                     "| " + " | ".join(head) + " |",
                     "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
            for c in rows:
                ours = _find(payload, "swr", direction, c, c.layout)
                fl = _find(payload, "floor", direction, c)
                ours_ms = ours["ms"] if ours and ours["status"] == "ok" else None
                fl_ms = fl["ms"] if fl else None
                cells = [f"{c.B} x {c.L}", c.layout, fmt_ms(fl_ms), _cell_status(ours),
                         fmt_ratio(ours_ms / fl_ms if ours_ms and fl_ms else None)]
                for n in used:
                    r = _find(payload, n, direction, c)
                    cell = _cell_status(r)
                    if r is not None and r["status"] == "ok" and ours_ms:
                        cell += f" ({fmt_ratio(r['ms'] / ours_ms)})"
                    cells.append(cell)
                lines.append("| " + " | ".join(cells) + " |")
            blocks.append("\n".join(lines))
    legend = ("floor: bytes moved / measured copy bandwidth; swr / floor: how far from the floor; "
              "peer (Nx): peer time / swr time, above 1 means swr is faster. "
              "skip / fail: see the notes.")
    return "\n\n".join(blocks + [legend]) if blocks else "(no results)"


def format_host_table(payload: dict) -> str:
    rows = payload.get("host_overhead") or []
    if not rows:
        return ""
    lines = ["| method | call | median us | p10 us | p90 us | calls | input |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['label']} | {r['call']} | {r.get('status')} | | | | "
                         f"{r.get('reason', '')[:80]} |")
            continue
        lines.append(f"| {r['label']} | {r['call']} | {r['median_us']:.1f} | {r['p10_us']:.1f} | "
                     f"{r['p90_us']:.1f} | {r['calls']} | {r['input']} |")
    return "\n".join(lines)


def format_notes(payload: dict) -> str:
    lines = []
    for name, info in payload["peers"].items():
        ver = info.get("version", "")
        mark = info.get("mark", "")
        lines.append(f"- {mark + ' ' if mark else ''}**{info.get('label', name)}** "
                     f"({name} {ver}): {info.get('note', '')}.")
    for name, why in payload.get("unavailable", {}).items():
        lines.append(f"- **{name}** not measured: {why}")
    reasons = {}
    for r in payload["results"]:
        if r["status"] != "ok" and r.get("reason"):
            reasons.setdefault((r["method"], r["reason"]), []).append(
                f"{r['B']}x{r['L']}" + (f" {r['layout']}" if r["method"] == "swr" else ""))
    for (method, why), where in reasons.items():
        where = ", ".join(dict.fromkeys(where))
        lines.append(f"- {method} skipped/failed at {where}: {why}")
    if payload.get("over_budget"):
        lines.append("- not measured (time budget spent): " + ", ".join(payload["over_budget"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# JSON, plot, page
# ----------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def _plot_group(payload: dict):
    """(group, tokens, cases) for the plot: the first group, the most common B*L in it."""
    cases = _cases_in(payload)
    if not cases:
        return None
    group = cases[0].group
    in_group = [c for c in cases if c.group == group]
    counts: dict[int, int] = {}
    for c in in_group:
        counts[c.B * c.L] = counts.get(c.B * c.L, 0) + 1
    tokens = max(counts, key=lambda t: (counts[t], t))
    return group, tokens, [c for c in in_group if c.B * c.L == tokens]


def plot(payload: dict, path: str | os.PathLike) -> bool:
    """Time vs sequence length at fixed B*L, log scale, one line per method, the floor drawn.
    Returns False (and writes nothing) without matplotlib or results."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except Exception:  # noqa: BLE001
        return False
    sel = _plot_group(payload)
    if sel is None:
        return False
    group, tokens, cases = sel
    by_problem = {}
    for c in cases:
        by_problem.setdefault(c.problem, c)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    for ax, (direction, title) in zip(axes, DIRECTIONS):
        series: dict[str, list] = {}
        for c in sorted(cases, key=lambda c: c.L):
            r = _find(payload, "swr", direction, c, c.layout)
            if r and r["status"] == "ok":
                series.setdefault(f"swr {c.layout}", []).append((c.L, r["ms"]))
        for prob_case in sorted(by_problem.values(), key=lambda c: c.L):
            for name, info in payload["peers"].items():
                r = _find(payload, name, direction, prob_case)
                if r and r["status"] == "ok":
                    series.setdefault(info.get("label", name), []).append((prob_case.L, r["ms"]))
        for label, pts in series.items():
            xs, ys = zip(*sorted(dict(pts).items()))
            style = dict(lw=2.2) if label.startswith("swr") else dict(lw=1.3, alpha=0.85)
            ax.plot(xs, ys, marker="o", ms=4, label=label, **style)
        fl = [(c.L, _find(payload, "floor", direction, c)) for c in by_problem.values()]
        fl = sorted((L, r["ms"]) for L, r in fl if r and r.get("ms"))
        if fl:
            xs, ys = zip(*fl)
            ax.plot(xs, ys, "k--", lw=1.5, label="memory floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        Ls = sorted({c.L for c in cases})
        ax.set_xticks(Ls)
        ax.set_xticklabels([str(L) for L in Ls])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(f"sequence length L (B x L = {tokens} tokens)")
        ax.set_ylabel("ms per call")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))),
               fontsize=8, frameon=False)
    device = payload["meta"].get("device", {}).get("name", "GPU")
    fig.suptitle(f"swr-array vs peers on {device} ({_group_title(group)})", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _cuda_ver(v) -> str:
    """12040 -> '12.4'."""
    try:
        v = int(v)
    except (TypeError, ValueError):
        return "?"
    return f"{v // 1000}.{(v % 1000) // 10}"


def render_markdown(payload: dict, png_name: str | None) -> str:
    meta = payload["meta"]
    dev = meta.get("device", {})
    cfg = meta.get("config", {})
    vers = meta.get("versions", {})
    bw = meta.get("copy_bandwidth_Bps")
    soft = ", ".join(f"{k} {v}" for k, v in vers.items() if v)
    parts = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m swr_array bench --markdown docs/benchmarks.md` "
        "(scripts/gpu_bench.sh on the GPU machine); edit the generator, not this page. -->",
        "",
        f"- Device: {dev.get('name', 'unknown')}"
        + (f" ({dev['sms']} SMs, {dev['l2_bytes'] / 2**20:.0f} MiB L2, "
           f"{dev.get('memory_bytes', 0) / 2**30:.0f} GiB)" if dev.get("sms") else ""),
        *([f"- CUDA: runtime {_cuda_ver(dev['cuda_runtime'])}, driver "
           f"{_cuda_ver(dev.get('cuda_driver'))}, compute capability {dev.get('cc', '?')}"]
          if dev.get("cuda_runtime") else []),
        f"- Date: {meta.get('date', 'unknown')}",
        f"- Software: {soft}",
        f"- Command: `{meta.get('command', '')}`",
        "",
        "## Method",
        "",
        f"- One process. Each time is the median over {cfg.get('runs')} runs of "
        f"{cfg.get('calls')} back-to-back calls through each method's public API, divided by "
        f"{cfg.get('calls')}, timed with CUDA events after a warm-up.",
        "- Inputs rotate over several sets whose bytes add up to more than twice the L2 cache "
        "(no call finds its inputs in L2). Values: a in (0.9, 1), u and dy standard normal.",
        "- swr forward is `swr_array.swr`; forward + backward is `swr` then `swr_vjp` "
        "(gradients of a and u), on CuPy arrays.",
        "- Memory floor: the bytes the calls must move (forward: a, u read and y written; forward "
        "+ backward: that, then a, u, dy read and du, da written by the gradient call) over the "
        "device-to-device copy bandwidth measured in the same process"
        + (f": {bw / 1e12:.2f} TB/s (bytes read + written)." if bw else "."),
        "- Peers run in their own natural layout and dtype on the same sizes; the exact-scan peers "
        "compute a different (exact, per-channel) recurrence and are there for scale.",
        "",
        "## Results",
        "",
        format_tables(payload),
        "",
    ]
    if png_name:
        parts += [f"![time vs sequence length]({png_name})", ""]
    host = format_host_table(payload)
    if host:
        parts += ["## Host overhead of one call", "",
                  "Host time of one call on a tiny input (perf_counter around the call, no "
                  "synchronisation inside; median over the calls).", "", host, ""]
    notes = format_notes(payload)
    if notes:
        parts += ["## Notes", "", notes, ""]
    parts += ["## Reproduce", "",
              "On the GPU machine, from the repository root with `.whl/` and `.peers/` present: "
              "`bash scripts/gpu_bench.sh` (see `benchmarks/README.md`).", ""]
    return "\n".join(parts)


def write_outputs(payload: dict, out_dir: str | os.PathLike, markdown: str | None = None,
                  make_plot: bool = True) -> dict:
    """bench.json (+ bench.png) in out_dir; with markdown, the page and PATH.png beside it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": str(out_dir / "bench.json")}
    write_json(out_dir / "bench.json", payload)
    if make_plot and plot(payload, out_dir / "bench.png"):
        written["png"] = str(out_dir / "bench.png")
    if markdown:
        md = Path(markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        png = md.with_suffix(".png")
        have_png = make_plot and plot(payload, png)
        md.write_text(render_markdown(payload, png.name if have_png else None))
        written["markdown"] = str(md)
        if have_png:
            written["markdown_png"] = str(png)
    return written


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------

_DISTS = ("swr-array", "numpy", "ml_dtypes", "cupy-cuda13x", "cupy-cuda12x", "numba",
          "numba-cuda", "torch", "triton", "spear-python", "accelerated-scan", "fla-core")


def software_versions(extra: dict | None = None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for d in _DISTS:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            continue
        except Exception:  # noqa: BLE001
            continue
    out.update(extra or {})
    return out


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, timeout=5,
                           capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    except Exception:  # noqa: BLE001
        return ""


def _cupy_device():
    """(cupy, device info) or raise RuntimeError saying why there is no GPU."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"CuPy does not import ({type(exc).__name__}: {exc})") from exc
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"no CUDA device ({type(exc).__name__}: {exc})") from exc
    if n < 1:
        raise RuntimeError("no CUDA device")
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    info = {
        "name": name,
        "cc": f"{props['major']}.{props['minor']}",
        "sms": int(props["multiProcessorCount"]),
        "l2_bytes": int(props.get("l2CacheSize", FALLBACK_L2_BYTES)),
        "memory_bytes": int(props["totalGlobalMem"]),
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
    }
    return cupy, info


def _load_peers_module(path: str | None):
    """The peer harness: ``swr_array.bench_peers`` (installed with the package), or the module
    at ``path`` (a replacement with the same functions, as the tests use)."""
    if not path:
        from . import bench_peers

        return bench_peers
    p = Path(path)
    if not p.is_file():
        return None
    spec = importlib.util.spec_from_file_location("swr_bench_peers", p)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["swr_bench_peers"] = mod
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------
# inputs on the GPU
# ----------------------------------------------------------------------------------------------


def f32_to_bf16_bits(xp, x):
    """float32 -> bfloat16 raw bits (uint16), round to nearest even (NaN stays NaN)."""
    x = xp.ascontiguousarray(x, dtype=xp.float32)
    b = x.view(xp.uint32)
    rounded = ((b + (((b >> 16) & 1) + 0x7FFF)) >> 16).astype(xp.uint16)
    nan = xp.isnan(x)
    if bool(nan.any()):
        rounded = xp.where(nan, xp.uint16(0x7FC0), rounded)
    return rounded


def _cast(cp, x, dtype: str):
    if dtype == "float32":
        return cp.ascontiguousarray(x, dtype=cp.float32)
    if dtype == "float16":
        return cp.ascontiguousarray(x.astype(cp.float16))
    import ml_dtypes

    bits = f32_to_bf16_bits(cp, x)
    try:
        return bits.view(ml_dtypes.bfloat16)
    except Exception:  # noqa: BLE001 - through torch, whose bf16 tensors CuPy takes by DLPack
        import torch

        return cp.from_dlpack(torch.from_dlpack(bits).view(torch.bfloat16))


def canonical_sets(cp, B, L, H, D, per_head: bool, n: int, seed: int) -> list[dict]:
    """float32 inputs, time last ("BHDL"): a (B,H,L) or (B,H,D,L) in (0.9, 1); u, dy normal."""
    rs = cp.random.RandomState(seed)
    shape_a = (B, H, L) if per_head else (B, H, D, L)
    out = []
    for _ in range(n):
        a = rs.random_sample(shape_a, dtype=cp.float32) * 0.1 + 0.9
        u = rs.standard_normal((B, H, D, L), dtype=cp.float32)
        dy = rs.standard_normal((B, H, D, L), dtype=cp.float32)
        out.append({"a": a, "u": u, "dy": dy})
    return out


def to_layout(cp, x, layout: str, per_head_a: bool = False):
    """Canonical (B,H,D,L) / per-head (B,H,L) -> the layout's array (a view)."""
    if layout == "BHDL":
        return x
    return x.transpose(0, 2, 1) if per_head_a else x.transpose(0, 3, 1, 2)


def our_sets(cp, case: Case, n: int, seed: int) -> list[tuple]:
    out = []
    for s in canonical_sets(cp, case.B, case.L, case.H, case.D, case.per_head, n, seed):
        a = _cast(cp, to_layout(cp, s["a"], case.layout, case.per_head), case.dtype)
        u = _cast(cp, to_layout(cp, s["u"], case.layout), case.dtype)
        dy = _cast(cp, to_layout(cp, s["dy"], case.layout), case.dtype)
        out.append((a, u, dy))
    return out


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


class _Progress:
    """tqdm when importable, else a plain counter on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.i, self._bar = total, 0, None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, file=sys.stderr, unit="task", mininterval=1.0,
                                 dynamic_ncols=True)
            except Exception:  # noqa: BLE001
                self._bar = None

    def write(self, msg: str):
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def start(self, label: str):
        if self._bar is not None:
            self._bar.set_postfix_str(label[:60], refresh=True)
        elif self.enabled:
            print(f"[{self.i + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def done(self):
        self.i += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def _short_exc(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class _Bench:
    def __init__(self, args, cp, device: dict, payload: dict, progress: _Progress):
        self.args, self.cp, self.device = args, cp, device
        self.payload, self.progress = payload, progress
        self.l2 = int(args.l2_bytes or device.get("l2_bytes") or FALLBACK_L2_BYTES)
        self.t0 = time.monotonic()
        self.timing = dict(runs=args.runs, calls=args.calls, warmup=max(0, args.warmup))

    @staticmethod
    def torch_timer():
        return TorchTimer()

    def over_budget(self) -> bool:
        b = self.args.time_budget
        return bool(b and b > 0 and time.monotonic() - self.t0 > b)

    def log(self, msg: str):
        self.progress.write(msg)

    def free(self):
        try:
            self.cp.get_default_memory_pool().free_all_blocks()
        except Exception:  # noqa: BLE001
            pass
        if "torch" in sys.modules:
            try:
                sys.modules["torch"].cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass

    # -- the copy bandwidth ------------------------------------------------------------------
    def copy_bandwidth(self, nbytes: int = 1 << 30) -> float:
        cp = self.cp
        nbytes = int(min(nbytes, self.device.get("memory_bytes", 8 << 30) // 8))
        src = cp.empty(nbytes, dtype=cp.uint8)
        src.view(cp.uint32 if nbytes % 4 == 0 else cp.uint8)[...] = 7
        dst = cp.empty_like(src)

        def fn(i):
            if hasattr(dst, "data") and hasattr(dst.data, "copy_from_device_async"):
                dst.data.copy_from_device_async(src.data, nbytes)  # cudaMemcpyAsync D2D
            else:
                cp.copyto(dst, src)

        runs = time_calls(fn, 1, CupyTimer(cp), runs=max(5, self.args.runs), calls=10, warmup=3)
        return 2 * nbytes / (statistics.median(runs) / 1e3)

    # -- ours --------------------------------------------------------------------------------
    def ours(self, case: Case):
        import swr_array

        cp = self.cp
        n = rotating_sets(floor_bytes(case, "fwd"), self.l2)
        kw = dict(block_len=case.block_len, hops=case.hops, layout=case.layout)
        try:
            store = {"sets": our_sets(cp, case, n, self.args.seed)}
        except Exception as exc:  # noqa: BLE001
            for d, _ in DIRECTIONS:
                add_result(self.payload, "swr", d, case, status="failed",
                           reason=f"inputs: {_short_exc(exc)}")
            raise

        def fwd(i):
            a, u, _ = store["sets"][i]
            return swr_array.swr(a, u, **kw)

        def fwdbwd(i):
            a, u, dy = store["sets"][i]
            swr_array.swr(a, u, **kw)
            return swr_array.swr_vjp(a, u, dy, **kw)

        timer = CupyTimer(cp)
        try:
            for direction, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                try:
                    runs = time_calls(fn, n, timer, **self.timing)
                except Exception as exc:  # noqa: BLE001
                    add_result(self.payload, "swr", direction, case, status="failed",
                               reason=_short_exc(exc), n_sets=n)
                    self.log(f"swr {direction} {case.B}x{case.L} {case.layout} failed: "
                             f"{_short_exc(exc)}")
                    continue
                ms = statistics.median(runs)
                add_result(self.payload, "swr", direction, case, ms=ms, runs_ms=runs, n_sets=n,
                           bytes=floor_bytes(case, direction))
                self.log(f"swr {direction:6s} {case.B}x{case.L} {case.layout} "
                         f"{SHORT_DTYPE[case.dtype]}: {fmt_ms(ms)} ms")
        finally:
            store.clear()
            self.free()

    def floors(self, cases: Iterable[Case], bandwidth: float):
        seen = set()
        for c in cases:
            if c.problem in seen:
                continue
            seen.add(c.problem)
            for d, _ in DIRECTIONS:
                nbytes = floor_bytes(c, d)
                add_result(self.payload, "floor", d, dict(c.fields(), layout="-"),
                           ms=floor_ms(nbytes, bandwidth), bytes=nbytes)

    # -- peers -------------------------------------------------------------------------------
    def peer_problem(self, peers_mod, case: Case):
        return peers_mod.PeerProblem(case.B, case.L, case.H, case.D, case.dtype, case.hops,
                                     case.block_len, case.per_head, self.args.attn_head_dim)

    def peer(self, peers_mod, peer, case: Case, memo: dict):
        """Time one peer on one problem (reusing a result with the same peer key)."""
        prob = self.peer_problem(peers_mod, case)
        key = (peer.name, peer.key(prob))
        fields = dict(case.fields(), layout=peer.layout)
        if key in memo:
            for rec in memo[key]:
                extra = {k: v for k, v in rec.items() if k not in (
                    "method", "direction", "ms", "runs_ms", "status", "reason",
                    *fields)}
                add_result(self.payload, peer.name, rec["direction"], fields, ms=rec["ms"],
                           runs_ms=rec["runs_ms"], status=rec["status"], reason=rec["reason"],
                           **extra)
            return
        import torch

        recs = []
        n = rotating_sets(floor_bytes(case, "fwd"), self.l2)
        try:
            canon = canonical_sets(self.cp, case.B, case.L, case.H, case.D, case.per_head, n,
                                   self.args.seed)
            sets = [{k: torch.from_dlpack(v) for k, v in s.items()} for s in canon]
            try:
                run = peer.prepare(prob, sets)
            finally:
                del sets, canon
            timer = self.torch_timer()
            for direction, fn in (("fwd", run.fwd), ("fwdbwd", run.fwdbwd)):
                try:
                    runs = time_calls(fn, run.n_sets, timer, **self.timing)
                    ms = statistics.median(runs)
                    recs.append(add_result(self.payload, peer.name, direction, fields, ms=ms,
                                           runs_ms=runs, n_sets=run.n_sets,
                                           peer_layout=run.layout))
                    self.log(f"{peer.name} {direction:6s} {case.B}x{case.L} "
                             f"{SHORT_DTYPE[case.dtype]}: {fmt_ms(ms)} ms")
                except Exception as exc:  # noqa: BLE001
                    self.log(f"{peer.name} {direction} {case.B}x{case.L} failed: "
                             f"{_short_exc(exc)}")
                    recs.append(add_result(self.payload, peer.name, direction, fields,
                                           status="failed", reason=_short_exc(exc)))
            del run
        except peers_mod.Unsupported as exc:
            for d, _ in DIRECTIONS:
                recs.append(add_result(self.payload, peer.name, d, fields, status="skipped",
                                       reason=str(exc)))
        except Exception as exc:  # noqa: BLE001
            self.log(f"{peer.name} {case.B}x{case.L} failed: {_short_exc(exc)}")
            for d, _ in DIRECTIONS:
                recs.append(add_result(self.payload, peer.name, d, fields, status="failed",
                                       reason=_short_exc(exc)))
        finally:
            self.free()
        memo[key] = recs

    # -- host overhead -----------------------------------------------------------------------
    def host_ours(self, case: Case):
        import swr_array

        cp = self.cp
        tiny = Case(1, 4 * case.block_len, 2, case.D, case.dtype, case.layout, case.hops,
                    case.block_len, case.per_head)
        a, u, dy = our_sets(cp, tiny, 1, self.args.seed)[0]
        kw = dict(block_len=tiny.block_len, hops=tiny.hops, layout=tiny.layout)
        shape = f"B=1, L={tiny.L}, H=2, D={tiny.D}, {SHORT_DTYPE[tiny.dtype]}, {tiny.layout}"
        sync = CupyTimer(cp).sync
        calls = (
            ("fwd", lambda: swr_array.swr(a, u, **kw)),
            ("fwd+bwd", lambda: (swr_array.swr(a, u, **kw), swr_array.swr_vjp(a, u, dy, **kw))),
        )
        for call, fn in calls:
            rec = {"method": "swr", "label": "swr", "call": call, "input": shape}
            try:
                rec.update(host_overhead(fn, sync, self.args.host_calls), status="ok")
            except Exception as exc:  # noqa: BLE001
                rec.update(status="failed", reason=_short_exc(exc))
            self.payload["host_overhead"].append(rec)

    def host_peer(self, peers_mod, peer, case: Case):
        import torch

        tiny = Case(1, 4 * 16, 2, case.D, case.dtype, "BHDL", case.hops, case.block_len,
                    case.per_head)
        prob = self.peer_problem(peers_mod, tiny)
        shape = f"B=1, L={tiny.L}, {tiny.H * tiny.D} channels, {SHORT_DTYPE[tiny.dtype]}"
        try:
            canon = canonical_sets(self.cp, tiny.B, tiny.L, tiny.H, tiny.D, tiny.per_head, 1,
                                   self.args.seed)
            run = peer.prepare(prob, [{k: torch.from_dlpack(v) for k, v in canon[0].items()}])
        except Exception as exc:  # noqa: BLE001
            reason = str(exc) if isinstance(exc, peers_mod.Unsupported) else _short_exc(exc)
            self.payload["host_overhead"].append(
                {"method": peer.name, "label": peer.label, "call": "fwd", "input": shape,
                 "status": "skipped", "reason": reason})
            return
        for call, fn in (("fwd", run.fwd), ("fwd+bwd", run.fwdbwd)):
            rec = {"method": peer.name, "label": peer.label, "call": call, "input": shape}
            try:
                rec.update(host_overhead(lambda fn=fn: fn(0), self.torch_timer().sync,
                                         self.args.host_calls), status="ok")
            except Exception as exc:  # noqa: BLE001
                rec.update(status="failed", reason=_short_exc(exc))
            self.payload["host_overhead"].append(rec)


def _meta(args, device: dict, argv: Sequence[str] | None) -> dict:
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
           if not callable(v)}
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "versions": {},
        "config": cfg,
        "command": "python -m swr_array bench " + " ".join(argv or []),
        "host": platform.node(),
        "commit": git_commit(),
    }


def run(args, argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when swr ran at least once, 1 when it never did, 2 without a GPU."""
    if getattr(args, "from_json", None):
        return rerender(args)
    if argv is None:
        argv = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "bench" else sys.argv[1:]
    try:
        cp, device = _cupy_device()
    except RuntimeError as exc:
        print(f"swr_array bench needs a CUDA GPU with CuPy: {exc}", file=sys.stderr)
        return 2
    payload = new_payload(_meta(args, device, argv))
    out_dir = Path(args.out)

    def flush(final: bool = False):
        payload["meta"]["versions"] = software_versions()
        _order_peers(payload, names)
        _mark_peers(payload)
        try:
            if final:
                write_outputs(payload, out_dir, args.markdown, make_plot=not args.no_plot)
            else:  # partial results survive a kill; the plot and the page come at the end
                write_json(out_dir / "bench.json", payload)
        except Exception as exc:  # noqa: BLE001
            print(f"writing results failed: {_short_exc(exc)}", file=sys.stderr)

    cases = make_cases(args)
    names = peer_names(args)
    peers_mod = _load_peers_module(args.peers_file) if names else None
    if names and peers_mod is None:
        payload["unavailable"]["peers"] = "--peers-file not found"
        names = ()
    problems = list({c.problem: c for c in cases}.values())
    ordered = [n for n in MEASURE_ORDER if n in names] + [n for n in names
                                                           if n not in MEASURE_ORDER]
    host = args.host_calls > 0
    total = 1 + len(cases) + len(ordered) * len(problems) + (1 if host else 0)
    progress = _Progress(total, enabled=not args.no_progress)
    bench = _Bench(args, cp, device, payload, progress)

    def task(label: str, fn: Callable[[], Any]):
        progress.start(label)
        if bench.over_budget():
            progress.write(f"skipped (time budget {args.time_budget:.0f} s): {label}")
            payload.setdefault("over_budget", []).append(label)
        else:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                progress.write(f"{label} failed: {_short_exc(exc)}")
        progress.done()

    terminated = []
    restore = _on_sigterm()
    try:
        bw = {}

        def copy():
            bw["Bps"] = bench.copy_bandwidth()
            payload["meta"]["copy_bandwidth_Bps"] = bw["Bps"]
            progress.write(f"device-to-device copy: {bw['Bps'] / 1e12:.2f} TB/s "
                           f"({device['name']}, L2 {bench.l2 / 2**20:.0f} MiB)")

        task("copy bandwidth", copy)
        bench.free()
        if "Bps" in bw:
            bench.floors(cases, bw["Bps"])
        for c in cases:
            task(f"swr {c.B}x{c.L} {c.layout} {SHORT_DTYPE[c.dtype]}", lambda c=c: bench.ours(c))
        flush()
        if host:
            def host_all():
                bench.host_ours(cases[0])
            task("host overhead (swr)", host_all)
        memo: dict = {}
        loaded: dict = {}
        for name in ordered:
            peer = None
            if name not in loaded:
                progress.write(f"loading peer {name}")
                wait = args.spear_wait if name == "spear" else 0.0
                if args.time_budget and args.time_budget > 0:
                    wait = max(0.0, min(wait, args.time_budget - (time.monotonic() - bench.t0)))
                try:
                    peer = peers_mod.load_peer(name, spear_build=args.spear_build,
                                               spear_wait=wait)
                except Exception as exc:  # noqa: BLE001
                    peers_mod.UNAVAILABLE[name] = _short_exc(exc)
                loaded[name] = peer
            peer = loaded[name]
            if peer is None:
                why = peers_mod.UNAVAILABLE.get(name, "not available")
                payload["unavailable"][name] = why
                progress.write(f"peer {name} skipped: {why}")
                for _ in problems:
                    progress.done()
                continue
            payload["peers"][name] = {"label": peer.label, "note": peer.note,
                                      "layout": peer.layout, "version": peer.version,
                                      "kind": peer.kind}
            for c in problems:
                task(f"{name} {c.B}x{c.L} {SHORT_DTYPE[c.dtype]}",
                     lambda c=c, peer=peer: bench.peer(peers_mod, peer, c, memo))
            if host and name in HOST_PEERS and not bench.over_budget():
                try:
                    bench.host_peer(peers_mod, peer, cases[0])
                except Exception as exc:  # noqa: BLE001
                    progress.write(f"host overhead of {name} failed: {_short_exc(exc)}")
            flush()
    except _Terminated:
        terminated.append(True)
        progress.write("terminated (SIGTERM): writing what was measured")
        payload["terminated"] = True
    finally:
        restore()
        progress.close()
        flush(final=True)
    print_report(payload)
    print(f"\nwrote {out_dir}/bench.json" + (f" and {args.markdown}" if args.markdown else ""))
    ok = any(r["method"] == "swr" and r["status"] == "ok" for r in payload["results"])
    return 124 if terminated else (0 if ok else 1)


class _Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, still write the results."""


def _on_sigterm():
    """Turn SIGTERM into _Terminated while the bench runs; returns the restoring function."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise _Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def print_report(payload: dict) -> None:
    print(format_tables(payload))
    host_table = format_host_table(payload)
    if host_table:
        print("\nHost overhead of one call (tiny input):\n" + host_table)
    notes = format_notes(payload)
    if notes:
        print("\n" + notes)


def rerender(args) -> int:
    """--from-json: tables, plot and page from a saved bench.json (no GPU needed)."""
    with open(args.from_json) as f:
        payload = json.load(f)
    _mark_peers(payload)
    write_outputs(payload, args.out, args.markdown, make_plot=not args.no_plot)
    print_report(payload)
    return 0


def _order_peers(payload: dict, names: Sequence[str]):
    peers = payload["peers"]
    payload["peers"] = {n: peers[n] for n in names if n in peers}
    payload["peers"].update({n: v for n, v in peers.items() if n not in payload["peers"]})


def _mark_peers(payload: dict):
    """Footnote marks: exact-scan peers (a different, exact, per-channel recurrence) get ¹."""
    for info in payload["peers"].values():
        info["mark"] = "¹" if info.get("kind") == "exact scan" else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swr_array bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(parser.parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
