"""CPU checks of the one-shot GPU verification script and of the Python scripts it calls.

    python -m pytest tests/test_device_check_script.py -q

The script itself only does its real work on the GPU machine; here we check that it parses, that the
PyTorch comparison compiles (PyTorch need not be installed), that a run with no time budget left still
records every stage, writes the summary and exits non-zero, that the summary renders the JSON the
benchmark scripts really write, and that PyTorch stays out of cupynet.
"""
import json
import os
import pathlib
import py_compile
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "device_check.sh"
TORCH_SCRIPTS = ("vs_torch.py", "torch_resnet.py")
STAGE_NAMES = ("install", "versions", "gpu_tests", "step_options", "cifar", "accuracy", "vs_torch", "batch512", "layers",
               "timeline", "timeline512", "timeline_fp32", "accuracy_more", "conv_engines", "layouts", "scaling", "train",
               "setup_costs")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


@needs_bash
@pytest.mark.parametrize("script", [SCRIPT, REPO / "bench" / "prepare_device_run.sh",
                                    REPO / "bench" / "rehearse_device_check.sh"], ids=lambda p: p.name)
def test_device_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_bash
def test_prepare_device_run_refuses_a_folder_without_the_archive(tmp_path):
    """Without the archive it stops with one line naming the file, before downloading anything."""
    shutil.copytree(REPO / "bench", tmp_path / "bench")
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "nvidia_cudnn_frontend-1.22.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    result = subprocess.run(["bash", str(tmp_path / "bench" / "prepare_device_run.sh"), str(tmp_path / "nothing")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cifar10-jpeg.tar.xz" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / ".data").exists()


@pytest.mark.parametrize("name", TORCH_SCRIPTS)
def test_torch_scripts_compile(tmp_path, name):
    py_compile.compile(str(REPO / "bench" / name), cfile=str(tmp_path / f"{name}c"), doraise=True)


@needs_bash
def test_spent_budget_records_every_stage_and_fails(tmp_path):
    """DEVICE_CHECK_BUDGET=1: no stage may start, yet each is recorded, a summary is written, exit != 0."""
    env = dict(os.environ, OUT=str(tmp_path), DEVICE_CHECK_BUDGET="1")
    env.pop("CIFAR_JPEG", None)
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stdout + result.stderr
    recorded = [line.split("\t")[0] for line in (tmp_path / "stages.tsv").read_text().splitlines()]
    assert recorded == list(STAGE_NAMES)
    summary = (tmp_path / "summary.txt").read_text()
    assert "NOT RUN" in summary and "result: FAILED" in summary
    # what comes back: the device tool returns at most 8 files of its $OUT, so the stages' files come packed
    import tarfile
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best_options.txt", "device_check.tar.gz", "stages.tsv",
                                                              "summary.txt"]
    with tarfile.open(tmp_path / "device_check.tar.gz") as bundle:
        packed = {name.removeprefix("./") for name in bundle.getnames()}
        assert {"stages.tsv", "summary.txt", "best_options.txt"} <= packed
        assert bundle.extractfile("./summary.txt").read().decode() == summary


def test_a_later_call_takes_the_step_options_measured_by_an_earlier_one(tmp_path):
    """DEVICE_CHECK_OPTIONS_FROM=DIR: the step_options stage is skipped (recorded as such) and the options are
    chosen from DIR's step_options*.json, as if this call had measured them; a DIR without them fails."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    rows = [dict(configuration, captured=True, layout="NHWC", dtype="bfloat16", depth=44)
            for configuration in ({"batch": 128, "wgrad_streams": 1, "wgrad_chunks": 1, "images_per_sec": 40000},
                                  {"batch": 128, "wgrad_streams": 8, "wgrad_chunks": 8, "images_per_sec": 50000})]
    (earlier / "step_options.json").write_text(json.dumps({"benchmark": "layouts", "results": rows}))
    out = tmp_path / "out"
    everything = ",".join(name for name in STAGE_NAMES if name != "step_options")
    env = dict(os.environ, OUT=str(out), DEVICE_CHECK_SKIP=everything, DEVICE_CHECK_OPTIONS_FROM=str(earlier))
    env.pop("CIFAR_JPEG", None)
    subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "step_options\tskipped\t0\tmeasured earlier" in (out / "stages.tsv").read_text()
    assert "bf16_128: --wgrad-streams 8 --wgrad-chunks 8" in (out / "best_options.txt").read_text()

    env["DEVICE_CHECK_OPTIONS_FROM"] = str(tmp_path / "nothing")
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "step_options\tFAILED" in (out / "stages.tsv").read_text()


def test_cupynet_never_imports_torch():
    """PyTorch is a benchmark peer only: no module of the package may import it."""
    offenders = []
    for path in (REPO / "cupynet").rglob("*.py"):
        for line in path.read_text().splitlines():
            if re.match(r"\s*(import|from)\s+torch\b", line) or "torch_resnet" in line:
                offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert not offenders, offenders


def summary_program():
    """The summary's Python, as device_check.sh feeds it to the interpreter (its here-document)."""
    lines = SCRIPT.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('timeout 30 "$PY" - "$FAILED" <<'))
    end = lines.index("EOF", start)
    return "\n".join(lines[start + 1:end])


