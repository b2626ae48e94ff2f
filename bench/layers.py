"""Where a training step's time goes, per backend primitive, beside a memory-roofline estimate.

    python bench/layers.py                                 # CPU: ResNet-20, batch 128, NHWC, 3 timed steps
    python bench/layers.py --depth 44 --batch 64 --layout NCHW --steps 5
    python bench/layers.py --quick                         # ResNet-8, batch 8, 1 warm-up + 1 timed step (CI)
    python bench/layers.py --device 0 --peak-gbs 3350      # GPU (H100 HBM3): device time from CUDA events

Every public method of the backend instance (conv2d_forward, conv2d_backward_data/_filter, batchnorm_*,
relu/add, shortcut, pooling, dense, softmax_cross_entropy, sgd_momentum_update, augment_batch, accumulate,
and the array helpers such as from_host) is replaced by a timing shim, then a Trainer runs warm-up steps
(excluded) and `--steps` timed steps on synthetic data. Only the outermost call is timed when a primitive
calls another, so the per-primitive times never count the same work twice.
  * CPU: perf_counter around the call, which is the primitive's device time (NumPy runs synchronously).
  * GPU: host time around the call is only the launch cost; CUDA events recorded on `backend.stream`
    before and after the call give its interval on the device, read once the step has finished. An eager
    step is launch-bound, so that interval is mostly the GPU waiting for the host. The kernels' own time
    comes from a second measurement: every call of the first timed step is replayed alone in a CUDA graph,
    which is what it costs inside a captured step. `--l2 cold` (the default): the graph holds the call
    once, and each of `--isolate-launches` launches is timed on its own right after a read of 4x the L2
    cache (200 MB on an H100), so the call reads its inputs from HBM, as the roofline assumes (that read
    also keeps the GPU busy while the host enqueues the timed launch); the median counts, less the same
    median for a graph of one empty kernel (a graph launch's own cost, which would dwarf a 1-us kernel). `--l2 warm`: the graph
    holds the call `--isolate-repeats` times and the launches are timed together, so every copy after the
    first finds its inputs in the L2 cache (a batch-128 ResNet activation, 4 MB in bf16, fits H100's
    50 MB): above 100% of HBM peak is then possible. The roofline columns use that time on a GPU. Host
    copies (to_host, from_host, upload_into) cannot be recorded and keep only the interval. The replays
    repeat updates (moving statistics, the optimizer, the step counter) many times: the state is garbage
    afterwards, which is why they come last.

Per primitive: calls/step, ms/step, share of the step, and the memory roofline. Bytes moved are counted by
one rule: every array argument is moved once, inputs read + outputs written = the sum of the array
arguments' nbytes (an in-place argument counts once). It is the compulsory traffic, a lower bound: scratch
such as NumPy's im2col matrix is not counted. Two exceptions keep it honest: the augment primitives gather
only the batch's rows of the whole split (and of the epoch's order) they are handed, so `images`, `labels`
and `order` count one row per image of the batch; and `batchnorm_backward` (or `batchnorm_backward_dx`, or
`relu_backward_add_bn_grad`, under --residual-grad-sums) given `beta` does not count the relu's output (`y`,
`bn_y`), which the GPU's kernels then do not read (they recompute the relu's mask from x). Steps run eagerly
(--cuda-graph off): a replayed graph has no per-primitive calls to time; on a GPU the weight gradients run in
order on the main stream's timeline (overlap_wgrad off), so each primitive's time is its own.
roofline ms = bytes / peak; achieved GB/s = bytes / measured time; fraction of peak = achieved / peak
(above 100% on the CPU: the arrays were still in cache, small ones often are). On a GPU also per primitive
and shape of its first array argument: the median call's kernel time (replayed alone) beside its roofline,
which tells a fixed cost per call from a bandwidth limit (the 16 most expensive printed, all in the JSON's
`by_shape`).
The step options that change which kernels run are cupynet.train's flags (bench/step_options.py; not those that
spread the weight gradients): `--bn-launches 1` gives bn_stats_apply and bn_grad_dx rows, `--conv-genstats`
conv2d_forward_with_stats and batchnorm_train_from_sums rows (the GPU needs its autotuner, on here),
`--conv-pixel-pairs` keeps its calls' shapes the original's (each also builds the paired kernel), and
`--no-conv-deterministic` is there because the step options may say so (genstats engines may all be such).
The peak (`--peak-gbs`) defaults on the CPU to a measured `np.copyto` of 256 MB (read + write, best of 3);
on a GPU pass the datasheet figure. Prints a table and writes JSON (`--json`, default
bench/results/layers-<host>.json) with `environment()` of bench/layouts.py. Bad input (a flag, a depth not 6n+2,
a dtype the device lacks, a GPU that is not there) is one line, `error: ...`, and exit status 2.
"""
import inspect
import os
import platform
import statistics
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import step_options                                             # noqa: E402
from bench.cli import (check_at_least, check_device, depth_problem, device_of, dtype_problem,   # noqa: E402
                       is_device, run_script)
