"""GPU backend parity: every primitive of CupyBackend against the NumPy reference, then whole models.

    python -m pytest -m gpu tests/test_gpu_parity.py -q -ra        # on a machine with a GPU

Every test is marked `gpu`; tests/conftest.py skips them, with the reason printed, where CuPy, a CUDA
device or the cuDNN Frontend is missing. bfloat16 cases also need ml_dtypes (skipped with the reason).

What is compared: each primitive in both layouts, float32 (strict fp32 convolutions: tf32=False) and
bfloat16, on odd shapes (N=5, C=3, 7x7) and ResNet-like ones, stride 1 and 2, against
`NumpyBackend(layout, "float64")` run on exactly the values the GPU saw (bf16 inputs are rounded on the
host first). Outputs start as NaN so an element the GPU never wrote fails. Every test also proves that
the fast path ran: our kernels' launch counts (`be.kernels.launches`) or cuDNN's executions
(`be.conv.executions`) grew. Then: ResNet-20 loss and every gradient at strict fp32, a bf16 ResNet-20
against the same float64 oracle, 20 Trainer steps against the CPU loss curve, and the augmentation
kernel bit for bit.

Tolerances (`assert_close`: |gpu - ref| <= rtol * (|ref| + scale)) come from the dtype:
  * float32: one rounding is 2^-24 ~ 6e-8 relative. Elementwise kernels round once or twice: 1e-6.
    A float32 sum of L terms errs by at most ~depth * 2^-24 of sum|terms|, depth = the longest chain of
    additions; our sums are short per-thread runs (<= ~64) plus trees, so 1e-5 of the terms' scale
    (scale = RMS of the reference, or sum|terms| where a sum may cancel) holds with margin.
  * bfloat16: 8 significant bits; rounding an output once costs <= 2^-9 relative, so 2^-8 ~ 3.9e-3
    (two roundings' worth) for bf16 outputs. Outputs kept in float32 (statistics, loss, parameter
    gradients of BN/dense) use the float32 tolerances, their inputs being exact bf16 values.
  * convolutions: error relative to conv(|x|, |w|) (the dot-product error bound scales with
    sum|a_i b_i|, not with a result that may cancel): strict fp32 L * 2^-24 for the longest reduction
    here (L = N*Ho*Wo = 245 in wgrad) = 1.5e-5 -> 2e-5; bf16 1e-2 (output rounding 2^-9 plus engines
    that round split-K partial sums to bf16), as tests/test_cudnn_conv_gpu.py.
"""
import contextlib

import numpy as np
import pytest

from cupynet.backends.kernels import RELU_FROM_INPUT, RELU_FROM_OUTPUT, RELU_NONE, ctype
from cupynet.backends.numpy_backend import NumpyBackend
from relu_masks import share_relu_masks

pytestmark = pytest.mark.gpu

LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "bfloat16")

ELEMENTWISE = {"float32": 1e-6, "bfloat16": 2.0 ** -8}
REDUCTION = {"float32": 1e-5, "bfloat16": 2.0 ** -8}
CONV = {"float32": 2e-5, "bfloat16": 1e-2}

# (N, C, H, W): odd everything, a ResNet stage-1-like block, many channels, C > 256 (two channel tiles
# in NHWC BatchNorm, the second one partly idle), 48 channels (NHWC BatchNorm reads 16-byte packs of
# channels: 6 or 12 per row, not a power of two), 2064 channels (2 or 3 tiles of packs), 1 x 1 images
# (NCHW is then laid out as NHWC, and read as such), and one large enough that BatchNorm splits every
# channel into several slices of partial sums in both layouts and dtypes on a GPU (NCHW bfloat16 reads
# 16,384 / 8 packs per channel: 2 slices; the emulated GPU's 2 SMs give it 1).
MANY_CHANNELS = (1, 2064, 2, 2)
ACTIVATIONS = [(5, 3, 7, 7), (4, 16, 8, 8), (2, 64, 4, 4), (2, 260, 3, 3), (2, 48, 4, 4), MANY_CHANNELS,
               (32, 16, 1, 1), (16, 16, 32, 32)]


# --------------------------------------------------------------------------- backends and arrays


def make_backend(layout, dtype, bn_launches=2, **options):
    """A fresh GPU backend; float32 runs strict fp32 convolutions so that parity can be tight. With one
    BatchNorm launch per pass, the weight gradients run in the serial order, so that the backward's one launch
    runs too (beside weight gradients on a side stream it takes two: CupyBackend._bn_one_launch_plan).
    options: CupyBackend's step options (pixel_pairs, residual_grad_sums)."""
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 on the GPU needs ml_dtypes (CuPy's bfloat16 dtype)")
    from cupynet.backends.cupy_backend import CupyBackend
    return CupyBackend(device_id=0, layout=layout, dtype=dtype, tf32=False, bn_launches=bn_launches,
                       overlap_wgrad=bn_launches == 2, **options)


_BACKENDS = {}


def backend(layout, dtype, bn_launches=2):
    """One cached backend per (layout, dtype, BatchNorm launches) for the primitive tests (each primitive
    enters its stream)."""
    if (layout, dtype, bn_launches) not in _BACKENDS:
        _BACKENDS[(layout, dtype, bn_launches)] = make_backend(layout, dtype, bn_launches)
    return _BACKENDS[(layout, dtype, bn_launches)]


@contextlib.contextmanager
def batchnorm_path(be, one_launch, two_launches, x, read, staged, template_args=None):
    """Asserts the BatchNorm pass launched its one-launch kernel when the backend runs one launch per pass and
    the GPU holds that kernel's capped grid, and the two launches otherwise (the documented fallback)."""
    c, inner, m = be._channel_geometry(x, x.shape[1] if be.layout == "NCHW" else x.shape[-1])
    one = be._bn_one_launch_plan(one_launch, x, c, m, inner, read, staged, template_args) is not None
    before = be.kernels.launches[one_launch]
    with fast_path(be, kernels=(one_launch,) if one else two_launches):
        yield
    if not one:
        assert be.kernels.launches[one_launch] == before, f"{one_launch} ran where the two launches should"


def to_layout(layout, x_nchw):
    return x_nchw if layout == "NCHW" else np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))


def rms(a):
    return float(np.sqrt(np.mean(np.square(a)))) if np.size(a) else 0.0


def assert_close(actual, expected, rtol, scale=0.0, what=""):
    """|actual - expected| <= rtol * (|expected| + scale), elementwise, NaN never passes."""
    expected = np.asarray(expected, dtype=np.float64)
    assert_bounded(actual, expected, rtol * (np.abs(expected) + scale), what)


def assert_bounded(actual, expected, bound, what=""):
    """|actual - expected| <= bound, elementwise (bound: an array or a number), NaN never passes."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), expected.shape)
    error = np.abs(actual - expected)
    ok = error <= bound               # False for NaN
    if not ok.all():
        worst = np.unravel_index(np.argmax(np.where(ok, 0, error - bound)), ok.shape) if ok.ndim else ()
        pytest.fail(f"{what}: {np.count_nonzero(~ok)} of {ok.size} elements off; worst at {worst}: "
                    f"{actual[worst]!r} vs {expected[worst]!r} (bound {bound[worst]:.3g})")


def assert_batchnorm_forward(actual, expected, dtype, scale):
    """A training forward's (y, saved mean, saved invstd, moving mean, moving variance), on the host, against
    the reference's: the statistics to float32 rounding (computed from exact inputs in both precisions, `scale`
    the activation's size for the means), y to its dtype's."""
    (y, saved_mean, saved_invstd, moving_mean, moving_var) = actual
    (expected_y, expected_mean, expected_invstd, expected_moving_mean, expected_moving_var) = expected
    f32 = REDUCTION["float32"]
    assert_close(saved_mean, expected_mean, f32, scale=scale, what="saved mean")
    assert_close(saved_invstd, expected_invstd, f32, what="saved invstd")
    assert_close(moving_mean, expected_moving_mean, f32, scale=scale, what="moving mean")
    assert_close(moving_var, expected_moving_var, f32, what="moving variance")
    assert_close(y, expected_y, REDUCTION[dtype], scale=rms(expected_y), what="y")


class Arrays:
    """Uploads and downloads for one backend, keeping the float64 values the GPU actually holds."""

    def __init__(self, be, seed=0):
        self.be = be
        self.rng = np.random.default_rng(seed)
        self.ref = NumpyBackend(be.layout, "float64")

    def put(self, host, dtype=None):
        """(device array, float64 host copy of exactly what it holds)."""
        device = self.be.from_host(np.asarray(host, dtype=np.float32), dtype=dtype or self.be.dtype)
        return device, self.get(device)

    def get(self, device):
        return self.be.to_host(device).astype(np.float64)

    def nan(self, shape, dtype=None):
        """An output buffer full of NaN: an element that is never written fails the comparison."""
        return self.be.from_host(np.full(shape, np.nan, dtype=np.float32), dtype=dtype or self.be.dtype)

    def activation(self, n, c, h, w, scale=1.0, offset=0.0):
        host = self.rng.standard_normal((n, c, h, w)) * scale + offset
        return self.put(to_layout(self.be.layout, host))

    def vector(self, size, low=0.5, high=1.5, dtype=np.float32):
        return self.put(self.rng.uniform(low, high, size), dtype=dtype)


@contextlib.contextmanager
def fast_path(be, kernels=(), conv_ops=()):
    """Asserts that each named kernel launched, and each cuDNN op executed, inside the block."""
    launches, executions = be.kernels.launches.copy(), be.conv.executions.copy()
    yield
    for name in kernels:
        assert be.kernels.launches[name] > launches[name], f"kernel {name} did not run"
    for op in conv_ops:
        assert be.conv.executions[op] > executions[op], f"cuDNN {op} did not run"


def params(layouts=LAYOUTS, dtypes=DTYPES):
    return pytest.mark.parametrize("layout,dtype", [(lay, dt) for lay in layouts for dt in dtypes])


def batchnorm_params():
    """params() for each of ACTIVATIONS, but 2064 channels in NHWC only: in NCHW its grid (a block per channel)
    costs the emulated GPU 1-3 s a case, 20 times the others, and covers nothing that 260 channels do not (more
    channels than a block holds; a grid the emulated GPU cannot hold at once)."""
    cases = [(layout, dtype, shape) for shape in ACTIVATIONS for layout in LAYOUTS for dtype in DTYPES
             if not (layout == "NCHW" and shape == MANY_CHANNELS)]
    ids = ["N{}C{}H{}W{}-{}-{}".format(*shape, layout, dtype) for layout, dtype, shape in cases]
    return pytest.mark.parametrize("layout,dtype,shape", cases, ids=ids)


# --------------------------------------------------------------------------- arrays and helpers


@params()
def test_host_round_trip_zeros_fill_and_bf16_rounding(layout, dtype):
    be = backend(layout, dtype)
    host = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    device = be.from_host(host, dtype=be.dtype)
    assert device.dtype == be.dtype and device.shape == host.shape
    # from_host rounds on the host (ml_dtypes: round to nearest even), so this is exact
    np.testing.assert_array_equal(be.to_host(device).astype(np.float32), host.astype(be.dtype).astype(np.float32))
    zeros = be.zeros((4,), dtype=np.int64)
    assert zeros.dtype == np.int64 and not be.to_host(zeros).any()
    scalar = be.zeros((), dtype=be.param_dtype)
    be.fill(scalar, 0.25)
    assert float(be.to_host(scalar)) == 0.25
    assert be.empty((2, 2)).dtype == be.dtype
    assert be.param_dtype == np.float32


# --------------------------------------------------------------------------- convolutions

# (N, C, H, W, K, ksize, stride), pad = ksize // 2 as in the ResNets
CONVS = [(5, 3, 7, 7, 4, 3, 1), (4, 8, 8, 8, 16, 3, 2), (4, 8, 7, 7, 16, 3, 2), (4, 8, 8, 8, 16, 1, 2)]


def check_forward_and_data_gradient(be, a, case):
    """Runs the GPU's forward and data gradient of convolution `case` on random arrays and checks both against
    the reference's (each must execute its cuDNN op). Returns the arrays (x, w, dy) and their exact values."""
    n, c, h, w, k, ksize, stride = case
    dtype = be.dtype.name
    pad = ksize // 2
    ho, wo = (h + 2 * pad - ksize) // stride + 1, (w + 2 * pad - ksize) // stride + 1
    x, x_ref = a.activation(n, c, h, w)
    wt_host = be.weight_from_canonical(a.rng.standard_normal((k, c, ksize, ksize)) * 0.3)
    wt, wt_ref = a.put(np.ascontiguousarray(wt_host))
    dy, dy_ref = a.activation(n, k, ho, wo)
    ref = a.ref

    y = a.nan(be.activation_shape(n, k, ho, wo))
    with fast_path(be, conv_ops=("fprop",)):
        be.conv2d_forward(x, wt, stride, pad, y)
    expected = ref.conv2d_forward(x_ref, wt_ref, stride, pad, np.empty(y.shape))
    magnitude = ref.conv2d_forward(np.abs(x_ref), np.abs(wt_ref), stride, pad, np.empty(y.shape))
    assert_bounded(a.get(y), expected, CONV[dtype] * magnitude, what="fprop")

    dx = a.nan(x.shape)
    with fast_path(be, conv_ops=("dgrad",)):
        be.conv2d_backward_data(dy, wt, stride, pad, dx)
    expected = ref.conv2d_backward_data(dy_ref, wt_ref, stride, pad, np.empty(x.shape))
    magnitude = ref.conv2d_backward_data(np.abs(dy_ref), np.abs(wt_ref), stride, pad, np.empty(x.shape))
    assert_bounded(a.get(dx), expected, CONV[dtype] * magnitude, what="dgrad")
    return (x, x_ref), (wt, wt_ref), (dy, dy_ref)


