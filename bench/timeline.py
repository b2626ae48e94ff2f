"""Where the captured training step's GPU time goes: per kernel, the weight gradients' chain against the rest, idle.

    python bench/timeline.py --device 0 --depth 44 --batch 128 --dtype bfloat16 [step options] [--trace T.json.gz]

cupynet's step is recorded as a CUDA graph, as training records it, and replayed `--steps` times under PyTorch's
profiler: CUPTI, which it drives, records every kernel the process runs, CuPy's and cuDNN's too, inside CUDA
graphs as well. The first eager steps (they autotune the convolutions) run before the profiler starts; the step
is recorded under it (a profiler that first attaches to a process after a graph was captured may not see, or may
break, that graph's replays); a marker kernel before and after the replays delimits what is counted. Then as many
replays are timed without the profiler, with CUDA events: what profiling costs the period. Per step it reports:
  * the period (between consecutive steps' augmentation kernels), the time some kernel runs (the GPU's busy
    time) and the idle rest: launch gaps and waits between the graph's dependent nodes;
  * the two chains' busy time: the weight gradients (the side streams' work) against everything else (the main
    chain), and how long both run at once, which says which chain bounds the step (by role, not by stream: in
    a replay CUPTI reports the streams the graph's executor chose, not those the work was recorded on);
  * the kernels by time, grouped: cupynet's own (kernels/*.cu, by name) and cuDNN's by direction where its
    kernel names say it (fprop, dgrad, wgrad), then each kernel name;
  * the gaps between consecutive work on one stream, by what ends and what starts (a memset, a copy, one of
    our kernels, one of cuDNN's): the latency of the graph's dependencies, which differs by the kind of node.
The step options are bench/vs_torch.py's flags (bench/best_step_options.py prints them). Writes JSON (`--json`,
default bench/results/timeline-<host>.json) and, with `--trace`, the profiler's Chrome trace of the whole run
(chrome://tracing or ui.perfetto.dev; gzip-compressed when the name ends in .gz). `--from-trace T.json.gz` reads
such a trace again instead (no GPU, no PyTorch), with --steps the replays it holds, and prints its summary.
Needs a GPU, and PyTorch with CUDA for its profiler (a benchmark may use PyTorch where it is importable; cupynet
never depends on it): without PyTorch it prints one "skipped" line and exits 0, as vs_torch.py does.
"""
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import layouts                                                     # noqa: E402
import vs_torch                                                    # noqa: E402
from bench import step_options                                     # noqa: E402
from bench.cli import is_count, run_script           # noqa: E402
from cupynet.backends.kernels import KERNEL_FILES                  # noqa: E402
from cupynet.config import OneLineErrorParser                      # noqa: E402
from cupynet.data import synthetic_dataset                         # noqa: E402
from cupynet.errors import CupynetError                            # noqa: E402
from cupynet.step_graph import WARMUP_STEPS                        # noqa: E402

GPU_ACTIVITY = ("kernel", "gpu_memset", "gpu_memcpy")    # the Chrome trace's categories of GPU work
MARKER = "cupynet_timeline_marker"
CUDNN_DIRECTIONS = ("fprop", "dgrad", "wgrad")           # what cuDNN's kernel names say, where they say it
GAP_LIMIT_US = 50       # a longer gap between two nodes on one stream is a wait for other streams' work
# the step options the summary's title names, the numbers first: every one vs_torch.add_step_options gives
# (tests/test_timeline.py)
STEP_OPTIONS = tuple(option.name for option in sorted(step_options.OPTIONS, key=lambda option: option.on_off))


# ----------------------------------------------------------------------------- the trace's arithmetic


def gpu_events(trace):
    """[(name, stream, start_us, end_us)] of the GPU work in a Chrome trace (the profiler's export)."""
    events = []
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and event.get("cat") in GPU_ACTIVITY and "dur" in event:
            stream = (event.get("args") or {}).get("stream", event.get("tid"))
            start = float(event["ts"])
            events.append((event.get("name", "?"), stream, start, start + float(event["dur"])))
    return sorted(events, key=lambda e: e[2])


def base_name(name):
    """'void bn_apply<__nv_bfloat16>(__nv_bfloat16 const*, ...)' -> 'bn_apply': a kernel's name without its
    return type, namespace, template and parameters (also from a mangled name, '_Z8bn_applyI...' -> 'bn_apply',
    should the profiler not demangle it)."""
    mangled = re.match(r"_Z(\d+)(\w+)", name.strip())
    if mangled and len(mangled.group(2)) >= int(mangled.group(1)):
        return mangled.group(2)[:int(mangled.group(1))]
    name = re.sub(r"^void\s+", "", name.strip())
    name = re.split(r"[<(]", name, maxsplit=1)[0]
    return name.rsplit("::", 1)[-1].strip() or "?"


