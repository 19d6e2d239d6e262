"""The reference against itself: dense operator == decomposition == two-pass == tokenwise, and
the reference equalities of docs/spec.md#recurrence (sequential, the authors' two-pass
semantics), gradients by finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from swr_array import reference as R

HOPS = [0, 1, 2, 3, None]


def draw(rng, shape_a, shape_u):
    # any real coefficients: negatives, values above 1, and some exact zeros
    a = rng.uniform(-1.3, 1.3, shape_a)
    a[rng.random(shape_a) < 0.05] = 0.0
    return a, rng.standard_normal(shape_u)


@pytest.mark.parametrize("hops", HOPS)
@pytest.mark.parametrize("block_len", [1, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 16, 37])
def test_forms_agree(rng, n, block_len, hops):
    a, u = draw(rng, (2, 1, n), (2, 3, n))
    x0 = rng.standard_normal((2, 3))
    y = R.swr(a, u, block_len=block_len, hops=hops, x0=x0)
    L = R.dense_operator(a[0, 0], block_len, hops)
    col = R.dense_x0_column(a[0, 0], block_len, hops)
    np.testing.assert_allclose(y[0], u[0] @ L.T + x0[0][:, None] * col, rtol=1e-10, atol=1e-10)
    f = R.decomposition(a[0, 0], block_len, hops)
    np.testing.assert_allclose(f["L_local"] + f["G"] @ f["Z"] @ f["T"] @ f["R"], L, atol=1e-10)
    yt = R.swr_tokenwise(a, u, block_len=block_len, hops=hops, x0=x0)
    np.testing.assert_allclose(yt, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block_len", [2, 16, 64, 256])
def test_exact_limits_equal_sequential(rng, block_len):
    n = 3 * block_len + 5
    _, u = draw(rng, (1, 2, n), (1, 2, n))
    # slow decay, so that what a shorter window drops is visible
    a = rng.uniform(0.97, 1.03, (1, 2, n))
    x0 = rng.standard_normal((1, 2))
    seq = R.sequential(a, u, x0=x0)
    nb = -(-n // block_len)
    np.testing.assert_allclose(R.swr(a, u, block_len=block_len, hops=None, x0=x0), seq, atol=1e-9)
    np.testing.assert_allclose(R.swr(a, u, block_len=block_len, hops=nb, x0=x0), seq, atol=1e-9)
    np.testing.assert_allclose(R.swr(a, u, block_len=block_len, hops=nb + 3, x0=x0), seq, atol=1e-9)
    # one hop short of the whole sequence is not exact
    assert not np.allclose(R.swr(a, u, block_len=block_len, hops=nb - 2, x0=x0), seq)


def spear_block_two_pass(a, u, BL=16):
    """The paper authors' block two-pass reference (spear ``block_two_pass_ref``), transcribed:
    per block x = L u, then x += (a_first * L[:, 0]) * (previous block's last local value)."""
    B, H, N = a.shape
    nb = N // BL
    ab = a.reshape(B, H, nb, BL)
    ub = u.reshape(u.shape[:3] + (nb, BL))
    L = np.zeros((B, H, nb, BL, BL))
    for i in range(BL):
        for j in range(i + 1):
            L[..., i, j] = np.prod(ab[..., j + 1 : i + 1], axis=-1)
    v = np.einsum("shbij,shdbj->shdbi", L, ub)
    x = v.copy()
    g = ab[..., 1:, 0, None] * L[:, :, 1:, :, 0]
    x[:, :, :, 1:, :] += g[:, :, None] * v[:, :, :, :-1, -1:]
    return x.reshape(u.shape)


@pytest.mark.parametrize("n", [16, 48, 1536])
def test_hops1_equals_authors_reference_everywhere(rng, n):
    a = rng.uniform(0.0, 1.0, (2, 2, n))
    u = rng.standard_normal((2, 2, 16, n))
    y = R.swr(a[:, :, None], u, block_len=16, hops=1)
    np.testing.assert_allclose(y, spear_block_two_pass(a, u), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hops", [0, 1, 2])
def test_jagged_window(rng, hops):
    """y_t depends on u_s exactly for s >= (j - k) l: each output sees k l + 1 .. (k + 1) l
    inputs."""
    l, n = 4, 29
    a = rng.uniform(0.5, 1.2, (1, n))  # no zeros: every in-window input has an effect
    u = rng.standard_normal((1, n))
    y = R.swr(a, u, block_len=l, hops=hops)
    for s in range(n):
        up = u.copy()
        up[0, s] += 1.0
        changed = np.abs(R.swr(a, up, block_len=l, hops=hops) - y)[0] > 1e-12
        for t in range(n):
            inside = s <= t and s >= (t // l - hops) * l
            assert changed[t] == inside, (s, t)
    for t in range(n):
        seen = t - max((t // l - hops) * l, 0) + 1
        if (t // l - hops) * l >= 0:
            assert hops * l + 1 <= seen <= (hops + 1) * l


@pytest.mark.parametrize("hops", [1, 2])
def test_nonfinite_stays_in_its_window(rng, hops):
    l, n = 4, 40
    a, u = draw(rng, (1, n), (1, n))
    a[0, 9] = np.inf
    u[0, 13] = np.nan
    y = R.swr(a, u, block_len=l, hops=hops)
    for t in range(n):
        start = max((t // l - hops) * l, 0)
        touched = start <= 13 <= t or start <= 9 <= t
        assert np.isfinite(y[0, t]) or touched, t
        if not touched:
            assert np.isfinite(y[0, t])


@pytest.mark.parametrize("hops", [0, 1, 2, 3, 9, None])
@pytest.mark.parametrize("with_x0", [False, True])
def test_vjp_finite_differences(rng, hops, with_x0):
    l, n = 4, 23
    a, u = draw(rng, (2, 1, n), (2, 3, n))
    dy = rng.standard_normal(u.shape)
    x0 = rng.standard_normal((2, 3)) if with_x0 else None
    da, du, dx0 = R.swr_vjp(a, u, dy, block_len=l, hops=hops, x0=x0)
    da = da.sum(axis=1, keepdims=True)

    def loss(a_, u_, x0_):
        return float((R.swr(a_, u_, block_len=l, hops=hops, x0=x0_) * dy).sum())

    eps = 1e-6
    for idx in [(0, 0, 0), (1, 0, 5), (0, 0, n - 1), (1, 0, 8), (0, 0, 12)]:
        ap, am = a.copy(), a.copy()
        ap[idx] += eps
        am[idx] -= eps
        fd = (loss(ap, u, x0) - loss(am, u, x0)) / (2 * eps)
        assert abs(fd - da[idx]) < 1e-6 * max(1.0, abs(fd)), (idx, fd, da[idx])
    for idx in [(0, 1, 0), (1, 2, 7), (0, 0, n - 1)]:
        up, um = u.copy(), u.copy()
        up[idx] += eps
        um[idx] -= eps
        fd = (loss(a, up, x0) - loss(a, um, x0)) / (2 * eps)
        assert abs(fd - du[idx]) < 1e-6 * max(1.0, abs(fd))
    if with_x0:
        for idx in [(0, 0), (1, 2)]:
            xp_, xm = x0.copy(), x0.copy()
            xp_[idx] += eps
            xm[idx] -= eps
            fd = (loss(a, u, xp_) - loss(a, u, xm)) / (2 * eps)
            assert abs(fd - dx0[idx]) < 1e-6 * max(1.0, abs(fd))
    else:
        assert dx0 is None


def test_vjp_hops1_matches_spec_formulas(rng):
    """docs/spec.md#gradients written out: du is the reverse jagged scan seeded with q_{j+1};
    da from w, g, v and z."""
    l, n = 8, 40
    a, u = draw(rng, (1, n), (1, n))
    dy = rng.standard_normal((1, n))
    da, du, _ = R.swr_vjp(a, u, dy, block_len=l, hops=1)
    w, g = R.local_scan(a, u, l)
    nb = -(-n // l)
    q = [sum(g[0, t] * dy[0, t] for t in range(j * l, min((j + 1) * l, n))) for j in range(nb)]
    v = [w[0, min((j + 1) * l, n) - 1] for j in range(nb)]
    for j in range(nb):
        lo, hi = j * l, min((j + 1) * l, n)
        qn = q[j + 1] if j + 1 < nb else 0.0
        acc, z = dy[0, hi - 1] + qn, dy[0, hi - 1]
        for t in range(hi - 1, lo - 1, -1):
            if t < hi - 1:
                acc = dy[0, t] + a[0, t + 1] * acc
                z = dy[0, t] + a[0, t + 1] * z
            assert du[0, t] == pytest.approx(acc, rel=1e-10, abs=1e-10)
            w_prev = w[0, t - 1] if t > lo else 0.0
            g_prev = g[0, t - 1] if t > lo else 1.0
            v_prev = v[j - 1] if j > 0 else 0.0
            assert da[0, t] == pytest.approx(w_prev * acc + g_prev * v_prev * z, rel=1e-9, abs=1e-9)


def test_block_level_pieces(rng):
    l, n = 4, 18
    a, u = draw(rng, (2, n), (2, n))
    dy = rng.standard_normal((2, n))
    w, g = R.local_scan(a, u, l)
    v, C = R.block_carriers(a, u, l)
    ends = [min((j + 1) * l, n) - 1 for j in range(v.shape[-1])]
    np.testing.assert_array_equal(v, w[:, ends])
    np.testing.assert_array_equal(C, g[:, ends])
    q = R.block_grad_sums(a, dy, l)
    for j in range(v.shape[-1]):
        sl = slice(j * l, min((j + 1) * l, n))
        np.testing.assert_allclose(q[:, j], (g[:, sl] * dy[:, sl]).sum(-1))


def test_empty_sequence():
    a = np.zeros((2, 1, 0))
    u = np.zeros((2, 3, 0))
    assert R.swr(a, u).shape == (2, 3, 0)
    da, du, _ = R.swr_vjp(a, u, u)
    assert da.shape == (2, 3, 0) and du.shape == (2, 3, 0)
