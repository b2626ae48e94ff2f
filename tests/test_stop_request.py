"""SIGTERM stops a run gracefully: the workers agree on a step, a checkpoint is saved there, the rerun resumes.

The agreement is tested with real threads held together at every step by a barrier, as the gradient all-reduce
holds data-parallel workers together: a worker that stopped a step before the others would leave them waiting at
the barrier (a broken barrier, here). The command line is tested with real signals sent to `cupynet.train`, and
with its output pipe closed (the other way a run is stopped from outside).
"""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cupynet.checkpoint import latest_checkpoint, load_checkpoint
from cupynet.stop_request import StopRequest
from cupynet.report import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lockstep_workers(stop, workers, start_step, max_steps, request_after_s, seed):
    """`workers` threads stepping from `start_step` in lockstep (a barrier per step, as the all-reduce), each
    asking `stop` at every boundary; the main thread requests the stop after `request_after_s`. Returns the step
    each worker stopped at (None: it ran to max_steps)."""
    barrier = threading.Barrier(workers, timeout=5)
    stopped_at = [None] * workers
    errors = []

    def worker(rank):
        jitter = random.Random(seed * 100 + rank)
        step = start_step
        try:
            while not stop.should_stop(rank, step):
                if step >= max_steps:
                    return
                barrier.wait()                           # the step's all-reduce
                time.sleep(jitter.uniform(0, 0.002))     # the rest of the step: ranks reach the next boundary
                step += 1                                # at different times
            stopped_at[rank] = step
        except threading.BrokenBarrierError as error:
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(workers)]
    for thread in threads:
        thread.start()
    time.sleep(request_after_s)
    stop.request()
    for thread in threads:
        thread.join(10)
    assert not errors, "a worker was left waiting at a step the others had stopped before"
    return stopped_at


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_workers_held_together_by_a_collective_all_stop_at_the_same_step(workers):
    for trial in range(20):
        stop = StopRequest()
        stopped_at = lockstep_workers(stop, workers, start_step=7, max_steps=10**6,
                                      request_after_s=random.Random(trial).uniform(0.0, 0.05), seed=trial)
        assert len(set(stopped_at)) == 1 and stopped_at[0] == stop.stop_step >= 7, (trial, stopped_at)


def test_a_request_before_any_step_stops_every_worker_where_it_started():
    stop = StopRequest()
    stop.request()                                    # during setup: no worker has reached a boundary yet
    assert lockstep_workers(stop, 3, start_step=40, max_steps=10**6, request_after_s=0, seed=1) == [40, 40, 40]


def test_a_boundary_asked_again_gets_the_same_answer():
    """train_loop asks once more at the step where its run ended: a request that came in between must not make
    one worker stop where another went on to evaluate."""
    stop = StopRequest()
    assert not stop.should_stop(0, 5)
    stop.request()
    assert stop.stop_step == 6
    assert not stop.should_stop(0, 5) and not stop.should_stop(1, 5)
    assert stop.should_stop(0, 6) and stop.should_stop(1, 7)


def test_a_run_to_its_target_is_not_stopped():
    stop = StopRequest()
    assert lockstep_workers(stop, 2, start_step=0, max_steps=3, request_after_s=0.5, seed=2) == [None, None]


# ------------------------------------------------------------------------------------------- command line

FAST = ["--synthetic", "--num-layers", "8", "--train-batch-size", "16", "--eval-batch-size", "16",
        "--log-interval", "1", "--checkpoint-interval", "1000", "--validation-size", "20", "--eval-on", "validation"]


