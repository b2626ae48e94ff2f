"""The GPU tests and the GPU training CLI, run in CI on the emulated GPU of tests/emulated_gpu.

Without a GPU, every test marked `gpu` skips, and the GPU backend's code would go unexercised. Here each
GPU test file runs in a pytest subprocess whose `import cupy` / `import cudnn` find the emulation first
on PYTHONPATH: our kernels (kernels/*.cu, compiled for the CPU from the very source CuPy compiles),
CuPy's stream, event and CUDA-graph capture rules, cuDNN Frontend graphs executed through their strides
(NumPy convolutions) and NCCL between threads. So the backend's launch code, kernel logic, capture
sequencing and multi-GPU paths are tested on every commit; speed, real asynchrony and the true cuDNN,
CuPy and NCCL libraries still need the GPU machine (bench/device_check.sh).

    python -m pytest tests/test_emulated_gpu.py -q         # about four minutes on 2 cores
    PYTHONPATH=tests/emulated_gpu python -m pytest -m gpu tests/test_gpu_parity.py   # one file, by hand
"""
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
EMULATOR = REPO / "tests" / "emulated_gpu"
# Longest first (minutes on CI's 2 cores), so that the two runs at a time finish close together.
GPU_TEST_FILES = ("tests/test_step_options_gpu.py", "tests/test_step_graph_gpu.py", "tests/test_gpu_parity.py",
                  "tests/test_shared_gpu.py", "tests/test_bench_scripts.py", "tests/test_parallel.py",
                  "tests/test_cudnn_conv_gpu.py", "tests/emulated_gpu/check_emulator.py")
# Where AddressSanitizer is at hand, these files' tests (those a -k selection picks; None: all) run with sanitized
# kernels instead of plain ones: a read or write outside an array, or a 16-byte pack off its alignment, stops the
# run with a report (kernel_runner.SANITIZE_FLAGS), where parity alone would miss a read of a neighbour that happens
# to fit. The primitive parity tests (both layouts, both dtypes, odd shapes) and the collectives of workers sharing a
# GPU; the model-level parity tests, which launch the same kernels on larger arrays, stay plain.
SANITIZED = {"tests/test_gpu_parity.py": "not (resnet20 or trainer_steps)", "tests/test_shared_gpu.py": None}
# Captured training steps of ResNet-8 with the step options a GPU has not yet run (bench/device_check.sh times them,
# several rows to a process: a bad access there would end its grid), sanitized: each run's TrainConfig fields, and
# kernels that prove the options' paths ran.
SANITIZED_STEP_OPTIONS = "captured training with every step option, sanitized"
STEP_OPTION_RUNS = (
    (dict(dtype="bfloat16", data_format="NHWC", wgrad_streams=4, conv_deterministic=False, conv_pixel_pairs=True,
          wgrad_pixel_pairs=True, residual_grad_sums=True, conv_tune_in_graph=True, padded_input=True,
          stream_priorities=True, programmatic_launch=True),
     ("pixel_pair_weights", "pixel_pair_weight_gradient", "relu_backward_add_bn_grad", "pad_weight_channels",
      "crop_weight_channels")),
    (dict(dtype="float32", data_format="NHWC", bn_launches=1, conv_deterministic=False, wgrad_streams=2,
          wgrad_chunks=2, conv_pixel_pairs=True, padded_input=True, programmatic_launch_early=True),
     ("bn_stats_apply", "pixel_pair_weights", "pad_weight_channels", "sum_rows")),
    (dict(dtype="bfloat16", data_format="NHWC", own_conv_channels=64, conv_pixel_pairs=True,
          wgrad_pixel_pairs=True, conv_genstats=True, conv_deterministic=False),
     ("conv3x3_mma", "pixel_pair_weight_gradient")),
    (dict(dtype="bfloat16", data_format="NCHW", bn_launches=1, residual_grad_sums=True, conv_split_k=True,
          conv_genstats=True, conv_deterministic=False),
     ("bn_stats_apply", "relu_backward_add_bn_grad", "bn_apply_from_sums")),
)
# Runs in the subprocess: each configuration's captured steps (an evaluation between replays), then its launches.
STEP_OPTIONS_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
from step_graph_runs import small_dataset
from cupynet.config import TrainConfig
from cupynet.train import build_backend
from cupynet.trainer import Trainer
dataset = small_dataset()
for options in json.loads(sys.argv[1]):
    config = TrainConfig(num_layers=8, train_batch_size=16, eval_batch_size=16, bn_decay=0.9, seed=4,
                         cuda_graph="on", **options)
    backend = build_backend(config, 0)
    trainer = Trainer(config, dataset, backend)
    for step in range(5):
        trainer.train_step()
        if step == 3:
            trainer.evaluate(dataset.test)
    assert trainer.runner.captured, options
    print("launches", json.dumps(dict(backend.kernels.launches)), flush=True)
