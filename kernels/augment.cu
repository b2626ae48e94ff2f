/*
 * kernels/augment.cu: the input pipeline on the device. Gathers a batch of rows from the uint8
 * dataset (N, H, W, 3) kept on the GPU, optionally pads by `pad` zero pixels, crops back to H x W at a
 * random offset and flips left-right at random, normalizes to x / 128 - 1, and gathers the labels. The
 * output may have more channels than the images (X > C, zeros: --padded-input).
 * NumPy twin: NumpyBackend.augment_batch; the draws are those of cupynet/sampling.py::crop_flip_draws,
 * reproduced bit for bit (tests/test_gpu_parity.py compares the outputs for exact equality).
 * Loaded by cupynet/backends/kernels.py; syntax-checked on CPU by tests/test_kernels_compile.py.
 *
 * The draws are a counter-based hash, all in wrapping uint32 arithmetic:
 *   key  = mix32(mix32(seed ^ GOLDEN) ^ mix32(step))        (sampling.step_key)
 *   h    = mix32((row * GOLDEN) ^ key), row = first_row + position in the batch (the row's position in
 *          the step's global batch: a data-parallel worker's shard starts at first_row)
 *   dy   = h % k, dx = (h / k) % k, flip = (h / k^2) & 1,  k = 2 * pad + 1
 * Two entry points: `augment_batch` takes the rows and the step from the host (evaluation, tests);
 * `augment_train_batch` reads the step from the device counter that `advance_step` increments at the
 * end of every training step, and the rows from the epoch's order on the device, so a training step
 * captured once in a CUDA graph draws a new batch on every replay.
 * Every value v / 128 - 1 with v in 0..255 is exact in float32 and in bfloat16 (at most 8 significant
 * bits), so both dtypes give exactly the reference's numbers.
 */
#include "common.cuh"

#define GOLDEN 0x9E3779B9u

// lowbias32 (Chris Wellons' hash-prospector), as sampling.mix32.
__device__ __forceinline__ unsigned int mix32(unsigned int x)
{
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

// The hash of batch position `row` at (seed, step), both already reduced mod 2^32 by the host.
__device__ __forceinline__ unsigned int crop_flip_hash(unsigned int seed, unsigned int step, unsigned int row)
{
    const unsigned int key = mix32(mix32(seed ^ GOLDEN) ^ mix32(step));
    return mix32((row * GOLDEN) ^ key);
}

// The body shared by both entry points, a grid-stride loop over the batch's pixels: each thread draws its
// image's crop and flip once and writes the pixel's X channels, the image's C then zeros (X > C: the input
// padded to a 16-byte pixel, --padded-input, cupynet/backends/padded_input.py; the padding is 0, not the -1
// of a black pixel, though the stem's weights there are zero either way).
// images: (N, H, W, C) uint8; labels: (N,) int32; indices: (B,) int64 dataset rows;
// x_out: (B, X, H, W) or (B, H, W, X) per channels_last; labels_out: (B,) int32. A padded NHWC pixel that is one
// 16-byte pack (X = Pack<T>::size) is stored as one, where vec says x_out starts on a 16-byte boundary.
template <typename T>
__device__ __forceinline__ void augment_rows(const unsigned char* images, const int* labels, const long long* indices,
                                             int B, int H, int W, int C, int X, int pad, unsigned int seed,
                                             unsigned int step, unsigned int first_row, int distort, T* x_out,
                                             int* labels_out, int channels_last, int vec)
{
    const int pixels = B * H * W;
    const unsigned int k = 2u * (unsigned int)pad + 1u;
    for (int i = first_index(); i < pixels; i += grid_stride()) {
        const int w = i % W;
        const int h = (i / W) % H;
        const int b = i / (W * H);
        int src_h = h;
        int src_w = w;
        if (distort) {
            const unsigned int hash = crop_flip_hash(seed, step, first_row + (unsigned int)b);
            const int dy = (int)(hash % k);
            const int dx = (int)((hash / k) % k);
            const bool flip = ((hash / (k * k)) & 1u) != 0u;
            // output (h, w) reads padded pixel (dy + h, dx + w') with w' = W - 1 - w when flipped
            src_h = dy + h - pad;
            src_w = dx + (flip ? W - 1 - w : w) - pad;
        }
        // the zero padding of the crop, normalized to -1 like any black pixel
        const bool inside = src_h >= 0 && src_h < H && src_w >= 0 && src_w < W;
        const unsigned char* source = images + ((indices[b] * H + src_h) * W + src_w) * C;
        auto channel = [&](int c) {                                 // 0 for a padding channel
            return c < C ? (inside ? (float)source[c] : 0.0f) * (1.0f / 128.0f) - 1.0f : 0.0f;
        };
        if (vec && channels_last && X == Pack<T>::size) {
            float v[Pack<T>::size];
#pragma unroll
            for (int c = 0; c < Pack<T>::size; ++c) v[c] = channel(c);
            store_pack(x_out, i, v);
        } else {
            for (int c = 0; c < X; ++c) {
                x_out[offset_of(b, c, h, w, X, H, W, channels_last)] = from_float<T>(channel(c));
            }
        }
    }
    for (int b = first_index(); b < B; b += grid_stride()) labels_out[b] = labels[indices[b]];
}

// A batch of explicitly listed rows at a step given by the host (evaluation, tests).
template <typename T>
__global__ void augment_batch(const unsigned char* images, const int* labels, const long long* indices, int B,
                              int H, int W, int C, int X, int pad, unsigned int seed, unsigned int step,
                              unsigned int first_row, int distort, T* x_out, int* labels_out, int channels_last,
                              int vec)
{
    start_after_prior_grids();
    augment_rows<T>(images, labels, indices, B, H, W, C, X, pad, seed, step, first_row, distort, x_out, labels_out,
                    channels_last, vec);
}

// The training batch of the step held in device memory (the trainer's step counter), so a captured step
// replays with the right batch: rows [start, start + B) of the epoch's order, start = (step mod
// steps_per_epoch) * global_batch + first_row. order: (num_images,) int64, uploaded once per epoch.
template <typename T>
__global__ void augment_train_batch(const unsigned char* images, const int* labels, const long long* order,
                                    const long long* step, long long steps_per_epoch, long long global_batch,
                                    int B, int H, int W, int C, int X, int pad, unsigned int seed,
                                    unsigned int first_row, int distort, T* x_out, int* labels_out,
                                    int channels_last, int vec)
{
    start_after_prior_grids();
    const long long s = step[0];
    const long long start = (s % steps_per_epoch) * global_batch + (long long)first_row;
    augment_rows<T>(images, labels, order + start, B, H, W, C, X, pad, seed, (unsigned int)(s & 0xFFFFFFFFll),
                    first_row, distort, x_out, labels_out, channels_last, vec);
}

// step[0] += 1 on the device: the last kernel of a training step (one thread).
extern "C" __global__ void advance_step(long long* step)
{
    start_after_prior_grids();
    if (first_index() == 0) step[0] += 1;
}