def group_of(name, ours):
    """'cupynet' for our kernels (kernels/*.cu), 'cuDNN fprop/dgrad/wgrad' where the name says so, else
    'cuDNN and other' (cuDNN's other kernels, CuPy's, copies and memsets)."""
    if base_name(name) in ours:
        return "cupynet"
    lower = name.lower()
    for direction in CUDNN_DIRECTIONS:
        if direction in lower:
            return f"cuDNN {direction}"
    return "cuDNN and other"


def kind_of(name, ours):
    """What a GPU event is, for the gaps: 'memset', 'copy', 'cupynet' (kernels/*.cu) or 'cuDNN' (every other
    kernel: cuDNN's, and CuPy's, which a step has none of)."""
    if name.startswith("Memset"):
        return "memset"
    if name.startswith("Memcpy"):
        return "copy"
    return "cupynet" if base_name(name) in ours else "cuDNN"


def stream_gaps(window, steps, ours):
    """The gaps between consecutive work on each stream, by what ends and what starts: [{"after", "before",
    "per_step", "median_us", "us_per_step"}], the most time per step first. Gaps over GAP_LIMIT_US are waits for
    other streams' work, and left out."""
    by_stream, gaps = defaultdict(list), defaultdict(list)
    for event in window:
        by_stream[event[1]].append(event)
    for events in by_stream.values():
        for (name, _, _, end), (next_name, _, start, _) in zip(events, events[1:]):
            if start - end <= GAP_LIMIT_US:
                gaps[(kind_of(name, ours), kind_of(next_name, ours))].append(start - end)
    rows = [{"after": after, "before": before, "per_step": round(len(times) / steps, 2),
             "median_us": round(statistics.median(times), 2), "us_per_step": round(sum(times) / steps, 2)}
            for (after, before), times in gaps.items()]
    return sorted(rows, key=lambda row: -row["us_per_step"])


