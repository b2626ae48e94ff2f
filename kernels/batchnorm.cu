/*
 * kernels/batchnorm.cu: BatchNorm over (N, H, W) per channel, NCHW or NHWC, float or bfloat16 activations.
 * The NumPy twin is NumpyBackend.batchnorm_* (cupynet/backends/numpy_backend.py); the parity tests are
 * in tests/test_gpu_parity.py. Loaded by cupynet/backends/kernels.py; syntax-checked on CPU by
 * tests/test_kernels_compile.py (`nvcc -ptx -arch=sm_90`).
 *
 * Training forward = 2 launches:
 *   bn_stats           per block, per channel: sum(x - K) and sum((x - K)^2) over a slice of the rows,
 *                      float32 accumulation, written to partials[2][P][C]; K = the channel's first
 *                      element (a shift that keeps the one-pass variance free of cancellation when
 *                      |mean| >> std). The last block to finish (see last_block_to_arrive) then adds
 *                      each channel's P partials in double, every channel at once, writes the saved mean
 *                      and 1/sqrt(var + eps), and updates the moving statistics on the device (the
 *                      moving variance takes the unbiased m/(m-1) variance, as TensorFlow's fused batch
 *                      norm);
 *   bn_apply           y = [relu]((x - mean) * gamma * invstd + beta [+ residual]), also used for
 *                      inference with the moving statistics (stat_is_variance = 1). With a residual it
 *                      is a post-activation block's whole tail: BatchNorm, shortcut sum and relu in one
 *                      pass.
 * Backward (relu backward fused: dz = dy * (y > 0) when the forward applied relu; see relu_passes for the
 * mask recomputed from x instead, which saves reading y) = 2 launches:
 *   bn_grad            sum(dz) and sum(dz * xhat) in one pass, same partials layout; its last block
 *                      writes dbeta = sum(dz), dgamma = sum(dz * xhat);
 *   bn_backward_dx     dx = gamma * invstd * (dz - dbeta/m - xhat * dgamma/m).
 * With --residual-grad-sums, the kernel that writes a post-activation block's input gradient
 * (relu_backward_add_bn_grad: residual_add's sum, then bn_grad's reductions of it) does bn_grad's work for the
 * BatchNorm that gradient flows into next, which then runs bn_backward_dx alone.
 * Finalizing in the reduction's last block instead of in a launch of its own saves two launches per
 * BatchNorm and step (86 in ResNet-44): a captured step is a chain of small dependent kernels, each
 * paying a launch gap and a ramp-up and drain of the GPU.
 * One launch per pass (--bn-launches 1) = bn_stats_apply and bn_grad_dx: the same reduction and finalize,
 * then every block waits for the finalize (finish_then_release: a grid-wide barrier on the arrival counter
 * and a generation word) and runs the elementwise half over the same blocks, with the per-channel values
 * staged in shared memory. Same partial sums in the same order and the same arithmetic, so the same bits
 * as the two launches when the grid is the same; the backend caps the grid at the blocks the GPU holds at
 * once (the driver's occupancy), because a block waiting for one that cannot start would wait forever.
 * Sync BN (statistics over several workers) splits both passes around a communicator's all-reduce of
 * (2, C) double sums, reusing the stages: forward = bn_stats_partials_shifted + bn_sums_finalize |
 * all-reduce | bn_stats_from_sums + bn_apply (see below); backward = bn_grad_partials + bn_sums_finalize |
 * all-reduce | bn_grad_from_sums + bn_backward_dx (with the count the sums cover).
 * With --conv-genstats the convolution before the BatchNorm writes the (2, C) float32 sums itself (cuDNN's
 * genstats): forward = bn_apply_from_sums<T, float> (shift 0), one launch and no pass of our own over x. Sync
 * BN keeps bn_stats_from_sums + bn_apply after its all-reduce: its shift is the moving mean, which the one
 * launch's block 0 would update while other blocks still read it (bn_apply_from_sums<T, double> serves a
 * caller whose shift is an array of its own).
 * Deterministic: the partials are added in a fixed order whichever block finalizes (the one atomic only
 * counts arrivals); the split into P slices depends only on the shapes, the GPU and whether the arrays
 * are 16-byte aligned (the backend's own buffers always are; an offset view may not be).
 *
 * Partial-sum tiling: the activation is viewed as (outer, C, inner) (NCHW: inner = H*W; NHWC:
 * inner = 1), m = outer * inner elements per channel, and read in groups of V consecutive elements:
 * V = 1, or with vec = 1 a 16-byte pack (4 floats, 8 bfloat16: one load instruction instead of V, which
 * is what lets a reduction keep enough bytes in flight to approach the memory's bandwidth). The
 * backend passes vec = 1 when every array read starts on a 16-byte boundary and no group straddles two
 * channels (NHWC: C % V == 0, a group is V adjacent channels of one position; NCHW: inner % V == 0, a
 * group is V adjacent positions of one channel). The kernels tell the two apart by inner == 1, so NCHW
 * with 1 x 1 images, which is laid out as NHWC, is read as NHWC (and the backend plans it so). A block of
 * cw * rows threads covers cw adjacent groups of a row (blockIdx.x) and walks `rows` rows at a time,
 * starting at slice blockIdx.y and stepping by gridDim.y = P. NHWC uses cw = min(C / V, 256): a block reads
 * whole contiguous rows of C channels. NCHW uses cw = 1: a block reads a contiguous run of one channel
 * plane, and a thread adds its group's V values into one sum before the block's tree.
 */
#include "common.cuh"

// The partial-sum kernels' blocks: at most BN_THREADS threads (cw * rows), BN_BLOCKS_PER_SM of them resident
// on an SM, which the compiler guarantees by keeping the registers within bounds (__launch_bounds__): the
// backend sizes their grids to one wave of that many (cupy_batchnorm.py mirrors both numbers).
#define BN_THREADS 256
#define BN_BLOCKS_PER_SM 3
#define BN_REDUCTION_BOUNDS __launch_bounds__(BN_THREADS, BN_BLOCKS_PER_SM)

// Groups a partial-sum thread loads before it adds them (for_each_group): the statistics read one array, the
// gradient sums two or three (grad_tile takes one group at a time where it reads more); as many as the registers
// BN_REDUCTION_BOUNDS allows hold without spilling.
#define STATS_GROUPS_IN_FLIGHT 4
#define GRAD_GROUPS_IN_FLIGHT 2
// Slices of the partial sums a finalizing lane loads before it adds them (sum_partials): two loads each. A
// finalize is a chain that waits on L2's latency, not its bandwidth.
#define PARTIAL_SLICES_IN_FLIGHT 8

