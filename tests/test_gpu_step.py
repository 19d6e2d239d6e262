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
