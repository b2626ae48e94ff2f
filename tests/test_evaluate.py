"""`python -m cupynet.evaluate`: saved checkpoints evaluated on their run's data without its flags, and bad input.

Trains ResNet-8s for a few steps on the built-in sample (and on a copy of it given as --data-dir), then evaluates
their checkpoints; each evaluation of the sample's 100 validation or 500 test images takes well under a second.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cupynet.data import builtin_sample_dir
from cupynet.evaluate import main
from cupynet.report import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--gpus", "cpu", "--num-layers", "8", "--train-batch-size", "16", "--eval-batch-size", "50",
        "--log-interval", "2", "--checkpoint-interval", "2"]


def train(model_dir, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "cupynet.train", "--model-dir", str(model_dir), *FAST,
                             *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return read_metrics(str(model_dir))


def evaluate(capsys, *args):
    """main() on these arguments: (exit status, printed lines, error lines)."""
    status = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """4 steps on the built-in sample, checkpoints at steps 2 and 4, the validation split evaluated at step 2."""
    model_dir = tmp_path_factory.mktemp("runs") / "sample"
    return model_dir, train(model_dir, "--train-steps", 4, "--eval-interval", 2, "--eval-on", "validation")


def test_every_checkpoint_evaluates_as_the_run_evaluated_it_then(sample_run, capsys):
    """--all: step 2's checkpoint gives the run's evaluation during training at step 2, step 4's (the last) its
    final evaluation, exactly; the data and the model come from the checkpoints' record, no training flag given."""
    model_dir, metrics = sample_run
    status, lines, err = evaluate(capsys, model_dir, "--all", "--eval-on", "validation", "--gpus", "cpu")
    assert status == 0, err
    assert lines[1].startswith("model: ResNet-8 v1 | backend: numpy on cpu, NHWC float32 | validation split, 100 "
                               "images | 2 checkpoints of ")
    during = next(e for e in metrics if e["event"] == "eval_during_training")
    final = metrics[-1]
    assert during["step"] == 2 and final["event"] == "eval" and final["step"] == 4
    assert lines[2:] == [f"ckpt-00000002.npz  step 2  validation accuracy {during['accuracy']:.2%} "
                         f"({during['correct']}/100)  loss {during['loss']:.4f}",
                         f"ckpt-00000004.npz  step 4  validation accuracy {final['accuracy']:.2%} "
                         f"({final['correct']}/100)  loss {final['loss']:.4f}"]


def test_the_latest_checkpoint_by_default_one_file_when_named_and_the_model_dir_left_as_it_was(sample_run, capsys):
    model_dir, _ = sample_run
    before = sorted(os.listdir(model_dir)), os.path.getmtime(model_dir / "metrics.jsonl")
    status, lines, _ = evaluate(capsys, model_dir, "--gpus", "cpu")
    assert status == 0 and len(lines) == 3 and lines[2].startswith("ckpt-00000004.npz  step 4  test accuracy ")
    assert lines[2].split("(")[1].startswith(tuple(f"{n}/500)" for n in range(501)))
    status, lines, _ = evaluate(capsys, model_dir / "ckpt-00000002.npz", "--gpus", "cpu")
    assert status == 0 and lines[2].startswith("ckpt-00000002.npz  step 2  test accuracy ")
    assert (sorted(os.listdir(model_dir)), os.path.getmtime(model_dir / "metrics.jsonl")) == before


def test_another_layout_and_precision_evaluate_the_same_model(sample_run, capsys):
    """Checkpoints are layout-free: NCHW in float64 gives the NHWC float32 run's loss to float32 rounding."""
    model_dir, metrics = sample_run
    status, lines, err = evaluate(capsys, model_dir, "--eval-on", "validation", "--gpus", "cpu",
                                  "--data-format", "NCHW", "--dtype", "float64", "--eval-batch-size", 7)
    assert status == 0, err
    assert "NCHW float64" in lines[1]
    loss = float(lines[2].rsplit("loss ", 1)[1])
    np.testing.assert_allclose(loss, metrics[-1]["loss"], rtol=1e-4)


def test_a_runs_nhwc_kernel_options_are_kept_for_its_layout_and_left_in_another(sample_run, tmp_path, capsys):
    """The record's options that choose the forward's kernels (our own convolution kernel, pixel pairs, the padded
    input: NHWC only) set up the evaluation as the run's own (the emulated GPU test checks it repeats the run's
    evaluation bit for bit); with --data-format NCHW they are left out instead of refused (here the sample run's
    checkpoint written again, through save_checkpoint, with those options in its record)."""
    from cupynet.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from cupynet.evaluate import build_parser, config_of
    arrays, meta = load_checkpoint(latest_checkpoint(sample_run[0]))
    meta["config"].update(own_conv_channels=64, conv_pixel_pairs=True, padded_input=True)
    save_checkpoint(tmp_path, meta["step"], arrays, meta)
    kept = config_of(meta, build_parser().parse_args([str(tmp_path), "--gpus", "cpu"]), "ckpt")
    assert (kept.own_conv_channels, kept.conv_pixel_pairs, kept.padded_input) == (64, True, True)
    left = config_of(meta, build_parser().parse_args([str(tmp_path), "--gpus", "cpu", "--data-format", "channels_first"]), "ckpt")
    assert (left.data_format, left.own_conv_channels, left.conv_pixel_pairs, left.padded_input) == ("NCHW", 0, False,
                                                                                                     False)
    status, lines, err = evaluate(capsys, tmp_path, "--gpus", "cpu", "--eval-on", "validation", "--data-format", "NCHW")
    assert status == 0, err
    assert lines[2].endswith(f"({sample_run[1][-1]['correct']}/100)  loss {sample_run[1][-1]['loss']:.4f}")


