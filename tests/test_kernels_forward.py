"""The forward kernels (numba_kernels/swr_forward.py) against the float64 reference.

Runs under the CUDA simulator (tests/test_simulator.py starts it with NUMBA_ENABLE_CUDASIM=1) or on
a GPU. Shapes stay tiny: the simulator runs one Python thread per CUDA thread. The launch tuning is
shrunk per test so that chunking (and the re-walked block before each chunk) is exercised too.

The helpers (``make_case``, ``continuation``, ``run_forward``, ...) are shared with
tests/test_gpu_forward.py.
"""

from __future__ import annotations

import importlib
import sys

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import gpu_available

from swr_array import reference

SIM = bool(numba.config.ENABLE_CUDASIM)
pytestmark = pytest.mark.skipif(not (SIM or gpu_available()),
                                reason="needs the CUDA simulator or a GPU")  # fmt: skip

DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16),
          "bf16": np.dtype(ml_dtypes.bfloat16)}  # fmt: skip
# ||y - ref|| / ||ref|| bounds by output dtype (float32 accumulation, one rounding at the store)
TOL = {"f32": 2e-5, "f16": 2e-3, "bf16": 1.2e-2}


# ------------------------------------------------------------------------------------------
# shared helpers


def backend():
    if SIM:
        return np
    import cupy

    return cupy


def to_host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def bits(x):
    """The view kernels take: bfloat16 as uint16."""
    return x.view(np.uint16) if x.dtype.name == "bfloat16" else x


def time_last(x, layout, per_head_a=False):
    """Reference view: time-last, per-head a with a size-1 D axis."""
    x = np.asarray(x, dtype=np.float64)
    if layout == "BLHD":
        x = np.moveaxis(x, 1, -1)
    return x[:, :, None, :] if per_head_a else x


def make_case(rng, layout, shape, per_head, in_kind, zeros=True):
    """Random (a, u) as host arrays of the input dtype, in the layout. shape = (B, H, D, N)."""
    B, H, D, N = shape
    if layout == "BHDL":
        u_shape = (B, H, D, N)
        a_shape = (B, H, N) if per_head else u_shape
    else:
        u_shape = (B, N, H, D)
        a_shape = (B, N, H) if per_head else u_shape
    a = rng.uniform(-1.2, 1.2, a_shape)
    if zeros:
        a[rng.random(a_shape) < 0.05] = 0.0
    u = rng.standard_normal(u_shape)
    u[rng.random(u_shape) < 0.03] = 0.0
    dtype = DTYPES[in_kind]
    return a.astype(dtype), u.astype(dtype)


def slice_time(x, start, layout):
    return np.ascontiguousarray(x[..., start:] if layout == "BHDL" else x[:, start:])


def continuation(a_tl, u_tl, split, block_len, x0):
    """Start values for a kernel run on [split:], read off the reference on the whole sequence.

    Returns offset, w0, g0 (w, g just before the split in its block), the hops=1 carry (v of the
    block before the split's block, or x0) and S of every block the suffix touches (hops=2).
    """
    w, g = reference.local_scan(a_tl, u_tl, block_len)
    lead = u_tl.shape[:-1]
    offset = split % block_len
    if offset:
        w0, g0 = w[..., split - 1], g[..., split - 1]
    else:
        w0, g0 = np.zeros(lead), np.ones(lead)
    first = split // block_len
    carry = w[..., first * block_len - 1] if first else np.broadcast_to(x0, lead)
    return offset, w0, g0, carry, first


def f32(x, xp):
    return xp.asarray(np.ascontiguousarray(x, dtype=np.float32))


def poisoned(shape, kind, xp):
    y = np.full(shape, np.nan, dtype=DTYPES[kind])
    return xp.asarray(y) if xp is not np else y


def rel_err(y, ref):
    y = np.asarray(y, dtype=np.float64)
    assert not np.isnan(y).any(), "unwritten (NaN-poisoned) or NaN outputs"
    return np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30)


