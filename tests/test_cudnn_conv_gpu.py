"""GPU parity tests of the cuDNN convolution engine (cupynet/backends/cudnn_conv.py) against the NumPy reference.

    python -m pytest -m gpu tests/test_cudnn_conv_gpu.py -q -ra      # on a machine with a GPU

Every test is marked `gpu`; without CuPy or a CUDA device the whole module is skipped with the reason
printed (`-ra`). A missing cuDNN Frontend on a GPU machine is a failure, not a skip: the GPU backend
cannot train without it.

What is compared: fprop, dgrad and wgrad, NCHW and NHWC, 3x3 and 1x1, stride 1 and 2, odd sizes, in three
precisions, against `NumpyBackend(layout, "float64")` run on exactly the values the GPU saw (bf16 inputs
are rounded on the host first). Outputs start as NaN so an element cuDNN never wrote fails the test.

Tolerances come from the dtype (see `RTOL`). They bound |gpu - ref| by rtol * conv(|a|, |b|), the sum of
absolute products that the classic dot-product error bound |fl(sum) - sum| <= gamma_n * sum|a_i b_i|
scales with; dividing by |ref| instead would be meaningless where the sum cancels to ~0.
"""
import json
import zlib

import numpy as np
import pytest

from cupynet.backends.conv_autotune import KEY_FIELDS
from cupynet.backends.numpy_backend import NumpyBackend

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (GPU tests need CuPy and a CUDA device)")


def _device_count():
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:       # no driver / no device
        return 0


if _device_count() == 0:
    pytest.skip("no CUDA device visible to CuPy", allow_module_level=True)

from cupynet.backends.cudnn_conv import CudnnConv   # noqa: E402  (after the skip: needs the GPU stack)

# mode -> (io_dtype, strict_fp32)
MODES = {"strict": ("float32", True), "tf32": ("float32", False), "bf16": ("bfloat16", False)}

# Relative to conv(|a|, |b|):
#  strict: fp32 accumulation, u = 2^-24 = 6e-8. The worst case gamma_n = n*u exceeds 1e-5 only for the
#          longest reductions (wgrad: n = N*Ho*Wo = 1024 here); with random-sign data the error grows
#          like sqrt(n)*u (~2e-6), and TF32 would show ~1e-4, so 1e-5 both holds and proves strictness.
#  tf32:   inputs rounded to 10 mantissa bits (u = 2^-11 rounding, 2^-10 if truncating); a product of two
#          rounded inputs is off by <= 2 * 2^-10 ~ 2e-3 of itself, so <= 2e-3 of sum|a||b|.
#  bf16:   inputs exact (pre-rounded), fp32 accumulation, then the output is rounded to bf16: 2^-8 = 4e-3
#          of |y| <= sum|a||b|; 1e-2 leaves room for engines that round a split-K partial sum to bf16.
RTOL = {"strict": 1e-5, "tf32": 2e-3, "bf16": 1e-2}
# The timer tests' hold of the stream, whatever the timer asks for: far longer than a loaded host's scheduling noise
# (an emulated GPU's timings are the host's), so that a timer that counted the hold would read 53 ms or more, and one
# that did not reads the 3 ms of work plus that noise.
TEST_HOLD_S = 0.05

# (N, C, H, W, K, ksize, stride): pad = ksize // 2 as in the ResNets.
CASES = {
    "first-conv-3ch": (4, 3, 16, 16, 16, 3, 1),
    "block-3x3": (4, 16, 16, 16, 16, 3, 1),
    "down-3x3-s2": (4, 16, 16, 16, 32, 3, 2),
    "proj-1x1-s2": (4, 16, 16, 16, 32, 1, 2),
    "pointwise-1x1": (2, 8, 8, 8, 8, 1, 1),
    "odd-3x3-s2": (3, 5, 7, 9, 6, 3, 2),
    "odd-3x3-s1": (3, 5, 7, 9, 6, 3, 1),
}

# Every case in strict fp32 (the parity that matters); a representative subset in TF32 and bf16, to keep
# the number of graph builds (each tens of ms) and the device time small.
PARITY = ([("strict", name) for name in CASES]
          + [("tf32", "block-3x3"), ("tf32", "down-3x3-s2")]
          + [("bf16", name) for name in ("first-conv-3ch", "down-3x3-s2", "proj-1x1-s2", "odd-3x3-s2")])


# --------------------------------------------------------------------------- bf16 on the host


def round_to_bf16_bits(values):
    """float -> bf16 bit patterns (uint16), round to nearest even, as the GPU rounds."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding = 0x7FFF + ((bits >> 16) & 1)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_float64(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


class Precision:
    """How one mode stores values on the device and reads them back."""

    def __init__(self, mode):
        self.mode = mode
        self.io_dtype, self.strict = MODES[mode]

    def to_device(self, values):
        """Host float values -> (device array, the float64 values the device really holds)."""
        if self.io_dtype == "bfloat16":
            bits = round_to_bf16_bits(values)
            return cupy.asarray(bits), bf16_bits_to_float64(bits)
        stored = np.asarray(values, dtype=np.float32)
        return cupy.asarray(stored), stored.astype(np.float64)

    def nan_array(self, shape):
        """An output buffer full of NaN, so unwritten elements cannot pass."""
        if self.io_dtype == "bfloat16":
            return cupy.full(shape, 0x7FC0, dtype=cupy.uint16)
        return cupy.full(shape, np.nan, dtype=cupy.float32)

    def to_host(self, array):
        host = cupy.asnumpy(array)
        if self.io_dtype == "bfloat16":
            return bf16_bits_to_float64(host)
        return host.astype(np.float64)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def handle():
    """One cuDNN handle bound to CuPy's current stream, for the whole module."""
    import cudnn
    h = cudnn.create_handle()
    cudnn.set_stream(handle=h, stream=cupy.cuda.get_current_stream().ptr)
    yield h
    cupy.cuda.get_current_stream().synchronize()
    cudnn.destroy_handle(h)


@pytest.fixture(scope="module")
def engines(handle):
    """CudnnConv per (layout, mode), shared by the parity tests (each case builds its own graphs)."""
    cache = {}

    def get(layout, mode):
        if (layout, mode) not in cache:
            io_dtype, strict = MODES[mode]
            cache[(layout, mode)] = CudnnConv(handle, layout, io_dtype, strict_fp32=strict)
        return cache[(layout, mode)]

    return get


