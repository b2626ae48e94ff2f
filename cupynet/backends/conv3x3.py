"""3x3 convolutions in cupynet's own tensor-core kernel (kernels/conv3x3.cu; --own-conv-channels N).

Why: cuDNN's engines are far from what these small convolutions need. On an H100 at batch 128 in bf16, stage 1's
forward (16 channels, 32 x 32) took 21.7 us and its data gradient 21.4 us, against 7.8 and 8.0 us at stage 2 for
the same multiply-adds, and the fastest engine any heuristic offered was no better (bench/RESULTS.md, "The
largest remaining gaps"); 14 of each lie on the step's main chain. What the work needs: stage 1's reads and
writes are 8.4 MB (about 2.5 us of an H100's memory bandwidth) and 0.6 GFLOP (about 1 us of its tensor cores);
stages 2 and 3 move half and a quarter of that. The cuDNN convolutions of the main chain took about 1.5 ms of
the 3-ms step.

The kernel: NHWC, 3x3, padding 1, from and to 16, 32 or 64 channels at stride 1 (forward and data gradient) and
16 -> 32 and 32 -> 64 at stride 2 (a stage's first forward; its data gradient stays with cuDNN). Each warp
multiplies 16 output pixels by 16 output channels tap by tap with mma.sync (bfloat16 m16n8k16; float32 as TF32,
m16n8k8, only where --tf32 allows it: its inputs rounded to nearest, as cuDNN's TF32 engines do), each lane
loading a quarter of a pixel's channels per tap in one or two instructions and storing four output channels in
one; the weights' fragments are built per block into shared memory. The data gradient is the same kernel
reading the weights turned by 180 degrees with their channels swapped. Weight gradients stay with cuDNN: they
run beside the main chain.

With --conv-genstats a forward that feeds a BatchNorm also writes that BatchNorm's sums (the sum and sum of
squares of each output channel, of the values as stored, in float32), added up as the warps store their results
and finished by the grid's last block, so that the BatchNorm skips its own pass over the activation (as with
cuDNN's genstats, for which the autotuner finds no engine at these widths either).

`--own-conv-channels N` hands the kernel every convolution it takes whose channels, in and out, are at most N:
16 is stage 1, 64 all of them. Results: the same sums as cuDNN's up to their order (float32 accumulation of exact
products), the same bits on every run (each output is one warp's, in a fixed order); `tests/test_gpu_parity.py`
checks every shape against the NumPy reference.
"""
CHANNEL_CHOICES = (0, 16, 32, 64)      # --own-conv-channels: 0 leaves every convolution to cuDNN
THREADS = 256                          # CONV3X3_THREADS of kernels/conv3x3.cu: the block
TILE = 16                              # CONV3X3_TILE: output pixels per warp product
GROUP = 16                             # CONV3X3_GROUP: output channels per block (the grid's y)
ALIGNMENT = 16                         # bytes: a lane's loads and stores (8 or 16 bytes at a pixel's start + t/4)
# (channels in, channels out, stride) the kernel is instantiated for; a data gradient runs at stride 1 only
SHAPES = ((16, 16, 1), (32, 32, 1), (64, 64, 1), (16, 32, 2), (32, 64, 2))
FRAGMENT_BYTES = 8                     # one lane's B fragment of one product (two 32-bit registers)
MIN_COMPUTE_CAPABILITY = 80            # mma.sync on bf16 and TF32, cvt.rna.tf32: Ampere (sm_80) and later


def kernel_shape(layout, dtype, tf32, source_shape, w_shape, stride, pad, data_gradient, max_channels):
    """(channels in, channels out, stride) of the kernel that computes this convolution, or None where it leaves
    it to cuDNN. source_shape: the image side the kernel reads (x for a forward, dy for a data gradient), NHWC;
    w_shape: the KRSC weight. It takes NHWC, bfloat16, or float32 with TF32 allowed (it multiplies on TF32 tensor
    cores); 3x3 with padding 1; the shapes of SHAPES (a data gradient at stride 1), whose channels in and out are
    at most max_channels."""
    if layout != "NHWC" or pad != 1 or len(source_shape) != 4 or len(w_shape) != 4:
        return None
    if dtype != "bfloat16" and not (dtype == "float32" and tf32):
        return None
    k, r, s, c = w_shape
    source_channels, target_channels = (k, c) if data_gradient else (c, k)
    shape = (source_channels, target_channels, stride)
    if (r, s) != (3, 3) or source_shape[3] != source_channels or shape not in SHAPES:
        return None
    if (data_gradient and stride != 1) or max(source_channels, target_channels) > max_channels:
        return None
    return shape


def tiles(target_shape):
    """The 16-pixel tiles of an (N, H, W, C) output: the warps' work items (per group of 16 channels)."""
    n, h, w, _ = target_shape
    return -(-n * h * w // TILE)


def shared_bytes(dtype, source_channels, stats=False):
    """The block's dynamic shared memory: 9 taps x its products x 2 halves x 32 lanes of fragments, and with the
    sums (stats) a float per channel of its group and statistic for each of its warps."""
    products = source_channels // (16 if dtype == "bfloat16" else 8)
    return 9 * products * 2 * 32 * FRAGMENT_BYTES + (THREADS // 32 * GROUP * 2 * 4 if stats else 0)


def partial_sums(blocks, groups):
    """The float32 partial sums a launch with sums writes: per block, each of its group's channels' sum and sum of
    squares."""
    return blocks * groups * GROUP * 2
