"""Graph-ready decoding on a real GPU (CuPy): in-place steps at mixed per-row positions, and
steps captured with CuPy's stream capture and replayed, against the float64 reference.
Skipped without a CUDA GPU. Outputs are poisoned with NaN before the kernels write them."""

from __future__ import annotations

import numpy as np
import pytest

import swr_array as sa
from swr_array import reference as R


def _gpu():
    try:
        import cupy

        return cupy.cuda.is_available()
    except Exception:  # noqa: BLE001 - no CuPy or no driver: no GPU
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU + CuPy")]


def mixed_state(a, u, prompts, block_len, hops, like):
    """A GPU state whose row b consumed the first prompts[b] tokens (BHDL float32 inputs)."""
    B, H, D, _ = u.shape
    state = sa.swr_init_state((B, H, D), block_len=block_len, hops=hops, like=like)
    for b, p in enumerate(prompts):
        _, s = sa.swr(a[b:b + 1, ..., :p], u[b:b + 1, ..., :p], return_state=True,
                      layout="BHDL", block_len=block_len, hops=hops)
        state.load_rows([b], s)
    return state


@pytest.mark.parametrize("hops", [0, 1, 2, None])
@pytest.mark.parametrize("per_head", [True, False])
def test_captured_swr_steps_replay_the_forward(rng, hops, per_head):
    import cupy as cp

    B, H, D, n, block_len = 4, 8, 16, 40, 16
    prompts = [0, 7, 16, 23]
    a = rng.uniform(0.5, 1.0, (B, H, n) if per_head else (B, H, D, n)).astype(np.float32)
    u = rng.standard_normal((B, H, D, n)).astype(np.float32)
    full = R.swr(a[:, :, None] if per_head else a, u, block_len=block_len, hops=hops)
    ga, gu = cp.asarray(a), cp.asarray(u)
    state = mixed_state(ga, gu, prompts, block_len, hops, gu)
    rows = np.arange(B)
    a_buf = cp.empty((B, H) if per_head else (B, H, D), np.float32)
    u_buf = cp.empty((B, H, D), np.float32)
    y = cp.full((B, H, D), np.nan, np.float32)

    def token(t):
        idx = np.array(prompts) + t
        a_buf[...] = ga[rows, :, idx] if per_head else ga[rows, :, :, idx]
        u_buf[...] = gu[rows, :, :, idx]
        return full[rows, :, :, idx]

    want = token(0)
    sa.swr_step(a_buf, u_buf, state, layout="BHDL", out=y)  # eager: prepares the launch
    np.testing.assert_allclose(y.get(), want, rtol=2e-5, atol=2e-5)
    stream = cp.cuda.Stream(non_blocking=True)
    ids = [x.data.ptr for x in state.arrays()]
    with stream:
        stream.begin_capture()
        sa.swr_step(a_buf, u_buf, state, layout="BHDL", out=y)
        graph = stream.end_capture()
    np.testing.assert_array_equal(state.position.get(), np.array(prompts) + 1)  # not run yet
    for t in range(1, 12):
        want = token(t)
        y[...] = np.nan
        cp.cuda.get_current_stream().synchronize()
        graph.launch(stream)
        stream.synchronize()
        np.testing.assert_allclose(y.get(), want, rtol=2e-5, atol=2e-5)
    assert [x.data.ptr for x in state.arrays()] == ids
    np.testing.assert_array_equal(state.position.get(), np.array(prompts) + 12)


