"""Training throughput of the ResNet per depth, batch, memory layout and precision.

    python bench/layouts.py                                   # CPU: ResNet-20/44, batch 128, NCHW and NHWC
    python bench/layouts.py --depths 20 --batches 64 --layouts NHWC --repeats 7
    python bench/layouts.py --quick                           # a tiny grid, for CI (checks the script runs)

Each configuration trains on synthetic data already on the device (the real input kernel, random images):
warm-up steps first (excluded), then `--repeats` timed windows of `--steps` full training steps
(augment -> forward -> backward -> momentum update); images/s is reported as the median of the windows
with min and max. Prints a table and writes JSON (`--json`, default bench/results/layouts-<host>.json)
with the hardware, library versions, git commit and the full config of each row.
On a GPU (`--device 0`) windows are timed with CUDA events on the backend's stream and the device memory
of the row is recorded (CuPy's pool, emptied before each row, plus the captured step's own pool); on the
CPU with perf_counter.

    python bench/layouts.py --device 0 --depths 44 --batches 128 --dtypes float32,bfloat16
    python bench/layouts.py --device 0 --depths 44 --cuda-graph off,on      # eager vs captured step

`--cuda-graph` is a grid dimension too: `off` times the eager step (every primitive launched from
Python), `on` the step recorded once as a CUDA graph and replayed (cupynet/step_graph.py), `auto` what
training does by default (captured on a GPU, eager on the CPU). Warm-up always covers the recording.
So is each of the step options (bench/step_options.py: cupynet.train's flags that change how its step runs on the
GPU; their help says what each does), as a comma-separated list of its values: `--wgrad-streams 1,2`,
`--wgrad-chunks 1,2`, `--bn-launches 2,1`, and on/off for a switch: `--conv-deterministic on,off`,
`--conv-genstats off,on`, ... (`python bench/layouts.py --help` lists them).
A row records each option as its backend applied it: null (the table's "-") where the backend has no such
option (the CPU's GPU-only ones), pixel pairs off in NCHW even where asked for.

    python bench/layouts.py --device 0 --depths 44 --layouts NHWC --dtypes bfloat16 --cuda-graph on \
        --wgrad-streams 1,2,3 --wgrad-chunks 1,2 --conv-deterministic on,off
    python bench/layouts.py --device 0 --depths 44 --layouts NHWC --dtypes bfloat16 --cuda-graph on \
        --wgrad-pairs 1x1,4x4,8x8 --max-seconds 60          # chosen (streams, chunks) pairs, paced

`--wgrad-pairs SxK,...` lists (side streams, chunks) pairs instead of the product of the two lists. The grid
runs in order (the last flag varies fastest). `--max-seconds` paces a run that an outer timeout would
otherwise cut: no configuration starts once the time since the start plus 1.5x the longest one so far
would pass it; those left are listed in the JSON (`not_measured`). The JSON is rewritten after every
configuration, so a run stopped from outside keeps what it measured. A configuration that fails at run
time (out of memory, a CUDA or cuDNN error, a non-finite loss) is recorded with its error and the next one
runs; the exit status is then 1. A bad flag (a depth not 6n+2, a dtype the device lacks: float32 on either,
bfloat16 on a GPU, float64 on the CPU), a GPU that is not there or a configuration cupynet refuses ends the run
in one line, `error: ...`, with exit status 2, before anything is written.

`--also "FLAGS"` adds a smaller grid's configurations (its grid flags over this grid's), each where the
product of every value puts it, beside those it differs from in the last dimensions: a few configurations
more without a process of their own, whose start-up costs as much as several configurations.

    python bench/layouts.py --device 0 --depths 44 --batches 512 --layouts NHWC --dtypes bfloat16 --cuda-graph on \
        --wgrad-pairs 1x1,8x8 --also "--wgrad-pairs 1x1 --conv-genstats on"    # 1x1, 1x1 + genstats, 8x8
    python bench/layouts.py --device 0 --depths 44 --layouts NHWC --dtypes bfloat16 --cuda-graph on \
        --wgrad-pairs 1x1,4x4 --also "--wgrad-pairs 1x1 --conv-pixel-pairs on"   # 1x1, 1x1 + pixel pairs, 4x4
    python bench/layouts.py --device 0 --depths 44 --layouts NHWC --dtypes bfloat16 --cuda-graph on \
        --wgrad-pairs 1x1 --residual-grad-sums off,on                          # 1x1, 1x1 + residual grad sums
"""
import argparse
import gc
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import step_options                                   # noqa: E402
from bench.cli import (check_at_least, check_device, depth_problem, device_of, dtype_problem, is_count,  # noqa: E402
                       is_device, run_script)
