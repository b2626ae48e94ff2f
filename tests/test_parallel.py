"""Data parallelism on CPU workers: communicators, sharding, replica identity, failures, the CLI.

Several NumPy-backend workers in threads, joined by HostCommunicators, stand in for several GPUs: the
multi-worker logic is the same, only the communicator differs. The sync-BN tests prove the split
BatchNorm primitives equal the fused ones and that --sync-bn workers train as one worker with the global
batch. The GPU-marked tests at the end run NCCL with one rank, two workers sharing one GPU (the
project's GPU machines have one GPU), and the GPU's split BatchNorm primitives against NumPy.

    python -m pytest tests/test_parallel.py -q
"""
import _thread
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cupynet.backends import create_backend
from cupynet.backends.numpy_backend import NumpyBackend
from cupynet.checkpoint import latest_checkpoint, load_checkpoint
from cupynet.config import TrainConfig, parse_args
from cupynet.data import synthetic_dataset
from cupynet.errors import ConfigError, DeviceError
from cupynet.parallel import CommunicatorAborted, HostGroup, run_workers
from cupynet.report import read_metrics
from cupynet.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 16
FAIL_FAST_S = 10.0      # a failing run must end well within this (a hang would be minutes)


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(num_train=160, num_test=30, seed=3)


def small_config(**overrides):
    settings = dict(num_layers=8, train_batch_size=GLOBAL_BATCH, eval_batch_size=8, bn_decay=0.9, seed=5)
    settings.update(overrides)
    return TrainConfig(**settings)


def run_replicas(num_workers, dataset, body, dtype="float32", config=None):
    """body(trainer) in each of num_workers CPU replicas (started identical); results in rank order."""
    config = config or small_config()
    group = HostGroup(num_workers)

    def worker(rank, device):
        backend = NumpyBackend("NHWC", dtype)
        trainer = Trainer(config, dataset, backend, group.communicator(rank, backend))
        trainer.broadcast_state()
        return body(trainer)

    return run_workers(["cpu"] * num_workers, worker, group)


# --------------------------------------------------------------------------------------------- communicator


def run_collective(size, make_array, collective):
    """collective(comm, array) on `size` ranks; each rank's array from make_array(rank). Returns the arrays."""
    group = HostGroup(size)

    def worker(rank, device):
        backend = NumpyBackend("NHWC", "float32")
        array = make_array(rank)
        collective(group.communicator(rank, backend), array)
        return array

    return run_workers(["cpu"] * size, worker, group)


def test_host_all_reduce_is_the_rank_order_sum_on_every_rank():
    # Values of very different magnitudes: the float32 sum depends on the order of the additions.
    inputs = [np.random.default_rng(rank).standard_normal(1000).astype(np.float32) * 10.0 ** (3 * rank)
              for rank in range(4)]
    expected = inputs[0] + inputs[1] + inputs[2] + inputs[3]
    summed = run_collective(4, lambda rank: inputs[rank].copy(), lambda comm, a: comm.all_reduce_sum(a))
    averaged = run_collective(4, lambda rank: inputs[rank].copy(), lambda comm, a: comm.all_reduce_mean(a))
    for rank in range(4):
        np.testing.assert_array_equal(summed[rank], expected)
        np.testing.assert_array_equal(averaged[rank], expected / np.float32(4))
        assert averaged[rank].dtype == np.float32


def test_host_all_reduce_of_scalars_and_integers():
    counts = run_collective(3, lambda rank: np.array(rank + 10, dtype=np.int64), lambda comm, a: comm.all_reduce_sum(a))
    assert [int(c) for c in counts] == [33, 33, 33]


def test_host_broadcast_copies_the_root_everywhere():
    arrays = run_collective(3, lambda rank: np.full((4, 5), rank, np.float32),
                            lambda comm, a: comm.broadcast(a, root=1))
    for array in arrays:
        np.testing.assert_array_equal(array, np.ones((4, 5), np.float32))


# --------------------------------------------------------------------------------------------- sharding


def shard_by_hand(dataset, config, rank, shard):
    """Gradient, images and labels of shard `rank` of step 0, with a single-worker float64 Trainer."""
    trainer = Trainer(config, dataset, NumpyBackend("NHWC", "float64"))
    be = trainer.be
    images, labels = trainer.train_split
    first = rank * shard
    rows = trainer.sampler.rows(0)[first:first + shard]
    x, y = be.empty(be.activation_shape(shard, 3, 32, 32)), be.empty((shard,), dtype=np.int32)
    be.augment_batch(images, labels, rows, trainer.seed, 0, config.distortion, x, y, first_row=first)
    trainer.model.forward_backward(x, y)
    return trainer.model.params.grad_flat.copy()


