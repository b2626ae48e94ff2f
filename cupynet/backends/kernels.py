"""The GPU backend's CUDA kernels: sources in `kernels/*.cu`, compiled by CuPy (NVRTC), cached per device.

The CUDA source lives only in the .cu files. This module knows which kernel is in which file and which
template instantiations exist (`KERNELS`), turns a file into one compilable source (`module_source`:
`#include "common.cuh"` is pasted in, so CuPy's on-disk cache key covers the header too), compiles each
file once per device as a `cupy.RawModule` with its name expressions, and launches kernels on CuPy's
current stream (the backend enters its own stream around every primitive), counting launches by name.

    lib = KernelLibrary(cupy.cuda.Device(0))
    lib.launch("relu_forward", ("float",), grid, block, (x, y, numpy.int32(n)))
    lib.launches["relu_forward"]          # how many times it really ran (tests assert on it)

Scalar arguments must be NumPy scalars of the exact C type of the kernel's parameter (numpy.int32 for
int, numpy.float32 for float, numpy.float64 for double, numpy.uint32 for unsigned int): CuPy passes them
by value with their own size. Arrays are passed as pointers and must be C-contiguous (checked).

Where the sources are: `kernels/` at the repository root (beside the `cupynet` package), or
`cupynet/kernels/` when an installed wheel ships them there (pyproject.toml's package data).
CPU check without a GPU: `python -m pytest tests/test_kernels_compile.py` (nvcc to an sm_90 cubin, and NVRTC).
"""
import re
import threading
from collections import Counter
from pathlib import Path

from cupynet.backends.conv3x3 import SHAPES as CONV3X3_SHAPES

FLOAT = "float"
BF16 = "__nv_bfloat16"
ACTIVATION_TYPES = (FLOAT, BF16)          # the activation dtypes: float32, bfloat16
REDUCED_TYPES = (FLOAT, "double", "long long")   # what communicators reduce: parameters, sums, counts
# the BatchNorm backward's fused relu (kernels/batchnorm.cu's ReluMask, a template argument of its kernels)
RELU_NONE, RELU_FROM_OUTPUT, RELU_FROM_INPUT = "RELU_NONE", "RELU_FROM_OUTPUT", "RELU_FROM_INPUT"
RELU_MASKS = (RELU_NONE, RELU_FROM_OUTPUT, RELU_FROM_INPUT)

COMPILE_OPTIONS = ("-std=c++17",)         # CuPy adds -ftz=true, the arch, and its include paths
HEADER = "common.cuh"
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.MULTILINE)


def _per_type(*types):
    """Template arguments for a kernel instantiated once per activation type."""
    return [(t,) for t in types]


