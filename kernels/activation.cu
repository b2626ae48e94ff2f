/*
 * kernels/activation.cu: elementwise kernels of the GPU backend: relu forward/backward, the residual
 * sum (with or without a fused relu), and dtype conversion (bfloat16 <-> float32).
 * NumPy twins: NumpyBackend.relu_forward / relu_backward / add / add_relu. Loaded by
 * cupynet/backends/kernels.py; syntax-checked on CPU by tests/test_kernels_compile.py.
 *
 * Every kernel is a grid-stride loop over n elements, computes in float32 and rounds once on store.
 * Outputs may alias inputs (the model writes dx = dx + ds in place), so no __restrict__ here.
 */
#include "common.cuh"

// y = max(x, 0)
template <typename T>
__global__ void relu_forward(const T* x, T* y, int n)
{
    for (int i = first_index(); i < n; i += grid_stride()) y[i] = from_float<T>(relu(to_float(x[i])));
}

// dx = dy where the relu output y is positive, else 0
template <typename T>
__global__ void relu_backward(const T* dy, const T* y, T* dx, int n)
{
    for (int i = first_index(); i < n; i += grid_stride()) {
        dx[i] = to_float(y[i]) > 0.0f ? dy[i] : from_float<T>(0.0f);
    }
}

// y = a + b, or relu(a + b) with relu_out = 1 (the post-activation residual sum)
template <typename T>
__global__ void residual_add(const T* a, const T* b, T* y, int n, int relu_out)
{
    for (int i = first_index(); i < n; i += grid_stride()) {
        const float v = to_float(a[i]) + to_float(b[i]);
        y[i] = from_float<T>(relu_out ? relu(v) : v);
    }
}

// y = x converted to Tout (bfloat16 results of cuDNN's wgrad into float32 gradients; float32 <-> bf16
// copies around the dense layer's float32 matmuls)
template <typename Tin, typename Tout>
__global__ void convert(const Tin* x, Tout* y, int n)
{
    for (int i = first_index(); i < n; i += grid_stride()) y[i] = from_float<Tout>(to_float(x[i]));
}
