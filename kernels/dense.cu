/*
 * kernels/dense.cu: the classifier's dense layer y = x @ w + b and its backward, in float32 arithmetic.
 * x, y, dy, dx are activations (float or bfloat16); w, b, dw, db are float32 master parameters and
 * gradients. NumPy twins: NumpyBackend.dense_forward / dense_backward. Loaded by
 * cupynet/backends/kernels.py; syntax-checked on CPU by tests/test_kernels_compile.py.
 *
 * Why not cuBLAS: the matrices are tiny (ResNet: 128 x 64 times 64 x 10), so a GEMM call is pure launch
 * and conversion overhead (a bf16 input needed a float32 copy first), and cuBLAS inside a captured CUDA
 * graph needs its own workspace management. One thread per output element, summing in float32, reads
 * everything it needs straight from the inputs: one launch per product, nothing staged.
 */
#include "common.cuh"

// y[n, k] = sum_c x[n, c] * w[c, k] + b[k]. x: (N, Cin); w: (Cin, Cout); b: (Cout,); y: (N, Cout).
template <typename T>
__global__ void dense_forward(const T* x, const float* w, const float* b, T* y, int N, int Cin, int Cout)
{
    for (int i = first_index(); i < N * Cout; i += grid_stride()) {
        const int n = i / Cout;
        const int k = i - n * Cout;
        float sum = 0.0f;
        for (int c = 0; c < Cin; ++c) sum = fmaf(to_float(x[n * Cin + c]), w[c * Cout + k], sum);
        y[i] = from_float<T>(sum + b[k]);
    }
}

// dx[n, c] = sum_k dy[n, k] * w[c, k]. dy: (N, Cout); dx: (N, Cin).
template <typename T>
__global__ void dense_backward_data(const T* dy, const float* w, T* dx, int N, int Cin, int Cout)
{
    for (int i = first_index(); i < N * Cin; i += grid_stride()) {
        const int n = i / Cin;
        const int c = i - n * Cin;
        float sum = 0.0f;
        for (int k = 0; k < Cout; ++k) sum = fmaf(to_float(dy[n * Cout + k]), w[c * Cout + k], sum);
        dx[i] = from_float<T>(sum);
    }
}

// dw[c, k] = sum_n x[n, c] * dy[n, k] for i < Cin*Cout, then db[k] = sum_n dy[n, k] for the next Cout
// items: one launch for both parameter gradients (written, not accumulated).
template <typename T>
__global__ void dense_backward_params(const T* x, const T* dy, float* dw, float* db, int N, int Cin, int Cout)
{
    const int weights = Cin * Cout;
    for (int i = first_index(); i < weights + Cout; i += grid_stride()) {
        float sum = 0.0f;
        if (i < weights) {
            const int c = i / Cout;
            const int k = i - c * Cout;
            for (int n = 0; n < N; ++n) sum = fmaf(to_float(x[n * Cin + c]), to_float(dy[n * Cout + k]), sum);
            dw[i] = sum;
        } else {
            const int k = i - weights;
            for (int n = 0; n < N; ++n) sum += to_float(dy[n * Cout + k]);
            db[k] = sum;
        }
    }
}