from bench.layouts import CudaEventTimer, WallTimer, environment, replace_json   # noqa: E402
from cupynet.backends.layout import LayoutMixin                             # noqa: E402
from cupynet.config import OneLineErrorParser, TrainConfig                  # noqa: E402
from cupynet.data import synthetic_dataset                                  # noqa: E402
from cupynet.train import build_backend                                     # noqa: E402
from cupynet.trainer import Trainer                                         # noqa: E402

PEAK_COPY_BYTES = 256 * 2 ** 20
# Arguments that index into a larger array: only the gathered rows are moved (see the docstring).
GATHERED = {"augment_batch": ("images", "labels"), "augment_train_batch": ("images", "labels", "order")}
# given the first argument, the second is not read
UNREAD = {"batchnorm_backward": ("beta", "y"), "batchnorm_backward_dx": ("beta", "y"),
          "relu_backward_add_bn_grad": ("beta", "bn_y")}
# Not shimmed: shape arithmetic (no device work) and synchronize (the step timer's own wait).
NOT_PRIMITIVES = {name for name in dir(LayoutMixin) if not name.startswith("_")} | {"synchronize"}
# Host copies: a CUDA graph cannot record them, so they get no isolated device time.
HOST_COPIES = {"to_host", "from_host", "upload_into"}
L2_FLUSH_BYTES_UNKNOWN_L2 = 256 * 2 ** 20     # --l2 cold writes 4x the L2 cache before each timed launch, or this
# The step options taken (cupynet.train's flags): those that change which kernels run, not those that spread the
# weight gradients (over streams, chunks, split-K slices), which run in order here, each timed alone.
OPTIONS = [option for option in step_options.OPTIONS
           if option.name not in ("wgrad_streams", "wgrad_chunks", "conv_split_k")]


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=20, help="ResNet depth (6n+2)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--layout", default="NHWC", choices=("NCHW", "NHWC"))
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 (GPU) or float64 (CPU)")
    p.add_argument("--device", default="cpu", help="'cpu' or a GPU id")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="GPU float32: strict fp32 convolutions")
    step_options.add_flags(p, OPTIONS)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps")
    p.add_argument("--steps", type=int, default=3, help="timed steps (per-primitive figures are per step)")
    p.add_argument("--peak-gbs", type=float, help="peak memory bandwidth in GB/s (default: measured on CPU; "
                                                  "required on GPU, e.g. 3350 for H100 HBM3)")
    p.add_argument("--l2", choices=("cold", "warm"), default="cold",
                   help="GPU: time each call with its inputs evicted from the L2 cache (cold, the default) or "
                        "repeated on inputs the L2 holds (warm)")
    p.add_argument("--isolate-repeats", type=int, default=10, help="GPU, --l2 warm: copies of a call in its graph")
    p.add_argument("--isolate-launches", type=int, default=5, help="GPU: timed launches of each call's graph")
    p.add_argument("--quick", action="store_true", help="ResNet-8, batch 8, 1 warm-up, 1 timed step")
    p.add_argument("--json", help="output file (default bench/results/layers-<host>.json)")
    args = p.parse_args(argv)
    if not is_device(args.device):
        p.error(f"--device: 'cpu' or a GPU id, got {args.device!r}")
    for problem in (depth_problem(args.depth), dtype_problem(args.dtype, args.device)):
        if problem:
            p.error(problem)
    check_at_least(p.error, args, 1, "batch", "steps", "isolate_repeats", "isolate_launches")
    check_at_least(p.error, args, 0, "warmup")
    if args.peak_gbs is not None and not args.peak_gbs > 0:
        p.error(f"--peak-gbs must be positive, got {args.peak_gbs}")
    if args.quick:
        args.depth, args.batch, args.warmup, args.steps = 8, 8, 1, 1
    if args.device != "cpu" and args.peak_gbs is None:
        p.error("--peak-gbs is required on a GPU (the datasheet bandwidth, e.g. 3350 for H100 HBM3)")
    return args


