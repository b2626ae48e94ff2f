"""bench/layers.py and bench/scaling.py run (`--quick`) and write consistent, positive figures."""
import inspect
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from bench.layers import bytes_moved
from cupynet.backends import gpu_problem
from cupynet.backends.numpy_backend import NumpyBackend
from cupynet.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_KEYS = ("cupynet", "git_commit", "numpy", "python", "cpu_count", "date")


def refused(script, *argv, env=None):
    """Run bench/<script> with bad input; check the project's rule (one line on stderr, `error: ...`, exit status 2,
    no traceback, nothing on stdout) and return that line."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *argv], capture_output=True,
                            text=True, timeout=60, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result
    assert "Traceback" not in result.stderr and result.stdout == "", result
    return lines[0]


def run_quick(script, tmp_path):
    """Run bench/<script>.py --quick; return its JSON report."""
    out = tmp_path / f"{script}.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", f"{script}.py"), "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == script
    for key in ENV_KEYS:
        assert key in report["environment"]
    return report


def test_layers_quick_breaks_the_step_down_per_primitive(tmp_path):
    report = run_quick("layers", tmp_path)
    assert report["step_ms"] > 0 and report["peak_gbs"] > 0
    rows = {row["primitive"]: row for row in report["primitives"]}
    # The step's main primitives were seen; shape helpers and the timer's synchronize were not shimmed.
    for name in ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter", "batchnorm_train_forward",
                 "batchnorm_backward", "softmax_cross_entropy", "sgd_momentum_update", "augment_train_batch",
                 "advance_step"):
        assert rows[name]["calls_per_step"] >= 1 and rows[name]["ms_per_step"] > 0, name
    assert "synchronize" not in rows and "activation_shape" not in rows
    assert rows["conv2d_forward"]["calls_per_step"] == 7            # ResNet-8: stem + 3 blocks x 2
    assert rows["sgd_momentum_update"]["calls_per_step"] == 1
    # Outermost calls only: the parts cannot add up to much more than the whole step.
    assert sum(row["ms_per_step"] for row in rows.values()) <= report["step_ms"] * 1.5
    for row in rows.values():
        assert 0 <= row["share"] <= 1
        assert row["bytes_per_step"] >= 0 and row["roofline_ms"] >= 0
        assert row["fraction_of_peak"] == pytest.approx(row["achieved_gbs"] / report["peak_gbs"], rel=0.01, abs=1e-3)
    assert rows["conv2d_forward"]["bytes_per_step"] > 0


def test_scaling_quick_reports_efficiency_and_all_reduce(tmp_path):
    report = run_quick("scaling", tmp_path)
    rows = report["results"]
    assert [row["workers"] for row in rows] == [1, 2]
    assert rows[0]["efficiency"] == 1.0
    for row in rows:
        assert row["global_batch"] == 8 and row["per_worker_batch"] * row["workers"] == 8
        assert row["images_per_sec_min"] <= row["images_per_sec"] <= row["images_per_sec_max"]
        assert row["images_per_sec"] > 0 and row["efficiency"] > 0
        assert row["all_reduce_s"] > 0 and row["gradient_elements"] > 0
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["images_per_sec"] / rows[0]["images_per_sec"], rel=1e-3)
    assert all(row["communicator"] == "host" and row["captured"] is False for row in rows)   # CPU: host, eager


@pytest.mark.parametrize("flag,value", [("--wgrad-streams", "x"), ("--depths", "8,y"), ("--conv-deterministic", "maybe"),
                                        ("--device", "x"), ("--wgrad-chunks", "17"), ("--conv-split-k", "on,sometimes"),
                                        ("--conv-genstats", "off,maybe"), ("--conv-pixel-pairs", "maybe"),
                                        ("--residual-grad-sums", "on,maybe")])
def test_layouts_refuses_a_bad_grid_value_without_a_traceback(flag, value):
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "layouts.py"), "--quick", flag, value],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"{flag}:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--device", "cpu"], ["--device", "x"], ["--runs", "0"], ["--split-k-settings", "-1"]])
def test_conv_engines_refuses_bad_flags_in_one_line(args):
    assert args[0] in refused("conv_engines.py", *args)


def test_scaling_refuses_gpu_communicators_on_the_cpu():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "scaling.py"), "--quick", "--comm", "shared"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--comm shared needs a GPU" in result.stderr


def test_time_to_accuracy_quick_trains_the_recipe_and_reports_the_curve(tmp_path):
    out = tmp_path / "tta.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "time_to_accuracy.py"), "--quick",
                             "--model-dir", str(tmp_path / "run"), "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == "time_to_accuracy"
    assert "--lr-values 0.1,0.01,0.001 --lr-boundaries 1,1.5" in report["command"]
    assert report["test_images"] == 500 and 0 <= report["test_accuracy"] <= 1
    assert 0 < report["train_seconds"] <= report["wall_seconds"] and report["images_per_sec"] > 0
    curve = report["loss_curve"]
    assert curve[-1]["step"] == report["steps"] and all(point["loss"] > 0 for point in curve)
    assert [point["lr"] for point in curve][-1] == 0.001          # the last quarter runs at the last rate
    assert 0 <= report["setup_seconds"] <= report["wall_seconds"]
    assert report["warmup_seconds"] is None             # the CPU records no step: no warm-up to report
    # the data's load (in a thread beside the backend's setup) by part, and on a GPU the backend's too
    assert list(report["setup_parts"]) == ["data"] and 0 <= report["eval_seconds"] <= report["wall_seconds"]
    assert "--eval-batch-size" not in report["command"]    # the demo's 500 test images at cupynet.train's 100


def test_the_time_target_on_another_gpu_scales_by_pytorchs_graphed_throughput_there():
    """Two thirds of PyTorch's 190.5 s on the notes' H100, where its graphed bf16 step ran 29,386 images/s; a GPU
    where it runs 1.25x as fast gets a target 1.25x as short."""
    from bench.time_to_accuracy import TARGET_SECONDS_H100, target_seconds_here
    assert abs(target_seconds_here(29_386) - TARGET_SECONDS_H100) < 0.01
    assert abs(target_seconds_here(1.25 * 29_386) - TARGET_SECONDS_H100 / 1.25) < 0.01


def test_time_to_accuracy_times_the_warm_up_from_the_start_event():
    from bench.time_to_accuracy import training_seconds, warmup_seconds
    metrics = [{"event": "start", "time": 100.0}, {"event": "warmup", "step": 3, "time": 102.25},
               {"event": "train", "step": 500, "time": 104.0}, {"event": "train", "step": 1000, "time": 106.5},
               {"event": "eval", "time": 107.0}]
    assert warmup_seconds(metrics) == 2.25 and training_seconds(metrics) == 6.5
    assert warmup_seconds([m for m in metrics if m["event"] != "warmup"]) is None


def test_time_to_accuracy_passes_the_step_options_on_to_training():
    sys.path.insert(0, REPO)
    from bench.time_to_accuracy import parse_args, recipe_flags
    from cupynet.config import parse_args as train_args
    default = train_args(recipe_flags(parse_args(["--data-dir", "D"]), "M"))
    assert (default.wgrad_streams, default.wgrad_chunks, default.conv_deterministic, default.num_layers) == \
        (1, 1, True, 44)
    chosen = train_args(recipe_flags(parse_args(["--data-dir", "D", "--wgrad-streams", "2", "--wgrad-chunks", "2",
                                                 "--no-conv-deterministic", "--conv-init", "glorot_uniform",
                                                 "--conv-split-k", "--conv-genstats", "--conv-pixel-pairs",
                                                 "--residual-grad-sums", "--padded-input"]), "M"))
    assert (chosen.wgrad_streams, chosen.wgrad_chunks, chosen.conv_deterministic, chosen.train_steps) == \
        (2, 2, False, 122 * 351)
    assert (default.conv_split_k, chosen.conv_split_k) == (False, True)
    assert (default.conv_genstats, chosen.conv_genstats) == (False, True)
    assert (default.conv_pixel_pairs, chosen.conv_pixel_pairs) == (False, True)
    assert (default.residual_grad_sums, chosen.residual_grad_sums) == (False, True)
    assert (default.padded_input, chosen.padded_input) == (False, True)
    assert default.eval_batch_size == 1000         # the final evaluation in 10 forwards on a GPU
    assert (default.conv_init, chosen.conv_init) == ("he_normal", "glorot_uniform")
    # --quick trains 2 epochs of the sample's 14 steps, unless --epochs says otherwise
    assert [train_args(recipe_flags(parse_args(["--quick", *epochs]), "M")).train_steps
            for epochs in ([], ["--epochs", "0.25"])] == [28, 3]


@pytest.mark.parametrize("argv, message", [(["--quick", "--epochs", "0.05"], "less than one step (14 steps an epoch)"),
                                           (["--data-dir", "D", "--epochs", "0"], "less than one step (351 steps")])
def test_time_to_accuracy_refuses_epochs_of_no_step(argv, message):
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "time_to_accuracy.py"), *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr


def test_time_to_accuracy_refuses_a_used_model_dir(tmp_path):
    used = tmp_path / "run"
    used.mkdir()
    (used / "checkpoint.json").write_text("{}")
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "time_to_accuracy.py"), "--quick",
                             "--model-dir", str(used)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0
    assert "not empty" in result.stderr


def test_layouts_rows_say_whether_the_step_was_captured(tmp_path):
    report = run_quick("layouts", tmp_path)
    assert all(row["cuda_graph"] == "auto" and row["captured"] is False for row in report["results"])


def layouts_module():
    sys.path.insert(0, REPO)
    import bench.layouts
    return bench.layouts


def test_layouts_records_a_configuration_that_fails_at_run_time_and_goes_on(tmp_path, monkeypatch, capsys):
    """A run-time failure of one configuration (here an out-of-memory error injected into NCHW backends, which
    the CPU cannot produce) is a row with its error; the other configurations are still measured, the JSON
    holds them all, and the exit status says how many failed."""
    layouts = layouts_module()
    real = layouts.build_backend

    def build_backend(config, device):
        if config.data_format == "NCHW":
            raise MemoryError("out of memory allocating 4 GB\n(second line)")
        return real(config, device)

    monkeypatch.setattr(layouts, "build_backend", build_backend)
    out = tmp_path / "layouts.json"
    with pytest.raises(SystemExit) as exit_:
        layouts.main(["--quick", "--wgrad-pairs", "1x1,1x2", "--json", str(out)])
    assert "2 of 4 configurations failed" in str(exit_.value.code)
    rows = json.loads(out.read_text())["results"]
    assert [row["layout"] for row in rows] == ["NCHW", "NCHW", "NHWC", "NHWC"]
    assert [row["wgrad_chunks"] for row in rows] == [1, 2, 1, 2]
    assert rows[0]["error"] == "MemoryError: out of memory allocating 4 GB" and "images_per_sec" not in rows[0]
    assert all(row["images_per_sec"] > 0 and "error" not in row for row in rows[2:])
    assert "failed: MemoryError" in capsys.readouterr().out


def stand_in_measure(layouts, seconds_of):
    """A layouts.measure that takes seconds_of(call index) seconds and reports a figure: the grid loop's pacing
    and bookkeeping are what these tests look at (real configurations would make their timing a lottery)."""
    calls = []

    def measure(depth, batch, layout, dtype, args, dataset, cuda_graph=None, **options):
        seconds = seconds_of(len(calls))
        calls.append(seconds)
        time.sleep(seconds)
        return dict(layouts.configuration(depth, batch, layout, dtype, cuda_graph, options, args.device),
                    captured=False, images_per_sec=100.0, images_per_sec_min=99.0, images_per_sec_max=101.0,
                    step_ms=10.0)
    return measure


def test_layouts_paces_itself_by_the_configurations_after_the_first(tmp_path, monkeypatch):
    """The first configuration also pays the process's start-up (1 s here, 0.3 s each after): the time a next
    one needs is judged by the others, so a 3-s budget measures about five of eight, not the two or three that
    1.5 x 1 s would allow, and lists the rest as not measured; every row says how long it took."""
    layouts = layouts_module()
    monkeypatch.setattr(layouts, "measure", stand_in_measure(layouts, lambda call: 1.0 if call == 0 else 0.3))
    out = tmp_path / "layouts.json"
    layouts.main(["--quick", "--wgrad-pairs", "1x1,1x2,1x3,1x4", "--max-seconds", "3", "--json", str(out)])
    report = json.loads(out.read_text())
    measured, left = len(report["results"]), len(report["not_measured"])
    assert 4 <= measured <= 7 and measured + left == 8, (measured, left)
    assert report["results"][0]["seconds"] >= 1.0 and all(row["seconds"] >= 0.3 for row in report["results"])


def test_layouts_varies_conv_genstats_fastest(tmp_path, monkeypatch):
    """--conv-genstats off,on is a grid dimension, the last to vary: each row with genstats right after its twin
    without (a grid cut short by --max-seconds keeps the pairs to compare), and measure is asked for it."""
    layouts = layouts_module()
    monkeypatch.setattr(layouts, "measure", stand_in_measure(layouts, lambda call: 0.0))
    out = tmp_path / "layouts.json"
    layouts.main(["--quick", "--layouts", "NHWC", "--wgrad-pairs", "1x1,1x2", "--conv-genstats", "off,on",
                  "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(row["wgrad_chunks"], row["conv_genstats"]) for row in rows] == [(1, False), (1, True), (2, False),
                                                                            (2, True)]


@pytest.mark.parametrize("earlier,later", [("conv_genstats", "conv_pixel_pairs"),
                                           ("conv_pixel_pairs", "residual_grad_sums")])
def test_layouts_varies_an_option_after_the_one_before(tmp_path, monkeypatch, earlier, later):
    """--conv-pixel-pairs off,on is a grid dimension varying after genstats, and --residual-grad-sums off,on one
    varying after pixel pairs, the last (the earlier given here in the other order so that the two cannot be told
    apart by their values): each row with the later option right after its twin without, and measure is asked
    for it."""
    layouts = layouts_module()
    monkeypatch.setattr(layouts, "measure", stand_in_measure(layouts, lambda call: 0.0))
    out = tmp_path / "layouts.json"
    layouts.main(["--quick", "--layouts", "NHWC", "--wgrad-pairs", "1x1,1x2", f"--{earlier.replace('_', '-')}",
                  "on,off", f"--{later.replace('_', '-')}", "off,on", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(row["wgrad_chunks"], row[earlier], row[later]) for row in rows] == [
        (1, True, False), (1, True, True), (1, False, False), (1, False, True),
        (2, True, False), (2, True, True), (2, False, False), (2, False, True)]


def test_layouts_runs_each_also_grids_configurations_where_the_product_puts_them(tmp_path, monkeypatch):
    """--also adds configurations to the grid, each once and beside those it differs from only in later
    dimensions (a genstats row right after its twin without), new values after the grid's own; flags it does not
    give keep the grid's values (layout, dtype, batch here)."""
    layouts = layouts_module()
    monkeypatch.setattr(layouts, "measure", stand_in_measure(layouts, lambda call: 0.0))
    out = tmp_path / "layouts.json"
    layouts.main(["--quick", "--layouts", "NHWC", "--wgrad-pairs", "1x1,1x2", "--conv-deterministic", "on,off",
                  "--also", "--wgrad-pairs 1x1 --conv-deterministic off --conv-genstats on",
                  "--also", "--wgrad-pairs 1x2,1x3 --conv-deterministic off", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(row["wgrad_chunks"], row["conv_deterministic"], row["conv_genstats"]) for row in rows] == [
        (1, True, False), (1, False, False), (1, False, True), (2, True, False), (2, False, False), (3, False, False)]
    assert {(row["layout"], row["dtype"], row["batch"]) for row in rows} == {("NHWC", "float32", 8)}


def test_layouts_runs_residual_grad_sums_and_pixel_pairs_also_rows_right_after_the_defaults(tmp_path, monkeypatch):
    """The device check's rows: the default pair with residual grad sums, then with pixel pairs (--also each,
    deterministic engines) run second and third, right after the defaults, before the grid's other engines and a
    genstats --also row."""
    layouts = layouts_module()
    monkeypatch.setattr(layouts, "measure", stand_in_measure(layouts, lambda call: 0.0))
    out = tmp_path / "layouts.json"
    layouts.main(["--quick", "--layouts", "NHWC", "--wgrad-pairs", "1x1,1x2", "--conv-deterministic", "on,off",
                  "--also", "--wgrad-pairs 1x1 --conv-deterministic off --conv-genstats on",
                  "--also", "--wgrad-pairs 1x1 --conv-deterministic on --conv-pixel-pairs on",
                  "--also", "--wgrad-pairs 1x1 --conv-deterministic on --residual-grad-sums on", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(row["wgrad_chunks"], row["conv_deterministic"], row["conv_genstats"], row["conv_pixel_pairs"],
             row["residual_grad_sums"]) for row in rows] == [
        (1, True, False, False, False), (1, True, False, False, True), (1, True, False, True, False),
        (1, False, False, False, False), (1, False, True, False, False), (2, True, False, False, False),
        (2, False, False, False, False)]


@pytest.mark.parametrize("also", ["--json x.json", "--also '--depths 8'", "--conv-genstats maybe", "--nope 1",
                                  "'unclosed", "--conv-pixel-pairs maybe", "--residual-grad-sums maybe"])
def test_layouts_refuses_a_bad_also_grid_in_one_line(also):
    """--also takes grid flags only, checked like the grid's own when the arguments are parsed (where the device
    check's command test looks); a refusal names the --also argument."""
    with pytest.raises(ConfigError):
        layouts_module().parse_args(["--quick", "--also", also])
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "layouts.py"), "--quick", "--also", also],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"error: --also {also!r}: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_layouts_reports_genstats_counts_only_with_the_option_on_a_gpu():
    """A row's `genstats`: the GPU convolutions' counts as a plain dict (JSON) with --conv-genstats, even when
    nothing was counted (the option did nothing: the run should say so); None without it, and on the CPU."""
    from collections import Counter
    from types import SimpleNamespace
    layouts = layouts_module()
    gpu = SimpleNamespace(conv_genstats=True, conv=SimpleNamespace(genstats_counts=Counter(fused=12, unsupported=3)))
    assert layouts.genstats_report(gpu) == {"fused": 12, "unsupported": 3}
    assert type(layouts.genstats_report(gpu)) is dict
    assert layouts.genstats_report(SimpleNamespace(conv_genstats=True, conv=SimpleNamespace(genstats_counts=Counter()))) \
        == {}
    assert layouts.genstats_report(SimpleNamespace(conv_genstats=False, conv=gpu.conv)) is None
    assert layouts.genstats_report(SimpleNamespace(conv_genstats=True)) is None          # the NumPy backend


