#!/usr/bin/env python
"""Diagnose tests/test_gpu_parity.py::test_resnet20_loss_and_every_gradient_match_numpy_at_strict_fp32[NCHW]
(on an H100: stem/conv/w norm error 2.4e-3 relative at strict fp32, while [NHWC] passed).

    python bench/device_runs/2026-11-27-h100/run2/diag_strict_fp32.py    # a GPU, CuPy and the cuDNN Frontend
    PYTHONPATH=tests/emulated_gpu:. CUPYNET_EMULATED_GPUS=1 python bench/device_runs/2026-11-27-h100/run2/diag_strict_fp32.py

(Written for and run in run 2 of 2026-11-27 from the repository root, where it then lay; its output is diag.txt
beside it. It found the cause: one relu mask flipped by a rounding tie, see tests/relu_masks.py. The test
now shares the GPU's masks, so this script's own runs, which compare without sharing, still show the 2e-3.)

It repeats the test's setup (its own helpers: make_backend, _model_pair, to_layout, rms) in several
configurations and, for each, prints:
  * the loss error, the worst BN-state error and EVERY parameter gradient's norm-relative error against
    the float64 NumPy oracle (* marks the ones over the test's 1e-4);
  * whether a second pass (graphs cached, no autotuning) gives bit-identical gradients;
  * for every cuDNN convolution graph: its calls, the engine executed (plan index, cuDNN's plan name), that
    engine's numerical notes (probed: the Frontend 1.22 Python API has no getter, so each note is selected or
    deselected alone on a fresh graph and the plan is rebuilt) and behavior notes, and the error of the
    convolution itself against float64 on the very inputs the GPU saw: norm-relative, and the worst
    |error| / conv(|a|, |b|) (the bound tests/test_gpu_parity.py's CONV tolerance, 2e-5, uses); !! marks
    a convolution over 1e-5 / 2e-5, i.e. not a true fp32 result;
  * in the autotuned runs, every autotuner candidate of every graph re-run on that graph's recorded inputs:
    all of the stem's weight gradient (NCHW), and elsewhere those off the fp32 bounds, chosen or not.
Runs, in this order: NCHW and NHWC with autotuning (the test's configuration), NCHW with FFT/Winograd
engines also deselected (a candidate fix, patched into the engine instance, not the repository), the NCHW
autotuned run again in a child process with NVIDIA_TF32_OVERRIDE=0 (TF32 off in every library there), NCHW
and NHWC without autotuning. Runs after the first other than the two test configurations print one summary
line unless a gradient or convolution is off. No run starts after --budget seconds. Always exits 0.
"""
import argparse
import os
import re
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 4))   # the repository root
for _path in (REPO, os.path.join(REPO, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import conftest                                              # noqa: E402  (tests/conftest.py: gpu_stack_problem)
import test_gpu_parity as parity                             # noqa: E402  (the failing test's own helpers)
from cupynet.backends.cudnn_conv import describe            # noqa: E402
from cupynet.backends.numpy_backend import NumpyBackend      # noqa: E402

GRAD_RTOL = 1e-4          # the test's gradient tolerance (norm-relative)
LOSS_RTOL = 1e-5
STATE_RTOL = 1e-5
CONV_NORM_FLAG = 1e-5     # a true fp32 convolution here is ~1e-7 .. 1e-6 norm-relative
CONV_BOUND_FLAG = 2e-5    # tests/test_gpu_parity.py CONV["float32"]
FIX_NOTES = ("FFT", "WINOGRAD", "WINOGRAD_TILE_4x4", "WINOGRAD_TILE_6x6", "WINOGRAD_TILE_13x13")

# name, layout, autotune, extra notes to deselect, full tables always (else only when something is off), what it is
RUNS = [
    ("nchw_auto", "NCHW", True, (), True, "the failing test's configuration"),
    ("nhwc_auto", "NHWC", True, (), True, "its passing twin"),
    ("nchw_fix", "NCHW", True, FIX_NOTES, False, "candidate fix: strict also deselects FFT/WINOGRAD notes"),
    ("nchw_noauto", "NCHW", False, (), False, "no autotuning: the heuristics' first plan"),
    ("nhwc_noauto", "NHWC", False, (), False, "no autotuning"),
]
CHILD = "tf32_override"     # nchw_auto in a child process with NVIDIA_TF32_OVERRIDE=0, run after nchw_fix
ORDER = ("nchw_auto", "nhwc_auto", "nchw_fix", CHILD, "nchw_noauto", "nhwc_noauto")

_T0 = time.perf_counter()


def out(line=""):
    print(line, flush=True)


def elapsed():
    return time.perf_counter() - _T0


def short(name):
    return re.sub(r"stage(\d+)/block(\d+)", r"s\1b\2", name)


def one_line(error, limit=160):
    return " ".join(f"{type(error).__name__}: {error}".split())[:limit]


# --------------------------------------------------------------------------- the Frontend, probed


def note_names(cudnn):
    members = getattr(cudnn.numerical_note, "__members__", {})
    return [name for name in members if name not in ("NOT_SET", "TYPE_COUNT")]


def fresh_plans(conv, op, dims, stride, pad):
    """A fresh graph of the convolution with the heuristics' plans created (as CudnnConv._plan does)."""
    cudnn = conv._cudnn
    graph, tensors, _ = conv.describe_graph(op, dims, stride, pad)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    return graph


def heuristic_choice(conv, op, dims, stride, pad, reduced_precision_sums):
    """(index, name, graph) of the plan CudnnConv runs without autotuning: after its deselections, the first
    plan that builds (what build_plans' HEURISTICS_CHOICE policy picks)."""
    errors = conv._build_errors()
    graph = fresh_plans(conv, op, dims, stride, pad)
    graph.deselect_numeric_notes(conv._deselected_notes(reduced_precision_sums))
    graph.check_support()
    for index in range(int(graph.get_execution_plan_count())):
        try:
            graph.build_plan_at_index(index)
        except errors:
            continue
        return index, graph.get_plan_name_at_index(index), graph
    return None, "none built", graph


def probe_notes(conv, op, dims, stride, pad, index, name, cache):
    """The numerical notes of plan `index`: for each note, a fresh graph that selects (or, where the Frontend
    has no select, deselects) that note alone, then whether plan `index` still builds. '?' where the fresh
    graph's plan `index` is another engine (heuristics not repeatable) or the probe failed."""
    key = (conv.layout, op, dims, stride, pad, index)
    if key in cache:
        return cache[key]
    cudnn, errors = conv._cudnn, conv._build_errors()
    present, odd = [], []
    for note in note_names(cudnn):
        try:
            graph = fresh_plans(conv, op, dims, stride, pad)
            if str(graph.get_plan_name_at_index(index)) != str(name):
                odd.append(note + "(plan moved)")
                continue
            select = hasattr(graph, "select_numeric_notes")
            (graph.select_numeric_notes if select else graph.deselect_numeric_notes)([getattr(cudnn.numerical_note, note)])
            try:
                graph.check_support()
            except errors:              # nothing left: with select, no supported plan has the note
                if not select:
                    present.append(note)
                continue
            try:
                graph.build_plan_at_index(index)
                builds = True
            except errors:
                builds = False
            if builds == select:
                present.append(note)
        except Exception as error:      # noqa: BLE001  (a diagnostic: report, go on)
            odd.append(f"{note}?({one_line(error, 40)})")
    text = ",".join(present) or "-"
    if odd:
        text += " ?" + ",".join(odd)
    cache[key] = text
    return text


def behavior_names(graph, index):
    try:
        notes = graph.get_behavior_notes_for_plan_at_index(index)
        return ",".join(getattr(n, "name", str(n)).split(".")[-1] for n in notes) or "-"
    except Exception as error:          # noqa: BLE001
        return f"?({one_line(error, 40)})"


# --------------------------------------------------------------------------- recording convolutions


def install_recorder(conv, records):
    """Wrap the engine's three entry points: after each call, note its graph key and copy its arrays (on the
    call's own stream, right behind it)."""
    for op, method in (("fprop", "forward"), ("dgrad", "backward_data"), ("wgrad", "backward_filter")):
        original = getattr(conv, method)

        def wrapped(*args, _original=original, _op=op, **kwargs):
            before = Counter(conv.graph_calls)
            result = _original(*args, **kwargs)
            key = next((k for k, v in conv.graph_calls.items() if v != before.get(k, 0)), None)
            a, b, stride, pad, result_array = args[:5]
            records.append((_op, key, stride, pad, a.copy(), b.copy(), result_array.copy()))
            return result
        setattr(conv, method, wrapped)


def remove_recorder(conv):
    for method in ("forward", "backward_data", "backward_filter"):
        conv.__dict__.pop(method, None)


def conv_reference(layout, op, a, b, shape, stride, pad):
    ref = NumpyBackend(layout, "float64")
    result = np.zeros(shape, dtype=np.float64)
    run = {"fprop": ref.conv2d_forward, "dgrad": ref.conv2d_backward_data, "wgrad": ref.conv2d_backward_filter}[op]
    run(a, b, stride, pad, result)
    return result


def conv_error(gpu, ref, bound):
    """(norm-relative error, worst |error| / conv(|a|, |b|))."""
    diff = np.abs(np.asarray(gpu, dtype=np.float64) - ref)
    norm = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-300))
    ratio = np.where(bound > 0, diff / np.where(bound > 0, bound, 1.0), np.where(diff > 0, np.inf, 0.0))
    return norm, float(ratio.max()) if ratio.size else 0.0


