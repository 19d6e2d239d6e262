"""Where the time of a packed call goes (issue #18): each direction and each kernel alone.

    python scripts/packed_profile.py [--tokens 32768] [--heads 128] [--head-dim 16]
                                     [--docs 16,1000] [--layouts BLHD,BHDL] [--reps 20] [--x0]
                                     [--sweep]

bfloat16, per-head coefficients, block_len 16, hops 1, CuPy arrays. For the dense call and the
packed call (``cu_seqlens`` on the device; with ``--x0`` also with x0) of each layout and
document count, one JSON line a measurement:

- ``api``: the public ``swr`` / ``swr_vjp`` call, forward and backward apart: ``event_ms``
  (CUDA events around ``--reps`` back-to-back calls, per call) and ``host_ms`` (host time per
  call of the same loop, no synchronisation inside: when it is close to ``event_ms`` the call
  is bound by the host);
- ``kernel``: each kernel of the native packed path alone (``packed_walk``: the ``cu`` check,
  the forward, the backward; the candidate kernels of every ``packed_walk.VARIANTS`` entry; BHDL
  the tile walks, the token walks and the warp-scan kernels over the token marks, and the
  marks kernel), and the dense call with
  preallocated outputs, ``--reps`` launches captured in one CUDA graph and replayed (GPU time
  only, no host cost), per launch; ``gbps``: the bytes the kernel must move (read a and u, write
  y; backward: read a, u, dy, write da, du) over its time.
"""

from __future__ import annotations

import argparse
import functools
import json
import time


def events(fn, reps):
    import cupy as cp

    fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    best = None
    for _ in range(3):
        start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host = (time.perf_counter() - t0) / reps * 1e3
        end.record()
        end.synchronize()
        ev = cp.cuda.get_elapsed_time(start, end) / reps
        if best is None or ev < best[0]:
            best = (ev, host)
    return best


def graph_time(fn, reps):
    """GPU time per call of ``fn`` captured ``reps`` times in one CUDA graph (None if the
    capture fails)."""
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    try:
        with stream:
            fn()
            fn()
            stream.synchronize()
            stream.begin_capture()
            try:
                for _ in range(reps):
                    fn()
            finally:
                graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            times = []
            for _ in range(5):
                start.record(stream)
                graph.launch(stream)
                end.record(stream)
                end.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, end) / reps)
        return min(times)
    except Exception as exc:  # noqa: BLE001 - a failed capture is reported, not fatal
        print(json.dumps({"graph_capture_failed": repr(exc)[:200]}), flush=True)
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--docs", default="16,1000")
    ap.add_argument("--layouts", default="BLHD,BHDL")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--x0", action="store_true", help="also the packed calls with x0")
    ap.add_argument("--sweep", action="store_true",
                    help="BLHD: the kernels alone at other chunk lengths and block sizes too")
    args = ap.parse_args(argv)

    import numpy as np

    rng = np.random.default_rng(0)
    T, H, D = args.tokens, args.heads, args.head_dim
    big = T * H * D * 2  # bytes of one (T, H, D) bf16 array
    small = T * H * 2
    fwd_bytes, bwd_bytes = 2 * big + small, 3 * big + 2 * small

    def emit(**row):
        if row.get("ms") and row.get("dir") in ("fwd", "bwd"):
            nbytes = fwd_bytes if row.get("dir") == "fwd" else bwd_bytes
            row["gbps"] = round(nbytes / row["ms"] / 1e6, 1)
        print(json.dumps(row), flush=True)

    for layout in args.layouts.split(","):
        profile_layout(layout, args, rng, emit)


