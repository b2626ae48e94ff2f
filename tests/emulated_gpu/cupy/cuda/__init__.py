"""cupy.cuda of the emulated CuPy: devices, streams, events, graphs, memory pools (see cupy/__init__.py)."""
from cupy.cuda import runtime                                                    # noqa: F401
from cupy.cuda import driver                                                     # noqa: F401
from cupy.cuda.device import Device                                              # noqa: F401
from cupy.cuda import nccl                                                       # noqa: F401
from cupy.cuda.memory import MemoryPool, PinnedMemoryPool, using_allocator       # noqa: F401
from cupy.cuda.stream import (Event, Stream, get_current_stream, get_elapsed_time,  # noqa: F401
                              Graph)
