"""Which convolutions cupynet's own tensor-core kernel takes (cupynet/backends/conv3x3.py), on the CPU.

The kernel itself is tested against the NumPy reference in tests/test_gpu_parity.py (on the emulated GPU in CI);
here, the choice the backend makes before launching it: --own-conv-channels N, the layout, the precision, the
shape and the direction.
"""
import pytest

from cupynet.backends import conv3x3

# (source shape NHWC, weight KRSC, stride, data gradient?, N) -> (channels in, channels out, stride) or None.
# A data gradient's source is dy and its weight is the forward's (K = dy's channels).
CASES = [
    ((8, 32, 32, 16), (16, 3, 3, 16), 1, False, 16, (16, 16, 1)),       # stage 1
    ((8, 32, 32, 16), (16, 3, 3, 16), 1, True, 16, (16, 16, 1)),
    ((8, 16, 16, 32), (32, 3, 3, 32), 1, False, 16, None),              # stage 2: beyond N = 16
    ((8, 16, 16, 32), (32, 3, 3, 32), 1, False, 32, (32, 32, 1)),
    ((8, 8, 8, 64), (64, 3, 3, 64), 1, True, 64, (64, 64, 1)),          # stage 3
    ((8, 8, 8, 64), (64, 3, 3, 64), 1, True, 32, None),
    ((8, 32, 32, 16), (32, 3, 3, 16), 2, False, 32, (16, 32, 2)),       # a stage's first, strided forward
    ((8, 32, 32, 16), (32, 3, 3, 16), 2, False, 16, None),              # its 32 output channels: beyond 16
    ((8, 16, 16, 32), (32, 3, 3, 16), 2, True, 64, None),               # ... and its data gradient: cuDNN's
    ((8, 16, 16, 32), (64, 3, 3, 32), 2, False, 64, (32, 64, 2)),
    ((8, 32, 32, 3), (16, 3, 3, 3), 1, False, 64, None),                # the stem
    ((8, 32, 32, 8), (16, 3, 3, 8), 1, False, 64, None),                # ... with its input padded
    ((8, 32, 32, 16), (16, 1, 1, 16), 1, False, 64, None),              # a 1x1 window
    ((8, 32, 32, 16), (16, 3, 3, 16), 1, False, 0, None),               # the option off
]


@pytest.mark.parametrize("source, weight, stride, gradient, channels, expected", CASES)
def test_which_convolutions_the_kernel_takes(source, weight, stride, gradient, channels, expected):
    for dtype, tf32 in (("bfloat16", False), ("bfloat16", True), ("float32", True)):
        assert conv3x3.kernel_shape("NHWC", dtype, tf32, source, weight, stride, 1, gradient, channels) == expected


def test_not_in_nchw_strict_float32_float64_or_without_padding_1():
    stage1 = ((8, 32, 32, 16), (16, 3, 3, 16), 1)
    assert conv3x3.kernel_shape("NHWC", "float32", True, *stage1, 1, False, 64) == (16, 16, 1)
    assert conv3x3.kernel_shape("NCHW", "float32", True, *stage1, 1, False, 64) is None
    assert conv3x3.kernel_shape("NHWC", "float32", False, *stage1, 1, False, 64) is None     # strict float32
    assert conv3x3.kernel_shape("NHWC", "float64", True, *stage1, 1, False, 64) is None
    assert conv3x3.kernel_shape("NHWC", "bfloat16", True, *stage1, 0, False, 64) is None
    # a source whose channels are not the weight's (a padded input the weight does not read)
    assert conv3x3.kernel_shape("NHWC", "bfloat16", True, (8, 32, 32, 32), (16, 3, 3, 16), 1, 1, False, 64) is None


def test_the_launch_geometry():
    """16-pixel tiles (the last one partial); shared memory for 9 taps of fragments per product, and the sums' scratch;
    the partial sums a launch writes."""
    assert conv3x3.tiles((5, 7, 3, 16)) == 7                      # 105 pixels
    assert conv3x3.shared_bytes("bfloat16", 16) == 9 * 1 * 2 * 32 * 8
    assert conv3x3.shared_bytes("float32", 64) == 9 * 8 * 2 * 32 * 8 == 36864
    assert conv3x3.shared_bytes("float32", 64, stats=True) == 36864 + 8 * 16 * 2 * 4      # under 48 KB
    assert conv3x3.partial_sums(blocks=132, groups=4) == 132 * 4 * 16 * 2
