"""cupy.cuda.runtime of the emulated CuPy: device count and properties, capture modes, the error type.

The number of emulated devices is $CUPYNET_EMULATED_GPUS (default 1) and their multiprocessor count
$CUPYNET_EMULATED_SMS (default 2: small grids, yet several blocks per reduction).
"""
import os

streamCaptureModeGlobal = 0
streamCaptureModeThreadLocal = 1
streamCaptureModeRelaxed = 2

DEVICE_NAME = b"Emulated CUDA device (kernels on the CPU)"


class CUDARuntimeError(RuntimeError):
    def __init__(self, status, message):
        self.status = status
        super().__init__(f"{message} (emulated CUDA error {status})")


def getDeviceCount():
    return int(os.environ.get("CUPYNET_EMULATED_GPUS", "1"))


def multiprocessor_count():
    return int(os.environ.get("CUPYNET_EMULATED_SMS", "2"))


def check_device(device_id):
    if not 0 <= int(device_id) < getDeviceCount():
        raise CUDARuntimeError(101, f"cudaErrorInvalidDevice: invalid device ordinal {device_id}")


def getDeviceProperties(device_id):
    check_device(device_id)
    return {"name": DEVICE_NAME, "totalGlobalMem": 16 << 30, "multiProcessorCount": multiprocessor_count(),
            "major": 9, "minor": 0, "pciBusID": device_id}


def runtimeGetVersion():
    return 13000


def driverGetVersion():
    return 13000


def deviceSynchronize():
    from cupy.cuda.stream import synchronize_device
    synchronize_device()


def memGetInfo():
    return (15 << 30, 16 << 30)


def graphLaunch(graph_exec, stream):
    from cupy.cuda.stream import launch_graph_handle
    launch_graph_handle(graph_exec, stream)


def graphExecDestroy(graph_exec):
    """Nothing to free: an emulated executable is its graph's handle, and the graph is a Python object."""
