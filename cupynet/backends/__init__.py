"""Backends: where the primitives of the contract run.

Exactly two: `numpy_backend.NumpyBackend` (the readable reference, CPU) and the CuPy/cuDNN GPU backend
(a later issue). `create_backend` turns a resolved device into a backend, with one-line errors for
devices that are not there.

    backend = create_backend("cpu", layout="NHWC", dtype="float32")
"""
from cupynet.errors import DeviceError

GPU_INSTALL_HINT = ("pip install 'cupynet[gpu]' (CuPy >= 14, cuDNN 9, the cuDNN Frontend, NCCL) "
                    "on a machine with an NVIDIA GPU")


def gpu_backend_available():
    """Whether this version of cupynet can train on a GPU. The CuPy backend is not part of it yet."""
    return False


def resolve_devices(devices):
    """Replace 'auto' by what is available: GPU 0 when the GPU backend can run, else the CPU."""
    if devices == ["auto"]:
        return [0] if gpu_backend_available() else ["cpu"]
    return devices


def create_backend(device, layout, dtype):
    """A backend for one worker's device: 'cpu' or a GPU id."""
    if device != "cpu":
        raise DeviceError(f"--gpus {device}: the GPU backend is not available in this version of cupynet, "
                          f"which trains on the CPU (--gpus cpu); GPU training will need {GPU_INSTALL_HINT}")
    if dtype == "bfloat16":
        raise DeviceError("--dtype bfloat16 needs the GPU backend; on the CPU use float32 (or float64)")
    from cupynet.backends.numpy_backend import NumpyBackend
    return NumpyBackend(layout=layout, dtype=dtype)
