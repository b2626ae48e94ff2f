"""`python -m cupynet.train` end to end: training, metrics, checkpoints, resume, and every kind of bad input.

Runs the real command in a subprocess on a tiny real CIFAR-10 folder cut from the built-in sample
(5 x 40 training images, 50 test images) with a ResNet-8, so each run takes a second or two.
"""
import json
import os
import pickle
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from cupynet.checkpoint import latest_checkpoint, load_checkpoint
from cupynet.data import (TEST_BATCH_NAME, TRAIN_BATCH_NAMES, builtin_sample_dir, read_batch_file,
                          write_batch_file, write_meta_file, CLASS_NAMES)
from cupynet.report import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--num-layers", "8", "--train-batch-size", "16", "--eval-batch-size", "16",
        "--log-interval", "2", "--checkpoint-interval", "2", "--validation-size", "20"]


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "cupynet.train", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """A real CIFAR-10 folder in the official layout: 5 x 40 training images, 50 test images."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    sample = builtin_sample_dir()
    for name in TRAIN_BATCH_NAMES:
        images, labels = read_batch_file(os.path.join(sample, name))
        write_batch_file(str(root / name), images[:40], labels[:40], f"tiny {name}")
    images, labels = read_batch_file(os.path.join(sample, TEST_BATCH_NAME))
    pick = np.arange(0, 500, 10)          # the sample's test batch is grouped by class: take every 10th
    write_batch_file(str(root / TEST_BATCH_NAME), images[pick], labels[pick], "tiny test")
    write_meta_file(str(root / "batches.meta"), list(CLASS_NAMES))
    return root


def copy_dataset(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------------------------- training


def test_short_training_run_reports_checkpoints_and_logs(tiny_cifar, tmp_path):
    model_dir = tmp_path / "run"
    result = run_cli("--data-dir", tiny_cifar, "--model-dir", model_dir, "--train-steps", 4, *FAST)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "180 train, 20 validation, 50 test" in out
    assert "step 2/4" in out and "step 4/4" in out and "img/s" in out and "ETA" in out
    assert "final: test accuracy" in out and "global step 4" in out
    events = read_metrics(model_dir)
    assert [e["event"] for e in events] == ["start", "train", "train", "eval"]
    assert events[-1]["images"] == 50 and events[-1]["step"] == 4 and 0 <= events[-1]["accuracy"] <= 1
    # the data loaded in a thread of its own beside the backend's setup: its phase is the wait for it after that
    assert re.search(r"^setup [\d.]+s: backend [\d.]+s, data [\d.]+s \(loaded beside the backend [\d.]+s\), "
                     r"model [\d.]+s$", out, re.MULTILINE), out
    assert set(events[-1]["setup_phases"]) == {"data", "backend", "model"}
    assert list(events[-1]["setup_parts"]) == ["data"] and 0 <= events[-1]["eval_seconds"] <= events[-1]["wall_seconds"]
    assert 0 <= sum(events[-1]["setup_phases"].values()) <= events[-1]["setup_seconds"] + 0.01
    assert events[1]["lr"] == 0.1 and events[1]["loss"] > 0 and events[1]["total_loss"] > events[1]["loss"]
    _, meta = load_checkpoint(latest_checkpoint(model_dir))
    assert meta["step"] == 4 and meta["num_layers"] == 8 and meta["config"]["train_batch_size"] == 16


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(tiny_cifar, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli("--data-dir", tiny_cifar, "--model-dir", straight, "--train-steps", 6, *FAST).returncode == 0
    assert run_cli("--data-dir", tiny_cifar, "--model-dir", resumed, "--train-steps", 2, *FAST).returncode == 0
    second = run_cli("--data-dir", tiny_cifar, "--model-dir", resumed, "--train-steps", 6, *FAST)
    assert second.returncode == 0, second.stderr
    assert "resuming from ckpt-00000002.npz (step 2)" in second.stdout
    assert "step 4/6" in second.stdout and "step 2/6" not in second.stdout
    arrays_a, meta_a = load_checkpoint(latest_checkpoint(straight))
    arrays_b, meta_b = load_checkpoint(latest_checkpoint(resumed))
    assert meta_a["step"] == meta_b["step"] == 6
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:      # parameters, BN statistics and momentum: bit for bit
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    assert read_metrics(straight)[-1]["accuracy"] == read_metrics(resumed)[-1]["accuracy"]
    assert "changed since the checkpoint" not in second.stdout
    # a third run of the same command has nothing left to train: it only evaluates
    third = run_cli("--data-dir", tiny_cifar, "--model-dir", resumed, "--train-steps", 6, *FAST)
    assert third.returncode == 0 and "nothing to train" in third.stdout and "global step 6" in third.stdout


def test_a_rerun_with_another_recipe_says_what_changed(tiny_cifar, tmp_path):
    """Resuming with other training flags (on purpose, or one forgotten) trains another experiment: the run says
    which of them differ from the checkpoint's; speed and bookkeeping flags are not listed."""
    model_dir = tmp_path / "run"
    assert run_cli("--data-dir", tiny_cifar, "--model-dir", model_dir, "--train-steps", 2, *FAST).returncode == 0
    other = run_cli("--data-dir", tiny_cifar, "--model-dir", model_dir, "--train-steps", 4, *FAST,
                    "--weight-decay", "2e-4", "--lr-values", "0.2,0.02", "--lr-boundaries", "50", "--no-distortion",
                    "--log-interval", "1", "--keep-checkpoints", "2", "--validation-size", "40", "--gpus", "cpu,cpu")
    assert other.returncode == 0, other.stderr
    assert "  (changed since the checkpoint: training images 180 -> 160, workers 1 -> 2, --weight-decay 0.0001 -> " \
           "0.0002, --lr-values 0.1,0.01,0.001,0.0002 -> 0.2,0.02, --lr-boundaries 82,123,300 -> 50, distortion on " \
           "-> off)\n" in other.stdout, other.stdout