// One thread's place in a partial-sum tile (see the file comment).
struct ChannelTile {
    int cw;     // groups per block row
    int rows;   // rows read per step
    int row;    // which of the rows
    int c;      // the group's first channel (NHWC) or its channel (NCHW); may be >= C in the last tile

    __device__ ChannelTile(int groups_per_block, int group_channels)
        : cw(groups_per_block), rows(blockDim.x / groups_per_block),
          row(threadIdx.x / groups_per_block),
          c((blockIdx.x * groups_per_block + threadIdx.x % groups_per_block) * group_channels) {}

    __device__ int first() const { return blockIdx.y * rows + row; }
    __device__ int step() const { return gridDim.y * rows; }
};

// Channels one thread's group covers: V in NHWC, 1 in NCHW (a group of one channel's positions).
template <int V> __device__ __forceinline__ int group_channels(int inner) { return inner == 1 ? V : 1; }

// The values a thread loads for one group: N arrays' V elements each, kept as loaded (type T) until used, so
// that a bfloat16 pack waits in 4 registers rather than the 8 of its floats.
template <typename T, int V, int N>
struct GroupValues {
    alignas(16) T a[N][V];

    // a[i] = the group at `offset` of x: one element, or one 16-byte load (V = Pack<T>::size).
    __device__ __forceinline__ void load(int i, const T* x, int offset)
    {
        if constexpr (V == 1) {
            a[i][0] = x[offset];
        } else {
            *reinterpret_cast<uint4*>(a[i]) = reinterpret_cast<const uint4*>(x)[offset / V];
        }
    }

    __device__ __forceinline__ float at(int i, int k) const { return to_float(a[i][k]); }
};

// For k = first, first + step, ... < end, in that order: use(place(k), load(place(k))). The k go U at a time: the
// U places, then the U loads, then the U uses, so that U loads are in flight at once and the sums a use adds
// are the same, bit for bit, as one k at a time. (A plain unrolled loop tests the bound before each load, and
// the compiler does not move a load above that test: its SASS was one load, the arithmetic on it, a branch,
// the next load, each load waiting out the memory's latency. The places come first so that no branch of
// theirs falls between the loads either.) The last k, fewer than U, make one more batch whose loads each test
// their bound: predicated loads, still issued together (one at a time, a thread of a batch-512 bn_stats waited
// on memory four or five times for its ten or eleven groups instead of three).
template <int U, typename Place, typename Load, typename Use>
__device__ __forceinline__ void in_batches(int first, int end, int step, Place place, Load load, Use use)
{
    int k = first;
    for (; k + (U - 1) * step < end; k += U * step) {
        int at[U];
        decltype(load(0)) values[U];
#pragma unroll
        for (int u = 0; u < U; ++u) at[u] = place(k + u * step);
#pragma unroll
        for (int u = 0; u < U; ++u) values[u] = load(at[u]);
#pragma unroll
        for (int u = 0; u < U; ++u) use(at[u], values[u]);
    }
    if (k < end) {      // the last k, fewer than U: one more batch, each of its loads under its bound test
        int at[U];
        decltype(load(0)) values[U];
#pragma unroll
        for (int u = 0; u < U; ++u) at[u] = k + u * step < end ? place(k + u * step) : 0;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (k + u * step < end) values[u] = load(at[u]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (k + u * step < end) use(at[u], values[u]);
        }
    }
}

// The thread's groups of the tile's channel(s), rows first(), first() + step(), ..., U at a time (in_batches):
// load(offset) reads what a group needs (a GroupValues), use(offset, values) does its arithmetic (and any store).
template <int V, int U, typename Load, typename Use>
__device__ __forceinline__ void for_each_group(const ChannelTile& t, int C, int inner, int m, Load load, Use use)
{
    if (t.c >= C) return;
    const int groups = inner == 1 ? m : m / V;     // per channel (NCHW: inner % V == 0)
    const auto offset = [&](int k) { return inner == 1 ? k * C + t.c : channel_element(k * V, t.c, C, inner); };
    in_batches<U>(t.first(), groups, t.step(), offset, load, use);
}

// Per-channel value of the k-th element of the thread's group: values[c + k] in NHWC, values[c] in NCHW.
template <int V>
__device__ __forceinline__ void group_values(const float* values, const ChannelTile& t, int C, int inner,
                                             float (&out)[V])
{
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = t.c < C ? values[inner == 1 ? t.c + k : t.c] : 0.0f;
}

// Adds a and b over the tile's rows for each channel of the thread's group and stores the block's partial sums:
// partials[blockIdx.y][c] and partials[P + blockIdx.y][c], P = gridDim.y. In NCHW the group's V values are one
// channel's and are added first. When a warp holds whole rows (cw divides 32), shuffles first add the rows of
// each warp, so the tree in shared memory that follows (it works for any number of rows) has one row per warp
// and few barriers; otherwise the tree takes the rows as they are. Needs 2 * group_channels<V>(inner) *
// blockDim.x floats of dynamic shared memory.
template <int V>
__device__ void store_tile_sums(float (&a)[V], float (&b)[V], const ChannelTile& t, int C, int inner,
                                float* partials)
{
    extern __shared__ float tile_shared[];
    const int width = group_channels<V>(inner);
    if (width == 1) {
#pragma unroll
        for (int k = 1; k < V; ++k) {
            a[0] += a[k];
            b[0] += b[k];
        }
    }
    const int fold = 32 % t.cw == 0 && blockDim.x % 32 == 0 ? 32 / t.cw : 1;     // rows a warp adds by shuffles
    for (int offset = 16; fold > 1 && offset >= t.cw; offset >>= 1) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            if (k < width) {
                a[k] += __shfl_down_sync(0xffffffffu, a[k], offset);
                b[k] += __shfl_down_sync(0xffffffffu, b[k], offset);
            }
        }
    }
    // The tree's rows: one per warp after a fold (its first row's lanes hold its sums), else the tile's.
    const int rows = (t.rows + fold - 1) / fold, row = t.row / fold, slot = row * t.cw + threadIdx.x % t.cw;
    const int slots = rows * t.cw;
    const bool holds = t.row % fold == 0;
    float* sum_a = tile_shared;                     // [channel of the group][slot]
    float* sum_b = tile_shared + width * slots;
    if (holds) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            if (k < width) {
                sum_a[k * slots + slot] = a[k];
                sum_b[k * slots + slot] = b[k];
            }
        }
    }
    int span = 1;
    while (span < rows) span <<= 1;
    // After the step with stride s, rows [0, s) hold everything; the first step folds rows >= s.
    for (int s = span >> 1; s > 0; s >>= 1) {
        __syncthreads();
        if (holds && row < s && row + s < rows) {
            for (int k = 0; k < width; ++k) {
                sum_a[k * slots + slot] += sum_a[k * slots + slot + s * t.cw];
                sum_b[k * slots + slot] += sum_b[k * slots + slot + s * t.cw];
            }
        }
    }
    if (holds && row == 0 && t.c < C) {   // row 0 only ever read slots that were final, and wrote its own
        const int slices = gridDim.y;
        for (int k = 0; k < width; ++k) {
            partials[blockIdx.y * C + t.c + k] = sum_a[k * slots + slot];
            partials[(slices + blockIdx.y) * C + t.c + k] = sum_b[k * slots + slot];
        }
    }
}

