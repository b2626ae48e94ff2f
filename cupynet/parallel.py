"""Data parallelism: communicators between worker threads, and the thread runner that drives them.

One worker thread per device (`--gpus cpu,cpu` or `--gpus 0,1`); each owns a backend, a Trainer replica
and one rank of a communicator. A communicator reduces backend arrays in place across the ranks:

    group = HostGroup(size=2)                     # or NcclGroup([0, 1]) for GPU workers
    def worker(rank, device):
        backend = create_backend(device, "NHWC", "float32")
        comm = group.communicator(rank, backend)
        comm.broadcast(params_flat, root=0)       # every rank calls every collective, in the same order
        comm.all_reduce_mean(grad_flat)           # in place: every rank now holds the mean
        return result
    results = run_workers(["cpu", "cpu"], worker, group)     # results in rank order

Two implementations of one interface (`Communicator`):
  * `HostCommunicator` (any backend; CPU workers, tests, several workers sharing one GPU): each rank
    stages its array on the host, a `threading.Barrier` lines the ranks up, and every rank adds the
    staged arrays itself in rank order. Floating-point addition is not associative, so a fixed order
    computed identically everywhere is what keeps the replicas bit-identical.
  * `NcclCommunicator` (GPU workers): `cupy.cuda.nccl` all-reduce of the flat buffer on the worker
    backend's stream, no host copy. CuPy is imported lazily, so this module loads without it.
    `NcclGroup(devices)` creates every rank's communicator up front, in the caller's thread.

`run_workers` re-raises the first real error of any worker in the caller's thread after aborting the
group (so ranks blocked in a collective stop at once) and joining every thread with a bounded wait.
"""
import threading
import time

import numpy as np

# How long run_workers waits for the threads to finish once a worker failed or the run was interrupted.
# Workers notice an abort at their next collective, at most one step away; the bound only matters for
# a worker stuck outside any collective (e.g. blocked in NCCL's init by a rank that never arrived).
JOIN_TIMEOUT_S = 30.0
POLL_S = 0.1       # the main thread wakes this often, so Ctrl-C is handled promptly


class CommunicatorAborted(RuntimeError):
    """Raised in a rank whose collective was cut short because another rank (or the caller) aborted."""


class Communicator:
    """One rank's view of a group of `size` workers. Every rank must call the same collectives in the
    same order with arrays of the same shape and dtype; each call returns when the result is in place
    (GPU: enqueued on the backend's stream, ordered before anything enqueued after it)."""

    rank = 0
    size = 1
    kind = "?"          # for the log line: "host" or "NCCL"
    capturable = False  # whether its collectives can be recorded in a CUDA graph (enqueued, no host wait)

    def __init__(self, group, rank, backend):
        if not 0 <= rank < group.size:
            raise ValueError(f"rank {rank} outside a group of {group.size}")
        self.group = group
        self.rank = rank
        self.size = group.size
        self.backend = backend

    def all_reduce_sum(self, array):
        """array <- sum over ranks of array, in place."""
        raise NotImplementedError

    def all_reduce_mean(self, array):
        """array <- mean over ranks of array, in place (gradients, BN moving statistics, the loss)."""
        raise NotImplementedError

    def broadcast(self, array, root=0):
        """array <- root's array, in place on every rank."""
        raise NotImplementedError

    def abort(self):
        """Make ranks blocked in (or entering) a collective raise CommunicatorAborted."""
        raise NotImplementedError

    def wait_for_peers(self):
        """Line up with the other ranks on the host around a launch of recorded collectives. Only the
        shared-GPU communicator needs it (its barrier kernels share one GPU: cupynet/shared_gpu.py)."""


# --------------------------------------------------------------------------------------------- host


class HostGroup:
    """What the HostCommunicators of one run share: a slot per rank and a barrier."""

    def __init__(self, size):
        if size < 1:
            raise ValueError(f"a group needs at least one rank, got {size}")
        self.size = size
        self.slots = [None] * size                  # rank -> its staged NumPy array
        self.barrier = threading.Barrier(size)

    def communicator(self, rank, backend):
        return HostCommunicator(self, rank, backend)

    def abort(self):
        """Break the barrier: every rank waiting in it, now or later, raises CommunicatorAborted."""
        self.barrier.abort()


