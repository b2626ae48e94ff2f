"""Stage 1's 3x3 convolutions in cupynet's own tensor-core kernel (kernels/narrow_conv.cu; --narrow-conv-kernel).

Why: every 3x3 convolution of a CIFAR ResNet stage does the same multiply-adds, yet cuDNN's engines for 16
channels (stage 1, 32 x 32 pixels) took 21.7 us forward and 21.4 us for the data gradient on an H100 at batch
128, against 7.8 and 8.0 us at stage 2 (32 channels, 16 x 16), and the fastest engine any heuristic offered was
no better (bench/RESULTS.md, "The largest remaining gaps"). Fourteen of each lie on the step's main chain. What
the work needs: 4 MB read and 4 MB written at batch 128 in bfloat16 (about 2.5 us of an H100's memory
bandwidth) and 0.6 GFLOP (about 1 us of its tensor cores).

The kernel: NHWC, 16 channels in and out, 3x3, stride 1, padding 1; each warp multiplies 16 output pixels by all
16 output channels per tap with mma.sync (bfloat16 m16n8k16; float32 as TF32, m16n8k8, only where --tf32 allows
it), the weights held in registers, each lane loading and storing a quarter of a pixel's channels in one
instruction (the layout: the kernel file's comment). The data gradient is the same kernel reading the weights
turned by 180 degrees with their channels swapped. Weight gradients stay with cuDNN: they run beside the main
chain.

Results: the same sums as cuDNN's up to their order (float32 accumulation of exact products), the same bits on
every run (each output is one warp's, in a fixed order); `tests/test_gpu_parity.py` checks both directions
against the NumPy reference.
"""
CHANNELS = 16          # NARROW_CONV_CHANNELS of kernels/narrow_conv.cu
THREADS = 256          # NARROW_CONV_THREADS: the block
TILE = 16              # NARROW_CONV_TILE: output pixels per warp product
ALIGNMENT = 16         # bytes: a float32 lane loads and stores 16 (float4), a bfloat16 one 8


def applies(layout, dtype, tf32, x_shape, w_shape, stride, pad):
    """Whether the kernel computes this convolution: NHWC, bfloat16 or float32 with TF32 allowed (the kernel
    multiplies on TF32 tensor cores), a 3x3 stride-1 padding-1 KRSC weight from 16 to 16 channels, and an
    image side (x for a forward, dx for a data gradient) of 16 channels."""
    if layout != "NHWC" or stride != 1 or pad != 1:
        return False
    if dtype != "bfloat16" and not (dtype == "float32" and tf32):
        return False
    return len(x_shape) == 4 and x_shape[3] == CHANNELS and tuple(w_shape) == (CHANNELS, 3, 3, CHANNELS)


def tiles(x_shape):
    """The 16-pixel tiles of an (N, H, W, C) activation: the warps' work items."""
    n, h, w, _ = x_shape
    return -(-n * h * w // TILE)