def copy_shard_results(trainer):
    trainer.compute_gradients()
    return trainer.model.params.grad_flat.copy(), trainer.x.copy(), trainer.labels.copy()


@pytest.mark.parametrize("num_workers", [2, 4])
def test_averaged_gradient_is_the_mean_of_the_shard_gradients(dataset, num_workers):
    config = small_config()
    results = run_replicas(num_workers, dataset, copy_shard_results, dtype="float64", config=config)
    shard = GLOBAL_BATCH // num_workers
    by_hand = [shard_by_hand(dataset, config, rank, shard) for rank in range(num_workers)]
    expected = sum(by_hand[1:], by_hand[0].copy()) / num_workers
    for grad, _, _ in results:
        np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(grad, results[0][0])       # every rank: the same bits


@pytest.mark.parametrize("num_workers", [2, 4])
def test_the_shards_together_are_the_single_worker_global_batch(dataset, num_workers):
    """With distortion on: the crops and flips hash the global batch position, not the shard's."""
    config = small_config(distortion=True)
    single = Trainer(config, dataset, NumpyBackend("NHWC", "float32"))
    single.compute_gradients()
    results = run_replicas(num_workers, dataset, copy_shard_results, config=config)
    np.testing.assert_array_equal(np.concatenate([x for _, x, _ in results]), single.x)
    np.testing.assert_array_equal(np.concatenate([y for _, _, y in results]), single.labels)


def test_augment_first_row_matches_the_global_batch_rows():
    be = NumpyBackend("NCHW", "float32")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 40).astype(np.int32)
    rows = rng.permutation(40)[:12]
    whole, whole_labels = be.empty(be.activation_shape(12, 3, 32, 32)), np.empty(12, np.int32)
    be.augment_batch(images, labels, rows, 7, 3, True, whole, whole_labels)
    part, part_labels = be.empty(be.activation_shape(4, 3, 32, 32)), np.empty(4, np.int32)
    be.augment_batch(images, labels, rows[8:], 7, 3, True, part, part_labels, first_row=8)
    np.testing.assert_array_equal(part, whole[8:])
    be.augment_batch(images, labels, rows[8:], 7, 3, True, part, part_labels)       # first_row 0: other draws
    assert not np.array_equal(part, whole[8:])


# --------------------------------------------------------------------------------------------- replicas


@pytest.mark.parametrize("num_workers", [2, 4])
def test_replicas_stay_bit_identical(dataset, num_workers):
    def body(trainer):
        for _ in range(3):
            trainer.train_step()
        loss = trainer.take_mean_loss()
        trainer.average_moving_statistics()
        return trainer.checkpoint_arrays(), loss, trainer.evaluate(dataset.test)

    results = run_replicas(num_workers, dataset, body)
    arrays0, loss0, eval0 = results[0]
    for arrays, loss, evaluation in results[1:]:
        assert arrays.keys() == arrays0.keys()
        for name in arrays0:                 # params/, bn/ (after averaging) and momentum/
            np.testing.assert_array_equal(arrays[name], arrays0[name], err_msg=name)
        assert loss == loss0 and evaluation == eval0
    assert eval0["images"] == len(dataset.test)      # the sharded evaluation counts each image once


def test_one_replica_through_the_communicator_is_the_single_worker_trainer(dataset):
    """The collectives of a group of one are exact no-ops: same bits as the plain Trainer."""
    def body(trainer):
        for _ in range(2):
            trainer.train_step()
        return trainer.checkpoint_arrays(), trainer.evaluate(dataset.test)

    single = Trainer(small_config(), dataset, NumpyBackend("NHWC", "float32"))
    expected = body(single)
    arrays, evaluation = run_replicas(1, dataset, body)[0]
    for name in expected[0]:
        np.testing.assert_array_equal(arrays[name], expected[0][name], err_msg=name)
    assert evaluation == expected[1]


