"""Communicators for worker threads that share one GPU: collectives as kernels, recordable in a CUDA graph.

    group = SharedGpuGroup(size=2, device_id=0)
    def worker(rank, device):                    # run_workers([0, 0], worker, group)
        backend = CupyBackend(0, "NHWC", "float32")
        comm = group.communicator(rank, backend)
        comm.all_reduce_mean(grad_flat)          # enqueued on backend.stream, nothing waits on the host

Why a third communicator: NCCL refuses two ranks on one GPU, and the host communicator copies to the host and
meets the other ranks at a threading barrier in the middle of the step, which a CUDA graph cannot record.
These collectives are kernels on each worker's own stream (kernels/collectives.cu says how they work): each
rank publishes its array into a shared slot, a one-thread barrier kernel waits on a device-wide arrival
counter, every rank adds the slots in rank order (the HostCommunicator's order: bit-identical results on
every rank and equal to it), and a second barrier keeps slots from being overwritten while still read.
The ranks' streams run concurrently on the GPU, so a rank waiting in a barrier only occupies one thread.

The slots are shared device buffers, one per (dtype, size), created by the first rank that needs them
(in a warm-up step, never inside a recording). abort() sets a device flag through its own stream, so ranks
waiting in a barrier leave it, and later collectives raise CommunicatorAborted on the host; a barrier that
waits longer than BARRIER_TIMEOUT_S sets the flag itself, so a worker that died can never hang the GPU.
Why the ranks line up on the host before and after enqueueing a collective: a barrier kernel waits for
the other ranks' work, and a host call that waits for the whole device (loading a kernel the first time
under CUDA's lazy loading, a cuDNN plan build, a cudaFree) waits for that barrier kernel. If the rank
making the call has not enqueued its own arrival yet, that is a deadlock (seen on an H100: the first
collective's kernels loaded by one rank while another's barrier spun). So the collective's kernels are
loaded first, then every rank lines up, enqueues, and lines up again: no rank makes another host call
until every rank's arrivals are enqueued, and a barrier kernel only ever waits for enqueued work.
A replayed CUDA graph holds barrier kernels too, so the trainer lines the ranks up before and after
each graph launch (`wait_for_peers`, cupynet/step_graph.py). (The barrier's timeout still turns an
unforeseen wait into an aborted group rather than a hung GPU.) This group is for tests and benchmarks of
several workers on one GPU (bench/scaling.py), where NCCL cannot run.
"""
import threading

import numpy as np

from cupynet.backends.kernels import KernelLibrary, ctype
from cupynet.parallel import Communicator, CommunicatorAborted

BARRIER_TIMEOUT_S = 120.0
REDUCED_DTYPES = ("float32", "float64", "int64")


class SharedGpuGroup:
    """What the communicators of workers on one GPU share: slots, the arrival counter, the abort flag."""

    def __init__(self, size, device_id=0):
        import cupy
        if size < 1:
            raise ValueError(f"a group needs at least one rank, got {size}")
        self.size = size
        self.device = cupy.cuda.Device(device_id)
        self._lock = threading.Lock()
        self.host_barrier = threading.Barrier(size)    # the ranks line up before each enqueue (see above)
        self._slots = {}                               # (dtype name, elements) -> (size, n) device array
        self._communicators = []
        with self.device:
            self.arrivals = cupy.zeros((), dtype=np.uint64)
            self.abort_flag = cupy.zeros((), dtype=np.int32)
            self._abort_stream = cupy.cuda.Stream(non_blocking=True)
            cupy.cuda.Device().synchronize()           # zeros in place before any rank's stream reads them
        self.aborted = False

    def communicator(self, rank, backend):
        if backend.device.id != self.device.id:
            raise ValueError(f"rank {rank} is on GPU {backend.device.id}, the group shares GPU {self.device.id}")
        if self.size > 1 and backend.bn_launches == 1:
            # two ranks' grid-waiting BatchNorm kernels side by side could each hold part of the GPU and wait
            # for blocks that the other's hold keeps out: forever
            raise ValueError(f"rank {rank}: one launch per BatchNorm pass needs the GPU to itself; workers "
                             f"sharing GPU {self.device.id} need bn_launches=2")
        comm = SharedGpuCommunicator(self, rank, backend)
        with self._lock:
            self._communicators.append(comm)
        return comm

    def slots(self, dtype, elements):
        """The shared (size, elements) buffer for one array shape, created on first use."""
        import cupy
        key = (np.dtype(dtype).name, int(elements))
        with self._lock:
            if key not in self._slots:
                with self.device:     # an allocation only: no kernel another stream could overtake
                    self._slots[key] = cupy.empty((self.size, int(elements)), dtype=dtype)
            return self._slots[key]

    def abort(self):
        """Release every rank waiting in a barrier kernel; later collectives raise on the host."""
        self.aborted = True
        self.host_barrier.abort()
        with self.device, self._abort_stream:
            self.abort_flag.fill(1)                    # runs beside the waiting kernels, on its own stream

    def device_aborted(self):
        """Whether a barrier timed out (or abort ran): a host read, only between steps."""
        return bool(int(self.abort_flag.get(stream=self._abort_stream)))


