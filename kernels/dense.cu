/*
 * kernels/dense.cu: the classifier's dense layer y = x @ w + b and its backward, in float32 arithmetic.
 * x, y, dy, dx are activations (float or bfloat16); w, b, dw, db are float32 master parameters and
 * gradients. NumPy twins: NumpyBackend.dense_forward / dense_backward. Loaded by
 * cupynet/backends/kernels.py; syntax-checked on CPU by tests/test_kernels_compile.py.
 *
 * Why not cuBLAS: the matrices are tiny (ResNet: 128 x 64 times 64 x 10), so a GEMM call is pure launch
 * and conversion overhead (a bf16 input needed a float32 copy first), and cuBLAS inside a captured CUDA
 * graph needs its own workspace management. Each output element is summed in float32 straight from the inputs:
 * one launch per product, nothing staged. A sum over 64 or 128 terms (the forward's over Cin, the weight
 * gradient's over the batch) is a warp's: its lanes take every 32nd term and warp_sum adds their partial sums in
 * a fixed order, so no thread waits out a long chain of dependent loads and multiply-adds (the H100's timeline
 * had the one-thread versions at 8.6 and 10.9 us per call); the data gradient's 10-term sums stay one thread's.
 */
#include "common.cuh"

// The warp of this thread across the grid, the warps in the grid and this thread's lane: for a grid-stride loop
// over items that each take a whole warp (blockDim.x a multiple of 32, so that a warp never straddles blocks).
__device__ __forceinline__ int warp_index() { return first_index() >> 5; }
__device__ __forceinline__ int warp_stride() { return grid_stride() >> 5; }
__device__ __forceinline__ int lane_index() { return threadIdx.x & 31; }

// y[n, k] = sum_c x[n, c] * w[c, k] + b[k]. x: (N, Cin); w: (Cin, Cout); b: (Cout,); y: (N, Cout). A warp per y.
template <typename T>
__global__ void dense_forward(const T* x, const float* w, const float* b, T* y, int N, int Cin, int Cout)
{
    start_after_prior_grids();
    for (int i = warp_index(); i < N * Cout; i += warp_stride()) {     // the same i in every lane of a warp
        const int n = i / Cout;
        const int k = i - n * Cout;
        float sum = 0.0f;
        for (int c = lane_index(); c < Cin; c += 32) sum = fmaf(to_float(x[n * Cin + c]), w[c * Cout + k], sum);
        sum = warp_sum(sum);
        if (lane_index() == 0) y[i] = from_float<T>(sum + b[k]);
    }
}

// dx[n, c] = sum_k dy[n, k] * w[c, k]. dy: (N, Cout); dx: (N, Cin).
template <typename T>
__global__ void dense_backward_data(const T* dy, const float* w, T* dx, int N, int Cin, int Cout)
{
    start_after_prior_grids();
    for (int i = first_index(); i < N * Cin; i += grid_stride()) {
        const int n = i / Cin;
        const int c = i - n * Cin;
        float sum = 0.0f;
        for (int k = 0; k < Cout; ++k) sum = fmaf(to_float(dy[n * Cout + k]), w[c * Cout + k], sum);
        dx[i] = from_float<T>(sum);
    }
}

// dw[c, k] = sum_n x[n, c] * dy[n, k] for i < Cin*Cout, then db[k] = sum_n dy[n, k] for the next Cout
// items: one launch for both parameter gradients (written, not accumulated). A warp per item.
template <typename T>
__global__ void dense_backward_params(const T* x, const T* dy, float* dw, float* db, int N, int Cin, int Cout)
{
    start_after_prior_grids();
    const int weights = Cin * Cout;
    for (int i = warp_index(); i < weights + Cout; i += warp_stride()) {   // the same i in every lane of a warp
        float sum = 0.0f;
        if (i < weights) {
            const int c = i / Cout;
            const int k = i - c * Cout;
            for (int n = lane_index(); n < N; n += 32)
                sum = fmaf(to_float(x[n * Cin + c]), to_float(dy[n * Cout + k]), sum);
        } else {
            const int k = i - weights;
            for (int n = lane_index(); n < N; n += 32) sum += to_float(dy[n * Cout + k]);
        }
        sum = warp_sum(sum);
        if (lane_index() == 0) (i < weights ? dw[i] : db[i - weights]) = sum;
    }
}
