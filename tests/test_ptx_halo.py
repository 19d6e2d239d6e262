"""Every specialisation of the halo walks (numba_kernels/halo_walk.py) compiles to PTX for sm_80
and sm_90 (no GPU), with the argument types its launcher builds. Checks what the code-generation
rules of docs/internals.md ask: the shift registers and the group buffers live in registers (the
only local memory is the checkpoint buffer, indexed at run time), and the BLHD walk moves u in
accesses of the configured width.
"""

from __future__ import annotations

import functools
import re

import ml_dtypes
import numba
import numpy as np
import pytest
from ptx_arches import ARCHES, compile_arches, compile_in_workers

pytestmark = pytest.mark.skipif(bool(numba.config.ENABLE_CUDASIM),
                                reason="compile_ptx needs the real CUDA target, not the simulator")

DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16),
          "bf16": np.dtype(ml_dtypes.bfloat16)}


def _spec_list():
    # a backward lowering takes 15-30 s (the unrolled registers): the specialisations whose code
    # differs most (layout, per head / per channel, time vectors or scalar steps, dy's kind,
    # hops 2 and 8)
    return [  # (what, layout, ku, kd, per_head, hops)
        ("bwd", "BLHD", "bf16", "bf16", True, 2),
        ("bwd", "BLHD", "bf16", "f32", False, 8),
        ("bwd", "BHDL", "bf16", "bf16", True, 3),
        ("fwd", "BHDL", "bf16", "bf16", True, 4),
        ("fwd", "BHDL", "f32", "f32", False, 2),
        # the fused lead walk with 4-byte channel vectors (settings of halo_walk.TUNING)
        ("bwd", "BLHD", "bf16", "bf16", True, 4,
         (("bwd_fuse_lead", True), ("bwd_access_bytes", 4))),
    ]


SPECS = _spec_list()


def _spec_id(spec):
    what, layout, ku, kd, per_head, hops = spec[:6]
    extra = ["-".join(f"{k}={v}" for k, v in spec[6])] if len(spec) > 6 else []
    return "-".join([what, layout, ku, kd, "head" if per_head else "channel", f"hops{hops}"]
                    + extra)


def _tuned(spec):
    """The spec's TUNING settings applied (a context: restored after)."""
    import contextlib

    from swr_array.numba_kernels import halo_walk

    @contextlib.contextmanager
    def ctx():
        saved = dict(halo_walk.TUNING)
        for k, v in (spec[6] if len(spec) > 6 else ()):
            halo_walk.TUNING[k] = v
        try:
            yield
        finally:
            for k, v in saved.items():
                halo_walk.TUNING[k] = v

    return ctx()


def launch_of(spec, N=64, B=1, H=4, D=16, block_len=16):
    """(kernel, Numba signature, vec) that the launcher builds for this spec."""
    from numba import types
    from swr_array.numba_kernels import halo_walk

    what, layout, ku, kd, per_head, hops = spec[:6]
    ushape = (B, H, D, N) if layout == "BHDL" else (B, N, H, D)
    ashape = ushape if not per_head else ((B, H, N) if layout == "BHDL" else (B, N, H))
    a = np.ones(ashape, DTYPES[ku])
    u = np.zeros(ushape, DTYPES[ku])
    dy = np.zeros(ushape, DTYPES[kd])
    carry = np.zeros((B, H, D), np.float32)
    if what == "fwd":
        kernel, _, _, args = halo_walk._forward_launch_args(a, u, u.copy(), block_len, hops,
                                                            carry)
    else:
        kernel, _, _, args = halo_walk._launch_args(a, u, dy, u.copy(), a.copy(), layout,
                                                    block_len, hops, carry, carry.copy())
    sig = []
    for x in args:
        if isinstance(x, np.ndarray):
            sig.append(types.Array(numba.from_dtype(x.dtype), x.ndim, "C"))
        else:
            sig.append(types.int64)
    return kernel, tuple(sig)


def compile_spec(spec):
    """PTX text of one spec, or the error it raised (runs in a worker process)."""
    try:
        # BHDL float32 with N = 60: the scalar path (no whole 32-byte groups along time); the
        # others whole groups
        with _tuned(spec):
            kernel, sig = launch_of(spec, N=60 if spec[1:3] == ("BHDL", "f32") else 64)
        return compile_arches(kernel.py_func, sig)
    except Exception as exc:  # noqa: BLE001 - reported by the test of this spec
        return exc


@functools.lru_cache(maxsize=1)
def all_ptx():
    return dict(zip(SPECS, compile_in_workers(compile_spec, SPECS)))


@pytest.mark.parametrize("spec", SPECS, ids=[_spec_id(s) for s in SPECS])
def test_compiles_to_ptx(spec):
    from swr_array.numba_kernels import halo_walk

    ptxs = all_ptx()[spec]
    if isinstance(ptxs, Exception):
        raise ptxs
    assert set(ptxs) == set(ARCHES)
    what, layout, ku, kd, per_head, hops = spec[:6]
    with _tuned(spec):
        cfg = halo_walk.backward_config(layout, ku, kd, per_head, hops, 16, 4, 16)
    vec = cfg[0]
    aw = 1 if per_head else vec
    # the forward keeps nothing in local memory
    ng = 0 if what == "fwd" else -(-halo_walk.LMAX // min(halo_walk.TUNING["bwd_unroll"], 16))
    for cc, ptx in ptxs.items():
        where = f"sm_{cc[0]}{cc[1]}"
        assert ".entry" in ptx, where
        # local memory: at most the checkpoint buffers (ng groups of w and g), nothing else
        depots = [int(n) for n in re.findall(r"__local_depot\d+\[(\d+)\]", ptx)]
        assert sum(depots) <= 4 * ng * (vec + aw), (where, depots)
        if layout == "BLHD" and vec * 2 == 16 and ku != "f32":
            assert "ld.global.v4.u32" in ptx or "ld.global.v2.u64" in ptx, where
