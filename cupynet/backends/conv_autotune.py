"""Autotuning of cuDNN convolution plans: build every candidate engine, time each, keep the fastest.

What PyTorch's `cudnn.benchmark = True` does, for our Frontend graphs (cupynet/backends/cudnn_conv.py):
the heuristics propose an ordered list of engine configurations; the default builds only the first.
With autotuning, the first MAX_CANDIDATES that are not deselected (non-deterministic engines always are;
strict fp32 also drops TF32 ones), need at most MAX_WORKSPACE_BYTES of workspace and are not compiled at
run time (except the heuristics' own first choice, always kept) are built, and on the convolution's first
execution (the warm-up step: it synchronizes with the host) each is run once untimed and TIMED_RUNS
times between two CUDA events on the backend's stream, with the real arrays; the fastest is used from
then on (`execute_plan_at_index`). A convolution whose choice is already known builds only that plan.
The timed runs are enqueued behind a hold of the stream (`gpu_milliseconds`): a cuDNN call costs as much
host time as a small convolution takes on the GPU, so runs enqueued on an idle GPU would time the host.

The choice is kept per process, per GPU and per graph key, so every backend in the process (several
workers, a second run in a test) uses the same engine for the same convolution: replicas and reruns stay
bit-identical. Checkpoints carry the choices (`export_choices`, in the checkpoint's metadata) and a
resumed run adopts them (`import_choices`) when it runs on the same GPU model with the same cuDNN, so it
continues with the same engines, bit for bit; elsewhere it times afresh (like cudnn.benchmark, a new
process could choose other engines).

Frontend calls used (nvidia-cudnn-frontend 1.22-1.26, names read in the 1.22.1 wheel):
`get_execution_plan_count()`, `build_plan_at_index(i)` (raises for a deselected or unsupported index),
`get_workspace_size_plan_at_index(i)`, `execute_plan_at_index(variant_pack, workspace, i, handle=)`,
`get_behavior_notes_for_plan_at_index(i)` and `cudnn.behavior_note.RUNTIME_COMPILATION`.
"""
import threading

MAX_WORKSPACE_BYTES = 256 * 2 ** 20     # an engine needing more is not worth the memory at these sizes
MAX_CANDIDATES = 8                       # the heuristics' best few: builds cost warm-up time
TIMED_RUNS = 3
HOLD_SECONDS = 0.001                     # enough to enqueue a few cuDNN calls behind it
MAX_HOLD_SECONDS = 0.064                 # a hold that was too short is quadrupled, up to this

_CHOICES = {}                            # (device id, graph key) -> plan index
_LOCK = threading.Lock()


def build_candidates(graph, build_errors, key, runtime_compiled_note):
    """Build the candidate plans worth timing; [(plan index, workspace bytes)] (maybe empty).

    When this process (or an adopted checkpoint) already chose a plan for `key` on this GPU, only that
    one is built: a second worker or backend pays no second round of builds. Otherwise the heuristics'
    first MAX_CANDIDATES plans, skipping those that are compiled at run time (seconds each), except the
    first: the heuristics' own choice is always a candidate, so tuning never does worse than not tuning.
    """
    known = _known_choice(key)
    indices = [known] if known is not None else range(graph.get_execution_plan_count())
    built = []
    for index in indices:
        if len(built) == MAX_CANDIDATES:
            break
        if built and _runtime_compiled(graph, index, runtime_compiled_note):
            continue
        try:
            graph.build_plan_at_index(index)
        except build_errors:              # deselected, unsupported on this GPU, or failed to compile
            continue
        workspace = int(graph.get_workspace_size_plan_at_index(index))
        if workspace <= MAX_WORKSPACE_BYTES:
            built.append((index, workspace))
    return built


def _known_choice(key):
    import cupy
    with _LOCK:
        return _CHOICES.get((cupy.cuda.Device().id, key))


