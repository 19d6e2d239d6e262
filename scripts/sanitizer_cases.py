"""Small runs of every SWR and fused Phalanx kernel path, for compute-sanitizer (memcheck,
racecheck).

CuPy's memory pool is switched off so that an out-of-bounds access is not hidden inside a larger
pooled allocation. Exits non-zero if any result disagrees with the reference.
"""

from __future__ import annotations

import sys

import cupy
import ml_dtypes
import numpy as np

import swr_array as sa

cupy.cuda.set_allocator(None)
quick = "--quick" in sys.argv  # racecheck is slow: one dtype, hops 1 and 2
rng = np.random.default_rng(0)
bad = 0
for layout in ("BHDL", "BLHD"):
    for per_head in (True, False):
        for hops in (1, 2) if quick else (0, 1, 2, None):
            for dtype in (ml_dtypes.bfloat16,) if quick else (np.float32, ml_dtypes.bfloat16):
                # (1, 2, 16, 320, 16): BLHD hops=1 takes the shared walk (five 64-step chunks)
                for (B, H, D, N, l) in ((2, 3, 16, 70, 16), (1, 2, 16, 64, 16), (1, 2, 5, 33, 8),
                                        (1, 2, 16, 320, 16)):
                    us = (B, H, D, N) if layout == "BHDL" else (B, N, H, D)
                    if per_head:
                        as_ = (B, H, N) if layout == "BHDL" else (B, N, H)
                    else:
                        as_ = us
                    u = rng.standard_normal(us).astype(dtype)
                    a = rng.uniform(-1, 1, as_).astype(dtype)
                    dy = rng.standard_normal(us).astype(dtype)
                    kw = dict(block_len=l, hops=hops, layout=layout)
                    y, st = sa.swr(cupy.asarray(a), cupy.asarray(u), return_state=True, **kw)
                    da, du, _ = sa.swr_vjp(cupy.asarray(a), cupy.asarray(u), cupy.asarray(dy), **kw)
                    ref = sa.swr(a.astype(np.float64), u.astype(np.float64), **kw)
                    err = np.abs(y.get().astype(np.float64) - ref).max() / (np.abs(ref).max() + 1)
                    if not err < 2e-2:
                        bad += 1
                        print("MISMATCH", layout, per_head, hops, dtype, B, H, D, N, l, err)

# the Phalanx layer's fused kernels: forward (chunk walk; 300 tokens are three chunks), backward
# (block walk; two chunks), 16-byte (8 heads of 16) and narrower accesses, kv groups, partial blocks
for dtype in (ml_dtypes.bfloat16,) if quick else (np.float32, ml_dtypes.bfloat16):
    for (dim, kv, B, L) in ((128, None, 1, 300), (48, 1, 2, 37)):
        p = sa.init_phalanx(dim, kv_heads=kv, dtype=dtype, seed=1)
        x = rng.standard_normal((B, L, dim)).astype(dtype)
        dout = rng.standard_normal((B, L, dim)).astype(dtype)
        pc = {k: cupy.asarray(v) for k, v in p.items()}
        out = sa.phalanx(cupy.asarray(x), pc)
        dx, _ = sa.phalanx_vjp(cupy.asarray(x), pc, cupy.asarray(dout))
        for name, got, ref in (("phalanx", out, sa.phalanx(x, p)),
                               ("phalanx_vjp dx", dx, sa.phalanx_vjp(x, p, dout)[0])):
            ref = np.asarray(ref, np.float64)
            err = np.abs(got.get().astype(np.float64) - ref).max() / (np.abs(ref).max() + 1)
            if not err < 3e-2:
                bad += 1
                print("MISMATCH", name, dtype, dim, kv, B, L, err)
cupy.cuda.runtime.deviceSynchronize()
print("sanitizer cases done, mismatches:", bad)
sys.exit(1 if bad else 0)
