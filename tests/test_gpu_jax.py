"""The JAX adapter on a CUDA GPU: the Numba kernels inside compiled JAX programs.

Skipped without a JAX GPU backend and CuPy. Oracles: the NumPy float64 front (``swr_array.swr`` /
``swr_vjp`` on NumPy arrays, i.e. the reference) on the same rounded inputs. ``benchmark_fwd_bwd``
compares a jitted forward+backward of the op with the front's calls on CuPy (no timed assertion).
"""

from __future__ import annotations

import functools
import os
import statistics
import time

# JAX must not grab most of the GPU: CuPy (the kernels' temporaries) shares it
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
sj = pytest.importorskip("swr_array.adapters.jax")

import swr_array  # noqa: E402


def _gpu_ready() -> bool:
    try:
        if not jax.devices("gpu"):
            return False
        import cupy

        return bool(cupy.is_available())
    except Exception:  # noqa: BLE001 - no JAX GPU backend or no CuPy: skip
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _gpu_ready(), reason="needs a JAX CUDA backend and CuPy"),
]

TOL = {jnp.float32: 2e-5, jnp.float16: 2e-2, jnp.bfloat16: 6e-2}


def make(layout, per_head, dtype, *, B=2, N=301, H=4, D=16, seed=0, x0=False):
    rng = np.random.default_rng(seed)
    ushape = (B, N, H, D) if layout == "BLHD" else (B, H, D, N)
    if per_head:
        ashape = (B, N, H) if layout == "BLHD" else (B, H, N)
    else:
        ashape = ushape
    a = jnp.asarray(rng.uniform(-0.99, 0.99, ashape), dtype)
    u = jnp.asarray(rng.standard_normal(ushape), dtype)
    x0v = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32) if x0 else None
    return a, u, x0v


def f64(x):
    return None if x is None else np.asarray(x, np.float64)


def ref_forward(a, u, x0, **kw):
    return swr_array.swr(f64(a), f64(u), x0=f64(x0), **kw)


def ref_vjp(a, u, x0, dy, **kw):
    return swr_array.swr_vjp(f64(a), f64(u), f64(dy), x0=f64(x0), **kw)


def close(got, want, tol):
    got = np.asarray(got, np.float64)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


# ----------------------------------------------------------------------------------------------
# forward and gradients against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("hops", [0, 1, 2, None])
@pytest.mark.parametrize("layout,per_head", [("BLHD", True), ("BHDL", False), ("BLHD", False)])
def test_forward_and_grads(layout, per_head, hops, dtype):
    a, u, x0 = make(layout, per_head, dtype, x0=True)
    kw = dict(block_len=16, hops=hops, layout=layout)
    y = jax.jit(functools.partial(sj.swr, **kw))(a, u, x0=x0)
    assert y.dtype == dtype and y.shape == u.shape
    assert next(iter(y.devices())).platform == "gpu"
    close(y, ref_forward(a, u, x0, **kw), TOL[dtype])
    dy = jnp.asarray(np.random.default_rng(1).standard_normal(u.shape), dtype)
    _, vjp = jax.vjp(lambda a, u, x0: sj.swr(a, u, x0=x0, **kw), a, u, x0)
    da, du, dx0 = vjp(dy)
    assert da.dtype == dtype and du.dtype == dtype and dx0.dtype == jnp.float32
    rda, rdu, rdx0 = ref_vjp(a, u, x0, dy, **kw)
    close(du, rdu, TOL[dtype])
    close(da, rda, 4 * TOL[dtype])
    close(dx0, rdx0, TOL[dtype])


