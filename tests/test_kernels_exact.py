"""The one-pass exact scan (numba_kernels/exact_scan.py, hops=None) against the float64
reference: in the CUDA simulator on small tiles (many tiles per chain, so the look-back walks
aggregates and inclusive values), and on the GPU (marked gpu) at the tuned tile shapes, with
poisoned outputs, repeated launches on one workspace and a CUDA-graph replay."""

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import gpu_available

import swr_array as sa
from swr_array.ops import from_time_last

SIM = bool(numba.config.ENABLE_CUDASIM)
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)

needs_backend = pytest.mark.skipif(not (SIM or gpu_available()),
                                   reason="needs the CUDA simulator or a GPU")

SMALL_TILES = {"blhd_cols": 2, "blhd_segs": 4, "blhd_steps": 2, "blhd_bwd_steps": 2,
               "bhdl_rows": 2, "bhdl_segs": 2, "bhdl_nv": 1, "bhdl_bwd_nv": 1}


@pytest.fixture
def ex():
    from swr_array.numba_kernels import exact_scan

    return exact_scan


@pytest.fixture
def small_tiles(ex):
    saved = dict(ex.TUNING)
    for k, v in SMALL_TILES.items():
        ex.TUNING[k] = v
    yield
    for k, v in saved.items():
        ex.TUNING[k] = v


def make_case(rng, layout, per_head, B, H, D, N, dtype):
    """Canonical a, u (dtype), x0 (float32) and the float64 reference y (time-last)."""
    u = rng.standard_normal((B, H, D, N)).astype(dtype)
    a = rng.uniform(-1.05, 1.05, (B, H, 1 if per_head else D, N)).astype(dtype)
    x0 = rng.standard_normal((B, H, D)).astype(np.float32)
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    expect = sa.swr(np.ascontiguousarray(from_time_last(f64(a), "BHDL", per_head)),
                    f64(u), hops=None, layout="BHDL", x0=f64(x0))
    ua = np.ascontiguousarray(from_time_last(u, layout))
    aa = np.ascontiguousarray(from_time_last(a, layout, per_head))
    return aa, ua, x0, expect


def tol(dtype):
    if np.dtype(dtype) == F32:
        return dict(rtol=1e-4, atol=1e-4)
    return dict(rtol=2e-2, atol=2e-2)


def view(x):
    return x.view(np.uint16) if x.dtype == BF16 else x


def time_last(y, layout):
    y = y.astype(np.float64)
    return y if layout == "BHDL" else y.transpose(0, 2, 3, 1)


SIM_CASES = [
    # layout, per_head, B, H, D, N, dtype, out dtype
    ("BLHD", True, 2, 2, 8, 37, BF16, BF16),
    ("BLHD", False, 1, 2, 8, 40, F32, F32),
    ("BLHD", False, 1, 2, 8, 19, BF16, F32),
    ("BLHD", True, 1, 3, 5, 21, F16, F16),  # one channel a thread
    ("BHDL", True, 2, 1, 3, 48, BF16, BF16),
    ("BHDL", False, 1, 2, 2, 44, F32, BF16),
    ("BHDL", False, 1, 1, 3, 37, F16, F32),  # N not a multiple of the vector: one step a lane
    ("BHDL", True, 1, 2, 2, 41, BF16, F16),
]
# Cases whose tiles never flag their inclusive values (TUNING["inclusive_flags"] False), so
# every look-back composes aggregates back to the first tile: in the simulator, thread blocks run
# one after the other and the look-back otherwise always finds its predecessor inclusive.
AGGREGATES = {1, 2, 5, 7}
# Cases looking back a window of tiles at once (TUNING["lookback_window"]), the others one tile
# at a time.
WINDOW = {0, 2, 4, 5}
# Cases that load after drawing the ticket (TUNING["speculate"] False); in the simulator the
# others always guess their ticket right (blocks run in index order).
AFTER_TICKET = {3, 6}


@pytest.mark.skipif(not SIM, reason="simulator cases (the GPU runs its own shapes)")
@pytest.mark.parametrize("i", range(len(SIM_CASES)), ids=[
    f"{c[0]}-{'head' if c[1] else 'chan'}-{c[2]}x{c[5]}x{c[3]}x{c[4]}-{c[6].name}-{c[7].name}"
    f"{'-aggregates' if i in AGGREGATES else ''}{'-window' if i in WINDOW else ''}"
    for i, c in enumerate(SIM_CASES)])
