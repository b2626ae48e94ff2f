"""Layers with explicit forward and backward, written against the backend contract only.

Each layer registers its tensors in the model's ParamStores (trainable parameters, and BatchNorm's
moving statistics), allocates its output buffers once per input shape and reuses them, and keeps from
forward exactly what backward needs (named attributes such as `self.x`). Every call goes through the
backend, so one model definition runs on NumPy and on the GPU.

    conv = Conv2d(be, params, "stem/conv", cin=3, cout=16, ksize=3, stride=1)
    y = conv.forward(x, train=True)      # x: (N, C, H, W) or (N, H, W, C) per be.layout
    dx = conv.backward(dy)               # writes conv's weight gradient into params' flat grad buffer

Gradients are written, not accumulated: each parameter is used exactly once per step.

A convolution followed by a BatchNorm runs through `conv_batchnorm(conv, bn, x, train)`: with the backend's
conv_genstats (--conv-genstats) the convolution also writes the BatchNorm's per-channel sums, so the
BatchNorm does not read its input once more for its statistics.
"""
from cupynet.params import glorot_uniform, ones_init, zeros_init


class Layer:
    """Base class: a name, a backend and a cache of output buffers keyed by shape."""

    def __init__(self, backend, name):
        self.be = backend
        self.name = name
        self._buffers = {}

    def buffer(self, key, shape, dtype=None):
        """A persistent array for `key` and `shape` (allocated on first use, then reused).

        Training and evaluation batches may differ in size: each shape gets its own buffer, so
        evaluating between training steps never reallocates the training step's buffers.
        """
        dtype = dtype or self.be.dtype
        cache_key = (key, tuple(shape), str(dtype))
        if cache_key not in self._buffers:
            self._buffers[cache_key] = self.be.empty(shape, dtype=dtype)
        return self._buffers[cache_key]


class Conv2d(Layer):
    """2-D convolution without bias (every conv of the ResNet is followed by BatchNorm)."""

    def __init__(self, backend, params, name, cin, cout, ksize, stride=1, input_grad=True):
        super().__init__(backend, name)
        self.cin, self.cout, self.ksize, self.stride = cin, cout, ksize, stride
        self.pad = ksize // 2                      # "same" padding for odd kernels, as the reference
        self.input_grad = input_grad               # the stem conv needs no gradient for the image
        # started by the store's conv_init (--conv-init)
        self.w = params.add(f"{name}/w", (cout, cin, ksize, ksize), conv=True)

    def output_hw(self, h, w):
        size = lambda n: (n + 2 * self.pad - self.ksize) // self.stride + 1
        return size(h), size(w)

    def forward(self, x, train):
        self.x = x
        return self.be.conv2d_forward(x, self.w.compute, self.stride, self.pad, self._output(x))

    def forward_with_stats(self, x, sums):
        """Training forward that also writes sums (2, cout) = [sum(y), sum(y^2)] per channel, for the BatchNorm
        that follows (conv_batchnorm). Returns (y, whether the backend wrote the sums)."""
        self.x = x
        y = self._output(x)
        return y, self.be.conv2d_forward_with_stats(x, self.w.compute, self.stride, self.pad, y, sums)

    def _output(self, x):
        n, _, h, w = self.be.nchw_dims(x)
        return self.buffer("y", self.be.activation_shape(n, self.cout, *self.output_hw(h, w)))

    def backward(self, dy):
        # into the compute-dtype gradient (mixed precision: converted with every other one at the end of
        # backward, ParamStore.gather_compute_gradients), or straight into the float32 one
        self.be.conv2d_backward_filter(self.x, dy, self.stride, self.pad, self.w.grad_compute)
        if not self.input_grad:
            return None
        dx = self.buffer("dx", self.x.shape)
        return self.be.conv2d_backward_data(dy, self.w.compute, self.stride, self.pad, dx)


