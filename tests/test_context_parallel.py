"""Context parallelism: one sequence split along L over ranks (swr_array.context_parallel).

- the NumPy simulation of the protocol (only the published summaries cross shards) equals the
  reference on the whole sequence, for ragged, empty and tiny shards;
- torch.distributed with gloo, 3 processes started here (one process group for all cases, with
  subgroups of 2 and 3 ranks): outputs and gradients in a, u, x0 (and Phalanx's input and weight
  gradients) equal the single-process call, hops 0, 1, 2, None, both layouts;
- JAX: shard_map over 2 to 4 host devices in a subprocess (XLA_FLAGS must not leak into the
  other tests' JAX), under jit and vjp;
- GPU (marked ``gpu``, needs 2+ GPUs): the torch cases with NCCL.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from swr_array import context_parallel as cp
from swr_array import reference

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("hops", [0, 1, 2, 3, None])
@pytest.mark.parametrize("block_len", [1, 4, 8])
def test_simulation_matches_reference(rng, hops, block_len):
    for lengths in ([5, 0, 3, 17, 1, 2, 9], [8, 8, 8], [1, 1, 1, 1, 30], [37], [0, 4]):
        N = sum(lengths)
        a = rng.uniform(-1, 1, (2, 3, N))
        u = rng.normal(size=(2, 3, N))
        x0 = rng.normal(size=(2, 3))
        want = reference.swr(a, u, block_len=block_len, hops=hops, x0=x0)
        got = cp.swr_sharded(a, u, lengths, block_len=block_len, hops=hops, x0=x0)
        assert [g.shape[-1] for g in got] == lengths
        np.testing.assert_allclose(np.concatenate(got, -1), want, rtol=1e-10, atol=1e-10)


def test_summary_blocks_and_plan():
    # a shard inside one block publishes that block only; a long one its last k + 1 blocks
    assert cp.summary_blocks(5, 2, 4, 2) == (5, [1])
    assert cp.summary_blocks(3, 14, 4, 1) == (12, [3, 4])
    assert cp.summary_blocks(3, 0, 4, 1) == (3, [])
    assert cp.shard_starts([2, 0, 5]) == [0, 2, 2]
    # rank 3 of [1, 2, 1, 13] (l=4, k=2) starts at 4 in block 1: carriers are blocks 0 and -1
    pieces, carriers, first, offset = cp.incoming_plan([1, 2, 1, 13], 3, 4, 2)
    assert (carriers, first, offset) == ([0, -1], 1, 0)
    assert pieces == {-1: [], 0: [(0, 0), (1, 0), (2, 0)], 1: []}


def test_torch_gloo():
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    sys.path.insert(0, HERE)
    try:
        import cp_workers
    finally:
        sys.path.remove(HERE)
    del torch
    mp.spawn(cp_workers.torch_worker, args=(3, _free_port()), nprocs=3, join=True)


def test_torch_cp_group_rejects_state():
    torch = pytest.importorskip("torch")
    from swr_array.adapters import torch as st

    a = torch.rand(1, 4, 2, dtype=torch.float64)
    u = torch.rand(1, 4, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="cp_group"):
        st.swr(a, u, layout="BLHD", return_state=True, cp_group=object())
    layer = st.Phalanx(8, heads=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="cp_group"):
        layer(torch.rand(1, 3, 8, dtype=torch.float64), return_state=True, cp_group=object())


def test_jax_shard_map():
    pytest.importorskip("jax")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run([sys.executable, os.path.join(HERE, "cp_workers.py"), "4"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "jax cases: 5" in res.stdout


@pytest.mark.gpu
def test_torch_nccl():
    torch = pytest.importorskip("torch")
    import torch.multiprocessing as mp

    world = min(torch.cuda.device_count(), 4)
    if world < 2:
        pytest.skip("context parallelism over NCCL needs 2+ GPUs")
    sys.path.insert(0, HERE)
    try:
        import cp_workers
    finally:
        sys.path.remove(HERE)
    mp.spawn(cp_workers.torch_worker, args=(world, _free_port(), "nccl"), nprocs=world,
             join=True)