from cupynet import __version__                                   # noqa: E402
from cupynet.backends import MAX_WGRAD_CHUNKS, MAX_WGRAD_STREAMS   # noqa: E402
from cupynet.config import OneLineErrorParser, TrainConfig         # noqa: E402
from cupynet.data import synthetic_dataset                         # noqa: E402
from cupynet.errors import ConfigError                             # noqa: E402
from cupynet.step_graph import WARMUP_STEPS                        # noqa: E402
from cupynet.train import build_backend                            # noqa: E402
from cupynet.trainer import Trainer                                # noqa: E402


# The step options' grid dimensions: wgrad streams and chunks are one, their pairs (--wgrad-pairs, or the product
# of the two lists); each other option is one, a list of its values (on/off for a switch).
PAIRED = ("wgrad_streams", "wgrad_chunks")
UNPAIRED = [option for option in step_options.OPTIONS if option.name not in PAIRED]
# the flags that name a grid's configurations (what --also may give), as argparse's names
GRID_FLAGS = ("depths", "batches", "layouts", "dtypes", "cuda_graph", "wgrad_pairs", *step_options.NAMES)


def build_parser():
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="20,44", help="comma-separated ResNet depths (6n+2)")
    p.add_argument("--batches", default="128", help="comma-separated batch sizes")
    p.add_argument("--layouts", default="NCHW,NHWC")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--cuda-graph", default="auto", help="comma-separated: auto, off (eager), on (captured)")
    p.add_argument("--device", default="cpu", help="'cpu' or a GPU id")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="GPU float32: strict fp32 convolutions")
    for option in step_options.OPTIONS:
        default = {True: "on", False: "off"}[option.default] if option.on_off else str(option.default)
        p.add_argument(option.flag, default=default,
                       help=f"comma-separated{' on/off' * option.on_off} (default {default}): {option.help}")
    p.add_argument("--wgrad-pairs", help="GPU, comma-separated STREAMSxCHUNKS pairs (e.g. 1x1,4x4): these "
                   "(--wgrad-streams, --wgrad-chunks) pairs instead of the product of those two lists")
    p.add_argument("--max-seconds", type=float, help="start no configuration that would end past this many "
                   "seconds from the start (judged by 1.5x the longest so far)")
    p.add_argument("--also", action="append", default=[], metavar="FLAGS",
                   help="grid flags as one argument (e.g. \"--wgrad-pairs 1x1 --conv-genstats on\"; those not given "
                        "keep this grid's values): their configurations too, each where the product of every value "
                        "puts it; may be repeated")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    p.add_argument("--steps", type=int, default=2, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per configuration (median reported)")
    p.add_argument("--quick", action="store_true", help="ResNet-8, batch 8, NHWC and NCHW, 2 windows of 1 step")
    p.add_argument("--json", help="output file (default bench/results/layouts-<host>.json)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check(p.error, args)
    if args.quick:
        args.depths, args.batches, args.warmup, args.steps, args.repeats = "8", "8", 1, 1, 2
    for text in args.also:
        also_args(args, text)               # checked here, parsed where the grid is built
    return args


def check(fail, args):
    """Refuse, through fail(message) (the parser's error: one line, exit status 2), flag values no configuration
    could run with, before anything is measured or written."""
    if not is_device(args.device):
        fail(f"--device: 'cpu' or a GPU id, got {args.device!r}")
    for flag in ("depths", "batches", "wgrad_streams", "wgrad_chunks"):
        if not all(is_count(value) and int(value) > 0 for value in getattr(args, flag).split(",")):
            fail(f"--{flag.replace('_', '-')}: a comma-separated list of positive integers, got {getattr(args, flag)!r}")
    for depth in args.depths.split(","):
        problem = depth_problem(int(depth), "--depths")
        if problem:
            fail(problem)
    if any(layout not in ("NCHW", "NHWC") for layout in args.layouts.split(",")):
        fail(f"--layouts: a comma-separated list of NCHW and NHWC, got {args.layouts!r}")
    for dtype in args.dtypes.split(","):
        problem = dtype_problem(dtype, args.device, "--dtypes")
        if problem:
            fail(problem)
    graphs = args.cuda_graph.split(",")
    if any(graph not in ("auto", "off", "on") for graph in graphs):
        fail(f"--cuda-graph: a comma-separated list of auto, off and on, got {args.cuda_graph!r}")
    if "on" in graphs and args.device == "cpu":
        fail("--cuda-graph on needs a GPU (--device 0): the CPU backend has no CUDA graphs")
    check_at_least(fail, args, 1, "steps", "repeats")
    check_at_least(fail, args, 0, "warmup")
    for flag, most in (("wgrad_streams", MAX_WGRAD_STREAMS), ("wgrad_chunks", MAX_WGRAD_CHUNKS)):
        if any(int(value) > most for value in getattr(args, flag).split(",")):
            fail(f"--{flag.replace('_', '-')}: at most {most}, got {getattr(args, flag)!r}")
    if args.wgrad_pairs is not None:
        try:
            parse_pairs(args.wgrad_pairs)           # checked here, parsed where the grid is built
        except ValueError as error:
            fail(f"--wgrad-pairs: {error}")
    if args.max_seconds is not None and not args.max_seconds > 0:
        fail(f"--max-seconds must be positive, got {args.max_seconds}")
    for option in UNPAIRED:
        allowed = ("on", "off") if option.on_off else tuple(str(value) for value in option.choices or ())
        text = getattr(args, option.name)
        if allowed and any(value not in allowed for value in text.split(",")):
            fail(f"{option.flag}: a comma-separated list of {'on/off' if option.on_off else ' and '.join(allowed)}, "
                 f"got {text!r}")


def also_args(args, text):
    """The arguments of an --also grid: its flags (`text`) over args, checked like args; only grid flags. A
    refusal names the --also argument it came from."""
    p = build_parser()
    error = p.error
    p.error = fail = lambda message: error(f"--also {text!r}: {message}")     # argparse's own refusals too
    try:
        words = shlex.split(text)
    except ValueError as problem:               # an unclosed quote
        fail(str(problem))
    also = p.parse_args(words, namespace=argparse.Namespace(**vars(args)))
    other = [name for name, value in vars(also).items() if name not in GRID_FLAGS and value != getattr(args, name)]
    if other:
        fail(f"grid flags only, not --{other[0].replace('_', '-')}")
    check(fail, also)
    return also


def dimensions(args):
    """The values of each of a grid's dimensions, in the order they vary (the last fastest)."""
    ints = lambda text: [int(v) for v in text.split(",")]
    pairs = (parse_pairs(args.wgrad_pairs) if args.wgrad_pairs is not None
             else list(itertools.product(ints(args.wgrad_streams), ints(args.wgrad_chunks))))
    return [ints(args.depths), ints(args.batches), args.layouts.split(","), args.dtypes.split(","),
            args.cuda_graph.split(","), pairs,
            *[(on_off if option.on_off else ints)(getattr(args, option.name)) for option in UNPAIRED]]


def grid(args):
    """The configurations to measure, in order: the product of args' dimensions and of each --also grid's, each
    configuration once, where the product of every dimension's values (args' first) puts it, so an --also
    configuration runs beside those it differs from in its last dimensions. Each is (depth, batch, layout,
    dtype, cuda_graph, {step option: value})."""
    grids = [dimensions(args)] + [dimensions(also_args(args, text)) for text in args.also]
    values = [list(dict.fromkeys(itertools.chain(*column))) for column in zip(*grids)]
    wanted = {point for dims in grids for point in itertools.product(*dims)}
    names = (*PAIRED, *(option.name for option in UNPAIRED))
    return [(*point[:5], dict(zip(names, (*point[5], *point[6:])))) for point in itertools.product(*values)
            if point in wanted]


def parse_pairs(text):
    """'1x1,4x4' -> [(1, 1), (4, 4)]: (wgrad streams, wgrad chunks) pairs within the backend's limits."""
    pairs = []
    for item in text.split(","):
        parts = item.split("x")
        if len(parts) != 2 or not all(is_count(part) and int(part) > 0 for part in parts):
            raise ValueError(f"STREAMSxCHUNKS pairs of positive integers, comma-separated, got {text!r}")
        streams, chunks = int(parts[0]), int(parts[1])
        if streams > MAX_WGRAD_STREAMS or chunks > MAX_WGRAD_CHUNKS:
            raise ValueError(f"at most {MAX_WGRAD_STREAMS} streams and {MAX_WGRAD_CHUNKS} chunks, got {item!r}")
        pairs.append((streams, chunks))
    return pairs


def _git_commit():
    """The short commit, with "+changes" when tracked files differ from it (a copied working tree, such
    as the GPU machine's, can carry an older .git than the code it runs)."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=here).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD") or None
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+changes"
        return commit
    except OSError:
        return None


def environment(device="cpu"):
    """Hardware and versions, recorded with every result."""
    commit = _git_commit()
    blas = None
    try:
        blas = [lib.get("version") or lib.get("name") for lib in np.show_config(mode="dicts")["Build Dependencies"].values()]
    except Exception:   # older NumPy without mode="dicts": the version alone is enough
        pass
    env = {"cupynet": __version__, "git_commit": commit, "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "host": platform.node(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    env.update(gpu_environment(device))
    return env


def gpu_environment(device):
    """GPU name, driver, CUDA, CuPy, cuDNN, NCCL versions (empty on the CPU)."""
    if device == "cpu":
        return {}
    import cupy
    runtime = cupy.cuda.runtime
    info = {"gpu": runtime.getDeviceProperties(int(device))["name"].decode(), "cupy": cupy.__version__,
            "cuda_driver": runtime.driverGetVersion(), "cuda_runtime": runtime.runtimeGetVersion()}
    try:
        import cudnn
        info["cudnn_backend"] = cudnn.backend_version()
        info["cudnn_frontend"] = getattr(cudnn, "__version__", None)
    except Exception as error:
        info["cudnn"] = f"unavailable: {error}"
    try:
        from cupy.cuda import nccl
        info["nccl"] = nccl.get_version()
    except Exception as error:
        info["nccl"] = f"unavailable: {error}"
    return info


class WallTimer:
    """Seconds of a window on the CPU."""

    def __init__(self, backend):
        self.backend = backend

    def start(self):
        self.backend.synchronize()
        self.t0 = time.perf_counter()

    def stop(self):
        self.backend.synchronize()
        return time.perf_counter() - self.t0


class CudaEventTimer:
    """Seconds of a window measured on the device, between two events recorded on the backend's stream."""

    def __init__(self, backend):
        import cupy
        self.backend = backend
        self.begin, self.end = cupy.cuda.Event(), cupy.cuda.Event()

    def start(self):
        self.begin.record(self.backend.stream)

    def stop(self):
        import cupy
        self.end.record(self.backend.stream)
        self.end.synchronize()
        return cupy.cuda.get_elapsed_time(self.begin, self.end) / 1000.0


def measure(depth, batch, layout, dtype, args, dataset, cuda_graph=None, **options):
    """Images/s of one configuration; cuda_graph: auto | on | off (default: args.cuda_graph, else auto); options:
    step options by name (bench/step_options.py), TrainConfig's default for any not given."""
    cuda_graph = cuda_graph or getattr(args, "cuda_graph", None) or "auto"
    config = TrainConfig(num_layers=depth, train_batch_size=batch, data_format=layout, dtype=dtype,
                         synthetic=True, tf32=args.tf32, cuda_graph=cuda_graph, **options)
    release_cached_memory(args.device)           # the row's memory figure counts this row's arrays only
    backend = build_backend(config, device_of(args.device))     # every option as training builds it
    trainer = Trainer(config, dataset, backend)
    # A captured step is recorded after WARMUP_STEPS eager ones: the recording step is never timed.
    warmup = max(args.warmup, WARMUP_STEPS + 1) if trainer.runner.capture else args.warmup
    for _ in range(warmup):
        trainer.train_step()
    timer = WallTimer(backend) if backend.name == "numpy" else CudaEventTimer(backend)
    launches_before = launch_count(backend)
    rates = []
    for _ in range(args.repeats):
        timer.start()
        for _ in range(args.steps):
            trainer.train_step()
        rates.append(args.steps * batch / timer.stop())
    loss = trainer.take_mean_loss()
    if not np.isfinite(loss):
        raise RuntimeError(f"ResNet-{depth} {layout} {dtype}: loss is {loss}, not timing a broken step")
    median = statistics.median(rates)
    launches = launch_count(backend) - launches_before if launches_before is not None else None
    kernels_per_step = launches / (args.repeats * args.steps) if launches is not None and not trainer.runner.captured \
        else None        # a replayed step launches its graph once: its kernels are counted while recording only
    # each step option as the backend applied it: null where it has no such option, pixel pairs off in NCHW
    return {"backend": backend.name, "device": args.device, "depth": depth, "batch": batch, "layout": layout,
            "dtype": dtype, "cuda_graph": cuda_graph, "captured": trainer.runner.captured,
            "conv_autotune": getattr(backend, "autotune", None),
            "wgrad_streams": len(backend.side_streams) if hasattr(backend, "side_streams") else None,
            "conv_deterministic": getattr(backend, "deterministic", None),
            "conv_split_k": getattr(backend, "split_k", None), "conv_genstats": backend.conv_genstats,
            "conv_pixel_pairs": getattr(backend, "pixel_pairs", None),
            "wgrad_pixel_pairs": getattr(backend, "wgrad_pixel_pairs", None),
            "own_conv_channels": getattr(backend, "own_conv_channels", None),
            "residual_grad_sums": getattr(backend, "residual_grad_sums", None),
            "stream_priorities": getattr(backend, "stream_priorities", None),
            "conv_tune_in_graph": getattr(backend, "tune_in_graph", None),
            "padded_input": getattr(backend, "padded_input", None),
            "programmatic_launch": getattr(backend, "programmatic_launch", None),
            "programmatic_launch_early": getattr(backend, "programmatic_launch_early", None),
            "wgrad_chunks": backend.wgrad_chunks, "bn_launches": getattr(backend, "bn_launches", None),
            "images_per_sec": round(median, 2), "images_per_sec_min": round(min(rates), 2),
            "images_per_sec_max": round(max(rates), 2), "step_ms": round(1000 * batch / median, 2),
            "windows": args.repeats, "steps_per_window": args.steps, "warmup_steps": warmup,
            "mean_loss": round(loss, 4), "peak_memory_bytes": peak_memory(backend, trainer),
            "kernels_per_step": kernels_per_step, "split_k_settings": split_k_report(backend),
            "genstats": genstats_report(backend)}


def split_k_report(backend):
    """With --conv-split-k: how many split-K settings were tried, built, dropped (not repeatable) and chosen
    (weight gradients running one), and any reason none could be tried; None otherwise. The process shares
    its engine choices, so a later row with the same shapes builds (and counts) only the chosen ones."""
    if not getattr(backend, "split_k", False):
        return None
    chosen = sum(not isinstance(choice["plan_index"], (int, type(None))) for choice in backend.conv.engine_choices())
    return dict(backend.conv.split_k_counts, chosen=chosen)


def genstats_report(backend):
    """With --conv-genstats on the GPU: how many convolution graphs were built fused with BatchNorm's statistics
    ("fused"), how many ran plain ("unsupported": cuDNN had no such engine, or none passed the autotuner's
    checks), and how many candidates those checks dropped ("wrong sums", "not repeatable"), so a run shows
    whether the option did anything (nothing counted: it did not); with --own-conv-channels, how many convolution
    shapes had their BatchNorm's sums from our own kernel instead ("own kernel"; cuDNN never saw them); None
    otherwise, and on the CPU, which has no cuDNN."""
    counts = getattr(getattr(backend, "conv", None), "genstats_counts", None)
    if not backend.conv_genstats or counts is None:
        return None
    ours = len(getattr(backend, "own_conv_sum_shapes", ()))
    return dict(counts, **({"own kernel": ours} if ours else {}))


def launch_count(backend):
    """Kernels our library launched plus cuDNN executions so far (GPU), None on the CPU."""
    if backend.name == "numpy":
        return None
    return sum(backend.kernels.launches.values()) + sum(backend.conv.executions.values())


def on_off(text):
    """'on,off' -> [True, False] (checked by parse_args)."""
    return [value == "on" for value in text.split(",")]


def print_row(row):
    form = {True: "graph", False: "eager"}.get(row.get("captured"), row["cuda_graph"])
    head = (f"{row['depth']:>5} {row['batch']:>5} {row['layout']:>6} {row['dtype']:>8} {form:>8} " +
            " ".join(f"{cell(option, row.get(option.name)):>{option.width}}" for option in step_options.OPTIONS))
    if "error" in row:
        print(f"{head} failed: {row['error']}", flush=True)
        return
    print(f"{head} {row['images_per_sec']:>9.1f} {row['images_per_sec_min']:>9.1f} "
          f"{row['images_per_sec_max']:>9.1f} {row['step_ms']:>9.1f}", flush=True)


def cell(option, value):
    """A step option's value in the table: on/off for a switch, else the number; "-" for null (no such option)."""
    if option.on_off:
        return {True: "on", False: "off", None: "-"}[value]
    return value or "-"


def configuration(depth, batch, layout, dtype, cuda_graph, options, device):
    """The fields that name one grid point (a row without figures: failed or not measured)."""
    return {"device": device, "depth": depth, "batch": batch, "layout": layout, "dtype": dtype,
            "cuda_graph": cuda_graph, **options}


def one_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def replace_json(path, report, **dump_options):
    """Write `report` to `path` beside it, then rename it into place: a reader, or a benchmark stopped from
    outside mid-write, never leaves half a file (the benchmarks rewrite their report after every row)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2, **dump_options)
    os.replace(path + ".tmp", path)


def write_report(path, env, args, rows, not_measured):
    replace_json(path, {"benchmark": "layouts", "environment": env, "args": vars(args), "results": rows,
                        "not_measured": not_measured})


def release_cached_memory(device):
    """Give the earlier rows' cached blocks back to the device, so the pool holds only this row's."""
    if device == "cpu":
        return
    import cupy
    gc.collect()                                  # earlier rows' trainers, in reference cycles
    cupy.get_default_memory_pool().free_all_blocks()


def peak_memory(backend, trainer):
    """Bytes the row holds on the device: CuPy's pool (emptied before the row; a pool only grows, so this is
    the row's peak) plus the captured step's private pool. None on the CPU."""
    if backend.name == "numpy":
        return None
    import cupy
    graph = trainer.runner.graph
    return cupy.get_default_memory_pool().total_bytes() + (graph.pool.total_bytes() if graph is not None else 0)


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    check_device(args.device)                      # a clear DeviceError before environment() asks CUDA
    points = grid(args)
    largest = max(point[1] for point in points)            # batch
    dataset = synthetic_dataset(num_train=largest * 4, num_test=largest, seed=0)
    env = environment(args.device)
    print(f"{env.get('gpu', 'CPU')} | cupynet {env['cupynet']} ({env['git_commit']}) | numpy {env['numpy']} | {env['cpu']}, "
          f"{env['cpu_count']} cores | {args.repeats} windows x {args.steps} steps after {args.warmup} warm-up")
    print(f"{'depth':>5} {'batch':>5} {'layout':>6} {'dtype':>8} {'step':>8} " +
          "".join(f"{option.column:>{option.width}} " for option in step_options.OPTIONS) +
          f"{'img/s':>9} {'min':>9} {'max':>9} {'ms/step':>9}")
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"layouts-{platform.node() or 'host'}.json")
    rows, durations = [], []
    for index, point in enumerate(points):
        # a configuration's expected time: the longest so far, leaving out the first once there is another
        # (the first also paid the process's start: CUDA, cuDNN, kernel loading, a cold autotune)
        longest = max(durations[1:] or durations or [0.0])
        if args.max_seconds is not None and time.perf_counter() - started + 1.5 * longest > args.max_seconds:
            print(f"--max-seconds {args.max_seconds:g}: {len(points) - index} of {len(points)} configurations "
                  f"not started", flush=True)
            break
        began = time.perf_counter()
        try:
            depth, batch, layout, dtype, cuda_graph, options = point
            row = measure(depth, batch, layout, dtype, args, dataset, cuda_graph=cuda_graph, **options)
        except ConfigError:
            raise                          # flags cupynet refuses: the whole grid is wrong
        except Exception as error:         # a run-time failure of this configuration (out of memory, a CUDA or
            row = dict(configuration(*point, device=args.device), error=one_line(error))   # cuDNN error): go on
        durations.append(time.perf_counter() - began)
        row["seconds"] = round(durations[-1], 2)
        rows.append(row)
        print_row(row)
        write_report(path, env, args, rows, [configuration(*rest, device=args.device) for rest in points[index + 1:]])
    if not rows:                           # stopped before its first configuration: nothing written yet
        write_report(path, env, args, rows, [configuration(*rest, device=args.device) for rest in points])
    print(f"wrote {path}")
    failed = sum("error" in row for row in rows)
    if failed:
        sys.exit(f"error: {failed} of {len(points)} configurations failed (their rows in {path} say why)")


if __name__ == "__main__":
    run_script(main)
