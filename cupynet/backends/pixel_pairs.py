"""Narrow 3x3 convolutions run on pixel pairs: an exact rewrite for the GPU's NHWC layout (--conv-pixel-pairs).

Why: every 3x3 convolution of a CIFAR ResNet stage does the same multiply-adds, yet cuDNN's engines for 16
channels (stage 1, 32 x 32 pixels) took 21.7 us forward and 21.4 us for the data gradient on an H100, against
7.8 and 8.0 us at stage 2 (32 channels, 16 x 16): wide enough rows keep its tensor cores busy, 16 channels do
not.

The rewrite: in NHWC an activation (N, H, W, C) with W even has the bytes of (N, H, W/2, 2C), each pair of
neighbouring pixels read as one "pixel" of 2C channels (the left pixel's C, then the right one's). A 3x3
stride-1 convolution with padding 1 from C to K channels is, on those bytes, a 3x3 stride-1 convolution with
padding 1 from 2C to 2K channels (stage 2's width, twice its rows) whose kernel is built from the K x 3 x 3 x C
one:

    paired[p*K + k, r, j, q*C + c] = w[k, r, s, c]    where s = 2j + q - p - 1 lies in 0..2, else 0

p and q say which pixel of its pair the output and the input are (0 left, 1 right), j which pair column
(the pair to the left, the same pair, the one to the right): output pixel 2x + p reads input pixel
2(x + j - 1) + q, which is tap s of the original window. Half of the paired kernel is zeros, so the rewrite
does twice the multiply-adds; the zero padding of the pairs is the original's (the pixel left of column 0 and
right of column W-1). The data gradient is likewise the data gradient of the paired convolution with the same
paired kernel.

The weight gradient (--wgrad-pixel-pairs, a switch of its own: cuDNN's weight-gradient engines are another
matter): each weight sits twice in the paired kernel, once per output pixel p of a pair, so its gradient is
the sum of the paired convolution's weight gradient at those two places,

    dw[k, r, s, c] = sum over p of d_paired[p*K + k, r, j, q*C + c]    where 2j + q - p - 1 = s

(the paired gradient's other half, at the zeros, is computed and dropped: twice the multiply-adds again).

The GPU backend builds the paired kernel from the current weights (kernels/pixel_pairs.cu) before each
forward that runs paired, for its data gradient too, a pass over 2K x 3 x 3 x 2C values (9,216 at 16 channels), and
folds each paired weight gradient back the same way. `pixel_pair_weight` and `pixel_pair_weight_gradient`
here are their NumPy twins, and `tests/test_pixel_pairs.py` checks the rewrite itself against the NumPy
backend's convolutions.
"""
import numpy as np

# Which convolutions run paired: stage 1's 16-channel ones. The stem (3 channels in) is left out: cuDNN pads
# its channels anyway, and a paired stem (6 in) would not meet the channel multiple below.
PAIR_MAX_CHANNELS = 16
PAIR_CHANNEL_MULTIPLE = 8     # 2C and 2K then fill whole 16-byte vectors of bf16 (32 bytes of float32)


def applies(layout, x_shape, w_shape, stride, pad):
    """Whether a convolution of NHWC activations x_shape (the image side: x, or dx for a data gradient) with
    a KRSC weight of w_shape can run on pixel pairs: NHWC, 3x3, stride 1, padding 1, an even width, and C and
    K multiples of PAIR_CHANNEL_MULTIPLE up to PAIR_MAX_CHANNELS, the weight reading all of x's C channels (not
    an input padded for the stem, --padded-input)."""
    if layout != "NHWC" or stride != 1 or pad != 1:
        return False
    width, c = x_shape[2], x_shape[3]
    k, r, s, weight_channels = w_shape
    return ((r, s) == (3, 3) and width % 2 == 0 and weight_channels == c
            and all(n % PAIR_CHANNEL_MULTIPLE == 0 and n <= PAIR_MAX_CHANNELS for n in (c, k)))


def paired_shape(shape):
    """(N, H, W/2, 2C) for an NHWC activation shape (N, H, W, C)."""
    n, h, w, c = shape
    return (n, h, w // 2, 2 * c)


def paired_weight_shape(w_shape):
    """(2K, R, 3, 2C) for a KRSC weight shape (K, R, 3, C)."""
    k, r, _, c = w_shape
    return (2 * k, r, 3, 2 * c)


def _places(k, c):
    """Every place of the paired kernel that holds a weight, output pixel p = 0's first: (tap s, pair column
    j, the output rows p*K.., the input columns q*C..), where output pixel p reads input pixel q of pair
    column j through tap s = 2j + q - p - 1."""
    for p in range(2):
        for q in range(2):
            for j in range(3):
                tap = 2 * j + q - p - 1
                if 0 <= tap <= 2:
                    yield tap, j, slice(p * k, (p + 1) * k), slice(q * c, (q + 1) * c)


def pixel_pair_weight(w):
    """The paired kernel (2K, R, 3, 2C) of a KRSC weight (K, R, 3, C), NumPy (see the module docstring)."""
    k, r, s, c = w.shape
    if s != 3:
        raise ValueError(f"pixel pairs need a 3-wide window, got a weight of shape {w.shape}")
    paired = np.zeros(paired_weight_shape(w.shape), dtype=w.dtype)
    for tap, j, outputs, inputs in _places(k, c):
        paired[outputs, :, j, inputs] = w[:, :, tap, :]
    return paired


def pixel_pair_weight_gradient(d_paired):
    """The weight gradient (K, R, 3, C) that a paired convolution's weight gradient (2K, R, 3, 2C) folds back
    to: each weight's two places added, in float32 as the GPU kernel adds them (float64 input: in float64)."""
    two_k, r, s, two_c = d_paired.shape
    if s != 3 or two_k % 2 or two_c % 2:
        raise ValueError(f"not a paired weight gradient: shape {d_paired.shape}")
    total = np.float64 if d_paired.dtype == np.float64 else np.float32
    dw = np.zeros((two_k // 2, r, 3, two_c // 2), dtype=total)
    for tap, j, outputs, inputs in _places(two_k // 2, two_c // 2):
        dw[:, :, tap, :] += d_paired[outputs, :, j, inputs].astype(total)
    return dw
