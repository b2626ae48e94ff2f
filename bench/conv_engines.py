"""Every cuDNN engine for each convolution of a ResNet training step, timed beside the one cupynet runs.

    python bench/conv_engines.py --device 0                                  # ResNet-44, batch 128, NHWC bf16
    python bench/conv_engines.py --device 0 --dtype float32 --batch 512 --layout NCHW

First a training step's forward and backward run twice with autotuning, as training runs them: that tells
which convolutions a step makes, how often, and which engine cupynet executes for each (its autotuner
times the heuristics' best few deterministic engines that are not compiled at run time). Then each
convolution is planned again with every heuristics mode (A, B, FALLBACK), deselecting only the engines
noted REDUCED_PRECISION_REDUCTION (cupynet never runs them: its sums stay float32), every engine is built (those compiled at run time too, within --build-seconds per convolution) and timed on the
device: CUDA events on the backend's stream, the median of --repeats windows of --runs executions, the
same arrays for every engine, each window enqueued behind a hold of the stream so that the events time
the GPU and not the host's call cost (conv_autotune.gpu_milliseconds, as cupynet's autotuner times).
Engines noted NONDETERMINISTIC (cupynet runs them only with --no-conv-deterministic: a replayed step must
repeat the eager one bit for bit) are told apart by planning a second time with them deselected too.

It also times variants cupynet does not run (yet), to tell whether they are worth building:
  * bfloat16 weight gradients writing float32 directly (cupynet writes bf16 and converts: one more kernel
    per weight gradient);
  * the cuDNN Frontend's fused BatchNorm patterns: `genstats` (an fprop's output summed per channel as it
    is written: the next BatchNorm's statistics without a pass of their own), a scale-bias-relu prologue
    on the image input (the previous BatchNorm's apply, never written out) for fprop and for wgrad;
  * `split_k`: the weight gradients' split-K settings, (engine, SPLIT_K_SLC slices) pairs of the engines
    that expose the knob (conv_autotune.split_k_engines' order; up to --split-k-settings of them, more than
    the 8 cupynet's autotuner times with --conv-split-k), each built alone in a graph of its own, as cupynet
    builds them;
  * `pixel_pairs`: in NHWC, a 3x3 stride-1 convolution of at most PAIR_MAX_CHANNELS channels in and out
    (stage 1's and the stem's) on the same bytes read as pixel pairs, (N, H, W/2, 2C) to 2K channels. A 3x3
    convolution of the original is exactly one of these, with a 2K x 3 x 3 x 2C kernel built from the
    K x 3 x 3 x C one (zero where a pair's taps fall outside the window; the same padding, counted in pairs),
    so its time says what that rewrite could save where cuDNN's engines for few channels are slow (on an
    H100, 2026-11-27: 21.7 us for stage 1's forward against 7.8 us at stage 2, the same multiply-adds).
    Forward and data gradient: cupynet runs them so with --conv-pixel-pairs (cupynet/backends/pixel_pairs.py,
    stage 1 only). Weight gradient: the paired kernel's gradient, whose two places per weight a small pass
    adds back into the original's (--wgrad-pixel-pairs). Timed with random weights; building the paired kernel
    and adding the gradient back (small passes) are not counted;
  * `own_kernel`: cupynet's own tensor-core kernel for the 3x3 forwards and data gradients it takes
    (kernels/conv3x3.cu, --own-conv-channels; NHWC, bf16 or float32 with TF32: 16 to 64 channels, a data
    gradient at stride 1), timed as the engines are, on arrays of its own: the same multiply-adds, no cuDNN;
  * `pixel_octets`: the same rewrite with groups of 8 pixels, for a convolution of fewer than
    PADDED_CHANNELS input channels (the stem: 24 channels in, 128 out, 8 times the multiply-adds, a shape
    cuDNN's fast engines take); forward and weight gradient (not built);
  * `padded_input`: the forward and weight gradient of a convolution of fewer than PADDED_CHANNELS input
    channels (the stem's 3) with its input padded to PADDED_CHANNELS: zero channels would change neither the
    output nor the real channels' weight gradient, and the time says whether cuDNN's engines for a multiple
    of 8 channels beat those it takes for 3 (run 1: 22.9 us forward on a generic engine; 45.6 us for the
    weight gradient, which ends the step). cupynet runs the stem so with --padded-input
    (cupynet/backends/padded_input.py: the augmentation writes the input padded to 16 bytes a pixel, 8 bf16
    channels, 4 float32). Not counted: padding the weights and cutting the gradient back (small passes).

Reports per convolution, and per step (the calls times the time), cupynet's engine, the fastest
deterministic engine and the fastest of all: how much a better engine choice could still give. The per-step
totals add only the convolutions for which every compared figure exists (and say how many). Writes JSON
(`--json`, default bench/results/conv_engines-<host>.json) with bench/layouts.py's environment(), again
after every convolution, so a run stopped from outside keeps what it measured. --max-seconds bounds the
whole run, setup included: past it, no further build, survey or convolution starts. GPU only. Bad input (a flag,
a GPU that is not there) is one line, `error: ...`, and exit status 2.
"""
import os
import platform
import statistics
import sys
import time
from collections import Counter, defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cli import (check_at_least, check_device, depth_problem, device_of, is_count,   # noqa: E402
                       run_script)
