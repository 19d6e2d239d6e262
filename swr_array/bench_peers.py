"""Peer adapters for ``python -m swr_array bench``: the methods swr-array is compared with.

Each ``load_*`` function returns a :class:`Peer`, or None when the peer cannot be imported here (the
reason is kept in :data:`UNAVAILABLE`). A peer's ``prepare(problem, sets)`` turns the bench's
canonical float32 inputs into the peer's own natural layout and dtype and returns a
:class:`PeerRun` with ``fwd(i)`` and ``fwdbwd(i)`` callables on input set ``i`` (the bench rotates
over the sets). ``prepare`` raises :class:`Unsupported` for a case the peer cannot run.

Canonical inputs (torch tensors, float32, CUDA, time last as in swr-array's "BHDL" layout):
``a``: ``(B, H, L)`` per head or ``(B, H, D, L)`` per channel, values in (0.9, 1);
``u``, ``dy``: ``(B, H, D, L)``.

Peers:
- ``spear``: spear-python's BTP CUDA kernel (the SWR paper's library), ``(B, H, 16, L)`` and
  per-head coefficients ``(B, H, L)``, k = hops + 1, bf16/fp16 only, block length 16. Built on the
  GPU machine by ``benchmarks/build_spear.sh`` (or any installed ``spear`` package).
- ``accelerated-scan``: its Triton ``scalar`` scan, ``(B, C, T)``: an EXACT scan (hops=None) with
  PER-CHANNEL gates (per-head a is expanded to the head's channels first).
- ``chunk_hgrn``: flash-linear-attention's ``chunk_hgrn``, ``(B, T, C)`` with log gates: an EXACT
  scan with PER-CHANNEL gates.
- ``sdpa``: torch ``scaled_dot_product_attention(is_causal=True)`` on the flash backend,
  ``(B, heads, L, 128)`` with heads * 128 = H * D channels.
- ``flex128`` / ``flex512``: torch ``flex_attention`` (compiled) with a causal sliding window of 128
  or 512 keys (the query itself included), same shapes as ``sdpa``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: peer name -> why it is not available (filled by the ``load_*`` functions)
UNAVAILABLE: dict[str, str] = {}

PEER_NAMES = ("spear", "accelerated-scan", "chunk_hgrn", "sdpa", "flex128", "flex512")


class Unsupported(Exception):
    """The peer cannot run this case (dtype, shape, hops...): skipped, with this reason."""


@dataclass(frozen=True)
class PeerProblem:
    """One benchmark case as the peers see it (our layout does not matter to them)."""

    B: int
    L: int
    H: int
    D: int
    dtype: str  # "bfloat16" | "float16" | "float32"
    hops: int | None
    block_len: int
    per_head: bool
    attn_head_dim: int = 128


@dataclass
class PeerRun:
    fwd: Callable[[int], Any]
    fwdbwd: Callable[[int], Any]
    n_sets: int
    layout: str


@dataclass
class Peer:
    name: str
    label: str
    note: str
    layout: str
    version: str
    prepare: Callable[[PeerProblem, list], PeerRun]
    #: kinds of work it computes, for the table's footnotes
    kind: str = "recurrence"
    #: part of the problem the timings depend on (results are reused across our layouts)
    key: Callable[[PeerProblem], tuple] = field(default=lambda p: (p.B, p.L, p.dtype))


def _version(dist: str, module=None) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return str(getattr(module, "__version__", "unknown"))


def _torch_cuda():
    """torch when it imports and sees a GPU, else None (reason recorded by the caller)."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return None, f"torch does not import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA GPU"
    return torch, ""


def _torch_dtype(torch, name: str):
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _per_channel(a, p: PeerProblem):
    """(B, H, L) or (B, H, D, L) -> (B, H, D, L) (a view for per-head a)."""
    if a.dim() == 3:
        return a[:, :, None, :].expand(p.B, p.H, p.D, p.L)
    return a


def _as_leaf(x, grad: bool):
    x = x.detach()
    return x.requires_grad_(True) if grad else x


# ----------------------------------------------------------------------------------------------
# spear-python (BTP)
# ----------------------------------------------------------------------------------------------


