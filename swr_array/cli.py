"""swr-array: sliding window recurrences on NumPy, CuPy (Numba CUDA), PyTorch and JAX."""

from __future__ import annotations

import importlib
import platform
import time

import numpy as np

from . import _checks

_MIN = "compute capability {}.{} (sm_{}{}, cp.async)".format(
    *_checks.MIN_COMPUTE_CAPABILITY, *_checks.MIN_COMPUTE_CAPABILITY
)


def _version(name):
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report any import failure as the reason
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:100]
    return getattr(mod, "__version__", "?"), None


def gpu_status():
    """(usable, reason, description) for the CuPy + Numba CUDA backend."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001
        return False, f"CuPy does not import ({exc}); pip install 'swr-array[cuda13]'", None
    try:
        if not cupy.cuda.is_available():
            return False, "CuPy sees no CUDA GPU", None
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        cc = (int(props["major"]), int(props["minor"]))
        desc = f"{name} (compute capability {cc[0]}.{cc[1]})"
    except Exception as exc:  # noqa: BLE001
        return False, f"CUDA is not usable: {exc}", None
    if not _checks.capability_supported(cc):
        return False, f"{desc} is not supported: the kernels need {_MIN} or later", desc
    try:
        from . import numba_kernels  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        hint = ""
        if "row_stack" in str(exc):
            hint = " (numba-cuda 0.30 needs numpy < 2.5: pip install 'numpy<2.5')"
        return False, f"numba-cuda kernels do not import: {exc}{hint}", desc
    return True, "ok", desc


def info() -> int:
    print(f"swr-array {importlib.import_module('swr_array').__version__} on "
          f"Python {platform.python_version()} ({platform.machine()})")
    rows = []
    for name in ("numpy", "ml_dtypes", "numba", "numba_cuda", "cupy", "torch", "jax", "flax"):
        ver, err = _version(name)
        rows.append((name, ver or "-", err or ""))
    width = max(len(r[0]) for r in rows)
    for name, ver, err in rows:
        print(f"  {name:<{width}}  {ver:<12} {err}")
    ok, reason, desc = gpu_status()
    print("backend numpy (reference): ok")
    print(f"backend cupy + numba CUDA: {'ok on ' + desc if ok else 'unavailable: ' + reason}")
    if desc is None:
        print(f"GPU: none found; the CUDA kernels need {_MIN} or later")
    else:
        verdict = "NOT supported" if "is not supported" in reason else "supported"
        print(f"GPU: {desc}: {verdict} (the kernels need {_MIN} or later)")
    for fw in ("torch", "jax"):
        ver, err = _version(fw)
        print(f"adapter {fw}: {'available' if ver else 'unavailable: ' + err}")
    return 0


def _median_ms(fn, sync, repeat=5):
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def sequential_swr(a, u, block_len, hops):
    """The SWR from its definition, independent of swr_array.reference's block algebra.

    Token t of block j is x_t of the plain recurrence x_s = a_s x_(s-1) + u_s started from 0 at
    the first token of block j - hops (at token 0 for hops=None). a broadcasts against u
    ``(..., N)``; float64, one token at a time.
    """
    a = np.broadcast_to(a, u.shape)
    N = u.shape[-1]
    y = np.zeros(u.shape, np.float64)
    starts = [0] if hops is None else range(0, N, block_len)
    for j0 in starts:
        lo = 0 if hops is None else max(0, j0 - hops * block_len)
        hi = N if hops is None else min(N, j0 + block_len)
        x = np.zeros(u.shape[:-1], np.float64)
        for t in range(lo, hi):
            x = a[..., t] * x + u[..., t]
            if t >= j0:
                y[..., t] = x
    return y


def demo(force_cpu: bool = False) -> int:
    import ml_dtypes

    import swr_array as sa
    from swr_array.ops import to_time_last

    ok, reason, desc = gpu_status()
    use_gpu = ok and not force_cpu
    if use_gpu:
        import cupy as xp

        sync = xp.cuda.get_current_stream().synchronize
        where = f"GPU: {desc}, Numba CUDA kernels"
        B, L, H, D = 4, 8192, 128, 16
    else:
        xp = np
        sync = lambda: None  # noqa: E731
        where = f"CPU: NumPy float64 reference ({reason if not force_cpu else 'forced'})"
        B, L, H, D = 2, 1024, 8, 16
    print(f"swr-array demo on {where}")
    print(f"SWR, B={B} L={L} H={H} D={D}, block_len=16; checked on 4 channels against the "
          "recurrence x_t = a_t x_(t-1) + u_t run token by token over each block's window")
    print(f"{'layout':<6} {'dtype':<9} {'hops':>4} {'rel. error':>11} {'ms':>9}")
    rng = np.random.default_rng(0)
    worst = 0.0
    for layout in ("BLHD", "BHDL"):
        for dtype in (np.float32, ml_dtypes.bfloat16):
            for hops in (1, 2, None):
                shape_u = (B, H, D, L) if layout == "BHDL" else (B, L, H, D)
                shape_a = (B, H, L) if layout == "BHDL" else (B, L, H)
                u = rng.standard_normal(shape_u, dtype=np.float32).astype(dtype)
                a = rng.uniform(0.8, 1.0, shape_a).astype(np.float32).astype(dtype)
                ua, aa = xp.asarray(u), xp.asarray(a)
                kw = dict(hops=hops, layout=layout)
                ms = _median_ms(lambda aa=aa, ua=ua, kw=kw: sa.swr(aa, ua, **kw), sync)
                y = sa.swr(aa, ua, **kw)
                y = y.get() if hasattr(y, "get") else y
                at = to_time_last(a, layout, True)[:1, :2].astype(np.float64)
                ut = to_time_last(u, layout, False)[:1, :2, :2].astype(np.float64)
                ref = sequential_swr(at, ut, block_len=16, hops=hops)
                got = to_time_last(y, layout, False)[:1, :2, :2].astype(np.float64)
                err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                tol = 1e-5 if dtype == np.float32 else 1e-2  # bf16 rounds inputs and output
                worst = max(worst, err / tol)
                name = np.dtype(dtype).name
                print(f"{layout:<6} {name:<9} {str(hops):>4} {err:>11.2e} {ms:>9.3f}")
    status = 0 if worst < 1.0 else 1
    status |= _demo_phalanx(xp, use_gpu, sync)
    print("all checks passed" if status == 0 else "CHECK FAILED")
    return status


def _phalanx_from_definition(x, p):
    """out = (swr(A, Bg * V) * C + V) W_out with [V | Bg | C | A] = x W_in (docs/phalanx.md), in
    float64 through :func:`sequential_swr`; x (B, L, dim), hops=1, block_len=16."""
    H = p["b_a"].shape[0]
    D = p["W_out"].shape[0] // H
    KV = p["b_b"].shape[0] // D
    B, L, _ = x.shape
    z = x @ p["W_in"]
    hd, kd = H * D, KV * D
    V = z[..., :hd].reshape(B, L, H, D)
    Bg = 1 / (1 + np.exp(-(z[..., hd : hd + kd] + p["b_b"])))
    C = z[..., hd + kd : hd + 2 * kd] + p["b_c"]
    A = float(p["decay_max"]) / (1 + np.exp(-(z[..., hd + 2 * kd :] + p["b_a"])))
    Bg = np.repeat(Bg.reshape(B, L, KV, D), H // KV, axis=2)
    C = np.repeat(C.reshape(B, L, KV, D), H // KV, axis=2)
    s = sequential_swr(A.transpose(0, 2, 1)[:, :, None, :], (Bg * V).transpose(0, 2, 3, 1),
                       block_len=16, hops=1)
    Y = s.transpose(0, 3, 1, 2) * C + V
    return Y.reshape(B, L, hd) @ p["W_out"]


def _demo_phalanx(xp, use_gpu, sync) -> int:
    """A Phalanx layer forward checked against its definition, and prefill + decode steps
    against the full forward."""
    import swr_array as sa

    dim, B, L = (2048, 2, 2048) if use_gpu else (256, 2, 256)
    dtype = np.float32
    params = sa.init_phalanx(dim, dtype=dtype, xp=xp, seed=0)
    rng = np.random.default_rng(1)
    x_host = rng.standard_normal((B, L, dim), dtype=np.float32)
    x = xp.asarray(x_host)
    ms = _median_ms(lambda: sa.phalanx(x, params), sync)
    out = sa.phalanx(x, params)

    def host(v):
        return v.get() if hasattr(v, "get") else np.asarray(v)

    p64 = {k: host(v).astype(np.float64) for k, v in params.items()}
    ref = _phalanx_from_definition(x_host[:1].astype(np.float64), p64)
    got = host(out)[:1].astype(np.float64)
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"Phalanx layer dim={dim} B={B} L={L} float32: rel. error {err:.2e}, {ms:.3f} ms")
    ok = err < 1e-4
    # prefill all but the last few tokens, then decode them one at a time
    steps = 4
    _, state = sa.phalanx(x[:, : L - steps], params, return_state=True)
    worst = 0.0
    for t in range(L - steps, L):
        y_t, state = sa.phalanx_step(x[:, t], params, state)
        want = host(out)[:, t].astype(np.float64)
        worst = max(worst, float(np.abs(host(y_t) - want).max() / (np.abs(want).max() + 1e-30)))
    print(f"Phalanx prefill + {steps} decode steps vs the full forward: max rel. error {worst:.2e}")
    ok = ok and worst < 1e-4
    return 0 if ok else 1