def busy_time(intervals):
    """Length of the union of (start, end) intervals."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def replay_window(events):
    """(first, last) index bounds of the events strictly between the last two markers' ends and starts:
    the replays. ValueError when the trace does not hold two markers."""
    marks = [i for i, event in enumerate(events) if base_name(event[0]) == MARKER]
    if len(marks) < 2:
        raise ValueError(f"the profiler recorded {len(marks)} of the 2 marker kernels (and {len(events)} GPU "
                         f"events in all): CUPTI saw no kernels, or not these")
    return marks[-2] + 1, marks[-1]


def summarize(events, steps, ours, top=30):
    """Per step: the period, busy and idle time, the two chains' busy time, the groups and the kernels by time
    (microseconds), from the GPU events between the markers.

    The chains, not the streams: in a graph replay CUPTI reports the streams the graph's executor ran each kernel
    on, not those it was recorded on (dozens, for a step that forks its weight gradients), so the report goes by
    role: the weight gradients (cuDNN's kernels named wgrad, the side streams' work) against everything else
    (the main chain), and how long both run at once. cuDNN kernels whose names say no direction count with
    the rest (their time is the 'cuDNN and other' group)."""
    first, last = replay_window(events)
    window = events[first:last]
    if not window:
        raise ValueError("no GPU work between the markers")
    # the period: the median interval between consecutive steps' augmentation kernels (each step draws its
    # batch in one), else the window's span over the steps
    starts = [start for name, _, start, _ in window if base_name(name) == "augment_train_batch"]
    span = max(end for *_, end in window) - window[0][2]
    period = statistics.median(np.diff(starts)) if len(starts) > 1 else span / steps
    by_name, by_group, chains = defaultdict(list), defaultdict(float), {"weight gradients": [], "the rest": []}
    for name, _, s, e in window:
        by_name[name].append(e - s)
        group = group_of(name, ours)
        by_group[group] += e - s
        chains["weight gradients" if group == "cuDNN wgrad" else "the rest"].append((s, e))
    busy = busy_time([(s, e) for _, _, s, e in window]) / steps
    chain_busy = {chain: busy_time(spans) / steps for chain, spans in chains.items()}
    kernels = [{"name": name, "kernel": base_name(name), "group": group_of(name, ours),
                "calls_per_step": round(len(times) / steps, 2), "us_per_step": round(sum(times) / steps, 2),
                "median_us": round(statistics.median(times), 2)} for name, times in by_name.items()]
    kernels.sort(key=lambda row: -row["us_per_step"])
    kernel_time = sum(sum(times) for times in by_name.values()) / steps
    return {"steps": steps, "period_us": round(period, 2), "busy_us": round(busy, 2),
            "idle_us": round(period - busy, 2), "idle_share": round(1 - busy / period, 4),
            "kernel_us": round(kernel_time, 2),      # more than busy where kernels overlap
            "gpu_events_per_step": round(len(window) / steps, 2),
            "chains_busy_us": {chain: round(us, 2) for chain, us in chain_busy.items()},
            "chains_overlap_us": round(sum(chain_busy.values()) - busy, 2),
            "executor_streams": len({stream for _, stream, _, _ in window}),
            "groups": {group: round(total / steps, 2) for group, total in sorted(by_group.items(), key=lambda g: -g[1])},
            "kernels": kernels[:top], "kernel_names": len(kernels), "gaps": stream_gaps(window, steps, ours)}


def print_summary(summary, title):
    period = summary["period_us"]
    print(title)
    unprofiled = summary.get("period_unprofiled_us")
    print(f"per step: period {period:.1f} us" + (f" ({unprofiled:.1f} us unprofiled)" if unprofiled else "") +
          f", GPU busy {summary['busy_us']:.1f} us, idle {summary['idle_us']:.1f} us ({summary['idle_share']:.1%}); "
          f"kernels {summary['kernel_us']:.1f} us in all, {summary['gpu_events_per_step']:.0f} GPU events, "
          f"{summary['executor_streams']} streams")
    print("chains: " + ", ".join(f"{chain} busy {us:.1f} us ({us / period:.0%})"
                                 for chain, us in summary["chains_busy_us"].items()) +
          f", both at once {summary['chains_overlap_us']:.1f} us")
    print("groups: " + ", ".join(f"{group} {us:.1f} us" for group, us in summary["groups"].items()))
    print(f"{'us/step':>9} {'calls':>6} {'median us':>10}  kernel ({summary['kernel_names']} names; the top "
          f"{len(summary['kernels'])})")
    for row in summary["kernels"]:
        name = row["name"] if len(row["name"]) <= 100 else row["name"][:97] + "..."
        print(f"{row['us_per_step']:9.1f} {row['calls_per_step']:6.1f} {row['median_us']:10.2f}  {name}")
    print(f"gaps between consecutive work on one stream (up to {GAP_LIMIT_US} us), by what ends -> what starts:")
    print(f"{'us/step':>9} {'gaps':>6} {'median us':>10}")
    for row in summary["gaps"]:
        print(f"{row['us_per_step']:9.1f} {row['per_step']:6.1f} {row['median_us']:10.2f}  "
              f"{row['after']} -> {row['before']}")


# ----------------------------------------------------------------------------- the run


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="0", help="a GPU id")
    p.add_argument("--depth", type=int, default=44, help="ResNet v1 depth, 6n+2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--layout", choices=("NHWC", "NCHW"), default="NHWC")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="float32: strict float32 convolutions")
    vs_torch.add_step_options(p)
    p.add_argument("--warmup", type=int, default=WARMUP_STEPS + 3,
                   help="steps before the profiled replays (the step is recorded after the first few)")
    p.add_argument("--steps", type=int, default=10, help="profiled replays")
    p.add_argument("--top", type=int, default=30, help="kernels listed")
    p.add_argument("--json", help="output file (default bench/results/timeline-<host>.json)")
    p.add_argument("--trace", help="also write the profiler's Chrome trace here (.gz: compressed)")
    p.add_argument("--from-trace", help="summarize this saved trace (.gz: compressed) instead of profiling: no GPU "
                                        "needed; --steps: the replays it holds")
    args = p.parse_args(argv)
    problem = vs_torch.step_options_problem(args)
    if not is_count(args.device):
        problem = f"--device must be a GPU id (the timeline is of GPU kernels), got {args.device!r}"
    elif args.depth < 8 or (args.depth - 2) % 6:
        problem = f"--depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, ...), got {args.depth}"
    elif min(args.batch, args.steps, args.top) < 1:
        problem = "--batch, --steps and --top must be >= 1"
    elif args.warmup < WARMUP_STEPS + 1:
        problem = f"--warmup must be at least {WARMUP_STEPS + 1}: the step is recorded after {WARMUP_STEPS} eager steps"
    if problem:
        p.error(problem)
    return args


def marker(cupy):
    """A kernel that does nothing but show in the trace under MARKER's name, on the current stream."""
    kernel = cupy.RawKernel(f'extern "C" __global__ void {MARKER}(int* flag) {{ if (flag) *flag = 1; }}', MARKER)
    flag = cupy.zeros((1,), dtype=np.int32)
    return lambda: kernel((1,), (1,), (flag,))


