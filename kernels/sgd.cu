/*
 * kernels/sgd.cu: the optimizer's kernels over the flat float32 parameter buffer: the momentum-SGD +
 * weight-decay update (optionally refreshing the bfloat16 compute copy in the same pass), the squared
 * norm for the L2 term of the reported loss, and device-side running sums (`accumulate`).
 * NumPy twins: NumpyBackend.sgd_momentum_update / sum_of_squares / accumulate. Loaded by
 * cupynet/backends/kernels.py; syntax-checked on CPU by tests/test_kernels_compile.py.
 *
 * The update and `accumulate` use explicitly rounded float32 operations (__fmul_rn, __fadd_rn: no
 * fused multiply-add contraction) in the reference's order, so they are bit-identical to NumPy's
 * float32 arithmetic: a GPU run and a CPU run apply exactly the same update to the same gradients.
 */
#include "common.cuh"

// g = grad + wd * p; a = momentum * a + g; p -= lr * a; [copy = p rounded to Tcopy].
// lr: 0-d device scalar (the host changes it between steps without a sync). When write_copy is 0,
// `copy` is not touched (the backend passes `params` there, never a null pointer).
template <typename Tcopy>
__global__ void sgd_momentum(float* params, const float* grads, float* accum, const float* lr, float momentum,
                             float weight_decay, int n, Tcopy* copy, int write_copy)
{
    start_after_prior_grids();
    const float rate = lr[0];
    for (int i = first_index(); i < n; i += grid_stride()) {
        const float p = params[i];
        const float g = __fadd_rn(grads[i], __fmul_rn(weight_decay, p));
        const float a = __fadd_rn(__fmul_rn(accum[i], momentum), g);
        const float updated = __fsub_rn(p, __fmul_rn(rate, a));
        accum[i] = a;
        params[i] = updated;
        if (write_copy) copy[i] = from_float<Tcopy>(updated);
    }
}

// First stage of sum(x^2): one float32 partial per block, partials: (gridDim.x,).
template <typename T>
__global__ void sum_squares_partials(const T* x, int n, float* partials)
{
    start_after_prior_grids();
    float local = 0.0f;
    for (int i = first_index(); i < n; i += grid_stride()) {
        const float v = to_float(x[i]);
        local = fmaf(v, v, local);
    }
    const float total = block_sum(local);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// Second stage: one block adds the partials in double and writes out[0].
extern "C" __global__ void sum_finalize(const float* partials, int count, float* out)
{
    start_after_prior_grids();
    double local = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) local += partials[i];
    const double total = block_sum(local);
    if (threadIdx.x == 0) out[0] = (float)total;
}

// total[i] += scale * value[i] (0-d or same-shape float32 arrays): the loss summed between log lines.
extern "C" __global__ void accumulate(float* total, const float* value, float scale, int n)
{
    start_after_prior_grids();
    for (int i = first_index(); i < n; i += grid_stride()) total[i] = __fadd_rn(total[i], __fmul_rn(scale, value[i]));
}
