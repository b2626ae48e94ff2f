/*
 * kernels/loss.cu: the loss layer: mean softmax cross-entropy and its gradient in one pass, and the
 * device-side count of correct predictions used by evaluation.
 * NumPy twins: NumpyBackend.softmax_cross_entropy / count_correct. Loaded by
 * cupynet/backends/kernels.py; syntax-checked on CPU by tests/test_kernels_compile.py.
 *
 * Both run as ONE block (launch with grid 1, block 256): a batch has at most a few thousand rows of
 * 10 logits, and a single block writes its 0-d result without atomics and without a zeroing launch,
 * deterministically. Arithmetic is float32 whatever the logits' dtype.
 */
#include "common.cuh"

// logits: (N, K); labels: (N,) int32 in [0, K). Writes loss[0] = mean_r(logsumexp(z_r) - z_r[label_r])
// and dlogits = (softmax(z) - onehot(label)) / N. A label out of range makes the loss NaN (visible)
// instead of reading out of bounds.
template <typename T>
__global__ void softmax_cross_entropy(const T* logits, const int* labels, int N, int K, float* loss, T* dlogits)
{
    start_after_prior_grids();
    float local = 0.0f;
    const float rows = (float)N;
    for (int r = threadIdx.x; r < N; r += blockDim.x) {
        const T* z = logits + r * K;
        float zmax = to_float(z[0]);
        for (int k = 1; k < K; ++k) zmax = fmaxf(zmax, to_float(z[k]));
        float total = 0.0f;
        for (int k = 0; k < K; ++k) total += expf(to_float(z[k]) - zmax);
        const float lse = logf(total);                  // log-sum-exp of the shifted logits
        const int label = labels[r];
        const bool valid = label >= 0 && label < K;
        local += valid ? lse - (to_float(z[label]) - zmax) : quiet_nan();
        for (int k = 0; k < K; ++k) {
            float p = expf(to_float(z[k]) - zmax - lse);
            if (k == label) p -= 1.0f;
            dlogits[r * K + k] = from_float<T>(p / rows);
        }
    }
    const float sum = block_sum(local);
    if (threadIdx.x == 0) loss[0] = sum / rows;
}

// correct[0] += number of rows r < num_valid whose argmax (first maximum, NaN counting as the maximum,
// as numpy.argmax) equals labels[r].
template <typename T>
__global__ void count_correct(const T* logits, const int* labels, int num_valid, int K, long long* correct)
{
    start_after_prior_grids();
    long long hits = 0;
    for (int r = threadIdx.x; r < num_valid; r += blockDim.x) {
        const T* z = logits + r * K;
        int best = 0;
        float best_value = to_float(z[0]);
        for (int k = 1; k < K; ++k) {
            const float v = to_float(z[k]);
            const bool best_is_nan = best_value != best_value;
            if (!best_is_nan && (v > best_value || v != v)) {
                best = k;
                best_value = v;
            }
        }
        hits += best == labels[r] ? 1 : 0;
    }
    const long long total = block_sum(hits);
    if (threadIdx.x == 0) correct[0] += total;
}