@pytest.mark.gpu
def test_layouts_reports_the_gpu_backends_genstats_counts(tmp_path):
    """On the GPU (or the emulated one) a row with --conv-genstats reads the backend's own counter: a dict of
    "fused" and "unsupported" counts (empty while no convolution takes the fused path)."""
    layouts = layouts_module()
    args = layouts.parse_args(["--device", "0", "--no-tf32", "--warmup", "1", "--steps", "1", "--repeats", "1"])
    dataset = layouts.synthetic_dataset(num_train=32, num_test=8, seed=0)
    row = layouts.measure(8, 8, "NHWC", "float32", args, dataset, cuda_graph="off", conv_genstats=True)
    assert row["conv_genstats"] is True and isinstance(row["genstats"], dict), row
    assert set(row["genstats"]) <= {"fused", "unsupported", "not repeatable", "wrong sums"}, row
    assert all(n > 0 for n in row["genstats"].values()), row


@pytest.mark.gpu
@pytest.mark.parametrize("option,field,recorded", [("conv_pixel_pairs", "conv_pixel_pairs", [True, False, False]),
                                                   ("padded_input", "padded_input", [True, False, False]),
                                                   ("residual_grad_sums", "residual_grad_sums", [True, True, False])])
def test_layouts_rows_record_the_gpu_backends_option(tmp_path, option, field, recorded):
    """On the GPU (or the emulated one) a row records an option as the backend applied it: pixel pairs and a padded
    input on in NHWC when asked for, off in NCHW even when asked for (a pixel pair's channels, and a pixel's 16
    bytes, are adjacent only when channels come last); residual grad sums on in either layout when asked for; each
    off when not asked for."""
    layouts = layouts_module()
    args = layouts.parse_args(["--device", "0", "--no-tf32", "--warmup", "1", "--steps", "1", "--repeats", "1"])
    dataset = layouts.synthetic_dataset(num_train=32, num_test=8, seed=0)
    rows = [layouts.measure(8, 8, layout, "float32", args, dataset, cuda_graph="off", **{option: asked})
            for layout, asked in (("NHWC", True), ("NCHW", True), ("NHWC", False))]
    assert [row[field] for row in rows] == recorded, rows
    assert all(row["images_per_sec"] > 0 for row in rows), rows


