"""The benchmark harness without a GPU: arguments, floor arithmetic, timing loop, tables, JSON,
plot and page, and a whole run on NumPy through a stand-in for CuPy with a stand-in peer."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
import types

import ml_dtypes
import numpy as np
import pytest

from swr_array import bench as B


def parse(*argv):
    p = argparse.ArgumentParser()
    B.add_arguments(p)
    return p.parse_args(list(argv))


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------


def test_defaults():
    a = parse()
    assert a.sizes == ((16, 2048), (4, 8192), (1, 32768))
    assert a.dtypes == ("bfloat16",)
    assert a.layouts == ("BLHD", "BHDL")
    assert a.hops == (1,) and a.block_len == (16,)
    assert (a.heads, a.head_dim, a.per_channel) == (128, 16, False)
    assert (a.runs, a.calls, a.host_calls) == (7, 20, 1000)
    assert a.out == "bench_results" and a.markdown is None
    assert B.peer_names(a) == ("spear", "accelerated-scan", "chunk_hgrn", "sdpa", "flex128",
                               "flex512")
    cases = B.make_cases(a)
    assert len(cases) == 6
    assert {(c.B, c.L) for c in cases} == {(16, 2048), (4, 8192), (1, 32768)}
    assert all(c.per_head and c.dtype == "bfloat16" and c.hops == 1 for c in cases)


def test_options():
    a = parse("--sizes", "2x64, 1X128", "--dtypes", "bf16,f32,fp32", "--layouts", "bhdl",
              "--hops", "0,none", "--block-len", "8,16", "--per-channel", "--peers", "sdpa,fla",
              "--flex-windows", "64", "--runs", "3", "--out", "x", "--markdown", "d/b.md")
    assert a.sizes == ((2, 64), (1, 128))
    assert a.dtypes == ("bfloat16", "float32")
    assert a.layouts == ("BHDL",)
    assert a.hops == (0, None) and a.block_len == (8, 16)
    assert a.per_channel and a.runs == 3 and a.markdown == "d/b.md"
    assert B.peer_names(a) == ("sdpa", "chunk_hgrn")
    assert len(B.make_cases(a)) == 2 * 2 * 2 * 2 * 1
    assert not any(c.per_head for c in B.make_cases(a))
    assert B.peer_names(parse("--peers", "none")) == ()
    assert B.peer_names(parse("--flex-windows", "none")) == B.DEFAULT_PEERS


@pytest.mark.parametrize("argv", [
    ("--sizes", "16x"), ("--sizes", "0x16"), ("--dtypes", "int8"), ("--layouts", "BLDH"),
    ("--hops", "-1"), ("--block-len", "12"), ("--runs", "0"), ("--flex-windows", "0"),
])
def test_bad_options(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)


# ----------------------------------------------------------------------------------------------
# floor arithmetic and input sets
# ----------------------------------------------------------------------------------------------


def case(B_=1, L=32768, H=128, D=16, dtype="bfloat16", layout="BLHD", per_head=True):
    return B.Case(B_, L, H, D, dtype, layout, 1, 16, per_head)


def test_floor_bytes_match_gpu_notes():
    c = case()
    u = 32768 * 2048 * 2
    a = 32768 * 128 * 2
    assert B.floor_bytes(c, "fwd") == 2 * u + a == 276_824_064  # "276 MB"
    # the two calls: forward (a, u -> y), gradient (a, u, dy -> du, da); "703 MB, 0.234 ms"
    assert B.floor_bytes(c, "fwdbwd") == 5 * u + 3 * a
    assert B.floor_ms(B.floor_bytes(c, "fwdbwd"), 3.0e12) == pytest.approx(0.234, rel=0.01)
    assert B.floor_ms(B.floor_bytes(c, "fwd"), 3.0e12) == pytest.approx(0.0923, abs=1e-4)
    # the same tokens in other batch splits move the same bytes; layout does not matter
    assert B.floor_bytes(case(16, 2048, layout="BHDL"), "fwd") == B.floor_bytes(c, "fwd")
    # float32 doubles everything; per-channel a is u-sized
    assert B.floor_bytes(case(dtype="float32"), "fwd") == 2 * B.floor_bytes(c, "fwd")
    assert B.floor_bytes(case(per_head=False), "fwd") == 3 * u
    assert B.floor_bytes(case(per_head=False), "fwdbwd") == 8 * u
    with pytest.raises(ValueError):
        B.floor_bytes(c, "bwd")


def test_rotating_sets():
    l2 = 50 * 2**20
    assert B.rotating_sets(276_824_064, l2) == 2
    assert B.rotating_sets(30 * 2**20, l2) == 4
    assert B.rotating_sets(1000, l2) == 64
    assert B.rotating_sets(1000, l2, cap=8) == 8


def test_bf16_bits_match_ml_dtypes(rng):
    x = np.concatenate([
        rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10_000),
        np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 3.4e38, -3.4e38, np.inf, -np.inf, 1e-40,
                  1.00390625, 1.01171875], np.float32),
    ]).astype(np.float32)
    bits = B.f32_to_bf16_bits(np, x)
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, x.astype(ml_dtypes.bfloat16).view(np.uint16))
    nan = B.f32_to_bf16_bits(np, np.array([np.nan], np.float32)).view(ml_dtypes.bfloat16)
    assert np.isnan(nan.astype(np.float32)).all()


def test_layout_views():
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # (B, H, D, L)
    y = B.to_layout(np, x, "BLHD")
    assert y.shape == (2, 5, 3, 4) and y[1, 4, 2, 3] == x[1, 2, 3, 4]
    a = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    assert B.to_layout(np, a, "BLHD", per_head_a=True).shape == (2, 5, 3)
    assert B.to_layout(np, x, "BHDL") is x


# ----------------------------------------------------------------------------------------------
# timing loop with a stand-in timer
# ----------------------------------------------------------------------------------------------


class CountingTimer:
    """Each call of fn costs 1 ms of 'device time'."""

    def __init__(self):
        self.calls = 0
        self.syncs = 0

    def count(self, i):
        self.calls += 1

    def sync(self):
        self.syncs += 1

    def start(self):
        self._at = self.calls

    def stop(self):
        return float(self.calls - self._at)


def test_time_calls_rotates_and_divides():
    t = CountingTimer()
    seen = []

    def fn(i):
        seen.append(i)
        t.count(i)

    runs = B.time_calls(fn, 3, t, runs=4, calls=5, warmup=1)
    assert runs == [1.0] * 4  # per call
    assert len(seen) == 3 + 4 * 5  # the warm-up touches every set
    assert seen[:6] == [0, 1, 2, 0, 1, 2]
    assert set(seen) == {0, 1, 2} and t.syncs == 1


def test_host_overhead_summary():
    s = B.summarize_us([float(i) for i in range(1, 101)])
    assert s["median_us"] == 50.5 and s["calls"] == 100
    assert s["p10_us"] < s["median_us"] < s["p90_us"]
    syncs = []
    r = B.host_overhead(lambda: None, lambda: syncs.append(1), 250, warmup=3)
    assert r["calls"] == 250 and r["median_us"] >= 0 and len(syncs) >= 3


# ----------------------------------------------------------------------------------------------
# tables, JSON, plot, page from fake timings
# ----------------------------------------------------------------------------------------------


def fake_payload():
    meta = {"date": "2026-11-22 00:00 UTC", "device": {"name": "Fake H100", "sms": 132,
            "l2_bytes": 50 * 2**20, "memory_bytes": 80 * 2**30, "cuda_runtime": 13000,
            "cuda_driver": 13000, "cc": "9.0"},
            "versions": {"python": "3.12", "torch": "2.11"}, "config": {"runs": 7, "calls": 20},
            "command": "python -m swr_array bench", "copy_bandwidth_Bps": 3.0e12}
    p = B.new_payload(meta)
    p["peers"] = {
        "spear": {"label": "spear BTP", "note": "the paper's kernel", "kind": "recurrence",
                  "version": "0.1.1", "layout": "BHDL"},
        "accelerated-scan": {"label": "accel-scan", "note": "exact scan, per-channel gates",
                             "kind": "exact scan", "version": "0.3.1", "layout": "(B, C, T)"},
    }
    B._mark_peers(p)
    peer_ms = {"spear": {"fwd": 0.8, "fwdbwd": 3.0}, "accelerated-scan": {"fwd": 0.2,
                                                                            "fwdbwd": 0.9}}
    for (b, L) in B.DEFAULT_SIZES:
        for layout in B.LAYOUTS:
            c = case(b, L, layout=layout)
            for d in ("fwd", "fwdbwd"):
                fl = B.floor_ms(B.floor_bytes(c, d), 3.0e12)
                ms = fl * (1.25 if layout == "BLHD" else 1.5)
                B.add_result(p, "swr", d, c, ms=ms, runs_ms=[ms] * 3)
                if layout == "BLHD":
                    B.add_result(p, "floor", d, dict(c.fields(), layout="-"), ms=fl)
                    for name, t in peer_ms.items():
                        if name == "spear" and L == 32768:
                            B.add_result(p, name, d, dict(c.fields(), layout="BHDL"),
                                         status="skipped", reason="not today")
                        else:
                            B.add_result(p, name, d, dict(c.fields(), layout="x"), ms=t[d])
    p["host_overhead"].append({"method": "swr", "label": "swr", "call": "fwd", "input": "tiny",
                               "status": "ok", **B.summarize_us([100.0, 120.0, 140.0])})
    p["unavailable"]["chunk_hgrn"] = "ModuleNotFoundError: No module named 'fla'"
    return p


def test_format_tables():
    p = fake_payload()
    text = B.format_tables(p)
    assert text.count("**Forward, ms**") == 1 and text.count("**Forward + backward, ms**") == 1
    assert "| B x L | layout | floor | swr | swr / floor | spear BTP | accel-scan ¹ |" in text
    fwd = text.split("**Forward + backward")[0]
    row = next(line for line in fwd.splitlines() if line.startswith("| 4 x 8192 | BLHD"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    fl = B.floor_ms(B.floor_bytes(case(4, 8192), "fwd"), 3.0e12)
    assert cells[2] == B.fmt_ms(fl)
    assert cells[3] == B.fmt_ms(fl * 1.25)
    assert cells[4] == "1.25x"
    assert cells[5] == f"0.800 ({0.8 / (fl * 1.25):.2f}x)"
    assert "| 1 x 32768 | BHDL" in fwd and "skip" in fwd
    # rows ordered by tokens, then L, then layout BLHD before BHDL
    rows = [line.split("|")[1:3] for line in fwd.splitlines() if line.startswith("| ")][1:]
    assert [r[1].strip() for r in rows[:2]] == ["BLHD", "BHDL"]
    notes = B.format_notes(p)
    assert "¹ **accel-scan**" in notes and "not today" in notes and "fla" in notes
    assert "| swr | fwd | 120.0 |" in B.format_host_table(p)


def test_fmt():
    assert B.fmt_ms(None) == "—" and B.fmt_ms(float("nan")) == "—"
    assert [B.fmt_ms(x) for x in (0.0921, 1.234, 26.93, 123.4, 0.00123)] == [
        "0.092", "1.23", "26.9", "123", "0.0012"]
    assert B.fmt_ratio(1.234) == "1.23x" and B.fmt_ratio(None) == "—"


def test_write_outputs(tmp_path):
    p = fake_payload()
    md = tmp_path / "docs" / "benchmarks.md"
    written = B.write_outputs(p, tmp_path / "out", str(md))
    back = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert back["meta"]["device"]["name"] == "Fake H100"
    assert len(back["results"]) == len(p["results"])
    page = md.read_text()
    assert page.startswith("# Benchmarks")
    assert "Fake H100" in page and "2026-11-22" in page and "torch 2.11" in page
    assert "3.00 TB/s" in page and "| B x L | layout |" in page
    assert "CUDA: runtime 13.0, driver 13.0, compute capability 9.0" in page
    assert "Host overhead" in page and "Reproduce" in page
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "png" not in written and "![" not in page
        return
    assert (tmp_path / "out" / "bench.png").stat().st_size > 1000
    assert md.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "![time vs sequence length](benchmarks.png)" in page


def test_rerender_from_json(tmp_path, capsys):
    B.write_json(tmp_path / "in.json", fake_payload())
    a = parse("--from-json", str(tmp_path / "in.json"), "--out", str(tmp_path / "o"),
              "--markdown", str(tmp_path / "p.md"), "--no-plot")
    assert B.run(a) == 0
    assert "spear BTP" in capsys.readouterr().out
    assert (tmp_path / "p.md").exists() and (tmp_path / "o" / "bench.json").exists()


def test_no_gpu(monkeypatch, capsys):
    def none():
        raise RuntimeError("no CUDA device (test)")

    monkeypatch.setattr(B, "_cupy_device", none)
    assert B.run(parse("--out", "unused")) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# a whole run on NumPy: a stand-in for CuPy, a stand-in peers module
# ----------------------------------------------------------------------------------------------


class _Event:
    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class _RandomState:
    def __init__(self, seed):
        self._rs = np.random.RandomState(seed)

    def random_sample(self, shape, dtype=np.float64):
        return self._rs.random_sample(shape).astype(dtype)

    def standard_normal(self, shape, dtype=np.float64):
        return self._rs.standard_normal(shape).astype(dtype)


def fake_cupy():
    ns = types.SimpleNamespace(**{k: getattr(np, k) for k in (
        "float32", "float16", "uint32", "uint16", "uint8", "ascontiguousarray", "isnan", "where",
        "empty", "empty_like", "copyto", "from_dlpack")})
    ns.random = types.SimpleNamespace(RandomState=_RandomState)
    ns.cuda = types.SimpleNamespace(
        Event=_Event,
        get_elapsed_time=lambda s, e: (e.t - s.t) * 1e3,
        get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None),
    )
    ns.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)
    return ns


class WallTimer:
    def sync(self):
        pass

    def start(self):
        self._t = time.perf_counter()

    def stop(self):
        return (time.perf_counter() - self._t) * 1e3


FAKE_PEERS = textwrap.dedent('''
    from dataclasses import dataclass
    import torch

    UNAVAILABLE = {}

    class Unsupported(Exception):
        pass

    @dataclass(frozen=True)
    class PeerProblem:
        B: int
        L: int
        H: int
        D: int
        dtype: str
        hops: object
        block_len: int
        per_head: bool
        attn_head_dim: int = 128

    class Run:
        def __init__(self, fwd, fwdbwd, n_sets, layout):
            self.fwd, self.fwdbwd, self.n_sets, self.layout = fwd, fwdbwd, n_sets, layout

    class Peer:
        def __init__(self, name, prepare, kind="exact scan"):
            self.name, self.label, self.note = name, name.upper(), "a stand-in"
            self.layout, self.version, self.kind, self.prepare = "(B, C, T)", "0", kind, prepare

        def key(self, p):
            return (p.B, p.L, p.dtype)

    PREPARED = []

    def scan_prepare(p, sets):
        PREPARED.append(p)
        xs = [s["u"].reshape(p.B, p.H * p.D, p.L).clone() for s in sets]
        return Run(lambda i: torch.cumsum(xs[i], -1), lambda i: torch.cumsum(xs[i], -1).sum(),
                   len(xs), "(B, C, T)")

    def skip_prepare(p, sets):
        raise Unsupported("stand-in cannot")

    def load_peer(name, *, spear_build=None, spear_wait=0.0):
        if name == "scan":
            return Peer("scan", scan_prepare)
        if name == "skipper":
            return Peer("skipper", skip_prepare, kind="recurrence")
        UNAVAILABLE[name] = "not installed here"
        return None
''')


def test_whole_run_on_numpy(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    info = {"name": "Fake GPU", "cc": "9.0", "sms": 1, "l2_bytes": 4096,
            "memory_bytes": 8 * 2**20}
    monkeypatch.setattr(B, "_cupy_device", lambda: (fake_cupy(), info))
    monkeypatch.setattr(B._Bench, "torch_timer", staticmethod(WallTimer))
    peers = tmp_path / "peers.py"
    peers.write_text(FAKE_PEERS)
    out = tmp_path / "res"
    md = tmp_path / "bench.md"
    argv = ["--sizes", "1x32,2x16", "--heads", "2", "--head-dim", "4", "--runs", "2",
            "--calls", "2", "--warmup", "1", "--host-calls", "5", "--peers",
            "scan,skipper,ghost", "--peers-file", str(peers), "--out", str(out), "--markdown",
            str(md), "--no-progress", "--no-plot"]
    assert B.run(parse(*argv), argv) == 0
    res = json.loads((out / "bench.json").read_text())
    recs = res["results"]
    ours = [r for r in recs if r["method"] == "swr"]
    assert len(ours) == 2 * 2 * 2  # sizes x layouts x directions
    assert all(r["status"] == "ok" and r["ms"] > 0 and len(r["runs_ms"]) == 2 for r in ours)
    # 1152 bytes a call against a 4 KiB "L2": 8 sets rotate
    assert all(r["n_sets"] == 8 for r in ours)
    floors = [r for r in recs if r["method"] == "floor"]
    assert len(floors) == 2 * 2 and all(r["ms"] > 0 for r in floors)
    assert res["meta"]["copy_bandwidth_Bps"] > 0
    scan = [r for r in recs if r["method"] == "scan"]
    assert len(scan) == 2 * 2 and all(r["status"] == "ok" for r in scan)
    assert {r["status"] for r in recs if r["method"] == "skipper"} == {"skipped"}
    assert res["unavailable"] == {"ghost": "not installed here"}
    assert [h["call"] for h in res["host_overhead"]] == ["fwd", "fwd+bwd"]
    assert all(h["status"] == "ok" and h["calls"] == 5 for h in res["host_overhead"])
    printed = capsys.readouterr().out
    assert "SCAN ¹" in printed and "ghost" in printed
    page = md.read_text()
    assert "Fake GPU" in page and "| 2 x 16 | BLHD |" in page


def test_time_budget_skips(tmp_path, monkeypatch):
    info = {"name": "Fake GPU", "sms": 1, "l2_bytes": 4096, "memory_bytes": 8 * 2**20}
    monkeypatch.setattr(B, "_cupy_device", lambda: (fake_cupy(), info))
    argv = ["--sizes", "1x32", "--heads", "1", "--head-dim", "2", "--runs", "1", "--calls", "1",
            "--host-calls", "0", "--peers", "none", "--out", str(tmp_path), "--no-progress",
            "--no-plot", "--time-budget", "1e-9"]
    assert B.run(parse(*argv), argv) == 1  # nothing of ours ran
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["over_budget"] and not [r for r in res["results"] if r["method"] == "swr"]
    assert "time budget" in B.format_notes(res)


# ----------------------------------------------------------------------------------------------
# swr_array/bench_peers.py on the CPU: loaders skip with a reason; adapters hand the right layouts
# ----------------------------------------------------------------------------------------------


def load_peers_module():
    mod = B._load_peers_module(None)
    assert mod.__name__ == "swr_array.bench_peers"
    return mod


def test_peers_skip_with_reasons(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    P = load_peers_module()
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the loaders would succeed")
    for name in P.PEER_NAMES + ("bogus",):
        assert P.load_peer(name, spear_build=str(tmp_path / "none")) is None
        assert P.UNAVAILABLE[name]
    assert "unknown peer" in P.UNAVAILABLE["bogus"]
    # a failed spear build is reported as such
    monkeypatch.setattr(P, "_torch_cuda", lambda: (torch, ""))
    (tmp_path / "status").write_text("failed: nvcc exploded\n")
    assert P.load_spear(str(tmp_path), wait_s=0.0) is None
    assert "nvcc exploded" in P.UNAVAILABLE["spear"]


def _seq_scan(torch, f, x, dim):
    f, x = f.double(), x.double()
    out, h = torch.empty_like(x), torch.zeros_like(x.select(dim, 0))
    for t in range(x.shape[dim]):
        h = f.select(dim, t) * h + x.select(dim, t)
        out.select(dim, t).copy_(h)
    return out


@pytest.mark.parametrize("per_head", [True, False])
def test_scan_adapters_layouts(monkeypatch, per_head):
    """With stand-ins for the Triton kernels, both exact-scan adapters reproduce the exact
    recurrence of the canonical inputs: their layouts and gates are the right ones."""
    torch = pytest.importorskip("torch")
    from swr_array import reference as R

    P = load_peers_module()
    monkeypatch.setattr(P, "_torch_cuda", lambda: (torch, ""))
    scalar = types.ModuleType("accelerated_scan.scalar")
    scalar.scan = lambda f, x: _seq_scan(torch, f, x, 2).to(x.dtype)  # (B, C, T)
    pkg = types.ModuleType("accelerated_scan")
    pkg.scalar = scalar
    hgrn = types.ModuleType("fla.ops.hgrn")
    hgrn.chunk_hgrn = lambda x, g: (_seq_scan(torch, g.exp(), x, 1).to(x.dtype), None)  # (B,T,C)
    for name, mod in {"accelerated_scan": pkg, "accelerated_scan.scalar": scalar,
                      "fla": types.ModuleType("fla"), "fla.ops": types.ModuleType("fla.ops"),
                      "fla.ops.hgrn": hgrn}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    Bn, L, H, D = 2, 40, 3, 2
    g = torch.Generator().manual_seed(1)
    a = 0.9 + 0.1 * torch.rand((Bn, H, L) if per_head else (Bn, H, D, L), generator=g)
    u = torch.randn(Bn, H, D, L, generator=g)
    sets = [{"a": a, "u": u, "dy": torch.randn(Bn, H, D, L, generator=g)}]
    at = (a[:, :, None, :] if per_head else a).double().numpy()
    exact = R.swr(np.broadcast_to(at, u.shape), u.double().numpy(), block_len=8, hops=None)
    prob = P.PeerProblem(Bn, L, H, D, "float32", 1, 8, per_head)
    y = P.load_peer("accelerated-scan").prepare(prob, sets).fwd(0)
    np.testing.assert_allclose(y.reshape(Bn, H, D, L).double().numpy(), exact, rtol=1e-5,
                               atol=1e-5)
    y = P.load_peer("chunk_hgrn").prepare(prob, sets).fwd(0)
    y = y.reshape(Bn, L, H, D).permute(0, 2, 3, 1)
    np.testing.assert_allclose(y.double().numpy(), exact, rtol=1e-5, atol=1e-5)


def test_sigterm_still_writes(tmp_path, monkeypatch):
    import os
    import signal

    info = {"name": "Fake GPU", "sms": 1, "l2_bytes": 4096, "memory_bytes": 8 * 2**20}
    monkeypatch.setattr(B, "_cupy_device", lambda: (fake_cupy(), info))
    monkeypatch.setattr(B._Bench, "host_ours", lambda self, c: os.kill(os.getpid(),
                                                                        signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    argv = ["--sizes", "1x32", "--heads", "1", "--head-dim", "2", "--runs", "1", "--calls", "1",
            "--peers", "none", "--out", str(tmp_path), "--markdown", str(tmp_path / "p.md"),
            "--no-progress", "--no-plot"]
    assert B.run(parse(*argv), argv) == 124
    assert signal.getsignal(signal.SIGTERM) == before
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["terminated"] and [r for r in res["results"] if r["method"] == "swr"]
    assert "| 1 x 32 | BLHD |" in (tmp_path / "p.md").read_text()


def test_decode_bench_renders_a_saved_run(tmp_path):
    """benchmarks/decode_bench.py --from-json renders the table without a GPU (ratios from the
    saved times)."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "decode_bench.py"
    spec = importlib.util.spec_from_file_location("decode_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run = {"device": "GPU X", "dim": 2048, "dtype": "bfloat16", "contexts": [4096, 32768],
           "copy_bandwidth_gbs": 4000.0,
           "batches": [{"batch": 64, "graph_us": 20.0, "eager_us": 70.0, "gemms_graph_us": 16.0,
                        "torch_ops_graph_us": 44.0, "floor_us": 8.0, "floor_bytes": 1,
                        "attention_4096_graph_us": 50.0, "attention_32768_graph_us": None}]}
    saved = tmp_path / "decode_bench.json"
    saved.write_text(json.dumps(run))
    page = tmp_path / "page.md"
    assert mod.main(["--from-json", str(saved), "--markdown", str(page)]) == 0
    row = page.read_text().splitlines()[-1]
    # a run saved before the GEMV step existed ran the GEMM path at every batch
    assert row == ("| 64 | gemm | 20.0 | 70.0 | 16.0 | 1.25x | - | - | - | 44.0 | 8.0 | 2.50x "
                   "| 50.0 | - |")
    assert "GPU X" in page.read_text()
    run["batches"][0].update(batch=1, path="gemv")
    saved.write_text(json.dumps(run))
    assert mod.main(["--from-json", str(saved), "--markdown", str(page)]) == 0
    assert page.read_text().splitlines()[-1].startswith("| 1 | gemv | 20.0 | 70.0 |")
