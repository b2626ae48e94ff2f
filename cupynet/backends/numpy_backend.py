"""The NumPy reference backend: every primitive of the backend contract, written to be read.

This backend is the oracle of the project. Finite-difference gradient checks (cupynet/gradcheck.py)
validate it in float64, and the GPU backend is tested primitive by primitive against it. It also trains
for real on CPU: convolutions are im2col + one BLAS matrix product, never Python loops over pixels.

The contract (the GPU backend implements the same names and arguments):
  * every primitive writes into output arrays the caller allocated (`out=`-style), so a GPU backend can run
    a whole step on preallocated buffers; scalars that change per step (the learning rate) are 0-d arrays;
  * activations are (N, C, H, W) or (N, H, W, C) per `layout`; conv weights are (K, C, R, S) for NCHW and
    (K, R, S, C) for NHWC (what cuDNN wants for each layout); `weight_to_canonical` maps both to KCRS;
  * `calls` counts primitive invocations by name, so tests can prove which path actually ran.

    from cupynet.backends.numpy_backend import NumpyBackend
    be = NumpyBackend(layout="NHWC", dtype="float32")
"""
import contextlib
from collections import Counter

import numpy as np

from cupynet.backends.layout import LAYOUTS, LayoutMixin, check_relu_mask
from cupynet.sampling import crop_flip_draws