def test_sharded_evaluation_equals_the_single_worker_evaluation(dataset):
    """Same parameters and statistics: the same correct count; the loss up to the summation order."""
    single = Trainer(small_config(), dataset, NumpyBackend("NHWC", "float64"))
    expected = single.evaluate(dataset.test)
    for num_workers in (2, 4):
        result = run_replicas(num_workers, dataset, lambda t: t.evaluate(dataset.test), dtype="float64")[0]
        assert (result["correct"], result["images"]) == (expected["correct"], expected["images"])
        assert result["loss"] == pytest.approx(expected["loss"], rel=1e-12)


# --------------------------------------------------------------------------------------------- failures


def test_a_failing_worker_stops_the_run_fast_with_its_message():
    group = HostGroup(3)

    def worker(rank, device):
        comm = group.communicator(rank, NumpyBackend())
        if rank == 2:
            time.sleep(0.2)                  # the others are already waiting in the collective
            raise DeviceError("rank 2 could not start")
        comm.all_reduce_sum(np.zeros(3, np.float32))

    started = time.monotonic()
    with pytest.raises(DeviceError, match="^rank 2 could not start$"):
        run_workers(["cpu"] * 3, worker, group)
    assert time.monotonic() - started < FAIL_FAST_S
    with pytest.raises(CommunicatorAborted):     # the group stays aborted: no rank can wait on it again
        group.communicator(0, NumpyBackend()).all_reduce_sum(np.zeros(1, np.float32))


def test_a_bad_device_in_one_worker_fails_the_run():
    group = HostGroup(2)

    def worker(rank, device):
        backend = create_backend(device, "NHWC", "float32")
        group.communicator(rank, backend).broadcast(np.zeros(2, np.float32))

    started = time.monotonic()
    with pytest.raises(DeviceError, match="--gpus"):
        run_workers(["cpu", 99], worker, group)
    assert time.monotonic() - started < FAIL_FAST_S