def profile_layout(layout, args, rng, emit):
    import cupy as cp
    import ml_dtypes
    import numpy as np
    from swr_array.numba_kernels import packed_walk

    import swr_array as sa
    from swr_array import _checks
    from swr_array import packed as packed_mod

    bf16 = np.dtype(ml_dtypes.bfloat16)
    T, H, D, reps = args.tokens, args.heads, args.head_dim, args.reps
    us = (1, T, H, D) if layout == "BLHD" else (1, H, D, T)
    a_s = (1, T, H) if layout == "BLHD" else (1, H, T)
    a = cp.asarray(rng.uniform(0.5, 1.0, a_s).astype(np.float32).astype(bf16))
    u = cp.asarray(rng.standard_normal(us).astype(np.float32).astype(bf16))
    dy = cp.asarray(rng.standard_normal(us).astype(np.float32).astype(bf16))
    y = cp.empty(us, bf16)
    da, du = cp.empty(a_s, bf16), cp.empty(us, bf16)
    kw = dict(block_len=16, hops=1, layout=layout)
    fwd = functools.partial(sa.swr, a, u, **kw)
    bwd = functools.partial(sa.swr_vjp, a, u, dy, **kw)
    for name, fn in (("fwd", fwd), ("bwd", bwd)):
        ev, host = events(fn, reps)
        emit(kind="api", layout=layout, docs=0, call="dense", dir=name, event_ms=ev,
             host_ms=host)
    fwd = functools.partial(sa.swr, a, u, out=y, **kw)
    bwd = functools.partial(sa.swr_vjp, a, u, dy, out=(da, du, None), **kw)
    for name, fn in (("fwd", fwd), ("bwd", bwd)):
        emit(kind="kernel", layout=layout, docs=0, call="dense", dir=name,
             ms=graph_time(fn, reps))
    p = _checks.check_swr(a, u, **kw)
    for n_docs in (int(x) for x in args.docs.split(",")):
        cuts = np.sort(rng.choice(np.arange(1, T), size=n_docs - 1, replace=False))
        cu = cp.asarray(np.concatenate([[0], cuts, [T]]).astype(np.int32))
        x0 = cp.asarray(rng.standard_normal((n_docs, H, D)).astype(np.float32))
        for x0_arg, tag in ((None, "packed"), (x0, "packed_x0"))[:1 + args.x0]:
            pk = dict(kw, cu_seqlens=cu, x0=x0_arg)
            fwd = functools.partial(sa.swr, a, u, **pk)
            bwd = functools.partial(sa.swr_vjp, a, u, dy, **pk)
            for name, fn in (("fwd", fwd), ("bwd", bwd)):
                ev, host = events(fn, reps)
                emit(kind="api", layout=layout, docs=n_docs, call=tag, dir=name, event_ms=ev,
                     host_ms=host)
        if not packed_mod.native_forward_fits(p, cu):
            emit(kind="note", layout=layout, docs=n_docs, note="padded path: no kernels")
            continue
        ok = cp.ones(1, np.int32)
        dummy = cp.zeros(1, np.float32)
        dx0 = cp.zeros((n_docs, H, D), np.float32)
        emit(kind="kernel", layout=layout, docs=n_docs, call="check_cu", dir="-",
             ms=graph_time(functools.partial(packed_walk.check_cu, cu, T, ok), reps))
        marks = cp.empty(T, np.int32)
        if layout == "BHDL":
            emit(kind="kernel", layout=layout, docs=n_docs, call="marks", dir="-",
                 ms=graph_time(functools.partial(packed_walk.mark_tokens, cu, T, 16, marks),
                               reps))
        tile_default, scan_default = packed_walk.BHDL_TILE, packed_walk.BHDL_SCAN
        for variant in packed_walk.VARIANTS if layout == "BLHD" else ("tile", "tokens", "scan"):
            # BHDL: the tile walks, the token walks, the warp-scan forward and backward
            packed_walk.BHDL_TILE = variant == "tile"
            packed_walk.BHDL_SCAN = variant == "scan"
            with packed_walk.variant("tokens" if layout == "BHDL" else variant):
                for x0_arg, tag in ((None, "packed"), (x0, "packed_x0"))[:1 + args.x0]:
                    fwd = functools.partial(packed_walk.forward, a, u, y, x0_arg, cu, ok, dummy,
                                            hops=1, block_len=16, layout=layout,
                                            marks=marks if variant == "scan" else None)
                    emit(kind="kernel", layout=layout, docs=n_docs, call=tag, variant=variant,
                         dir="fwd", ms=graph_time(fwd, reps))
                    if packed_mod.native_backward_fits(p, cu, a, u, dy):
                        bwd = functools.partial(packed_walk.backward, a, u, dy, da, du, x0_arg,
                                                dx0, cu, ok, dummy, hops=1, block_len=16,
                                                layout=layout,
                                                marks=marks if variant == "scan" else None)
                        emit(kind="kernel", layout=layout, docs=n_docs, call=tag,
                             variant=variant, dir="bwd", ms=graph_time(bwd, reps))
        packed_walk.BHDL_TILE, packed_walk.BHDL_SCAN = tile_default, scan_default
        if layout == "BHDL":
            # the warp-scan forward's chunk (tokens a warp owns: halo 2 block_len each)
            old = packed_walk.BHDL_SCAN_CHUNK
            for chunk in (512, 1024, 4096):
                packed_walk.BHDL_SCAN_CHUNK = chunk
                fwd = functools.partial(packed_walk.forward, a, u, y, None, cu, ok, dummy,
                                        hops=1, block_len=16, layout=layout, marks=marks)
                emit(kind="kernel", layout=layout, docs=n_docs, call="packed", variant="scan",
                     dir="fwd", knob="BHDL_SCAN_CHUNK", value=chunk, ms=graph_time(fwd, reps))
            packed_walk.BHDL_SCAN_CHUNK = old
            old = packed_walk.BHDL_SCAN_BWD_CHUNK
            for chunk in (512, 2048, 4096):
                packed_walk.BHDL_SCAN_BWD_CHUNK = chunk
                bwd = functools.partial(packed_walk.backward, a, u, dy, da, du, None, dx0, cu,
                                        ok, dummy, hops=1, block_len=16, layout=layout,
                                        marks=marks)
                emit(kind="kernel", layout=layout, docs=n_docs, call="packed", variant="scan",
                     dir="bwd", knob="BHDL_SCAN_BWD_CHUNK", value=chunk,
                     ms=graph_time(bwd, reps))
            packed_walk.BHDL_SCAN_BWD_CHUNK = old
        if layout == "BLHD" and args.sweep:
            # chunk lengths and threads per block (launch arguments: no new compilation)
            sweep = [("blocks", "FORWARD_CHUNK", "fwd", c) for c in (64, 256, 512)]
            sweep += [("rblocks", "RBLOCKS_CHUNK", "bwd", c) for c in (64, 128, 512)]
            sweep += [("rblocks", "THREADS", "bwd", c) for c in (64, 128, 512)]
            sweep += [("blocks", "THREADS", "fwd", c) for c in (128, 512)]
            for variant, knob, direction, chunk in sweep:
                old = getattr(packed_walk, knob)
                setattr(packed_walk, knob, chunk)
                try:
                    with packed_walk.variant(variant):
                        if direction == "fwd":
                            fn = functools.partial(packed_walk.forward, a, u, y, None, cu, ok,
                                                   dummy, hops=1, block_len=16, layout=layout)
                        else:
                            fn = functools.partial(packed_walk.backward, a, u, dy, da, du, None,
                                                   dx0, cu, ok, dummy, hops=1, block_len=16,
                                                   layout=layout)
                        emit(kind="kernel", layout=layout, docs=n_docs, call="packed",
                             variant=variant, dir=direction, knob=knob, value=chunk,
                             ms=graph_time(fn, reps))
                finally:
                    setattr(packed_walk, knob, old)


if __name__ == "__main__":
    main()
