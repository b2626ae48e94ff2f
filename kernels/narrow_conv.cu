/*
 * kernels/narrow_conv.cu: cupynet's own tensor-core kernel for the narrowest 3x3 convolutions (--narrow-conv-kernel):
 * NHWC, 16 channels in and out, stride 1, padding 1 (stage 1 of a CIFAR ResNet), forward and data gradient, in
 * bfloat16 (mma.sync m16n8k16) or float32 on TF32 tensor cores (m16n8k8), float32 accumulation. Why cuDNN is
 * not used there, and the NumPy twin of the weight layout: cupynet/backends/narrow_conv.py. Loaded by
 * cupynet/backends/kernels.py; syntax-checked on CPU by tests/test_kernels_compile.py and run on the emulated
 * GPU, which emulates the two mma.sync shapes (tests/emulated_gpu/cuda_cpu.h).
 *
 * The convolution as a matrix product, one per tap: y[p, o] = sum over taps (r, s) and channels i of
 * x[p + (r - 1) * W + (s - 1), i] * B[r, s][i, o], for each output pixel p whose tap falls inside the image
 * (zero padding), with B[r, s][i, o] = w[o, r, s, i] (KRSC) for a forward and w[i, 2 - r, 2 - s, o] for a data
 * gradient (the convolution of dy with the kernel turned by 180 degrees and its channels swapped).
 *
 * Each warp takes 16 output pixels at a time (a tile: the product's 16 rows) and all 16 output channels (two
 * 8-column halves). The 16 channels of the product's reduction and of its columns are numbered so that lane
 * 4g + t (g = lane / 4, t = lane % 4) loads channels 4t..4t+3 of pixels g and g + 8 (one 8-byte load in
 * bfloat16, 16 bytes in float32: the group's 4 lanes read a pixel's 32 or 64 bytes whole) and receives
 * output channels 4t..4t+3 of the same pixels, stored the same way. The weights, 9 taps x 16 x 16, are loaded
 * once per warp into registers in that numbering: 36 registers in bfloat16, 72 in float32.
 */
#include "common.cuh"

#define NARROW_CONV_CHANNELS 16
#define NARROW_CONV_THREADS 256
#define NARROW_CONV_TILE 16       // output pixels per warp product

// ------------------------------------------------------------------ the two tensor-core instructions

__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2])
{
#if defined(__CUDA_ARCH__)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    cpuemu::mma_bf16_m16n8k16(d, a, b);
#endif
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2])
{
#if defined(__CUDA_ARCH__)
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    cpuemu::mma_tf32_m16n8k8(d, a, b);
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

// ------------------------------------------------------------------ the weights

// B[r, s][i, o] of the module comment: forward w[o, r, s, i], data gradient w[i, 2 - r, 2 - s, o] (KRSC, 16 x 3 x
// 3 x 16 either way).
template <bool DATA_GRADIENT, typename T>
__device__ __forceinline__ T tap_weight(const T* w, int r, int s, int i, int o)
{
    const int C = NARROW_CONV_CHANNELS;
    return DATA_GRADIENT ? w[((i * 3 + 2 - r) * 3 + 2 - s) * C + o] : w[((o * 3 + r) * 3 + s) * C + i];
}

// The output channel of column g of half j of the product: lane 4t + e's columns 2t + e... of half j are channel
// 4t + 2j + e, so that a lane's four results (two per half) are channels 4t..4t+3. Column g = 2t + e.
__device__ __forceinline__ int output_channel(int g, int j) { return 4 * (g >> 1) + 2 * j + (g & 1); }

__device__ __forceinline__ unsigned int bf16_pair(__nv_bfloat16 low, __nv_bfloat16 high)
{
    return (unsigned int)__bfloat16_as_ushort(low) | ((unsigned int)__bfloat16_as_ushort(high) << 16);
}

// Per activation type: a lane's part of one pixel (channels 4t..4t+3), the weight fragments of one tap and half,
// and the products.
template <typename T> struct NarrowMma;

// bfloat16, m16n8k16: reduction index k of A (row-major) and B is channel 4t + (k % 2) + 2 (k >= 8) for the lanes
// with k / 2 % 4 = t: a lane's registers hold k = 2t, 2t + 1 (register 0 of A, 0 of B) and 2t + 8, 2t + 9
// (register 2 of A, 1 of B), that is channels 4t, 4t + 1 and 4t + 2, 4t + 3: one 8-byte load per pixel.
template <> struct NarrowMma<__nv_bfloat16> {
    typedef uint2 Pixel;
    struct Weights { unsigned int b[2]; };

    static __device__ __forceinline__ Pixel load(const __nv_bfloat16* x, int pixel, int t)
    {
        return reinterpret_cast<const uint2*>(x)[pixel * 4 + t];
    }
    static __device__ __forceinline__ Pixel zero() { return make_uint2(0u, 0u); }

    template <bool DATA_GRADIENT>
    static __device__ __forceinline__ Weights weights(const __nv_bfloat16* w, int r, int s, int j, int g, int t)
    {
        const int o = output_channel(g, j);
        Weights f;
        f.b[0] = bf16_pair(tap_weight<DATA_GRADIENT>(w, r, s, 4 * t, o), tap_weight<DATA_GRADIENT>(w, r, s, 4 * t + 1, o));
        f.b[1] = bf16_pair(tap_weight<DATA_GRADIENT>(w, r, s, 4 * t + 2, o), tap_weight<DATA_GRADIENT>(w, r, s, 4 * t + 3, o));
        return f;
    }

    // d += A B for rows g (pixel `top`) and g + 8 (pixel `bottom`)
    static __device__ __forceinline__ void product(float (&d)[4], const Pixel& top, const Pixel& bottom, const Weights& f)
    {
        const unsigned int a[4] = {top.x, bottom.x, top.y, bottom.y};
        mma_bf16(d, a, f.b);
    }

    static __device__ __forceinline__ void store(__nv_bfloat16* y, int pixel, int t, float c0, float c1, float c2, float c3)
    {
        reinterpret_cast<uint2*>(y)[pixel * 4 + t] =
            make_uint2(bf16_pair(__float2bfloat16_rn(c0), __float2bfloat16_rn(c1)),
                       bf16_pair(__float2bfloat16_rn(c2), __float2bfloat16_rn(c3)));
    }
};

// float32 on TF32, m16n8k8, two products of 8 channels: in product q the reduction index k is channel
// 4t + 2q + (k >= 4) for the lanes with k % 4 = t: a lane's registers hold k = t (register 0 of A, 0 of B) and
// t + 4 (register 2 of A, 1 of B), channels 4t + 2q and 4t + 2q + 1: one 16-byte load per pixel for both.
template <> struct NarrowMma<float> {
    typedef float4 Pixel;
    struct Weights { unsigned int b[2][2]; };

    static __device__ __forceinline__ Pixel load(const float* x, int pixel, int t)
    {
        return reinterpret_cast<const float4*>(x)[pixel * 4 + t];
    }
    static __device__ __forceinline__ Pixel zero() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }

    template <bool DATA_GRADIENT>
    static __device__ __forceinline__ Weights weights(const float* w, int r, int s, int j, int g, int t)
    {
        const int o = output_channel(g, j);
        Weights f;
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            f.b[q][0] = to_tf32(tap_weight<DATA_GRADIENT>(w, r, s, 4 * t + 2 * q, o));
            f.b[q][1] = to_tf32(tap_weight<DATA_GRADIENT>(w, r, s, 4 * t + 2 * q + 1, o));
        }
        return f;
    }

    static __device__ __forceinline__ void product(float (&d)[4], const Pixel& top, const Pixel& bottom, const Weights& f)
    {
        const unsigned int low[4] = {to_tf32(top.x), to_tf32(bottom.x), to_tf32(top.y), to_tf32(bottom.y)};
        mma_tf32(d, low, f.b[0]);
        const unsigned int high[4] = {to_tf32(top.z), to_tf32(bottom.z), to_tf32(top.w), to_tf32(bottom.w)};
        mma_tf32(d, high, f.b[1]);
    }

    static __device__ __forceinline__ void store(float* y, int pixel, int t, float c0, float c1, float c2, float c3)
    {
        reinterpret_cast<float4*>(y)[pixel * 4 + t] = make_float4(c0, c1, c2, c3);
    }
};