class HostCommunicator(Communicator):
    """Collectives through host memory (see the module docstring). Costs two host copies per call."""

    kind = "host"

    def _wait(self):
        try:
            self.group.barrier.wait()
        except threading.BrokenBarrierError:
            raise CommunicatorAborted(f"rank {self.rank}: the worker group was aborted") from None

    def _gather(self, array):
        """Stage this rank's array and return every rank's staged copy, in rank order."""
        self.group.slots[self.rank] = self.backend.to_host(array)
        self._wait()                                 # every slot is filled
        return list(self.group.slots)

    def _scatter_back(self, array, host):
        """Write `host` into the backend array, once every rank has read the slots."""
        self._wait()                                 # nobody overwrites a slot another rank still reads
        self.backend.upload_into(array, host)

    def _rank_order_sum(self, staged):
        # The same additions in the same order on every rank: bit-identical results everywhere.
        total = staged[0].copy()
        for other in staged[1:]:
            total += other
        return total

    def all_reduce_sum(self, array):
        self._scatter_back(array, self._rank_order_sum(self._gather(array)))
        return array

    def all_reduce_mean(self, array):
        total = self._rank_order_sum(self._gather(array))
        total /= total.dtype.type(self.size)        # stays in the array's dtype (float32 stays float32)
        self._scatter_back(array, total)
        return array

    def broadcast(self, array, root=0):
        staged = self._gather(array)
        self._scatter_back(array, staged[root])
        return array

    def abort(self):
        self.group.abort()


# --------------------------------------------------------------------------------------------- NCCL


def _nccl():
    from cupy.cuda import nccl       # lazy: CPU machines have no CuPy
    return nccl


def _nccl_dtype(nccl, dtype):
    """NCCL's datatype constant for a NumPy dtype (the buffers we reduce: float32 params, int64 counts)."""
    table = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64, "int64": nccl.NCCL_INT64,
             "int32": nccl.NCCL_INT32}
    name = np.dtype(dtype).name
    if name not in table:
        raise TypeError(f"NCCL collectives here take {', '.join(table)}, got {name}")
    return table[name]


class NcclGroup:
    """The NCCL communicators of one run, one per GPU, all created in the caller's thread.

    Why not one `NcclCommunicator(size, unique_id, rank)` per worker thread: ncclCommInitRank blocks
    until every rank has joined, and CuPy's binding (nccl.pyx, read, not run) calls it holding the GIL: the first
    thread would hold the GIL while waiting for threads that can then never reach their own init.
    `initAll` initializes every rank in one call instead; each worker then uses only its own rank's
    communicator, from its own thread. NCCL refuses two ranks on one GPU: use HostGroup to share a GPU.
    """

    def __init__(self, devices):
        self.size = len(devices)
        self._nccl_comms = _nccl().NcclCommunicator.initAll(list(devices))   # rank r <-> devices[r]
        self._lock = threading.Lock()
        self._aborted = False
        self._communicators = []

    def communicator(self, rank, backend):
        comm = NcclCommunicator(self, rank, backend, self._nccl_comms[rank])
        with self._lock:
            self._communicators.append(comm)
            aborted = self._aborted
        if aborted:                  # the run was aborted before this rank got its communicator
            comm.abort()
        return comm

    def abort(self):
        """Abort every rank's NCCL communicator, including those no worker has picked up yet."""
        with self._lock:
            self._aborted = True
            communicators = list(self._communicators)
            picked = {comm.rank for comm in communicators}
        for comm in communicators:
            comm.abort()
        for rank, nccl_comm in enumerate(self._nccl_comms):
            if rank not in picked:
                nccl_comm.abort()