def test_evaluations_during_training_print_an_accuracy_curve_and_leave_the_training_as_it_was(tiny_cifar, tmp_path):
    """--eval-interval 2 evaluates at steps 2 and 4 of 6 (the final evaluation is step 6's): each equals the final
    evaluation of a run that ends at that step, and the run trains exactly as one without them."""
    runs = {name: tmp_path / name for name in ("curve", "plain", "short")}
    curve = run_cli("--data-dir", tiny_cifar, "--model-dir", runs["curve"], "--train-steps", 6, *FAST,
                    "--eval-interval", 2)
    assert curve.returncode == 0, curve.stderr
    for name, steps in (("plain", 6), ("short", 4)):
        assert run_cli("--data-dir", tiny_cifar, "--model-dir", runs[name], "--train-steps", steps,
                       *FAST).returncode == 0
    events = read_metrics(runs["curve"])
    during = [e for e in events if e["event"] == "eval_during_training"]
    assert [e["step"] for e in during] == [2, 4] and all(e["images"] == 50 and e["split"] == "test" for e in during)
    for event in during:
        assert re.search(rf"^step {event['step']}/6  epoch +[\d.]+  test accuracy [\d.]+% \({event['correct']}/50\), "
                         rf"loss {event['loss']:.4f} \(evaluated in [\d.]+s\)$", curve.stdout, re.MULTILINE), curve.stdout
    short_final = read_metrics(runs["short"])[-1]
    assert (during[1]["correct"], during[1]["loss"]) == (short_final["correct"], short_final["loss"])
    final, plain_final = events[-1], read_metrics(runs["plain"])[-1]
    assert final["event"] == "eval" and final["evaluations_during_training"] == 2
    assert (final["correct"], final["loss"]) == (plain_final["correct"], plain_final["loss"])
    assert "train " in curve.stdout and ", 2 evaluations during training " in curve.stdout
    arrays_a, _ = load_checkpoint(latest_checkpoint(runs["curve"]))
    arrays_b, _ = load_checkpoint(latest_checkpoint(runs["plain"]))
    for name in arrays_a:      # parameters, BN statistics and momentum: bit for bit
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


