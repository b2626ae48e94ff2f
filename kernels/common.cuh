/*
 * kernels/common.cuh: helpers shared by every kernel file of the GPU backend.
 *
 *   - float <-> storage conversion for the two activation dtypes (float, __nv_bfloat16): every kernel
 *     loads with to_float(), computes in float32 and stores with from_float<T>(), so one template
 *     serves both dtypes and bfloat16 is rounded exactly once, to nearest-even, on the way out;
 *   - grid-stride loop bounds, layout-aware index helpers for (N, C, H, W) activations stored NCHW or
 *     NHWC, and warp/block sums.
 *
 * Not compiled on its own: cupynet/backends/kernels.py pastes it in place of `#include "common.cuh"`
 * (so CuPy's kernel cache key covers it), and `nvcc -ptx` (tests/test_kernels_compile.py) finds it
 * beside the .cu files. NVRTC has no C/C++ standard headers: only CUDA's own headers are included.
 *
 * Sizes are `int`: the backend refuses arrays of more than 2^30 elements before launching, so an
 * index plus a grid stride never overflows.
 */
#pragma once

#include <cuda_bf16.h>

// ------------------------------------------------------------------ storage <-> float

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);   // round to nearest even, like ml_dtypes and CuPy's astype
}

// NaN without <cmath>: marks a result whose input was invalid (e.g. a label out of range).
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// relu that keeps NaN visible (NumPy's maximum(v, 0) does too): NaN < 0 is false.
__device__ __forceinline__ float relu(float v) { return v < 0.0f ? 0.0f : v; }

// The gradient through a relu whose output was `out` (exact: g is only passed on or zeroed).
__device__ __forceinline__ float relu_grad(float g, float out) { return out > 0.0f ? g : 0.0f; }

// The GPU's global nanosecond timer (the emulated GPU reads the host's steady clock instead).
__device__ __forceinline__ unsigned long long global_time_ns()
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Every kernel's first statement, before any memory access. Where the captured step runs a kernel after another
// through a programmatic edge (--programmatic-launch, cupynet/backends/programmatic_launch.py), the kernel may be
// launched before the one before it has finished: this first waits until that one has finished and its writes are
// visible (griddepcontrol.wait). Then it lets the kernel after this one launch (griddepcontrol.launch_dependents):
// once every block of this kernel has got that far, the next kernel's blocks may take the SMs this one's blocks
// leave, and they wait in their own first statement, so the next kernel starts the moment this one ends instead of
// a launch later. After the wait, not before it: a kernel still waiting does not let the one after it launch, so at
// most two kernels of a chain are in flight. Without such an edge (a plain launch, an ordinary graph edge) both
// return at once. Hopper's griddepcontrol; nothing on older GPUs (which run no such edges) nor on the emulated GPU.
__device__ __forceinline__ void start_after_prior_grids()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ------------------------------------------------------------------ grid-stride loops