def flag(norm, bound):
    return " !!" if norm > CONV_NORM_FLAG or bound > CONV_BOUND_FLAG else ""


def describe_key(key):
    op, n, c, h, w, k, r, s, stride, pad = key[:10]
    return f"{op:5s} N{n} C{c:<2d} {h}x{w} K{k:<2d} {r}x{s} s{stride} p{pad}"


# --------------------------------------------------------------------------- one configuration


def make(layout, autotune):
    if autotune:
        return parity.make_backend(layout, "float32")      # exactly the test's backend
    from cupynet.backends.cupy_backend import CupyBackend  # make_backend's arguments, autotune off
    return CupyBackend(device_id=0, layout=layout, dtype="float32", tf32=False, bn_launches=2,
                       overlap_wgrad=True, autotune=False)


def gpu_pass_again(be, x_nchw, labels):
    """The GPU half of parity._model_pair once more (graphs cached now): (loss, gradients)."""
    from cupynet.model import ResNet
    with be.device, be.stream:
        model = ResNet(be, 20, "v1")
        model.init(np.random.default_rng(0))
        x = be.from_host(parity.to_layout(be.layout, x_nchw), dtype=be.dtype)
        loss = float(be.to_host(model.forward_backward(x, be.from_host(labels))))
        return loss, model.params.state_dict(flat=model.params.grad_flat)