@pytest.mark.parametrize("hops", [1, 0, None])
def test_captured_phalanx_steps_replay_the_forward(hops):
    """The fused middle of the step (phalanx_step_mix) captured with CuPy's stream capture and
    replayed between the two GEMMs. (CuPy refuses cuBLAS calls during stream capture, so the
    CuPy GEMMs stay outside the graph; the torch adapter captures the whole step.)"""
    import cupy as cp

    dim, B, L, prompt, block_len = 64, 3, 30, 9, 8
    params = sa.init_phalanx(dim, head_dim=16, dtype=np.float32, seed=3)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, L, dim)).astype(np.float32)
    full = R.phalanx_reference(x, params, block_len=block_len, hops=hops)
    gp = {k: (cp.asarray(v) if k != "decay_max" else v) for k, v in params.items()}
    _, state = sa.phalanx(cp.asarray(x[:, :prompt]), gp, block_len=block_len, hops=hops,
                          return_state=True)
    H = params["b_a"].shape[0]
    z = cp.empty((B, params["W_in"].shape[1]), np.float32)
    y = cp.full((B, H * 16), np.nan, np.float32)

    def mix():
        sa.phalanx_step_mix(z, y, gp["b_a"], gp["b_b"], gp["b_c"], state, kv_heads=H,
                            decay_max=float(params["decay_max"]))

    cp.matmul(cp.asarray(x[:, prompt]), gp["W_in"], out=z)
    mix()  # eager: prepares the launch
    np.testing.assert_allclose((y @ gp["W_out"]).get(), full[:, prompt], rtol=1e-4, atol=1e-4)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        mix()
        graph = stream.end_capture()
    for t in range(prompt + 1, L):
        cp.matmul(cp.asarray(x[:, t]), gp["W_in"], out=z)
        y[...] = np.nan
        cp.cuda.get_current_stream().synchronize()
        graph.launch(stream)
        stream.synchronize()
        np.testing.assert_allclose((y @ gp["W_out"]).get(), full[:, t], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(state.position.get(), [L] * B)


def test_refused_gpu_step_leaves_the_state_unchanged():
    import cupy as cp

    s = sa.swr_init_state((2, 2, 4), block_len=8, hops=1, like=cp.zeros(1))
    a, u = cp.ones((2, 2), np.float32), cp.ones((2, 2, 4), np.float32)
    sa.swr_step(a, u, s, layout="BLHD")
    before = [x.get() for x in s.arrays()]
    for bad in (dict(a_t=a[:1], u_t=u[:1]), dict(a_t=a.astype(np.float16), u_t=u),
                dict(a_t=np.ones((2, 2), np.float32), u_t=u)):
        with pytest.raises((ValueError, TypeError)):
            sa.swr_step(bad["a_t"], bad["u_t"], s, layout="BLHD")
    with pytest.raises(ValueError):
        sa.swr_step(a, u, s, layout="BLHD", out=cp.empty((2, 2, 5), np.float32))
    for new, old in zip(s.arrays(), before):
        np.testing.assert_array_equal(new.get(), old)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_launches_take_torch_tensors(dtype):
    """swr_step_into and phalanx_step_mix on torch CUDA tensors (data_ptr, torch dtypes, torch's
    stream) give the CuPy path's numbers."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import cupy as cp

    tdt = getattr(torch, dtype)
    B, H, D = 3, 4, 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.rand((B, H), device="cuda", generator=gen).to(tdt)
    u = torch.randn((B, H, D), device="cuda", generator=gen).to(tdt)
    s_t = sa.swr_init_state((B, H, D), block_len=4, hops=1, like=cp.zeros(1))
    s_c = sa.swr_init_state((B, H, D), block_len=4, hops=1, like=cp.zeros(1))
    stream = torch.cuda.current_stream().cuda_stream
    for _ in range(6):
        y = torch.full((B, H, D), float("nan"), device="cuda", dtype=tdt)
        sa.swr_step_into(a, u, y, s_t, stream=stream)
        torch.cuda.synchronize()
        want, _ = sa.swr_step(cp.from_dlpack(a.float()), cp.from_dlpack(u.float()), s_c,
                              layout="BLHD")
        np.testing.assert_allclose(y.float().cpu().numpy(), want.get(), rtol=2e-2, atol=2e-2)
    # the fused Phalanx middle
    KV, W = 2, H * D + 2 * 2 * D + H
    z = torch.randn((B, W), device="cuda", generator=gen).to(tdt)
    b_a, b_b, b_c = (torch.randn(n, device="cuda", generator=gen).to(tdt)
                     for n in (H, KV * D, KV * D))
    st = sa.swr_init_state((B, H, D), block_len=4, hops=1, like=cp.zeros(1))
    y = torch.full((B, H * D), float("nan"), device="cuda", dtype=tdt)
    sa.phalanx_step_mix(z, y, b_a, b_b, b_c, st, kv_heads=KV, decay_max=0.9, stream=stream)
    torch.cuda.synchronize()
    f64 = [t.double().cpu().numpy() for t in (z, b_a, b_b, b_c)]
    want = R.phalanx_mix(f64[0][:, None], *f64[1:], heads=H, head_dim=D, kv_heads=KV,
                         decay_max=0.9, block_len=4, hops=1)
    np.testing.assert_allclose(y.float().cpu().numpy(), want.reshape(B, H * D), rtol=2e-2,
                               atol=2e-2)
    np.testing.assert_array_equal(st.position.get(), [1, 1, 1])


@pytest.mark.parametrize("hops,KV", [(1, 128), (2, 64), (8, 128), (None, 32), (0, 128)])
def test_phalanx_step_mix_at_the_decoding_width(rng, hops, KV):
    """The fused middle at dim 2048 (128 heads of 16): the device plan of several channels per
    thread (hops 0, 1, 2, None; at batch 3 spread over several blocks a row) and of one channel
    per thread (hops=8), rows over several blocks with the arrival counter, at mixed positions,
    against the reference."""
    import cupy as cp
    from swr_array.numba_kernels import swr_step as ks

    B, L, H, D, block_len, dm = 3, 40, 128, 16, 16, 0.97
    prompts = [0, 9, 21]
    mode, K = ks.hops_mode(hops)
    tpb, cpt, nchunks = ks.plan(H * D, K)
    assert (nchunks > 1) == (hops == 8) and (cpt > 1) == (hops in (0, 1, 2, None))
    W = H * D + 2 * KV * D + H
    z = rng.normal(size=(B, L, W)).astype(np.float32)
    z[..., -H:] += 2.0
    b_a, b_b, b_c = (rng.normal(scale=0.5, size=n).astype(np.float32) for n in (H, KV * D, KV * D))
    kw = dict(heads=H, head_dim=D, kv_heads=KV, decay_max=dm, block_len=block_len, hops=hops)
    full = R.phalanx_mix(z.astype(np.float64), b_a, b_b, b_c, **kw).reshape(B, L, H * D)
    _, A, Bg, C, V = R._phalanx_gates(z.astype(np.float64), b_a, b_b, b_c, H, D, KV, dm)
    a_t = cp.asarray(np.ascontiguousarray(A.transpose(0, 2, 1)), np.float32)
    u_t = cp.asarray(np.ascontiguousarray((Bg * V).transpose(0, 2, 3, 1)), np.float32)
    state = mixed_state(a_t, u_t, prompts, block_len, hops, u_t)
    biases = [cp.asarray(b) for b in (b_a, b_b, b_c)]
    rows = np.arange(B)
    for t in range(L - max(prompts)):
        idx = np.array(prompts) + t
        y = cp.full((B, H * D), np.nan, np.float32)
        sa.phalanx_step_mix(cp.asarray(np.ascontiguousarray(z[rows, idx])), y, *biases, state,
                            kv_heads=KV, decay_max=dm)
        want = full[rows, idx]
        np.testing.assert_allclose(y.get(), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    np.testing.assert_array_equal(state.position.get(), np.array(prompts) + L - max(prompts))
    np.testing.assert_array_equal(state._arrivals().get(), 0)


def test_torch_eager_steps_reuse_their_plan_and_refuse_first():
    """torch swr_step and Phalanx.step on CUDA (the plan kept on the state, relaunched with data
    pointers) equal the CPU composition step after step, and a refused step leaves the state
    as it was."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    from swr_array.adapters import torch as st

    gen = torch.Generator().manual_seed(0)
    B, H, D = 3, 128, 16
    s_gpu = st.swr_init_state((B, H, D), block_len=4, hops=2, device="cuda")
    s_cpu = st.swr_init_state((B, H, D), block_len=4, hops=2)
    out = torch.full((B, H, D), float("nan"), device="cuda")
    for _ in range(9):
        a = torch.rand((B, H), generator=gen)
        u = torch.randn((B, H, D), generator=gen)
        y, same = st.swr_step(a.cuda(), u.cuda(), s_gpu, out=out)
        want, _ = st.swr_step(a.double(), u.double(), s_cpu)
        assert same is s_gpu and y is out
        np.testing.assert_allclose(y.cpu().numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    before = [t.clone() for t in s_gpu.tensors()]
    a, u = torch.rand((B, H), device="cuda"), torch.randn((B, H, D), device="cuda")
    for bad in (lambda: st.swr_step(a[:2], u[:2], s_gpu),
                lambda: st.swr_step(a, u, s_gpu, out=torch.empty((B, H, D), device="cuda",
                                                                 dtype=torch.float16)),
                lambda: st.swr_step(a, u, s_gpu, out=torch.empty((B, D, H), device="cuda").mT),
                lambda: st.swr_step(a.half(), u, s_gpu)):
        with pytest.raises((ValueError, TypeError)):
            bad()
    for new, old in zip(s_gpu.tensors(), before):
        assert torch.equal(new, old)
    torch.manual_seed(0)
    layer = st.Phalanx(256, head_dim=16, hops=1, block_len=4).cuda()
    ref = st.Phalanx(256, head_dim=16, hops=1, block_len=4, fast_path=False).cuda()
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        s1, s2 = layer.init_state(B), ref.init_state(B)
        for _ in range(9):
            x = torch.randn((B, 256), device="cuda")
            o1, _ = layer.step(x, s1)
            o2, _ = ref.step(x, s2)
            torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-4)
        before = [t.clone() for t in s1.tensors()]
        with pytest.raises(ValueError):
            layer.step(torch.randn((B + 1, 256), device="cuda"), s1)
        for new, old in zip(s1.tensors(), before):
            assert torch.equal(new, old)


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


@pytest.mark.parametrize("hops", [0, 1, 2, None])
@pytest.mark.parametrize("per_head", [True, False])
def test_torch_eager_steps_equal_the_reference(rng, hops, per_head):
    """The torch adapter's eager CUDA swr_step (its prepared launch on the front state, one per
    dtype combination) over non-contiguous token slices, bfloat16 in, bfloat16 and float32 out,
    equals the float64 forward at every token across block boundaries."""
    torch = _torch_cuda()
    from swr_array.adapters.torch import swr_init_state, swr_step

    B, N, H, D, block_len = 3, 11, 2, 8, 4
    a = rng.uniform(0.5, 1.0, (B, N, H) if per_head else (B, N, H, D))
    u = rng.standard_normal((B, N, H, D))
    a_t = torch.tensor(a, device="cuda").to(torch.bfloat16)
    u_t = torch.tensor(u, device="cuda").to(torch.bfloat16)
    a64, u64 = (x.double().cpu().numpy() for x in (a_t, u_t))
    want = sa.swr(a64, u64, block_len=block_len, hops=hops, layout="BLHD")
    state = swr_init_state((B, H, D), block_len=block_len, hops=hops, device="cuda")
    with torch.no_grad():
        for t in range(N):
            assert not a_t[:, t].is_contiguous()
            out_dtype = torch.float32 if t % 2 else None
            y = torch.full((B, H, D), float("nan"), device="cuda",
                           dtype=out_dtype or torch.bfloat16)
            got, same = swr_step(a_t[:, t], u_t[:, t], state, out_dtype=out_dtype, out=y)
            assert got is y and same is state
            np.testing.assert_allclose(y.float().cpu().numpy(), want[:, t], rtol=2e-2,
                                       atol=2e-2)
    np.testing.assert_array_equal(state.position.cpu().numpy(), [N] * B)


def test_refused_torch_steps_leave_the_state_unchanged():
    """Every refused torch step (swr_step and Phalanx.step on CUDA, ``out`` of Phalanx.step
    included) raises before its launch: the state's tensors keep their values."""
    torch = _torch_cuda()
    from swr_array.adapters.torch import Phalanx, swr_init_state, swr_step

    B, H, D = 2, 2, 4
    s = swr_init_state((B, H, D), block_len=4, hops=1, device="cuda")
    a, u = torch.rand(B, H, device="cuda"), torch.randn(B, H, D, device="cuda")
    with torch.no_grad():
        swr_step(a, u, s)  # prepares the launch
        before = [t.clone() for t in s.tensors()]
        bad = [
            dict(a_t=a[:1], u_t=u[:1]),  # another batch than the state's
            dict(a_t=a, u_t=u[:, :1]),  # other heads
            dict(a_t=a[..., None], u_t=u),  # a_t neither (B, H) nor (B, H, D)
            dict(a_t=a.half(), u_t=u),  # mixed dtypes
            dict(a_t=a.double(), u_t=u.double()),  # float64 on CUDA
            dict(a_t=a.cpu(), u_t=u),  # another device
            dict(a_t=a, u_t=u, out=torch.empty(B, H, D + 1, device="cuda")),
            dict(a_t=a, u_t=u, out=torch.empty(B, H, D, device="cuda").half()),
            dict(a_t=a, u_t=u, out=torch.empty(B, H, 2 * D, device="cuda")[..., ::2]),
            dict(a_t=a, u_t=u, out_dtype=torch.float16,
                 out=torch.empty(B, H, D, device="cuda")),
            dict(a_t=a, u_t=u, state=swr_init_state((B, H, D), block_len=4, hops=1)),
        ]
        for kw in bad:
            kw.setdefault("state", s)
            with pytest.raises((ValueError, TypeError)):
                swr_step(**kw)
        for new, old in zip(s.tensors(), before):
            torch.testing.assert_close(new, old, rtol=0, atol=0)
        layer = Phalanx(32, head_dim=4, device="cuda")
        other = Phalanx(32, head_dim=4, kv_heads=2, device="cuda")
        ps = layer.init_state(B)
        x = torch.randn(B, 32, device="cuda")
        layer.step(x, ps)  # prepares the launch
        before = [t.clone() for t in ps.tensors()]
        for call in (lambda: layer.step(x[:1], ps),  # another batch
                     lambda: other.step(x, ps),  # another layer's state
                     lambda: layer.step(x.half(), ps),  # another dtype
                     lambda: layer.step(x, ps, out=torch.empty(B, 31, device="cuda")),
                     lambda: layer.step(x, ps, out=torch.empty(B, 32, device="cuda").half()),
                     lambda: layer.step(x, ps, out=torch.empty(B, 32)),  # on the CPU
                     lambda: layer.step(x, s)):  # a state of other heads
            with pytest.raises((ValueError, TypeError, RuntimeError)):
                call()
        for new, old in zip(ps.tensors(), before):
            torch.testing.assert_close(new, old, rtol=0, atol=0)
