"""Memory pools of the emulated CuPy: device arrays allocate their own memory (cupy/_array.py, which
also releases it in stream order, as CuPy's pool does), so a pool here only answers CuPy's questions.

(CuPy's real pools hand freed blocks out again; the emulation never reuses an address, so it cannot
show what such reuse would do to a captured graph: memory-pool isolation still needs a GPU to test.)
"""
import contextlib


class OutOfMemoryError(MemoryError):
    """CuPy's error for a failed device allocation (never raised by the emulation, which allocates with NumPy)."""


class MemoryPool:
    def __init__(self, allocator=None):
        pass

    def malloc(self, size):
        raise NotImplementedError("the emulated CuPy allocates with NumPy, never through a pool")

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        pass

    def n_free_blocks(self):
        return 0

    def set_limit(self, size=None, fraction=None):
        pass


class PinnedMemoryPool(MemoryPool):
    pass


_DEFAULT_POOL = MemoryPool()
_DEFAULT_PINNED_POOL = PinnedMemoryPool()


@contextlib.contextmanager
def using_allocator(allocator=None):
    yield
