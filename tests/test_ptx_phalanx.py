"""Every specialisation of the fused Phalanx kernels compiles to PTX for sm_80 and sm_90.

Catches typing and lowering errors that the CUDA simulator never sees, and checks that the
bfloat16 word views really become 64-/32-bit loads.
"""

from __future__ import annotations

import functools

import numba
import pytest
from ptx_arches import ARCHES, compile_arches, compile_in_workers, nvvm_or_skip

pytestmark = pytest.mark.skipif(bool(numba.config.ENABLE_CUDASIM),
                                reason="compile_ptx needs the real CUDA target, not the simulator")

if not numba.config.ENABLE_CUDASIM:
    from swr_array.numba_kernels import phalanx_fused as PF

    SPECS = PF.kernel_signatures()
else:
    SPECS = []



def _id(i, spec):
    kernel, sig = spec
    return f"{i}-{kernel.py_func.__name__}"


def _compile(i):
    """PTX of specialisation i, or the error it raised as text (runs in a worker process)."""
    from swr_array.numba_kernels import phalanx_fused

    kernel, sig = phalanx_fused.kernel_signatures()[i]
    try:
        return compile_arches(kernel.py_func, sig)
    except Exception as exc:  # noqa: BLE001 - reported by the test of this specialisation
        return RuntimeError(f"{type(exc).__name__}: {str(exc)[:2000]}")


@functools.lru_cache(maxsize=1)
def all_ptx():
    """Every specialisation's PTX, compiled in a process pool over the available cores."""
    return compile_in_workers(_compile, range(len(SPECS)))


@pytest.mark.parametrize("i", range(len(SPECS)), ids=[_id(i, s) for i, s in enumerate(SPECS)])
def test_compiles_to_ptx(i):
    ptxs = all_ptx()[i]
    if isinstance(ptxs, Exception):
        raise ptxs
    assert set(ptxs) == set(ARCHES)
    for cc, ptx in ptxs.items():  # the same checks on every architecture
        try:
            _check_ptx(i, ptx)
        except AssertionError as exc:
            raise AssertionError(f"sm_{cc[0]}{cc[1]}: {exc}") from exc


def _check_ptx(i, ptx):
    kernel, sig = SPECS[i]
    assert ".entry" in ptx
    name = kernel.py_func.__name__
    if name.startswith("phalanx_mix_forward") or "_vector_" in name:
        # VEC elements per access are one instruction
        vec = int(name.split("_vec")[1].split("_")[0])
        nbytes = vec * sig[0].dtype.bitwidth // 8
        wide = {16: "ld.global.v4.u32", 8: "ld.global.v2.u32", 4: "ld.global.u32"}
        if vec > 1:
            assert wide[nbytes] in ptx
    if name.startswith("phalanx_mix_forward"):  # nothing spills to local memory
        assert "ld.local" not in ptx


def test_every_launchable_configuration_has_a_specialisation():
    """The configurations the launch helpers pick are all in kernel_signatures()."""
    have = {id(k) for k, _ in SPECS}
    for kind in ("f32", "f16", "bf16"):
        for heads in (1, 2, 3, 4, 8, 16):
            for head_dim in (1, 2, 3, 4, 6, 7, 8, 12, 16, 64):
                for aligned in (True, False):
                    vec, unroll = PF.forward_config(kind, heads, head_dim, aligned)
                    assert head_dim % vec == 0 and heads % vec == 0
                    fast = PF.fast_sigmoid("fwd", kind)
                    assert id(PF.forward_kernel(kind, vec, unroll, None, fast)) in have
                    for block_len in (1, 2, 4, 8, 16, 32, 64):
                        cfg = PF.backward_config(kind, heads, head_dim, block_len, aligned)
                        if cfg is None:  # no split of the head into 2**k <= 32 lanes: composed
                            assert head_dim > 32 or not PF._pow2(head_dim)
                            continue
                        vec, vector, unroll, lph = cfg
                        assert vec * lph == head_dim and PF._pow2(lph) and lph <= 32
                        assert block_len * vec <= PF.BUF
                        if vector:
                            assert heads % vec == 0 and aligned
                        fast = PF.fast_sigmoid("bwd", kind)
                        assert id(PF.backward_kernel(kind, vec, vector, unroll, None, fast)) in have
                        rcfg = PF.rows_config(kind, heads, head_dim, block_len, aligned)
                        if rcfg is not None:
                            assert rcfg[0] * rcfg[1] == head_dim and heads % rcfg[0] == 0
                            assert block_len <= PF.ROWS_LMAX and aligned
                            rk = PF.backward_rows_kernel(kind, PF.TUNING["bwd_rows"], None, fast)
                            assert id(rk) in have
    assert PF.backward_config("f32", 4, 16, 128) is None


