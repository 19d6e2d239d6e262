"""Deep windows (hops 2 and 4) against the memory floor, with the halo walks' chunk knobs swept.

``python scripts/halo_sweep.py [--json PATH]``: bf16, 128 heads x 16 channels, per-head a, at
16x2048, 4x8192 and 1x32768, both layouts, through the public ``swr`` / ``swr_vjp``:

- forward (``swr``), backward (``swr_vjp``) and forward+backward (one after the other), each at
  every chunk length of its knob (blocks per hop: 2, 4, 8, 16): the backward's
  ``halo_walk.TUNING["bwd_chunk_blocks_per_hop"]`` (BLHD) / ``["bwd_bhdl_chunk_blocks_per_hop"]``
  (BHDL), the forward's ``swr_forward.TUNING["blhd_halo_chunk_blocks_per_hop"]`` (BLHD) /
  ``halo_walk.TUNING["fwd_bhdl_chunk_blocks_per_hop"]`` (BHDL);
- the floor: the bytes the calls must move (forward: a, u read, y written; backward: a, u, dy
  read, du, da written; forward+backward: both, as ``swr_array.bench.floor_bytes``) at the
  device-to-device copy bandwidth measured here.

Then the BLHD backward's register/traffic trade-off at 4x8192, hops 2, 4 and 8:
``(bwd_access_bytes, bwd_unroll)`` in :data:`VARIANTS` and the defaults (with ``unroll ==
block_len`` no checkpoint walk of each block).
``--precompile I``: only compile variant I (a tiny call; the kernels' PTX cache then has it), so
that a script can compile them in parallel processes before timing.

Inputs rotate over two sets (each larger than the L2 cache), so no call finds its inputs there.
Prints one line per (shape, layout, hops, direction) and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import cupy as cp
import numpy as np
from swr_array.numba_kernels import halo_walk as HW
from swr_array.numba_kernels import swr_forward as F

import swr_array as sa
from swr_array.bench import _cast

PER_HOP = (2, 4, 8, 16)


def _time(fn, calls=10, runs=3):
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    fn(0)
    fn(1)
    times = []
    for _ in range(runs):
        start.record()
        for i in range(calls):
            fn(i)
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / calls)
    return float(np.median(times))


def _knob(layout, direction):
    """(TUNING dict, key) of the chunk knob a direction's kernel reads, or None."""
    if direction == "fwd":
        if layout == "BLHD":
            return F.TUNING, "blhd_halo_chunk_blocks_per_hop"
        return HW.TUNING, "fwd_bhdl_chunk_blocks_per_hop"
    key = "bwd_chunk_blocks_per_hop" if layout == "BLHD" else "bwd_bhdl_chunk_blocks_per_hop"
    return HW.TUNING, key


# (hops, access bytes, unroll) beyond the defaults of hops 2 and 4 (the tests compile those)
VARIANTS = [(2, 8, 16), (2, 4, 16), (4, 8, 16), (4, 4, 16), (8, 8, 8), (8, 4, 16)]


def _set_variant(access, unroll):
    HW.TUNING["bwd_access_bytes"] = HW.TUNING["bwd_access_bytes_deep"] = access
    HW.TUNING["bwd_unroll"] = unroll


def _variants(out, bandwidth, t_start, path):
    """The backward's (access bytes, unroll) variants, BLHD bf16 per head at 4x8192."""
    B, L, H, D = 4, 8192, 128, 16
    gen = cp.random.default_rng(1)
    sets = []
    for _ in range(2):
        u = _cast(cp, gen.standard_normal((B, L, H, D), dtype=cp.float32), "bfloat16")
        a = _cast(cp, gen.uniform(0.9, 1.0, (B, L, H)).astype(cp.float32), "bfloat16")
        dy = _cast(cp, gen.standard_normal((B, L, H, D), dtype=cp.float32), "bfloat16")
        sets.append((a, u, dy))
    floor_ms = (2 * sets[0][0].nbytes + 3 * sets[0][1].nbytes) / bandwidth * 1e3
    saved = dict(HW.TUNING)
    for hops, access, unroll in [(2, 16, 8), (4, 8, 8)] + VARIANTS:
        _set_variant(access, unroll)
        kw = dict(block_len=16, hops=hops, layout="BLHD")
        ms = _time(lambda i: sa.swr_vjp(*sets[i % 2], **kw))  # noqa: B023
        print(f"variant {B}x{L} BLHD hops={hops} bwd access {access} B unroll {unroll}: "
              f"{ms:.4f} ms {ms / floor_ms:.2f}x (floor {floor_ms:.4f})", flush=True)
        out["rows"].append(dict(B=B, L=L, layout="BLHD", hops=hops, direction="bwd",
                                access=access, unroll=unroll, ms=ms, floor_ms=floor_ms,
                                ratio=ms / floor_ms))
        _dump(out, path, t_start)
    for k, v in saved.items():
        HW.TUNING[k] = v