// Channel totals. A finalize is a chain of dependent steps per channel (load the partials, add them across
// lanes, load what the statistics need, double arithmetic, stores), each waiting on L2 or the FP64 units:
// about 2 us on an H100. So every channel gets its own lanes and the chains run side by side: slice_lanes(C)
// lanes add a channel's partials, the most (a power of 2, at most a warp) that let BN_THREADS threads hold
// every channel at once: 16 lanes at C = 16, 8 at 32, 4 at 64, 1 from 129 channels up. (One warp per
// channel, the channels of a warp one after another, cost bn_stats and bn_grad about 2 us per channel a warp
// had, more than their pass over the activations.) The lanes depend on C alone, and the order of the sums on
// C and P alone, so every kernel that adds partials this way gives the same bits.
__device__ __forceinline__ int slice_lanes(int C)
{
    int lanes = 32;
    while (lanes > 1 && lanes * C > BN_THREADS) lanes >>= 1;
    return lanes;
}

// Channel c's totals over the P slices: lane j (0..lanes-1, its place among c's lanes) adds slices j,
// j + lanes, ..., then shuffles add the lanes. Complete in the lane with j == 0. Every lane of the warp
// calls it (one with c >= C adds nothing). __ldcg reads through L2: partials were written by other blocks.
__device__ double2 sum_partials(const float* partials, int slices, int C, int c, int j, int lanes)
{
    double a = 0.0, b = 0.0;
    if (c < C) {
        in_batches<PARTIAL_SLICES_IN_FLIGHT>(
            j, slices, lanes, [](int p) { return p; },
            [&](int p) { return make_float2(__ldcg(partials + p * C + c), __ldcg(partials + (slices + p) * C + c)); },
            [&](int, float2 sums) {
                a += sums.x;
                b += sums.y;
            });
    }
    return make_double2(warp_sum(a, lanes), warp_sum(b, lanes));
}

// One warp's share of the channels: groups of 32 / slice_lanes(C) channels number group, group + groups, ...
// For each of its channels, in the channel's first lane: early = prefetch(c), issued before the partials are
// loaded so that both loads are in flight together (it loads what finish needs besides the totals), then
// finish(c, totals, early).
template <typename Prefetch, typename Finish>
__device__ void add_channel_groups(const float* partials, int slices, int C, int group, int groups, Prefetch prefetch,
                                   Finish finish)
{
    const int lanes = slice_lanes(C), per_warp = 32 / lanes;
    const int lane = threadIdx.x & 31, j = lane % lanes;
    for (int first = group * per_warp; first < C; first += groups * per_warp) {
        const int c = first + lane / lanes;
        const bool finishes = j == 0 && c < C;
        const auto early = finishes ? prefetch(c) : decltype(prefetch(c)){};
        const double2 sums = sum_partials(partials, slices, C, c, j, lanes);
        if (finishes) finish(c, sums, early);
    }
}

// A prefetch for a finish that needs nothing besides the totals.
struct NothingToPrefetch {};
__device__ __forceinline__ NothingToPrefetch prefetch_nothing(int) { return {}; }

// One-launch passes (bn_stats_apply, bn_grad_dx): every block calls this after its partial sums; the launch's
// last block to arrive runs finish() (the finalize), and every block returns from it once finish()'s writes
// are visible. sync[0] counts arrivals (0 between launches, as for last_block_to_arrive); sync[1] is a
// generation the last block advances when it is done, which the others wait for. That wait needs every block
// of the launch resident at once: the backend caps the grid at what the GPU holds
// (CupyBackend._bn_one_launch_plan), and launches these kernels only where no other stream's kernel can run
// beside them (a kernel whose own blocks wait for each other, as a stream-K GEMM's may, could hold the slots
// this grid's last blocks need while this grid holds the ones it needs). Should a wait still last
// GRID_WAIT_LIMIT_NS, the kernel traps: an error the host sees, not a hang. The fences follow the
// cooperative-groups grid barrier: block barrier, then thread 0 fences and signals or waits, fences, block
// barrier.
#ifndef GRID_WAIT_LIMIT_NS
#define GRID_WAIT_LIMIT_NS 1000000000ull       // a second: a real wait here lasts microseconds
#endif

template <typename Finish>
__device__ void finish_then_release(unsigned int* sync, Finish finish)
{
    __shared__ unsigned int generation;
    if (threadIdx.x == 0) generation = atomicAdd(sync + 1, 0u);    // before arriving: the fence below orders it
    if (last_block_to_arrive(sync)) {
        finish();
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(sync + 1, 1u);
        }
    } else if (threadIdx.x == 0) {
        const unsigned long long started = global_time_ns();
        while (*(volatile unsigned int*)(sync + 1) == generation) {
            __nanosleep(32);
            if (global_time_ns() - started > GRID_WAIT_LIMIT_NS) __trap();
        }
        __threadfence();
    }
    __syncthreads();
}

// Per-channel values other blocks wrote in this launch, copied into shared memory for the elementwise half of
// a one-launch pass: __ldcg reads through L2 (an SM's L1 may hold a stale line). C <= what the launch's
// dynamic shared memory holds in floats / count (the backend checks).
__device__ float* stage_channels(const float* const* arrays, int count, int C)
{
    extern __shared__ float staged_shared[];
    for (int a = 0; a < count; ++a) {
        for (int c = threadIdx.x; c < C; c += blockDim.x) staged_shared[a * C + c] = __ldcg(arrays[a] + c);
    }
    __syncthreads();
    return staged_shared;
}