def out_size(size, ksize, stride):
    return (size + 2 * (ksize // 2) - ksize) // stride + 1


def assert_close(name, got, ref, abs_ref, rtol):
    """|got - ref| <= rtol * conv(|a|, |b|) everywhere (plus a denormal-sized floor); names the worst element."""
    assert np.all(np.isfinite(got)), f"{name}: NaN/inf in the output (elements not written?)"
    excess = np.abs(got - ref) - (rtol * abs_ref + 1e-30)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (f"{name}: |gpu - ref| = {abs(got[worst] - ref[worst]):.3g} at {worst} exceeds "
                                f"{rtol} * {abs_ref[worst]:.3g} (gpu {got[worst]:.6g}, ref {ref[worst]:.6g})")


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("mode,case", PARITY, ids=[f"{m}-{c}" for m, c in PARITY])
def test_conv_matches_numpy_reference(engines, layout, mode, case):
    n, c, h, w, k, ksize, stride = CASES[case]
    pad = ksize // 2
    ho, wo = out_size(h, ksize, stride), out_size(w, ksize, stride)
    prec = Precision(mode)
    ref = NumpyBackend(layout=layout, dtype="float64")
    conv = engines(layout, mode)
    rng = np.random.default_rng(zlib.crc32(f"{layout}-{mode}-{case}".encode()))   # stable across runs

    x, x64 = prec.to_device(rng.standard_normal(ref.activation_shape(n, c, h, w)))
    wt, w64 = prec.to_device(rng.standard_normal(ref.conv_weight_shape(k, c, ksize, ksize)))
    dy, dy64 = prec.to_device(rng.standard_normal(ref.activation_shape(n, k, ho, wo)))
    y = prec.nan_array(ref.activation_shape(n, k, ho, wo))
    dx = prec.nan_array(ref.activation_shape(n, c, h, w))
    dw = prec.nan_array(ref.conv_weight_shape(k, c, ksize, ksize))

    conv.forward(x, wt, stride, pad, y)
    if c > 3:
        conv.backward_data(dy, wt, stride, pad, dx)
    conv.backward_filter(x, dy, stride, pad, dw)

    rtol = RTOL[mode]
    y_ref = ref.conv2d_forward(x64, w64, stride, pad, np.empty(y.shape))
    y_abs = ref.conv2d_forward(np.abs(x64), np.abs(w64), stride, pad, np.empty(y.shape))
    assert_close("fprop", prec.to_host(y), y_ref, y_abs, rtol)

    if c > 3:       # the 3-channel stem conv never needs dgrad (cupynet/model.py: input_grad=False)
        dx_ref = ref.conv2d_backward_data(dy64, w64, stride, pad, np.empty(dx.shape))
        dx_abs = ref.conv2d_backward_data(np.abs(dy64), np.abs(w64), stride, pad, np.empty(dx.shape))
        assert_close("dgrad", prec.to_host(dx), dx_ref, dx_abs, rtol)

    dw_ref = ref.conv2d_backward_filter(x64, dy64, stride, pad, np.empty(dw.shape))
    dw_abs = ref.conv2d_backward_filter(np.abs(x64), np.abs(dy64), stride, pad, np.empty(dw.shape))
    assert_close("wgrad", prec.to_host(dw), dw_ref, dw_abs, rtol)


# --------------------------------------------------------------------------- cache, counters, guards


def _block_arrays(layout, prec, n=4, c=8, hw=8, k=8):
    """x, w, dy and outputs of a 3x3 stride-1 conv, on the device."""
    ref = NumpyBackend(layout=layout, dtype="float64")
    rng = np.random.default_rng(1)
    x, _ = prec.to_device(rng.standard_normal(ref.activation_shape(n, c, hw, hw)))
    wt, _ = prec.to_device(rng.standard_normal(ref.conv_weight_shape(k, c, 3, 3)))
    dy, _ = prec.to_device(rng.standard_normal(ref.activation_shape(n, k, hw, hw)))
    outs = (prec.nan_array(ref.activation_shape(n, k, hw, hw)), prec.nan_array(ref.activation_shape(n, c, hw, hw)),
            prec.nan_array(ref.conv_weight_shape(k, c, 3, 3)))
    return x, wt, dy, outs


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_graphs_are_built_once_per_shape_and_reused(handle, layout):
    prec = Precision("bf16")
    conv = CudnnConv(handle, layout, prec.io_dtype)
    x, wt, dy, (y, dx, dw) = _block_arrays(layout, prec)

    conv.forward(x, wt, 1, 1, y)
    conv.backward_data(dy, wt, 1, 1, dx)
    conv.backward_filter(x, dy, 1, 1, dw)
    assert conv.builds == {"fprop": 1, "dgrad": 1, "wgrad": 1}
    workspace = (conv.workspace_ptr, conv.workspace_bytes)

    # Same shapes, new buffers: no build, no workspace reallocation, one more execute each.
    x2, wt2, dy2, (y2, dx2, dw2) = _block_arrays(layout, prec)
    conv.forward(x2, wt2, 1, 1, y2)
    conv.backward_data(dy2, wt2, 1, 1, dx2)
    conv.backward_filter(x2, dy2, 1, 1, dw2)
    assert conv.graphs_built == 3
    assert (conv.workspace_ptr, conv.workspace_bytes) == workspace
    assert conv.executions == {"fprop": 2, "dgrad": 2, "wgrad": 2}

    # A new batch size is a new key.
    x3, wt3, dy3, (y3, _, _) = _block_arrays(layout, prec, n=2)
    conv.forward(x3, wt3, 1, 1, y3)
    assert conv.builds["fprop"] == 2
    assert conv.executions["fprop"] == 3
    cupy.cuda.get_current_stream().synchronize()
    assert np.all(np.isfinite(prec.to_host(y3)))


def test_wrong_output_shape_is_rejected_before_cudnn_runs(handle):
    prec = Precision("strict")
    conv = CudnnConv(handle, "NHWC", prec.io_dtype, strict_fp32=True)
    x, wt, _, (y, _, _) = _block_arrays("NHWC", prec)
    wrong = prec.nan_array(y.shape[:-1] + (y.shape[-1] + 1,))
    with pytest.raises(ValueError, match="shape"):
        conv.forward(x, wt, 1, 1, wrong)
    assert conv.executions["fprop"] == 0


def test_a_pointer_off_the_declared_alignment_is_rejected_before_cudnn_runs(handle):
    """Frontend tensors are declared 16-byte aligned: an input that starts 4 bytes past a boundary (a view
    one float into a buffer) is refused with the reason, instead of reaching an engine that assumes it."""
    prec = Precision("strict")
    conv = CudnnConv(handle, "NHWC", prec.io_dtype, strict_fp32=True)
    x, wt, _, (y, _, _) = _block_arrays("NHWC", prec)
    shifted = cupy.empty((x.size + 1,), dtype=x.dtype)[1:].reshape(x.shape)
    shifted[...] = x
    with pytest.raises(ValueError, match="16-byte"):
        conv.forward(shifted, wt, 1, 1, y)
    assert conv.executions["fprop"] == 0
    conv.forward(x, wt, 1, 1, y)                       # the aligned original runs
    assert conv.executions["fprop"] == 1


def test_frozen_engine_refuses_to_build_inside_a_step(handle):
    prec = Precision("strict")
    conv = CudnnConv(handle, "NCHW", prec.io_dtype, strict_fp32=True)
    x, wt, _, (y, _, _) = _block_arrays("NCHW", prec)
    conv.forward(x, wt, 1, 1, y)
    conv.freeze()
    conv.forward(x, wt, 1, 1, y)                       # cached: fine
    x2, wt2, _, (y2, _, _) = _block_arrays("NCHW", prec, n=2)
    with pytest.raises(RuntimeError, match="warm-up"):
        conv.forward(x2, wt2, 1, 1, y2)


def test_bf16_accepts_uint16_storage_and_cupy_bfloat16_alike(handle):
    """The cuDNN type comes from io_dtype, so both storages of the same bits give the same result."""
    try:
        import ml_dtypes
        probe = cupy.zeros(1, dtype=ml_dtypes.bfloat16)
    except Exception as error:      # no ml_dtypes, or this CuPy has no bfloat16 dtype
        pytest.skip(f"CuPy has no bfloat16 dtype here ({type(error).__name__})")
    del probe
    prec = Precision("bf16")
    conv = CudnnConv(handle, "NHWC", "bfloat16")
    x, wt, _, (y_bits, _, _) = _block_arrays("NHWC", prec)
    conv.forward(x, wt, 1, 1, y_bits)
    y_typed = cupy.zeros(y_bits.shape, dtype=ml_dtypes.bfloat16)
    conv.forward(x.view(ml_dtypes.bfloat16), wt.view(ml_dtypes.bfloat16), 1, 1, y_typed)
    assert conv.builds["fprop"] == 1
    np.testing.assert_array_equal(cupy.asnumpy(y_typed.view(cupy.uint16)), cupy.asnumpy(y_bits))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_autotuned_engines_agree_with_the_heuristic_choice_and_are_shared(handle, layout):
    """Autotuning times several built candidates, executes the fastest, and a second engine in the process
    reuses the same choice (so replicas stay bit-identical). Strict fp32: every engine is within RTOL."""
    from cupynet.backends import conv_autotune
    conv_autotune.forget_choices()
    prec = Precision("strict")
    plain = CudnnConv(handle, layout, prec.io_dtype, strict_fp32=True)
    tuned = CudnnConv(handle, layout, prec.io_dtype, strict_fp32=True, autotune=True)
    again = CudnnConv(handle, layout, prec.io_dtype, strict_fp32=True, autotune=True)
    x, wt, dy, (y, dx, dw) = _block_arrays(layout, prec)
    _, _, _, (y_tuned, dx_tuned, dw_tuned) = _block_arrays(layout, prec)
    _, _, _, (y_again, _, _) = _block_arrays(layout, prec)
    plain.forward(x, wt, 1, 1, y)
    plain.backward_data(dy, wt, 1, 1, dx)
    plain.backward_filter(x, dy, 1, 1, dw)
    tuned.forward(x, wt, 1, 1, y_tuned)
    tuned.backward_data(dy, wt, 1, 1, dx_tuned)
    tuned.backward_filter(x, dy, 1, 1, dw_tuned)
    again.forward(x, wt, 1, 1, y_again)
    entries = list(tuned._graphs.values())
    assert all(entry.candidates and entry.chosen is not None for entry in entries)
    assert max(len(entry.candidates) for entry in entries) > 1          # there was something to choose from
    assert [e.chosen.choice for e in again._graphs.values()] == [entries[0].chosen.choice]
    cupy.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(prec.to_host(y_again), prec.to_host(y_tuned))
    # Two strict fp32 engines differ only in summation order: each is within RTOL of sum|a||b| of the exact
    # result; for these 72-term (fprop/dgrad) and 256-term (wgrad) sums of unit normals, sum|a||b| stays
    # below ~10x the largest |output|, hence 10 * RTOL of the largest output for their difference.
    for got, ref in ((y_tuned, y), (dx_tuned, dx), (dw_tuned, dw)):
        ref_host = prec.to_host(ref)
        scale = np.max(np.abs(ref_host))
        np.testing.assert_allclose(prec.to_host(got), ref_host, rtol=0, atol=RTOL["strict"] * 10 * scale)


def test_engine_choices_travel_with_a_checkpoint(handle):
    """export -> (new process: forgotten) -> import gives the same engines; another environment adopts none."""
    from cupynet.backends import conv_autotune
    conv_autotune.forget_choices()
    prec = Precision("strict")
    conv = CudnnConv(handle, "NHWC", prec.io_dtype, strict_fp32=True, autotune=True)
    x, wt, _, (y, _, _) = _block_arrays("NHWC", prec)
    conv.forward(x, wt, 1, 1, y)
    device = cupy.cuda.Device().id
    saved = json.loads(json.dumps(conv_autotune.export_choices(device)))     # as a checkpoint stores it
    assert len(saved["choices"]) == 1
    conv_autotune.forget_choices()
    assert conv_autotune.import_choices(saved, device) == 1
    assert json.loads(json.dumps(conv_autotune.export_choices(device))) == saved
    assert (device, tuple(saved["choices"][0][0])) in conv_autotune._CHOICES      # the key types survived JSON
    other = dict(saved, environment=dict(saved["environment"], cudnn=1))
    conv_autotune.forget_choices()
    assert conv_autotune.import_choices(other, device) == 0 and conv_autotune.export_choices(device)["choices"] == []


def _buildable_engines(conv, op, deselect_nondeterministic, deselect=()):
    """Names of the engines of a block conv's `op` graph that build, planned from CudnnConv.describe_graph with
    or without the NONDETERMINISTIC ones (and those of `deselect`) deselected; run-time compiled ones (seconds
    to build) only until one engine has built, as the autotuner takes them."""
    import cudnn
    graph, _, _ = conv.describe_graph(op, (4, 8, 8, 8, 8, 3, 3), 1, 1)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    notes = list(deselect) + ([cudnn.numerical_note.NONDETERMINISTIC] if deselect_nondeterministic else [])
    if notes:
        graph.deselect_numeric_notes(notes)
    graph.check_support()
    names = set()
    for index in range(graph.get_execution_plan_count()):
        # as conv_autotune.build_candidates: run-time compiled engines only while nothing else has built
        if names and cudnn.behavior_note.RUNTIME_COMPILATION in list(graph.get_behavior_notes_for_plan_at_index(index)):
            continue
        try:
            graph.build_plan_at_index(index)
        except (RuntimeError, ValueError, cudnn.cudnnGraphNotSupportedError):
            continue
        names.add(graph.get_plan_name_at_index(index))
    return names


def test_nondeterministic_engines_are_candidates_only_when_allowed(handle, monkeypatch):
    """deterministic=False lets the autotuner time the engines cuDNN notes NONDETERMINISTIC as well (exactly
    those, where cuDNN offers any for the shape), keeps its choices apart from the deterministic ones (the
    cache key says which), and the weight gradient stays within the precision's tolerance."""
    from cupynet.backends import conv_autotune
    conv_autotune.forget_choices()
    monkeypatch.setattr(conv_autotune, "MAX_CANDIDATES", 1000)     # every candidate: the sets are comparable
    prec = Precision("tf32")
    strict = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True)
    free = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True, deterministic=False)
    x, wt, dy, (_, _, dw) = _block_arrays("NHWC", prec)
    _, _, _, (_, _, dw_free) = _block_arrays("NHWC", prec)
    strict.backward_filter(x, dy, 1, 1, dw)
    free.backward_filter(x, dy, 1, 1, dw_free)
    (entry,), (free_entry,) = strict._graphs.values(), free._graphs.values()
    deterministic = KEY_FIELDS.index("deterministic")
    assert entry.key[deterministic] is True and free_entry.key[deterministic] is False
    assert [entry.key[:deterministic], entry.key[deterministic + 1:]] == [free_entry.key[:deterministic],
                                                                        free_entry.key[deterministic + 1:]]
    timed = {candidate.name for candidate in entry.candidates}
    free_timed = {candidate.name for candidate in free_entry.candidates}
    nondeterministic = _buildable_engines(free, "wgrad", False) - _buildable_engines(free, "wgrad", True)
    assert not timed & nondeterministic and free_timed - timed <= nondeterministic
    if nondeterministic:          # cuDNN offers some for this shape: the autotuner times them
        assert free_timed & nondeterministic
    cupy.cuda.get_current_stream().synchronize()
    ref = prec.to_host(dw)
    np.testing.assert_allclose(prec.to_host(dw_free), ref, rtol=0, atol=RTOL["tf32"] * 10 * np.max(np.abs(ref)))


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_engines_that_reduce_in_reduced_precision_are_never_candidates(handle, monkeypatch, precision):
    """cupynet promises float32 accumulation in every precision: engines cuDNN notes REDUCED_PRECISION_REDUCTION
    (sums kept in the inputs' precision) are never timed or run, even when nondeterministic engines are
    allowed and every candidate is timed; every other engine still is."""
    import cudnn
    from cupynet.backends import conv_autotune
    conv_autotune.forget_choices()
    monkeypatch.setattr(conv_autotune, "MAX_CANDIDATES", 1000)
    prec = Precision(precision)
    conv = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True, deterministic=False)
    x, wt, dy, (_, _, dw) = _block_arrays("NHWC", prec)
    conv.backward_filter(x, dy, 1, 1, dw)
    (entry,) = conv._graphs.values()
    timed = {candidate.name for candidate in entry.candidates}
    reduced = _buildable_engines(conv, "wgrad", False) - _buildable_engines(
        conv, "wgrad", False, deselect=[cudnn.numerical_note.REDUCED_PRECISION_REDUCTION])
    assert not timed & reduced, timed & reduced
    assert timed == _buildable_engines(conv, "wgrad", False) - reduced
    cupy.cuda.get_current_stream().synchronize()