# file -> {kernel name: list of template-argument tuples; [] for an extern "C" kernel}
KERNELS = {
    "activation.cu": {
        "relu_forward": _per_type(*ACTIVATION_TYPES),
        "relu_backward": _per_type(*ACTIVATION_TYPES),
        "residual_add": _per_type(*ACTIVATION_TYPES),
        # weight gradients (per batch chunk, or bf16) into float32 ones; the weights' bf16 compute copy
        "sum_rows": [(BF16, FLOAT), (FLOAT, FLOAT), (FLOAT, BF16)],
    },
    "batchnorm.cu": {
        "bn_stats": _per_type(*ACTIVATION_TYPES),
        "bn_stats_partials_shifted": _per_type(*ACTIVATION_TYPES),
        "bn_sums_finalize": [],
        "bn_stats_from_sums": [("double",), (FLOAT,)],   # sync BN's sums; genstats' (--conv-genstats)
        "bn_grad_from_sums": [],
        "bn_apply": _per_type(*ACTIVATION_TYPES),
        # the forward from sums in one launch: (activation, sums) types, sync BN's double or genstats' float
        "bn_apply_from_sums": [(t, s) for t in ACTIVATION_TYPES for s in ("double", FLOAT)],
        # the backward: (activation type, relu mask); sync BN's partials never recompute the mask
        "bn_grad": [(t, r) for t in ACTIVATION_TYPES for r in RELU_MASKS],
        "bn_grad_partials": [(t, r) for t in ACTIVATION_TYPES for r in (RELU_NONE, RELU_FROM_OUTPUT)],
        "bn_backward_dx": [(t, r) for t in ACTIVATION_TYPES for r in RELU_MASKS],
        "bn_stats_apply": _per_type(*ACTIVATION_TYPES),       # one-launch passes (--bn-launches 1)
        "bn_grad_dx": [(t, r) for t in ACTIVATION_TYPES for r in RELU_MASKS],
        # a block's input gradient and the next BatchNorm's gradient sums in one pass (--residual-grad-sums)
        "relu_backward_add_bn_grad": [(t, r) for t in ACTIVATION_TYPES for r in RELU_MASKS],
    },
    "shortcut.cu": {
        "shortcut_forward": _per_type(*ACTIVATION_TYPES),
        "shortcut_backward": _per_type(*ACTIVATION_TYPES),
    },
    "pixel_pairs.cu": {
        "pixel_pair_weights": _per_type(*ACTIVATION_TYPES),   # --conv-pixel-pairs: the paired kernel
        # --wgrad-pixel-pairs: (cuDNN's io type, the gradient's): bf16 or float32 gradients in bf16 runs
        "pixel_pair_weight_gradient": [(BF16, BF16), (BF16, FLOAT), (FLOAT, FLOAT)],
    },
    "conv3x3.cu": {
        # --own-conv-channels: (activation type, channels in, channels out, stride, data gradient?, sums?) of
        # cupynet/backends/conv3x3.SHAPES: forwards with or without the next BatchNorm's sums (--conv-genstats) at
        # strides 1 and 2, data gradients at stride 1
        "conv3x3_mma": [(t, str(c), str(k), str(stride), gradient, stats) for t in ACTIVATION_TYPES
                        for c, k, stride in CONV3X3_SHAPES
                        for gradient, stats in (("false", "false"), ("false", "true"))
                        + ((("true", "false"),) if stride == 1 else ())],
    },
    "padded_input.cu": {
        "pad_weight_channels": _per_type(*ACTIVATION_TYPES),        # --padded-input: the stem's padded weights
        "crop_weight_channels": [(BF16, BF16), (BF16, FLOAT), (FLOAT, FLOAT)],   # ... and their gradient cut back
    },
    "pooling.cu": {
        "global_avgpool_forward": _per_type(*ACTIVATION_TYPES),
        "global_avgpool_backward": _per_type(*ACTIVATION_TYPES),
    },
    "dense.cu": {
        "dense_forward": _per_type(*ACTIVATION_TYPES),
        "dense_backward_data": _per_type(*ACTIVATION_TYPES),
        "dense_backward_params": _per_type(*ACTIVATION_TYPES),
    },
    "loss.cu": {
        "softmax_cross_entropy": _per_type(*ACTIVATION_TYPES),
        "count_correct": _per_type(*ACTIVATION_TYPES),
    },
    "sgd.cu": {
        "sgd_momentum": _per_type(*ACTIVATION_TYPES),     # the type of the compute copy
        "sum_squares_partials": _per_type(*ACTIVATION_TYPES),
        "sum_finalize": [],
        "accumulate": [],
    },
    "collectives.cu": {
        "publish": [(t,) for t in REDUCED_TYPES],
        "rank_barrier": [],
        "reduce_slots": [(t,) for t in REDUCED_TYPES],
        "copy_slot": [(t,) for t in REDUCED_TYPES],
    },
    "timing.cu": {
        "hold_stream": [],
    },
    "augment.cu": {
        "augment_batch": _per_type(*ACTIVATION_TYPES),
        "augment_train_batch": _per_type(*ACTIVATION_TYPES),
        "advance_step": [],
    },
}

# kernel name -> file
KERNEL_FILES = {name: file for file, kernels in KERNELS.items() for name in kernels}


def ctype(dtype):
    """The C type of kernels' template argument for a NumPy/CuPy dtype ('float' or '__nv_bfloat16')."""
    name = getattr(dtype, "name", None) or str(dtype)
    if name == "float32":
        return FLOAT
    if name == "bfloat16":
        return BF16
    if name == "float64":
        return "double"
    if name == "int64":
        return "long long"
    raise TypeError(f"no kernels for dtype {name} (float32, bfloat16; float64 and int64 for collectives)")