@pytest.mark.parametrize("block_len", [8, 32, 64])
def test_block_lens_and_out_dtype(block_len):
    a, u, _ = make("BLHD", True, jnp.bfloat16, N=517)
    y = sj.swr(a, u, block_len=block_len, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    close(y, ref_forward(a, u, None, block_len=block_len, layout="BLHD"), 2e-5)


def test_empty_sequence():
    a, u, _ = make("BLHD", True, jnp.float32, N=0)
    assert sj.swr(a, u).shape == u.shape
    da, du = jax.grad(lambda a, u: sj.swr(a, u).sum(), argnums=(0, 1))(a, u)
    assert da.shape == a.shape and du.shape == u.shape


def test_float64_rejected_on_gpu_at_trace_time():
    with jax.enable_x64(True):
        spec = jax.ShapeDtypeStruct((1, 32, 2, 16), jnp.float64)
        aspec = jax.ShapeDtypeStruct((1, 32, 2), jnp.float64)
        with pytest.raises(TypeError, match="float64"):
            jax.eval_shape(sj.swr, aspec, spec)


# ----------------------------------------------------------------------------------------------
# compositions, and stream order with XLA's own kernels around the callback
# ----------------------------------------------------------------------------------------------


def test_stream_order_inside_a_program():
    a, u, _ = make("BLHD", True, jnp.float32, B=4, N=4096, H=8, D=16)

    @jax.jit
    def f(a, u):
        # XLA kernels write the callback's inputs and read its output on the same stream
        y = sj.swr(a * 0.5 + 0.25, jnp.sin(u) + 1.0)
        return jnp.cumsum(y * 2.0, axis=1)

    want = np.cumsum(2.0 * ref_forward(f64(a) * 0.5 + 0.25, np.sin(f64(u)) + 1.0, None,
                                       layout="BLHD"), axis=1)
    for _ in range(3):
        close(f(a, u), want, 1e-4)


def test_vmap_grad_checkpoint_on_gpu():
    a, u, x0 = make("BLHD", True, jnp.float32, x0=True)
    us = jnp.stack([u, 2 * u, -u])
    y = jax.jit(jax.vmap(lambda u: sj.swr(a, u, x0=x0)))(us)
    for i in range(3):
        close(y[i], ref_forward(a, us[i], x0, layout="BLHD"), 2e-5)

    def loss(a, u):
        return jnp.sum(sj.swr(a, jnp.tanh(sj.swr(a, u)), hops=None) ** 2)

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, u)
    gc = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(a, u)
    gv = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0)))(a, us)
    for x, xc in zip(g, gc):
        np.testing.assert_allclose(np.asarray(x), np.asarray(xc), rtol=1e-5, atol=1e-5)
    for x, xv in zip(g, gv):
        np.testing.assert_allclose(np.asarray(x), np.asarray(xv[0]), rtol=1e-5, atol=1e-5)


def test_cpu_device_on_gpu_machine_runs_reference():
    cpu = jax.devices("cpu")[0]
    a, u, _ = make("BLHD", True, jnp.float32)
    a, u = jax.device_put(a, cpu), jax.device_put(u, cpu)
    y = jax.jit(sj.swr)(a, u)
    assert next(iter(y.devices())).platform == "cpu"
    close(y, ref_forward(a, u, None, layout="BLHD"), 2e-5)


# ----------------------------------------------------------------------------------------------
# Phalanx
# ----------------------------------------------------------------------------------------------


@jax.default_matmul_precision("highest")  # float32 GEMMs, not TF32: compared at 1e-3
def test_phalanx_on_gpu_matches_oracle():
    from test_jax import phalanx_oracle  # reference.phalanx_reference on the front's dict

    p = sj.init_phalanx(jax.random.key(0), 64, head_dim=16, kv_heads=2, decay_max=0.95)
    x = jax.random.normal(jax.random.key(1), (2, 200, 64))
    want = phalanx_oracle(p, x, block_len=16, hops=1)
    close(jax.jit(sj.phalanx)(p, x), want, 1e-3)
    g = jax.jit(jax.grad(lambda p, x: jnp.sum(sj.phalanx(p, x) ** 2), argnums=(0, 1)))(p, x)
    with jax.default_device(jax.devices("cpu")[0]):
        pc = jax.device_put(p, jax.devices("cpu")[0])
        xc = jax.device_put(x, jax.devices("cpu")[0])
        gc = jax.jit(jax.grad(lambda p, x: jnp.sum(sj.phalanx(p, x) ** 2), argnums=(0, 1)))(pc,
                                                                                          xc)
    for x_, xc_ in zip(jax.tree.leaves(g), jax.tree.leaves(gc)):
        scale = float(np.abs(np.asarray(xc_)).max())
        np.testing.assert_allclose(np.asarray(x_), np.asarray(xc_), atol=2e-3 * scale, rtol=2e-3)
    xb = x.astype(jnp.bfloat16)
    close(sj.phalanx(p, xb), want, 0.1)


