"""The reference backend's primitives against direct, loop-based definitions and against each other.

Gradient checks (test_gradcheck.py) prove backward matches forward; these prove forward computes the
intended function: a convolution equals the textbook sum, both layouts agree, BatchNorm's moving
statistics follow the documented update, augmentation crops and flips as the reference does, and the
optimizer is the reference's momentum form.
"""
import numpy as np
import pytest

from cupynet.backends.numpy_backend import NumpyBackend
from cupynet.sampling import crop_flip_draws

LAYOUTS = ["NCHW", "NHWC"]


def to_layout(be, x_nchw):
    return x_nchw if be.layout == "NCHW" else np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))


def to_nchw(be, x):
    return x if be.layout == "NCHW" else x.transpose(0, 3, 1, 2)


def direct_conv(x, w, stride, pad):
    """The definition: y[n,k,i,j] = sum_{c,r,s} xpad[n,c,i*stride+r,j*stride+s] * w[k,c,r,s] (NCHW, KCRS)."""
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - r) // stride + 1, (wd + 2 * pad - s) // stride + 1
    y = np.zeros((n, k, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * stride:i * stride + r, j * stride:j * stride + s]
            y[:, :, i, j] = np.einsum("ncrs,kcrs->nk", patch, w)
    return y


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ksize,stride,size", [(3, 1, 5), (3, 2, 6), (3, 2, 7), (1, 2, 6)])
def test_conv_forward_is_the_textbook_sum(layout, ksize, stride, size):
    be, rng = NumpyBackend(layout, "float64"), np.random.default_rng(0)
    x = rng.standard_normal((2, 3, size, size))
    w = rng.standard_normal((4, 3, ksize, ksize))
    pad = ksize // 2
    expected = direct_conv(x, w, stride, pad)
    y = be.empty(be.activation_shape(2, 4, *expected.shape[2:]))
    be.conv2d_forward(to_layout(be, x), np.ascontiguousarray(be.weight_from_canonical(w)), stride, pad, y)
    np.testing.assert_allclose(to_nchw(be, y), expected, rtol=1e-12, atol=1e-12)   # float64: exact up to rounding
    assert be.calls["conv2d_forward"] == 1


def test_layouts_agree_on_every_primitive_of_a_training_step():
    """A whole float64 ResNet step in NCHW and in NHWC from the same canonical weights: same loss, same grads."""
    from cupynet.model import ResNet
    results = {}
    rng = np.random.default_rng(1)
    x_nchw = rng.standard_normal((4, 3, 8, 8))
    labels = rng.integers(0, 10, 4).astype(np.int32)
    for layout in LAYOUTS:
        be = NumpyBackend(layout, "float64")
        model = ResNet(be, 8, "v1")
        model.init(np.random.default_rng(2))           # same seed: same canonical weights
        loss = float(model.forward_backward(to_layout(be, x_nchw), labels))
        results[layout] = (loss, model.params.state_dict(flat=model.params.grad_flat))
    (loss_a, grads_a), (loss_b, grads_b) = results["NCHW"], results["NHWC"]
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    for name in grads_a:
        np.testing.assert_allclose(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm_statistics_and_moving_averages(layout):
    be, rng = NumpyBackend(layout, "float64"), np.random.default_rng(3)
    x_nchw = rng.standard_normal((5, 3, 4, 4)) * np.array([1.0, 2.0, 3.0])[None, :, None, None] + 7
    x = to_layout(be, x_nchw)
    gamma, beta = np.array([1.0, 2.0, 0.5]), np.array([0.0, -1.0, 3.0])
    moving_mean, moving_var = np.zeros(3), np.ones(3)
    mean, invstd, y = np.empty(3), np.empty(3), np.empty_like(x)
    be.batchnorm_train_forward(x, gamma, beta, moving_mean, moving_var, 0.9, 1e-5, y, mean, invstd)
    batch_mean = x_nchw.mean(axis=(0, 2, 3))
    batch_var = x_nchw.var(axis=(0, 2, 3))
    m = 5 * 4 * 4
    np.testing.assert_allclose(mean, batch_mean, rtol=1e-12)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(batch_var + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(moving_mean, 0.1 * batch_mean, rtol=1e-12)
    np.testing.assert_allclose(moving_var, 0.9 + 0.1 * batch_var * m / (m - 1), rtol=1e-12)   # unbiased
    expected = (x_nchw - batch_mean[None, :, None, None]) / np.sqrt(batch_var + 1e-5)[None, :, None, None]
    expected = expected * gamma[None, :, None, None] + beta[None, :, None, None]
    np.testing.assert_allclose(to_nchw(be, y), expected, rtol=1e-10, atol=1e-12)
    # evaluation uses the moving statistics, with the fused ReLU
    be.batchnorm_infer_forward(x, gamma, beta, moving_mean, moving_var, 1e-5, y, relu=True)
    expected = (x_nchw - moving_mean[None, :, None, None]) / np.sqrt(moving_var + 1e-5)[None, :, None, None]
    expected = np.maximum(expected * gamma[None, :, None, None] + beta[None, :, None, None], 0)
    np.testing.assert_allclose(to_nchw(be, y), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm_with_a_residual_is_a_post_activation_blocks_tail(layout):
    """relu(bn(x) + s) in one primitive equals BatchNorm, then the sum, then relu; and the input gradient
    of such a block, relu_backward_add, is the addend plus dy masked by the block's output."""
    be, rng = NumpyBackend(layout, "float64"), np.random.default_rng(4)
    x, s = (to_layout(be, rng.standard_normal((4, 3, 5, 5))) for _ in range(2))
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.uniform(-0.5, 0.5, 3)
    stats = lambda: (np.zeros(3), np.ones(3), np.empty(3), np.empty(3))
    fused, plain = np.empty_like(x), np.empty_like(x)
    mm, mv, mean, invstd = stats()
    be.batchnorm_train_forward(x, gamma, beta, mm, mv, 0.9, 1e-5, fused, mean, invstd, relu=True, residual=s)
    mm2, mv2, mean2, invstd2 = stats()
    be.batchnorm_train_forward(x, gamma, beta, mm2, mv2, 0.9, 1e-5, plain, mean2, invstd2)
    np.testing.assert_array_equal(fused, np.maximum(plain + s, 0))
    np.testing.assert_array_equal(mean, mean2)
    be.batchnorm_infer_forward(x, gamma, beta, mm, mv, 1e-5, fused, relu=True, residual=s)
    be.batchnorm_infer_forward(x, gamma, beta, mm, mv, 1e-5, plain)
    np.testing.assert_array_equal(fused, np.maximum(plain + s, 0))
    with pytest.raises(ValueError, match="residual of shape"):
        be.batchnorm_infer_forward(x, gamma, beta, mm, mv, 1e-5, fused, relu=True, residual=s[:2])

    dy, addend, dx = rng.standard_normal(x.shape), rng.standard_normal(x.shape), np.empty_like(x)
    be.relu_backward_add(dy, fused, addend, dx)
    np.testing.assert_array_equal(dx, addend + np.where(fused > 0, dy, 0.0))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_option_a_shortcut_pools_and_pads_channels_symmetrically(layout):
    be = NumpyBackend(layout, "float64")
    x_nchw = np.arange(1 * 2 * 4 * 4, dtype=np.float64).reshape(1, 2, 4, 4)
    y = be.empty(be.activation_shape(1, 6, 2, 2))
    be.shortcut_forward(to_layout(be, x_nchw), 2, y)
    y = to_nchw(be, y)
    assert np.all(y[:, :2] == 0) and np.all(y[:, 4:] == 0)          # (6 - 2) // 2 = 2 zero channels each side
    np.testing.assert_array_equal(y[0, 2], [[2.5, 4.5], [10.5, 12.5]])  # means of the 2x2 windows


def test_augmentation_without_distortion_only_normalizes():
    be = NumpyBackend("NCHW", "float32")
    images = np.random.default_rng(4).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(6, dtype=np.int32)
    x, y = be.empty((2, 3, 32, 32)), be.empty((2,), np.int32)
    be.augment_batch(images, labels, np.array([4, 1]), 0, 0, False, x, y)
    np.testing.assert_array_equal(x, images[[4, 1]].transpose(0, 3, 1, 2).astype(np.float32) / 128 - 1)
    np.testing.assert_array_equal(y, [4, 1])


def test_augmentation_is_a_padded_crop_and_flip_as_drawn():
    be = NumpyBackend("NHWC", "float32")
    images = np.random.default_rng(5).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(8, dtype=np.int32)
    rows = np.array([3, 0, 7, 5, 1, 2, 6, 4])
    x, y = be.empty((8, 32, 32, 3)), be.empty((8,), np.int32)
    be.augment_batch(images, labels, rows, seed=11, step=42, distort=True, x_out=x, labels_out=y)
    dy, dx, flip = crop_flip_draws(11, 42, 8, 9)
    for b, row in enumerate(rows):
        padded = np.zeros((40, 40, 3), np.uint8)        # zero padding becomes -1 after normalization
        padded[4:36, 4:36] = images[row]
        crop = padded[dy[b]:dy[b] + 32, dx[b]:dx[b] + 32]
        if flip[b]:
            crop = crop[:, ::-1]
        np.testing.assert_array_equal(x[b], crop.astype(np.float32) / 128 - 1)
    assert 0 < flip.sum() < 8 and len(set(zip(dy, dx))) > 1       # the draws do vary
    again = be.empty((8, 32, 32, 3))
    be.augment_batch(images, labels, rows, 11, 42, True, again, y)
    np.testing.assert_array_equal(again, x)                          # a pure function of (seed, step)
    be.augment_batch(images, labels, rows, 11, 43, True, again, y)
    assert not np.array_equal(again, x)


def test_sgd_momentum_is_the_reference_form():
    be = NumpyBackend("NHWC", "float64")
    params = np.array([1.0, -2.0, 3.0])
    grads = np.array([0.5, 0.25, -1.0])
    accum = np.array([0.1, 0.0, -0.2])
    lr = np.array(0.1)
    g = grads + 1e-2 * params
    expected_accum = 0.9 * np.array([0.1, 0.0, -0.2]) + g
    expected_params = params - 0.1 * expected_accum
    be.sgd_momentum_update(params, grads, accum, lr, 0.9, 1e-2)
    np.testing.assert_allclose(accum, expected_accum, rtol=1e-15)
    np.testing.assert_allclose(params, expected_params, rtol=1e-15)


def test_count_correct_counts_only_valid_rows():
    be = NumpyBackend("NHWC", "float32")
    logits = np.eye(10, dtype=np.float32)[[1, 2, 3, 4]]
    labels = np.array([1, 2, 0, 4], dtype=np.int32)
    correct = np.zeros((), np.int64)
    be.count_correct(logits, labels, 3, correct)
    assert int(correct) == 2


def test_training_augmentation_reads_its_step_and_rows_from_the_counter():
    """augment_train_batch at counter value s is augment_batch of rows (s % steps) * B + first_row ...
    of the epoch's order, with the draws of step s; advance_step moves to the next batch."""
    be = NumpyBackend("NHWC", "float32")
    images = np.random.default_rng(6).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(20, dtype=np.int32) % 10
    order = np.random.default_rng(7).permutation(20)
    counter = np.array(7, dtype=np.int64)               # step 7 of an epoch of 20 // 6 = 3 steps: position 1
    x, y = be.empty((3, 32, 32, 3)), be.empty((3,), np.int32)
    be.augment_train_batch(images, labels, order, counter, 3, 6, 3, 11, True, x, y)    # second half of the batch
    expected, expected_labels = be.empty((3, 32, 32, 3)), be.empty((3,), np.int32)
    be.augment_batch(images, labels, order[9:12], 11, 7, True, expected, expected_labels, first_row=3)
    np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(y, expected_labels)

    be.advance_step(counter)
    assert counter == 8
    be.augment_train_batch(images, labels, order, counter, 3, 6, 3, 11, True, x, y)
    be.augment_batch(images, labels, order[15:18], 11, 8, True, expected, expected_labels, first_row=3)
    np.testing.assert_array_equal(x, expected)
    with pytest.raises(ValueError, match="do not fit"):    # 4 steps of 6 rows need 24 images, not 20
        be.augment_train_batch(images, labels, order, counter, 4, 6, 3, 11, True, x, y)
