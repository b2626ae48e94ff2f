"""bench/timeline.py: the arithmetic that turns a profiler's Chrome trace into a step's timeline, and the script's
refusals.

    python -m pytest tests/test_timeline.py -q

The profiling itself needs a GPU and PyTorch's profiler (bench/device_check.sh runs it on the GPU machine); here
the trace is one written by hand in the profiler's format, so every figure the summary gives can be worked out.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import timeline  # noqa: E402

OURS = {"augment_train_batch", "bn_apply", "bn_grad"}


def kernel(name, stream, ts, dur, cat="kernel"):
    """One GPU event as PyTorch's profiler exports it (times in microseconds)."""
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
            "args": {"device": 0, "stream": stream}}


def two_steps():
    """A warm-up kernel, the first marker, two 100-us steps, the second marker, a late kernel. Each step: on
    stream 7, augmentation (2 us), a cuDNN fprop (20 us), bn_apply (10 us), bn_grad (10 us) and a dgrad (20 us);
    on stream 9 a wgrad (40 us) that overlaps bn_grad and the dgrad. CPU events and an instant event too."""
    events = [kernel("void bn_apply<float>(float const*)", 7, 0, 50),                    # before the marker
              kernel(timeline.MARKER, 7, 90, 1),
              {"ph": "X", "cat": "cpu_op", "name": "aten::empty", "ts": 95, "dur": 3},      # not GPU work
              {"ph": "i", "cat": "kernel", "name": "instant", "ts": 96}]                    # no duration
    for step in range(2):
        t = 100 + 100 * step
        events += [kernel("void augment_train_batch<__nv_bfloat16>(unsigned char const*)", 7, t, 2),
                   kernel("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", 7, t + 2, 20),
                   kernel("void bn_apply<__nv_bfloat16>(__nv_bfloat16 const*)", 7, t + 22, 10),
                   kernel("_Z7bn_gradI13__nv_bfloat16EvPKT_", 7, t + 32, 10),
                   kernel("sm90_xmma_dgrad_implicit_gemm_bf16", 7, t + 42, 20),
                   kernel("sm90_xmma_wgrad_implicit_gemm_bf16", 9, t + 35, 40)]
    events += [kernel(timeline.MARKER, 7, 310, 1), kernel("void bn_apply<float>(float const*)", 7, 400, 50)]
    return {"traceEvents": events[::-1]}                 # in no particular order: the parser sorts


def test_a_traces_gpu_events_are_its_kernels_copies_and_memsets_in_time_order():
    trace = {"traceEvents": [kernel("b", 3, 5.0, 1.5), kernel("Memset (Device)", 3, 1.0, 1.0, cat="gpu_memset"),
                             {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 1},
                             {"ph": "X", "cat": "kernel", "name": "no stream arg", "tid": 4, "ts": 2, "dur": 1}]}
    assert timeline.gpu_events(trace) == [("Memset (Device)", 3, 1.0, 2.0), ("no stream arg", 4, 2.0, 3.0),
                                          ("b", 3, 5.0, 6.5)]


@pytest.mark.parametrize("name,base", [
    ("void bn_apply<__nv_bfloat16>(__nv_bfloat16 const*, int)", "bn_apply"),
    ("_Z8bn_applyI13__nv_bfloat16EvPKT_", "bn_apply"),                 # not demangled
    ("bn_sums_finalize", "bn_sums_finalize"),                          # extern "C"
    ("void cutlass::Kernel<cutlass_80_wgrad>(Params)", "Kernel"),
    ("Memset (Device)", "Memset"),
])
def test_a_kernels_base_name_drops_return_type_namespace_template_and_parameters(name, base):
    assert timeline.base_name(name) == base


def test_busy_time_is_the_union_of_the_intervals():
    assert timeline.busy_time([]) == 0
    assert timeline.busy_time([(0, 10), (5, 15), (20, 30), (22, 25), (30, 31)]) == 26