def measure_copy_bandwidth(nbytes=PEAK_COPY_BYTES, repeats=3):
    """Host memory bandwidth in GB/s: best of `repeats` np.copyto of `nbytes` (read + write = 2 x nbytes)."""
    src = np.ones(nbytes // 8, dtype=np.float64)      # touched, so the first copy pays no page faults
    dst = np.zeros_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def bytes_moved(name, signature, args, kwargs):
    """Bytes a call reads + writes by the rule of the module docstring."""
    bound = signature.bind(*args, **kwargs).arguments
    rows = None
    if name in GATHERED:
        rows = len(bound["labels_out"])              # the batch: one gathered row per label
    if name in UNREAD and bound.get(UNREAD[name][0]) is not None:
        bound.pop(UNREAD[name][1], None)
    total = 0
    for arg_name, value in bound.items():
        nbytes = getattr(value, "nbytes", None)
        if nbytes is None or not hasattr(value, "shape"):
            continue                                   # scalars, flags, strides: no memory traffic
        if rows is not None and arg_name in GATHERED[name] and value.shape:
            nbytes = nbytes // value.shape[0] * rows
        total += int(nbytes)
    return total


class PrimitiveProfiler:
    """Timing shims on every public method of one backend instance (see the module docstring)."""

    def __init__(self, backend):
        self.backend = backend
        self.gpu = backend.name != "numpy"
        self.depth = 0                                 # > 0 inside a shimmed call: nested calls are not timed
        self.recording = False
        self.calls = defaultdict(int)
        self.host_s = defaultdict(float)
        self.bytes = defaultdict(int)
        self.events = defaultdict(list)                # GPU: name -> [(begin, end)] read after the step
        self.replay_log = None                         # a list while the calls to replay alone are logged
        for name in self.primitive_names(backend):
            setattr(backend, name, self._shim(name, getattr(backend, name)))

    @staticmethod
    def primitive_names(backend):
        return [name for name in dir(backend)
                if not name.startswith("_") and name not in NOT_PRIMITIVES
                and inspect.ismethod(getattr(backend, name))]

    def _shim(self, name, method):
        signature = inspect.signature(method)

        def timed(*args, **kwargs):
            if not self.recording or self.depth:
                return method(*args, **kwargs)
            self.depth += 1
            try:
                begin = self._record_event()
                t0 = time.perf_counter()
                result = method(*args, **kwargs)
                self.host_s[name] += time.perf_counter() - t0
                if self.gpu:
                    self.events[name].append((begin, self._record_event()))
            finally:
                self.depth -= 1
            self.calls[name] += 1
            self.bytes[name] += bytes_moved(name, signature, args, kwargs)
            if self.replay_log is not None:
                self.replay_log.append((name, method, args, kwargs))
            return result
        return timed

    def _record_event(self):
        if not self.gpu:
            return None
        import cupy
        event = cupy.cuda.Event()
        event.record(self.backend.stream)
        return event

    def device_s(self):
        """name -> device seconds: host time on the CPU, CUDA event pairs on a GPU (after a sync)."""
        if not self.gpu:
            return dict(self.host_s)
        import cupy
        self.backend.synchronize()
        return {name: sum(cupy.cuda.get_elapsed_time(b, e) for b, e in pairs) / 1000.0
                for name, pairs in self.events.items()}


def isolated_calls(backend, calls, repeats, launches, l2="cold"):
    """[(name, shape, device seconds, bytes)] for each of one step's `calls` [(name, method, args, kwargs)],
    each replayed alone in a CUDA graph (see the module docstring); shape: the first array argument's.
    Runs last: the replays leave the state garbage."""
    import cupy
    timed = []
    begin, end = cupy.cuda.Event(), cupy.cuda.Event()
    if l2 == "cold":
        cold = ColdL2Timer(backend, launches)
        # what a one-node graph costs with nothing in it (one empty kernel): taken off every call's time
        overhead = cold.seconds(backend.capture(lambda: backend.hold_stream(0)))
    for name, method, args, kwargs in calls:
        if name in HOST_COPIES:
            continue
        copies = 1 if l2 == "cold" else repeats
        graph = backend.capture(lambda: [method(*args, **kwargs) for _ in range(copies)])
        graph.launch()                                 # the first launch uploads the graph
        if l2 == "cold":
            seconds = max(cold.seconds(graph) - overhead, 0.0)
        else:
            begin.record(backend.stream)
            for _ in range(launches):
                graph.launch()
            end.record(backend.stream)
            end.synchronize()
            seconds = cupy.cuda.get_elapsed_time(begin, end) / 1000.0 / (repeats * launches)
        shape = next((tuple(arg.shape) for arg in args if hasattr(arg, "shape")), ())
        timed.append((name, shape, seconds, bytes_moved(name, inspect.signature(method), args, kwargs)))
    return timed


def isolated_totals(timed):
    """name -> device seconds per step, from isolated_calls' records."""
    totals = defaultdict(float)
    for name, _, seconds, _ in timed:
        totals[name] += seconds
    return dict(totals)


def shape_rows(timed, peak_gbs):
    """Per primitive and shape of its first array argument: calls per step, the median call's kernel time and
    its fraction of peak (bytes / time / peak), the most expensive first. What a per-primitive total hides:
    whether a kernel's calls are bandwidth-bound or pay a fixed cost per call (BatchNorm's activations at 16,
    32 and 64 channels are 4, 2 and 1 MB at batch 128 in bf16)."""
    groups = defaultdict(list)
    for name, shape, seconds, nbytes in timed:
        groups[(name, shape)].append((seconds, nbytes))
    rows = []
    for (name, shape), records in groups.items():
        seconds = statistics.median(s for s, _ in records)
        nbytes = statistics.median(b for _, b in records)
        achieved = nbytes / seconds / 1e9 if seconds else 0.0
        rows.append({"primitive": name, "shape": list(shape), "calls_per_step": len(records),
                     "median_us": round(1e6 * seconds, 2), "us_per_step": round(1e6 * sum(s for s, _ in records), 2),
                     "bytes_per_call": int(nbytes), "roofline_us": round(1e6 * nbytes / (peak_gbs * 1e9), 2),
                     "fraction_of_peak": round(achieved / peak_gbs, 4)})
    return sorted(rows, key=lambda row: -row["us_per_step"])


class ColdL2Timer:
    """Median device seconds of a graph's launches, each right after reading 4x the L2 cache (a sum over a
    buffer that size): the graph's inputs are no longer in L2 and the L2 holds no dirty lines to write back.
    That read also keeps the GPU busy while the host enqueues the timed launch behind it."""

    def __init__(self, backend, launches):
        import cupy
        self.cupy, self.backend = cupy, backend
        l2_bytes = int(cupy.cuda.Device(backend.device.id).attributes.get("L2CacheSize", 0))
        with backend.device, backend.stream:
            self.buffer = cupy.zeros(((4 * l2_bytes or L2_FLUSH_BYTES_UNKNOWN_L2) // 4,), dtype=cupy.float32)
            self.sink = cupy.zeros((), dtype=cupy.float32)
        self.pairs = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(launches)]

    def seconds(self, graph):
        stream = self.backend.stream
        with self.backend.device, stream:
            for first, last in self.pairs:
                self.cupy.sum(self.buffer, out=self.sink)       # evicts the graph's inputs from L2
                first.record(stream)
                graph.launch()
                last.record(stream)
        self.pairs[-1][1].synchronize()
        return statistics.median(self.cupy.cuda.get_elapsed_time(a, b) for a, b in self.pairs) / 1000.0


def profile(args, dataset):
    """Warm-up, then `args.steps` recorded steps; returns (profiler, step seconds, mean loss, the first timed
    step's calls replayed alone (isolated_calls) or None on the CPU)."""
    config = TrainConfig(num_layers=args.depth, train_batch_size=args.batch, data_format=args.layout,
                         dtype=args.dtype, synthetic=True, tf32=args.tf32, cuda_graph="off",
                         **step_options.config_kwargs(args, OPTIONS))
    backend = build_backend(config, device_of(args.device))
    if hasattr(backend, "overlap_wgrad"):
        backend.overlap_wgrad = False                  # GPU: weight gradients in order, so each is timed alone
    profiler = PrimitiveProfiler(backend)              # before the Trainer: layers may keep bound methods
    trainer = Trainer(config, dataset, backend)
    for _ in range(args.warmup):
        trainer.train_step()
    timer = WallTimer(backend) if backend.name == "numpy" else CudaEventTimer(backend)
    profiler.recording = True
    first_step = [] if profiler.gpu else None          # GPU: the first timed step's calls, replayed alone below
    timer.start()
    for step in range(args.steps):
        profiler.replay_log = first_step if step == 0 else None
        trainer.train_step()
    step_s = timer.stop() / args.steps
    profiler.recording = False
    profiler.replay_log = None
    loss = trainer.take_mean_loss()
    if not np.isfinite(loss):
        raise RuntimeError(f"loss is {loss}: not profiling a broken step")
    timed = None
    if profiler.gpu:
        timed = isolated_calls(backend, first_step, args.isolate_repeats, args.isolate_launches, args.l2)
    return profiler, step_s, loss, timed


def rows_of(profiler, step_s, steps, peak_gbs, isolated=None):
    """One dict per primitive, the most expensive first. `isolated` (GPU): name -> kernel seconds per step,
    which the roofline columns then use; on the CPU they use the measured time itself."""
    device = profiler.device_s()
    rows = []
    for name, calls in profiler.calls.items():
        ms = 1000 * device.get(name, 0.0) / steps
        kernel_ms = None if isolated is None or name in HOST_COPIES else 1000 * isolated.get(name, 0.0)
        basis = ms if isolated is None else kernel_ms
        nbytes = profiler.bytes[name] / steps
        achieved = nbytes / (basis / 1000) / 1e9 if basis else 0.0
        rows.append({"primitive": name, "calls_per_step": calls / steps, "ms_per_step": round(ms, 4),
                     "host_ms_per_step": round(1000 * profiler.host_s[name] / steps, 4),
                     "device_ms_per_step": None if kernel_ms is None else round(kernel_ms, 4),
                     "share": round(ms / (1000 * step_s), 4), "bytes_per_step": int(nbytes),
                     "roofline_ms": round(1000 * nbytes / (peak_gbs * 1e9), 4),
                     "achieved_gbs": round(achieved, 3), "fraction_of_peak": round(achieved / peak_gbs, 4)})
    return sorted(rows, key=lambda row: -(row["device_ms_per_step"] or row["ms_per_step"]))


def print_shapes(rows, top):
    print(f"kernel time per call (median, replayed alone) of the {min(top, len(rows))} most expensive primitive "
          f"and shape pairs:")
    print(f"{'primitive':<30} {'shape':<20} {'calls':>5} {'us/call':>8} {'roof us':>8} {'%peak':>6}")
    for r in rows[:top]:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['primitive']:<30} {shape:<20} {r['calls_per_step']:>5} {r['median_us']:>8.2f} "
              f"{r['roofline_us']:>8.2f} {r['fraction_of_peak']:>6.1%}")


