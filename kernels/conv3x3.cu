/*
 * kernels/conv3x3.cu: cupynet's own tensor-core kernel for a CIFAR ResNet's 3x3 convolutions (--own-conv-channels):
 * NHWC, padding 1, 16, 32 or 64 channels, stride 1 (forward and data gradient) or 2 (forward, from 16 to 32 and
 * from 32 to 64 channels), in bfloat16 (mma.sync m16n8k16) or float32 on TF32 tensor cores (m16n8k8), float32
 * accumulation. Why, and which convolutions it takes: cupynet/backends/conv3x3.py. Loaded by
 * cupynet/backends/kernels.py; compiled for sm_90 on the CPU by tests/test_kernels_compile.py and run on the
 * emulated GPU, which emulates the two mma.sync shapes (tests/emulated_gpu/cuda_cpu.h).
 *
 * The convolution as a matrix product, one per tap: y[p, o] = sum over taps (r, s) and channels i of
 * x[pixel p reads through tap (r, s), i] * B[r, s][i, o], over the taps that fall inside the image (zero
 * padding), with B[r, s][i, o] = w[o, r, s, i] (KRSC) for a forward and w[i, 2 - r, 2 - s, o] for a data gradient
 * (the convolution of dy with the kernel turned by 180 degrees, its channels swapped).
 *
 * Each warp takes 16 output pixels at a time (a tile: the product's rows) and the 16 output channels of its
 * block's group (blockIdx.y; two 8-column halves). The channels of the product's reduction and of its columns
 * are numbered so that lane 4g + t (g = lane / 4, t = lane % 4) loads channels [t CI/4, (t + 1) CI/4) of pixels g
 * and g + 8 with 8- or 16-byte loads (the group's 4 lanes read a pixel whole) and receives output channels
 * 4t..4t+3 of its group for the same pixels, stored in one instruction. The weights' fragments, in that
 * numbering, are built once per block into shared memory in the order the lanes read them (one 8-byte load per
 * lane and product, no bank conflicts).
 */
#include "common.cuh"

#define CONV3X3_THREADS 256
#define CONV3X3_TILE 16           // output pixels per warp product
#define CONV3X3_GROUP 16          // output channels per block (blockIdx.y picks which)

// ------------------------------------------------------------------ the two tensor-core instructions

// d += a b: PTX's mma.sync (one warp; fragment layouts in tests/emulated_gpu/cuda_cpu.h, which emulates them)
#if defined(__CUDA_ARCH__)
#define CONV3X3_MMA(shape_and_types, d, a, b)                                                                   \
    asm("mma.sync.aligned." shape_and_types " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"            \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                       \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
#endif

// T = bf16: m16n8k16 on bf16; T = float: m16n8k8 on TF32 (a and b hold to_tf32's words)
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2])
{
    constexpr bool BF16 = sizeof(T) == 2;
#if defined(__CUDA_ARCH__)
    if constexpr (BF16) {
        CONV3X3_MMA("m16n8k16.row.col.f32.bf16.bf16.f32", d, a, b);
    } else {
        CONV3X3_MMA("m16n8k8.row.col.f32.tf32.tf32.f32", d, a, b);
    }
#else
    if constexpr (BF16) {
        cpuemu::mma_bf16_m16n8k16(d, a, b);
    } else {
        cpuemu::mma_tf32_m16n8k8(d, a, b);
    }
#endif
}

// float32 -> TF32, rounded to nearest (ties away from zero), as cuDNN's TF32 engines round their inputs.
__device__ __forceinline__ unsigned int to_tf32(float v)
{
#if defined(__CUDA_ARCH__)
    unsigned int r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
#else
    return cpuemu::tf32_round(v);
#endif
}

__device__ __forceinline__ unsigned int bf16_pair(__nv_bfloat16 low, __nv_bfloat16 high)
{
    return (unsigned int)__bfloat16_as_ushort(low) | ((unsigned int)__bfloat16_as_ushort(high) << 16);
}

// ------------------------------------------------------------------ the weights

// B[r, s][i, o] of the module comment, from w (KRSC): CI channels in, CO out.
template <bool DATA_GRADIENT, int CI, int CO, typename T>
__device__ __forceinline__ T tap_weight(const T* w, int r, int s, int i, int o)
{
    return DATA_GRADIENT ? w[((i * 3 + 2 - r) * 3 + 2 - s) * CO + o] : w[((o * 3 + r) * 3 + s) * CI + i];
}