def run_forward(a, u, *, layout, block_len, hops, out_kind, split=0, x0=None, mode="fused",
                stream=None):  # fmt: skip
    """Run swr_forward on u[split:] (continuing from the reference's state at the split) and
    return (kernel y as float64 time-last, expected float64 time-last)."""
    from swr_array.numba_kernels.swr_forward import swr_forward

    xp = backend()
    per_head = a.ndim == 3
    a_tl = time_last(a, layout, per_head)
    u_tl = time_last(u, layout)
    lead = u_tl.shape[:-1]
    x0 = np.zeros(lead) if x0 is None else x0
    ref_hops = 2 if mode == "block_carry" else hops
    y_full, _, _, S = reference.swr(a_tl, u_tl, block_len=block_len, hops=ref_hops, x0=x0,
                                    return_parts=True)  # fmt: skip
    offset, w0, g0, carry, first = continuation(a_tl, u_tl, split, block_len, x0)
    a_s, u_s = slice_time(a, split, layout), slice_time(u, split, layout)
    y = poisoned(u_s.shape, out_kind, xp)
    kw = dict(layout=layout, block_len=block_len, offset=offset, w0=f32(w0, xp), g0=f32(g0, xp))
    if hops == 0 and mode == "fused":
        carry = np.full(lead, 7.0)  # hops=0 must not read it
    if mode == "block_carry":
        kw["block_carry"] = f32(S[..., first:], xp)
    swr_forward(bits(xp.asarray(a_s)), bits(xp.asarray(u_s)), bits(y), hops=hops,
                carry=f32(carry, xp), stream=stream, **kw)  # fmt: skip
    return time_last(to_host(y).astype(np.float64), layout), y_full[..., split:]


def run_carriers(a, u, *, layout, block_len, split=0):
    """block_carriers on u[split:]: (v, C) from the kernel and from the reference."""
    from swr_array.numba_kernels import block_carriers

    xp = backend()
    per_head = a.ndim == 3
    a_tl, u_tl = time_last(a, layout, per_head), time_last(u, layout)
    offset, w0, g0, _, _ = continuation(a_tl, u_tl, split, block_len, 0.0)
    v_ref, c_ref = reference.block_carriers(a_tl[..., split:], u_tl[..., split:], block_len,
                                            offset=offset, w0=w0, g0=g0)  # fmt: skip
    v = xp.asarray(np.full(v_ref.shape, np.nan, np.float32))
    c = xp.asarray(np.full(v_ref.shape, np.nan, np.float32))
    a_s, u_s = slice_time(a, split, layout), slice_time(u, split, layout)
    block_carriers(bits(xp.asarray(a_s)), bits(xp.asarray(u_s)), v, c, layout=layout,
                   block_len=block_len, offset=offset, w0=f32(w0, xp), g0=f32(g0, xp))  # fmt: skip
    return to_host(v), to_host(c), np.broadcast_to(v_ref, v.shape), np.broadcast_to(c_ref, v.shape)


@pytest.fixture(autouse=True, scope="module")
def fast_simulator_barriers():
    """The simulator's barriers hand the GIL between 32 Python threads; with the default 5 ms
    switch interval every warp shuffle (two barriers) costs ~10 ms."""
    if not SIM:
        yield
        return
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


@pytest.fixture
def small_chunks(monkeypatch):
    """Shrink chunks so that tiny shapes still split into several (re-walk paths run)."""
    # the module (the package attribute of the same name is the function)
    F = importlib.import_module("swr_array.numba_kernels.swr_forward")

    def set_chunks(blhd_steps, bhdl_blocks=2):
        monkeypatch.setitem(F.TUNING, "blhd_chunk_steps", blhd_steps)
        monkeypatch.setitem(F.TUNING, "blhd_chunk_steps_f32", blhd_steps)
        monkeypatch.setitem(F.TUNING, "blhd_long_chunk_steps", blhd_steps)
        monkeypatch.setitem(F.TUNING, "bhdl_chunk_blocks", bhdl_blocks)
        monkeypatch.setitem(F.TUNING, "blhd_halo_chunk_blocks_per_hop", 0)  # halos over chunks

    return set_chunks


# ------------------------------------------------------------------------------------------
# simulator-sized cases

LAYOUTS = ("BHDL", "BLHD")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("kinds", [("bf16", "bf16"), ("f32", "f32"), ("f16", "f32"),
                                   ("bf16", "f16"), ("f32", "bf16")], ids=lambda k: "-".join(k))