def test_layouts_keeps_the_rows_measured_before_it_was_stopped(tmp_path, monkeypatch):
    """Stopped from outside during its second configuration, the JSON already holds the first and lists the
    others (the stopped one included) as not measured."""
    layouts = layouts_module()
    measure = stand_in_measure(layouts, lambda call: 0.0)

    def stopped_at_the_second(*args, **kwargs):
        if kwargs.get("wgrad_chunks") == 2:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(layouts, "measure", stopped_at_the_second)
    out = tmp_path / "layouts.json"
    with pytest.raises(KeyboardInterrupt):
        layouts.main(["--quick", "--layouts", "NHWC", "--wgrad-pairs", "1x1,1x2,1x3", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [row["wgrad_chunks"] for row in report["results"]] == [1]
    assert [row["wgrad_chunks"] for row in report["not_measured"]] == [2, 3]


def test_layouts_starts_no_configuration_past_max_seconds(tmp_path):
    """--max-seconds too short for any configuration: none starts, each is listed as not measured."""
    out = tmp_path / "layouts.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "layouts.py"), "--quick", "--max-seconds",
                             "0.001", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["results"] == [] and len(report["not_measured"]) == 2
    assert {row["layout"] for row in report["not_measured"]} == {"NCHW", "NHWC"}
    assert "2 of 2 configurations not started" in result.stdout
    complete = subprocess.run([sys.executable, os.path.join(REPO, "bench", "layouts.py"), "--quick",
                               "--max-seconds", "600", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert complete.returncode == 0 and len(json.loads(out.read_text())["results"]) == 2


def test_time_to_accuracy_with_missing_data_fails_in_one_line_and_leaves_nothing(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "time_to_accuracy.py"),
                             "--data-dir", str(tmp_path / "missing"), "--gpus", "cpu", "--dtype", "float32"],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, TMPDIR=str(scratch)))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "missing" in result.stderr
    assert list(scratch.iterdir()) == []                    # its temporary model dir is gone


def layouts_row(streams, chunks, deterministic, images_per_sec, dtype="bfloat16", batch=128, captured=True,
                split_k=False, genstats=False, pixel_pairs=False, residual_grad_sums=False):
    """A row as bench/layouts.py writes it (the fields best_step_options.py reads)."""
    return {"depth": 44, "batch": batch, "layout": "NHWC", "dtype": dtype, "captured": captured,
            "wgrad_streams": streams, "wgrad_chunks": chunks, "conv_deterministic": deterministic,
            "conv_split_k": split_k, "conv_genstats": genstats, "conv_pixel_pairs": pixel_pairs,
            "residual_grad_sums": residual_grad_sums, "images_per_sec": images_per_sec}


def pick(tmp_path, rows, *args):
    path = tmp_path / "step_options.json"
    path.write_text(json.dumps({"benchmark": "layouts", "results": rows}))
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "best_step_options.py"), str(path), *args],
                          capture_output=True, text=True, timeout=60)