"""
FILE_TIMEOUT_S = 900
TEST_STACKS_AFTER_S = 240              # a test running this long prints every thread's stack (a hang)
PARALLEL_FILES = 2                      # CI has 2 cores


def _kernel_runner():
    sys.path.insert(0, str(EMULATOR))
    try:
        import kernel_runner
    finally:
        sys.path.remove(str(EMULATOR))
    return kernel_runner


COMPILER = _kernel_runner().COMPILER


def _problem():
    """Why the emulation cannot run here, or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the emulated GPU switches fibers with x86-64 assembly (this is {platform.machine()})"
    problem = _kernel_runner().compiler_problem()
    if problem:
        return problem
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return "ml_dtypes is missing (pip install -e '.[test]')"
    return None


PROBLEM = _problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"emulated GPU unavailable: {PROBLEM}")


def libasan():
    """The AddressSanitizer runtime to preload for sanitized kernels, or None."""
    if shutil.which(COMPILER) is None:
        return None
    result = subprocess.run([COMPILER, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = result.stdout.strip()
    return path if result.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


LIBASAN = libasan()
DRIVER_STUB_DIR = _kernel_runner().build_driver_stub() if PROBLEM is None else None


def _static_tls_tunable():
    """The tunable that reserves static TLS for the kernel libraries a process loads (about 300-700 bytes each, a
    few dozen of them), or None where the C library is not glibc 2.32 or later (it has no such tunable)."""
    name, version = platform.libc_ver()
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    return "glibc.rtld.optional_static_tls=262144" if name == "glibc" and numbers >= (2, 32) else None


STATIC_TLS_TUNABLE = _static_tls_tunable()


def emulated_env(devices=1, sanitize=False):
    env = dict(os.environ)
    if sanitize:
        env.update(CUPYNET_EMULATOR_SANITIZE="1", LD_PRELOAD=LIBASAN, ASAN_OPTIONS="detect_leaks=0")
    env["PYTHONPATH"] = os.pathsep.join([str(EMULATOR), str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["CUPYNET_EMULATED_GPUS"] = str(devices)
    # libcuda.so.1 with the one driver function cupynet calls itself (emulated_gpu/cuda_driver_stub.cpp)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(DRIVER_STUB_DIR)] + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = "1"     # the files run side by side
    # glibc keeps freed blocks of up to 32 MB for reuse instead of returning them to the system (the emulated
    # cuDNN's NumPy temporaries would take fresh, faulting pages at every convolution): a run 15% faster
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 32))
    if STATIC_TLS_TUNABLE:     # kernel libraries with initial-exec TLS (kernel_runner.INITIAL_EXEC_TLS)
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), STATIC_TLS_TUNABLE]))
    return env


def run_emulated(args, devices=1, timeout=FILE_TIMEOUT_S, sanitize=False):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=emulated_env(devices, sanitize), capture_output=True,
                          text=True, timeout=timeout)


def _compile_kernels(sanitize=False):
    """Compile every kernel file for the CPU once, two at a time, before the tests use them; the compiler's
    CompletedProcess."""
    code = ("import sys; from concurrent.futures import ThreadPoolExecutor; import kernel_runner as R; "
            "from cupynet.backends import kernels as K; "
            "list(ThreadPoolExecutor(2).map(lambda f: R.build_library(K.module_source(f), K.expressions(f)), "
            "K.KERNELS))")
    return run_emulated(["-c", code], sanitize=sanitize)


def file_runs():
    """(run name, file, sanitized, -k selection or None) of each pytest run of the GPU test files, longest first:
    a file of SANITIZED runs sanitized where AddressSanitizer is at hand, and plain for what its selection leaves."""
    runs = []
    for file in GPU_TEST_FILES:
        if LIBASAN is None or file not in SANITIZED:
            runs.append((file, file, False, None))
            continue
        selection = SANITIZED[file]
        runs.append((f"{file}, sanitized", file, True, selection))
        if selection is not None:
            runs.append((file, file, False, f"not ({selection})"))
    return runs


