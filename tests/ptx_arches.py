"""PTX for every supported architecture (sm_80 and sm_90) from one lowering per specialisation.

The kernels need compute capability 8.0 (cp.async) and are run on sm_90: the PTX tests compile
every specialisation for both. Numba's lowering to NVVM IR depends on the compute capability only
below 7.5 (float64 atomics, fast tanh), so the IR lowered once is the IR either target would get;
NVVM then emits the PTX of each architecture from it, which costs a fraction of a second instead
of a second compilation.
"""

from __future__ import annotations

ARCHES = ((8, 0), (9, 0))


def compile_arches(pyfunc, sig, *, fastmath=False, lineinfo=False, launch_bounds=None) -> dict:
    """{cc: PTX text} of ``pyfunc`` (a kernel's Python function) for ``sig`` on every arch."""
    from numba import cuda

    try:
        from numba.cuda.compiler import _compile_pyfunc_with_fixup
    except ImportError:  # another numba-cuda: compile once per architecture
        return {cc: cuda.compile_ptx(pyfunc, tuple(sig), cc=cc, fastmath=fastmath,
                                     lineinfo=lineinfo, launch_bounds=launch_bounds)[0]
                for cc in ARCHES}
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
    return out


def kernel_options(kernel) -> dict:
    """The compile options a ``@cuda.jit`` dispatcher was declared with (as compile_for reads)."""
    opts = getattr(kernel, "targetoptions", {}) or {}
    return dict(fastmath=bool(opts.get("fastmath", False)),
                lineinfo=bool(opts.get("lineinfo", False)),
                launch_bounds=opts.get("launch_bounds"))