@pytest.mark.parametrize("gpus", ["cpu", "cpu,cpu"])
def test_a_model_dir_removed_during_the_run_ends_it_with_one_line(tiny_cifar, tmp_path, gpus):
    """The run's next write after the model dir is gone (the metrics line after a progress line) is a one-line error,
    as an unwritable model dir is at the start (a checkpoint's: tests/test_checkpoint.py), with every worker
    stopped."""
    import shutil
    from cupynet.config import parse_args
    from cupynet.errors import CupynetError
    from cupynet.train import run
    model_dir = tmp_path / "run"
    config = parse_args(["--data-dir", str(tiny_cifar), "--model-dir", str(model_dir), "--train-steps", "6", *FAST,
                         "--gpus", gpus])

    def out(line):
        if line.startswith("step 2/6"):
            shutil.rmtree(model_dir)

    with pytest.raises(CupynetError) as raised:
        run(config, out=out)
    assert str(raised.value) == f"cannot write {model_dir}/metrics.jsonl: No such file or directory"
    assert not model_dir.exists()


@pytest.mark.parametrize("gpus, log_interval, checkpoint_interval, found", [
    ("cpu", 1, 1000, "its mean loss since step "),                 # found at a progress line
    ("cpu", 1000, 2, "no longer finite (NaN or infinity)"),        # found before a checkpoint (a moving variance)
    ("cpu,cpu", 1, 1000, "its mean loss since step "),             # every worker finds it at the same step
    ("cpu,cpu", 1000, 2, "no longer finite (NaN or infinity)"),
])
def test_a_diverging_run_stops_with_one_line_before_it_checkpoints_the_damage(tiny_cifar, tmp_path, gpus, log_interval,
                                                                               checkpoint_interval, found):
    """A learning rate of 10^5: the loss, or a moving variance, stop being finite within a few steps. The run stops
    at the progress line (or the checkpoint) that finds it, in one line; every checkpoint left holds finite
    numbers."""
    model_dir = tmp_path / "run"
    result = run_cli("--data-dir", tiny_cifar, "--model-dir", model_dir, "--train-steps", 40, *FAST,
                     "--log-interval", log_interval, "--checkpoint-interval", checkpoint_interval,
                     "--lr-values", "1e5,1", "--lr-boundaries", 100, "--gpus", gpus)
    assert_one_line_error(result, "the training diverged by step ", found, "(a lower --lr-values may help)")
    step = read_metrics(model_dir)[-1]
    assert step["event"] == "diverged" and f"by step {step['step']}:" in result.stderr

    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}, which standard JSON has not")

    with open(model_dir / "metrics.jsonl") as f:      # the non-finite loss is null there
        events = [json.loads(line, parse_constant=refuse) for line in f]
    if found.startswith("its mean loss"):
        assert events[-2]["event"] == "train" and events[-2]["total_loss"] is None
    saved = [name for name in os.listdir(model_dir) if name.startswith("ckpt-")]
    for name in saved:
        arrays, meta = load_checkpoint(model_dir / name)
        assert meta["step"] < step["step"] and all(np.isfinite(a).all() for a in arrays.values()), name
    latest = latest_checkpoint(model_dir)
    assert (f"{os.path.basename(latest)}, from before it, is the latest checkpoint" if latest else
            "no checkpoint was saved") in result.stderr