def profile_replays(torch, args, folder):
    """The run: (Chrome trace dict, the trainer's mean loss over the profiled steps, the unprofiled period in
    microseconds). The trace is written to folder/trace.json first.

    The first eager steps, which autotune the convolutions, run before the profiler starts (its overhead could
    change which engines win, and they would fill the trace); the step is recorded under it. After it, the same
    number of replays is timed with CUDA events alone: the profiler's own cost on the period."""
    import cupy
    from torch.profiler import ProfilerActivity, profile, supported_activities
    if ProfilerActivity.CUDA not in supported_activities():
        raise CupynetError(f"PyTorch {torch.__version__}'s profiler cannot record CUDA kernels here")
    torch.cuda.init()
    # every image of the run in one epoch: no epoch's order is uploaded between the replays
    steps_in_all = args.warmup + 2 * args.steps + 2
    dataset = synthetic_dataset(num_train=steps_in_all * args.batch, num_test=args.batch, seed=1)
    trainer = vs_torch.cupynet_trainer(args, args.layout, args.dtype, dataset)
    if not trainer.runner.capture:
        raise CupynetError("the step is not recorded as a CUDA graph here: there is no captured step to profile")
    for _ in range(WARMUP_STEPS):
        trainer.train_step()
    backend = trainer.be
    with backend.device, backend.stream:
        mark = marker(cupy)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.warmup - WARMUP_STEPS):      # the recording step and replays not yet timed
            trainer.train_step()
        with backend.device, backend.stream:
            mark()
        for _ in range(args.steps):
            trainer.train_step()
        with backend.device, backend.stream:
            mark()
        backend.synchronize()
    loss = trainer.take_mean_loss()
    timer = layouts.CudaEventTimer(backend)
    timer.start()
    for _ in range(args.steps):
        trainer.train_step()
    unprofiled_us = 1e6 * timer.stop() / args.steps
    path = os.path.join(folder, "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        return json.load(f), loss, unprofiled_us


def write_trace(source, target):
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    opener = (lambda name, mode: gzip.open(name, mode, compresslevel=6)) if target.endswith(".gz") else open
    with open(source, "rb") as f, opener(target + ".tmp", "wb") as out:
        shutil.copyfileobj(f, out)
    os.replace(target + ".tmp", target)


def summarize_saved(args):
    """--from-trace: the summary of a trace written by an earlier run (its --trace)."""
    try:
        with (gzip.open if args.from_trace.endswith(".gz") else open)(args.from_trace, "rt") as file:
            trace = json.load(file)
        summary = summarize(gpu_events(trace), args.steps, set(KERNEL_FILES), args.top)
    except (OSError, ValueError) as error:      # missing, not gzip, not JSON, no markers
        why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)   # not the path again
        print(f"error: {args.from_trace}: {' '.join(why.split())}", file=sys.stderr)
        return 2
    print_summary(summary, f"{args.from_trace}: {args.steps} replays")
    if args.json:
        layouts.replace_json(args.json, {"benchmark": "timeline", "from_trace": args.from_trace, **summary})
        print(f"wrote {args.json}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.from_trace:
        return summarize_saved(args)
    torch, problem = vs_torch.import_torch()
    if torch is None:
        print(f"timeline: skipped: PyTorch is not importable ({problem}); its profiler records the kernels")
        return 0
    if not torch.cuda.is_available():
        print(f"error: PyTorch sees no CUDA device (torch {torch.__version__}); its profiler records the "
              f"kernels", file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp(prefix="timeline")
    try:
        trace, loss, unprofiled_us = profile_replays(torch, args, folder)
        if args.trace:
            write_trace(os.path.join(folder, "trace.json"), args.trace)
        summary = summarize(gpu_events(trace), args.steps, set(KERNEL_FILES), args.top)
    except CupynetError as error:       # a device or an option this machine cannot run
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:          # CUDA, cuDNN or the profiler failing, a trace without the markers:
        print(f"error: {type(error).__name__}: {' '.join(str(error).split())}", file=sys.stderr)
        return 1                        # one line, as every benchmark reports a run that could not finish
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    summary["period_unprofiled_us"] = round(unprofiled_us, 2)
    if not np.isfinite(loss):
        print(f"error: the profiled steps' loss is {loss}", file=sys.stderr)
        return 1
    options = {name: getattr(args, name) for name in STEP_OPTIONS}
    title = (f"ResNet-{args.depth}, batch {args.batch}, {args.layout} {args.dtype}, captured, "
             f"{', '.join(f'{k} {v}' for k, v in options.items())} | {args.steps} replays, mean loss {loss:.4f}")
    print_summary(summary, title)
    report = {"benchmark": "timeline", "environment": layouts.environment(int(args.device)), "args": vars(args),
              "mean_loss": round(float(loss), 4), **summary}
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"timeline-{platform.node() or 'host'}.json")
    layouts.replace_json(path, report)
    print(f"wrote {path}" + (f" and {args.trace}" if args.trace else ""))
    return 0


if __name__ == "__main__":
    run_script(main)