def test_the_summary_of_two_steps_between_the_markers():
    ours = OURS
    summary = timeline.summarize(timeline.gpu_events(two_steps()), 2, ours)
    assert summary["period_us"] == 100                  # between the two augmentation kernels
    assert summary["busy_us"] == 75                     # 2 + 20 + 10 + 10 + 20 on main, the wgrad's 13 us past them
    assert summary["idle_us"] == 25 and summary["idle_share"] == 0.25
    assert summary["kernel_us"] == 102
    assert summary["gpu_events_per_step"] == 6
    # by role: the wgrad (40 us) against the rest (62 us, on whatever streams), together 27 us
    assert summary["chains_busy_us"] == {"weight gradients": 40, "the rest": 62}
    assert summary["chains_overlap_us"] == 27 and summary["executor_streams"] == 2
    assert summary["groups"] == {"cuDNN wgrad": 40, "cupynet": 22, "cuDNN fprop": 20, "cuDNN dgrad": 20}
    assert [row["kernel"] for row in summary["kernels"]][:1] == ["sm90_xmma_wgrad_implicit_gemm_bf16"]
    bn_grad = next(row for row in summary["kernels"] if row["kernel"] == "bn_grad")
    assert bn_grad == {"name": "_Z7bn_gradI13__nv_bfloat16EvPKT_", "kernel": "bn_grad", "group": "cupynet",
                       "calls_per_step": 1, "us_per_step": 10, "median_us": 10}
    assert summary["kernel_names"] == 6 and len(timeline.summarize(timeline.gpu_events(two_steps()), 2, ours,
                                                                    top=2)["kernels"]) == 2


def test_the_chains_are_told_apart_by_role_not_by_the_streams_a_replay_reports():
    """A graph's executor runs each replay's kernels on streams of its choosing: the same step spread over six
    stream ids gives the same figures, the streams only counted (and the gaps, which are per stream)."""
    trace = two_steps()
    for number, event in enumerate(trace["traceEvents"]):
        if "args" in event and event["name"] != timeline.MARKER:
            event["args"]["stream"] = event["tid"] = 100 + number % 6
    spread = timeline.summarize(timeline.gpu_events(trace), 2, OURS)
    plain = timeline.summarize(timeline.gpu_events(two_steps()), 2, OURS)
    assert spread["executor_streams"] == 6
    assert {key: value for key, value in spread.items() if key not in ("executor_streams", "gaps")} == \
        {key: value for key, value in plain.items() if key not in ("executor_streams", "gaps")}


def test_gaps_on_each_stream_go_by_what_ends_and_what_starts():
    """The latency between a graph's dependent nodes: per stream, the gap from each piece of work to the next,
    grouped by their kinds (a memset, one of our kernels, one of cuDNN's); a gap over GAP_LIMIT_US is a wait
    for another stream and left out; streams are not mixed."""
    window = timeline.gpu_events({"traceEvents": [
        kernel("void bn_apply<float>(float const*)", 7, 0, 10),
        kernel("Memset (Device)", 7, 14, 1, cat="gpu_memset"),                  # cupynet -> memset: 4 us
        kernel("sm90_xmma_dgrad_implicit_gemm_bf16", 7, 28, 10),                # memset -> cuDNN: 13 us
        kernel("_Z7bn_gradI13__nv_bfloat16EvPKT_", 7, 38.5, 5),                 # cuDNN -> cupynet: 0.5 us
        kernel("void bn_apply<float>(float const*)", 7, 143.5, 5),              # 100 us: a wait, left out
        kernel("Memset (Device)", 9, 1, 1, cat="gpu_memset"),
        kernel("Memset (Device)", 9, 5, 1, cat="gpu_memset"),                   # memset -> memset: 3 us
        kernel("sm90_xmma_wgrad_implicit_gemm_bf16", 9, 9, 30),                 # memset -> cuDNN: 3 us
        kernel("Memcpy DtoD (Device -> Device)", 9, 39.5, 1, cat="gpu_memcpy")]})   # cuDNN -> copy: 0.5 us
    assert timeline.stream_gaps(window, 2, OURS) == [
        {"after": "memset", "before": "cuDNN", "per_step": 1, "median_us": 8, "us_per_step": 8},
        {"after": "cupynet", "before": "memset", "per_step": 0.5, "median_us": 4, "us_per_step": 2},
        {"after": "memset", "before": "memset", "per_step": 0.5, "median_us": 3, "us_per_step": 1.5},
        {"after": "cuDNN", "before": "cupynet", "per_step": 0.5, "median_us": 0.5, "us_per_step": 0.25},
        {"after": "cuDNN", "before": "copy", "per_step": 0.5, "median_us": 0.5, "us_per_step": 0.25}]
    # two_steps: back to back on stream 7 but for the 38 us from a dgrad to the next step's augmentation; its
    # wgrads on stream 9 are 60 us apart (a wait)
    assert timeline.summarize(timeline.gpu_events(two_steps()), 2, OURS)["gaps"] == [
        {"after": "cuDNN", "before": "cupynet", "per_step": 1.5, "median_us": 0, "us_per_step": 19},
        {"after": "cupynet", "before": "cuDNN", "per_step": 2, "median_us": 0, "us_per_step": 0},
        {"after": "cupynet", "before": "cupynet", "per_step": 1, "median_us": 0, "us_per_step": 0}]