class BatchNorm(Layer):
    """Batch normalization over N, H, W per channel, optionally with a fused ReLU.

    forward(x, train, residual=s) adds s before the ReLU: relu(bn(x) + s), a post-activation residual
    block's whole tail in one pass. The ReLU's mask then also covers the residual path, so backward's
    dz = dy * (y > 0) is the gradient of s as well (the block adds it to its input gradient).

    Training uses the batch statistics and updates the moving ones (moving = decay * moving +
    (1 - decay) * batch); evaluation uses the moving statistics.

    With a communicator `comm` (sync BN, set by the model when --sync-bn is on with several workers),
    the batch statistics are those of the global batch: each replica reduces its shard to per-channel
    sums, the sums are all-reduced, and the rest of the layer runs from the totals (see backward for
    the gradient's scaling). The shards must be equal (the trainer's are).
    """

    def __init__(self, backend, params, state, name, channels, decay, eps, relu=False, comm=None):
        super().__init__(backend, name)
        self.channels, self.decay, self.eps, self.relu = channels, decay, eps, relu
        self.comm = comm
        self.gamma = params.add(f"{name}/gamma", (channels,), init=ones_init)
        self.beta = params.add(f"{name}/beta", (channels,), init=zeros_init)
        self.moving_mean = state.add(f"{name}/moving_mean", (channels,), init=zeros_init)
        self.moving_var = state.add(f"{name}/moving_variance", (channels,), init=ones_init)
        self._gradient_with_sums = None     # the output gradient whose sums add_output_gradient took, until backward

    def forward(self, x, train, residual=None, sums=None):
        """sums: (2, C) float32 [sum(x), sum(x^2)] per channel, written by the convolution that made x
        (conv_batchnorm, --conv-genstats): training takes its statistics from them instead of reading x for
        them. Unshifted sums: the variance loses about (mean/std)^2 times the sums' float32 rounding, negligible
        for a convolution's output, whose channel means lie within a few standard deviations of 0. Not with a
        communicator: sync BN's sums are shifted and all-reduced in double."""
        be = self.be
        y = self.buffer("y", x.shape)
        if not train:
            return be.batchnorm_infer_forward(x, self.gamma.value, self.beta.value, self.moving_mean.value,
                                              self.moving_var.value, self.eps, y, relu=self.relu, residual=residual)
        stats_dtype = be.param_dtype
        self.saved_mean = self.buffer("mean", (self.channels,), stats_dtype)
        self.saved_invstd = self.buffer("invstd", (self.channels,), stats_dtype)
        self.x, self.y, self.residual = x, y, residual       # the residual only for inspection (tests/relu_masks.py)
        self.relu_of_bn_alone = self.relu and residual is None    # backward may recompute the mask from x
        if sums is not None:
            if self.comm is not None:
                raise ValueError(f"{self.name}: statistics from a convolution's sums are not sync BN's")
            return be.batchnorm_train_from_sums(x, sums, self._zeros(), self._local_count(x), self.gamma.value,
                                                self.beta.value, self.moving_mean.value, self.moving_var.value,
                                                self.decay, self.eps, y, self.saved_mean, self.saved_invstd,
                                                relu=self.relu, residual=residual)
        if self.comm is None:
            return be.batchnorm_train_forward(x, self.gamma.value, self.beta.value, self.moving_mean.value,
                                              self.moving_var.value, self.decay, self.eps, y,
                                              self.saved_mean, self.saved_invstd, relu=self.relu,
                                              residual=residual)
        # Shift the sums by the moving mean: identical on every replica (sync BN updates it from global
        # statistics, and replicas start identical), so the shifted sums add up across workers, and close
        # to the batch mean once warmed up, which keeps the one-pass variance free of cancellation.
        shift = self.moving_mean.value
        sums = self.buffer("sums", (2, self.channels), "float64")      # [sum(x - shift), sum((x - shift)^2)]
        be.batchnorm_stats(x, shift, sums)
        self.comm.all_reduce_sum(sums)
        global_count = self._local_count(x) * self.comm.size           # equal shards
        return be.batchnorm_train_from_sums(x, sums, shift, global_count, self.gamma.value, self.beta.value,
                                            self.moving_mean.value, self.moving_var.value, self.decay, self.eps,
                                            y, self.saved_mean, self.saved_invstd, relu=self.relu,
                                            residual=residual)

    def _zeros(self):
        """A (C,) float32 array of zeros: the shift of unshifted sums."""
        if not hasattr(self, "_zero_shift"):
            self._zero_shift = self.be.zeros((self.channels,), dtype=self.be.param_dtype)
        return self._zero_shift

    def _local_count(self, x):
        """Elements per channel in this replica's activation (N * H * W)."""
        return x.size // self.channels

    def add_output_gradient(self, dy, y, addend, dx):
        """dx = addend + dy * (y > 0): the gradient of this layer's output, written by the layer after it (a
        post-activation block adding up its input gradient), which also reduces this layer's dgamma and dbeta
        from it in the same pass (--residual-grad-sums); backward(dx) then only computes the input gradient.
        Not with a communicator (sync BN all-reduces the sums between the two halves)."""
        if self.comm is not None:
            raise ValueError(f"{self.name}: sync BN's gradient sums are all-reduced, not taken by the layer after")
        mask = self._relu_mask()
        self.be.relu_backward_add_bn_grad(dy, y, addend, dx, self.x, self.gamma.value, self.saved_mean,
                                          self.saved_invstd, self.gamma.grad, self.beta.grad, bn_y=mask["y"],
                                          beta=mask["beta"])
        self._gradient_with_sums = dx
        return dx

    def _relu_mask(self):
        """What the backward's fused relu needs: the output y, and beta where the mask may be recomputed from x."""
        return dict(y=self.y if self.relu else None, beta=self.beta.value if self.relu_of_bn_alone else None)

    def backward(self, dy):
        dx = self.buffer("dx", self.x.shape)
        if self._gradient_with_sums is dy:      # add_output_gradient reduced dgamma, dbeta from this very array
            self._gradient_with_sums = None
            return self.be.batchnorm_backward_dx(dy, self.x, self.gamma.value, self.saved_mean, self.saved_invstd,
                                                 self.gamma.grad, self.beta.grad, dx, **self._relu_mask())
        if self.comm is None:
            return self.be.batchnorm_backward(dy, self.x, self.gamma.value, self.saved_mean, self.saved_invstd,
                                              dx, self.gamma.grad, self.beta.grad, **self._relu_mask())
        y = self.y if self.relu else None        # sync BN's kernels read the relu's mask from y
        # Why the MEAN of the sums with the LOCAL count. S workers, shard r of m elements per channel,
        # M = S * m. The global loss is L = (1/S) sum_r L_r (L_r: the mean over shard r), but replica r
        # back-propagates dy_r = dL_r/dy = S * dL/dy: every replica works at S times the global gradient,
        # and the trainer's all_reduce_mean of the parameter gradients divides the S back out. With global
        # statistics and T = sum over all workers of [sum(dz_r), sum(dz_r * xhat)] (dz_r from dy_r):
        #   dL/dx     = gamma * invstd * (dz_r - T[0] / M - xhat * T[1] / M) / S   on shard r,
        #   dL/dgamma = T[1] / S,   dL/dbeta = T[0] / S.
        # * dx: the replica passes down S * dL/dx, like every other gradient it computes; since
        #   T / M = (T / S) / m, that is backward_from_sums with mean(T) = T / S and the local count m.
        # * dgamma, dbeta = mean(T) = T / S are dL/dgamma, dL/dbeta themselves, the same on every replica,
        #   so the trainer's mean over replicas leaves them as they are (exactly, for S a power of two).
        # With S = 1 this is the fused path: T / 1 = T, m = M.
        sums = self.buffer("grad_sums", (2, self.channels), "float64")  # [sum(dz), sum(dz * xhat)]
        self.be.batchnorm_backward_sums(dy, self.x, y, self.saved_mean, self.saved_invstd, sums)
        self.comm.all_reduce_mean(sums)
        return self.be.batchnorm_backward_from_sums(dy, self.x, y, self.gamma.value, self.saved_mean,
                                                    self.saved_invstd, sums, self._local_count(self.x),
                                                    dx, self.gamma.grad, self.beta.grad)


