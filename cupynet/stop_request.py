"""A graceful stop on SIGTERM: every worker finishes the step it is in, a checkpoint is saved there, the run ends.

Why: a cluster scheduler preempts a job with SIGTERM and kills it a grace period later (Slurm, Kubernetes: tens
of seconds). Without this the run would lose every step since its last periodic checkpoint (--checkpoint-interval,
2,000 steps by default: over an hour of CPU training); with it, rerunning the same command resumes at the step
where the signal came.

    stop = StopRequest()
    with stop_on_sigterm(stop):                  # the main thread; a second SIGTERM raises Terminated at once
        ...
        while not stop.should_stop(rank, trainer.step) and ...:   # each worker, at every step boundary
            trainer.train_step()

Data-parallel workers must stop at the same step: they meet in a collective at every step, and a worker that
stopped early would leave the others waiting in it. So the request does not stop anyone at once: it names the step
where everyone stops, one past the last boundary any worker has passed. The workers' host loops may be steps apart
(the host all-reduce holds CPU workers to one step; with NCCL on the GPUs a host runs ahead of its device), but none
is past that step, so each trains on until it gets there and stops. A request before any worker has passed a
boundary (during setup) stops each at its first one, the step the run started from, which is the same for all.
"""
import signal
import threading


class Terminated(KeyboardInterrupt):
    """A second SIGTERM while the first one's stop is under way: leave at once, as Ctrl-C does (the last complete
    checkpoint stays intact; a checkpoint being written is removed). A KeyboardInterrupt, so that every path that
    cleans up after Ctrl-C (aborting the workers' collectives, removing a temp file) does so for it too."""


class StopRequest:
    """Where the workers stop, once a stop is requested; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._passed = {}            # rank -> the last step boundary it went on from
        self.stop_step = None        # every worker stops at the first boundary at or past it, once requested

    @property
    def requested(self):
        return self.stop_step is not None

    def request(self):
        """Ask every worker to stop at the next step boundary that none of them has passed yet."""
        with self._lock:
            if self.stop_step is None:
                self.stop_step = max(self._passed.values()) + 1 if self._passed else 0

    def should_stop(self, rank, step):
        """Called by worker `rank` before it trains step `step` + 1: True if it must stop here instead.
        Asked again at the same boundary, it answers the same (a later request names a later step)."""
        with self._lock:
            if self.stop_step is not None and step >= self.stop_step:
                return True
            self._passed[rank] = max(step, self._passed.get(rank, step))
            return False


class stop_on_sigterm:
    """Context manager: while inside, SIGTERM requests `stop`, and a second SIGTERM raises Terminated. Python runs
    signal handlers in the main thread only, so elsewhere (main() called from a thread) it changes nothing. The
    handler only sets state: printing from it could re-enter a print the main thread is in."""

    def __init__(self, stop):
        self.stop = stop
        self._previous = None

    def _handle(self, signum, frame):
        if self.stop.requested:
            raise Terminated()
        self.stop.request()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self.stop

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False