def test_the_runs_data_folder_is_used_and_a_moved_one_is_named_with_the_way_out(tmp_path, capsys):
    data = tmp_path / "cifar"
    shutil.copytree(builtin_sample_dir(), data / "cifar-10-batches-py")
    model_dir = tmp_path / "run"
    final = train(model_dir, "--data-dir", data, "--train-steps", 2, "--validation-size", 20)[-1]
    status, lines, _ = evaluate(capsys, model_dir, "--gpus", "cpu")
    assert status == 0 and f"({final['correct']}/500)  loss {final['loss']:.4f}" in lines[2]
    moved = tmp_path / "moved"
    data.rename(moved)
    status, _, err = evaluate(capsys, model_dir, "--gpus", "cpu")
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {data}") and \
        err[0].endswith("(the data the run of ckpt-00000002.npz trained on; pass --data-dir)"), err
    status, lines, _ = evaluate(capsys, model_dir, "--gpus", "cpu", "--data-dir", moved, "--eval-on", "validation")
    assert status == 0 and "validation split, 20 images" in lines[1]    # the run's --validation-size


def test_a_bfloat16_run_evaluates_in_float32_on_the_cpu_and_says_so(sample_run, tmp_path, capsys):
    """A GPU run's record says bfloat16, which the CPU backend lacks: float32 instead, in a note (here the sample
    run's checkpoint written again, through save_checkpoint, with that record)."""
    from cupynet.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    arrays, meta = load_checkpoint(latest_checkpoint(sample_run[0]))
    meta["config"]["dtype"] = "bfloat16"
    save_checkpoint(tmp_path, meta["step"], arrays, meta)
    status, lines, err = evaluate(capsys, tmp_path, "--gpus", "cpu", "--eval-on", "validation")
    assert status == 0, err
    assert "NHWC float32" in lines[1]
    assert lines[2] == "  (the run trained in bfloat16, which the CPU backend lacks: evaluating in float32)"
    assert lines[3].endswith(f"({sample_run[1][-1]['correct']}/100)  loss {sample_run[1][-1]['loss']:.4f}")


def test_a_checkpoint_of_the_demo_sample_is_refused_on_other_data(sample_run, tmp_path, capsys):
    shutil.copytree(builtin_sample_dir(), tmp_path / "cifar-10-batches-py")
    status, lines, err = evaluate(capsys, sample_run[0], "--gpus", "cpu", "--data-dir", tmp_path)
    assert status == 2 and len(err) == 1 and "dataset=sample" in err[0] and "dataset=cifar10" in err[0], err
    assert err[0].endswith("; evaluate it on the data it trained on (leave out --data-dir)") and lines == [], lines


@pytest.mark.parametrize("args, fragment", [
    (["{tmp}/nowhere"], "no such model dir or checkpoint file"),
    (["{tmp}"], "holds no checkpoint"),
    (["{tmp}/junk.npz"], "cannot read checkpoint"),
    (["{run}/ckpt-00000002.npz", "--all"], "--all takes a model dir"),
    (["{run}", "--gpus", "cpu,cpu"], "an evaluation runs on one device"),
    (["{run}", "--gpus", "cpu", "--dtype", "bfloat16"], "bfloat16"),
    (["{run}", "--gpus", "cpu", "--eval-batch-size", "0"], "--eval-batch-size"),
    (["{run}", "--gpus", "cpu", "--data-format", "HWCN"], "--data-format"),
    (["{run}", "--no-such-flag"], "--no-such-flag"),
    ([], "path"),
])
def test_bad_input_is_one_line_and_exit_status_2(sample_run, tmp_path, capsys, args, fragment):
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    args = [a.format(tmp=tmp_path, run=sample_run[0]) for a in args]
    status, _, err = evaluate(capsys, *args)
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


@pytest.mark.parametrize("field, value, fragment", [
    ("data_format", "XYZ", "--data-format must be NCHW or NHWC, got 'XYZ'"),
    ("num_layers", "eight", "--num-layers must be int, got 'eight'"),
    ("synthetic", "yes", "--synthetic must be bool, got 'yes'"),
    ("seed", -1, "--seed must be from 0 to"),
    ("dtype", "float16", "--dtype must be one of"),
])
def test_a_record_of_the_run_that_does_not_fit_is_one_line(sample_run, tmp_path, capsys, field, value, fragment):
    """The record of the run, edited by hand (or from another version), is what sets the evaluation up: checked as
    the flags are, and reported as the checkpoint's."""
    from cupynet.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    arrays, meta = load_checkpoint(latest_checkpoint(sample_run[0]))
    meta["config"][field] = value
    save_checkpoint(tmp_path, meta["step"], arrays, meta)
    status, lines, err = evaluate(capsys, tmp_path, "--gpus", "cpu")
    assert status == 2 and lines == [] and len(err) == 1, err
    assert err[0].startswith("error: ckpt-00000004.npz: its record of the run does not fit this cupynet (")
    assert fragment in err[0], err


def test_the_command_line(sample_run):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "cupynet.evaluate", str(sample_run[0]), "--gpus", "cpu"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[2].startswith("ckpt-00000004.npz  step 4  "), \
        result.stderr
    missing = subprocess.run([sys.executable, "-m", "cupynet.evaluate", str(sample_run[0] / "nothing")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [f"error: {sample_run[0] / 'nothing'}: no such model dir or "
                                                   "checkpoint file"]
