"""What the GPU backend's primitives share (cupy_backend.py, cupy_batchnorm.py): running on the backend's device and
stream, checking operands before a kernel reads them through raw pointers, and the kernels' conventions for
sizes (int indices) and 16-byte packs (kernels/common.cuh)."""
import functools

import numpy as np

MAX_ELEMENTS = 2 ** 30              # kernels index with int: n plus a grid stride stays < 2^31
PACK_BYTES = 16                     # what kernels move per load and store on their vector paths
MAX_SLICES = 1024                   # most partial sums per channel (rows of the scratch buffer)
MIN_STEPS_PER_THREAD = 4            # a partial-sum thread reads at least this many elements or packs
MAX_DYNAMIC_SHARED_BYTES = 47 * 1024    # a launch may ask for 48 KB less the kernel's static __shared__


def primitive(method):
    """A contract primitive: counted in `calls`, run on the backend's device and stream."""
    name = method.__name__

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        self.calls[name] += 1
        with self.device, self.stream:
            return method(self, *args, **kwargs)
    return run


def on_device(method):
    """An array helper (not counted, as in NumpyBackend): run on the backend's device and stream."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.device, self.stream:
            return method(self, *args, **kwargs)
    return run


def pack_elements(dtype):
    """Elements in one 16-byte pack (common.cuh, "16-byte packs"): 4 floats or 8 bfloat16."""
    return PACK_BYTES // np.dtype(dtype).itemsize


def pack_aligned(arrays):
    """Whether every array starts on a pack boundary, as the kernels' 16-byte loads and stores need."""
    return all(array.data.ptr % PACK_BYTES == 0 for array in arrays)


def i32(value):
    return np.int32(value)


def element_count(array):
    """Number of elements, refused when the kernels' int indices could not address them."""
    size = int(array.size)
    if size > MAX_ELEMENTS:
        raise ValueError(f"array of {size} elements: the kernels address at most {MAX_ELEMENTS}")
    return size


def require_dtype(dtype, **arrays):
    """Raise TypeError unless every named array has `dtype` (the kernels read raw pointers)."""
    for name, array in arrays.items():
        if array.dtype != dtype:
            raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {array.dtype}")


def same_dtype(reference, **arrays):
    """Raise TypeError unless the named arrays have the dtype of `reference` (one template argument)."""
    require_dtype(reference.dtype, **arrays)


def overlap(a, b):
    """Whether two device arrays share any byte."""
    return a.data.ptr < b.data.ptr + b.nbytes and b.data.ptr < a.data.ptr + a.nbytes


def present(**arrays):
    """The named arrays that are not None (optional operands of a dtype check)."""
    return {name: array for name, array in arrays.items() if array is not None}
