"""Memory-layout helpers shared by both backends: shapes and weight orders for NCHW and NHWC.

Activations are (N, C, H, W) or (N, H, W, C); conv weights are (K, C, R, S) for NCHW and (K, R, S, C) for
NHWC (what cuDNN wants for each layout); checkpoints store weights canonically as KCRS. The conversions are
transposed views, valid on NumPy and CuPy arrays alike. A backend mixes this in and sets `self.layout`.

Also here, because both backends split a weight gradient the same way: `weight_gradient_parts` (a batch
cut into chunks, --wgrad-chunks); and because both check a BatchNorm backward's relu operands the same way:
`check_relu_mask`.
"""

LAYOUTS = ("NCHW", "NHWC")


def check_relu_mask(primitive, y, beta, y_name="y"):
    """A BatchNorm backward's fused relu: beta (its mask recomputed from x) only with y (the relu's output)."""
    if beta is not None and y is None:
        raise ValueError(f"{primitive}: beta (the relu's mask from x) without {y_name} (a fused relu)")


class LayoutMixin:
    layout = "NHWC"

    def activation_shape(self, n, c, h, w):
        return (n, c, h, w) if self.layout == "NCHW" else (n, h, w, c)

    def input_shape(self, n, c, h, w):
        """The network's input: an activation (the GPU backend may pad its channels, --padded-input)."""
        return self.activation_shape(n, c, h, w)

    def nchw_dims(self, x):
        """(N, C, H, W) of an activation array in this backend's layout."""
        if self.layout == "NCHW":
            return x.shape
        n, h, w, c = x.shape
        return n, c, h, w

    def conv_weight_shape(self, k, c, r, s):
        return (k, c, r, s) if self.layout == "NCHW" else (k, r, s, c)

    def weight_to_canonical(self, w):
        """Conv weight in this layout -> (K, C, R, S), as checkpoints store it (a view)."""
        return w if self.layout == "NCHW" else w.transpose(0, 3, 1, 2)

    def weight_from_canonical(self, w_kcrs):
        return w_kcrs if self.layout == "NCHW" else w_kcrs.transpose(0, 2, 3, 1)

    @staticmethod
    def weight_gradient_parts(x, dy, dw):
        """The (x, dy, dw) parts of one conv2d_backward_filter call.

        dw shaped like the weight: one part, the whole batch. dw of shape (chunks, *weight shape): one part
        per chunk, dw[j] the weight gradient of the j-th of `chunks` near-equal slices of the batch (views
        of x and dy, contiguous since the batch is the outermost axis in both layouts; a slice is empty
        when the batch is smaller than `chunks`). Their sum is the whole batch's gradient: the caller adds
        them (ParamStore.gather_compute_gradients, one `sum_chunks` over every convolution at once).
        """
        if dw.ndim == x.ndim:
            return [(x, dy, dw)]
        n, chunks = x.shape[0], dw.shape[0]
        bounds = [n * j // chunks for j in range(chunks + 1)]
        return [(x[a:b], dy[a:b], dw[j]) for j, (a, b) in enumerate(zip(bounds, bounds[1:]))]
