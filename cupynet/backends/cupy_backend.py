"""The GPU backend: the NumPy backend's contract on one CUDA device, with CuPy arrays.

Convolutions run through cuDNN Frontend graphs (cupynet/backends/cudnn_conv.py); everything else runs
our kernels from kernels/*.cu (loaded by cupynet/backends/kernels.py), the dense layer included
(kernels/dense.cu). The BatchNorm primitives are a mixin of their own (cupynet/backends/cupy_batchnorm.py), and
what every primitive shares (operand checks, the kernels' conventions) is in cupynet/backends/cupy_operands.py. Every method has the name, arguments and semantics of
NumpyBackend (cupynet/backends/numpy_backend.py), which is the oracle that tests/test_gpu_parity.py
compares it with, primitive by primitive, on a machine with a GPU:

    from cupynet.backends.cupy_backend import CupyBackend
    be = CupyBackend(device_id=0, layout="NHWC", dtype="bfloat16", tf32=True)
    python -m pytest -m gpu tests/test_gpu_parity.py -q       # on a GPU machine

Streams and synchronisation
    The backend owns a non-blocking stream (`self.stream`). Every primitive enters `self.device` and
    `self.stream`, so its kernels, cuDNN executions (the cuDNN handle is bound to the same stream),
    and copies are enqueued there, in order. No primitive waits for the device or reads a
    device value on the host: scalars that change per step (the learning rate) are 0-d device arrays,
    results that the host wants (loss, accuracy) stay on the device until `to_host`, and scratch memory
    is allocated once per shape and reused, so a warmed-up step allocates nothing and can be captured.
    One exception: weight gradients (cuDNN wgrad) run on side streams with their own cuDNN handle, forked
    from the main stream and overlapping the data gradients that follow (independent work, and small
    convolutions leave most of the GPU idle); `wait_for_gradients`, `to_host` and `synchronize` join
    them. With wgrad_streams=N > 1 the step's weight gradients take the N side streams in turn, so they
    also overlap each other (each stream has its own cuDNN workspace). With wgrad_chunks=K > 1 each
    weight gradient is K cuDNN calls over K slices of the batch, on consecutive side streams, summed once
    per step for every convolution (`sum_chunks`, in a fixed order: deterministic).
    With pixel_pairs=True (--conv-pixel-pairs) stage 1's 3x3 forwards and data gradients run as the same
    convolutions on pixel pairs (cupynet/backends/pixel_pairs.py), each after a small kernel that builds
    the paired weights from the current ones; with wgrad_pixel_pairs=True (--wgrad-pixel-pairs) their weight
    gradients do, each followed by a small kernel that folds the paired gradient back.
    With own_conv_channels=N (--own-conv-channels) the 3x3 forwards and data gradients of at most N channels that
    cupynet's own tensor-core kernel takes run there (cupynet/backends/conv3x3.py), before pixel pairs.
    With padded_input=True (--padded-input, NHWC) the network's input has its channels padded to a 16-byte
    pixel (`input_shape`; cupynet/backends/padded_input.py): the augmentation writes the zeros, and a
    convolution of such an input pads its weights first and cuts its weight gradient back to the real channels.
    With stream_priorities=True (--stream-priorities) the main stream runs at the device's highest priority and
    the side streams at its lowest, in eager steps and in the captured one (cupynet/backends/node_priorities.py).
    With programmatic_launch=True (--programmatic-launch) the captured step's edges into our kernels from the
    kernels before them become programmatic (cupynet/backends/programmatic_launch.py): each launched before the
    one before it has finished, waiting for it inside (every kernel's first statement); with
    programmatic_launch_early=True (--programmatic-launch-early, which implies it) as soon as all the blocks of
    the one before have begun.
    Code outside the backend never does CuPy array work itself: it calls the backend (`upload_into`,
    `copy_into`, `fill`, ...), which enters the stream. Making the stream current once with `use()` is
    not enough: CuPy rewinds to its stack of `with` blocks, so after the first primitive the thread's
    current stream is the legacy null stream again, which does not wait for a non-blocking stream (a
    GPU run showed parameters written there arriving late or out of order). One backend per thread
    (the data-parallel design: one worker thread per GPU).

bfloat16: CuPy 14 has a real bfloat16 dtype when `ml_dtypes` is installed (CuPy >= 14.0 maps
    `ml_dtypes.bfloat16` to its C type; CuPy's own kernels then include <cuda_bf16.h>). We use it:
    bf16 activations are `cupy.ndarray`s of dtype `ml_dtypes.bfloat16`, `astype` converts with
    round-to-nearest-even, `to_host` returns a NumPy array of that dtype (`.astype(numpy.float32)` to
    compute with it), and our kernels see `__nv_bfloat16*`. Without ml_dtypes, dtype="bfloat16" is
    refused with a one-line DeviceError (no uint16 stand-in: ParamStore's `copy_into` would silently
    convert numbers instead of reinterpreting bits).

Mixed precision (dtype="bfloat16"): activations, their gradients and the convolutions' weight copy
    (ParamStore.compute_flat) are bf16; master parameters, gradients, momentum, BatchNorm statistics,
    the loss and all accumulations are float32 (`param_dtype`). cuDNN writes wgrad in its io dtype, so
    the model hands `conv2d_backward_filter` a bf16 gradient view (ParamStore.grad_compute_flat, summed
    into float32 in one pass at the end of backward, `sum_chunks`); given a float32 view, it writes a bf16
    scratch and converts.
    The dense layer computes in float32 (its kernels read bf16 inputs and float32 weights directly).

float32: `tf32=True` lets cuDNN use TF32 tensor cores (~1e-3 relative error per convolution);
    `tf32=False` keeps convolutions strict fp32 (the parity tests use it).
"""
import time
import weakref
from collections import Counter

import numpy as np

try:                                # importable without CuPy, so CPU tests can inspect the class
    import cupy
except ImportError:                 # pragma: no cover - depends on the machine
    cupy = None

from cupynet.backends import (MAX_WGRAD_CHUNKS, MAX_WGRAD_STREAMS, conv3x3, cuda_driver, padded_input,
                               pixel_pairs, programmatic_launch)
from cupynet.backends.cudnn_conv import CudnnConv, import_frontend_in_background
from cupynet.backends.cupy_batchnorm import BatchNormPrimitives
from cupynet.backends.cupy_operands import (MAX_SLICES, MIN_STEPS_PER_THREAD, element_count, i32, on_device,
                                            pack_aligned, pack_elements, present, primitive, require_dtype, same_dtype)
