"""The CUDA driver library through ctypes: the graph calls that CuPy does not wrap.

Two step options need them (--stream-priorities: backends/node_priorities.py; --programmatic-launch:
backends/programmatic_launch.py): both take the CUDA graph CuPy captured, change how it runs, and instantiate it
again themselves. The runtime and the driver share graph handles, so CuPy's cudaGraph_t is a CUgraph here and an
executable graph made here is launched with CuPy's `runtime.graphLaunch`. Every call needs the device's context
current (inside the backend's device). On the emulated GPU the library is tests/emulated_gpu/cuda_driver_stub.cpp.
"""
import ctypes
import ctypes.util

from cupynet.errors import DeviceError

_NAMES = ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda"))
_POINTER = ctypes.c_void_p
_SIZE = ctypes.c_size_t
# name -> argument types (every function returns a CUresult, 0 for success)
SIGNATURES = {
    "cuGraphInstantiateWithFlags": (ctypes.POINTER(_POINTER), _POINTER, ctypes.c_ulonglong),
    "cuGraphGetNodes": (_POINTER, ctypes.POINTER(_POINTER), ctypes.POINTER(_SIZE)),
    "cuGraphNodeGetType": (_POINTER, ctypes.POINTER(ctypes.c_int)),
    "cuGraphKernelNodeGetParams_v2": (_POINTER, _POINTER),
    # CUDA 12.3 and later: edges with their data (CUgraphEdgeData, 8 bytes each)
    "cuGraphGetEdges_v2": (_POINTER, ctypes.POINTER(_POINTER), ctypes.POINTER(_POINTER), _POINTER,
                           ctypes.POINTER(_SIZE)),
    "cuGraphRemoveDependencies_v2": (_POINTER, ctypes.POINTER(_POINTER), ctypes.POINTER(_POINTER), _POINTER, _SIZE),
    "cuGraphAddDependencies_v2": (_POINTER, ctypes.POINTER(_POINTER), ctypes.POINTER(_POINTER), _POINTER, _SIZE),
}

_library = None


def driver(option):
    """The CUDA driver library, loaded once; a one-line DeviceError naming `option` where it cannot be loaded."""
    global _library
    if _library is None:
        errors = []
        for name in filter(None, _NAMES):
            try:
                _library = ctypes.CDLL(name)
                break
            except OSError as error:
                errors.append(str(error))
        else:
            raise DeviceError(f"{option} needs the CUDA driver library (libcuda.so.1) for the captured step: "
                              + ("; ".join(errors) or "not found"))
    return _library


def function(option, name):
    """The driver function `name` with its C signature; a one-line DeviceError where the driver lacks it."""
    library = driver(option)
    try:
        call = getattr(library, name)
    except AttributeError:
        raise DeviceError(f"{option} needs {name} from the CUDA driver (CUDA 12.3 or later), which this one "
                          f"lacks") from None
    call.argtypes = SIGNATURES[name]
    call.restype = ctypes.c_int
    return call


def call(option, name, *args):
    """function(option, name)(*args), with a one-line DeviceError where it does not return CUDA_SUCCESS."""
    status = function(option, name)(*args)
    if status != 0:
        raise DeviceError(f"{option}: {name} failed with CUresult {status}")


def instantiate(option, graph_handle, flags):
    """An executable graph (cudaGraphExec_t, as an int) of the CUgraph `graph_handle`, instantiated with `flags`.
    The caller destroys it (cupy.cuda.runtime.graphExecDestroy)."""
    executable = _POINTER()
    call(option, "cuGraphInstantiateWithFlags", ctypes.byref(executable), _POINTER(graph_handle),
         ctypes.c_ulonglong(flags))
    return executable.value
