/*
 * kernels/collectives.cu: all-reduce and broadcast between worker threads that share one GPU, as kernels
 * on each worker's own stream, so they can be recorded in a CUDA graph (NCCL refuses two ranks on one GPU,
 * and the host communicator waits for the device in the middle of a step). Used by
 * cupynet/shared_gpu.py, which says how the pieces fit; NumPy twin: HostCommunicator (parallel.py), whose
 * rank-order sums these reproduce bit for bit. Loaded by cupynet/backends/kernels.py; syntax-checked on
 * CPU by tests/test_kernels_compile.py.
 *
 * One collective on rank r, each line a kernel on r's stream:
 *   publish        slots[r] = data                       (every rank's contribution in shared memory)
 *   rank_barrier   wait until every rank has published    (a device-wide arrival counter)
 *   reduce_slots   data = slots[0] + slots[1] + ...       (rank order: identical on every rank) [/ size]
 *      or copy_slot data = slots[root]                   (broadcast)
 *   rank_barrier   wait until every rank has read         (so the next publish cannot overwrite a slot
 *                                                          another rank still reads)
 * The barrier counts arrivals in one ever-growing counter: a rank's k-th barrier waits for k * size
 * arrivals, which it can only see once every rank reached its own k-th barrier. Each rank counts its
 * barriers in its own device counter, so a replayed graph keeps counting correctly.
 * A waiting thread leaves the loop when the group is aborted (the host sets `abort_flag` from another
 * stream) or after `timeout_ns`, setting abort_flag itself, so a failed worker can never hang the GPU.
 */
#include "common.cuh"

// slot = data, one contribution (n elements).
template <typename T>
__global__ void publish(const T* data, T* slot, int n)
{
    start_after_prior_grids();
    for (int i = first_index(); i < n; i += grid_stride()) slot[i] = data[i];
}

// One thread: count this rank's barrier, arrive, wait for every rank's arrival (or an abort).
extern "C" __global__ void rank_barrier(unsigned long long* barriers_passed, unsigned long long* arrivals,
                                        int size, volatile int* abort_flag, unsigned long long timeout_ns)
{
    start_after_prior_grids();
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const unsigned long long target = (barriers_passed[0] += 1ull) * (unsigned long long)size;
    __threadfence();                                   // this rank's published slot before its arrival
    atomicAdd(arrivals, 1ull);
    const unsigned long long start = global_time_ns();
    while (atomicAdd(arrivals, 0ull) < target) {
        if (*abort_flag) break;
        if (global_time_ns() - start > timeout_ns) {
            *abort_flag = 1;                           // the host sees it and reports a hung group
            break;
        }
        __nanosleep(200);
    }
    __threadfence();                                   // the other ranks' slots before what follows
}

// data = sum over ranks, in rank order, of slots (size, n); divided by size when mean (floating types).
template <typename T>
__global__ void reduce_slots(const T* slots, T* data, int n, int size, int mean)
{
    start_after_prior_grids();
    for (int i = first_index(); i < n; i += grid_stride()) {
        T total = slots[i];
        for (int r = 1; r < size; ++r) total += slots[(long long)r * n + i];
        data[i] = mean ? (T)(total / (T)size) : total;
    }
}

// data = slot (the root's contribution): broadcast.
template <typename T>
__global__ void copy_slot(const T* slot, T* data, int n)
{
    start_after_prior_grids();
    for (int i = first_index(); i < n; i += grid_stride()) data[i] = slot[i];
}