def run_case(spec, summary_only, probe, note_cache):
    name, layout, autotune, extra, always, what = spec
    from cupynet.backends import conv_autotune
    t_start = elapsed()
    out(f"== {name}: {layout} strict fp32, autotune {'on' if autotune else 'off'}"
        f"{' +deselect ' + '/'.join(extra) if extra else ''} ({what})")
    conv_autotune.forget_choices()          # each run times (and chooses) afresh
    be = make(layout, autotune)
    conv = be.conv
    cudnn = conv._cudnn
    if extra:
        missing = [n for n in extra if not hasattr(cudnn.numerical_note, n)]
        notes = [getattr(cudnn.numerical_note, n) for n in extra if n not in missing]
        if not notes:
            out(f"   skipped: this Frontend has none of {'/'.join(extra)}")
            return None
        base = conv._deselected_notes
        conv._deselected_notes = lambda reduced_precision_sums=False: base(reduced_precision_sums) + notes

    rng = np.random.default_rng(15)         # the test's data
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 10, 8).astype(np.int32)

    records = []
    install_recorder(conv, records)
    try:
        loss, ref_loss, grads, ref_grads, state, ref_state = parity._model_pair(be, 20, x, labels)
    finally:
        remove_recorder(conv)
    loss2, grads2 = gpu_pass_again(be, x, labels)

    errors = {g: float(np.linalg.norm(grads[g] - e) / max(np.linalg.norm(e), 1e-300)) for g, e in ref_grads.items()}
    over = [g for g, e in ref_grads.items() if np.linalg.norm(grads[g] - e) > GRAD_RTOL * np.linalg.norm(e) + 1e-9]
    worst = max(errors, key=errors.get)
    state_worst = max((float(np.max(np.abs(state[s] - e) / (np.abs(e) + parity.rms(e)))) for s, e in ref_state.items()),
                      default=0.0)
    same = all(np.array_equal(grads[g], grads2[g]) for g in grads) and loss == loss2
    errors2 = {g: float(np.linalg.norm(grads2[g] - e) / max(np.linalg.norm(e), 1e-300)) for g, e in ref_grads.items()}
    out(f"   loss rel {abs(loss - ref_loss) / abs(ref_loss):.1e} (tol {LOSS_RTOL:g}) | grads over {GRAD_RTOL:g}: "
        f"{len(over)} of {len(errors)}, worst {short(worst)} {errors[worst]:.2e} | BN state worst {state_worst:.1e} "
        f"(tol {STATE_RTOL:g}) | pass 2 bit-identical: {'yes' if same else 'NO'} (worst {max(errors2.values()):.2e})")
    if summary_only:
        return errors

    # every convolution's own error (on the inputs it was given), before deciding how much to print
    be.synchronize()
    by_key = defaultdict(list)
    for op, key, stride, pad, a, b, result in records:
        a, b, result = (np.asarray(arr.get(), dtype=np.float64) for arr in (a, b, result))
        ref = conv_reference(layout, op, a, b, result.shape, stride, pad)
        bound = conv_reference(layout, op, np.abs(a), np.abs(b), result.shape, stride, pad)
        by_key[key].append((conv_error(result, ref, bound), (a, b, ref, bound)))
    conv_worst = {key: (max(e[0][0] for e in found), max(e[0][1] for e in found)) for key, found in by_key.items()}
    flagged = [key for key, (norm, bound) in conv_worst.items() if flag(norm, bound)]
    if not (always or over or flagged or not same):
        out(f"   all {len(errors)} gradients within {GRAD_RTOL:g}; all {len(by_key)} convolution graphs within fp32 bounds "
            f"(worst {max(n for n, _ in conv_worst.values()):.1e} norm-rel, {max(b for _, b in conv_worst.values()):.1e} "
            f"of conv(|a|,|b|)) [{elapsed() - t_start:.1f} s]")
        return errors

    out(f"   every gradient, norm-relative error (* over {GRAD_RTOL:g}):")
    cells = [f"{short(g)} {errors[g]:.1e}{'*' if g in over else ' '}" for g in ref_grads]
    width = max(len(c) for c in cells) + 1
    per_line = max(1, 128 // width)
    for i in range(0, len(cells), per_line):
        out("     " + "".join(c.ljust(width) for c in cells[i:i + per_line]).rstrip())

    # every convolution: the engine that computed it, and its error on its own inputs
    out("   convolutions: op dims | calls | engine executed: plan index [of how many] cuDNN name | numerical notes |"
        " behavior notes | err norm-rel, err/conv(|a|,|b|) (worst call)")
    for key, found in by_key.items():
        norm, bound = conv_worst[key]
        entry = conv._graphs.get(key)
        op, dims, stride, pad = key[0], tuple(key[1:8]), key[8], key[9]
        try:
            if entry is not None and entry.chosen is not None:
                index, plan, graph = entry.chosen.index, entry.chosen.name, entry.chosen.graph
                total = f"{len(entry.candidates)} timed"
            else:
                rps = describe(op, dims, stride, pad) in conv.reduced_precision_graphs
                index, plan, graph = heuristic_choice(conv, op, dims, stride, pad, rps)
                total = f"{graph.get_execution_plan_count()} plans"
            notes = probe_notes(conv, op, dims, stride, pad, index, plan, note_cache) if probe and index is not None else "(not probed)"
            behavior = behavior_names(graph, index) if index is not None else "-"
            engine = f"#{index} [{total}] {str(plan)[:44]}"
        except Exception as error:      # noqa: BLE001
            engine, notes, behavior = f"? {one_line(error, 80)}", "?", "?"
        out(f"   {describe_key(key)} | x{len(found)} | {engine} | {notes} | {behavior} | {norm:.1e} {bound:.1e}"
            f"{flag(norm, bound)}")
    if conv.reduced_precision_graphs:
        out(f"   reduced-precision fallback used for: {conv.reduced_precision_graphs}")

    if autotune and not extra:
        sweep_all(be, conv, by_key, note_cache, probe, full=layout == "NCHW")
    out(f"   [{elapsed() - t_start:.1f} s]")
    return errors


MAX_SWEEP_LINES = 16


def sweep_all(be, conv, by_key, note_cache, probe, full):
    """Every autotuner candidate of every graph, run on that graph's first recorded inputs: all of them for
    the stem's weight gradient (when `full`), and for the other graphs the ones off the fp32 bounds, chosen
    or not (so a flaky choice cannot hide an imprecise engine)."""
    stem = next((k for k in by_key if k[0] == "wgrad" and k[2] == 3), None)
    lines, flagged, ran = [], 0, 0
    for key, found in by_key.items():
        show_all = full and key == stem
        for mark, candidate, norm, worst, error in sweep_candidates(be, conv, key, found[0][1]):
            ran += 1
            bad = error is not None or flag(norm, worst)
            flagged += bool(bad)
            if not (show_all or bad):
                continue
            op, dims, stride, pad = key[0], tuple(key[1:8]), key[8], key[9]
            if error is not None:
                text = f"failed: {one_line(error, 90)}"
            else:
                notes = probe_notes(conv, op, dims, stride, pad, candidate.index, candidate.name, note_cache) if probe else ""
                text = (f"{notes} | {behavior_names(candidate.graph, candidate.index)} | {norm:.1e} {worst:.1e}"
                        f"{flag(norm, worst)}")
            lines.append(f"    {mark}{describe_key(key)} #{candidate.index} {str(candidate.name)[:40]} | {text}")
    out(f"   autotuner candidates re-run on recorded inputs: {ran} run, {flagged} off the fp32 bounds or failed"
        f"{' (all of the stem wgrad shown)' if full else ''}; > = chosen:")
    for line in lines[:MAX_SWEEP_LINES]:
        out(line)
    if len(lines) > MAX_SWEEP_LINES:
        out(f"    ... {len(lines) - MAX_SWEEP_LINES} more")


def sweep_candidates(be, conv, key, arrays):
    """[(mark, candidate, norm-rel error, error/conv(|a|,|b|), exception or None)] for every autotuner
    candidate of graph `key`, run on the given recorded inputs."""
    import cupy
    entry = conv._graphs.get(key)
    if entry is None or not entry.candidates:
        return []
    a, b, ref, bound = arrays
    handle = conv._lanes(key[0])[0].handle
    found = []
    with be.device, be.stream:
        conv._cudnn.set_stream(handle=handle, stream=be.stream.ptr)   # (a wgrad lane's is rebound per call anyway)
        da, db = cupy.asarray(a.astype(np.float32)), cupy.asarray(b.astype(np.float32))
        result = cupy.empty(ref.shape, dtype=cupy.float32)
        workspace = cupy.empty((max([c.workspace for c in entry.candidates] + [1]),), dtype=cupy.uint8)
        for candidate in entry.candidates:
            mark = ">" if candidate is entry.chosen else " "
            try:
                result.fill(np.nan)
                candidate.graph.execute_plan_at_index(dict(zip(candidate.tensors, (da.data.ptr, db.data.ptr, result.data.ptr))),
                                                      workspace.data.ptr, candidate.index, handle=handle)
                be.stream.synchronize()
                norm, worst = conv_error(result.get(), ref, bound)
                found.append((mark, candidate, norm, worst, None))
            except Exception as error:  # noqa: BLE001
                found.append((mark, candidate, float("nan"), float("nan"), error))
    return found


# --------------------------------------------------------------------------- main


def header():
    import cupy
    import cudnn
    try:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception as error:          # noqa: BLE001
        gpu = f"? ({one_line(error, 60)})"
    env = {k: v for k, v in os.environ.items() if k.startswith(("CUDNN", "NVIDIA_TF32", "CUBLAS"))}
    out(f"GPU {gpu} | CuPy {cupy.__version__} | Frontend {getattr(cudnn, '__version__', '?')} | cuDNN "
        f"{cudnn.backend_version()} | env {env or '-'}")
    out(f"Frontend numerical notes: {','.join(note_names(cudnn))} | select_numeric_notes: "
        f"{hasattr(getattr(cudnn, 'pygraph', object), 'select_numeric_notes')}")


def run_child(deadline):
    """nchw_auto in a child process with NVIDIA_TF32_OVERRIDE=0 (read when the CUDA libraries load, hence a
    new process): its summary line."""
    out("== tf32_override: nchw_auto again in a child process with NVIDIA_TF32_OVERRIDE=0 (TF32 off in every library)")
    env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0")
    try:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--runs", "nchw_auto", "--summary-only",
                                "--no-probe", "--budget", "0"], env=env, cwd=REPO, capture_output=True, text=True,
                               timeout=max(3.0, deadline - elapsed()))
        lines = [line for line in child.stdout.splitlines() if line.startswith("   ")] or child.stdout.splitlines()[-3:]
        for line in lines + child.stderr.strip().splitlines()[-2:]:
            out("  " + line[:240])
    except subprocess.TimeoutExpired:
        out(f"   child timed out (the whole script stops by {deadline:g} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=",".join(ORDER), help=f"comma-separated, of: {','.join(ORDER)}")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="start no further run after this many seconds (the first always runs)")
    parser.add_argument("--deadline", type=float, default=29.0, help="the child run is killed by then (seconds)")
    parser.add_argument("--no-probe", action="store_true", help="skip the numerical-note probes")
    parser.add_argument("--summary-only", action="store_true", help="one summary line per run")
    args = parser.parse_args()

    problem = conftest.gpu_stack_problem()
    if problem is not None:
        out(f"no GPU: {problem}. Nothing to diagnose on this machine (the script imported fine); exiting 0.")
        return
    try:
        header()
    except Exception as error:          # noqa: BLE001
        out(f"header: {one_line(error)}")
    wanted = args.runs.split(",")
    specs = {spec[0]: spec for spec in RUNS}
    note_cache = {}
    first = True
    for name in ORDER:
        if name not in wanted:
            continue
        if not first and elapsed() > args.budget:
            out(f"== {name}: skipped (past the {args.budget:g} s budget; --runs {name} runs it alone)")
            continue
        first = False
        try:
            if name == CHILD:
                run_child(args.deadline)
            else:
                run_case(specs[name], args.summary_only, not args.no_probe, note_cache)
        except Exception as error:      # noqa: BLE001  (report, go on to the next run)
            out(f"   FAILED: {one_line(error, 300)}")
            for line in traceback.format_exc().strip().splitlines()[-4:]:
                out("     " + line.strip()[:150])
    out(f"done in {elapsed():.1f} s")


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException as error:      # noqa: BLE001  (always exit 0: this is a diagnostic)
        out(f"diag failed: {one_line(error, 300)}")
        traceback.print_exc()
    sys.exit(0)