def test_simulated_matches_reference(rng, ex, small_tiles, i):
    layout, per_head, B, H, D, N, dtype, out = SIM_CASES[i]
    ex.TUNING["inclusive_flags"] = i not in AGGREGATES
    ex.TUNING["lookback_window"] = i in WINDOW
    ex.TUNING["speculate"] = i not in AFTER_TICKET
    a, u, x0, expect = make_case(rng, layout, per_head, B, H, D, N, dtype)
    plan = ex.make_plan(layout, u.shape, per_head, ex._KINDS[view(u).dtype],
                        ex._KINDS[view(np.empty(0, out)).dtype])
    assert plan.nchunks >= 3  # the look-back crosses aggregates, not only inclusive values
    y = np.full(u.shape, np.nan, out)
    ex.swr_exact(view(a), view(u), view(y), x0, layout=layout)
    np.testing.assert_allclose(time_last(y, layout), expect, **tol(out))


def make_vjp_case(rng, layout, per_head, B, H, D, N, dtype, with_x0=True):
    """Canonical a, u, dy (dtype), x0 and the float64 reference (da, du, dx0) in the layout."""
    u = rng.standard_normal((B, H, D, N)).astype(dtype)
    a = rng.uniform(-1.05, 1.05, (B, H, 1 if per_head else D, N)).astype(dtype)
    dy = rng.standard_normal((B, H, D, N)).astype(dtype)
    x0 = rng.standard_normal((B, H, D)).astype(np.float32)
    canon = lambda x, ph=False: np.ascontiguousarray(from_time_last(x, layout, ph))  # noqa: E731
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    expect = sa.swr_vjp(canon(f64(a), per_head), canon(f64(u)), canon(f64(dy)), hops=None,
                        layout=layout, x0=f64(x0) if with_x0 else None)
    return canon(a, per_head), canon(u), canon(dy), x0, expect


VJP_SIM_CASES = [
    # layout, per_head, B, H, D, N, dtype, x0
    ("BLHD", True, 2, 2, 8, 37, F32, True),
    ("BLHD", False, 1, 2, 8, 19, BF16, True),
    ("BLHD", True, 1, 2, 8, 40, BF16, False),
    ("BLHD", True, 1, 2, 4, 21, F16, True),  # one channel a thread, heads of 4 in a tile
    ("BHDL", True, 2, 2, 2, 41, F32, True),
    ("BHDL", False, 1, 2, 2, 48, BF16, True),
    ("BHDL", True, 1, 2, 4, 48, BF16, False),
    ("BHDL", False, 1, 1, 3, 37, F16, True),  # one step a lane
]


@pytest.mark.skipif(not SIM, reason="simulator cases (the GPU runs its own shapes)")
@pytest.mark.parametrize("i", range(len(VJP_SIM_CASES)), ids=[
    f"{c[0]}-{'head' if c[1] else 'chan'}-{c[2]}x{c[5]}x{c[3]}x{c[4]}-{c[6].name}-"
    f"{'x0' if c[7] else 'nox0'}{'-aggregates' if i in AGGREGATES else ''}"
    f"{'-window' if i in WINDOW else ''}" for i, c in enumerate(VJP_SIM_CASES)])
def test_simulated_vjp_matches_reference(rng, ex, small_tiles, i):
    layout, per_head, B, H, D, N, dtype, with_x0 = VJP_SIM_CASES[i]
    ex.TUNING["inclusive_flags"] = i not in AGGREGATES
    ex.TUNING["lookback_window"] = i in WINDOW
    ex.TUNING["speculate"] = i not in AFTER_TICKET
    a, u, dy, x0, (eda, edu, edx0) = make_vjp_case(rng, layout, per_head, B, H, D, N, dtype,
                                                   with_x0)
    kind = ex._KINDS[view(u).dtype]
    assert ex.backward_fits(layout, u.shape, per_head, kind)
    fplan, bplan = ex.make_backward_plans(layout, u.shape, per_head, kind)
    assert bplan.nchunks >= 3 and fplan.nchunks == bplan.nchunks
    du = np.full(u.shape, np.nan, dtype)
    da = np.full(a.shape, np.nan, dtype)
    dx0 = np.full(x0.shape, np.nan, np.float32) if with_x0 else None
    ex.swr_exact_vjp(view(a), view(u), view(dy), view(du), view(da),
                     x0 if with_x0 else np.zeros_like(x0), dx0, layout=layout)
    np.testing.assert_allclose(du.astype(np.float64), edu, **tol(dtype))
    np.testing.assert_allclose(da.astype(np.float64), eda, **tol(dtype))
    if with_x0:
        np.testing.assert_allclose(dx0, edx0, **tol(F32))