def print_table(rows, step_s):
    gpu = any(r["device_ms_per_step"] is not None for r in rows)
    kernel = lambda r: f"{r['device_ms_per_step']:>9.3f}" if r["device_ms_per_step"] is not None else f"{'-':>9}"
    print(f"{'primitive':<30} {'calls':>6} {'ms/step':>9} {'share':>6}" + (f" {'kernel ms':>9}" if gpu else "") +
          f" {'MB/step':>9} {'roof ms':>8} {'GB/s':>8} {'%peak':>6}")
    for r in rows:
        print(f"{r['primitive']:<30} {r['calls_per_step']:>6.0f} {r['ms_per_step']:>9.3f} {r['share']:>6.1%}" +
              (f" {kernel(r)}" if gpu else "") +
              f" {r['bytes_per_step'] / 1e6:>9.2f} {r['roofline_ms']:>8.3f} {r['achieved_gbs']:>8.2f} "
              f"{r['fraction_of_peak']:>6.1%}")
    total = sum(r["ms_per_step"] for r in rows)
    print(f"{'sum of primitives':<30} {'':>6} {total:>9.3f} {total / (1000 * step_s):>6.1%}   "
          f"(step {1000 * step_s:.3f} ms; the rest is Python between the calls)")
    if gpu:
        kernels = sum(r["device_ms_per_step"] or 0.0 for r in rows)
        print(f"kernel ms: each call replayed alone in a CUDA graph; their sum, {kernels:.3f} ms, is what a captured "
              f"step would take with nothing overlapping (GB/s and %peak use it)")


