/*
 * kernels/shortcut.cu: the option-A (parameter-free) residual shortcut of the CIFAR ResNets.
 * Forward: average pool with kernel = stride (VALID, trailing rows/columns that do not fill a window
 * are dropped), then zero-pad the channels symmetrically, lo = (Cout - Cin) / 2 below.
 * Backward: its adjoint; each pooled gradient is spread evenly over its window, the padded channels
 * get nothing, dropped rows/columns get 0. Optionally the gradient first goes through a relu whose output
 * was `mask` (a post-activation block's final relu, which the shortcut path shares with the main path),
 * and is added to dx (the main path's gradient): a downsampling block's input gradient in one pass,
 * without writing the masked gradient or the shortcut's own gradient out first.
 * NumPy twin: NumpyBackend.shortcut_forward / shortcut_backward. Loaded by cupynet/backends/kernels.py.
 *
 * One thread per output element (a gather: no atomics); one kernel for both layouts. With vec = 1 a thread
 * takes a 16-byte pack of adjacent channels instead (the same body, a template on the group's width): one
 * index decode and one load or store instruction per array for 4 floats or 8 bfloat16. The backend passes
 * vec = 1 only in NHWC, with every array 16-byte aligned and Cin, Cout and the padding below all multiples
 * of a pack (so that no pack straddles a position or the padding's edges: CupyBackend._shortcut_packs_fit).
 * The element-wise index arithmetic (three divisions per element) likely kept these kernels 3-5 times slower
 * than their bytes on an H100 (a ResNet-44 bf16 step: medians of 9.8 us per forward and 14.9 us per backward
 * call at 1-4 MB). Both widths add in the same order: the same bits.
 */
#include "common.cuh"

// The forward over groups of V adjacent elements: V = 1, or in NHWC a pack of V channels of one position.
template <int V, typename T>
__device__ void forward_groups(const T* x, T* y, int Cin, int H, int W, int Cout, int Ho, int Wo, int stride,
                               int channels_last, int total)
{
    const int lo = (Cout - Cin) / 2;
    const float window = (float)(stride * stride);
    for (int j = first_index(); j < total / V; j += grid_stride()) {
        int n, c, h, w;
        decode_offset(j * V, Cout, Ho, Wo, channels_last, n, c, h, w);
        const int ci = c - lo;
        float v[V] = {};
        if (ci >= 0 && ci < Cin) {
            for (int a = 0; a < stride; ++a) {
                for (int b = 0; b < stride; ++b) {
                    float e[V];
                    load_group<V>(x, offset_of(n, ci, h * stride + a, w * stride + b, Cin, H, W, channels_last), e);
#pragma unroll
                    for (int k = 0; k < V; ++k) v[k] += e[k];
                }
            }
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] /= window;
        }
        store_group<V>(y, j * V, v);
    }
}

// x: (N, Cin, H, W) per layout; y: (N, Cout, Ho, Wo), Ho = H / stride, Wo = W / stride, Cout >= Cin.
template <typename T>
__global__ void shortcut_forward(const T* x, T* y, int N, int Cin, int H, int W, int Cout, int Ho, int Wo,
                                 int stride, int channels_last, int vec)
{
    start_after_prior_grids();
    const int total = N * Cout * Ho * Wo;
    if (vec) {
        forward_groups<Pack<T>::size>(x, y, Cin, H, W, Cout, Ho, Wo, stride, 1, total);
    } else {
        forward_groups<1>(x, y, Cin, H, W, Cout, Ho, Wo, stride, channels_last, total);
    }
}

// One element of the shortcut's input gradient: g / window, or 0 where masked and the relu output m is not > 0.
__device__ __forceinline__ float shortcut_gradient(float g, float m, int masked, float window)
{
    return (masked && !(m > 0.0f) ? 0.0f : g) / window;
}

// The backward over groups of V adjacent elements, as forward_groups.
template <int V, typename T>
__device__ void backward_groups(const T* dy, const T* mask, int masked, T* dx, int accumulate, int Cin, int H, int W,
                                int Cout, int Ho, int Wo, int stride, int channels_last, int total)
{
    const int lo = (Cout - Cin) / 2;
    const float window = (float)(stride * stride);
    for (int j = first_index(); j < total / V; j += grid_stride()) {
        int n, c, h, w;
        decode_offset(j * V, Cin, H, W, channels_last, n, c, h, w);
        const int ho = h / stride;
        const int wo = w / stride;
        float v[V] = {};
        if (ho < Ho && wo < Wo) {
            const int o = offset_of(n, c + lo, ho, wo, Cout, Ho, Wo, channels_last);
            float g[V], m[V] = {};
            load_group<V>(dy, o, g);
            if (masked) load_group<V>(mask, o, m);
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] = shortcut_gradient(g[k], m[k], masked, window);
        }
        if (accumulate) {
            float d[V];
            load_group<V>(dx, j * V, d);
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] = d[k] + v[k];
        }
        store_group<V>(dx, j * V, v);
    }
}

// dy, mask: (N, Cout, Ho, Wo); dx: (N, Cin, H, W). dx = [dx +] adjoint(dy [where mask > 0, else 0]):
// mask is read only when masked is 1 (the backend passes dy otherwise, never a null pointer); with
// accumulate 0 dx is written entirely, with 1 the shortcut's gradient is added to it (one rounding).
template <typename T>
__global__ void shortcut_backward(const T* dy, const T* mask, int masked, T* dx, int accumulate, int N, int Cin,
                                  int H, int W, int Cout, int Ho, int Wo, int stride, int channels_last, int vec)
{
    start_after_prior_grids();
    const int total = N * Cin * H * W;
    if (vec) {
        backward_groups<Pack<T>::size>(dy, mask, masked, dx, accumulate, Cin, H, W, Cout, Ho, Wo, stride, 1, total);
    } else {
        backward_groups<1>(dy, mask, masked, dx, accumulate, Cin, H, W, Cout, Ho, Wo, stride, channels_last, total);
    }
}