def _close_grads(g, want, tol):
    """g: (PhalanxParams, dx) from jax.grad; want: (dx, dparams) from the reference."""
    close(g[1], want[0], tol)
    for k, w in want[1].items():
        close(getattr(g[0], k), w, tol)


@jax.default_matmul_precision("highest")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-3), (jnp.bfloat16, 6e-2)])
@pytest.mark.parametrize("hops,kv_heads", [(1, 4), (0, 2), (2, 4)])
def test_phalanx_fused_path(hops, kv_heads, dtype, tol):
    """The fused front (swr_array.phalanx / phalanx_vjp on CuPy views) against the float64
    reference on the same rounded inputs; hops=2 is the front's composed CuPy path."""
    from test_jax import front_dict

    assert sj.fused_phalanx_available()
    p = sj.init_phalanx(jax.random.key(2), 64, head_dim=16, kv_heads=kv_heads, dtype=dtype)
    x = jax.random.normal(jax.random.key(3), (2, 129, 64), dtype)
    c = jax.random.normal(jax.random.key(4), x.shape, dtype)
    fp = {k: np.asarray(v, np.float64) for k, v in front_dict(p).items()}
    xf, cf = np.asarray(x, np.float64), np.asarray(c, np.float64)
    kw = dict(block_len=16, hops=hops)
    out = jax.jit(functools.partial(sj.phalanx, **kw))(p, x)
    assert out.dtype == dtype and next(iter(out.devices())).platform == "gpu"
    close(out, swr_array.reference.phalanx_reference(xf, fp, **kw), tol)
    g = jax.jit(jax.grad(lambda p, x: jnp.sum((sj.phalanx(p, x, **kw) * c).astype(jnp.float32)),
                         argnums=(0, 1)))(p, x)
    _close_grads(g, swr_array.reference.phalanx_vjp_reference(xf, fp, cf, **kw), 4 * tol)


def test_phalanx_fused_backward_gets_z(monkeypatch):
    import importlib

    mod = importlib.import_module("swr_array.phalanx")
    seen = []
    real = mod.phalanx_vjp

    @functools.wraps(real)
    def spy(x, params, dout, **kw):
        seen.append(type(kw["residuals"]["z"]).__module__.split(".")[0])
        return real(x, params, dout, **kw)

    monkeypatch.setattr(mod, "phalanx_vjp", spy)
    p = sj.init_phalanx(jax.random.key(5), 32, head_dim=16)
    x = jax.random.normal(jax.random.key(6), (1, 40, 32))
    jax.jit(jax.grad(lambda p: jnp.sum(sj.phalanx(p, x) ** 2)))(p)
    assert seen == ["cupy"]


def test_front_params_on_cupy_load():
    import cupy

    fp = swr_array.init_phalanx(64, head_dim=16, kv_heads=2, xp=cupy, seed=7)
    p = sj.PhalanxParams.from_dict(fp)  # CuPy arrays: DLPack, no copy through the host
    assert next(iter(p.W_in.devices())).platform == "gpu"
    x = jax.random.normal(jax.random.key(8), (2, 64, 64))
    want = swr_array.phalanx(cupy.from_dlpack(x), fp)  # the front on CuPy
    np.testing.assert_allclose(np.asarray(jax.jit(sj.phalanx)(p, x)), want.get(), rtol=1e-5,
                               atol=1e-5)


# ----------------------------------------------------------------------------------------------
# benchmark helper
# ----------------------------------------------------------------------------------------------


