"""The hops=None two-pass forward (numba_kernels/swr_exact.py) at real sizes on a GPU, against the
float64 reference on sampled channels; outputs are NaN-poisoned first."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gpu_available
from test_gpu_forward import (
    BF16_NAN,
    assert_all_written,
    bits_to_f64,
    channel_series,
    random_bf16_bits,
    shapes,
)

from swr_array import reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU")]  # fmt: skip


def _cp():
    import cupy

    return cupy


def dims_of(u, layout):
    if layout == "BLHD":
        B, N, H, D = u.shape
    else:
        B, H, D, N = u.shape
    return B, N, H, D


def run_exact(a, u, y, x0=None, layout="BLHD"):
    from swr_array.numba_kernels.swr_exact import swr_forward_exact

    cp = _cp()
    B, _, H, D = dims_of(u, layout)
    carry = cp.zeros((B, H, D), cp.float32) if x0 is None else x0
    swr_forward_exact(a, u, y, layout=layout, carry=carry)
    cp.cuda.get_current_stream().synchronize()


def check_sampled(a, u, y, *, nsamples, seed, x0=None, tol=1.2e-2, layout="BLHD"):
    rng = np.random.default_rng(seed)
    per_head = a.ndim == 3
    B, N, H, D = dims_of(u, layout)
    worst = 0.0
    for _ in range(nsamples):
        b, h, d = rng.integers(B), rng.integers(H), rng.integers(D)
        av = bits_to_f64(channel_series(a, layout, b, h, d, per_head))
        uv = bits_to_f64(channel_series(u, layout, b, h, d))
        start = 0.0 if x0 is None else float(x0[b, h, d].get())
        ref = reference.swr(av, uv, block_len=16, hops=None, x0=np.float64(start))
        got = bits_to_f64(channel_series(y, layout, b, h, d))
        worst = max(worst, np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
    assert worst < tol, worst


@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
@pytest.mark.parametrize("dims", [(4, 8192), (16, 2048), (1, 262144)],
                         ids=lambda d: "x".join(map(str, d)))  # fmt: skip
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
def test_headline_sizes_bf16(layout, dims, per_head):
    cp = _cp()
    B, N = dims
    a_shape, u_shape = shapes(layout, B, N, 128, 16, per_head)
    a = random_bf16_bits(a_shape, 1, -0.999, 0.999)
    u = random_bf16_bits(u_shape, 2)
    y = cp.full(u_shape, BF16_NAN, cp.uint16)
    x0 = cp.asarray(np.random.default_rng(3).standard_normal((B, 128, 16)), cp.float32)
    run_exact(a, u, y, x0, layout=layout)
    assert_all_written(y)
    check_sampled(a, u, y, nsamples=8, seed=4, x0=x0, layout=layout)


@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
@pytest.mark.parametrize("dims", [(3, 1001, 7, 3), (2, 777, 5, 1), (1, 4099, 3, 24)],
                         ids=lambda d: "x".join(map(str, d)))  # fmt: skip
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "per_channel"])
def test_odd_shapes_and_unaligned_pointers(layout, dims, per_head):
    """Odd head dims and N, arrays 2 bytes past a 16-byte boundary: the general kernel."""
    cp = _cp()
    B, N, H, D = dims
    a_shape, u_shape = shapes(layout, B, N, H, D, per_head)
    na, nu = int(np.prod(a_shape)), int(np.prod(u_shape))
    for shift in (0, 1):
        a = random_bf16_bits((na + 1,), 7, -0.99, 0.99)[shift : shift + na].reshape(a_shape)
        u = random_bf16_bits((nu + 1,), 8)[shift : shift + nu].reshape(u_shape)
        y = cp.full(nu + 1, BF16_NAN, cp.uint16)[shift : shift + nu].reshape(u_shape)
        run_exact(a, u, y, layout=layout)
        assert_all_written(y)
        check_sampled(a, u, y, nsamples=6, seed=9, layout=layout)


@pytest.mark.parametrize("layout", ["BLHD", "BHDL"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_front_hops_none(layout, dtype):
    """swr(hops=None) on CuPy (the two passes) equals the NumPy reference."""
    import swr_array as sa

    cp = _cp()
    rng = np.random.default_rng(11)
    a_shape, u_shape = shapes(layout, 2, 3000, 8, 16, True)
    a = rng.uniform(-0.99, 0.99, a_shape).astype(dtype)
    u = rng.standard_normal(u_shape).astype(dtype)
    x0 = rng.standard_normal((2, 8, 16)).astype(np.float32)
    y = sa.swr(cp.asarray(a), cp.asarray(u), hops=None, layout=layout, x0=cp.asarray(x0))
    ref = sa.swr(a.astype(np.float64), u.astype(np.float64), hops=None, layout=layout,
                 x0=x0.astype(np.float64))  # fmt: skip
    err = np.linalg.norm(y.get().astype(np.float64) - ref) / np.linalg.norm(ref)
    assert err < (2e-5 if dtype == "float32" else 2e-3), err
