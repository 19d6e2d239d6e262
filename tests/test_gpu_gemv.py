"""The torch ``Phalanx.step`` GEMV path (small batch, numba_kernels/phalanx_gemv.py) on a GPU:
equal to the GEMM path (torch's GEMMs around the fused middle kernel) from the same state and to
the full forward at mixed per-row positions, for every storage dtype, grouped kv heads and the
hops modes; captured in a CUDA graph and replayed. Outputs are poisoned with NaN first."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from swr_array.adapters import torch as T  # noqa: E402
from swr_array.adapters.torch import Phalanx  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with a CUDA GPU"),
]

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _ran_gemv(state) -> bool:
    plans = state.front._launch_cache.get("torch-gemv", {})
    return any(entry is not False for entry in plans.values())


@pytest.mark.parametrize("dtype,dim,kv_heads,hops,B", [
    (torch.bfloat16, 256, None, 1, 1),
    (torch.bfloat16, 256, 4, None, 5),
    (torch.float16, 128, 2, 2, 8),
    (torch.float32, 256, None, 0, 3),
    (torch.bfloat16, 2048, None, 1, 8),
])
def test_gemv_step_equals_the_gemm_path_and_the_forward(monkeypatch, dtype, dim, kv_heads, hops,
                                                         B):
    from swr_array.numba_kernels import phalanx_gemv as PG

    monkeypatch.setattr(T, "GEMV_MAX_BATCH", PG.MAX_BATCH)  # batch 5 and 8 too
    torch.manual_seed(7)
    layer = Phalanx(dim, kv_heads=kv_heads, hops=hops, block_len=8, decay_max=0.97,
                    device="cuda", dtype=dtype)
    L = 30
    prompts = [(5 * b) % 17 for b in range(B)]
    x = torch.randn(B, L, dim, device="cuda", dtype=dtype)
    with torch.no_grad():
        full = layer(x).float()
        state = layer.init_state(B)
        for b, p in enumerate(prompts):  # rows at mixed positions: row b prefilled p tokens
            if p:
                state.load_rows([b], layer(x[b:b + 1, :p], return_state=True)[1])
        gemm_state = layer.init_state(B).load_rows(list(range(B)), state)
        idx = torch.tensor(prompts, device="cuda")
        for t in range(8):
            xt = x[torch.arange(B, device="cuda"), idx + t].contiguous()
            out = torch.full((B, dim), float("nan"), device="cuda", dtype=dtype)
            got, same = layer.step(xt, state, out=out)
            assert got is out and same is state
            monkeypatch.setattr(T, "GEMV_MAX_BATCH", 0)
            ref = torch.full((B, dim), float("nan"), device="cuda", dtype=dtype)
            layer.step(xt, gemm_state, out=ref)
            monkeypatch.setattr(T, "GEMV_MAX_BATCH", PG.MAX_BATCH)
            want = full[torch.arange(B, device="cuda"), idx + t]
            scale = max(1.0, float(want.abs().max()))
            assert torch.isfinite(out).all()
            assert float((out.float() - want).abs().max()) <= TOL[dtype] * scale
            assert float((out.float() - ref.float()).abs().max()) <= TOL[dtype] * scale
    # the GEMV path ran (it may refuse only a kernel too large for its block, never at batch 4
    # or less)
    assert (_ran_gemv(state) or B > 4) and not _ran_gemv(gemm_state)
    assert state.position.tolist() == gemm_state.position.tolist() == [p + 8 for p in prompts]
    for a, b in zip(state.tensors()[1:], gemm_state.tensors()[1:]):
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def test_gemv_step_replays_in_a_cuda_graph():
    """The GEMV step (batch 2, bfloat16, dim 2048) captured with torch.cuda.graph after a warm-up
    step: replays advance the state and equal the full forward; a step without ``out``
    allocates its result and gives the same numbers."""
    torch.manual_seed(3)
    B, L, dim = 2, 20, 2048
    layer = Phalanx(dim, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(B, L, dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        full = layer(x).float()
        state = layer.init_state(B)
        x_buf = x[:, 0].clone()
        out = torch.full((B, dim), float("nan"), device="cuda", dtype=torch.bfloat16)
        layer.step(x_buf, state, out=out)
        assert _ran_gemv(state)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph):
            layer.step(x_buf, state, out=out)
        torch.cuda.current_stream().wait_stream(side)
        assert state.position.tolist() == [1] * B
        for t in range(1, L - 1):
            x_buf.copy_(x[:, t])
            out.fill_(float("nan"))
            graph.replay()
            torch.testing.assert_close(out.float(), full[:, t], rtol=3e-2, atol=3e-2)
        res, _ = layer.step(x[:, L - 1], state)
        torch.testing.assert_close(res.float(), full[:, L - 1], rtol=3e-2, atol=3e-2)
    assert state.position.tolist() == [L] * B


def test_gemv_step_falls_back_where_it_does_not_apply():
    """A batch above GEMV_MAX_BATCH, or weights whose rows are not 16-byte multiples, run the
    GEMM path (equal to the forward)."""
    torch.manual_seed(4)
    for dim, B in ((2048, T.GEMV_MAX_BATCH + 1), (36, 2)):
        layer = Phalanx(dim, head_dim=4 if dim == 36 else 16, device="cuda",
                        dtype=torch.bfloat16)
        x = torch.randn(B, 3, dim, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            layer.fast_path = False  # the composition: any shapes
            full = layer(x).float()
            layer.fast_path = True
            state = layer.init_state(B)
            for t in range(3):
                o, _ = layer.step(x[:, t], state)
                torch.testing.assert_close(o.float(), full[:, t], rtol=3e-2, atol=3e-2)
        assert not _ran_gemv(state)
    layer = Phalanx(2048, device="cuda", dtype=torch.bfloat16)  # x_t not 16-byte aligned
    with torch.no_grad():
        x = torch.randn(2 * 2048 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(2, 2048)
        state = layer.init_state(2)
        o, _ = layer.step(x, state)
        torch.testing.assert_close(o.float(), layer(x[:, None]).float()[:, 0], rtol=3e-2,
                                   atol=3e-2)
        assert state.front._launch_cache.get("torch-phalanx")  # the GEMM path ran