def cupynet_train(*args, **popen):
    # Without PYTHONUNBUFFERED, as a user's shell runs it: the lines must come through the pipe as printed.
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONUNBUFFERED", None)
    return subprocess.Popen([sys.executable, "-m", "cupynet.train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def wait_for_progress(process, step_lines=1):
    """Read the run's output until `step_lines` progress lines have come: a step has just ended. Returns its step."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("step") and (step_lines := step_lines - 1) == 0:
            return int(line.split()[1].split("/")[0])
    raise AssertionError("the run ended before its progress lines: " + "".join(seen) + process.stderr.read())


def checkpoint_step(model_dir):
    return load_checkpoint(latest_checkpoint(str(model_dir)))[1]["step"]


@pytest.mark.parametrize("gpus", ["cpu", "cpu,cpu"])
def test_sigterm_saves_the_step_reached_and_the_rerun_continues_as_if_never_stopped(tmp_path, gpus):
    stopped_dir, straight_dir = tmp_path / "stopped", tmp_path / "straight"
    process = cupynet_train(*FAST, "--gpus", gpus, "--model-dir", stopped_dir, "--train-steps", 100000)
    wait_for_progress(process, step_lines=2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    step = checkpoint_step(stopped_dir)          # not a periodic one: --checkpoint-interval 1000
    assert 2 <= step < 1000
    assert stderr.strip().splitlines() == [f"terminated (SIGTERM) at step {step}: ckpt-{step:08d}.npz holds it; "
                                           "rerun the same command to resume"]
    events = (stopped_dir / "metrics.jsonl").read_text()
    assert '"event": "stopped", ' in events and '"eval"' not in events

    target = step + 2
    outputs = []
    for model_dir in (stopped_dir, straight_dir):
        rerun = cupynet_train(*FAST, "--gpus", gpus, "--model-dir", model_dir, "--train-steps", target)
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        outputs.append(out)
    assert f"resuming from ckpt-{step:08d}.npz (step {step})" in outputs[0]
    arrays_a, meta_a = load_checkpoint(latest_checkpoint(str(stopped_dir)))
    arrays_b, meta_b = load_checkpoint(latest_checkpoint(str(straight_dir)))
    assert meta_a["step"] == meta_b["step"] == target
    assert sum("moving_" in name for name in arrays_a) > 0
    for name in arrays_a:
        if "moving_" in name and gpus == "cpu,cpu":
            # A checkpoint holds the replicas' mean moving statistics, and they go on from that mean: the straight
            # run, with no checkpoint at the stop's step, averaged them only at the end. The same sums in another
            # order: float32 rounding apart (measured: 1.1e-7 relative). Parameters and momentum: identical.
            np.testing.assert_allclose(arrays_a[name], arrays_b[name], rtol=1e-5, atol=1e-9, err_msg=name)
        else:
            np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


def test_a_second_sigterm_leaves_at_once_with_the_last_complete_checkpoint(tmp_path):
    """ResNet-20 steps of 128 images take about a second here (0.54 s at 64; longer under load): both signals come
    early in the step after a progress line, so the first one's stop, due at that step's end, is not done when the
    second comes."""
    model_dir = tmp_path / "run"
    resnet20 = ["--synthetic", "--gpus", "cpu", "--num-layers", "20", "--train-batch-size", "128", "--log-interval",
                "1", "--checkpoint-interval", "1000", "--validation-size", "20", "--eval-on", "validation",
                "--eval-batch-size", "20", "--model-dir", model_dir]
    first = cupynet_train(*resnet20, "--train-steps", 1)
    assert first.communicate(timeout=120) and first.returncode == 0
    process = cupynet_train(*resnet20, "--train-steps", 1000)
    wait_for_progress(process, step_lines=1)               # step 2 done; nothing saved since step 1
    time.sleep(0.1)                                        # step 3 under way
    process.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["terminated (a second SIGTERM): the last complete checkpoint is intact; "
                                           "rerun the same command to resume"]
    assert checkpoint_step(model_dir) == 1                 # the first stop's checkpoint was never begun
    assert sorted(os.listdir(model_dir)) == [".lock", "checkpoint.json", "ckpt-00000001.npz", "metrics.jsonl"]


def test_a_closed_output_pipe_stops_the_run_without_a_traceback(tmp_path):
    """`python -m cupynet.train | head`: when the reader goes, the next progress line finds the pipe closed (a line
    each step here; with the 8 KB of lines a pipe's buffer holds unflushed, the run would go on for about 80 steps)."""
    model_dir = tmp_path / "run"
    process = cupynet_train(*FAST, "--gpus", "cpu", "--model-dir", model_dir, "--train-steps", 100000)
    step_read = wait_for_progress(process, step_lines=1)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141, stderr
    assert stderr.strip().splitlines() == ["stopped: the output pipe was closed; the last complete checkpoint is "
                                           "intact"]
    last_logged = max(event["step"] for event in read_metrics(model_dir) if event["event"] == "train")
    assert step_read <= last_logged < step_read + 10


def test_a_stop_requested_during_setup_trains_nothing_and_saves_nothing_new(tmp_path):
    """A SIGTERM before the first step (during the data load or the backend's setup): the run stops where it
    started, fresh with nothing to save, resumed with the checkpoint it resumed from."""
    from cupynet.config import parse_args
    from cupynet.train import run
    model_dir = tmp_path / "run"
    config = parse_args([*FAST, "--gpus", "cpu", "--model-dir", str(model_dir), "--train-steps", "3"])
    stop = StopRequest()
    stop.request()
    result = run(config, out=lambda *args: None, stop=stop)
    assert result["stopped_at"] == 0 and result["checkpoint"] is None and "accuracy" not in result
    assert latest_checkpoint(str(model_dir)) is None
    assert "accuracy" in run(config, out=lambda *args: None) and checkpoint_step(model_dir) == 3
    more = parse_args([*FAST, "--gpus", "cpu", "--model-dir", str(model_dir), "--train-steps", "6"])
    stop = StopRequest()
    stop.request()
    result = run(more, out=lambda *args: None, stop=stop)
    assert result["stopped_at"] == 3 and result["checkpoint"] == latest_checkpoint(str(model_dir))
    assert checkpoint_step(model_dir) == 3 and len(list(model_dir.glob("ckpt-*.npz"))) == 1


def test_the_handler_is_installed_in_the_main_thread_only_and_removed_after():
    from cupynet.stop_request import Terminated, stop_on_sigterm
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    with stop_on_sigterm(stop):
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)                    # the first: a request, nothing raised
        assert stop.requested
        with pytest.raises(Terminated):
            handler(signal.SIGTERM, None)                # the second: leave at once
    assert signal.getsignal(signal.SIGTERM) is before
    in_thread = []
    thread = threading.Thread(target=lambda: in_thread.append(stop_on_sigterm(StopRequest()).__enter__()))
    thread.start()
    thread.join()
    assert in_thread and signal.getsignal(signal.SIGTERM) is before    # no ValueError, nothing installed