@params()
@pytest.mark.parametrize("case", CONVS, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}".format(*c))
def test_convolutions(layout, dtype, case):
    stride, pad = case[6], case[5] // 2
    be = backend(layout, dtype)
    a = Arrays(be, seed=2)
    (x, x_ref), (wt, _), (dy, dy_ref) = check_forward_and_data_gradient(be, a, case)
    ref = a.ref

    dw = a.nan(wt.shape, dtype=np.float32)          # a float32 gradient view, whatever the activations
    kernels = ("sum_rows",) if dtype == "bfloat16" else ()   # bf16: cuDNN writes bf16, a kernel widens it
    with fast_path(be, kernels=kernels, conv_ops=("wgrad",)):
        be.conv2d_backward_filter(x, dy, stride, pad, dw)
    expected = ref.conv2d_backward_filter(x_ref, dy_ref, stride, pad, np.empty(wt.shape))
    magnitude = ref.conv2d_backward_filter(np.abs(x_ref), np.abs(dy_ref), stride, pad, np.empty(wt.shape))
    assert_bounded(a.get(dw), expected, CONV[dtype] * magnitude, what="wgrad")


# (N, C, H, W, K, ksize, stride): stage 1's shape at a small size, 8 to 16 channels, and one the rewrite leaves alone
PAIRED_CONVS = [(4, 16, 8, 8, 16, 3, 1), (3, 8, 5, 6, 16, 3, 1), (4, 16, 8, 8, 32, 3, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PAIRED_CONVS, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}".format(*c))
def test_convolutions_on_pixel_pairs(dtype, case):
    """--conv-pixel-pairs and --wgrad-pixel-pairs: a 3x3 stride-1 convolution of few channels runs its forward,
    data gradient and weight gradient on pixel pairs (cuDNN's graphs of 2C channels at half the width, after
    the pixel_pair_weights kernel, or before the pixel_pair_weight_gradient kernel) and still matches the
    reference, the weight gradient into a float32 view and into one of the activation dtype; a stride-2 one runs
    as before."""
    from cupynet.backends.cupy_backend import CupyBackend
    from cupynet.backends.pixel_pairs import applies
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 on the GPU needs ml_dtypes (CuPy's bfloat16 dtype)")
    be = CupyBackend(device_id=0, layout="NHWC", dtype=dtype, tf32=False, pixel_pairs=True, wgrad_pixel_pairs=True)
    n, c, h, w, k, ksize, stride = case
    paired = applies("NHWC", (n, h, w, c), (k, ksize, ksize, c), stride, ksize // 2)
    assert paired == (stride == 1)
    a = Arrays(be, seed=5)
    (x, x_ref), (wt, _), (dy, dy_ref) = check_forward_and_data_gradient(be, a, case)
    expected = a.ref.conv2d_backward_filter(x_ref, dy_ref, stride, 1, np.empty(wt.shape))
    magnitude = a.ref.conv2d_backward_filter(np.abs(x_ref), np.abs(dy_ref), stride, 1, np.empty(wt.shape))
    for dw_dtype in {np.dtype(np.float32), be.dtype}:
        dw = a.nan(wt.shape, dtype=dw_dtype)
        be.conv2d_backward_filter(x, dy, stride, 1, dw)
        be.wait_for_gradients()
        # in bf16 the two halves are rounded before they are added (and the sum again into a bf16 view)
        assert_bounded(a.get(dw), expected, CONV[dtype] * magnitude, what=f"wgrad into {dw_dtype}")
    image_sides = {(key[0], key[2], key[4]) for key in be.conv.graph_calls}        # (op, C, W) of each graph run
    assert image_sides == {(op, 2 * c, w // 2) if paired else (op, c, w) for op in ("fprop", "dgrad", "wgrad")}
    # the forward built the paired kernel, and the data gradient of the same pass took it
    assert be.kernels.launches["pixel_pair_weights"] == (1 if paired else 0)
    folds = len({np.dtype(np.float32), be.dtype})
    assert be.kernels.launches["pixel_pair_weight_gradient"] == (folds if paired else 0)


# (N, C, H, W, K, ksize, stride): each width at stride 1, with odd sizes whose 16-pixel tiles cross rows and images
# and whose last tile is partly past the end, and 1 x 1 images (every tap but the centre in the padding); the two
# strided forwards (an odd height: the last row's window half in the padding), whose data gradients cuDNN keeps;
# and two the kernel leaves to cuDNN (8 channels; a 1x1 window)
OWN_CONVS = [(4, 16, 8, 8, 16, 3, 1), (3, 16, 5, 7, 16, 3, 1), (5, 16, 1, 1, 16, 3, 1), (2, 32, 6, 5, 32, 3, 1),
             (2, 64, 3, 5, 64, 3, 1), (3, 16, 7, 6, 32, 3, 2), (2, 32, 4, 4, 64, 3, 2), (2, 8, 6, 6, 8, 3, 1),
             (4, 16, 4, 4, 16, 1, 1)]


def round_to_tf32(values):
    """float32 values rounded to TF32 (10 mantissa bits, to nearest, ties away from zero: PTX's cvt.rna.tf32.f32),
    as float64: what the tensor cores multiply in a float32 convolution with TF32 allowed."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xffffe000)).view(np.float32)
    return rounded.astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", OWN_CONVS, ids=lambda c: "N{}C{}H{}W{}K{}k{}s{}".format(*c))
def test_convolutions_in_our_own_kernel(dtype, case):
    """--own-conv-channels 64: a 3x3 convolution of 16 to 64 channels runs its forward (stride 1 or 2) and its data
    gradient (stride 1) in our own tensor-core kernel (kernels/conv3x3.cu), not in cuDNN, and matches the float64
    reference computed from what the tensor cores multiply (bf16 values as they are; float32 rounded to TF32) to
    the output's rounding (bf16: 2^-8 of the magnitude; float32: 2e-5, the strict float32 bound); the others run
    in cuDNN as before."""
    from cupynet.backends import conv3x3
    from cupynet.backends.cupy_backend import CupyBackend
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 on the GPU needs ml_dtypes (CuPy's bfloat16 dtype)")
    be = CupyBackend(device_id=0, layout="NHWC", dtype=dtype, tf32=True, own_conv_channels=64)
    n, c, h, w, k, ksize, stride = case
    pad = ksize // 2
    a = Arrays(be, seed=7)
    x, x_ref = a.activation(n, c, h, w)
    wt, wt_ref = a.put(np.ascontiguousarray(be.weight_from_canonical(a.rng.standard_normal((k, c, ksize, ksize)) * 0.3)))
    ho, wo = (h + 2 * pad - ksize) // stride + 1, (w + 2 * pad - ksize) // stride + 1
    dy, dy_ref = a.activation(n, k, ho, wo)
    multiplied = (lambda v: v) if dtype == "bfloat16" else round_to_tf32
    for op, run, source, target_shape in (("fprop", be.conv2d_forward, (x, x_ref), (n, ho, wo, k)),
                                          ("dgrad", be.conv2d_backward_data, (dy, dy_ref), x.shape)):
        taken = conv3x3.kernel_shape("NHWC", dtype, True, source[0].shape, wt.shape, stride, pad, op == "dgrad", 64)
        assert (taken is not None) == (min(c, k) >= 16 and ksize == 3 and (op == "fprop" or stride == 1)), op
        target = a.nan(target_shape)
        launches, executions = be.kernels.launches["conv3x3_mma"], be.conv.executions[op]
        run(source[0], wt, stride, pad, target)
        reference = a.ref.conv2d_forward if op == "fprop" else a.ref.conv2d_backward_data
        expected = reference(multiplied(source[1]), multiplied(wt_ref), stride, pad, np.empty(target_shape))
        magnitude = reference(np.abs(source[1]), np.abs(wt_ref), stride, pad, np.empty(target_shape))
        # ours: the output's rounding; cuDNN's may multiply float32 on TF32 or not: two TF32 roundings of a product
        tolerance = (2.0 ** -8 if dtype == "bfloat16" else CONV["float32"]) if taken else \
            (CONV["bfloat16"] if dtype == "bfloat16" else 2.0 ** -9)
        assert_bounded(a.get(target), expected, tolerance * magnitude, what=op)
        assert be.kernels.launches["conv3x3_mma"] - launches == (1 if taken else 0), op
        assert be.conv.executions[op] - executions == (0 if taken else 1), op
        if op == "fprop" and taken:
            check_own_forward_with_sums(be, a, x, wt, stride, pad, target)


def check_own_forward_with_sums(be, a, x, wt, stride, pad, y):
    """--conv-genstats with our own kernel: the same forward, bit for bit, and the next BatchNorm's sums of y as
    stored, per channel, within float32 rounding of a sum (1e-5 of the sum of the terms' magnitudes)."""
    k = wt.shape[0]
    y_with_sums, sums = a.nan(y.shape), a.nan((2, k), dtype=np.float32)
    assert be.conv2d_forward_with_stats(x, wt, stride, pad, y_with_sums, sums) is True
    np.testing.assert_array_equal(a.get(y_with_sums), a.get(y))
    values = a.get(y).reshape(-1, k)
    for row, terms in enumerate((values, np.square(values))):
        assert_bounded(a.get(sums)[row], terms.sum(axis=0), REDUCTION["float32"] * np.abs(terms).sum(axis=0),
                       what="sum" if row == 0 else "sum of squares")


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_stem_on_a_padded_input(dtype):
    """--padded-input: the stem's 3-channel weights padded by zeros (pad_weight_channels) convolve an input of 8
    (bf16) or 4 (float32) channels, the last of them zero, and its weight gradient (K, 3, 3, X) is cut back to
    the 3 real channels (crop_weight_channels), into a float32 view and into one of the activation dtype: all
    match the reference on the unpadded input. With pixel pairs on as well, the stem is not paired (its weight
    reads fewer channels than the input holds)."""
    be = make_backend("NHWC", dtype, padded_input=True, pixel_pairs=True, wgrad_pixel_pairs=True)
    channels = 8 if dtype == "bfloat16" else 4
    assert be.input_shape(3, 3, 6, 8) == (3, 6, 8, channels)
    a = Arrays(be, seed=12)
    x_host = a.rng.standard_normal((3, 6, 8, 3))
    x, x_ref = a.put(np.concatenate([x_host, np.zeros((3, 6, 8, channels - 3))], axis=-1))
    x_ref = x_ref[..., :3]
    wt, w_ref = a.put(a.rng.standard_normal((16, 3, 3, 3)) * 0.3)
    dy, dy_ref = a.put(a.rng.standard_normal((3, 6, 8, 16)))
    y = a.nan((3, 6, 8, 16))
    with fast_path(be, kernels=("pad_weight_channels",), conv_ops=("fprop",)):
        be.conv2d_forward(x, wt, 1, 1, y)
    expected = a.ref.conv2d_forward(x_ref, w_ref, 1, 1, np.empty((3, 6, 8, 16)))
    magnitude = a.ref.conv2d_forward(np.abs(x_ref), np.abs(w_ref), 1, 1, np.empty((3, 6, 8, 16)))
    assert_bounded(a.get(y), expected, CONV[dtype] * magnitude, what="fprop")
    expected = a.ref.conv2d_backward_filter(x_ref, dy_ref, 1, 1, np.empty(wt.shape))
    magnitude = a.ref.conv2d_backward_filter(np.abs(x_ref), np.abs(dy_ref), 1, 1, np.empty(wt.shape))
    for dw_dtype in {np.dtype(np.float32), be.dtype}:
        dw = a.nan(wt.shape, dtype=dw_dtype)
        be.conv2d_backward_filter(x, dy, 1, 1, dw)
        be.wait_for_gradients()
        assert_bounded(a.get(dw), expected, CONV[dtype] * magnitude, what=f"wgrad into {dw_dtype}")
    assert {(key[0], key[2]) for key in be.conv.graph_calls} == {("fprop", channels), ("wgrad", channels)}
    assert be.kernels.launches["crop_weight_channels"] == len({np.dtype(np.float32), be.dtype})
    assert be.kernels.launches["pixel_pair_weights"] == be.kernels.launches["pixel_pair_weight_gradient"] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_stem_weights_are_the_weights_and_zeros(dtype):
    """pad_weight_channels and crop_weight_channels move values: bit for bit the weights with zero channels
    added, and the padded gradient's first channels (converted to float32 where asked)."""
    be = make_backend("NHWC", dtype, padded_input=True)
    a = Arrays(be, seed=13)
    wt, w_host = a.put(a.rng.standard_normal((5, 3, 3, 3)))
    x = be.empty((2, 4, 4, 8))
    with be.device, be.stream:          # as a primitive would run it
        padded = a.get(be._weight_for(x, wt))
    np.testing.assert_array_equal(padded, np.concatenate([w_host, np.zeros((5, 3, 3, 5))], axis=-1))
    d_padded, d_host = a.put(a.rng.standard_normal((5, 3, 3, 8)))
    for dw_dtype in {np.dtype(np.float32), be.dtype}:
        dw = a.nan((5, 3, 3, 3), dtype=dw_dtype)
        with be.device, be.stream:
            be._launch_1d("crop_weight_channels", (ctype(d_padded.dtype), ctype(dw.dtype)), dw.size,
                          (d_padded, dw, np.int32(45), np.int32(3), np.int32(8)))
            np.testing.assert_array_equal(a.get(dw), d_host[..., :3])


def test_a_data_gradient_pairs_the_current_weights_where_no_forward_of_its_pass_did():
    """The paired kernel a forward builds serves its layer's data gradient until the pass ends
    (wait_for_gradients); after that, with new weights, the data gradient alone builds the kernel again, and
    matches the reference for the new weights, not the old ones."""
    from cupynet.backends.cupy_backend import CupyBackend
    be = CupyBackend(device_id=0, layout="NHWC", dtype="float32", tf32=False, pixel_pairs=True)
    a = Arrays(be, seed=8)
    case = (2, 16, 6, 6, 16, 3, 1)
    (x, _), (wt, _), (dy, dy_ref) = check_forward_and_data_gradient(be, a, case)
    assert be.kernels.launches["pixel_pair_weights"] == 1
    be.wait_for_gradients()                 # the end of the pass: the optimizer would change the weights next
    new_weights = a.rng.standard_normal(wt.shape) * 0.3
    be.upload_into(wt, new_weights.astype(np.float32))
    new_ref = a.get(wt)
    dx = a.nan(x.shape)
    be.conv2d_backward_data(dy, wt, 1, 1, dx)
    assert be.kernels.launches["pixel_pair_weights"] == 2
    expected = a.ref.conv2d_backward_data(dy_ref, new_ref, 1, 1, np.empty(x.shape))
    magnitude = a.ref.conv2d_backward_data(np.abs(dy_ref), np.abs(new_ref), 1, 1, np.empty(x.shape))
    assert_bounded(a.get(dx), expected, CONV["float32"] * magnitude, what="dgrad with the new weights")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pixel_pair_weights_are_numpys(dtype):
    """The kernel that builds the paired weights is a gather: bit for bit the NumPy twin's."""
    from cupynet.backends.cupy_backend import CupyBackend
    from cupynet.backends.pixel_pairs import pixel_pair_weight
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 on the GPU needs ml_dtypes (CuPy's bfloat16 dtype)")
    be = CupyBackend(device_id=0, layout="NHWC", dtype=dtype, pixel_pairs=True)
    a = Arrays(be, seed=6)
    w, w_host = a.put(a.rng.standard_normal((16, 3, 3, 8)))
    with be.device, be.stream:          # as a primitive would run it
        paired = be.to_host(be._pixel_pair_weight(w, reuse=False))
    np.testing.assert_array_equal(paired.astype(np.float64), pixel_pair_weight(w_host))


@pytest.mark.parametrize("io_dtype,dw_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                               ("bfloat16", "float32")])
def test_pixel_pair_weight_gradients_fold_as_numpys(io_dtype, dw_dtype):
    """The kernel that folds a paired weight gradient back adds each weight's two places in float32: bit for bit
    the NumPy twin's, rounded to the gradient's dtype."""
    from cupynet.backends.cupy_backend import CupyBackend
    from cupynet.backends.pixel_pairs import pixel_pair_weight_gradient
    if "bfloat16" in (io_dtype, dw_dtype):
        pytest.importorskip("ml_dtypes", reason="bfloat16 on the GPU needs ml_dtypes (CuPy's bfloat16 dtype)")
    be = CupyBackend(device_id=0, layout="NHWC", dtype=io_dtype, wgrad_pixel_pairs=True)
    a = Arrays(be, seed=7)
    d_paired, d_paired_host = a.put(a.rng.standard_normal((32, 3, 3, 16)))
    dw = a.nan((16, 3, 3, 8), dtype=be._as_dtype(dw_dtype))
    with be.device, be.stream:          # as a primitive would run it
        folded = be.to_host(be._fold_pixel_pair_gradient(d_paired, dw))
    twin = pixel_pair_weight_gradient(d_paired_host.astype(be.dtype)).astype(folded.dtype)
    np.testing.assert_array_equal(folded.astype(np.float64), twin.astype(np.float64))


@params()
@pytest.mark.parametrize("n", [7, 2], ids=lambda n: f"N{n}")
def test_weight_gradient_chunks(layout, dtype, n):
    """--wgrad-chunks: dw of shape (3, *weight) gets one slice of the batch per row (7 = 2 + 2 + 3 images;
    with 2 images one row is empty and must be zeros), the rows run on two side streams, and sum_chunks
    adds them into the float32 gradient of the whole batch."""
    from cupynet.backends.cupy_backend import CupyBackend
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 on the GPU needs ml_dtypes (CuPy's bfloat16 dtype)")
    be = CupyBackend(device_id=0, layout=layout, dtype=dtype, tf32=False, wgrad_streams=2, wgrad_chunks=3)
    a = Arrays(be, seed=4)
    c, k, size = 8, 16, 8
    x, x_ref = a.activation(n, c, size, size)
    dy, dy_ref = a.activation(n, k, size, size)
    weight_shape = be.conv_weight_shape(k, c, 3, 3)
    rows = a.nan((3,) + weight_shape)
    with fast_path(be, conv_ops=("wgrad",)):
        be.conv2d_backward_filter(x, dy, 1, 1, rows)
    be.wait_for_gradients()
    bounds = [n * j // 3 for j in range(4)]
    ref = a.ref
    for j, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        expected = ref.conv2d_backward_filter(x_ref[start:stop], dy_ref[start:stop], 1, 1, np.empty(weight_shape))
        magnitude = ref.conv2d_backward_filter(np.abs(x_ref[start:stop]), np.abs(dy_ref[start:stop]), 1, 1,
                                               np.empty(weight_shape))
        assert_bounded(a.get(rows)[j], expected, CONV[dtype] * magnitude, what=f"chunk {j} ({stop - start} images)")
    dw = a.nan(weight_shape, dtype=np.float32)
    with fast_path(be, kernels=("sum_rows",)):
        be.sum_chunks(dw, rows)
    expected = ref.conv2d_backward_filter(x_ref, dy_ref, 1, 1, np.empty(weight_shape))
    magnitude = ref.conv2d_backward_filter(np.abs(x_ref), np.abs(dy_ref), 1, 1, np.empty(weight_shape))
    assert_bounded(a.get(dw), expected, CONV[dtype] * magnitude, what="sum of the chunks")
    assert be.calls["sum_chunks"] == 1


# --------------------------------------------------------------------------- batch normalization


def channel_axes(layout):
    return (0, 2, 3) if layout == "NCHW" else (0, 1, 2)


# How a BatchNorm forward ends: (relu, with a residual added before it)
TAILS = {"plain": (False, False), "relu": (True, False), "residual_relu": (True, True)}


@batchnorm_params()
@pytest.mark.parametrize("tail", list(TAILS))
@pytest.mark.parametrize("launches", [2, 1], ids=["2launches", "1launch"])
def test_batchnorm_train_forward(layout, dtype, shape, tail, launches):
    check_batchnorm_train_forward(backend(layout, dtype, launches), dtype, shape, tail)


def check_batchnorm_train_forward(be, dtype, shape, tail):
    """batchnorm_train_forward with a TAILS tail against the NumPy twin."""
    relu, with_residual = TAILS[tail]
    a = Arrays(be, seed=3)
    c = shape[1]
    x, x_ref = a.activation(*shape, scale=2.0, offset=3.0)    # |mean| > std: tests the shifted sums
    residual, residual_ref = a.activation(*shape) if with_residual else (None, None)
    gamma, gamma_ref = a.vector(c)
    beta, beta_ref = a.vector(c, -0.5, 0.5)
    moving_mean, mean_ref = a.vector(c, -1, 1)
    moving_var, var_ref = a.vector(c, 0.5, 2)
    y = a.nan(x.shape)
    saved_mean, saved_invstd = a.nan((c,), np.float32), a.nan((c,), np.float32)
    with batchnorm_path(be, "bn_stats_apply", ("bn_stats", "bn_apply"), x, (x,), 4):
        be.batchnorm_train_forward(x, gamma, beta, moving_mean, moving_var, 0.9, 1e-5, y, saved_mean,
                                   saved_invstd, relu=relu, residual=residual)
    expected_mean, expected_invstd = np.empty(c), np.empty(c)
    expected_y = a.ref.batchnorm_train_forward(x_ref, gamma_ref, beta_ref, mean_ref, var_ref, 0.9, 1e-5,
                                               np.empty(x_ref.shape), expected_mean, expected_invstd, relu=relu,
                                               residual=residual_ref)
    assert_batchnorm_forward([a.get(array) for array in (y, saved_mean, saved_invstd, moving_mean, moving_var)],
                             (expected_y, expected_mean, expected_invstd, mean_ref, var_ref), dtype, rms(x_ref))


@params()
@pytest.mark.parametrize("tail", ["relu", "residual_relu"])
def test_batchnorm_statistics_from_a_convolutions_float32_sums(layout, dtype, tail):
    """--conv-genstats: a convolution with K = 32 output channels writes its output's per-channel sum and sum
    of squares (cuDNN's genstats, when cuDNN has an engine for it), and BatchNorm takes its statistics from
    those float32 sums (bn_apply_from_sums<T, float>, shift 0) as it applies; all against the NumPy twins run
    on the same values. Where cuDNN offers no genstats engine, the conv must say so (False) and y is still
    right; the BatchNorm half is then checked with the sums computed here."""
    relu, with_residual = TAILS[tail]
    be = backend(layout, dtype)
    a = Arrays(be, seed=21)
    n, c, hw, k = 4, 16, 8, 32
    x, x_ref = a.activation(n, c, hw, hw)
    w, w_ref = a.put(a.rng.standard_normal(be.conv_weight_shape(k, c, 3, 3)) * 0.2)
    y, sums = a.nan(be.activation_shape(n, k, hw, hw)), a.nan((2, k), np.float32)
    fused = be.conv2d_forward_with_stats(x, w, 1, 1, y, sums)
    y_ref = a.get(y)
    assert_close(y_ref, a.ref.conv2d_forward(x_ref, w_ref, 1, 1, np.empty(y.shape)), CONV[dtype],
                 scale=rms(y_ref), what="y")
    expected_sums = np.empty((2, k))
    a.ref.conv2d_forward_with_stats(x_ref, w_ref, 1, 1, np.empty(y.shape), expected_sums)
    if fused:       # from float32 accumulators before y's rounding to its dtype: within rtol of sum |y|
        abs_sum = np.abs(y_ref).sum(axis=a.ref._channel_axes())
        assert_close(a.get(sums)[0], expected_sums[0], CONV[dtype], scale=abs_sum, what="sum")
        assert_close(a.get(sums)[1], expected_sums[1], 2 * CONV[dtype], what="sum of squares")
    else:
        assert np.isnan(a.get(sums)).all()
        sums, _ = a.put(expected_sums, dtype=np.float32)
    sums_ref = a.get(sums)
    residual, residual_ref = a.activation(n, k, hw, hw) if with_residual else (None, None)
    (gamma, g), (beta, b) = a.vector(k), a.vector(k, -0.5, 0.5)
    (moving_mean, m), (moving_var, v) = a.vector(k, -1, 1), a.vector(k, 0.5, 2)
    zeros, _ = a.put(np.zeros(k), dtype=np.float32)
    out, saved_mean, saved_invstd = a.nan(y.shape), a.nan((k,), np.float32), a.nan((k,), np.float32)
    with fast_path(be, kernels=("bn_apply_from_sums",)):
        be.batchnorm_train_from_sums(y, sums, zeros, n * hw * hw, gamma, beta, moving_mean, moving_var, 0.9, 1e-5,
                                     out, saved_mean, saved_invstd, relu=relu, residual=residual)
    expected_mean, expected_invstd = np.empty(k), np.empty(k)
    expected = a.ref.batchnorm_train_from_sums(y_ref, sums_ref.astype(np.float32), np.zeros(k), n * hw * hw, g, b,
                                               m, v, 0.9, 1e-5, np.empty(y.shape), expected_mean, expected_invstd,
                                               relu=relu, residual=residual_ref)
    assert_batchnorm_forward([a.get(array) for array in (out, saved_mean, saved_invstd, moving_mean, moving_var)],
                             (expected, expected_mean, expected_invstd, m, v), dtype, rms(y_ref))


@batchnorm_params()
@pytest.mark.parametrize("sums_dtype", [np.float64, np.float32], ids=["sync_bn_sums", "genstats_sums"])
@pytest.mark.parametrize("tail", ["relu", "residual_relu"])
def test_batchnorm_from_sums_in_one_launch_equals_two_launches(layout, dtype, shape, sums_dtype, tail):
    """The training forward from (2, C) sums is one launch (bn_apply_from_sums: every block derives the
    statistics, block 0 stores them); where the shift is one of the outputs it writes (sync BN's moving mean),
    it is bn_stats_from_sums then bn_apply. Both give the same bits, and the NumPy twin's values."""
    relu, with_residual = TAILS[tail]
    be = backend(layout, dtype)
    a = Arrays(be, seed=23)
    c = shape[1]
    x, x_ref = a.activation(*shape, scale=2.0, offset=3.0)
    residual, residual_ref = a.activation(*shape) if with_residual else (None, None)
    (gamma, g), (beta, b) = a.vector(c), a.vector(c, -0.5, 0.5)
    moving_var_host = a.rng.uniform(0.5, 2, c)
    shift_host = a.rng.uniform(2, 4, c)              # near the mean, as sync BN's moving mean once warmed up
    shift_ref = a.get(a.put(shift_host, dtype=np.float32)[0])
    axes = a.ref._channel_axes()
    per_channel = (1, c, 1, 1) if layout == "NCHW" else (1, 1, 1, c)
    centered = x_ref - shift_ref.reshape(per_channel)
    sums, sums_ref = a.put(np.stack([centered.sum(axis=axes), (centered * centered).sum(axis=axes)]), dtype=sums_dtype)
    count = x_ref.size // c
    results = {}
    for kernel, aliased in (("bn_apply_from_sums", False), ("bn_stats_from_sums", True)):
        moving_mean, _ = a.put(shift_host, dtype=np.float32)
        shift = moving_mean if aliased else a.put(shift_host, dtype=np.float32)[0]
        moving_var, _ = a.put(moving_var_host, dtype=np.float32)
        y, saved_mean, saved_invstd = a.nan(x.shape), a.nan((c,), np.float32), a.nan((c,), np.float32)
        before = be.kernels.launches["bn_apply_from_sums"]
        with fast_path(be, kernels=(kernel,)):
            be.batchnorm_train_from_sums(x, sums, shift, count, gamma, beta, moving_mean, moving_var, 0.9, 1e-5, y,
                                         saved_mean, saved_invstd, relu=relu, residual=residual)
        assert (be.kernels.launches["bn_apply_from_sums"] > before) is not aliased
        results[kernel] = [be.to_host(array) for array in (y, saved_mean, saved_invstd, moving_mean, moving_var)]
    for one, two in zip(results["bn_apply_from_sums"], results["bn_stats_from_sums"]):
        np.testing.assert_array_equal(one.view(np.uint8), two.view(np.uint8))
    expected_mean, expected_invstd = np.empty(c), np.empty(c)
    m, v = shift_ref.copy(), a.get(a.put(moving_var_host, dtype=np.float32)[0])
    expected = a.ref.batchnorm_train_from_sums(x_ref, sums_ref, shift_ref, count, g, b, m, v, 0.9, 1e-5,
                                               np.empty(x_ref.shape), expected_mean, expected_invstd, relu=relu,
                                               residual=residual_ref)
    assert_batchnorm_forward([array.astype(np.float64) for array in results[kernel]],
                             (expected, expected_mean, expected_invstd, m, v), dtype, rms(x_ref))


def test_arrays_overlap_where_they_share_a_byte():
    """The check that sends the forward from sums to its two launches when what it reads is also written."""
    from cupynet.backends.cupy_operands import overlap
    be = backend("NHWC", "float32")
    buffer = be.zeros((10,), dtype=np.float32)
    first, last, rest = buffer[:5], buffer[4:], buffer[5:]
    assert overlap(first, last) and overlap(last, first) and overlap(buffer, rest)
    assert not overlap(first, rest) and not overlap(rest, first)
    assert not overlap(buffer, be.zeros((10,), dtype=np.float32))


@params()
def test_batchnorm_from_sums_beyond_the_shared_memory_takes_two_launches(layout, dtype):
    """bn_apply_from_sums stages 2 * C floats in shared memory; with more channels than that holds (47 KB: 6,016)
    the forward from sums is bn_stats_from_sums then bn_apply, still right."""
    be = backend(layout, dtype)
    a = Arrays(be, seed=29)
    n, c = 2, 6100
    x, x_ref = a.activation(n, c, 1, 1)
    centered = x_ref.reshape(n, c)
    sums, sums_ref = a.put(np.stack([centered.sum(axis=0), (centered * centered).sum(axis=0)]), dtype=np.float32)
    (gamma, g), (beta, b) = a.vector(c), a.vector(c, -0.5, 0.5)
    (moving_mean, m), (moving_var, v) = a.vector(c, -1, 1), a.vector(c, 0.5, 2)
    zeros, _ = a.put(np.zeros(c), dtype=np.float32)
    y, saved_mean, saved_invstd = a.nan(x.shape), a.nan((c,), np.float32), a.nan((c,), np.float32)
    before = be.kernels.launches["bn_apply_from_sums"]
    with fast_path(be, kernels=("bn_stats_from_sums", "bn_apply")):
        be.batchnorm_train_from_sums(x, sums, zeros, n, gamma, beta, moving_mean, moving_var, 0.9, 1e-5, y,
                                     saved_mean, saved_invstd, relu=True)
    assert be.kernels.launches["bn_apply_from_sums"] == before
    expected = a.ref.batchnorm_train_from_sums(x_ref, sums_ref, np.zeros(c), n, g, b, m, v, 0.9, 1e-5,
                                               np.empty(x_ref.shape), np.empty(c), np.empty(c), relu=True)
    assert_close(a.get(y), expected, REDUCTION[dtype], scale=rms(expected), what="y")


@params()
@pytest.mark.parametrize("tail", list(TAILS))
def test_batchnorm_infer_forward(layout, dtype, tail):
    relu, with_residual = TAILS[tail]
    be = backend(layout, dtype)
    a = Arrays(be, seed=4)
    shape = (5, 3, 7, 7)
    x, x_ref = a.activation(*shape, offset=0.5)
    residual, residual_ref = a.activation(*shape) if with_residual else (None, None)
    params_ = [a.vector(3), a.vector(3, -0.5, 0.5), a.vector(3, -1, 1), a.vector(3, 0.5, 2)]
    (gamma, g), (beta, b), (mean, m), (var, v) = params_
    y = a.nan(x.shape)
    with fast_path(be, kernels=("bn_apply",)):
        be.batchnorm_infer_forward(x, gamma, beta, mean, var, 1e-3, y, relu=relu, residual=residual)
    expected = a.ref.batchnorm_infer_forward(x_ref, g, b, m, v, 1e-3, np.empty(x_ref.shape), relu=relu,
                                             residual=residual_ref)
    assert_close(a.get(y), expected, REDUCTION[dtype], scale=rms(expected), what="y")


# The backward's fused relu: none, its mask read from the forward's output y, or recomputed from x (beta given).
RELU_MASKS = {"plain": (False, False), "relu": (True, False), "relu_from_x": (True, True)}


def batchnorm_backward_with(be, a, mask, dy, x, gamma, beta, saved_mean, saved_invstd, y):
    """(dx, dgamma, dbeta) on the device from batchnorm_backward with a RELU_MASKS mask, into fresh NaN arrays,
    asserting which of its launch paths ran."""
    relu, from_x = RELU_MASKS[mask]
    c = gamma.size
    dx, dgamma, dbeta = a.nan(x.shape), a.nan((c,), np.float32), a.nan((c,), np.float32)
    read = (dy, x) if from_x or not relu else (dy, x, y)
    template = (ctype(x.dtype), RELU_FROM_INPUT if from_x else RELU_FROM_OUTPUT if relu else RELU_NONE)
    with batchnorm_path(be, "bn_grad_dx", ("bn_grad", "bn_backward_dx"), x, read, 6 if from_x else 5, template):
        be.batchnorm_backward(dy, x, gamma, saved_mean, saved_invstd, dx, dgamma, dbeta, y=y if relu else None,
                              beta=beta if from_x else None)
    return dx, dgamma, dbeta


@batchnorm_params()
@pytest.mark.parametrize("mask", list(RELU_MASKS))
@pytest.mark.parametrize("launches", [2, 1], ids=["2launches", "1launch"])
def test_batchnorm_backward(layout, dtype, shape, mask, launches):
    check_batchnorm_backward(backend(layout, dtype, launches), layout, dtype, shape, mask)


def check_batchnorm_backward(be, layout, dtype, shape, mask):
    """batchnorm_backward with a RELU_MASKS mask against the NumPy twin (and, for relu_from_x, bit for bit
    against the mask read from y)."""
    relu, from_x = RELU_MASKS[mask]
    a = Arrays(be, seed=5)
    c = shape[1]
    x, x_ref = a.activation(*shape, scale=1.5, offset=1.0)
    gamma, gamma_ref = a.vector(c)
    beta, _ = a.vector(c, -0.5, 0.5)
    saved_mean, saved_invstd = a.nan((c,), np.float32), a.nan((c,), np.float32)
    y = a.nan(x.shape)
    be.batchnorm_train_forward(x, gamma, beta, a.vector(c)[0], a.vector(c)[0], 0.9, 1e-5, y, saved_mean,
                               saved_invstd, relu=relu)
    mean_ref, invstd_ref, y_ref = a.get(saved_mean), a.get(saved_invstd), a.get(y)   # what the GPU saved
    dy, dy_ref = a.activation(*shape)
    dx, dgamma, dbeta = batchnorm_backward_with(be, a, mask, dy, x, gamma, beta, saved_mean, saved_invstd, y)
    if from_x:      # the mask recomputed from x is the one read from y, bit for bit
        for got, want in zip((dx, dgamma, dbeta),
                             batchnorm_backward_with(be, a, "relu", dy, x, gamma, beta, saved_mean, saved_invstd, y)):
            np.testing.assert_array_equal(be.to_host(got).view(np.uint8), be.to_host(want).view(np.uint8))
    expected_dgamma, expected_dbeta = np.empty(c), np.empty(c)
    expected_dx = a.ref.batchnorm_backward(dy_ref, x_ref, gamma_ref, mean_ref, invstd_ref, np.empty(x_ref.shape),
                                           expected_dgamma, expected_dbeta, y=y_ref if relu else None)
    # the sums may cancel: bound their error by the sums of the terms' magnitudes
    pc = (lambda v: v.reshape(1, -1, 1, 1)) if layout == "NCHW" else (lambda v: v)
    dz = dy_ref * (y_ref > 0) if relu else dy_ref
    xhat = (x_ref - pc(mean_ref)) * pc(invstd_ref)
    f32 = REDUCTION["float32"]
    assert_close(a.get(dbeta), expected_dbeta, f32, scale=np.abs(dz).sum(axis=channel_axes(layout)), what="dbeta")
    assert_close(a.get(dgamma), expected_dgamma, f32, scale=np.abs(dz * xhat).sum(axis=channel_axes(layout)),
                 what="dgamma")
    assert_close(a.get(dx), expected_dx, REDUCTION[dtype], scale=rms(expected_dx), what="dx")


# batchnorm.cu's PARTIAL_SLICES_IN_FLIGHT and slice_lanes(): a finalizing lane loads that many slices of the partial
# sums at once, and a channel has slice_lanes(C) lanes.
PARTIAL_SLICES_IN_FLIGHT = 8


def slice_lanes(channels):
    lanes = 32
    while lanes > 1 and lanes * channels > 256:
        lanes //= 2
    return lanes


@params(layouts=["NHWC"])
@pytest.mark.parametrize("shape", [(8, 64, 32, 32), (16, 256, 8, 8)], ids=lambda s: "N{}C{}H{}W{}".format(*s))
def test_batchnorm_sums_of_many_slices(monkeypatch, layout, dtype, shape):
    """Reductions whose finalize adds each channel's partial sums in whole batches of PARTIAL_SLICES_IN_FLIGHT
    per lane, and more: the emulated GPU is given 32 SMs for it (2 leave too few slices; a real GPU has its
    own, and this many slices at 32 or more), forward and backward against the NumPy twin."""
    monkeypatch.setenv("CUPYNET_EMULATED_SMS", "32")
    be = make_backend(layout, dtype)
    n, c, h, w = shape
    plan = be._bn_plan(c, n * h * w, 16 // np.dtype(be.dtype).itemsize, 1)
    assert plan["slices"] >= 2 * PARTIAL_SLICES_IN_FLIGHT * slice_lanes(c), plan
    check_batchnorm_train_forward(be, dtype, shape, "relu")
    for mask in RELU_MASKS:
        check_batchnorm_backward(be, layout, dtype, shape, mask)


@batchnorm_params()
@pytest.mark.parametrize("mask", list(RELU_MASKS))
def test_relu_backward_add_bn_grad_is_the_two_kernels_in_one(layout, dtype, shape, mask):
    """--residual-grad-sums: relu_backward_add_bn_grad writes a block's input gradient as relu_backward_add does
    and the next BatchNorm's dgamma, dbeta as its batchnorm_backward would (bn_grad's tiling: the same bits), in
    place as the model runs it (dx is the addend); batchnorm_backward_dx then gives batchnorm_backward's dx. All
    of it against the float64 reference too."""
    relu, from_x = RELU_MASKS[mask]
    be = backend(layout, dtype)
    a = Arrays(be, seed=15)
    c = shape[1]
    x, x_ref = a.activation(*shape, scale=1.5, offset=1.0)           # the BatchNorm's input ...
    gamma, gamma_ref = a.vector(c)
    beta, _ = a.vector(c, -0.5, 0.5)
    saved_mean, saved_invstd, y = a.nan((c,), np.float32), a.nan((c,), np.float32), a.nan(x.shape)
    be.batchnorm_train_forward(x, gamma, beta, a.vector(c)[0], a.vector(c)[0], 0.9, 1e-5, y, saved_mean,
                               saved_invstd, relu=relu)                # ... and output, the block's input
    mean_ref, invstd_ref, y_ref = a.get(saved_mean), a.get(saved_invstd), a.get(y)
    dy, dy_ref = a.activation(*shape)                                  # the block's output gradient,
    out, out_ref = a.activation(*shape)                                # its output (relu: where > 0),
    addend, addend_ref = a.activation(*shape)                          # its main path's input gradient
    mask_args = dict(y=y if relu else None, beta=beta if from_x else None)

    plain_dx = be.relu_backward_add(dy, out, addend, a.nan(x.shape))
    plain = batchnorm_backward_with(be, a, mask, plain_dx, x, gamma, beta, saved_mean, saved_invstd, y)
    dx, dgamma, dbeta = a.nan(x.shape), a.nan((c,), np.float32), a.nan((c,), np.float32)
    be.copy_into(dx, addend)
    with fast_path(be, kernels=("relu_backward_add_bn_grad",)):
        be.relu_backward_add_bn_grad(dy, out, dx, dx, x, gamma, saved_mean, saved_invstd, dgamma, dbeta,
                                     bn_y=mask_args["y"], beta=mask_args["beta"])
    bn_dx = a.nan(x.shape)
    with fast_path(be, kernels=("bn_backward_dx",)):
        be.batchnorm_backward_dx(dx, x, gamma, saved_mean, saved_invstd, dgamma, dbeta, bn_dx, **mask_args)
    for got, want in zip((dx, dgamma, dbeta, bn_dx), (plain_dx,) + plain[1:] + plain[:1]):
        np.testing.assert_array_equal(be.to_host(got).view(np.uint8), be.to_host(want).view(np.uint8))

    expected_dx = addend_ref + dy_ref * (out_ref > 0)
    assert_close(a.get(dx), expected_dx, ELEMENTWISE[dtype], what="dx")
    dx_ref = a.get(dx)                                    # the sums are of what the GPU wrote, as rounded
    expected_dgamma, expected_dbeta = np.empty(c), np.empty(c)
    a.ref.relu_backward_add_bn_grad(dy_ref, out_ref, addend_ref, np.empty(x_ref.shape), x_ref, gamma_ref, mean_ref,
                                    invstd_ref, expected_dgamma, expected_dbeta, bn_y=y_ref if relu else None)
    pc = (lambda v: v.reshape(1, -1, 1, 1)) if layout == "NCHW" else (lambda v: v)
    dz = dx_ref * (y_ref > 0) if relu else dx_ref
    xhat = (x_ref - pc(mean_ref)) * pc(invstd_ref)
    f32 = REDUCTION["float32"]
    # dbeta, dgamma from the float64 reference's own dx: it differs from the GPU's by dx's rounding
    tolerance = f32 + (ELEMENTWISE[dtype] if dtype == "bfloat16" else 0.0)
    assert_close(a.get(dbeta), expected_dbeta, tolerance, scale=np.abs(dz).sum(axis=channel_axes(layout)),
                 what="dbeta")
    assert_close(a.get(dgamma), expected_dgamma, tolerance,
                 scale=np.abs(dz * xhat).sum(axis=channel_axes(layout)), what="dgamma")


def test_relu_backward_add_bn_grad_refuses_a_gradient_over_its_other_operands():
    """dx may be the addend (the model adds in place), never an array the pass still reads elsewhere."""
    be = backend("NHWC", "float32")
    a = Arrays(be, seed=16)
    x, _ = a.activation(2, 8, 4, 4)
    dy, _ = a.activation(2, 8, 4, 4)
    vectors = [a.vector(8)[0] for _ in range(4)]
    with pytest.raises(ValueError, match="dx shares memory with bn_x"):
        be.relu_backward_add_bn_grad(dy, dy, dy, x, x, *vectors[:3], a.nan((8,), np.float32), vectors[3])
    with pytest.raises(ValueError, match="y .* for a gradient of"):
        be.relu_backward_add_bn_grad(dy, a.nan((2, 4, 4, 4)), dy, a.nan(x.shape), x, *vectors[:3],
                                     a.nan((8,), np.float32), vectors[3])


def first_of_each_channel(layout, a):
    """The first element of every channel (image 0, row 0, column 0) of an activation in `layout`."""
    return a[0, :, 0, 0] if layout == "NCHW" else a[0, 0, 0, :]


@params()
@pytest.mark.parametrize("forward", ["2launches", "1launch", "sums"])
def test_the_relu_mask_from_x_is_y_s_at_the_rounding_boundaries(layout, dtype, forward):
    """The mask recomputed from x must round as the forward did. beta is set so that each channel's first element
    lands where another rounding would change the mask: in half the channels its normalized value is exactly
    the rounding error of (x - mean) * (gamma * invstd) (fused with beta, as bn_affine does, it is that error, of
    either sign; a separate multiply and add would give 0); in the others gamma is so small that every value is
    below bfloat16's smallest subnormal (then y is 0 in bfloat16 though the float32 value is > 0, where the GPU does
    not flush it). Both backward modes must give the same bits, after every forward path: BatchNorm's own
    statistics in two launches or one, and statistics from a convolution's sums."""
    be = backend(layout, dtype, 1 if forward == "1launch" else 2)
    a = Arrays(be, seed=31)
    shape, c = (4, 64, 4, 4), 64
    x, x_ref = a.activation(*shape, scale=1.5, offset=1.0)
    centered = x_ref.reshape(-1, c) if layout == "NHWC" else x_ref.transpose(0, 2, 3, 1).reshape(-1, c)
    sums = a.put(np.stack([centered.sum(axis=0), (centered * centered).sum(axis=0)]), dtype=np.float32)[0]
    zeros = a.put(np.zeros(c), dtype=np.float32)[0]
    saved_mean, saved_invstd, y = a.nan((c,), np.float32), a.nan((c,), np.float32), a.nan(x.shape)

    def forward_with(gamma_host, beta_host):
        gamma, beta = (a.put(v, dtype=np.float32)[0] for v in (gamma_host, beta_host))
        moving = [a.vector(c)[0], a.vector(c)[0]]
        if forward == "sums":
            be.batchnorm_train_from_sums(x, sums, zeros, centered.shape[0], gamma, beta, *moving, 0.9, 1e-5, y,
                                         saved_mean, saved_invstd, relu=True)
        else:
            be.batchnorm_train_forward(x, gamma, beta, *moving, 0.9, 1e-5, y, saved_mean, saved_invstd, relu=True)
        return gamma, beta

    gamma_host = a.rng.uniform(0.5, 1.5, c).astype(np.float32)
    forward_with(gamma_host, np.zeros(c, np.float32))           # the statistics, which beta does not change
    mean, invstd = be.to_host(saved_mean), be.to_host(saved_invstd)
    d = first_of_each_channel(layout, x_ref).astype(np.float32) - mean       # float32 arithmetic, as the kernels
    beta_host = -(d * (gamma_host * invstd))
    tiny = np.arange(c) >= c // 2
    gamma_host[tiny], beta_host[tiny] = np.float32(2.0 ** -140), 0.0
    gamma, beta = forward_with(gamma_host, beta_host)
    assert np.array_equal(be.to_host(saved_mean), mean) and np.array_equal(be.to_host(saved_invstd), invstd)
    at_error = first_of_each_channel(layout, a.get(y))[~tiny]
    assert (at_error > 0).any() and (at_error == 0).any()     # the boundary is really there, on both sides
    dy = a.activation(*shape)[0]
    results = [batchnorm_backward_with(be, a, mask, dy, x, gamma, beta, saved_mean, saved_invstd, y)
               for mask in ("relu_from_x", "relu")]
    for got, want in zip(*results):
        np.testing.assert_array_equal(be.to_host(got).view(np.uint8), be.to_host(want).view(np.uint8))


@params(layouts=("NHWC",))      # NCHW needs a block per channel: 16 do not fit 2 (the fallback is tested above)
def test_one_launch_batchnorm_caps_its_grid_at_what_the_gpu_holds(layout, dtype, monkeypatch):
    """Where the GPU holds fewer blocks at once than the partial sums would use (the emulated GPU with one
    block per SM, CUPYNET_EMULATED_OCCUPANCY=1, which also refuses a grid it could not hold; a real GPU ignores
    the variable), the one-launch passes run with fewer slices: the two launches' results up to the order of
    the sums."""
    monkeypatch.setenv("CUPYNET_EMULATED_OCCUPANCY", "1")
    shape, c = (16, 16, 32, 32), 16
    results = {}
    for launches in (2, 1):
        be = make_backend(layout, dtype, bn_launches=launches)       # fresh: occupancy is cached per backend
        a = Arrays(be, seed=13)
        x, _ = a.activation(*shape, scale=2.0, offset=1.0)
        dy, _ = a.activation(*shape)
        gamma, beta = a.vector(c), a.vector(c, -0.5, 0.5)
        stats = [a.vector(c, -1, 1)[0], a.vector(c, 0.5, 2)[0], a.nan((c,), np.float32), a.nan((c,), np.float32)]
        y, dx = a.nan(x.shape), a.nan(x.shape)
        dgamma, dbeta = a.nan((c,), np.float32), a.nan((c,), np.float32)
        be.batchnorm_train_forward(x, gamma[0], beta[0], *stats[:2], 0.9, 1e-5, y, *stats[2:], relu=True)
        be.batchnorm_backward(dy, x, gamma[0], stats[2], stats[3], dx, dgamma, dbeta, y=y)
        results[launches] = [a.get(v).astype(np.float64) for v in (y, dx, *stats, dgamma, dbeta)]
        if launches == 1:
            assert be.kernels.launches["bn_stats_apply"] == be.kernels.launches["bn_grad_dx"] == 1
            assert be.kernels.launches["bn_stats"] == be.kernels.launches["bn_grad"] == 0
    names = ("y", "dx", "moving mean", "moving variance", "saved mean", "saved invstd", "dgamma", "dbeta")
    for name, one, two in zip(names, results[1], results[2]):
        scale = rms(two) if name in ("y", "dx", "dgamma", "dbeta") else 0.0
        assert_close(one, two, 2 * REDUCTION[dtype] if name in ("y", "dx") else 1e-4, scale=scale, what=name)


@params()
def test_batchnorm_reads_packs_when_aligned(layout, dtype):
    """The partial-sum kernels read 16-byte packs (vec = 1) when the activations are aligned and no pack
    straddles two channels, and one element at a time otherwise (an activation that starts one element
    past a 16-byte boundary, or 3 channels of 7 x 7): both give the reference's statistics and gradients."""
    be = backend(layout, dtype)
    a = Arrays(be, seed=12)
    cases = {"aligned": ((4, 16, 8, 8), 0, 1), "unaligned": ((4, 16, 8, 8), 1, 0), "3 channels": ((5, 3, 7, 7), 0, 0)}
    for what, (shape, skip, vec) in cases.items():
        c = shape[1]
        host = to_layout(layout, a.rng.standard_normal(shape) * 1.5 + 1.0)
        flat, _ = a.put(np.concatenate([np.zeros(skip), host.ravel()]))
        x = flat[skip:].reshape(host.shape)
        x_ref = a.get(x)
        gamma, gamma_ref = a.vector(c)
        beta, beta_ref = a.vector(c, -0.5, 0.5)
        moving_mean, mean_ref = a.vector(c, -1, 1)
        moving_var, var_ref = a.vector(c, 0.5, 2)
        y, saved_mean, saved_invstd = a.nan(x.shape), a.nan((c,), np.float32), a.nan((c,), np.float32)
        be._bn_plans.clear()
        be.batchnorm_train_forward(x, gamma, beta, moving_mean, moving_var, 0.9, 1e-5, y, saved_mean, saved_invstd,
                                   relu=True)
        assert [plan["vec"] for plan in be._bn_plans.values()] == [vec], what
        expected_mean, expected_invstd = np.empty(c), np.empty(c)
        expected_y = a.ref.batchnorm_train_forward(x_ref, gamma_ref, beta_ref, mean_ref, var_ref, 0.9, 1e-5,
                                                   np.empty(x_ref.shape), expected_mean, expected_invstd, relu=True)
        f32 = REDUCTION["float32"]
        assert_close(a.get(saved_mean), expected_mean, f32, scale=rms(x_ref), what=f"{what}: saved mean")
        assert_close(a.get(saved_invstd), expected_invstd, f32, what=f"{what}: saved invstd")
        assert_close(a.get(y), expected_y, REDUCTION[dtype], scale=rms(expected_y), what=f"{what}: y")
        dy, dy_ref = a.activation(*shape)
        dx, dgamma, dbeta = a.nan(x.shape), a.nan((c,), np.float32), a.nan((c,), np.float32)
        be.batchnorm_backward(dy, x, gamma, saved_mean, saved_invstd, dx, dgamma, dbeta, y=y)
        mean_got, invstd_got, y_got = a.get(saved_mean), a.get(saved_invstd), a.get(y)
        expected_dgamma, expected_dbeta = np.empty(c), np.empty(c)
        a.ref.batchnorm_backward(dy_ref, x_ref, gamma_ref, mean_got, invstd_got, np.empty(x_ref.shape),
                                 expected_dgamma, expected_dbeta, y=y_got)
        dz = dy_ref * (y_got > 0)
        assert_close(a.get(dbeta), expected_dbeta, f32, scale=np.abs(dz).sum(axis=channel_axes(layout)),
                     what=f"{what}: dbeta")


@params()
def test_one_launch_reductions_finalize_on_every_launch(layout, dtype):
    """bn_stats and bn_grad finalize in whichever block arrives last, counted in one per-backend counter
    that each launch must leave at zero. Launches of different grids one after another (several slices,
    two channel tiles, a 240-thread block that ends in a partial warp) must each write their results
    (outputs start as NaN), and a shape run again must repeat its first results bit for bit."""
    be = backend(layout, dtype)
    a = Arrays(be, seed=11)
    shapes = [(8, 16, 32, 32), (5, 3, 7, 7), (2, 260, 3, 3), (2, 48, 4, 4)]
    inputs = {shape: (a.activation(*shape, scale=1.5, offset=1.0)[0], a.activation(*shape)[0],
                      a.rng.uniform(0.5, 1.5, (4, shape[1]))) for shape in shapes}

    def statistics_and_gradients(shape):
        x, dy, vectors = inputs[shape]
        c = shape[1]
        gamma, beta, moving_mean, moving_var = (a.put(v, dtype=np.float32)[0] for v in vectors)  # fresh copies
        saved_mean, saved_invstd, dgamma, dbeta = (a.nan((c,), np.float32) for _ in range(4))
        y, dx = a.nan(x.shape), a.nan(x.shape)
        be.batchnorm_train_forward(x, gamma, beta, moving_mean, moving_var, 0.9, 1e-5, y, saved_mean, saved_invstd,
                                   relu=True)
        be.batchnorm_backward(dy, x, gamma, saved_mean, saved_invstd, dx, dgamma, dbeta, y=y)
        return [a.get(v) for v in (saved_mean, saved_invstd, moving_mean, moving_var, dgamma, dbeta)]

    first = {shape: statistics_and_gradients(shape) for shape in shapes}
    for shape in shapes[::-1]:
        for got, want in zip(statistics_and_gradients(shape), first[shape]):
            assert np.all(np.isfinite(want)), f"{shape}: a launch left its results unwritten"
            np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- elementwise


@params()
def test_relu_add_and_relu_backward_add(layout, dtype):
    be = backend(layout, dtype)
    ar = Arrays(be, seed=6)
    shape = (5, 3, 7, 7)
    a, a_ref = ar.activation(*shape)
    b, b_ref = ar.activation(*shape)
    c, c_ref = ar.activation(*shape)
    tol = ELEMENTWISE[dtype]
    cases = [("relu_forward", lambda out: be.relu_forward(a, out), np.maximum(a_ref, 0)),
             ("relu_backward", lambda out: be.relu_backward(a, b, out), a_ref * (b_ref > 0)),
             ("residual_add", lambda out: be.add(a, b, out), a_ref + b_ref),
             ("residual_add", lambda out: be.relu_backward_add(a, b, c, out), c_ref + a_ref * (b_ref > 0))]
    for kernel, run, expected in cases:
        out = ar.nan(a.shape)
        with fast_path(be, kernels=(kernel,)):
            run(out)
        assert_close(ar.get(out), expected, tol, what=kernel)
    with fast_path(be, kernels=("residual_add",)):          # in place, as the model's dx = dx + ds
        be.relu_backward_add(b, c, a, a)                     # as the model's dx = dx + dy * (y > 0)
    assert_close(ar.get(a), a_ref + b_ref * (c_ref > 0), tol, what="relu_backward_add in place")
    a_ref = ar.get(a)                                       # what a holds now (rounded to the dtype)
    with fast_path(be, kernels=("residual_add",)):          # in place, as the model's dx = dx + ds
        be.add(a, b, a)
    assert_close(ar.get(a), a_ref + b_ref, tol, what="add in place")


# --------------------------------------------------------------------------- option-A shortcut

# (N, Cin, H, W, Cout, stride)
# NHWC takes 16-byte packs of channels where Cin, Cout and the padding below are multiples of a pack: (4, 16, ...)
# and (2, 16, 5, ...) (trailing row and column dropped) do in both precisions; (2, 8, ..., 12, 2) (padding 2) and
# (2, 16, ..., 33, 2) (Cout odd, the padding below 8) do not.
SHORTCUTS = [(5, 3, 7, 7, 8, 2), (4, 16, 8, 8, 32, 2), (2, 16, 5, 5, 32, 2), (2, 8, 4, 4, 12, 2), (2, 16, 4, 4, 33, 2),
             (2, 4, 6, 6, 6, 1), (2, 5, 5, 5, 5, 2)]


@params()
@pytest.mark.parametrize("case", SHORTCUTS, ids=lambda c: "N{}Cin{}H{}W{}Cout{}s{}".format(*c))
def test_shortcut_forward_and_backward(layout, dtype, case):
    n, cin, h, w, cout, stride = case
    be = backend(layout, dtype)
    a = Arrays(be, seed=7)
    x, x_ref = a.activation(n, cin, h, w)
    out_shape = be.activation_shape(n, cout, h // stride, w // stride)
    y = a.nan(out_shape)
    with fast_path(be, kernels=("shortcut_forward",)):
        be.shortcut_forward(x, stride, y)
    expected = a.ref.shortcut_forward(x_ref, stride, np.empty(out_shape))
    # a window's sum may cancel: relative to the inputs' scale; padded channels must be exactly 0
    assert_close(a.get(y), expected, ELEMENTWISE[dtype], scale=rms(x_ref), what="forward")

    dy, dy_ref = a.put(a.rng.standard_normal(out_shape))
    dx = a.nan(x.shape)
    with fast_path(be, kernels=("shortcut_backward",)):
        be.shortcut_backward(dy, stride, dx)
    expected = a.ref.shortcut_backward(dy_ref, stride, np.empty(x_ref.shape))
    assert_close(a.get(dx), expected, ELEMENTWISE[dtype], what="backward")

    # a post-activation downsampling block's input gradient: dx_main + shortcut'(dy * (y > 0)), one pass
    relu_out, relu_ref = a.put(np.maximum(a.rng.standard_normal(out_shape), 0))
    dx_main, dx_main_ref = a.activation(n, cin, h, w)
    launches = be.kernels.launches["shortcut_backward"]
    be.shortcut_backward(dy, stride, dx_main, relu_output=relu_out, accumulate=True)
    assert be.kernels.launches["shortcut_backward"] == launches + 1
    expected = a.ref.shortcut_backward(dy_ref, stride, dx_main_ref.copy(), relu_output=relu_ref, accumulate=True)
    masked = a.ref.shortcut_backward(dy_ref * (relu_ref > 0), stride, np.empty(x_ref.shape))
    np.testing.assert_allclose(expected, dx_main_ref + masked, rtol=1e-12, atol=0)      # the reference's meaning
    assert_close(a.get(dx_main), expected, ELEMENTWISE[dtype], scale=rms(expected), what="masked, accumulated")


# --------------------------------------------------------------------------- head


@params()
@pytest.mark.parametrize("shape", [(5, 3, 7, 7), (4, 64, 8, 8)], ids=lambda s: "N{}C{}H{}W{}".format(*s))
def test_global_avgpool(layout, dtype, shape):
    be = backend(layout, dtype)
    a = Arrays(be, seed=8)
    n, c = shape[:2]
    x, x_ref = a.activation(*shape, offset=0.3)
    y = a.nan((n, c))
    with fast_path(be, kernels=("global_avgpool_forward",)):
        be.global_avgpool_forward(x, y)
    expected = a.ref.global_avgpool_forward(x_ref, np.empty((n, c)))
    assert_close(a.get(y), expected, REDUCTION[dtype], scale=rms(x_ref), what="forward")

    dy, dy_ref = a.put(a.rng.standard_normal((n, c)))
    dx = a.nan(x.shape)
    with fast_path(be, kernels=("global_avgpool_backward",)):
        be.global_avgpool_backward(dy, dx)
    expected = a.ref.global_avgpool_backward(dy_ref, np.empty(x_ref.shape))
    assert_close(a.get(dx), expected, ELEMENTWISE[dtype], what="backward")


@params(layouts=("NHWC",))
@pytest.mark.parametrize("n", [5, 70], ids=lambda n: f"N{n}")
def test_dense_forward_and_backward(layout, dtype, n):
    """The dense layer's kernels sum each output over a warp's lanes: 64 inputs (two terms a lane), and a batch of
    5 (most lanes idle) or 70 (three rounds, the last partial) for the parameter gradients."""
    be = backend(layout, dtype)
    a = Arrays(be, seed=9)
    cin, cout = 64, 10
    x, x_ref = a.put(a.rng.standard_normal((n, cin)))
    w, w_ref = a.put(a.rng.standard_normal((cin, cout)) * 0.2, dtype=np.float32)   # float32 master weights
    b, b_ref = a.put(a.rng.standard_normal(cout), dtype=np.float32)
    y = a.nan((n, cout))
    with fast_path(be, kernels=("dense_forward",)):
        be.dense_forward(x, w, b, y)
    expected = a.ref.dense_forward(x_ref, w_ref, b_ref, np.empty((n, cout)))
    magnitude = np.abs(x_ref) @ np.abs(w_ref) + np.abs(b_ref)
    assert_bounded(a.get(y), expected, REDUCTION[dtype] * magnitude, what="y")

    dy, dy_ref = a.put(a.rng.standard_normal((n, cout)))
    dx, dw, db = a.nan((n, cin)), a.nan((cin, cout), np.float32), a.nan((cout,), np.float32)
    with fast_path(be, kernels=("dense_backward_data", "dense_backward_params")):
        be.dense_backward(x, w, dy, dx, dw, db)
    ex_dx, ex_dw, ex_db = np.empty((n, cin)), np.empty((cin, cout)), np.empty(cout)
    a.ref.dense_backward(x_ref, w_ref, dy_ref, ex_dx, ex_dw, ex_db)
    f32 = REDUCTION["float32"]
    assert_bounded(a.get(dx), ex_dx, REDUCTION[dtype] * (np.abs(dy_ref) @ np.abs(w_ref).T), what="dx")
    assert_bounded(a.get(dw), ex_dw, f32 * (np.abs(x_ref).T @ np.abs(dy_ref)), what="dw")
    assert_close(a.get(db), ex_db, f32, scale=np.abs(dy_ref).sum(axis=0), what="db")


@params(layouts=("NHWC",), dtypes=("float32",))
def test_the_dense_parameter_gradients_run_beside_the_main_stream(layout, dtype):
    """dense_backward leaves only dx on the backward's chain: dw and db are computed on a side stream, as the
    convolutions' weight gradients are, and are final once the main stream has waited for it (wait_for_gradients).
    On the emulated GPU, where a stream's work runs only when something waits for it, the main stream's own work is
    then done while dw still holds what was there before; on a GPU only the results are checked."""
    be = make_backend(layout, dtype)
    a = Arrays(be, seed=11)
    n, cin, cout = 8, 64, 10
    x, x_ref = a.put(a.rng.standard_normal((n, cin)))
    w, w_ref = a.put(a.rng.standard_normal((cin, cout)) * 0.2, dtype=np.float32)
    dy, dy_ref = a.put(a.rng.standard_normal((n, cout)))
    dx = a.nan((n, cin))
    dw, _ = a.put(np.full((cin, cout), 7.0), dtype=np.float32)
    db, _ = a.put(np.full(cout, 7.0), dtype=np.float32)
    be.dense_backward(x, w, dy, dx, dw, db)
    import cupy
    if "emulated" in cupy.__version__:
        # host copies on the main stream alone, which has not waited for the side streams
        assert np.all(dw.get(stream=be.stream) == 7.0) and np.all(db.get(stream=be.stream) == 7.0)
        assert not np.isnan(dx.get(stream=be.stream).astype(np.float32)).any()
    be.wait_for_gradients()
    ex_dx, ex_dw, ex_db = np.empty((n, cin)), np.empty((cin, cout)), np.empty(cout)
    a.ref.dense_backward(x_ref, w_ref, dy_ref, ex_dx, ex_dw, ex_db)
    f32 = REDUCTION["float32"]
    assert_bounded(a.get(dw), ex_dw, f32 * (np.abs(x_ref).T @ np.abs(dy_ref)), what="dw")
    assert_close(a.get(db), ex_db, f32, scale=np.abs(dy_ref).sum(axis=0), what="db")
    assert_bounded(a.get(dx), ex_dx, f32 * (np.abs(dy_ref) @ np.abs(w_ref).T), what="dx")

@params(layouts=("NHWC",))
def test_softmax_cross_entropy(layout, dtype):
    be = backend(layout, dtype)
    a = Arrays(be, seed=10)
    n, k = 5, 10
    logits, logits_ref = a.put(a.rng.standard_normal((n, k)) * 3)
    labels_host = a.rng.integers(0, k, n).astype(np.int32)
    labels = be.from_host(labels_host)
    loss, dlogits = a.nan((), np.float32), a.nan((n, k))
    with fast_path(be, kernels=("softmax_cross_entropy",)):
        be.softmax_cross_entropy(logits, labels, loss, dlogits)
    expected_loss = np.empty(())
    expected_d = np.empty((n, k))
    a.ref.softmax_cross_entropy(logits_ref, labels_host, expected_loss, expected_d)
    # the loss is float32 arithmetic on exact inputs in both precisions; exp/log are within ~2 ulp
    assert_close(a.get(loss), expected_loss, REDUCTION["float32"], what="loss")
    # |dlogits| <= 1/N; exp and log are within a few ulp, so errors scale with 1/N, not with a tiny p/N
    assert_close(a.get(dlogits), expected_d, REDUCTION[dtype], scale=1.0 / n, what="dlogits")


@params(layouts=("NHWC",))
def test_count_correct_accumulates_over_valid_rows(layout, dtype):
    be = backend(layout, dtype)
    a = Arrays(be, seed=11)
    n, k = 7, 10
    logits, logits_ref = a.put(a.rng.standard_normal((n, k)))
    labels_host = np.argmax(logits_ref, axis=1).astype(np.int32)
    labels_host[[1, 4]] = (labels_host[[1, 4]] + 1) % k          # two wrong rows
    labels = be.from_host(labels_host)
    correct = be.zeros((), dtype=np.int64)
    expected = np.zeros((), dtype=np.int64)
    with fast_path(be, kernels=("count_correct",)):
        be.count_correct(logits, labels, 5, correct)
        be.count_correct(logits, labels, 7, correct)
    a.ref.count_correct(logits_ref, labels_host, 5, expected)
    a.ref.count_correct(logits_ref, labels_host, 7, expected)
    assert int(be.to_host(correct)) == int(expected) == 3 + 5


# --------------------------------------------------------------------------- optimizer


@params(layouts=("NHWC",))
def test_sgd_update_is_bit_identical_to_numpy_float32(layout, dtype):
    """Same IEEE float32 operations in the same order (no FMA contraction in the kernel): exact."""
    be = backend(layout, dtype)
    rng = np.random.default_rng(12)
    size = 1037
    host = {name: rng.standard_normal(size).astype(np.float32) for name in ("params", "grads", "accum")}
    lr_host = np.array(0.05, dtype=np.float32)
    device = {name: be.from_host(value) for name, value in host.items()}
    lr = be.from_host(lr_host)
    copy = be.empty((size,)) if dtype == "bfloat16" else None
    with fast_path(be, kernels=("sgd_momentum",)):
        be.sgd_momentum_update(device["params"], device["grads"], device["accum"], lr, 0.9, 1e-4, compute_copy=copy)
    ref = NumpyBackend("NHWC", "float32")
    ref.sgd_momentum_update(host["params"], host["grads"], host["accum"], lr_host, 0.9, 1e-4)
    np.testing.assert_array_equal(be.to_host(device["params"]), host["params"])
    np.testing.assert_array_equal(be.to_host(device["accum"]), host["accum"])
    if copy is not None:     # the bf16 compute copy is the updated float32 value rounded to nearest even
        np.testing.assert_array_equal(be.to_host(copy).astype(np.float32),
                                      host["params"].astype(be.dtype).astype(np.float32))


@params(layouts=("NHWC",), dtypes=("float32",))
def test_sum_of_squares_and_accumulate(layout, dtype):
    be = backend(layout, dtype)
    rng = np.random.default_rng(13)
    host = rng.standard_normal(100_003).astype(np.float32)
    out = be.zeros((), dtype=np.float32)
    with fast_path(be, kernels=("sum_squares_partials", "sum_finalize")):
        be.sum_of_squares(be.from_host(host), out)
    # all terms positive: no cancellation, the float32 partial sums err by <= depth * 2^-24 relative
    assert_close(be.to_host(out), np.sum(host.astype(np.float64) ** 2), REDUCTION["float32"], what="sum of squares")

    total, value = be.from_host(np.array(1.5, np.float32)), be.from_host(np.array(0.3, np.float32))
    total_ref, value_ref = np.array(1.5, np.float32), np.array(0.3, np.float32)
    ref = NumpyBackend("NHWC", "float32")
    with fast_path(be, kernels=("accumulate",)):
        for scale in (1.0, 128, 0.1):
            be.accumulate(total, value, scale)
            ref.accumulate(total_ref, value_ref, scale)
    assert be.to_host(total) == total_ref      # same float32 operations: exact


# --------------------------------------------------------------------------- 16-byte packs


@params()
def test_packed_and_element_by_element_paths_are_bit_identical(layout, dtype):
    """The elementwise kernels move 16-byte packs when every array is 16-byte aligned and go element by
    element otherwise, running the same per-element arithmetic: equal bit for bit. Arrays one element
    past an aligned address force the element path; 945 elements also leave a tail after the packs."""
    be = backend(layout, dtype)
    rng = np.random.default_rng(16)
    shape = be.activation_shape(3, 5, 7, 9)
    n = int(np.prod(shape))

    def aligned_and_offset(values):
        with be.device, be.stream:
            aligned = be.from_host(values, dtype=be.dtype)
            flat = be.empty((n + 1,))
            flat[1:] = aligned.ravel()
            offset = flat[1:].reshape(shape)
        assert aligned.data.ptr % 16 == 0 and offset.data.ptr % 16 != 0
        return aligned, offset

    def outputs():
        return aligned_and_offset(np.full(shape, np.nan))

    (x, x_off), (dy, dy_off), (b, b_off) = (aligned_and_offset(rng.standard_normal(shape)) for _ in range(3))
    c = shape[-1] if layout == "NHWC" else shape[1]
    gamma, beta = be.from_host(rng.uniform(0.5, 1.5, c).astype(np.float32)), be.from_host(rng.standard_normal(c).astype(np.float32))
    mean, var = be.from_host(rng.standard_normal(c).astype(np.float32) * 0.1), be.from_host(rng.uniform(0.5, 2, c).astype(np.float32))
    results = {}
    for name, run in {
        "relu_forward": lambda X, DY, B, Y: be.relu_forward(X, Y),
        "relu_backward": lambda X, DY, B, Y: be.relu_backward(DY, X, Y),
        "relu_backward_add": lambda X, DY, B, Y: be.relu_backward_add(DY, X, B, Y),
        "add": lambda X, DY, B, Y: be.add(X, B, Y),
        "bn_infer_relu": lambda X, DY, B, Y: be.batchnorm_infer_forward(X, gamma, beta, mean, var, 1e-5, Y, relu=True),
        "bn_infer_residual_relu": lambda X, DY, B, Y: be.batchnorm_infer_forward(X, gamma, beta, mean, var, 1e-5, Y,
                                                                                 relu=True, residual=B),
        "bn_backward_relu": lambda X, DY, B, Y: be.batchnorm_backward(
            DY, X, gamma, mean, var, Y, be.empty((c,), "float32"), be.empty((c,), "float32"), y=B),
    }.items():
        y, y_off = outputs()
        run(x, dy, b, y)
        run(x_off, dy_off, b_off, y_off)
        results[name] = (be.to_host(y), be.to_host(y_off))
    for name, (packed, elementwise) in results.items():
        np.testing.assert_array_equal(packed, elementwise, err_msg=name)
        assert np.all(np.isfinite(packed.astype(np.float32))), name


# --------------------------------------------------------------------------- augmentation


@params()
@pytest.mark.parametrize("distort", [False, True], ids=["plain", "distort"])
def test_augment_batch_is_bit_identical_to_numpy(layout, dtype, distort):
    """Every x / 128 - 1 is exact in float32 and bf16, and the draws are the same uint32 hash: equal."""
    be = backend(layout, dtype)
    rng = np.random.default_rng(14)
    images_host = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    labels_host = rng.integers(0, 10, 50).astype(np.int32)
    indices_host = rng.integers(0, 50, 17).astype(np.int64)         # repeats included
    seed, step = 2 ** 33 + 12345, 987_654                             # > 32 bits: masked like sampling.py
    images, labels, indices = be.from_host(images_host), be.from_host(labels_host), be.from_host(indices_host)
    x = be.empty(be.activation_shape(17, 3, 32, 32))
    labels_out = be.empty((17,), dtype=np.int32)
    with fast_path(be, kernels=("augment_batch",)):
        be.augment_batch(images, labels, indices, seed, step, distort, x, labels_out)
    ref = NumpyBackend(layout, "float32")
    expected = np.empty(ref.activation_shape(17, 3, 32, 32), dtype=np.float32)
    expected_labels = np.empty(17, dtype=np.int32)
    ref.augment_batch(images_host, labels_host, indices_host, seed, step, distort, expected, expected_labels)
    np.testing.assert_array_equal(be.to_host(x).astype(np.float32), expected)
    np.testing.assert_array_equal(be.to_host(labels_out), expected_labels)


@params()
def test_augment_train_batch_reads_the_device_counter_like_numpy(layout, dtype):
    """The training entry point: the step from the device counter, the rows from the epoch's order."""
    be = backend(layout, dtype)
    rng = np.random.default_rng(15)
    images_host = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels_host = rng.integers(0, 10, 40).astype(np.int32)
    order_host = rng.permutation(40).astype(np.int64)
    counter_host = np.array(2 ** 32 + 7, dtype=np.int64)              # masked to 32 bits for the draws
    images, labels, order = be.from_host(images_host), be.from_host(labels_host), be.from_host(order_host)
    counter = be.from_host(counter_host)
    x = be.empty(be.activation_shape(6, 3, 32, 32))
    labels_out = be.empty((6,), dtype=np.int32)
    with fast_path(be, kernels=("augment_train_batch", "advance_step")):
        be.augment_train_batch(images, labels, order, counter, 3, 12, 6, 9, True, x, labels_out)
        be.advance_step(counter)
    ref = NumpyBackend(layout, "float32")
    expected = np.empty(ref.activation_shape(6, 3, 32, 32), dtype=np.float32)
    expected_labels = np.empty(6, dtype=np.int32)
    ref.augment_train_batch(images_host, labels_host, order_host, counter_host, 3, 12, 6, 9, True, expected,
                            expected_labels)
    np.testing.assert_array_equal(be.to_host(x).astype(np.float32), expected)
    np.testing.assert_array_equal(be.to_host(labels_out), expected_labels)
    assert int(be.to_host(counter)) == 2 ** 32 + 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distort", [False, True], ids=["plain", "distort"])
def test_augmentation_writes_a_padded_input(dtype, distort):
    """--padded-input (NHWC): both entry points write the reference's 3 channels, then zeros up to a 16-byte
    pixel, into input_shape's buffer; in NCHW the option changes nothing."""
    assert make_backend("NCHW", dtype, padded_input=True).input_shape(7, 3, 32, 32) == (7, 3, 32, 32)
    be = make_backend("NHWC", dtype, padded_input=True)
    rng = np.random.default_rng(16)
    images_host = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    labels_host = rng.integers(0, 10, 30).astype(np.int32)
    order_host = rng.permutation(30).astype(np.int64)
    counter_host = np.array(5, dtype=np.int64)
    images, labels, order = be.from_host(images_host), be.from_host(labels_host), be.from_host(order_host)
    ref = NumpyBackend("NHWC", "float32")
    channels = 8 if dtype == "bfloat16" else 4
    x = be.from_host(np.full((7, 32, 32, channels), np.nan, dtype=np.float32), dtype=be.dtype)
    assert x.shape == be.input_shape(7, 3, 32, 32)
    labels_out = be.empty((7,), dtype=np.int32)
    expected = np.empty((7, 32, 32, 3), dtype=np.float32)
    expected_labels = np.empty(7, dtype=np.int32)
    be.augment_train_batch(images, labels, order, be.from_host(counter_host), 4, 7, 0, 9, distort, x, labels_out)
    ref.augment_train_batch(images_host, labels_host, order_host, counter_host, 4, 7, 0, 9, distort, expected,
                            expected_labels)
    np.testing.assert_array_equal(be.to_host(x)[..., :3].astype(np.float32), expected)
    np.testing.assert_array_equal(be.to_host(x)[..., 3:].astype(np.float32), 0.0)
    np.testing.assert_array_equal(be.to_host(labels_out), expected_labels)
    ref.augment_batch(images_host, labels_host, order_host[:7], 9, 5, distort, expected, expected_labels)
    # into an aligned buffer (each pixel one 16-byte store) and into a view one element off (element by element)
    unaligned = be.empty((x.size + 1,))[1:].reshape(x.shape)
    for out in (x, unaligned):
        be.augment_batch(images, labels, order[:7], 9, 5, distort, out, labels_out)
        np.testing.assert_array_equal(be.to_host(out)[..., :3].astype(np.float32), expected)
        np.testing.assert_array_equal(be.to_host(out)[..., 3:].astype(np.float32), 0.0)


# --------------------------------------------------------------------------- whole models


def _model_pair(be, depth, x_nchw_host, labels_host, share_masks=False):
    """A ResNet on the GPU and a float64 NumPy copy with the same canonical weights; one forward_backward each
    (share_masks: the reference's backward with the GPU's relu masks, tests/relu_masks.py).

    Returns (gpu loss, ref loss, gpu grads, ref grads, gpu BN state, ref BN state), canonical NumPy arrays.
    """
    from cupynet.model import ResNet
    with be.device, be.stream:      # ParamStore's own array operations run on the backend's stream
        model = ResNet(be, depth, "v1")
        model.init(np.random.default_rng(0))
        x = be.from_host(to_layout(be.layout, x_nchw_host), dtype=be.dtype)
        loss = float(be.to_host(model.forward_backward(x, be.from_host(labels_host))))
        weights, grads = model.params.state_dict(), model.params.state_dict(flat=model.params.grad_flat)
        state = model.state.state_dict()
    ref_be = NumpyBackend(be.layout, "float64")
    ref = ResNet(ref_be, depth, "v1")
    ref.init(np.random.default_rng(0))            # same init; the weights are loaded next anyway
    ref.params.load_state_dict(weights)
    ref_x = to_layout(be.layout, x_nchw_host.astype(be.dtype).astype(np.float64))
    ref_loss = float(ref.forward_loss(ref_x, labels_host))
    if share_masks:
        share_relu_masks(model, ref, be)
    ref.backward()
    return (loss, ref_loss, grads, ref.params.state_dict(flat=ref.params.grad_flat), state, ref.state.state_dict())


@pytest.mark.parametrize("layout,option", [("NCHW", None), ("NHWC", None), ("NHWC", "pixel_pairs"),
                                           ("NHWC", "wgrad_pixel_pairs"), ("NCHW", "residual_grad_sums"),
                                           ("NHWC", "residual_grad_sums")],
                         ids=lambda v: v or "")
def test_resnet20_loss_and_every_gradient_match_numpy_at_strict_fp32(layout, option):
    """Tolerances measured on the CPU analogue (NumpyBackend float32 vs float64, same model and data):
    loss 1.5e-7, worst gradient 4.7e-6 norm-relative, BN state 5e-7. We allow 1e-5 / 1e-4 / 1e-5:
    ~20x the float32-only difference, while a TF32 convolution (~3e-4 each) would not pass. The reference's
    backward takes the GPU's relu masks: this data has a pre-relu value 1.9e-6 from 0 (stage 2's last block
    output; 1.1e-6 of its rms), which the H100's NCHW forward put below 0 and the reference above.
    With --conv-pixel-pairs, stage 1's convolutions (16 channels at 16 x 16) run on pixel pairs (with
    --wgrad-pixel-pairs, their weight gradients); with
    --residual-grad-sums, 7 blocks' input gradients also give the BatchNorm before them its sums."""
    be = make_backend(layout, "float32", **({option: True} if option else {}))
    rng = np.random.default_rng(15)
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 10, 8).astype(np.int32)
    launches = be.kernels.launches.copy()
    loss, ref_loss, grads, ref_grads, state, ref_state = _model_pair(be, 20, x, labels, share_masks=True)
    assert be.conv.executions["fprop"] > 0 and be.kernels.launches["bn_grad"] > launches["bn_grad"]
    # stage 1's 6 convolutions, built by each forward, taken by each data gradient
    assert be.kernels.launches["pixel_pair_weights"] == (6 if option == "pixel_pairs" else 0)
    assert be.kernels.launches["pixel_pair_weight_gradient"] == (6 if option == "wgrad_pixel_pairs" else 0)
    # the blocks with an identity shortcut: stage 1's 3, and 2 in each later stage
    assert be.kernels.launches["relu_backward_add_bn_grad"] == (7 if option == "residual_grad_sums" else 0)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, expected in ref_grads.items():
        error = np.linalg.norm(grads[name] - expected)
        assert error <= 1e-4 * np.linalg.norm(expected) + 1e-9, f"{name}: norm error {error:.3g}"
    for name, expected in ref_state.items():
        assert_close(state[name], expected, 1e-5, scale=rms(expected), what=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resnet20_in_bfloat16_tracks_the_float64_oracle(layout):
    """bf16 rounds every activation, gradient and weight copy to 8 significant bits (2^-9 relative), and
    BatchNorm's parameter gradients are sums over m = N*H*W (up to 2048 here) of randomly signed terms,
    which cancel: their relative error is ~2^-9 * sqrt(m) per rounding stage, tens of percent in the
    first stage. Measured on the CPU for this model and batch, a NumPy twin that rounds to bf16 exactly
    where the GPU backend does (same test, float64 otherwise) is off the float64 oracle by 7e-4 in the
    loss, per-tensor gradient cosine >= 0.88 and whole-gradient cosine 0.97. So we require the loss to
    5e-3, every tensor's cosine > 0.75 and the whole gradient's > 0.93: inherent bf16 noise passes, while
    a wrong sign, scale, layout or missing term (cosine ~0 or a loss off by O(1)) does not."""
    be = make_backend(layout, "bfloat16")
    rng = np.random.default_rng(16)
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 10, 8).astype(np.int32)
    loss, ref_loss, grads, ref_grads, _, _ = _model_pair(be, 20, x, labels)
    assert loss == pytest.approx(ref_loss, rel=5e-3)
    for name, expected in ref_grads.items():
        assert cosine(grads[name], expected) > 0.75, f"{name}: cosine {cosine(grads[name], expected):.4f}"
    everything = [np.concatenate([g[name].ravel() for name in ref_grads]) for g in (grads, ref_grads)]
    assert cosine(*everything) > 0.93


def cosine(a, b):
    return float(np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def test_twenty_trainer_steps_follow_the_cpu_loss_curve():
    """Same seed, same data, same initial weights, same batches (the augment kernel is bit-exact).

    Rounding differences grow chaotically through SGD, so no first-principles bound exists. Measured on
    the CPU with this exact configuration, NumpyBackend float32 vs float64 differ by <= 3e-7 on the
    first step and by <= 3.5e-3 relative on any of the 20 steps. We require 1e-5 on the first step
    (identical weights and batch: rounding only) and 2e-2 on every step (~5x the measured divergence);
    a wrong batch, update or BatchNorm moves the curve by far more.
    """
    from cupynet.config import TrainConfig
    from cupynet.data import builtin_sample_dir, load_cifar10
    from cupynet.trainer import Trainer
    dataset = load_cifar10(builtin_sample_dir())
    config = TrainConfig(num_layers=8, train_batch_size=32, bn_decay=0.9, distortion=True, seed=3,
                         lr_values=(0.02, 0.002, 0.0002, 0.00004), cuda_graph="off")   # eager: launches counted
    cpu = Trainer(config, dataset, NumpyBackend("NHWC", "float32"))
    be = make_backend("NHWC", "float32")
    with be.device, be.stream:
        gpu = Trainer(config, dataset, be)
        cpu_curve, gpu_curve = [], []
        for _ in range(20):
            cpu.train_step()
            gpu.train_step()
            cpu_curve.append(cpu.take_mean_loss())
            gpu_curve.append(gpu.take_mean_loss())
    assert be.kernels.launches["augment_train_batch"] == 20 and be.kernels.launches["sgd_momentum"] == 20
    assert gpu_curve[0] == pytest.approx(cpu_curve[0], rel=1e-5)
    np.testing.assert_allclose(gpu_curve, cpu_curve, rtol=2e-2)
