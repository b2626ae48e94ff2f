"""A captured step that keeps its streams' priorities (--stream-priorities): the graph instantiated by the driver.

Why: the weight gradients run on side streams beside the main chain (forward, data gradients, BatchNorm),
and on an H100 the main chain's kernels ran slower beside them (2026-11-27: a stage-1 data gradient took 29-31 us
beside stage 1's weight gradients, 21.5 us alone).
With the main stream at the device's highest priority and the side streams at its lowest, the block
scheduler hands free SMs to the main chain's waiting blocks first and the weight gradients fill in around it.

Streams keep their priority in eager steps. A captured graph records each kernel node with the priority of the
stream it was captured from, but a launched graph runs every node at the launch stream's priority unless it was
instantiated with CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY, and CuPy's `end_capture` instantiates with no
flags. So the backend instantiates the captured cudaGraph_t again here, through the driver API's
cuGraphInstantiateWithFlags (libcuda, loaded with ctypes: the runtime and the driver share graph handles), and
launches that executable graph with CuPy's `runtime.graphLaunch`.
"""
import ctypes
import ctypes.util

from cupynet.errors import DeviceError

USE_NODE_PRIORITY = 8           # CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY (cuda.h)
HIGHEST_PRIORITY = -(1 << 20)   # CUDA clamps a stream priority to the device's range: this is its greatest
LOWEST_PRIORITY = 0             # the least priority in CUDA's range (also every stream's default)
_DRIVER_NAMES = ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda"))

_driver = None


def driver():
    """The CUDA driver library (ctypes), loaded once; DeviceError where it cannot be loaded."""
    global _driver
    if _driver is None:
        errors = []
        for name in filter(None, _DRIVER_NAMES):
            try:
                library = ctypes.CDLL(name)
            except OSError as error:
                errors.append(str(error))
                continue
            library.cuGraphInstantiateWithFlags.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                                            ctypes.c_ulonglong)
            library.cuGraphInstantiateWithFlags.restype = ctypes.c_int
            _driver = library
            break
        else:
            raise DeviceError("--stream-priorities needs the CUDA driver library (libcuda.so.1) for the captured "
                              "step: " + ("; ".join(errors) or "not found"))
    return _driver


def instantiate_with_node_priorities(graph_handle):
    """An executable graph (cudaGraphExec_t, as an int) of the captured cudaGraph_t `graph_handle` whose kernels
    run at the priorities of the streams they were captured from. The caller destroys it
    (cupy.cuda.runtime.graphExecDestroy); the device's context must be current (inside the backend's device)."""
    executable = ctypes.c_void_p()
    status = driver().cuGraphInstantiateWithFlags(ctypes.byref(executable), ctypes.c_void_p(graph_handle),
                                                  ctypes.c_ulonglong(USE_NODE_PRIORITY))
    if status != 0:
        raise DeviceError(f"cuGraphInstantiateWithFlags(USE_NODE_PRIORITY) failed with CUresult {status}")
    return executable.value