def test_timed_work_is_measured_behind_a_hold_of_the_stream():
    """gpu_milliseconds (the autotuner's timer) enqueues the timed work behind CupyBackend.hold_stream: the
    events around the work measure the work alone (here a 3 ms hold standing for it), not the hold before
    it, and a hold that was too short is retried longer rather than timing the host."""
    from cupynet.backends.conv_autotune import HOLD_SECONDS, gpu_milliseconds
    from cupynet.backends.cupy_backend import CupyBackend
    be = CupyBackend(device_id=0, layout="NHWC", dtype="float32")
    holds = []

    def hold(seconds):
        holds.append(seconds)
        be.hold_stream(TEST_HOLD_S)

    with be.device, be.stream:
        milliseconds = gpu_milliseconds(cupy, be.stream, hold, lambda: be.hold_stream(0.003))
    assert 2.9 <= milliseconds < 3.0 + 1000 * TEST_HOLD_S / 2, milliseconds
    assert holds and holds[0] == HOLD_SECONDS


def test_work_timed_in_a_graph_is_recorded_then_timed_as_its_replay():
    """captured_milliseconds (--conv-tune-in-graph's timer) records the timed work as a CUDA graph, without
    running it, and times the graph's replay behind the hold (here a 3 ms hold standing for the work); work that
    raises while recorded ends the capture and its error goes on."""
    from cupynet.backends.conv_autotune import captured_milliseconds
    from cupynet.backends.cupy_backend import CupyBackend
    be = CupyBackend(device_id=0, layout="NHWC", dtype="float32")
    recorded = []

    def enqueue():
        recorded.append(be.stream.is_capturing())
        be.hold_stream(0.003)

    with be.device, be.stream:
        milliseconds = captured_milliseconds(cupy, be.stream, lambda seconds: be.hold_stream(TEST_HOLD_S), enqueue)
        assert recorded == [True] and not be.stream.is_capturing()
        assert 2.9 <= milliseconds < 3.0 + 1000 * TEST_HOLD_S / 2, milliseconds

        def fails():
            be.hold_stream(0.001)
            raise ValueError("an engine that cannot run here")
        with pytest.raises(ValueError, match="cannot run here"):
            captured_milliseconds(cupy, be.stream, be.hold_stream, fails)
        assert not be.stream.is_capturing()
        be.stream.synchronize()         # nothing of the failed capture is left to run


