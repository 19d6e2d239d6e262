"""The PyTorch adapter on CUDA: numbers against the float64 reference, torch's streams and devices,
torch.compile, the Phalanx module, and a host-overhead report (no timed assertion).

Run ``pytest -m gpu tests/test_gpu_torch.py -s`` on a GPU machine; ``python
tests/test_gpu_torch.py`` prints the host-overhead table alone.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from swr_array.adapters.torch import Phalanx, swr, swr_init_state, swr_step  # noqa: E402

from swr_array import reference  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with a CUDA GPU"),
]

F64 = torch.float64
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def make_inputs(
    *, layout="BLHD", per_head=True, B=2, H=4, D=16, N=200, dtype, device, x0=False, seed=0
):
    g = torch.Generator().manual_seed(seed)
    shape_u = (B, N, H, D) if layout == "BLHD" else (B, H, D, N)
    shape_a = ((B, N, H) if layout == "BLHD" else (B, H, N)) if per_head else shape_u
    a = (0.4 + 0.6 * torch.rand(shape_a, generator=g, dtype=F64)) * torch.where(
        torch.rand(shape_a, generator=g) < 0.1, -1.0, 1.0
    ).to(F64)
    u = torch.randn(shape_u, generator=g, dtype=F64)
    x0v = torch.randn((B, H, D), generator=g, dtype=F64) if x0 else None
    cast = [t.to(device=device, dtype=dtype) if t is not None else None for t in (a, u, x0v)]
    return cast


def time_last(t, layout, per_head=False):
    x = t.detach().cpu().to(F64).numpy()
    if layout == "BHDL":
        return x[:, :, None, :] if per_head else x
    return x.transpose(0, 2, 1)[:, :, None, :] if per_head else x.transpose(0, 2, 3, 1)


def from_time_last(x, layout, per_head=False):
    if per_head:
        x = x[:, :, 0, :]
        return x if layout == "BHDL" else x.transpose(0, 2, 1)
    return x if layout == "BHDL" else x.transpose(0, 3, 1, 2)


def reference_fwd_vjp(a, u, dy, x0, *, layout, per_head, block_len, hops):
    """The float64 reference on the (rounded) device inputs: y, da, du, dx0."""
    x0n = None if x0 is None else x0.detach().cpu().to(F64).numpy()
    at, ut = time_last(a, layout, per_head), time_last(u, layout)
    y = reference.swr(at, ut, block_len=block_len, hops=hops, x0=x0n)
    da, du, dx0 = reference.swr_vjp(
        at, ut, time_last(dy, layout), block_len=block_len, hops=hops, x0=x0n
    )
    if per_head:
        da = da.sum(axis=2, keepdims=True)
    return (
        from_time_last(y, layout),
        from_time_last(da, layout, per_head),
        from_time_last(du, layout),
        dx0,
    )


def assert_close(t, ref, tol):
    got = t.detach().cpu().to(F64).numpy()
    scale = max(float(np.abs(ref).max()), 1.0)
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale)


# ----------------------------------------------------------------------------------------------
# swr against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", [0, 1, 2, None])
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_forward_and_grads_match_reference(dtype, layout, per_head, hops):
    a, u, x0 = make_inputs(layout=layout, per_head=per_head, dtype=dtype, device="cuda", x0=True)
    leaves = [t.requires_grad_() for t in (a, u, x0)]
    y = swr(a, u, block_len=16, hops=hops, layout=layout, x0=x0)
    assert y.device == u.device and y.dtype == dtype and y.shape == u.shape
    dy = torch.randn(u.shape, dtype=F64, generator=torch.Generator().manual_seed(1)).to(u)
    grads = torch.autograd.grad(y, leaves, dy)
    kw = dict(layout=layout, per_head=per_head, block_len=16, hops=hops)
    ry, rda, rdu, rdx0 = reference_fwd_vjp(a, u, dy, x0, **kw)
    tol = TOL[dtype]
    assert_close(y, ry, tol)
    assert [g.dtype for g in grads] == [dtype] * 3
    # per-head da sums D products: allow the summation's rounding
    assert_close(grads[0], rda, 4 * tol)
    assert_close(grads[1], rdu, tol)
    assert_close(grads[2], rdx0, tol)


@pytest.mark.parametrize("block_len", [8, 32, 64])
def test_cuda_block_lens_and_out_dtype(block_len):
    a, u, _ = make_inputs(dtype=torch.bfloat16, device="cuda", N=333)
    y = swr(a, u, block_len=block_len, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    ry, *_ = reference_fwd_vjp(
        a, u, torch.zeros_like(u), None, layout="BLHD", per_head=True, block_len=block_len, hops=1
    )
    assert_close(y, ry, 2e-5)


def test_cuda_state_prefill_and_steps():
    a, u, _ = make_inputs(dtype=torch.float32, device="cuda", N=45)
    with torch.no_grad():
        full = swr(a, u, block_len=8, hops=2)
        y1, state = swr(a[:, :13], u[:, :13], block_len=8, hops=2, return_state=True)
        outs = [y1]
        for t in range(13, 45):
            y_t, state = swr_step(a[:, t], u[:, t], state)
            outs.append(y_t[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    state = swr_init_state((2, 4, 16), block_len=8, hops=2, device="cuda")
    with torch.no_grad():
        y0, _ = swr_step(a[:, 0], u[:, 0], state)
    torch.testing.assert_close(y0, full[:, 0], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# streams and devices
# ----------------------------------------------------------------------------------------------


def test_runs_on_torch_current_stream_without_sync():
    """Inputs are written on a side stream after a long GPU sleep; swr and its backward run on
    that stream with no synchronisation in between. Had they run on any other stream, they would
    have read the inputs before the copies landed."""
    a_src, u_src, _ = make_inputs(dtype=torch.float32, device="cuda", N=4096, H=8)
    u_src.requires_grad_()
    want = swr(a_src, u_src)
    (want_du,) = torch.autograd.grad(want, u_src, torch.ones_like(want))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        a = torch.zeros_like(a_src)
        u = torch.zeros_like(u_src)
        torch.cuda._sleep(200_000_000)  # GPU time on the side stream before the copies
        a.copy_(a_src)
        u.copy_(u_src.detach())
        u.requires_grad_()
        y = swr(a, u)
        (du,) = torch.autograd.grad(y, u, torch.ones_like(y))
        got, got_du = y.clone(), du.clone()
    side.synchronize()
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    torch.testing.assert_close(got_du, want_du, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_gpu_placement():
    torch.cuda.set_device(0)
    a, u, x0 = make_inputs(dtype=torch.float32, device="cuda:1", x0=True)
    u.requires_grad_()
    y = swr(a, u, x0=x0, hops=2)
    (du,) = torch.autograd.grad(y, u, torch.ones_like(y))
    assert y.device == torch.device("cuda:1") and du.device == torch.device("cuda:1")
    assert torch.cuda.current_device() == 0
    ry, _, rdu, _ = reference_fwd_vjp(
        a, u, torch.ones_like(u), x0, layout="BLHD", per_head=True, block_len=16, hops=2
    )
    assert_close(y, ry, 2e-5)
    assert_close(du, rdu, 2e-5)
    # hops=1 (the front's cached plain launches) with cuda:1 or cuda:0 current, gradients too
    ones = torch.ones_like(u)
    ry1, rda1, rdu1, _ = reference_fwd_vjp(
        a, u, ones, None, layout="BLHD", per_head=True, block_len=16, hops=1
    )
    for current in (1, 1, 0):
        with torch.cuda.device(current):
            ag, ug = a.clone().requires_grad_(), u.detach().clone().requires_grad_()
            y1 = swr(ag, ug)
            da1, du1 = torch.autograd.grad(y1, (ag, ug), ones)
        assert y1.device == da1.device == du1.device == torch.device("cuda:1")
        assert_close(y1, ry1, 2e-5)
        assert_close(da1, rda1, 2e-5)
        assert_close(du1, rdu1, 2e-5)
    layer = Phalanx(64, kv_heads=2, device="cuda:1")
    x = torch.randn(2, 50, 64, device="cuda:1")
    assert layer(x).device == torch.device("cuda:1")
    with pytest.raises(ValueError, match="cuda:0"):
        swr(a.to("cuda:0"), u)


# ----------------------------------------------------------------------------------------------
# Phalanx and torch.compile on CUDA
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast_path", [False, True], ids=["composition", "fast_path"])
def test_phalanx_cuda_matches_cpu_float64(fast_path):
    torch.manual_seed(0)
    cpu = Phalanx(128, kv_heads=2, decay_max=0.95, dtype=F64, fast_path=False)
    gpu = Phalanx(128, kv_heads=2, decay_max=0.95, device="cuda", fast_path=fast_path)
    gpu.load_state_dict(cpu.state_dict())
    print(f"fast path: {gpu.fast_path_status}")
    x = torch.randn(2, 300, 128, dtype=F64, requires_grad=True)
    want = cpu(x)
    dout = torch.randn_like(want)
    g_want = torch.autograd.grad(want, [x, *cpu.parameters()], dout)
    xg = x.detach().float().cuda().requires_grad_()
    got = gpu(xg)
    g_got = torch.autograd.grad(got, [xg, *gpu.parameters()], dout.float().cuda())
    assert_close(got, want.detach().numpy(), 1e-4)
    for g, w in zip(g_got, g_want):
        assert_close(g, w.numpy(), 1e-3)


def test_phalanx_cuda_bf16_autocast_and_steps():
    torch.manual_seed(1)
    layer = Phalanx(64, kv_heads=1, device="cuda")
    x = torch.randn(3, 70, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    want = layer(x)
    torch.testing.assert_close(
        out.float(), want, rtol=5e-2, atol=5e-2 * float(want.detach().abs().max())
    )
    with torch.no_grad():
        first, state = layer(x[:, :21], return_state=True)
        outs = [first]
        for t in range(21, 70):
            o, state = layer.step(x[:, t], state)
            outs.append(o[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), want.detach(), rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_on_cuda():
    torch.manual_seed(2)
    layer = Phalanx(64, kv_heads=2, device="cuda")
    x = torch.randn(2, 96, 64, device="cuda", requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(x)
    g_got = torch.autograd.grad(got.square().sum(), [x, *layer.parameters()])
    want = layer(x)
    g_want = torch.autograd.grad(want.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(g_got, g_want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)

    def loss_fn(a, u):
        return swr(a, u, block_len=32, hops=None).float().square().mean()

    a, u, _ = make_inputs(dtype=torch.bfloat16, device="cuda", N=512)
    u.requires_grad_()
    c_loss = torch.compile(loss_fn, fullgraph=True)(a, u)
    (c_du,) = torch.autograd.grad(c_loss, u)
    e_loss = loss_fn(a, u)
    (e_du,) = torch.autograd.grad(e_loss, u)
    torch.testing.assert_close(c_loss, e_loss)
    torch.testing.assert_close(c_du, e_du)


# ----------------------------------------------------------------------------------------------
# host overhead (reported, not asserted)
# ----------------------------------------------------------------------------------------------


def bench_host_overhead(shape=(1, 64, 4, 16), reps: int = 200, dtype=torch.bfloat16) -> dict:
    """Microseconds per call, back to back, for a problem small enough that the host dominates:
    the torch op (forward; forward+backward), the same front call on CuPy arrays, and a torch
    elementwise op for scale. Wall clock around ``reps`` calls, synchronised at both ends."""
    import cupy

    import swr_array

    B, N, H, D = shape
    a, u, _ = make_inputs(B=B, N=N, H=H, D=D, dtype=dtype, device="cuda")
    ug = u.detach().clone().requires_grad_()
    ac, uc = cupy.from_dlpack(a), cupy.from_dlpack(u)

    def timed(fn):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps * 1e6

    def fwd_bwd():
        torch.autograd.grad(swr(a, ug, layout="BLHD"), ug, u)

    return {
        "torch swr forward": timed(lambda: swr(a, u)),
        "torch swr forward+backward": timed(fwd_bwd),
        "front swr on CuPy (BLHD)": timed(lambda: swr_array.swr(ac, uc, layout="BLHD")),
        "front swr+swr_vjp on CuPy": timed(
            lambda: (
                swr_array.swr(ac, uc, layout="BLHD"),
                swr_array.swr_vjp(ac, uc, uc, layout="BLHD"),
            )
        ),
        "torch elementwise (u * 2)": timed(lambda: u * 2),
    }


def test_host_overhead_report():
    results = bench_host_overhead()
    for name, us in results.items():
        print(f"{name:<30s} {us:9.1f} us/call")
    assert all(np.isfinite(v) and v > 0 for v in results.values())


if __name__ == "__main__":
    for name, us in bench_host_overhead().items():
        print(f"{name:<30s} {us:9.1f} us/call")


# ----------------------------------------------------------------------------------------------
# decoding: in-place state, CUDA graphs, torch.compile "reduce-overhead"
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", [1, 2])
def test_phalanx_step_fused_equals_forward_mixed_positions(hops):
    torch.manual_seed(21)
    layer = Phalanx(128, kv_heads=2, decay_max=0.95, hops=hops, block_len=16, device="cuda")
    x = torch.randn(3, 40, 128, device="cuda")
    with torch.no_grad():
        full = layer(x)
        state = layer.init_state(3)
        for t in range(20):
            layer.step(x[:, t], state)
        state.reset_rows(1)
        for t in range(20):
            out, same = layer.step(torch.stack([x[0, 20 + t], x[1, t], x[2, 20 + t]]), state)
            assert same is state
            want = torch.stack([full[0, 20 + t], full[1, t], full[2, 20 + t]])
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert state.position.tolist() == [40, 20, 40]


def test_cuda_graph_swr_step_and_phalanx_step_replay():
    """torch.cuda.graph captures one swr_step and one Phalanx.step (after a warm-up step); the
    replays advance the same state tensors and equal the full forward at every position."""
    torch.manual_seed(22)
    B, L = 4, 48
    layer = Phalanx(256, kv_heads=4, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(B, L, 256, device="cuda", dtype=torch.bfloat16)
    a, u, _ = make_inputs(B=B, H=8, D=16, N=L, dtype=torch.float32, device="cuda", seed=5)
    with torch.no_grad():
        full = layer(x)
        want_y = swr(a, u)
        state = layer.init_state(B)
        st = swr_init_state((B, 8, 16), device="cuda")
        x_buf = x[:, 0].clone()
        a_buf, u_buf = a[:, 0].clone(), u[:, 0].clone()
        out = torch.full((B, 256), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = torch.full((B, 8, 16), float("nan"), device="cuda")
        layer.step(x_buf, state, out=out)  # warm-up: prepares the launches (position 0)
        swr_step(a_buf, u_buf, st, out=y)
        torch.testing.assert_close(out, full[:, 0], rtol=2e-2, atol=2e-2)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph):
            layer.step(x_buf, state, out=out)
            swr_step(a_buf, u_buf, st, out=y)
        torch.cuda.current_stream().wait_stream(side)
        # capture recorded the step without running it: the state is still at position 1
        assert state.position.tolist() == [1] * B and st.position.tolist() == [1] * B
        for t in range(1, L):
            x_buf.copy_(x[:, t])
            a_buf.copy_(a[:, t])
            u_buf.copy_(u[:, t])
            out.fill_(float("nan"))
            y.fill_(float("nan"))
            graph.replay()
            torch.testing.assert_close(out, full[:, t], rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(y, want_y[:, t], rtol=1e-5, atol=1e-5)
    assert state.position.tolist() == [L] * B and st.position.tolist() == [L] * B


def test_compile_reduce_overhead_forward_backward_and_step():
    """mode="reduce-overhead" (CUDA graphs through torch.compile), fullgraph: swr and Phalanx
    forward+backward, and Phalanx.step, equal the eager calls."""
    torch.manual_seed(23)
    layer = Phalanx(128, kv_heads=2, device="cuda")
    x = torch.randn(2, 64, 128, device="cuda", requires_grad=True)
    want = layer(x)
    g_want = torch.autograd.grad(want.square().sum(), [x, *layer.parameters()])
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, recording, replay
        got = compiled(x)
        g_got = torch.autograd.grad(got.square().sum(), [x, *layer.parameters()])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for g, w in zip(g_got, g_want):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)
    a, u, _ = make_inputs(N=128, dtype=torch.float32, device="cuda", seed=6)
    a.requires_grad_()
    u.requires_grad_()

    def loss(a, u):
        return swr(a, u).square().sum()

    l_want = loss(a, u)
    ga_want, gu_want = torch.autograd.grad(l_want, (a, u))
    c_loss = torch.compile(loss, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        l_got = c_loss(a, u)
        ga, gu = torch.autograd.grad(l_got, (a, u))
        torch.testing.assert_close(l_got, l_want, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(ga, ga_want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gu, gu_want, rtol=1e-5, atol=1e-5)
    xs = torch.randn(2, 8, 128, device="cuda")
    with torch.no_grad():
        full = layer(xs)
        state = layer.init_state(2)
        step = torch.compile(layer.step, mode="reduce-overhead", fullgraph=True)
        for t in range(8):
            out, _ = step(xs[:, t].clone(), state)
            torch.testing.assert_close(out.clone(), full[:, t], rtol=1e-4, atol=1e-4)
    assert state.position.tolist() == [8, 8]
