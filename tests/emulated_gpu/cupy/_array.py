"""The emulated device array: NumPy memory behind CuPy's ndarray interface (see cupy/__init__.py)."""
import ctypes
import os

import numpy as np


class EmulationError(RuntimeError):
    """Something the emulation cannot reproduce faithfully, or that CUDA would refuse."""


class MemoryPointer:
    """`array.data`: the address of the first element (CuPy's MemoryPointer.ptr)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


def _array_work(what):
    from cupy.cuda.stream import _array_work as refuse
    refuse(what)


class ndarray(np.ndarray):
    """A device array. Views, shapes and dtypes behave as NumPy's; device work checks the capture state."""

    @property
    def data(self):
        return MemoryPointer(self.__array_interface__["data"][0])

    @property
    def device(self):
        from cupy.cuda.device import Device
        return Device()

    def get(self, stream=None, order="C", out=None):
        """Device-to-host copy: a plain NumPy array (waits for the device, so never while capturing)."""
        _array_work("a device-to-host copy (get)")
        if stream is not None:
            stream.synchronize()
        host = np.array(self.view(np.ndarray), order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, array, stream=None):
        """Host-to-device copy into this array (same shape and dtype, as CuPy requires).

        With a stream, CuPy's copy is asynchronous (cudaMemcpyAsync): the host data is staged at once, and
        the copy runs in that stream's order, so work on another stream sees it only after an event, as on
        a GPU. Without one, the copy is synchronous, after the current stream's work."""
        array = np.asarray(array)
        if array.shape != self.shape or array.dtype != self.dtype:
            raise ValueError(f"set: host array {array.shape} {array.dtype} does not match {self.shape} {self.dtype}")
        target = self.view(np.ndarray)
        if stream is None:
            _array_work("a host-to-device copy (set)")
            np.copyto(target, array)
            return
        if stream.is_capturing():
            raise EmulationError("cudaErrorStreamCaptureUnsupported: a copy from pageable host memory while "
                                 f"{stream!r} is capturing")
        staged = array.copy()
        stream.enqueue(lambda: np.copyto(target, staged), "host-to-device copy")

    def fill(self, value):
        _array_work("ndarray.fill")
        self.view(np.ndarray).fill(value)

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        _array_work("ndarray.astype")
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _wrap(self.view(np.ndarray).astype(dtype, order=order, copy=True))

    def copy(self, order="C"):
        _array_work("ndarray.copy")
        return _wrap(self.view(np.ndarray).copy(order=order))

    def __setitem__(self, key, value):
        _array_work("an array assignment")
        if isinstance(value, np.ndarray) and not isinstance(value, ndarray) and value.ndim > 0:
            raise TypeError("Unsupported type <class 'numpy.ndarray'> (assign a device array, or use .set())")
        self.view(np.ndarray)[key] = _unwrap(value)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _array_work(f"the ufunc {ufunc.__name__}")
        for value in inputs + tuple(kwargs.get("out", ())):
            if isinstance(value, np.ndarray) and not isinstance(value, ndarray) and value.ndim > 0:
                raise TypeError(f"Unsupported type {type(value)} in {ufunc.__name__}: CuPy does not mix host "
                                f"and device arrays")
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_unwrap(o) for o in out)
        result = getattr(ufunc, method)(*[_unwrap(i) for i in inputs], **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __repr__(self):
        return "emulated " + repr(self.view(np.ndarray))

    def __bool__(self):
        _array_work("reading a device value (bool)")
        return bool(self.view(np.ndarray))

    def __float__(self):
        _array_work("reading a device value (float)")
        return float(self.view(np.ndarray))

    def __int__(self):
        _array_work("reading a device value (int)")
        return int(self.view(np.ndarray))

    def item(self, *args):
        _array_work("reading a device value (item)")
        return self.view(np.ndarray).item(*args)


def _unwrap(value):
    """The NumPy view of a device array (other values unchanged)."""
    return value.view(np.ndarray) if isinstance(value, ndarray) else value


ALIGNMENT = 256                         # CuPy's allocations start on 256-byte boundaries


class _Allocation(np.ndarray):
    """The bytes behind device arrays (their `.base`). Like CuPy's pool, which hands freed memory out again
    only in stream order, it is released only once the work queued before it lost its last array has run:
    queued kernels, cuDNN and NCCL calls hold raw addresses, which must stay valid until they run."""

    def __del__(self):
        if _release_hook is not None:       # None before cupy.cuda.stream is imported and at shutdown
            _release_hook(self)             # keeps it alive until then


_release_hook = None                        # cupy.cuda.stream.release_after_queued_work, set by that module


def device_empty(shape, dtype):
    """An uninitialized device array of its own allocation (256-byte aligned)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    allocation = np.ndarray.__new__(_Allocation, (nbytes + ALIGNMENT,), np.uint8)
    base = allocation.__array_interface__["data"][0]
    offset = -base % ALIGNMENT
    if _ASAN is not None:                   # the alignment slack on both sides is out of bounds
        _ASAN.__asan_poison_memory_region(ctypes.c_void_p(base), ctypes.c_size_t(offset))
        end = offset + nbytes
        _ASAN.__asan_poison_memory_region(ctypes.c_void_p(base + end), ctypes.c_size_t(nbytes + ALIGNMENT - end))
    return np.ndarray.__new__(ndarray, shape, dtype, buffer=allocation, offset=offset)


def unpoison(allocation):
    """Before an allocation goes back to NumPy (which may cache and reuse small blocks)."""
    if _ASAN is not None:
        _ASAN.__asan_unpoison_memory_region(ctypes.c_void_p(allocation.__array_interface__["data"][0]),
                                            ctypes.c_size_t(allocation.nbytes))


def _asan():
    """AddressSanitizer's runtime when kernels are sanitized (CUPYNET_EMULATOR_SANITIZE=1, libasan preloaded)."""
    if os.environ.get("CUPYNET_EMULATOR_SANITIZE") != "1":
        return None
    runtime = ctypes.CDLL(None)
    if not hasattr(runtime, "__asan_poison_memory_region"):
        raise EmulationError("CUPYNET_EMULATOR_SANITIZE=1 needs libasan preloaded (LD_PRELOAD)")
    return runtime


_ASAN = _asan()


def _wrap(value):
    """Device arrays (copies in device allocations) of NumPy results; tuples and lists element-wise."""
    if isinstance(value, (np.ndarray, np.generic)):
        value = np.asarray(value)
        array = device_empty(value.shape, value.dtype)
        np.copyto(array.view(np.ndarray), value)
        return array
    if isinstance(value, (tuple, list)):
        return type(value)(_wrap(v) for v in value)
    return value


def host_view(pointer, dtype, count):
    """A writable NumPy view of `count` elements of `dtype` at a raw address (what a library reads)."""
    import ctypes
    dtype = np.dtype(dtype)
    raw = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_uint8)), shape=(count * dtype.itemsize,))
    return raw.view(dtype)
