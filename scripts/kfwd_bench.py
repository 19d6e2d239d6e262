"""One device session for the forward kernels: precompile, GPU tests, then timings. Logs in $OUT.

    source scripts/device_env.sh; python3 scripts/kfwd_bench.py

1. Compile every specialisation the entry points can launch (and the tuning variants below) to
   PTX in a process pool, into the launcher's disk cache, so tests and timings only load modules.
2. tests/test_gpu_forward.py and tests/test_kernels_forward.py on the GPU (sharded processes).
3. Timings through ``swr_forward`` (what the front calls): CUDA events around 20 back-to-back
   calls, median of 7, rotating over 2 input sets (each larger than L2): bf16 in/out, hops=1,
   block_len=16, H=128 x D=16, per-head a, B x L in 16x2048, 4x8192, 1x32768, both layouts, over
   the tuning knobs; then with the best knobs float32, per-channel a, hops=0 and block_len
   8/32/64. Memory floor: bytes of a, u read + y written over the measured device-to-device copy
   bandwidth. Host overhead: median of 1000 calls on a tiny input.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

OUT = os.environ.get("OUT", "/tmp/kfwd_out")
os.makedirs(OUT, exist_ok=True)
START = time.time()
BUDGET_S = float(os.environ.get("KFWD_BUDGET_S", "400"))
RESULTS = {"timings": [], "notes": []}


def log(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    with open(os.path.join(OUT, "kfwd.log"), "a") as f:
        f.write(line + "\n")


def elapsed():
    return time.time() - START


def save():
    with open(os.path.join(OUT, "kfwd_results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


# ------------------------------------------------------------------------------------------
# tuning variants swept at bf16 / hops=1 / block_len=16

# (run 1 and 2 on an H100 also swept 8/4-byte accesses, unroll 16, software prefetch and 512-step
# chunks: all slower; see numba_kernels/swr_forward.py)
BLHD_VARIANTS = [
    dict(blhd_access_bytes=16, blhd_unroll=8, blhd_chunk_steps=256),
    dict(blhd_access_bytes=16, blhd_unroll=8, blhd_chunk_steps=128),
    dict(blhd_access_bytes=16, blhd_unroll=16, blhd_chunk_steps=256),
    dict(blhd_access_bytes=8, blhd_unroll=16, blhd_chunk_steps=256),
    dict(blhd_access_bytes=16, blhd_unroll=8, blhd_chunk_steps=256, blhd_threads_per_block=128),
]
BHDL_VARIANTS = [
    dict(bhdl_access_bytes=16, bhdl_rows_per_warp=2, threads_per_sm=2048),
    dict(bhdl_access_bytes=16, bhdl_rows_per_warp=2, threads_per_sm=1024),
    dict(bhdl_access_bytes=16, bhdl_rows_per_warp=1, threads_per_sm=2048),
    dict(bhdl_access_bytes=16, bhdl_rows_per_warp=4, threads_per_sm=2048),
    dict(bhdl_access_bytes=16, bhdl_rows_per_warp=2, threads_per_sm=2048,
         bhdl_threads_per_block=128),
]
SIZES = [(16, 2048), (4, 8192), (1, 32768)]
H, D = 128, 16


def variant_keys():
    """Kernel keys (layout, in, out, per_head, mode, vec, depth) of the sweep and follow-ups."""
    keys = set()
    for layout, variants in (("BLHD", BLHD_VARIANTS), ("BHDL", BHDL_VARIANTS)):
        lo = layout.lower()
        for v in variants:
            vec = max(1, v[f"{lo}_access_bytes"] // 2)
            depth = v["blhd_unroll"] if layout == "BLHD" else v["bhdl_rows_per_warp"]
            for kinds in (("bf16", "bf16"), ("bf16", "f32")):
                for per_head in (True, False):
                    for mode in (0, 1):
                        keys.add((layout, *kinds, per_head, mode, vec, depth))
            keys.add((layout, "f32", "f32", True, 1, max(1, vec // 2), depth))
    return sorted(keys)


def _precompile(jobs):
    F = importlib.import_module("swr_array.numba_kernels.swr_forward")
    L = importlib.import_module("swr_array.numba_kernels._launch")
    failures = []
    for key, cc in jobs:
        try:
            kernel = F.get_kernel(*key)
            L._cached_ptx(kernel, F.signature(key[1], key[2]), cc)
        except Exception as exc:  # noqa: BLE001 - report, the launch will retry and raise
            failures.append(f"{key}: {type(exc).__name__}: {str(exc)[:300]}")
    return failures


def precompile(cc):
    F = importlib.import_module("swr_array.numba_kernels.swr_forward")
    keys = set(variant_keys())
    for name, _kernel, _sig in F.specialisations():
        m = re.match(r"swr_(\w+?)_(blhd|bhdl)_\w+?_(f32|f16|bf16)_to_(f32|f16|bf16)_(per_head|"
                     r"per_channel)_vec(\d+)_(?:unroll|rows)(\d+)$", name)
        mode = {"hops0": 0, "hops1": 1, "block_carry": 2, "carriers": 3}[m.group(1)]
        keys.add((m.group(2).upper(), m.group(3), m.group(4), m.group(5) == "per_head", mode,
                  int(m.group(6)), int(m.group(7))))
    keys = sorted(keys)
    workers = max(1, min(15, (os.cpu_count() or 2) - 1))
    jobs = [[(k, cc) for k in keys[i::workers]] for i in range(workers)]
    t = time.time()
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failures = [f for part in pool.map(_precompile, jobs) for f in part]
    log(f"[precompile] {len(keys)} kernels on {workers} workers in {time.time() - t:.0f}s, "
        f"{len(failures)} failures")
    for f in failures[:20]:
        log("   ", f)


def run_tests(paths, shards, tag, timeout):
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                              "-p", "no:cacheprovider", *paths],
                             capture_output=True, text=True, timeout=120)
    ids = [x for x in collect.stdout.splitlines() if "::" in x]
    log(f"[{tag}] {len(ids)} tests in {shards} shards")
    procs = []
    for k in range(shards):
        part = ids[k::shards]
        if part:
            logf = open(os.path.join(OUT, f"{tag}_{k}.log"), "w")
            procs.append((subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-rfE",
                                            "-p", "no:cacheprovider", *part],
                                           stdout=logf, stderr=subprocess.STDOUT), logf, k))
    deadline = time.time() + timeout
    for proc, logf, k in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            log(f"[{tag}] shard {k} timed out")
        logf.close()
        text = open(os.path.join(OUT, f"{tag}_{k}.log")).read()
        summary = [x for x in text.splitlines() if re.search(r"\d+ (passed|failed|error)", x)]
        log(f"[{tag}] shard {k}: {summary[-1] if summary else '(no summary)'}")
        for x in [x for x in text.splitlines() if x.startswith(("FAILED", "ERROR"))][:15]:
            log("   ", x[:400])
        if "Error" in text and not summary:
            log(text[-3000:])
    log(f"[{tag}] done at {elapsed():.0f}s")


# ------------------------------------------------------------------------------------------
# timing


def cupy():
    import cupy as cp

    return cp


def random_inputs(layout, B, N, per_head, kind, seed):
    cp = cupy()
    gen = cp.random.default_rng(seed)
    if layout == "BHDL":
        u_shape = (B, H, D, N)
        a_shape = (B, H, N) if per_head else u_shape
    else:
        u_shape = (B, N, H, D)
        a_shape = (B, N, H) if per_head else u_shape
    a = gen.uniform(-1.0, 1.0, a_shape).astype(cp.float32)
    u = gen.standard_normal(u_shape, dtype=cp.float32)
    if kind == "bf16":  # the bits a kernel takes (truncation: the values just need to be bf16)
        a = (a.view(cp.uint32) >> 16).astype(cp.uint16)
        u = (u.view(cp.uint32) >> 16).astype(cp.uint16)
    elif kind == "f16":
        a, u = a.astype(cp.float16), u.astype(cp.float16)
    return a, u


STORAGE = {"bf16": "uint16", "f16": "float16", "f32": "float32"}
ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4}


def time_calls(fn, nsets, calls=20, reps=7):
    cp = cupy()
    for i in range(3):
        fn(i % nsets)
    cp.cuda.get_current_stream().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        for i in range(calls):
            fn(i % nsets)
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / calls)
    return statistics.median(times), times


def copy_bandwidth():
    """Device-to-device copy, bytes read + written per second (TB/s), 512 MiB."""
    cp = cupy()
    n = 512 << 20
    src = cp.ones(n, cp.uint8)
    dst = cp.empty(n, cp.uint8)
    runtime = cp.cuda.runtime

    def copy(_):
        runtime.memcpyAsync(dst.data.ptr, src.data.ptr, n, runtime.memcpyDeviceToDevice,
                            cp.cuda.get_current_stream().ptr)

    ms, _ = time_calls(copy, 1)
    return 2 * n / (ms * 1e-3) / 1e12


def kernel_info(layout, B, N, per_head, in_kind, out_kind, hops, block_len, args):
    """Registers and local memory of the kernel the last call used (from its launch plan)."""
    from cupy_backends.cuda.api import driver

    F = importlib.import_module("swr_array.numba_kernels.swr_forward")
    for key, plan in reversed(list(F._plans.items())):
        current = key[-1] == F.TUNING.version and key[2] == args[1].shape
        if plan.entry is not None and current and key[6] == block_len:
            ptr = plan.entry.function_ptr
            return dict(kernel=plan.kernel.py_func.__name__,
                        regs=driver.funcGetAttribute(4, ptr),  # CU_FUNC_ATTRIBUTE_NUM_REGS
                        local=driver.funcGetAttribute(3, ptr),  # ..._LOCAL_SIZE_BYTES
                        grid=plan.grid, block=plan.block, chunk_blocks=int(plan.scalars[6]))
    return {}


def bench(layout, B, N, *, per_head=True, in_kind="bf16", out_kind="bf16", hops=1, block_len=16,
          tuning=None, tag="", bandwidth=3.0):
    from swr_array.numba_kernels import swr_forward

    F = importlib.import_module("swr_array.numba_kernels.swr_forward")
    cp = cupy()
    saved = dict(F.TUNING)
    for k, v in (tuning or {}).items():
        F.TUNING[k] = v
    try:
        sets = []
        for s in range(2):
            a, u = random_inputs(layout, B, N, per_head, in_kind, 100 + s)
            y = cp.empty(u.shape, STORAGE[out_kind])
            sets.append((a, u, y))
        z = cp.zeros((B, H, D), cp.float32)
        o = cp.ones((B, H, D), cp.float32)

        def call(i):
            a, u, y = sets[i]
            swr_forward(a, u, y, layout=layout, block_len=block_len, hops=hops, offset=0, w0=z,
                        g0=o, carry=z)

        ms, times = time_calls(call, 2)
        a, u, y = sets[0]
        nbytes = a.nbytes + u.nbytes + y.nbytes
        floor_ms = nbytes / (bandwidth * 1e12) * 1e3
        info = kernel_info(layout, B, N, per_head, in_kind, out_kind, hops, block_len, sets[0])
        row = dict(tag=tag, layout=layout, B=B, N=N, per_head=per_head, in_kind=in_kind,
                   out_kind=out_kind, hops=hops, block_len=block_len, ms=ms, times=times,
                   mbytes=nbytes / 1e6, floor_ms=floor_ms, x_floor=ms / floor_ms,
                   tuning=tuning or {}, **info)
        RESULTS["timings"].append(row)
        log(f"{tag:10s} {layout} {B:2d}x{N:5d} {in_kind}->{out_kind} "
            f"{'head' if per_head else 'chan'} hops={hops} l={block_len:3d} "
            f"{ms * 1e3:8.1f} us  floor {floor_ms * 1e3:6.1f} us  x{ms / floor_ms:5.2f}  "
            f"{info.get('regs')} regs local={info.get('local')} grid={info.get('grid')} "
            f"chunk={info.get('chunk_blocks')} {tuning or ''}")
        sets.clear()
        cp.get_default_memory_pool().free_all_blocks()
        return ms
    finally:
        for k, v in saved.items():
            F.TUNING[k] = v


def host_overhead():
    """Median host time of one swr_forward call on a tiny input, and of the bare launcher."""
    from swr_array.numba_kernels import swr_forward

    F = importlib.import_module("swr_array.numba_kernels.swr_forward")
    L = importlib.import_module("swr_array.numba_kernels._launch")
    cp = cupy()
    B, N, h, d = 1, 16, 1, 16
    a = cp.ones((B, N, h), cp.uint16)
    u = cp.ones((B, N, h, d), cp.uint16)
    y = cp.empty_like(u)
    z = cp.zeros((B, h, d), cp.float32)

    def call():
        swr_forward(a, u, y, layout="BLHD", block_len=16, hops=1, offset=0, w0=z, g0=z, carry=z)

    results = {}
    for name, fn in [("swr_forward", call)]:
        fn()
        cp.cuda.get_current_stream().synchronize()
        times = []
        for i in range(1000):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
            if i % 50 == 49:
                cp.cuda.get_current_stream().synchronize()
        results[name] = statistics.median(times) * 1e6
    # the generic launcher with FlatArray arguments (type dispatch included)
    plan = next(p for p in F._plans.values() if p.entry is not None)
    args = [L.FlatArray.of(x) for x in (a, u, y, z, z, z, z, z, z)] + plan.scalars
    times = []
    for i in range(1000):
        t = time.perf_counter()
        L.launch(plan.kernel, plan.grid, plan.block, args)
        times.append(time.perf_counter() - t)
        if i % 50 == 49:
            cp.cuda.get_current_stream().synchronize()
    results["launch(generic args)"] = statistics.median(times) * 1e6
    # a CuPy RawKernel doing nothing, for the same CPU
    raw = cp.RawKernel(r'extern "C" __global__ void nothing(float* x, long long n) {}', "nothing")
    raw((1,), (32,), (z, cp.int64(1)))
    times = []
    for i in range(1000):
        t = time.perf_counter()
        raw((1,), (32,), (z, cp.int64(1)))
        times.append(time.perf_counter() - t)
        if i % 50 == 49:
            cp.cuda.get_current_stream().synchronize()
    results["cupy RawKernel (empty)"] = statistics.median(times) * 1e6
    try:  # the public front on CuPy arrays (argument checks, allocation of y, dispatch)
        import swr_array

        ab = cp.ones((B, N, h), cp.float32)
        ub = cp.ones((B, N, h, d), cp.float32)
        swr_array.swr(ab, ub, layout="BLHD")
        times = []
        for i in range(1000):
            t = time.perf_counter()
            swr_array.swr(ab, ub, layout="BLHD")
            times.append(time.perf_counter() - t)
            if i % 50 == 49:
                cp.cuda.get_current_stream().synchronize()
        results["swr_array.swr (front, f32)"] = statistics.median(times) * 1e6
    except Exception as exc:  # noqa: BLE001 - the front is not this script's subject
        log(f"[host] front not timed: {type(exc).__name__}: {exc}")
    cp.cuda.get_current_stream().synchronize()
    for k, v in results.items():
        log(f"[host] {k}: {v:.2f} us")
    RESULTS["host_us"] = results


def pick_best(layout, variants):
    rows = [r for r in RESULTS["timings"] if r["tag"] == f"sweep-{layout}"]
    best, best_score = None, None
    for v in variants:
        mine = [r["x_floor"] for r in rows if r["tuning"] == v]
        if len(mine) == len(SIZES):
            score = statistics.geometric_mean(mine)
            if best_score is None or score < best_score:
                best, best_score = v, score
    log(f"[best] {layout}: {best} (x floor geo-mean {best_score})")
    return best or variants[0]


def main():
    cp = cupy()
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    log(f"device {name}, cc {dev.compute_capability}, {props['multiProcessorCount']} SMs")
    RESULTS["device"] = name
    text = dev.compute_capability
    precompile((int(text[:-1]), int(text[-1])))
    if "--no-tests" not in sys.argv:
        run_tests(["tests/test_gpu_forward.py", "tests/test_kernels_forward.py"], 6, "tests",
                  timeout=150)
        # the front's kernel tests (swr_array/_cuda.py over these kernels), for information
        if os.path.exists("tests/test_kernels_front.py"):
            run_tests(["tests/test_kernels_front.py"], 4, "front", timeout=90)
    save()
    bw = copy_bandwidth()
    log(f"[copy] device-to-device {bw:.3f} TB/s (read + write)")
    RESULTS["copy_TBps"] = bw
    host_overhead()
    save()
    for layout, variants in (("BLHD", BLHD_VARIANTS), ("BHDL", BHDL_VARIANTS)):
        for v in variants:
            for B, N in SIZES:
                if elapsed() > BUDGET_S - 90:
                    break
                bench(layout, B, N, tuning=v, tag=f"sweep-{layout}", bandwidth=bw)
        save()
    best = {**pick_best("BLHD", BLHD_VARIANTS), **pick_best("BHDL", BHDL_VARIANTS)}
    RESULTS["best"] = best
    follow = []
    for layout in ("BLHD", "BHDL"):
        for B, N in SIZES:
            follow.append(dict(layout=layout, B=B, N=N, in_kind="f32", out_kind="f32", tag="f32"))
        follow += [
            dict(layout=layout, B=4, N=8192, per_head=False, tag="per-chan"),
            dict(layout=layout, B=4, N=8192, hops=0, tag="hops0"),
            dict(layout=layout, B=4, N=8192, block_len=8, tag="l8"),
            dict(layout=layout, B=4, N=8192, block_len=32, tag="l32"),
            dict(layout=layout, B=4, N=8192, block_len=64, tag="l64"),
            dict(layout=layout, B=4, N=8192, in_kind="bf16", out_kind="f32", tag="bf16->f32"),
        ]
    follow += [dict(layout="BLHD", B=4, N=8192, block_len=64, tag="l64-c512",
                    extra=dict(blhd_chunk_steps=512)),
               dict(layout="BLHD", B=4, N=8192, block_len=32, tag="l32-c512",
                    extra=dict(blhd_chunk_steps=512)),
               dict(layout="BHDL", B=4, N=8192, block_len=256, tag="l256"),
               dict(layout="BLHD", B=4, N=8192, block_len=256, tag="l256")]
    for layout in ("BLHD", "BHDL"):  # the main case again: run-to-run spread
        for B, N in SIZES:
            follow.append(dict(layout=layout, B=B, N=N, tag="repeat"))
    for f in follow:
        if elapsed() > BUDGET_S - 15:
            log("[budget] stopping follow-ups")
            break
        extra = f.pop("extra", {})
        bench(tuning={**best, **extra}, bandwidth=bw, **f)
        save()
    save()
    log(f"[end] {elapsed():.0f}s")


if __name__ == "__main__":
    main()