def kernels_dir():
    """The folder holding the .cu sources: the repository's kernels/, or one shipped inside the package."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "kernels", package / "kernels"):
        if (candidate / HEADER).is_file():
            return candidate
    raise FileNotFoundError(f"kernel sources not found: looked for {HEADER} in {package.parent / 'kernels'} "
                            f"and {package / 'kernels'}")


def expression(name, template_args=()):
    """The name expression NVRTC is given for one instantiation: 'bn_apply<float>' or 'bn_sums_finalize'."""
    return f"{name}<{', '.join(template_args)}>" if template_args else name


def expressions(file):
    """Every name expression of one file, in registry order."""
    result = []
    for name, instantiations in KERNELS[file].items():
        if not instantiations:            # extern "C": the plain name
            result.append(name)
        for args in instantiations:
            result.append(expression(name, args))
    return result


def module_source(file, directory=None):
    """The file's source with local includes pasted in (each header once, `#pragma once` dropped)."""
    directory = Path(directory) if directory else kernels_dir()
    return _expand(directory, file, set())


def _expand(directory, file, seen):
    text = _PRAGMA_ONCE.sub("", (directory / file).read_text())

    def paste(match):
        header = match.group(1)
        if header in seen:
            return f"/* {header}: already included */"
        seen.add(header)
        return f"/* ---- begin {header} ---- */\n{_expand(directory, header, seen)}\n/* ---- end {header} ---- */"

    return _LOCAL_INCLUDE.sub(paste, text)


# (device id, file) -> cupy.RawModule, shared by every library on that device; compiled lazily by CuPy.
_MODULES = {}
_MODULES_LOCK = threading.Lock()


def _module(device_id, file):
    import cupy
    key = (device_id, file)
    with _MODULES_LOCK:
        if key not in _MODULES:
            _MODULES[key] = cupy.RawModule(code=module_source(file), options=COMPILE_OPTIONS,
                                           name_expressions=expressions(file))
        return _MODULES[key]


class KernelLibrary:
    """Kernel launcher for one device: compiled functions cached, launches counted by kernel name."""

    BLOCK = 256               # threads per block of the 1-D kernels
    BLOCKS_PER_SM = 16        # grid-stride kernels: enough blocks to fill the GPU, no more

    def __init__(self, device):
        import cupy
        self._ndarray = cupy.ndarray
        self.device = device
        self.sm_count = int(device.attributes["MultiProcessorCount"])
        self.launches = Counter()
        self._functions = {}
        self._resident = {}

    def grid_1d(self, n, block=BLOCK):
        """Blocks for a grid-stride loop over n items."""
        return max(1, min(-(-n // block), self.sm_count * self.BLOCKS_PER_SM))

    def function(self, name, template_args=()):
        """The compiled kernel (compiles its file on first use on this device)."""
        key = (name, tuple(template_args))
        kernel = self._functions.get(key)
        if kernel is None:
            if name not in KERNEL_FILES:
                raise KeyError(f"unknown kernel {name!r}")
            file = KERNEL_FILES[name]
            wanted = expression(name, template_args)
            if wanted not in expressions(file):
                raise KeyError(f"{wanted} is not instantiated in kernels/{file} (see KERNELS in {__name__})")
            with self.device:
                kernel = _module(self.device.id, file).get_function(wanted)
            self._functions[key] = kernel
        return kernel

    def function_handles(self):
        """The CUfunction handles (ints) of every kernel compiled so far on this device: how a captured graph's
        kernel nodes that are ours are told from cuDNN's (backends/programmatic_launch.py)."""
        with self.device:
            return {kernel.kernel.ptr for kernel in self._functions.values()}

    def resident_blocks(self, name, template_args, block, shared_mem=0):
        """How many blocks of this kernel the whole GPU holds at once (the driver's occupancy for this block
        size and dynamic shared memory, times the SMs): the largest grid whose blocks may wait for each other."""
        key = (name, tuple(template_args), block, shared_mem)
        if key not in self._resident:
            from cupy.cuda import driver
            kernel = self.function(name, template_args)
            with self.device:
                per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, block, shared_mem)
            self._resident[key] = self.sm_count * int(per_sm)
        return self._resident[key]

    def launch(self, name, template_args, grid, block, args, shared_mem=0):
        """Enqueue one kernel on the current stream and count it."""
        for position, arg in enumerate(args):
            if isinstance(arg, self._ndarray) and not arg.flags.c_contiguous:
                raise ValueError(f"kernel {name}: argument {position} is not C-contiguous "
                                 f"(shape {arg.shape}, strides {arg.strides})")
        kernel = self.function(name, template_args)
        kernel(_dims(grid), _dims(block), tuple(args), shared_mem=shared_mem)
        self.launches[name] += 1


def _dims(value):
    """CuPy wants grid and block as tuples."""
    return value if isinstance(value, tuple) else (int(value),)
