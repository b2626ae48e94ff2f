"""The ResNet builder (depth rules, shapes, parameter counts), the ParamStore, the LR schedule, and
learning on the built-in sample."""
import numpy as np
import pytest

from cupynet.backends.numpy_backend import NumpyBackend
from cupynet.config import TrainConfig
from cupynet.data import builtin_sample_dir, load_cifar10, synthetic_dataset
from cupynet.errors import ConfigError
from cupynet.model import ResNet, blocks_per_stage
from cupynet.optim import PiecewiseConstant
from cupynet.params import ALIGN_ELEMENTS
from cupynet.trainer import Trainer


@pytest.mark.parametrize("depth,block,n", [(20, "v1", 3), (32, "v2", 5), (44, "v1", 7), (56, "v1", 9),
                                           (110, "v2", 18), (29, "bottleneck", 3), (164, "bottleneck", 18)])
def test_valid_depths(depth, block, n):
    assert blocks_per_stage(depth, block) == n


@pytest.mark.parametrize("depth,block", [(21, "v1"), (2, "v1"), (0, "v2"), (44, "bottleneck"), (21, "bottleneck")])
def test_invalid_depths_are_rejected_with_the_rule(depth, block):
    with pytest.raises(ValueError, match=r"\dn\+2"):
        blocks_per_stage(depth, block)


def count_convs_and_params(depth, block):
    model = ResNet(NumpyBackend("NHWC", "float32"), depth, block)
    convs = [name for name in model.params.params if name.endswith("/w") and "logits" not in name
             and "shortcut" not in name]
    return len(convs), model.params.num_elements


@pytest.mark.parametrize("depth,block", [(20, "v1"), (44, "v1"), (56, "v2"), (29, "bottleneck")])
def test_depth_counts_weighted_layers(depth, block):
    """6n+2 / 9n+2 = the convs on the main path + the dense layer (projection shortcuts not counted)."""
    convs, _ = count_convs_and_params(depth, block)
    assert convs + 1 == depth


def test_parameter_counts_match_he_et_al():
    """He et al. (2015) Table 6: ResNet-20 0.27M, ResNet-44 0.66M, ResNet-110 1.7M parameters."""
    assert count_convs_and_params(20, "v1")[1] == pytest.approx(0.27e6, rel=0.01)
    assert count_convs_and_params(44, "v1")[1] == pytest.approx(0.66e6, rel=0.01)
    assert count_convs_and_params(110, "v1")[1] == pytest.approx(1.7e6, rel=0.02)


