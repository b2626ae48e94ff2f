"""The pixel-pair rewrite (cupynet/backends/pixel_pairs.py) against the NumPy backend's own convolutions.

A 3x3 stride-1 convolution of NHWC activations, read as pixel pairs with the paired kernel, must be the same
convolution: forward, data gradient and (folded back) weight gradient, in float64 to rounding. The GPU backend's kernel that builds the
paired kernel and the one that folds the paired weight gradient are checked against their NumPy twins in
tests/test_gpu_parity.py.
"""
import numpy as np
import pytest

from cupynet.backends import pixel_pairs
from cupynet.backends.numpy_backend import NumpyBackend


def paired(array):
    return array.reshape(pixel_pairs.paired_shape(array.shape))


@pytest.mark.parametrize("cin,cout,width", [(16, 16, 8), (8, 16, 6), (16, 8, 2)])
def test_a_convolution_on_pixel_pairs_is_the_convolution(cin, cout, width):
    be, rng = NumpyBackend("NHWC", "float64"), np.random.default_rng(cin + cout + width)
    x = rng.standard_normal((2, 5, width, cin))
    w = rng.standard_normal((cout, 3, 3, cin))
    dy = rng.standard_normal((2, 5, width, cout))
    w_pairs = pixel_pairs.pixel_pair_weight(w)
    assert w_pairs.shape == (2 * cout, 3, 3, 2 * cin)
    assert np.count_nonzero(w_pairs) == 2 * w.size          # each tap used twice (once per output pixel), else zeros

    y, y_pairs = be.empty((2, 5, width, cout)), be.empty((2, 5, width // 2, 2 * cout))
    be.conv2d_forward(x, w, 1, 1, y)
    be.conv2d_forward(paired(x), w_pairs, 1, 1, y_pairs)
    np.testing.assert_allclose(y_pairs.reshape(y.shape), y, rtol=1e-12, atol=1e-12)

    dx, dx_pairs = be.empty(x.shape), be.empty(paired(x).shape)
    be.conv2d_backward_data(dy, w, 1, 1, dx)
    be.conv2d_backward_data(paired(dy), w_pairs, 1, 1, dx_pairs)
    np.testing.assert_allclose(dx_pairs.reshape(dx.shape), dx, rtol=1e-12, atol=1e-12)

    # the weight gradient: the paired convolution's, each weight's two places added
    dw, dw_pairs = be.empty(w.shape), be.empty(w_pairs.shape)
    be.conv2d_backward_filter(x, dy, 1, 1, dw)
    be.conv2d_backward_filter(paired(x), paired(dy), 1, 1, dw_pairs)
    np.testing.assert_allclose(pixel_pairs.pixel_pair_weight_gradient(dw_pairs), dw, rtol=1e-12, atol=1e-12)


def test_the_paired_kernel_places_each_tap_where_its_pixels_meet():
    """Output pixel 2x + p reads input pixel 2(x + j - 1) + q through tap 2j + q - p - 1: spelled out."""
    w = np.arange(1, 1 + 1 * 1 * 3 * 1, dtype=np.float64).reshape(1, 1, 3, 1)     # taps 1, 2, 3 (left to right)
    w_pairs = pixel_pairs.pixel_pair_weight(w)[:, 0, :, :]                          # (2K, pair column, 2C)
    # left output pixel: the pair to the left gives its right pixel (tap 1), its own pair taps 2 and 3
    np.testing.assert_array_equal(w_pairs[0], [[0, 1], [2, 3], [0, 0]])
    # right output pixel: its own pair taps 1 and 2, the pair to the right its left pixel (tap 3)
    np.testing.assert_array_equal(w_pairs[1], [[0, 0], [1, 2], [3, 0]])


def test_folding_the_paired_kernel_back_counts_each_weight_twice():
    """Each weight sits at two places of the paired kernel: folding the kernel itself gives 2w exactly, and a
    gradient with a one at a single place gives that place's weight a one."""
    w = np.random.default_rng(3).standard_normal((8, 3, 3, 16))
    np.testing.assert_array_equal(pixel_pairs.pixel_pair_weight_gradient(pixel_pairs.pixel_pair_weight(w)), 2 * w)
    one = np.zeros((16, 3, 3, 32))
    one[8 + 2, 1, 2, 5] = 1.0              # output pixel 1, channel 2; the pair to the right; its left pixel, channel 5
    expected = np.zeros((8, 3, 3, 16))
    expected[2, 1, 2, 5] = 1.0             # tap 2j + q - p - 1 = 4 + 0 - 1 - 1 = 2
    np.testing.assert_array_equal(pixel_pairs.pixel_pair_weight_gradient(one), expected)


@pytest.mark.parametrize("layout,x_shape,w_shape,stride,pad,expected", [
    ("NHWC", (128, 32, 32, 16), (16, 3, 3, 16), 1, 1, True),     # stage 1
    ("NHWC", (128, 32, 32, 3), (16, 3, 3, 3), 1, 1, False),      # the stem: 3 channels in
    ("NHWC", (128, 32, 32, 8), (16, 3, 3, 3), 1, 1, False),      # the stem on a padded input (--padded-input)
    ("NHWC", (128, 16, 16, 32), (32, 3, 3, 32), 1, 1, False),    # stage 2: already wide
    ("NHWC", (128, 32, 32, 16), (32, 3, 3, 16), 2, 1, False),    # a stride-2 convolution
    ("NHWC", (128, 32, 31, 16), (16, 3, 3, 16), 1, 1, False),    # an odd width
    ("NHWC", (128, 32, 32, 16), (16, 1, 1, 16), 1, 0, False),    # a 1x1 window
    ("NCHW", (128, 16, 32, 32), (16, 16, 3, 3), 1, 1, False),    # channels first: no pairs in memory
])
def test_which_convolutions_run_on_pixel_pairs(layout, x_shape, w_shape, stride, pad, expected):
    assert pixel_pairs.applies(layout, x_shape, w_shape, stride, pad) is expected
