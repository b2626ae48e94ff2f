"""Memory pools of the emulated CuPy: NumPy owns the memory, so a pool only answers CuPy's questions.

(CuPy's real pools reuse freed blocks in stream order; the emulation cannot show what that reuse would
do to a captured graph, which is why the GPU tests of memory-pool isolation still need a GPU.)
"""
import contextlib


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