def default_json(name):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"{name}-{platform.node() or 'host'}.json")


def write_json(path, report):
    replace_json(path, report)          # whole or not at all, as the other benchmarks write theirs
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    check_device(args.device)                       # a clear DeviceError before environment() asks CUDA
    measured = args.peak_gbs is None
    peak_gbs = measure_copy_bandwidth() if measured else args.peak_gbs
    dataset = synthetic_dataset(num_train=args.batch * 4, num_test=args.batch, seed=0)
    env = environment(args.device)
    print(f"{env.get('gpu', 'CPU')} | ResNet-{args.depth} batch {args.batch} {args.layout} {args.dtype} | "
          f"{args.steps} timed steps after {args.warmup} warm-up | peak {peak_gbs:.1f} GB/s "
          f"({'measured: np.copyto 256 MB' if measured else '--peak-gbs'})")
    profiler, step_s, loss, timed = profile(args, dataset)
    isolated = None if timed is None else isolated_totals(timed)
    rows = rows_of(profiler, step_s, args.steps, peak_gbs, isolated)
    print_table(rows, step_s)
    shapes = None if timed is None else shape_rows(timed, peak_gbs)
    if shapes:
        print_shapes(shapes, top=16)
    write_json(args.json or default_json("layers"),
               {"benchmark": "layers", "environment": env, "args": vars(args),
                "peak_gbs": round(peak_gbs, 3), "peak_source": "measured np.copyto 256 MB" if measured else "flag",
                "bytes_rule": "sum of array arguments' nbytes (inputs read + outputs written, each once); "
                              "augment primitives: only the gathered rows of images/labels/order",
                "step_ms": round(1000 * step_s, 4), "mean_loss": round(loss, 4),
                "kernel_ms_sum": None if isolated is None else round(sum(1000 * v for v in isolated.values()), 4),
                "primitives": rows, "by_shape": shapes})


if __name__ == "__main__":
    run_script(main)
