"""The emulated device array: NumPy memory behind CuPy's ndarray interface (see cupy/__init__.py)."""
import numpy as np


class EmulationError(RuntimeError):
    """Something the emulation cannot reproduce faithfully, or that CUDA would refuse."""


class MemoryPointer:
    """`array.data`: the address of the first element (CuPy's MemoryPointer.ptr)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


def _refuse_while_capturing(what):
    from cupy.cuda.stream import _refuse_while_capturing as refuse
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
        _refuse_while_capturing("a device-to-host copy (get)")
        host = np.array(self.view(np.ndarray), order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, array, stream=None):
        """Host-to-device copy into this array (same shape and dtype, as CuPy requires)."""
        _refuse_while_capturing("a host-to-device copy (set)")
        array = np.asarray(array)
        if array.shape != self.shape or array.dtype != self.dtype:
            raise ValueError(f"set: host array {array.shape} {array.dtype} does not match {self.shape} {self.dtype}")
        np.copyto(self.view(np.ndarray), array)

    def fill(self, value):
        _refuse_while_capturing("ndarray.fill")
        self.view(np.ndarray).fill(value)

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        _refuse_while_capturing("ndarray.astype")
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _wrap(self.view(np.ndarray).astype(dtype, order=order, copy=True))

    def copy(self, order="C"):
        _refuse_while_capturing("ndarray.copy")
        return _wrap(self.view(np.ndarray).copy(order=order))

    def __setitem__(self, key, value):
        _refuse_while_capturing("an array assignment")
        if isinstance(value, np.ndarray) and not isinstance(value, ndarray) and value.ndim > 0:
            raise TypeError("Unsupported type <class 'numpy.ndarray'> (assign a device array, or use .set())")
        self.view(np.ndarray)[key] = _unwrap(value)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _refuse_while_capturing(f"the ufunc {ufunc.__name__}")
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
        _refuse_while_capturing("reading a device value (bool)")
        return bool(self.view(np.ndarray))

    def __float__(self):
        _refuse_while_capturing("reading a device value (float)")
        return float(self.view(np.ndarray))

    def __int__(self):
        _refuse_while_capturing("reading a device value (int)")
        return int(self.view(np.ndarray))

    def item(self, *args):
        _refuse_while_capturing("reading a device value (item)")
        return self.view(np.ndarray).item(*args)


def _unwrap(value):
    """The NumPy view of a device array (other values unchanged)."""
    return value.view(np.ndarray) if isinstance(value, ndarray) else value


def _wrap(value):
    """Device arrays for NumPy results (tuples and lists element-wise; 0-d results stay 0-d arrays)."""
    if isinstance(value, np.ndarray):
        return value.view(ndarray)
    if isinstance(value, np.generic):
        return np.asarray(value).view(ndarray)
    if isinstance(value, (tuple, list)):
        return type(value)(_wrap(v) for v in value)
    return value


def host_view(pointer, dtype, count):
    """A writable NumPy view of `count` elements of `dtype` at a raw address (what a library reads)."""
    import ctypes
    dtype = np.dtype(dtype)
    raw = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_uint8)), shape=(count * dtype.itemsize,))
    return raw.view(dtype)