def test_engines_timed_in_a_graph_are_chosen_apart_and_compute_the_same(monkeypatch):
    """tune_in_graph=True (--conv-tune-in-graph): every candidate is timed by captured_milliseconds, the choice is
    kept under a key of its own (a choice timed eagerly is not taken for it), and the chosen engines compute
    what the heuristics' choice does. Strict fp32: every engine is within RTOL. On a stream of its own, as the
    backend's: CUDA records nothing from the legacy null stream."""
    import cudnn
    from cupynet.backends import conv_autotune
    conv_autotune.forget_choices()
    stream = cupy.cuda.Stream(non_blocking=True)
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=stream.ptr)
    timed = []

    def timer(*args):
        timed.append(1)
        return captured(*args)
    captured = conv_autotune.captured_milliseconds
    monkeypatch.setattr(conv_autotune, "captured_milliseconds", timer)
    prec = Precision("strict")
    with stream:
        eager = CudnnConv(handle, "NHWC", prec.io_dtype, strict_fp32=True, autotune=True)
        in_graph = CudnnConv(handle, "NHWC", prec.io_dtype, strict_fp32=True, autotune=True, tune_in_graph=True)
        x, wt, dy, (y, dx, dw) = _block_arrays("NHWC", prec)
        _, _, _, (y_graph, dx_graph, dw_graph) = _block_arrays("NHWC", prec)
        eager.forward(x, wt, 1, 1, y)
        eager.backward_data(dy, wt, 1, 1, dx)
        eager.backward_filter(x, dy, 1, 1, dw)
        assert not timed
        in_graph.forward(x, wt, 1, 1, y_graph)
        in_graph.backward_data(dy, wt, 1, 1, dx_graph)
        in_graph.backward_filter(x, dy, 1, 1, dw_graph)
        stream.synchronize()
    cudnn.destroy_handle(handle)
    entries = list(in_graph._graphs.values())
    assert len(timed) == sum(len(entry.candidates) for entry in entries) > 3
    in_graph_field = KEY_FIELDS.index("tune_in_graph")
    assert all(entry.key[in_graph_field] is True and entry.chosen is not None for entry in entries)
    assert all(entry.key[in_graph_field] is False for entry in eager._graphs.values())
    for got, ref in ((y_graph, y), (dx_graph, dx), (dw_graph, dw)):
        ref_host = prec.to_host(ref)
        np.testing.assert_allclose(prec.to_host(got), ref_host, rtol=0,
                                   atol=RTOL["strict"] * 10 * np.max(np.abs(ref_host)))
    conv_autotune.forget_choices()