from cupynet.backends.kernels import KernelLibrary, ctype
from cupynet.backends.layout import LAYOUTS, LayoutMixin
from cupynet.backends.node_priorities import HIGHEST_PRIORITY, LOWEST_PRIORITY, USE_NODE_PRIORITY
from cupynet.errors import DeviceError
DTYPES = ("float32", "bfloat16")
AUGMENT_PAD = 4                     # the reference's pad-4 crop: offsets in [0, 9)
HEAD_THREADS = 256                  # the one-block loss and accuracy kernels
WARP = 32                           # threads per warp: the dense layer's kernels sum each output in one


def bfloat16_dtype():
    """numpy.dtype of ml_dtypes.bfloat16, which CuPy 14 supports; DeviceError if ml_dtypes is missing."""
    try:
        import ml_dtypes
    except ImportError as error:
        raise DeviceError("--dtype bfloat16 on the GPU needs the ml_dtypes package (CuPy's bfloat16 dtype): "
                          "pip install ml_dtypes") from error
    return np.dtype(ml_dtypes.bfloat16)


def _pair_view(activation):
    """An NHWC activation (N, H, W, C) read as pixel pairs (N, H, W/2, 2C): the same bytes (a view)."""
    return activation.reshape(pixel_pairs.paired_shape(activation.shape))


