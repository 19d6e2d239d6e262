"""Every forward-kernel specialisation the entry points can launch compiles to PTX for sm_80 and
sm_90 (the supported architectures: cp.async needs sm_80).

No GPU needed (NVVM from the numba-cuda[cu13] wheels). Catches typing and lowering errors that the
CUDA simulator never sees, and checks what the kernels are designed around: the scan state stays
in registers (no local memory), the vector paths really issue 16-byte loads and wide stores, and
the entry's parameter list is the flattened Numba ABI the launcher packs.

About 240 kernels at 1-2 s each: they compile in a process pool over the available cores, each
lowered once and emitted for both architectures (tests/ptx_arches.py).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ProcessPoolExecutor

import numba
import pytest
from ptx_arches import ARCHES, compile_arches, kernel_options, nvvm_or_skip

pytestmark = pytest.mark.skipif(
    bool(numba.config.ENABLE_CUDASIM),
    reason="compile_ptx needs the real CUDA target, not the simulator",
)

CC = (9, 0)  # the launcher ABI probe below (the same on every architecture)
ARRAY_ARGS, SCALAR_ARGS = 9, 11  # see numba_kernels/swr_forward.py: kernel arguments


def _check(ptx: str, name: str) -> list[str]:
    """Problems found in one kernel's PTX (empty: fine)."""
    from swr_array.numba_kernels._launch import entry_and_params

    problems = []
    entry, params = entry_and_params(ptx)
    if name not in entry:
        problems.append(f"entry {entry} does not carry the kernel name")
    if len(params) != ARRAY_ARGS * 7 + SCALAR_ARGS or set(params) != {"u64"}:
        problems.append(f"parameters {params} are not 9 1-D arrays and 11 int64")
    if ".local" in ptx:
        problems.append("uses local memory (a register array indexed at run time?)")
    vec = int(re.search(r"_vec(\d+)", name).group(1))
    if vec > 1:
        if "_stages" in name:  # cp.async into shared memory, read back 16 bytes at a time
            if "cp.async.cg.shared.global" not in ptx or "cp.async.wait_group" not in ptx:
                problems.append("pipelined path without cp.async copies and waits")
            if "ld.shared.v4.u32" not in ptx:
                problems.append("pipelined path without 16-byte reads of its shared memory")
            aligns = set(re.findall(r"\.shared \.align (\d+) ", ptx))
            if aligns - {"16"}:
                problems.append(f"static shared arrays aligned to {aligns}, not 16 bytes")
        elif "ld.global.v4.u32" not in ptx:
            problems.append("vector path without 16-byte loads")
        if "carriers" not in name and not re.search(r"st\.global\.v[24]\.u32", ptx):
            problems.append("vector path without 8/16-byte stores")
    return problems


def _compile_some(indices):
    from swr_array.numba_kernels.swr_forward import specialisations

    specs = list(specialisations())
    failures = []
    for i in indices:
        name, kernel, sig = specs[i]
        try:
            ptxs = compile_arches(kernel.py_func, sig, **kernel_options(kernel))
            problems = [f"sm_{cc[0]}{cc[1]}: {p}" for cc in ARCHES for p in _check(ptxs[cc], name)]
        except Exception as exc:  # noqa: BLE001 - report every failing specialisation at once
            problems = [f"{type(exc).__name__}: {str(exc)[:400]}"]
        failures += [f"{name}: {p}" for p in problems]
    return failures


def test_every_forward_specialisation_compiles_for_sm80_and_sm90():
    nvvm_or_skip()
    from swr_array.numba_kernels.swr_forward import specialisations

    specs = list(specialisations())
    names = [s[0] for s in specs]
    assert len(set(names)) == len(names), "kernel names must tell specialisations apart"
    # both layouts, all modes, dtypes, a-sharing and vector widths are enumerated
    expected = ("blhd", "bhdl", "hops0", "hops1", "block_carry", "carriers", "per_head",
                "per_channel", "_vec1_", "_vec8_", "_vec4_", "bf16_to_f16", "f32_to_bf16")
    for part in expected:
        assert any(part in n for n in names), part
    workers = max(1, min(os.cpu_count() or 1, 8))
    slices = [list(range(k, len(specs), workers)) for k in range(workers)]
    if workers == 1:
        failures = _compile_some(slices[0])
    else:
        with ProcessPoolExecutor(workers) as pool:
            failures = [f for part in pool.map(_compile_some, slices) for f in part]
    assert not failures, "\n".join(failures)


def test_launcher_reads_the_numba_array_abi_from_ptx():
    """The parameter list the launcher packs: per 1-D array meminfo, parent, nitems, itemsize,
    data, shape, stride (7 x u64), per int64 scalar one u64, in argument order."""
    nvvm_or_skip()
    from numba import cuda, types
    from swr_array.numba_kernels import compile_for
    from swr_array.numba_kernels._launch import entry_and_params

    @cuda.jit
    def probe(x, n, y, s):
        i = cuda.grid(1)
        if i < n:
            y[i, 0] = x[i] * s

    sig = (types.Array(types.float32, 1, "C"), types.int64,
           types.Array(types.float32, 2, "C"), types.float32)  # fmt: skip
    ptx = compile_for(probe, sig, CC)
    entry, params = entry_and_params(ptx)
    assert "probe" in entry
    assert params == ["u64"] * 7 + ["u64"] + ["u64"] * 9 + ["f32"]
    # the data pointer is parameter 4 of an array, the 1-D shape parameter 5
    body = ptx[ptx.index(entry) :]
    assert re.search(rf"ld\.param\.u64\s+%rd\d+, \[{re.escape(entry)}_param_4\]", body)
