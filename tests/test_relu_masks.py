"""tests/relu_masks.py on the CPU: a float32 NumPy model stands in for the GPU against the float64 reference."""
import numpy as np
import pytest

from cupynet.backends.numpy_backend import NumpyBackend
from cupynet.model import ResNet
from relu_masks import NEAR_ZERO, relu_batchnorms, relu_input, share_relu_masks


def batch(seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((8, 3, 16, 16)).astype(np.float32), rng.integers(0, 10, 8).astype(np.int32)


def forward_pair(seed):
    """(float32 model, float64 reference with its weights), both after forward_loss on the seed's batch."""
    x, labels = batch(seed)
    model = ResNet(NumpyBackend("NCHW", "float32"), 20, "v1")
    model.init(np.random.default_rng(0))
    model.forward_loss(x, labels)
    return model, reference(model, x, labels)


def reference(model, x, labels):
    """A float64 copy of the model, after forward_loss on the same batch."""
    ref = ResNet(NumpyBackend("NCHW", "float64"), 20, "v1")
    ref.init(np.random.default_rng(0))
    ref.params.load_state_dict(model.params.state_dict())
    ref.forward_loss(x.astype(np.float64), labels)
    return ref


def worst_gradient_error(model, ref):
    grads = model.params.state_dict(flat=model.params.grad_flat)
    expected = ref.params.state_dict(flat=ref.params.grad_flat)
    return max(np.linalg.norm(grads[k] - expected[k]) / np.linalg.norm(expected[k]) for k in expected)


def test_every_relu_batchnorm_of_resnet20_is_found():
    model, _ = forward_pair(0)
    names = relu_batchnorms(model)
    assert len(names) == 1 + 2 * 9 and "stem/bn" in names and "stage3/block2/bn2" in names


@pytest.mark.parametrize("seed", [1, 9, 15])      # their closest ties: 1.2e-6, 1.7e-6, 1.1e-6 of the rms
def test_the_reference_with_shared_masks_matches_to_float32_rounding_across_a_tie(seed):
    """A tie made on purpose (natural ones come and go with the BLAS): the float32 model puts the reference's
    positive output nearest 0 (relative to its layer's rms) at 0, as the H100 did with a value 1.9e-6 from 0."""
    model, ref = forward_pair(seed)

    def nearest_zero(layer):
        positive = np.where(layer.y > 0, layer.y, np.inf) / np.sqrt(np.mean(np.square(layer.y)))
        k = int(np.argmin(positive))
        return float(positive.flat[k]), k

    (closeness, k), name = min((nearest_zero(layer), name) for name, layer in relu_batchnorms(ref).items())
    assert closeness <= NEAR_ZERO                          # a tie indeed
    relu_batchnorms(model)[name].y.flat[k] = 0.0
    unshared = reference(model, *batch(seed))          # the same reference, with its own masks
    unshared.backward()
    model.backward()
    assert share_relu_masks(model, ref, model.be) >= 1
    ref.backward()
    assert worst_gradient_error(model, ref) < 1e-5                 # float32 rounding only
    assert worst_gradient_error(model, unshared) > 1e-3            # what the one mask costs: 4e-3 to 3e-2


def test_a_mask_that_differs_beyond_rounding_is_an_error():
    model, ref = forward_pair(0)
    y = relu_batchnorms(model)["stage2/block1/bn1"].y
    y.flat[int(np.argmax(y))] = 0.0                 # the largest output: a real difference, not a tie
    with pytest.raises(AssertionError, match="stage2/block1/bn1: 1 relu masks differ"):
        share_relu_masks(model, ref, model.be)


def test_a_reference_input_far_below_0_is_no_tie_even_where_the_model_is_near_it():
    model, ref = forward_pair(0)
    name = "stage1/block0/bn1"
    k = int(np.argmin(relu_input(relu_batchnorms(ref)[name])))     # the reference's most negative relu input
    relu_batchnorms(model)[name].y.flat[k] = 1e-7                   # the model: just above 0
    with pytest.raises(AssertionError, match=f"{name}: 1 relu masks differ"):
        share_relu_masks(model, ref, model.be)
