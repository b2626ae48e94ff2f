/*
 * kernels/pixel_pairs.cu: the kernel of a narrow 3x3 convolution rewritten on pixel pairs (--conv-pixel-pairs;
 * the rewrite and why: cupynet/backends/pixel_pairs.py). NumPy twin: pixel_pairs.pixel_pair_weight.
 * Loaded by cupynet/backends/kernels.py; syntax-checked on CPU by tests/test_kernels_compile.py.
 */
#include "common.cuh"

// w: (K, R, 3, C) KRSC -> paired: (2K, R, 3, 2C) KRSC, paired[p*K + k, r, j, q*C + c] = w[k, r, s, c] with
// s = 2j + q - p - 1 where that lies in 0..2, else 0. One thread per paired value (a gather: every value is
// written, the zeros included, so the buffer needs no clearing); 9,216 values at 16 channels.
template <typename T>
__global__ void pixel_pair_weights(const T* w, T* paired, int K, int R, int C)
{
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
