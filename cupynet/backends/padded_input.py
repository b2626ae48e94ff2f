"""The network's input written with its channels padded to a 16-byte pixel (--padded-input), for the stem.

Why: the stem convolution reads 3 channels, and cuDNN's tensor-core engines want whole 16-byte vectors of
channels (8 in bf16, 4 in float32). On an H100 (2026-11-27, runs 1 and 2) the stem's forward ran cuDNN's
generic engine, 23.8 us, the step's first kernel after the augmentation; its weight gradient, the last work
of the backward, was a memset, `nhwcAddPaddingKernel` (cuDNN padding the input to 8 channels on every call),
two memsets, the kernel, its split-K reduction and `nhwcAddPaddingKernel` again: 52.3 us after the main
chain's last kernel, with the update waiting for it. Together about 76 us of a 3,029-us step's critical path.

The rewrite is exact: the augmentation kernel writes the input with X >= C channels, the last X - C of them
zero, and the stem convolves it with its weights padded by X - C zero channels (a small kernel builds them from
the K x R x S x C weights before each such forward). Zero channels add nothing to the output, and the weight
gradient's first C channels are the real weights' gradient: cuDNN computes the padded gradient into a scratch
and a small kernel copies those channels out (the others, x = 0's, are zero). The model's parameters and
checkpoints keep their C channels. NHWC only; NCHW is left as it is.

Whether cuDNN's engines at 8 channels beat its padding at 3 is what the device check's row for the switch
says (and `bench/conv_engines.py`'s `padded_input` rows for the stem's calls alone).
"""
import numpy as np

PIXEL_BYTES = 16       # one 16-byte vector per pixel: 8 bf16 channels, 4 float32


def padded_channels(channels, dtype):
    """The channels of a padded input: `channels` rounded up to a whole 16-byte vector of `dtype`."""
    per_vector = PIXEL_BYTES // np.dtype(dtype).itemsize
    return -(-channels // per_vector) * per_vector


def is_padded(layout, x_shape, w_shape):
    """Whether an NHWC activation of x_shape is a padded input of a KRSC weight of w_shape: more channels than
    the weight reads. Raises where neither holds (the channels differ some other way)."""
    if layout != "NHWC" or x_shape[-1] == w_shape[-1]:
        return False
    if x_shape[-1] < w_shape[-1]:
        raise ValueError(f"an activation of shape {tuple(x_shape)} has fewer channels than the weight "
                         f"{tuple(w_shape)} reads")
    return True