def conv_batchnorm(conv, bn, x, train, residual=None):
    """bn.forward(conv.forward(x, train), train, residual). With the backend's conv_genstats (--conv-genstats),
    a training forward lets the convolution also write the per-channel sums of its output (cuDNN's genstats,
    in the same graph) and bn takes its statistics from them: no pass of its own over the activation. Where the
    backend could not fuse them (no cuDNN engine for that shape), or bn is synchronized across workers, bn
    makes its own as usual. Backward is unchanged: bn saved its mean and 1/std either way."""
    if not (train and bn.comm is None and conv.be.conv_genstats):
        return bn.forward(conv.forward(x, train), train, residual)
    sums = bn.buffer("conv_sums", (2, bn.channels), conv.be.param_dtype)
    y, fused = conv.forward_with_stats(x, sums)
    return bn.forward(y, train, residual, sums=sums if fused else None)


class ConvBN(Layer):
    """A convolution and the BatchNorm after it, as one layer (the v1 stem): conv_batchnorm forward."""

    def __init__(self, conv, bn):
        super().__init__(conv.be, conv.name)
        self.conv, self.bn = conv, bn

    def forward(self, x, train):
        return conv_batchnorm(self.conv, self.bn, x, train)

    def backward(self, dy):
        return self.conv.backward(self.bn.backward(dy))