// Flat index and stride over all blocks of a 2-D grid, for the elementwise half of a one-launch pass.
__device__ __forceinline__ int flat_first_index()
{
    return (blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int flat_grid_stride() { return gridDim.x * gridDim.y * blockDim.x; }

// BatchNorm's output before any residual and relu: x normalized, scaled, shifted, as
// fmaf(x - mean, gamma * invstd, beta) with every rounding explicit, so the forward and a backward that
// recomputes it (relu_passes) give the same bits whatever the compiler contracts elsewhere.
__device__ __forceinline__ float bn_affine_scaled(float x, float mean, float scale, float beta)
{
    return fmaf(__fsub_rn(x, mean), scale, beta);
}

// scale = gamma * invstd, rounded as bn_affine_scaled's callers round it once per channel.
__device__ __forceinline__ float bn_scale(float gamma, float invstd) { return __fmul_rn(gamma, invstd); }

__device__ __forceinline__ float bn_affine(float x, float mean, float invstd, float gamma, float beta)
{
    return bn_affine_scaled(x, mean, bn_scale(gamma, invstd), beta);
}

// The backward's fused relu, a template argument R of its kernels (so each mode gets only the registers
// it needs): none; the mask read from the forward's output y (y > 0); or, where no residual was added
// before the relu, the mask recomputed from x: y > 0 exactly where the normalized x, rounded to the
// activation type as y was, is > 0 (relu keeps NaN, and neither NaN nor 0 passes). Recomputing costs a few
// operations per element and saves reading y, a whole activation, in both passes of the backward.
enum ReluMask { RELU_NONE = 0, RELU_FROM_OUTPUT = 1, RELU_FROM_INPUT = 2 };

// Whether the gradient passes the fused relu at one element: y_value its forward output (used only for
// RELU_FROM_OUTPUT); affine() its bn_affine value (called only for RELU_FROM_INPUT).
template <typename T, int R, typename Affine>
__device__ __forceinline__ bool relu_passes(float y_value, Affine affine)
{
    if constexpr (R == RELU_NONE) return true;
    else if constexpr (R == RELU_FROM_OUTPUT) return y_value > 0.0f;
    else return to_float(from_float<T>(affine())) > 0.0f;
}

// In the last block of a reduction: finish(c, totals, prefetch(c)) for every channel c, its P partials added by
// slice_lanes(C) lanes (add_channel_groups), every channel at once in a block of BN_THREADS (a smaller block,
// where cw does not divide BN_THREADS, takes two passes or more). A block of e.g. 240 threads ends in a
// partial warp: it sits out.
template <typename Prefetch, typename Finish>
__device__ void finish_channels(const float* partials, int C, Prefetch prefetch, Finish finish)
{
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5;
    if (warp >= warps) return;
    add_channel_groups(partials, gridDim.y, C, warp, warps, prefetch, finish);
}

// ------------------------------------------------------------------ training forward

// One block's partial sums of (x - shift) and (x - shift)^2 per channel; shared by the fused forward (shift =
// the channel's first element) and the split sync-BN forward (shift = a per-channel array).
template <int V, typename T>
__device__ void shifted_stats_tile(const T* x, const float (&shift)[V], const ChannelTile& t, int C, int inner,
                                   int m, float* partials)
{
    float sum[V] = {}, sum_sq[V] = {};
    const auto load = [&](int offset) {
        GroupValues<T, V, 1> values;
        values.load(0, x, offset);
        return values;
    };
    for_each_group<V, STATS_GROUPS_IN_FLIGHT>(t, C, inner, m, load, [&](int, const GroupValues<T, V, 1>& values) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float d = values.at(0, k) - shift[k];
            sum[k] += d;
            sum_sq[k] = fmaf(d, d, sum_sq[k]);
        }
    });
    store_tile_sums<V>(sum, sum_sq, t, C, inner, partials);
}

// (mean, biased variance, as normalization uses) of a channel from its shifted sums
// [sum(x - shift), sum((x - shift)^2)] over `count` elements, in double: the per-channel arithmetic is
// negligible next to the passes. Every product that meets a sum is an explicit fma or __dmul_rn here and in
// store_statistics: left to itself the compiler contracts them differently in different kernels, and the
// kernels that share these functions must give the same bits (bn_apply_from_sums against the two launches).
__device__ __forceinline__ double2 mean_and_variance(double2 sums, double shift, double count)
{
    const double shifted_mean = sums.x / count;
    return make_double2(shift + shifted_mean, fmax(fma(-shifted_mean, shifted_mean, sums.y / count), 0.0));
}

__device__ __forceinline__ float invstd_of(double var, double eps) { return (float)(1.0 / sqrt(var + eps)); }

// Channel c's moving (mean, variance) before this step's update. Callers read them before anything is stored
// (and a finalize before it loads its partials): a load after the stores would wait for them, one more round
// trip to L2 in the finalize's chain.
__device__ __forceinline__ float2 moving_statistics(const float* running_mean, const float* running_var, int c)
{
    return make_float2(running_mean[c], running_var[c]);
}

// Channel c's statistics from its shifted sums: the saved mean and 1/sqrt(var + eps), and the moving
// statistics (unbiased variance) updated from `moving`, their values before the step (moving_statistics).
__device__ void store_statistics(double2 sums, double shift, double count, float2 moving, int c, double decay,
                                 double eps, float* running_mean, float* running_var, float* saved_mean,
                                 float* saved_invstd)
{
    const double2 stats = mean_and_variance(sums, shift, count);
    const double mean = stats.x, var = stats.y;
    saved_mean[c] = (float)mean;
    saved_invstd[c] = invstd_of(var, eps);
    const double unbiased = var * count / (count > 1.0 ? count - 1.0 : 1.0);
    running_mean[c] = (float)fma(decay, (double)moving.x, __dmul_rn(1.0 - decay, mean));
    running_var[c] = (float)fma(decay, (double)moving.y, __dmul_rn(1.0 - decay, unbiased));
}

// One block's partial sums for bn_stats, for groups of V elements: shifted by each channel's first element.
template <int V, typename T>
__device__ void first_shifted_partials(const T* x, int C, int inner, int m, int cw, float* partials)
{
    const ChannelTile t(cw, group_channels<V>(inner));
    float shift[V];    // each channel's first element (NHWC: the first group holds V channels' first elements)
    if (t.c < C) {
        load_group<V>(x, channel_element(0, t.c, C, inner), shift);
        if (inner != 1) {
#pragma unroll
            for (int k = 1; k < V; ++k) shift[k] = shift[0];
        }
    }
    shifted_stats_tile<V>(x, shift, t, C, inner, m, partials);
}