// ------------------------------------------------------------------ the kernel

// y (N, H, W, 16) = the 3x3 stride-1 padding-1 convolution of x (N, H, W, 16) with w (16, 3, 3, 16) KRSC, or with
// DATA_GRADIENT, dx = its data gradient from dy (x = dy, y = dx). Every element of y is written. A grid of warps
// takes the 16-pixel tiles in turn; every lane of a warp stays in the loop to its end (mma.sync needs the whole
// warp), the last tile's pixels past the end loading zeros and storing nothing. Each output is one warp's
// products in a fixed order: the same bits on every run.
template <typename T, bool DATA_GRADIENT>
__global__ void narrow_conv3x3(const T* x, const T* w, T* y, int N, int H, int W)
{
    start_after_prior_grids();
    typedef NarrowMma<T> M;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    // the weights through shared memory: the block reads them once, coalesced, then each warp its fragments.
    // Dynamic shared memory, 9 x 16 x 16 values (the launch asks for their bytes)
    extern __shared__ uint4 staged_weights[];
    T* staged = reinterpret_cast<T*>(staged_weights);
    for (int i = threadIdx.x; i < 9 * NARROW_CONV_CHANNELS * NARROW_CONV_CHANNELS; i += blockDim.x) staged[i] = w[i];
    __syncthreads();
    typename M::Weights f[9][2];
#pragma unroll
    for (int tap = 0; tap < 9; ++tap) {
#pragma unroll
        for (int j = 0; j < 2; ++j) f[tap][j] = M::template weights<DATA_GRADIENT>(staged, tap / 3, tap % 3, j, g, t);
    }
    const int pixels = N * H * W;
    const int tiles = (pixels + NARROW_CONV_TILE - 1) / NARROW_CONV_TILE;
    const int warps = blockDim.x >> 5;
    for (int tile = blockIdx.x * warps + (threadIdx.x >> 5); tile < tiles; tile += gridDim.x * warps) {
        int pixel[2], row[2], column[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            pixel[half] = tile * NARROW_CONV_TILE + g + 8 * half;
            const int in_image = pixel[half] % (H * W);
            row[half] = pixel[half] < pixels ? in_image / W : -H;      // past the end: every tap outside
            column[half] = in_image % W;
        }
        float d[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (int tap = 0; tap < 9; ++tap) {
            const int dr = tap / 3 - 1, ds = tap % 3 - 1;
            typename M::Pixel a[2];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = row[half] + dr, c = column[half] + ds;
                a[half] = (r >= 0 && r < H && c >= 0 && c < W) ? M::load(x, pixel[half] + dr * W + ds, t) : M::zero();
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) M::product(d[j], a[0], a[1], f[tap][j]);
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            if (pixel[half] < pixels) {
                M::store(y, pixel[half], t, d[0][2 * half], d[0][2 * half + 1], d[1][2 * half], d[1][2 * half + 1]);
            }
        }
    }
}