def test_a_primitive_failing_in_one_replica_fails_the_training_fast(dataset):
    group = HostGroup(2)

    def broken(*args, **kwargs):
        raise FloatingPointError("rank 1: softmax blew up")

    def worker(rank, device):
        backend = NumpyBackend("NHWC", "float32")
        if rank == 1:
            backend.softmax_cross_entropy = broken         # this rank's backend only
        trainer = Trainer(small_config(), dataset, backend, group.communicator(rank, backend))
        trainer.broadcast_state()
        for _ in range(3):
            trainer.train_step()

    started = time.monotonic()
    with pytest.raises(FloatingPointError, match="softmax blew up"):
        run_workers(["cpu", "cpu"], worker, group)
    assert time.monotonic() - started < FAIL_FAST_S


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt in this process during the test. A shell without job control starts
    background commands with SIGINT ignored, and Python then never raises it: the suite run that way
    would fail the Ctrl-C tests for a reason that is not ours."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _default_sigint():
    """preexec_fn: the child starts with SIGINT's default action, whatever this process inherited (above)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_the_caller_aborts_the_workers_and_is_reraised(ctrl_c_raises):
    group = HostGroup(2)
    aborted = []

    def worker(rank, device):
        comm = group.communicator(rank, NumpyBackend())
        if rank == 1:
            time.sleep(1.0)              # busy outside any collective when Ctrl-C comes
        try:
            comm.all_reduce_sum(np.zeros(1, np.float32))
        except CommunicatorAborted:
            aborted.append(rank)
            raise

    threading.Timer(0.3, _thread.interrupt_main).start()          # Ctrl-C while rank 0 waits for rank 1
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_workers(["cpu", "cpu"], worker, group)
    assert time.monotonic() - started < FAIL_FAST_S
    assert sorted(aborted) == [0, 1]     # both left (or never entered) the collective through the abort


# --------------------------------------------------------------------------------------------- CLI


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "cupynet.train", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


CLI_FAST = ["--synthetic", "--gpus", "cpu,cpu", "--num-layers", "8", "--train-batch-size", "16",
            "--eval-batch-size", "16", "--log-interval", "2", "--checkpoint-interval", "2",
            "--validation-size", "20", "--eval-on", "validation"]


def test_cli_two_cpu_workers_train_checkpoint_and_resume_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = run_cli(*CLI_FAST, "--model-dir", resumed, "--train-steps", 4)
    assert first.returncode == 0, first.stderr
    assert "2 workers x 8 (host all-reduce)" in first.stdout and "step 4/4" in first.stdout
    assert "final: validation accuracy" in first.stdout and "(" in first.stdout and "/20)" in first.stdout
    second = run_cli(*CLI_FAST, "--model-dir", resumed, "--train-steps", 6)
    assert second.returncode == 0, second.stderr
    assert "resuming from ckpt-00000004.npz (step 4)" in second.stdout and "step 6/6" in second.stdout
    assert run_cli(*CLI_FAST, "--model-dir", straight, "--train-steps", 6).returncode == 0
    arrays_a, meta_a = load_checkpoint(latest_checkpoint(straight))
    arrays_b, meta_b = load_checkpoint(latest_checkpoint(resumed))
    assert meta_a["step"] == meta_b["step"] == 6
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


def test_cli_two_workers_evaluate_during_training_and_go_on_with_their_own_statistics(tmp_path):
    """--eval-interval with two workers: each evaluation (a collective, at the same step on both) uses the replicas'
    mean moving statistics, as the final one does, then gives each replica its own back: step 2's equals the final
    evaluation of a run that ends there, and the run trains exactly as one without them (no checkpoint in between,
    whose mean would hide a lost replica's statistics)."""
    runs = {name: tmp_path / name for name in ("curve", "plain", "short")}
    for name, steps, more in (("curve", 4, ["--eval-interval", "1"]), ("plain", 4, []), ("short", 2, [])):
        result = run_cli(*CLI_FAST, "--model-dir", runs[name], "--train-steps", steps, "--checkpoint-interval", 100,
                         *more)
        assert result.returncode == 0, result.stderr
    events = read_metrics(runs["curve"])
    during = [e for e in events if e["event"] == "eval_during_training"]
    assert [e["step"] for e in during] == [1, 2, 3] and all(e["images"] == 20 for e in during)
    short_final = read_metrics(runs["short"])[-1]
    assert (during[1]["correct"], during[1]["loss"]) == (short_final["correct"], short_final["loss"])
    arrays_a, _ = load_checkpoint(latest_checkpoint(runs["curve"]))
    arrays_b, _ = load_checkpoint(latest_checkpoint(runs["plain"]))
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    assert (events[-1]["correct"], events[-1]["loss"]) == (read_metrics(runs["plain"])[-1]["correct"],
                                                           read_metrics(runs["plain"])[-1]["loss"])


def wait_for_first_checkpoint(model_dir, process, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not (model_dir.exists() and latest_checkpoint(str(model_dir))):
        assert process.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)


def test_cli_sigint_exits_130_and_keeps_the_last_checkpoint(tmp_path):
    model_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-m", "cupynet.train", *CLI_FAST, "--model-dir", str(model_dir),
                                "--train-steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, preexec_fn=_default_sigint)
    wait_for_first_checkpoint(model_dir, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=FAIL_FAST_S + 30)
    assert process.returncode == 130, stderr
    assert "interrupted: the last complete checkpoint is intact" in stderr
    _, meta = load_checkpoint(latest_checkpoint(str(model_dir)))
    assert meta["step"] >= 2


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_cli_worker_errors_are_one_line(tmp_path):
    """A flag error found before the workers start writes nothing; one raised inside every worker (a
    checkpoint of another depth) still ends as one `error:` line, without a traceback."""
    bad_dtype = run_cli(*CLI_FAST, "--model-dir", tmp_path / "bf16", "--dtype", "bfloat16")
    assert_one_line_error(bad_dtype, "bfloat16")
    assert not (tmp_path / "bf16").exists()
    model_dir = tmp_path / "run"
    assert run_cli(*CLI_FAST, "--model-dir", model_dir, "--train-steps", 2).returncode == 0
    other_depth = run_cli(*CLI_FAST, "--model-dir", model_dir, "--train-steps", 2, "--num-layers", 14)
    assert_one_line_error(other_depth, "num_layers=14")


def test_cli_rejects_a_global_batch_that_does_not_split():
    with pytest.raises(ConfigError, match="2 workers"):
        parse_args(["--gpus", "cpu,cpu", "--train-batch-size", "15"])


def test_reduce_flag():
    assert parse_args([]).reduce == "nccl"
    assert parse_args(["--reduce", "host"]).reduce == "host"
    with pytest.raises(ConfigError, match="--reduce"):
        parse_args(["--reduce", "mpi"])


# --------------------------------------------------------------------------------------------- sync BN


def bn_case(layout, dtype, seed=0, n=6, c=5, h=4, w=3, offset=0.0):
    """Backend, input x, upstream gradient dy and BN parameters of one random BatchNorm call."""
    be = NumpyBackend(layout, dtype)
    rng = np.random.default_rng(seed)
    shape = be.activation_shape(n, c, h, w)
    x = (offset + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    vec = lambda low, high: rng.uniform(low, high, c).astype(dtype)
    return be, x, dy, dict(gamma=vec(0.5, 1.5), beta=vec(-0.5, 0.5), mean=vec(-0.2, 0.2), var=vec(0.5, 2.0))


def run_fused(be, x, dy, p, relu):
    """The fused forward and backward; returns every output, moving statistics included."""
    c = p["gamma"].size
    out = dict(y=np.empty_like(x), dx=np.empty_like(x), mean=np.empty(c, be.dtype), invstd=np.empty(c, be.dtype),
               running_mean=p["mean"].copy(), running_var=p["var"].copy(),
               dgamma=np.empty(c, be.dtype), dbeta=np.empty(c, be.dtype))
    be.batchnorm_train_forward(x, p["gamma"], p["beta"], out["running_mean"], out["running_var"], 0.9, 1e-5,
                               out["y"], out["mean"], out["invstd"], relu=relu)
    be.batchnorm_backward(dy, x, p["gamma"], out["mean"], out["invstd"], out["dx"], out["dgamma"], out["dbeta"],
                          y=out["y"] if relu else None)
    return out


def run_split(be, x, dy, p, relu, shift=None):
    """The split primitives as one worker runs them (nothing to reduce): must equal run_fused."""
    c = p["gamma"].size
    out = dict(y=np.empty_like(x), dx=np.empty_like(x), mean=np.empty(c, be.dtype), invstd=np.empty(c, be.dtype),
               running_mean=p["mean"].copy(), running_var=p["var"].copy(),
               dgamma=np.empty(c, be.dtype), dbeta=np.empty(c, be.dtype))
    m = x.size // c
    shift = out["running_mean"] if shift is None else shift         # aliasing the moving mean, as the layer
    sums = np.empty((2, c), np.float64)
    be.batchnorm_stats(x, shift, sums)
    be.batchnorm_train_from_sums(x, sums, shift, m, p["gamma"], p["beta"], out["running_mean"], out["running_var"],
                                 0.9, 1e-5, out["y"], out["mean"], out["invstd"], relu=relu)
    y = out["y"] if relu else None
    be.batchnorm_backward_sums(dy, x, y, out["mean"], out["invstd"], sums)
    be.batchnorm_backward_from_sums(dy, x, y, p["gamma"], out["mean"], out["invstd"], sums, m,
                                    out["dx"], out["dgamma"], out["dbeta"])
    return out


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("relu", [False, True])
def test_split_batchnorm_primitives_equal_the_fused_ones(layout, relu):
    """One worker's stats -> from_sums and backward_sums -> backward_from_sums are the fused primitives.

    float64: the split forward's one-pass shifted variance and the fused two-pass variance agree to
    rounding (~1e-16 relative; 1e-12 leaves room for the few-operation chains after it)."""
    be, x, dy, p = bn_case(layout, "float64")
    fused, split = run_fused(be, x, dy, p, relu), run_split(be, x, dy, p, relu)
    for name in fused:
        np.testing.assert_allclose(split[name], fused[name], rtol=1e-12, atol=1e-12, err_msg=name)
    for name in ("batchnorm_stats", "batchnorm_train_from_sums", "batchnorm_backward_sums",
                 "batchnorm_backward_from_sums"):
        assert be.calls[name] == 1


def test_the_shifted_sums_keep_float32_statistics_accurate_far_from_zero():
    """|mean| = 1000 x std: unshifted float32 one-pass sums would lose the variance; the moving-mean shift keeps it."""
    be, x, dy, p = bn_case("NHWC", "float32", offset=1000.0)
    ref_be, x64 = NumpyBackend("NHWC", "float64"), x.astype(np.float64)
    expected = run_fused(ref_be, x64, dy.astype(np.float64), {k: v.astype(np.float64) for k, v in p.items()}, False)
    split = run_split(be, x, dy, p, False, shift=np.full(p["gamma"].size, 1000.0, np.float32))
    np.testing.assert_allclose(split["invstd"], expected["invstd"], rtol=1e-5)
    np.testing.assert_allclose(split["dx"], expected["dx"], rtol=1e-3, atol=1e-3)


def train_three_steps(trainer):
    for _ in range(3):
        trainer.train_step()
    return trainer.checkpoint_arrays()


def relative_errors(arrays, expected):
    """Per array: max |a - e| / max |e| (parameters near zero make elementwise ratios meaningless)."""
    return {name: float(np.max(np.abs(arrays[name] - expected[name])) / max(np.max(np.abs(expected[name])), 1e-300))
            for name in expected if name.split("/")[0] in ("params", "momentum", "bn")}


@pytest.mark.parametrize("num_workers", [2, 4])
def test_sync_bn_workers_train_exactly_as_one_worker_with_the_global_batch(dataset, num_workers):
    """Parameters, momentum and BN moving statistics after K=3 steps, N sync-BN workers vs 1 worker.

    float64 throughout, so the only differences are rounding: the shards' sums are added in another
    order, and the split path's one-pass shifted variance differs from the fused two-pass one by a few
    ulps; three steps amplify that far less than to 1e-12 relative. Without --sync-bn each worker
    normalizes with its own 16/N images, which changes the result at the 1e-3 level or more."""
    config = small_config(sync_bn=True)
    expected = train_three_steps(Trainer(config, dataset, NumpyBackend("NHWC", "float64")))
    synced = run_replicas(num_workers, dataset, train_three_steps, dtype="float64", config=config)
    errors = relative_errors(synced[0], expected)
    assert max(errors.values()) < 1e-12, {k: v for k, v in errors.items() if v >= 1e-12}
    for arrays in synced[1:]:                 # the replicas (moving statistics included) stay bit-identical
        for name in arrays:
            np.testing.assert_array_equal(arrays[name], synced[0][name], err_msg=name)

    unsynced = run_replicas(num_workers, dataset, train_three_steps, dtype="float64", config=small_config())
    errors = relative_errors(unsynced[0], expected)
    assert max(v for k, v in errors.items() if k.startswith("params/")) > 1e-6
    assert max(v for k, v in errors.items() if k.startswith("bn/")) > 1e-6


def test_sync_bn_workers_match_one_worker_at_float32_rounding(dataset):
    """The same equivalence in float32, the precision the GPU trains in: 2 sync-BN workers vs 1 worker,
    3 steps. Rounding only (shard sums added in another order): measured 1.6e-6 of each array's largest
    value; 2e-5 leaves a 12x margin, and an unsynchronized BatchNorm misses it by far (above 1e-3)."""
    config = small_config(sync_bn=True)
    expected = train_three_steps(Trainer(config, dataset, NumpyBackend("NHWC", "float32")))
    synced = run_replicas(2, dataset, train_three_steps, dtype="float32", config=config)
    errors = relative_errors(synced[0], expected)
    assert max(errors.values()) < 2e-5, {k: v for k, v in errors.items() if v >= 2e-5}


def test_sync_bn_is_a_no_op_with_one_worker(dataset):
    """A group of one: the trainer does not even route BatchNorm through the communicator."""
    config = small_config(sync_bn=True)
    expected = train_three_steps(Trainer(small_config(), dataset, NumpyBackend("NHWC", "float32")))
    arrays = run_replicas(1, dataset, train_three_steps, config=config)[0]
    for name in expected:
        np.testing.assert_array_equal(arrays[name], expected[name], err_msg=name)


def test_sync_bn_flag():
    assert parse_args([]).sync_bn is False
    assert parse_args(["--sync-bn"]).sync_bn is True


def test_cli_trains_with_sync_bn(tmp_path):
    result = run_cli(*CLI_FAST, "--sync-bn", "--model-dir", tmp_path / "run", "--train-steps", 2)
    assert result.returncode == 0, result.stderr
    assert "2 workers x 8 (host all-reduce, sync BN)" in result.stdout and "step 2/2" in result.stdout


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_nccl_with_one_rank():
    from cupynet.backends.cupy_backend import CupyBackend
    from cupynet.parallel import NcclGroup
    group = NcclGroup([0])
    backend = CupyBackend(0, "NHWC", "float32")
    comm = group.communicator(0, backend)
    values = np.arange(300, dtype=np.float32)
    array = backend.from_host(values)
    comm.all_reduce_mean(array)
    comm.all_reduce_sum(array)
    comm.broadcast(array, root=0)
    count = backend.from_host(np.array(7, dtype=np.int64))
    comm.all_reduce_sum(count)
    np.testing.assert_array_equal(backend.to_host(array), values)
    assert int(backend.to_host(count)) == 7
    comm.abort()


@pytest.mark.gpu
def test_two_workers_sharing_one_gpu_through_the_host_communicator(dataset):
    from cupynet.backends.cupy_backend import CupyBackend
    config = small_config(distortion=True)
    group = HostGroup(2)

    def worker(rank, device):
        backend = CupyBackend(device, "NHWC", "float32", tf32=False)
        trainer = Trainer(config, dataset, backend, group.communicator(rank, backend))
        trainer.broadcast_state()
        trainer.compute_gradients()
        x = backend.to_host(trainer.x)
        for _ in range(2):
            trainer.train_step()
        trainer.average_moving_statistics()
        return x, trainer.checkpoint_arrays()

    results = run_workers([0, 0], worker, group)
    single = Trainer(config, dataset, NumpyBackend("NHWC", "float32"))
    single.compute_gradients()
    np.testing.assert_array_equal(np.concatenate([x for x, _ in results]), single.x)   # kernel's first_row
    for name, value in results[0][1].items():
        np.testing.assert_array_equal(results[1][1][name], value, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("relu", [False, True])
def test_cupy_split_batchnorm_primitives_match_numpy(layout, relu):
    """The GPU's split sync-BN primitives against the NumPy twin (float32; sums reduced by nobody)."""
    from cupynet.backends.cupy_backend import CupyBackend
    be, x, dy, p = bn_case(layout, "float32", n=8, c=24, h=6, w=5, offset=3.0)
    gpu = CupyBackend(0, layout, "float32")
    c, m = p["gamma"].size, x.size // p["gamma"].size
    put = gpu.from_host
    shift = put(p["mean"])
    expected = run_split(be, x, dy, p, relu, shift=p["mean"].copy())
    out = dict(y=gpu.empty(x.shape), dx=gpu.empty(x.shape), mean=gpu.empty((c,), "float32"),
               invstd=gpu.empty((c,), "float32"), running_mean=put(p["mean"]), running_var=put(p["var"]),
               dgamma=gpu.empty((c,), "float32"), dbeta=gpu.empty((c,), "float32"))
    sums = gpu.empty((2, c), "float64")
    xg, dyg, gamma = put(x), put(dy), put(p["gamma"])
    gpu.batchnorm_stats(xg, shift, sums)
    gpu.batchnorm_train_from_sums(xg, sums, shift, m, gamma, put(p["beta"]), out["running_mean"], out["running_var"],
                                  0.9, 1e-5, out["y"], out["mean"], out["invstd"], relu=relu)
    y = out["y"] if relu else None
    gpu.batchnorm_backward_sums(dyg, xg, y, out["mean"], out["invstd"], sums)
    gpu.batchnorm_backward_from_sums(dyg, xg, y, gamma, out["mean"], out["invstd"], sums, m,
                                     out["dx"], out["dgamma"], out["dbeta"])
    for name, value in expected.items():
        scale = float(np.max(np.abs(value)))
        np.testing.assert_allclose(gpu.to_host(out[name]), value, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


@pytest.mark.gpu
def test_a_failing_worker_releases_its_nccl_peer_and_its_error_is_reported(two_gpus):
    """Rank 1 fails before its all-reduce; rank 0, inside its own, is released by the abort and the run ends
    promptly with rank 1's error."""
    from cupynet.backends.cupy_backend import CupyBackend
    from cupynet.parallel import NcclGroup
    group = NcclGroup(two_gpus)

    def worker(rank, device):
        backend = CupyBackend(device, "NHWC", "float32")
        comm = group.communicator(rank, backend)
        if rank == 1:
            time.sleep(0.5)
            raise ValueError("rank 1 could not load its shard")
        comm.all_reduce_sum(backend.from_host(np.ones(1000, np.float32)))
        backend.synchronize()                  # waits for the collective, which only the abort can end
        return "finished"

    started = time.monotonic()
    with pytest.raises(ValueError, match="rank 1 could not load its shard"):
        run_workers(two_gpus, worker, group)
    assert time.monotonic() - started < 30