from bench.layouts import environment, replace_json                 # noqa: E402
from cupynet.backends import create_backend                         # noqa: E402
from cupynet.backends.conv_autotune import (MAX_WORKSPACE_BYTES, SettingRefused,  # noqa: E402
                                            build_split_k_setting, engine_ids, gpu_milliseconds,
                                            split_k_engines)
from cupynet.backends.cudnn_conv import (array_shape, conv_output_size, describe,  # noqa: E402
                                         packed_strides)
from cupynet.backends import conv3x3                                # noqa: E402
from cupynet.backends.pixel_pairs import PAIR_MAX_CHANNELS          # noqa: E402
from cupynet.config import OneLineErrorParser                       # noqa: E402
from cupynet.model import ResNet                                    # noqa: E402

OPS = ("wgrad", "fprop", "dgrad")       # surveyed in this order: weight gradients cost the most (GPU notes)
PADDED_CHANNELS = 8                     # padded_input: the stem's 3 image channels as a multiple of 8
PIXEL_GROUPS = {"pixel_pairs": 2, "pixel_octets": 8}     # variant -> pixels read as one (module docstring)
HOST_SECONDS_PER_CALL = 60e-6           # a generous host cost of one execute (GPU notes: 9-45 us): sizes the hold


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="0", help="GPU id")
    p.add_argument("--depth", type=int, default=44, help="ResNet depth (6n+2)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--layout", default="NHWC", choices=("NCHW", "NHWC"))
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="float32: strict fp32 convolutions")
    p.add_argument("--runs", type=int, default=20, help="executions per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per engine (median reported)")
    p.add_argument("--build-seconds", type=float, default=5.0,
                   help="per convolution: once building has taken this long, engines compiled at run time are skipped")
    p.add_argument("--max-seconds", type=float, default=240.0,
                   help="the whole run's time, setup included: nothing new starts after it (the report says "
                        "which convolutions were not surveyed)")
    p.add_argument("--split-k-settings", type=int, default=16,
                   help="weight gradients: how many (engine, slices) split-K settings to time (0: none)")
    p.add_argument("--json", help="output file (default bench/results/conv_engines-<host>.json)")
    args = p.parse_args(argv)
    if not is_count(args.device):
        p.error(f"the engines are cuDNN's: --device must be a GPU id, got {args.device!r}")
    problem = depth_problem(args.depth)
    if problem:
        p.error(problem)
    if args.runs < 1 or args.repeats < 1:
        p.error(f"--runs and --repeats must be >= 1, got {args.runs} and {args.repeats}")
    check_at_least(p.error, args, 1, "batch")
    check_at_least(p.error, args, 0, "split_k_settings", "build_seconds")
    if not args.max_seconds > 0:
        p.error(f"--max-seconds must be positive, got {args.max_seconds}")
    return args


def one_line(error):
    return " ".join(f"{type(error).__name__}: {error}".split())[:200]