// The output channel (within the group) of column g of half j of the product: lane 4t + e's columns 2t + e of
// half j are channel 4t + 2j + e, so that a lane's four results (two per half) are channels 4t..4t+3.
__device__ __forceinline__ int output_channel(int g, int j) { return 4 * (g >> 1) + 2 * j + (g & 1); }

// One lane's B fragment of one product: two 32-bit registers, in either type (one 8-byte shared-memory load).
struct alignas(8) Fragment { unsigned int b[2]; };

// A lane's part of a pixel, as WORDS 32-bit words (2 to 16: 8 to 64 bytes), loaded 8 or 16 bytes at a time from
// `at` (aligned to that: the backend checks the arrays' start, and a part starts at a multiple of its size).
template <int WORDS> struct PixelPart {
    unsigned int word[WORDS];

    static __device__ __forceinline__ PixelPart load(const void* at)
    {
        PixelPart p;
        if constexpr (WORDS == 2) {
            const uint2 v = *reinterpret_cast<const uint2*>(at);
            p.word[0] = v.x;
            p.word[1] = v.y;
        } else {
            static_assert(WORDS % 4 == 0, "16-byte loads");
#pragma unroll
            for (int k = 0; k < WORDS / 4; ++k) {
                const uint4 v = reinterpret_cast<const uint4*>(at)[k];
                p.word[4 * k] = v.x;
                p.word[4 * k + 1] = v.y;
                p.word[4 * k + 2] = v.z;
                p.word[4 * k + 3] = v.w;
            }
        }
        return p;
    }
    static __device__ __forceinline__ PixelPart zero()
    {
        PixelPart p;
#pragma unroll
        for (int k = 0; k < WORDS; ++k) p.word[k] = 0u;
        return p;
    }
};

// The lane's channels, in either type: word k of its part of a pixel holds channels t CI/4 + k E .. + E - 1 (E = 2
// bf16 or 1 float32 per 32-bit word), and product q multiplies words 2q and 2q + 1 by the fragment built from the
// same channels' weights. In bf16 (m16n8k16) the product's reduction index k is then channel
// t CI/4 + 4q + (k % 2) + 2 (k >= 8) for the lanes with k / 2 % 4 = t: a lane's registers hold k = 2t, 2t + 1
// (register 0 of A, 0 of B) and 2t + 8, 2t + 9 (register 2 of A, 1 of B); in float32 (m16n8k8 on TF32) it is
// channel t CI/4 + 2q + (k >= 4) for the lanes with k % 4 = t: k = t (register 0 of A, 0 of B) and t + 4
// (register 2 of A, 1 of B). So CI sizeof(T) / 32 products a tap.

// An A or B register from the word of a pixel or of weights: as it is in bf16, a float32 rounded to TF32.
__device__ __forceinline__ unsigned int operand_word(unsigned int word, __nv_bfloat16) { return word; }
__device__ __forceinline__ unsigned int operand_word(unsigned int word, float) { return to_tf32(__uint_as_float(word)); }

// A word of weights: channels `first` .. + E - 1 at output channel o.
template <bool DATA_GRADIENT, int CI, int CO>
__device__ __forceinline__ unsigned int weight_word(const __nv_bfloat16* w, int r, int s, int first, int o)
{
    return bf16_pair(tap_weight<DATA_GRADIENT, CI, CO>(w, r, s, first, o),
                     tap_weight<DATA_GRADIENT, CI, CO>(w, r, s, first + 1, o));
}
template <bool DATA_GRADIENT, int CI, int CO>
__device__ __forceinline__ unsigned int weight_word(const float* w, int r, int s, int first, int o)
{
    return __float_as_uint(tap_weight<DATA_GRADIENT, CI, CO>(w, r, s, first, o));
}

// Lane t's fragment of product q at tap (r, s), output channel o.
template <bool DATA_GRADIENT, int CI, int CO, typename T>
__device__ __forceinline__ Fragment fragment(const T* w, int r, int s, int q, int o, int t)
{
    constexpr int E = 4 / (int)sizeof(T);
    Fragment f;
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        f.b[m] = operand_word(weight_word<DATA_GRADIENT, CI, CO>(w, r, s, t * (CI / 4) + (2 * q + m) * E, o), T());
    }
    return f;
}

