/*
 * kernels/timing.cu: a kernel for measuring other work on the GPU, not for training.
 *
 * hold_stream keeps its stream busy for a given time. Enqueued before a timed region, it lets the host
 * enqueue all the timed work while the GPU is still holding, so the GPU then runs that work back to back
 * and the two events around it time the GPU, not the host's launch rate: a cuDNN call costs 10-45 us of
 * host time, as much as a small convolution's GPU time (shared GPU notes). Used by the engine autotuner
 * (cupynet/backends/conv_autotune.py) and bench/conv_engines.py, through CupyBackend.hold_stream.
 * Loaded by cupynet/backends/kernels.py; syntax-checked on CPU by tests/test_kernels_compile.py.
 */
#include "common.cuh"

// One thread spins until `ns` nanoseconds have passed on the global timer; launch with one block of one thread.
extern "C" __global__ void hold_stream(unsigned long long ns)
{
    start_after_prior_grids();
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const unsigned long long start = global_time_ns();
    while (global_time_ns() - start < ns) {
    }
}
