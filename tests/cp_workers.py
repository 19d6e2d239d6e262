"""Worker bodies of the context-parallel tests (tests/test_context_parallel.py).

They run in processes the tests start (torch.multiprocessing for torch.distributed, a subprocess
for JAX with several host devices) and compare every shard's output and gradients with the
single-process call on the whole sequence.
"""

from __future__ import annotations

import functools
import os
import sys
import zlib

import numpy as np

# (group size, shard lengths): ragged, zero-length, shorter than a block and than hops x block
SHARDINGS = [
    (2, [5, 11]),
    (2, [16, 16]),
    (3, [1, 0, 9]),
    (3, [7, 2, 12]),
    (3, [2, 1, 13]),
    (4, [1, 2, 1, 13]),
    (4, [3, 3, 3, 3]),
]
HOPS = [0, 1, 2, None]
BLOCK_LEN = 4


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _inputs(torch, key, N, layout, per_head, with_x0, dtype):
    rng = np.random.default_rng(_seed(*key))
    B, H, D = 2, 2, 3
    ushape = (B, N, H, D) if layout == "BLHD" else (B, H, D, N)
    ashape = ((B, N, H) if layout == "BLHD" else (B, H, N)) if per_head else ushape
    a = torch.tensor(rng.uniform(-1.0, 1.0, ashape), dtype=dtype)
    u = torch.tensor(rng.normal(size=ushape), dtype=dtype)
    dy = torch.tensor(rng.normal(size=ushape), dtype=dtype)
    x0 = torch.tensor(rng.normal(size=(B, H, D)), dtype=dtype) if with_x0 else None
    return a, u, dy, x0


def _close(torch, name, got, want, tol):
    if not torch.allclose(got, want, rtol=tol, atol=tol):
        err = (got - want).abs().max().item()
        raise AssertionError(f"{name}: max error {err}")