template <typename T>
__device__ void stats_partials(const T* x, int C, int inner, int m, int cw, float* partials, int vec)
{
    if (vec) {
        first_shifted_partials<Pack<T>::size>(x, C, inner, m, cw, partials);
    } else {
        first_shifted_partials<1>(x, C, inner, m, cw, partials);
    }
}

// In the reduction's last block: every channel's statistics from the partials of stats_partials.
template <typename T>
__device__ void finish_statistics(const T* x, const float* partials, int C, int inner, int m, double decay,
                                  double eps, float* running_mean, float* running_var, float* saved_mean,
                                  float* saved_invstd)
{
    struct Before { float shift; float2 moving; };      // the channel's first element: the partials' shift
    finish_channels(
        partials, C,
        [&](int c) {
            const float first = to_float(x[channel_element(0, c, C, inner)]);
            return Before{first, moving_statistics(running_mean, running_var, c)};
        },
        [&](int c, double2 sums, Before before) {
            store_statistics(sums, before.shift, m, before.moving, c, decay, eps, running_mean, running_var, saved_mean,
                             saved_invstd);
        });
}

// The training forward's statistics in one launch. x: activation; partials: (2, P, C) float32 scratch;
// arrivals: the backend's counter (0 between launches). grid (ceil(C / V / cw) or C, P), block cw * rows
// (at least 32 threads): the last block adds each channel's partials (finish_channels).
template <typename T>
BN_REDUCTION_BOUNDS
__global__ void bn_stats(const T* x, int C, int inner, int m, int cw, float* partials, unsigned int* arrivals,
                         double decay, double eps, float* running_mean, float* running_var, float* saved_mean,
                         float* saved_invstd, int vec)
{
    start_after_prior_grids();
    stats_partials(x, C, inner, m, cw, partials, vec);
    if (last_block_to_arrive(arrivals)) {
        finish_statistics(x, partials, C, inner, m, decay, eps, running_mean, running_var, saved_mean, saved_invstd);
    }
}

// Sync-BN: partial sums around shift[c] (the same on every worker, so the sums add up across them).
template <int V, typename T>
__device__ void stats_partials_groups(const T* x, const float* shift, int C, int inner, int m, int cw,
                                      float* partials)
{
    const ChannelTile t(cw, group_channels<V>(inner));
    float group_shift[V];
    group_values<V>(shift, t, C, inner, group_shift);
    shifted_stats_tile<V>(x, group_shift, t, C, inner, m, partials);
}

template <typename T>
BN_REDUCTION_BOUNDS
__global__ void bn_stats_partials_shifted(const T* x, const float* shift, int C, int inner, int m, int cw,
                                          float* partials, int vec)
{
    start_after_prior_grids();
    if (vec) {
        stats_partials_groups<Pack<T>::size>(x, shift, C, inner, m, cw, partials);
    } else {
        stats_partials_groups<1>(x, shift, C, inner, m, cw, partials);
    }
}

// Blocks of 32 threads, 32 / slice_lanes(C) channels per block at a time (the backend launches enough blocks
// for one pass): sums (2, C) double <- the P partials of each channel added in double as finish_channels adds
// them. Used by both split halves (forward statistics and backward gradient sums): the (2, C) totals are
// what the communicator reduces between the reduction and the rest of the layer.
extern "C" __global__ void bn_sums_finalize(const float* partials, int slices, int C, double* sums)
{
    start_after_prior_grids();
    add_channel_groups(partials, slices, C, blockIdx.x, gridDim.x, prefetch_nothing,
                       [&](int c, double2 s, NothingToPrefetch) {
                           sums[c] = s.x;
                           sums[C + c] = s.y;
                       });
}

// Grid-stride over C: statistics from the global shifted sums of `count` elements per channel, as
// bn_stats. shift may alias running_mean: each thread reads it before updating it. S: double (sync BN's
// sums) or float (the sums cuDNN's genstats writes beside a convolution's output, shift 0).
template <typename S>
__global__ void bn_stats_from_sums(const S* sums, const float* shift, double count, int C, double decay, double eps,
                                   float* running_mean, float* running_var, float* saved_mean, float* saved_invstd)
{
    start_after_prior_grids();
    for (int c = first_index(); c < C; c += grid_stride()) {
        store_statistics(make_double2((double)sums[c], (double)sums[C + c]), shift[c], count,
                         moving_statistics(running_mean, running_var, c), c, decay, eps, running_mean, running_var,
                         saved_mean, saved_invstd);
    }
}

// Grid-stride over C: dbeta = sums[0], dgamma = sums[1] (float32), for bn_backward_dx to read.
extern "C" __global__ void bn_grad_from_sums(const double* sums, int C, float* dgamma, float* dbeta)
{
    start_after_prior_grids();
    for (int c = first_index(); c < C; c += grid_stride()) {
        dbeta[c] = (float)sums[c];
        dgamma[c] = (float)sums[C + c];
    }
}

// One element of bn_apply before its optional residual and relu: x of channel c normalized, scaled, shifted.
__device__ __forceinline__ float bn_normalize(float x, int c, const float* mean, const float* stat,
                                              const float* gamma, const float* beta, float eps,
                                              int stat_is_variance)
{
    const float invstd = stat_is_variance ? 1.0f / sqrtf(stat[c] + eps) : stat[c];
    return bn_affine(x, mean[c], invstd, gamma[c], beta[c]);
}

// The tail of bn_apply: [+ residual], [relu].
__device__ __forceinline__ float bn_output(float v, float r, int add_residual, int relu_out)
{
    if (add_residual) v += r;
    return relu_out ? relu(v) : v;
}

