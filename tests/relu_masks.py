"""A float64 reference's backward with another model's relu masks (for the whole-model GPU tests).

A pre-relu value within float32 rounding of 0 may land on either side of it in two models that round
differently; the one element's gradient then passes in one model only, and every gradient upstream moves by
about 1e-3 of its norm (measured on an H100: stage 2's last block output held a value 1.9e-6 from 0, 1.1e-6 of
its rms, which the NCHW forward put below 0 and the reference above). That is a discrete choice, not
rounding: the reference takes the other model's choice where, and only where, it is one.
"""
import numpy as np

from cupynet.layers import BatchNorm, Layer

MAX_DIFFERENT_MASKS = 3        # per layer: a few values sit that close to 0, not more
NEAR_ZERO = 1e-5               # of the layer's output rms: float32 rounding of a pre-relu value is ~1e-6 of it


def relu_batchnorms(model):
    """{name: layer} of the model's BatchNorm layers with a fused relu, found through its layers' attributes."""
    found = {}

    def visit(layer):
        if isinstance(layer, BatchNorm):
            if layer.relu:
                found[layer.name] = layer
            return
        for value in vars(layer).values():
            if isinstance(value, Layer):
                visit(value)

    for layer in model.layers:
        visit(layer)
    return found


def relu_input(layer):
    """The float64 reference layer's relu input of its last training forward: bn(x) [+ residual]."""
    shape = (1, -1, 1, 1) if layer.be.layout == "NCHW" else (1, 1, 1, -1)
    scale = (layer.gamma.value * layer.saved_invstd).reshape(shape)
    z = (layer.x - layer.saved_mean.reshape(shape)) * scale + layer.beta.value.reshape(shape)
    return z if layer.residual is None else z + layer.residual


def share_relu_masks(model, ref_model, backend):
    """After both models' forward (ResNet.forward_loss), before ref_model's backward (ref_model: float64 NumPy):
    where a BatchNorm relu's output is > 0 in one model and not in the other, ref_model takes model's value
    (backend: model's, for its arrays). Asserts that each such place is a rounding tie: at most
    MAX_DIFFERENT_MASKS per layer, each within NEAR_ZERO of the layer's rms of 0 in the reference's relu input
    and in the model's output (the model's relu input, where its output is 0, is not seen). Returns how many
    values it changed."""
    layers, ref_layers = relu_batchnorms(model), relu_batchnorms(ref_model)
    assert layers.keys() == ref_layers.keys() and layers
    changed = 0
    for name, ref_layer in ref_layers.items():
        y = np.asarray(backend.to_host(layers[name].y), dtype=np.float64)
        ref_y = ref_layer.y
        differ = (y > 0) != (ref_y > 0)
        count = int(np.count_nonzero(differ))
        if count:
            worst = float(np.max(np.maximum(np.abs(y[differ]), np.abs(relu_input(ref_layer)[differ]))))
            scale = float(np.sqrt(np.mean(np.square(ref_y))))
            assert count <= MAX_DIFFERENT_MASKS and worst <= NEAR_ZERO * scale, \
                f"{name}: {count} relu masks differ, up to {worst:.3g} from 0 (rms {scale:.3g})"
            ref_y[differ] = y[differ]
            changed += count
    return changed