def _median_ms(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _pipelined_ms(step, sync, reps, runs=5):
    """Median over ``runs`` of the wall-clock milliseconds per call of ``reps`` back-to-back calls
    with one synchronisation at the end (host work overlaps the GPU, as in a training loop)."""
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            last = step()
        sync(last)
        times.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(times)


def benchmark_fwd_bwd(B=4, L=8192, H=128, D=16, *, dtype=jnp.bfloat16, block_len=16, hops=1,
                      reps=30, warmup=3):
    """Median milliseconds of one forward+backward of the SWR (BLHD, per-head a).

    Both sides do the same work on the same bf16 arrays: the forward y and the gradients (da, du)
    for a given dy, nothing else (no casts, no loss). ``jax``: a jitted ``jax.vjp`` of
    :func:`swr_array.adapters.jax.swr`; ``front``: ``swr_array.swr`` + ``swr_vjp`` on CuPy views of
    the same arrays. Both are timed with the same clock, two ways:

    - ``jax_ms`` / ``front_ms``: wall clock around one call and a synchronisation (latency, what
      one isolated call costs; includes the host time before the first kernel);
    - ``jax_pipelined_ms`` / ``front_pipelined_ms``: back-to-back calls, one synchronisation
      (throughput, host work overlapping the GPU, as in a training loop).

    ``kernel_ms`` is the front timed with CUDA events on its stream (the GPU time of the kernels
    plus any launch gaps). Returns a dict with these, ``overhead_ms = jax_ms - front_ms``, the
    ratios, and the outputs of both paths.
    """
    import cupy

    kw = dict(block_len=block_len, hops=hops, layout="BLHD")
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0.5, 0.99, (B, L, H)), dtype)
    u = jnp.asarray(rng.standard_normal((B, L, H, D)), dtype)
    dy = jnp.asarray(rng.standard_normal((B, L, H, D)), dtype)

    @jax.jit
    def fwd_bwd(a, u, dy):
        y, vjp = jax.vjp(functools.partial(sj.swr, **kw), a, u)
        return (y, *vjp(dy))

    def step_jax():
        return fwd_bwd(a, u, dy)

    def run_jax():
        return jax.block_until_ready(step_jax())

    def sync_jax(out=None):
        jax.block_until_ready(out if out is not None else a)

    ac, uc, dyc = (cupy.from_dlpack(t) for t in (a, u, dy))
    stream = cupy.cuda.get_current_stream()

    def step_front():
        y = swr_array.swr(ac, uc, **kw)
        da, du, _ = swr_array.swr_vjp(ac, uc, dyc, **kw)
        return y, da, du

    def run_front():
        out = step_front()
        stream.synchronize()
        return out

    def sync_front(out=None):
        stream.synchronize()

    for _ in range(warmup):
        out_jax = run_jax()
        out_front = run_front()
    cupy.cuda.Device().synchronize()
    jax_ms = _median_ms(run_jax, reps)
    front_ms = _median_ms(run_front, reps)
    jax_pipe = _pipelined_ms(step_jax, sync_jax, reps)
    front_pipe = _pipelined_ms(step_front, sync_front, reps)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        step_front()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    kernel_ms = statistics.median(times)
    return dict(jax_ms=jax_ms, front_ms=front_ms, overhead_ms=jax_ms - front_ms,
                ratio=jax_ms / front_ms, jax_pipelined_ms=jax_pipe,
                front_pipelined_ms=front_pipe, pipelined_ratio=jax_pipe / front_pipe,
                kernel_ms=kernel_ms, shape=(B, L, H, D), dtype=jnp.dtype(dtype).name,
                outputs_jax=out_jax, outputs_front=out_front)


def test_benchmark_helper_small():
    r = benchmark_fwd_bwd(B=2, L=1024, H=8, D=16, reps=3, warmup=1)
    assert np.isfinite(r["jax_ms"]) and r["jax_ms"] > 0
    for k in ("kernel_ms", "front_ms", "jax_pipelined_ms", "front_pipelined_ms"):
        assert np.isfinite(r[k]) and r[k] > 0, k
    # both paths run the same kernels on the same inputs (up to summation order in da)
    for x, y in zip(r["outputs_jax"], r["outputs_front"]):
        x, y = np.asarray(x, np.float32), np.asarray(y.get(), np.float32)
        np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-2 * float(np.abs(y).max()))


if __name__ == "__main__":
    for size in [(16, 2048), (4, 8192), (1, 32768)]:
        r = benchmark_fwd_bwd(*size)
        print(f"B x L = {size[0]} x {size[1]}: one call (synchronised) jax {r['jax_ms']:.3f} ms, "
              f"front {r['front_ms']:.3f} ms (x{r['ratio']:.2f}); back-to-back jax "
              f"{r['jax_pipelined_ms']:.3f} ms, front {r['front_pipelined_ms']:.3f} ms "
              f"(x{r['pipelined_ratio']:.2f}); front kernels (CUDA events) {r['kernel_ms']:.3f} ms")