class CupyBackend(BatchNormPrimitives, LayoutMixin):
    """The backend contract on one CUDA device (see the module docstring)."""

    name = "cupy"
    xp = cupy

    def __init__(self, device_id=0, layout="NHWC", dtype="float32", tf32=True, autotune=True, overlap_wgrad=True,
                 wgrad_streams=1, deterministic=True, wgrad_chunks=1, bn_launches=2, split_k=False,
                 conv_genstats=False, pixel_pairs=False, residual_grad_sums=False, wgrad_pixel_pairs=False,
                 stream_priorities=False, tune_in_graph=False, padded_input=False, programmatic_launch=False,
                 programmatic_launch_early=False, own_conv_channels=0):
        if cupy is None:
            raise DeviceError("CuPy is not installed; the GPU backend needs CuPy >= 14")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        dtype_name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        if dtype_name not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} on the GPU, got {dtype!r}")
        if not (isinstance(wgrad_streams, int) and 1 <= wgrad_streams <= MAX_WGRAD_STREAMS):
            raise ValueError(f"wgrad_streams must be an integer from 1 to {MAX_WGRAD_STREAMS}, got {wgrad_streams!r}")
        if not (isinstance(wgrad_chunks, int) and 1 <= wgrad_chunks <= MAX_WGRAD_CHUNKS):
            raise ValueError(f"wgrad_chunks must be an integer from 1 to {MAX_WGRAD_CHUNKS}, got {wgrad_chunks!r}")
        if bn_launches not in (1, 2):
            raise ValueError(f"bn_launches must be 1 or 2, got {bn_launches!r}")
        if conv_genstats and not autotune:
            raise ValueError("conv_genstats needs autotune: the autotuner checks each genstats engine before use")
        if tune_in_graph and not autotune:
            raise ValueError("tune_in_graph needs autotune: it is how the autotuner times the engines")
        self.layout = layout
        self.bn_launches = bn_launches          # launches per BatchNorm pass (1: a grid-wide wait inside one)
        self.dtype = bfloat16_dtype() if dtype_name == "bfloat16" else np.dtype(np.float32)   # activations
        self.param_dtype = np.dtype(np.float32)     # master parameters, gradients, optimizer, statistics
        self.tf32 = bool(tf32)
        self.autotune = bool(autotune)          # time cuDNN's candidate engines on first use, keep the fastest
        self.deterministic = bool(deterministic)  # only cuDNN engines that repeat their bits (cudnn_conv.py)
        self.split_k = bool(split_k)            # autotuning also times weight gradients' split-K settings
        self.tune_in_graph = bool(tune_in_graph)  # ... and times each engine replayed from a CUDA graph
        self.conv_genstats = bool(conv_genstats)  # convolutions before BatchNorm also give its sums (layers.py)
        # stage 1's 3x3 forwards and data gradients on pixel pairs (backends/pixel_pairs.py); NHWC only
        self.pixel_pairs = bool(pixel_pairs) and layout == "NHWC"
        self.wgrad_pixel_pairs = bool(wgrad_pixel_pairs) and layout == "NHWC"     # and their weight gradients
        # 3x3 forwards and data gradients of at most this many channels in our own kernel (backends/conv3x3.py)
        if own_conv_channels not in conv3x3.CHANNEL_CHOICES:
            raise ValueError(f"own_conv_channels must be one of {conv3x3.CHANNEL_CHOICES}, got {own_conv_channels!r}")
        self.own_conv_channels = own_conv_channels if layout == "NHWC" else 0
        self.own_conv_sum_shapes = set()        # (x, w, stride) shapes whose BatchNorm sums our kernel wrote
        # the network's input padded to a 16-byte pixel, for the stem (backends/padded_input.py); NHWC only
        self.padded_input = bool(padded_input) and layout == "NHWC"
        # a residual block's input-gradient add also reduces the next BatchNorm's gradient sums (layers.py)
        self.residual_grad_sums = bool(residual_grad_sums)
        self.overlap_wgrad = bool(overlap_wgrad)  # weight gradients on a side stream, beside the main stream
        # the main stream at the highest priority, the side streams at the lowest (backends/node_priorities.py)
        self.stream_priorities = bool(stream_priorities)
        # the captured step's edges into our kernels made programmatic (backends/programmatic_launch.py), with
        # programmatic_launch_early from the launch-order port (our kernel may launch once the one before has begun)
        self.programmatic_launch_early = bool(programmatic_launch_early)
        self.programmatic_launch = bool(programmatic_launch) or self.programmatic_launch_early
        self.wgrad_chunks = wgrad_chunks        # weight gradients per slice of the batch (ParamStore reads it)
        self._side_pending = set()              # side streams with work the main stream has not waited for
        self._wgrad_turn = 0                    # the next weight gradient's side stream (in turn, per step)
        self._pairs_built = set()               # weights whose paired kernel a forward built in this pass
        self.calls = Counter()
        self._scratch_buffers = {}
        self._bn_plans = {}

        started = time.perf_counter()
        frontend = import_frontend_in_background()     # beside the CUDA context, which it does not need
        self.device = cupy.cuda.Device(device_id)
        self.device.use()
        capability = int(self.device.compute_capability)
        if self.own_conv_channels and capability < conv3x3.MIN_COMPUTE_CAPABILITY:
            raise DeviceError(f"--own-conv-channels needs a GPU of compute capability 8.0 or later (its kernel "
                              f"multiplies with mma.sync on bf16 and TF32); GPU {device_id} is "
                              f"{capability // 10}.{capability % 10}: leave the option out")
        with self.device:
            main, side = (dict(priority=HIGHEST_PRIORITY), dict(priority=LOWEST_PRIORITY)) if stream_priorities \
                else ({}, {})
            self.stream = cupy.cuda.Stream(non_blocking=True, **main)
            self.side_streams = [cupy.cuda.Stream(non_blocking=True, **side)    # weight gradients (see below)
                                 for _ in range(wgrad_streams)]
            self._fork = cupy.cuda.Event(block=False, disable_timing=True)
            self._join = cupy.cuda.Event(block=False, disable_timing=True)
            self.kernels = KernelLibrary(self.device)
            context = time.perf_counter()          # the first stream made the device's context
            cudnn = frontend.result()
            imported = time.perf_counter()
            self._create_conv(cudnn, dtype_name)
        # where the backend's setup went (cupynet.train prints it): a run's setup counts against its wall time.
        # The import ran beside the context, from the start: the three parts add up to more than the whole when
        # the import was not the last to finish
        self.setup_phases = {"CUDA context": round(context - started, 3),
                             "cuDNN import": round(frontend.seconds, 3),
                             "cuDNN handles": round(time.perf_counter() - imported, 3)}

    def _create_conv(self, cudnn, dtype_name):
        """cuDNN handle bound to our stream, and the convolution engine that uses it."""
        self.cudnn_handle = cudnn.create_handle()
        cudnn.set_stream(handle=self.cudnn_handle, stream=self.stream.ptr)
        self.side_cudnn_handle = cudnn.create_handle()          # bound to a side stream per call
        strict = (not self.tf32) and dtype_name == "float32"   # bf16 convolutions always use tensor cores
        self.conv = CudnnConv(self.cudnn_handle, self.layout, dtype_name, strict_fp32=strict, autotune=self.autotune,
                              wgrad_handle=self.side_cudnn_handle,
                              wgrad_streams=self.side_streams,
                              deterministic=self.deterministic, split_k=self.split_k, hold=self.hold_stream,
                              tune_in_graph=self.tune_in_graph)

    # ----------------------------------------------------------------- arrays and layout helpers

    def _as_dtype(self, dtype):
        if dtype is None:
            return self.dtype
        if isinstance(dtype, str) and dtype == "bfloat16":
            return bfloat16_dtype()
        return np.dtype(dtype)

    @on_device
    def empty(self, shape, dtype=None):
        return cupy.empty(shape, dtype=self._as_dtype(dtype))

    @on_device
    def zeros(self, shape, dtype=None):
        return cupy.zeros(shape, dtype=self._as_dtype(dtype))

    @on_device
    def to_host(self, array):
        """A NumPy copy of a device array (waits for the stream, and the side stream's weight gradients:
        only between steps)."""
        self._join_side_stream()
        # CuPy's ascontiguousarray turns a 0-d array into shape (1,): give back the caller's shape
        return cupy.ascontiguousarray(array).get(stream=self.stream).reshape(array.shape)

    @on_device
    def from_host(self, array, dtype=None):
        """A device copy of a host array, converted to `dtype` on the host (bf16: round to nearest even)."""
        host = np.asarray(array)
        host = np.array(host, dtype=self._as_dtype(dtype) if dtype is not None else host.dtype,
                        order="C", copy=True)
        device_array = cupy.empty(host.shape, dtype=host.dtype)
        device_array.set(host, stream=self.stream)
        return device_array

    @on_device
    def upload_into(self, array, host):
        """array[...] = host (same shape and dtype), copied on the backend's stream, after earlier work."""
        host = np.asarray(host, dtype=array.dtype, order="C")      # (ascontiguousarray makes 0-d arrays 1-d)
        if host.shape != array.shape:
            raise ValueError(f"upload_into: host array {host.shape} does not match {array.shape}")
        array.set(host, stream=self.stream)

    @on_device
    def copy_into(self, target, source):
        """target[...] = source, converted to target's dtype, on the backend's stream (device to device):
        bfloat16 <-> float32 by our `convert` kernel (round to nearest even), a plain copy otherwise."""
        if target.shape != source.shape:
            raise ValueError(f"copy_into: source {source.shape} does not match target {target.shape}")
        if target.dtype == source.dtype:
            target[...] = source
        else:
            self._convert(source, target)

    @on_device
    def fill(self, array, value):
        """Set every element on the device (e.g. the learning-rate scalar between steps)."""
        array.fill(value)

    def hold_stream(self, seconds):
        """Keep the current stream busy for `seconds` (kernels/timing.cu), so that work enqueued next runs
        back to back once the hold ends: events around it then time the GPU, not the host's launches.
        GPU only, for measurements (the engine autotuner, bench/conv_engines.py, bench/layers.py); never in a training step."""
        self.kernels.launch("hold_stream", (), (1,), (1,), (np.uint64(max(0, int(seconds * 1e9))),))

    def synchronize(self):
        """Wait until everything enqueued on the backend's streams has run."""
        with self.device:
            self._join_side_stream()
        self.stream.synchronize()

    def _join_side_stream(self):
        """Make the main stream wait for the side streams' work so far (enqueued; no host wait)."""
        for lane in sorted(self._side_pending):
            self._join.record(self.side_streams[lane])     # a wait takes the event as recorded at the call
            self.stream.wait_event(self._join)
        self._side_pending.clear()

    def input_shape(self, n, c, h, w):
        """The shape of the network's input: activation_shape, with padded_input its channels padded to a
        16-byte pixel (the augmentation writes the zeros; a convolution of it pads its weights to match)."""
        if self.padded_input:
            c = padded_input.padded_channels(c, self.dtype)
        return self.activation_shape(n, c, h, w)

    @property
    def _channels_last(self):
        return i32(self.layout == "NHWC")

    def _scratch(self, role, shape, dtype):
        """A device buffer for internal use, allocated once per (role, shape, dtype) and then reused.

        Reuse is safe because everything runs in order on one stream: a later user of the buffer
        starts only after the earlier one's kernels have finished.
        """
        key = (role, tuple(shape), np.dtype(dtype).str)
        buffer = self._scratch_buffers.get(key)
        if buffer is None:
            buffer = cupy.empty(shape, dtype=dtype)
            self._scratch_buffers[key] = buffer
        return buffer

    def _launch_1d(self, name, template_args, n, args):
        """A grid-stride kernel over n items."""
        self.kernels.launch(name, template_args, self.kernels.grid_1d(n), KernelLibrary.BLOCK, args)

    def _launch_packed(self, name, dtype, n, packed, args, more_types=(), shared_mem=0, packs_fit=True):
        """An elementwise kernel with a trailing `vec` argument (common.cuh, "16-byte packs"): vec = 1 when
        every array in `packed` (those the kernel indexes per element) starts on a 16-byte boundary, and the
        caller's packs_fit (a kernel's own condition on the shapes) holds.
        Template arguments: the elements' type, then more_types."""
        pack = pack_elements(dtype)
        vec = packs_fit and pack_aligned(packed)
        work = n // pack + n % pack if vec else n            # threads needed: packs, then the tail
        self.kernels.launch(name, (ctype(dtype), *more_types), self.kernels.grid_1d(max(work, 1)),
                            KernelLibrary.BLOCK, tuple(args) + (i32(vec),), shared_mem=shared_mem)

    def _convert(self, source, target):
        """target = source converted to target's dtype (same number of elements): a sum of one row."""
        self._sum_rows(source, target, 1)

    def _sum_rows(self, rows, target, count):
        """target = the sum of the `count` rows of target's size that `rows` holds, in float32 (kernels/activation.cu)."""
        n = element_count(target)
        self._launch_1d("sum_rows", (ctype(rows.dtype), ctype(target.dtype)), n, (rows, target, i32(n), i32(count)))

    @primitive
    def sum_chunks(self, target, chunks):
        """target[...] = the sum of chunks' rows (chunks: (rows, *target.shape)), added in row order in float32,
        converted to target's dtype: weight gradients computed per slice of the batch (or in bf16) into the
        float32 ones, for every convolution in one pass."""
        if chunks.shape[1:] != target.shape:
            raise ValueError(f"sum_chunks: rows of {chunks.shape[1:]} do not match {target.shape}")
        self._sum_rows(chunks, target, chunks.shape[0])

    # ----------------------------------------------------------------- convolution (cuDNN Frontend)

    @primitive
    def conv2d_forward(self, x, w, stride, pad, y):
        """y = conv(x, w). x: activation; w: (K,C,R,S) | (K,R,S,C) in the activation dtype. With pixel_pairs
        (--conv-pixel-pairs), a convolution that pixel_pairs.applies to runs on pixel pairs; with
        own_conv_channels (--own-conv-channels), one that our own kernel takes runs there."""
        if self._own_conv(x, w, stride, pad, y, data_gradient=False):
            return y
        if self._on_pixel_pairs(x, w, stride, pad):
            self.conv.forward(_pair_view(x), self._pixel_pair_weight(w, reuse=False), 1, 1, _pair_view(y))
            return y
        return self.conv.forward(x, self._weight_for(x, w), stride, pad, y)

    @primitive
    def conv2d_forward_with_stats(self, x, w, stride, pad, y, sums):
        """y = conv(x, w) and sums (2, K) float32 <- [sum(y), sum(y^2)] per channel, in one cuDNN graph (its
        genstats, --conv-genstats), as NumpyBackend. Returns False, with y written by the plain graph and
        sums not to be read, where cuDNN has no engine for the fused graph that passes this engine's rules
        and the autotuner's checks (the caller's BatchNorm then makes its own statistics). Never on pixel
        pairs: their sums would be per paired channel. A convolution our own kernel takes (--own-conv-channels)
        runs there and writes the sums too: True."""
        require_dtype(np.float32, sums=sums)
        if self._own_conv(x, w, stride, pad, y, data_gradient=False, sums=sums):
            return True
        return self.conv.forward_with_stats(x, self._weight_for(x, w), stride, pad, y, sums)

    @primitive
    def conv2d_backward_data(self, dy, w, stride, pad, dx):
        """dx = d(loss)/dx (in our own kernel or on pixel pairs as conv2d_forward)."""
        if self._own_conv(dy, w, stride, pad, dx, data_gradient=True):
            return dx
        if self._on_pixel_pairs(dx, w, stride, pad):
            self.conv.backward_data(_pair_view(dy), self._pixel_pair_weight(w, reuse=True), 1, 1, _pair_view(dx))
            return dx
        return self.conv.backward_data(dy, self._weight_for(dx, w), stride, pad, dx)

    def _weight_for(self, image, w):
        """w, or for a padded input (padded_input.is_padded: more channels than w reads) w with zero channels
        added to match, built by kernels/padded_input.cu into a buffer of w's own (w changes between steps: every
        forward builds it; a few thousand values)."""
        if not padded_input.is_padded(self.layout, image.shape, w.shape):
            return w
        k, r, s, c = w.shape
        channels = image.shape[-1]
        padded = self._scratch(("padded_input", w.data.ptr), (k, r, s, channels), w.dtype)
        self._launch_1d("pad_weight_channels", (ctype(w.dtype),), padded.size,
                        (w, padded, i32(k * r * s), i32(c), i32(channels)))
        return padded

    def _own_conv(self, source, w, stride, pad, target, data_gradient, sums=None):
        """target = the forward (x -> y) or data gradient (dy -> dx) of this convolution in our own tensor-core kernel
        (kernels/conv3x3.cu) where it takes it (conv3x3.kernel_shape, within own_conv_channels, the arrays starting
        where its vector loads and stores need them): True; else False, nothing done. With sums (2, K) float32 (a
        forward), also [sum(y), sum(y^2)] per channel. Grid: (x, output channels / 16) blocks, x no larger than the
        GPU holds at once, the warps taking 16-pixel tiles in turn."""
        if not self.own_conv_channels:                 # the default: every convolution is cuDNN's
            return False
        shape = conv3x3.kernel_shape(self.layout, self.dtype.name, self.tf32, source.shape, w.shape, stride, pad,
                                     data_gradient, self.own_conv_channels)
        if shape is None or any(a.data.ptr % conv3x3.ALIGNMENT for a in (source, target)):
            return False
        source_channels, target_channels, _ = shape
        n, h, width, _ = source.shape
        stats = sums is not None
        if stats and sums.shape != (2, target_channels):
            raise ValueError(f"sums of shape {sums.shape} for a convolution of {target_channels} output channels")
        template = (ctype(self.dtype), str(source_channels), str(target_channels), str(stride),
                    "true" if data_gradient else "false", "true" if stats else "false")
        groups = target_channels // conv3x3.GROUP
        shared = conv3x3.shared_bytes(self.dtype.name, source_channels, stats)
        resident = self.kernels.resident_blocks("conv3x3_mma", template, conv3x3.THREADS, shared)
        blocks = max(1, min(-(-conv3x3.tiles(target.shape) // (conv3x3.THREADS // 32)), resident // groups))
        arrivals = self._bn_arrivals()         # the reductions' counter: our kernels on this stream run one at a time
        if stats:
            self.own_conv_sum_shapes.add((source.shape, w.shape, stride))
            partials = self._scratch("conv3x3_partials", (conv3x3.partial_sums(blocks, groups),), np.float32)
        else:                                  # not touched without sums: any array will do
            partials = sums = arrivals
        self.kernels.launch("conv3x3_mma", template, (blocks, groups), (conv3x3.THREADS,),
                            (source, w, target, i32(n), i32(h), i32(width), partials, arrivals, sums),
                            shared_mem=shared)
        return True

    def _on_pixel_pairs(self, image, w, stride, pad):
        """Whether this convolution runs on pixel pairs: the option is on and the rewrite applies to it."""
        return self.pixel_pairs and pixel_pairs.applies(self.layout, image.shape, w.shape, stride, pad)

    def _pixel_pair_weight(self, w, reuse):
        """The paired kernel of w (kernels/pixel_pairs.cu), in a buffer of w's own. A forward builds it (w changes
        between steps); a data gradient (reuse) takes the one its layer's forward built in the same pass, since w
        does not change between a layer's forward and its backward (the optimizer runs after wait_for_gradients,
        which ends the pass), and builds it only where no forward did: one launch per convolution and step."""
        paired = self._scratch(("pixel_pairs", w.data.ptr), pixel_pairs.paired_weight_shape(w.shape), w.dtype)
        if not (reuse and w.data.ptr in self._pairs_built):
            k, r, _, c = w.shape
            self._launch_1d("pixel_pair_weights", (ctype(w.dtype),), paired.size,
                            (w, paired, i32(k), i32(r), i32(c)))
            self._pairs_built.add(w.data.ptr)
        return paired

    @primitive
    def conv2d_backward_filter(self, x, dy, stride, pad, dw):
        """dw = d(loss)/dw, written, in dw's dtype: the activation dtype directly, else (float32 dw in bf16)
        through a bf16 scratch and a conversion. dw of shape (chunks, *weight): dw[j] is the gradient of
        the j-th slice of the batch (LayoutMixin.weight_gradient_parts; --wgrad-chunks), each its own cuDNN
        call, the chunks side by side on consecutive side streams: more of the GPU busy than one call over
        the whole batch gets at 16-64 channels, and the sum of the chunks (`sum_chunks`, once per step for
        every convolution) is added in a fixed order, so the result still repeats its bits.

        It runs on side streams (the step's k-th parameter-gradient call, the dense layer's first, on side stream k mod
        wgrad_streams), after everything enqueued so far on the main stream. With overlap_wgrad (the default)
        it also runs beside what comes next (the data gradient, the layers below, other weight gradients; x
        and dy are not written again in this step), and dw is final once the main stream has waited for the
        side streams: `wait_for_gradients()` (the model calls it at the end of backward), `to_host` and
        `synchronize`. Without, the main stream waits for it at once (serial order; bench/layers.py times
        each primitive that way).
        """
        self._fork.record(self.stream)
        for x_part, dy_part, dw_part in self.weight_gradient_parts(x, dy, dw):
            lane, side = self._next_side_stream()
            with side:
                if x_part.shape[0]:
                    self._weight_gradient(x_part, dy_part, stride, pad, dw_part, lane)
                else:                                   # a batch smaller than the chunks: nothing to add
                    dw_part.fill(0)
        if not self.overlap_wgrad:
            self._join_side_stream()
        return dw

    def _next_side_stream(self):
        """(lane, stream): the side stream whose turn it is (the step's k-th parameter gradient on side stream k mod
        wgrad_streams), made to wait for the main stream's work up to the caller's `self._fork.record`, and counted
        as pending until the main stream joins it."""
        lane = self._wgrad_turn % len(self.side_streams)
        self._wgrad_turn += 1
        side = self.side_streams[lane]
        side.wait_event(self._fork)
        self._side_pending.add(lane)
        return lane, side

    def _weight_gradient(self, x, dy, stride, pad, dw, lane):
        """cuDNN wgrad [into the lane's bf16 scratch, then converted] on the current stream (side stream `lane`);
        with wgrad_pixel_pairs, where the rewrite applies, on pixel pairs into the lane's scratch, then folded."""
        if self.wgrad_pixel_pairs and pixel_pairs.applies(self.layout, x.shape, dw.shape, stride, pad):
            d_paired = self._scratch(f"pixel_pairs_wgrad{lane}", pixel_pairs.paired_weight_shape(dw.shape), self.dtype)
            self.conv.backward_filter(_pair_view(x), _pair_view(dy), 1, 1, d_paired, lane)
            return self._fold_pixel_pair_gradient(d_paired, dw)
        if padded_input.is_padded(self.layout, x.shape, dw.shape):
            # the padded input's gradient (K, R, S, X) into the lane's scratch, its first C channels copied out
            k, r, s, c = dw.shape
            d_padded = self._scratch(f"padded_input_wgrad{lane}", (k, r, s, x.shape[-1]), self.dtype)
            self.conv.backward_filter(x, dy, stride, pad, d_padded, lane)
            self._launch_1d("crop_weight_channels", (ctype(d_padded.dtype), ctype(dw.dtype)), dw.size,
                            (d_padded, dw, i32(k * r * s), i32(c), i32(x.shape[-1])))
            return dw
        if dw.dtype == self.dtype:
            return self.conv.backward_filter(x, dy, stride, pad, dw, lane)
        dw_io = self._scratch(f"wgrad{lane}", dw.shape, self.dtype)    # one per side stream: they run side by side
        self.conv.backward_filter(x, dy, stride, pad, dw_io, lane)
        self._convert(dw_io, dw)
        return dw

    def _fold_pixel_pair_gradient(self, d_paired, dw):
        """dw (K, R, 3, C), any activation dtype <- the paired weight gradient d_paired (2K, R, 3, 2C) folded back:
        each weight's two places added (kernels/pixel_pairs.cu)."""
        k, r, _, c = dw.shape
        self._launch_1d("pixel_pair_weight_gradient", (ctype(d_paired.dtype), ctype(dw.dtype)), dw.size,
                        (d_paired, dw, i32(k), i32(r), i32(c)))
        return dw

    @primitive
    def wait_for_gradients(self):
        """Order the weight gradients computed beside the main stream before what comes next on it.

        Also the end of a step's backward: the next step's weight gradients take the side streams in the
        same turn again (the k-th always on stream k mod wgrad_streams).
        """
        self._join_side_stream()
        self._wgrad_turn = 0
        self._pairs_built.clear()       # the optimizer may change the weights next: pair them again

    # ----------------------------------------------------------------- elementwise

    @primitive
    def relu_forward(self, x, y):
        same_dtype(x, y=y)
        n = element_count(x)
        self._launch_packed("relu_forward", x.dtype, n, (x, y), (x, y, i32(n)))
        return y

    @primitive
    def relu_backward(self, dy, y, dx):
        """dx = dy where the relu output y is positive."""
        same_dtype(dy, y=y, dx=dx)
        n = element_count(dy)
        self._launch_packed("relu_backward", dy.dtype, n, (dy, y, dx), (dy, y, dx, i32(n)))
        return dx

    @primitive
    def add(self, a, b, y):
        """y = a + b (the pre-activation residual sum); y may be a."""
        same_dtype(a, b=b, y=y)
        n = element_count(a)
        self._launch_packed("residual_add", a.dtype, n, (a, b, y), (a, b, b, i32(0), y, i32(n)))
        return y

    @primitive
    def relu_backward_add(self, dy, y, addend, dx):
        """dx = addend + (dy where the relu output y is positive, else 0); dx may be addend."""
        same_dtype(dy, y=y, addend=addend, dx=dx)
        n = element_count(dy)
        self._launch_packed("residual_add", dy.dtype, n, (addend, dy, y, dx),
                            (addend, dy, y, i32(1), dx, i32(n)))
        return dx

    # ----------------------------------------------------------------- option-A shortcut

    def _shortcut_args(self, x_like, y_like, stride):
        """(N, Cin, H, W, Cout, Ho, Wo, stride, channels_last) as kernel arguments, checked."""
        n, cin, h, w = self.nchw_dims(x_like)
        n_out, cout, ho, wo = self.nchw_dims(y_like)
        if n_out != n or cout < cin or (ho, wo) != (h // stride, w // stride):
            raise ValueError(f"shortcut: input {x_like.shape} and output {y_like.shape} do not match stride {stride}")
        return tuple(i32(v) for v in (n, cin, h, w, cout, ho, wo, stride)) + (self._channels_last,)

    def _shortcut_packs_fit(self, x_like, y_like):
        """Whether the shortcut kernels' packs fit the shapes (alignment aside): NHWC, and Cin, Cout and the padding
        below all multiples of a pack, so that a pack is one position's channels, all copied or all padding."""
        _, cin, _, _ = self.nchw_dims(x_like)
        _, cout, _, _ = self.nchw_dims(y_like)
        pack = pack_elements(x_like.dtype)
        return self.layout == "NHWC" and cin % pack == 0 and cout % pack == 0 and (cout - cin) // 2 % pack == 0

    @primitive
    def shortcut_forward(self, x, stride, y):
        """y = zero-pad-channels(avgpool_stride(x)), padding (Cout - Cin) // 2 channels below."""
        same_dtype(x, y=y)
        self._launch_packed("shortcut_forward", x.dtype, element_count(y), (x, y), (x, y) + self._shortcut_args(x, y, stride),
                            packs_fit=self._shortcut_packs_fit(x, y))
        return y

    @primitive
    def shortcut_backward(self, dy, stride, dx, relu_output=None, accumulate=False):
        """dx = [dx +] the adjoint of shortcut_forward applied to dy [masked by relu_output > 0], one pass."""
        same_dtype(dy, dx=dx, **present(relu_output=relu_output))
        if relu_output is not None and relu_output.shape != dy.shape:
            raise ValueError(f"shortcut_backward: relu_output {relu_output.shape} for a gradient of {dy.shape}")
        masked, mask = i32(relu_output is not None), (dy if relu_output is None else relu_output)
        self._launch_packed("shortcut_backward", dx.dtype, element_count(dx), (dy, mask, dx),
                            (dy, mask, masked, dx, i32(accumulate)) + self._shortcut_args(dx, dy, stride),
                            packs_fit=self._shortcut_packs_fit(dx, dy))
        return dx

    # ----------------------------------------------------------------- head: pooling, dense, loss

    @primitive
    def global_avgpool_forward(self, x, y):
        """x: activation -> y: (N, C)."""
        same_dtype(x, y=y)
        n, c, h, w = self.nchw_dims(x)
        self._launch_1d("global_avgpool_forward", (ctype(x.dtype),), n * c,
                        (x, y, i32(n), i32(c), i32(h * w), self._channels_last))
        return y

    @primitive
    def global_avgpool_backward(self, dy, dx):
        same_dtype(dx, dy=dy)
        n, c, h, w = self.nchw_dims(dx)
        self._launch_1d("global_avgpool_backward", (ctype(dx.dtype),), element_count(dx),
                        (dy, dx, i32(n), i32(c), i32(h * w), self._channels_last))
        return dx

    @primitive
    def dense_forward(self, x, w, b, y):
        """y = x @ w + b. x: (N, Cin) activation; w: (Cin, Cout), b: (Cout,) float32; float32 sums (dense.cu)."""
        require_dtype(np.float32, w=w, b=b)
        same_dtype(x, y=y)
        rows, cin = x.shape
        cout = w.shape[1]
        self._launch_1d("dense_forward", (ctype(x.dtype),), rows * cout * WARP,      # a warp per output
                        (x, w, b, y, i32(rows), i32(cin), i32(cout)))
        return y

    @primitive
    def dense_backward(self, x, w, dy, dx, dw, db):
        """dx = dy @ w.T, dw = x.T @ dy, db = column sums of dy (dw, db float32 gradient views, written).

        Only dx is on the backward's chain: the parameter gradients run beside it on a side stream, as the
        convolutions' weight gradients do (conv2d_backward_filter: x and dy are not written again in this step, and
        dw and db are final once the main stream has waited for the side streams)."""
        require_dtype(np.float32, w=w, dw=dw, db=db)
        same_dtype(x, dy=dy, dx=dx)
        rows, cin = x.shape
        cout = w.shape[1]
        t = (ctype(x.dtype),)
        self._fork.record(self.stream)
        _, side = self._next_side_stream()
        with side:
            self._launch_1d("dense_backward_params", t, (cin * cout + cout) * WARP,     # a warp per output
                            (x, dy, dw, db, i32(rows), i32(cin), i32(cout)))
        self._launch_1d("dense_backward_data", t, rows * cin, (dy, w, dx, i32(rows), i32(cin), i32(cout)))
        if not self.overlap_wgrad:
            self._join_side_stream()
        return dx

    @primitive
    def softmax_cross_entropy(self, logits, labels, loss, dlogits):
        """Mean cross-entropy into the 0-d float32 `loss`; dlogits = (softmax - onehot) / N. One block."""
        require_dtype(np.int32, labels=labels)
        require_dtype(np.float32, loss=loss)
        same_dtype(logits, dlogits=dlogits)
        n, k = logits.shape
        self.kernels.launch("softmax_cross_entropy", (ctype(logits.dtype),), (1,), (HEAD_THREADS,),
                            (logits, labels, i32(n), i32(k), loss, dlogits))
        return loss

    @primitive
    def count_correct(self, logits, labels, num_valid, correct):
        """correct (0-d int64) += number of the first `num_valid` rows whose argmax equals the label."""
        require_dtype(np.int32, labels=labels)
        require_dtype(np.int64, correct=correct)
        n, k = logits.shape
        valid = max(0, min(int(num_valid), n))
        self.kernels.launch("count_correct", (ctype(logits.dtype),), (1,), (HEAD_THREADS,),
                            (logits, labels, i32(valid), i32(k), correct))
        return correct

    # ----------------------------------------------------------------- optimizer

    @primitive
    def sgd_momentum_update(self, params, grads, accum, lr, momentum, weight_decay, compute_copy=None):
        """One momentum-SGD step over the flat float32 buffers, bit-identical to NumpyBackend's:

        g = grad + weight_decay * param; accum = momentum * accum + g; param -= lr * accum
        (lr: 0-d device array). compute_copy, when given, receives the updated parameters in its dtype,
        in the same kernel.
        """
        require_dtype(np.float32, params=params, grads=grads, accum=accum, lr=lr)
        n = element_count(params)
        if grads.size != n or accum.size != n:
            raise ValueError("params, grads and accum must have the same size")
        copy = params if compute_copy is None else compute_copy   # not written when write_copy is 0
        if copy.size != n:
            raise ValueError(f"compute_copy has {copy.size} elements, params {n}")
        self._launch_1d("sgd_momentum", (ctype(copy.dtype),), n,
                        (params, grads, accum, lr, np.float32(momentum), np.float32(weight_decay), i32(n),
                         copy, i32(compute_copy is not None)))

    @primitive
    def accumulate(self, total, value, scale):
        """total += scale * value, on 0-d (or same-shape) float32 device arrays (running sums of the loss)."""
        require_dtype(np.float32, total=total, value=value)
        n = element_count(total)
        if value.size != n:
            raise ValueError(f"accumulate: value has {value.size} elements, total {n}")
        self._launch_1d("accumulate", (), n, (total, value, np.float32(scale), i32(n)))
        return total

    @primitive
    def sum_of_squares(self, array, out):
        """out (0-d float32) = sum(array ** 2): per-block partials, then one block adds them in double."""
        require_dtype(np.float32, out=out)
        n = element_count(array)
        blocks = max(1, min(-(-n // (KernelLibrary.BLOCK * MIN_STEPS_PER_THREAD)),
                            4 * self.kernels.sm_count, MAX_SLICES))
        partials = self._scratch("sum_squares", (blocks,), np.float32)
        self.kernels.launch("sum_squares_partials", (ctype(array.dtype),), (blocks,), (KernelLibrary.BLOCK,),
                            (array, i32(n), partials))
        self.kernels.launch("sum_finalize", (), (1,), (KernelLibrary.BLOCK,), (partials, i32(blocks), out))
        return out

    # ----------------------------------------------------------------- data

    def _augment_geometry(self, images, labels, x_out, labels_out, batch):
        """(H, W, C, X) of the dataset and of x_out (X: its channels, padded or not), after checking dtypes and
        that the outputs hold `batch` images: x_out shaped activation_shape or, padded, input_shape."""
        require_dtype(np.uint8, images=images)
        require_dtype(np.int32, labels=labels, labels_out=labels_out)
        _, h, w, channels = images.shape
        fits = (self.activation_shape(batch, channels, h, w), self.input_shape(batch, channels, h, w))
        if tuple(x_out.shape) not in fits or labels_out.size != batch:
            raise ValueError(f"augment: x_out {x_out.shape} / labels_out {labels_out.shape} do not fit "
                             f"{batch} images of {h}x{w}x{channels} ({self.layout})")
        return h, w, channels, self.nchw_dims(x_out)[1]

    @primitive
    def augment_batch(self, images, labels, indices, seed, step, distort, x_out, labels_out, first_row=0):
        """Gather a batch from the uint8 dataset on the device, [pad-crop-flip], normalize to x / 128 - 1.

        images: uint8 (N, H, W, 3); labels: int32 (N,); indices: int64 (B,) device array;
        x_out: activation (B, 3, H, W | B, H, W, 3), or input_shape's (padded_input: the channels after the
        image's zeros); labels_out: int32 (B,). The crop/flip draws are
        sampling.crop_flip_draws(seed, step, B, 9, first_row), computed in the kernel from (seed, step) and
        each row's global batch position first_row + b (a data-parallel worker's shard offset).
        """
        if indices.dtype != np.int64:
            indices = indices.astype(np.int64)
        batch = int(indices.size)
        h, w, channels, x_channels = self._augment_geometry(images, labels, x_out, labels_out, batch)
        self._launch_1d("augment_batch", (ctype(x_out.dtype),), element_count(x_out) // x_channels,   # a thread a pixel
                        (images, labels, indices, i32(batch), i32(h), i32(w), i32(channels), i32(x_channels),
                         i32(AUGMENT_PAD), np.uint32(seed & 0xFFFFFFFF), np.uint32(step & 0xFFFFFFFF),
                         np.uint32(first_row & 0xFFFFFFFF), i32(bool(distort)), x_out, labels_out,
                         self._channels_last, i32(pack_aligned([x_out]))))
        return x_out

    @primitive
    def augment_train_batch(self, images, labels, order, step, steps_per_epoch, global_batch, first_row, seed,
                            distort, x_out, labels_out):
        """augment_batch of the training batch of the step held in the 0-d int64 device counter `step`:
        rows order[start:start + B] with start = (step % steps_per_epoch) * global_batch + first_row,
        read on the device, so a captured step draws the next batch on every replay."""
        require_dtype(np.int64, order=order, step=step)
        batch = int(labels_out.size)
        h, w, channels, x_channels = self._augment_geometry(images, labels, x_out, labels_out, batch)
        if steps_per_epoch * global_batch > order.size or first_row + batch > global_batch:
            raise ValueError(f"augment_train_batch: {steps_per_epoch} steps of {global_batch} rows do not fit an "
                             f"order of {order.size}, or rows {first_row}..{first_row + batch} the global batch")
        self._launch_1d("augment_train_batch", (ctype(x_out.dtype),), element_count(x_out) // x_channels,   # a thread a pixel
                        (images, labels, order, step, np.int64(steps_per_epoch), np.int64(global_batch),
                         i32(batch), i32(h), i32(w), i32(channels), i32(x_channels), i32(AUGMENT_PAD),
                         np.uint32(seed & 0xFFFFFFFF), np.uint32(first_row & 0xFFFFFFFF), i32(bool(distort)),
                         x_out, labels_out, self._channels_last, i32(pack_aligned([x_out]))))
        return x_out

    @primitive
    def advance_step(self, step):
        """step (0-d int64 device counter) += 1, on the device: the last kernel of a training step."""
        require_dtype(np.int64, step=step)
        self.kernels.launch("advance_step", (), (1,), (32,), (step,))
        return step

    # ----------------------------------------------------------------- cuDNN engine choices

    def evaluating(self):
        """Around an evaluation's forwards: convolution graphs first built there are not timed (CudnnConv's
        untimed_new_graphs): the same engines, so the same bits, in every process that evaluates a model."""
        return self.conv.untimed_new_graphs()

    def conv_engine_choices(self):
        """The autotuned cuDNN engines of this GPU, for a checkpoint's metadata (None without autotuning)."""
        from cupynet.backends.conv_autotune import export_choices
        return export_choices(self.device.id) if self.autotune else None

    def adopt_conv_engine_choices(self, saved):
        """Use a checkpoint's engine choices when they were timed on the same GPU model and cuDNN."""
        from cupynet.backends.conv_autotune import import_choices
        return import_choices(saved, self.device.id) if self.autotune else 0

    # ----------------------------------------------------------------- CUDA graphs

    def capture(self, run):
        """Record everything `run()` enqueues on the backend's stream as one CUDA graph (a CapturedGraph).

        Call it only after `run` has run eagerly (kernels compiled, cuDNN plans built, buffers
        allocated, NCCL connected): during a capture nothing executes, work is only recorded. Memory
        allocated during the capture comes from a private pool kept alive with the graph, so an address
        baked into the graph is never handed to anything else. Relaxed capture mode: another worker
        thread sharing the GPU may go on allocating (cudaMalloc) while this one records.
        """
        pool = cupy.cuda.MemoryPool()
        with self.device, self.stream, cupy.cuda.using_allocator(pool.malloc):
            self.stream.begin_capture(mode=cupy.cuda.runtime.streamCaptureModeRelaxed)
            try:
                run()
            except BaseException:
                self._abandon_capture()
                raise
            graph = self.stream.end_capture()
            return CapturedGraph(graph, pool, self)

    def _abandon_capture(self):
        """End a capture that failed part-way; its error is the one worth reporting, not this one's."""
        try:
            self.stream.end_capture()
        except Exception:       # an invalidated capture raises here too
            pass


class CapturedGraph:
    """A recorded CUDA graph, the memory pool its captured allocations came from, and its backend. With the
    backend's programmatic_launch, the graph's edges into our kernels made programmatic
    (backends/programmatic_launch.py); with either that or stream_priorities, the graph instantiated again, the
    latter so that its kernels keep their streams' priorities (backends/node_priorities.py). Made inside the
    backend's device."""

    def __init__(self, graph, pool, backend):
        self.graph = graph
        self.pool = pool            # kept alive with the graph: its blocks are baked into the graph
        self.backend = backend
        self.launches = 0
        self.programmatic_edges = 0     # how many edges programmatic_launch made programmatic
        self._executable = None     # our own instantiation, launched instead of CuPy's
        if backend.programmatic_launch:
            self.programmatic_edges = programmatic_launch.make_programmatic(
                graph.graph, backend.kernels.function_handles(), at_block_start=backend.programmatic_launch_early)
        if backend.stream_priorities or backend.programmatic_launch:
            option = "--stream-priorities" if backend.stream_priorities else programmatic_launch.OPTION
            flags = USE_NODE_PRIORITY if backend.stream_priorities else 0
            self._executable = cuda_driver.instantiate(option, graph.graph, flags)
            # freed with this object; at exit the process's end frees it (CUDA may be shutting down by then)
            weakref.finalize(self, cupy.cuda.runtime.graphExecDestroy, self._executable).atexit = False

    def launch(self):
        """Replay the recorded work on the backend's stream (enqueued; nothing waits)."""
        with self.backend.device:
            if self._executable is None:
                self.graph.launch(stream=self.backend.stream)
            else:
                cupy.cuda.runtime.graphLaunch(self._executable, self.backend.stream.ptr)
        self.launches += 1
