"""Every specialisation of the backward kernels compiles to PTX for sm_80 and sm_90 (no GPU).

Catches typing and lowering errors that the CUDA simulator never sees. The kernels and their
argument types are taken from the wrappers themselves (``launch`` replaced by a recorder), so the
signatures are the ones the launcher builds. Also checks what the fused kernel is built for: 8-byte
word loads, one ``cvt.rn.*x2.f32`` per pair of 16-bit outputs, shuffles, nothing in local memory.

Compiling a fused specialisation takes several seconds (Numba inlines its helpers), so all of them
compile up front in a pool of processes, one per core.
"""

from __future__ import annotations

import functools
import importlib
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
    specs = []
    for layout in ("BHDL", "BLHD"):
        for kind in DTYPES:
            for per_head in (True, False):
                for hops in (0, 1):
                    specs.append(("walk", layout, kind, kind, per_head, hops, 16))
                    specs.append(("general", layout, kind, kind, per_head, hops, 16))
                specs.append(("blocks", layout, kind, kind, per_head, None, 16))
                specs.append(("grad_sums", layout, kind, kind, per_head, None, 16))
        for block_len in (8, 32, 64):
            specs.append(("walk", layout, "bf16", "bf16", True, 1, block_len))
        specs.append(("walk", layout, "bf16", "f32", True, 1, 16))
        specs.append(("general", layout, "bf16", "bf16", True, 1, 256))
    # the BLHD channel kernel (whole blocks): every mode in bf16, each dtype once
    for per_head in (True, False):
        for hops in (0, 1):
            specs.append(("channel", "BLHD", "bf16", "bf16", per_head, hops, 16))
    specs.append(("channel", "BLHD", "f32", "f32", True, 1, 16))
    specs.append(("channel", "BLHD", "f16", "f16", False, 1, 16))
    specs.append(("channel", "BLHD", "bf16", "f32", True, 1, 16))
    specs.append(("channel_partial", "BLHD", "bf16", "bf16", True, 1, 16))  # N % 16 != 0
    for kind in DTYPES:  # the BHDL row kernel
        for per_head in (True, False):
            specs.append(("channel", "BHDL", kind, kind, per_head, 1, 16))
    specs.append(("channel", "BHDL", "bf16", "bf16", True, 0, 16))
    specs.append(("channel", "BHDL", "bf16", "f32", True, 1, 16))
    # the BLHD staged kernel (per head, whole blocks): each dtype, block_len 8 / 16
    for hops in (0, 1):
        specs.append(("staged", "BLHD", "bf16", "bf16", True, hops, 16))
    specs.append(("staged", "BLHD", "f32", "f32", True, 1, 16))
    specs.append(("staged", "BLHD", "f16", "f16", True, 1, 8))
    specs.append(("staged", "BLHD", "bf16", "f32", True, 1, 16))
    for kind in DTYPES:  # the BHDL row scan
        for hops in (0, 1):
            specs.append(("row_scan", "BHDL", kind, kind, True, hops, 16))
    for block_len in (8, 32, 64):
        specs.append(("row_scan", "BHDL", "bf16", "bf16", True, 1, block_len))
    specs.append(("row_scan", "BHDL", "bf16", "f16", True, 1, 16))
    # ... with its loads through registers instead of the cp.async ring
    specs.append(("row_scan_regs", "BHDL", "bf16", "bf16", True, 1, 16))
    specs.append(("row_scan_regs", "BHDL", "f32", "f32", True, 0, 16))
    specs += [("scan", None, "f32", "f32", False, 0, 0), ("scan", None, "f32", "f32", False, 1, 0)]
    return specs


SPECS = _spec_list()


def _spec_id(spec):
    what, layout, ku, kd, per_head, hops, block_len = spec
    return "-".join(str(x) for x in (what, layout, ku, kd, "head" if per_head else "channel",
                                      f"hops{hops}", f"L{block_len}"))


def _arrays(layout, ku, kd, per_head, N=64, B=1, H=4, D=16):
    """Zero / one inputs of one spec (only their shapes and dtypes matter here)."""
    ushape = (B, H, D, N) if layout == "BHDL" else (B, N, H, D)
    ashape = ushape if not per_head else ((B, H, N) if layout == "BHDL" else (B, N, H))
    a = np.ones(ashape, DTYPES[ku])
    u = np.zeros(ushape, DTYPES[ku])
    dy = np.zeros(ushape, DTYPES[kd])
    return a, u, dy, (B, H, D)