def _load_spear_from_build(build_dir: str, wait_s: float):
    """Import spear with the extension that build_spear.sh built into ``build_dir``."""
    status = os.path.join(build_dir, "status")
    deadline = time.monotonic() + max(0.0, wait_s)
    announced = False
    while not os.path.exists(status) and time.monotonic() < deadline:
        if not announced and os.path.isdir(build_dir):
            print(f"[peers] waiting up to {wait_s:.0f} s for spear's build in {build_dir}",
                  file=sys.stderr)
            announced = True
        time.sleep(2.0)
    if not os.path.exists(status):
        raise ImportError(f"no built spear extension in {build_dir} (benchmarks/build_spear.sh)")
    with open(status) as f:
        line = f.read().strip()
    if not line.startswith("ok"):
        raise ImportError(f"spear build failed: {line[:300]} (see the build log)")
    so_path = line.split(None, 1)[1]
    src_file = os.path.join(build_dir, "src_dir")
    if os.path.exists(src_file):
        with open(src_file) as f:
            src = f.read().strip()
    else:
        base = os.path.join(build_dir, "src")
        tops = sorted(d for d in os.listdir(base) if d.startswith("spear_python-"))
        src = os.path.join(base, tops[-1])
    spec = importlib.util.spec_from_file_location("spear._btp", so_path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {so_path}")
    import torch  # noqa: F401  (the extension links against torch's libraries)

    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    # spear/ops/btp/interface.py does `import spear._btp`: hand it the module we built
    sys.modules["spear._btp"] = ext
    if src not in sys.path:
        sys.path.insert(0, src)
    spear = importlib.import_module("spear")
    spear._btp = ext
    return spear


def load_spear(build_dir: str | None = None, wait_s: float = 0.0) -> Peer | None:
    torch, why = _torch_cuda()
    if torch is None:
        UNAVAILABLE["spear"] = why
        return None
    try:
        if build_dir and (os.path.isdir(build_dir) or wait_s > 0):
            spear = _load_spear_from_build(build_dir, wait_s)
        else:
            spear = importlib.import_module("spear")
        btp = importlib.import_module("spear.ops.btp").btp
    except Exception as exc:  # noqa: BLE001 - any failure: skip the peer, say why
        UNAVAILABLE["spear"] = f"{type(exc).__name__}: {exc}"
        return None

    def prepare(p: PeerProblem, sets) -> PeerRun:
        if p.dtype not in ("bfloat16", "float16"):
            raise Unsupported("spear BTP runs bf16/fp16 only")
        if not p.per_head:
            raise Unsupported("spear BTP has per-head coefficients only")
        if p.D != 16 or p.block_len != 16:
            raise Unsupported("spear BTP needs head dim 16 and block length 16")
        if p.hops not in (0, 1):
            raise Unsupported("spear BTP has k = 1 or 2 (hops 0 or 1) only")
        if p.L % 16:
            raise Unsupported("spear BTP needs L % 16 == 0")
        dt = _torch_dtype(torch, p.dtype)
        k = p.hops + 1
        data = []
        for s in sets:
            a = s["a"].to(dt).contiguous()  # (B, H, L)
            u = s["u"].to(dt).contiguous()  # (B, H, 16, L)
            dy = s["dy"].to(dt).contiguous()
            data.append((a, u, _as_leaf(a, True), _as_leaf(u, True), dy))

        def fwd(i):
            a, u = data[i][:2]
            with torch.no_grad():
                return btp(a, u, k=k, output_dtype=dt)

        def fwdbwd(i):
            _, _, ag, ug, dy = data[i]
            y = btp(ag, ug, k=k, output_dtype=dt)
            return torch.autograd.grad(y, (ag, ug), dy)

        return PeerRun(fwd, fwdbwd, len(data), "(B, H, 16, L), a (B, H, L)")

    return Peer(
        name="spear",
        label="spear BTP",
        note=(
            "spear-python BTP (CUDA/CUTLASS, the SWR paper's library): same computation as swr "
            "(k = hops + 1), per-head a, (B, H, 16, L) layout, bf16 out"
        ),
        layout="BHDL",
        version=_version("spear-python", spear),
        prepare=prepare,
        key=lambda p: (p.B, p.L, p.H, p.D, p.dtype, p.hops, p.block_len, p.per_head),
    )


# ----------------------------------------------------------------------------------------------
# accelerated-scan (Triton scalar scan)
# ----------------------------------------------------------------------------------------------


def load_accelerated_scan() -> Peer | None:
    torch, why = _torch_cuda()
    if torch is None:
        UNAVAILABLE["accelerated-scan"] = why
        return None
    try:
        mod = importlib.import_module("accelerated_scan.scalar")
        scan = mod.scan
        pkg = importlib.import_module("accelerated_scan")
    except Exception as exc:  # noqa: BLE001
        UNAVAILABLE["accelerated-scan"] = f"{type(exc).__name__}: {exc}"
        return None

    def prepare(p: PeerProblem, sets) -> PeerRun:
        dt = _torch_dtype(torch, p.dtype)
        C = p.H * p.D
        data = []
        for s in sets:
            f = _per_channel(s["a"], p).reshape(p.B, C, p.L).to(dt).contiguous()
            x = s["u"].reshape(p.B, C, p.L).to(dt).contiguous()
            dy = s["dy"].reshape(p.B, C, p.L).to(dt).contiguous()
            data.append((f, x, _as_leaf(f, True), _as_leaf(x, True), dy))

        def fwd(i):
            f, x = data[i][:2]
            with torch.no_grad():
                return scan(f, x)

        def fwdbwd(i):
            _, _, fg, xg, dy = data[i]
            y = scan(fg, xg)
            return torch.autograd.grad(y, (fg, xg), dy)

        return PeerRun(fwd, fwdbwd, len(data), "(B, C, T)")

    return Peer(
        name="accelerated-scan",
        label="accel-scan",
        note=(
            "accelerated-scan Triton `scalar` scan: EXACT scan (no window), PER-CHANNEL gates "
            "(a expanded to every channel), (B, C, T) layout"
        ),
        layout="(B, C, T)",
        version=_version("accelerated-scan", pkg),
        prepare=prepare,
        kind="exact scan",
        key=lambda p: (p.B, p.L, p.H * p.D, p.dtype),
    )


# ----------------------------------------------------------------------------------------------
# flash-linear-attention chunk_hgrn
# ----------------------------------------------------------------------------------------------


def load_chunk_hgrn() -> Peer | None:
    torch, why = _torch_cuda()
    if torch is None:
        UNAVAILABLE["chunk_hgrn"] = why
        return None
    try:
        chunk_hgrn = importlib.import_module("fla.ops.hgrn").chunk_hgrn
        fla = importlib.import_module("fla")
    except Exception as exc:  # noqa: BLE001
        UNAVAILABLE["chunk_hgrn"] = f"{type(exc).__name__}: {exc}"
        return None

    def prepare(p: PeerProblem, sets) -> PeerRun:
        dt = _torch_dtype(torch, p.dtype)
        C = p.H * p.D

        def btc(x):  # (B, H, D, L) -> (B, L, H*D)
            return x.permute(0, 3, 1, 2).reshape(p.B, p.L, C).to(dt).contiguous()

        data = []
        for s in sets:
            g = btc(torch.log(_per_channel(s["a"], p)))
            x = btc(s["u"])
            dy = btc(s["dy"])
            data.append((x, g, _as_leaf(x, True), _as_leaf(g, True), dy))

        def fwd(i):
            x, g = data[i][:2]
            with torch.no_grad():
                return chunk_hgrn(x, g)[0]

        def fwdbwd(i):
            _, _, xg, gg, dy = data[i]
            o = chunk_hgrn(xg, gg)[0]
            return torch.autograd.grad(o, (xg, gg), dy)

        return PeerRun(fwd, fwdbwd, len(data), "(B, T, C), log gates")

    return Peer(
        name="chunk_hgrn",
        label="fla chunk_hgrn",
        note=(
            "flash-linear-attention `chunk_hgrn` (Triton): EXACT scan (no window), PER-CHANNEL "
            "log gates, (B, T, C) layout"
        ),
        layout="(B, T, C)",
        version=_version("fla-core", fla),
        prepare=prepare,
        kind="exact scan",
        key=lambda p: (p.B, p.L, p.H * p.D, p.dtype),
    )


# ----------------------------------------------------------------------------------------------
# attention: SDPA (flash) and flex_attention sliding windows
# ----------------------------------------------------------------------------------------------


def _attn_shape(p: PeerProblem):
    C = p.H * p.D
    hd = min(p.attn_head_dim, C)
    if C % hd:
        raise Unsupported(f"{C} channels do not split into heads of {hd}")
    return C // hd, hd


def _attn_sets(torch, p: PeerProblem, n_sets: int, seed: int, device):
    heads, hd = _attn_shape(p)
    dt = _torch_dtype(torch, p.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (p.B, heads, p.L, hd)
    data = []
    for _ in range(n_sets):
        q, k, v, do = (
            torch.randn(shape, device=device, dtype=torch.float32, generator=gen).to(dt)
            for _ in range(4)
        )
        data.append((q, k, v, _as_leaf(q, True), _as_leaf(k, True), _as_leaf(v, True), do))
    return data


def load_sdpa() -> Peer | None:
    torch, why = _torch_cuda()
    if torch is None:
        UNAVAILABLE["sdpa"] = why
        return None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa
    except Exception as exc:  # noqa: BLE001
        UNAVAILABLE["sdpa"] = f"{type(exc).__name__}: {exc}"
        return None

    def prepare(p: PeerProblem, sets) -> PeerRun:
        if p.dtype not in ("bfloat16", "float16"):
            raise Unsupported("the flash SDPA backend runs fp16/bf16 only")
        data = _attn_sets(torch, p, len(sets), 1234, sets[0]["u"].device)

        def fwd(i):
            q, k, v = data[i][:3]
            with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa(q, k, v, is_causal=True)

        def fwdbwd(i):
            _, _, _, qg, kg, vg, do = data[i]
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = sdpa(qg, kg, vg, is_causal=True)
            return torch.autograd.grad(o, (qg, kg, vg), do)

        heads, hd = _attn_shape(p)
        return PeerRun(fwd, fwdbwd, len(data), f"(B, {heads}, L, {hd})")

    return Peer(
        name="sdpa",
        label="SDPA causal",
        note="torch scaled_dot_product_attention, causal, flash backend, 128-dim heads",
        layout="(B, heads, L, 128)",
        version=_version("torch", torch),
        prepare=prepare,
        kind="attention",
        key=lambda p: (p.B, p.L, p.H * p.D, p.dtype, p.attn_head_dim),
    )


_FLEX_COMPILED = None


def load_flex(window: int) -> Peer | None:
    name = f"flex{window}"
    torch, why = _torch_cuda()
    if torch is None:
        UNAVAILABLE[name] = why
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # noqa: BLE001
        UNAVAILABLE[name] = f"{type(exc).__name__}: {exc}"
        return None

    def compiled():
        global _FLEX_COMPILED
        if _FLEX_COMPILED is None:
            dyn = torch._dynamo.config
            for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                         "accumulated_recompile_limit"):
                try:  # one compilation per shape, window and grad mode: allow them all
                    setattr(dyn, knob, max(getattr(dyn, knob), 256))
                except Exception:  # noqa: BLE001 - a knob this torch does not have
                    pass
            _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
        return _FLEX_COMPILED

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    def prepare(p: PeerProblem, sets) -> PeerRun:
        flex = compiled()
        device = sets[0]["u"].device
        data = _attn_sets(torch, p, len(sets), 4321, device)
        mask = create_block_mask(sliding_window, None, None, p.L, p.L, device=device)

        def fwd(i):
            q, k, v = data[i][:3]
            with torch.no_grad():
                return flex(q, k, v, block_mask=mask)

        def fwdbwd(i):
            _, _, _, qg, kg, vg, do = data[i]
            o = flex(qg, kg, vg, block_mask=mask)
            return torch.autograd.grad(o, (qg, kg, vg), do)

        heads, hd = _attn_shape(p)
        return PeerRun(fwd, fwdbwd, len(data), f"(B, {heads}, L, {hd})")

    return Peer(
        name=name,
        label=f"flex w{window}",
        note=(
            f"torch flex_attention (torch.compile), causal sliding window of {window} keys, "
            "128-dim heads"
        ),
        layout="(B, heads, L, 128)",
        version=_version("torch", torch),
        prepare=prepare,
        kind="attention",
        key=lambda p: (p.B, p.L, p.H * p.D, p.dtype, p.attn_head_dim),
    )


def load_peer(name: str, *, spear_build: str | None = None, spear_wait: float = 0.0):
    """One peer by name (see PEER_NAMES; ``flex<W>`` for any window W), or None with the reason
    in UNAVAILABLE."""
    UNAVAILABLE.pop(name, None)
    if name == "spear":
        return load_spear(spear_build, spear_wait)
    if name == "accelerated-scan":
        return load_accelerated_scan()
    if name == "chunk_hgrn":
        return load_chunk_hgrn()
    if name == "sdpa":
        return load_sdpa()
    if name.startswith("flex") and name[4:].isdigit() and int(name[4:]) > 0:
        return load_flex(int(name[4:]))
    UNAVAILABLE[name] = f"unknown peer {name!r}; known: {', '.join(PEER_NAMES)} (flex<W>)"
    return None


def load_peers(names=PEER_NAMES, *, spear_build: str | None = None, spear_wait: float = 0.0):
    """The available peers among ``names`` (in that order); the others land in UNAVAILABLE."""
    peers = (load_peer(n, spear_build=spear_build, spear_wait=spear_wait) for n in names)
    return [p for p in peers if p is not None]
