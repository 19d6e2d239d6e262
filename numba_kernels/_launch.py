"""Launching Numba kernels through CuPy, without Numba's per-call dispatch.

``launch(kernel, grid, block, args, stream=None, shared_mem=0)``: ``kernel`` is a ``@cuda.jit``
dispatcher; ``args`` holds arrays (CuPy arrays, :class:`FlatArray`, or anything exposing
``__cuda_array_interface__``, C-contiguous; NumPy arrays in the simulator) and NumPy scalars
(``np.int64``, ``np.int32``, ``np.float32``; a Python int is taken as int64). Scalar types are
explicit so that one specialisation serves every call.

Numba's own ``kernel[grid, block](*args)`` type-checks and converts every argument and syncs a
stream on each call, many times the cost of a CuPy RawKernel launch. Here each specialisation
(kernel, argument types, device) is compiled once with ``numba.cuda.compile_ptx`` for the device's
compute capability, loaded as a CuPy module, and every later call only flattens the arguments into
the Numba kernel ABI, packs them with one ``struct.pack_into`` and calls ``cuLaunchKernel`` on the
caller's stream.

The Numba ABI passes an array of ``ndim`` dimensions as ``5 + 2 * ndim`` parameters: meminfo,
parent (both unused on the device: 0), nitems, itemsize, data pointer, shape[ndim], strides[ndim]
(bytes). The parameter list of each PTX entry is read back and checked against that before the
first launch.

PTX is also cached on disk (``$SWR_ARRAY_CACHE_DIR``, default ``~/.cache/swr_array``; set it to an
empty string to disable), keyed by a hash of everything that determines it: the source of the
kernel's package, the kernel's name and closure constants, the signature, the compute capability
and the Numba/NVVM versions.

In the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) ``launch`` is plain
``kernel[grid, block](*args)``.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import sys
import threading

import numba
import numpy as np
from numba import cuda, types

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

__all__ = ["FlatArray", "allow_shared_memory", "compile_for", "data_pointer", "launch",
           "launch_prepared", "launch_with_pointers", "prepare"]


class FlatArray:
    """A C-contiguous device array seen as 1-D: data pointer, element count and dtype only.

    Cheaper to make than a reshaped CuPy view, and what kernels written over flat indices take.
    bfloat16 (``ml_dtypes`` or CuPy's ``V2``) is passed as its uint16 bits.
    """

    __slots__ = ("ptr", "size", "dtype")

    def __init__(self, ptr: int, size: int, dtype):
        self.ptr = ptr
        self.size = size
        storage = _STORAGE.get(dtype)
        if storage is None:
            storage = _STORAGE[dtype] = _storage_dtype(np.dtype(dtype))
        self.dtype = storage

    @classmethod
    def of(cls, x) -> FlatArray:
        """View ``x`` (CuPy array or ``__cuda_array_interface__`` exporter, C-contiguous)."""
        if type(x) is cls:
            return x
        data = getattr(x, "data", None)
        ptr = getattr(data, "ptr", None)
        if ptr is not None and hasattr(x, "size"):
            return cls(ptr, x.size, x.dtype)
        iface = x.__cuda_array_interface__
        size = 1
        for extent in iface["shape"]:
            size *= extent
        return cls(iface["data"][0], size, np.dtype(iface["typestr"]))

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": (self.size,),
            "typestr": self.dtype.str,
            "data": (self.ptr, False),
            "strides": None,
            "version": 3,
        }


_STORAGE: dict = {}  # dtype -> the dtype kernels see (a cache: dtype.name is slow)


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    # bfloat16 has no Numba type: kernels take its bits
    if dtype.name == "bfloat16" or dtype.str in ("<V2", "|V2"):
        return np.dtype(np.uint16)
    return dtype


# --------------------------------------------------------------------------------------------
# Compilation


def compile_for(kernel, arg_types, cc) -> str:
    """PTX of ``kernel`` (a ``@cuda.jit`` dispatcher) for a Numba signature and compute capability.

    Needs no GPU (NVVM from the ``numba-cuda[cu13]`` wheels): tests compile every specialisation
    with ``cc=(9, 0)`` to catch typing and lowering errors that the simulator never sees.
    """
    opts = getattr(kernel, "targetoptions", {}) or {}
    ptx, _ = cuda.compile_ptx(
        kernel.py_func,
        tuple(arg_types),
        cc=tuple(cc),
        fastmath=bool(opts.get("fastmath", False)),
        lineinfo=bool(opts.get("lineinfo", False)),
        launch_bounds=opts.get("launch_bounds"),
    )
    return ptx


_ENTRY = re.compile(r"\.entry\s+([\w$]+)\s*\(")
_PARAM = re.compile(r"\.param\s+(?:\.align\s+\d+\s+)?\.(\w+)\s+[\w$]+_param_(\d+)(\[\d+\])?")
_PARAM_SIZE = {"u64": 8, "s64": 8, "b64": 8, "f64": 8, "u32": 4, "s32": 4, "b32": 4, "f32": 4}


def entry_and_params(ptx: str) -> tuple[str, list[str]]:
    """The kernel entry name and its parameter types (``u64``, ``f32``, ...) from PTX text."""
    match = _ENTRY.search(ptx)
    if match is None:
        raise RuntimeError("no .entry in the PTX")
    body = ptx[match.end() : ptx.index(")", match.end())]
    params = []
    for kind, index, array in _PARAM.findall(body):
        if array or kind not in _PARAM_SIZE:
            raise RuntimeError(f"unsupported kernel parameter .{kind}{array} (#{index})")
        params.append(kind)
    return match.group(1), params


def _numba_type(value):
    """(cache key part, Numba type, flattened parameter count) of one launch argument."""
    if isinstance(value, FlatArray):
        return ("a", value.dtype, 1), types.Array(numba.from_dtype(value.dtype), 1, "C"), 7
    if isinstance(value, (np.int64, int)) and not isinstance(value, bool):
        return ("i8",), types.int64, 1
    if isinstance(value, np.int32):
        return ("i4",), types.int32, 1
    if isinstance(value, np.float32):
        return ("f4",), types.float32, 1
    if isinstance(value, np.float64):
        return ("f8",), types.float64, 1
    iface = _array_interface(value)
    if iface is not None:
        dtype, ndim = iface[0], len(iface[2])
        return ("a", dtype, ndim), types.Array(numba.from_dtype(dtype), ndim, "C"), 5 + 2 * ndim
    raise TypeError(f"launch: unsupported argument of type {type(value).__name__}")


def _array_interface(x):
    """(storage dtype, data pointer, shape, strides in bytes) of a C-contiguous device array."""
    contiguous = getattr(x, "_c_contiguous", None)  # CuPy: skip building the interface dict
    if contiguous is not None and hasattr(x, "data"):
        if not contiguous:
            raise ValueError("launch: arrays must be C-contiguous")
        return _storage_dtype(x.dtype), x.data.ptr, x.shape, x.strides
    try:
        iface = x.__cuda_array_interface__
    except AttributeError:
        return None
    dtype = _storage_dtype(np.dtype(iface["typestr"]))
    shape = tuple(iface["shape"])
    strides = iface.get("strides")
    expected = _c_strides(shape, dtype.itemsize)
    if strides is not None and tuple(strides) != expected and _size(shape) > 1:
        raise ValueError("launch: arrays must be C-contiguous")
    return dtype, iface["data"][0], shape, expected


def _c_strides(shape, itemsize):
    strides = []
    step = itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def _size(shape):
    size = 1
    for extent in shape:
        size *= extent
    return size


_source_hashes: dict = {}


def _package_source_hash(module_name: str) -> str:
    """Hash of every .py file beside the module that defines a kernel (its whole package)."""
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if path is None:
        return "nosource"
    folder = os.path.dirname(os.path.abspath(path))
    digest = _source_hashes.get(folder)
    if digest is None:
        h = hashlib.sha256()
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                h.update(name.encode())
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(f.read())
        digest = _source_hashes[folder] = h.hexdigest()
    return digest


class _Uncacheable(Exception):
    """A closure value without a stable description: the kernel is not cached on disk."""


def _describe(obj, depth=0) -> str:
    """A stable description of a closure value: constants, Numba types, and functions (device
    functions, intrinsics) with their own closures."""
    if isinstance(obj, (bool, int, float, str, type(None))):
        return repr(obj)
    if isinstance(obj, (tuple, list)):
        return "(" + ",".join(_describe(x, depth + 1) for x in obj) + ")"
    if isinstance(obj, types.Type):
        return f"numba:{obj}"
    if isinstance(obj, type(os)):
        return f"module:{obj.__name__}"
    func = getattr(obj, "py_func", None) or getattr(obj, "_defn", None)
    if func is None and callable(obj) and hasattr(obj, "__code__"):
        func = obj
    if func is not None:
        if depth > 8:
            raise _Uncacheable(func)
        cells = getattr(func, "__closure__", None) or ()
        inner = ",".join(_describe(c.cell_contents, depth + 1) for c in cells)
        # the first line tells apart same-named bodies from one factory (the source hash in the
        # key covers the text itself)
        line = getattr(getattr(func, "__code__", None), "co_firstlineno", 0)
        return f"{getattr(func, '__module__', '')}.{func.__qualname__}@{line}({inner})"
    text = repr(obj)
    if " at 0x" in text:
        raise _Uncacheable(text)
    return f"{type(obj).__qualname__}:{text}"


_nvvm_version = None


def _cache_key(kernel, sig, cc) -> str:
    global _nvvm_version
    if _nvvm_version is None:
        from numba.cuda.cudadrv.nvvm import NVVM

        _nvvm_version = str(NVVM().get_version())
    func = kernel.py_func
    import numba_cuda

    parts = [
        _package_source_hash(func.__module__),
        _describe(kernel),
        str(sig),
        str(cc),
        numba_cuda.__version__,
        _nvvm_version,
        repr(sorted((getattr(kernel, "targetoptions", {}) or {}).items())),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _cache_dir():
    folder = os.environ.get("SWR_ARRAY_CACHE_DIR")
    if folder is None:
        folder = os.path.join(os.path.expanduser("~"), ".cache", "swr_array")
    return folder or None


def _cached_ptx(kernel, sig, cc) -> str:
    folder = _cache_dir()
    path = None
    if folder:
        try:
            path = os.path.join(folder, _cache_key(kernel, sig, cc) + ".ptx")
        except _Uncacheable:
            folder = None
    if folder:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            pass
    ptx = compile_for(kernel, sig, cc)
    if path:
        try:
            os.makedirs(folder, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                f.write(ptx)
            os.replace(tmp, path)
        except OSError:
            pass
    return ptx


# --------------------------------------------------------------------------------------------
# Launching

_PARAM_OFFSET = 64  # the parameter block starts here in the per-thread scratch buffer
_SCRATCH_BYTES = _PARAM_OFFSET + 8192


class _Entry:
    __slots__ = ("function_ptr", "packer", "module", "offsets")

    def __init__(self, function_ptr, packer, module, offsets=()):
        self.function_ptr = function_ptr
        self.packer = packer
        self.module = module  # keeps the CUmodule loaded
        self.offsets = offsets  # of each parameter in the parameter block


_entries: dict = {}
_compile_lock = threading.Lock()
_devices: dict = {}
_tls = threading.local()


def _device_cc(device: int):
    cc = _devices.get(device)
    if cc is None:
        import cupy

        text = cupy.cuda.Device(device).compute_capability  # e.g. "90"
        cc = _devices[device] = (int(text[:-1]), int(text[-1]))
    return cc


def _build_entry(kernel, sig, nparams, device):
    import cupy

    cc = _device_cc(device)
    ptx = _cached_ptx(kernel, sig, cc)
    name, params = entry_and_params(ptx)
    if len(params) != nparams:
        raise RuntimeError(
            f"kernel {name}: PTX has {len(params)} parameters, "
            f"the Numba ABI for {sig} gives {nparams}"
        )
    # a size_t (the parameter block's size, for CU_LAUNCH_PARAM_BUFFER_SIZE), padding, then
    # each parameter at its natural alignment
    fmt = ["<Q", f"{_PARAM_OFFSET - 8}x"]
    offset = 0
    offsets = []
    for kind in params:
        size = _PARAM_SIZE[kind]
        pad = -offset % size
        if pad:
            fmt.append(f"{pad}x")
        fmt.append({"f32": "f", "f64": "d"}.get(kind, "q" if size == 8 else "i"))
        offsets.append(offset + pad)
        offset += pad + size
    module = cupy.cuda.function.Module()
    module.load(ptx.encode())
    function = module.get_function(name)
    return _Entry(function.ptr, (struct.Struct("".join(fmt)), offset), (module, function),
                  tuple(offsets))


def _scratch():
    try:
        return _tls.buffer, _tls.extra_ptr
    except AttributeError:
        buffer = np.zeros(_SCRATCH_BYTES, np.uint8)
        base = buffer.ctypes.data
        # cuLaunchKernel `extra`: {CU_LAUNCH_PARAM_BUFFER_POINTER, ptr, ..._SIZE, &size, ..._END}
        extra = np.array([1, base + _PARAM_OFFSET, 2, base, 0], dtype=np.uint64)
        _tls.buffer, _tls.extra, _tls.extra_ptr = buffer, extra, extra.ctypes.data
        return buffer, _tls.extra_ptr


def _dims(d):
    if isinstance(d, tuple):
        return tuple(d) + (1,) * (3 - len(d))
    return (int(d), 1, 1)


def _flatten(args, device):
    """(cache key, flattened parameter values) of launch arguments."""
    key = [device]
    values = []
    for x in args:
        t = type(x)
        if t is FlatArray:
            key.append(x.dtype)
            values += (0, 0, x.size, x.dtype.itemsize, x.ptr, x.size, x.dtype.itemsize)
        elif t is np.int64 or t is int or t is np.int32 or t is np.float32 or t is np.float64:
            key.append(t)
            values.append(x)
        else:
            dtype, ptr, shape, strides = _array_interface(x) or (None, None, None, None)
            if dtype is None:
                raise TypeError(f"launch: unsupported argument of type {t.__name__}")
            key.append((dtype, len(shape)))
            values += (0, 0, _size(shape), dtype.itemsize, ptr, *shape, *strides)
    return tuple(key), values


def prepare(kernel, args):
    """The compiled entry of ``kernel`` for these argument types on the current device, and the
    flattened parameter values of ``args``: :func:`launch_prepared` relaunches it with new values
    (callers that know which values change, e.g. only data pointers, skip the type dispatch)."""
    from cupy.cuda import runtime

    device = runtime.getDevice()
    key, values = _flatten(args, device)
    key = (kernel,) + key
    entry = _entries.get(key)
    if entry is None:
        with _compile_lock:
            entry = _entries.get(key)
            if entry is None:
                described = [_numba_type(x) for x in args]
                sig = tuple(d[1] for d in described)
                nparams = sum(d[2] for d in described)
                entry = _entries[key] = _build_entry(kernel, sig, nparams, device)
    return entry, values


def launch_prepared(entry, grid, block, values, stream=None, shared_mem=0):
    """Launch a :func:`prepare`'d entry with flattened parameter ``values``."""
    packer, nbytes = entry.packer
    buffer, extra_ptr = _scratch()
    packer.pack_into(buffer, 0, nbytes, *values)
    if stream is None:
        stream_ptr = _current_stream().ptr
    else:
        stream_ptr = getattr(stream, "ptr", stream)
    gx, gy, gz = _dims(grid)
    bx, by, bz = _dims(block)
    if _use_extra[0]:
        try:
            _launch_kernel()(entry.function_ptr, gx, gy, gz, bx, by, bz, shared_mem, stream_ptr,
                             0, extra_ptr)  # fmt: skip
            return
        except Exception:
            # a driver that refuses the packed-buffer form: pass a pointer per parameter instead
            # (same buffer), and keep doing so if that works
            _launch_kernel()(entry.function_ptr, gx, gy, gz, bx, by, bz, shared_mem, stream_ptr,
                             _param_pointers(entry, buffer), 0)  # fmt: skip
            _use_extra[0] = False
            return
    _launch_kernel()(entry.function_ptr, gx, gy, gz, bx, by, bz, shared_mem, stream_ptr,
                     _param_pointers(entry, buffer), 0)  # fmt: skip


_use_extra = [True]


def data_pointer(x) -> int:
    """Device address of a CuPy array (or anything :meth:`FlatArray.of` takes)."""
    try:
        return x.data.ptr  # CuPy
    except AttributeError:
        return FlatArray.of(x).ptr


def launch_with_pointers(entry, grid, block, values, pointers, stream=None, shared_mem=0):
    """Relaunch a :func:`prepare`'d entry whose leading arguments are 1-D arrays, with only their
    data pointers changed: ``values`` (the prepared values, not modified) with ``pointers[i]``
    as array argument i's data."""
    values = values[:]
    # each 1-D array is 7 parameters (meminfo, parent, nitems, itemsize, data, shape, stride)
    for i, ptr in enumerate(pointers):
        values[7 * i + 4] = ptr
    launch_prepared(entry, grid, block, values, stream, shared_mem)


_STATIC_SHARED_LIMIT = 48 * 1024
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


def allow_shared_memory(entry, nbytes: int) -> None:
    """Let ``entry`` launch with ``nbytes`` of dynamic shared memory. Above 48 KiB a kernel has to
    opt in (``cuFuncSetAttribute``); the device's per-block maximum still applies, and a request
    over it raises here rather than at the launch."""
    if SIMULATOR or nbytes <= _STATIC_SHARED_LIMIT:
        return
    from cupy_backends.cuda.api import driver

    driver.funcSetAttribute(entry.function_ptr, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            int(nbytes))  # fmt: skip


def _param_pointers(entry, buffer):
    """Address of a per-thread array of pointers to each parameter in ``buffer``."""
    table = _tls.__dict__.setdefault("pointers", {})
    arr = table.get(entry)
    if arr is None:
        base = buffer.ctypes.data + _PARAM_OFFSET
        arr = table[entry] = np.array([base + o for o in entry.offsets] or [0], dtype=np.uint64)
    return arr.ctypes.data


def _current_stream():
    from cupy.cuda import get_current_stream

    return get_current_stream()


def _launch_kernel():
    from cupy_backends.cuda.api.driver import launchKernel

    return launchKernel


def launch(kernel, grid, block, args, stream=None, shared_mem=0):
    """Launch ``kernel[grid, block](*args)`` on ``stream`` (None: CuPy's current stream)."""
    if SIMULATOR:
        kernel[grid, block, 0, shared_mem](*args)
        return
    entry, values = prepare(kernel, args)
    allow_shared_memory(entry, shared_mem)
    launch_prepared(entry, grid, block, values, stream, shared_mem)


class Tuning(dict):
    """A dict whose ``version`` changes with every assignment (launch plans depend on it)."""

    version = 0

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.version += 1


_sm_counts: dict = {}


def sm_count() -> int:
    """Streaming multiprocessors of the current device (1 in the simulator)."""
    if SIMULATOR:
        return 1
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    count = _sm_counts.get(dev)
    if count is None:
        count = _sm_counts[dev] = cupy.cuda.Device(dev).attributes["MultiProcessorCount"]
    return count