def test_param_views_are_aligned_and_disjoint():
    model = ResNet(NumpyBackend("NHWC", "float32"), 8, "v1")
    model.init(np.random.default_rng(0))
    spans = sorted((p.offset, p.offset + p.size) for p in model.params)
    assert all(offset % ALIGN_ELEMENTS == 0 for offset, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    flat = model.params.flat
    for p in model.params:               # every view really points into the flat buffer
        assert np.shares_memory(p.value, flat) and np.shares_memory(p.grad, model.params.grad_flat)


# (init, std * sqrt(fan_in) of a 3x3 conv from C to C channels, of the 3-channel stem)
CONV_INIT_SCALES = [("he_normal", np.sqrt(2), np.sqrt(2)), ("glorot_uniform", 1.0, np.sqrt(2 * 27 / (27 + 144))),
                    ("pytorch_default", np.sqrt(1 / 3), np.sqrt(1 / 3))]


@pytest.mark.parametrize("conv_init,square,stem", CONV_INIT_SCALES)
def test_conv_init_sets_the_weights_scale(conv_init, square, stem):
    """--conv-init: every convolution weight has its documented standard deviation (the 36,864 weights of a
    64-channel conv to 2%, the stem's 432 to 10%); the dense layer and BatchNorm start the same whatever it is."""
    model = ResNet(NumpyBackend("NCHW", "float32"), 20, "v1", conv_init=conv_init)
    model.init(np.random.default_rng(0))
    assert model.params["stage3/block2/conv2/w"].value.std() * np.sqrt(9 * 64) == pytest.approx(square, rel=0.02)
    assert model.params["stem/conv/w"].value.std() * np.sqrt(27) == pytest.approx(stem, rel=0.1)
    reference = ResNet(NumpyBackend("NCHW", "float32"), 20, "v1")
    reference.init(np.random.default_rng(0))
    for name in ("logits/b", "stage1/block0/bn1/gamma", "stage1/block0/bn1/beta"):
        np.testing.assert_array_equal(model.params[name].value, reference.params[name].value)


def test_an_unknown_conv_init_is_refused():
    with pytest.raises(ValueError, match="conv_init must be one of he_normal"):
        ResNet(NumpyBackend("NCHW", "float32"), 8, "v1", conv_init="orthogonal")


@pytest.mark.parametrize("block,depth", [("v1", 20), ("v2", 8), ("bottleneck", 11)])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_logits_shape_and_initial_loss(block, depth, layout):
    be = NumpyBackend(layout, "float32")
    model = ResNet(be, depth, block)
    model.init(np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal(be.activation_shape(8, 3, 32, 32)).astype(np.float32)
    assert model.forward(x, train=False).shape == (8, 10)
    loss = float(model.forward_backward(x, np.arange(8, dtype=np.int32)))
    assert 1.0 < loss < 6.0           # ~ln(10) = 2.3 for an untrained 10-way classifier


def test_piecewise_schedule_boundaries_in_epochs():
    schedule = PiecewiseConstant.from_epochs([82, 123, 300], [0.1, 0.01, 0.001, 0.0002], steps_per_epoch=351)
    assert schedule.boundaries == [82 * 351, 123 * 351, 300 * 351]
    assert schedule(0) == 0.1 and schedule(82 * 351 - 1) == 0.1
    assert schedule(82 * 351) == 0.01 and schedule(123 * 351) == 0.001 and schedule(10 ** 7) == 0.0002


def test_loss_decreases_on_the_builtin_sample():
    """Training on the sample lowers the loss of a fixed batch of its images (measured before and after)."""
    dataset = load_cifar10(builtin_sample_dir())
    config = TrainConfig(num_layers=8, train_batch_size=32, bn_decay=0.9, distortion=False)
    be = NumpyBackend("NHWC", "float32")
    trainer = Trainer(config, dataset, be)
    x, labels = be.empty((128, 32, 32, 3)), be.empty((128,), np.int32)
    be.augment_batch(dataset.train.images, dataset.train.labels, np.arange(128), 0, 0, False, x, labels)
    before = float(trainer.model.forward_backward(x, labels))
    for _ in range(30):
        trainer.train_step()
    after = float(trainer.model.forward_backward(x, labels))
    assert after < before - 0.25, (before, after)


def test_evaluation_counts_every_image_exactly_once():
    """Eval batches of 64 over 500 test images (the last batch holds 52) give the same counts as one
    batch of all 500, so no image is skipped or counted twice."""
    dataset = load_cifar10(builtin_sample_dir())
    results = {}
    for eval_batch in (64, 500):
        config = TrainConfig(num_layers=8, train_batch_size=32, eval_batch_size=eval_batch, bn_decay=0.9)
        trainer = Trainer(config, dataset, NumpyBackend("NHWC", "float32"))
        for _ in range(5):
            trainer.train_step()
        results[eval_batch] = trainer.evaluate(dataset.test)
    assert results[64]["images"] == results[500]["images"] == 500
    assert results[64]["correct"] == results[500]["correct"]
    assert results[64]["loss"] == pytest.approx(results[500]["loss"], rel=1e-5)


def test_cuda_graph_mode_on_the_cpu_backend():
    """auto means eager on the CPU; 'on' is refused with a one-line reason (the CLI checks it before any write)."""
    dataset = synthetic_dataset(num_train=32, num_test=8, seed=0)
    be = NumpyBackend("NHWC", "float32")
    auto = Trainer(TrainConfig(num_layers=8, train_batch_size=8, synthetic=True), dataset, be)
    assert not auto.runner.capture
    auto.train_step()
    assert auto.runner.eager_steps == 1 and not auto.runner.captured
    with pytest.raises(ConfigError, match="--cuda-graph on.*CPU backend"):
        Trainer(TrainConfig(num_layers=8, train_batch_size=8, synthetic=True, cuda_graph="on"), dataset, be)


def test_float32_gradients_stay_at_float32_rounding_of_the_float64_ones():
    """The reference's float32 ResNet-8 gradients against float64, same weights and batch (norm-wise).

    BatchNorm's per-channel sums run over N*H*W = 16,384 terms here; accumulated sequentially in float32
    they once cost 1.3e-3 of the first layers' gradients. Summed per image and then in float64, the
    difference is float32 rounding through the network: measured 5.5e-7; the bound is 1e-5."""
    dataset = synthetic_dataset(num_train=64, num_test=8, seed=3)
    config = TrainConfig(num_layers=8, train_batch_size=16, synthetic=True, seed=5)

    def gradient(dtype):
        trainer = Trainer(config, dataset, NumpyBackend("NHWC", dtype))
        trainer.compute_gradients()
        return trainer.model.params.grad_flat.astype(np.float64)

    exact, rounded = gradient("float64"), gradient("float32")
    assert np.linalg.norm(rounded - exact) / np.linalg.norm(exact) < 1e-5


# (block, depth, convolutions followed by a BatchNorm: v1 every one (stem + 2 per block), v2 each block's
# first, bottleneck each block's first two)
GENSTATS_PAIRS = [("v1", 8, 7), ("v2", 8, 3), ("bottleneck", 11, 6)]


@pytest.mark.parametrize("block,depth,pairs", GENSTATS_PAIRS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_batchnorm_statistics_from_the_convolutions_sums_train_as_before(block, depth, pairs, layout):
    """--conv-genstats on the reference: each convolution that feeds a BatchNorm also gives its sums, and
    the BatchNorm takes its statistics from them (unshifted sum and sum of squares instead of its own
    shifted pass). In float64 the two ways agree to rounding: the loss, every gradient, the saved and moving
    statistics; evaluation never asks for sums."""
    def run(genstats):
        be = NumpyBackend(layout, "float64", conv_genstats=genstats)
        model = ResNet(be, depth, block, bn_decay=0.9)
        model.init(np.random.default_rng(0))
        x = np.random.default_rng(1).standard_normal(be.activation_shape(8, 3, 32, 32))
        loss = float(model.forward_backward(x, np.arange(8, dtype=np.int32)))
        be.calls.clear()
        model.forward(x, train=False)
        assert be.calls["conv2d_forward_with_stats"] == 0
        return loss, model.params.grad_flat.copy(), model.state.flat.copy()

    fused_loss, fused_grads, fused_state = run(True)
    loss, grads, state = run(False)
    assert fused_loss == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(fused_grads, grads, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fused_state, state, rtol=1e-9, atol=1e-12)   # the moving mean and variance
    # counted in a training pass: every conv -> BatchNorm pair fused, the other BatchNorms as before
    be = NumpyBackend(layout, "float64", conv_genstats=True)
    model = ResNet(be, depth, block)
    model.init(np.random.default_rng(0))
    model.forward_backward(np.zeros(be.activation_shape(2, 3, 32, 32)), np.zeros(2, dtype=np.int32))
    batchnorms = sum(name.endswith("/gamma") for name in model.params.params)
    assert be.calls["conv2d_forward_with_stats"] == be.calls["batchnorm_train_from_sums"] == pairs
    assert be.calls["batchnorm_train_forward"] == batchnorms - pairs


# (block, depth, blocks whose input gradient also gives the sums of the BatchNorm before them): v1 each block
# with an identity shortcut (ResNet-20: stages of 3, the first block of stages 2 and 3 downsamples); none in
# the pre-activation nets, whose blocks end in a plain sum
RESIDUAL_SUMS = [("v1", 20, 7), ("v2", 8, 0), ("bottleneck", 11, 0)]


@pytest.mark.parametrize("block,depth,fused", RESIDUAL_SUMS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_batchnorm_gradient_sums_from_the_residual_add_train_exactly_as_before(block, depth, fused, layout):
    """--residual-grad-sums on the reference: a v1 block adding up its input gradient also reduces the
    gradient sums of the BatchNorm that made its input (the stem's, or the previous block's last), which then
    only computes its input gradient. The same arithmetic in another order of calls: in float64 the same bits."""
    def run(residual_grad_sums):
        be = NumpyBackend(layout, "float64", residual_grad_sums=residual_grad_sums)
        model = ResNet(be, depth, block)
        model.init(np.random.default_rng(0))
        x = np.random.default_rng(1).standard_normal(be.activation_shape(4, 3, 32, 32))
        loss = float(model.forward_backward(x, np.arange(4, dtype=np.int32)))
        batchnorms = sum(name.endswith("/gamma") for name in model.params.params)
        return loss, model.params.grad_flat.copy(), be.calls, batchnorms

    loss, grads, calls, batchnorms = run(True)
    plain_loss, plain_grads, plain_calls, _ = run(False)
    assert loss == plain_loss
    np.testing.assert_array_equal(grads, plain_grads)
    assert calls["relu_backward_add_bn_grad"] == calls["batchnorm_backward_dx"] == fused
    assert calls["batchnorm_backward"] == batchnorms - fused
    assert calls["relu_backward_add"] == plain_calls["relu_backward_add"] - fused
    assert plain_calls["relu_backward_add_bn_grad"] == plain_calls["batchnorm_backward_dx"] == 0


def test_sync_batchnorm_keeps_its_own_gradient_sums():
    """Sync BN all-reduces its gradient sums between its two halves: no block takes them over."""
    be = NumpyBackend("NHWC", "float64", residual_grad_sums=True)
    model = ResNet(be, 20, bn_comm=object())
    assert all(getattr(layer, "input_bn", None) is None for layer in model.layers)
    assert sum(getattr(layer, "input_bn", None) is not None for layer in ResNet(be, 20).layers) == 7


class MaskRecordingBackend(NumpyBackend):
    """The NumPy backend, noting for each BatchNorm training forward whether it ended in a relu with no residual
    before it, and for each backward whether the layer offered the relu's mask from x (beta)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu_alone, self.offered = {}, {}

    def batchnorm_train_forward(self, x, *args, relu=False, residual=None, **kwargs):
        self.relu_alone[id(x)] = relu and residual is None
        return super().batchnorm_train_forward(x, *args, relu=relu, residual=residual, **kwargs)

    def batchnorm_backward(self, dy, x, *args, y=None, beta=None, **kwargs):
        self.offered[id(x)] = beta is not None
        return super().batchnorm_backward(dy, x, *args, y=y, beta=beta, **kwargs)

    def relu_backward_add_bn_grad(self, dy, y, addend, dx, bn_x, *args, bn_y=None, beta=None):
        self.offered[id(bn_x)] = beta is not None
        return super().relu_backward_add_bn_grad(dy, y, addend, dx, bn_x, *args, bn_y=bn_y, beta=beta)

    def batchnorm_backward_dx(self, dy, x, *args, y=None, beta=None):
        assert self.offered[id(x)] == (beta is not None)     # as relu_backward_add_bn_grad was offered
        return super().batchnorm_backward_dx(dy, x, *args, y=y, beta=beta)


@pytest.mark.parametrize("block,depth", [("v1", 8), ("v2", 8), ("bottleneck", 11)])
@pytest.mark.parametrize("residual_grad_sums", [False, True], ids=["", "residual_grad_sums"])
def test_batchnorm_backward_gets_beta_exactly_where_no_residual_preceded_its_relu(block, depth, residual_grad_sums):
    """The GPU recomputes a fused relu's mask from x when the layer passes beta: right only where the relu
    followed BatchNorm alone (y > 0 exactly where the normalized x is), wrong after a residual sum. The same
    when a block's input gradient also reduces the BatchNorm before it (--residual-grad-sums)."""
    be = MaskRecordingBackend("NHWC", "float32", residual_grad_sums=residual_grad_sums)
    model = ResNet(be, depth, block)
    model.init(np.random.default_rng(0))
    model.forward_backward(np.zeros(be.activation_shape(2, 3, 32, 32), np.float32), np.zeros(2, dtype=np.int32))
    assert be.offered == be.relu_alone
    assert len(be.offered) == sum(name.endswith("/gamma") for name in model.params.params)
    assert any(be.offered.values())
    if block == "v1":       # post-activation: each block's second BatchNorm has the shortcut added before its relu
        assert not all(be.offered.values())
