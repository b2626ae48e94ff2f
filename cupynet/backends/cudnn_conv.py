"""cuDNN convolutions for the GPU backend: fprop, dgrad and wgrad graphs, built once per shape and cached.

CuPy 14 has no cuDNN support, so the GPU backend reaches cuDNN through the cuDNN Frontend's Python
graph API (`import cudnn`, wheel `nvidia-cudnn-frontend>=1.22,<1.27`). One `CudnnConv` serves one worker
thread: one cuDNN handle (already bound to that worker's stream by the caller), one layout, one dtype.

    conv = CudnnConv(handle, layout="NHWC", io_dtype="bfloat16")
    conv.forward(x, w, stride, pad, y)            # y = conv(x, w)
    conv.forward_with_stats(x, w, stride, pad, y, sums)   # and sums (2, K) float32 = [sum(y), sum(y^2)],
                                                  # or False where cuDNN has no engine for that (y written plain)
    conv.backward_data(dy, w, stride, pad, dx)    # dx = d(loss)/dx
    conv.backward_filter(x, dy, stride, pad, dw)  # dw = d(loss)/dw (written, not accumulated)
    conv.executions["fprop"]                      # how many times cuDNN really ran (tests check it)

The GPU tests are tests/test_cudnn_conv_gpu.py (`python -m pytest -m gpu`, on a machine with a GPU).

Layout lives only in the strides
    Every cuDNN tensor is described with *logical* NCHW dims (weights KCRS); the memory layout is the
    stride vector, in elements, of the dense CuPy array we are handed:
        activation NCHW  dims [N, C, H, W]  strides [C*H*W, H*W, W, 1]
        activation NHWC  dims [N, C, H, W]  strides [H*W*C, 1, W*C, C]
        weight KCRS      dims [K, C, R, S]  strides [C*R*S, R*S, S, 1]      (NCHW backend)
        weight KRSC      dims [K, C, R, S]  strides [R*S*C, 1, S*C, C]      (NHWC backend)
    Strides are set explicitly on every tensor, outputs included: an output's stride left unset
    defaults to NHWC-packed, which would silently scramble an NCHW result. dgrad and wgrad outputs also
    need `set_dim`, because their shape cannot be inferred (a stride-2 dgrad loses H's parity).

The cache key
    (op, N, C, H, W, K, R, S, stride, pad, layout, io_dtype, strict_fp32, deterministic, split_k,
    tune_in_graph), op being "fprop", "dgrad", "wgrad" or "fprop_stats" (an fprop with genstats,
    forward_with_stats), split_k being True for every weight gradient of an engine made with split_k (False
    for fprop and dgrad, which have no split-K settings, so their choices are shared either way), tune_in_graph
    True where the autotuner times its candidates inside a CUDA graph (so choices timed one way are not taken
    for the other), with N, C, H, W taken from the op's image-side tensor (x, or dx for dgrad). A built graph is reusable with new pointers for the same
    shapes, strides and dtypes, so each key is built exactly once (`builds` counts it) and every later call
    is a dict lookup, three shape checks and one `execute`.

Precision
    compute and intermediate type are always FLOAT (fp32 accumulation).
    * float32, strict_fp32=False ("TF32"): cuDNN may pick tensor-core engines that round the inputs to TF32
      (10 mantissa bits). On an H100 it does so for NHWC (rel. error ~3e-4) but not for NCHW (~5e-7).
    * float32, strict_fp32=True: the engines whose numerical notes say TENSOR_CORE or DOWN_CONVERT_INPUTS
      are deselected, so only true fp32 engines remain (rel. error ~1e-6; used by the parity tests).
    * deterministic=True (the default): engines noted NONDETERMINISTIC (their sums are added in a varying
      order, through atomics) are deselected, so results are reproducible bit for bit; False lets the
      autotuner pick them too, as PyTorch's default does.
    * bfloat16: bf16 tensors in memory, fp32 accumulation, bf16 output (rel. error ~3e-3). The cuDNN data
      type comes from the constructor's io_dtype, never from the array dtype, so a CuPy bfloat16 array
      and uint16 storage of bf16 bits are both accepted (only the item size, 2 bytes, is checked).

Autotuning (autotune=True, the GPU backend's default, `--no-conv-autotune` turns it off)
    Every candidate engine is built and, on the convolution's first execution, timed with the real arrays;
    the fastest is executed from then on (conv_autotune.py, which also says why choices are shared by
    every engine of the process). With split_k=True (`--conv-split-k`), a weight gradient's candidates
    also include split-K settings of its engines, each built in a graph of its own (conv_autotune.py says
    why); the chosen candidate's graph and tensors are then the ones executed. With tune_in_graph=True
    (`--conv-tune-in-graph`) each candidate is timed replayed from a CUDA graph, as the captured step runs it
    (conv_autotune.py says why). Inside untimed_new_graphs() (the backend's evaluating()), a graph first built
    there is not timed: it runs a choice already made for its key (this process's, or an adopted checkpoint's)
    or else the heuristics' first plan, which every process picks alike. So an evaluation gives the same bits in
    the training run and in `python -m cupynet.evaluate` of its checkpoint (a timed choice can differ from one
    process to the next), and a one-off evaluation pays no timing of its own shapes' candidates.

Why integer pointers
    `execute` is given `{tensor: arr.data.ptr}` and the workspace address as plain Python ints. Passing
    CuPy arrays would make the Frontend fall back to `__dlpack__`, which (in CuPy) may synchronize
    streams on every call. Ints cost nothing, and the addresses are what a CUDA-graph capture bakes in.

Why building must not happen inside a step
    `build_plans` holds the GIL, can take tens to hundreds of milliseconds and may JIT-compile kernels;
    a newly built graph can also grow the workspace (a new allocation). Neither may happen inside a timed
    or CUDA-graph-captured step. Building happens lazily on the first call with a new shape, i.e. in the
    trainer's warm-up step; after that, `freeze()` turns any unexpected new shape into an error instead
    of a silent mid-step build. The workspace is reallocated only right after a build, never on a
    cached call, so its address is stable once warm-up is over.

cuDNN Frontend API facts this file relies on (read in the nvidia-cudnn-frontend 1.22.1 wheel and its
source; identical in 1.26.0, whose wheel was compared):
    * `cudnn.pygraph` is the pybind class itself (cudnn/__init__.py, `symbols_to_import`); its Python
      `tensor(name=, dim=, stride=, data_type=)` and `execute(var_pack, workspace, handle=None)` are
      wrappers added in cudnn/__init__.py (`_tensor`, `_execute`). `_execute` maps each key through
      `get_uid()` and passes an `int` pointer through untouched (`_library_device_pointer`: `type(x) is int`).
    * `conv_fprop(image=, weight=, pre_padding=, post_padding=, stride=, dilation=, compute_data_type=,
      name=)`, `conv_dgrad(loss=, filter=, ...)`, `conv_wgrad(image=, loss=, ...)`
      (python/pygraph/pygraph.cpp, `init_pygraph_submodule`; the keyword strings are in the 1.22.1 .so).
    * `deselect_numeric_notes(list)` is positional-only (bound without py::arg names). It marks the
      candidate engine configs created by `create_execution_plans` whose notes match; `check_support`
      then skips them (include/cudnn_frontend/plans.h, `Execution_plan_list`), hence the call order
      create_execution_plans -> deselect_numeric_notes -> check_support -> build_plans.
    * enum spellings: `cudnn.numerical_note.TENSOR_CORE`, `.DOWN_CONVERT_INPUTS`, `.NONDETERMINISTIC`,
      `.REDUCED_PRECISION_REDUCTION` (also in the 1.22.1 .so's strings);
      `cudnn.heur_mode.A`, `.FALLBACK`; `cudnn.data_type.FLOAT`, `.BFLOAT16` (python/properties.cpp; strings in the .so).
    * an unsupported graph raises `cudnn.cudnnGraphNotSupportedError` (check_support: "No execution plans
      built successfully"); other build failures raise ValueError or RuntimeError (python/pycudnn.cpp,
      `throw_if`). All three become a one-line DeviceError naming the convolution.
    * version range: 1.22-1.26 as above. Newer Frontends (the repository's main branch) replace
      `pygraph` by a pure-Python class (python/cudnn/_pygraph.py) and 1.27+ pull in extra dependencies,
      hence the `<1.27` pin in pyproject.toml.
"""
import contextlib
from collections import Counter

