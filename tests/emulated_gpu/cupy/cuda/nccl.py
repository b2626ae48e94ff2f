"""cupy.cuda.nccl of the emulated CuPy: communicators of ranks on emulated devices, in one process.

`NcclCommunicator.initAll(devices)` makes one communicator per device (a repeated device is refused, as
NCCL refuses two ranks on one GPU). A collective is enqueued on the given stream like any other work
(cupy/cuda/stream.py), so it is captured into a CUDA graph when that stream is capturing. When it runs,
each rank publishes its buffer and waits for the others at a barrier; the reduction adds the ranks'
buffers in rank order and every rank writes the same result. `abort()` breaks the barrier: a rank
waiting for a peer that will never come raises NcclError instead of hanging (a wait of more than
BARRIER_TIMEOUT_S seconds does the same).
"""
import threading

import numpy as np

from cupy._array import host_view
from cupy.cuda.stream import stream_from_pointer

NCCL_INT32, NCCL_INT64, NCCL_FLOAT32, NCCL_FLOAT64 = 2, 4, 7, 8
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN, NCCL_AVG = 0, 1, 2, 3, 4
_DTYPES = {NCCL_INT32: np.int32, NCCL_INT64: np.int64, NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}
BARRIER_TIMEOUT_S = 120


class NcclError(RuntimeError):
    # A collective that fails (a peer aborted) ends its kernel and leaves the CUDA context usable: unlike a
    # kernel fault, the stream does not keep raising it (cupy/cuda/stream.py, run_until).
    sticky = False


def get_version():
    return 22800


class _Clique:
    """What the ranks of one initAll share: a barrier and one contribution slot per rank."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=BARRIER_TIMEOUT_S)
        self.slots = [None] * size

    def exchange(self, rank, contribution):
        """Publish, wait for every rank, return all contributions (rank order), wait again."""
        self.slots[rank] = contribution
        try:
            self.barrier.wait()
            contributions = list(self.slots)
            self.barrier.wait()             # nobody publishes the next collective before all have read
        except threading.BrokenBarrierError:
            raise NcclError("ncclRemoteError: a peer aborted or never joined the collective") from None
        return contributions


class NcclCommunicator:
    def __init__(self, ndev, commId=None, rank=None):
        raise NcclError("the emulated NCCL makes communicators with NcclCommunicator.initAll(devices) only")

    @classmethod
    def initAll(cls, devices):
        devices = [int(d) for d in devices]
        if len(set(devices)) != len(devices):
            raise NcclError("ncclInvalidUsage: duplicate GPU in the communicator (two ranks on one device)")
        from cupy.cuda import runtime
        for device in devices:
            runtime.check_device(device)
        clique = _Clique(len(devices))
        communicators = []
        for rank, device in enumerate(devices):
            comm = object.__new__(cls)
            comm._clique, comm._rank, comm._device, comm._aborted = clique, rank, device, False
            communicators.append(comm)
        return communicators

    def rank_id(self):
        return self._rank

    def size(self):
        return self._clique.size

    def device_id(self):
        return self._device

    def _check(self):
        if self._aborted:
            raise NcclError("ncclInvalidUsage: the communicator was aborted")

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        self._check()
        dtype = _DTYPES[datatype]

        def run():
            data = np.array(host_view(sendbuf, dtype, count))
            contributions = self._clique.exchange(self._rank, data)
            total = contributions[0].copy()
            for other in contributions[1:]:
                if op in (NCCL_SUM, NCCL_AVG):
                    total += other
                elif op == NCCL_MAX:
                    np.maximum(total, other, out=total)
                elif op == NCCL_MIN:
                    np.minimum(total, other, out=total)
                else:
                    total *= other
            if op == NCCL_AVG:
                total = (total / self._clique.size).astype(dtype)
            host_view(recvbuf, dtype, count)[...] = total
        stream_from_pointer(stream).enqueue(run, "NCCL allReduce")

    def broadcast(self, sendbuf, recvbuf, count, datatype, root, stream):
        self._check()
        dtype = _DTYPES[datatype]

        def run():
            data = np.array(host_view(sendbuf, dtype, count)) if self._rank == root else None
            contributions = self._clique.exchange(self._rank, data)
            host_view(recvbuf, dtype, count)[...] = contributions[root]
        stream_from_pointer(stream).enqueue(run, "NCCL broadcast")

    def abort(self):
        self._aborted = True
        self._clique.barrier.abort()

    def destroy(self):
        self._aborted = True