def test_a_second_run_on_a_model_dir_in_use_is_refused_and_the_first_goes_on(tiny_cifar, tmp_path):
    """The same command started twice: the second ends at once with one line naming the first's pid; the first
    trains on undisturbed; once it has ended (however: the lock dies with its process), the dir is free again."""
    import signal
    import time
    model_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = subprocess.Popen([sys.executable, "-m", "cupynet.train", "--data-dir", str(tiny_cifar), "--model-dir",
                              str(model_dir), "--train-steps", "100000", *FAST], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(model_dir) is None:      # training, with the lock held
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not get going"
            time.sleep(0.1)
        second = run_cli("--data-dir", tiny_cifar, "--model-dir", model_dir, "--train-steps", 100000, *FAST)
        assert_one_line_error(second, f"model dir {model_dir} is in use by another run (pid {first.pid})",
                              "--model-dir")
        assert first.poll() is None                     # undisturbed
    finally:
        first.send_signal(signal.SIGKILL)               # no graceful stop: the lock must die with the process
        first.communicate(timeout=60)
    third = run_cli("--data-dir", tiny_cifar, "--model-dir", model_dir, "--train-steps", 2, *FAST)
    assert third.returncode == 0, third.stderr


def test_checkpoint_from_another_architecture_is_refused_and_left_intact(tiny_cifar, tmp_path):
    model_dir = tmp_path / "run"
    assert run_cli("--data-dir", tiny_cifar, "--model-dir", model_dir, "--train-steps", 2, *FAST).returncode == 0
    kept = ("metrics.jsonl", ".lock")     # the run's log, and its lock (which holds the pid of its latest holder)
    before = {name: (model_dir / name).read_bytes() for name in os.listdir(model_dir) if name not in kept}
    result = run_cli("--data-dir", tiny_cifar, "--model-dir", model_dir, "--train-steps", 2, *FAST,
                     "--num-layers", 14)
    assert_one_line_error(result, "num_layers=8", "num_layers=14")
    after = {name: (model_dir / name).read_bytes() for name in os.listdir(model_dir) if name not in kept}
    assert after == before and "ckpt-00000002.npz" in after


@pytest.mark.parametrize("damage, fragment", [
    (lambda arrays, meta: arrays.__setitem__("params/logits/w", arrays["params/logits/w"] * np.nan),
     "'params/logits/w' holds NaN or infinity"),
    (lambda arrays, meta: meta["rng"].__setitem__("seed", -3), "its seed -3 is not from 0 to"),
])
def test_a_damaged_checkpoint_is_refused_at_resume_in_one_line(tiny_cifar, tmp_path, damage, fragment):
    """A checkpoint edited by hand or damaged where its CRCs cannot see (written so by another program): never
    loaded into a run that would train on garbage."""
    from cupynet.checkpoint import save_checkpoint
    model_dir = tmp_path / "run"
    assert run_cli("--data-dir", tiny_cifar, "--model-dir", model_dir, "--train-steps", 2, *FAST).returncode == 0
    arrays, meta = load_checkpoint(latest_checkpoint(str(model_dir)))
    damage(arrays, meta)
    save_checkpoint(model_dir, meta.pop("step"), arrays, meta)
    result = run_cli("--data-dir", tiny_cifar, "--model-dir", model_dir, "--train-steps", 4, *FAST)
    assert_one_line_error(result, "ckpt-00000002.npz", fragment)
    assert latest_checkpoint(str(model_dir)).endswith("ckpt-00000002.npz")


@pytest.mark.parametrize("redirect", [">/dev/full", ">&-"])
def test_an_output_that_cannot_be_written_ends_the_run_in_one_line(tiny_cifar, tmp_path, redirect):
    """A full disk under the output: one line, and no model dir left behind by a run that wrote nothing into it.
    A closed output (`>&-`): Python prints nothing, and the run trains and saves as usual."""
    model_dir = tmp_path / "run"
    command = [sys.executable, "-m", "cupynet.train", "--data-dir", tiny_cifar, "--model-dir", model_dir,
               "--train-steps", 2, *FAST]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(" ".join(map(str, command)) + " " + redirect, shell=True, capture_output=True,
                            text=True, env=env, timeout=300)
    if redirect == ">&-":
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert latest_checkpoint(str(model_dir)).endswith("ckpt-00000002.npz")
        return
    assert_one_line_error(result, "cannot write the output: No space left on device")
    assert not model_dir.exists()


def test_demo_defaults_without_data_dir_and_explicit_flags_win():
    from cupynet.config import parse_args
    demo = parse_args([])
    assert (demo.dataset_kind, demo.num_layers, demo.bn_decay) == ("sample", 8, 0.9)
    assert demo.model_dir == "runs/sample-resnet8-v1"
    assert parse_args(["--num-layers", "20"]).num_layers == 20
    full = parse_args(["--data-dir", "/somewhere"])
    assert (full.num_layers, full.train_steps, full.train_batch_size, full.bn_decay) == (44, 80000, 128, 0.997)
    assert full.weight_decay == 1e-4 and full.momentum == 0.9 and full.bn_epsilon == 1e-5
    assert (full.cuda_graph, full.conv_autotune) == ("auto", True)       # the fast GPU defaults
    assert (full.conv_deterministic, full.wgrad_streams, full.wgrad_chunks) == (True, 1, 1)   # reproducible bits
    assert full.conv_split_k is False and parse_args(["--conv-split-k"]).conv_split_k is True
    assert full.conv_init == "he_normal" and parse_args(["--conv-init", "glorot_uniform"]).conv_init == "glorot_uniform"
    exact = parse_args(["--cuda-graph", "off", "--no-conv-autotune"])
    assert (exact.cuda_graph, exact.conv_autotune) == ("off", False)
    loose = parse_args(["--no-conv-deterministic", "--wgrad-streams", "3", "--wgrad-chunks", "2"])
    assert (loose.conv_deterministic, loose.wgrad_streams, loose.wgrad_chunks) == (False, 3, 2)


def test_the_data_loads_in_a_thread_of_its_own_while_the_run_goes_on(tiny_cifar, tmp_path):
    """train.load_in_background returns while the load is still reading (a batch file that is a named pipe, written
    only once the call has returned), and `result()` then gives what a plain load gives. No timing involved: a load
    in the caller's thread would wait for the pipe until the writer gives up waiting (30 s) and writes anyway, and
    the load would then be done when the call returns."""
    from cupynet.config import parse_args
    from cupynet.train import load_dataset, load_in_background
    data = copy_dataset(tiny_cifar, tmp_path / "data")
    contents = (data / "data_batch_2").read_bytes()
    (data / "data_batch_2").unlink()
    os.mkfifo(data / "data_batch_2")
    constructed = threading.Event()

    def write_the_pipe():           # opening the pipe waits for the load's reader
        constructed.wait(timeout=30)
        with open(data / "data_batch_2", "wb") as pipe:
            pipe.write(contents)
    writer = threading.Thread(target=write_the_pipe, daemon=True)
    writer.start()
    loading = load_in_background(parse_args(["--data-dir", str(data), *FAST]))
    assert not loading.done()
    constructed.set()
    dataset = loading.result()
    writer.join(timeout=60)
    assert loading.seconds is not None and loading.seconds >= 0
    plain = load_dataset(parse_args(["--data-dir", str(tiny_cifar), *FAST]))
    for split in ("train", "validation", "test"):
        ours, reference = getattr(dataset, split), getattr(plain, split)
        assert np.array_equal(ours.images, reference.images) and np.array_equal(ours.labels, reference.labels)


# --------------------------------------------------------------------------------------------- bad input


def test_missing_data_dir(tmp_path):
    result = run_cli("--data-dir", tmp_path / "nowhere", "--model-dir", tmp_path / "run", *FAST)
    assert_one_line_error(result, "nowhere")
    assert not (tmp_path / "run").exists()


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    """The downloaded archive itself passed as --data-dir: the error says to extract it, not that nothing is there."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really")
    result = run_cli("--data-dir", archive, "--model-dir", tmp_path / "run", *FAST)
    assert_one_line_error(result, str(archive), "a file, not a data folder", "extract it")
    assert not (tmp_path / "run").exists()


def test_missing_batch_file(tiny_cifar, tmp_path):
    data = copy_dataset(tiny_cifar, tmp_path / "data")
    (data / "data_batch_3").unlink()
    result = run_cli("--data-dir", data, "--model-dir", tmp_path / "run", *FAST)
    assert_one_line_error(result, "data_batch_3")
    assert not (tmp_path / "run").exists()


def test_truncated_pickle(tiny_cifar, tmp_path):
    data = copy_dataset(tiny_cifar, tmp_path / "data")
    content = (data / "data_batch_2").read_bytes()
    (data / "data_batch_2").write_bytes(content[:len(content) // 2])
    result = run_cli("--data-dir", data, "--model-dir", tmp_path / "run", *FAST)
    assert_one_line_error(result, "data_batch_2")
    assert not (tmp_path / "run").exists()


def test_corrupt_pickle(tiny_cifar, tmp_path):
    data = copy_dataset(tiny_cifar, tmp_path / "data")
    (data / "test_batch").write_bytes(np.random.default_rng(0).bytes(5000))
    result = run_cli("--data-dir", data, "--model-dir", tmp_path / "run", *FAST)
    assert_one_line_error(result, "test_batch")
    assert not (tmp_path / "run").exists()


def write_raw_batch(path, data, labels):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": []}, f, protocol=2)


def test_wrong_array_shape(tiny_cifar, tmp_path):
    data = copy_dataset(tiny_cifar, tmp_path / "data")
    write_raw_batch(data / "data_batch_4", np.zeros((40, 3000), np.uint8), [0] * 40)
    result = run_cli("--data-dir", data, "--model-dir", tmp_path / "run", *FAST)
    assert_one_line_error(result, "data_batch_4")
    assert not (tmp_path / "run").exists()


def test_labels_out_of_range(tiny_cifar, tmp_path):
    data = copy_dataset(tiny_cifar, tmp_path / "data")
    write_raw_batch(data / "data_batch_1", np.zeros((40, 3072), np.uint8), [3] * 39 + [10])
    result = run_cli("--data-dir", data, "--model-dir", tmp_path / "run", *FAST)
    assert_one_line_error(result, "data_batch_1")
    assert not (tmp_path / "run").exists()


class CallsAFunction:
    """Unpickling this would run os.system: the classic pickle code-execution hole."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_tries_to_call_a_function(tiny_cifar, tmp_path):
    data = copy_dataset(tiny_cifar, tmp_path / "data")
    marker = tmp_path / "pwned"
    with open(data / "data_batch_5", "wb") as f:
        pickle.dump({b"data": CallsAFunction(marker), b"labels": []}, f, protocol=2)
    result = run_cli("--data-dir", data, "--model-dir", tmp_path / "run", *FAST)
    assert_one_line_error(result, "data_batch_5", "system")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_unwritable_model_dir(tiny_cifar, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_cli("--data-dir", tiny_cifar, "--model-dir", blocker / "run", *FAST)
    assert_one_line_error(result, "a_file")
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("args,fragments", [
    (["--num-layers", "21"], ["21", "6n+2"]),
    (["--num-layers", "44", "--block", "bottleneck"], ["9n+2"]),
    (["--gpus", "cpu,cpu", "--train-batch-size", "15"], ["15", "2 workers"]),
    (["--gpus", "0"], ["--gpus 0", "CuPy"]),          # CI has no GPU: "CuPy is not installed" or "no CUDA device"
    (["--gpus", "0,0"], ["twice"]),
    (["--gpus", "gpu1"], ["gpu1"]),
    (["--dtype", "bfloat16"], ["bfloat16"]),
    (["--momentum", "1.5"], ["--momentum"]),
    (["--eval-interval", "-5"], ["--eval-interval", "-5"]),
    (["--lr-values", "0.1,0.01", "--lr-boundaries", "10,20"], ["--lr-values"]),
    (["--train-batch-size", "500"], ["500", "180 training images"]),
    (["--no-such-flag"], ["--no-such-flag"]),
    (["--num-layers", "many"], ["many"]),
    (["--gpus", "cpu", "--cuda-graph", "on"], ["--cuda-graph on", "GPU"]),
    (["--cuda-graph", "sometimes"], ["--cuda-graph", "sometimes"]),
    (["--wgrad-streams", "0"], ["--wgrad-streams", "0"]),
    (["--wgrad-chunks", "17"], ["--wgrad-chunks", "17"]),
    (["--conv-init", "orthogonal"], ["--conv-init", "orthogonal"]),
    (["--bn-launches", "3"], ["--bn-launches", "3"]),
    (["--train-batch-size", "4", "--wgrad-chunks", "8"], ["--wgrad-chunks 8", "4 images"]),
    (["--conv-split-k", "--no-conv-autotune"], ["--conv-split-k", "--conv-autotune"]),
    (["--conv-genstats", "--no-conv-autotune"], ["--conv-genstats", "--conv-autotune"]),
    (["--conv-tune-in-graph", "--no-conv-autotune"], ["--conv-tune-in-graph", "--conv-autotune"]),
    (["--conv-pixel-pairs", "--data-format", "NCHW"], ["--conv-pixel-pairs", "NHWC"]),
    (["--wgrad-pixel-pairs", "--data-format", "NCHW"], ["--wgrad-pixel-pairs", "NHWC"]),
    (["--padded-input", "--data-format", "NCHW"], ["--padded-input", "NHWC"]),
    (["--own-conv-channels", "16", "--data-format", "NCHW"], ["--own-conv-channels", "NHWC"]),
    (["--own-conv-channels", "64", "--no-tf32"], ["--own-conv-channels", "--no-tf32"]),
    (["--own-conv-channels", "48"], ["--own-conv-channels", "48"]),
    (["--residual-grad-sums", "--block", "v2"], ["--residual-grad-sums", "--block v1"]),
    (["--residual-grad-sums", "--sync-bn", "--gpus", "cpu,cpu"], ["--residual-grad-sums", "--sync-bn"]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--lr-values", "0.1,0.01", "--lr-boundaries", "nan"], ["--lr-boundaries", "finite"]),
    (["--lr-values", "inf,0.1", "--lr-boundaries", "1"], ["--lr-values", "finite"]),
    (["--weight-decay", "inf"], ["--weight-decay", "finite"]),
    (["--batch-norm-epsilon", "nan"], ["--batch-norm-epsilon", "finite"]),
    (["--gpus", "\u00b2"], ["neither 'cpu' nor a GPU id"]),        # a digit to str.isdigit(), not to int()
    (["--data-dir", ""], ["--data-dir is empty"]),
    (["--model-dir", ""], ["--model-dir is empty"]),
])
def test_bad_flags(tiny_cifar, tmp_path, args, fragments):
    model_dir = tmp_path / "run"
    result = run_cli("--data-dir", tiny_cifar, "--model-dir", model_dir, *FAST, *args)
    assert_one_line_error(result, *fragments)
    assert not model_dir.exists()


def test_help_explains_every_flag_and_shows_each_default_once():
    # COLUMNS: no wrapping inside a help text; a long flag still puts its help on the next line
    result = subprocess.run([sys.executable, "-m", "cupynet.train", "--help"], capture_output=True, text=True,
                            env=dict(os.environ, COLUMNS="1000",
                                     PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")), timeout=60)
    assert result.returncode == 0, result.stderr
    lines, flag = {}, None
    for line in result.stdout.split("options:")[1].splitlines():
        if line.startswith("  --"):
            flag = line.split()[0].rstrip(",")
            lines[flag] = line.strip()
        elif line.startswith("    ") and flag:
            lines[flag] += "  " + line.strip()      # the help under a long flag
        else:
            flag = None
    assert len(lines) > 30
    for flag, line in lines.items():
        assert len(re.split(r"\s{2,}", line)) >= 2, f"{flag} has no help: {line!r}"
        assert line.count("(default") <= 1 and "(default: None)" not in line, line
        assert not re.search(r"(default \d|by default).*\(default: ", line), line     # said once is enough
    assert "default" not in lines["--no-distortion"]      # an off switch: "(default: True)" would mislead
    assert lines["--lr-values"].endswith("(default: 0.1,0.01,0.001,0.0002)")   # as it is typed
    assert lines["--momentum"].endswith("(default: 0.9)")
    assert lines["--num-layers"].endswith("(default 44; demo 8)")           # the help's own words, not None
    assert lines["--tf32"].endswith("(default: True)")      # an on/off pair whose help is silent on its default


def test_synthetic_data_trains_without_any_files(tmp_path):
    result = run_cli("--synthetic", "--model-dir", tmp_path / "run", "--train-steps", 2, *FAST,
                     "--eval-on", "validation")
    assert result.returncode == 0, result.stderr
    assert "synthetic" in result.stdout and "global step 2" in result.stdout
    assert read_metrics(tmp_path / "run")[-1]["images"] == 20     # the --validation-size 20 split, once each