from cupynet.backends.conv_autotune import (REPEAT_CHECK_RUNS, NoCandidateRan, build_candidates,
                                            build_split_k_candidates, choose_plan, engine_ids, known_choice,
                                            split_k_engines, split_k_setting_or_none)
from cupynet.background import Background
from cupynet.errors import DeviceError

LAYOUTS = ("NCHW", "NHWC")
OPS = ("fprop", "dgrad", "wgrad")
FPROP_STATS = "fprop_stats"     # fprop with cuDNN's genstats behind it (forward_with_stats, --conv-genstats)
STATS_ITEMSIZE = 4              # genstats' sums are float32 in every precision
REPEAT_RTOL = 1e-3              # how far a genstats sum may move between runs of an engine that may reorder it
GENSTATS_RTOL = 1e-2            # genstats' sums against the output's own, relative to sum |y| and sum y^2

# io_dtype -> (name of the cudnn.data_type member, bytes per element in memory)
IO_DTYPES = {"float32": ("FLOAT", 4), "bfloat16": ("BFLOAT16", 2)}

ALIGNMENT_BYTES = 16            # what the Frontend's tensor attributes promise cuDNN (their default alignment)
FRONTEND_HINT = "pip install 'nvidia-cudnn-frontend>=1.22,<1.27'"


# --------------------------------------------------------------------------- shape and stride helpers


def packed_strides(layout, n, c, h, w):
    """Element strides of a dense tensor with logical dims (n, c, h, w) stored in `layout`.

    Weights use the same rule: KCRS is "NCHW" with (N, H, W) = (K, R, S), KRSC is "NHWC".
    """
    if layout == "NCHW":
        return [c * h * w, h * w, w, 1]
    return [h * w * c, 1, w * c, c]


def array_shape(layout, n, c, h, w):
    """The CuPy shape of a tensor with logical dims (n, c, h, w) in `layout`."""
    if layout == "NCHW":
        return (n, c, h, w)
    return (n, h, w, c)


def logical_dims(layout, shape):
    """(n, c, h, w) of an array of `shape` in `layout` (for weights: (k, c, r, s))."""
    if layout == "NCHW":
        return tuple(shape)
    n, h, w, c = shape
    return n, c, h, w


