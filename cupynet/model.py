"""ResNet for CIFAR-10, built from cupynet.layers, as in TensorFlow's cifar10_estimator tutorial.

Three block kinds, all with filters 16/32/64 and strides 1/2/2 over three stages:
  * "v1": post-activation basic blocks (He et al. 2015; the reference's default), depth 6n+2, option-A
    (average-pool + zero-pad) shortcuts where the shape changes;
  * "v2": pre-activation basic blocks (He et al. 2016), depth 6n+2, option-A shortcuts, a final
    BatchNorm + ReLU before pooling;
  * "bottleneck": pre-activation bottleneck blocks 1x1 -> 3x3 -> 1x1 with widths 16/32/64 and outputs
    64/128/256 (4x), depth 9n+2, 1x1 projection shortcuts where the shape changes (as the reference's
    `_bottleneck_residual_v2`).
The head is global average pooling and a 10-way dense layer (the reference's 11th logit is dropped).

    model = ResNet(backend, num_layers=44, block="v1")
    model.init(np.random.default_rng(0))
    # ResNet(..., bn_comm=comm): synchronized BatchNorm across data-parallel replicas
    loss = model.forward_backward(x, labels)   # gradients land in model.params.grad_flat
    logits = model.forward(x, train=False)
"""
from cupynet.layers import (BatchNorm, Conv2d, ConvBN, Dense, GlobalAvgPool, Layer, ShortcutA,
                            SoftmaxCrossEntropy, conv_batchnorm)
from cupynet.params import DEFAULT_CONV_INIT, ParamStore

BLOCK_KINDS = ("v1", "v2", "bottleneck")
STAGE_FILTERS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)
BOTTLENECK_EXPANSION = 4
NUM_CLASSES = 10