def test_fused_matches_reference(rng, small_chunks, layout, per_head, hops, kinds):
    in_kind, out_kind = kinds
    small_chunks(32, 2)
    # vector paths (BLHD: D=8; BHDL: 8 | N), N not a multiple of block_len, several chunks
    shape = (1, 2, 2, 56) if layout == "BHDL" else (2, 2, 8, 45)
    a, u = make_case(rng, layout, shape, per_head, in_kind)
    y, ref = run_forward(a, u, layout=layout, block_len=16, hops=hops, out_kind=out_kind,
                         x0=rng.standard_normal(shape[:3]))  # fmt: skip
    assert rel_err(y, ref) < TOL[out_kind]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("out_kind", ["f32", "f16", "bf16"])
def test_every_output_dtype_from_every_input(rng, layout, out_kind):
    for in_kind in ("f32", "f16", "bf16"):
        a, u = make_case(rng, layout, (1, 2, 4, 24), True, in_kind)
        y, ref = run_forward(a, u, layout=layout, block_len=4, hops=1, out_kind=out_kind)
        assert rel_err(y, ref) < TOL[out_kind], in_kind


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_len", [1, 2, 8, 16, 64])
def test_block_lengths(rng, small_chunks, layout, block_len):
    small_chunks(2 * block_len, bhdl_blocks=max(2, 8 // block_len))  # still two chunks or more
    n = 3 * block_len + 5 if block_len > 1 else 13
    a, u = make_case(rng, layout, (1, 2, 8, n), True, "bf16")
    y, ref = run_forward(a, u, layout=layout, block_len=block_len, hops=1, out_kind="f32")
    assert rel_err(y, ref) < 1e-5


@pytest.fixture
def shared_walk(monkeypatch, small_chunks):
    """BLHD hops=1 over whole blocks takes the shared-walk kernel; shrink its thread blocks so
    that tiny shapes still span several channel tiles and several groups of chunks."""
    F = importlib.import_module("swr_array.numba_kernels.swr_forward")

    def set_shape(lanes, chunks, chunk_steps, max_bytes=1 << 20):
        small_chunks(chunk_steps)
        monkeypatch.setitem(F.TUNING, "blhd_share_lanes", lanes)
        monkeypatch.setitem(F.TUNING, "blhd_share_chunks", chunks)
        monkeypatch.setitem(F.TUNING, "blhd_share_max_bytes", max_bytes)
        monkeypatch.setitem(F.TUNING, "blhd_share_chunk_steps", chunk_steps)
        monkeypatch.setitem(F.TUNING, "blhd_share_chunk_steps_f32", chunk_steps)
        return F

    return set_shape


@pytest.mark.parametrize("kinds,per_head,geometry", [
    (("bf16", "bf16"), True, (2, 3, 16, 8)),
    (("bf16", "f16"), False, (2, 3, 16, 8)),
    (("f32", "f32"), False, (4, 2, 8, 4)),
    (("f32", "bf16"), True, (4, 2, 8, 4)),
    (("f16", "f32"), True, (1, 4, 32, 16)),
], ids=["bf16-per_head", "bf16-f16-per_channel", "f32-per_channel", "f32-bf16-per_head",
        "f16-f32-l16"])  # geometry: lanes, chunks per thread block, chunk steps, block_len
def test_shared_walk_kernel(rng, shared_walk, kinds, per_head, geometry):
    """Carriers handed between chunks in shared memory: every chunk's first block, the first chunk
    of each thread block (re-walked), idle lanes and chunks past the end."""
    in_kind, out_kind = kinds
    lanes, chunks, chunk_steps, block_len = geometry
    F = shared_walk(lanes, chunks, chunk_steps)
    # H * D / vec channel groups: 3 (two tiles of 2 lanes, one idle) or 5 with D=8
    heads = 3 if lanes == 2 else 5
    shape = (2, heads, 8, 7 * block_len)
    a, u = make_case(rng, "BLHD", shape, per_head, in_kind)
    plan = F._make_plan("BLHD", u.shape, per_head, in_kind, out_kind, block_len, 0, F.HOPS1,
                        (0, 0))  # fmt: skip
    assert "shared_walk" in plan.kernel.py_func.__name__
    x0 = rng.standard_normal(shape[:3])
    y, ref = run_forward(a, u, layout="BLHD", block_len=block_len, hops=1, out_kind=out_kind,
                         x0=x0)  # fmt: skip
    assert rel_err(y, ref) < TOL[out_kind]
    # the same numbers as the plain walk: every sum is taken in the same order
    F.TUNING["blhd_share_chunks"] = 1
    y_plain, _ = run_forward(a, u, layout="BLHD", block_len=block_len, hops=1, out_kind=out_kind,
                             x0=x0)  # fmt: skip
    assert np.array_equal(y, y_plain)


@pytest.mark.parametrize("stages", [2, 3])
def test_bhdl_pipeline_stages(rng, monkeypatch, stages):
    """The BHDL lane scan with its loads ``stages - 1`` iterations ahead (cp.async ring in shared
    memory): many iterations per warp, so every ring slot is refilled several times; the same
    numbers as register loads."""
    F = importlib.import_module("swr_array.numba_kernels.swr_forward")
    monkeypatch.setitem(F.TUNING, "bhdl_chunk_blocks", 80)  # chunks of 5 and 1.25 iterations
    shape = (1, 1, 2, 1600)
    a, u = make_case(rng, "BHDL", shape, True, "bf16")
    x0 = rng.standard_normal(shape[:3])
    monkeypatch.setitem(F.TUNING, "bhdl_stages", stages)
    y, ref = run_forward(a, u, layout="BHDL", block_len=16, hops=1, out_kind="f32", x0=x0)
    assert rel_err(y, ref) < 1e-5
    monkeypatch.setitem(F.TUNING, "bhdl_stages", 1)
    y_plain, _ = run_forward(a, u, layout="BHDL", block_len=16, hops=1, out_kind="f32", x0=x0)
    assert np.array_equal(y, y_plain)


@pytest.mark.parametrize("kinds,hops,block_len,rows,chunk_blocks,n,bitwise", [
    (("bf16", "bf16"), 1, 16, 2, 16, 800, True),  # one-iteration chunks, a short last one
    (("bf16", "f32"), 1, 16, 2, 3, 296, True),  # chunks of part iterations, a partial last block
    (("bf16", "bf16"), 0, 16, 4, 0, 520, False),
    (("f32", "f32"), 1, 8, 2, 5, 264, False),  # two lanes per block (vec 4)
    (("f16", "f32"), 1, 32, 2, 4, 520, False),
    (("bf16", "f16"), 1, 64, 2, 2, 640, True),
    (("bf16", "bf16"), 1, 8, 2, 7, 400, False),  # one lane per block
    (("f32", "bf16"), 0, 128, 2, 0, 320, False),  # a block is a whole iteration
])
def test_bhdl_row_scan_kernel(rng, monkeypatch, kinds, hops, block_len, rows, chunk_blocks, n,
                              bitwise):  # fmt: skip
    """The BHDL row scan (hops 0/1, per head, offset 0): the reference's numbers (and bit for
    bit the lane scan's) across chunks of whole and part iterations, two and four rows per
    warp, one to eight lanes per block and a partial last block."""
    F = importlib.import_module("swr_array.numba_kernels.swr_forward")
    in_kind, out_kind = kinds
    shape = (1, 1, 4, n)
    monkeypatch.setitem(F.TUNING, "bhdl_chunk_blocks", chunk_blocks)
    monkeypatch.setitem(F.TUNING, "bhdl_scan_rows", rows)
    plan = F._make_plan("BHDL", shape, True, in_kind, out_kind, block_len, 0,
                        F.HOPS1 if hops else F.HOPS0, (0, 0))  # fmt: skip
    assert "row_scan" in plan.kernel.py_func.__name__
    a, u = make_case(rng, "BHDL", shape, True, in_kind)
    x0 = rng.standard_normal(shape[:3])
    y, ref = run_forward(a, u, layout="BHDL", block_len=block_len, hops=hops, out_kind=out_kind,
                         x0=x0)  # fmt: skip
    assert rel_err(y, ref) < TOL[out_kind]
    if bitwise:
        monkeypatch.setitem(F.TUNING, "bhdl_row_scan", False)
        y_lane, _ = run_forward(a, u, layout="BHDL", block_len=block_len, hops=hops,
                                out_kind=out_kind, x0=x0)  # fmt: skip
        assert np.array_equal(y, y_lane)


def test_shared_walk_is_chosen_where_it_fits():
    """Under the shipped TUNING: BLHD hops=1 over whole blocks from offset 0 takes the shared
    walk when its shared memory fits (bf16 per head up to block_len 16), else the plain walk."""
    F = importlib.import_module("swr_array.numba_kernels.swr_forward")

    def kernel_name(shape, per_head=True, kind="bf16", block_len=16, offset=0, mode=F.HOPS1):
        plan = F._make_plan("BLHD", shape, per_head, kind, kind, block_len, offset, mode,
                            (0, 0))  # fmt: skip
        assert SIM or plan.shared <= 48 * 1024
        return plan.kernel.py_func.__name__

    shape = (2, 4096, 128, 16)
    assert "shared_walk" in kernel_name(shape)
    assert "shared_walk" in kernel_name(shape, kind="f32")
    assert "shared_walk" in kernel_name(shape, block_len=8, per_head=False)
    for kw in (dict(block_len=32), dict(per_head=False), dict(mode=F.HOPS0), dict(offset=8),
               dict(mode=F.BLOCK_CARRY)):  # fmt: skip
        assert "channel_walk" in kernel_name(shape, **kw), kw
    assert "channel_walk" in kernel_name((2, 4088, 128, 16))  # N % block_len
    assert "channel_walk" in kernel_name((2, 64, 128, 16))  # one chunk


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head_dim", [1, 3])
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
def test_odd_head_dims_take_the_general_kernel(rng, small_chunks, layout, head_dim, per_head):
    small_chunks(8)
    a, u = make_case(rng, layout, (1, 3, head_dim, 21), per_head, "bf16")
    y, ref = run_forward(a, u, layout=layout, block_len=4, hops=1, out_kind="f32")
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hops", [0, 1])
@pytest.mark.parametrize("split", [1, 8, 13, 21])
def test_continuation_from_any_split(rng, small_chunks, layout, hops, split):
    """offset/w0/g0/carry continue exactly where the reference on the longer sequence is."""
    small_chunks(16)
    a, u = make_case(rng, layout, (1, 2, 8, 48), split % 2 == 0, "f32")
    y, ref = run_forward(a, u, layout=layout, block_len=8, hops=hops, out_kind="f32",
                         split=split, x0=rng.standard_normal((1, 2, 8)))  # fmt: skip
    assert rel_err(y, ref) < 2e-5


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", [0, 5, 16])
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
def test_block_carry_mode(rng, small_chunks, layout, split, per_head):
    small_chunks(8)
    a, u = make_case(rng, layout, (1, 2, 8, 43), per_head, "f16")
    y, ref = run_forward(a, u, layout=layout, block_len=4, hops=2, out_kind="f32", split=split,
                         mode="block_carry", x0=rng.standard_normal((1, 2, 8)))  # fmt: skip
    assert rel_err(y, ref) < 2e-5


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", [0, 3, 8])
@pytest.mark.parametrize("kinds", [("bf16", True), ("f32", False), ("f16", True)])
def test_block_carriers(rng, small_chunks, layout, split, kinds):
    in_kind, per_head = kinds
    small_chunks(8)
    a, u = make_case(rng, layout, (1, 2, 8, 37), per_head, in_kind)
    v, c, v_ref, c_ref = run_carriers(a, u, layout=layout, block_len=8, split=split)
    assert rel_err(v, v_ref) < 2e-5
    assert rel_err(c, c_ref) < 2e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_sequence_writes_nothing(layout):
    from swr_array.numba_kernels.swr_forward import block_carriers, swr_forward

    xp = backend()
    shape = (1, 2, 4, 0) if layout == "BHDL" else (1, 0, 2, 4)
    a = xp.zeros(shape, np.float32)
    y = xp.zeros(shape, np.float32)
    z = xp.zeros((1, 2, 4), np.float32)
    swr_forward(a, a, y, layout=layout, block_len=16, hops=1, offset=0, w0=z, g0=z, carry=z)
    v = xp.zeros((1, 2, 4, 0), np.float32)
    block_carriers(a, a, v, v, layout=layout, block_len=16, offset=0, w0=z, g0=z)
    assert y.size == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_inputs_stay_in_their_window(rng, layout):
    """A NaN in u at t0 (block j) reaches y only in blocks j and j+1 (hops=1)."""
    a, u = make_case(rng, layout, (1, 1, 8, 40), True, "f32")
    if layout == "BHDL":
        u[..., 3] = np.nan
    else:
        u[:, 3] = np.nan
    y, ref = run_forward(a, u, layout=layout, block_len=8, hops=1, out_kind="f32")
    nan = np.isnan(y)
    assert np.array_equal(nan, np.isnan(ref))
    assert not nan[..., 16:].any()
    finite = ~nan
    assert np.allclose(y[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["BHDL", "BLHD"])
def test_every_forward_table_row_is_chosen(layout):
    """Under the default TUNING every row of the forward's table is the first that fits for
    some case (a row no input reaches would be dead code)."""
    import itertools

    F = importlib.import_module("swr_array.numba_kernels.swr_forward")
    rows = F.FORWARD[layout]
    chosen = set()
    for kind, per_head, mode, block_len, n, D, offset, align in itertools.product(
            ("bf16", "f32"), (True, False), (F.HOPS0, F.HOPS1, F.BLOCK_CARRY), (8, 16, 64),
            (64, 60, 4096), (16, 3), (0, 4), ((0, 0), (8, 0))):
        c = F.Case(layout, per_head, kind, kind, mode, block_len, offset, n, D, 8 * D, align)
        first = next(i for i, (_, fits, _) in enumerate(rows) if fits(c))
        chosen.add(first)
        assert F.choose(c)[0] == rows[first][0]
    missing = [rows[i][0] for i in range(len(rows)) if i not in chosen]
    assert not missing, f"{layout}: rows chosen by no case: {missing}"


@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
@pytest.mark.parametrize("hops,kinds,head_dim,n", [
    (2, ("bf16", "bf16"), 8, 45), (3, ("f32", "f32"), 4, 77), (4, ("f16", "f32"), 8, 64),
    (8, ("bf16", "f16"), 8, 150), (2, ("f32", "bf16"), 3, 37),
], ids=lambda x: "-".join(x) if isinstance(x, tuple) else str(x))
def test_halo_walk_matches_reference(rng, small_chunks, per_head, hops, kinds, head_dim, n):
    """BLHD hops 2..8 in one pass: chunks of 2 blocks re-walk the hops blocks before them (more
    blocks than a chunk), x0 enters as v_{-1}; the vector path (D=8, 4 for f32) and the general
    one (D=3), N not a multiple of block_len."""
    in_kind, out_kind = kinds
    small_chunks(16)
    shape = (2, 2, head_dim, n)
    a, u = make_case(rng, "BLHD", shape, per_head, in_kind)
    y, ref = run_forward(a, u, layout="BLHD", block_len=8, hops=hops, out_kind=out_kind,
                         x0=rng.standard_normal(shape[:3]))  # fmt: skip
    assert rel_err(y, ref) < TOL[out_kind]


def test_halo_walk_refuses_what_it_does_not_run():
    from swr_array.numba_kernels.swr_forward import swr_forward

    z = np.zeros((1, 1, 1), np.float32)
    a = np.zeros((1, 4, 1, 1), np.float32)
    for layout, hops, offset in (("BHDL", 2, 0), ("BLHD", 9, 0), ("BLHD", 2, 1)):
        with pytest.raises(ValueError, match="hops"):
            swr_forward(a, a, a.copy(), layout=layout, block_len=4, hops=hops, offset=offset,
                        w0=z, g0=z, carry=z)


def test_front_one_pass_hops_are_the_kernels():
    """The front (swr_array/_cuda.py, no Numba import) names the halo walk's hops itself."""
    from swr_array.numba_kernels.swr_forward import HALO_HOPS

    from swr_array import _cuda

    assert _cuda.FUSED_HOPS == HALO_HOPS


def test_halo_chunks_grow_with_hops():
    """The halo walk's chunks hold at least blhd_halo_chunk_blocks_per_hop blocks per hop."""
    F = importlib.import_module("swr_array.numba_kernels.swr_forward")
    per_hop = F.TUNING["blhd_halo_chunk_blocks_per_hop"]
    for hops in (2, 4, 8):
        plan = F._make_plan("BLHD", (1, 1 << 14, 2, 8), True, "bf16", "bf16", 16, 0,
                            F.halo_mode(hops), (0, 0))  # fmt: skip
        chunk_blocks = int(plan.scalars[6])
        assert chunk_blocks == max(per_hop * hops, F.TUNING["blhd_chunk_steps"] // 16)