class NcclCommunicator(Communicator):
    """NCCL collectives on the worker backend's stream (one communicator per thread, never shared)."""

    kind = "NCCL"
    capturable = True

    def __init__(self, group, rank, backend, nccl_comm):
        super().__init__(group, rank, backend)
        self.nccl = _nccl()
        self.comm = nccl_comm            # cupy.cuda.nccl.NcclCommunicator of this rank's GPU
        self._aborted = False

    def _check(self, array):
        if self._aborted:
            raise CommunicatorAborted(f"rank {self.rank}: the worker group was aborted")
        if not array.flags.c_contiguous:
            raise ValueError("NCCL collectives need a contiguous buffer (pass the flat buffers)")
        return _nccl_dtype(self.nccl, array.dtype)

    def _all_reduce(self, array, op):
        datatype = self._check(array)
        ptr = array.data.ptr                 # in place: send and receive buffers are the same
        with self.backend.device:
            self.comm.allReduce(ptr, ptr, array.size, datatype, op, self.backend.stream.ptr)
        return array

    def all_reduce_sum(self, array):
        return self._all_reduce(array, self.nccl.NCCL_SUM)

    def all_reduce_mean(self, array):
        if np.dtype(array.dtype).kind != "f":
            raise TypeError(f"all_reduce_mean needs a floating-point buffer, got {array.dtype}")
        average = getattr(self.nccl, "NCCL_AVG", None)
        if average is not None:      # NCCL >= 2.10 divides inside the reduction itself: one kernel
            return self._all_reduce(array, average)
        self._all_reduce(array, self.nccl.NCCL_SUM)
        with self.backend.device, self.backend.stream:      # ordered after the reduction
            array *= array.dtype.type(1.0 / self.size)
        return array

    def broadcast(self, array, root=0):
        datatype = self._check(array)
        ptr = array.data.ptr
        with self.backend.device:
            self.comm.broadcast(ptr, ptr, array.size, datatype, root, self.backend.stream.ptr)
        return array

    def abort(self):
        # ncclCommAbort makes kernels blocked on a missing peer return; later calls raise here. Called
        # from the caller's thread while the worker may be inside a collective: NCCL's documented way out.
        if not self._aborted:
            self._aborted = True
            self.comm.abort()


# --------------------------------------------------------------------------------------------- threads


class _Worker(threading.Thread):
    """One rank's thread: runs worker_fn(rank, device), keeps its result or its exception."""

    def __init__(self, rank, device, worker_fn, on_error):
        super().__init__(name=f"cupynet-worker-{rank}", daemon=True)   # daemon: never blocks the exit
        self.rank, self.device = rank, device
        self.worker_fn, self.on_error = worker_fn, on_error
        self.result, self.error = None, None

    def run(self):
        try:
            self.result = self.worker_fn(self.rank, self.device)
        except BaseException as error:          # noqa: B902 - everything must reach the caller
            self.error = error
            self.on_error(self)


def _first_real_error(failed):
    """The error that started it: the first worker to fail for a reason other than an abort."""
    for worker in failed:
        if not isinstance(worker.error, CommunicatorAborted):
            return worker.error
    return failed[0].error if failed else None


def _join_all(workers, timeout_s):
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))


def run_workers(devices, worker_fn, group, join_timeout_s=JOIN_TIMEOUT_S):
    """Run worker_fn(rank, device) in one thread per device; return the results in rank order.

    The first worker to raise aborts `group` (so the others leave their collectives at once); the
    caller then gets that worker's exception, unchanged (a CupynetError keeps its one-line message),
    after every thread has been joined or `join_timeout_s` has passed. KeyboardInterrupt in the
    caller's thread aborts the group the same way and is re-raised.
    """
    failed = []
    lock = threading.Lock()
    finished = threading.Event()

    def on_error(worker):
        with lock:
            failed.append(worker)
        try:
            group.abort()
        finally:
            finished.set()           # the caller stops waiting even if the abort itself failed

    workers = [_Worker(rank, device, worker_fn, on_error) for rank, device in enumerate(devices)]
    for worker in workers:
        worker.start()
    try:
        while not finished.is_set() and any(worker.is_alive() for worker in workers):
            finished.wait(POLL_S)        # short waits: the main thread must stay responsive to Ctrl-C
    except KeyboardInterrupt:
        group.abort()
        _join_all(workers, join_timeout_s)
        raise
    _join_all(workers, join_timeout_s)
    with lock:
        error = _first_real_error(list(failed))
    if error is not None:
        raise error
    return [worker.result for worker in workers]