WARP_TILES = {"blhd_cols": 2, "blhd_segs": 32, "blhd_steps": 1, "blhd_bwd_steps": 1,
              "bhdl_rows": 1, "bhdl_segs": 64, "bhdl_nv": 1, "bhdl_bwd_nv": 1}


@pytest.mark.skipif(not SIM, reason="simulator cases")
@pytest.mark.parametrize("layout,direction", [("BLHD", "fwd"), ("BHDL", "fwd"), ("BLHD", "vjp"),
                                              ("BHDL", "vjp")])
def test_simulated_warp_scan(rng, ex, layout, direction):
    """The tile scan by warp shuffles, forward and reverse, with a column over two warps (the
    warps' totals composed in shared memory) and several tiles."""
    saved = dict(ex.TUNING)
    try:
        for k, v in WARP_TILES.items():
            ex.TUNING[k] = v
        ex.TUNING["warp_scan"] = True
        N, H, D = (70, 2, 4) if layout == "BLHD" else (260, 1, 2)
        if direction == "fwd":
            a, u, x0, expect = make_case(rng, layout, False, 1, H, D, N, F32)
            assert ex.make_plan(layout, u.shape, False, "f32", "f32").nchunks >= 2
            y = np.full(u.shape, np.nan, F32)
            ex.swr_exact(a, u, y, x0, layout=layout)
            np.testing.assert_allclose(time_last(y, layout), expect, **tol(F32))
            return
        a, u, dy, x0, (eda, edu, edx0) = make_vjp_case(rng, layout, False, 1, H, D, N, F32)
        du, da = np.full(u.shape, np.nan, F32), np.full(a.shape, np.nan, F32)
        dx0 = np.full(x0.shape, np.nan, F32)
        ex.swr_exact_vjp(a, u, dy, du, da, x0, dx0, layout=layout)
        np.testing.assert_allclose(du, edu, **tol(F32))
        np.testing.assert_allclose(da, eda, **tol(F32))
        np.testing.assert_allclose(dx0, edx0, **tol(F32))
    finally:
        for k, v in saved.items():
            ex.TUNING[k] = v


def test_backward_fits():
    from swr_array.numba_kernels import exact_scan as E

    g = E.TUNING["blhd_cols"] * 8  # channels of a bf16 tile
    assert E.backward_fits("BLHD", (1, 64, 4, g), True, "bf16")
    assert not E.backward_fits("BLHD", (1, 64, 2, 2 * g), True, "bf16")
    assert E.backward_fits("BLHD", (1, 64, 3, 5), False, "bf16")
    assert E.backward_fits("BHDL", (1, 3, 32, 64), True, "f32")
    assert not E.backward_fits("BHDL", (1, 3, 33, 64), True, "f32")


@pytest.mark.skipif(not SIM, reason="simulator case")
def test_simulated_workspace_reuse(rng, ex, small_tiles):
    """Launches on one workspace: the epochs in the flags keep a launch from reading the status
    an earlier launch left (same shape, new data), and another shape in between."""
    plan = ex.make_plan("BLHD", (1, 30, 2, 8), False, "f32", "f32")
    flags, _ = ex.workspace(np, plan)
    before = flags[:plan.nchains].copy()
    for N, layout in ((30, "BLHD"), (30, "BLHD"), (17, "BLHD"), (30, "BLHD")):
        a, u, x0, expect = make_case(rng, layout, False, 1, 2, 8, N, F32)
        y = np.full(u.shape, np.nan, F32)
        ex.swr_exact(a, u, y, x0, layout=layout)
        np.testing.assert_allclose(time_last(y, layout), expect, **tol(F32))
    # chain tickets: back at 0, three epochs later
    assert before.tolist() == [before[0]] * plan.nchains and before[0] % (1 << 32) == 0
    assert (flags[:plan.nchains] - before).tolist() == [3 << ex.EPOCH_SHIFT] * plan.nchains


