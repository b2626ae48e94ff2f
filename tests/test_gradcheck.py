"""Finite-difference gradient checks (float64, random directions) for every layer and whole ResNets.

Each layer case builds the layer on a float64 NumPy backend, defines L = sum(layer(x) * r) for a fixed
random r (so dL/dy = r), and compares the central difference of L along random directions over the
input and all the layer's parameters with the analytic backward. Tolerance: see cupynet/gradcheck.py.
"""
import numpy as np
import pytest

from cupynet.backends.numpy_backend import NumpyBackend
from cupynet.gradcheck import check_directional_gradients
from cupynet.layers import BatchNorm, Conv2d, Dense, GlobalAvgPool, ReLU, ShortcutA
from cupynet.model import ResNet
from cupynet.optim import MomentumSGD
from cupynet.params import ParamStore

LAYOUTS = ["NCHW", "NHWC"]


def make_backend(layout, wgrad_chunks=1):
    return NumpyBackend(layout=layout, dtype="float64", wgrad_chunks=wgrad_chunks)


def away_from_zero(a, margin=0.05):
    """Push values out of (-margin, margin): finite differences must not straddle a ReLU kink."""
    return np.where(a >= 0, a + margin, a - margin)


def check_layer(be, layer, params, x, rng):
    """Gradcheck L = sum(layer.forward(x) * r) w.r.t. x and every parameter of `params`."""
    if params.flat is None:
        params.allocate(rng)
    y = layer.forward(x, train=True)
    r = rng.standard_normal(y.shape)

    def loss():
        return float(np.sum(layer.forward(x, train=True) * r))

    def grads():
        layer.forward(x, train=True)
        dx = layer.backward(r)
        return ([dx] if dx is not None else []) + [params.grad_flat]

    arrays = [x, params.flat] if layer_has_input_grad(layer) else [params.flat]
    result = check_directional_gradients(loss, grads, arrays, rng)
    assert result.ok, result.report()


def layer_has_input_grad(layer):
    return getattr(layer, "input_grad", True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ksize,stride,cin,cout,size", [
    (3, 1, 3, 4, 6),     # 3x3 "same" conv
    (3, 2, 4, 6, 6),     # 3x3 stride 2, even input
    (3, 2, 2, 3, 7),     # 3x3 stride 2, odd input (bottom/right rows never reached)
    (1, 2, 4, 8, 6),     # 1x1 projection with stride 2
    (1, 1, 3, 5, 5),     # 1x1 stride 1
])
def test_conv2d(layout, ksize, stride, cin, cout, size):
    be, rng = make_backend(layout), np.random.default_rng(1)
    params = ParamStore(be)
    conv = Conv2d(be, params, "conv", cin, cout, ksize, stride)
    x = rng.standard_normal(be.activation_shape(2, cin, size, size))
    check_layer(be, conv, params, x, rng)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_training(layout, relu):
    be, rng = make_backend(layout), np.random.default_rng(2)
    params, state = ParamStore(be), ParamStore(be, with_grads=False)
    bn = BatchNorm(be, params, state, "bn", 3, decay=0.9, eps=1e-5, relu=relu)
    params.allocate(rng)
    state.allocate(rng)
    params["bn/gamma"].value[...] = rng.uniform(0.5, 1.5, 3)
    params["bn/beta"].value[...] = rng.uniform(-0.5, 0.5, 3)
    x = rng.standard_normal(be.activation_shape(4, 3, 3, 3)) * 2 + 1
    check_layer(be, bn, params, x, rng)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_relu(layout):
    be, rng = make_backend(layout), np.random.default_rng(3)
    params = ParamStore(be)
    x = away_from_zero(rng.standard_normal(be.activation_shape(2, 3, 4, 4)))
    check_layer(be, ReLU(be, "relu"), params, x, rng)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cin,cout,stride,size", [(4, 8, 2, 6), (2, 6, 2, 5), (4, 8, 1, 4)])
