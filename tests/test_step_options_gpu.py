"""The step options under whole-step capture on the GPU: with each of them (one-launch BatchNorm, weight gradients
on side streams or split-K engines, statistics from the convolutions, pixel pairs, our own convolution kernel,
gradient sums in the residual add, stream priorities, engines timed in a graph, a padded input, programmatic
launches) captured steps equal eager steps bit for bit, and where an option changes the arithmetic, the
run follows the plain one (how the runs are compared: step_graph_runs.py).

    python -m pytest -m gpu tests/test_step_options_gpu.py -q     # on a GPU machine (skipped elsewhere)
"""
import numpy as np
import pytest

from cupynet.config import TrainConfig
from step_graph_runs import BASE, STEPS, assert_identical, make_backend, small_dataset, train

pytestmark = pytest.mark.gpu
DEVICE = 0                      # make_backend's


@pytest.fixture(scope="module")
def dataset():
    return small_dataset()


@pytest.fixture(scope="module")
def plain(dataset):
    """plain(layout, dtype, wgrad_streams=1): the plain eager run (no step option) that several tests compare with,
    trained once per module. Each comes back with the engine choices it ran adopted again: a test that forgets the
    choices (the split-K one) would otherwise let the next runs time new engines, whose bits may differ. A test that
    compares with it takes it before its own runs, so that they run the same engines where they share a shape."""
    from cupynet.backends import conv_autotune
    runs = {}

    def run(layout, dtype, wgrad_streams=1):
        key = (layout, dtype, wgrad_streams)
        if key not in runs:
            config = TrainConfig(**BASE, data_format=layout, dtype=dtype, wgrad_streams=wgrad_streams,
                                 cuda_graph="off")
            result = train(config, dataset, make_backend(layout, dtype, wgrad_streams=wgrad_streams))
            runs[key] = result, conv_autotune.export_choices(DEVICE)
        result, choices = runs[key]
        conv_autotune.import_choices(choices, DEVICE)
        return result
    return run


def eager_and_captured(settings, dataset, layout, dtype, **options):
    """The same run twice from the same seed, each on a fresh backend with these step options: eager steps, then
    captured ones. (eager backend, eager run, captured backend, captured run); the capture is checked to have
    happened."""
    eager_backend = make_backend(layout, dtype, **options)
    eager = train(TrainConfig(**settings, cuda_graph="off"), dataset, eager_backend)
    backend = make_backend(layout, dtype, **options)
    captured = train(TrainConfig(**settings, cuda_graph="on"), dataset, backend)
    assert captured[0].runner.captured
    return eager_backend, eager, backend, captured


def assert_follows(run, plain_run, what, within=0.02):
    """Every parameter of `run`, as one vector, within `within` (relative norm) of the plain run's (printed)."""
    names = [name for name in plain_run[1] if name.startswith("params/")]
    ours, theirs = (np.concatenate([state[name].ravel() for name in names]).astype(np.float64)
                    for state in (run[1], plain_run[1]))
    distance = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    print(f"{what} vs plain: {distance:.3g}")
    assert distance <= within, what


@pytest.mark.parametrize("layout,overlap", [("NHWC", True), ("NHWC", False), ("NCHW", False)])
def test_one_launch_batchnorm_captured_equals_two_launches_eager(dataset, plain, layout, overlap):
    """--bn-launches 1, captured (its kernels wait for their grid inside the replayed graph, evaluations between
    replays), against the two-launch eager steps: ResNet-8's BatchNorm grids fit the GPU uncapped, so the one
    kernel adds the same partial sums in the same order and applies the same arithmetic: the same bits. The
    backward takes its one launch only with the weight gradients in the serial order (overlap off)."""
    settings = dict(BASE, data_format=layout, dtype="bfloat16")
    eager = plain(layout, "bfloat16")
    backend = make_backend(layout, "bfloat16", bn_launches=1)
    backend.overlap_wgrad = overlap
    captured = train(TrainConfig(**settings, cuda_graph="on", bn_launches=1), dataset, backend)
    assert captured[0].runner.captured
    launches = backend.kernels.launches
    assert launches["bn_stats_apply"] > 0 and (launches["bn_grad_dx"] > 0) == (not overlap)
    # NCHW reads one channel per block: where the GPU holds fewer blocks than a layer has channels (the
    # emulated GPU does, at 32 and 64), that layer takes the two launches
    if layout == "NHWC":
        assert launches["bn_stats"] == 0 and (launches["bn_grad"] == 0) == (not overlap)
    assert_identical(eager, captured)