def test_summary_renders_the_benchmarks_json(tmp_path):
    """Real --quick JSON of layouts.py and layers.py (CPU) -> the summary's throughput and primitive tables."""
    for script in ("layouts", "layers"):
        result = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), "--quick",
                                 "--json", str(tmp_path / f"{script}.json")], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    (tmp_path / "stages.tsv").write_text("install\tok\t1\t\n")
    report = json.loads((tmp_path / "layouts.json").read_text())              # the step_options stage's format,
    failed = dict(report["results"][0], wgrad_chunks=4, error="CUDARuntimeError: out of memory")   # with a failed
    for key in ("images_per_sec", "step_ms", "captured"):                                         # configuration
        del failed[key]
    report["results"].append(failed)
    report["results"].append(dict(report["results"][0], conv_split_k=True,      # a row with split-K settings
                                  split_k_settings={"tried": 21, "built": 14, "chosen": 5}))
    report["results"].append(dict(report["results"][0], conv_genstats=True,     # with genstats, and with it but
                                  genstats={"fused": 40, "unsupported": 3}))    # nothing counted (it did nothing)
    report["results"].append(dict(report["results"][0], conv_split_k=True, conv_genstats=True, genstats={}))
    report["results"].append(dict(report["results"][0], wgrad_chunks=3, conv_pixel_pairs=True))   # pixel pairs
    report["results"].append(dict(report["results"][0], wgrad_chunks=5, residual_grad_sums=True))  # residual sums
    report["not_measured"] = [dict(failed, wgrad_chunks=8)]
    (tmp_path / "step_options.json").write_text(json.dumps(report))
    (tmp_path / "layouts.json").write_text(json.dumps(report))
    (tmp_path / "best_options.txt").write_text("bf16_128: --wgrad-chunks 2\n")
    (tmp_path / "vs_torch.json").write_text(json.dumps({         # the options a comparison and an accuracy run had
        "args": {"conv_genstats": True, "conv_deterministic": False, "residual_grad_sums": True},
        "results": [{"batch": 128, "layout": "NHWC", "dtype": "bfloat16", "ratio_vs_torch_graph": 1.4,
                     "torch_graph": {"images_per_sec": 36732.5}}]}))
    (tmp_path / "vs_torch_fp32.json").write_text(json.dumps({    # options that did not verify, then the defaults
        "args": {"wgrad_streams": 4}, "results": [],
        "verification": [{"layout": "NCHW", "dtype": "float32", "passed": False, "loss_rel_error": 0.02}]}))
    (tmp_path / "vs_torch_fp32_defaults.json").write_text(json.dumps({
        "args": {}, "verification": [{"layout": "NCHW", "dtype": "float32", "passed": True}],
        "results": [{"batch": 128, "layout": "NCHW", "dtype": "float32", "ratio_vs_torch_graph": 1.6}]}))
    (tmp_path / "vs_torch_512.json").write_text(json.dumps({     # pixel pairs asked for: NCHW runs without
        "args": {"conv_pixel_pairs": True}, "verification": [],
        "results": [{"batch": 512, "layout": layout, "dtype": "bfloat16", "ratio_vs_torch_graph": ratio,
                     "ratio_vs_torch_eager": 5.0, "cupynet": {"images_per_sec": 9.0, "conv_pixel_pairs": layout == "NHWC",
                                 "conv_deterministic": True}}
                    for layout, ratio in (("NHWC", 1.7), ("NCHW", 1.2))]}))
    accuracy = {"args": {"dtype": "bfloat16", "seed": 0, "conv_genstats": True}, "test_accuracy": 0.88,
                "wall_seconds": 140, "train_seconds": 133, "images_per_sec": 41000, "setup_seconds": 6.9,
                "setup_phases": {"data": 1.2, "backend": 4.5, "model": 1.2}, "warmup_seconds": 0.61,
                "setup_parts": {"backend": {"CUDA context": 0.4, "cuDNN import": 1.3, "cuDNN handles": 2.8}}, "eval_seconds": 0.3}
    (tmp_path / "accuracy.json").write_text(json.dumps(accuracy))
    for seed, option in ((1, "conv_pixel_pairs"), (2, "residual_grad_sums")):
        args = {"dtype": "bfloat16", "seed": seed, option: True}
        (tmp_path / f"accuracy_{seed + 1}.json").write_text(json.dumps(dict(accuracy, args=args)))
    (tmp_path / "setup_costs.json").write_text(json.dumps({"medians": {
        "backend": {"CUDA context": 0.4, "import cudnn": 0.5, "first cuDNN handle": 2.5},
        "preload": {"import cudnn": 0.5, "open cuDNN's libraries": 2.0, "CUDA context": 0.4, "first cuDNN handle": 0.3}}}))
    sys.path.insert(0, str(REPO / "bench"))
    import timeline                                             # the timeline stage's JSON, from a made-up trace
    kernels = [("cupynet_timeline_marker", 0, 1), ("augment_train_batch", 10, 2), ("sm90_xmma_wgrad_x", 12, 30),
               ("augment_train_batch", 60, 2), ("sm90_xmma_wgrad_x", 62, 30), ("cupynet_timeline_marker", 100, 1)]
    trace = {"traceEvents": [{"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": 7}}
                             for name, ts, dur in kernels]}
    report = dict(timeline.summarize(timeline.gpu_events(trace), 2, {"augment_train_batch"}),
                  args={"batch": 128, "dtype": "bfloat16"}, period_unprofiled_us=48.5)
    (tmp_path / "timeline_128.json").write_text(json.dumps(report))
    (tmp_path / "timeline_fp32.json").write_text(json.dumps(dict(report, args={"batch": 128, "dtype": "float32"})))
    result = subprocess.run([sys.executable, "-c", summary_program(), "0"], env=dict(os.environ, OUT=str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name, dtype in (("timeline_128.json", "bfloat16"), ("timeline_fp32.json", "float32")):
        assert f"where a captured step goes ({name}, {dtype}, batch 128): period 50 us (48.5 us unprofiled)" \
            in result.stdout
    # in 2 steps: our augment_train_batch -> cuDNN's kernel twice, 0 us; cuDNN's -> ours once, 18 us (the most
    # time per step first)
    assert "gaps on a stream: cuDNN -> cupynet 0.5 x 18 us, cupynet -> cuDNN 1 x 0 us" in result.stdout
    assert "weight gradients busy 30 us, the rest busy 2 us, both at once 0 us" in result.stdout
    assert re.search(r"batch 8\s+float32\s+- wgrad stream\(s\), 1 chunk\(s\), -", result.stdout)
    assert "bf16_128: --wgrad-chunks 2" in result.stdout
    assert "4 chunk(s), -            , 2 BN launch(es): failed: CUDARuntimeError: out of memory" in result.stdout
    assert "step_options.json: 1 configurations not measured" in result.stdout
    assert re.search(r"-\s+\+ split-K, 2 BN launch\(es\):.*\[split-K tried 21, built 14, chosen 5\]", result.stdout)
    assert re.search(r"-\s+\+ genstats, 2 BN launch\(es\):.*\[genstats fused 40, unsupported 3\]", result.stdout)
    assert re.search(r"-\s+\+ split-K \+ genstats, 2 BN launch\(es\):.*\[genstats nothing counted\]", result.stdout)
    assert "(1 wgrad stream(s), 1 chunk(s), any engine + genstats + residual grad sums, 2 BN launch(es))" \
        in result.stdout
    assert "time to accuracy (bfloat16, seed 0, genstats)" in result.stdout
    # PyTorch's graphed bf16 step 1.25x the notes' H100 here: two thirds of 190.5 s / 1.25
    assert ("time target on this GPU, estimated: 2/3 x 190.5 s x 29,386 / 36,732 (PyTorch's graphed bf16 images/s "
            "on the notes' H100 / here) = 101.6 s") in result.stdout
    assert re.search(r"3 chunk\(s\), -\s+\+ pixel pairs, 2 BN launch\(es\):\s+\d+", result.stdout)
    assert "vs graphed 1.7x, vs eager 5.0x  (1 wgrad stream(s), 1 chunk(s), deterministic + pixel pairs" in result.stdout
    assert "vs graphed 1.2x, vs eager 5.0x  (1 wgrad stream(s), 1 chunk(s), deterministic, 2 BN" in result.stdout
    assert "time to accuracy (bfloat16, seed 1, pixel pairs)" in result.stdout
    assert re.search(r"5 chunk\(s\), -\s+\+ residual grad sums, 2 BN launch\(es\):\s+\d+", result.stdout)
    assert "time to accuracy (bfloat16, seed 2, residual grad sums)" in result.stdout
    assert ("vs_torch_fp32.json: NCHW float32 did NOT verify against PyTorch (4 wgrad stream(s), 1 chunk(s), "
            "deterministic, 2 BN launch(es)): loss rel 0.02") in result.stdout
    assert re.search(r"batch 128 NCHW float32\s+vs graphed 1.6x.*\(1 wgrad stream\(s\), 1 chunk", result.stdout)
    assert ("(setup 6.9 s: data 1.20, backend 4.50 (CUDA context 0.40, cuDNN import 1.30, cuDNN handles 2.80), model 1.20; warm-up 0.61 s of "
            "the training; evaluation 0.3 s)") in result.stdout
    assert ("   backend order: 3.40: CUDA context 0.400, import cudnn 0.500, first cuDNN handle 2.500\n"
            "   preload order: 3.20: import cudnn 0.500, open cuDNN's libraries 2.000, CUDA context 0.400, "
            "first cuDNN handle 0.300") in result.stdout
    table = result.stdout.split("images/s, ResNet-44")[1]
    assert re.search(r"8\s+NHWC\s+float32\s+\d+", table) and re.search(r"8\s+NCHW\s+float32\s+\d+", table)
    assert "where an eager step goes" in result.stdout and "conv2d_forward" in result.stdout
    assert "result: all stages ok" in result.stdout


@needs_bash
def script_functions(*names):
    """Bash that defines the named functions of device_check.sh."""
    return "; ".join(f'source <(sed -n "/^{name}()/,/^}}/p" bench/device_check.sh)' for name in names)


@needs_bash
def test_every_recorded_stage_packs_what_the_stages_wrote_so_far(tmp_path):
    """A call the device tool cuts short keeps what the finished stages wrote: recording a stage re-packs the
    stages' folder into device_check.tar.gz beside the small files a reader wants first."""
    import tarfile
    out, back = tmp_path / "out", tmp_path / "back"
    out.mkdir()
    back.mkdir()
    (out / "step_options.json").write_text("{}")
    program = script_functions("bundle", "record") + '; STAGES="$OUT/stages.tsv"; record step_options ok 3 ""'
    result = subprocess.run(["bash", "-c", program], cwd=REPO, env=dict(os.environ, OUT=str(out), BACK=str(back)),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in back.iterdir()) == ["device_check.tar.gz", "stages.tsv"]
    with tarfile.open(back / "device_check.tar.gz") as bundle:
        assert {"./step_options.json", "./stages.tsv"} <= set(bundle.getnames())


@needs_bash
def test_accuracy_runs_one_time_to_accuracy_per_entry(tmp_path):
    """DEVICE_CHECK_ACCURACY_ARGS="A;B;C": the accuracy stage runs entry 1 and accuracy_more entries 2 to 3,
    each bench/time_to_accuracy.py after the chosen step options ($BEST_BF16), writing accuracy.json,
    accuracy_2.json and accuracy_3.json (CPU quick runs of 3 steps here)."""
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    scratch.mkdir()
    env = dict(os.environ, OUT=str(out), TMP=str(scratch), PY=sys.executable, BEST_BF16="--wgrad-chunks 2",
               DEVICE_CHECK_ACCURACY_ARGS=";".join(f"--quick --epochs 0.25 {flags}" for flags in
                                                  ("--seed 0", "--seed 3 --wgrad-chunks 3", "--seed 4")))
    program = (script_functions("accuracy_entries", "accuracy_runs") +
               "; accuracy_entries; accuracy_runs unused-dir 1 1 && accuracy_runs unused-dir 2 3")
    result = subprocess.run(["bash", "-c", program], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "3"
    runs = [json.loads((out / name).read_text())["args"] for name in ("accuracy.json", "accuracy_2.json",
                                                                       "accuracy_3.json")]
    # the chosen options come first; a run's own flags win over them
    assert [(run["seed"], run["wgrad_chunks"]) for run in runs] == [(0, 2), (3, 3), (4, 2)]


def also_rows(argv):
    """The --also grids of a layouts.py command line, each split into its words."""
    return [argv[i + 1].split() for i, word in enumerate(argv) if word == "--also"]


@needs_bash
def test_step_options_paces_five_grids_and_runs_each_even_after_a_failure(tmp_path):
    """The step_options stage gives each layouts.py grid the time left until its share of the stage's limit
    (32%, 44%, 57%, 66%, all but 15 s), each under a timeout of its own 10 s longer, runs the later grids after
    one failed (each keeps its own JSON) and then fails.
    PY is a stand-in that records its arguments and fails on the first call: this tests the stage's shell."""
    calls = tmp_path / "calls.jsonl"
    stand_in = tmp_path / "python"
    stand_in.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"lines = open({str(calls)!r}).readlines() if __import__('os').path.exists({str(calls)!r}) else []\n"
                        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                        "sys.exit(1 if not lines else 0)\n")
    stand_in.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path), PY=str(stand_in), STAGE_LIMIT="200")   # 1% of it: 2 s
    program = script_functions("seconds_until", "step_options") + "; step_options"
    result = subprocess.run(["bash", "-c", program], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [run[run.index("--json") + 1].rsplit("/", 1)[1] for run in runs] == [
        "step_options.json", "step_options_fp32.json", "step_options_bn.json", "step_options_split.json",
        "step_options_512.json"]
    seconds = [int(run[run.index("--max-seconds") + 1]) for run in runs]
    assert [low <= got <= low + 1 for got, low in zip(seconds, (63, 87, 113, 131, 184))] == [True] * 5, seconds
    assert all(run[run.index("--wgrad-pairs") + 1].startswith("1x1,") for run in runs)   # the defaults first
    assert runs[2][runs[2].index("--bn-launches") + 1] == "1"
    # genstats without and with, with deterministic engines and any (cuDNN may have genstats engines only there)
    assert [runs[2][runs[2].index(flag) + 1] for flag in ("--conv-genstats", "--conv-deterministic")] == ["off,on",
                                                                                                           "on,off"]
    assert runs[3][runs[3].index("--conv-split-k") + 1] == "on" and "--conv-deterministic" not in runs[3]
    assert runs[4][runs[4].index("--conv-split-k") + 1] == "off,on"      # batch 512: without split-K first
    # and one genstats row there (1x1, any engine), not the dimension, which would double the grid
    assert "--conv-genstats" not in runs[4] and also_rows(runs[4])[0] == [
        "--wgrad-pairs", "1x1", "--conv-deterministic", "off", "--conv-split-k", "off", "--conv-genstats", "on"]
    # the options not yet measured: one row each at bf16 and fp32 batch 128 and at batch 512, the default pair
    # with deterministic engines (the defaults' twin), never a dimension; none in the BatchNorm and split-K grids;
    # in this order, one right after the other
    settings = [["--own-conv-channels", "64"], ["--own-conv-channels", "64", "--conv-genstats", "on"],
                ["--own-conv-channels", "16"], ["--conv-pixel-pairs", "on"], ["--wgrad-pixel-pairs", "on"],
                ["--residual-grad-sums", "on"], ["--conv-tune-in-graph", "on"], ["--padded-input", "on"],
                ["--stream-priorities", "on"], ["--programmatic-launch", "on"],   # the driver calls through ctypes
                ["--programmatic-launch-early", "on"]]             # last: a crash would end the grid
    twin = ["--wgrad-pairs", "1x1", "--conv-deterministic", "on"]
    for run, base in ((runs[0], twin), (runs[1], twin), (runs[4], twin + ["--conv-split-k", "off"])):
        rows = also_rows(run)
        first = rows.index(base + settings[0])
        assert rows[first:first + len(settings)] == [base + setting for setting in settings]
        assert all(rows.count(base + setting) == 1 for setting in settings)
    for run in runs:
        assert "--own-conv-channels" not in run and all(setting[0] not in run for setting in settings)
    for run in (runs[2], runs[3]):
        assert not any("--own-conv-channels" in row or "--conv-pixel-pairs" in row for row in also_rows(run))
    # then, at bf16 (batch 128 and 512), all of them at once with 4 streams and any engine: the grid's last row;
    # our kernel without the sums or for stage 1 alone and the early programmatic launches are variants of other
    # rows' options, not among them
    together = [word for setting in settings if setting not in (["--own-conv-channels", "64"],
                                                                ["--own-conv-channels", "16"],
                                                                ["--programmatic-launch-early", "on"])
                for word in setting]
    for run, split in ((runs[0], []), (runs[4], ["--conv-split-k", "off"])):
        assert also_rows(run)[-1] == ["--wgrad-pairs", "4x1", "--conv-deterministic", "off", *split, *together]
    assert all(len(row) <= 8 for row in also_rows(runs[1]))
    calls.unlink()
    short = dict(env, STAGE_LIMIT="38")       # 12, 16, 21 and 25 s for the first four (at least 10 each): they
    result = subprocess.run(["bash", "-c", program], cwd=REPO, env=short,    # run; batch 512's needs 25 s and
                            capture_output=True, text=True, timeout=60)    # would get 23: it does not start
    assert [json.loads(line)[-1].rsplit("/", 1)[1] for line in calls.read_text().splitlines()] == [
        "step_options.json", "step_options_fp32.json", "step_options_bn.json", "step_options_split.json"]


@needs_bash
@pytest.mark.parametrize("left,entries,last", [(450, 3, 3), (399, 3, 2), (199, 3, 1), (1000, 2, 2), (600, 1, 1)])
def test_accuracy_more_runs_only_what_fits_whole(left, entries, last):
    """accuracy_more starts entries 2.. only while a whole 200-s run fits in what is left of the budget."""
    program = script_functions("last_fitting_run") + f"; last_fitting_run {left} 200 {entries}"
    result = subprocess.run(["bash", "-c", program], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == str(last), result.stdout + result.stderr


@needs_bash
def test_best_options_turns_the_step_options_into_flags_and_notes_them(tmp_path):
    """The function device_check.sh runs after its step_options stage: the fastest measured options as flags
    (exported to the accuracy and PyTorch stages), and a line per choice in best_options.txt; a missing
    measurement gives no flags (the defaults) and says so."""
    rows = [{"depth": 44, "batch": 128, "layout": "NHWC", "dtype": "bfloat16", "captured": True, "wgrad_streams": s,
             "wgrad_chunks": c, "conv_deterministic": True, "images_per_sec": rate}
            for s, c, rate in ((1, 1, 40000.0), (2, 2, 44000.0))]
    (tmp_path / "step_options.json").write_text(json.dumps({"benchmark": "layouts", "results": rows}))
    (tmp_path / "best_options.txt").write_text("")
    function = (script_functions("best_options") + '; '
                'echo "[$(best_options bf16_128 step_options.json bfloat16 128)]"; '
                'echo "[$(best_options fp32_128 step_options_fp32.json float32 128)]"')
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable)
    result = subprocess.run(["bash", "-c", function], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[--wgrad-streams 2 --wgrad-chunks 2]", "[]"]
    noted = (tmp_path / "best_options.txt").read_text()
    assert "bf16_128: --wgrad-streams 2 --wgrad-chunks 2" in noted and "44000 img/s" in noted
    assert "fp32_128: (the defaults: nothing measured)" in noted


# What the script's variables hold when its commands run: step options as best_step_options.py prints
# them (every flag it can print, so that each must exist wherever it is passed), and one accuracy entry's flags.
def setting_rows(settings):
    """step_options' arrays of --also rows for `settings` ("--flag value" each), as its loop builds them (quoted as
    bash would pass them); the all-together row without the variants of another row's option."""
    def rows(pair):
        return " ".join(f'--also "{pair} {setting}"' for setting in settings)
    variants = ("--own-conv-channels 64", "--own-conv-channels 16", "--programmatic-launch-early on")
    return {"alone": rows("--wgrad-pairs 1x1 --conv-deterministic on"),
            "alone_512": rows("--wgrad-pairs 1x1 --conv-deterministic on --conv-split-k off"),
            "together": "".join(f" {setting}" for setting in settings if setting not in variants)}


SCRIPT_VALUES = {"BEST_BF16": "--wgrad-streams 3 --wgrad-chunks 2 --no-conv-deterministic --conv-split-k --bn-launches 1 "
                              "--conv-genstats --own-conv-channels 64 --conv-pixel-pairs --residual-grad-sums",
                 "BEST_FP32": "--wgrad-streams 2 --wgrad-chunks 2 --no-conv-deterministic --conv-split-k --conv-genstats "
                              "--conv-pixel-pairs --residual-grad-sums",
                 "BEST_512": "--wgrad-streams 4 --wgrad-chunks 4 --no-conv-deterministic --conv-split-k --conv-genstats "
                             "--conv-pixel-pairs --residual-grad-sums",
                 # what the script takes from BEST_BF16 (test_the_layers_stage_takes_the_kernel_changing_options)
                 "LAYERS_OPTIONS": "--no-conv-deterministic --bn-launches 1 --conv-genstats --own-conv-channels 64 "
                                   "--conv-pixel-pairs --residual-grad-sums",
                 "args": "--seed 1 --conv-init glorot_uniform", "PEAK_GBS": "3350", "OUT": "/out", "TMP": "/tmp/x",
                 "CIFAR_DIR": "/data", "0": "/data", "1": "/data", "2": "step_options.json", "3": "bfloat16", "4": "128",
                 "i": "2", "json": "/out/accuracy_2.json", "STAGE_LIMIT": "100", "seconds": "60",
                 "files": "/out/step_options.json /out/step_options_bn.json",
                 # compare_with_torch's arguments
                 "dtype": "bfloat16", "batch": "128", "layouts": "NHWC,NCHW", "name": "vs_torch",
                 "options": "--wgrad-streams 3 --no-conv-deterministic --conv-split-k --bn-launches 1 --conv-genstats "
                            "--conv-pixel-pairs --residual-grad-sums",
                 # step_options' rows of the switches not yet measured (the stage's own run is checked in
                 # test_step_options_paces_five_grids_and_runs_each_even_after_a_failure)
                 **setting_rows(shlex.split(re.search(r"local settings=\(([^)]*)\)", SCRIPT.read_text()).group(1)))}


def script_python_commands():
    """(module, argv) of every `"$PY" bench/NAME.py ...` and `"$PY" -m cupynet.train|evaluate ...` in device_check.sh,
    with the script's variables replaced by what they hold at run time."""
    import shlex
    text = re.sub(r"\\\n\s*", " ", SCRIPT.read_text())              # join continued lines
    commands = []
    for target, rest in re.findall(r'"\$PY" (bench/\w+\.py|-m cupynet\.train|-m cupynet\.evaluate)([^\n&|;\'<]*)',
                                   text):
        rest = re.sub(r"\s\d*>>?\s*\S+", "", rest)                     # redirections
        rest = re.sub(r'"\$\{(\w+)\[@\]\}"', lambda m: SCRIPT_VALUES[m.group(1)], rest)   # "${array[@]}"
        rest = re.sub(r"\$\(\((\w+) - (\d+)\)\)",                       # $((NAME - N)) arithmetic
                      lambda m: str(int(SCRIPT_VALUES[m.group(1)]) - int(m.group(2))), rest)
        rest = re.sub(r"\$\{(\w+):-\}|\$\{?(\w+)\}?", lambda m: SCRIPT_VALUES[m.group(1) or m.group(2)], rest)
        module = {"-m cupynet.train": "cupynet.config", "-m cupynet.evaluate": "cupynet.evaluate"}.get(
            target, "bench." + pathlib.Path(target).stem)
        commands.append((module, shlex.split(rest)))
    return commands


@needs_bash
def test_the_layers_stage_takes_the_kernel_changing_options():
    """The layers stage passes on those of the bf16 step options that change which kernels run (one-launch
    BatchNorm, genstats, pixel pairs, residual grad sums, any cuDNN engine), whatever else the options hold, and
    nothing when they hold none."""
    text = re.sub(r"\\\n\s*", " ", SCRIPT.read_text())
    (line,) = [line for line in text.splitlines() if line.startswith("LAYERS_OPTIONS=")]
    for best, expected in ((SCRIPT_VALUES["BEST_BF16"], SCRIPT_VALUES["LAYERS_OPTIONS"]),
                           ("--wgrad-streams 4 --conv-split-k", ""), ("", ""),
                           ("--wgrad-streams 2 --conv-pixel-pairs", "--conv-pixel-pairs"),
                           ("--own-conv-channels 16 --wgrad-chunks 2", "--own-conv-channels 16"),
                           ("--wgrad-chunks 2 --residual-grad-sums", "--residual-grad-sums")):
        result = subprocess.run(["bash", "-c", f'set -u -o pipefail; {line}; echo "[$LAYERS_OPTIONS]"'],
                                env=dict(os.environ, BEST_BF16=best), capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and result.stdout.strip() == f"[{expected} ]".replace("[ ]", "[]"), result


def test_every_python_command_of_the_device_check_parses():
    """Each benchmark and training command the script runs, with the step options it passes on, is accepted
    by that script's own argument parser: a renamed or missing flag would otherwise first show on the GPU
    machine, as a stage failing in seconds and the stages that need its output running without it."""
    import importlib
    commands = script_python_commands()
    modules = {module for module, _ in commands}
    assert modules == {"bench.layouts", "bench.best_step_options", "bench.time_to_accuracy", "bench.vs_torch",
                       "bench.layers", "bench.timeline", "bench.conv_engines", "bench.scaling", "bench.setup_costs",
                       "cupynet.config", "cupynet.evaluate"}, modules
    for module, argv in commands:
        try:
            importlib.import_module(module).parse_args(argv)
        except SystemExit as exit_:
            pytest.fail(f"{module} refuses {' '.join(argv)} (exit {exit_.code})")


# A full-size argument of the device check: what bench/rehearse_device_check.sh must shrink for the emulated GPU.
FULL_SIZE = re.compile(r"--depths? 44\b|--batch(es)? (128|512)\b|(bfloat16|float32) (128|512)\b|--steps (20|10|5)\b"
                       r"|--warmup 5\b|--repeats 5\b|--train-steps 300\b|^ACCURACY_RUN_S=200$|cap=\$2$")


@needs_bash
def test_the_rehearsal_shrinks_every_full_size_run_of_the_device_check():
    """The rehearsal runs the device check on the emulated GPU at ResNet-8 sizes: its sed must still catch every
    ResNet-44, batch-128/512 and long-timing argument of the script (a stage added with another spelling would
    run full size on the emulator for hours), and what it makes must parse."""
    def code(text):
        return [line for line in text.splitlines() if not line.lstrip().startswith("#")]

    with open(SCRIPT) as script:
        result = subprocess.run(["bash", str(REPO / "bench" / "rehearse_device_check.sh"), "--shrink"], stdin=script,
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert len([line for line in code(SCRIPT.read_text()) if FULL_SIZE.search(line)]) >= 15    # what it finds
    assert [line for line in code(result.stdout) if FULL_SIZE.search(line)] == []
    assert "cap=$(($2 * 12))" in result.stdout and "ACCURACY_RUN_S=2400" in result.stdout
    parsed = subprocess.run(["bash", "-n"], input=result.stdout, capture_output=True, text=True, timeout=30)
    assert parsed.returncode == 0, parsed.stderr


FAKE_VS_TORCH = """import json, os, sys
args = sys.argv[1:]
with open("calls.txt", "a") as f:
    print(" ".join(args), file=f)
mode = os.environ["FAKE_MODE"]          # how a run with options other than the defaults ends
defaults = not any(arg.startswith(("--wgrad", "--conv", "--residual")) for arg in args)
if mode == "crash" and not defaults:
    sys.exit("Traceback: killed before writing a report")
passed = defaults or mode != "unverified"
timing_failed = mode == "timing" or (mode == "defaults_unverified" and defaults)
if mode == "defaults_unverified" and defaults:
    passed = False
report = {"verification": [{"layout": "NHWC", "dtype": "bfloat16", "passed": passed}],
          "results": [{"batch": 128, "errors": {"torch_graph": "capture failed"} if timing_failed else {}}]
          if passed else []}
json.dump(report, open(args[args.index("--json") + 1], "w"))
sys.exit(0 if passed and not timing_failed else 1)
"""


# (options, how the fake ends, runs, status): options that do not verify, or a run that writes no report, are
# compared again with the defaults; a run that verified but lost a timing, the defaults failing, options that
# verify, and no options at all run once
COMPARISONS = [("--conv-genstats", "unverified", 2, 1), ("--conv-genstats", "crash", 2, 1),
               ("--conv-genstats", "timing", 1, 1), ("--conv-pixel-pairs", "unverified", 2, 1),
               ("--residual-grad-sums", "unverified", 2, 1), ("", "defaults_unverified", 1, 1),
               ("--wgrad-streams 2", "verified", 1, 0), ("", "verified", 1, 0)]


@needs_bash
@pytest.mark.parametrize("options, mode, runs, status", COMPARISONS)
def test_options_that_do_not_verify_against_pytorch_are_compared_again_with_the_defaults(tmp_path, options, mode,
                                                                                         runs, status):
    """compare_with_torch, exported and run by `bash -c` as the stages run it: step options whose step disagrees
    with PyTorch's (nothing timed), or whose run ends without a report, fail the stage, and the comparison runs
    again with the defaults, so issue 6's ratios are measured all the same."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "vs_torch.py").write_text(FAKE_VS_TORCH)
    define = (f'set -u -o pipefail; source <(sed -n "/^compare_with_torch()/,/^}}/p" {SCRIPT}); '
              "export -f compare_with_torch")
    stage = "bash -c 'compare_with_torch bfloat16 128 NHWC,NCHW \"$OPTIONS\" vs_torch'"
    result = subprocess.run(["bash", "-c", f"{define}; {stage}"], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PY=sys.executable, OUT=str(tmp_path), OPTIONS=options, FAKE_MODE=mode),
                            timeout=60)
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert len(calls) == runs and result.returncode == status, (calls, result.stdout, result.stderr)
    assert calls[0].endswith(f"--dtypes bfloat16 {options} --json {tmp_path}/vs_torch.json".replace("  ", " "))
    if runs == 2:
        assert calls[1].endswith(f"--dtypes bfloat16 --json {tmp_path}/vs_torch_defaults.json")
        assert json.loads((tmp_path / "vs_torch_defaults.json").read_text())["results"]
        why = "no report" if mode == "crash" else "not verified against PyTorch"
        assert f"with {options}: {why}; the defaults now" in result.stdout
