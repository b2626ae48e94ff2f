"""Streams, events and CUDA graphs of the emulated CuPy, with the stream-capture rules CUDA enforces.

Work enqueued on a stream runs as late as CUDA's ordering rules allow, not when it is enqueued: each
stream keeps a queue, run in order only when something must see its results: a synchronize (of the
stream, an event recorded on it, or the device), array work or a host copy while it is the current
stream, another stream's queued wait for an event recorded on it, which runs the first stream up to
that event first, or the first use of a kernel (lazy loading may wait for the whole device). Array
work on the legacy null stream runs the blocking streams' work first, never the non-blocking ones'.
Host-to-device copies given a stream are queued on it (CuPy's set(stream=...) is asynchronous). So work that another stream reads without waiting for an event shows up stale, as
it may on a GPU: a missing event between streams fails the tests here instead of racing there.

While a stream is capturing, its work is recorded into the capture instead, in enqueue order (a valid
order for the graph's dependencies, since every recorded piece of work was enqueued after what it
depends on), and runs on each Graph.launch.

The capture rules reproduced (each breach raises EmulationError naming CUDA's error):
  * a stream joins a capture by waiting on an event recorded in it (cudaStreamWaitEvent), and its work
    is then captured too; waiting on an event recorded outside the capture is cudaErrorStreamCaptureIsolation;
  * end_capture on the stream that began it, once every stream that joined has been joined back (the
    origin, or a stream joined back, waited on an event recorded after its last captured work):
    otherwise cudaErrorStreamCaptureUnjoined;
  * no synchronisation, host copy or host read of a capturing stream (cudaErrorStreamCaptureUnsupported),
    and no array work outside kernels while capturing (the emulation would run it once, now).
"""
import itertools
import threading
import time
import weakref

from cupy import _array
from cupy._array import EmulationError

_local = threading.local()
_pointers = itertools.count(0x7000)
_BY_POINTER = weakref.WeakValueDictionary()
# Every live stream, as weak references in a plain list: a WeakSet raises "changed size during iteration"
# when another thread creates a stream (or a dead one is dropped) while this one lists them, and the
# lists are taken in any thread, inside array destructors too. Copying a list is one step under the GIL.
_STREAM_REFS = []
_STREAM_REFS_LOCK = threading.Lock()
LOCK_RETRY_S = 0.001                   # how often a thread waiting for a stream's lock looks again
LEAST_PRIORITY, GREATEST_PRIORITY = 0, -5


class _Capture:
    def __init__(self, origin):
        self.origin = origin
        self.streams = {origin}
        self.operations = []            # (run, what)
        self.ended = False