// A lane's four results, output channels 4t..4t+3, in one store (8 or 16 bytes).
__device__ __forceinline__ void store4(__nv_bfloat16* y, float c0, float c1, float c2, float c3)
{
    *reinterpret_cast<uint2*>(y) = make_uint2(bf16_pair(__float2bfloat16_rn(c0), __float2bfloat16_rn(c1)),
                                              bf16_pair(__float2bfloat16_rn(c2), __float2bfloat16_rn(c3)));
}
__device__ __forceinline__ void store4(float* y, float c0, float c1, float c2, float c3)
{
    *reinterpret_cast<float4*>(y) = make_float4(c0, c1, c2, c3);
}

// A result as store4 stores it, back in float32: what a BatchNorm reading y would add up.
__device__ __forceinline__ float as_stored(float v, __nv_bfloat16) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float as_stored(float v, float) { return v; }

// ------------------------------------------------------------------ the sums for the next BatchNorm

// With STATS, the block's sum and sum of squares of each of its group's 16 output channels, from each lane's
// (lanes 4g + t: channels 4t..4t+3 of the group) in a fixed order: the warp's lanes of one t with shuffles, then
// the block's warps in order (through `scratch`, 32 floats a warp), into partials[block][channel][sum, square],
// block = blockIdx.y gridDim.x + blockIdx.x. The grid's last block to arrive then writes sums[0][o] and sums[1][o]
// for every output channel o from the block partials of its group: its threads split each value's partials into
// `slices` (blockDim.x / 2 CO of them: 8 at 16 channels, 2 at 64), each adding every slices-th block in order, and
// one thread per value adds the slices in order (so that one warp's chain of L2 round trips over several hundred
// blocks does not end the kernel): the same bits on every run.
__device__ void sum_channels(float (&sum)[4], float (&square)[4], float* scratch, float* partials,
                             unsigned int* arrivals, float* sums, int CO)
{
    for (int offset = 16; offset >= 4; offset >>= 1) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            sum[c] += __shfl_down_sync(0xffffffffu, sum[c], offset);
            square[c] += __shfl_down_sync(0xffffffffu, square[c], offset);
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane < 4) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            scratch[warp * 32 + (4 * lane + c) * 2] = sum[c];
            scratch[warp * 32 + (4 * lane + c) * 2 + 1] = square[c];
        }
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        float total = 0.0f;
        for (int k = 0; k < warps; ++k) total += scratch[k * 32 + threadIdx.x];
        partials[(blockIdx.y * gridDim.x + blockIdx.x) * 32 + threadIdx.x] = total;
    }
    if (last_block_to_arrive(arrivals)) {
        const int values = 2 * CO, slices = max(1, (int)blockDim.x / values), blocks = gridDim.x;
        for (int e = threadIdx.x; e < values * slices; e += blockDim.x) {     // scratch: blockDim.x floats
            const int value = e % values, slice = e / values, stat = value / CO, o = value - stat * CO;
            const float* group = partials + (o / CONV3X3_GROUP) * blocks * 32 + (o % CONV3X3_GROUP) * 2 + stat;
            float total = 0.0f;
#pragma unroll 4
            for (int b = slice; b < blocks; b += slices) total += __ldcg(group + b * 32);
            scratch[e] = total;
        }
        __syncthreads();
        for (int value = threadIdx.x; value < values; value += blockDim.x) {
            float total = 0.0f;
            for (int slice = 0; slice < slices; ++slice) total += scratch[slice * values + value];
            sums[value] = total;
        }
    }
}

// ------------------------------------------------------------------ the kernel

