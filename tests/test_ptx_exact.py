"""Every specialisation of the one-pass exact scan (numba_kernels/exact_scan.py) compiles to PTX
for sm_80 and sm_90 (no GPU needed): no local memory (the per-thread registers are indexed by
constants), 16-byte loads and stores on the vector paths, the status values read through L2
(``ld.global.cg``), the flags and tickets by atomics, and the entry's parameters are the
flattened Numba ABI the launcher packs."""

from __future__ import annotations

import functools

import numba
import pytest
from ptx_arches import compile_in_workers

pytestmark = pytest.mark.skipif(bool(numba.config.ENABLE_CUDASIM),
                                reason="compile_ptx needs the real CUDA target, not the simulator")

if not numba.config.ENABLE_CUDASIM:
    from swr_array.numba_kernels import exact_scan as EX

    NAMES = [name for name, _, _ in EX.specialisations()]
else:
    NAMES = []


def _compile(i):
    """{cc: PTX} of specialisation i, or the error it raised (in a worker process)."""
    from ptx_arches import compile_arches, kernel_options
    from swr_array.numba_kernels import exact_scan

    _, kernel, sig = list(exact_scan.specialisations())[i]
    try:
        return compile_arches(kernel.py_func, sig, **kernel_options(kernel))
    except Exception as exc:  # noqa: BLE001 - reported by the test of this specialisation
        return RuntimeError(f"{type(exc).__name__}: {str(exc)[:2000]}")


@functools.lru_cache(maxsize=1)
def all_ptx():
    return compile_in_workers(_compile, range(len(NAMES)))



def test_every_specialisation_compiles():
    """One test for all of them (compiled once, in a process pool over the cores): under
    pytest-xdist a single worker compiles them."""
    from swr_array.numba_kernels._launch import entry_and_params

    problems = []
    for name, res in zip(NAMES, all_ptx()):
        if isinstance(res, Exception):
            problems.append(f"{name}: {res}")
            continue
        problems += [f"{name} sm{cc[0]}{cc[1]}: {p}" for cc, ptx in res.items()
                     for p in _check(name, ptx, entry_and_params)]
    assert not problems, "\n".join(problems)


def _check(name, ptx, entry_and_params):
    """What is wrong with one kernel's PTX (empty: nothing)."""
    out = []
    backward = "_backward_" in name
    entry, params = entry_and_params(ptx)
    if name.removesuffix("_window").removesuffix("_one") not in entry:
        out.append(f"entry {entry}")
    arrays, scalars = (10, 6) if backward else (7, 6)
    if len(params) != arrays * 7 + scalars or set(params) != {"u64"}:
        out.append(f"parameters {params}")
    if ".local" in ptx:
        out.append("local memory")
    if not ("ld.global.cg.f32" in ptx and "atom.global.add.u64" in ptx
            and "atom.global.max.s64" in ptx and "membar.gl" in ptx):
        out.append("status protocol (ld.global.cg, atomics, fences)")
    if name.endswith("_window") or ("_one" not in name and EX.TUNING["lookback_window"]):
        if "ld.volatile.global.s64" not in ptx:
            out.append("the window's flag reads")
    if "_vec1_" not in name:
        if "ld.global.v4.u32" not in ptx:
            out.append("16-byte loads")
        wide = "st.global.v4" in ptx or "st.global.v2" in ptx
        if "_carries" not in name and ("bhdl" in name or "_to_f32_" in name or backward):
            if not wide:
                out.append("wide stores")
    if "_carries" in name and "st.global.v" in ptx:
        out.append("the carries kernel stores y")
    return out
