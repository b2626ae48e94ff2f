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

Split-K configurations (split_k=True, `--conv-split-k`, weight gradients only). A weight gradient's output
is tiny (2,304-36,864 values at 16-64 channels) and its sum runs over all N x H x W positions (131,072 at
batch 128), so an engine that does not split that sum keeps few SMs busy. Engines that can split it expose
the knob SPLIT_K_SLC (the number of slices); the heuristics propose one setting per engine. With split_k,
the autotuner also times up to MAX_SPLIT_K_CANDIDATES (engine, slices) settings: those of the first
MAX_SPLIT_K_ENGINES engines that expose the knob and whose notes allow them (the heuristics' own engines
first), with powers of two from 2 to MAX_SPLIT_K_SLICES that the knob takes. The list depends on the graph
only (no time budget), so every backend of the process builds the same one. Each setting is a graph of its own (`create_execution_plan(engine id, {knob type: value})` on a fresh
graph): Frontend 1.22 keeps notes per plan in a list that a second plan-creating call on the same graph
extends with every plan's notes again, so a plan added to the heuristics' graph would be deselected (or
not) by another plan's notes. Alone in its graph, a setting is judged by its own engine's notes: the same
deselections as the heuristics' plans (never reduced-precision sums; deterministic: no NONDETERMINISTIC
engine; strict fp32: no TF32). Those notes belong to the engine, not to the knob's value, so with
deterministic engines a setting must also repeat its bits: run REPEAT_CHECK_RUNS more times on the same
arrays before it is timed, one whose outputs differ is dropped (an engine adding its slices with atomics
that cuDNN did not note NONDETERMINISTIC). That guard is probabilistic: a reordered float32 sum shows in a
float32 output's last bits, but rounding to a bfloat16 output hides most such differences, so in bf16 it
catches a reordering engine only now and then (the GPU tests' captured-equals-eager steps are the stronger
check there). A choice is then ("split_k", engine id, slices) instead of a plan index, and
checkpoints carry it the same way.

Timing inside a CUDA graph (in_graph=True, `--conv-tune-in-graph`). The step runs its convolutions replayed from
one captured graph, where cuDNN's own memsets (a split-K or stream-K engine zeroing its workspace or a counter)
are memset nodes: in the replays of a captured step on an H100 (2026-11-27, run 1, batch 128; `bench/timeline.py
--from-trace`) one node followed another on a stream in a median 0.42-0.54 us where both were kernels, but a
memset took 3.68 us to follow a kernel and 3.42 us another memset, a kernel 3.18 us to follow a memset, and
on the backward's main chain the strided data gradient 13.45 us (at least 12.0) to follow its 4-byte memset,
twice a step, with the GPU otherwise idle. Timed eagerly, an engine with a
memset pays none of that. With in_graph, each candidate's TIMED_RUNS runs are recorded once as a graph and the
replay of that graph is what is timed (behind the hold, as above): each engine pays what it will pay in the step.
An engine whose runs cannot be recorded is left out, as one that cannot run.