// The elements [first, first + stride, ...) of bn_apply (a grid-stride loop over packs, then the tail).
template <typename T>
__device__ void apply_elements(const T* x, const T* residual, T* y, const float* mean, const float* stat,
                               const float* gamma, const float* beta, float eps, int stat_is_variance, int n, int C,
                               int inner, int add_residual, int relu_out, int vec, int first, int stride)
{
    constexpr int P = Pack<T>::size;
    const int packs = pack_count<T>(n, vec);
    for (int j = first; j < packs; j += stride) {
        float v[P], r[P];
        int c[P];
        load_pack(x, j, v);
        if (add_residual) load_pack(residual, j, r);
        channels_of<P>(j * P, C, inner, c);
#pragma unroll
        for (int k = 0; k < P; ++k) {
            const float normalized = bn_normalize(v[k], c[k], mean, stat, gamma, beta, eps, stat_is_variance);
            v[k] = bn_output(normalized, add_residual ? r[k] : 0.0f, add_residual, relu_out);
        }
        store_pack(y, j, v);
    }
    for (int i = packs * P + first; i < n; i += stride) {
        const int c = channel_of(i, C, inner);
        const float normalized = bn_normalize(to_float(x[i]), c, mean, stat, gamma, beta, eps, stat_is_variance);
        y[i] = from_float<T>(bn_output(normalized, add_residual ? to_float(residual[i]) : 0.0f, add_residual,
                                       relu_out));
    }
}

// y = [relu]((x - mean) * gamma * invstd + beta [+ residual]). Training passes the saved invstd as
// `stat`; inference passes the moving variance with stat_is_variance = 1. residual is read only when
// add_residual is 1 (the backend passes x otherwise, never a null pointer). y may alias x or residual.
// vec: 16-byte packs.
template <typename T>
__global__ void bn_apply(const T* x, const T* residual, T* y, const float* mean, const float* stat,
                         const float* gamma, const float* beta, float eps, int stat_is_variance, int n, int C,
                         int inner, int add_residual, int relu_out, int vec)
{
    start_after_prior_grids();
    apply_elements(x, residual, y, mean, stat, gamma, beta, eps, stat_is_variance, n, C, inner, add_residual,
                   relu_out, vec, first_index(), grid_stride());
}

// The training forward from (global) shifted sums in one launch, instead of bn_stats_from_sums + bn_apply:
// every block derives each channel's mean and 1/sqrt(var + eps) from the sums into shared memory (2 * C
// floats of dynamic shared memory; C threads' worth of double arithmetic, negligible next to the pass) and
// applies them; block 0 also stores them and updates the moving statistics. The same arithmetic as the two
// launches, so the same bits. No block reads what block 0 writes, as long as shift aliases none of those
// outputs (sync BN's shift is the moving mean: the backend takes the two launches then). S: double (sync
// BN's sums) or float (those cuDNN's genstats writes beside a convolution's output, shift 0). y may alias x
// or residual, as in bn_apply.
template <typename T, typename S>
__global__ void bn_apply_from_sums(const T* x, const T* residual, T* y, const S* sums, const float* shift,
                                   double count, double decay, double eps, float* running_mean, float* running_var,
                                   float* saved_mean, float* saved_invstd, const float* gamma, const float* beta,
                                   int n, int C, int inner, int add_residual, int relu_out, int vec)
{
    start_after_prior_grids();
    extern __shared__ float channel_stats[];        // [mean (C), invstd (C)]
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const double2 channel_sums = make_double2((double)sums[c], (double)sums[C + c]);
        const double2 stats = mean_and_variance(channel_sums, shift[c], count);
        channel_stats[c] = (float)stats.x;
        channel_stats[C + c] = invstd_of(stats.y, eps);
        if (blockIdx.x == 0) {
            store_statistics(channel_sums, shift[c], count, moving_statistics(running_mean, running_var, c), c, decay,
                             eps, running_mean, running_var, saved_mean, saved_invstd);
        }
    }
    __syncthreads();
    apply_elements(x, residual, y, channel_stats, channel_stats + C, gamma, beta, (float)eps, 0, n, C, inner,
                   add_residual, relu_out, vec, first_index(), grid_stride());
}

// The training forward in one launch (--bn-launches 1): bn_stats' partial sums and finalize, a grid-wide wait
// for the finalize (finish_then_release), then bn_apply over the same blocks with the statistics staged in
// shared memory: the same arithmetic as the two launches, without the second launch's gap and ramp-up.
// Geometry as bn_stats (grid capped at the blocks the GPU holds at once), sync: the backend's (2,) counters,
// dynamic shared memory: at least bn_stats' and 4 * C floats. vec_reduce / vec_apply: bn_stats' and
// bn_apply's 16-byte pack flags. y may alias x or residual, as in bn_apply: every read of x by another
// thread (the partial sums, the shift) happens before the wait.
template <typename T>
__global__ void bn_stats_apply(const T* x, const T* residual, T* y, int C, int inner, int m, int cw,
                               float* partials, unsigned int* sync, double decay, double eps, float* running_mean,
                               float* running_var, float* saved_mean, float* saved_invstd, const float* gamma,
                               const float* beta, int n, int add_residual, int relu_out, int vec_reduce,
                               int vec_apply)
{
    start_after_prior_grids();
    stats_partials(x, C, inner, m, cw, partials, vec_reduce);
    finish_then_release(sync, [&]() {
        finish_statistics(x, partials, C, inner, m, decay, eps, running_mean, running_var, saved_mean, saved_invstd);
    });
    const float* arrays[4] = {saved_mean, saved_invstd, gamma, beta};
    const float* staged = stage_channels(arrays, 4, C);
    apply_elements(x, residual, y, staged, staged + C, staged + 2 * C, staged + 3 * C, (float)eps, 0, n, C, inner,
                   add_residual, relu_out, vec_apply, flat_first_index(), flat_grid_stride());
}

// ------------------------------------------------------------------ backward