# --------------------------------------------------------------------------- what a step runs


def step_convolutions(args):
    """(backend, the step's convolutions): one dict per cuDNN graph with its calls per step and the engine
    cupynet executes (CudnnConv.engine_choices), after a warm-up step that built and tuned them."""
    backend = create_backend(device_of(args.device), args.layout, args.dtype, args.tf32, autotune=True)
    model = ResNet(backend, args.depth, "v1")
    model.init(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    x = backend.from_host(rng.standard_normal(backend.activation_shape(args.batch, 3, 32, 32)), dtype=backend.dtype)
    labels = backend.from_host(rng.integers(0, 10, args.batch).astype(np.int32))
    model.forward_backward(x, labels)                  # builds and times every convolution's candidates
    before = Counter(backend.conv.graph_calls)
    model.forward_backward(x, labels)
    backend.synchronize()
    convolutions = backend.conv.engine_choices()
    for conv in convolutions:
        conv["calls"] = backend.conv.graph_calls[conv["key"]] - before[conv["key"]]
    return backend, [conv for conv in convolutions if conv["calls"]]


# --------------------------------------------------------------------------- planning every engine


class Survey:
    """Plans, builds and times every engine of one convolution graph with the backend's handle and stream.

    A graph comes from a `describe()` callable returning (unplanned graph, operands): operands are
    (tensor, array shape, NumPy dtype) for every tensor of the variant pack, in any order. Each survey
    describes its graph twice: once with every engine, once with NONDETERMINISTIC ones deselected.
    """

    def __init__(self, backend, args, deadline):
        import cudnn
        import cupy
        self.cudnn, self.cupy, self.backend, self.args = cudnn, cupy, backend, args
        self.deadline = deadline                # time.perf_counter() after which nothing new starts
        self.modes = [getattr(cudnn.heur_mode, name) for name in ("A", "B", "FALLBACK")
                      if hasattr(cudnn.heur_mode, name)]
        self.errors = (cudnn.cudnnGraphNotSupportedError, RuntimeError, ValueError)
        # what an engine that builds may still raise when it runs: out of memory, a CUDA error
        self.run_errors = self.errors + (cupy.cuda.memory.OutOfMemoryError, cupy.cuda.runtime.CUDARuntimeError)
        self.problem = None                     # why the last planning found no engine

    def out_of_time(self):
        return time.perf_counter() > self.deadline

    # ------------------------------------------------------------- the graphs

    def plain(self, conv, output_data_type=None, output_dtype=None):
        """describe() of the convolution as cupynet runs it (optionally writing another output dtype)."""
        def describe():
            graph, tensors, shapes = self.backend.conv.describe_graph(conv["op"], conv["dims"], conv["stride"],
                                                                      conv["pad"], output_data_type)
            dtypes = (self.backend.dtype, self.backend.dtype, output_dtype or self.backend.dtype)
            return graph, list(zip(tensors, shapes, dtypes))
        return describe

    def grouped(self, conv, group):
        """describe() of the convolution on groups of `group` pixels (the `pixel_pairs` and `pixel_octets`
        variants): the image side read as (N, H, W/group, group*C), group*K output channels, the same window,
        stride and padding."""
        n, c, h, w, k, r, s = conv["dims"]
        return self.plain(dict(conv, dims=(n, group * c, h, w // group, group * k, r, s)))

    def padded(self, conv):
        """describe() of the convolution with its input channels padded to PADDED_CHANNELS (the
        `padded_input` variant)."""
        n, c, h, w, k, r, s = conv["dims"]
        return self.plain(dict(conv, dims=(n, PADDED_CHANNELS, h, w, k, r, s)))

    def fused(self, conv, prologue, genstats):
        """describe() of the convolution with BatchNorm fused into it, the cuDNN Frontend's patterns: a
        per-channel scale, bias and relu applied to the image input as it is read (the previous BatchNorm's
        apply, never written out), and/or `genstats`, the per-channel sum and sum of squares of an fprop's
        output (the next BatchNorm's statistics) computed as it is written."""
        cudnn, layout = self.cudnn, self.args.layout
        io_type = cudnn.data_type.BFLOAT16 if self.args.dtype == "bfloat16" else cudnn.data_type.FLOAT
        n, c, h, w, k, r, s = conv["dims"]
        stride, pad = conv["stride"], conv["pad"]
        result = (n, k, conv_output_size(h, r, stride, pad), conv_output_size(w, s, stride, pad))

        def describe():
            graph = cudnn.pygraph(io_data_type=io_type, intermediate_data_type=cudnn.data_type.FLOAT,
                                  compute_data_type=cudnn.data_type.FLOAT, handle=self.backend.cudnn_handle)
            operands = []

            def tensor(name, dims, data_type=io_type, dtype=self.backend.dtype):
                t = graph.tensor(name=name, dim=list(dims), stride=packed_strides(layout, *dims), data_type=data_type)
                operands.append((t, array_shape(layout, *dims), dtype))
                return t

            def output(t, dims, data_type=io_type, dtype=self.backend.dtype):
                t.set_output(True).set_dim(list(dims)).set_stride(packed_strides(layout, *dims)).set_data_type(data_type)
                operands.append((t, array_shape(layout, *dims), dtype))

            image = x = tensor("x", (n, c, h, w))
            if prologue:
                per_channel = dict(data_type=cudnn.data_type.FLOAT, dtype=np.float32)
                scaled = graph.scale(name="scale", input=x, scale=tensor("scale", (1, c, 1, 1), **per_channel))
                shifted = graph.bias(name="bias", input=scaled, bias=tensor("bias", (1, c, 1, 1), **per_channel))
                image = graph.relu(name="relu", input=shifted)
            args = dict(pre_padding=[pad, pad], post_padding=[pad, pad], stride=[stride, stride], dilation=[1, 1],
                        compute_data_type=cudnn.data_type.FLOAT)
            if conv["op"] == "fprop":
                y = graph.conv_fprop(image=image, weight=tensor("w", (k, c, r, s)), **args)
                output(y, result)
                if genstats:
                    for t in graph.genstats(name="genstats", input=y):
                        output(t, (1, k, 1, 1), cudnn.data_type.FLOAT, np.float32)
            else:
                dw = graph.conv_wgrad(image=image, loss=tensor("dy", result), **args)
                output(dw, (k, c, r, s))
            return graph, operands
        return describe

    # ------------------------------------------------------------- planning, building, timing

    def planned(self, describe, deselect=()):
        """(graph, operands) with every heuristics mode's plans but those cupynet never runs (and those noted
        as `deselect` says), or None when cuDNN has no engine for it."""
        try:
            graph, operands = describe()
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans(self.modes)
            graph.deselect_numeric_notes([self.cudnn.numerical_note.REDUCED_PRECISION_REDUCTION, *deselect])
            graph.check_support()
        except (*self.errors, AttributeError, TypeError) as error:     # AttributeError: an op this Frontend lacks
            self.problem = one_line(error)
            return None
        return graph, operands

    def build_every_engine(self, graph):
        """[{index, name, runtime_compiled, workspace, build_s} or {index, skipped}]: one per distinct engine."""
        compiled_note = self.cudnn.behavior_note.RUNTIME_COMPILATION
        engines, names, spent = [], set(), 0.0
        for index in range(graph.get_execution_plan_count()):
            try:
                runtime_compiled = compiled_note in list(graph.get_behavior_notes_for_plan_at_index(index))
            except self.errors:
                runtime_compiled = None
            if runtime_compiled and spent > self.args.build_seconds:
                engines.append({"index": index, "skipped": "compiled at run time, past --build-seconds"})
                continue
            if self.out_of_time():
                engines.append({"index": index, "skipped": "past --max-seconds"})
                continue
            started = time.perf_counter()
            try:
                graph.build_plan_at_index(index)
                name = graph.get_plan_name_at_index(index)
            except self.errors as error:
                engines.append({"index": index, "skipped": one_line(error)})
                continue
            finally:
                spent += time.perf_counter() - started
            if name in names:                  # the same engine proposed by two heuristics modes
                continue
            names.add(name)
            workspace = int(graph.get_workspace_size_plan_at_index(index))
            if workspace > MAX_WORKSPACE_BYTES:  # what cupynet's autotuner would never pick either
                engines.append({"index": index, "skipped": f"needs {workspace / 2 ** 20:.0f} MB of workspace"})
                continue
            engines.append({"index": index, "name": name, "runtime_compiled": runtime_compiled,
                            "workspace": workspace, "build_s": round(time.perf_counter() - started, 3)})
        return engines

    def mark_deterministic(self, describe, engines):
        """engine["deterministic"]: whether it still builds with NONDETERMINISTIC engines deselected (True or
        False), or None where that planning skipped it too (run-time compiled, past --build-seconds)."""
        planned = self.planned(describe, deselect=[self.cudnn.numerical_note.NONDETERMINISTIC])
        kept = self.build_every_engine(planned[0]) if planned is not None else []
        names = {engine["name"] for engine in kept if "name" in engine}
        unknown = {engine["index"] for engine in kept if engine.get("skipped", "").startswith("compiled at run time")}
        for engine in engines:
            if "name" in engine:
                engine["deterministic"] = True if engine["name"] in names else \
                    (None if engine["index"] in unknown else False)

    def time_engines(self, graph, operands, engines):
        """Adds "us" (median microseconds per execution) to every built engine, on the same arrays."""
        cupy, backend = self.cupy, self.backend
        rng = np.random.default_rng(2)
        with backend.device, backend.stream:
            arrays = [backend.from_host(rng.standard_normal(shape), dtype=dtype) for _, shape, dtype in operands]
            pack = {tensor: array.data.ptr for (tensor, _, _), array in zip(operands, arrays)}
            workspace = cupy.empty((max([e.get("workspace", 0) for e in engines] + [1]),), dtype=cupy.uint8)
            for engine in engines:
                if "name" not in engine:
                    continue
                if self.out_of_time():
                    engine["skipped"] = "built, not timed: past --max-seconds"
                    continue
                try:
                    engine["us"] = self._time(graph, engine["index"], pack, workspace.data.ptr)
                except self.run_errors as error:
                    engine["skipped"] = f"built but did not run: {one_line(error)}"

    def _time(self, graph, index, pack, workspace):
        handle = self.backend.cudnn_handle
        return self._median_us(lambda: graph.execute_plan_at_index(pack, workspace, index, handle=handle))

    def _median_us(self, run):
        """Median microseconds per run() on the backend's stream (entered by the caller), as the engines are timed."""
        run()                                                       # untimed: first-run costs
        first_hold = max(0.001, HOST_SECONDS_PER_CALL * self.args.runs)
        windows = [gpu_milliseconds(self.cupy, self.backend.stream, self.backend.hold_stream,
                                    lambda: [run() for _ in range(self.args.runs)], first_hold)
                   for _ in range(self.args.repeats)]
        return round(1000.0 * statistics.median(windows) / self.args.runs, 2)

    def own_kernel(self, conv):
        """The `own_kernel` variant: cupynet's own kernel for this forward or data gradient, timed on random arrays
        of its shapes, as an engine entry (deterministic: each output is one warp's sum in a fixed order)."""
        backend = self.backend
        source_shape, weight_shape, target_shape = own_kernel_shapes(conv)
        data_gradient = conv["op"] == "dgrad"
        rng = np.random.default_rng(3)
        with backend.device, backend.stream:
            source = backend.from_host(rng.standard_normal(source_shape), dtype=backend.dtype)
            weight = backend.from_host(rng.standard_normal(weight_shape) * 0.1, dtype=backend.dtype)
            target = backend.from_host(np.zeros(target_shape), dtype=backend.dtype)
            saved, backend.own_conv_channels = backend.own_conv_channels, max(conv3x3.CHANNEL_CHOICES)
            try:
                def run():
                    return backend._own_conv(source, weight, conv["stride"], conv["pad"], target, data_gradient)
                if not run():
                    self.problem = "cupynet's kernel does not take this convolution"
                    return None
                us = self._median_us(run)
            except self.run_errors as error:
                self.problem = one_line(error)
                return None
            finally:
                backend.own_conv_channels = saved
        return [{"name": "cupynet conv3x3_mma", "index": None, "us": us, "deterministic": True,
                 "runtime_compiled": False}]

    def split_k(self, conv):
        """The weight gradient's split-K settings: every value (powers of two from 2 to 64) of the engines
        that expose SPLIT_K_SLC, in conv_autotune.split_k_engines' order (the engines of every heuristics
        mode's plans first), up to --split-k-settings settings, each alone in a graph of its own with only
        reduced-precision sums deselected, marked deterministic or not by checking it again with
        NONDETERMINISTIC engines deselected too (its engine's notes: the repeat check cupynet adds is not run
        here), and timed; a list of engine dicts (with "setting": [engine id, slices]), or None when none
        exists. cupynet's autotuner times fewer: 8, from the first two engines the notes allow."""
        self.problem = None
        describe = self.plain(conv)
        planned = self.planned(describe)          # the heuristics' plans name the engines to try first
        if planned is None:
            return None
        graph, _ = planned
        try:
            preferred = engine_ids(graph.get_plan_name_at_index(i) for i in range(graph.get_execution_plan_count()))
            settings = [(engine, slices) for engine, values in split_k_engines(
                graph, self.cudnn.knob_type.SPLIT_K_SLC, preferred, self.errors) for slices in values]
            settings = settings[:self.args.split_k_settings]
        except (*self.errors, AttributeError, TypeError) as error:     # AttributeError: a Frontend without knobs
            self.problem = one_line(error)
            return None
        if not settings:
            self.problem = "no engine exposes SPLIT_K_SLC for it"
            return None
        engines = []
        reduced = [self.cudnn.numerical_note.REDUCED_PRECISION_REDUCTION]
        for engine, slices in settings:
            if self.out_of_time():
                engines.append({"setting": [engine, slices], "skipped": "past --max-seconds"})
                continue
            started = time.perf_counter()
            try:               # built as cupynet builds it: alone in a fresh graph (conv_autotune.py)
                candidate = build_split_k_setting(describe, engine, slices, self.cudnn, reduced)
            except (*self.errors, SettingRefused) as error:
                engines.append({"setting": [engine, slices], "skipped": one_line(error)})
                continue
            entry = {"index": 0, "setting": [engine, slices], "name": candidate.name, "runtime_compiled": False,
                     "workspace": candidate.workspace, "build_s": round(time.perf_counter() - started, 3)}
            try:               # the same with NONDETERMINISTIC engines deselected too: do the notes allow it?
                build_split_k_setting(describe, engine, slices, self.cudnn,
                                      reduced + [self.cudnn.numerical_note.NONDETERMINISTIC])
                entry["deterministic"] = True
            except (*self.errors, SettingRefused):
                entry["deterministic"] = False
            self.time_engines(candidate.graph, candidate.tensors, [entry])     # tensors: describe()'s operands
            engines.append(entry)
        return engines

    def survey(self, describe):
        """Every engine of the described graph, timed: a list of engine dicts, or None when none is supported."""
        self.problem = None
        planned = self.planned(describe)
        if planned is None:
            return None
        graph, operands = planned
        engines = self.build_every_engine(graph)
        if self.out_of_time():            # no second round of builds: determinism stays unknown
            for engine in engines:
                engine.setdefault("deterministic", None)
        else:
            self.mark_deterministic(describe, engines)
        self.time_engines(graph, operands, engines)
        return engines


# --------------------------------------------------------------------------- report


def fastest(engines, deterministic_only=False):
    timed = [e for e in engines or [] if "us" in e and (e["deterministic"] is True or not deterministic_only)]
    return min(timed, key=lambda e: e["us"]) if timed else None


def label(engine):
    if engine is None:
        return "-"
    notes = [note for note, on in (("nondeterministic", engine["deterministic"] is False),
                                   ("determinism unknown", engine["deterministic"] is None),
                                   ("run-time compiled", engine["runtime_compiled"])) if on]
    return f"{engine['us']:.1f} [{engine['name']}{'; ' + ', '.join(notes) if notes else ''}]"


def pixel_groups_apply(conv, args, group):
    """Whether the `pixel_pairs` (group 2) or `pixel_octets` (group 8) variant is timed for this convolution
    (see the module docstring): NHWC, 3x3, stride 1, padding 1, a width the group divides; pairs where neither
    side has more than PAIR_MAX_CHANNELS channels, octets where the input has fewer than PADDED_CHANNELS."""
    _, c, _, w, k, r, s = conv["dims"]
    fits = (args.layout == "NHWC" and (r, s) == (3, 3) and conv["stride"] == 1 and conv["pad"] == 1
            and w % group == 0)
    return fits and (max(c, k) <= PAIR_MAX_CHANNELS if group == 2 else c < PADDED_CHANNELS)


def own_kernel_shapes(conv):
    """(what the kernel reads, the KRSC weight, what it writes) of this forward (x, y) or data gradient (dy, dx), NHWC."""
    n, c, h, w, k, r, s = conv["dims"]
    ho, wo = (conv_output_size(size, r, conv["stride"], conv["pad"]) for size in (h, w))
    x_shape, y_shape = (n, h, w, c), (n, ho, wo, k)
    return (y_shape, (k, r, s, c), x_shape) if conv["op"] == "dgrad" else (x_shape, (k, r, s, c), y_shape)


def own_kernel_takes(conv, args, tf32):
    """Whether cupynet's own kernel computes this forward or data gradient (the `own_kernel` variant)."""
    source, weight, _ = own_kernel_shapes(conv)
    return conv3x3.kernel_shape(args.layout, args.dtype, tf32, source, weight, conv["stride"], conv["pad"],
                                conv["op"] == "dgrad", max(conv3x3.CHANNEL_CHOICES)) is not None


# What else to time per operation: name -> a callable surveying it. bf16 weight gradients writing float32
# would spare cupynet's conversion kernel; the fused patterns would spare BatchNorm passes; split-K settings
# are what --conv-split-k adds to the autotuner's candidates; pixel groups and the padded input, the slow
# engines for few channels.
def variants(survey, conv, args):
    def of(describe):
        return lambda: survey.survey(describe)
    found = {}
    if conv["op"] == "wgrad":
        found["scale_bias_relu"] = of(survey.fused(conv, prologue=True, genstats=False))
        if args.dtype == "bfloat16":
            found["float32_output"] = of(survey.plain(conv, survey.cudnn.data_type.FLOAT, np.float32))
        if args.split_k_settings:
            found["split_k"] = lambda: survey.split_k(conv)
    if conv["op"] == "fprop":
        found["genstats"] = of(survey.fused(conv, prologue=False, genstats=True))
        found["scale_bias_relu_genstats"] = of(survey.fused(conv, prologue=True, genstats=True))
    if conv["op"] != "wgrad" and own_kernel_takes(conv, args, survey.backend.tf32):
        found["own_kernel"] = lambda: survey.own_kernel(conv)
    for name, group in PIXEL_GROUPS.items():
        if pixel_groups_apply(conv, args, group):
            found[name] = of(survey.grouped(conv, group))
    if conv["op"] != "dgrad" and conv["dims"][1] < PADDED_CHANNELS:
        found["padded_input"] = of(survey.padded(conv))
    return found


def survey_convolution(survey, conv, args, totals):
    """One convolution's row: every engine, cupynet's, the fastest, and the variants' fastest. A total gets
    this convolution only when every figure it compares exists, so its columns cover the same convolutions."""
    label_ = describe(conv["op"], conv["dims"], conv["stride"], conv["pad"])
    engines = survey.survey(survey.plain(conv))
    ours = next((e for e in engines or [] if e.get("name") == conv["plan_name"] and "us" in e), None)
    best, best_deterministic = fastest(engines), fastest(engines, deterministic_only=True)
    if None not in (ours, best, best_deterministic):
        total = totals[conv["op"]]
        total["convolutions"] += 1
        for name, engine in (("cupynet", ours), ("deterministic", best_deterministic), ("any", best)):
            total[name] += conv["calls"] * engine["us"]
    else:
        totals[conv["op"]]["left_out"] += 1
    row = {"op": conv["op"], "conv": label_, "calls": conv["calls"], "cupynet_engine": conv["plan_name"],
           "cupynet_us": ours and ours["us"], "engines": engines, "variants": {},
           "problem": survey.problem if engines is None else None}
    print(f"{label_:<44} x{conv['calls']:<3} cupynet {label(ours)}\n"
          f"{'':<49} best deterministic {label(best_deterministic)}\n"
          f"{'':<49} best {label(best)}" + (f"\n{'':<49} ({survey.problem})" if engines is None else ""),
          flush=True)
    for name, survey_variant in variants(survey, conv, args).items():
        if survey.out_of_time():
            row["variants"][name] = "past --max-seconds"
            continue
        found = survey_variant()
        row["variants"][name] = found
        quickest = fastest(found, deterministic_only=True)
        print(f"{'':<49} {name}: {label(quickest) if found else 'not supported (' + str(survey.problem) + ')'}",
              flush=True)
        if quickest is not None and ours is not None:
            total = totals[f"{conv['op']} {name}"]
            total["convolutions"] += 1
            total["deterministic"] += conv["calls"] * quickest["us"]
            total["cupynet"] += conv["calls"] * ours["us"]
    return row


def write_report(path, env, args, totals, rows, not_surveyed, reduced_precision_graphs):
    """The JSON report, replaced whole (written beside, then renamed): after every convolution."""
    report = {"benchmark": "conv_engines", "environment": env, "args": vars(args),
              "per_step_us": {op: dict(t) for op, t in totals.items()}, "convolutions": rows,
              "not_surveyed": not_surveyed, "reduced_precision_graphs": reduced_precision_graphs}
    replace_json(path, report, default=str)


def main(argv=None):
    args = parse_args(argv)
    deadline = time.perf_counter() + args.max_seconds
    check_device(args.device)
    env = environment(args.device)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"conv_engines-{platform.node() or 'host'}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    backend, convolutions = step_convolutions(args)
    survey = Survey(backend, args, deadline)
    print(f"{env.get('gpu')} | cuDNN {env.get('cudnn_backend')} | ResNet-{args.depth}, batch {args.batch}, "
          f"{args.layout} {args.dtype} | median of {args.repeats} x {args.runs} executions per engine", flush=True)
    rows, not_surveyed = [], []
    totals = defaultdict(Counter)
    longest = 0.0                         # the longest survey of one convolution so far
    for conv in sorted(convolutions, key=lambda c: (OPS.index(c["op"]), c["dims"])):
        # a survey that could not finish before the deadline is not started (it would only be cut short)
        if survey.out_of_time() or time.perf_counter() + 1.5 * longest > deadline:
            not_surveyed.append(describe(conv["op"], conv["dims"], conv["stride"], conv["pad"]))
            continue
        started = time.perf_counter()
        rows.append(survey_convolution(survey, conv, args, totals))
        longest = max(longest, time.perf_counter() - started)
        write_report(path, env, args, totals, rows, not_surveyed, backend.conv.reduced_precision_graphs)
    if not_surveyed:
        print(f"not surveyed (past --max-seconds {args.max_seconds:g}): {'; '.join(not_surveyed)}")
    print("per step (calls x microseconds), over the convolutions with every figure: cupynet's engines / "
          "fastest deterministic / fastest of all")
    for op, t in totals.items():
        counted = f"{t['convolutions']} convolution(s)" + (f", {t['left_out']} left out" if t["left_out"] else "")
        if op in OPS:
            print(f"  {op}: {t['cupynet']:.0f} / {t['deterministic']:.0f} / {t['any']:.0f} us ({counted})")
        else:           # a variant: its fastest deterministic engine against cupynet's, where it was timed
            print(f"  {op}: {t['deterministic']:.0f} us fastest deterministic, cupynet's plain {t['cupynet']:.0f} us "
                  f"({counted})")
    if backend.conv.reduced_precision_graphs:
        print(f"cupynet runs engines with reduced-precision sums for (nothing else supports them): "
              f"{'; '.join(backend.conv.reduced_precision_graphs)}")
    write_report(path, env, args, totals, rows, not_surveyed, backend.conv.reduced_precision_graphs)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_script(main)