// y (N, Ho, Wo, CO) = the 3x3 padding-1 convolution of x (N, H, W, CI) at STRIDE with w (CO, 3, 3, CI) KRSC; with
// DATA_GRADIENT (stride 1), dx (N, H, W, CO) from dy (N, H, W, CI) and w (CI, 3, 3, CO). H and W are x's. Grid:
// (any, CO / 16), CONV3X3_THREADS threads, dynamic shared memory for 9 x PRODUCTS x 2 x 32 fragments and, with
// STATS, a float per channel and statistic of each warp. Every element of y is written. With STATS (a forward
// that feeds a BatchNorm, --conv-genstats) sums (2, CO) float32 <- [sum of y, sum of y^2] per channel, of the
// values as stored (sum_channels; partials: gridDim.x gridDim.y x 32 floats; arrivals: the backend's counter, 0
// between launches); without, those three are not touched. The warps of the grid take the 16-pixel tiles in
// turn; every lane of a warp stays in the loop to its end (mma.sync needs the whole warp), a tile's pixels past
// the end loading zeros and storing nothing. Each output is one warp's products in a fixed order: the same bits on every run.
template <typename T, int CI, int CO, int STRIDE, bool DATA_GRADIENT, bool STATS>
__global__ void conv3x3_mma(const T* x, const T* w, T* y, int N, int H, int W, float* partials, unsigned int* arrivals,
                            float* sums)
{
    start_after_prior_grids();
    static_assert(!DATA_GRADIENT || STRIDE == 1, "a data gradient at stride 1 only");
    static_assert(!(DATA_GRADIENT && STATS), "sums of a forward's output only");
    static_assert(CO % CONV3X3_GROUP == 0, "output channels in groups of 16");
    constexpr int PRODUCTS = CI * (int)sizeof(T) / 32;       // per tap (see operand_word)
    typedef PixelPart<CI * (int)sizeof(T) / 16> Pixel;      // CI / 4 channels
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int group = blockIdx.y * CONV3X3_GROUP;

    // fragment (tap, q, j) of lane l at [((tap * PRODUCTS + q) * 2 + j) * 32 + l]: built by the block's threads
    // together, read back by each lane as one 8-byte load
    extern __shared__ uint4 conv3x3_shared[];
    Fragment* fragments = reinterpret_cast<Fragment*>(conv3x3_shared);
    for (int e = threadIdx.x; e < 9 * PRODUCTS * 2 * 32; e += blockDim.x) {
        const int l = e & 31, j = (e >> 5) & 1, q = (e >> 6) % PRODUCTS, tap = (e >> 6) / PRODUCTS;
        fragments[e] = fragment<DATA_GRADIENT, CI, CO>(w, tap / 3, tap % 3, q, group + output_channel(l >> 2, j), l & 3);
    }
    __syncthreads();

    const int Ho = (H - 1) / STRIDE + 1, Wo = (W - 1) / STRIDE + 1;
    const int pixels = N * Ho * Wo;
    const int tiles = (pixels + CONV3X3_TILE - 1) / CONV3X3_TILE;
    const int warps = blockDim.x >> 5;
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f}, square[4] = {0.0f, 0.0f, 0.0f, 0.0f};   // with STATS: channels 4t..4t+3
    for (int tile = blockIdx.x * warps + (threadIdx.x >> 5); tile < tiles; tile += gridDim.x * warps) {
        int pixel[2], row[2], column[2], corner[2];    // output pixel; its window's centre in x, and its offset
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            pixel[half] = tile * CONV3X3_TILE + g + 8 * half;
            const int n = pixel[half] / (Ho * Wo), in_image = pixel[half] - n * (Ho * Wo);
            const int ho = in_image / Wo, wo = in_image - ho * Wo;
            row[half] = pixel[half] < pixels ? ho * STRIDE : -2;        // past the end: every tap above the image
            column[half] = wo * STRIDE;
            corner[half] = (n * H + ho * STRIDE) * W + wo * STRIDE;
        }
        float d[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (int tap = 0; tap < 9; ++tap) {
            const int dr = tap / 3 - 1, ds = tap % 3 - 1;
            Pixel a[2];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = row[half] + dr, c = column[half] + ds;
                a[half] = (r >= 0 && r < H && c >= 0 && c < W)
                              ? Pixel::load(x + (corner[half] + dr * W + ds) * CI + t * (CI / 4)) : Pixel::zero();
            }
#pragma unroll
            for (int q = 0; q < PRODUCTS; ++q) {
                // rows g (pixel a[0]) and g + 8 (a[1]) of A
                const unsigned int operand[4] = {operand_word(a[0].word[2 * q], T()), operand_word(a[1].word[2 * q], T()),
                                                 operand_word(a[0].word[2 * q + 1], T()),
                                                 operand_word(a[1].word[2 * q + 1], T())};
#pragma unroll
                for (int j = 0; j < 2; ++j) mma<T>(d[j], operand, fragments[((tap * PRODUCTS + q) * 2 + j) * 32 + lane].b);
            }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            if (pixel[half] < pixels) {
                const float v[4] = {d[0][2 * half], d[0][2 * half + 1], d[1][2 * half], d[1][2 * half + 1]};
                store4(y + pixel[half] * CO + group + 4 * t, v[0], v[1], v[2], v[3]);
                if constexpr (STATS) {
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        const float stored = as_stored(v[c], T());
                        sum[c] += stored;
                        square[c] += stored * stored;
                    }
                }
            }
        }
    }
    if constexpr (STATS) {
        sum_channels(sum, square, reinterpret_cast<float*>(fragments + 9 * PRODUCTS * 2 * 32), partials, arrivals,
                     sums, CO);
    }
}