def _runtime_compiled(graph, index, note):
    """Whether plan `index` is JIT-compiled when built (its behavior notes say RUNTIME_COMPILATION)."""
    try:
        return note in list(graph.get_behavior_notes_for_plan_at_index(index))
    except (RuntimeError, ValueError, TypeError):     # notes not available: build it and see
        return False


def choose_plan(key, graph, candidates, variant_pack, handle, cupy, hold=None):
    """The plan index for graph `key`: the process-wide choice, or the fastest candidate, timed now.

    variant_pack maps the graph's tensors to the real arrays' pointers; the timed runs write the
    output array, which the caller's execution then overwrites.
    """
    key = (cupy.cuda.Device().id, key)
    built = {index for index, _ in candidates}
    with _LOCK:
        known = _CHOICES.get(key)
    if known in built:
        return known
    index = _fastest(graph, candidates, variant_pack, handle, cupy, hold)
    with _LOCK:
        if _CHOICES.get(key) == known:     # nobody chose meanwhile (or an adopted choice was not built here)
            _CHOICES[key] = index
        return _CHOICES[key]


def _fastest(graph, candidates, variant_pack, handle, cupy, hold):
    stream = cupy.cuda.get_current_stream()        # the backend's stream: its handle is bound to it
    scratch = cupy.empty((max([workspace for _, workspace in candidates] + [1]),), dtype=cupy.uint8)
    timings = []
    for index, _ in candidates:
        def run():
            graph.execute_plan_at_index(variant_pack, scratch.data.ptr, index, handle=handle)
        try:
            run()                                  # untimed: first-run costs
            milliseconds = gpu_milliseconds(cupy, stream, hold, lambda: [run() for _ in range(TIMED_RUNS)])
        except (RuntimeError, ValueError):        # an engine that builds but cannot run these arrays
            continue
        timings.append((milliseconds, index))
    if not timings:
        raise RuntimeError(f"none of the {len(candidates)} built cuDNN plans could execute")
    return min(timings)[1]


def gpu_milliseconds(cupy, stream, hold, enqueue, first_hold=HOLD_SECONDS):
    """GPU milliseconds of the work `enqueue()` puts on `stream` (the current stream), between two events.

    With hold (CupyBackend.hold_stream), the work is enqueued while the stream is held busy, so the GPU runs
    it back to back and the events time the GPU alone. If the GPU reached the first event before the host
    had enqueued everything (the hold was too short for this host), it is timed again with a longer hold.
    Without hold (no kernel library), the events time whatever the host lets the GPU do.
    """
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    seconds = first_hold
    while True:
        if hold is not None:
            with stream:                     # the hold must be on the stream the events and the work are on
                hold(seconds)
        start.record(stream)
        enqueue()
        end.record(stream)
        caught_up = start.done               # the GPU was already past the hold: it may have waited for the host
        end.synchronize()
        if hold is None or not caught_up or seconds >= MAX_HOLD_SECONDS:
            return cupy.cuda.get_elapsed_time(start, end)
        seconds *= 4


def export_choices(device_id):
    """The choices made on GPU `device_id`, JSON-ready, with the GPU model and cuDNN they were timed on."""
    with _LOCK:
        choices = [[list(key), index] for (device, key), index in sorted(_CHOICES.items(), key=str)
                   if device == device_id]
    return {"environment": _environment(device_id), "choices": choices}


def import_choices(saved, device_id):
    """Adopt choices from `export_choices` (a checkpoint's) if they were timed on this GPU model and cuDNN
    version; returns how many were adopted (0 for another environment or nothing saved)."""
    if not saved or saved.get("environment") != _environment(device_id):
        return 0
    with _LOCK:
        for key, index in saved["choices"]:
            _CHOICES[(device_id, tuple(key))] = int(index)
    return len(saved["choices"])


def _environment(device_id):
    import cudnn
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    return {"gpu": name.decode() if isinstance(name, bytes) else str(name), "cudnn": int(cudnn.backend_version())}


def forget_choices():
    """Drop every choice (tests)."""
    with _LOCK:
        _CHOICES.clear()