@pytest.fixture(scope="module")
def file_results():
    """run name -> result: pytest -m gpu on each GPU test file (file_runs), on the emulated GPU (two emulated
    devices), and the sanitized captured training of STEP_OPTION_RUNS, two runs at a time."""
    compiled = _compile_kernels()
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    runs = file_runs()
    if LIBASAN is not None:
        runs.insert(1, (SANITIZED_STEP_OPTIONS, None, True, None))

    def run(entry):
        name, file, sanitize, selection = entry
        if name == SANITIZED_STEP_OPTIONS:
            configs = json.dumps([options for options, _ in STEP_OPTION_RUNS])
            return name, run_emulated(["-c", STEP_OPTIONS_SCRIPT, configs], sanitize=True)
        # --capture=sys: what a kernel library writes to the process's stderr (AddressSanitizer's report, before
        # it ends the process) goes past pytest's capture into the result, where fd capture would swallow it
        args = ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--capture=sys", file,
                *(["-k", selection] if selection else []), "-o", f"faulthandler_timeout={TEST_STACKS_AFTER_S}"]
        if sanitize:
            compiled = _compile_kernels(sanitize=True)
            if compiled.returncode != 0:
                return name, compiled
        try:
            return name, run_emulated(args, devices=2, sanitize=sanitize)
        except subprocess.TimeoutExpired as stuck:
            # One run's hang fails that file's test, with what it printed (the stacks of every thread
            # included, from faulthandler_timeout), instead of an error for every file.
            output = [text.decode(errors="replace") if isinstance(text, bytes) else (text or "")
                      for text in (stuck.stdout, stuck.stderr)]
            return name, subprocess.CompletedProcess(stuck.cmd, -9, output[0],
                                                     output[1] + f"\n{name}: killed after {FILE_TIMEOUT_S} s")

    with ThreadPoolExecutor(PARALLEL_FILES) as pool:
        return dict(pool.map(run, runs))


def test_every_gpu_test_file_is_run_on_the_emulated_gpu():
    marked = {str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py")
              if path.name != Path(__file__).name and "pytest.mark.gpu" in path.read_text()}
    assert marked <= set(GPU_TEST_FILES), f"add to GPU_TEST_FILES: {sorted(marked - set(GPU_TEST_FILES))}"


def assert_every_test_passed(name, result):
    """A pytest run of file_results passed, every test of it run (two emulated GPUs: none may skip)."""
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    report = f"{name}: exit {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-8000:]}"
    assert result.returncode == 0, report
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "error" not in summary, report
    assert "skipped" not in summary, report


@pytest.mark.parametrize("file", GPU_TEST_FILES)
def test_gpu_test_file_passes_on_the_emulated_gpu(file_results, file):
    """Every run of the file (plain, or sanitized and plain: file_runs) passes, each test of it run once."""
    for name, of, _, _ in file_runs():
        if of == file:
            assert_every_test_passed(name, file_results[name])


def test_training_cli_on_two_emulated_gpus_captures_resumes_and_hands_over_to_the_cpu(tmp_path):
    """`--gpus 0,1`: NCCL all-reduce, captured steps (auto), a checkpoint, a resume on the GPUs (with two
    side streams for the weight gradients, each computed in two chunks of the worker's batch), then the
    same model dir resumed by the CPU backend (checkpoints are interchangeable)."""
    model_dir = tmp_path / "model"
    common = ["-m", "cupynet.train", "--model-dir", str(model_dir), "--log-interval", "3", "--checkpoint-interval", "3",
              "--eval-on", "validation"]                  # 100 images: evaluation is sharded all the same
    first = run_emulated(common + ["--gpus", "0,1", "--train-steps", "6"], devices=2)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "cupy on 0, 1" in first.stdout and "NCCL all-reduce" in first.stdout
    assert first.stdout.count("warm-up: ") == 1              # the chief's, at the first replayed step
    # the chief's backend setup, by part: where a run's seconds before its first step go (the workers build their
    # backends once the data is loaded; one device builds its backend while the data loads: test_cli.py)
    assert re.search(r"setup [\d.]+s: data [\d.]+s \(loaded [\d.]+s\), backend [\d.]+s \(CUDA context [\d.]+s, "
                     r"cuDNN import [\d.]+s, cuDNN handles [\d.]+s\), model [\d.]+s", first.stdout), first.stdout
    assert re.search(r"final: \w+ accuracy [\d.]+% \(\d+/100\)", first.stdout), first.stdout
    second = run_emulated(common + ["--gpus", "0,1", "--train-steps", "9", "--wgrad-streams", "2", "--wgrad-chunks", "2"],
                          devices=2)
    assert second.returncode == 0 and "resuming from ckpt-00000006.npz (step 6)" in second.stdout, \
        second.stdout + second.stderr
    assert second.stdout.count("warm-up: ") == 1             # a resumed run records its step again
    on_cpu = subprocess.run([sys.executable, *common, "--gpus", "cpu", "--train-steps", "10"], cwd=REPO,
                            capture_output=True, text=True, timeout=FILE_TIMEOUT_S)
    assert on_cpu.returncode == 0 and "resuming from ckpt-00000009.npz (step 9)" in on_cpu.stdout, \
        on_cpu.stdout + on_cpu.stderr