def conv_output_size(size, ksize, stride, pad):
    """Output extent of a cross-correlation with symmetric padding (matches the NumPy backend)."""
    return (size + 2 * pad - ksize) // stride + 1


def describe(op, key_dims, stride, pad):
    """'fprop N=128 C=16 H=32 W=32 K=32 3x3 stride 2 pad 1' for error messages."""
    n, c, h, w, k, r, s = key_dims
    return f"{op} N={n} C={c} H={h} W={w} K={k} {r}x{s} stride {stride} pad {pad}"


def import_frontend():
    """The cuDNN Frontend module, or a one-line DeviceError saying how to get it."""
    try:
        import cudnn
    except Exception as error:       # ImportError, or OSError when libcudnn/libcudart cannot be loaded
        raise DeviceError(f"the cuDNN Frontend is not importable ({type(error).__name__}: {error}); "
                          f"{FRONTEND_HINT}") from error
    return cudnn


def import_frontend_in_background():
    """import_frontend() in a thread of its own (cupynet/background.py), begun before the backend makes its CUDA
    context; `.result()` gives the module or raises the import's DeviceError, `.seconds` how long it took.

    Why: a run's setup counts against its wall time, and on an H100 the GPU backend's setup took 4.3 s, the
    context and cuDNN one after the other. Importing the Frontend (its Python module and the cuDNN library it
    loads) needs no context, so it can run while the driver makes one."""
    return Background(import_frontend, name="cudnn-import")


# --------------------------------------------------------------------------- one built graph


class _BuiltGraph:
    """A built cuDNN graph and what executing it needs.

    tensors: the graph's tensors in the order of the public method's array arguments,
             e.g. (X, W, Y) for forward(x, w, stride, pad, y), (X, W, Y, SUM, SQSUM) for forward_with_stats;
    shapes:  the CuPy shapes those arrays must have; itemsizes: their bytes per element.

    candidates: with autotuning, the built conv_autotune.Candidate list; `chosen`, once timed, is the one
             executed (its own graph and tensors for a split-K setting). None: the heuristics' first plan
             of `graph`, `execute`.
    """

    __slots__ = ("graph", "tensors", "shapes", "itemsizes", "workspace_bytes", "candidates", "chosen", "key")

    def __init__(self, graph, tensors, shapes, itemsizes, workspace_bytes, candidates=None):
        self.graph = graph
        self.tensors = tensors
        self.shapes = shapes
        self.itemsizes = itemsizes
        self.workspace_bytes = workspace_bytes
        self.candidates = candidates
        self.chosen = None
        self.key = None             # the cache key, set by CudnnConv (autotuning choices are kept per key)


# --------------------------------------------------------------------------- the engine


class _Lane:
    """A cuDNN handle, the stream it runs on, and the workspace of the graphs executed on that stream.

    The graphs of one lane run one after another on its stream, so they share one workspace; lanes that
    run beside each other (the main stream, and the side streams that weight gradients may run on)
    each need their own. stream None: the caller bound the handle to the lane's stream for good (the
    main lane, whose stream is current whenever it runs or grows); otherwise the handle is bound to the
    stream before each execution (the weight-gradient lanes share one handle, bound per call as PyTorch
    binds its handle to the current stream before every call).
    """

    def __init__(self, handle, cupy, stream=None):
        self.handle = handle
        self.stream = stream
        self._cupy = cupy
        self.buffer = None
        self.ptr = 0                # a null workspace is valid while every graph needs 0 bytes
        self.bytes = 0
        self._superseded = []       # earlier workspaces: a recorded CUDA graph may still point at one

    def grow(self, nbytes):
        """Reallocate the workspace when a newly built (or newly tuned) graph needs more than it has.

        Called during warm-up, possibly while another lane's stream is current, and when evaluation first
        runs a shape (after the training step may have been recorded). The buffer is allocated with the
        lane's own stream current. The old one is kept, never freed: a recorded training step baked its
        address in, and its replays must not write into memory the pool gave to something else.
        """
        if nbytes <= self.bytes:
            return
        if self.buffer is not None:
            self._superseded.append(self.buffer)
        with self.stream if self.stream is not None else contextlib.nullcontext():
            self.buffer = self._cupy.empty((nbytes,), dtype=self._cupy.uint8)
        self.ptr = self.buffer.data.ptr
        self.bytes = nbytes


