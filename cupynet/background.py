"""Background: one function call run in a thread of its own, timed, its result (or error) collected later.

Setup work that does not depend on each other runs side by side with it: a run loads its data while the GPU
backend sets up, and the backend imports the cuDNN Frontend while the driver makes the CUDA context. Both sides
leave the GIL free for most of their time (file reads, NumPy copies, library loading, CUDA calls).

    job = Background(load_dataset, config, name="data")
    ...                                   # other setup work, in this thread
    dataset = job.result()                # waits; raises the call's own exception
    job.seconds                           # how long the call took, in its thread
"""
import time
from concurrent.futures import ThreadPoolExecutor


class Background:
    """`function(*args)` running in a thread named cupynet-<name>."""

    def __init__(self, function, *args, name):
        self.seconds = None
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cupynet-{name}")
        self._future = pool.submit(self._timed, function, *args)
        pool.shutdown(wait=False)              # its one job runs on; the thread ends with it

    def _timed(self, function, *args):
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.seconds = time.perf_counter() - started

    def done(self):
        """Whether the call has finished (returned or raised)."""
        return self._future.done()

    def result(self):
        """The call's result (waits for it), or its exception."""
        return self._future.result()