def _precompile(i):
    hops, access, unroll = VARIANTS[i]
    _set_variant(access, unroll)
    a = _cast(cp, cp.full((1, 256, 2), 0.5, cp.float32), "bfloat16")
    u = _cast(cp, cp.ones((1, 256, 2, 16), cp.float32), "bfloat16")
    sa.swr_vjp(a, u, u, block_len=16, hops=hops, layout="BLHD")
    cp.cuda.runtime.deviceSynchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--hops", default="2,4")
    ap.add_argument("--precompile", type=int, default=None)
    ap.add_argument("--no-variants", action="store_true")
    args = ap.parse_args()
    if args.precompile is not None:
        _precompile(args.precompile)
        return
    t_start = time.time()
    buf = cp.empty(1 << 30, cp.uint8)
    dst = cp.empty_like(buf)
    bandwidth = 2 * buf.nbytes / _time(lambda i: cp.copyto(dst, buf)) * 1e3  # bytes/s
    buf = dst = None
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
    out = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
           "bandwidth_Bps": bandwidth, "rows": []}
    H, D = 128, 16
    defaults = {(id(t), k): t[k] for t, k in ((F.TUNING, "blhd_halo_chunk_blocks_per_hop"),
                                              (HW.TUNING, "bwd_chunk_blocks_per_hop"),
                                              (HW.TUNING, "bwd_bhdl_chunk_blocks_per_hop"),
                                              (HW.TUNING, "fwd_bhdl_chunk_blocks_per_hop"))}
    for B, L in ((16, 2048), (4, 8192), (1, 32768)):
        for layout in ("BLHD", "BHDL"):
            us = (B, L, H, D) if layout == "BLHD" else (B, H, D, L)
            as_ = (B, L, H) if layout == "BLHD" else (B, H, L)
            gen = cp.random.default_rng(0)
            sets = []
            for _ in range(2):
                u = _cast(cp, gen.standard_normal(us, dtype=cp.float32), "bfloat16")
                a = _cast(cp, gen.uniform(0.9, 1.0, as_).astype(cp.float32), "bfloat16")
                dy = _cast(cp, gen.standard_normal(us, dtype=cp.float32), "bfloat16")
                sets.append((a, u, dy))
            nu, na = sets[0][1].nbytes, sets[0][0].nbytes
            floors = {"fwd": na + 2 * nu, "bwd": 2 * na + 3 * nu,
                      "fwdbwd": (na + 2 * nu) + (2 * na + 3 * nu)}
            for hops in [int(h) for h in args.hops.split(",")]:
                kw = dict(block_len=16, hops=hops, layout=layout)
                fns = {
                    "fwd": lambda i: sa.swr(sets[i % 2][0], sets[i % 2][1], **kw),  # noqa: B023
                    "bwd": lambda i: sa.swr_vjp(*sets[i % 2], **kw),  # noqa: B023
                    "fwdbwd": lambda i: (sa.swr(sets[i % 2][0], sets[i % 2][1], **kw),  # noqa: B023
                                         sa.swr_vjp(*sets[i % 2], **kw)),  # noqa: B023
                }
                for direction, fn in fns.items():
                    floor_ms = floors[direction] / bandwidth * 1e3
                    knob = _knob(layout, "fwd" if direction == "fwd" else "bwd")
                    cells, best = [], None
                    for per_hop in PER_HOP if knob and direction != "fwdbwd" else (None,):
                        if per_hop is not None:
                            knob[0][knob[1]] = per_hop
                        ms = _time(fn)
                        cells.append(f"{per_hop or 'default'}: {ms:.4f} ms {ms / floor_ms:.2f}x")
                        out["rows"].append(dict(B=B, L=L, layout=layout, hops=hops,
                                                direction=direction, per_hop=per_hop, ms=ms,
                                                floor_ms=floor_ms, ratio=ms / floor_ms))
                        best = ms if best is None else min(best, ms)
                        if per_hop is not None:
                            knob[0][knob[1]] = defaults[(id(knob[0]), knob[1])]
                    print(f"{B}x{L} {layout} hops={hops} {direction:6s} floor {floor_ms:.4f} ms "
                          f"| " + " | ".join(cells), flush=True)
                    _dump(out, args.json, t_start)  # as it goes: a timeout keeps what was done
            sets = None
    if not args.no_variants:
        _variants(out, bandwidth, t_start, args.json)
    _dump(out, args.json, t_start)


def _dump(out, path, t_start):
    out["seconds"] = time.time() - t_start
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
