"""cupy.cuda.Device of the emulated CuPy: the current device per thread, attributes, synchronize."""
import os
import threading

from cupy.cuda import runtime

EMULATED_L2_BYTES = 256 * 1024        # a small L2: what a benchmark that evicts it writes stays cheap here

_local = threading.local()


def current_id():
    return getattr(_local, "device", 0)


class Device:
    def __init__(self, device=None):
        self.id = current_id() if device is None else int(device)
        runtime.check_device(self.id)
        self._previous = []

    def use(self):
        _local.device = self.id

    def __enter__(self):
        self._previous.append(current_id())
        self.use()
        return self

    def __exit__(self, *exc):
        _local.device = self._previous.pop()

    def synchronize(self):
        with self:                      # this device's work, as CuPy's Device.synchronize
            runtime.deviceSynchronize()

    @property
    def attributes(self):
        return {"MultiProcessorCount": runtime.multiprocessor_count(), "L2CacheSize": EMULATED_L2_BYTES}

    @property
    def compute_capability(self):
        # an H100's, or $CUPYNET_EMULATED_COMPUTE_CAPABILITY's (e.g. 75: a GPU older than some kernel needs)
        return os.environ.get("CUPYNET_EMULATED_COMPUTE_CAPABILITY", "90")

    @property
    def mem_info(self):
        return runtime.memGetInfo()

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (emulated)>"