def test_launch_bounds_and_fast_sigmoid_specialisations(monkeypatch):
    """TUNING's min_blocks and fast_sigmoid knobs give kernels of their own (a name and a cache
    entry each) whose PTX carries the launch bounds and the approximate division, not the IEEE
    reciprocal of the default kernels; the bfloat16 kernels keep 16-byte loads, and the forward
    nothing in local memory (the backward's checkpoints of w live there by design). By default
    the fast sigmoid is used for 16-bit storage only."""
    nvvm_or_skip()
    from ptx_arches import kernel_options

    assert [PF.fast_sigmoid(d, k) for d in ("fwd", "bwd") for k in ("f32", "bf16")] == [
        False, True, False, True]
    monkeypatch.setitem(PF.TUNING, "fwd_min_blocks", 4)
    monkeypatch.setitem(PF.TUNING, "bwd_min_blocks", 3)
    monkeypatch.setitem(PF.TUNING, "bwd_threads_per_block", 128)
    monkeypatch.setitem(PF.TUNING, "fwd_fast_sigmoid", 1)
    monkeypatch.setitem(PF.TUNING, "bwd_fast_sigmoid", 1)
    assert PF.launch_bounds("fwd") == (256, 4) and PF.launch_bounds("bwd") == (128, 3)
    specs = PF.kernel_signatures()
    names = [k.py_func.__name__ for k, _ in specs]
    assert all(n.endswith("_lb256x4_fastsig") for n in names
               if n.startswith("phalanx_mix_forward"))  # fmt: skip
    assert all(n.endswith("_lb128x3_fastsig") for n in names
               if n.startswith("phalanx_mix_backward") and "_rows" not in n)  # fmt: skip
    rows_threads = 32 * (PF.TUNING["bwd_rows"] + 2)  # the block-row kernels' own thread blocks
    assert PF.rows_bounds() == (rows_threads, 3)
    assert all(n.endswith(f"_lb{rows_threads}x3_fastsig") for n in names
               if n.startswith("phalanx_mix_backward_rows"))  # fmt: skip
    assert PF.forward_kernel("bf16", 8, 2, (256, 4)) is not PF.forward_kernel("bf16", 8, 2)
    assert PF.forward_kernel("bf16", 8, 2, None, True) is not PF.forward_kernel("bf16", 8, 2)
    wanted = {
        "phalanx_mix_forward_bf16_vec8_unroll2_lb256x4_fastsig": (256, 4),
        "phalanx_mix_backward_bf16_vec8_vector_unroll4_lb128x3_fastsig": (128, 3),
    }
    for kernel, sig in specs:
        name = kernel.py_func.__name__
        if name not in wanted:
            continue
        opts = kernel_options(kernel)
        assert opts["launch_bounds"] == wanted[name]
        threads, blocks = wanted.pop(name)
        for cc, ptx in compile_arches(kernel.py_func, sig, **opts).items():
            assert f".maxntid {threads}" in ptx and f".minnctapersm {blocks}" in ptx, (cc, name)
            # the sigmoid's 1 / (1 + e): IEEE rcp.rn.f32 by default, div.approx.f32 here
            assert "div.approx.f32" in ptx and "rcp.rn.f32" not in ptx, (cc, name)
            assert "ld.global.v4.u32" in ptx, (cc, name)
            if "forward" in name:
                assert ".local" not in ptx, (cc, name)
    assert not wanted
    monkeypatch.setitem(PF.TUNING, "fwd_fast_sigmoid", 0)
    kernel, sig = next((k, sg) for k, sg in PF.kernel_signatures()
                       if k.py_func.__name__ == "phalanx_mix_forward_bf16_vec8_unroll2_lb256x4")
    ptx = compile_arches(kernel.py_func, sig, **kernel_options(kernel))[(9, 0)]
    assert "rcp.rn.f32" in ptx and "div.approx.f32" not in ptx


def test_prefetch_specialisation(monkeypatch):
    """TUNING's fwd_prefetch_ahead gives forward kernels of their own whose PTX asks L2 for the
    Bg, C and V rows of each later step (three prefetches a step of a batch), keeps its 16-byte
    loads and nothing in local memory; the default kernels prefetch nothing."""
    nvvm_or_skip()
    monkeypatch.setitem(PF.TUNING, "fwd_fast_sigmoid", 0)
    monkeypatch.setitem(PF.TUNING, "fwd_prefetch_ahead", 2)
    kernel, sig = next((k, sg) for k, sg in PF.kernel_signatures()
                       if k.py_func.__name__ == "phalanx_mix_forward_bf16_vec8_unroll2_ahead2")
    for cc, ptx in compile_arches(kernel.py_func, sig).items():
        assert ptx.count("prefetch.global.L2") == 3 * PF.TUNING["fwd_unroll"], cc
        assert ptx.count("ld.global.v4.u32") == 3 * PF.TUNING["fwd_unroll"], cc
        assert ".local" not in ptx, cc
    monkeypatch.setitem(PF.TUNING, "fwd_prefetch_ahead", 0)
    kernel, sig = next((k, sg) for k, sg in PF.kernel_signatures()
                       if k.py_func.__name__ == "phalanx_mix_forward_bf16_vec8_unroll2")
    assert "prefetch" not in compile_arches(kernel.py_func, sig)[(9, 0)]


def test_rows_backward_specialisations():
    """The block-row backward of each storage kind (the specialisations launches pick): its
    block's words copied into shared memory with 4-byte ``cp.async`` and read back with
    ``ld.shared``, one barrier for the carriers (and two for the bias sums), a head's da summed
    with shuffles."""
    nvvm_or_skip()
    done = [i for i, (k, _) in enumerate(SPECS)
            if k.py_func.__name__.startswith("phalanx_mix_backward_rows")]
    assert len(done) == 3
    for i in done:
        kernel, _ = SPECS[i]
        name = kernel.py_func.__name__
        kind = name.split("_vec")[0].split("_")[-1]
        assert kernel is PF.backward_rows_kernel(kind, PF.TUNING["bwd_rows"], None,
                                                 PF.fast_sigmoid("bwd", kind))
        ptxs = all_ptx()[i]
        if isinstance(ptxs, Exception):
            raise ptxs
        for cc, ptx in ptxs.items():
            assert "bar.sync" in ptx and "shfl.sync" in ptx, (cc, name)
            assert "cp.async.ca.shared.global" in ptx and "ld.shared" in ptx, (cc, name)
            assert "cp.async.wait_group 0" in ptx, (cc, name)