def test_a_convolution_only_reduced_precision_engines_support_still_runs(handle, monkeypatch):
    """Should cuDNN offer nothing but engines with reduced-precision sums for some convolution, cupynet plans
    it again allowing them (a run that stops is worse than one sum in lower precision) and says so in
    `reduced_precision_graphs`, which bench/conv_engines.py reports. Emulated cuDNN only: it lets the test
    leave cuDNN nothing else to offer."""
    import cudnn
    if not hasattr(cudnn, "ENGINES"):
        pytest.skip("needs the emulated cuDNN, whose engine list a test can replace")
    reduced = [e for e in cudnn.ENGINES if cudnn.numerical_note.REDUCED_PRECISION_REDUCTION in e.numerical]
    monkeypatch.setattr(cudnn, "ENGINES", tuple(reduced))
    prec = Precision("bf16")
    conv = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True)
    x, wt, _, (y, _, _) = _block_arrays("NHWC", prec)
    conv.forward(x, wt, 1, 1, y)
    cupy.cuda.get_current_stream().synchronize()
    assert conv.reduced_precision_graphs == ["fprop N=4 C=8 H=8 W=8 K=8 3x3 stride 1 pad 1"]
    assert np.all(np.isfinite(prec.to_host(y)))


# --------------------------------------------------------------------------- split-K settings (--conv-split-k)


def _split_k(candidates):
    return [candidate for candidate in candidates if not isinstance(candidate.choice, int)]


@pytest.mark.parametrize("deterministic", [True, False])
def test_split_k_settings_are_candidates_of_weight_gradients_each_in_its_own_graph(handle, deterministic):
    """split_k=True adds split-K settings of the weight gradient's engines to its candidates (none to fprop or
    dgrad), each alone in a graph of its own, judged by its own engine's notes: with deterministic engines
    only, no NONDETERMINISTIC engine's setting is timed. (Frontend 1.22 keeps one notes list per graph that a
    second plan-creating call misaligns; the emulated cuDNN reproduces that, so settings added to the
    heuristics' graph would have been judged by another plan's notes.) Every setting is within the
    precision's tolerance of the plain result."""
    import cudnn
    from cupynet.backends import conv_autotune
    conv_autotune.forget_choices()
    prec = Precision("tf32")
    plain = CudnnConv(handle, "NHWC", prec.io_dtype)
    tuned = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True, split_k=True, deterministic=deterministic)
    x, wt, dy, (y, dx, dw) = _block_arrays("NHWC", prec)
    plain.backward_filter(x, dy, 1, 1, dw)
    _, _, _, (y_tuned, dx_tuned, dw_tuned) = _block_arrays("NHWC", prec)
    tuned.forward(x, wt, 1, 1, y_tuned)
    tuned.backward_data(dy, wt, 1, 1, dx_tuned)
    tuned.backward_filter(x, dy, 1, 1, dw_tuned)
    entries = {entry.key[0]: entry for entry in tuned._graphs.values()}
    assert not _split_k(entries["fprop"].candidates) and not _split_k(entries["dgrad"].candidates)
    assert not [name for name in tuned.split_k_counts if name.startswith("problem")], tuned.split_k_counts
    settings = _split_k(entries["wgrad"].candidates)
    assert tuned.split_k_counts["built"] == len(settings) <= tuned.split_k_counts["tried"]
    for candidate in settings:
        kind, engine, slices = candidate.choice
        assert kind == "split_k" and slices >= 2 and candidate.index == 0
        assert candidate.graph.get_execution_plan_count() == 1 and candidate.graph is not entries["wgrad"].graph
    if hasattr(cudnn, "ENGINES"):    # the emulation: one deterministic split-K engine, one with atomics
        engines = {cudnn.ENGINES[engine].name for _, engine, _ in (c.choice for c in settings)}
        assert engines == ({"split-k slices"} if deterministic else {"split-k slices", "split-k atomics"})
        assert len(settings) == (4 if deterministic else 8)     # 2-32 in 4 (both ends); 2-64 in 4, 2-32 in 4
    cupy.cuda.get_current_stream().synchronize()
    ref = prec.to_host(dw)
    tolerance = RTOL["tf32"] * 10 * np.max(np.abs(ref))
    np.testing.assert_allclose(prec.to_host(dw_tuned), ref, rtol=0, atol=tolerance)
    # every setting, executed alone: adopt it as the choice, so that a new engine builds only that one
    device = cupy.cuda.Device().id
    environment = conv_autotune.export_choices(device)["environment"]
    for candidate in settings:
        conv_autotune.forget_choices()
        saved = {"environment": environment, "choices": [[list(entries["wgrad"].key), list(candidate.choice)]]}
        assert conv_autotune.import_choices(json.loads(json.dumps(saved)), device) == 1
        alone = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True, split_k=True, deterministic=deterministic)
        _, _, _, (_, _, dw_alone) = _block_arrays("NHWC", prec)
        alone.backward_filter(x, dy, 1, 1, dw_alone)
        (entry,) = alone._graphs.values()
        assert [c.choice for c in entry.candidates] == [candidate.choice] and entry.chosen.choice == candidate.choice
        assert json.loads(json.dumps(conv_autotune.export_choices(device))) == saved
        cupy.cuda.get_current_stream().synchronize()
        np.testing.assert_allclose(prec.to_host(dw_alone), ref, rtol=0, atol=tolerance)


