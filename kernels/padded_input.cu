/*
 * kernels/padded_input.cu: the stem's weights for an input padded to a 16-byte pixel (--padded-input): the
 * weights with zero channels added before each forward, and the padded weight gradient cut back to the real
 * channels. Why: cupynet/backends/padded_input.py. Loaded by cupynet/backends/kernels.py; syntax-checked on
 * CPU by tests/test_kernels_compile.py.
 */
#include "common.cuh"

// w: (K, R, S, C) KRSC -> padded: (K, R, S, X) KRSC, padded[..., c] = w[..., c] for c < C, else 0. One thread
// per padded value (every value is written, the zeros included, so the buffer needs no clearing); taps = K*R*S.
template <typename T>
__global__ void pad_weight_channels(const T* w, T* padded, int taps, int C, int X)
{
    start_after_prior_grids();
    const int total = taps * X;
    for (int i = first_index(); i < total; i += grid_stride()) {
        const int c = i % X;
        padded[i] = c < C ? w[(i / X) * C + c] : from_float<T>(0.0f);
    }
}

// d_padded: (K, R, S, X) KRSC, cuDNN's weight gradient for the padded input -> dw: (K, R, S, C), its first C
// channels, converted to dw's type (the padding's gradient, at the zero inputs, is zero and dropped).
template <typename TIn, typename TOut>
__global__ void crop_weight_channels(const TIn* d_padded, TOut* dw, int taps, int C, int X)
{
    start_after_prior_grids();
    const int total = taps * C;
    for (int i = first_index(); i < total; i += grid_stride()) {
        dw[i] = from_float<TOut>(to_float(d_padded[(i / C) * X + i % C]));
    }
}