__device__ __forceinline__ int first_index() { return blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int grid_stride() { return gridDim.x * blockDim.x; }

// ------------------------------------------------------------------ activation layouts

// Linear offset of element (n, c, h, w) of an (N, C, H, W) activation stored NCHW or NHWC.
__device__ __forceinline__ int offset_of(int n, int c, int h, int w, int C, int H, int W, int channels_last)
{
    return channels_last ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

// Inverse of offset_of: (n, c, h, w) of the element at linear offset i.
__device__ __forceinline__ void decode_offset(int i, int C, int H, int W, int channels_last,
                                              int& n, int& c, int& h, int& w)
{
    if (channels_last) {
        c = i % C; i /= C;
        w = i % W; i /= W;
        h = i % H; n = i / H;
    } else {
        w = i % W; i /= W;
        h = i % H; i /= H;
        c = i % C; n = i / C;
    }
}

// Per-channel kernels see an activation as (outer, C, inner): NCHW has inner = H*W, NHWC inner = 1.
// Channel of the element at linear offset i:
__device__ __forceinline__ int channel_of(int i, int C, int inner)
{
    return inner == 1 ? i % C : (i / inner) % C;
}

// Channels of the `size` elements starting at linear offset `first`: one division for them all when they
// cannot straddle a channel boundary (NHWC with C % size == 0: adjacent channels; NCHW with
// inner % size == 0: one channel), which holds for the model's activations; one per element otherwise.
template <int size>
__device__ __forceinline__ void channels_of(int first, int C, int inner, int (&c)[size])
{
    if (inner == 1 ? C % size == 0 : inner % size == 0) {
        const int c0 = channel_of(first, C, inner);
#pragma unroll
        for (int k = 0; k < size; ++k) c[k] = inner == 1 ? c0 + k : c0;
    } else {
#pragma unroll
        for (int k = 0; k < size; ++k) c[k] = channel_of(first + k, C, inner);
    }
}

// Offset of the k-th element (k in [0, outer*inner)) of channel c.
__device__ __forceinline__ int channel_element(int k, int c, int C, int inner)
{
    if (inner == 1) return k * C + c;
    const int o = k / inner;
    return (o * C + c) * inner + (k - o * inner);
}

// ------------------------------------------------------------------ 16-byte packs

// Memory-bound elementwise kernels move 16 bytes per load and store (4 floats or 8 bfloat16: one
// instruction instead of 4 or 8) when the backend passes vec = 1, which it does only when every array
// argument starts on a 16-byte boundary. A kernel then runs its per-element body on packs
// [0, n / PACK) and element by element on the remaining n % PACK (and on everything when vec = 0), so
// both paths compute exactly the same values.
template <typename T> struct Pack { static constexpr int size = 16 / (int)sizeof(T); };

// v[k] = x[j * size + k] as float, for the j-th pack.
template <typename T>
__device__ __forceinline__ void load_pack(const T* x, int j, float (&v)[Pack<T>::size])
{
    const uint4 raw = reinterpret_cast<const uint4*>(x)[j];
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < Pack<T>::size; ++k) v[k] = to_float(e[k]);
}

// y[j * size + k] = v[k], rounded once to T.
template <typename T>
__device__ __forceinline__ void store_pack(T* y, int j, const float (&v)[Pack<T>::size])
{
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < Pack<T>::size; ++k) e[k] = from_float<T>(v[k]);
    reinterpret_cast<uint4*>(y)[j] = raw;
}

// A group of V elements starting at `offset` (a multiple of V): one element (V = 1) or one 16-byte pack (V =
// Pack<T>::size), for kernels whose body is written once for both (a template on V).
template <int V, typename T>
__device__ __forceinline__ void load_group(const T* x, int offset, float (&v)[V])
{
    if constexpr (V == 1) {
        v[0] = to_float(x[offset]);
    } else {
        load_pack(x, offset / V, v);
    }
}

template <int V, typename T>
__device__ __forceinline__ void store_group(T* y, int offset, const float (&v)[V])
{
    if constexpr (V == 1) {
        y[offset] = from_float<T>(v[0]);
    } else {
        store_pack(y, offset / V, v);
    }
}

// Number of whole packs a kernel handles as packs (0 when vec is 0).
template <typename T> __device__ __forceinline__ int pack_count(int n, int vec)
{
    return vec ? n / Pack<T>::size : 0;
}

// ------------------------------------------------------------------ reductions

// True in every thread of the launch's last block to finish its partial sums (exactly one block).
// Each block's partials are fenced before it counts itself in `arrivals`; the last one resets the
// counter, so it is 0 again for the next launch (kernels on one stream never overlap; each backend
// has its own counter, cupy_batchnorm's _bn_arrivals). The classic threadfence-reduction pattern of the
// CUDA programming guide. Used by kernels/batchnorm.cu's reductions and kernels/conv3x3.cu's sums.
__device__ bool last_block_to_arrive(unsigned int* arrivals)
{
    __shared__ bool is_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned int blocks = gridDim.x * gridDim.y;
        is_last = atomicAdd(arrivals, 1u) == blocks - 1;
        if (is_last) {
            *arrivals = 0u;
            __threadfence();            // the other blocks' partials are read after their count (acquire)
        }
    }
    __syncthreads();
    return is_last;
}


// The sum of v over each group of `lanes` adjacent lanes (a power of 2, at most 32), complete in the group's first
// lane: a lane reads lanes above it, within its group for every value that first lane's sum takes in.
template <typename T> __device__ __forceinline__ T warp_sum(T v, int lanes = 32)
{
    for (int offset = lanes / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// Sum of v over the block, complete in thread 0. blockDim.x: a multiple of 32, at most 1024.
// Ends with a barrier so that a second call may reuse the shared scratch at once.
template <typename T> __device__ T block_sum(T v)
{
    __shared__ T per_warp[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) per_warp[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = threadIdx.x < warps ? per_warp[threadIdx.x] : T(0);
    if (warp == 0) v = warp_sum(v);
    __syncthreads();
    return v;
}