def test_option_a_shortcut(layout, cin, cout, stride, size):
    be, rng = make_backend(layout), np.random.default_rng(4)
    params = ParamStore(be)
    x = rng.standard_normal(be.activation_shape(2, cin, size, size))
    check_layer(be, ShortcutA(be, "sc", cin, cout, stride), params, x, rng)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_global_avgpool(layout):
    be, rng = make_backend(layout), np.random.default_rng(5)
    x = rng.standard_normal(be.activation_shape(3, 4, 5, 5))
    check_layer(be, GlobalAvgPool(be, "pool"), ParamStore(be), x, rng)


def test_dense():
    be, rng = make_backend("NHWC"), np.random.default_rng(6)
    params = ParamStore(be)
    dense = Dense(be, params, "fc", 7, 10)
    params.allocate(rng)
    params["fc/b"].value[...] = rng.standard_normal(10)
    check_layer(be, dense, params, rng.standard_normal((4, 7)), rng)


def test_softmax_cross_entropy():
    be, rng = make_backend("NHWC"), np.random.default_rng(7)
    logits = rng.standard_normal((5, 10)) * 3
    labels = rng.integers(0, 10, 5).astype(np.int32)
    loss, dlogits = be.zeros(()), be.zeros((5, 10))

    def loss_fn():
        return float(be.softmax_cross_entropy(logits, labels, loss, dlogits))

    def grad_fn():
        loss_fn()
        return [dlogits]

    result = check_directional_gradients(loss_fn, grad_fn, [logits], rng)
    assert result.ok, result.report()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block,depth,wgrad_chunks", [("v1", 8, 1), ("v2", 8, 1), ("bottleneck", 11, 1),
                                                      ("v1", 8, 2), ("v1", 8, 4)])
def test_whole_resnet_through_the_loss(layout, block, depth, wgrad_chunks):
    """End to end: stem, every block kind with its shortcuts (stride 2 stages), pool, dense, softmax-CE.
    With wgrad_chunks > 1 every convolution's weight gradient is the sum of per-slice gradients of the
    3-image batch (1 + 2 images; with 4 chunks one slice is empty), added by ParamStore."""
    be, rng = make_backend(layout, wgrad_chunks), np.random.default_rng(8)
    model = ResNet(be, depth, block, bn_decay=0.9)
    model.init(rng)
    x = rng.standard_normal(be.activation_shape(3, 3, 8, 8))
    labels = rng.integers(0, 10, 3).astype(np.int32)

    def loss_fn():
        return float(model.forward_backward(x, labels))

    def grad_fn():
        model.forward_backward(x, labels)
        return [model.params.grad_flat]

    result = check_directional_gradients(loss_fn, grad_fn, [model.params.flat], rng, num_directions=4)
    assert result.ok, result.report()
    assert be.calls["sum_chunks"] == (0 if wgrad_chunks == 1 else be.calls["wait_for_gradients"])


def test_weight_decay_is_the_gradient_of_half_wd_squared_norm():
    """The optimizer adds wd * v: the gradient of the reference's 0.5 * wd * ||v||^2 term, for every variable."""
    be, rng = make_backend("NHWC"), np.random.default_rng(9)
    model = ResNet(be, 8, "v1", bn_decay=0.9)
    model.init(rng)
    wd = 0.05
    opt = MomentumSGD(be, model.params, momentum=0.0, weight_decay=wd)
    x = rng.standard_normal(be.activation_shape(2, 3, 8, 8))
    labels = np.array([1, 7], dtype=np.int32)
    def total_loss():
        return float(model.forward_backward(x, labels)) + float(opt.l2_penalty())

    def effective_gradient():
        """What the update applied: (v_before - v_after) / lr with momentum 0 is grad + wd * v."""
        model.forward_backward(x, labels)
        before = model.params.flat.copy()
        opt.set_learning_rate(1.0)
        opt.step()
        applied = before - model.params.flat
        model.params.flat[...] = before
        opt.accumulator[...] = 0
        return [applied]

    result = check_directional_gradients(total_loss, effective_gradient, [model.params.flat], rng)
    assert result.ok, result.report()
