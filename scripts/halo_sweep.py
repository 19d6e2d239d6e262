"""Deep windows (hops 2 and 4) against the memory floor, with the halo walks' knobs swept.

``python scripts/halo_sweep.py [--json PATH]``: bf16, 128 heads x 16 channels, per-head a, at
16x2048, 4x8192 and 1x32768, both layouts, through the public ``swr`` / ``swr_vjp``:

- forward (``swr``), backward (``swr_vjp``) and forward+backward (one after the other), the
  first two at every value of their chunk knob (:data:`CHUNK_KNOBS`), the backward and
  forward+backward also with the settings :data:`ALT`, and the block-carry path;
- the floor: the bytes the calls must move (forward: a, u read, y written; backward: a, u, dy
  read, du, da written; forward+backward: both, as ``swr_array.bench.floor_bytes``) at the
  device-to-device copy bandwidth measured here.

Then, at 4x8192, the kernels' register/parallelism trade-offs (:data:`VARIANTS`): the BLHD
backward's ``(bwd_access_bytes, bwd_unroll)`` for hops 2, 4 and 8 at each chunk length (with
``unroll == block_len`` no checkpoint walk of each block), the lead walk fused into the sweep
(``bwd_fuse_lead``), and the BHDL walks' group bytes.
``--precompile I``: only compile entry I of :data:`PRECOMPILE` (a tiny call; the kernels' PTX
cache then has it), so that a script can compile them in parallel processes before timing.

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


# (TUNING, key, values) of the chunk knob of each (layout, direction)
CHUNK_KNOBS = {
    ("BLHD", "fwd"): (F.TUNING, "blhd_halo_chunk_blocks_per_hop", (2, 4)),
    ("BHDL", "fwd"): (HW.TUNING, "fwd_bhdl_chunk_blocks", (32, 64, 128)),
    ("BLHD", "bwd"): (HW.TUNING, "bwd_chunk_blocks", (8, 16, 32)),
    ("BHDL", "bwd"): (HW.TUNING, "bwd_bhdl_chunk_blocks", (8, 16, 32, 64)),
}

# (layout, direction, hops, settings) the tests do not compile: precompiled in parallel
VARIANTS = [("BLHD", "bwd", h, dict(bwd_access_bytes=acc, bwd_access_bytes_deep=acc,
                                    bwd_unroll=un))
            for h, acc, un in ((2, 8, 8), (2, 4, 8), (2, 4, 16), (4, 8, 8), (4, 4, 8), (4, 4, 16),
                               (8, 8, 8), (8, 4, 8), (8, 4, 16))]
VARIANTS += [("BLHD", "bwd", h, dict(bwd_access_bytes=4, bwd_access_bytes_deep=4, bwd_unroll=8,
                                     bwd_fuse_lead=True)) for h in (2, 4, 8)]
VARIANTS += [("BHDL", "bwd", 2, dict(bwd_bhdl_group_bytes=16)),
             ("BHDL", "bwd", 2, dict(bwd_bhdl_group_bytes=16, bwd_bhdl_fuse_lead=True)),
             ("BHDL", "fwd", 2, dict(fwd_bhdl_group_bytes=16))]
# the backward's alternative settings, timed at every shape beside the defaults
ALT = {"BLHD": dict(bwd_access_bytes=4, bwd_access_bytes_deep=4, bwd_unroll=8,
                    bwd_fuse_lead=True),
       "BHDL": dict(bwd_bhdl_group_bytes=16, bwd_bhdl_fuse_lead=True)}
# ... and the block-carry path that the sweep compares with
PRECOMPILE = VARIANTS + [("BHDL", "bwd", 4, ALT["BHDL"]),
                         ("BLHD", "bwd", 2, dict(backward=False)),
                         ("BHDL", "bwd", 2, dict(backward=False)),
                         ("BHDL", "fwd", 2, dict(forward_bhdl=False))]


def _inputs(cp, layout, B, L, H=128, D=16, seed=0):
    us = (B, L, H, D) if layout == "BLHD" else (B, H, D, L)
    as_ = (B, L, H) if layout == "BLHD" else (B, H, L)
    gen = cp.random.default_rng(seed)
    sets = []
    for _ in range(2):
        u = _cast(cp, gen.standard_normal(us, dtype=cp.float32), "bfloat16")
        a = _cast(cp, gen.uniform(0.9, 1.0, as_).astype(cp.float32), "bfloat16")
        dy = _cast(cp, gen.standard_normal(us, dtype=cp.float32), "bfloat16")
        sets.append((a, u, dy))
    nu, na = sets[0][1].nbytes, sets[0][0].nbytes
    floors = {"fwd": na + 2 * nu, "bwd": 2 * na + 3 * nu,
              "fwdbwd": (na + 2 * nu) + (2 * na + 3 * nu)}
    return sets, floors


def _fn(sets, direction, kw):
    if direction == "fwd":
        return lambda i: sa.swr(sets[i % 2][0], sets[i % 2][1], **kw)
    if direction == "bwd":
        return lambda i: sa.swr_vjp(*sets[i % 2], **kw)
    return lambda i: (sa.swr(sets[i % 2][0], sets[i % 2][1], **kw), sa.swr_vjp(*sets[i % 2], **kw))


def _settings(pairs):
    for k, v in pairs.items():
        HW.TUNING[k] = v


def _variants(out, bandwidth, t_start, path):
    """The variants at 4x8192, each at every value of its chunk knob, defaults first."""
    B, L = 4, 8192
    saved = dict(HW.TUNING)
    for layout in ("BLHD", "BHDL"):
        sets, floors = _inputs(cp, layout, B, L, seed=1)
        rows = [(lay, d, h, {}) for lay, d, h in (("BLHD", "bwd", 2), ("BLHD", "bwd", 4),
                                                  ("BHDL", "bwd", 2), ("BHDL", "fwd", 2))]
        for lay, direction, hops, settings in rows + VARIANTS:
            if lay != layout:
                continue
            _settings(settings)
            tuning, key, values = CHUNK_KNOBS[(layout, direction)]
            kw = dict(block_len=16, hops=hops, layout=layout)
            floor_ms = floors[direction] / bandwidth * 1e3
            cells = []
            for value in values:
                tuning[key] = value
                ms = _time(_fn(sets, direction, kw))
                cells.append(f"{value}: {ms:.4f} ms {ms / floor_ms:.2f}x")
                out["rows"].append(dict(B=B, L=L, layout=layout, hops=hops, direction=direction,
                                        variant=settings, knob=key, value=value, ms=ms,
                                        floor_ms=floor_ms, ratio=ms / floor_ms))
            tuning[key] = saved[key] if tuning is HW.TUNING else tuning[key]
            print(f"variant {B}x{L} {layout} hops={hops} {direction} {settings or 'default'} "
                  f"| " + " | ".join(cells), flush=True)
            for k, v in saved.items():
                HW.TUNING[k] = v
            _dump(out, path, t_start)
        sets = None


def _precompile(i):
    layout, direction, hops, settings = PRECOMPILE[i]
    _settings(settings)
    sets, _ = _inputs(cp, layout, 1, 256, H=2)
    _fn(sets, direction, dict(block_len=16, hops=hops, layout=layout))(0)
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
    defaults = {(id(t), k): t[k] for t, k, _ in CHUNK_KNOBS.values()}
    for B, L in ((16, 2048), (4, 8192), (1, 32768)):
        for layout in ("BLHD", "BHDL"):
            sets, floors = _inputs(cp, layout, B, L)
            for hops in [int(h) for h in args.hops.split(",")]:
                kw = dict(block_len=16, hops=hops, layout=layout)
                for direction in ("fwd", "bwd", "fwdbwd"):
                    fn = _fn(sets, direction, kw)
                    floor_ms = floors[direction] / bandwidth * 1e3
                    knob = CHUNK_KNOBS.get((layout, direction))
                    cells = []
                    for value in knob[2] if knob else (None,):
                        if value is not None:
                            knob[0][knob[1]] = value
                        ms = _time(fn)
                        cells.append(f"{value or 'default'}: {ms:.4f} ms {ms / floor_ms:.2f}x")
                        out["rows"].append(dict(B=B, L=L, layout=layout, hops=hops,
                                                direction=direction,
                                                knob=knob[1] if knob else None, value=value,
                                                ms=ms, floor_ms=floor_ms, ratio=ms / floor_ms))
                        if value is not None:
                            knob[0][knob[1]] = defaults[(id(knob[0]), knob[1])]
                    if direction != "fwd":  # the alternative settings (ALT)
                        saved = dict(HW.TUNING)
                        _settings(ALT[layout])
                        for value in knob[2] if knob else (None,):
                            if value is not None:
                                knob[0][knob[1]] = value
                            ms = _time(fn)
                            cells.append(f"alt {value or 'default'}: {ms:.4f} ms "
                                         f"{ms / floor_ms:.2f}x")
                            out["rows"].append(dict(B=B, L=L, layout=layout, hops=hops,
                                                    direction=direction, path="alt",
                                                    knob=knob[1] if knob else None, value=value,
                                                    ms=ms, floor_ms=floor_ms,
                                                    ratio=ms / floor_ms))
                        _settings(saved)
                    if direction == "bwd" or (direction == "fwd" and layout == "BHDL"):
                        # the block-carry path of the same call, for comparison
                        flag = "backward" if direction == "bwd" else "forward_bhdl"
                        HW.TUNING[flag] = False
                        ms = _time(fn)
                        HW.TUNING[flag] = True
                        cells.append(f"block-carry path: {ms:.4f} ms {ms / floor_ms:.2f}x")
                        out["rows"].append(dict(B=B, L=L, layout=layout, hops=hops,
                                                direction=direction, path="block_carry",
                                                ms=ms, floor_ms=floor_ms, ratio=ms / floor_ms))
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