// One block's partial sums of dz and dz * xhat per channel (both reductions of the backward pass in
// one read of the gradient, x and, with a fused relu whose mask comes from the output, y). The gradient is
// G arrays' values: load_gradient(offset, values) loads them into values.a[0, G), and make_gradient(offset,
// values, g) fills g with the group's V gradient values from them: dy itself (bn_grad), or computed and
// written by the kernel that makes them (relu_backward_add_bn_grad).
template <int V, typename T, int R, int G, typename LoadGradient, typename MakeGradient>
__device__ void grad_tile(LoadGradient load_gradient, MakeGradient make_gradient, const T* x, const T* y,
                          const float* mean, const float* invstd, const float* gamma, const float* beta,
                          const ChannelTile& t, int C, int inner, int m, float* partials)
{
    constexpr int X = G, Y = G + 1, N = R == RELU_FROM_OUTPUT ? G + 2 : G + 1;    // where x and y go
    // Groups in flight: with three gradient arrays (and x, maybe y) one group's loads are already four or five.
    constexpr int U = G == 1 ? GRAD_GROUPS_IN_FLIGHT : 1;
    // sum(dz * xhat) = invstd * sum(dz * (x - mean)): the loop adds the latter and the tile multiplies once at
    // the end, so that invstd takes no registers during the loop (with the relu mask from x a thread already
    // holds 3 x V per-channel values, and the registers left decide how many groups' loads are in flight).
    float mu[V], scale[V] = {}, be[V] = {}, sum_dz[V] = {}, sum_dz_xc[V] = {};
    group_values<V>(mean, t, C, inner, mu);
    if constexpr (R == RELU_FROM_INPUT) {
        float is[V];
        group_values<V>(invstd, t, C, inner, is);
        group_values<V>(gamma, t, C, inner, scale);
#pragma unroll
        for (int k = 0; k < V; ++k) scale[k] = bn_scale(scale[k], is[k]);
        group_values<V>(beta, t, C, inner, be);
    }
    const auto load = [&](int offset) {
        GroupValues<T, V, N> values;
        load_gradient(offset, values);
        values.load(X, x, offset);
        if constexpr (R == RELU_FROM_OUTPUT) values.load(Y, y, offset);
        return values;
    };
    for_each_group<V, U>(t, C, inner, m, load, [&](int offset, const GroupValues<T, V, N>& values) {
        float g[V];
        make_gradient(offset, values, g);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float v = values.at(X, k);
            const bool passes = relu_passes<T, R>(R == RELU_FROM_OUTPUT ? values.at(N - 1, k) : 0.0f, [&] {
                return bn_affine_scaled(v, mu[k], scale[k], be[k]);
            });
            const float dz = passes ? g[k] : 0.0f;
            sum_dz[k] += dz;
            sum_dz_xc[k] = fmaf(dz, v - mu[k], sum_dz_xc[k]);
        }
    });
    float is[V], sum_dz_xhat[V];
    group_values<V>(invstd, t, C, inner, is);
#pragma unroll
    for (int k = 0; k < V; ++k) sum_dz_xhat[k] = sum_dz_xc[k] * is[k];
    store_tile_sums<V>(sum_dz, sum_dz_xhat, t, C, inner, partials);
}

// grad_tile of the gradient dy, with groups of a 16-byte pack (vec = 1) or of one element.
template <int V, typename T, int R>
__device__ void dy_grad_tile(const T* dy, const T* x, const T* y, const float* mean, const float* invstd,
                             const float* gamma, const float* beta, int C, int inner, int m, int cw, float* partials)
{
    grad_tile<V, T, R, 1>(
        [&](int offset, auto& values) { values.load(0, dy, offset); },
        [&](int, const auto& values, float (&g)[V]) {
#pragma unroll
            for (int k = 0; k < V; ++k) g[k] = values.at(0, k);
        },
        x, y, mean, invstd, gamma, beta, ChannelTile(cw, group_channels<V>(inner)), C, inner, m, partials);
}

template <typename T, int R>
__device__ void grad_partials(const T* dy, const T* x, const T* y, const float* mean, const float* invstd,
                              const float* gamma, const float* beta, int C, int inner, int m, int cw, float* partials,
                              int vec)
{
    if (vec) {
        dy_grad_tile<Pack<T>::size, T, R>(dy, x, y, mean, invstd, gamma, beta, C, inner, m, cw, partials);
    } else {
        dy_grad_tile<1, T, R>(dy, x, y, mean, invstd, gamma, beta, C, inner, m, cw, partials);
    }
}

// Sync-BN: the partials (2, P, C) only; bn_sums_finalize adds them.
template <typename T, int R>
BN_REDUCTION_BOUNDS
__global__ void bn_grad_partials(const T* dy, const T* x, const T* y, const float* mean, const float* invstd,
                                 const float* gamma, const float* beta, int C, int inner, int m, int cw,
                                 float* partials, int vec)
{
    start_after_prior_grids();
    grad_partials<T, R>(dy, x, y, mean, invstd, gamma, beta, C, inner, m, cw, partials, vec);
}

// In the reduction's last block: dbeta = sum(dz), dgamma = sum(dz * xhat) from the partials of grad_partials.
__device__ void finish_grad_sums(const float* partials, int C, float* dgamma, float* dbeta)
{
    finish_channels(partials, C, prefetch_nothing, [&](int c, double2 sums, NothingToPrefetch) {
        dbeta[c] = (float)sums.x;
        dgamma[c] = (float)sums.y;
    });
}

// The backward reductions in one launch: the last block writes dbeta = sum(dz), dgamma = sum(dz * xhat)
// (written, not accumulated). Geometry and arrivals as bn_stats.
template <typename T, int R>
BN_REDUCTION_BOUNDS
__global__ void bn_grad(const T* dy, const T* x, const T* y, const float* mean, const float* invstd,
                        const float* gamma, const float* beta, int C, int inner, int m, int cw, float* partials,
                        unsigned int* arrivals, float* dgamma, float* dbeta, int vec)
{
    start_after_prior_grids();
    grad_partials<T, R>(dy, x, y, mean, invstd, gamma, beta, C, inner, m, cw, partials, vec);
    if (last_block_to_arrive(arrivals)) finish_grad_sums(partials, C, dgamma, dbeta);
}

// A post-activation block's input gradient and the gradient sums of the BatchNorm it flows into, in one pass
// (--residual-grad-sums): dx = addend + relu_grad(dy, out), exactly as residual_add writes it (masked = 1), and
// bn_grad's reductions of dx, rounded to T as bn_grad would read it back, for the BatchNorm whose input was x
// (its relu's mask from y or recomputed from x, as bn_grad's). The two kernels' work, with one read of dx, x
// and y fewer and one launch fewer; the same tiling as bn_grad (so the same partial sums, and the same bits,
// where both take the same plan): every element lies in exactly one thread's groups, so dx may alias addend.
template <int V, typename T, int R>
__device__ void add_grad_tile(const T* dy, const T* out, const T* addend, T* dx, const T* x, const T* y,
                              const float* mean, const float* invstd, const float* gamma, const float* beta, int C,
                              int inner, int m, int cw, float* partials)
{
    grad_tile<V, T, R, 3>(
        [&](int offset, auto& values) {
            values.load(0, dy, offset);
            values.load(1, out, offset);
            values.load(2, addend, offset);
        },
        [&](int offset, const auto& values, float (&g)[V]) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                g[k] = to_float(from_float<T>(values.at(2, k) + relu_grad(values.at(0, k), values.at(1, k))));
            }
            store_group<V>(dx, offset, g);
        },
        x, y, mean, invstd, gamma, beta, ChannelTile(cw, group_channels<V>(inner)), C, inner, m, partials);
}