def test_split_k_needs_the_knob_and_keeps_its_choices_apart(handle):
    """Without split_k no split-K setting is ever built, and the cache key tells the two apart for weight
    gradients, so a choice made with split-K candidates never reaches an engine that was not asked to time
    them; the other convolutions have none, and share their choices either way."""
    from cupynet.backends import conv_autotune
    conv_autotune.forget_choices()
    prec = Precision("bf16")
    plain = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True)
    split = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True, split_k=True)
    x, wt, dy, (y, _, dw) = _block_arrays("NHWC", prec)
    for conv in (plain, split):
        conv.backward_filter(x, dy, 1, 1, dw)
        conv.forward(x, wt, 1, 1, y)
    entries = {entry.key[0]: entry for entry in plain._graphs.values()}
    split_entries = {entry.key[0]: entry for entry in split._graphs.values()}
    assert not _split_k(entries["wgrad"].candidates) and plain.split_k_counts == {}
    field = KEY_FIELDS.index("split_k")
    assert entries["wgrad"].key[field] is False and split_entries["wgrad"].key[field] is True
    assert [entries["wgrad"].key[:field], entries["wgrad"].key[field + 1:]] == [
        split_entries["wgrad"].key[:field], split_entries["wgrad"].key[field + 1:]]
    assert entries["fprop"].key == split_entries["fprop"].key and entries["fprop"].key[field] is False
    assert split.split_k_counts["tried"] >= split.split_k_counts["built"] == len(_split_k(split_entries["wgrad"].candidates))
    import cudnn
    if hasattr(cudnn, "ENGINES"):     # the emulation has a deterministic split-K engine for every weight gradient
        assert split.split_k_counts["built"] > 0
    cupy.cuda.get_current_stream().synchronize()


def _emulated_engines(monkeypatch, change):
    """Replace the emulated cuDNN's engine list by change(list of engines) for one test (skip on a real one)."""
    import cudnn
    if not hasattr(cudnn, "ENGINES"):
        pytest.skip("needs the emulated cuDNN, whose engines a test can replace")
    engines = list(cudnn.ENGINES)
    change(cudnn, engines)
    monkeypatch.setattr(cudnn, "ENGINES", tuple(engines))
    return cudnn


def _copy_engine(cudnn, engine, **changes):
    fields = dict(name=engine.name, numerical=engine.numerical, behavior=engine.behavior, workspace=engine.workspace,
                  knobs=engine.knobs, ops=engine.ops, proposed=engine.proposed, reorders=engine.reorders,
                  seconds=engine.seconds, stats_accumulate=engine.stats_accumulate)
    return cudnn._Engine(**dict(fields, **changes))


@pytest.mark.parametrize("deterministic", [True, False])
def test_split_k_settings_come_from_the_first_engines_the_notes_allow(handle, monkeypatch, deterministic):
    """The two engines whose settings are timed are the first that expose the knob *and* that the notes allow:
    with deterministic engines, two atomics engines ahead of the deterministic split-K engine are passed over
    rather than taking both places (their settings would all be deselected, leaving none)."""
    def add_atomics(cudnn, engines):
        atomics = next(e for e in engines if e.name == "split-k atomics")
        position = next(i for i, e in enumerate(engines) if e.name == "split-k slices")
        engines.insert(position, _copy_engine(cudnn, atomics, name="more atomics", proposed=False))
    cudnn = _emulated_engines(monkeypatch, add_atomics)
    from cupynet.backends import conv_autotune
    conv_autotune.forget_choices()
    prec = Precision("tf32")
    conv = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True, split_k=True, deterministic=deterministic)
    x, _, dy, (_, _, dw) = _block_arrays("NHWC", prec)
    conv.backward_filter(x, dy, 1, 1, dw)
    (entry,) = conv._graphs.values()
    names = {cudnn.ENGINES[c.choice[1]].name for c in _split_k(entry.candidates)}
    assert names == ({"split-k slices"} if deterministic else {"split-k atomics", "more atomics"})
    cupy.cuda.get_current_stream().synchronize()


def test_the_fastest_candidate_is_chosen_and_may_be_a_split_k_setting(handle, monkeypatch):
    """When a split-K setting is the fastest (here every engine the heuristics propose takes 2 ms more per
    run), the autotuner executes it, and the weight gradient is right."""
    def slow_heuristics(cudnn, engines):
        engines[:] = [_copy_engine(cudnn, e, seconds=0.002) if e.proposed else e for e in engines]
    cudnn = _emulated_engines(monkeypatch, slow_heuristics)
    from cupynet.backends import conv_autotune
    conv_autotune.forget_choices()
    prec = Precision("tf32")
    plain = CudnnConv(handle, "NHWC", prec.io_dtype)
    x, _, dy, (_, _, dw) = _block_arrays("NHWC", prec)
    plain.backward_filter(x, dy, 1, 1, dw)
    conv = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True, split_k=True)
    _, _, _, (_, _, dw_split) = _block_arrays("NHWC", prec)
    conv.backward_filter(x, dy, 1, 1, dw_split)
    (entry,) = conv._graphs.values()
    assert entry.chosen.choice[0] == "split_k" and cudnn.ENGINES[entry.chosen.choice[1]].name == "split-k slices"
    assert conv.engine_choices()[0]["plan_index"] == entry.chosen.choice
    cupy.cuda.get_current_stream().synchronize()
    ref = prec.to_host(dw)
    np.testing.assert_allclose(prec.to_host(dw_split), ref, rtol=0, atol=RTOL["tf32"] * 10 * np.max(np.abs(ref)))


@pytest.mark.parametrize("lane", ["main", "side"])
def test_a_split_k_setting_that_does_not_repeat_its_bits_is_never_chosen(handle, monkeypatch, lane):
    """cuDNN's notes belong to an engine, not to its knob's value: an engine that adds its slices with atomics
    without saying NONDETERMINISTIC passes the deselection. With deterministic engines, each split-K setting
    runs again before it is timed and one whose outputs differ is dropped, on the stream its runs are on
    (a weight gradient on a side lane: that lane's). Emulated cuDNN only: it lets the test give the split-K
    engine reordered sums and notes that do not say so."""
    def untold(cudnn, engines):
        position = next(i for i, e in enumerate(engines) if e.name == "split-k slices")
        engines[position] = _copy_engine(cudnn, engines[position], name="untold atomics", reorders=True)
    cudnn = _emulated_engines(monkeypatch, untold)
    position = next(i for i, e in enumerate(cudnn.ENGINES) if e.name == "untold atomics")
    from cupynet.backends import conv_autotune
    prec = Precision("tf32")           # float32 output: a reordered sum shows in the last bits
    side_handle = cudnn.create_handle()
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(2)]
    try:
        for deterministic in (True, False):
            conv_autotune.forget_choices()
            lanes = dict(wgrad_handle=side_handle, wgrad_streams=streams) if lane == "side" else {}
            conv = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True, split_k=True, deterministic=deterministic,
                             **lanes)
            x, _, dy, (_, _, dw) = _block_arrays("NHWC", prec)
            cupy.cuda.get_current_stream().synchronize()     # the arrays are ready before a side stream reads them
            if lane == "side":
                with streams[1]:
                    conv.backward_filter(x, dy, 1, 1, dw, lane=1)
                streams[1].synchronize()
            else:
                conv.backward_filter(x, dy, 1, 1, dw)
            (entry,) = conv._graphs.values()
            untold_settings = [c for c in _split_k(entry.candidates) if c.choice[1] == position]
            assert untold_settings                  # built: its notes are clean
            if deterministic:
                assert all(c.dropped == "not repeatable" for c in untold_settings)
                assert entry.chosen not in untold_settings
                assert conv.split_k_counts["not repeatable"] == len(untold_settings)
            else:                          # any engine allowed: nothing is run again, nothing dropped
                assert not any(c.dropped for c in untold_settings) and "not repeatable" not in conv.split_k_counts
    finally:
        cupy.cuda.get_current_stream().synchronize()
        cudnn.destroy_handle(side_handle)