class Stream:
    """A stream: work is queued and runs when something needs its results (module docstring), or is
    recorded while the stream takes part in a capture."""

    null = None                         # set below

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self.ptr = 0 if null else next(_pointers)
        self.device_id = -1 if null else _current_device()      # as CuPy: the device it was created on
        self.non_blocking = non_blocking
        # recorded, not honoured (the emulation runs one piece of work at a time); clamped to an H100's range as
        # CUDA clamps it (cudaDeviceGetStreamPriorityRange: least 0, greatest -5)
        self.priority = min(max(int(priority or 0), GREATEST_PRIORITY), LEAST_PRIORITY)
        self._capture = None
        self._sequence = 0              # work enqueued while capturing, to tell which event follows it
        self._unjoined = False
        self._queue = []                # work enqueued and not run yet
        self._enqueued = 0              # work ever enqueued, and of that, run
        self._ran = 0
        self._error = None              # the first queued work that failed: raised again by every later wait
        self._queue_lock = threading.Lock()     # held only to append or pop: enqueueing never waits for work
        self._lock = threading.RLock()          # held by the thread running this stream's queue
        _BY_POINTER[self.ptr] = self
        with _STREAM_REFS_LOCK:
            _STREAM_REFS[:] = [ref for ref in _STREAM_REFS if ref() is not None] + [weakref.ref(self)]

    # ------------------------------------------------------------- current stream

    # CuPy keeps, per thread, a stack of the streams entered with `with`; use() only replaces the current
    # stream, so leaving a `with` block makes the stack's top current again, not what use() chose.
    def use(self):
        _local.stream = self
        return self

    def __enter__(self):
        _stack().append(self)
        return self.use()

    def __exit__(self, *exc):
        stack = _stack()
        stack.pop()
        _local.stream = stack[-1]

    # ------------------------------------------------------------- work

    def enqueue(self, run, what):
        """Queue `run()` (it runs when something needs its results: see the module docstring), or record
        it when this stream is capturing. Returns the count of work ever enqueued, this one included."""
        capture = self._capture
        if capture is None:
            with self._queue_lock:
                self._queue.append((run, what))
                self._enqueued += 1
                return self._enqueued
        capture.operations.append((run, what))
        self._sequence += 1
        if self is not capture.origin:
            self._unjoined = True

    def run_until(self, count):
        """Run queued work, in order, until `count` pieces of work ever enqueued have run.

        Another thread may hold this stream's lock while it runs the stream's later work, and that work can
        wait (a cross-stream event) for work this thread is running. Blocking on the lock would then deadlock
        two threads that a GPU would never have made wait for each other, whether the work asked for had run
        before the call or runs while it waits. So the lock is only tried, briefly, and between tries the
        call returns as soon as that work has run (_ran only grows, after each piece has run).

        Work that fails raises in whichever thread runs it, and again in every later wait on this stream,
        as a CUDA error is sticky: the stream's owner must not see its failed work as done. (A failed NCCL
        collective is not sticky: it ends its kernel, and the context stays usable.)"""
        while self._ran < count:
            if not self._lock.acquire(timeout=LOCK_RETRY_S):
                continue
            try:
                while self._ran < count and self._error is None:
                    with self._queue_lock:
                        if not self._queue:
                            break
                        run, _ = self._queue.pop(0)
                    try:
                        run()
                    except BaseException as error:
                        if getattr(error, "sticky", True):
                            self._error = error
                        raise
                    finally:
                        self._ran += 1
            finally:
                self._lock.release()
            break
        if self._error is not None:
            raise self._error
        _release_finished()

    def run_all(self):
        self.run_until(self._enqueued)

    def synchronize(self):
        if self._capture is not None:
            raise EmulationError("cudaErrorStreamCaptureUnsupported: synchronize() on a capturing stream")
        self.run_all()

    def record(self, event=None):
        event = event if event is not None else Event()
        event.record(self)
        return event

    def wait_event(self, event):
        captured = event._captured
        if captured is None:
            if self._capture is not None:
                raise EmulationError("cudaErrorStreamCaptureIsolation: a capturing stream waits on an event "
                                     "recorded outside the capture")
            if event._source is not None:
                source, count = event._source
                if source is not self:          # this stream's later work runs after source's work so far
                    self.enqueue(lambda: source.run_until(count), "wait for an event")
            return
        capture, source, sequence = captured
        if capture.ended:
            raise EmulationError("waiting on an event recorded in a capture that has ended")
        if self._capture is None:
            self._capture = capture
            self._sequence = 0
            capture.streams.add(self)
        elif self._capture is not capture:
            raise EmulationError("cudaErrorStreamCaptureIsolation: waiting on an event of another capture")
        if source is not self and source._sequence == sequence:
            source._unjoined = False            # everything it captured is now ordered before this stream
        if self is not capture.origin and source is not self:
            self._unjoined = True               # it carries that work until it is joined back itself

    @property
    def done(self):
        return self._ran >= self._enqueued

    # ------------------------------------------------------------- capture

    def begin_capture(self, mode=None):
        if self._capture is not None:
            raise EmulationError("cudaErrorIllegalState: begin_capture on a stream that is already capturing")
        if self.ptr == 0:
            raise EmulationError("cudaErrorStreamCaptureUnsupported: capture on the legacy null stream")
        self._capture = _Capture(self)
        self._sequence = 0

    def is_capturing(self):
        return self._capture is not None

    def end_capture(self):
        capture = self._capture
        if capture is None or capture.origin is not self:
            raise EmulationError("cudaErrorIllegalState: end_capture on a stream that did not begin a capture")
        unjoined = [s for s in capture.streams if s is not self and s._unjoined]
        for stream in capture.streams:
            stream._capture = None
            stream._unjoined = False
        capture.ended = True
        if unjoined:
            raise EmulationError(f"cudaErrorStreamCaptureUnjoined: {len(unjoined)} stream(s) forked into the "
                                 f"capture were not joined back before end_capture")
        return Graph(capture.operations)

    def __repr__(self):
        return f"<emulated Stream {self.ptr:#x}>"


Stream.null = Stream(null=True)


def get_current_stream():
    return getattr(_local, "stream", Stream.null)


def _stack():
    """This thread's streams entered with `with`, the null stream at the bottom."""
    if not hasattr(_local, "stack"):
        _local.stack = [Stream.null]
    return _local.stack


def stream_from_pointer(ptr):
    """The Stream whose `.ptr` is ptr (cuDNN handles are bound to streams by pointer)."""
    return _BY_POINTER[int(ptr)]


def _array_work(what):
    """Array work, a host copy or a host read on the current stream: refused while it captures (CUDA would
    refuse it, or record it for every replay, where the emulation would run it once, now); otherwise the
    stream's queued work runs first, as it would come first on the device."""
    stream = get_current_stream()
    if stream._capture is not None:
        raise EmulationError(f"{what} while {stream!r} is capturing: CUDA would refuse it or record it for "
                             f"every replay, the emulation would run it once, now")
    if stream.ptr == 0:
        # The legacy null stream waits for the blocking streams' work of its device, never for non-blocking
        # streams'.
        for other in _streams_of(_current_device()):
            if not other.non_blocking and other._capture is None:
                other.run_all()
    stream.run_all()


_RELEASED = []                          # (allocation, [(stream, work count)]) waiting for that work to run
_RELEASE_LOCK = threading.RLock()       # reentrant: a garbage collection may run inside the lock