def test_best_step_options_picks_the_fastest_captured_row_of_the_dtype_and_batch(tmp_path):
    rows = [layouts_row(1, 1, True, 40000), layouts_row(2, 2, True, 43000), layouts_row(3, 1, False, 42000),
            layouts_row(4, 4, False, 99000, captured=False),            # eager: never chosen
            layouts_row(4, 4, False, 99000, dtype="float32"),           # another dtype
            layouts_row(1, 1, True, 60000, batch=512), layouts_row(2, 4, False, 70000, batch=512)]
    result = pick(tmp_path, rows, "--dtype", "bfloat16", "--batch", "128")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["--wgrad-streams", "2", "--wgrad-chunks", "2"]
    assert "43000" in result.stderr and "40000" in result.stderr
    large = pick(tmp_path, rows, "--batch", "512")
    assert large.stdout.split() == ["--wgrad-streams", "2", "--wgrad-chunks", "4", "--no-conv-deterministic"]
    split = pick(tmp_path, rows + [layouts_row(1, 1, True, 80000, batch=512, split_k=True)], "--batch", "512")
    assert split.stdout.split() == ["--conv-split-k"] and "with split-K settings" in split.stderr


@pytest.mark.parametrize("option,field,faster_pair,deterministic,flags,why", [
    ("genstats", "conv_genstats", (1, 1), False, ["--no-conv-deterministic", "--conv-genstats"],
     "statistics from the convolutions (genstats)"),
    ("pixel_pairs", "conv_pixel_pairs", (2, 2), True,
     ["--wgrad-streams", "2", "--wgrad-chunks", "2", "--conv-pixel-pairs"], "stage 1 convolutions on pixel pairs"),
    ("residual_grad_sums", "residual_grad_sums", (4, 1), True, ["--wgrad-streams", "4", "--residual-grad-sums"],
     "BatchNorm gradient sums in the residual add"),
])
def test_best_step_options_picks_an_option_only_when_more_than_2_percent_faster(tmp_path, option, field, faster_pair,
                                                                                deterministic, flags, why):
    """A genstats, pixel-pairs or residual-grad-sums row is chosen (with its other options) only when 2% faster
    than the defaults; a row written before the option existed has no field for it and counts as off, so it is
    still the defaults'."""
    older_default = layouts_row(1, 1, True, 40000)
    del older_default[field]
    within = pick(tmp_path, [older_default, layouts_row(1, 1, True, 40700, **{option: True})])        # 1.75% faster
    assert within.returncode == 0 and within.stdout.strip() == "", within.stderr
    faster = pick(tmp_path, [older_default, layouts_row(*faster_pair, deterministic, 41000, **{option: True})])  # 2.5%
    assert faster.stdout.split() == flags
    assert why in faster.stderr