@pytest.mark.parametrize("adopted", [["split_k", 0, 2], 999])
def test_an_adopted_choice_that_does_not_build_here_falls_back_to_the_heuristics_choice(handle, adopted):
    """A checkpoint's choice that this cuDNN cannot build (a split-K setting of an engine without the knob, a
    plan index past the heuristics' list) leaves nothing to time: the convolution runs the heuristics' first
    plan, correctly, instead of failing."""
    from cupynet.backends import conv_autotune
    conv_autotune.forget_choices()
    prec = Precision("tf32")
    plain = CudnnConv(handle, "NHWC", prec.io_dtype)
    x, _, dy, (_, _, dw) = _block_arrays("NHWC", prec)
    plain.backward_filter(x, dy, 1, 1, dw)
    (plain_entry,) = plain._graphs.values()
    key = list(plain_entry.key)
    key[KEY_FIELDS.index("split_k")] = True
    device = cupy.cuda.Device().id
    environment = conv_autotune.export_choices(device)["environment"]
    assert conv_autotune.import_choices({"environment": environment, "choices": [[key, adopted]]}, device) == 1
    conv = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True, split_k=True)
    _, _, _, (_, _, dw_adopted) = _block_arrays("NHWC", prec)
    conv.backward_filter(x, dy, 1, 1, dw_adopted)
    (entry,) = conv._graphs.values()
    assert entry.candidates is None and entry.chosen is None      # the heuristics' first plan, `execute`
    cupy.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(prec.to_host(dw_adopted), prec.to_host(dw))
    conv_autotune.forget_choices()


# --------------------------------------------------------------------------- genstats (--conv-genstats)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("mode,case", [("strict", "down-3x3-s2"), ("bf16", "down-3x3-s2"), ("bf16", "block-3x3")])
def test_forward_with_stats_writes_the_outputs_sums_or_runs_plain(handle, layout, mode, case):
    """forward_with_stats: y as forward's (against the reference), and either the per-channel sum and sum
    of squares of y (genstats, fused: True) or, where cuDNN has no engine for the fused graph, False with
    the sums untouched and the reason kept. The sums come from cuDNN's float32 accumulators, before y is
    rounded to its dtype: within rtol of sum|y| (and sum y^2) of the y that was stored."""
    n, c, h, w, k, ksize, stride = CASES[case]
    pad = ksize // 2
    prec = Precision(mode)
    ref = NumpyBackend(layout=layout, dtype="float64")
    conv = CudnnConv(handle, layout, prec.io_dtype, strict_fp32=prec.strict, autotune=True)
    rng = np.random.default_rng(zlib.crc32(f"stats-{layout}-{mode}-{case}".encode()))
    x, x64 = prec.to_device(np.abs(rng.standard_normal(ref.activation_shape(n, c, h, w))))   # as after a relu
    wt, w64 = prec.to_device(rng.standard_normal(ref.conv_weight_shape(k, c, ksize, ksize)))
    shape = ref.activation_shape(n, k, out_size(h, ksize, stride), out_size(w, ksize, stride))
    y, sums = prec.nan_array(shape), cupy.full((2, k), np.nan, dtype=cupy.float32)

    fused = conv.forward_with_stats(x, wt, stride, pad, y, sums)
    conv.forward_with_stats(x, wt, stride, pad, y, sums)         # a second call: the cached decision
    cupy.cuda.get_current_stream().synchronize()
    y_ref = ref.conv2d_forward(x64, w64, stride, pad, np.empty(shape))
    y_abs = ref.conv2d_forward(np.abs(x64), np.abs(w64), stride, pad, np.empty(shape))
    assert_close("fprop", prec.to_host(y), y_ref, y_abs, RTOL[mode])
    got = cupy.asnumpy(sums).astype(np.float64)
    if fused:
        stored = prec.to_host(y)
        axes = ref._channel_axes()
        assert_close("sum", got[0], stored.sum(axis=axes), np.abs(stored).sum(axis=axes), RTOL[mode])
        assert_close("sum of squares", got[1], (stored ** 2).sum(axis=axes), (stored ** 2).sum(axis=axes),
                     2 * RTOL[mode])
        # (on a GPU some candidates may also have been dropped by the autotuner's checks: counted beside)
        assert conv.genstats_counts["fused"] == 1 and "unsupported" not in conv.genstats_counts
        assert conv.builds == {"fprop_stats": 1} and conv.executions == {"fprop_stats": 2}
    else:
        assert conv.genstats_counts["unsupported"] == 1 and "fused" not in conv.genstats_counts
        assert len(conv.genstats_problems) == 1 and conv.executions == {"fprop": 2}
        if "fprop_stats" in conv.builds:       # built, but every candidate failed the autotuner's checks
            assert "dropped:" in conv.genstats_problems[0]
        else:                                  # no engine: the sums were never written
            assert np.all(np.isnan(got)) and conv.builds == {"fprop": 1}


def test_sums_of_the_wrong_shape_or_dtype_are_refused_before_cudnn_runs(handle):
    prec = Precision("bf16")
    x, wt, _, (y, _, _) = _block_arrays("NHWC", prec)
    with pytest.raises(ValueError, match="needs autotune"):      # its engines' sums are checked before use
        CudnnConv(handle, "NHWC", prec.io_dtype).forward_with_stats(x, wt, 1, 1, y, cupy.zeros((2, 8), cupy.float32))
    conv = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True)
    for sums in (cupy.zeros((2, 4), dtype=cupy.float32), cupy.zeros((2, 8), dtype=cupy.float64),
                 cupy.zeros((8, 2), dtype=cupy.float32).T):
        with pytest.raises(ValueError, match="sums must be a C-contiguous"):
            conv.forward_with_stats(x, wt, 1, 1, y, sums)
    assert conv.executions == {}


