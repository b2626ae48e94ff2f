"""An emulated CuPy for CI: the part of CuPy's API that cupynet uses, on NumPy memory, with kernels run on the CPU.

Nothing here is cupynet code: it stands where CuPy and a GPU would be, so that the GPU backend
(cupynet/backends/cupy_backend.py) and the tests marked `gpu` run unchanged on a machine without a GPU.
tests/test_emulated_gpu.py puts tests/emulated_gpu first on PYTHONPATH and runs them.

    PYTHONPATH=tests/emulated_gpu python -m pytest -m gpu tests/test_gpu_parity.py

What is real: every kernel in kernels/*.cu, compiled from the same source CuPy compiles (RawModule ->
kernel_runner.py, which also checks each argument against the kernel's C++ parameter types); the
launch geometry, the stream and event calls, and CUDA-graph capture, whose rules are enforced (work
captured on a stream is recorded, not run; a stream joins a capture by waiting on an event recorded in
it; every joined stream must be joined back before end_capture; no synchronisation or host copy while
capturing); stream order: each stream's work runs in order, as late as the API allows (when a synchronize,
a host copy or another stream's event wait needs it: cupy/cuda/stream.py), so a missing event between
streams shows as stale data. What is not: timing, true concurrency between streams (except across worker
threads), and memory pools and their reuse.

Arrays are `ndarray`, a NumPy subclass whose `.data.ptr` is the NumPy buffer's address. As in CuPy,
mixing one with a NumPy array in arithmetic raises TypeError; array work done while a stream is
capturing raises EmulationError, because it would run now instead of on every replay.
"""
import numpy as _np

from cupy import cuda                                   # noqa: F401  (cupy.cuda.* as in CuPy)
from cupy._array import EmulationError, device_empty, ndarray, _wrap, _unwrap  # noqa: F401
from cupy.cuda.module import RawModule                  # noqa: F401

__version__ = "14.2.0+emulated"


def asnumpy(array, stream=None):
    """A NumPy copy (CuPy's device-to-host copy)."""
    if isinstance(array, ndarray):
        return array.get(stream=stream)
    return _np.asarray(array)


def asarray(array, dtype=None, order=None):
    """A device array: the same object when it already is one with that dtype, else a copy."""
    if isinstance(array, ndarray) and (dtype is None or _np.dtype(dtype) == array.dtype):
        return array
    return array_(array, dtype=dtype, order=order)


def array_(obj, dtype=None, copy=True, order="K", ndmin=0):
    cuda.stream._array_work("a host-to-device copy (cupy.array)")
    return _wrap(_np.array(_unwrap(obj), dtype=dtype, copy=True, order=order, ndmin=ndmin))


def ascontiguousarray(array, dtype=None):
    """As CuPy's: the array itself when already C-contiguous with that dtype, else a copy; a 0-d array
    becomes shape (1,) (CuPy ravels it))."""
    if dtype is not None and _np.dtype(dtype) != array.dtype:
        cuda.stream._array_work("cupy.ascontiguousarray (a converting copy)")
        return _wrap(_np.ascontiguousarray(_unwrap(array), dtype=dtype))
    if array.ndim == 0:
        return array.reshape(1)
    if array.flags.c_contiguous:
        return array
    cuda.stream._array_work("cupy.ascontiguousarray (a copy)")
    return _wrap(_np.ascontiguousarray(_unwrap(array)))


def empty(shape, dtype=float, order="C"):
    """Uninitialized memory, as on a GPU, but poisoned: NaN for floating types (bfloat16 included), a
    0x5A byte pattern otherwise, so a kernel that reads what nobody wrote produces visible garbage."""
    array = device_empty(shape, dtype)
    raw = array.view(_np.ndarray)
    if raw.dtype.kind == "f" or raw.dtype.name == "bfloat16":
        raw.fill(_np.nan)
    else:
        raw.reshape(-1).view(_np.uint8).fill(0x5A)
    return array


def empty_like(prototype, dtype=None, order="K", shape=None):
    return empty(prototype.shape if shape is None else shape, dtype=prototype.dtype if dtype is None else dtype)


def get_default_memory_pool():
    return cuda.memory._DEFAULT_POOL


def get_default_pinned_memory_pool():
    return cuda.memory._DEFAULT_PINNED_POOL


def __getattr__(name):
    """Everything else (dtypes, empty, zeros, full, arange, ...) is NumPy's, returning device arrays."""
    if name == "array":
        return array_
    value = getattr(_np, name)
    if callable(value) and not isinstance(value, type):
        def on_device(*args, **kwargs):
            cuda.stream._array_work(f"cupy.{name}")
            return _wrap(value(*[_unwrap(a) for a in args], **{k: _unwrap(v) for k, v in kwargs.items()}))
        on_device.__name__ = name
        return on_device
    return value
