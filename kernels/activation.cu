/*
 * kernels/activation.cu: elementwise kernels of the GPU backend: relu forward/backward, the residual
 * sum (and its relu-masked form for a post-activation block's input gradient), and dtype conversion
 * (bfloat16 <-> float32). (The post-activation forward sum is fused into BatchNorm: bn_apply.)
 * NumPy twins: NumpyBackend.relu_forward / relu_backward / add / relu_backward_add. Loaded by
 * cupynet/backends/kernels.py; syntax-checked on CPU by tests/test_kernels_compile.py.
 *
 * Every kernel is a grid-stride loop over n elements, computes in float32 and rounds once on store;
 * with vec = 1 the first n / PACK packs move 16 bytes at a time (common.cuh, "16-byte packs").
 * Outputs may alias inputs (the model writes dx = dx + ds in place; a thread reads each pack before it
 * writes it), so no __restrict__ here.
 */
#include "common.cuh"

// y = max(x, 0)
template <typename T>
__global__ void relu_forward(const T* x, T* y, int n, int vec)
{
    start_after_prior_grids();
    constexpr int P = Pack<T>::size;
    const int packs = pack_count<T>(n, vec);
    for (int j = first_index(); j < packs; j += grid_stride()) {
        float v[P];
        load_pack(x, j, v);
#pragma unroll
        for (int k = 0; k < P; ++k) v[k] = relu(v[k]);
        store_pack(y, j, v);
    }
    for (int i = packs * P + first_index(); i < n; i += grid_stride()) y[i] = from_float<T>(relu(to_float(x[i])));
}

// dx = dy where the relu output y is positive, else 0
template <typename T>
__global__ void relu_backward(const T* dy, const T* y, T* dx, int n, int vec)
{
    start_after_prior_grids();
    constexpr int P = Pack<T>::size;
    const int packs = pack_count<T>(n, vec);
    for (int j = first_index(); j < packs; j += grid_stride()) {
        float g[P], out[P];
        load_pack(dy, j, g);
        load_pack(y, j, out);
#pragma unroll
        for (int k = 0; k < P; ++k) g[k] = relu_grad(g[k], out[k]);
        store_pack(dx, j, g);
    }
    for (int i = packs * P + first_index(); i < n; i += grid_stride()) {
        dx[i] = from_float<T>(relu_grad(to_float(dy[i]), to_float(y[i])));
    }
}

// y = a + b, or a + (b where mask > 0, else 0) with masked = 1: the residual sum of a pre-activation
// block, and a post-activation block's input gradient (the main path's dx plus the shortcut path's
// gradient, dy through the block's final relu, without writing that masked gradient out first). mask
// is read only when masked is 1 (the backend passes b otherwise, never a null pointer).
template <typename T>
__global__ void residual_add(const T* a, const T* b, const T* mask, int masked, T* y, int n, int vec)
{
    start_after_prior_grids();
    constexpr int P = Pack<T>::size;
    const int packs = pack_count<T>(n, vec);
    for (int j = first_index(); j < packs; j += grid_stride()) {
        float u[P], v[P], out[P];
        load_pack(a, j, u);
        load_pack(b, j, v);
        if (masked) load_pack(mask, j, out);
#pragma unroll
        for (int k = 0; k < P; ++k) u[k] += masked ? relu_grad(v[k], out[k]) : v[k];
        store_pack(y, j, u);
    }
    for (int i = packs * P + first_index(); i < n; i += grid_stride()) {
        const float v = to_float(b[i]);
        y[i] = from_float<T>(to_float(a[i]) + (masked ? relu_grad(v, to_float(mask[i])) : v));
    }
}

// y[i] = the sum of x's `rows` rows of n elements at i, added in row order in float32, converted to Tout.
// rows = 1 is a conversion: float32 weights into their bfloat16 compute copy (CupyBackend.copy_into).
// rows > 1: weight gradients computed per slice of the batch (--wgrad-chunks), summed in one pass over
// the span every convolution weight shares (ParamStore.gather_compute_gradients), always in the same order.
template <typename Tin, typename Tout>
__global__ void sum_rows(const Tin* x, Tout* y, int n, int rows)
{
    start_after_prior_grids();
    for (int i = first_index(); i < n; i += grid_stride()) {
        float sum = to_float(x[i]);
        for (int r = 1; r < rows; ++r) sum += to_float(x[(long long)r * n + i]);
        y[i] = from_float<Tout>(sum);
    }
}