class ReLU(Layer):
    def forward(self, x, train):
        self.y = self.be.relu_forward(x, self.buffer("y", x.shape))
        return self.y

    def backward(self, dy):
        return self.be.relu_backward(dy, self.y, self.buffer("dx", dy.shape))


class ShortcutA(Layer):
    """The option-A (parameter-free) shortcut: average pool with the stride, zero-pad the channels."""

    def __init__(self, backend, name, cin, cout, stride):
        super().__init__(backend, name)
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, x, train):
        n, _, h, w = self.be.nchw_dims(x)
        self.x_shape = x.shape
        y = self.buffer("y", self.be.activation_shape(n, self.cout, h // self.stride, w // self.stride))
        return self.be.shortcut_forward(x, self.stride, y)

    def backward(self, dy):
        return self.be.shortcut_backward(dy, self.stride, self.buffer("dx", self.x_shape))

    def backward_into(self, dy, dx, relu_output=None):
        """dx += this shortcut's input gradient, dy first masked by relu_output > 0 when given: where the
        shortcut path meets the main path's gradient dx, in one pass (nothing written in between)."""
        return self.be.shortcut_backward(dy, self.stride, dx, relu_output=relu_output, accumulate=True)


class GlobalAvgPool(Layer):
    """(N, C, H, W) or (N, H, W, C) -> (N, C)."""

    def forward(self, x, train):
        n, c, _, _ = self.be.nchw_dims(x)
        self.x_shape = x.shape
        return self.be.global_avgpool_forward(x, self.buffer("y", (n, c)))

    def backward(self, dy):
        return self.be.global_avgpool_backward(dy, self.buffer("dx", self.x_shape))


class Dense(Layer):
    """Fully connected layer y = x @ w + b (the classifier)."""

    def __init__(self, backend, params, name, cin, cout):
        super().__init__(backend, name)
        self.cout = cout
        self.w = params.add(f"{name}/w", (cin, cout), init=glorot_uniform(cin, cout))
        self.b = params.add(f"{name}/b", (cout,), init=zeros_init)

    def forward(self, x, train):
        self.x = x
        y = self.buffer("y", (x.shape[0], self.cout))
        return self.be.dense_forward(x, self.w.value, self.b.value, y)

    def backward(self, dy):
        dx = self.buffer("dx", self.x.shape)
        return self.be.dense_backward(self.x, self.w.value, dy, dx, self.w.grad, self.b.grad)


class SoftmaxCrossEntropy(Layer):
    """Mean softmax cross-entropy; forward also produces the gradient, which backward returns."""

    def forward(self, logits, labels):
        self.loss = self.buffer("loss", (), self.be.param_dtype)
        self.dlogits = self.buffer("dlogits", logits.shape)
        return self.be.softmax_cross_entropy(logits, labels, self.loss, self.dlogits)

    def backward(self):
        return self.dlogits