def torch_worker(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    """All torch cases on one process group of ``world`` ranks (subgroups for smaller sizes)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    import torch
    import torch.distributed as dist
    from swr_array.adapters import torch as st

    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    sizes = sorted({g for g, _ in SHARDINGS if g <= world})
    groups = {g: dist.new_group(list(range(g))) for g in sizes}
    global BLOCK_LEN
    if backend == "nccl":
        BLOCK_LEN = 8  # the CUDA kernels take block_len 8..64
    f64 = torch.float64 if backend == "gloo" else torch.float32
    tol = 1e-9 if f64 == torch.float64 else 2e-4
    try:
        cases = 0
        for g, lengths in SHARDINGS:
            if g > world:
                continue
            group = groups[g]
            if rank >= g:
                continue
            N = sum(lengths)
            p = sum(lengths[:rank])
            n = lengths[rank]
            for hops in HOPS:
                for layout, per_head, with_x0 in (("BLHD", True, True), ("BHDL", False, False)):
                    if True:
                        key = (g, tuple(lengths), hops, layout, per_head, with_x0)
                        a, u, dy, x0 = _inputs(torch, key, N, layout, per_head, with_x0, f64)
                        a, u, dy = a.to(device), u.to(device), dy.to(device)
                        x0 = None if x0 is None else x0.to(device)
                        leaves = [t.requires_grad_() for t in (a, u, x0) if t is not None]
                        kw = dict(block_len=BLOCK_LEN, hops=hops, layout=layout)
                        y = st.swr(a, u, x0=x0, **kw)
                        full = torch.autograd.grad(y, leaves, dy)
                        tdim = 1 if layout == "BLHD" else 3
                        adim = tdim if not per_head else (1 if layout == "BLHD" else 2)

                        def shard(t, dim, p=p, n=n):
                            return t.detach().narrow(dim, p, n).clone()

                        sa = shard(a, adim).requires_grad_()
                        su = shard(u, tdim).requires_grad_()
                        sx = None if x0 is None else x0.detach().clone().requires_grad_()
                        ys = st.swr(sa, su, x0=sx, cp_group=group, **kw)
                        _close(torch, f"y {key}", ys, shard(y, tdim), tol)
                        sl = [t for t in (sa, su, sx) if t is not None]
                        got = torch.autograd.grad(ys, sl, shard(dy, tdim))
                        _close(torch, f"da {key}", got[0], shard(full[0], adim), tol)
                        _close(torch, f"du {key}", got[1], shard(full[1], tdim), tol)
                        if x0 is not None:
                            dx0 = got[2].clone()
                            dist.all_reduce(dx0, group=group)
                            _close(torch, f"dx0 {key}", dx0, full[2], tol)
                        with torch.no_grad():
                            yn = st.swr(sa, su, x0=sx, cp_group=group, **kw)
                        _close(torch, f"y no_grad {key}", yn, ys, 0.0)
                        cases += 1
        _phalanx_cases(torch, dist, st, rank, groups, device, f64, tol)
        _error_cases(torch, st, rank, world, dist.group.WORLD, device, f64)
        if cases == 0 and rank < 2:
            raise AssertionError("no case ran")
    finally:
        dist.destroy_process_group()


def _phalanx_cases(torch, dist, st, rank, groups, device, dtype, tol):
    for g, lengths in ((2, [6, 13]), (3, [1, 9, 2]), (4, [1, 9, 2, 7])):
        if g not in groups or rank >= g:
            continue
        group = groups[g]
        p, n = sum(lengths[:rank]), lengths[rank]
        for hops in (1, None):
            torch.manual_seed(_seed("phalanx", g, hops))
            layer = st.Phalanx(8, heads=2, kv_heads=1, hops=hops, block_len=BLOCK_LEN,
                               decay_max=0.9, dtype=dtype, device=device)
            x = torch.randn(2, sum(lengths), 8, dtype=dtype, device=device)
            dout = torch.randn(2, sum(lengths), 8, dtype=dtype, device=device)
            params = list(layer.parameters())
            x.requires_grad_()
            out = layer(x)
            full = torch.autograd.grad(out, [x] + params, dout)
            xs = x.detach()[:, p:p + n].clone().requires_grad_()
            outs = layer(xs, cp_group=group)
            _close(torch, f"phalanx out {g} {hops}", outs, out.detach()[:, p:p + n], tol)
            got = torch.autograd.grad(outs, [xs] + params, dout[:, p:p + n])
            _close(torch, f"phalanx dx {g} {hops}", got[0], full[0][:, p:p + n], tol)
            for i, (gp, fp) in enumerate(zip(got[1:], full[1:])):
                gp = gp.clone()
                dist.all_reduce(gp, group=group)  # weight gradients: each rank's share
                _close(torch, f"phalanx dparam{i} {g} {hops}", gp, fp, tol)


def _error_cases(torch, st, rank, world, group, device, dtype):
    a = torch.rand(1, 4, 2, dtype=dtype, device=device)
    u = torch.rand(1, 4, 2, 3, dtype=dtype, device=device)
    try:
        st.swr(a, u, layout="BLHD", return_state=True, cp_group=group)
    except ValueError as exc:
        assert "cp_group" in str(exc)
    else:
        raise AssertionError("cp_group with return_state did not raise")
    x0 = torch.zeros(1, 2, 3, dtype=dtype, device=device) if rank == 0 else None
    try:
        st.swr(a, u, layout="BLHD", x0=x0, cp_group=group)
    except ValueError as exc:
        assert "x0" in str(exc)
    else:
        raise AssertionError("x0 on one rank only did not raise")


def jax_main(devices: int, full: bool = False) -> None:
    """The JAX cases under shard_map on ``devices`` host devices (XLA_FLAGS set by the caller)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P
    from swr_array.adapters import jax as sj

    try:
        from jax import shard_map
    except ImportError:  # older JAX
        from jax.experimental.shard_map import shard_map

    assert len(jax.devices()) >= devices, jax.devices()
    cases = 0
    if full:
        plan = [(g, n, hops, layout) for g, n in ((2, 6), (4, 1), (4, 4), (3, 5))
                for hops in HOPS for layout in ("BLHD", "BHDL")]
    else:  # CI: every hops, both layouts, tiny shards (one token; fewer than a block)
        plan = [(4, 1, 2, "BLHD"), (4, 3, None, "BHDL"), (2, 6, 0, "BHDL"), (4, 3, 1, "BLHD")]
    for g, n, hops, layout in plan:
        mesh = Mesh(np.array(jax.devices()[:g]), ("cp",))
        N = g * n
        per_head = layout == "BLHD"
        rng = np.random.default_rng(_seed("jax", g, n, hops, layout))
        B, H, D = 2, 2, 3
        ushape = (B, N, H, D) if layout == "BLHD" else (B, H, D, N)
        ashape = (B, N, H) if per_head else ushape
        a = jnp.asarray(rng.uniform(-1, 1, ashape))
        u = jnp.asarray(rng.normal(size=ushape))
        dy = jnp.asarray(rng.normal(size=ushape))
        x0 = jnp.asarray(rng.normal(size=(B, H, D)))
        kw = dict(block_len=BLOCK_LEN, hops=hops, layout=layout)
        ts = P(None, "cp") if layout == "BLHD" else P(None, None, None, "cp")

        def cp_fn(a, u, x0, kw=kw):
            return sj.swr(a, u, x0=x0, cp_axis="cp", **kw)

        sm = shard_map(cp_fn, mesh=mesh, in_specs=(ts, ts, P()), out_specs=ts)

        def run(f, a, u, x0, dy=dy):
            y, vjp = jax.vjp(f, a, u, x0)
            return y, vjp(dy)

        y, want = run(lambda a, u, x0, kw=kw: sj.swr(a, u, x0=x0, **kw), a, u, x0)
        ys, got = jax.jit(functools.partial(run, sm))(a, u, x0)
        for name, gt, wt in zip(("y", "da", "du", "dx0"), (ys, *got), (y, *want)):
            np.testing.assert_allclose(np.asarray(gt), np.asarray(wt), rtol=1e-9, atol=1e-9,
                                       err_msg=f"{name} {g} {n} {hops} {layout}")
        cases += 1
    # the Phalanx function, sequence sharded over "cp"
    mesh = Mesh(np.array(jax.devices()[:4]), ("cp",))  # 12 tokens: 3 per device, l = 4
    for hops in (1, None) if full else (1,):
        params = sj.init_phalanx(jax.random.PRNGKey(_seed("jphalanx", hops) % 2**31), 8,
                                 heads=2, head_dim=4, kv_heads=1, dtype=jnp.float64)
        x = jnp.asarray(np.random.default_rng(_seed("jx", hops)).normal(size=(2, 12, 8)))

        def full(params, x, hops=hops):
            return jnp.sum(jnp.sin(sj.phalanx(params, x, block_len=BLOCK_LEN, hops=hops)))

        def part(params, x, hops=hops):
            return sj.phalanx(params, x, block_len=BLOCK_LEN, hops=hops, cp_axis="cp")

        smp = shard_map(part, mesh=mesh, in_specs=(P(), P(None, "cp")), out_specs=P(None, "cp"))

        def sharded(params, x, smp=smp):
            return jnp.sum(jnp.sin(smp(params, x)))

        want = jax.grad(full, argnums=(0, 1))(params, x)
        got = jax.jit(jax.grad(sharded, argnums=(0, 1)))(params, x)
        for wt, gt in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
            np.testing.assert_allclose(np.asarray(gt), np.asarray(wt), rtol=1e-9, atol=1e-9)
        cases += 1
    print(f"jax cases: {cases}")


if __name__ == "__main__":
    jax_main(int(sys.argv[1]), full=len(sys.argv) > 2 and sys.argv[2] == "full")