def test_a_saved_trace_is_summarized_without_a_gpu(tmp_path):
    """--from-trace: an earlier run's trace read again (compressed or not), no GPU or PyTorch needed; a file that
    is missing or not a trace gets one line and exit 2."""
    import gzip
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as file:
        json.dump(two_steps(), file)
    result = run("--from-trace", str(path), "--steps", "2", "--json", str(tmp_path / "t.json"))
    assert result.returncode == 0, result.stderr
    assert "period 100.0 us" in result.stdout and "cupynet -> cuDNN" in result.stdout
    assert json.loads((tmp_path / "t.json").read_text())["period_us"] == 100
    (tmp_path / "bad.json").write_text("{not json")
    for bad in (tmp_path / "missing.json.gz", tmp_path / "bad.json"):
        result = run("--from-trace", str(bad))
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert str(bad) in result.stderr


def test_without_two_markers_there_is_no_timeline():
    trace = {"traceEvents": [kernel(timeline.MARKER, 7, 0, 1), kernel("bn_apply", 7, 5, 1)]}
    with pytest.raises(ValueError, match="1 of the 2 marker kernels"):
        timeline.summarize(timeline.gpu_events(trace), 1, OURS)
    empty = {"traceEvents": [kernel(timeline.MARKER, 7, 0, 1), kernel(timeline.MARKER, 7, 5, 1)]}
    with pytest.raises(ValueError, match="no GPU work between the markers"):
        timeline.summarize(timeline.gpu_events(empty), 1, OURS)


def test_the_trace_is_copied_compressed_when_its_name_ends_in_gz(tmp_path):
    import gzip
    source = tmp_path / "trace.json"
    source.write_text(json.dumps(two_steps()))
    timeline.write_trace(str(source), str(tmp_path / "out" / "t.json.gz"))
    timeline.write_trace(str(source), str(tmp_path / "t.json"))
    assert json.loads(gzip.open(tmp_path / "out" / "t.json.gz").read()) == json.loads((tmp_path / "t.json").read_text())


def run(*argv):
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "timeline.py"), *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("argv,message", [
    (["--device", "cpu"], "--device must be a GPU id"),
    (["--depth", "45"], "--depth must be 6n+2"),
    (["--steps", "0"], "must be >= 1"),
    (["--warmup", "1"], "--warmup must be at least"),
    (["--wgrad-chunks", "16", "--batch", "8"], "more than the 8 images"),
    (["--wgrad-streams", "0"], "--wgrad-streams must be from 1 to"),
])
def test_bad_flags_get_one_line_and_exit_2(argv, message):
    result = run(*argv)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_the_title_names_every_step_option_and_the_parser_takes_each():
    """The profiled run's title names each step option bench/vs_torch.py gives (residual grad sums, pixel pairs,
    genstats, split-K included): an option added there but not here would be profiled without the title saying
    so."""
    import argparse
    parser = argparse.ArgumentParser()
    timeline.vs_torch.add_step_options(parser)
    given = {action.dest for action in parser._actions} - {"help"}
    assert set(timeline.STEP_OPTIONS) == given
    args = timeline.parse_args(["--residual-grad-sums", "--conv-pixel-pairs", "--conv-genstats", "--conv-split-k"])
    assert (args.residual_grad_sums, args.conv_pixel_pairs, args.conv_genstats, args.conv_split_k) == (True,) * 4
    defaults = timeline.parse_args([])
    assert (defaults.residual_grad_sums, defaults.conv_pixel_pairs) == (False, False)


def test_without_pytorch_the_script_says_skipped_and_exits_0():
    pytest.importorskip("numpy")
    try:
        import torch  # noqa: F401
        pytest.skip("PyTorch is importable here: the skip path is not taken")
    except ImportError:
        pass
    result = run("--steps", "2")
    assert result.returncode == 0 and result.stdout.startswith("timeline: skipped: PyTorch is not importable")
