"""Malformed inputs get a ValueError/TypeError naming the argument; edge cases that are valid
(empty inputs, hops beyond the blocks) give the exact result; the GPU capability check."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import swr_array as sa
from swr_array import _checks
from swr_array import reference as R
from swr_array.cli import sequential_swr
from swr_array.ops import to_time_last


def blhd(rng, B=2, L=40, H=3, D=4, per_head=True):
    u = rng.standard_normal((B, L, H, D))
    a = rng.uniform(-1.1, 1.1, (B, L, H) if per_head else (B, L, H, D))
    return a, u


# ---- None for an array argument --------------------------------------------------------------


def test_none_arrays_are_named(rng):
    a, u = blhd(rng)
    _, st = sa.swr(a, u, layout="BLHD", return_state=True)
    cases = [
        (lambda: sa.swr(None, u, layout="BLHD"), "a must be a NumPy or CuPy array, got None"),
        (lambda: sa.swr(a, None, layout="BLHD"), "u must be a NumPy or CuPy array, got None"),
        (lambda: sa.swr_vjp(None, u, u, layout="BLHD"), "a must be a NumPy or CuPy array"),
        (lambda: sa.swr_vjp(a, None, u, layout="BLHD"), "u must be a NumPy or CuPy array"),
        (lambda: sa.swr_vjp(a, u, None, layout="BLHD"), "dy must be a NumPy or CuPy array"),
        (lambda: sa.swr_step(None, u[:, 0], st), "a_t must be a NumPy or CuPy array"),
        (lambda: sa.swr_step(a[:, 0], None, st), "u_t must be a NumPy or CuPy array"),
        (lambda: sa.swr_step(a[:, 0], u[:, 0], None), "state must be an SWRState"),
    ]
    for call, msg in cases:
        with pytest.raises(TypeError, match=msg):
            call()


# ---- the default layout and the wrong-layout trap --------------------------------------------


def test_default_layout_is_blhd(rng):
    a, u = blhd(rng)
    want = R.swr(to_time_last(a, "BLHD", True), to_time_last(u, "BLHD", False), block_len=16,
                 hops=1)
    got = to_time_last(sa.swr(a, u), "BLHD", False)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    da, du, _ = sa.swr_vjp(a, u, np.ones_like(u))
    eda, edu, _ = sa.swr_vjp(a, u, np.ones_like(u), layout="BLHD")
    np.testing.assert_array_equal(da, eda)
    np.testing.assert_array_equal(du, edu)


@pytest.mark.parametrize("given", ["BHDL", "BLHD"])
def test_arrays_of_the_other_layout_name_layout(rng, given):
    a, u = blhd(rng, H=3, D=4)  # per head, H != D: the shapes fit only BLHD
    if given == "BLHD":  # BHDL arrays passed as BLHD
        a, u = to_time_last(a, "BLHD", True)[:, :, 0], to_time_last(u, "BLHD", False)
    other = "BLHD" if given == "BHDL" else "BHDL"
    with pytest.raises(ValueError, match=f"fit layout '{other}', not layout='{given}'"):
        sa.swr(a, u, layout=given)
    with pytest.raises(ValueError, match="layout="):
        sa.swr_vjp(a, u, u, layout=given)
    torch = pytest.importorskip("torch")
    from swr_array.adapters import torch as st

    with pytest.raises(ValueError, match=f"fit layout '{other}', not layout='{given}'"):
        st.swr(torch.from_numpy(a), torch.from_numpy(u), layout=given)
    jnp = pytest.importorskip("jax.numpy")
    from swr_array.adapters import jax as sj

    with pytest.raises(ValueError, match=f"fit layout '{other}', not layout='{given}'"):
        sj.swr(jnp.asarray(a, jnp.float32), jnp.asarray(u, jnp.float32), layout=given)


# ---- hops at or beyond the number of blocks: the exact path ----------------------------------


def test_hops_beyond_the_blocks_is_the_exact_path_without_per_hop_memory(rng):
    a, u = blhd(rng, L=40)  # 3 blocks of 16
    a = np.abs(a) / 10 + 0.9  # x0 must still matter after 32 tokens: hops=2 differs from exact
    x0 = rng.standard_normal((2, 3, 4))
    exact = sa.swr(a, u, layout="BLHD", hops=None, x0=x0)
    tracemalloc.start()
    try:
        huge = sa.swr(a, u, layout="BLHD", hops=10**9, x0=x0)
        grads = sa.swr_vjp(a, u, u, layout="BLHD", hops=10**9, x0=x0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # one carrier per hop would be ~10**9 * 24 channels
    np.testing.assert_array_equal(huge, exact)
    for g, e in zip(grads, sa.swr_vjp(a, u, u, layout="BLHD", hops=None, x0=x0)):
        np.testing.assert_array_equal(g, e)
    # exactly the number of blocks is exact too, one fewer is not (x0 reaches only hops blocks)
    np.testing.assert_allclose(sa.swr(a, u, layout="BLHD", hops=3, x0=x0), exact, atol=1e-12)
    assert not np.allclose(sa.swr(a, u, layout="BLHD", hops=2, x0=x0), exact, atol=1e-12)


# ---- empty inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5, 2, 3), (2, 0, 2, 3), (2, 5, 0, 3), (2, 5, 2, 0)])
def test_empty_inputs(shape):
    u = np.zeros(shape)
    x0 = np.ones((shape[0], shape[2], shape[3]))
    for a in (np.ones(shape), np.ones(shape[:3])):
        y = sa.swr(a, u, layout="BLHD", x0=x0)
        assert y.shape == u.shape
        da, du, dx0 = sa.swr_vjp(a, u, u, layout="BLHD", x0=x0)
        assert (da.shape, du.shape, dx0.shape) == (a.shape, u.shape, x0.shape)
        if shape[1] == 0:  # no tokens: x0 reaches nothing, its gradient is 0
            np.testing.assert_array_equal(dx0, 0.0)
        if shape[3] == 0:  # no channels per head: a per-head da sums nothing
            np.testing.assert_array_equal(da, 0.0)
            out = (np.full(a.shape, np.nan), np.full(u.shape, np.nan), np.full(x0.shape, np.nan))
            got = sa.swr_vjp(a, u, u, layout="BLHD", x0=x0, out=out)
            assert all(g is o for g, o in zip(got, out))
            np.testing.assert_array_equal(out[0], 0.0)


def test_torch_phalanx_on_empty_inputs():
    torch = pytest.importorskip("torch")
    from swr_array.adapters.torch import Phalanx

    layer = Phalanx(32, heads=2)
    for shape in [(0, 5, 32), (2, 0, 32), (0, 0, 32)]:
        x = torch.randn(*shape, requires_grad=True)
        out = layer(x)
        assert out.shape == shape
        out.sum().backward()
        assert x.grad.shape == shape
        with torch.no_grad():
            out, state = layer(x.detach(), return_state=True)
        assert out.shape == shape and state.position.tolist() == [shape[1]] * shape[0]


def test_torch_state_dict_holds_only_the_weights():
    """docs/guide_torch.md and docs/api.md say so: hops, block_len, decay_max are not saved."""
    pytest.importorskip("torch")
    from swr_array.adapters.torch import Phalanx

    sd = Phalanx(32, heads=2, hops=3, block_len=8, decay_max=0.5).state_dict()
    assert set(sd) == {"in_proj_weight", "in_proj_bias", "out_proj_weight"}


def test_torch_phalanx_dtype_must_be_float():
    torch = pytest.importorskip("torch")
    from swr_array.adapters.torch import Phalanx

    with pytest.raises(TypeError, match="dtype must be a floating-point torch dtype"):
        Phalanx(64, dtype=torch.int32)


# ---- decay_max: one check everywhere ---------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -0.5, float("inf"), float("nan")])
def test_decay_max_is_checked_the_same_way_everywhere(bad):
    msg = r"decay_max'?\]? must be finite and > 0"
    with pytest.raises(ValueError, match=msg):
        sa.init_phalanx(16, head_dim=8, decay_max=bad)
    params = sa.init_phalanx(16, head_dim=8)
    params["decay_max"] = np.asarray(bad)
    with pytest.raises(ValueError, match=r"params\['decay_max'\] must be finite and > 0"):
        sa.phalanx(np.zeros((1, 4, 16), np.float32), params)
    torch = pytest.importorskip("torch")
    from swr_array.adapters.torch import Phalanx

    with pytest.raises(ValueError, match=msg):
        Phalanx(16, heads=2, decay_max=bad)
    del torch
    jax = pytest.importorskip("jax")
    from swr_array.adapters import jax as sj

    with pytest.raises(ValueError, match=msg):
        sj.init_phalanx(jax.random.PRNGKey(0), 16, head_dim=8, decay_max=bad)
    pytest.importorskip("flax")
    from flax import nnx

    with pytest.raises(ValueError, match=msg):
        sj.Phalanx(16, head_dim=8, decay_max=bad, rngs=nnx.Rngs(0))


# ---- the GPU capability check ------------------------------------------------------------------


class _FakeCupyArray:
    """Enough of a CuPy array for the argument checks (which run before any launch)."""

    __module__ = "cupy._core.core"

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.ndim, self.dtype = tuple(shape), len(shape), np.dtype(dtype)

        class _Dev:
            id = 0

        self.device = _Dev()


@pytest.mark.parametrize("cc,ok", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_unsupported_gpu_is_refused_before_a_launch(monkeypatch, cc, ok):
    monkeypatch.setattr(_checks, "_device_capability", lambda device_id: cc)
    a, u = _FakeCupyArray((2, 8, 3)), _FakeCupyArray((2, 8, 3, 4))
    if ok:
        p = _checks.check_swr(a, u, block_len=16, hops=1, layout="BLHD")
        assert p.backend == "cupy" and p.device == 0
        return
    with pytest.raises(RuntimeError, match=r"compute capability 7\.5 \(sm_75\).*sm_80 or later"):
        _checks.check_swr(a, u, block_len=16, hops=1, layout="BLHD")
    with pytest.raises(RuntimeError, match="sm_80 or later"):
        sa.swr(a, u, layout="BLHD")  # the front raises before it imports CuPy or the kernels


# ---- the demo's independent check ------------------------------------------------------------


@pytest.mark.parametrize("hops", [0, 1, 2, None])
def test_sequential_swr_matches_the_reference(rng, hops):
    a = rng.uniform(-1.2, 1.2, (2, 3, 1, 45))
    u = rng.standard_normal((2, 3, 4, 45))
    np.testing.assert_allclose(sequential_swr(a, u, 8, hops), R.swr(a, u, block_len=8, hops=hops),
                               rtol=1e-10, atol=1e-10)


def test_cpu_demo_passes(capsys):
    from swr_array.cli import demo

    assert demo(force_cpu=True) == 0
    assert "all checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("major,minor,supported", [(7, 5, False), (8, 0, True), (9, 0, True)])
def test_info_reports_the_gpu_capability(monkeypatch, capsys, major, minor, supported):
    import sys
    import types

    from swr_array import cli

    props = {"name": b"Some GPU", "major": major, "minor": minor}
    runtime = types.SimpleNamespace(getDeviceProperties=lambda i: props)
    fake_cuda = types.SimpleNamespace(is_available=lambda: True, runtime=runtime,
                                      Device=lambda: types.SimpleNamespace(id=0))
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=fake_cuda))
    ok, reason, desc = cli.gpu_status()
    assert desc == f"Some GPU (compute capability {major}.{minor})"
    if not supported:
        assert not ok and "is not supported" in reason and "8.0 (sm_80" in reason
    assert cli.info() == 0
    out = capsys.readouterr().out
    verdict = "supported" if supported else "NOT supported"
    assert f"GPU: Some GPU (compute capability {major}.{minor}): {verdict} (" in out


@pytest.mark.gpu
def test_the_real_gpu_is_checked_and_reported(rng, capsys):
    """On the GPU machine: the capability the check reads is CuPy's, info reports it, and a
    supported GPU runs swr (output poisoned first) to the reference's numbers."""
    import cupy as cp

    from swr_array import cli

    dev = cp.cuda.Device()
    cc = _checks.device_capability(dev.id)
    assert "{}{}".format(*cc) == dev.compute_capability
    assert _checks.capability_supported(cc)  # the tested hardware is sm_90
    assert cli.info() == 0
    assert f"compute capability {cc[0]}.{cc[1]}): supported" in capsys.readouterr().out
    a, u = blhd(rng, L=40)
    out = cp.full(u.shape, cp.nan, cp.float32)
    got = sa.swr(cp.asarray(a, cp.float32), cp.asarray(u, cp.float32), layout="BLHD", hops=10**9,
                 out=out)
    want = sa.swr(a.astype(np.float32).astype(np.float64),
                  u.astype(np.float32).astype(np.float64), layout="BLHD", hops=None)
    assert got is out
    np.testing.assert_allclose(out.get(), want, rtol=1e-4, atol=1e-4)


def test_huge_hops_with_a_state_is_refused_before_allocating():
    a, u = np.full((1, 40, 2), 0.5), np.ones((1, 40, 2, 3))
    with pytest.raises(ValueError, match="hops=None"):
        sa.swr(a, u, hops=10**9, layout="BLHD", return_state=True)
    with pytest.raises(ValueError, match="hops=None"):
        sa.swr_init_state((1, 2, 3), hops=10**9)
    params = sa.init_phalanx(32)
    with pytest.raises(ValueError, match="hops=None"):
        sa.phalanx(np.ones((1, 4, 32), np.float32), params, hops=10**9, return_state=True)
    # the same hops without a state is the exact recurrence
    np.testing.assert_array_equal(sa.swr(a, u, hops=10**9, layout="BLHD"),
                                  sa.swr(a, u, hops=None, layout="BLHD"))
