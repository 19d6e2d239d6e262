"""The PyTorch adapter on the CPU: numbers against swr_array.reference (float64), autograd,
torch.compile, autocast, the Phalanx module (state, spear weights) and argument errors."""

from __future__ import annotations

import importlib.util
import io
import math
import pathlib
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import swr_array.adapters.torch as T  # noqa: E402
from swr_array.adapters.torch import Phalanx, swr, swr_init_state, swr_step  # noqa: E402

from swr_array import reference  # noqa: E402

F64 = torch.float64
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def gen(request):
    """A torch generator seeded from the test's name."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ----------------------------------------------------------------------------------------------
# helpers: inputs and the reference in the test's own layout handling
# ----------------------------------------------------------------------------------------------


def make_inputs(gen, *, layout="BLHD", per_head=True, B=2, H=3, D=4, N=37, dtype=F64, x0=False):
    """a in (-1.1, 1.1) (negative, and above 1 in magnitude too), u ~ N(0, 1)."""
    shape_u = (B, N, H, D) if layout == "BLHD" else (B, H, D, N)
    if per_head:
        shape_a = (B, N, H) if layout == "BLHD" else (B, H, N)
    else:
        shape_a = shape_u
    a = (2.2 * torch.rand(shape_a, generator=gen, dtype=F64) - 1.1).to(dtype)
    u = torch.randn(shape_u, generator=gen, dtype=F64).to(dtype)
    x0v = torch.randn((B, H, D), generator=gen, dtype=F64).to(dtype) if x0 else None
    return a, u, x0v


def time_last(t, layout, per_head=False):
    """(B,N,H[,D]) / (B,H[,D],N) torch -> NumPy float64 (B, H, D|1, N)."""
    x = t.detach().to(F64).numpy()
    if layout == "BHDL":
        return x[:, :, None, :] if per_head else x
    return x.transpose(0, 2, 1)[:, :, None, :] if per_head else x.transpose(0, 2, 3, 1)


def from_time_last(x, layout, per_head=False):
    if per_head:
        x = x[:, :, 0, :]
        return x if layout == "BHDL" else x.transpose(0, 2, 1)
    return x if layout == "BHDL" else x.transpose(0, 3, 1, 2)


def ref_forward(a, u, x0, *, layout, per_head, block_len, hops):
    x0n = None if x0 is None else x0.detach().to(F64).numpy()
    y = reference.swr(
        time_last(a, layout, per_head),
        time_last(u, layout),
        block_len=block_len,
        hops=hops,
        x0=x0n,
    )
    return from_time_last(y, layout)


def ref_vjp(a, u, dy, x0, *, layout, per_head, block_len, hops):
    x0n = None if x0 is None else x0.detach().to(F64).numpy()
    da, du, dx0 = reference.swr_vjp(
        time_last(a, layout, per_head),
        time_last(u, layout),
        time_last(dy, layout),
        block_len=block_len,
        hops=hops,
        x0=x0n,
    )
    if per_head:
        da = da.sum(axis=2, keepdims=True)
    return from_time_last(da, layout, per_head), from_time_last(du, layout), dx0


def assert_close(t, ref, rtol=1e-12, atol=1e-12):
    np.testing.assert_allclose(t.detach().to(F64).numpy(), ref, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# swr: forward and gradients against the reference
# ----------------------------------------------------------------------------------------------

HOPS = [0, 1, 2, None]


@pytest.mark.parametrize("x0", [False, True], ids=["no_x0", "x0"])
@pytest.mark.parametrize("hops", HOPS)
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_forward_and_grads_match_reference(gen, layout, per_head, hops, x0):
    a, u, x0v = make_inputs(gen, layout=layout, per_head=per_head, x0=x0)
    leaves = [t.requires_grad_() for t in (a, u, x0v) if t is not None]
    y = swr(a, u, block_len=8, hops=hops, layout=layout, x0=x0v)
    assert y.shape == u.shape and y.dtype == F64
    kw = dict(layout=layout, per_head=per_head, block_len=8, hops=hops)
    assert_close(y, ref_forward(a, u, x0v, **kw))

    dy = torch.randn(u.shape, generator=gen, dtype=F64)
    grads = torch.autograd.grad(y, leaves, dy)
    da, du, dx0 = ref_vjp(a, u, dy, x0v, **kw)
    assert_close(grads[0], da)
    assert_close(grads[1], du)
    if x0:
        assert_close(grads[2], dx0)


@pytest.mark.parametrize("N", [0, 1, 15, 16, 17, 70])
def test_any_length(gen, N):
    a, u, x0 = make_inputs(gen, N=N, x0=True)
    leaves = [t.requires_grad_() for t in (a, u, x0)]
    y = swr(a, u, block_len=16, hops=2, x0=x0)
    assert y.shape == u.shape
    kw = dict(layout="BLHD", per_head=True, block_len=16, hops=2)
    if N:
        assert_close(y, ref_forward(a, u, x0, **kw))
    grads = torch.autograd.grad(y.sum(), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    if N == 0:
        assert all(float(g.abs().sum()) == 0.0 for g in grads)
    else:
        da, du, dx0 = ref_vjp(a, u, torch.ones_like(u), x0, **kw)
        for g, r in zip(grads, (da, du, dx0)):
            assert_close(g, r)


def test_hops_beyond_blocks_is_the_exact_recurrence(gen):
    a, u, x0 = make_inputs(gen, N=40, x0=True)
    y = swr(a, u, block_len=8, hops=5, x0=x0)
    seq = reference.sequential(time_last(a, "BLHD", True), time_last(u, "BLHD"), x0=x0.numpy())
    assert_close(y, from_time_last(seq, "BLHD"))


@pytest.mark.parametrize("hops", HOPS)
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_gradcheck_float64(gen, layout, per_head, hops):
    a, u, x0 = make_inputs(gen, layout=layout, per_head=per_head, B=1, H=2, D=2, N=11, x0=True)
    inputs = tuple(t.requires_grad_() for t in (a, u, x0))
    assert torch.autograd.gradcheck(
        lambda a, u, x0: swr(a, u, block_len=4, hops=hops, layout=layout, x0=x0), inputs
    )


@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)],
    ids=["float32", "float16", "bfloat16"],
)
def test_low_precision_dtypes(gen, dtype, tol):
    a, u, _ = make_inputs(gen, dtype=dtype)
    a.requires_grad_()
    u.requires_grad_()
    y = swr(a, u, block_len=8)
    assert y.dtype == dtype
    kw = dict(layout="BLHD", per_head=True, block_len=8, hops=1)
    ref = ref_forward(a, u, None, **kw)  # the reference on the rounded inputs
    assert_close(y, ref, rtol=tol, atol=tol * np.abs(ref).max())
    y32 = swr(a, u, block_len=8, out_dtype=torch.float32)
    assert y32.dtype == torch.float32
    assert_close(y32, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    da, du = torch.autograd.grad(y32, (a, u), torch.ones_like(y32))
    assert da.dtype == dtype and du.dtype == dtype
    rda, rdu, _ = ref_vjp(a, u, torch.ones_like(u, dtype=F64), None, **kw)
    assert_close(du, rdu, rtol=tol, atol=tol * np.abs(rdu).max())
    assert_close(da, rda, rtol=tol, atol=tol * np.abs(rda).max())


def test_opcheck_custom_ops(gen):
    a, u, x0 = make_inputs(gen, N=13, x0=True)
    for t in (a, u, x0):
        t.requires_grad_()
    op = torch.ops.swr_array
    checks = [
        torch.library.opcheck(op.swr.default, (a, u, x0, 4, 2, "BLHD", None)),
        torch.library.opcheck(op.swr.default, (a, u, None, 4, None, "BLHD", torch.float32)),
        torch.library.opcheck(
            op.swr_vjp.default, (a.detach(), u.detach(), torch.randn_like(u), None, 4, 1, "BLHD")
        ),
    ]
    for result in checks:
        assert set(result.values()) == {"SUCCESS"}, result


def test_meta_tensors_infer_shapes():
    a = torch.empty(2, 9, 3, device="meta", dtype=torch.bfloat16)
    u = torch.empty(2, 9, 3, 4, device="meta", dtype=torch.bfloat16)
    y = swr(a, u, out_dtype=torch.float32)
    assert y.device.type == "meta" and y.shape == u.shape and y.dtype == torch.float32
    layer = Phalanx(32, head_dim=8, device="meta")
    out = layer(torch.empty(2, 9, 32, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 9, 32)


# ----------------------------------------------------------------------------------------------
# swr: state (chunked prefill and decoding)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", HOPS)
@pytest.mark.parametrize("split", [0, 5, 8, 13, 37])
def test_state_continuation_and_steps(gen, hops, split):
    a, u, x0 = make_inputs(gen, per_head=False, x0=True)
    full = swr(a, u, block_len=8, hops=hops, x0=x0)
    y1, state = swr(a[:, :split], u[:, :split], block_len=8, hops=hops, x0=x0, return_state=True)
    y2 = swr(a[:, split:], u[:, split:], block_len=8, hops=hops, state=state)
    assert_close(torch.cat([y1, y2], dim=1), full.numpy(), rtol=1e-12, atol=1e-12)

    state = swr_init_state((2, 3, 4), block_len=8, hops=hops, x0=x0)
    steps = []
    for t in range(u.shape[1]):
        y_t, state = swr_step(a[:, t], u[:, t], state)
        steps.append(y_t)
    assert_close(torch.stack(steps, dim=1), full.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_step_low_precision_per_head(gen, dtype):
    a, u, _ = make_inputs(gen, dtype=dtype, N=20)
    full = swr(a, u, block_len=4, hops=1)
    state = swr_init_state((2, 3, 4), block_len=4, hops=1)
    outs = []
    for t in range(20):
        y_t, state = swr_step(a[:, t], u[:, t], state)
        assert y_t.dtype == dtype
        outs.append(y_t)
    np.testing.assert_array_equal(torch.stack(outs, 1).float().numpy(), full.float().numpy())


def test_state_calls_refuse_gradients(gen):
    a, u, _ = make_inputs(gen)
    a.requires_grad_()
    with pytest.raises(RuntimeError, match="no_grad"):
        swr(a, u, return_state=True)
    state = swr_init_state((2, 3, 4))
    with pytest.raises(RuntimeError, match="no_grad"):
        swr_step(a[:, 0], u[:, 0], state)
    with torch.no_grad():
        y, state = swr(a, u, return_state=True)
    assert state.position.tolist() == [u.shape[1]] * u.shape[0]


# ----------------------------------------------------------------------------------------------
# torch.compile and autocast
# ----------------------------------------------------------------------------------------------


def test_compile_fullgraph_swr_forward_backward(gen):
    def loss_fn(a, u, x0):
        return (swr(a, u, block_len=4, hops=2, x0=x0) * 1.5).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for N in (13, 21):  # two lengths through one dynamic graph
        a, u, x0 = make_inputs(gen, per_head=False, N=N, x0=True)
        leaves = [t.requires_grad_() for t in (a, u, x0)]
        got = compiled(*leaves)
        g_got = torch.autograd.grad(got, leaves)
        want = loss_fn(*leaves)
        g_want = torch.autograd.grad(want, leaves)
        assert_close(got, want.detach().numpy())
        for g, w in zip(g_got, g_want):
            assert_close(g, w.numpy())


def test_compile_fullgraph_phalanx_forward_backward(gen):
    torch.manual_seed(0)
    layer = Phalanx(32, head_dim=8, kv_heads=2, block_len=4, dtype=F64)
    x = torch.randn(2, 19, 32, generator=gen, dtype=F64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    g_got = torch.autograd.grad(got.square().sum(), [x, *layer.parameters()])
    want = layer(x)
    g_want = torch.autograd.grad(want.square().sum(), [x, *layer.parameters()])
    assert_close(got, want.detach().numpy())
    for g, w in zip(g_got, g_want):
        assert_close(g, w.numpy())


@pytest.mark.slow
def test_compile_inductor_hybrid_model():
    """The default backend (Inductor, C++ codegen): slow on small CPUs, hence marked."""
    mod = _load_example()
    torch.manual_seed(0)
    model = mod.HybridLM(
        vocab_size=32, dim=16, depth=2, attn_every=2, head_dim=4, kv_heads=2, block_len=4
    )
    tokens = torch.randint(32, (2, 24))
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(tokens)
    got.float().logsumexp(-1).sum().backward()
    g_got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(tokens)
    want.float().logsumexp(-1).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, p in zip(g_got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-5)


def test_autocast_bf16_swr(gen):
    a, u, x0 = make_inputs(gen, dtype=torch.float32, x0=True)
    leaves = [t.requires_grad_() for t in (a, u, x0)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = swr(a, u, block_len=8, x0=x0)
        y32 = swr(a, u, block_len=8, x0=x0, out_dtype=torch.float32)
    # inputs run in the autocast dtype; y in it unless out_dtype says otherwise
    assert y.dtype == torch.bfloat16 and y32.dtype == torch.float32
    want = swr(a.bfloat16(), u.bfloat16(), block_len=8, x0=x0)
    np.testing.assert_array_equal(y.float().detach().numpy(), want.float().detach().numpy())
    grads = torch.autograd.grad(y32, leaves, torch.ones_like(y32))
    assert [g.dtype for g in grads] == [torch.float32] * 3  # back through the cast
    ab, ub = a.detach().bfloat16(), u.detach().bfloat16()
    kw = dict(layout="BLHD", per_head=True, block_len=8, hops=1)
    da, du, dx0 = ref_vjp(ab, ub, torch.ones_like(u, dtype=F64), x0, **kw)
    for g, r in zip(grads, (da, du, dx0)):
        assert_close(g, r, rtol=2e-2, atol=2e-2 * np.abs(r).max())


def test_autocast_bf16_phalanx(gen):
    torch.manual_seed(0)
    layer = Phalanx(32, head_dim=8, block_len=4)
    x = torch.randn(2, 24, 32, generator=gen, requires_grad=True)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    scale = float(want.detach().abs().max())
    torch.testing.assert_close(out.float(), want, rtol=5e-2, atol=5e-2 * scale)
    out.float().sum().backward()
    assert layer.in_proj_weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.in_proj_weight.grad).all() and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------
# argument errors
# ----------------------------------------------------------------------------------------------


def _err_cases():
    g = torch.Generator().manual_seed(0)
    a, u, x0 = make_inputs(g, x0=True)
    meta_a = torch.empty(a.shape, dtype=a.dtype, device="meta")
    return [
        ("a_not_tensor", lambda: swr(a.numpy(), u), TypeError, "a must be a torch.Tensor"),
        ("dtype_mix", lambda: swr(a.float(), u), TypeError, "share one dtype"),
        ("int_dtype", lambda: swr(a.int(), u.int()), TypeError, "u has dtype torch.int32"),
        ("u_rank", lambda: swr(a, u[..., 0]), ValueError, "u must be 4-D"),
        ("a_shape", lambda: swr(a[:, :-1], u), ValueError, "a must have shape"),
        ("x0_shape", lambda: swr(a, u, x0=x0[:, :1]), ValueError, "x0 must have shape"),
        ("x0_dtype", lambda: swr(a, u, x0=x0.int()), TypeError, "x0 has dtype"),
        ("device_a", lambda: swr(meta_a, u), ValueError, "a is on meta but u is on cpu"),
        ("device_x0", lambda: swr(a, u, x0=x0.to("meta")), ValueError, "x0 is on meta"),
        ("block_len", lambda: swr(a, u, block_len=3), ValueError, "block_len"),
        ("block_len_type", lambda: swr(a, u, block_len=4.0), TypeError, "block_len"),
        ("hops", lambda: swr(a, u, hops=-1), ValueError, "hops"),
        ("layout", lambda: swr(a, u, layout="BLDH"), ValueError, "layout"),
        ("out_dtype", lambda: swr(a, u, out_dtype=torch.int32), TypeError, "out_dtype"),
        ("out_dtype_np", lambda: swr(a, u, out_dtype=np.float32), TypeError, "out_dtype"),
        ("return_state", lambda: swr(a, u, return_state=1), TypeError, "return_state"),
        (
            "x0_and_state",
            lambda: swr(a, u, x0=x0, state=swr_init_state((2, 3, 4))),
            ValueError,
            "either x0 or state",
        ),
        ("state_type", lambda: swr_step(a[:, 0], u[:, 0], None), TypeError, "SWRState"),
        (
            "step_shape",
            lambda: swr_step(a[:, 0], u[:, 0, :2], swr_init_state((2, 3, 4))),
            ValueError,
            "u_t must have shape",
        ),
        (
            "state_config",
            lambda: swr(a, u, block_len=8, state=swr_init_state((2, 3, 4), block_len=16)),
            ValueError,
            "state was made with",
        ),
    ]


@pytest.mark.parametrize(
    "name, call, exc, match", _err_cases(), ids=lambda c: c if isinstance(c, str) else ""
)
def test_errors(name, call, exc, match):
    with torch.no_grad(), pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dim=30), ValueError, "divisible by head_dim"),
        (dict(dim=32, heads=3), ValueError, "divisible by heads"),
        (dict(dim=32, heads=4, head_dim=4), ValueError, "must equal dim"),
        (dict(dim=32, kv_heads=3), ValueError, "divisible by kv_heads"),
        (dict(dim=32, block_size=8, block_len=16), ValueError, "same setting"),
        (dict(dim=32, block_len=12), ValueError, "block_len"),
        (dict(dim=32, hops=-2), ValueError, "hops"),
        (dict(dim=32, decay_max=0.0), ValueError, "decay_max"),
        (dict(dim=32, decay_max="1"), TypeError, "decay_max"),
        (dict(dim=0), ValueError, "dim"),
        (dict(dim=32, length=0), ValueError, "length"),
    ],
)
def test_phalanx_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Phalanx(**kwargs)


def test_phalanx_input_errors():
    layer = Phalanx(32, head_dim=8)
    with pytest.raises(ValueError, match=r"\(B, L, dim\) with dim=32"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"\(B, L, dim\)"):
        layer(torch.randn(5, 32))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        layer(torch.randn(2, 5, 32, dtype=F64))
    with pytest.raises(ValueError, match="x is on meta"):
        layer(torch.empty(2, 5, 32, device="meta"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer(np.zeros((2, 5, 32), np.float32))
    with torch.no_grad(), pytest.raises(ValueError, match=r"x_t must have shape \(B, dim\)"):
        layer.step(torch.randn(2, 3, 32), layer.init_state(2))


# ----------------------------------------------------------------------------------------------
# Phalanx: numbers, state, serialisation
# ----------------------------------------------------------------------------------------------


def phalanx_numpy(x, layer, *, block_len, hops):
    """docs/spec.md#phalanx in NumPy float64 from the module's documented parameter layout."""
    c = layer.config
    W = layer.in_proj_weight.detach().to(F64).numpy()
    bias = layer.in_proj_bias.detach().to(F64).numpy()
    W_out = layer.out_proj_weight.detach().to(F64).numpy()
    x = x.detach().to(F64).numpy()
    B, L, _ = x.shape
    H, D, KV = c.heads, c.head_dim, c.kv_heads
    nv, nk = H * D, KV * D
    z = x @ W.T
    z[..., nv:] += bias
    V = z[..., :nv].reshape(B, L, H, D)
    sig = 1.0 / (1.0 + np.exp(-z[..., nv : nv + nk]))
    Bg = np.repeat(sig.reshape(B, L, KV, D), H // KV, axis=2)
    C = np.repeat(z[..., nv + nk : nv + 2 * nk].reshape(B, L, KV, D), H // KV, axis=2)
    A = c.decay_max / (1.0 + np.exp(-z[..., nv + 2 * nk :]))
    y = reference.swr(
        A.transpose(0, 2, 1)[:, :, None, :],
        (Bg * V).transpose(0, 2, 3, 1),
        block_len=block_len,
        hops=hops,
    ).transpose(0, 3, 1, 2)
    return (y * C + V).reshape(B, L, H * D) @ W_out.T


@pytest.mark.parametrize("hops", [0, 1, None])
@pytest.mark.parametrize("kv_heads, decay_max", [(4, 1.0), (2, 0.9), (1, 1.0)])
def test_phalanx_matches_composition(gen, kv_heads, decay_max, hops):
    torch.manual_seed(1)
    layer = Phalanx(
        32, head_dim=8, kv_heads=kv_heads, decay_max=decay_max, block_len=4, hops=hops, dtype=F64
    )
    x = torch.randn(2, 23, 32, generator=gen, dtype=F64)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == F64
    assert_close(out, phalanx_numpy(x, layer, block_len=4, hops=hops))


def test_phalanx_matches_front_reference(gen):
    """Against the front's float64 Phalanx reference where it exists, through front_params()."""
    if not hasattr(reference, "phalanx_reference"):
        pytest.skip("swr_array.reference has no phalanx_reference")
    torch.manual_seed(2)
    layer = Phalanx(24, head_dim=4, kv_heads=3, decay_max=0.8, block_len=4, dtype=F64)
    x = torch.randn(2, 19, 24, generator=gen, dtype=F64, requires_grad=True)
    out = layer(x)
    params = layer.front_params()
    assert_close(out, reference.phalanx_reference(x.detach().numpy(), params, block_len=4))
    dout = torch.randn(out.shape, generator=gen, dtype=F64)
    out.backward(dout)
    dx, dp = reference.phalanx_vjp_reference(x.detach().numpy(), params, dout.numpy(), block_len=4)
    assert_close(x.grad, dx)
    assert_close(layer.in_proj_weight.grad, dp["W_in"].T)
    assert_close(layer.in_proj_bias.grad, np.concatenate([dp["b_b"], dp["b_c"], dp["b_a"]]))
    assert_close(layer.out_proj_weight.grad, dp["W_out"].T)


def test_phalanx_gradcheck(gen):
    torch.manual_seed(3)
    layer = Phalanx(4, head_dim=2, kv_heads=1, decay_max=0.9, block_len=2, dtype=F64)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(2, 9, 4, generator=gen, dtype=F64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("hops", HOPS)
@pytest.mark.parametrize("prefill", [0, 3, 8, 11])
def test_phalanx_prefill_then_steps(gen, hops, prefill):
    torch.manual_seed(4)
    layer = Phalanx(16, head_dim=4, kv_heads=2, block_len=4, hops=hops, dtype=F64)
    x = torch.randn(2, 21, 16, generator=gen, dtype=F64)
    with torch.no_grad():
        full = layer(x)
        if prefill:
            first, state = layer(x[:, :prefill], return_state=True)
        else:
            first, state = x.new_empty(2, 0, 16), layer.init_state(2)
        outs = [first]
        for t in range(prefill, x.shape[1]):
            out_t, state = layer.step(x[:, t], state)
            outs.append(out_t[:, None])
    assert_close(torch.cat(outs, dim=1), full.numpy())


def test_phalanx_chunked_prefill_and_b1d_steps(gen):
    torch.manual_seed(5)
    layer = Phalanx(16, head_dim=4, block_len=4, hops=2, dtype=F64)
    x = torch.randn(3, 30, 16, generator=gen, dtype=F64)
    with torch.no_grad():
        full = layer(x)
        state, outs = None, []
        for lo, hi in [(0, 5), (5, 12), (12, 13), (13, 27)]:
            out, state = layer(x[:, lo:hi], state=state, return_state=True)
            outs.append(out)
        for t in range(27, 30):
            out, state = layer.step(x[:, t : t + 1], state)  # (B, 1, dim) in and out
            assert out.shape == (3, 1, 16)
            outs.append(out)
    assert_close(torch.cat(outs, dim=1), full.numpy())


def test_phalanx_stateful_forward_refuses_gradients(gen):
    layer = Phalanx(16, head_dim=4)
    with pytest.raises(RuntimeError, match="no_grad"):
        layer(torch.randn(1, 4, 16), return_state=True)


def test_phalanx_state_dict_round_trip(gen):
    torch.manual_seed(6)
    layer = Phalanx(32, head_dim=8, kv_heads=2, block_len=8, hops=2, decay_max=0.95)
    assert set(layer.state_dict()) == {"in_proj_weight", "in_proj_bias", "out_proj_weight"}
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(7)
    fresh = Phalanx(32, head_dim=8, kv_heads=2, block_len=8, hops=2, decay_max=0.95)
    x = torch.randn(2, 20, 32, generator=gen)
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_phalanx_spear_style_constructor():
    layer = Phalanx(dim=64, length=100, dtype=F64, block_size=8, kv_heads=2)
    assert (layer.heads, layer.head_dim, layer.kv_heads) == (4, 16, 2)
    assert (layer.block_len, layer.hops, layer.decay_max) == (8, 1, 1.0)
    assert layer.in_proj_weight.dtype == F64
    assert layer.in_proj_weight.shape == (4 * 16 + 2 * 2 * 16 + 4, 64)
    assert layer.fast_path_status == "no CUDA device" or torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------
# spear's Phalanx: weights load, outputs agree with a reimplementation of its forward
# ----------------------------------------------------------------------------------------------


def swr_hops1_loop(A, X, block_len):
    """spear's block two-pass (k=2) as a plain sequential loop, spear layout: A (B, H, L),
    X (B, H, D, L). In each block the local solve w restarts at 0; the output adds the attenuated
    carrier, the previous block's final w: y_t = w_t + (a_start ... a_t) v_prev."""
    B, H, D, L = X.shape
    w = X.new_zeros(B, H, D)
    g = X.new_ones(B, H, 1)
    carrier = X.new_zeros(B, H, D)
    ys = []
    for t in range(L):
        if t % block_len == 0:
            carrier, w, g = w, X.new_zeros(B, H, D), X.new_ones(B, H, 1)
        a = A[..., t][..., None]
        w = a * w + X[..., t]
        g = a * g
        ys.append(w + g * carrier)
    return torch.stack(ys, dim=-1)


class SpearPhalanxRef(torch.nn.Module):
    """spear's Phalanx forward (SigmoidA under ``param``, KVRepeat, block two-pass with k=2,
    proj_out), from its code's semantics, in the parameters' dtype (spear itself casts the
    activations to bfloat16)."""

    def __init__(self, dim, heads, kv_heads, block_size=16, dtype=F64):
        super().__init__()
        self.heads, self.head_dim, self.kv_heads, self.block_size = heads, 16, kv_heads, block_size
        lin = dict(dtype=dtype)
        self.param = torch.nn.Module()
        self.param.proj_a = torch.nn.Linear(dim, heads, bias=True, **lin)
        self.param.proj_b = torch.nn.Linear(dim, kv_heads * 16, bias=True, **lin)
        self.param.proj_c = torch.nn.Linear(dim, kv_heads * 16, bias=True, **lin)
        self.param.proj_v = torch.nn.Linear(dim, heads * 16, bias=False, **lin)
        self.proj_out = torch.nn.Linear(dim, dim, bias=False, **lin)
        self.register_buffer(
            "kv_indices", torch.arange(heads) // (heads // kv_heads), persistent=False
        )

    def forward(self, x):
        B, L, _ = x.shape
        H, DH, KV = self.heads, self.head_dim, self.kv_heads
        p = self.param
        A = torch.sigmoid(p.proj_a(x).transpose(1, 2))  # (B, H, L)
        b = p.proj_b(x).transpose(1, 2).reshape(B, KV, DH, L).index_select(1, self.kv_indices)
        C = p.proj_c(x).transpose(1, 2).reshape(B, KV, DH, L).index_select(1, self.kv_indices)
        V = p.proj_v(x).transpose(1, 2).reshape(B, H, DH, L)
        y = swr_hops1_loop(A, torch.sigmoid(b) * V, self.block_size) * C + V
        return self.proj_out(y.permute(0, 3, 1, 2).reshape(B, L, H * DH))


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("L", [48, 37])
def test_spear_weights_give_spear_outputs(gen, kv_heads, L):
    torch.manual_seed(8)
    spear = SpearPhalanxRef(dim=32, heads=2, kv_heads=kv_heads)
    sd = spear.state_dict()
    assert set(sd) == {
        "param.proj_a.weight",
        "param.proj_a.bias",
        "param.proj_b.weight",
        "param.proj_b.bias",
        "param.proj_c.weight",
        "param.proj_c.bias",
        "param.proj_v.weight",
        "proj_out.weight",
    }
    layer = Phalanx.from_spear_state_dict(sd)
    assert (layer.dim, layer.heads, layer.head_dim, layer.kv_heads) == (32, 2, 16, kv_heads)
    assert (layer.hops, layer.block_len) == (1, 16) and layer.in_proj_weight.dtype == F64
    x = torch.randn(2, L, 32, generator=gen, dtype=F64, requires_grad=True)
    want = spear(x)
    got = layer(x)
    assert_close(got, want.detach().numpy())
    (gx_want,) = torch.autograd.grad(want.sum(), x)
    (gx_got,) = torch.autograd.grad(got.sum(), x)
    assert_close(gx_got, gx_want.numpy())

    # and back: our weights under spear's keys load into spear's module unchanged
    back = SpearPhalanxRef(dim=32, heads=2, kv_heads=kv_heads)
    back.load_state_dict(layer.spear_state_dict(), strict=True)
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_spear_state_dict_prefix_and_errors():
    torch.manual_seed(9)
    spear = SpearPhalanxRef(dim=32, heads=2, kv_heads=1)
    sd = {f"blocks.3.mixer.{k}": v for k, v in spear.state_dict().items()}
    layer = Phalanx.from_spear_state_dict(sd, prefix="blocks.3.mixer.", dtype=torch.float32)
    assert layer.in_proj_weight.dtype == torch.float32
    # keys without spear's "param." level load too
    flat = {k.replace("param.", ""): v for k, v in spear.state_dict().items()}
    layer.load_spear_state_dict(flat)
    with pytest.raises(KeyError, match="lacks"):
        Phalanx.from_spear_state_dict({k: v for k, v in flat.items() if "proj_c.bias" not in k})
    with pytest.raises(KeyError, match="unexpected keys"):
        layer.load_spear_state_dict({**flat, "proj_v.bias": torch.zeros(32)})
    with pytest.raises(ValueError, match="proj_b.weight has shape"):
        Phalanx(32, kv_heads=2).load_spear_state_dict(flat)


# ----------------------------------------------------------------------------------------------
# the fused custom ops, through the front's NumPy reference on the CPU
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Phalanx.forward takes the fused custom ops on the CPU too, and counts the front's calls."""
    monkeypatch.setattr(T, "_FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    calls = {"phalanx": 0, "phalanx_vjp": 0}
    for name in calls:
        real = getattr(T._front_phalanx, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(T._front_phalanx, name, counted)
    return calls


def test_fused_ops_equal_the_composition(gen, fused_on_cpu):
    torch.manual_seed(11)
    kw = dict(head_dim=4, kv_heads=3, decay_max=0.8, block_len=4, hops=1, dtype=F64)
    fused = Phalanx(24, **kw)
    plain = Phalanx(24, fast_path=False, **kw)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 19, 24, generator=gen, dtype=F64, requires_grad=True)
    dout = torch.randn(2, 19, 24, generator=gen, dtype=F64)
    got = fused(x)
    g_got = torch.autograd.grad(got, [x, *fused.parameters()], dout)
    assert fused_on_cpu == {"phalanx": 1, "phalanx_vjp": 1}
    want = plain(x)
    g_want = torch.autograd.grad(want, [x, *plain.parameters()], dout)
    assert_close(got, want.detach().numpy())
    for g, w in zip(g_got, g_want):
        assert g.shape == w.shape
        assert_close(g, w.numpy())
    with torch.no_grad():  # stateful calls take the composition
        out, _ = fused(x, return_state=True)
    assert fused_on_cpu["phalanx"] == 1
    assert_close(out, want.detach().numpy())


def test_fused_ops_compile_fullgraph_inductor(gen, fused_on_cpu):
    """torch.compile's default mode (inductor), fullgraph, over the fused ops: forward+backward."""
    torch.manual_seed(12)
    layer = Phalanx(16, head_dim=4, kv_heads=2, decay_max=0.9, block_len=4, dtype=F64)
    x = torch.randn(2, 9, 16, generator=gen, dtype=F64, requires_grad=True)
    want = layer(x)
    g_want = torch.autograd.grad(want.square().sum(), [x, *layer.parameters()])
    n = dict(fused_on_cpu)
    got = torch.compile(layer, fullgraph=True)(x)
    g_got = torch.autograd.grad(got.square().sum(), [x, *layer.parameters()])
    assert fused_on_cpu["phalanx"] > n["phalanx"] and fused_on_cpu["phalanx_vjp"] > n["phalanx_vjp"]
    assert_close(got, want.detach().numpy())
    for g, w in zip(g_got, g_want):
        assert_close(g, w.numpy())


def _opcheck_cases(gen):
    a, u, x0 = make_inputs(gen, B=1, H=2, D=2, N=5, x0=True)
    dy = torch.randn(u.shape, generator=gen, dtype=F64)
    x = torch.randn(1, 5, 8, generator=gen, dtype=F64)
    w_in = 0.3 * torch.randn(4 + 4 + 4 + 2, 8, generator=gen, dtype=F64)
    b_in = 0.3 * torch.randn(4 + 4 + 2, generator=gen, dtype=F64)
    w_out = 0.3 * torch.randn(8, 4, generator=gen, dtype=F64)
    cfg = (2, 2, 2, 0.9, 2, 1)  # heads, head_dim, kv_heads, decay_max, block_len, hops
    z = x @ w_in.T
    return [  # swr and swr_vjp without x0: test_opcheck_custom_ops
        (T._swr_vjp_op, (a, u, dy, x0, 2, 1, "BLHD")),
        (T._phalanx_op, (x, w_in, b_in, w_out, *cfg)),
        (T._phalanx_vjp_op, (x, w_in, b_in, w_out, torch.randn_like(x), z, *cfg)),
    ]


def test_fused_custom_ops_opcheck(gen):
    """Each custom op's schema, fake implementation (shapes, dtypes, strides, no aliasing of its
    inputs) and autograd registration agree with what it computes (torch.library.opcheck)."""
    for op, args in _opcheck_cases(gen):
        if op is T._phalanx_op:
            torch.library.opcheck(op, args)
        else:  # the backward ops have no gradient of their own
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# the decoding state: in place, per-row positions, rows reset/loaded, compiled steps
# ----------------------------------------------------------------------------------------------


def test_steps_keep_the_state_storage_and_equal_the_forward(gen):
    a, u, _ = make_inputs(gen, B=3, N=21)
    want = swr(a, u, block_len=4, layout="BLHD")
    with torch.no_grad():
        state = swr_init_state((3, 3, 4), block_len=4)
        ptrs = [t.data_ptr() for t in state.tensors()]
        out = torch.empty(3, 3, 4, dtype=F64)
        for t in range(9):
            y, same = swr_step(a[:, t], u[:, t], state, out=out)
            assert same is state and y is out
            np.testing.assert_array_equal(y.numpy(), want[:, t].numpy())
        # a chunked prefill continues the same object in place
        y2, same = swr(a[:, 9:], u[:, 9:], block_len=4, layout="BLHD", state=state,
                       return_state=True)  # fmt: skip
    assert same is state and ptrs == [t.data_ptr() for t in state.tensors()]
    assert state.position.tolist() == [21] * 3
    assert_close(y2, want[:, 9:].numpy(), rtol=1e-13, atol=1e-13)


def test_rows_at_different_positions_reset_and_load(gen):
    torch.manual_seed(3)
    layer = Phalanx(16, head_dim=4, kv_heads=2, block_len=4, dtype=F64)
    x = torch.randn(3, 13, 16, generator=gen, dtype=F64)
    with torch.no_grad():
        full = layer(x)
        state = layer.init_state(3)
        for t in range(6):
            layer.step(x[:, t], state)
        state.reset_rows(1)  # row 1 restarts its sequence; rows 0 and 2 go on at position 6
        for t in range(7):
            out, _ = layer.step(torch.stack([x[0, 6 + t], x[1, t], x[2, 6 + t]]), state)
            assert_close(out[0], full[0, 6 + t].numpy(), rtol=1e-12, atol=1e-12)
            assert_close(out[1], full[1, t].numpy(), rtol=1e-12, atol=1e-12)
        assert state.position.tolist() == [13, 7, 13]
        # a new prompt's prefill state loaded into row 2 (continuous batching)
        _, prefill = layer(x[2:, :5], return_state=True)
        state.load_rows([2], prefill)
        out, _ = layer.step(torch.stack([x[0, 0], x[1, 7], x[2, 5]]), state)
        assert_close(out[1:], torch.stack([full[1, 7], full[2, 5]]).numpy(), rtol=1e-12,
                     atol=1e-12)  # fmt: skip
        with pytest.raises(ValueError, match="made by the layer"):
            Phalanx(16, head_dim=4, kv_heads=4, block_len=4, dtype=F64).step(x[:, 0], state)
        with pytest.raises(ValueError, match="needs \\(B, H, D\\)"):
            layer.step(x[:2, 0], state)
        before = [t.clone() for t in state.tensors()]
        with pytest.raises(TypeError):
            layer.step(x[:, 0].float(), state)
        # out is checked before the state advances
        with pytest.raises(ValueError, match="out must have shape"):
            layer.step(x[:, 0], state, out=torch.empty(3, 15, dtype=F64))
        with pytest.raises(TypeError, match="out must have dtype"):
            layer.step(x[:, 0], state, out=torch.empty(3, 16))
        assert all(torch.equal(b, t) for b, t in zip(before, state.tensors()))


def test_compile_fullgraph_inductor_steps(gen):
    """torch.compile (default mode, fullgraph) of swr_step and Phalanx.step: the custom step
    op mutates the state's tensors; the steps equal the full forward."""
    torch.manual_seed(4)
    layer = Phalanx(16, head_dim=4, block_len=4)
    x = torch.randn(2, 6, 16, generator=gen)
    a, u, _ = make_inputs(gen, B=2, H=2, D=3, N=6, dtype=torch.float32)
    with torch.no_grad():
        full = layer(x)
        state = layer.init_state(2)
        step = torch.compile(layer.step, fullgraph=True)
        for t in range(6):
            out, same = step(x[:, t], state)
            assert same is state
            torch.testing.assert_close(out, full[:, t], rtol=1e-5, atol=1e-5)
        want = swr(a, u, block_len=4, layout="BLHD")
        st = swr_init_state((2, 2, 3), block_len=4)
        f = torch.compile(lambda a_t, u_t, s: swr_step(a_t, u_t, s)[0], fullgraph=True)
        for t in range(6):
            torch.testing.assert_close(f(a[:, t], u[:, t], st), want[:, t], rtol=0, atol=0)
    assert state.position.tolist() == [6, 6] and st.position.tolist() == [6, 6]


# ----------------------------------------------------------------------------------------------
# the example model
# ----------------------------------------------------------------------------------------------


def _load_example():
    path = ROOT / "examples" / "torch_hybrid.py"
    spec = importlib.util.spec_from_file_location("torch_hybrid_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_hybrid_model_trains():
    losses = _load_example().train(3, length=32)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
