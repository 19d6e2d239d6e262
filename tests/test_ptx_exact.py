"""Every specialisation of the hops=None two-pass forward (numba_kernels/swr_exact.py) compiles to
PTX for sm_80 and sm_90 with its state in registers, 16-byte loads and wide stores on the vector
path, and the parameter list the launcher packs (7 arrays, 8 int64)."""

from __future__ import annotations

import os
import re
from concurrent.futures import ProcessPoolExecutor

import numba
import pytest
from ptx_arches import ARCHES, compile_arches, kernel_options
from test_ptx import _nvvm_or_skip

pytestmark = pytest.mark.skipif(
    bool(numba.config.ENABLE_CUDASIM),
    reason="compile_ptx needs the real CUDA target, not the simulator",
)


def _check(ptx, name):
    from swr_array.numba_kernels._launch import entry_and_params

    problems = []
    entry, params = entry_and_params(ptx)
    if name not in entry:
        problems.append(f"entry {entry} does not carry the kernel name")
    if len(params) != 7 * 7 + 8 or set(params) != {"u64"}:
        problems.append(f"parameters {params} are not 7 1-D arrays and 8 int64")
    if ".local" in ptx:
        problems.append("uses local memory (a register array indexed at run time?)")
    if int(re.search(r"_vec(\d+)", name).group(1)) > 1:
        if "ld.global.v4.u32" not in ptx and "ld.global.nc.v4.u32" not in ptx:
            problems.append("vector path without 16-byte loads")
        if "_scan_" in name and not re.search(r"st\.global\.v[24]\.u32", ptx):
            problems.append("vector path without 8/16-byte stores")
    return problems


def _compile_some(indices):
    from swr_array.numba_kernels.swr_exact import specialisations

    specs = list(specialisations())
    failures = []
    for i in indices:
        name, kernel, sig = specs[i]
        try:
            ptxs = compile_arches(kernel.py_func, sig, **kernel_options(kernel))
            failures += [f"{name}: sm_{cc[0]}{cc[1]}: {p}" for cc in ARCHES
                         for p in _check(ptxs[cc], name)]  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - report every failing specialisation at once
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:400]}")
    return failures


def test_every_exact_specialisation_compiles_for_sm80_and_sm90():
    _nvvm_or_skip()
    from swr_array.numba_kernels.swr_exact import specialisations

    names = [s[0] for s in specialisations()]
    assert len(set(names)) == len(names), "kernel names must tell specialisations apart"
    for part in ("_agg_", "_scan_", "per_head", "per_channel", "_vec1_", "_vec8_", "_vec4_",
                 "bf16_to_f16", "f32_to_bf16", "f16_to_f32", "_blhd_", "_bhdl_"):
        assert any(part in n for n in names), part
    workers = max(1, min(os.cpu_count() or 1, 8))
    slices = [list(range(k, len(names), workers)) for k in range(workers)]
    if workers == 1:
        failures = _compile_some(slices[0])
    else:
        with ProcessPoolExecutor(workers) as pool:
            failures = [f for part in pool.map(_compile_some, slices) for f in part]
    assert not failures, "\n".join(failures)