@needs_backend
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_front_exact_vjp(rng, layout):
    """swr_vjp(hops=None) through the kernel backend: the exact scan's backward, x0 given."""
    from swr_array import _checks, _cuda

    X = np if SIM else __import__("cupy")
    a, u, dy, x0, (eda, edu, edx0) = make_vjp_case(rng, layout, True, 1, 2, 8, 40, F32)
    p = _checks.check_swr(X.asarray(a), X.asarray(u), block_len=16, hops=None, layout=layout)
    assert _cuda.exact_backward_fits(p, dy.dtype)
    da, du, dx0 = _cuda.swr_backward(X.asarray(a), X.asarray(u), X.asarray(dy), p,
                                     x0=X.asarray(x0))
    get = lambda x: x.get() if hasattr(x, "get") else x  # noqa: E731
    np.testing.assert_allclose(get(du), edu, **tol(F32))
    np.testing.assert_allclose(get(da), eda, **tol(F32))
    np.testing.assert_allclose(get(dx0), edx0, **tol(F32))


@needs_backend
@pytest.mark.parametrize("layout", ["BLHD"] if SIM else ["BLHD", "BHDL"])
def test_front_exact_state(rng, small_tiles, layout):
    """hops=None with return_state and state= through the backend: chunked calls cut inside a
    block, on a block boundary, before the first boundary and after several, equal the whole
    call, and the final state is the reference's (its carry s in float32 from the kernel). The
    simulator runs BLHD only (the tail's layout handling is the block-carrier kernels')."""
    from swr_array import _checks, _cuda

    X = np if SIM else __import__("cupy")
    get = lambda x: x.get() if hasattr(x, "get") else x  # noqa: E731
    N, l = 25, 4
    a, u, x0, expect = make_case(rng, layout, False, 1, 2, 8, N, F32)
    sl = (lambda x, i, j: x[..., i:j]) if layout == "BHDL" else (lambda x, i, j: x[:, i:j])
    cuts = (0, 3, 12, 21, N)
    state, parts = None, []
    for i, j in zip(cuts[:-1], cuts[1:]):
        ai, ui = X.asarray(sl(a, i, j)), X.asarray(sl(u, i, j))
        p = _checks.check_swr(ai, ui, block_len=l, hops=None, layout=layout)
        y, state = _cuda.swr_forward(ai, ui, p, x0=X.asarray(x0) if state is None else None,
                                     state=state, return_state=True)
        parts.append(get(y))
    joined = np.concatenate(parts, axis=-1 if layout == "BHDL" else 1)
    np.testing.assert_allclose(time_last(joined, layout), expect, **tol(F32))
    _, ref = sa.swr(a.astype(np.float64), u.astype(np.float64), x0=x0.astype(np.float64),
                    block_len=l, hops=None, layout=layout, return_state=True)
    np.testing.assert_array_equal(get(state.position), ref.position)
    for name in ("w", "g", "carry_v"):
        np.testing.assert_allclose(get(getattr(state, name)), getattr(ref, name), **tol(F32))


@needs_backend
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_front_exact_forward(rng, layout):
    """swr(hops=None) through the kernel backend, x0 given and not."""
    from swr_array import _checks, _cuda

    X = np if SIM else __import__("cupy")
    a, u, x0, expect = make_case(rng, layout, True, 1, 2, 8, 40, F32)
    p = _checks.check_swr(X.asarray(a), X.asarray(u), block_len=16, hops=None, layout=layout)
    y = _cuda.swr_forward(X.asarray(a), X.asarray(u), p, x0=X.asarray(x0), state=None,
                          return_state=False)
    y = y.get() if hasattr(y, "get") else y
    np.testing.assert_allclose(time_last(y, layout), expect, **tol(F32))


# ----------------------------------------------------------------------------------------------
# GPU: the tuned tiles, poisoned outputs


GPU_CASES = [
    ("BLHD", True, 2, 8, 16, 3001, BF16, BF16),
    ("BLHD", False, 1, 8, 16, 4096, BF16, BF16),
    ("BLHD", True, 1, 8, 16, 2500, F32, F32),
    ("BLHD", False, 2, 4, 16, 1999, F16, F32),
    ("BLHD", True, 1, 3, 5, 1001, BF16, BF16),
    ("BHDL", True, 2, 8, 16, 3000, BF16, BF16),
    ("BHDL", False, 1, 8, 16, 4096, BF16, F32),
    ("BHDL", True, 1, 8, 16, 2500, F32, F32),
    ("BHDL", False, 1, 4, 16, 1999, F16, F16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"{c[0]}-{'head' if c[1] else 'chan'}-"
                                                 f"{c[2]}x{c[5]}x{c[3]}x{c[4]}-{c[6].name}-"
                                                 f"{c[7].name}" for c in GPU_CASES])