// dy, out: the block's output gradient and output; addend: its main path's input gradient; dx: the block's input
// gradient (may be addend). x, y, mean, invstd, gamma, beta: the BatchNorm's, as bn_grad's; its last block writes
// dbeta and dgamma. Geometry and arrivals as bn_grad.
template <typename T, int R>
BN_REDUCTION_BOUNDS
__global__ void relu_backward_add_bn_grad(const T* dy, const T* out, const T* addend, T* dx, const T* x, const T* y,
                                          const float* mean, const float* invstd, const float* gamma,
                                          const float* beta, int C, int inner, int m, int cw, float* partials,
                                          unsigned int* arrivals, float* dgamma, float* dbeta, int vec)
{
    start_after_prior_grids();
    if (vec) {
        add_grad_tile<Pack<T>::size, T, R>(dy, out, addend, dx, x, y, mean, invstd, gamma, beta, C, inner, m, cw,
                                           partials);
    } else {
        add_grad_tile<1, T, R>(dy, out, addend, dx, x, y, mean, invstd, gamma, beta, C, inner, m, cw, partials);
    }
    if (last_block_to_arrive(arrivals)) finish_grad_sums(partials, C, dgamma, dbeta);
}

// One element of bn_backward_dx: dz (the masked gradient) and x of channel c -> dx. inv_count = 1 / m: a
// multiplication instead of two divisions per element (a float division is a sequence of about ten
// instructions, 16 of them in the loop body of every 8-element bf16 pack); the same bits as the divisions where
// m is a power of 2, as for every CIFAR ResNet activation at a power-of-2 batch.
__device__ __forceinline__ float bn_input_grad(float dz, float x, int c, const float* mean, const float* invstd,
                                               const float* gamma, const float* dgamma, const float* dbeta,
                                               float inv_count)
{
    const float xhat = (x - mean[c]) * invstd[c];
    return (dz - dbeta[c] * inv_count - xhat * (dgamma[c] * inv_count)) * (gamma[c] * invstd[c]);
}

// The elements [first, first + stride, ...) of bn_backward_dx (a grid-stride loop over packs, then the tail).
template <typename T, int R>
__device__ void input_grad_elements(const T* dy, const T* x, const T* y, const float* mean, const float* invstd,
                                    const float* gamma, const float* beta, const float* dgamma, const float* dbeta,
                                    T* dx, int n, int C, int inner, int m, int vec, int first, int stride)
{
    constexpr int P = Pack<T>::size;
    const float inv_count = 1.0f / (float)m;
    const int packs = pack_count<T>(n, vec);
    for (int j = first; j < packs; j += stride) {
        float g[P], v[P], out[P] = {};
        int c[P];
        load_pack(dy, j, g);
        load_pack(x, j, v);
        if constexpr (R == RELU_FROM_OUTPUT) load_pack(y, j, out);
        channels_of<P>(j * P, C, inner, c);
#pragma unroll
        for (int k = 0; k < P; ++k) {
            const int ck = c[k];
            const bool passes = relu_passes<T, R>(out[k], [&] {
                return bn_affine(v[k], mean[ck], invstd[ck], gamma[ck], beta[ck]);
            });
            g[k] = bn_input_grad(passes ? g[k] : 0.0f, v[k], ck, mean, invstd, gamma, dgamma, dbeta, inv_count);
        }
        store_pack(dx, j, g);
    }
    for (int i = packs * P + first; i < n; i += stride) {
        const int c = channel_of(i, C, inner);
        const float xi = to_float(x[i]);
        const bool passes = relu_passes<T, R>(R == RELU_FROM_OUTPUT ? to_float(y[i]) : 0.0f, [&] {
            return bn_affine(xi, mean[c], invstd[c], gamma[c], beta[c]);
        });
        dx[i] = from_float<T>(bn_input_grad(passes ? to_float(dy[i]) : 0.0f, xi, c, mean, invstd, gamma, dgamma,
                                            dbeta, inv_count));
    }
}

// dx = gamma * invstd * (dz - dbeta/m - xhat * dgamma/m). dx may alias dy. vec: 16-byte packs.
template <typename T, int R>
__global__ void bn_backward_dx(const T* dy, const T* x, const T* y, const float* mean, const float* invstd,
                               const float* gamma, const float* beta, const float* dgamma, const float* dbeta, T* dx,
                               int n, int C, int inner, int m, int vec)
{
    start_after_prior_grids();
    input_grad_elements<T, R>(dy, x, y, mean, invstd, gamma, beta, dgamma, dbeta, dx, n, C, inner, m, vec,
                              first_index(), grid_stride());
}

// The backward in one launch (--bn-launches 1): bn_grad's reductions and finalize, a grid-wide wait for it
// (finish_then_release), then bn_backward_dx over the same blocks with the per-channel values staged in
// shared memory. Geometry, sync and the grid cap as bn_stats_apply; dynamic shared memory: at least
// bn_grad's and bn_grad_dx_staged<R> * C floats. dx may alias dy: each element is read and written by one
// thread, after the wait that follows every other read of dy.
template <int R> constexpr int bn_grad_dx_staged = R == RELU_FROM_INPUT ? 6 : 5;   // beta only to recompute

template <typename T, int R>
__global__ void bn_grad_dx(const T* dy, const T* x, const T* y, const float* mean, const float* invstd,
                           const float* gamma, const float* beta, int C, int inner, int m, int cw, float* partials,
                           unsigned int* sync, float* dgamma, float* dbeta, T* dx, int n, int vec_reduce,
                           int vec_apply)
{
    start_after_prior_grids();
    grad_partials<T, R>(dy, x, y, mean, invstd, gamma, beta, C, inner, m, cw, partials, vec_reduce);
    finish_then_release(sync, [&]() { finish_grad_sums(partials, C, dgamma, dbeta); });
    const float* arrays[6] = {mean, invstd, gamma, dgamma, dbeta, beta};
    const float* staged = stage_channels(arrays, bn_grad_dx_staged<R>, C);
    input_grad_elements<T, R>(dy, x, y, staged, staged + C, staged + 2 * C, staged + 5 * C, staged + 3 * C,
                              staged + 4 * C, dx, n, C, inner, m, vec_apply, flat_first_index(), flat_grid_stride());
}
