"""One device session for the backward kernels: GPU tests, then timings. Logs go to $OUT.

    source scripts/device_env.sh; python3 scripts/kbwd_dev.py

1. tests/test_gpu_backward.py, split over processes so that the kernel specialisations compile in
   parallel (each PTX lands in the launcher's disk cache, later processes load it);
2. timings of the fused backward (bf16, hops=1, block_len=16, H=128 heads of D=16, per-head
   coefficients, B x L in 16 x 2048, 4 x 8192, 1 x 32768, both layouts) over its tuning knobs:
   CUDA events around 20 back-to-back calls through the public kernel entry point, median of 7,
   rotating over 3 input sets (each larger than L2); the forward kernel the same way where it
   runs; a device-to-device copy for the memory floor;
3. tests/test_kernels_backward.py on the GPU, if time is left.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time

OUT = os.environ.get("OUT", "/tmp/kbwd_out")
START = time.time()
BUDGET_S = float(os.environ.get("KBWD_BUDGET_S", "440"))


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    with open(os.path.join(OUT, "kbwd.log"), "a") as f:
        f.write(line + "\n")


def elapsed():
    return time.time() - START


def run_tests_sharded(path, shards, tag, timeout):
    """pytest on ``path`` in ``shards`` parallel processes; returns (passed, failed, skipped)."""
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                              "-p", "no:cacheprovider", path],
                             capture_output=True, text=True, timeout=120)
    ids = [x for x in collect.stdout.splitlines() if "::" in x]
    log(f"[{tag}] {len(ids)} tests in {shards} shards")
    procs = []
    for k in range(shards):
        part = ids[k::shards]
        if not part:
            continue
        logf = open(os.path.join(OUT, f"{tag}_{k}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-rfE",
                                        "-p", "no:cacheprovider", *part],
                                       stdout=logf, stderr=subprocess.STDOUT), logf, k))
    deadline = time.time() + timeout
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for proc, logf, k in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            log(f"[{tag}] shard {k} timed out")
        logf.close()
        text = open(os.path.join(OUT, f"{tag}_{k}.log")).read()
        last = [x for x in text.splitlines()
                if " in " in x and re.search(r"\d+ (passed|failed|skipped|error)", x)]
        summary = last[-1] if last else "(no summary)"
        for key in totals:
            m = re.search(rf"(\d+) {key}", summary)
            if m:
                totals[key] += int(m.group(1))
        if "failed" in summary or "error" in summary or not last:
            log(f"[{tag}] shard {k}: {summary}")
            fails = [x for x in text.splitlines() if x.startswith(("FAILED", "ERROR"))]
            for x in fails[:20]:
                log("   ", x[:300])
    log(f"[{tag}] totals {totals} at {elapsed():.0f}s")
    return totals


def bench():
    import cupy as cp
    from swr_array.numba_kernels import _launch

    from swr_array import numba_kernels as nk

    swr_bwd_mod = sys.modules["swr_array.numba_kernels.swr_backward"]
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]
    log("device:", name.decode() if isinstance(name, bytes) else name, "SMs",
        props["multiProcessorCount"],
        "L2", props["l2CacheSize"] // 2**20, "MiB")

    # device-to-device copy bandwidth (bytes read + written)
    nbytes = 2**30
    src = cp.empty(nbytes, cp.uint8)
    dst = cp.empty(nbytes, cp.uint8)
    src.fill(1)
    stream = cp.cuda.get_current_stream()
    copy_ms = []
    for _ in range(7):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        for _ in range(5):
            cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes,
                                        cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)
        e1.record()
        e1.synchronize()
        copy_ms.append(cp.cuda.get_elapsed_time(e0, e1) / 5)
    copy_bw = 2 * nbytes / (statistics.median(copy_ms) * 1e-3)
    log(f"copy: {copy_bw / 1e12:.3f} TB/s (read + write, median of 7)")
    del src, dst

    H, D, L = 128, 16, 16
    results = []

    def bits_bf16(x):
        return (x.view(cp.uint32) >> 16).astype(cp.uint16)

    def inputs(layout, B, N):
        ushape = (B, H, D, N) if layout == "BHDL" else (B, N, H, D)
        ashape = (B, H, N) if layout == "BHDL" else (B, N, H)
        rs = cp.random.RandomState(0)
        sets = []
        for _ in range(3):
            sets.append(dict(
                a=bits_bf16(rs.uniform(0.5, 1.0, ashape, dtype=cp.float32)),
                u=bits_bf16(rs.standard_normal(ushape, dtype=cp.float32)),
                dy=bits_bf16(rs.standard_normal(ushape, dtype=cp.float32)),
                du=cp.empty(ushape, cp.uint16), da=cp.empty(ashape, cp.uint16),
                y=cp.empty(ushape, cp.uint16)))
        return sets

    def timed(fn, sets, reps=20, trials=7):
        for s in sets:
            fn(s)
        cp.cuda.runtime.deviceSynchronize()
        out = []
        for _ in range(trials):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            for i in range(reps):
                fn(sets[i % len(sets)])
            e1.record()
            e1.synchronize()
            out.append(cp.cuda.get_elapsed_time(e0, e1) / reps)
        t0 = time.perf_counter()
        for i in range(50):
            fn(sets[i % len(sets)])
        host_us = (time.perf_counter() - t0) / 50 * 1e6
        cp.cuda.runtime.deviceSynchronize()
        return statistics.median(out), min(out), host_us

    variants = {
        "BLHD": [dict(lanes=None, K=8, threads=128), dict(lanes=4, K=4, threads=128),
                 dict(lanes=4, K=16, threads=128), dict(lanes=4, K=8, threads=64),
                 dict(lanes=2, K=8, threads=128), dict(lanes=2, K=16, threads=64),
                 dict(lanes=8, K=8, threads=128), dict(lanes=8, K=16, threads=256)],
        "BHDL": [dict(lanes=None, K=8, threads=128), dict(lanes=2, K=4, threads=128),
                 dict(lanes=2, K=16, threads=128), dict(lanes=2, K=8, threads=64),
                 dict(lanes=1, K=8, threads=128), dict(lanes=1, K=16, threads=64)],
    }
    for layout in ("BLHD", "BHDL"):
        for B, N in ((16, 2048), (4, 8192), (1, 32768)):
            sets = inputs(layout, B, N)
            n_u = B * N * H * D
            bwd_bytes = 2 * (3 * n_u + 2 * B * N * H)  # read a, u, dy; write du, da
            fwd_bytes = 2 * (2 * n_u + B * N * H)  # read a, u; write y
            carry = cp.zeros((B, H, D), cp.float32)
            dcarry = cp.empty((B, H, D), cp.float32)
            ones = cp.ones((B, H, D), cp.float32)
            for v in variants[layout]:
                if elapsed() > BUDGET_S - 60:
                    log("bench: out of time")
                    return results

                def fn(s, v=v, layout=layout, carry=carry, dcarry=dcarry):
                    nk.swr_backward(s["a"], s["u"], s["dy"], s["du"], s["da"], layout=layout,
                                    block_len=L, hops=1, carry=carry, dcarry=dcarry,
                                    blocks_per_chunk=v["K"], threads=v["threads"],
                                    lanes=v["lanes"])

                try:
                    med, best, host_us = timed(fn, sets)
                except Exception as exc:  # noqa: BLE001 - report and go on with the others
                    log(f"bench {layout} {B}x{N} {v}: FAILED {type(exc).__name__}: {exc}")
                    continue
                plan = swr_bwd_mod.walk_plan(layout, True, "bf16", "bf16", L, N, H, D)
                lanes = v["lanes"] or plan[0]
                kernel = swr_bwd_mod._walk_kernel("bf16", "bf16", layout, True, L, lanes, 1,
                                                  plan[1], v["threads"])
                try:
                    regs = [e.module[1].num_regs for k, e in _launch._entries.items()
                            if k[0] is kernel]
                except Exception:  # noqa: BLE001 - the launcher's internals may change
                    regs = []
                floor_ms = bwd_bytes / copy_bw * 1e3
                row = dict(layout=layout, B=B, N=N, lanes=lanes, K=v["K"],
                           threads=v["threads"], default=v["lanes"] is None, ms=med,
                           best_ms=best, host_us=host_us, floor_ms=floor_ms,
                           frac_copy_bw=floor_ms / med, regs=regs[0] if regs else None)
                results.append(row)
                log(f"bwd {layout} {B:>2}x{N:<5} lanes={lanes} K={v['K']:<2} "
                    f"threads={v['threads']:<3} regs={row['regs']}: {med:.4f} ms "
                    f"(min {best:.4f}, host {host_us:.0f} us/call) floor {floor_ms:.4f} ms "
                    f"-> {100 * floor_ms / med:.0f}% of copy bandwidth")
            # the forward kernel (another file), for forward + backward together
            try:
                w0 = cp.zeros((B, H, D), cp.float32)

                def fwd(s, layout=layout, w0=w0, ones=ones, carry=carry):
                    nk.swr_forward(s["a"], s["u"], s["y"], layout=layout, block_len=L, hops=1,
                                   offset=0, w0=w0, g0=ones, carry=carry)

                med, best, host_us = timed(fwd, sets)
                fl = fwd_bytes / copy_bw * 1e3
                results.append(dict(layout=layout, B=B, N=N, forward=True, ms=med, best_ms=best,
                                    host_us=host_us, floor_ms=fl, frac_copy_bw=fl / med))
                log(f"fwd {layout} {B:>2}x{N:<5}: {med:.4f} ms floor {fl:.4f} ms "
                    f"-> {100 * fl / med:.0f}% of copy bandwidth")
            except Exception as exc:  # noqa: BLE001 - the forward is not this script's subject
                log(f"fwd {layout} {B}x{N}: not timed ({type(exc).__name__}: {str(exc)[:200]})")
            del sets
            cp.get_default_memory_pool().free_all_blocks()
    return results


def main():
    os.makedirs(OUT, exist_ok=True)
    log(f"python {sys.version.split()[0]}; started")
    totals = run_tests_sharded("tests/test_gpu_backward.py", 12, "gpu_tests", timeout=220)
    results = []
    try:
        results = bench()
    except Exception as exc:  # noqa: BLE001 - keep the test results and what was timed
        import traceback

        log("bench failed:", type(exc).__name__, exc)
        log(traceback.format_exc())
    with open(os.path.join(OUT, "kbwd_bench.json"), "w") as f:
        json.dump(dict(gpu_tests=totals, bench=results, copy_note="TB/s = 2*bytes/time"), f,
                  indent=1)
    if elapsed() < BUDGET_S - 130:
        run_tests_sharded("tests/test_kernels_backward.py", 12, "kernel_tests",
                          timeout=BUDGET_S - 20 - elapsed())
    # the short table, last
    log("\nsummary (median ms; fraction of the copy-bandwidth floor)")
    for layout in ("BLHD", "BHDL"):
        for B, N in ((16, 2048), (4, 8192), (1, 32768)):
            rows = [r for r in results if r["layout"] == layout and r["B"] == B
                    and not r.get("forward")]
            if not rows:
                continue
            best = min(rows, key=lambda r: r["ms"])
            dflt = [r for r in rows if r.get("default")]
            fwd = [r for r in results if r["layout"] == layout and r["B"] == B and r.get("forward")]
            d = dflt[0] if dflt else None
            log(f"{layout} {B:>2}x{N:<5} default {d['ms'] if d else float('nan'):.4f} "
                f"({100 * d['frac_copy_bw'] if d else 0:.0f}%)  best {best['ms']:.4f} "
                f"({100 * best['frac_copy_bw']:.0f}%, lanes={best['lanes']} K={best['K']} "
                f"threads={best['threads']})  floor {best['floor_ms']:.4f}"
                + (f"  fwd {fwd[0]['ms']:.4f}" if fwd else ""))
    log(f"gpu tests: {totals}; done at {elapsed():.0f}s")


if __name__ == "__main__":
    main()
