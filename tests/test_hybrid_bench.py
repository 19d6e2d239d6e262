"""benchmarks/hybrid_bench.py without a GPU: a tiny run on CPU torch (Phalanx through the NumPy
reference) writes JSON that re-renders, and the table's ratios from a fixed JSON."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("hybrid_bench",
                                                  ROOT / "benchmarks" / "hybrid_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_run_writes_json_that_renders(tmp_path, capsys):
    hb = _load()
    models = "transformer,hybrid 1:1,hybrid 1:3,phalanx,hybrid 1:3 (spear)"
    hb.main(["--device", "cpu", "--out", str(tmp_path), "--layers", "2", "--dim", "32",
             "--attn-heads", "2", "--vocab", "64", "--contexts", "16,32", "--tokens", "64",
             "--warmup", "1", "--steps", "1", "--dtype", "float32", "--models", models,
             "--spear-build", str(tmp_path / "no_spear")])  # fmt: skip
    results = json.loads((tmp_path / "hybrid_bench.json").read_text())
    assert results["config"]["layers"] == 2 and results["config"]["contexts"] == [16, 32]
    rows = {(r["model"], r["context"]): r for r in results["rows"]}
    assert set(rows) == {(m, c) for m in models.split(",")[:4] for c in (16, 32)}
    assert all("error" not in r for r in rows.values())
    assert rows["transformer", 16]["batch"] == 4 and rows["phalanx", 32]["batch"] == 2
    # the depth-2 models: attention in block 2 for 1:1, none for 1:3 (block 4) and Phalanx
    assert rows["hybrid 1:3", 16]["params"] == rows["phalanx", 16]["params"]
    for r in rows.values():
        assert r["tokens_per_s"] == pytest.approx(64 / (r["step_ms"] * 1e-3))
    assert "hybrid 1:3 (spear)" in results["skipped"]
    capsys.readouterr()
    assert hb.main(["--from-json", str(tmp_path / "hybrid_bench.json"),
                    "--markdown", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| 16 | phalanx |" in text and "hybrid 1:3 (spear): not measured" in text


FIXED = {
    "device": "GPU X", "config": {"layers": 8, "dim": 2048, "mlp_hidden": 6144, "vocab": 32000,
                                  "dtype": "bfloat16", "tokens_per_step": 32768,
                                  "contexts": [4096, 32768], "warmup": 2, "steps": 3},
    "models": ["transformer", "hybrid 1:3", "phalanx", "hybrid 1:3 (spear)"],
    "skipped": {},
    "rows": [
        {"model": "transformer", "context": 4096, "batch": 8, "params": 5.0e8, "step_ms": 200.0,
         "tokens_per_s": 163840.0, "peak_gib": 40.0},
        {"model": "hybrid 1:3", "context": 4096, "batch": 8, "params": 4.9e8, "step_ms": 160.0,
         "tokens_per_s": 204800.0, "peak_gib": 38.5},
        {"model": "phalanx", "context": 4096, "batch": 8, "params": 4.8e8, "step_ms": 250.0,
         "tokens_per_s": 131072.0, "peak_gib": None},
        {"model": "transformer", "context": 32768, "batch": 1, "params": 5.0e8, "step_ms": 600.0,
         "tokens_per_s": 54613.3, "peak_gib": 41.0},
        {"model": "hybrid 1:3", "context": 32768, "batch": 1, "params": 4.9e8, "step_ms": 400.0,
         "tokens_per_s": 81920.0, "peak_gib": 39.0},
        {"model": "phalanx", "context": 32768, "error": "OutOfMemoryError: x"},
        {"model": "hybrid 1:3 (spear)", "context": 32768, "batch": 1, "params": 4.9e8,
         "step_ms": 480.0, "tokens_per_s": 68266.7, "peak_gib": 45.0},
    ],
}


def test_table_ratios_from_a_fixed_json():
    text = _load().table(FIXED)
    lines = text.splitlines()
    assert "8-layer" in lines[0] and "GPU X" in lines[0]
    body = [line for line in lines if line.startswith("| 4K") or line.startswith("| 32K")]
    assert body == [
        "| 4K | transformer | 500 | 8 | 200.0 | 163840 | 1.00x (+0%) | 40.0 |",
        "| 4K | hybrid 1:3 | 490 | 8 | 160.0 | 204800 | 1.25x (+25%) | 38.5 |",
        "| 4K | phalanx | 480 | 8 | 250.0 | 131072 | 0.80x (-20%) | - |",
        "| 32K | transformer | 500 | 1 | 600.0 | 54613 | 1.00x (+0%) | 41.0 |",
        "| 32K | hybrid 1:3 | 490 | 1 | 400.0 | 81920 | 1.50x (+50%) | 39.0 |",
        "| 32K | hybrid 1:3 (spear) | 490 | 1 | 480.0 | 68267 | 1.25x (+25%) | 45.0 |",
    ]
    assert "phalanx at 32K: not measured (OutOfMemoryError: x)." in lines
    assert any("10-40%" in line for line in lines)
