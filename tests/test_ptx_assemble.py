"""The PTX tests' assembly step (tests/ptx_arches.py ``assemble``: ptxas through nvJitLink, no GPU)
and scripts/kernel_resources.py, which summarises what it reports."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numba
import pytest
from ptx_arches import ASSEMBLE_CC, assemble, nvvm_or_skip

pytestmark = pytest.mark.skipif(bool(numba.config.ENABLE_CUDASIM),
                                reason="compile_ptx needs the real CUDA target, not the simulator")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _resources_module():
    spec = importlib.util.spec_from_file_location(
        "kernel_resources", ROOT / "scripts" / "kernel_resources.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ptx_of_scale():
    nvvm_or_skip()
    from numba import cuda, float32

    def scale(x, y):
        i = cuda.grid(1)
        if i < x.size:
            y[i] = x[i] * float32(2.0)

    return cuda.compile_ptx(scale, (float32[:], float32[:]), cc=ASSEMBLE_CC)[0]


def test_assemble_reports_registers_and_spills(tmp_path, monkeypatch):
    report = tmp_path / "report.jsonl"
    monkeypatch.setenv("SWR_PTXAS_REPORT", str(report))
    (row,) = assemble(_ptx_of_scale())
    assert row["cc"] == "sm_90"
    assert 1 <= row["registers"] <= 255
    assert (row["stack"], row["spill_stores"], row["spill_loads"]) == (0, 0, 0)
    assert "scale" in row["entry"]
    assert [json.loads(line) for line in report.read_text().splitlines()] == [row]


def test_assemble_refuses_what_ptxas_refuses():
    ptx = _ptx_of_scale()
    # an instruction NVVM never emits: ptxas must reject the PTX, and assemble with it
    bad = ptx.replace("ret;", "not.an.instruction %r1;\n\tret;", 1)
    assert bad != ptx
    with pytest.raises(RuntimeError, match="ptxas refused"):
        assemble(bad)


def test_kernel_resources_table(tmp_path):
    mod = _resources_module()
    # the register file's limit: 65536 registers an SM, per-warp units of 256, at most 64 warps
    assert [mod.warps_per_sm(r) for r in (16, 32, 33, 64, 128, 255)] == [64, 64, 51, 32, 16, 8]
    entry = "_ZN9swr_array13numba_kernels9halo_walk10halo_fwd_4B2v1B3xyzE5Array"
    assert mod.readable(entry) == "halo_walk.halo_fwd_4"
    assert mod.readable("plain_name") == "plain_name"
    saved = tmp_path / "r.jsonl"
    rows = [dict(entry=entry, cc="sm_90", registers=64, stack=0, spill_stores=8, spill_loads=4)]
    saved.write_text("\n".join(json.dumps(r) for r in rows * 2) + "\n")  # duplicates collapse
    out = tmp_path / "t.json"
    assert mod.main(["--from", str(saved), "--json", str(out)]) == 0
    (got,) = json.loads(out.read_text())
    assert (got["name"], got["warps_per_sm"], got["spill_stores"]) == (
        "halo_walk.halo_fwd_4", 32, 8)
