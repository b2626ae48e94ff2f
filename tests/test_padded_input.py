"""The stem on an input padded to a 16-byte pixel (--padded-input, cupynet/backends/padded_input.py), on the CPU:
the rewrite is exact, checked with the float64 NumPy reference's own convolutions; which shapes count as padded.
The GPU kernels and the training runs: tests/test_gpu_parity.py and tests/test_step_options_gpu.py."""
import numpy as np
import pytest

from cupynet.backends import padded_input
from cupynet.backends.numpy_backend import NumpyBackend


@pytest.mark.parametrize("channels,dtype,expected", [
    (3, np.float32, 4), (3, np.float16, 8),          # float16 stands in for bfloat16 (2 bytes) without ml_dtypes
    (4, np.float32, 4), (5, np.float32, 8), (8, np.float16, 8), (9, np.float16, 16),
])
def test_padded_channels_fill_whole_16_byte_vectors(channels, dtype, expected):
    assert padded_input.padded_channels(channels, dtype) == expected


def test_which_inputs_are_padded():
    assert padded_input.is_padded("NHWC", (4, 32, 32, 8), (16, 3, 3, 3))
    assert not padded_input.is_padded("NHWC", (4, 32, 32, 16), (16, 3, 3, 16))
    assert not padded_input.is_padded("NCHW", (4, 3, 32, 32), (16, 3, 3, 3))      # NCHW is never padded
    with pytest.raises(ValueError, match="fewer channels"):
        padded_input.is_padded("NHWC", (4, 32, 32, 3), (16, 3, 3, 8))


def test_zero_channels_change_neither_the_output_nor_the_real_weights_gradient():
    """The stem's forward on x padded by zero channels with w padded by zero channels is the forward on x; the
    padded weight gradient's first C channels are the real one and the rest are exactly zero."""
    ref = NumpyBackend("NHWC", "float64")
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 6, 6, 3))
    w = rng.standard_normal((16, 3, 3, 3))
    dy = rng.standard_normal((3, 6, 6, 16))
    x_padded = np.concatenate([x, np.zeros((3, 6, 6, 5))], axis=-1)
    w_padded = np.concatenate([w, np.zeros((16, 3, 3, 5))], axis=-1)
    y = ref.conv2d_forward(x, w, 1, 1, np.empty((3, 6, 6, 16)))
    y_padded = ref.conv2d_forward(x_padded, w_padded, 1, 1, np.empty((3, 6, 6, 16)))
    np.testing.assert_allclose(y_padded, y, rtol=1e-13, atol=1e-13)
    dw = ref.conv2d_backward_filter(x, dy, 1, 1, np.empty(w.shape))
    dw_padded = ref.conv2d_backward_filter(x_padded, dy, 1, 1, np.empty(w_padded.shape))
    np.testing.assert_allclose(dw_padded[..., :3], dw, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(dw_padded[..., 3:], 0.0)