def test_best_step_options_picks_genstats_pixel_pairs_and_residual_grad_sums_together(tmp_path):
    older_default = layouts_row(1, 1, True, 40000)
    del older_default["conv_pixel_pairs"], older_default["residual_grad_sums"]
    every = pick(tmp_path, [older_default, layouts_row(1, 1, False, 42000, genstats=True, pixel_pairs=True,
                                                       residual_grad_sums=True)])
    assert every.stdout.split() == ["--no-conv-deterministic", "--conv-genstats", "--conv-pixel-pairs",
                                    "--residual-grad-sums"]


def test_best_step_options_never_picks_a_failed_row(tmp_path):
    failed = dict(layouts_row(8, 8, True, 0), error="CUDARuntimeError: out of memory")
    del failed["images_per_sec"]
    result = pick(tmp_path, [layouts_row(1, 1, True, 40000), failed, layouts_row(4, 4, True, 45000)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["--wgrad-streams", "4", "--wgrad-chunks", "4"]


def test_best_step_options_keeps_the_defaults_within_the_minimum_gain(tmp_path):
    rows = [layouts_row(1, 1, True, 40000), layouts_row(2, 1, False, 40500)]       # 1.25% faster
    assert pick(tmp_path, rows).stdout.strip() == ""
    assert pick(tmp_path, rows, "--min-gain", "0.01").stdout.split() == ["--wgrad-streams", "2",
                                                                         "--no-conv-deterministic"]


@pytest.mark.parametrize("content", ["not json", json.dumps({"results": [layouts_row(1, 1, True, 1, captured=False)]}),
                                     json.dumps({"rows": []})])
def test_best_step_options_refuses_unusable_results_in_one_line(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "best_step_options.py"), str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["batchnorm_backward", "batchnorm_backward_dx", "relu_backward_add_bn_grad"])
def test_layers_counts_the_relu_output_of_a_batchnorm_backward_only_where_it_is_read(name):
    """bench/layers.py's byte rule: a BatchNorm backward (or the part of one a residual add takes over) given
    beta recomputes its relu's mask from x on the GPU, so the relu's output is not traffic; without beta it is
    read."""
    signature = inspect.signature(getattr(NumpyBackend, name))
    activation, vector = np.zeros((2, 4, 4, 8), np.float32), np.zeros(8, np.float32)
    per_channel = {"gamma", "beta", "saved_mean", "saved_invstd", "dgamma", "dbeta"}
    arrays = {arg: vector if arg in per_channel else activation for arg in signature.parameters
              if arg not in ("self", "beta")}
    vectors = len(per_channel & arrays.keys())
    plain = bytes_moved(name, signature, (None,), arrays)
    from_x = bytes_moved(name, signature, (None,), dict(arrays, beta=vector))
    assert plain == (len(arrays) - vectors) * activation.nbytes + vectors * vector.nbytes
    assert from_x == plain - activation.nbytes + vector.nbytes


def test_each_step_option_is_a_train_flag_recorded_in_every_layouts_row():
    """bench/step_options.py's table: each option's flags (what best_step_options prints and time_to_accuracy
    passes on) select it in cupynet.train, a switch off by default has the summary's label, and a layouts.py row,
    failed or measured, has a field for each (best_step_options reads them)."""
    from bench import step_options
    from cupynet.config import parse_args as train_args
    for option in step_options.OPTIONS:
        value = not option.default if option.on_off else \
            next(value for value in option.choices or [option.default + 1] if value != option.default)
        assert getattr(train_args(step_options.flags({option.name: value})), option.name) == value, option
        assert bool(option.label) == (not option.default), option        # a switch that is off, or an int 0
    layouts = layouts_module()
    args = layouts.parse_args(["--quick", "--layouts", "NHWC"])
    (point,) = layouts.grid(args)
    assert set(layouts.configuration(*point, device="cpu")) >= set(step_options.NAMES)
    row = layouts.measure(*point[:4], args, layouts.synthetic_dataset(num_train=16, num_test=8, seed=0),
                          cuda_graph=point[4], **point[5])
    assert set(row) >= set(step_options.NAMES), row


@pytest.mark.parametrize("args", [["--device", "cpu"], ["--device", "x"], ["--device", "0", "--runs", "0"]])
def test_setup_costs_refuses_bad_flags_in_one_line(args):
    assert args[-2] in refused("setup_costs.py", *args)


def test_setup_costs_finds_the_cudnn_libraries_not_yet_loaded_beside_the_loaded_ones(tmp_path, monkeypatch):
    """cudnn_folders and libraries_beside: the folders of the mapped libcudnn files (else LD_LIBRARY_PATH's that
    hold one), each other libcudnn file there once (a link and its target count once), nothing already mapped,
    nothing else."""
    from bench.setup_costs import cudnn_folders, libraries_beside
    lib, other = tmp_path / "lib", tmp_path / "other"
    lib.mkdir(), other.mkdir()
    for name in ("libcudnn.so.9.19.0", "libcudnn_graph.so.9.19.0", "libcudnn_ops.so.9.19.0", "libcublas.so.13"):
        (lib / name).write_bytes(b"")
    (lib / "libcudnn.so.9").symlink_to("libcudnn.so.9.19.0")
    (lib / "libcudnn_graph.so.9").symlink_to("libcudnn_graph.so.9.19.0")
    mapped = [str(lib / "libcudnn.so.9")]
    assert cudnn_folders(mapped) == [str(lib)]
    found = libraries_beside(cudnn_folders(mapped), mapped)
    assert sorted(os.path.realpath(p) for p in found) == [str(lib / "libcudnn_graph.so.9.19.0"),
                                                         str(lib / "libcudnn_ops.so.9.19.0")]
    monkeypatch.setenv("LD_LIBRARY_PATH", os.pathsep.join([str(other), str(lib)]))
    assert cudnn_folders([]) == [str(lib)]                   # nothing mapped yet: where a libcudnn.so* is
    assert len(libraries_beside(cudnn_folders([]), [])) == 3


@pytest.mark.gpu
def test_setup_costs_times_each_part_in_fresh_processes_in_both_orders(tmp_path):
    """On the GPU (or the emulated one): one fresh process per order, every part timed, medians and runs written."""
    out = tmp_path / "setup_costs.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "setup_costs.py"), "--device", "0",
                             "--runs", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == "setup_costs" and set(report["medians"]) == {"backend", "preload"}
    assert list(report["medians"]["backend"]) == ["import cupy", "CUDA context", "import cudnn", "first cuDNN handle",
                                                  "second cuDNN handle", "first convolution"]
    assert list(report["medians"]["preload"]) == ["import cupy", "import cudnn", "open cuDNN's libraries",
                                                  "CUDA context", "first cuDNN handle", "second cuDNN handle",
                                                  "first convolution"]
    assert all(seconds >= 0 for parts in report["medians"].values() for seconds in parts.values())
    assert " backend order (median of 1): " in result.stdout and " preload order (median of 1): " in result.stdout


# ----------------------------------------------------------------------------- bad input: one line, exit status 2

NO_GPU = pytest.mark.skipif(gpu_problem() is None, reason="a GPU is usable here: the run would start")


@pytest.mark.parametrize("script, argv, named", [
    ("layers.py", ["--depth", "9"], "--depth must be 6n+2"),
    ("layers.py", ["--batch", "0"], "--batch must be >= 1, got 0"),
    ("layers.py", ["--batch", "-4"], "--batch must be >= 1, got -4"),
    ("layers.py", ["--dtype", "bfloat16"], "--dtype bfloat16 needs the GPU backend"),      # the CPU by default
    ("layers.py", ["--dtype", "float16"], "--dtype 'float16'"),
    ("layers.py", ["--device", "x"], "--device"),
    ("layers.py", ["--steps", "0"], "--steps must be >= 1"),
    ("layers.py", ["--warmup", "-1"], "--warmup must be >= 0"),
    ("layers.py", ["--peak-gbs", "0"], "--peak-gbs must be positive"),
    ("scaling.py", ["--workers", "abc"], "--workers: a comma-separated list of positive integers, got 'abc'"),
    ("scaling.py", ["--workers", "1,0"], "--workers"),
    ("scaling.py", ["--steps", "0"], "--steps must be >= 1"),
    ("scaling.py", ["--repeats", "0"], "--repeats must be >= 1"),
    ("scaling.py", ["--depth", "10"], "--depth must be 6n+2"),
    ("scaling.py", ["--dtype", "bfloat16"], "--dtype bfloat16 needs the GPU backend"),
    ("scaling.py", ["--cuda-graph", "on"], "--cuda-graph on needs a GPU"),
    ("conv_engines.py", ["--depth", "9"], "--depth must be 6n+2"),
    ("conv_engines.py", ["--dtype", "float16"], "--dtype"),
    ("conv_engines.py", ["--max-seconds", "0"], "--max-seconds"),
    ("time_to_accuracy.py", ["--quick", "--num-layers", "9"], "--num-layers must be 6n+2"),
    ("time_to_accuracy.py", ["--quick", "--dtype", "float16"], "--dtype 'float16'"),
    ("time_to_accuracy.py", ["--quick", "--log-interval", "0"], "--log-interval must be >= 1"),
    ("time_to_accuracy.py", ["--quick", "--gpus", "x"], "--gpus 'x'"),
    ("time_to_accuracy.py", ["--data-dir", "D", "--gpus", "cpu"], "--dtype bfloat16 needs the GPU backend"),
    ("best_step_options.py", ["x.json", "--batch", "0"], "--batch must be >= 1"),
    ("best_step_options.py", ["x.json", "--layout", "nhwc"], "--layout"),
    ("timeline.py", ["--depth", "9"], "--depth must be 6n+2"),
    ("vs_torch.py", ["--depth", "9"], "--depth must be 6n+2"),
])
def test_bench_scripts_refuse_bad_values_in_one_line(script, argv, named):
    assert named in refused(script, *argv)


@pytest.mark.parametrize("script, argv, number", [
    ("layouts.py", [], "--steps"), ("layers.py", [], "--batch"), ("scaling.py", [], "--batch"),
    ("time_to_accuracy.py", ["--quick"], "--seed"), ("conv_engines.py", [], "--batch"), ("timeline.py", [], "--batch"),
    ("vs_torch.py", [], "--batch"), ("setup_costs.py", ["--device", "0"], "--runs"),
    ("best_step_options.py", ["x.json"], "--batch"),
])
@pytest.mark.parametrize("bad", ["unknown flag", "not a number"])
def test_bench_scripts_refuse_argparse_errors_in_one_line_without_a_usage_dump(script, argv, number, bad):
    """An unknown flag, or a value argparse cannot convert, is one line (cupynet's OneLineErrorParser), not argparse's
    usage dump."""
    flags = ["--no-such-flag"] if bad == "unknown flag" else [number, "x"]
    line = refused(script, *argv, *flags)
    assert flags[0] in line and "usage:" not in line


def test_torch_resnet_without_pytorch_says_it_needs_it_in_one_line():
    # Runs whether or not PyTorch is installed: the import is blocked in the child process.
    script = os.path.join(REPO, "bench", "torch_resnet.py")
    code = (f"import runpy, sys; sys.modules['torch'] = None; sys.argv = [{script!r}, '--help']; "
            f"runpy.run_path({script!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result
    assert "needs PyTorch" in lines[0] and "Traceback" not in result.stderr


@NO_GPU
def test_time_to_accuracy_refuses_a_gpu_that_is_not_there_before_anything_runs(tmp_path):
    """--quick --gpus 0 asks for GPU 0 (not the CPU --quick defaults to): where there is none, the one-line error
    cupynet.train gives, before the command line is printed or a temporary model dir made."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    line = refused("time_to_accuracy.py", "--quick", "--gpus", "0", "--json", str(tmp_path / "tta.json"),
                   env=dict(os.environ, TMPDIR=str(scratch)))
    assert line.startswith("error: --gpus 0: ")
    assert list(scratch.iterdir()) == [] and list(tmp_path.iterdir()) == [scratch]


@NO_GPU
@pytest.mark.parametrize("script, argv", [("setup_costs.py", ["--runs", "1"]), ("layers.py", ["--peak-gbs", "100"]),
                                          ("scaling.py", ["--quick"]), ("conv_engines.py", []),
                                          ("layouts.py", ["--quick"])])
def test_bench_scripts_refuse_a_gpu_that_is_not_there_in_one_line(tmp_path, script, argv):
    out = tmp_path / "out.json"
    line = refused(script, "--device", "0", *argv, "--json", str(out))
    assert line.startswith("error: --device 0: ") and not out.exists()


def layouts_default_json():
    """bench/layouts.py's default report (its state: whether it exists, and when it was written)."""
    import platform
    path = os.path.join(REPO, "bench", "results", f"layouts-{platform.node() or 'host'}.json")
    return path, (os.path.getmtime(path) if os.path.exists(path) else None)


@pytest.mark.parametrize("argv, named", [
    (["--depths", "9"], "--depths must be 6n+2"),
    (["--quick", "--dtypes", "float16"], "--dtypes 'float16'"),
    (["--quick", "--dtypes", "float32,bfloat16"], "--dtypes bfloat16 needs the GPU backend"),
    (["--quick", "--cuda-graph", "off,on"], "--cuda-graph on needs a GPU"),
    (["--quick", "--layouts", "nhwc"], "--layouts"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--quick", "--also", "--depths 10"], "--also '--depths 10': --depths must be 6n+2"),
])
def test_layouts_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, argv, named):
    out = tmp_path / "layouts.json"
    assert named in refused("layouts.py", *argv, "--json", str(out))
    assert list(tmp_path.iterdir()) == []
    path, written = layouts_default_json()          # nor its default report, without --json
    refused("layouts.py", *argv)
    assert layouts_default_json() == (path, written)


@pytest.mark.parametrize("content, named", [
    ("not json", "not JSON (Expecting value"), ("{}", "no 'results' list"), ("[]", "no 'results' list"),
    (json.dumps({"results": [1]}), "no 'results' list"),
])
def test_best_step_options_says_once_which_file_and_why(tmp_path, content, named):
    path = tmp_path / "bad.json"
    path.write_text(content)
    line = refused("best_step_options.py", str(path))
    assert line.startswith(f"error: {path}: {named}") and line.count(str(path)) == 1, line
    missing = refused("best_step_options.py", str(tmp_path / "missing.json"))
    assert missing == f"error: {tmp_path / 'missing.json'}: No such file or directory"


def test_timeline_names_a_missing_trace_once():
    missing = os.path.join(REPO, "no-such-trace.json.gz")
    assert refused("timeline.py", "--from-trace", missing) == f"error: {missing}: No such file or directory"
