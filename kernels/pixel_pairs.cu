/*
 * kernels/pixel_pairs.cu: narrow 3x3 convolutions rewritten on pixel pairs: the paired kernel
 * (--conv-pixel-pairs) and the paired weight gradient folded back (--wgrad-pixel-pairs). The rewrite and why:
 * cupynet/backends/pixel_pairs.py, where the NumPy twins are. Loaded by cupynet/backends/kernels.py;
 * syntax-checked on CPU by tests/test_kernels_compile.py.
 */
#include "common.cuh"

// w: (K, R, 3, C) KRSC -> paired: (2K, R, 3, 2C) KRSC, paired[p*K + k, r, j, q*C + c] = w[k, r, s, c] with
// s = 2j + q - p - 1 where that lies in 0..2, else 0. One thread per paired value (a gather: every value is
// written, the zeros included, so the buffer needs no clearing); 9,216 values at 16 channels.
template <typename T>
__global__ void pixel_pair_weights(const T* w, T* paired, int K, int R, int C)
{
    start_after_prior_grids();
    const int total = 2 * K * R * 3 * 2 * C;
    for (int i = first_index(); i < total; i += grid_stride()) {
        const int qc = i % (2 * C);
        const int j = (i / (2 * C)) % 3;
        const int r = (i / (6 * C)) % R;
        const int pk = i / (6 * C * R);
        const int p = pk / K, k = pk - p * K;
        const int q = qc / C, c = qc - q * C;
        const int s = 2 * j + q - p - 1;
        paired[i] = (s >= 0 && s <= 2) ? w[((k * R + r) * 3 + s) * C + c] : from_float<T>(0.0f);
    }
}

// The weight gradient of a convolution run on pixel pairs, folded back (--wgrad-pixel-pairs):
// d_paired: (2K, R, 3, 2C) KRSC, cuDNN's weight gradient of the paired convolution -> dw: (K, R, 3, C) KRSC,
// dw[k, r, s, c] = d_paired[k, r, j0, q0*C + c] + d_paired[K + k, r, j1, q1*C + c], the two places where
// pixel_pair_weights put w[k, r, s, c] (2j + q - p - 1 = s for output pixel p = 0 and 1), added in float32
// (NumPy twin: pixel_pairs.pixel_pair_weight_gradient). One thread per weight (2,304 at 16 channels).
template <typename TIn, typename TOut>
__global__ void pixel_pair_weight_gradient(const TIn* d_paired, TOut* dw, int K, int R, int C)
{
    start_after_prior_grids();
    const int total = K * R * 3 * C;
    for (int i = first_index(); i < total; i += grid_stride()) {
        const int c = i % C;
        const int s = (i / C) % 3;
        const int r = (i / (3 * C)) % R;
        const int k = i / (3 * C * R);
        float sum = 0.0f;
        for (int p = 0; p < 2; ++p) {
            const int q = (s + p + 1) & 1;          // the input pixel of the pair: s + p + 1 - q is even
            const int j = (s + p + 1 - q) / 2;      // the pair column, 0..2
            sum += to_float(d_paired[(((p * K + k) * R + r) * 3 + j) * 2 * C + q * C + c]);
        }
        dw[i] = from_float<TOut>(sum);
    }
}