class SharedGpuCommunicator(Communicator):
    """One rank of a SharedGpuGroup: collectives enqueued on its backend's stream (capturable)."""

    kind = "shared-GPU"
    capturable = True

    def __init__(self, group, rank, backend):
        super().__init__(group, rank, backend)
        self.kernels = backend.kernels
        self.barriers_passed = backend.zeros((), dtype=np.uint64)     # this rank's barrier count
        backend.synchronize()

    def _check(self, array):
        if self.group.aborted:
            raise CommunicatorAborted(f"rank {self.rank}: the worker group was aborted")
        if not array.flags.c_contiguous:
            raise ValueError("shared-GPU collectives need a contiguous buffer (pass the flat buffers)")
        if np.dtype(array.dtype).name not in REDUCED_DTYPES:
            raise TypeError(f"shared-GPU collectives take {', '.join(REDUCED_DTYPES)}, got {array.dtype}")
        return int(array.size)

    def _launch_1d(self, name, array, n, args):
        self.kernels.launch(name, (ctype(array.dtype),), self.kernels.grid_1d(n), KernelLibrary.BLOCK, args)

    def _load_kernels(self, array, finish_kernel):
        """Load the collective's kernels before lining up (a first load may wait for the whole device)."""
        for name in ("publish", finish_kernel):
            self.kernels.function(name, (ctype(array.dtype),))
        self.kernels.function("rank_barrier")

    def _barrier(self):
        timeout_ns = np.uint64(int(BARRIER_TIMEOUT_S * 1e9))
        self.kernels.launch("rank_barrier", (), (1,), (32,),
                            (self.barriers_passed, self.group.arrivals, np.int32(self.size), self.group.abort_flag,
                             timeout_ns))

    def wait_for_peers(self):
        """Line up with every rank on the host (see the module docstring)."""
        if self.group.aborted:
            raise CommunicatorAborted(f"rank {self.rank}: the worker group was aborted")
        try:
            self.group.host_barrier.wait()
        except threading.BrokenBarrierError:
            raise CommunicatorAborted(f"rank {self.rank}: the worker group was aborted") from None

    def _collective(self, array, finish_kernel, finish):
        """[load, line up] publish -> barrier -> finish(slots, n) -> barrier [line up], on the backend's stream."""
        n = self._check(array)
        self._load_kernels(array, finish_kernel)
        slots = self.group.slots(array.dtype, n)
        self.wait_for_peers()
        with self.backend.device, self.backend.stream:
            self._launch_1d("publish", array, n, (array, slots[self.rank], np.int32(n)))
            self._barrier()
            finish(slots, n)
            self._barrier()
        self.wait_for_peers()
        return array

    def _reduce(self, array, mean):
        def finish(slots, n):
            self._launch_1d("reduce_slots", array, n, (slots, array, np.int32(n), np.int32(self.size), np.int32(mean)))
        return self._collective(array, "reduce_slots", finish)

    def all_reduce_sum(self, array):
        return self._reduce(array, mean=False)

    def all_reduce_mean(self, array):
        if np.dtype(array.dtype).kind != "f":
            raise TypeError(f"all_reduce_mean needs a floating-point buffer, got {array.dtype}")
        return self._reduce(array, mean=True)

    def broadcast(self, array, root=0):
        def finish(slots, n):
            self._launch_1d("copy_slot", array, n, (slots[root], array, np.int32(n)))
        return self._collective(array, "copy_slot", finish)

    def abort(self):
        self.group.abort()
