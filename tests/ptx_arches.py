"""PTX for every supported architecture (sm_80 and sm_90) from one lowering per specialisation.

The kernels need compute capability 8.0 (cp.async) and are run on sm_90: the PTX tests compile
every specialisation for both. Numba's lowering to NVVM IR depends on the compute capability only
below 7.5 (float64 atomics, fast tanh), so the IR lowered once is the IR either target would get;
NVVM then emits the PTX of each architecture from it, which costs a fraction of a second instead
of a second compilation.
"""

from __future__ import annotations

import os

ARCHES = ((8, 0), (9, 0))

ASSEMBLE_CC = (9, 0)
"""The architecture whose PTX is also assembled to machine code (ptxas, through nvJitLink): NVVM
accepts code that ptxas may still refuse (inline PTX, vector widths, register limits)."""


def nvvm_or_skip() -> None:
    """Skip the calling test when NVVM (numba-cuda[cu13]'s libnvvm) cannot be loaded."""
    import pytest

    try:
        from numba.cuda.cudadrv.nvvm import NVVM

        NVVM()
    except Exception as exc:  # noqa: BLE001 - no NVVM library: nothing to compile with
        pytest.skip(f"NVVM is not available ({exc}); install numba-cuda[cu13]")


def compile_in_workers(fn, items) -> list:
    """``[fn(item) for item in items]`` in a pool of spawned processes over the cores (NVVM
    compiles one kernel on one core), after :func:`nvvm_or_skip`. ``fn`` is a module-level
    function of a test module; it returns a compile error rather than raising it, so that the
    test of that item reports it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    nvvm_or_skip()
    items = list(items)
    workers = max(1, min(len(items), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, items))


def compile_arches(pyfunc, sig, *, fastmath=False, lineinfo=False, launch_bounds=None) -> dict:
    """{cc: PTX text} of ``pyfunc`` (a kernel's Python function) for ``sig`` on every arch; the
    PTX of :data:`ASSEMBLE_CC` is also assembled (:func:`assemble`), so code ptxas refuses fails."""
    from numba import cuda

    try:
        from numba.cuda.compiler import _compile_pyfunc_with_fixup
    except ImportError:  # another numba-cuda: compile once per architecture
        out = {cc: cuda.compile_ptx(pyfunc, tuple(sig), cc=cc, fastmath=fastmath,
                                    lineinfo=lineinfo, launch_bounds=launch_bounds)[0]
               for cc in ARCHES}
        assemble(out[ASSEMBLE_CC], ASSEMBLE_CC)
        return out
    lib, _ = _compile_pyfunc_with_fixup(
        pyfunc, tuple(sig), debug=False, lineinfo=lineinfo, device=False, fastmath=fastmath,
        cc=ARCHES[0], opt=True, abi="numba", abi_info=None, forceinline=False,
        launch_bounds=launch_bounds, lto=False,
    )
    out = {}
    for cc in ARCHES:
        (ptx,) = lib.get_asm_strs(cc=cc)
        target = ".target sm_{}{}".format(*cc)
        if target not in ptx:
            raise RuntimeError(f"PTX for cc {cc} lacks {target!r}")
        out[cc] = ptx
    assemble(out[ASSEMBLE_CC], ASSEMBLE_CC)
    return out


def assemble(ptx: str, cc=ASSEMBLE_CC) -> list[dict]:
    """Assemble ``ptx`` for ``cc`` with ptxas (nvJitLink, no GPU needed); raise RuntimeError with
    ptxas's log if it refuses the code. Returns, per kernel entry, what ptxas reports: registers,
    stack frame and spill bytes. With SWR_PTXAS_REPORT=PATH set, also appends them to PATH as
    JSON lines (scripts/kernel_resources.py reads them)."""
    import json
    import re

    from cuda.bindings import nvjitlink

    data = ptx.encode()
    handle = nvjitlink.create(2, [f"-arch=sm_{cc[0]}{cc[1]}".encode(), b"-verbose"])
    try:
        try:
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as exc:
            log = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, log)
            raise RuntimeError(f"ptxas refused the PTX for sm_{cc[0]}{cc[1]}: "
                               f"{log.decode(errors='replace')[:4000]}") from exc
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    text = log.decode(errors="replace")
    found = []
    blocks = re.split(r"ptxas info\s*: Compiling entry function ", text)[1:]
    for block in blocks:
        name = re.match(r"'([^']+)'", block)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                          r"loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        if not (name and frame and regs):
            raise RuntimeError(f"unexpected ptxas report: {block[:400]}")
        found.append(dict(entry=name.group(1), cc=f"sm_{cc[0]}{cc[1]}",
                          registers=int(regs.group(1)), stack=int(frame.group(1)),
                          spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3))))
    if not found:
        raise RuntimeError(f"ptxas reported no kernel entry: {text[:400]}")
    path = os.environ.get("SWR_PTXAS_REPORT")
    if path:
        with open(path, "a") as f:
            for row in found:
                f.write(json.dumps(row) + "\n")
    return found


def kernel_options(kernel) -> dict:
    """The compile options a ``@cuda.jit`` dispatcher was declared with (as compile_for reads)."""
    opts = getattr(kernel, "targetoptions", {}) or {}
    return dict(fastmath=bool(opts.get("fastmath", False)),
                lineinfo=bool(opts.get("lineinfo", False)),
                launch_bounds=opts.get("launch_bounds"))
