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

Work split (a launch *plan*, fixed per state and shapes): ``tpb`` threads per block, each thread
``cpt`` channels (``c = chunk*tpb*cpt + j*tpb + t``, so every load of a warp is coalesced), and a
row's H*D channels over ``nchunks`` blocks (1 unless the row is wider than 1024 threads of
``cpt`` channels). A thread first issues every load of its ``cpt`` channels (z columns, biases,
w, g, carriers) into registers and only then computes and stores, so the loads are in flight
together rather than one channel's latency after another. Shapes, heads per kv head, hops, block
length and the plan are compile-time constants of each specialisation (no run-time integer
division). The position advances once every block of the row has read it: with one block per
row, thread 0 writes ``position + 1`` after a barrier; with several, each block adds itself to the
row's ``arrivals`` counter (int32, (B,), kept with the state, 0 between launches) after a barrier,
and the block that arrives last writes the position and resets the counter.

- ``swr_step_kernel(kind, out_kind, HD, D, per_channel, mode, K, block_len, tpb, cpt, nchunks)``
  -> kernel ``(a, u, y, position, w, g, cv, cC, arrivals)``: a (B*H) per head or (B*H*D) per
  channel, u (B*H*D), y (B*H*D); a and u of one storage kind, y of its own.
- ``phalanx_step_kernel(kind, H, D, G, mode, K, block_len, tpb, cpt, nchunks)`` -> kernel
  ``(z, y, b_a, b_b, b_c, position, w, g, cv, cC, arrivals, decay_max)``: z (B*W) the input
  GEMM's output row per token, columns ``[V | Bg | C | A]``, y (B*H*D) = ``s * C + V`` with
  ``A = decay_max * sigmoid(z_a + b_a)``, ``Bg = sigmoid(z_b + b_b)``, ``C = z_c + b_c`` (head h
  reads kv head h // G), u = Bg * V.

bfloat16 arrays arrive as uint16 views. ``mode``: 0 (hops=0), 1 (window, K = hops >= 1),
2 (exact, hops=None, K = 1).
"""

from __future__ import annotations

import math
import struct

import numba
import numpy as np
from numba import cuda, types

from ._dtypes import KINDS, LOAD, SIMULATOR, STORE, storage_kind
from ._launch import FlatArray, data_pointer, launch_with_pointers, prepare

__all__ = ["MODE_NONE", "MODE_WINDOW", "MODE_EXACT", "hops_mode", "plan", "swr_step_kernel",
           "phalanx_step_kernel", "kernel_signatures", "StepLaunch", "swr_step_launch", "spread",
           "phalanx_step_launch", "PackedLaunch"]

MODE_NONE, MODE_WINDOW, MODE_EXACT = 0, 1, 2
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
def _sigmoid(x):
    return F1 / (F1 + math.exp(-x))


def _make_channel_step(mode, K, block_len):
    """Device function ``(a, u, off, j, rw, rg, rcv, rcC, i, w, g, cv, cC) -> s``: one token of
    channel ``i`` (flat (b, h, d)) at in-block offset ``off``, whose state the thread has loaded
    into its registers ``rw[j]``, ``rg[j]``, ``rcv[j*K + m]``, ``rcC[j*K + m]``; writes the new
    state to ``w``, ``g``, ``cv``, ``cC`` (the device form of ``swr_array.reference.step``)."""
    KK = max(K, 1)

    @cuda.jit(device=True, inline=True)
    def channel_step(a, u, off, j, rw, rg, rcv, rcC, i, w, g, cv, cC):
        if off == 0:
            wn = u
            gn = a
        else:
            wn = a * rw[j] + u
            gn = a * rg[j]
        S = F0
        if mode == MODE_EXACT:
            S = rcv[j]
        elif mode == MODE_WINDOW:
            R = F1
            for m in range(K):
                S += R * rcv[j * KK + m]
                if m < K - 1:
                    R *= rcC[j * KK + m]
        s = wn + gn * S
        if off == block_len - 1:  # the token closes its block: it becomes the newest carrier
            w[i] = F0
            g[i] = F1
            if mode == MODE_EXACT:
                cv[i] = s
            elif mode == MODE_WINDOW:
                base = i * K
                for m in range(K - 1, 0, -1):
                    cv[base + m] = rcv[j * KK + m - 1]
                    cC[base + m] = rcC[j * KK + m - 1]
                cv[base] = wn
                cC[base] = gn
        else:
            w[i] = wn
            g[i] = gn
        return s

    return channel_step


def _make_load_state(mode, K):
    """Device function ``(j, i, w, g, cv, cC, rw, rg, rcv, rcC)``: loads channel ``i``'s state
    into the registers ``channel_step`` reads (w, g, and the carriers the window sum and the
    shift read). Nothing here waits for the row's position, so these loads are in flight
    together with its load."""
    KK = max(K, 1)

    @cuda.jit(device=True, inline=True)
    def load_state(j, i, w, g, cv, cC, rw, rg, rcv, rcC):
        rw[j] = w[i]
        rg[j] = g[i]
        if mode == MODE_EXACT:
            rcv[j] = cv[i]
        elif mode == MODE_WINDOW:
            base = i * K
            for m in range(K):
                rcv[j * KK + m] = cv[base + m]
                if m < K - 1:
                    rcC[j * KK + m] = cC[base + m]

    return load_state


@cuda.jit(device=True, inline=True)
def _advance_position(position, arrivals, b, pos, nchunks):
    """Row b's position advances once all its thread blocks have read it. One block: thread 0
    writes it after a barrier. Several: each block counts itself in ``arrivals[b]`` after a
    barrier, and the last one writes the position and resets the count (so it is 0 again for
    the next launch)."""
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        if nchunks == 1:
            position[b] = pos + 1
        else:
            cuda.threadfence()
            if cuda.atomic.add(arrivals, b, numba.int32(1)) == nchunks - 1:
                arrivals[b] = numba.int32(0)
                position[b] = pos + 1


def _make_swr_step(kind, out_kind, HD, D, per_channel, mode, K, block_len, tpb, cpt, nchunks):
    load = LOAD[kind]
    store = STORE[out_kind]
    H = HD // D
    KK = max(K, 1)
    span = tpb * cpt
    NRK = cpt * KK
    channel_step = _make_channel_step(mode, K, block_len)
    load_state = _make_load_state(mode, K)
    f4 = numba.float32

    def swr_step_kernel(a, u, y, position, w, g, cv, cC, arrivals):
        blk = numba.int64(cuda.blockIdx.x)
        b = blk // nchunks
        c0 = (blk - b * nchunks) * span + cuda.threadIdx.x
        pos = position[b]
        off = pos % block_len
        ra = cuda.local.array(cpt, f4)
        ru = cuda.local.array(cpt, f4)
        rw = cuda.local.array(cpt, f4)
        rg = cuda.local.array(cpt, f4)
        rcv = cuda.local.array(NRK, f4)
        rcC = cuda.local.array(NRK, f4)
        for j in range(cpt):  # every load first ...
            c = c0 + j * tpb
            if c < HD:
                i = b * HD + c
                ai = i if per_channel else b * H + c // D
                ra[j] = load(a[ai])
                ru[j] = load(u[i])
                load_state(j, i, w, g, cv, cC, rw, rg, rcv, rcC)
        for j in range(cpt):  # ... then the arithmetic and the stores
            c = c0 + j * tpb
            if c < HD:
                i = b * HD + c
                s = channel_step(ra[j], ru[j], off, j, rw, rg, rcv, rcC, i, w, g, cv, cC)
                y[i] = store(s)
        _advance_position(position, arrivals, b, pos, nchunks)

    return cuda.jit(swr_step_kernel)


def _make_phalanx_step(kind, H, D, G, mode, K, block_len, tpb, cpt, nchunks):
    load = LOAD[kind]
    store = STORE[kind]
    HD = H * D
    KD = (H // G) * D
    W = HD + 2 * KD + H
    KK = max(K, 1)
    span = tpb * cpt
    NRK = cpt * KK
    channel_step = _make_channel_step(mode, K, block_len)
    load_state = _make_load_state(mode, K)
    f4 = numba.float32

    def phalanx_step_kernel(z, y, b_a, b_b, b_c, position, w, g, cv, cC, arrivals, decay_max):
        blk = numba.int64(cuda.blockIdx.x)
        b = blk // nchunks
        c0 = (blk - b * nchunks) * span + cuda.threadIdx.x
        pos = position[b]
        off = pos % block_len
        zr = b * W
        ra = cuda.local.array(cpt, f4)
        rv = cuda.local.array(cpt, f4)
        rb = cuda.local.array(cpt, f4)
        rc = cuda.local.array(cpt, f4)
        rw = cuda.local.array(cpt, f4)
        rg = cuda.local.array(cpt, f4)
        rcv = cuda.local.array(NRK, f4)
        rcC = cuda.local.array(NRK, f4)
        for j in range(cpt):  # every load first ...
            c = c0 + j * tpb
            if c < HD:
                h = c // D
                kc = (h // G) * D + (c - h * D)
                ra[j] = load(z[zr + HD + 2 * KD + h]) + load(b_a[h])
                rv[j] = load(z[zr + c])
                rb[j] = load(z[zr + HD + kc]) + load(b_b[kc])
                rc[j] = load(z[zr + HD + KD + kc]) + load(b_c[kc])
                load_state(j, b * HD + c, w, g, cv, cC, rw, rg, rcv, rcC)
        for j in range(cpt):  # ... then the gates, the recurrence and the stores
            c = c0 + j * tpb
            if c < HD:
                i = b * HD + c
                a = decay_max * _sigmoid(ra[j])
                v = rv[j]
                s = channel_step(a, _sigmoid(rb[j]) * v, off, j, rw, rg, rcv, rcC, i, w, g, cv,
                                 cC)
                y[i] = store(s * rc[j] + v)
        _advance_position(position, arrivals, b, pos, nchunks)

    return cuda.jit(phalanx_step_kernel)


_CACHE: dict = {}


def swr_step_kernel(kind: str, out_kind: str, HD: int, D: int, per_channel: bool, mode: int,
                    K: int, block_len: int, tpb: int, cpt: int, nchunks: int):
    """The ``swr_step`` kernel specialised on its storage kinds, shapes, hops and plan
    (compiled once per distinct key)."""
    key = ("swr", kind, out_kind, int(HD), int(D), bool(per_channel), int(mode), int(K),
           int(block_len), int(tpb), int(cpt), int(nchunks))
    if key not in _CACHE:
        _CACHE[key] = _make_swr_step(*key[1:])
    return _CACHE[key]


def phalanx_step_kernel(kind: str, H: int, D: int, G: int, mode: int, K: int, block_len: int,
                        tpb: int, cpt: int, nchunks: int):
    """The Phalanx step kernel specialised on its storage kind, heads, head_dim, heads per kv
    head ``G``, hops, block length and plan (compiled once per distinct key)."""
    key = ("phalanx", kind, int(H), int(D), int(G), int(mode), int(K), int(block_len),
           int(tpb), int(cpt), int(nchunks))
    if key not in _CACHE:
        _CACHE[key] = _make_phalanx_step(*key[1:])
    return _CACHE[key]


_STORAGE = {"f32": types.float32, "f16": types.float16, "bf16": types.uint16}


def _device_plan(hd, K):
    cpt = max(1, min(8 // max(K, 1), -(-hd // 512)))
    threads = -(-hd // cpt)
    return min(1024, 32 * -(-threads // 32)), cpt


def plan(hd: int, K: int) -> tuple[int, int, int]:
    """``(tpb, cpt, nchunks)`` of a row of ``hd`` channels with ``K`` carriers per channel.

    A thread takes ``cpt`` channels (fewer when carriers are many: at most 8 register sets of
    carriers per thread), aiming at about 512 threads per block; a row goes to one block
    unless that would need more than 1024 threads. The CUDA simulator takes 2 threads of 2
    channels, so small test shapes exercise several channels per thread and several blocks per
    row."""
    if hd == 0:
        return 0, 0, 0
    tpb, cpt = (2, 2) if SIMULATOR else _device_plan(hd, K)
    return tpb, cpt, -(-hd // (tpb * cpt))


def kernel_signatures():
    """Representative specialisations for compile tests: (kernel, signature) pairs covering
    every storage kind (and pair), per-head and per-channel coefficients, every hops mode,
    grouped kv heads, one and several blocks per row, one and several channels per thread."""
    f1, p1 = types.Array(types.float32, 1, "C"), types.Array(types.int64, 1, "C")
    n1 = types.Array(types.int32, 1, "C")
    st = (p1,) + (f1,) * 4 + (n1,)
    out = []

    def plan_of(hd, K, n):  # the device plan, or (every other one) 32 threads of 1 channel
        tpb, cpt = _device_plan(hd, K) if n % 2 == 0 else (32, 1)
        return tpb, cpt, -(-hd // (tpb * cpt))

    n = 0
    for k, kind in enumerate(KINDS):
        v1 = types.Array(_STORAGE[kind], 1, "C")
        for j, out_kind in enumerate(KINDS):
            o1 = types.Array(_STORAGE[out_kind], 1, "C")
            per_channel, (mode, K) = j % 2 == 1, hops_mode((1, None, 2)[j])
            out.append((swr_step_kernel(kind, out_kind, 2048, 16, per_channel, mode, K, 16,
                                        *plan_of(2048, K, n)), (v1, v1, o1) + st))
            n += 1
        sig = (v1,) * 5 + st + (types.float32,)
        configs = ((1, 1), (2, 0), (1, None), (4, 3))
        for G, hops in (configs[k % 4], configs[(k + 2) % 4]):
            mode, K = hops_mode(hops)
            out.append((phalanx_step_kernel(kind, 128, 16, G, mode, K, 16, *plan_of(2048, K, n)),
                        sig))
            n += 1
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


_U64 = struct.Struct("<Q")


class PackedLaunch:
    """A :func:`._launch.prepare`'d launch whose parameter block is packed once, into a buffer of
    its own: ``run(pointers, stream)`` rewrites only the leading 1-D arrays' data pointers
    (``nptr`` of them) and calls ``cuLaunchKernel``, skipping the per-call packing of every
    parameter. One buffer per launch: calls of one launch from several threads at once would
    race on it (as they would on the state they advance)."""

    __slots__ = ("entry", "values", "grid", "block", "shared", "fn", "dims", "buf", "extra",
                 "extra_ptr", "slots")

    def __init__(self, entry, values, grid, block, nptr, shared=0):
        from ._launch import _PARAM_OFFSET, _dims

        self.entry, self.values, self.grid, self.block, self.shared = (entry, values, grid, block,
                                                                       shared)
        packer, nbytes = entry.packer
        self.buf = np.zeros(packer.size, np.uint8)
        packer.pack_into(self.buf, 0, nbytes, *values)
        base = self.buf.ctypes.data
        # cuLaunchKernel `extra`: {CU_LAUNCH_PARAM_BUFFER_POINTER, ptr, ..._SIZE, &size, ..._END}
        self.extra = np.array([1, base + _PARAM_OFFSET, 2, base, 0], dtype=np.uint64)
        self.extra_ptr = self.extra.ctypes.data
        # each 1-D array is 7 parameters (meminfo, parent, nitems, itemsize, data, shape, stride)
        self.slots = tuple(_PARAM_OFFSET + entry.offsets[7 * i + 4] for i in range(nptr))
        self.fn = entry.function_ptr
        self.dims = (*_dims(grid), *_dims(block), shared)

    def run(self, pointers, stream=None):
        buf = self.buf
        for off, ptr in zip(self.slots, pointers):
            _U64.pack_into(buf, off, ptr)
        if stream is None:
            from ._launch import _current_stream

            stream = _current_stream().ptr
        else:
            stream = getattr(stream, "ptr", stream)
        try:
            _launch_kernel(self.fn, *self.dims, stream, 0, self.extra_ptr)
        except Exception:  # noqa: BLE001 - a driver that refuses `extra`: the general launch
            launch_with_pointers(self.entry, self.grid, self.block, self.values, pointers, stream,
                                 self.shared)


def _launch_kernel(*args):
    from cupy_backends.cuda.api.driver import launchKernel

    global _launch_kernel
    _launch_kernel = launchKernel
    launchKernel(*args)


class StepLaunch:
    """A step kernel launch whose leading ``nvar`` array arguments change between calls (the
    token's inputs and outputs) and whose others (the state, the biases) are fixed.

    ``run(*arrays, stream=None)`` launches with new leading arrays (anything with
    ``__cuda_array_interface__``, CuPy arrays, or device pointers as ints; NumPy arrays in the
    simulator), of the sizes and dtypes given at construction. Nothing is allocated and nothing
    synchronises: the launch can be captured in a CUDA graph.
    """

    __slots__ = ("kernel", "grid", "block", "entry", "values", "fixed", "nvar", "packed")

    def __init__(self, kernel, grid, block, args, nvar):
        self.kernel, self.grid, self.block, self.nvar = kernel, grid, block, nvar
        self.fixed = tuple(args[nvar:])
        self.packed = None
        if grid[0] == 0 or block[0] == 0:  # no rows or no channels: nothing to launch
            self.kernel = self.entry = self.values = None
        elif SIMULATOR:
            self.entry = self.values = None
        else:
            self.entry, self.values = prepare(kernel, tuple(_flat(x) for x in args[:nvar])
                                              + self.fixed)
            self.packed = PackedLaunch(self.entry, self.values, grid, block, nvar)

    def run(self, *arrays, stream=None):
        if self.kernel is None:
            return
        if SIMULATOR:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

            args = tuple(_flat(x) for x in arrays) + self.fixed
            args = tuple(FakeCUDAArray(x) if isinstance(x, np.ndarray) else x for x in args)
            self.kernel[self.grid, self.block](*args)
            return
        self.packed.run([_pointer(x) for x in arrays], stream)


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


SPREAD_THREADS = {"swr": 16384, "phalanx": 65536}
"""Below about this many threads in all at the row plan's channels per thread, :func:`spread`
gives each thread fewer channels and each row more blocks (per kernel: the Phalanx middle
kernel does more work per channel)."""
SPREAD_TPB = 128
"""Threads per block of a spread plan."""


def spread(B: int, hd: int, tpb: int, cpt: int, nchunks: int, threads: int):
    """The plan ``(tpb, cpt, nchunks)`` for ``B`` rows: the row plan where ``B * hd / cpt``
    threads reach ``threads``, else ``SPREAD_TPB`` threads a block of the fewest channels per
    thread (a power of two) that keeps about ``threads`` threads, each row over several blocks
    (the position then advances through the row's arrival counter). At small batch one block a
    row leaves most SMs idle and each thread waits on several channels' loads in turn. The
    thread targets ``SPREAD_THREADS`` reproduce the plans ``scripts/step_plan_sweep.py`` found
    fastest at dim 2048 (docs/decoding.md gives the times)."""
    want = -(-B * hd // threads)
    if want >= cpt or tpb <= SPREAD_TPB:
        return tpb, cpt, nchunks
    c = 1
    while c < want:
        c *= 2
    return SPREAD_TPB, c, -(-hd // (SPREAD_TPB * c))


def _grid(B, hd, K, tpb_cpt, kernel):
    if tpb_cpt is None:
        tpb, cpt, nchunks = plan(hd, K)
        if not SIMULATOR and tpb:
            tpb, cpt, nchunks = spread(B, hd, tpb, cpt, nchunks, SPREAD_THREADS[kernel])
    else:
        tpb, cpt = tpb_cpt
        nchunks = -(-hd // (tpb * cpt))
    return (B * nchunks,), (tpb,), tpb, cpt, nchunks


def swr_step_launch(a, u, y, state_arrays, arrivals, *, hops, block_len, per_channel,
                    tpb_cpt=None) -> StepLaunch:
    """A :class:`StepLaunch` of the ``swr_step`` kernel for tokens like ``a``, ``u``, ``y``
    (``(B, H)``/``(B, H, D)``, ``(B, H, D)``, ``(B, H, D)``) over ``state_arrays`` =
    ``(position, w, g, carry_v, carry_C)`` and ``arrivals`` ``(B,)`` int32 zeros (kept with the
    state: the kernel leaves them 0); run it as ``.run(a, u, y)``. ``tpb_cpt`` overrides the
    plan's (threads per block, channels per thread) (tests)."""
    B, H, D = u.shape
    st, mode, K = _state_args(state_arrays, arrivals, hops)
    grid, block, tpb, cpt, nchunks = _grid(B, H * D, K, tpb_cpt, "swr")
    kernel = None
    if grid[0] and block[0]:
        kernel = swr_step_kernel(_kind(u.dtype), _kind(y.dtype), H * D, D, per_channel, mode,
                                 K, block_len, tpb, cpt, nchunks)
    return StepLaunch(kernel, grid, block, (a, u, y) + st, 3)


def phalanx_step_launch(z, y, b_a, b_b, b_c, state_arrays, arrivals, *, heads, head_dim,
                        kv_heads, decay_max, hops, block_len, tpb_cpt=None) -> StepLaunch:
    """A :class:`StepLaunch` of the Phalanx step kernel: ``.run(z, y)`` with z ``(B, W)`` and
    y ``(B, H*D)`` of the biases' dtype (``arrivals`` and ``tpb_cpt`` as in
    :func:`swr_step_launch`)."""
    B = z.shape[0]
    st, mode, K = _state_args(state_arrays, arrivals, hops)
    grid, block, tpb, cpt, nchunks = _grid(B, heads * head_dim, K, tpb_cpt, "phalanx")
    args = (z, y, _flat(b_a), _flat(b_b), _flat(b_c)) + st + (np.float32(decay_max),)
    kernel = None
    if grid[0] and block[0]:
        kernel = phalanx_step_kernel(_kind(z.dtype), heads, head_dim, heads // kv_heads, mode,
                                     K, block_len, tpb, cpt, nchunks)
    return StepLaunch(kernel, grid, block, args, 2)
