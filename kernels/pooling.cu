/*
 * kernels/pooling.cu: global average pooling of the network's head, forward and backward, both layouts
 * (the dense layer after it is kernels/dense.cu).
 * NumPy twins: NumpyBackend.global_avgpool_forward / _backward.
 * Loaded by cupynet/backends/kernels.py; syntax-checked on CPU by tests/test_kernels_compile.py.
 */
#include "common.cuh"

// x: (N, C, H, W) per layout -> y: (N, C); one thread per (n, c), float32 sum over the HW pixels.
// In NHWC adjacent threads read adjacent channels (coalesced); in NCHW each walks its own plane.
template <typename T>
__global__ void global_avgpool_forward(const T* x, T* y, int N, int C, int HW, int channels_last)
{
    start_after_prior_grids();
    for (int i = first_index(); i < N * C; i += grid_stride()) {
        const int n = i / C;
        const int c = i - n * C;
        float sum = 0.0f;
        for (int j = 0; j < HW; ++j) {
            sum += to_float(x[channels_last ? (n * HW + j) * C + c : (n * C + c) * HW + j]);
        }
        y[i] = from_float<T>(sum / (float)HW);
    }
}

// dy: (N, C) -> dx: (N, C, H, W) per layout, dx = dy / (H*W) broadcast over the pixels.
template <typename T>
__global__ void global_avgpool_backward(const T* dy, T* dx, int N, int C, int HW, int channels_last)
{
    start_after_prior_grids();
    const int total = N * C * HW;
    for (int i = first_index(); i < total; i += grid_stride()) {
        const int c = channels_last ? i % C : (i / HW) % C;
        const int n = i / (C * HW);
        dx[i] = from_float<T>(to_float(dy[n * C + c]) / (float)HW);
    }
}