def test_gpu_matches_reference(rng, ex, case):
    import cupy

    layout, per_head, B, H, D, N, dtype, out = case
    a, u, x0, expect = make_case(rng, layout, per_head, B, H, D, N, dtype)
    y = cupy.full(u.shape, np.nan, out)
    ex.swr_exact(view(cupy.asarray(a)), view(cupy.asarray(u)), view(y), cupy.asarray(x0),
                 layout=layout)
    np.testing.assert_allclose(time_last(y.get(), layout), expect, **tol(out))


VJP_GPU_CASES = [
    ("BLHD", True, 2, 8, 16, 3001, BF16, True),
    ("BLHD", False, 1, 8, 16, 4096, BF16, False),
    ("BLHD", True, 1, 8, 16, 2500, F32, True),
    ("BLHD", False, 2, 4, 16, 1999, F16, True),
    ("BHDL", True, 2, 8, 16, 3000, BF16, True),
    ("BHDL", False, 1, 8, 16, 4096, BF16, False),
    ("BHDL", True, 1, 8, 16, 2500, F32, True),
    ("BHDL", False, 1, 4, 16, 1999, F16, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", VJP_GPU_CASES, ids=[f"{c[0]}-{'head' if c[1] else 'chan'}-"
                                                     f"{c[2]}x{c[5]}x{c[3]}x{c[4]}-{c[6].name}"
                                                     for c in VJP_GPU_CASES])
def test_gpu_vjp_matches_reference(rng, ex, case):
    import cupy

    layout, per_head, B, H, D, N, dtype, with_x0 = case
    a, u, dy, x0, (eda, edu, edx0) = make_vjp_case(rng, layout, per_head, B, H, D, N, dtype,
                                                   with_x0)
    du = cupy.full(u.shape, np.nan, dtype)
    da = cupy.full(a.shape, np.nan, dtype)
    dx0 = cupy.full(x0.shape, np.nan, np.float32) if with_x0 else None
    x0d = cupy.asarray(x0 if with_x0 else np.zeros_like(x0))
    ex.swr_exact_vjp(view(cupy.asarray(a)), view(cupy.asarray(u)), view(cupy.asarray(dy)),
                     view(du), view(da), x0d, dx0, layout=layout)
    np.testing.assert_allclose(du.get().astype(np.float64), edu, **tol(dtype))
    np.testing.assert_allclose(da.get().astype(np.float64), eda, **tol(dtype))
    if with_x0:
        np.testing.assert_allclose(dx0.get(), edx0, **tol(F32))


