"""ParamStore: every tensor of one kind in one flat buffer, with named, aligned views.

The model's trainable parameters live in one flat buffer and their gradients in another of the same
size, so the optimizer update, the gradient all-reduce and a checkpoint are each one operation over one
buffer. BatchNorm moving statistics live in a second store without gradients. Layers hold views into
the buffers; nothing is ever reallocated, so a GPU step can be captured once and replayed.

    store = ParamStore(backend, with_grads=True)
    w = store.add("stage1/block0/conv1/w", (k, c, r, s), conv=True)   # initialized by the store's conv_init
    store.allocate(rng)              # after every add(); w.value and w.grad are now views

Mixed precision: when the backend computes in a narrower dtype than it keeps parameters in (bfloat16
activations, float32 master weights), the store also holds `compute_flat`, a copy of the parameters in
the compute dtype; `Param.compute` views it and is what convolutions read. The optimizer refreshes it in
the same kernel as the update; `sync_compute_copy` refreshes it after any other write (init, restore).
Convolution weight gradients arrive in the compute dtype too (cuDNN writes its io dtype): they land in
`grad_compute_flat` (`Param.grad_compute`), and `gather_compute_gradients` turns them into the float32
gradients in one conversion over one span, because the store puts every convolution weight first.
With one dtype (the NumPy backend, float32 GPU runs) `compute` is simply `value` and `grad_compute` is
`grad`.

Chunked weight gradients (`backend.wgrad_chunks` = K > 1, --wgrad-chunks): `grad_compute_flat` has K rows,
`Param.grad_compute` is a (K, *weight) view, each convolution writes the gradient of each slice of the
batch into its own row, and `gather_compute_gradients` adds the rows (one `sum_chunks` for every
convolution, always in the same order), whatever the dtypes.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

# Every view starts on a 64-element boundary (256 bytes in float32): aligned loads for GPU kernels,
# and the padding elements stay zero forever (their gradient is zero and weight decay keeps them at 0).
ALIGN_ELEMENTS = 64


def zeros_init(shape, rng):
    return np.zeros(shape)


def ones_init(shape, rng):
    return np.ones(shape)


def he_normal(fan_in):
    """He et al. (2015) initialization for layers followed by ReLU: N(0, 2 / fan_in)."""
    def init(shape, rng):
        return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    return init


def glorot_uniform(fan_in, fan_out):
    """Glorot/Xavier uniform, U(+-sqrt(6 / (fan_in + fan_out))): TensorFlow 1's default for every layer of
    the reference (its dense layer, and its convolutions, tf.layers.conv2d without kernel_initializer)."""
    def init(shape, rng):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=shape)
    return init


def pytorch_default(fan_in):
    """PyTorch's default for nn.Conv2d and nn.Linear weights (kaiming_uniform with a = sqrt(5)):
    U(+-1 / sqrt(fan_in)), a variance of 1 / (3 fan_in)."""
    def init(shape, rng):
        limit = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-limit, limit, size=shape)
    return init


# How convolution weights start (--conv-init). Every convolution is followed by BatchNorm, so the scale
# does not change what the network computes, only the effective learning rate early on (the update of a
# weight before a BatchNorm scales as lr / |w|^2); weight decay then pulls |w|^2 to its equilibrium with a
# time constant of (1 - momentum) / (2 lr wd) steps (5,000 at lr 0.1, wd 1e-4, momentum 0.9), so by the
# end of a long run the starting scale is mostly forgotten. For a 3x3 convolution from C to C channels the
# variances are 2 / (9C) (he_normal), 1 / (9C) (glorot_uniform, the reference's) and 1 / (27C) (pytorch_default).
CONV_INITS = {
    "he_normal": lambda fan_in, fan_out: he_normal(fan_in),            # He et al. (2015)
    "glorot_uniform": glorot_uniform,                                   # the reference's (TensorFlow 1)
    "pytorch_default": lambda fan_in, fan_out: pytorch_default(fan_in),  # nn.Conv2d's
}
DEFAULT_CONV_INIT = "he_normal"


def conv_initializer(name, shape):
    """The initializer `name` (CONV_INITS) for a convolution weight of canonical shape (K, C, R, S)."""
    k, c, r, s = shape
    return CONV_INITS[name](c * r * s, k * r * s)


@dataclass
class Param:
    """One named tensor. `value`/`grad` are views into the store's flat buffers once allocated.

    `shape` is the canonical shape (conv weights KCRS); for conv weights the view itself has the
    backend's layout (KCRS for NCHW, KRSC for NHWC).
    """
    name: str
    shape: tuple
    init: Callable
    conv: bool = False
    offset: int = 0
    value: Optional[object] = field(default=None, repr=False)
    grad: Optional[object] = field(default=None, repr=False)
    compute: Optional[object] = field(default=None, repr=False)   # the copy convolutions read (see below)
    grad_compute: Optional[object] = field(default=None, repr=False)   # where a convolution writes its gradient

    @property
    def size(self):
        return int(np.prod(self.shape))


class ParamStore:
    """Named tensors packed into one flat buffer (and one flat gradient buffer if `with_grads`)."""

    def __init__(self, backend, with_grads=True, conv_init=DEFAULT_CONV_INIT):
        if conv_init not in CONV_INITS:
            raise ValueError(f"conv_init must be one of {', '.join(CONV_INITS)}, got {conv_init!r}")
        self.backend = backend
        self.with_grads = with_grads
        self.conv_init = conv_init    # how add(..., conv=True) without an init starts a convolution weight
        self.params = {}          # name -> Param, in creation order
        self.flat = None          # (total,) parameter buffer
        self.grad_flat = None     # (total,) gradient buffer
        self.compute_flat = None  # (total,) parameters in the compute dtype, when it differs
        self.grad_compute_flat = None  # (chunks, conv_span) convolution weight gradients as written (see above)
        self.total = 0            # elements of the flat buffers, set by allocate()
        self.conv_span = 0        # the convolution weights' elements, first in the flat buffers

    def add(self, name, shape, init=None, conv=False):
        """A tensor of canonical `shape` (conv weights KCRS), started by `init(shape, rng)`; by default
        zeros, or for a convolution weight (conv=True) the store's conv_init."""
        if self.flat is not None:
            raise RuntimeError("ParamStore.add after allocate()")
        if name in self.params:
            raise ValueError(f"duplicate parameter name {name!r}")
        if init is None:
            init = conv_initializer(self.conv_init, shape) if conv else zeros_init
        param = Param(name, tuple(shape), init, conv)
        self.params[name] = param
        return param

    def _assign_offsets(self):
        """Aligned offsets: convolution weights first (one span for their gradients' conversion), then the
        rest, each group in creation order."""
        offset = 0
        for conv_first in (True, False):
            for param in self.params.values():
                if param.conv == conv_first:
                    param.offset = offset
                    offset += -(-param.size // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
            if conv_first:
                self.conv_span = offset
        self.total = offset

    def allocate(self, rng):
        """Create the flat buffers, point every Param at its view and initialize it from `rng`."""
        be = self.backend
        self._assign_offsets()
        self.flat = be.zeros((self.total,), dtype=be.param_dtype)
        if self.with_grads:
            self.grad_flat = be.zeros((self.total,), dtype=be.param_dtype)
            chunks = be.wgrad_chunks
            if be.dtype != be.param_dtype:
                self.compute_flat = be.zeros((self.total,), dtype=be.dtype)
            if be.dtype != be.param_dtype or chunks > 1:
                self.grad_compute_flat = be.zeros((chunks, self.conv_span), dtype=be.dtype)
        for param in self.params.values():      # creation order: the same random draws in any layout
            param.value = self._view(self.flat, param)
            if self.with_grads:
                param.grad = self._view(self.grad_flat, param)
                param.grad_compute = (self._chunk_views(param)
                                      if param.conv and self.grad_compute_flat is not None else param.grad)
            param.compute = param.value if self.compute_flat is None else self._view(self.compute_flat, param)
            self.set_canonical(param.name, param.init(param.shape, rng))
        self.sync_compute_copy()

    def gather_compute_gradients(self):
        """float32 convolution weight gradients from the rows they were written in (mixed precision, or
        per batch chunk; nothing otherwise): one pass over the span they share."""
        if self.grad_compute_flat is not None:
            self.backend.sum_chunks(self.grad_flat[:self.conv_span], self.grad_compute_flat)

    def sync_compute_copy(self):
        """Refresh the compute-dtype copy from the master parameters (after init or a restore)."""
        if self.compute_flat is not None:
            self.backend.copy_into(self.compute_flat, self.flat)

    def _view(self, flat, param):
        """The slice of `flat` for `param`, shaped in the backend's layout."""
        shape = self.backend.conv_weight_shape(*param.shape) if param.conv else param.shape
        return flat[param.offset:param.offset + param.size].reshape(shape)

    def _chunk_views(self, param):
        """`param`'s columns of grad_compute_flat: shaped like its weight with one row, else (rows, *weight)."""
        rows = self.grad_compute_flat.shape[0]
        shape = self.backend.conv_weight_shape(*param.shape)
        block = self.grad_compute_flat[:, param.offset:param.offset + param.size]
        return block[0].reshape(shape) if rows == 1 else block.reshape((rows,) + shape)

    def __getitem__(self, name):
        return self.params[name]

    def __iter__(self):
        return iter(self.params.values())

    def __len__(self):
        return len(self.params)

    @property
    def num_elements(self):
        """Number of real (unpadded) elements."""
        return sum(p.size for p in self.params.values())

    # ----------------------------------------------------------------- canonical host copies

    def _read(self, flat, param):
        """A NumPy copy of `param`'s view of `flat`, in canonical shape (conv weights KCRS)."""
        view = self._view(flat, param)
        if param.conv:
            view = self.backend.weight_to_canonical(view)
        return self.backend.to_host(view)

    def _write(self, flat, param, array):
        """Write a canonical-shape host array into `param`'s view of `flat`, converting the layout."""
        array = np.asarray(array)
        if array.shape != param.shape:
            raise ValueError(f"{param.name}: shape {array.shape} != {param.shape}")
        if param.conv:
            array = np.ascontiguousarray(self.backend.weight_from_canonical(array))
        self.backend.upload_into(self._view(flat, param), array)

    def set_canonical(self, name, array):
        self._write(self.flat, self.params[name], array)

    def state_dict(self, prefix="", flat=None):
        """{prefix + name: canonical NumPy copy} of every tensor of `flat` (default: the parameters).

        Any buffer laid out like the parameters (gradients, optimizer momentum) can be passed as `flat`.
        """
        flat = self.flat if flat is None else flat
        return {prefix + p.name: self._read(flat, p) for p in self.params.values()}

    def load_state_dict(self, arrays, prefix="", flat=None):
        """Inverse of state_dict."""
        target = self.flat if flat is None else flat
        for param in self.params.values():
            self._write(target, param, arrays[prefix + param.name])
        if flat is None:
            self.sync_compute_copy()