def recorded_launch(spec, **options):
    """(kernel, Numba signature) that the wrapper would launch for this spec (``options`` go
    to swr_backward: lanes, threads)."""
    from numba import types

    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    scan = importlib.import_module("swr_array.numba_kernels.block_scan")
    seen = []

    def record(kernel, grid, block, args, stream=None, shared_mem=0):
        sig = []
        for x in args:
            if isinstance(x, np.ndarray):
                sig.append(types.Array(numba.from_dtype(x.dtype), x.ndim, "C"))
            else:
                sig.append({np.int64: types.int64, np.float32: types.float32}[type(x)])
        seen.append((kernel, tuple(sig)))

    what, layout, ku, kd, per_head, hops, block_len = spec
    saved = mod.launch, scan.launch
    mod.launch = scan.launch = record
    staged = (mod.TUNING["staged"], mod.TUNING["row_scan_stages"])
    if what == "row_scan_regs":
        mod.TUNING["row_scan_stages"] = 0
        what = "row_scan"
    elif what.startswith("staged"):
        mod.TUNING["staged"] = True
        what = "channel"
    elif what.startswith("channel"):
        mod.TUNING["staged"] = False  # the plain channel kernel
    try:
        if what == "scan":
            x = np.zeros((3, 5), np.float32)
            scan.linear_scan(x, x, x.copy(), np.zeros(3, np.float32), reverse=bool(hops))
        else:
            a, u, dy, bhd = _arrays(layout, ku, kd, per_head,
                                    N=60 if what == "channel_partial" else 64)
            f32 = np.zeros(bhd, np.float32)
            nb = -(-u.shape[-1 if layout == "BHDL" else 1] // block_len)
            blk = np.zeros(bhd + (nb,), np.float32)
            if what == "grad_sums":
                mod.block_grad_sums(a, dy, blk, layout=layout, block_len=block_len)
            elif what == "blocks":
                mod.swr_backward_blocks(a, u, dy, u.copy(), a.copy(), layout=layout,
                                        block_len=block_len, block_carry=blk, block_dv=blk,
                                        block_dC=blk)
            else:
                mod.swr_backward(a, u, dy, u.copy(), a.copy(), layout=layout,
                                 block_len=block_len, hops=hops, carry=f32, dcarry=f32.copy(),
                                 variant=what.replace("_partial", ""), **options)
    finally:
        mod.launch, scan.launch = saved
        mod.TUNING["staged"], mod.TUNING["row_scan_stages"] = staged
    assert len(seen) == 1, seen
    return seen[0]


def compile_spec(spec):
    """PTX text of one spec, or the error it raised (runs in a worker process)."""
    try:

        kernel, sig = recorded_launch(spec)
        return compile_arches(kernel.py_func, sig)
    except Exception as exc:  # noqa: BLE001 - reported by the test of this spec
        return exc


@functools.lru_cache(maxsize=1)
def all_ptx():
    return dict(zip(SPECS, compile_in_workers(compile_spec, SPECS)))


@pytest.mark.parametrize("spec", SPECS, ids=[_spec_id(s) for s in SPECS])
def test_compiles_to_ptx(spec):
    ptxs = all_ptx()[spec]
    if isinstance(ptxs, Exception):
        raise ptxs
    assert set(ptxs) == set(ARCHES)
    for cc, ptx in ptxs.items():  # the same checks on every architecture
        try:
            _check_ptx(spec, ptx)
        except AssertionError as exc:
            raise AssertionError(f"sm_{cc[0]}{cc[1]}: {exc}") from exc


def _check_ptx(spec, ptx):
    assert ".entry" in ptx
    what, layout, ku, kd, per_head, hops, block_len = spec
    if what == "walk":
        assert "ld.global.u64" in ptx  # four 16-bit / two float32 elements per access
        assert "st.global.u64" in ptx
        assert "ld.local" not in ptx and "st.local" not in ptx  # tiles live in registers
        if ku != "f32":
            assert f"cvt.rn.{ku}x2.f32" in ptx
        mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
        lanes, uph = mod.walk_plan(layout, per_head, ku, kd, block_len, 64, 4, 16)
        if lanes > 1 or (per_head and uph > 1):
            assert "shfl.sync" in ptx
    if what.startswith("channel"):
        assert "ld.global.v4.u32" in ptx  # 16 bytes of u per access
        assert ("shfl.sync" in ptx) == per_head  # the head sum of da over 2 (16-bit) / 4 lanes
        name = recorded_launch(spec)[0].py_func.__name__
        if layout == "BLHD":
            assert name.endswith("_full") == (what == "channel")
        else:
            assert name.startswith("swr_backward_rows") and "_depth2_" in name
    if what.startswith("row_scan"):
        name = recorded_launch(spec)[0].py_func.__name__
        assert name.startswith("swr_backward_row_scan"), name
        assert re.search(r"st\.global\.v4\.u32", ptx)
        assert "shfl.sync.idx" in ptx  # the carrier, q and the backward segmented scan
        assert "ld.local" not in ptx and "st.local" not in ptx
        ring = what != "row_scan_regs"  # TUNING's 4-row ring
        assert ("_stages4" in name) == ring, name
        assert ("cp.async.cg.shared.global" in ptx) == ring  # u, dy and a through the ring
        if ring:
            assert "cp.async.wait_group 3;" in ptx and "ld.shared.v4.u32" in ptx
            # 16-byte copies and reads need 16-byte aligned arrays (the dtype's own alignment
            # put one at a 2-byte boundary: misaligned addresses on the GPU)
            shared = re.findall(r"\.shared \.align (\d+) ", ptx)
            assert shared and set(shared) == {"16"}, shared
        else:
            assert "ld.global.v4.u32" in ptx
    if what.startswith("staged"):
        name = recorded_launch(spec)[0].py_func.__name__
        assert name.startswith("swr_backward_staged")
        assert "cp.async.cg.shared.global" in ptx and "cp.async.wait_group" in ptx
        assert "ld.shared.v4.u32" in ptx  # 16 bytes of u (and dy) back from shared memory
        assert "shfl.sync" in ptx  # the head sum of da over 2 (16-bit) or 4 (float32) lanes
        # a by 4-byte copies (.ca: .cg takes 16 bytes only)
        assert re.search(r"cp\.async\.ca\.shared\.global \[s\], \[%rd\d+\], 4;", ptx)
        assert "ld.local" not in ptx and "st.local" not in ptx


def test_fused_kernel_is_chosen_for_the_benchmark_shapes():
    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    for layout in ("BHDL", "BLHD"):
        for kind in DTYPES:
            assert mod.walk_plan(layout, True, kind, kind, 16, 8192, 128, 16) is not None
            assert mod.walk_plan(layout, False, kind, kind, 16, 8192, 128, 16) is not None


def test_ptx_cache_keys_tell_specialisations_apart():
    """The launcher caches PTX on disk under a key made of the kernel's closure and signature;
    two different specialisations with one key would load each other's PTX."""
    launch_mod = importlib.import_module("swr_array.numba_kernels._launch")
    try:
        launch_mod._cache_key(*recorded_launch(SPECS[0]), (9, 0))
    except Exception as exc:  # noqa: BLE001 - no NVVM to version the key with
        pytest.skip(f"cannot build cache keys here ({exc})")
    mod = importlib.import_module("swr_array.numba_kernels.swr_backward")
    cases = [(spec, {}) for spec in SPECS]
    for layout in ("BHDL", "BLHD"):
        for kind in DTYPES:
            uph = mod.walk_plan(layout, True, kind, kind, 16, 64, 4, 16)[1]
            for lanes, threads in ((1, 128), (2, 64), (2, 128), (4, 128), (8, 256)):
                words = 16 // lanes % mod.ELEMS_PER_WORD[kind] if layout == "BHDL" else 0
                if lanes * uph <= 32 and not words:
                    spec = ("walk", layout, kind, kind, True, 1, 16)
                    cases.append((spec, dict(lanes=lanes, threads=threads)))
    seen = {}
    for spec, options in cases:
        kernel, sig = recorded_launch(spec, **options)
        key = launch_mod._cache_key(kernel, sig, (9, 0))
        first = seen.setdefault(key, (spec, options, kernel))
        assert first[2] is kernel, f"{spec} {options} and {first[:2]} share a PTX cache key"