@pytest.mark.gpu
def test_gpu_two_streams(rng, ex):
    """Same-shape forward and gradient calls issued on two streams without ordering between
    them: each stream has its own status buffers, so both give the reference's numbers."""
    import cupy

    cases = [make_vjp_case(rng, "BLHD", True, 2, 8, 16, 3000, BF16, True) for _ in range(2)]
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(2)]
    outs = []
    for (a, u, dy, x0, _), s in zip(cases, streams):
        with s:
            ad, ud, dyd, x0d = (cupy.asarray(v) for v in (a, u, dy, x0))
            y = cupy.full(u.shape, np.nan, BF16)
            du, da = cupy.full(u.shape, np.nan, BF16), cupy.full(a.shape, np.nan, BF16)
            dx0 = cupy.full(x0.shape, np.nan, np.float32)
            for _ in range(3):  # several launches each, interleaved with the other stream's
                ex.swr_exact(view(ad), view(ud), view(y), x0d, layout="BLHD")
                ex.swr_exact_vjp(view(ad), view(ud), view(dyd), view(du), view(da), x0d, dx0,
                                 layout="BLHD")
            outs.append((y, du, da, dx0))
    for s in streams:
        s.synchronize()
    for (a, u, _dy, x0, (eda, edu, edx0)), (y, du, da, dx0) in zip(cases, outs):
        f64 = lambda x: x.astype(np.float64)  # noqa: E731
        expect = sa.swr(f64(a), f64(u), hops=None, layout="BLHD", x0=f64(x0))
        np.testing.assert_allclose(y.get().astype(np.float64), expect, **tol(BF16))
        np.testing.assert_allclose(du.get().astype(np.float64), edu, **tol(BF16))
        np.testing.assert_allclose(da.get().astype(np.float64), eda, **tol(BF16))
        np.testing.assert_allclose(dx0.get().astype(np.float64), edx0, **tol(BF16))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_gpu_public_calls(rng, layout):
    """sa.swr / sa.swr_vjp(hops=None) on CuPy arrays, twice (the second call takes the cached
    plain path), and hops beyond the number of blocks: the exact scan's results."""
    import cupy

    a, u, dy, _, (eda, edu, _) = make_vjp_case(rng, layout, True, 2, 8, 16, 3000, BF16, False)
    f64 = lambda x: x.astype(np.float64)  # noqa: E731
    expect = sa.swr(f64(a), f64(u), hops=None, layout=layout)
    ad, ud, dyd = cupy.asarray(a), cupy.asarray(u), cupy.asarray(dy)
    for hops in (None, None, 1000):
        y = sa.swr(ad, ud, hops=hops, layout=layout)
        np.testing.assert_allclose(y.get().astype(np.float64), expect, **tol(BF16))
        da, du, dx0 = sa.swr_vjp(ad, ud, dyd, hops=hops, layout=layout)
        assert dx0 is None
        np.testing.assert_allclose(du.get().astype(np.float64), edu, **tol(BF16))
        np.testing.assert_allclose(da.get().astype(np.float64), eda, **tol(BF16))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_gpu_window_lookback(rng, ex, layout):
    """The look-back over a window of tiles at once, forward and gradient."""
    import cupy

    saved = ex.TUNING["lookback_window"]
    ex.TUNING["lookback_window"] = not saved
    try:
        a, u, x0, expect = make_case(rng, layout, True, 2, 8, 16, 4000, BF16)
        y = cupy.full(u.shape, np.nan, BF16)
        ex.swr_exact(view(cupy.asarray(a)), view(cupy.asarray(u)), view(y), cupy.asarray(x0),
                     layout=layout)
        np.testing.assert_allclose(time_last(y.get(), layout), expect, **tol(BF16))
        a, u, dy, x0, (eda, edu, edx0) = make_vjp_case(rng, layout, False, 1, 8, 16, 4096, BF16)
        du, da = cupy.full(u.shape, np.nan, BF16), cupy.full(a.shape, np.nan, BF16)
        dx0 = cupy.full(x0.shape, np.nan, np.float32)
        ex.swr_exact_vjp(view(cupy.asarray(a)), view(cupy.asarray(u)), view(cupy.asarray(dy)),
                         view(du), view(da), cupy.asarray(x0), dx0, layout=layout)
        np.testing.assert_allclose(du.get().astype(np.float64), edu, **tol(BF16))
        np.testing.assert_allclose(da.get().astype(np.float64), eda, **tol(BF16))
        np.testing.assert_allclose(dx0.get(), edx0, **tol(F32))
    finally:
        ex.TUNING["lookback_window"] = saved


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
def test_gpu_repeated_and_graph(rng, ex, layout):
    """Back-to-back launches on one workspace, then a CUDA-graph capture replayed with new data:
    every result is the reference's (the device-side epochs, no clearing between launches)."""
    import cupy

    cases = [make_case(rng, layout, True, 1, 8, 16, 5000, BF16) for _ in range(3)]
    dev = [tuple(cupy.asarray(x) for x in c[:3]) for c in cases]
    y = cupy.full(dev[0][1].shape, np.nan, BF16)
    for (a, u, x0), c in zip(dev, cases):
        y.fill(np.nan)
        ex.swr_exact(view(a), view(u), view(y), x0, layout=layout)
        np.testing.assert_allclose(time_last(y.get(), layout), c[3], **tol(BF16))
    a, u, x0 = (x.copy() for x in dev[0])
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        ex.swr_exact(view(a), view(u), view(y), x0, layout=layout, stream=stream)
        stream.begin_capture()
        ex.swr_exact(view(a), view(u), view(y), x0, layout=layout, stream=stream)
        graph = stream.end_capture()
        for k in (1, 2, 1):
            for dst, src in zip((a, u, x0), dev[k]):
                dst[...] = src
            y.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            np.testing.assert_allclose(time_last(y.get(), layout), cases[k][3], **tol(BF16))