@pytest.mark.parametrize("multiple,fused", [(1, True), (1 << 20, False)])
def test_genstats_support_is_decided_per_shape(handle, monkeypatch, multiple, fused):
    """Emulated cuDNN only (it lets a test decide which shapes have a genstats engine): an unsupported fused
    graph is not an error, it runs plain, and a frozen engine neither builds nor retries it."""
    import cudnn
    if not hasattr(cudnn, "GENSTATS_CHANNEL_MULTIPLE"):
        pytest.skip("needs the emulated cuDNN, whose genstats support a test can change")
    monkeypatch.setattr(cudnn, "GENSTATS_CHANNEL_MULTIPLE", multiple)
    prec = Precision("bf16")
    conv = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True)
    x, wt, _, (y, _, _) = _block_arrays("NHWC", prec)
    sums = cupy.zeros((2, 8), dtype=cupy.float32)
    assert conv.forward_with_stats(x, wt, 1, 1, y, sums) is fused
    conv.freeze()
    assert conv.forward_with_stats(x, wt, 1, 1, y, sums) is fused
    assert conv.genstats_counts == ({"fused": 1} if fused else {"unsupported": 1})
    if not fused:
        assert "fprop_stats" not in conv.builds and "fprop_stats N=4 C=8 H=8 W=8 K=8" in conv.genstats_problems[0]


FAULTS = {"reorders": dict(reorders=True), "accumulates": dict(stats_accumulate=True),
          "half sums": dict(stats_in_half=True)}


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("fault,untold", [(fault, untold) for fault in FAULTS for untold in ("one", "every")])
def test_a_genstats_engine_whose_sums_do_not_repeat_is_never_chosen(handle, monkeypatch, deterministic, fault, untold):
    """A fused graph's sums are added across the blocks that share a channel; an engine may do it with atomics
    in a varying order without saying NONDETERMINISTIC in notes kept per engine, or add into the sums instead
    of writing them (they would grow every step), or sum in a 16-bit precision. Before timing a genstats
    candidate the autotuner checks its sums against the output's own (within GENSTATS_RTOL) and runs it again:
    with deterministic engines one whose outputs change at all is dropped, with any engine one whose sums move
    by more than REPEAT_RTOL; if none is left the convolution runs plain (not an error). Emulated cuDNN only:
    it lets the test give engines such faults and notes that do not say so."""
    from cupynet.backends import conv_autotune

    def fault_in(cudnn, engines):
        for i, engine in enumerate(engines):
            if "fprop" in engine.ops and (untold == "every" or engine.name == "implicit gemm fp32"):
                engines[i] = _copy_engine(cudnn, engine, name=f"untold {engine.name}", **FAULTS[fault])
    cudnn = _emulated_engines(monkeypatch, fault_in)
    monkeypatch.setattr(cudnn, "GENSTATS_CHANNEL_MULTIPLE", 1)
    conv_autotune.forget_choices()
    prec = Precision("strict")         # float32 output: a reordered sum shows in its last bits
    conv = CudnnConv(handle, "NHWC", prec.io_dtype, strict_fp32=True, autotune=True, deterministic=deterministic)
    x, wt, _, (y, _, _) = _block_arrays("NHWC", prec, n=64)      # 4,096 values a channel: float16 sums show
    sums = cupy.zeros((2, 8), dtype=cupy.float32)
    try:
        fused = conv.forward_with_stats(x, wt, 1, 1, y, sums)
        cupy.cuda.get_current_stream().synchronize()
    finally:
        conv_autotune.forget_choices()     # made with this test's engines
    assert np.all(np.isfinite(prec.to_host(y)))
    caught = deterministic or fault != "reorders"        # reordered float32 sums are fine with any engine
    if not caught:
        assert fused and conv.genstats_counts == {"fused": 1}
    elif untold == "one":
        entry = conv._graphs[next(key for key in conv._graphs if key[0] == "fprop_stats")]
        dropped = [c for c in entry.candidates if c.dropped]
        assert fused and [c.name for c in dropped] == ["eng2 (untold implicit gemm fp32)"] and entry.chosen not in dropped
        (why,) = {c.dropped for c in dropped}
        # an accumulating engine's first sums are right where the buffer held zeros (it came first)
        assert why in {"reorders": {"not repeatable"}, "accumulates": {"not repeatable", "wrong sums"},
                       "half sums": {"wrong sums"}}[fault]
        assert conv.genstats_counts == {"fused": 1, why: 1}
    else:
        assert not fused and conv.genstats_counts["unsupported"] == 1 and "fused" not in conv.genstats_counts
        assert "dropped:" in conv.genstats_problems[0]
        assert conv.forward_with_stats(x, wt, 1, 1, y, sums) is False     # decided: runs plain from now on


def test_a_grown_workspace_keeps_the_old_one_alive(handle):
    """A recorded training step keeps the workspace address it was captured with; evaluation may build a new
    shape afterwards and grow the workspace. The old buffer is kept, never handed back to the pool, so replays
    cannot write into memory given to something else."""
    from cupynet.backends.cudnn_conv import _Lane
    lane = _Lane(handle, cupy)
    lane.grow(1024)
    first, first_ptr = lane.buffer, lane.ptr
    lane.grow(512)                                   # enough already: nothing changes
    assert lane.buffer is first
    lane.grow(4096)
    assert lane.bytes == 4096 and lane.ptr != first_ptr
    assert any(buffer is first for buffer in lane._superseded)


def test_an_adopted_genstats_choice_that_does_not_build_here_is_timed_and_checked_afresh(handle, monkeypatch):
    """A checkpoint's choice for a fused graph that this cuDNN cannot build: instead of the heuristics' plan
    (which nothing would check), the candidates are built, checked and timed as on a first run."""
    import cudnn
    from cupynet.backends import conv_autotune
    if hasattr(cudnn, "GENSTATS_CHANNEL_MULTIPLE"):
        monkeypatch.setattr(cudnn, "GENSTATS_CHANNEL_MULTIPLE", 1)
    conv_autotune.forget_choices()
    prec = Precision("tf32")
    x, wt, _, (y, _, _) = _block_arrays("NHWC", prec)
    sums = cupy.zeros((2, 8), dtype=cupy.float32)
    first = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True)
    try:
        if not first.forward_with_stats(x, wt, 1, 1, y, sums):
            pytest.skip("cuDNN has no genstats engine for this shape")
        (key,) = [key for key in first._graphs if key[0] == "fprop_stats"]
        device = cupy.cuda.Device().id
        environment = conv_autotune.export_choices(device)["environment"]
        conv_autotune.forget_choices()
        assert conv_autotune.import_choices({"environment": environment, "choices": [[list(key), 999]]}, device) == 1
        conv = CudnnConv(handle, "NHWC", prec.io_dtype, autotune=True)
        assert conv.forward_with_stats(x, wt, 1, 1, y, sums)
        entry = conv._graphs[key]
        assert entry.candidates and entry.chosen in entry.candidates      # built, checked and timed here
        assert all(candidate.repeat_check for candidate in entry.candidates)
    finally:
        conv_autotune.forget_choices()