class NumpyBackend(LayoutMixin):
    """Reference implementation of the backend contract on NumPy arrays."""

    name = "numpy"
    xp = np

    def __init__(self, layout="NHWC", dtype="float32", wgrad_chunks=1, conv_genstats=False, residual_grad_sums=False):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if not (isinstance(wgrad_chunks, int) and wgrad_chunks >= 1):
            raise ValueError(f"wgrad_chunks must be a positive integer, got {wgrad_chunks!r}")
        self.layout = layout
        # weight gradients per slice of the batch, summed later (the GPU's --wgrad-chunks; here only to
        # check that path against the plain one: it is no faster on the CPU)
        self.wgrad_chunks = wgrad_chunks
        # convolutions before BatchNorm also give its sums (the GPU's --conv-genstats, a cuDNN fusion; here the
        # reference that path is checked against)
        self.conv_genstats = bool(conv_genstats)
        # a residual block's input-gradient add also reduces the next BatchNorm's gradient sums (layers.py,
        # --residual-grad-sums; the GPU saves a pass, here it checks the model's wiring of it)
        self.residual_grad_sums = bool(residual_grad_sums)
        self.dtype = np.dtype(dtype)        # activations and weights
        self.param_dtype = np.dtype(dtype)  # master parameters, gradients, optimizer state
        self.calls = Counter()

    # ----------------------------------------------------------------- arrays and layout helpers

    def empty(self, shape, dtype=None):
        return np.empty(shape, dtype=dtype or self.dtype)

    def zeros(self, shape, dtype=None):
        return np.zeros(shape, dtype=dtype or self.dtype)

    def to_host(self, array):
        """A NumPy copy of a backend array (a host sync on GPU: only between steps)."""
        return np.array(array, copy=True)

    def from_host(self, array, dtype=None):
        return np.array(array, dtype=dtype or array.dtype, copy=True)

    def upload_into(self, array, host):
        """array[...] = host (same shape): the GPU backend's copy into an existing device buffer."""
        if np.shape(host) != array.shape:
            raise ValueError(f"upload_into: host array {np.shape(host)} does not match {array.shape}")
        array[...] = host

    def copy_into(self, target, source):
        """target[...] = source, converted to target's dtype (the GPU backend's device-to-device copy)."""
        if target.shape != source.shape:
            raise ValueError(f"copy_into: source {source.shape} does not match target {target.shape}")
        target[...] = source

    def sum_chunks(self, target, chunks):
        """target[...] = the sum of chunks' rows (chunks: (rows, *target.shape)), added in row order in float32
        (float64 for a float64 target), converted to target's dtype: weight gradients computed per slice of
        the batch, into the float32 ones."""
        if chunks.shape[1:] != target.shape:
            raise ValueError(f"sum_chunks: rows of {chunks.shape[1:]} do not match {target.shape}")
        self.calls["sum_chunks"] += 1
        accumulate = np.float64 if target.dtype == np.float64 else np.float32
        total = chunks[0].astype(accumulate)
        for row in chunks[1:]:
            total += row
        target[...] = total

    def fill(self, array, value):
        """Set every element (e.g. the learning-rate scalar between steps)."""
        array[...] = value

    def wait_for_gradients(self):
        """The GPU backend computes weight gradients beside its main stream; here they are done already."""
        self.calls["wait_for_gradients"] += 1

    def evaluating(self):
        """Around an evaluation's forwards (the GPU backend builds its convolutions there untimed): nothing here."""
        return contextlib.nullcontext()

    def conv_engine_choices(self):
        """The GPU backend's autotuned cuDNN engines, for checkpoints; the CPU has none."""
        return None

    def adopt_conv_engine_choices(self, saved):
        """A GPU checkpoint's engine choices mean nothing here: none adopted."""
        return 0

    def synchronize(self):
        """Nothing runs asynchronously on the CPU."""

    def _as_nhwc(self, x):
        """A view of an activation (or KCRS/KRSC weight) with channels last."""
        return x.transpose(0, 2, 3, 1) if self.layout == "NCHW" else x

    def _channel_axes(self):
        """Axes reduced by per-channel statistics: everything but C."""
        return (0, 2, 3) if self.layout == "NCHW" else (0, 1, 2)

    def _per_channel(self, v):
        """Reshape a (C,) vector so it broadcasts against activations of this layout."""
        return v.reshape(1, -1, 1, 1) if self.layout == "NCHW" else v

    # ----------------------------------------------------------------- convolution (im2col + GEMM)

    @staticmethod
    def _im2col(x_nhwc, r, s, stride, pads):
        """x: (N, H, W, C) -> cols: (N*Ho*Wo, R*S*C), one row per output pixel, columns ordered (r, s, c).

        pads = (top, bottom, left, right). The windows are a strided view of the padded image
        (sliding_window_view), gathered by one contiguous copy: no loop over pixels or images.
        """
        top, bottom, left, right = pads
        n, _, _, c = x_nhwc.shape
        padded = np.pad(x_nhwc, ((0, 0), (top, bottom), (left, right), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (r, s), axis=(1, 2))
        windows = windows[:, ::stride, ::stride]                      # (N, Ho, Wo, C, R, S)
        ho, wo = windows.shape[1:3]
        cols = np.ascontiguousarray(windows.transpose(0, 1, 2, 4, 5, 3))
        return cols.reshape(n * ho * wo, r * s * c), (ho, wo)

    def _weight_matrix(self, w):
        """Conv weight -> (K, R*S*C), the column order of _im2col."""
        w_krsc = self._as_nhwc(w)
        return w_krsc.reshape(w_krsc.shape[0], -1)

    def conv2d_forward(self, x, w, stride, pad, y):
        """y = conv(x, w). x: activation; w: (K,C,R,S) | (K,R,S,C); y: activation with K channels."""
        self.calls["conv2d_forward"] += 1
        k, r, s, _ = self._as_nhwc(w).shape
        cols, (ho, wo) = self._im2col(self._as_nhwc(x), r, s, stride, (pad, pad, pad, pad))
        y_rows = cols @ self._weight_matrix(w).T                        # (N*Ho*Wo, K)
        self._as_nhwc(y)[...] = y_rows.reshape(x.shape[0], ho, wo, k)
        return y

    def conv2d_forward_with_stats(self, x, w, stride, pad, y, sums):
        """y = conv(x, w), and sums (2, K) float32 <- [sum(y), sum(y^2)] per channel over N, H, W: the
        statistics of the BatchNorm that follows (the GPU's --conv-genstats, cuDNN's genstats), added in
        float64 here. Returns True: the sums are written (the GPU backend returns False where cuDNN has no
        engine for the fused graph, and the BatchNorm then makes its own)."""
        self.conv2d_forward(x, w, stride, pad, y)
        self.calls["conv2d_forward_with_stats"] += 1
        values = y.astype(np.float64)
        sums[0] = values.sum(axis=self._channel_axes())
        sums[1] = (values * values).sum(axis=self._channel_axes())
        return True

    def conv2d_backward_data(self, dy, w, stride, pad, dx):
        """dx = d(loss)/dx given dy = d(loss)/dy, as a stride-1 convolution.

        dx[n, i*s + r - p, j*s + q - p, c] += dy[n, i, j, k] * w[k, r, q, c] is a correlation of dy,
        dilated by the stride (zeros between rows and columns), with the kernel rotated by 180 degrees
        and its K and C axes swapped. Padding the dilated dy by R-1-p on top keeps exactly the H rows of
        dx; the bottom padding makes up the rows that a stride-2 forward pass never reached.
        """
        self.calls["conv2d_backward_data"] += 1
        w_krsc = self._as_nhwc(w)
        k, r, s, c = w_krsc.shape
        dy_nhwc = self._as_nhwc(dy)
        n, ho, wo, _ = dy_nhwc.shape
        _, h, wd, _ = self._as_nhwc(dx).shape
        if stride > 1:
            dilated = np.zeros((n, (ho - 1) * stride + 1, (wo - 1) * stride + 1, k), dtype=dy.dtype)
            dilated[:, ::stride, ::stride, :] = dy_nhwc
            dy_nhwc = dilated
        hd, wdd = dy_nhwc.shape[1:3]
        pads = (r - 1 - pad, h + pad - hd, s - 1 - pad, wd + pad - wdd)
        cols, _ = self._im2col(dy_nhwc, r, s, 1, pads)                     # (N*H*W, R*S*K)
        w_rotated = w_krsc[:, ::-1, ::-1, :].transpose(1, 2, 0, 3).reshape(r * s * k, c)
        self._as_nhwc(dx)[...] = (cols @ w_rotated).reshape(n, h, wd, c)
        return dx

    def conv2d_backward_filter(self, x, dy, stride, pad, dw):
        """dw = d(loss)/dw, written (not accumulated) into dw; dw of shape (chunks, *weight): per batch
        chunk (LayoutMixin.weight_gradient_parts)."""
        self.calls["conv2d_backward_filter"] += 1
        for x_part, dy_part, dw_part in self.weight_gradient_parts(x, dy, dw):
            dw_krsc = self._as_nhwc(dw_part)
            k, r, s, _ = dw_krsc.shape
            cols, _ = self._im2col(self._as_nhwc(x_part), r, s, stride, (pad, pad, pad, pad))
            dy_rows = self._as_nhwc(dy_part).reshape(-1, k)                  # (N*Ho*Wo, K)
            dw_krsc[...] = (dy_rows.T @ cols).reshape(k, r, s, -1)
        return dw

    # ----------------------------------------------------------------- batch normalization

    def _channel_sum(self, a):
        """Per-channel sum (C,), accumulated in float64 (as cheap as float32 here, and exact enough to be the oracle)."""
        return a.sum(axis=self._channel_axes(), dtype=np.float64)

    def _channel_dot(self, a, b):
        """Per-channel sum of a * b (C,), without materializing the product.

        Summed per image in the arrays' dtype (at most H*W terms), then over the batch in float64: one
        float32 accumulation over all N*H*W terms (einsum adds sequentially) loses up to ~1e-5 of the
        variance and ~1e-3 of the first layers' gradients at ResNet sizes (measured against float64);
        this stays at float32 rounding for the same cost.
        """
        per_image = np.einsum("nchw,nchw->nc" if self.layout == "NCHW" else "nhwc,nhwc->nc", a, b)
        return per_image.sum(axis=0, dtype=np.float64)

    def _bn_finish_forward(self, centered, mean, var, m, gamma, beta, running_mean, running_var, decay, eps,
                           y, saved_mean, saved_invstd, relu, residual):
        """Shared by the fused and the split (sync-BN) forward: batch mean/var (C,) of m elements per
        channel -> saved statistics, moving statistics (unbiased m/(m-1) variance), and
        y = [relu](centered * gamma * invstd + beta [+ residual]), centered = x - mean (the caller's
        activation dtype)."""
        pc = self._per_channel
        invstd = 1.0 / np.sqrt(var + eps)
        saved_mean[...] = mean
        saved_invstd[...] = invstd
        running_mean[...] = decay * running_mean + (1.0 - decay) * mean
        running_var[...] = decay * running_var + (1.0 - decay) * var * (m / max(m - 1, 1))
        np.multiply(centered, pc((gamma * invstd).astype(centered.dtype)), out=y)
        y += pc(beta)
        return self._bn_output(y, relu, residual)

    @staticmethod
    def _bn_output(y, relu, residual):
        """The tail of every BatchNorm forward: y [+= residual], [relu], in place.

        With a residual, BatchNorm is a post-activation block's whole tail, relu(bn(x) + shortcut),
        as the GPU backend computes it in one pass.
        """
        if residual is not None:
            if residual.shape != y.shape:
                raise ValueError(f"residual of shape {residual.shape} for an activation of shape {y.shape}")
            y += residual
        if relu:
            np.maximum(y, 0, out=y)
        return y

    def batchnorm_train_forward(self, x, gamma, beta, running_mean, running_var, decay, eps,
                                y, saved_mean, saved_invstd, relu=False, residual=None):
        """y = [relu](gamma * (x - mean) / sqrt(var + eps) + beta [+ residual]) with batch statistics.

        Saves the batch mean and 1/sqrt(var + eps) for backward, and updates the moving statistics
        in place: moving = decay * moving + (1 - decay) * batch. Like TensorFlow's fused batch norm
        (and PyTorch), the moving variance takes the unbiased (m / (m - 1)) batch variance.
        """
        self.calls["batchnorm_train_forward"] += 1
        m = x.size // gamma.size                                    # elements per channel
        mean = self._channel_sum(x) / m
        centered = x - self._per_channel(mean.astype(x.dtype))
        var = self._channel_dot(centered, centered) / m
        return self._bn_finish_forward(centered, mean, var, m, gamma, beta, running_mean, running_var, decay, eps,
                                       y, saved_mean, saved_invstd, relu, residual)

    def batchnorm_stats(self, x, shift, sums):
        """Per-channel shifted sums of x for a BatchNorm whose statistics span several workers.

        sums: (2, C) float64 <- [sum(x - shift), sum((x - shift)^2)] over this worker's N, H, W;
        shift: (C,) float32-or-wider, the same on every worker (the layer passes the moving mean, which
        sync-BN keeps identical on every replica). Sums add up across workers (a communicator's
        all_reduce_sum) and batchnorm_train_from_sums turns the totals into mean and variance.

        Numerics: the one-pass var = E[(x - K)^2] - E[x - K]^2 loses about log10((mean - K)^2 / var)
        of the accumulator's digits to cancellation. With K near the batch mean (the moving mean once
        training has warmed up) nothing is lost; with K = 0 (the first steps: the moving mean starts at
        0) the float64 accumulation here still leaves ~16 - log10(mean^2 / var) digits, more than float32
        activations carry unless |mean| > ~1e4 std. The GPU twin accumulates float32 partials of (x - K),
        so there the shift is what keeps the variance accurate; it adds the partials in double.
        """
        self.calls["batchnorm_stats"] += 1
        shifted = x - self._per_channel(shift.astype(x.dtype))
        sums[0] = self._channel_sum(shifted)
        np.multiply(shifted, shifted, out=shifted)
        sums[1] = self._channel_sum(shifted)          # float64 accumulation throughout
        return sums

    def batchnorm_train_from_sums(self, x, sums, shift, count, gamma, beta, running_mean, running_var, decay, eps,
                                  y, saved_mean, saved_invstd, relu=False, residual=None):
        """Second half of a split batchnorm_train_forward: statistics from (global) shifted sums.

        sums: (2, C) float64 from batchnorm_stats (added over the workers), taken around `shift`, or float32
        from conv2d_forward_with_stats (shift 0), added here in float64 as the GPU's kernel does;
        count: elements per channel those sums cover (global: local elements x workers). Writes what
        batchnorm_train_forward writes: saved mean and invstd, the moving statistics (unbiased with
        `count`), and y for this worker's x. shift may alias running_mean: it is read first.
        """
        self.calls["batchnorm_train_from_sums"] += 1
        sums = sums.astype(np.float64)
        shifted_mean = sums[0] / count
        var = np.maximum(sums[1] / count - shifted_mean * shifted_mean, 0.0)     # biased, as normalization uses
        mean = shift.astype(np.float64) + shifted_mean
        centered = x - self._per_channel(mean.astype(x.dtype))
        return self._bn_finish_forward(centered, mean, var, count, gamma, beta, running_mean, running_var, decay, eps,
                                       y, saved_mean, saved_invstd, relu, residual)

    def batchnorm_infer_forward(self, x, gamma, beta, running_mean, running_var, eps, y, relu=False, residual=None):
        """BatchNorm with the moving statistics (evaluation): y = [relu](x * scale + shift [+ residual])."""
        self.calls["batchnorm_infer_forward"] += 1
        pc = self._per_channel
        scale = gamma / np.sqrt(running_var + eps)
        np.multiply(x, pc(scale), out=y)
        y += pc(beta - running_mean * scale)
        return self._bn_output(y, relu, residual)

    def _bn_grad_terms(self, dy, x, y, saved_mean, saved_invstd):
        """(dz, xhat): dz = dy masked by the fused relu's output y > 0 (y None: no relu); xhat normalized x."""
        pc = self._per_channel
        dz = dy if y is None else dy * (y > 0)
        xhat = (x - pc(saved_mean)) * pc(saved_invstd)
        return dz, xhat

    def _bn_input_grad(self, dz, xhat, db, dg, m, gamma, saved_invstd, dx):
        """dx = gamma * invstd * (dz - db / m - xhat * dg / m); overwrites xhat (scratch)."""
        pc = self._per_channel
        xhat *= pc((dg / m).astype(dz.dtype))
        np.subtract(dz, xhat, out=dx)
        dx -= pc((db / m).astype(dz.dtype))
        dx *= pc((gamma * saved_invstd).astype(dz.dtype))
        return dx

    def batchnorm_backward(self, dy, x, gamma, saved_mean, saved_invstd, dx, dgamma, dbeta, y=None, beta=None):
        """Backward of batchnorm_train_forward; with y (its relu output) the relu backward is fused.

        xhat = (x - mean) * invstd; dbeta = sum(dz); dgamma = sum(dz * xhat);
        dx = gamma * invstd * (dz - dbeta / m - xhat * dgamma / m), m = elements per channel,
        where dz = dy masked by y > 0 when the forward applied relu. beta (given with y when no residual was
        added before the relu) lets a backend recompute that mask from x instead of reading y; the GPU does,
        with its forward's rounding. Here the mask is always y > 0: the same mask, and this is the reference.
        """
        check_relu_mask("batchnorm_backward", y, beta)
        self.calls["batchnorm_backward"] += 1
        m = x.size // gamma.size
        dz, xhat = self._bn_grad_terms(dy, x, y, saved_mean, saved_invstd)
        db = self._channel_sum(dz)
        dg = self._channel_dot(dz, xhat)
        dbeta[...] = db
        dgamma[...] = dg
        return self._bn_input_grad(dz, xhat, db, dg, m, gamma, saved_invstd, dx)

    def batchnorm_backward_dx(self, dy, x, gamma, saved_mean, saved_invstd, dgamma, dbeta, dx, y=None, beta=None):
        """The rest of batchnorm_backward once dgamma and dbeta hold its sums (relu_backward_add_bn_grad wrote
        them with the gradient dy): dx = gamma * invstd * (dz - dbeta / m - xhat * dgamma / m)."""
        check_relu_mask("batchnorm_backward_dx", y, beta)
        self.calls["batchnorm_backward_dx"] += 1
        dz, xhat = self._bn_grad_terms(dy, x, y, saved_mean, saved_invstd)
        return self._bn_input_grad(dz, xhat, dbeta, dgamma, x.size // gamma.size, gamma, saved_invstd, dx)

    def relu_backward_add_bn_grad(self, dy, y, addend, dx, bn_x, gamma, saved_mean, saved_invstd, dgamma, dbeta,
                                  bn_y=None, beta=None):
        """dx = relu_backward_add(dy, y, addend), then the dgamma and dbeta that batchnorm_backward(dx, bn_x,
        gamma, saved_mean, saved_invstd, ..., y=bn_y, beta=beta) would write: a post-activation block's input
        gradient and the sums of the BatchNorm it flows into next, which the GPU takes in one pass
        (--residual-grad-sums); batchnorm_backward_dx then finishes that BatchNorm's backward."""
        check_relu_mask("relu_backward_add_bn_grad", bn_y, beta, y_name="bn_y")
        self.calls["relu_backward_add_bn_grad"] += 1
        np.add(addend, dy * (y > 0), out=dx)
        dz, xhat = self._bn_grad_terms(dx, bn_x, bn_y, saved_mean, saved_invstd)
        dbeta[...] = self._channel_sum(dz)
        dgamma[...] = self._channel_dot(dz, xhat)
        return dx

    def batchnorm_backward_sums(self, dy, x, y, saved_mean, saved_invstd, sums):
        """First half of a split batchnorm_backward: sums (2, C) float64 <- [sum(dz), sum(dz * xhat)]
        over this worker's elements (dz, xhat as batchnorm_backward; y None: no fused relu).

        Both are plain sums of terms of either sign (no cancellation-prone formula), so they add up
        across workers like any gradient; float64 keeps the added totals as exact as the fused path's.
        """
        self.calls["batchnorm_backward_sums"] += 1
        dz, xhat = self._bn_grad_terms(dy, x, y, saved_mean, saved_invstd)
        sums[0] = self._channel_sum(dz)
        sums[1] = self._channel_dot(dz, xhat)
        return sums

    def batchnorm_backward_from_sums(self, dy, x, y, gamma, saved_mean, saved_invstd, sums, count,
                                     dx, dgamma, dbeta):
        """Second half of a split batchnorm_backward, from sums covering `count` elements per channel.

        dbeta = sums[0], dgamma = sums[1]; dx = gamma * invstd * (dz - sums[0] / count - xhat * sums[1] / count)
        for this worker's elements. dx depends on sums and count only through sums / count, so a caller
        may pass the workers' total with the global count, or their mean with the per-worker count (what
        the sync-BN layer does, see BatchNorm.backward): the same dx, and dgamma/dbeta follow the sums.
        """
        self.calls["batchnorm_backward_from_sums"] += 1
        dz, xhat = self._bn_grad_terms(dy, x, y, saved_mean, saved_invstd)
        dbeta[...] = sums[0]
        dgamma[...] = sums[1]
        return self._bn_input_grad(dz, xhat, sums[0], sums[1], count, gamma, saved_invstd, dx)

    # ----------------------------------------------------------------- elementwise

    def relu_forward(self, x, y):
        self.calls["relu_forward"] += 1
        np.maximum(x, 0, out=y)
        return y

    def relu_backward(self, dy, y, dx):
        """dx = dy where the relu output y is positive."""
        self.calls["relu_backward"] += 1
        np.multiply(dy, y > 0, out=dx)
        return dx

    def add(self, a, b, y):
        """y = a + b (the pre-activation residual sum)."""
        self.calls["add"] += 1
        np.add(a, b, out=y)
        return y

    def relu_backward_add(self, dy, y, addend, dx):
        """dx = addend + (dy where the relu output y is positive, else 0): a post-activation block's input
        gradient, the main path's plus the shortcut path's (dy through the block's final relu)."""
        self.calls["relu_backward_add"] += 1
        np.add(addend, dy * (y > 0), out=dx)
        return dx

    # ----------------------------------------------------------------- option-A shortcut

    def shortcut_forward(self, x, stride, y):
        """y = zero-pad-channels(avgpool_stride(x)).

        The reference's option-A shortcut: average pool with kernel = stride = `stride` (VALID), then the
        channels are zero-padded symmetrically, (Cout - Cin) // 2 on each side.
        """
        self.calls["shortcut_forward"] += 1
        x_nhwc, y_nhwc = self._as_nhwc(x), self._as_nhwc(y)
        n, h, w, cin = x_nhwc.shape
        cout = y_nhwc.shape[3]
        lo = (cout - cin) // 2
        ho, wo = h // stride, w // stride
        pooled = x_nhwc[:, :ho * stride, :wo * stride, :].reshape(n, ho, stride, wo, stride, cin)
        y_nhwc[...] = 0
        y_nhwc[:, :, :, lo:lo + cin] = pooled.mean(axis=(2, 4))
        return y

    def shortcut_backward(self, dy, stride, dx, relu_output=None, accumulate=False):
        """Adjoint: slice the input's channels, spread each pooled gradient evenly over its window.

        With relu_output, dy first goes through that relu (dy where relu_output > 0, else 0); with
        accumulate, the result is added to dx instead of overwriting it: a post-activation downsampling
        block's input gradient, dx_main + shortcut'(dy * (y > 0)), in one call.
        """
        self.calls["shortcut_backward"] += 1
        if relu_output is not None:
            dy = np.where(relu_output > 0, dy, 0)
        dy_nhwc, dx_nhwc = self._as_nhwc(dy), self._as_nhwc(dx)
        n, h, w, cin = dx_nhwc.shape
        lo = (dy_nhwc.shape[3] - cin) // 2
        ho, wo = h // stride, w // stride
        g = dy_nhwc[:, :, :, lo:lo + cin] / (stride * stride)
        spread = np.repeat(np.repeat(g, stride, axis=1), stride, axis=2)
        if not accumulate:
            dx_nhwc[...] = 0
        dx_nhwc[:, :ho * stride, :wo * stride, :] += spread
        return dx

    # ----------------------------------------------------------------- head: pooling, dense, loss

    def global_avgpool_forward(self, x, y):
        """x: activation (N, C, H, W | N, H, W, C) -> y: (N, C)."""
        self.calls["global_avgpool_forward"] += 1
        axes = (2, 3) if self.layout == "NCHW" else (1, 2)
        y[...] = x.mean(axis=axes)
        return y

    def global_avgpool_backward(self, dy, dx):
        self.calls["global_avgpool_backward"] += 1
        n, c, h, w = self.nchw_dims(dx)
        dx[...] = self._per_channel_rows(dy / (h * w))
        return dx

    def _per_channel_rows(self, v):
        """(N, C) -> broadcastable against an activation of this layout."""
        return v[:, :, None, None] if self.layout == "NCHW" else v[:, None, None, :]

    def dense_forward(self, x, w, b, y):
        """y = x @ w + b. x: (N, Cin), w: (Cin, Cout), b: (Cout,)."""
        self.calls["dense_forward"] += 1
        np.matmul(x, w, out=y)
        y += b
        return y

    def dense_backward(self, x, w, dy, dx, dw, db):
        self.calls["dense_backward"] += 1
        np.matmul(dy, w.T, out=dx)
        np.matmul(x.T, dy, out=dw)
        dy.sum(axis=0, out=db)
        return dx

    def softmax_cross_entropy(self, logits, labels, loss, dlogits):
        """Mean cross-entropy of logits (N, K) against int labels (N,) into the 0-d `loss`.

        Also writes dlogits = (softmax - onehot) / N, the gradient of the mean: the loss layer's
        forward and backward are one pass, as on the GPU. Computed in at least float32.
        """
        self.calls["softmax_cross_entropy"] += 1
        z = logits.astype(np.promote_types(logits.dtype, np.float32))
        z = z - z.max(axis=1, keepdims=True)
        logsumexp = np.log(np.exp(z).sum(axis=1))
        n = z.shape[0]
        rows = np.arange(n)
        loss[...] = np.mean(logsumexp - z[rows, labels])
        probs = np.exp(z - logsumexp[:, None])
        probs[rows, labels] -= 1.0
        dlogits[...] = probs / n
        return loss

    def count_correct(self, logits, labels, num_valid, correct):
        """correct += number of the first `num_valid` rows whose argmax equals the label."""
        self.calls["count_correct"] += 1
        hits = np.argmax(logits[:num_valid], axis=1) == labels[:num_valid]
        correct[...] += np.count_nonzero(hits)
        return correct

    # ----------------------------------------------------------------- optimizer

    def sgd_momentum_update(self, params, grads, accum, lr, momentum, weight_decay, compute_copy=None):
        """One momentum-SGD step over flat buffers, in the reference's (TensorFlow) form.

        g = grad + weight_decay * param   (the gradient of 0.5 * wd * ||v||^2 added to the loss)
        accum = momentum * accum + g
        param -= lr * accum               (lr: a 0-d array, so the GPU step needs no host value)
        compute_copy, when given, receives the updated parameters in its (narrower) dtype.
        """
        self.calls["sgd_momentum_update"] += 1
        g = grads + weight_decay * params
        accum *= momentum
        accum += g
        params -= lr * accum
        if compute_copy is not None:
            compute_copy[...] = params

    def accumulate(self, total, value, scale):
        """total += scale * value, on 0-d (or same-shape) arrays: device-side running sums of the loss."""
        self.calls["accumulate"] += 1
        total[...] += scale * value
        return total

    def sum_of_squares(self, array, out):
        """out = sum(array ** 2), for the L2 term of the reported loss."""
        self.calls["sum_of_squares"] += 1
        out[...] = np.vdot(array, array)
        return out

    # ----------------------------------------------------------------- data

    def augment_batch(self, images, labels, indices, seed, step, distort, x_out, labels_out, first_row=0):
        """Gather a batch from the uint8 dataset, [pad-crop-flip], normalize to x / 128 - 1.

        images: uint8 (N, 32, 32, 3); indices: int (B,); x_out: activation (B, 3, 32, 32 | B, 32, 32, 3).
        With `distort`, each image is zero-padded to 40x40, cropped at a random offset and flipped at
        random, as the reference; the draws come from a counter-based hash of (seed, step, row), so
        they are identical on every backend and reproducible from the step alone.
        `first_row` is the position of this batch's first row in the step's global batch (a data-parallel
        worker's shard offset), so the draws depend on the global position, not on the shard.
        """
        self.calls["augment_batch"] += 1
        return self._augment(images, labels, indices, seed, step, distort, x_out, labels_out, first_row)

    def augment_train_batch(self, images, labels, order, step, steps_per_epoch, global_batch, first_row, seed,
                            distort, x_out, labels_out):
        """augment_batch of the training batch of the step held in the 0-d int64 array `step` (the
        trainer's step counter, which lives on the device on a GPU so a captured step can replay):
        rows order[start:start + B], start = (step % steps_per_epoch) * global_batch + first_row."""
        self.calls["augment_train_batch"] += 1
        batch = labels_out.size
        if steps_per_epoch * global_batch > order.size or first_row + batch > global_batch:
            raise ValueError(f"augment_train_batch: {steps_per_epoch} steps of {global_batch} rows do not fit an "
                             f"order of {order.size}, or rows {first_row}..{first_row + batch} the global batch")
        current = int(step)
        start = (current % steps_per_epoch) * global_batch + first_row
        return self._augment(images, labels, order[start:start + batch], seed, current, distort, x_out,
                             labels_out, first_row)

    def advance_step(self, step):
        """step (0-d int64) += 1: the last primitive of a training step."""
        self.calls["advance_step"] += 1
        step[...] += 1
        return step

    def _augment(self, images, labels, indices, seed, step, distort, x_out, labels_out, first_row):
        batch = images[indices]                                # (B, 32, 32, 3) uint8
        b, h, w, _ = batch.shape
        if distort:
            pad = 4
            padded = np.zeros((b, h + 2 * pad, w + 2 * pad, 3), dtype=np.uint8)
            padded[:, pad:pad + h, pad:pad + w, :] = batch
            dy, dx, flip = crop_flip_draws(seed, step, b, 2 * pad + 1, first_row)
            rows = dy[:, None] + np.arange(h)                  # (B, 32)
            cols = dx[:, None] + np.where(flip[:, None], np.arange(w)[::-1], np.arange(w))
            batch = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
        self._as_nhwc(x_out)[...] = batch.astype(x_out.dtype) / 128.0 - 1.0
        labels_out[...] = labels[indices]
        return x_out