def release_after_queued_work(allocation):
    """Keep `allocation` alive until every stream has run the work it had queued when its arrays died."""
    marks = [(stream, stream._enqueued) for stream in all_streams() if stream._ran < stream._enqueued]
    if marks:
        with _RELEASE_LOCK:
            _RELEASED.append((allocation, marks))
    else:
        _array.unpoison(allocation)


_array._release_hook = release_after_queued_work


def _release_finished():
    with _RELEASE_LOCK:
        keep = []
        for allocation, marks in _RELEASED:
            if any(stream._ran < count for stream, count in marks):
                keep.append((allocation, marks))
            else:
                _array.unpoison(allocation)
        _RELEASED[:] = keep


# Kernels that spin until work on other streams arrives (cupynet's shared-GPU barrier). On a GPU the other
# streams go on meanwhile; here queued work runs only when someone waits for it, so a stream holding one
# of these starts running in a thread of its own when it is launched, as the GPU would run it.
SPINNING_KERNELS = ("kernel rank_barrier",)


def run_in_background(stream):
    threading.Thread(target=stream.run_all, name=f"emulated {stream!r}", daemon=True).start()


def _current_device():
    from cupy.cuda.device import current_id
    return current_id()


def wait_for_device_idle(device_id):
    """What loading a kernel on a device may do under CUDA's lazy loading (the default): wait for the queued
    work of every stream of that device, the other threads' too (a capture runs nothing: left out)."""
    for stream in _streams_of(device_id):
        if stream._capture is None:
            stream.run_all()


def all_streams():
    """Every live stream, of every device."""
    return [stream for stream in (ref() for ref in list(_STREAM_REFS)) if stream is not None]


def _streams_of(device_id):
    """The live streams of a device, and the legacy null stream (shared by every device here)."""
    return [stream for stream in all_streams() if stream.device_id in (device_id, -1)]


def synchronize_device():
    """cudaDeviceSynchronize: the queued work of every stream of the current device."""
    streams = _streams_of(_current_device())
    for stream in streams:
        if stream._capture is not None:
            raise EmulationError("cudaErrorStreamCaptureUnsupported: device synchronize while capturing")
    for stream in streams:
        stream.run_all()


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.disable_timing = disable_timing
        self._time = None
        self._source = None             # (stream, its work count) when recorded
        self._captured = None           # (capture, stream, stream's work count) when recorded in a capture

    def record(self, stream=None):
        stream = stream if stream is not None else get_current_stream()
        if stream._capture is not None:
            self._captured = (stream._capture, stream, stream._sequence)
            self._source = None
            return
        self._captured = None
        self._time = None

        def stamp():                    # the time at which the stream gets there
            self._time = time.perf_counter()
        self._source = (stream, stream.enqueue(stamp, "event record"))

    def synchronize(self):
        if self._captured is not None:
            raise EmulationError("cudaErrorStreamCaptureUnsupported: synchronize on an event of a capture")
        if self._source is not None:
            source, count = self._source
            source.run_until(count)

    @property
    def done(self):
        return self._source is None or self._source[0]._ran >= self._source[1]


def get_elapsed_time(start, end):
    """Milliseconds between two recorded events (the host time at which their streams reached them)."""
    if start.disable_timing or end.disable_timing:
        raise EmulationError("cudaErrorInvalidResourceHandle: an event created with disable_timing")
    if start._time is None or end._time is None:
        raise EmulationError("cudaErrorNotReady: an event that was not recorded, or not reached yet")
    return (end._time - start._time) * 1000.0


class Graph:
    """A recorded capture: launch() runs its work again, in order, with the arguments it was recorded with.
    `graph` is its handle (CuPy's cudaGraph_t), which the emulated driver's cuGraphInstantiateWithFlags returns as
    the executable that runtime.graphLaunch launches (launch_graph_handle)."""

    def __init__(self, operations):
        self.operations = list(operations)
        self.graph = next(_pointers)
        _GRAPHS[self.graph] = self

    def launch(self, stream=None):
        stream = stream if stream is not None else get_current_stream()
        if stream._capture is not None:
            raise EmulationError("launching a graph inside a capture is not emulated")
        operations = list(self.operations)

        def replay():
            for run, _ in operations:
                run()
        stream.enqueue(replay, "graph launch")
        if any(what in SPINNING_KERNELS for _, what in operations):
            run_in_background(stream)

    def upload(self, stream=None):
        pass


_GRAPHS = weakref.WeakValueDictionary()      # handle -> Graph


def launch_graph_handle(handle, stream_ptr):
    """runtime.graphLaunch: the graph of `handle` (an executable is its graph's handle here) on the stream of
    `stream_ptr`."""
    graph, stream = _GRAPHS.get(handle), _BY_POINTER.get(stream_ptr)
    if graph is None or stream is None:
        raise EmulationError(f"cudaErrorInvalidResourceHandle: graphLaunch({handle:#x}, {stream_ptr:#x})")
    graph.launch(stream)
