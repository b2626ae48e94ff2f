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
 * takes a 16-byte pack of adjacent channels instead: one index decode and one load or store instruction per
 * array for 4 floats or 8 bfloat16. The backend passes vec = 1 only in NHWC, with every array 16-byte aligned
 * and Cin, Cout and the padding below all multiples of a pack (so that no pack straddles a position or the
 * padding's edges: CupyBackend._shortcut_packs_fit). The element-wise index arithmetic (three divisions per
 * element) likely kept these kernels 3-5 times slower than their bytes on an H100 (a ResNet-44 bf16 step:
 * medians of 9.8 us per forward and 14.9 us per backward call at 1-4 MB). Both paths add in the same order:
 * the same bits.
 */
#include "common.cuh"

// x: (N, Cin, H, W) per layout; y: (N, Cout, Ho, Wo), Ho = H / stride, Wo = W / stride, Cout >= Cin.
template <typename T>
__global__ void shortcut_forward(const T* x, T* y, int N, int Cin, int H, int W, int Cout, int Ho, int Wo,
                                 int stride, int channels_last, int vec)
{
    constexpr int P = Pack<T>::size;
    const int lo = (Cout - Cin) / 2;
    const int total = N * Cout * Ho * Wo;
    const float window = (float)(stride * stride);
    if (vec) {
        for (int j = first_index(); j < total / P; j += grid_stride()) {
            int n, c, h, w;
            decode_offset(j * P, Cout, Ho, Wo, 1, n, c, h, w);
            const int ci = c - lo;
            float v[P] = {};
            if (ci >= 0 && ci < Cin) {
                for (int a = 0; a < stride; ++a) {
                    for (int b = 0; b < stride; ++b) {
                        float e[P];
                        load_pack(x, offset_of(n, ci, h * stride + a, w * stride + b, Cin, H, W, 1) / P, e);
#pragma unroll
                        for (int k = 0; k < P; ++k) v[k] += e[k];
                    }
                }
#pragma unroll
                for (int k = 0; k < P; ++k) v[k] /= window;
            }
            store_pack(y, j, v);
        }
        return;
    }
    for (int i = first_index(); i < total; i += grid_stride()) {
        int n, c, h, w;
        decode_offset(i, Cout, Ho, Wo, channels_last, n, c, h, w);
        const int ci = c - lo;
        float v = 0.0f;
        if (ci >= 0 && ci < Cin) {
            float sum = 0.0f;
            for (int a = 0; a < stride; ++a) {
                for (int b = 0; b < stride; ++b) {
                    sum += to_float(x[offset_of(n, ci, h * stride + a, w * stride + b, Cin, H, W, channels_last)]);
                }
            }
            v = sum / window;
        }
        y[i] = from_float<T>(v);
    }
}

// One element of the shortcut's input gradient: g / window, or 0 where masked and the relu output m is not > 0.
__device__ __forceinline__ float shortcut_gradient(float g, float m, int masked, float window)
{
    return (masked && !(m > 0.0f) ? 0.0f : g) / window;
}

// dy, mask: (N, Cout, Ho, Wo); dx: (N, Cin, H, W). dx = [dx +] adjoint(dy [where mask > 0, else 0]):
// mask is read only when masked is 1 (the backend passes dy otherwise, never a null pointer); with
// accumulate 0 dx is written entirely, with 1 the shortcut's gradient is added to it (one rounding).
template <typename T>
__global__ void shortcut_backward(const T* dy, const T* mask, int masked, T* dx, int accumulate, int N, int Cin,
                                  int H, int W, int Cout, int Ho, int Wo, int stride, int channels_last, int vec)
{
    constexpr int P = Pack<T>::size;
    const int lo = (Cout - Cin) / 2;
    const int total = N * Cin * H * W;
    const float window = (float)(stride * stride);
    if (vec) {
        for (int j = first_index(); j < total / P; j += grid_stride()) {
            int n, c, h, w;
            decode_offset(j * P, Cin, H, W, 1, n, c, h, w);
            const int ho = h / stride;
            const int wo = w / stride;
            float v[P] = {};
            if (ho < Ho && wo < Wo) {
                const int o = offset_of(n, c + lo, ho, wo, Cout, Ho, Wo, 1) / P;
                float g[P], m[P];
                load_pack(dy, o, g);
                if (masked) load_pack(mask, o, m);
#pragma unroll
                for (int k = 0; k < P; ++k) v[k] = shortcut_gradient(g[k], masked ? m[k] : 0.0f, masked, window);
            }
            if (accumulate) {
                float d[P];
                load_pack(dx, j, d);
#pragma unroll
                for (int k = 0; k < P; ++k) v[k] = d[k] + v[k];
            }
            store_pack(dx, j, v);
        }
        return;
    }
    for (int i = first_index(); i < total; i += grid_stride()) {
        int n, c, h, w;
        decode_offset(i, Cin, H, W, channels_last, n, c, h, w);
        const int ho = h / stride;
        const int wo = w / stride;
        float v = 0.0f;
        if (ho < Ho && wo < Wo) {
            const int o = offset_of(n, c + lo, ho, wo, Cout, Ho, Wo, channels_last);
            v = shortcut_gradient(to_float(dy[o]), masked ? to_float(mask[o]) : 0.0f, masked, window);
        }
        dx[i] = from_float<T>(accumulate ? to_float(dx[i]) + v : v);
    }
}