@pytest.mark.parametrize("wgrad_streams,wgrad_chunks", [(1, 1), (3, 1), (2, 2)])
def test_weight_gradients_beside_the_main_stream_equal_the_serial_order(dataset, wgrad_streams, wgrad_chunks):
    """Weight gradients on side streams (overlapping the data gradients; with 3 streams taken in turn,
    also each other, every stream with its own cuDNN workspace), captured, against the
    plain serial eager order on one stream: the same kernels on the same data, so the same bits.
    ResNet-8 has 9 weight gradients per step: each of 3 streams serves several. With 2 chunks each
    weight gradient is two cuDNN calls over half the batch, side by side on the 2 streams, summed at the
    end of backward in a fixed order: the serial run computes the same chunks one after another."""
    serial_backend = make_backend("NHWC", "bfloat16", wgrad_chunks=wgrad_chunks)
    serial_backend.overlap_wgrad = False
    serial = train(TrainConfig(**BASE, dtype="bfloat16", cuda_graph="off"), dataset, serial_backend)
    backend = make_backend("NHWC", "bfloat16", wgrad_streams=wgrad_streams, wgrad_chunks=wgrad_chunks)
    overlapped = train(TrainConfig(**BASE, dtype="bfloat16", cuda_graph="on", wgrad_streams=wgrad_streams,
                                   wgrad_chunks=wgrad_chunks), dataset, backend)
    assert backend.overlap_wgrad and overlapped[0].runner.captured
    assert len(backend.side_streams) == backend.conv.wgrad_lanes == wgrad_streams
    # the weight-gradient graphs were built for slices of the batch of 16: 8 images each with 2 chunks
    assert {choice["dims"][0] for choice in backend.conv.engine_choices() if choice["op"] == "wgrad"} \
        == {16 // wgrad_chunks}
    assert serial_backend.calls["sum_chunks"] == STEPS      # one sum per step, for every convolution
    assert_identical(serial, overlapped)


def test_split_k_weight_gradients_captured_equal_eager(dataset):
    """With --conv-split-k the autotuner also times split-K settings of the weight gradients' engines, each a
    cuDNN graph of its own. A first run times them; then every weight gradient for which one was built is
    made to run one (its choice replaced, as a checkpoint's would be adopted), and the captured step repeats
    the eager one bit for bit with them, the weight gradients beside the main stream on two side streams."""
    from cupynet.backends import conv_autotune
    conv_autotune.forget_choices()
    settings = dict(BASE, dtype="bfloat16", wgrad_streams=2, conv_split_k=True)
    tuning = make_backend("NHWC", "bfloat16", wgrad_streams=2, split_k=True)
    train(TrainConfig(**settings, cuda_graph="off"), dataset, tuning)
    forced = {}
    for entry in tuning.conv._graphs.values():
        built = [c.choice for c in entry.candidates or [] if isinstance(c.choice, tuple) and not c.dropped]
        if built:
            forced[entry.key] = built[-1]                    # the most slices
    import cudnn
    if not forced:
        assert not hasattr(cudnn, "ENGINES"), "the emulated cuDNN has a split-K engine for every weight gradient"
        pytest.skip("cuDNN offered no split-K setting for these weight gradients")
    device = tuning.device.id
    saved = conv_autotune.export_choices(device)
    saved["choices"] = [[key, list(forced.get(tuple(key), ())) or choice] for key, choice in saved["choices"]]
    conv_autotune.forget_choices()
    conv_autotune.import_choices(saved, device)
    _, eager, backend, captured = eager_and_captured(settings, dataset, "NHWC", "bfloat16", wgrad_streams=2,
                                                     split_k=True)
    choices = backend.conv.engine_choices()
    split_k = conv_autotune.KEY_FIELDS.index("split_k")
    assert all(choice["key"][split_k] is (choice["op"] == "wgrad") for choice in choices)    # in wgrad keys
    assert {choice["key"]: choice["plan_index"] for choice in choices if choice["key"] in forced} == forced
    assert_identical(eager, captured)
    conv_autotune.forget_choices()


def test_batchnorm_statistics_from_the_convolutions_captured_equal_eager(dataset, plain, layout="NHWC",
                                                                        dtype="bfloat16"):
    """--conv-genstats: the convolutions before a BatchNorm also write its sums (where cuDNN has a genstats
    engine for the shape; the others run plain and their BatchNorm makes its own statistics). Captured steps
    repeat the eager ones bit for bit, and the run follows the plain one (only the statistics' rounding
    differs, and on a GPU the fused graph's engine; bf16 steps drift apart from there). On a GPU the mean
    losses agree to 2%. On the emulated one the first five steps' mean loss moved by 4e-5 to 1e-4 (relative)
    with the rounding, and by 2.4e-3 with every statistic 2% off (the count scaled in bn_apply_from_sums); the
    next five's also carries where the rounding has led the bf16 run: a mere change of summation order in the
    BatchNorm reductions moved the plain run's by 0.09%, and the two runs' apart by 0.13%."""
    settings = dict(BASE, data_format=layout, dtype=dtype, conv_genstats=True)
    unfused = plain(layout, dtype)
    _, eager, backend, captured = eager_and_captured(settings, dataset, layout, dtype, conv_genstats=True)
    counts = backend.conv.genstats_counts
    # ResNet-8's conv -> BN shapes: 3 -> 16, 16 -> 16, and 2 each in stages 2 and 3 (the emulated cuDNN has
    # genstats engines only for outputs of a multiple of 32 channels: both paths run)
    assert counts["fused"] + counts["unsupported"] == 6
    import cudnn
    emulated = hasattr(cudnn, "GENSTATS_CHANNEL_MULTIPLE")
    if emulated:
        assert counts == {"fused": 4, "unsupported": 2}
    assert backend.conv.executions["fprop_stats"] > 0 or counts["fused"] == 0
    assert_identical(eager, captured)
    first, later = (1e-3, 5e-3) if emulated else (2e-2, 2e-2)
    np.testing.assert_allclose(captured[3][0], unfused[3][0], rtol=first)
    np.testing.assert_allclose(captured[3][1:], unfused[3][1:], rtol=later)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pixel_pairs_captured_equal_eager_and_follow_the_plain_run(dataset, plain, dtype):
    """--conv-pixel-pairs: stage 1's convolutions run on pixel pairs, their paired weights built from the
    current weights before each forward (inside the captured step, and before each evaluation's forward) and
    taken by the data gradients; --wgrad-pixel-pairs: their weight gradients too. Captured steps repeat the
    eager ones bit for bit, and the run follows the plain one: the same convolutions, summed in another order
    (and in bf16 the paired weight gradient's halves rounded before they are added). After the 12 steps, the
    parameters as one vector, on the emulated GPU: 3e-8 (float32) and 0.0050 (bf16) apart, relative norm
    (with the forward switch alone the bf16 runs were identical; in float32 the autotuner times the paired
    shapes' engines anew and may pick a TF32 one where the plain run did not: 0.0035 in an earlier run); with a
    paired kernel that swapped the pixels of a pair, 0.048 apart, and with a fold that read the wrong pixel of
    each pair, 0.029."""
    settings = dict(BASE, dtype=dtype, conv_pixel_pairs=True, wgrad_pixel_pairs=True)
    unpaired_run = plain("NHWC", dtype)
    eager_backend, eager, _, captured = eager_and_captured(settings, dataset, "NHWC", dtype, pixel_pairs=True,
                                                           wgrad_pixel_pairs=True)
    # ResNet-8's stage 1 has two convolutions: their paired kernels built by their forwards at each step (their
    # data gradients take them) and for each evaluation batch (2 evaluations of 24 test images in batches of 16);
    # their weight gradients folded at each step
    assert eager_backend.kernels.launches["pixel_pair_weights"] == 2 * STEPS + 2 * 2 * 2
    assert eager_backend.kernels.launches["pixel_pair_weight_gradient"] == 2 * STEPS
    assert_identical(eager, captured)
    assert_follows(captured, unpaired_run, "pixel pairs")


@pytest.mark.parametrize("dtype,channels,genstats", [("float32", 64, False), ("bfloat16", 64, True)])
def test_our_own_conv_kernel_captured_equals_eager_and_follows_the_plain_run(dataset, plain, dtype, channels, genstats):
    """--own-conv-channels: the 3x3 forwards and data gradients of at most that many channels run in our own
    tensor-core kernel (float32 on TF32, as the plain run's cuDNN engines may), inside the captured step and in the
    evaluations; with --conv-genstats its forwards also write the next BatchNorm's sums, which then makes no
    statistics pass of its own. Captured steps repeat the eager ones bit for bit, and the run follows the plain one
    (the same products, added in another order; in float32 the plain run's engines may not round to TF32 where ours
    do; with the sums, statistics from unshifted float32 sums)."""
    settings = dict(BASE, dtype=dtype, own_conv_channels=channels, conv_genstats=genstats)
    plain_run = plain("NHWC", dtype)
    eager_backend, eager, _, captured = eager_and_captured(settings, dataset, "NHWC", dtype,
                                                           own_conv_channels=channels, conv_genstats=genstats)
    # ResNet-8's 3x3 convolutions after the stem: two in stage 1, and in stages 2 and 3 a strided forward and a
    # stride-1 one each; per step their forwards and the stride-1 data gradients, and for every evaluation batch
    # their forwards (2 evaluations of 24 test images in batches of 16)
    forwards, data_gradients = 6, 4
    assert eager_backend.kernels.launches["conv3x3_mma"] == (forwards + data_gradients) * STEPS + forwards * 2 * 2
    if genstats:     # our kernel's forwards give their BatchNorms' sums; the stem's goes to cuDNN's genstats
        from bench.layouts import genstats_report
        report = genstats_report(eager_backend)
        # the five shapes of ResNet-8's 3x3 convolutions after the stem, as bench/layouts.py reports them
        assert report.get("own kernel") == 5 and report.get("fused", 0) + report.get("unsupported", 0) == 1, report
        stem_statistics = STEPS if "unsupported" in report else 0       # the emulated cuDNN has none at 16 channels
        assert eager_backend.kernels.launches["bn_stats"] == stem_statistics
        assert eager_backend.kernels.launches["bn_apply_from_sums"] == (forwards + 1 - stem_statistics // STEPS) * STEPS
    assert_identical(eager, captured)
    assert_follows(captured, plain_run, f"own conv kernel up to {channels} channels" + " with sums" * genstats)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_padded_input_captured_equals_eager_and_follows_the_plain_run(dataset, plain, dtype):
    """--padded-input: the augmentation writes the input with zero channels up to a 16-byte pixel (inside the
    captured step, and for each evaluation batch) and the stem pads its weights to match before each forward and
    cuts its weight gradient back. Captured steps repeat the eager ones bit for bit, and the run follows the
    plain one (the same sums, up to the engines' order)."""
    settings = dict(BASE, dtype=dtype, padded_input=True)
    unpadded_run = plain("NHWC", dtype)
    eager_backend, eager, _, captured = eager_and_captured(settings, dataset, "NHWC", dtype, padded_input=True)
    assert captured[0].x.shape[-1] == (8 if dtype == "bfloat16" else 4)
    # the stem's padded weights for each step and each evaluation batch (2 evaluations of 24 images in batches
    # of 16), its gradient cut back at each step
    assert eager_backend.kernels.launches["pad_weight_channels"] == STEPS + 2 * 2
    assert eager_backend.kernels.launches["crop_weight_channels"] == STEPS
    assert_identical(eager, captured)
    assert_follows(captured, unpadded_run, "padded input")
    # the stem's weights alone: on the emulated GPU 0 (bf16, and float32 where both runs' engines agree), where a
    # gradient cut back from the wrong channels left them 0.052 apart (and all the parameters only 0.013)
    stem, stem_plain = captured[1]["params/stem/conv/w"], unpadded_run[1]["params/stem/conv/w"]
    assert np.linalg.norm(stem - stem_plain) <= 0.02 * np.linalg.norm(stem_plain)


@pytest.mark.parametrize("layout,dtype", [("NHWC", "bfloat16"), ("NCHW", "float32")])
def test_residual_grad_sums_captured_equal_the_plain_eager_steps(dataset, plain, layout, dtype):
    """--residual-grad-sums: a block's input-gradient add also reduces the gradient sums of the BatchNorm before
    it (the stem's, or the previous block's second), in bn_grad's tiling, so the same partial sums in the same
    order: captured steps equal the plain eager ones bit for bit. ResNet-8's one such block takes the stem's
    (test_gpu_parity's ResNet-20 has blocks taking the previous block's too)."""
    settings = dict(BASE, data_format=layout, dtype=dtype)
    unfused = plain(layout, dtype)
    backend = make_backend(layout, dtype, residual_grad_sums=True)
    captured = train(TrainConfig(**settings, cuda_graph="on", residual_grad_sums=True), dataset, backend)
    assert captured[0].runner.captured
    # once per eager warm-up step; the recording's launch is replayed, not counted again
    assert backend.kernels.launches["relu_backward_add_bn_grad"] >= 1
    assert_identical(unfused, captured)


def test_stream_priorities_change_when_kernels_run_not_what_they_compute(dataset, plain):
    """--stream-priorities: the main stream at a higher priority than the two weight-gradient side streams; eager
    steps with them, and captured ones (the graph instantiated again with per-node priorities through the
    driver), equal the plain eager steps bit for bit. On the emulated GPU (which records priorities, not schedules
    by them) the driver library is tests/emulated_gpu/cuda_driver_stub.cpp, which refuses any flags but none and
    per-node priorities; the captured half skips where no driver library is on the library path."""
    from cupynet.backends.cuda_driver import driver
    from cupynet.errors import DeviceError
    settings = dict(BASE, wgrad_streams=2)
    unprioritized = plain("NHWC", "float32", wgrad_streams=2)
    backend = make_backend("NHWC", "float32", wgrad_streams=2, stream_priorities=True)
    assert all(backend.stream.priority < side.priority for side in backend.side_streams)
    eager = train(TrainConfig(**settings, cuda_graph="off", stream_priorities=True), dataset, backend)
    assert_identical(unprioritized, eager)
    try:
        driver("--stream-priorities")
    except DeviceError as error:
        pytest.skip(f"the captured step with per-node priorities needs the CUDA driver library: {error}")
    backend = make_backend("NHWC", "float32", wgrad_streams=2, stream_priorities=True)
    captured = train(TrainConfig(**settings, cuda_graph="on", stream_priorities=True), dataset, backend)
    runner = captured[0].runner
    assert runner.captured and runner.graph._executable is not None
    assert_identical(unprioritized, captured)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_programmatic_launches_compute_what_plain_launches_do(dataset, plain, dtype):
    """--programmatic-launch: the captured step's edges into our kernels from the kernels before them made
    programmatic (each kernel launched early, waiting for the one before it inside), alone and with stream
    priorities (both instantiate the graph through the driver, with one call), and from the launch-order port
    (--programmatic-launch-early: launched once the kernel before has begun): the steps equal plain eager ones
    bit for bit. On a GPU many edges become programmatic; the emulated GPU's driver stub reads every graph as
    empty, so there none does and this checks the rest of the path (the rewrite's choice and its edge data:
    test_programmatic_launch.py; that every kernel waits first: test_kernels_compile.py). There the three
    ways differ only in the host's calls, which one dtype checks: bf16 takes the first alone."""
    import cudnn

    from cupynet.backends.cuda_driver import driver
    from cupynet.errors import DeviceError
    settings = dict(BASE, dtype=dtype, wgrad_streams=2)
    try:
        driver("--programmatic-launch")
    except DeviceError as error:
        pytest.skip(f"programmatic launches need the CUDA driver library: {error}")
    unhurried = plain("NHWC", dtype, wgrad_streams=2)
    emulated = hasattr(cudnn, "GENSTATS_CHANNEL_MULTIPLE")
    ways = (dict(programmatic_launch=True), dict(programmatic_launch=True, stream_priorities=True),
            dict(programmatic_launch_early=True))
    for launches in ways[:1] if emulated and dtype == "bfloat16" else ways:
        options = dict(wgrad_streams=2, **launches)
        backend = make_backend("NHWC", dtype, **options)
        assert backend.programmatic_launch          # implied by the early launches
        captured = train(TrainConfig(**dict(settings, **options), cuda_graph="on"), dataset, backend)
        graph = captured[0].runner.graph
        assert captured[0].runner.captured and graph._executable is not None
        # ResNet-8's step has about 40 of our kernels after another kernel on the same stream
        assert graph.programmatic_edges == 0 if emulated else graph.programmatic_edges >= 20, graph.programmatic_edges
        assert_identical(unhurried, captured)


def test_engines_timed_in_a_graph_train_as_eager_steps_with_them(dataset):
    """--conv-tune-in-graph: during the warm-up the autotuner records each candidate's runs in a graph of their
    own, on the main stream and on the weight gradients' two side streams, before the step itself is recorded;
    the captured steps equal eager steps with the same switch bit for bit (the same engines: a choice is kept
    per key, and these keys are their own)."""
    from cupynet.backends import conv_autotune
    settings = dict(BASE, wgrad_streams=2, conv_tune_in_graph=True)
    eager = train(TrainConfig(**settings, cuda_graph="off"), dataset,
                  make_backend("NHWC", "float32", wgrad_streams=2, tune_in_graph=True))
    keys = [key for _, key in conv_autotune._CHOICES if key[conv_autotune.KEY_FIELDS.index("tune_in_graph")] is True]
    assert {key[0] for key in keys} == {"fprop", "dgrad", "wgrad"}
    captured = train(TrainConfig(**settings, cuda_graph="on"), dataset,
                     make_backend("NHWC", "float32", wgrad_streams=2, tune_in_graph=True))
    assert captured[0].runner.captured
    assert_identical(eager, captured)