class CudnnConv:
    """fprop / dgrad / wgrad through cached cuDNN Frontend graphs, for one handle, layout and dtype.

    handle:      int from `cudnn.create_handle()`, bound by the caller to the stream the backend uses
                 (`cudnn.set_stream(handle=h, stream=stream.ptr)`); cuDNN enqueues on that stream.
    layout:      "NCHW" (weights KCRS) or "NHWC" (weights KRSC).
    io_dtype:    "float32" or "bfloat16": the dtype of every array passed in.
    strict_fp32: float32 only; keep TF32 tensor-core engines out (see the module docstring).
    autotune:    time every candidate engine on first use and keep the fastest (conv_autotune.py);
                 otherwise the heuristics' first choice.
    deterministic: only engines that give the same bits on every run (see the module docstring).
    split_k:     with autotune, also time split-K settings of each weight gradient's engines (conv_autotune.py).
    tune_in_graph: with autotune, time each candidate replayed from a recorded CUDA graph (conv_autotune.py).
    hold:        optional hold(seconds), which keeps the current stream busy (CupyBackend.hold_stream): the
                 autotuner enqueues its timed runs behind it, so it times the engines, not the host.

    wgrad_handle: optional second handle, bound to a side stream: weight-gradient graphs are then built
                 for it and run with it and their own workspace, so the caller can overlap them with the
                 main stream's work (the GPU backend does; see cupy_backend.conv2d_backward_filter).
    wgrad_streams: with wgrad_handle, optional cupy streams, one weight-gradient lane each (its own
                 workspace, allocated on that stream; the handle is bound to the lane's stream before each
                 execution), so that several weight gradients can also run beside each other:
                 backward_filter(..., lane=i).

    Not thread-safe: one engine per worker thread, like the handle it uses.
    """

    def __init__(self, handle, layout, io_dtype, strict_fp32=False, autotune=False, wgrad_handle=None,
                 wgrad_streams=(), deterministic=True, split_k=False, hold=None, tune_in_graph=False):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if io_dtype not in IO_DTYPES:
            raise ValueError(f"io_dtype must be one of {tuple(IO_DTYPES)}, got {io_dtype!r}")
        if strict_fp32 and io_dtype != "float32":
            raise ValueError("strict_fp32 applies to float32 only (bfloat16 convolutions use tensor cores)")
        self._cudnn = import_frontend()
        import cupy                     # imported here so that the module itself imports without a GPU stack
        self._cupy = cupy

        self._main = _Lane(handle, cupy)
        if wgrad_handle is None:
            self._wgrad_lanes = [self._main]
        else:
            self._wgrad_lanes = [_Lane(wgrad_handle, cupy, stream) for stream in wgrad_streams] or [_Lane(wgrad_handle, cupy)]
        self._hold = hold
        self.layout = layout
        self.io_dtype = io_dtype
        self.strict_fp32 = bool(strict_fp32)
        self.autotune = bool(autotune)
        self.deterministic = bool(deterministic)
        self.split_k = bool(split_k)
        self.tune_in_graph = bool(tune_in_graph)
        type_name, self.itemsize = IO_DTYPES[io_dtype]
        self._data_type = getattr(self._cudnn.data_type, type_name)
        self._float = self._cudnn.data_type.FLOAT

        self.executions = Counter()     # op -> number of cuDNN executes
        self.builds = Counter()         # op -> number of graphs built (one per cache key)
        self.graph_calls = Counter()    # cache key -> calls (what a step runs how often: bench/conv_engines.py)
        self.reduced_precision_graphs = []   # convolutions only engines with reduced-precision sums support
        # split-K settings (split_k): "tried" (built or not), "built", "not repeatable" (dropped before timing,
        # deterministic engines only) and "problem: ..." (why a weight gradient got none: a Frontend without
        # knobs): what bench/layouts.py reports, so a GPU run shows whether the option did anything
        self.split_k_counts = Counter()
        # fprop graphs with genstats (forward_with_stats, --conv-genstats): "fused" (built and run), "unsupported"
        # (cuDNN had no engine for it under this engine's rules, or none passed the autotuner's checks: the
        # convolution ran plain, BatchNorm made its own statistics), and the candidates those checks dropped
        # ("wrong sums", "not repeatable"); what bench/layouts.py reports, so a GPU run shows what the option did
        self.genstats_counts = Counter()
        self.genstats_problems = []     # why each "unsupported" one was (cuDNN's words, one line each)
        self._graphs = {}               # cache key -> _BuiltGraph
        self._frozen = False
        self._time_new_graphs = True    # False inside untimed_new_graphs()

    # ------------------------------------------------------------------ public contract

    def forward(self, x, w, stride, pad, y):
        """y = conv(x, w). x: activation (N, C, H, W) per layout; w: KCRS | KRSC; y: (N, K, Ho, Wo) per layout."""
        n, c, h, wd = logical_dims(self.layout, x.shape)
        k, _, r, s = logical_dims(self.layout, w.shape)
        entry = self._graph_for("fprop", (n, c, h, wd, k, r, s), stride, pad)
        self._execute("fprop", entry, (x, w, y))
        return y

    def forward_with_stats(self, x, w, stride, pad, y, sums):
        """y = conv(x, w) and sums (2, K) float32 <- [sum(y), sum(y^2)] per channel over N, H, W, in one graph:
        the convolution with cuDNN's genstats behind it (the statistics of the BatchNorm that follows, without
        a pass of its own over y). Returns True; False where cuDNN has no engine for that graph under this
        engine's rules (deterministic, never reduced-precision sums; the autotuner's repeat checks): y is then
        written by the plain fprop graph, and sums holds nothing to read. Which of the two a shape gets is
        settled by its first call."""
        if not self.autotune:
            raise ValueError("forward_with_stats needs autotune: the autotuner checks each genstats engine's sums "
                             "before it is used")
        n, c, h, wd = logical_dims(self.layout, x.shape)
        k, _, r, s = logical_dims(self.layout, w.shape)
        if sums.shape != (2, k) or sums.dtype.itemsize != STATS_ITEMSIZE or not sums.flags.c_contiguous:
            raise ValueError(f"conv {FPROP_STATS}: sums must be a C-contiguous (2, {k}) float32 array, got "
                             f"{sums.shape} {sums.dtype}")
        entry = self._graph_for(FPROP_STATS, (n, c, h, wd, k, r, s), stride, pad)
        if entry is None:
            self.forward(x, w, stride, pad, y)
            return False
        per_channel = array_shape(self.layout, 1, k, 1, 1)
        try:
            self._execute(FPROP_STATS, entry, (x, w, y, sums[0].reshape(per_channel), sums[1].reshape(per_channel)))
        except NoCandidateRan as error:         # first use: no candidate repeated its sums (or none ran)
            self._graphs[entry.key] = None
            self.genstats_counts["fused"] -= 1
            if not self.genstats_counts["fused"]:
                del self.genstats_counts["fused"]
            self._unsupported(entry.key[1:8], stride, pad, error)
            self.forward(x, w, stride, pad, y)
            return False
        return True

    def backward_data(self, dy, w, stride, pad, dx):
        """dx = d(loss)/dx from dy = d(loss)/dy. dx's shape fixes H and W (a stride-2 dy cannot)."""
        n, c, h, wd = logical_dims(self.layout, dx.shape)
        k, _, r, s = logical_dims(self.layout, w.shape)
        entry = self._graph_for("dgrad", (n, c, h, wd, k, r, s), stride, pad)
        self._execute("dgrad", entry, (dy, w, dx))
        return dx

    def backward_filter(self, x, dy, stride, pad, dw, lane=0):
        """dw = d(loss)/dw, written (not accumulated) into dw (KCRS | KRSC), on weight-gradient lane `lane`."""
        n, c, h, wd = logical_dims(self.layout, x.shape)
        k, _, r, s = logical_dims(self.layout, dw.shape)
        entry = self._graph_for("wgrad", (n, c, h, wd, k, r, s), stride, pad)
        self._execute("wgrad", entry, (x, dy, dw), lane)
        return dw

    def freeze(self):
        """From now on a shape without a built graph is an error, not a build inside a step."""
        self._frozen = True

    @contextlib.contextmanager
    def untimed_new_graphs(self):
        """Graphs first built inside it run a choice already made for their key, or else the heuristics' first
        plan, untimed (the module's "Autotuning" says why); graphs built before keep theirs."""
        before, self._time_new_graphs = self._time_new_graphs, False
        try:
            yield
        finally:
            self._time_new_graphs = before

    @property
    def graphs_built(self):
        return sum(self.builds.values())

    @property
    def workspace_ptr(self):
        """The main lane's workspace address (stable once warm-up is over)."""
        return self._main.ptr

    @property
    def workspace_bytes(self):
        return self._main.bytes

    def engine_choices(self):
        """Every graph built so far: its cache key, calls and the engine it executes (the autotuner's choice, a
        plan index or a split-K setting, and cuDNN's name for it; None for the heuristics' first plan, without
        autotuning)."""
        choices = []
        for key, entry in self._graphs.items():
            if entry is None:           # a fused graph cuDNN could not run (genstats_problems): never built
                continue
            chosen = entry.chosen
            choices.append({"key": key, "op": key[0], "dims": key[1:8], "stride": key[8], "pad": key[9],
                            "calls": self.graph_calls[key], "plan_index": chosen and chosen.choice,
                            "plan_name": chosen and chosen.name})
        return choices

    @property
    def wgrad_lanes(self):
        return len(self._wgrad_lanes)

    def _lanes(self, op):
        """Every lane that may execute op's graphs."""
        return self._wgrad_lanes if op == "wgrad" else [self._main]

    # ------------------------------------------------------------------ cache

    def _graph_for(self, op, key_dims, stride, pad):
        key = (op, *key_dims, stride, pad, self.layout, self.io_dtype, self.strict_fp32, self.deterministic,
               self.split_k and op == "wgrad", self.tune_in_graph)
        self.graph_calls[key] += 1
        if key in self._graphs:
            return self._graphs[key]
        if self._frozen:
            raise RuntimeError(f"cuDNN graph for conv {describe(op, key_dims, stride, pad)} was not built "
                               f"during warm-up (CudnnConv is frozen)")
        if op == FPROP_STATS:
            entry = self._build_fused_or_none(key_dims, stride, pad, key)
        else:
            entry = self._build(op, key_dims, stride, pad, key)
        self._graphs[key] = entry
        if entry is not None:
            entry.key = key
            self.builds[op] += 1
            for lane in self._lanes(op):
                lane.grow(entry.workspace_bytes)
        return entry

    def _build_fused_or_none(self, key_dims, stride, pad, key):
        """The fprop + genstats graph, or None (remembered: that shape runs plain) where cuDNN cannot run it."""
        try:
            entry = self._build(FPROP_STATS, key_dims, stride, pad, key, reduced_precision_sums=False)
        except DeviceError as error:
            self._unsupported(key_dims, stride, pad, error)
            return None
        # What genstats computes, in what precision, and whether it writes or adds into its sums, is not
        # documented, and notes are kept per engine: the autotuner checks each candidate (_genstats_check).
        # (Should none build within its limits, the heuristics' plan runs on its notes alone.)
        for candidate in entry.candidates or ():
            candidate.repeat_check = True
        self.genstats_counts["fused"] += 1
        return entry

    def _unsupported(self, key_dims, stride, pad, error):
        """Count a fused graph that runs plain, and keep why (one line)."""
        self.genstats_counts["unsupported"] += 1
        self.genstats_problems.append(f"{describe(FPROP_STATS, key_dims, stride, pad)}: "
                                      f"{' '.join(str(error).split())[:200]}")

    # ------------------------------------------------------------------ execute

    def _execute(self, op, entry, arrays, lane_index=0):
        """Check the arrays against the graph, then enqueue it with raw pointers on the lane's stream. The
        third array is the convolution's result (the one the autotuner's repeat check compares)."""
        for index, array in enumerate(arrays):
            self._check(op, entry, index, array)
        pointers = tuple(array.data.ptr for array in arrays)
        outputs = arrays[2:]            # the convolution's result, and an fprop's genstats sums
        lanes = self._lanes(op)
        if not 0 <= lane_index < len(lanes):
            raise ValueError(f"conv {op}: lane {lane_index} of {len(lanes)}")
        lane = lanes[lane_index]
        if lane.stream is not None:
            self._cudnn.set_stream(handle=lane.handle, stream=lane.stream.ptr)
        if entry.candidates is not None and entry.chosen is None:     # first use: time the candidates
            if op == FPROP_STATS:
                check = self._genstats_check(outputs)
            else:
                check = self._repeats_its_bits(outputs) if self.deterministic else None
            entry.chosen = choose_plan(entry.key, entry.candidates, pointers, lane.handle, self._cupy, self._hold,
                                       check, self._build_errors(), self.tune_in_graph)
            counts = self.genstats_counts if op == FPROP_STATS else self.split_k_counts
            counts.update(candidate.dropped for candidate in entry.candidates if candidate.dropped)
            for other in lanes:
                other.grow(entry.chosen.workspace)
        chosen = entry.chosen
        if chosen is None:
            entry.graph.execute(dict(zip(entry.tensors, pointers)), lane.ptr, handle=lane.handle)
        else:
            chosen.graph.execute_plan_at_index(dict(zip(chosen.tensors, pointers)), lane.ptr, chosen.index,
                                               handle=lane.handle)
        self.executions[op] += 1

    def _repeats(self, outputs, same):
        """repeats_its_bits(run) for the autotuner: run() REPEAT_CHECK_RUNS more times (it has just run) and
        require same(first, now) of each output after each (on the current stream: the lane's, where run()
        enqueues)."""
        def check(run):
            first = [out.copy() for out in outputs]
            for _ in range(REPEAT_CHECK_RUNS):
                run()
                if not all(same(before, out) for before, out in zip(first, outputs)):
                    return False
            return True
        return check

    def _repeats_its_bits(self, outputs):
        """The same bytes on every run."""
        cupy = self._cupy
        return self._repeats(outputs, lambda a, b: bool(cupy.array_equal(a.view(cupy.uint8), b.view(cupy.uint8))))

    def _repeats_closely(self, sums):
        """For genstats candidates when any engine is allowed: each sum within REPEAT_RTOL of the first run's
        largest. Atomics may reorder the additions, but an engine that adds into the sums instead of writing
        them (they would grow every step) is dropped."""
        cupy = self._cupy
        return self._repeats(sums, lambda a, b: float(cupy.max(cupy.abs(b - a))) <= REPEAT_RTOL * float(cupy.max(cupy.abs(a))))

    def _genstats_check(self, outputs):
        """The autotuner's check of a genstats candidate, which has just run once: its sums must be those of
        the output it wrote (within GENSTATS_RTOL: what cuDNN's genstats computes, and in what precision, is
        not documented beyond "sum and sum of squares"; the Frontend gives it the output's data type as its
        math precision), and they must repeat (exactly with deterministic engines; within REPEAT_RTOL with any,
        so that an engine adding into its sums instead of writing them is caught either way). Returns
        check(run) -> True, or why not."""
        y, sums = outputs[0], outputs[1:]
        repeats = self._repeats_its_bits(outputs) if self.deterministic else self._repeats_closely(sums)

        def check(run):
            if not self._sums_match(y, sums):
                return "wrong sums"
            return repeats(run) or "not repeatable"
        return check

    def _sums_match(self, y, sums):
        """Whether sums (the (1, K, 1, 1) sum and sum of squares) are those of y within GENSTATS_RTOL of sum |y|
        and of sum y^2, computed here in float64 from y as stored (bf16 storage read as its bits)."""
        cupy = self._cupy
        if self.itemsize == 2:          # bfloat16 storage (CuPy's dtype or uint16): the upper half of a float32
            y = (y.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)
        values = y.astype(cupy.float64)
        axes = (0, 1, 2) if self.layout == "NHWC" else (0, 2, 3)
        total, squares = (s.reshape(-1).astype(cupy.float64) for s in sums)
        bound_total = GENSTATS_RTOL * cupy.abs(values).sum(axis=axes)
        expected_squares = (values * values).sum(axis=axes)
        return bool(cupy.all(cupy.abs(total - values.sum(axis=axes)) <= bound_total)) and bool(
            cupy.all(cupy.abs(squares - expected_squares) <= GENSTATS_RTOL * expected_squares))

    def _check(self, op, entry, index, array):
        """Shape, item size and density of one argument; a mismatch would make cuDNN read out of bounds."""
        expected = entry.shapes[index]
        if array.shape != expected:
            raise ValueError(f"conv {op}: argument {index + 1} has shape {array.shape}, expected {expected} "
                             f"({self.layout})")
        if array.dtype.itemsize != entry.itemsizes[index]:
            expected_type = self.io_dtype if index < 3 else "float32"     # the result's genstats sums
            raise ValueError(f"conv {op}: argument {index + 1} has dtype {array.dtype}, expected "
                             f"{expected_type} storage ({entry.itemsizes[index]} bytes per element)")
        if not array.flags.c_contiguous:
            raise ValueError(f"conv {op}: argument {index + 1} is not C-contiguous")
        # The Frontend declares every tensor 16-byte aligned (its default), and engines load accordingly. Our
        # buffers always are; a batch slice (--wgrad-chunks) is too for every CIFAR activation, whose image
        # sizes are multiples of 16 bytes, but not for any shape.
        if array.data.ptr % ALIGNMENT_BYTES:
            raise ValueError(f"conv {op}: argument {index + 1} starts {array.data.ptr % ALIGNMENT_BYTES} bytes past a "
                             f"{ALIGNMENT_BYTES}-byte boundary (cuDNN tensors are declared {ALIGNMENT_BYTES}-byte aligned)")

    # ------------------------------------------------------------------ build

    def _build(self, op, key_dims, stride, pad, key, reduced_precision_sums=True):
        """Describe one convolution as a cuDNN graph, pick and build its plan; DeviceError if unsupported.
        reduced_precision_sums: where nothing else supports it, plan it again allowing engines that sum in
        reduced precision (a convolution that runs beats one that stops the run; not for the fused graph,
        which can run plain instead)."""
        cudnn = self._cudnn
        known = known_choice(key) if self.autotune else None      # this process's or an adopted checkpoint's
        tune = self.autotune and (self._time_new_graphs or known is not None)    # a known choice runs untimed
        try:
            graph, tensors, shapes = self.describe_graph(op, key_dims, stride, pad)
            try:
                candidates = self._plan(graph, tensors, known, tune=tune)
                if candidates is not None and self.split_k and op == "wgrad":
                    candidates += self._split_k_candidates(graph, candidates, known, key_dims, stride, pad)
            except cudnn.cudnnGraphNotSupportedError:
                if not reduced_precision_sums:
                    raise
                # Only engines that sum in reduced precision left? Better than no convolution at all: plan
                # again allowing them (a deselection cannot be undone on the same graph).
                graph, tensors, shapes = self.describe_graph(op, key_dims, stride, pad)
                candidates = self._plan(graph, tensors, known, reduced_precision_sums=True, tune=tune)
                self.reduced_precision_graphs.append(describe(op, key_dims, stride, pad))
            if candidates == [] and known is not None and op == FPROP_STATS:
                # an adopted choice this cuDNN cannot build: time (and check) the others, rather than run the
                # heuristics' plan unchecked
                candidates = build_candidates(graph, tensors, self._build_errors(), None,
                                              cudnn.behavior_note.RUNTIME_COMPILATION)
            if candidates == []:            # nothing built to time (or an adopted choice not built here)
                graph.build_plans()         # the heuristics' first plan
                candidates = None
            # autotuned: the workspace grows to the chosen plan's size once it is chosen (first use)
            workspace_bytes = 0 if candidates else graph.get_workspace_size()
        except self._build_errors() as error:
            raise DeviceError(self._unsupported_message(op, key_dims, stride, pad, error)) from error
        itemsizes = (self.itemsize,) * 3 + (STATS_ITEMSIZE,) * (len(tensors) - 3)
        return _BuiltGraph(graph, tensors, shapes, itemsizes, workspace_bytes, candidates)

    def describe_graph(self, op, key_dims, stride, pad, output_data_type=None):
        """One convolution as a cuDNN graph, not yet planned: (graph, (a, b, out) tensors, their array shapes).

        output_data_type: a cudnn.data_type for the output instead of the io dtype (bench/conv_engines.py
        asks whether a bf16 wgrad can write float32 directly). ValueError for an empty output.
        """
        cudnn = self._cudnn
        n, c, h, w, k, r, s = key_dims
        ho = conv_output_size(h, r, stride, pad)
        wo = conv_output_size(w, s, stride, pad)
        image_dims = (n, c, h, w)
        weight_dims = (k, c, r, s)
        result_dims = (n, k, ho, wo)
        if ho < 1 or wo < 1:
            raise ValueError(f"conv {describe(op, key_dims, stride, pad)}: empty output ({ho}x{wo})")
        output_type = output_data_type or self._data_type

        graph = cudnn.pygraph(io_data_type=self._data_type, intermediate_data_type=self._float,
                              compute_data_type=self._float, handle=self._lanes(op)[0].handle)
        conv_args = dict(pre_padding=[pad, pad], post_padding=[pad, pad], stride=[stride, stride],
                         dilation=[1, 1], compute_data_type=self._float, name=op)
        if op in ("fprop", FPROP_STATS):
            x = self._input(graph, "x", image_dims)
            wt = self._input(graph, "w", weight_dims)
            y = graph.conv_fprop(image=x, weight=wt, **conv_args)
            self._output(y, result_dims, output_type)
            tensors = (x, wt, y)
            dims = (image_dims, weight_dims, result_dims)
            if op == FPROP_STATS:       # y's per-channel sum and sum of squares, float32, as y is written
                if not hasattr(graph, "genstats"):
                    raise ValueError("this cuDNN Frontend has no genstats")
                total, squares = graph.genstats(name="genstats", input=y)
                for stat in (total, squares):
                    self._output(stat, (1, k, 1, 1), self._float)
                tensors += (total, squares)
                dims += ((1, k, 1, 1), (1, k, 1, 1))
        elif op == "dgrad":
            dy = self._input(graph, "dy", result_dims)
            wt = self._input(graph, "w", weight_dims)
            dx = graph.conv_dgrad(loss=dy, filter=wt, **conv_args)
            self._output(dx, image_dims, output_type)            # set_dim: dx's shape cannot be inferred
            tensors = (dy, wt, dx)
            dims = (result_dims, weight_dims, image_dims)
        else:
            x = self._input(graph, "x", image_dims)
            dy = self._input(graph, "dy", result_dims)
            dw = graph.conv_wgrad(image=x, loss=dy, **conv_args)
            self._output(dw, weight_dims, output_type)           # set_dim: dw's shape cannot be inferred
            tensors = (x, dy, dw)
            dims = (image_dims, result_dims, weight_dims)
        return graph, tensors, tuple(array_shape(self.layout, *d) for d in dims)

    def _input(self, graph, name, dims):
        return graph.tensor(name=name, dim=list(dims), stride=packed_strides(self.layout, *dims),
                            data_type=self._data_type)

    def _output(self, tensor, dims, data_type):
        """Mark a conv result as a graph output with explicit dims, layout strides and data type."""
        tensor.set_output(True)
        tensor.set_dim(list(dims))
        tensor.set_stride(packed_strides(self.layout, *dims))
        tensor.set_data_type(data_type)

    def _plan(self, graph, tensors, known, reduced_precision_sums=False, tune=True):
        """validate -> operation graph -> heuristics [A, FALLBACK] -> deselect -> check -> build.

        Returns the autotuning candidates (conv_autotune.Candidate, maybe none), or None without autotuning
        (or with tune False), when the heuristics' first plan was built (`execute` runs it).
        reduced_precision_sums: keep the engines noted REDUCED_PRECISION_REDUCTION (only when nothing else
        supports the graph). known: the choice already made for this graph, if any
        (conv_autotune.build_candidates)."""
        cudnn = self._cudnn
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        # Must come after create_execution_plans (it filters the candidates that call created) and
        # before check_support (which builds the first candidate that is not filtered out).
        # Never REDUCED_PRECISION_REDUCTION engines: sums stay float32 in every precision (a bf16 weight
        # gradient adds 131,072 products per element at batch 128). Deterministic (the default): no
        # NONDETERMINISTIC engines (atomics that reorder wgrad sums), so a rerun, a resumed run and a
        # CUDA-graph replay repeat the eager steps bit for bit. Strict: no TF32.
        graph.deselect_numeric_notes(self._deselected_notes(reduced_precision_sums))
        graph.check_support()
        if self.autotune and tune:
            return build_candidates(graph, tensors, self._build_errors(), known,
                                    cudnn.behavior_note.RUNTIME_COMPILATION)
        graph.build_plans()       # no autotuning: the heuristics' first plan
        return None

    def _deselected_notes(self, reduced_precision_sums=False):
        cudnn = self._cudnn
        notes = [] if reduced_precision_sums else [cudnn.numerical_note.REDUCED_PRECISION_REDUCTION]
        if self.deterministic:
            notes.append(cudnn.numerical_note.NONDETERMINISTIC)
        if self.strict_fp32:
            notes += [cudnn.numerical_note.TENSOR_CORE, cudnn.numerical_note.DOWN_CONVERT_INPUTS]
        return notes

    def _build_errors(self):
        return (self._cudnn.cudnnGraphNotSupportedError, ValueError, RuntimeError)

    def _split_k_candidates(self, graph, heuristic, known, key_dims, stride, pad):
        """The split-K settings of a weight gradient's engines, each built in a graph of its own
        (conv_autotune.py): the known one only, when a choice was made, else those build_split_k_candidates
        finds among the engines of the planned heuristics' `graph` (its operation graph names the engines
        and their knobs)."""
        cudnn, errors, notes = self._cudnn, self._build_errors(), self._deselected_notes()
        if isinstance(known, int):
            return []

        def fresh():
            fresh_graph, tensors, _ = self.describe_graph("wgrad", key_dims, stride, pad)
            return fresh_graph, tensors
        if known is not None:
            candidate = split_k_setting_or_none(fresh, *known[1:], cudnn, notes, errors)
            built, tried = [candidate] if candidate is not None else [], 1
        else:
            try:
                preferred = engine_ids(candidate.name for candidate in heuristic)
                engines = split_k_engines(graph, cudnn.knob_type.SPLIT_K_SLC, preferred, errors)
            except (*errors, AttributeError, TypeError) as error:   # a Frontend without knobs: the heuristics' only
                self.split_k_counts[f"problem: {type(error).__name__}: {' '.join(str(error).split())[:120]}"] += 1
                return []
            built, tried = build_split_k_candidates(fresh, engines, cudnn, notes, errors)
        self.split_k_counts.update(tried=tried, built=len(built))
        return built

    def _unsupported_message(self, op, key_dims, stride, pad, error):
        precision = self.io_dtype + (" strict fp32" if self.strict_fp32 else "")
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        return (f"cuDNN cannot run conv {describe(op, key_dims, stride, pad)} ({self.layout}, {precision}): "
                f"{reason}")
