"""cupy.cuda.driver of the emulated CuPy: the occupancy query cupynet sizes its grid-waiting launches with.

An emulated SM holds min(2048 / threads per block, 32, what 228 KB of shared memory allows) blocks of any
kernel, or $CUPYNET_EMULATED_OCCUPANCY blocks when set (a test can make the GPU small). The emulated
RawKernel refuses a launch of a kernel whose blocks wait for each other when its grid exceeds
multiProcessorCount times this: on a GPU such a launch could wait forever.
"""
import os

SHARED_MEMORY_PER_SM = 228 * 1024


def occupancyMaxActiveBlocksPerMultiprocessor(func, blockSize, dynamicSMemSize):
    if not func:
        raise RuntimeError("CUDA_ERROR_INVALID_HANDLE: no function (emulated)")
    forced = os.environ.get("CUPYNET_EMULATED_OCCUPANCY")
    if forced:
        return int(forced)
    by_shared = SHARED_MEMORY_PER_SM // (int(dynamicSMemSize) + 1024)
    return max(0, min(2048 // int(blockSize), 32, by_shared))