def test_sigterm_on_two_emulated_gpus_stops_both_workers_at_one_step_and_the_rerun_continues(tmp_path):
    """`--gpus 0,1`, captured steps with NCCL: SIGTERM stops both workers at the same step with a checkpoint there
    (a worker that stopped a step before the other would leave it waiting in that step's all-reduce), and the
    rerun trains the same parameters as a run never stopped. Each worker waits for its part of the checkpoint's
    all-reduce before it ends (the emulated NCCL runs a rank's part only when its stream is waited for: the first
    version of the stop left it unrun, and the chief waited for its peer until the emulated NCCL timed out)."""
    from cupynet.checkpoint import latest_checkpoint, load_checkpoint
    stopped_dir, straight_dir = tmp_path / "stopped", tmp_path / "straight"
    common = ["-m", "cupynet.train", "--gpus", "0,1", "--synthetic", "--num-layers", "8", "--train-batch-size", "16",
              "--log-interval", "1", "--checkpoint-interval", "1000", "--validation-size", "20", "--eval-on",
              "validation", "--eval-batch-size", "20", "--dtype", "bfloat16"]
    process = subprocess.Popen([sys.executable, *common, "--model-dir", str(stopped_dir), "--train-steps", "100000"],
                               cwd=REPO, env=dict(emulated_env(devices=2), PYTHONUNBUFFERED="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:                         # a few replayed steps first
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 5:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=FILE_TIMEOUT_S)
    assert process.returncode == 143, stderr
    step = load_checkpoint(latest_checkpoint(str(stopped_dir)))[1]["step"]
    assert stderr.strip().splitlines() == [f"terminated (SIGTERM) at step {step}: ckpt-{step:08d}.npz holds it; "
                                           "rerun the same command to resume"]
    for model_dir in (stopped_dir, straight_dir):
        result = run_emulated(common + ["--model-dir", str(model_dir), "--train-steps", str(step + 2)], devices=2)
        assert result.returncode == 0, result.stdout + result.stderr
    arrays_a, meta_a = load_checkpoint(latest_checkpoint(str(stopped_dir)))
    arrays_b, meta_b = load_checkpoint(latest_checkpoint(str(straight_dir)))
    assert meta_a["step"] == meta_b["step"] == step + 2
    for name in arrays_a:                               # the moving statistics: tests/test_stop_request.py says why
        if "moving_" in name:
            np.testing.assert_allclose(arrays_a[name], arrays_b[name], rtol=1e-5, atol=1e-9, err_msg=name)
        else:
            np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


def test_evaluations_during_training_on_two_emulated_gpus_leave_the_captured_training_as_it_was(tmp_path):
    """`--gpus 0,1 --eval-interval 2`, captured steps with NCCL: the evaluations between replays (the moving
    statistics all-reduced for them, then each replica's own put back) change nothing in the training."""
    from cupynet.checkpoint import latest_checkpoint, load_checkpoint
    from cupynet.report import read_metrics
    common = ["-m", "cupynet.train", "--gpus", "0,1", "--synthetic", "--num-layers", "8", "--train-batch-size", "16",
              "--log-interval", "3", "--checkpoint-interval", "1000", "--validation-size", "20", "--eval-on",
              "validation", "--eval-batch-size", "20", "--dtype", "bfloat16", "--train-steps", "7"]
    for name, more in (("curve", ["--eval-interval", "2"]), ("plain", [])):
        result = run_emulated(common + ["--model-dir", str(tmp_path / name), *more], devices=2)
        assert result.returncode == 0, result.stdout + result.stderr
    during = [e["step"] for e in read_metrics(str(tmp_path / "curve")) if e["event"] == "eval_during_training"]
    assert during == [2, 4, 6]          # between replays: the step is recorded after two eager ones
    arrays_a, _ = load_checkpoint(latest_checkpoint(str(tmp_path / "curve")))
    arrays_b, _ = load_checkpoint(latest_checkpoint(str(tmp_path / "plain")))
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


def test_a_checkpoint_trained_on_the_cpu_evaluates_on_the_emulated_gpu(tmp_path):
    """`python -m cupynet.evaluate` on GPU 0: the CPU run's final checkpoint gives its loss in float32 (to rounding)
    and in bfloat16 (to bfloat16's); a GPU id that is not there is one line."""
    from cupynet.report import read_metrics
    model_dir = tmp_path / "run"
    trained = subprocess.run([sys.executable, "-m", "cupynet.train", "--gpus", "cpu", "--model-dir", str(model_dir),
                              "--train-steps", "3", "--train-batch-size", "16", "--checkpoint-interval", "3"],
                             cwd=REPO, capture_output=True, text=True, timeout=FILE_TIMEOUT_S)
    assert trained.returncode == 0, trained.stderr
    final = read_metrics(str(model_dir))[-1]
    for dtype, rtol in (("float32", 1e-4), ("bfloat16", 3e-2)):
        result = run_emulated(["-m", "cupynet.evaluate", str(model_dir), "--gpus", "0", "--dtype", dtype])
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert f"backend: cupy on 0, NHWC {dtype}" in lines[1], lines
        np.testing.assert_allclose(float(lines[2].rsplit("loss ", 1)[1]), final["loss"], rtol=rtol)
    missing = run_emulated(["-m", "cupynet.evaluate", str(model_dir), "--gpus", "1"])
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: --gpus: no GPU 1")


def test_a_gpu_runs_checkpoints_evaluate_on_the_gpu_as_the_run_evaluated_them(tmp_path):
    """Captured bf16 steps with an evaluation between replays at step 2, then `python -m cupynet.evaluate --all` in
    a fresh process: step 2's checkpoint gives that evaluation, step 4's the final one, bit for bit (training's
    engines adopted from the checkpoint, the evaluation's own shapes untimed in both processes; the forward's
    kernels the run's: our own convolution kernel, stage 1 on pixel pairs where it leaves them, the input padded)."""
    from cupynet.report import read_metrics
    model_dir = tmp_path / "run"
    trained = run_emulated(["-m", "cupynet.train", "--gpus", "0", "--synthetic", "--num-layers", "8",
                            "--train-batch-size", "16", "--validation-size", "40", "--eval-on", "validation",
                            "--eval-batch-size", "24", "--dtype", "bfloat16", "--train-steps", "4",
                            "--eval-interval", "2", "--checkpoint-interval", "2", "--own-conv-channels", "32",
                            "--conv-pixel-pairs", "--padded-input", "--model-dir", str(model_dir)])
    assert trained.returncode == 0, trained.stdout + trained.stderr
    events = read_metrics(str(model_dir))
    during, final = [e for e in events if e["event"] == "eval_during_training"], events[-1]
    assert [e["step"] for e in during] == [2] and final["event"] == "eval"
    again = run_emulated(["-m", "cupynet.evaluate", str(model_dir), "--all", "--gpus", "0", "--eval-on", "validation"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines()[2:] == [
        f"ckpt-0000000{e['step']}.npz  step {e['step']}  validation accuracy {e['accuracy']:.2%} ({e['correct']}/40)  "
        f"loss {e['loss']:.4f}" for e in (during[0], final)]


def test_our_own_conv_kernel_is_refused_in_one_line_on_a_gpu_older_than_ampere(tmp_path):
    """--own-conv-channels on a GPU of compute capability 7.5 (the emulated device told to be one): one line,
    a non-zero exit, nothing written; without the option the same GPU trains."""
    env = dict(emulated_env(), CUPYNET_EMULATED_COMPUTE_CAPABILITY="75")
    run = ["-m", "cupynet.train", "--gpus", "0", "--synthetic", "--num-layers", "8", "--train-batch-size", "8",
           "--eval-batch-size", "50", "--train-steps", "1", "--validation-size", "0"]
    refused = subprocess.run([sys.executable, *run, "--own-conv-channels", "16", "--model-dir", str(tmp_path / "m")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
    lines = (refused.stdout + refused.stderr).strip().splitlines()
    assert lines[-1] == ("error: --own-conv-channels needs a GPU of compute capability 8.0 or later (its kernel "
                         "multiplies with mma.sync on bf16 and TF32); GPU 0 is 7.5: leave the option out"), lines
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("gpus, message", [("2", "no GPU 2"), ("0,0", "0")])
def test_training_cli_rejects_a_missing_or_repeated_emulated_gpu(tmp_path, gpus, message):
    result = run_emulated(["-m", "cupynet.train", "--gpus", gpus, "--model-dir", str(tmp_path / "m")], devices=2,
                          timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines[-1].startswith("error: --gpus") and message in lines[-1], lines
    assert not (tmp_path / "m").exists()


def test_gpu_benchmarks_run_on_the_emulated_gpu(tmp_path):
    """The GPU paths of bench/layouts.py (eager and captured), layers.py (each call also timed alone in a
    graph, with the L2 cache evicted before it or not), conv_engines.py and scaling.py (shared-GPU workers and NCCL) write their JSON; the figures are the emulation's,
    and the header says so."""
    small = ["--depth", "8", "--batch", "8"]
    runs = {
        "layouts": ["bench/layouts.py", "--device", "0", "--depths", "8", "--batches", "8", "--layouts", "NHWC",
                    "--dtypes", "bfloat16", "--cuda-graph", "off,on", "--wgrad-pairs", "2x1,2x2", "--conv-split-k", "off,on",
                    "--max-seconds", "900", "--warmup", "3", "--steps", "1", "--repeats", "2"],
        "layers": ["bench/layers.py", "--device", "0", *small, "--layout", "NCHW", "--dtype", "float32", "--steps", "1",
                   "--peak-gbs", "3350", "--bn-launches", "1"],
        "layers_warm": ["bench/layers.py", "--device", "0", *small, "--layout", "NHWC", "--dtype", "bfloat16",
                        "--steps", "1", "--peak-gbs", "3350", "--l2", "warm"],
        "conv_engines": ["bench/conv_engines.py", "--device", "0", "--depth", "8", "--batch", "4", "--runs", "2",
                         "--repeats", "2"],
        "scaling": ["bench/scaling.py", "--device", "0", *small, "--workers", "1,2", "--comm", "shared",
                    "--warmup", "2", "--steps", "1", "--repeats", "2"],
        "scaling_nccl": ["bench/scaling.py", "--device", "0", *small, "--workers", "1", "--comm", "nccl",
                         "--warmup", "2", "--steps", "1", "--repeats", "2"],
    }
    with ThreadPoolExecutor(PARALLEL_FILES) as pool:      # two at a time, as the GPU test files
        results = dict(pool.map(lambda item: (item[0], run_emulated(
            item[1] + ["--json", str(tmp_path / f"{item[0]}.json")], timeout=300)), runs.items()))
    for name, result in results.items():
        assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr[-8000:]}"
        assert "Emulated CUDA device" in result.stdout, result.stdout
        report = json.loads((tmp_path / f"{name}.json").read_text())
        rows = report.get("results") or report.get("primitives") or report.get("convolutions")
        assert rows, report
    layouts = json.loads((tmp_path / "layouts.json").read_text())["results"]
    assert sorted(row["captured"] for row in layouts) == [False] * 4 + [True] * 4
    assert all(row["wgrad_streams"] == 2 for row in layouts)
    assert sorted(row["conv_split_k"] for row in layouts) == [False] * 4 + [True] * 4
    # the emulation's split-K engine gives every weight gradient settings: the first row with split-K builds
    # them (later rows of the same shapes build only those the process chose); only split-K rows report
    reports = [row["split_k_settings"] for row in layouts if row["conv_split_k"]]
    assert all(row["split_k_settings"] is None for row in layouts if not row["conv_split_k"])
    assert all("chosen" in report for report in reports) and reports[0]["built"] > 0, reports
    eager = {row["wgrad_chunks"]: row["kernels_per_step"] for row in layouts
             if not row["captured"] and not row["conv_split_k"]}
    # ResNet-8's 7 weight gradients are two cuDNN calls each with 2 chunks; the bf16 step sums its weight
    # gradients' rows in one kernel either way (one row: the conversion), so nothing else changes
    assert eager[2] - eager[1] == 7, eager
    assert [row["workers"] for row in json.loads((tmp_path / "scaling.json").read_text())["results"]] == [1, 2]
    engines = json.loads((tmp_path / "conv_engines.json").read_text())["convolutions"]
    assert {row["op"] for row in engines} == {"fprop", "dgrad", "wgrad"}
    for row in engines:       # cupynet's engine is one of those surveyed; the emulation has a nondeterministic one
        assert row["cupynet_us"] and any(e.get("name") == row["cupynet_engine"] and e["deterministic"]
                                         for e in row["engines"]), row
        assert any("us" in e and not e["deterministic"] for e in row["engines"]), row
    per_step = json.loads((tmp_path / "conv_engines.json").read_text())["per_step_us"]
    for op in ("fprop", "dgrad", "wgrad"):   # every convolution has all three figures here: all are counted
        assert per_step[op]["convolutions"] == sum(row["op"] == op for row in engines), per_step
    variants = {row["op"]: sorted(name for name, found in row["variants"].items() if found) for row in engines}
    assert variants == {"wgrad": ["float32_output", "scale_bias_relu", "split_k"], "dgrad": ["own_kernel"],
                        "fprop": ["genstats", "own_kernel", "scale_bias_relu_genstats"]}
    # cupynet's own kernel: timed for every forward and data gradient it takes (16 to 64 channels; a data gradient
    # at stride 1), a row of its own, deterministic
    for row in engines:
        match = re.search(r"C=(\d+) H=\d+ W=\d+ K=(\d+) 3x3 stride (\d)", row["conv"])
        takes = row["op"] != "wgrad" and match is not None and int(match.group(1)) >= 16 and \
            (row["op"] == "fprop" or match.group(3) == "1")
        own = row["variants"].get("own_kernel")
        assert takes == (own is not None), row["conv"]
        assert not takes or [engine["name"] for engine in own if "us" in engine and engine["deterministic"]] == [
            "cupynet conv3x3_mma"], row
    assert sum("own_kernel" in row["variants"] for row in engines) == 8, [row["conv"] for row in engines]
    # pixel pairs: timed for the 3x3 stride-1 convolutions of at most 16 channels (ResNet-8's stem and stage
    # 1 here: the stem's forward and weight gradient, stage 1's three), and for no other
    narrow = re.compile(r"C=(\d+) H=\d+ W=\d+ K=(\d+) 3x3 stride 1 pad 1$")
    for row in engines:
        match = narrow.search(row["conv"])
        eligible = match is not None and max(map(int, match.groups())) <= 16
        paired = row["variants"].get("pixel_pairs")
        assert eligible == (paired is not None), row["conv"]
        assert not eligible or any("us" in engine for engine in paired), row
    assert sum("pixel_pairs" in row["variants"] for row in engines) == 5, [row["conv"] for row in engines]
    # the input padded to 8 channels, and groups of 8 pixels: timed for the stem's forward and weight gradient
    # (3 channels in), and for no other
    stem = {row["conv"] for row in engines if " C=3 " in row["conv"]}
    assert len(stem) == 2, stem
    for variant in ("padded_input", "pixel_octets"):
        found = {row["conv"]: row["variants"][variant] for row in engines if variant in row["variants"]}
        assert set(found) == stem, (variant, found)
        assert all(any("us" in engine for engine in timed) for timed in found.values()), (variant, found)
    for row in engines:       # the emulated cuDNN's split-K engines: one adds its slices in order, one by atomics
        if row["op"] == "wgrad":
            timed = {(e["name"].split(" (")[1], e["deterministic"]) for e in row["variants"]["split_k"] if "us" in e}
            assert timed == {("split-k slices)", True), ("split-k atomics)", False)}, row["variants"]["split_k"]
    for name in ("layers", "layers_warm"):   # every call replayed alone in a graph, L2 evicted before it or not
        layers = json.loads((tmp_path / f"{name}.json").read_text())
        # (copies are not replayed; wait_for_gradients only orders the streams: its graph has no kernel; and
        # advance_step, one thread adding 1, costs what the empty kernel subtracted from every figure costs:
        # these may time at 0.000 ms, never below)
        near_empty = ("wait_for_gradients", "advance_step")
        timed_alone = [row for row in layers["primitives"]
                       if row["primitive"] not in ("to_host", "from_host", "upload_into")]
        assert layers["kernel_ms_sum"] > 0 and all(row["device_ms_per_step"] > 0 for row in timed_alone
                                                   if row["primitive"] not in near_empty), layers
        assert all(row["device_ms_per_step"] >= 0 for row in timed_alone), layers
        # per shape: the same calls, split by their first array's shape (BatchNorm: one per stage at least)
        for row in timed_alone:
            split = [r for r in layers["by_shape"] if r["primitive"] == row["primitive"]]
            assert sum(r["calls_per_step"] for r in split) == row["calls_per_step"], (row, split)
            assert abs(sum(r["us_per_step"] for r in split) / 1000 - row["device_ms_per_step"]) < 1e-3, (row, split)
        shapes = {tuple(r["shape"]) for r in layers["by_shape"] if r["primitive"] == "batchnorm_train_forward"}
        assert {shape[1 if name == "layers" else 3] for shape in shapes} == {16, 32, 64}, shapes


def test_conv_engines_past_its_time_still_reports_what_it_could_not_survey(tmp_path):
    """--max-seconds bounds the whole run, setup included: with no time left it surveys nothing, yet exits
    0 with a JSON report naming every convolution it did not reach."""
    result = run_emulated(["bench/conv_engines.py", "--device", "0", "--depth", "8", "--batch", "2",
                           "--max-seconds", "0.01", "--json", str(tmp_path / "ce.json")], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((tmp_path / "ce.json").read_text())
    assert report["convolutions"] == [] and len(report["not_surveyed"]) == 17, report["not_surveyed"]


@pytest.mark.skipif(LIBASAN is None, reason="no AddressSanitizer runtime (libasan) for the kernel compiler")
def test_sanitized_kernels_stop_at_an_out_of_bounds_access():
    """CUPYNET_EMULATOR_SANITIZE=1 builds kernels with AddressSanitizer: one element past the end is reported
    (the memcheck that the parity run below relies on)."""
    code = ("import numpy as np, cupy\n"
            "m = cupy.RawModule(code='extern \"C\" __global__ void inc(float* x, int n) "
            "{ for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] += 1.0f; }', name_expressions=['inc'])\n"
            "x = cupy.zeros((100,), dtype=np.float32)\n"
            "m.get_function('inc')((1,), (32,), (x, np.int32(100)))\n"
            "cupy.cuda.Device().synchronize()\n"
            "print('in bounds ok', flush=True)\n"
            "m.get_function('inc')((1,), (32,), (x, np.int32(101)))\n"
            "cupy.cuda.Device().synchronize()\n")
    result = run_emulated(["-c", code], timeout=300, sanitize=True)
    assert "in bounds ok" in result.stdout and result.returncode != 0, result.stdout + result.stderr[-2000:]
    # the 256-byte alignment slack around an array is poisoned by hand: ASan calls it use-after-poison
    assert re.search(r"AddressSanitizer: (use-after-poison|heap-buffer-overflow)", result.stderr) and \
        "in inc" in result.stderr, result.stderr[-3000:]


@pytest.mark.skipif(LIBASAN is None, reason="no AddressSanitizer runtime (libasan) for the kernel compiler")
def test_sanitized_kernels_stop_at_a_misaligned_pack():
    """Sanitized kernels also check alignment: a 16-byte load from a float array 4 bytes off a 16-byte boundary is
    reported, as a GPU would fault on it (an x86 CPU would load it)."""
    code = ("import numpy as np, cupy\n"
            "m = cupy.RawModule(code='extern \"C\" __global__ void copy_pack(const float* x, float* y, int at) "
            "{ reinterpret_cast<uint4*>(y)[0] = reinterpret_cast<const uint4*>(x + at)[0]; }', "
            "name_expressions=['copy_pack'])\n"
            "x = cupy.arange(16, dtype=np.float32)\n"
            "y = cupy.zeros((4,), dtype=np.float32)\n"
            "m.get_function('copy_pack')((1,), (1,), (x, y, np.int32(4)))\n"
            "print('aligned', y.get().tolist(), flush=True)\n"
            "m.get_function('copy_pack')((1,), (1,), (x, y, np.int32(1)))\n"
            "cupy.cuda.Device().synchronize()\n"
            "print('misaligned', y.get().tolist(), flush=True)\n")
    result = run_emulated(["-c", code], timeout=300, sanitize=True)
    assert "aligned [4.0, 5.0, 6.0, 7.0]" in result.stdout and "misaligned" not in result.stdout and \
        result.returncode != 0, result.stdout + result.stderr[-2000:]
    assert re.search(r"misaligned address 0x[0-9a-f]+ for type 'const (struct )?uint4', which requires 16 byte "
                     r"alignment", result.stderr), result.stderr[-3000:]


@pytest.mark.skipif(LIBASAN is None, reason="no AddressSanitizer runtime (libasan) for the kernel compiler")
def test_every_step_option_stays_in_bounds_and_aligned_in_captured_training(file_results):
    """Captured ResNet-8 steps with every step option a GPU has not yet run (three combinations, both dtypes and
    layouts), sanitized kernels: no kernel reads or writes outside its arrays or off its alignment, and each
    option's own kernels ran. Run in file_results' pool, beside the GPU test files."""
    result = file_results[SANITIZED_STEP_OPTIONS]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    launches = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
                if line.startswith("launches ")]
    assert len(launches) == len(STEP_OPTION_RUNS), result.stdout[-4000:]
    for (options, kernels), launched in zip(STEP_OPTION_RUNS, launches):
        assert all(launched.get(kernel, 0) > 0 for kernel in kernels), (options, launched)


@pytest.mark.skipif(LIBASAN is None, reason="no AddressSanitizer runtime (libasan) for the kernel compiler")
def test_the_primitive_parity_tests_and_the_shared_gpu_collectives_run_with_sanitized_kernels(file_results):
    """SANITIZED's tests ran with sanitized kernels (in file_results' pool, beside the GPU test files) and passed:
    no kernel read or wrote outside its arrays or loaded or stored a pack off its alignment; the rest of their
    files ran plain (test_gpu_test_file_passes_on_the_emulated_gpu checks every run)."""
    sanitized = {file: name for name, file, sanitize, _ in file_runs() if sanitize}
    assert set(sanitized) == set(SANITIZED)
    for name in sanitized.values():
        assert_every_test_passed(name, file_results[name])