def blocks_per_stage(num_layers, block):
    """n for a depth: 6n+2 for basic blocks (2 convs each), 9n+2 for bottlenecks (3 convs each).

    Raises ValueError with the rule and the nearest valid depths when `num_layers` does not fit.
    """
    if block not in BLOCK_KINDS:
        raise ValueError(f"block kind must be one of {', '.join(BLOCK_KINDS)}, got {block!r}")
    per_block = 3 if block == "bottleneck" else 2
    step = 3 * per_block
    if num_layers < step + 2 or (num_layers - 2) % step:
        lower = max(step + 2, (num_layers - 2) // step * step + 2)
        rule = f"{step}n+2"
        raise ValueError(f"--num-layers {num_layers} is not a valid depth for {block} blocks: it must be "
                         f"{rule} with n >= 1 (for example {lower} or {lower + step})")
    return (num_layers - 2) // step


class BasicBlockV1(Layer):
    """conv-BN-ReLU-conv-BN, add the shortcut, ReLU (post-activation).

    bn2 adds the shortcut and applies the block's final ReLU in its own pass (BatchNorm's `residual`),
    so bn2's output is never written and read back by a separate add. Backward, bn2 masks dy by that
    ReLU, and the input's gradient is the main path's plus dy masked by the same ReLU (the shortcut
    path's), added in one pass: through the identity, or through the option-A shortcut's adjoint.
    With `input_bn` (the BatchNorm whose output is this block's input, set by ResNet under
    --residual-grad-sums) the identity's pass also reduces that BatchNorm's gradient sums.
    """

    def __init__(self, be, params, state, name, cin, cout, stride, bn):
        super().__init__(be, name)
        self.conv1 = Conv2d(be, params, f"{name}/conv1", cin, cout, 3, stride)
        self.bn1 = BatchNorm(be, params, state, f"{name}/bn1", cout, relu=True, **bn)
        self.conv2 = Conv2d(be, params, f"{name}/conv2", cout, cout, 3, 1)
        self.bn2 = BatchNorm(be, params, state, f"{name}/bn2", cout, relu=True, **bn)   # relu after the sum
        self.shortcut = ShortcutA(be, f"{name}/shortcut", cin, cout, stride) if (cin, stride) != (cout, 1) else None
        self.input_bn = None

    def forward(self, x, train):
        h = conv_batchnorm(self.conv1, self.bn1, x, train)
        s = self.shortcut.forward(x, train) if self.shortcut else x
        return conv_batchnorm(self.conv2, self.bn2, h, train, residual=s)    # relu(bn2(conv2 h) + s)

    def backward(self, dy):
        y = self.bn2.y                                          # the block's output
        dh = self.conv2.backward(self.bn2.backward(dy))         # bn2 masks dy by the final relu
        dx = self.conv1.backward(self.bn1.backward(dh))
        if self.shortcut is not None:
            return self.shortcut.backward_into(dy, dx, relu_output=y)   # dx + shortcut'(dy * (y > 0))
        if self.input_bn is not None:
            return self.input_bn.add_output_gradient(dy, y, dx, dx)     # and input_bn's sums of it
        return self.be.relu_backward_add(dy, y, dx, dx)     # dx + dy * (y > 0)


class BasicBlockV2(Layer):
    """BN-ReLU-conv-BN-ReLU-conv, add the shortcut (pre-activation; no ReLU after the sum)."""

    def __init__(self, be, params, state, name, cin, cout, stride, bn):
        super().__init__(be, name)
        self.bn1 = BatchNorm(be, params, state, f"{name}/bn1", cin, relu=True, **bn)
        self.conv1 = Conv2d(be, params, f"{name}/conv1", cin, cout, 3, stride)
        self.bn2 = BatchNorm(be, params, state, f"{name}/bn2", cout, relu=True, **bn)
        self.conv2 = Conv2d(be, params, f"{name}/conv2", cout, cout, 3, 1)
        self.shortcut = ShortcutA(be, f"{name}/shortcut", cin, cout, stride) if (cin, stride) != (cout, 1) else None

    def forward(self, x, train):
        h = conv_batchnorm(self.conv1, self.bn2, self.bn1.forward(x, train), train)
        h = self.conv2.forward(h, train)
        s = self.shortcut.forward(x, train) if self.shortcut else x
        y = self.buffer("y", h.shape)
        return self.be.add(h, s, y)

    def backward(self, dy):
        dh = self.bn2.backward(self.conv2.backward(dy))
        dx = self.bn1.backward(self.conv1.backward(dh))
        if self.shortcut is None:
            return self.be.add(dx, dy, dx)
        return self.shortcut.backward_into(dy, dx)             # dx + shortcut'(dy), one pass


class BottleneckBlock(Layer):
    """BN-ReLU-conv1x1(stride)-BN-ReLU-conv3x3-BN-ReLU-conv1x1, plus a projection shortcut if needed."""

    def __init__(self, be, params, state, name, cin, cout, stride, bn):
        super().__init__(be, name)
        mid = cout // BOTTLENECK_EXPANSION
        self.bn1 = BatchNorm(be, params, state, f"{name}/bn1", cin, relu=True, **bn)
        self.conv1 = Conv2d(be, params, f"{name}/conv1", cin, mid, 1, stride)
        self.bn2 = BatchNorm(be, params, state, f"{name}/bn2", mid, relu=True, **bn)
        self.conv2 = Conv2d(be, params, f"{name}/conv2", mid, mid, 3, 1)
        self.bn3 = BatchNorm(be, params, state, f"{name}/bn3", mid, relu=True, **bn)
        self.conv3 = Conv2d(be, params, f"{name}/conv3", mid, cout, 1, 1)
        needs_projection = (cin, stride) != (cout, 1)
        self.shortcut = Conv2d(be, params, f"{name}/shortcut", cin, cout, 1, stride) if needs_projection else None

    def forward(self, x, train):
        h = conv_batchnorm(self.conv1, self.bn2, self.bn1.forward(x, train), train)
        h = conv_batchnorm(self.conv2, self.bn3, h, train)
        h = self.conv3.forward(h, train)
        s = self.shortcut.forward(x, train) if self.shortcut else x
        y = self.buffer("y", h.shape)
        return self.be.add(h, s, y)

    def backward(self, dy):
        dh = self.bn3.backward(self.conv3.backward(dy))
        dh = self.bn2.backward(self.conv2.backward(dh))
        dx = self.bn1.backward(self.conv1.backward(dh))
        ds = self.shortcut.backward(dy) if self.shortcut else dy
        return self.be.add(dx, ds, dx)


BLOCK_CLASSES = {"v1": BasicBlockV1, "v2": BasicBlockV2, "bottleneck": BottleneckBlock}


class ResNet:
    """The CIFAR ResNet: stem conv, three stages of residual blocks, pooling and a dense classifier."""

    def __init__(self, backend, num_layers=44, block="v1", bn_decay=0.997, bn_epsilon=1e-5,
                 num_classes=NUM_CLASSES, bn_comm=None, conv_init=DEFAULT_CONV_INIT):
        n = blocks_per_stage(num_layers, block)
        be = self.be = backend
        self.num_layers, self.block = num_layers, block
        # trainable: conv/dense weights, BN gamma/beta; conv weights start as conv_init says (params.CONV_INITS)
        self.params = ParamStore(be, with_grads=True, conv_init=conv_init)
        self.state = ParamStore(be, with_grads=False)     # BN moving statistics
        # bn_comm (sync BN): every BatchNorm all-reduces its statistics through it; None: per-replica statistics.
        bn = dict(decay=bn_decay, eps=bn_epsilon, comm=bn_comm)
        post_activation = block == "v1"

        stem = Conv2d(be, self.params, "stem/conv", 3, STAGE_FILTERS[0], 3, 1, input_grad=False)
        if post_activation:
            self.layers = [ConvBN(stem, BatchNorm(be, self.params, self.state, "stem/bn", STAGE_FILTERS[0],
                                                  relu=True, **bn))]
        else:
            self.layers = [stem]
        expansion = BOTTLENECK_EXPANSION if block == "bottleneck" else 1
        channels = STAGE_FILTERS[0]
        for stage, (filters, stride) in enumerate(zip(STAGE_FILTERS, STAGE_STRIDES), start=1):
            for index in range(n):
                cout = filters * expansion
                self.layers.append(BLOCK_CLASSES[block](be, self.params, self.state, f"stage{stage}/block{index}",
                                                        channels, cout, stride if index == 0 else 1, bn))
                channels = cout
        if not post_activation:   # pre-activation nets end with the activation their last block skipped
            self.layers.append(BatchNorm(be, self.params, self.state, "final/bn", channels, relu=True, **bn))
        self.layers.append(GlobalAvgPool(be, "pool"))
        self.layers.append(Dense(be, self.params, "logits", channels, num_classes))
        self.loss_layer = SoftmaxCrossEntropy(be, "loss")
        if post_activation and be.residual_grad_sums and bn_comm is None:
            self._give_blocks_their_input_bn()

    def _give_blocks_their_input_bn(self):
        """--residual-grad-sums: each v1 block with an identity shortcut adds up its input gradient in a kernel
        that also reduces the gradient sums of the BatchNorm that made its input (the previous block's last, or
        the stem's), which then skips that pass (19 of ResNet-44's 43 BatchNorms)."""
        for before, block in zip(self.layers, self.layers[1:]):
            if isinstance(block, BasicBlockV1) and block.shortcut is None:
                block.input_bn = before.bn if isinstance(before, ConvBN) else before.bn2

    @property
    def architecture(self):
        """What a checkpoint must match to be loaded into this model."""
        return {"num_layers": self.num_layers, "block": self.block, "num_classes": self.layers[-1].cout}

    def init(self, rng):
        """Allocate the parameter and statistics buffers and initialize them from `rng`."""
        self.params.allocate(rng)
        self.state.allocate(rng)

    def forward(self, x, train):
        """x: (N, 3, 32, 32) or (N, 32, 32, 3) per layout -> logits (N, 10)."""
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def forward_backward(self, x, labels):
        """One training pass: returns the 0-d mean cross-entropy; gradients land in params.grad_flat."""
        loss = self.forward_loss(x, labels)
        self.backward()
        return loss

    def forward_loss(self, x, labels):
        """The training forward and the 0-d mean cross-entropy; backward() then gives the gradients (the
        split lets a test look at the forward's activations before they are used)."""
        return self.loss_layer.forward(self.forward(x, train=True), labels)

    def backward(self):
        """Gradients of the last forward_loss into params.grad_flat."""
        grad = self.loss_layer.backward()
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        self.be.wait_for_gradients()        # GPU: weight gradients ran beside the main stream
        self.params.gather_compute_gradients()   # bf16 convolution weight gradients -> float32, in one pass