Frontend calls used (nvidia-cudnn-frontend 1.22-1.26, names read in the 1.22.1 wheel):
`get_execution_plan_count()`, `build_plan_at_index(i)` (raises for a deselected or unsupported index),
`get_workspace_size_plan_at_index(i)`, `execute_plan_at_index(tensor_to_device_buffer, workspace, i, handle=)`,
`get_behavior_notes_for_plan_at_index(i)` and `cudnn.behavior_note.RUNTIME_COMPILATION`; for split-K,
`get_engine_count()`, `get_knobs_for_engine(engine id)` (knob objects with `type`, `min_value`,
`max_value`, `stride`), `create_execution_plan(engine id, {cudnn.knob_type.SPLIT_K_SLC: slices})`, and the
plan names, which start with "eng<engine id>" (the signatures and knob attributes read in the 1.22.1
module, imported without a GPU).
"""
import re
import threading
from collections import Counter
from dataclasses import dataclass

MAX_WORKSPACE_BYTES = 256 * 2 ** 20     # an engine needing more is not worth the memory at these sizes
MAX_CANDIDATES = 8                       # the heuristics' best few: builds cost warm-up time
TIMED_RUNS = 3
HOLD_SECONDS = 0.001                     # enough to enqueue a few cuDNN calls behind it
MAX_HOLD_SECONDS = 0.064                 # a hold that was too short is quadrupled, up to this
MAX_SPLIT_K_CANDIDATES = 8               # (engine, slices) settings timed per weight gradient, with split_k
MAX_SPLIT_K_ENGINES = 2                  # engines those settings are shared among (the heuristics' first)
MAX_SPLIT_K_SLICES = 64                  # a 128-image batch's 8x8 maps still give each slice 128 positions
REPEAT_CHECK_RUNS = 3                    # runs compared with the first before a split-K setting is timed
SPLIT_K = "split_k"                      # a choice ("split_k", engine id, slices), beside plain plan indices
# A graph key's fields (cudnn_conv.py makes the keys). A checkpoint's shorter keys are from before the key had
# split_k (14 fields) or tune_in_graph (15), switches that were off then: they are read with those set to False
KEY_FIELDS = ("op", "N", "C", "H", "W", "K", "R", "S", "stride", "pad", "layout", "io_dtype", "strict_fp32",
              "deterministic", "split_k", "tune_in_graph")
OLDEST_KEY_LENGTH = 14

_CHOICES = {}                            # (device id, graph key) -> choice: a plan index or a split-K setting
_LOCK = threading.Lock()


class NoCandidateRan(RuntimeError):
    """Every built candidate failed to run, or was dropped by the repeat check."""


@dataclass
class Candidate:
    """One engine configuration the autotuner may time: plan `index` of a built `graph` whose tensors are
    `tensors` (in the order of CudnnConv's array arguments), and the `choice` that names it."""
    choice: object          # int: the heuristics' plan index; ("split_k", engine id, slices)
    graph: object
    tensors: tuple
    index: int
    workspace: int
    dropped: str = None     # why the autotuner did not time it (a split-K setting that did not repeat its bits)
    # run again before it is timed, with deterministic engines, and dropped if its outputs change: a split-K
    # setting (notes are per engine, not per knob value), an fprop with genstats (sums added across blocks)
    repeat_check: bool = False

    @property
    def name(self):
        return self.graph.get_plan_name_at_index(self.index)


def known_choice(key):
    """What this process (or an adopted checkpoint) chose for `key` on the current GPU, or None."""
    import cupy
    with _LOCK:
        return _CHOICES.get((cupy.cuda.Device().id, key))


def build_candidates(graph, tensors, build_errors, known, runtime_compiled_note):
    """Build the heuristics' candidate plans worth timing: a list of Candidate (maybe empty).

    When a choice is `known` (this process's or an adopted checkpoint's), only that plan is built, or none
    when it is a split-K setting: a second worker or backend pays no second round of builds. Otherwise
    the heuristics' first MAX_CANDIDATES plans, skipping those that are compiled at run time (seconds
    each), except the first: the heuristics' own choice is always a candidate, so tuning never does worse
    than not tuning.
    """
    if known is not None:
        indices = [known] if isinstance(known, int) else []
    else:
        indices = range(graph.get_execution_plan_count())
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
            built.append(Candidate(index, graph, tensors, index, workspace))
    return built


def split_k_engines(graph, split_knob, preferred_engines, errors):
    """[(engine id, [slices, ...])] for the planned operation graph `graph`: every engine whose knobs include
    `split_knob` (cudnn.knob_type.SPLIT_K_SLC), those in `preferred_engines` first and in that order, then by
    id, each with the powers of two from 2 to MAX_SPLIT_K_SLICES that its knob takes."""
    found = []
    for engine in range(int(graph.get_engine_count())):
        try:
            knobs = graph.get_knobs_for_engine(engine)
        except errors:                    # an engine that cannot run this graph at all
            continue
        split = next((k for k in knobs if k.type == split_knob), None)
        if split is not None:
            values = [2 ** p for p in range(1, MAX_SPLIT_K_SLICES.bit_length()) if _takes(split, 2 ** p)]
            if values:
                found.append((engine, values))
    rank = {engine: position for position, engine in enumerate(preferred_engines)}
    return sorted(found, key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def spread(values, count):
    """`count` of the sorted `values`, spread over them: all when there are no more, both ends included
    otherwise, the middle one for a count of one."""
    if count >= len(values):
        return list(values)
    if count == 1:
        return [values[len(values) // 2]]
    return [values[round(i * (len(values) - 1) / (count - 1))] for i in range(count)]


def _takes(knob, value):
    stride = max(int(knob.stride or 1), 1)
    return int(knob.min_value) <= value <= int(knob.max_value) and (value - int(knob.min_value)) % stride == 0


def engine_ids(plan_names):
    """The engine ids in plan names ("eng<id>_k<knob>=<value>...", the Frontend's engine tags), in their
    order, each once."""
    ids = []
    for name in plan_names:
        match = re.match(r"eng(\d+)", str(name))
        if match and int(match.group(1)) not in ids:
            ids.append(int(match.group(1)))
    return ids


def build_split_k_candidates(describe, engines, cudnn, notes, errors, limit=MAX_SPLIT_K_CANDIDATES,
                             most_engines=MAX_SPLIT_K_ENGINES):
    """Split-K settings built for the autotuner: (list of Candidate, settings tried).

    engines: split_k_engines' list, taken in order until `most_engines` of them gave a setting or `limit`
    settings were built; each engine gets its share of what is left, spread over its values. An engine
    whose first setting does not build is passed over (its notes deselected it, or it cannot run this
    graph), so the engines kept are the first that the notes allow, not merely the first with the knob.
    describe(): a fresh, unplanned (graph, tensors) of the convolution.
    """
    built, tried, used = [], 0, 0
    for engine, values in engines:
        if used == most_engines or len(built) >= limit:
            break
        share = -(-(limit - len(built)) // (most_engines - used))        # ceiling: what is left, evenly
        picked = spread(values, share)
        first = split_k_setting_or_none(describe, engine, picked[0], cudnn, notes, errors)
        tried += 1
        if first is None:
            continue
        used += 1
        built.append(first)
        for slices in picked[1:]:
            candidate = split_k_setting_or_none(describe, engine, slices, cudnn, notes, errors)
            tried += 1
            if candidate is not None:
                built.append(candidate)
    return built, tried


class SettingRefused(Exception):
    """A split-K setting that builds but is not worth building: compiled at run time, or too much workspace."""


def build_split_k_setting(describe, engine, slices, cudnn, notes):
    """One (engine, slices) setting built alone in a fresh graph (see the module docstring), as a Candidate.

    Raises the Frontend's error when the engine refuses it (unsupported, deselected by `notes`), and
    SettingRefused when it is compiled at run time (seconds each) or needs more than MAX_WORKSPACE_BYTES.
    """
    graph, tensors = describe()
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plan(engine, {cudnn.knob_type.SPLIT_K_SLC: slices})
    graph.deselect_numeric_notes(notes)
    if _runtime_compiled(graph, 0, cudnn.behavior_note.RUNTIME_COMPILATION):
        raise SettingRefused("compiled at run time (seconds to build: the autotuner leaves those out)")
    graph.check_support()
    graph.build_plan_at_index(0)
    workspace = int(graph.get_workspace_size_plan_at_index(0))
    if workspace > MAX_WORKSPACE_BYTES:
        raise SettingRefused(f"needs {workspace / 2 ** 20:.0f} MB of workspace")
    return Candidate((SPLIT_K, engine, slices), graph, tensors, 0, workspace, repeat_check=True)


def split_k_setting_or_none(describe, engine, slices, cudnn, notes, errors):
    """build_split_k_setting, or None where it raises one of `errors` or SettingRefused."""
    try:
        return build_split_k_setting(describe, engine, slices, cudnn, notes)
    except (*errors, SettingRefused):
        return None


def _runtime_compiled(graph, index, note):
    """Whether plan `index` is JIT-compiled when built (its behavior notes say RUNTIME_COMPILATION)."""
    try:
        return note in list(graph.get_behavior_notes_for_plan_at_index(index))
    except (RuntimeError, ValueError, TypeError):     # notes not available: build it and see
        return False


def choose_plan(key, candidates, pointers, handle, cupy, hold=None, repeats_its_bits=None,
                run_errors=(RuntimeError, ValueError), in_graph=False):
    """The Candidate to execute for graph `key`: the process-wide choice, or the fastest, timed now.

    pointers: the real arrays' addresses, in the order of each candidate's tensors; the timed runs write
    the output array, which the caller's execution then overwrites. repeats_its_bits(run): whether further
    calls of run() write the output bits its last call wrote (True), else False or why not; a candidate with
    repeat_check (a split-K setting, an fprop with genstats) that fails it is dropped before it is timed. run_errors: what an engine that built may raise when it runs
    (it is then left out); the cuDNN Frontend's own not-supported error is not a RuntimeError. in_graph: time
    each candidate replayed from a recorded graph (captured_milliseconds) instead of enqueued eagerly.
    """
    key = (cupy.cuda.Device().id, key)
    by_choice = {candidate.choice: candidate for candidate in candidates}
    with _LOCK:
        known = _CHOICES.get(key)
    if known in by_choice:
        return by_choice[known]
    fastest = _fastest(candidates, pointers, handle, cupy, hold, repeats_its_bits, run_errors, in_graph)
    with _LOCK:
        if _CHOICES.get(key) == known:     # nobody chose meanwhile (or an adopted choice was not built here)
            _CHOICES[key] = fastest.choice
        # another thread's choice, where it was built here too (it is, for the same key and heuristics)
        return by_choice.get(_CHOICES[key], fastest)


def _fastest(candidates, pointers, handle, cupy, hold, repeats_its_bits, run_errors, in_graph):
    stream = cupy.cuda.get_current_stream()        # the backend's stream: its handle is bound to it
    timer = captured_milliseconds if in_graph else gpu_milliseconds
    scratch = cupy.empty((max([candidate.workspace for candidate in candidates] + [1]),), dtype=cupy.uint8)
    timings = []
    for position, candidate in enumerate(candidates):
        variant_pack = dict(zip(candidate.tensors, pointers))

        def run():
            candidate.graph.execute_plan_at_index(variant_pack, scratch.data.ptr, candidate.index, handle=handle)
        try:
            run()                                  # untimed: first-run costs
            if repeats_its_bits is not None and candidate.repeat_check:
                verdict = repeats_its_bits(run)
                if verdict is not True:            # atomics the engine's notes did not declare, or wrong sums
                    candidate.dropped = verdict or "not repeatable"
                    continue
            milliseconds = timer(cupy, stream, hold, lambda: [run() for _ in range(TIMED_RUNS)])
        except run_errors:                        # an engine that builds but cannot run (or be recorded) here
            continue
        timings.append((milliseconds, position))
    if not timings:
        reasons = Counter(candidate.dropped for candidate in candidates if candidate.dropped)
        raise NoCandidateRan(f"none of the {len(candidates)} built cuDNN plans could execute"
                             + (f" (dropped: {', '.join(f'{n} {why}' for why, n in reasons.items())})" if reasons else ""))
    return candidates[min(timings)[1]]


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


def captured_milliseconds(cupy, stream, hold, enqueue):
    """gpu_milliseconds of the work `enqueue()` puts on `stream`, recorded once as a CUDA graph and timed as that
    graph's replay: the cost inside a captured step (see the module docstring). Relaxed capture mode, as the
    backend's own capture: another thread sharing the GPU may allocate meanwhile. Should enqueue() raise, the
    capture is ended and the error goes on."""
    stream.begin_capture(mode=cupy.cuda.runtime.streamCaptureModeRelaxed)
    try:
        enqueue()
    except BaseException:
        try:
            stream.end_capture()
        except Exception:                   # an invalidated capture raises here too: enqueue's error counts
            pass
        raise
    graph = stream.end_capture()
    return gpu_milliseconds(cupy, stream, hold, lambda: graph.launch(stream=stream))


def export_choices(device_id):
    """The choices made on GPU `device_id`, JSON-ready (a split-K setting becomes a list), with the GPU model
    and cuDNN they were timed on."""
    with _LOCK:
        choices = [[list(key), list(choice) if isinstance(choice, tuple) else choice]
                   for (device, key), choice in sorted(_CHOICES.items(), key=str) if device == device_id]
    return {"environment": _environment(device_id), "choices": choices}


def import_choices(saved, device_id):
    """Adopt choices from `export_choices` (a checkpoint's) if they were timed on this GPU model and cuDNN
    version; returns how many were adopted (0 for another environment or nothing saved). An entry that is
    not a choice (a plan index, or ["split_k", engine id, slices]) is left out: that convolution is timed
    again."""
    if not saved or saved.get("environment") != _environment(device_id):
        return 0
    entries = saved.get("choices")
    if not isinstance(entries, list):
        return 0
    adopted = 0
    with _LOCK:
        for entry in entries:
            parsed = _parse_saved(entry)
            if parsed is not None:
                _CHOICES[(device_id, parsed[0])] = parsed[1]
                adopted += 1
    return adopted


def _parse_saved(entry):
    """(key, choice) of one saved [key, choice] entry, or None when it is not one."""
    try:
        key, choice = entry
        key = tuple(key)
        if OLDEST_KEY_LENGTH <= len(key) < len(KEY_FIELDS):
            key += (False,) * (len(KEY_FIELDS) - len(key))
        hash(key)                         # a key of plain values (a nested list would not be one)
    except (TypeError, ValueError):
        return None
    if type(choice) is int:
        return key, choice
    if isinstance(choice, list) and len(choice) == 3 and choice[0] == SPLIT_K and all(
            type(value) is int for value in choice[1:]):
        return key, tuple(choice)
    return None


def _environment(device_id):
    import cudnn
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    return {"gpu": name.decode() if isinstance(name, bytes) else str(name), "cudnn": int(cudnn.backend_version())}


def forget_choices():
    """Drop every choice (tests)."""
    with _LOCK:
        _CHOICES.clear()
