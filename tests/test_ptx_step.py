"""Every specialisation of the in-place decoding kernels (numba_kernels/swr_step.py) compiles to
PTX for sm_80 and sm_90 (no GPU needed); the kernels keep nothing in local memory.

Kernels are specialised on shapes, hops and the launch plan, so the compiled set is
``kernel_signatures()``: every storage kind and pair, every hops mode, grouped kv heads, the
device plan of dim 2048 (one block per row, several channels per thread) and a row over several
blocks of one channel per thread.
"""

from __future__ import annotations

import functools

import numba
import pytest
from ptx_arches import ASSEMBLE_CC, assemble, compile_in_workers, nvvm_or_skip

pytestmark = pytest.mark.skipif(bool(numba.config.ENABLE_CUDASIM),
                                reason="compile_ptx needs the real CUDA target, not the simulator")

CCS = [(8, 0), (9, 0)]
if not numba.config.ENABLE_CUDASIM:
    from swr_array.numba_kernels import swr_step as KS

    SPECS = [(i, cc) for i in range(len(KS.kernel_signatures())) for cc in CCS]
else:
    SPECS = []


def _compile(job):
    """PTX of one (specialisation, cc), or the error it raised as text (in a worker process)."""
    from numba import cuda
    from swr_array.numba_kernels import swr_step

    i, cc = job
    kernel, sig = swr_step.kernel_signatures()[i]
    try:
        ptx = cuda.compile_ptx(kernel.py_func, sig, cc=cc)[0]
        if cc == ASSEMBLE_CC:
            assemble(ptx, cc)  # ptxas accepts it too
        return ptx
    except Exception as exc:  # noqa: BLE001 - reported by the test of this specialisation
        return RuntimeError(f"{type(exc).__name__}: {str(exc)[:2000]}")


@functools.lru_cache(maxsize=1)
def all_ptx():
    return compile_in_workers(_compile, SPECS)


def _id(job):
    i, cc = job
    kernel, sig = KS.kernel_signatures()[i]
    return f"{i}-{kernel.py_func.__name__}-{sig[0].dtype}-{sig[2].dtype}-sm{cc[0]}{cc[1]}"


@pytest.mark.parametrize("j", range(len(SPECS)), ids=[_id(s) for s in SPECS])
def test_compiles_to_ptx(j):
    ptx = all_ptx()[j]
    if isinstance(ptx, Exception):
        raise ptx
    assert ".entry" in ptx
    assert "bar.sync" in ptx  # the row's position advances after a barrier
    assert "ld.local" not in ptx and "st.local" not in ptx


def test_the_plan_covers_every_channel_once():
    """The device plan puts a row in one block where 1024 threads suffice, at most 8 carrier
    sets per thread, and covers the row's channels with fewer than one block of slack."""
    for hd, K in ((2048, 1), (2048, 0), (2048, 2), (2048, 4), (2048, 8), (6, 1), (16384, 1),
                  (100, 3)):
        tpb, cpt = KS._device_plan(hd, K)
        nchunks = -(-hd // (tpb * cpt))
        assert tpb % 32 == 0 and 32 <= tpb <= 1024
        assert cpt * max(K, 1) <= 8
        assert tpb * cpt * nchunks >= hd > tpb * cpt * (nchunks - 1) - tpb * cpt
        if -(-hd // cpt) <= 1024:
            assert nchunks == 1
    assert KS._device_plan(2048, 1) == (512, 4)
    assert KS.hops_mode(0) == (KS.MODE_NONE, 0)
    assert KS.hops_mode(None) == (KS.MODE_EXACT, 1)
    assert KS.hops_mode(3) == (KS.MODE_WINDOW, 3)


def test_packed_launch_rewrites_only_the_data_pointers():
    """PackedLaunch packs a launch's parameter block once; rewriting its leading arrays' data
    pointers gives the bytes the general path (``launch_with_pointers``: every value packed
    again) gives for those pointers, on a real kernel's PTX parameter list."""
    import struct

    import numpy as np
    from swr_array.numba_kernels import _launch
    from swr_array.numba_kernels._launch import FlatArray

    kernel, sig = KS.kernel_signatures()[0]
    nvvm_or_skip()
    ptx = all_ptx()[0]
    if isinstance(ptx, Exception):
        raise ptx
    _, params = _launch.entry_and_params(ptx)
    fmt, offset, offsets = ["<Q", f"{_launch._PARAM_OFFSET - 8}x"], 0, []
    for kind in params:  # the layout _launch._build_entry gives
        size = _launch._PARAM_SIZE[kind]
        pad = -offset % size
        fmt += [f"{pad}x"] if pad else []
        fmt.append({"f32": "f", "f64": "d"}.get(kind, "q" if size == 8 else "i"))
        offsets.append(offset + pad)
        offset += pad + size
    entry = _launch._Entry(0, (struct.Struct("".join(fmt)), offset), None, tuple(offsets))
    arrays = [FlatArray(4096 * (k + 1), 6 + k, np.float32) for k in range(len(sig))]
    arrays[-1] = FlatArray(1 << 40, 3, np.int32)
    _, values = _launch._flatten(arrays, 0)
    run = KS.PackedLaunch(entry, values, (4,), (32,), 3)
    new = [(1 << 33) + 256, (1 << 34) + 512, (1 << 35) + 768]
    for off, ptr in zip(run.slots, new):
        KS._U64.pack_into(run.buf, off, ptr)
    want = values[:]
    for i, ptr in enumerate(new):
        want[7 * i + 4] = ptr
    expect = np.zeros(entry.packer[0].size, np.uint8)
    entry.packer[0].pack_into(expect, 0, entry.packer[1], *want)
    np.testing.assert_array_equal(run.buf, expect)
    assert run.extra[1] == run.buf.ctypes.data + _launch._PARAM_OFFSET


def test_rows_spread_over_blocks_at_small_batch():
    """At small batch a row goes to several blocks of SPREAD_TPB threads of fewer channels each
    (the plans measured fastest by scripts/step_plan_sweep.py at dim 2048); every channel stays
    covered once, and large batches keep the row plan."""
    ph, sw = KS.SPREAD_THREADS["phalanx"], KS.SPREAD_THREADS["swr"]
    row = (512, 4, 1)
    assert KS.spread(1, 2048, *row, ph) == (128, 1, 16)
    assert KS.spread(8, 2048, *row, ph) == (128, 1, 16)
    assert KS.spread(64, 2048, *row, ph) == (128, 2, 8)
    assert KS.spread(256, 2048, *row, ph) == row
    assert KS.spread(8, 2048, *row, sw) == (128, 1, 16)
    assert KS.spread(64, 2048, *row, sw) == row
    assert KS.spread(1, 6, 32, 1, 1, ph) == (32, 1, 1)  # nothing to spread
    for B in (1, 3, 8, 20, 64, 100, 256, 1024):
        for hd, K in ((2048, 1), (2048, 8), (6, 1), (16384, 1), (100, 3)):
            tpb, cpt = KS._device_plan(hd, K)
            tpb, cpt, n = KS.spread(B, hd, tpb, cpt, -(-hd // (tpb * cpt)), ph)
            assert tpb * cpt * n >= hd > tpb * cpt * (n - 1) and tpb % 32 == 0
            assert cpt * max(K, 1) <= 8
