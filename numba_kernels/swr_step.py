"""One-token decoding kernels that update a state in place: the SWR step and the fused Phalanx step.

Both kernels work on a state's arrays (see ``swr_array.state.SWRState``), all C-contiguous and
seen as 1-D: ``position`` (B,) int64, ``w``, ``g`` (B*H*D) float32 and the carriers ``cv``, ``cC``
(B*H*D*K) float32, newest first. Each row has its own position; its in-block offset
``position % block_len`` is computed on the device, so rows at different positions step together
and nothing on the host changes between steps (the launch can be captured in a CUDA graph).

Per channel (``step_channel``, the device form of ``swr_array.reference.step``), with the token's
coefficient a and input u at offset ``off``:

    w, g = (u, a) if off == 0 else (a w + u, a g)
    S    = sum_m (cC_0 ... cC_{m-1}) cv_m          window modes (hops = K >= 1)
         = cv_0                                     exact mode (hops=None: the running s)
         = 0                                        hops=0
    s    = w + g S
and when the token closes its block (off == block_len - 1) the block becomes the newest carrier
(window: shift the K carriers, (w, g) first; exact: cv_0 = s) and w, g restart at 0, 1.
Carriers a row does not have yet are 0 in the state, so the window sum needs no per-row count.

Work split: one thread per channel; a row's H*D channels span ``nchunks`` thread blocks, all of
which read the row's position first. The position advances once every block of the row has read
it: after a barrier each block adds itself to the row's ``arrivals`` counter (int32, (B,), kept
with the state, 0 between launches), and the block that arrives last writes ``position + 1`` and
resets the counter.

- ``swr_step_kernel(a, u, y, position, w, g, cv, cC, arrivals, HD, D, a_per_channel, block_len,
  mode, K, nchunks)``:
  a (B*H) per head or (B*H*D) per channel, u (B*H*D), y (B*H*D); a and u of one storage kind,
  y of its own.
- ``phalanx_step_kernel(z, y, b_a, b_b, b_c, position, w, g, cv, cC, arrivals, H, D, G,
  decay_max, block_len, mode, K, nchunks)``: z (B*W) the input GEMM's output row per token, columns
  ``[V | Bg | C | A]``, y (B*H*D) = ``s * C + V`` with ``A = decay_max * sigmoid(z_a + b_a)``,
  ``Bg = sigmoid(z_b + b_b)``, ``C = z_c + b_c`` (head h reads kv head h // G), u = Bg * V.

bfloat16 arrays arrive as uint16 views. ``mode``: 0 (hops=0), 1 (window, K = hops >= 1),
2 (exact, hops=None, K = 1).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda, types

from ._dtypes import KINDS, LOAD, SIMULATOR, STORE, storage_kind
from ._launch import FlatArray, data_pointer, launch_with_pointers, prepare

__all__ = ["MODE_NONE", "MODE_WINDOW", "MODE_EXACT", "TPB", "hops_mode", "swr_step_kernel",
           "phalanx_step_kernel", "kernel_signatures", "StepLaunch", "swr_step_launch",
           "phalanx_step_launch"]

MODE_NONE, MODE_WINDOW, MODE_EXACT = 0, 1, 2
TPB = 256
"""Threads per block: one thread per channel, a row's H*D channels over ceil(H*D / TPB)
blocks."""

F0 = np.float32(0.0)
F1 = np.float32(1.0)


def hops_mode(hops) -> tuple[int, int]:
    """(mode, K) of a state's hops: K is the carriers' last extent."""
    if hops is None:
        return MODE_EXACT, 1
    if hops == 0:
        return MODE_NONE, 0
    return MODE_WINDOW, int(hops)


@cuda.jit(device=True, inline=True)
def step_channel(a, u, pos, block_len, mode, K, i, w, g, cv, cC):
    """One token of channel ``i`` (flat (b, h, d)) at absolute position ``pos``: updates the
    state arrays in place and returns s_t."""
    off = pos % block_len
    if off == 0:
        wn = u
        gn = a
    else:
        wn = a * w[i] + u
        gn = a * g[i]
    S = F0
    base = i * K
    if mode == MODE_EXACT:
        S = cv[base]
    elif mode == MODE_WINDOW:
        R = F1
        for m in range(K):
            S += R * cv[base + m]
            R *= cC[base + m]
    s = wn + gn * S
    if off == block_len - 1:  # the token closes its block: it becomes the newest carrier
        w[i] = F0
        g[i] = F1
        if mode == MODE_EXACT:
            cv[base] = s
        elif mode == MODE_WINDOW:
            for m in range(K - 1, 0, -1):
                cv[base + m] = cv[base + m - 1]
                cC[base + m] = cC[base + m - 1]
            cv[base] = wn
            cC[base] = gn
    else:
        w[i] = wn
        g[i] = gn
    return s


@cuda.jit(device=True, inline=True)
def _sigmoid(x):
    return F1 / (F1 + math.exp(-x))


@cuda.jit(device=True, inline=True)
def _advance_position(position, arrivals, b, pos, nchunks):
    """Row b's position advances once all its thread blocks have read it: each block counts
    itself in ``arrivals[b]`` after a barrier, and the last one writes the position and resets
    the count (so it is 0 again for the next launch)."""
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        cuda.threadfence()
        if cuda.atomic.add(arrivals, b, numba.int32(1)) == nchunks - 1:
            arrivals[b] = numba.int32(0)
            position[b] = pos + 1


def _make_swr_step(kind: str, out_kind: str):
    load = LOAD[kind]
    store = STORE[out_kind]

    def swr_step_kernel(a, u, y, position, w, g, cv, cC, arrivals, HD, D, a_per_channel,
                        block_len, mode, K, nchunks):
        blk = numba.int64(cuda.blockIdx.x)
        b = blk // nchunks
        pos = position[b]
        c = (blk - b * nchunks) * cuda.blockDim.x + cuda.threadIdx.x
        if c < HD:
            i = b * HD + c
            ai = i if a_per_channel != 0 else b * (HD // D) + c // D
            s = step_channel(load(a[ai]), load(u[i]), pos, block_len, mode, K, i, w, g, cv, cC)
            y[i] = store(s)
        _advance_position(position, arrivals, b, pos, nchunks)

    return cuda.jit(swr_step_kernel)


def _make_phalanx_step(kind: str):
    load = LOAD[kind]
    store = STORE[kind]

    def phalanx_step_kernel(z, y, b_a, b_b, b_c, position, w, g, cv, cC, arrivals, H, D, G,
                            decay_max, block_len, mode, K, nchunks):
        blk = numba.int64(cuda.blockIdx.x)
        b = blk // nchunks
        pos = position[b]
        c = (blk - b * nchunks) * cuda.blockDim.x + cuda.threadIdx.x
        HD = H * D
        if c < HD:
            KD = (H // G) * D
            zr = b * (HD + 2 * KD + H)
            h = c // D
            d = c - h * D
            kc = (h // G) * D + d
            a = decay_max * _sigmoid(load(z[zr + HD + 2 * KD + h]) + load(b_a[h]))
            v = load(z[zr + c])
            u = _sigmoid(load(z[zr + HD + kc]) + load(b_b[kc])) * v
            cc = load(z[zr + HD + KD + kc]) + load(b_c[kc])
            i = b * HD + c
            s = step_channel(a, u, pos, block_len, mode, K, i, w, g, cv, cC)
            y[i] = store(s * cc + v)
        _advance_position(position, arrivals, b, pos, nchunks)

    return cuda.jit(phalanx_step_kernel)


_CACHE: dict = {}


def swr_step_kernel(kind: str, out_kind: str):
    key = ("swr", kind, out_kind)
    if key not in _CACHE:
        _CACHE[key] = _make_swr_step(kind, out_kind)
    return _CACHE[key]


def phalanx_step_kernel(kind: str):
    key = ("phalanx", kind)
    if key not in _CACHE:
        _CACHE[key] = _make_phalanx_step(kind)
    return _CACHE[key]


_STORAGE = {"f32": types.float32, "f16": types.float16, "bf16": types.uint16}


def kernel_signatures():
    """Every specialisation the launch helpers use: (kernel, signature) pairs."""
    i64, f4 = types.int64, types.float32
    f1, p1 = types.Array(f4, 1, "C"), types.Array(i64, 1, "C")
    n1 = types.Array(types.int32, 1, "C")
    out = []
    for kind in KINDS:
        v1 = types.Array(_STORAGE[kind], 1, "C")
        for out_kind in KINDS:
            o1 = types.Array(_STORAGE[out_kind], 1, "C")
            sig = (v1, v1, o1, p1) + (f1,) * 4 + (n1,) + (i64,) * 7
            out.append((swr_step_kernel(kind, out_kind), sig))
        sig = (v1,) * 5 + (p1,) + (f1,) * 4 + (n1,) + (i64,) * 3 + (f4,) + (i64,) * 4
        out.append((phalanx_step_kernel(kind), sig))
    return out


# ----------------------------------------------------------------------------------------------
# Launching: prepared once per (kernel, state, fixed arrays), relaunched with new data pointers
# ----------------------------------------------------------------------------------------------


def _flat(x):
    """A 1-D view of a C-contiguous array (bfloat16 as uint16 bits); FlatArray on the GPU.
    torch tensors are read through ``data_ptr()`` (their ``__cuda_array_interface__`` refuses
    bfloat16)."""
    if isinstance(x, np.ndarray):
        v = x.reshape(-1)
        return v.view(np.uint16) if v.dtype.name == "bfloat16" else v
    if hasattr(x, "data_ptr") and hasattr(x, "numel"):
        name = str(x.dtype).replace("torch.", "")
        return FlatArray(x.data_ptr(), x.numel(), np.uint16 if name == "bfloat16" else name)
    return FlatArray.of(x)


def _kind(dtype) -> str:
    """Storage kind of a NumPy/CuPy dtype or a torch dtype."""
    try:
        return storage_kind(dtype)
    except TypeError:
        name = str(dtype).replace("torch.", "")
        return {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[name]


def _pointer(x):
    if type(x) is int:
        return x
    f = getattr(x, "data_ptr", None)
    if f is not None:
        return f()
    return data_pointer(x)


class StepLaunch:
    """A step kernel launch whose leading ``nvar`` array arguments change between calls (the
    token's inputs and outputs) and whose others (the state, the biases) are fixed.

    ``run(*arrays, stream=None)`` launches with new leading arrays (anything with
    ``__cuda_array_interface__``, CuPy arrays, or device pointers as ints; NumPy arrays in the
    simulator), of the sizes and dtypes given at construction. Nothing is allocated and nothing
    synchronises: the launch can be captured in a CUDA graph.
    """

    __slots__ = ("kernel", "grid", "block", "entry", "values", "fixed", "nvar")

    def __init__(self, kernel, grid, block, args, nvar):
        self.kernel, self.grid, self.block, self.nvar = kernel, grid, block, nvar
        self.fixed = tuple(args[nvar:])
        if grid[0] == 0 or block[0] == 0:  # no rows or no channels: nothing to launch
            self.kernel = self.entry = self.values = None
        elif SIMULATOR:
            self.entry = self.values = None
        else:
            self.entry, self.values = prepare(kernel, tuple(_flat(x) for x in args[:nvar])
                                              + self.fixed)

    def run(self, *arrays, stream=None):
        if self.kernel is None:
            return
        if SIMULATOR:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

            args = tuple(_flat(x) for x in arrays) + self.fixed
            args = tuple(FakeCUDAArray(x) if isinstance(x, np.ndarray) else x for x in args)
            self.kernel[self.grid, self.block](*args)
            return
        ptrs = [_pointer(x) for x in arrays]
        launch_with_pointers(self.entry, self.grid, self.block, self.values, ptrs, stream)


def _dummy(like):
    if isinstance(like, np.ndarray):
        return np.zeros(1, np.float32)
    import cupy

    return cupy.zeros(1, np.float32)


def _state_args(state_arrays, arrivals, hops):
    position, w, g, cv, cC = state_arrays
    mode, K = hops_mode(hops)
    if K == 0:
        cv = cC = _dummy(w)
    return (_flat(position), _flat(w), _flat(g), _flat(cv), _flat(cC), _flat(arrivals)), mode, K


def _split(B, hd):
    """(grid, block, chunks per row): one thread per channel, a row over ``chunks`` blocks."""
    tpb = _tpb(hd)
    nchunks = -(-hd // tpb) if tpb else 0
    return (B * nchunks,), (tpb,), nchunks


def swr_step_launch(a, u, y, state_arrays, arrivals, *, hops, block_len,
                    per_channel) -> StepLaunch:
    """A :class:`StepLaunch` of ``swr_step_kernel`` for tokens like ``a``, ``u``, ``y``
    (``(B, H)``/``(B, H, D)``, ``(B, H, D)``, ``(B, H, D)``) over ``state_arrays`` =
    ``(position, w, g, carry_v, carry_C)`` and ``arrivals`` ``(B,)`` int32 zeros (kept with the
    state: the kernel leaves them 0); run it as ``.run(a, u, y)``."""
    B, H, D = u.shape
    kernel = swr_step_kernel(_kind(u.dtype), _kind(y.dtype))
    st, mode, K = _state_args(state_arrays, arrivals, hops)
    grid, block, nchunks = _split(B, H * D)
    i64 = np.int64
    args = (a, u, y) + st + (i64(H * D), i64(D), i64(per_channel), i64(block_len), i64(mode),
                             i64(K), i64(nchunks))
    return StepLaunch(kernel, grid, block, args, 3)


def phalanx_step_launch(z, y, b_a, b_b, b_c, state_arrays, arrivals, *, heads, head_dim,
                        kv_heads, decay_max, hops, block_len) -> StepLaunch:
    """A :class:`StepLaunch` of ``phalanx_step_kernel``: ``.run(z, y)`` with z ``(B, W)`` and
    y ``(B, H*D)`` of the biases' dtype (``arrivals`` as in :func:`swr_step_launch`)."""
    B = z.shape[0]
    kernel = phalanx_step_kernel(_kind(z.dtype))
    st, mode, K = _state_args(state_arrays, arrivals, hops)
    grid, block, nchunks = _split(B, heads * head_dim)
    i64 = np.int64
    args = ((z, y, _flat(b_a), _flat(b_b), _flat(b_c)) + st
            + (i64(heads), i64(head_dim), i64(heads // kv_heads), np.float32(decay_max),
               i64(block_len), i64(mode), i64(K), i64(nchunks)))
    return StepLaunch(kernel, grid, block, args, 2)


def _tpb(hd):
    if hd == 0:
        return 0
    if SIMULATOR:
        return min(hd, 4)  # several blocks per row, few simulated threads
    return min(TPB, 32 * -(-hd // 32))
