"""Train a CIFAR-10 ResNet, then evaluate it: `python -m cupynet.train [flags]`.

    python -m cupynet.train                                  # demo: built-in sample, ~1 minute on 2 cores
    python -m cupynet.train --data-dir ~/data/cifar10        # the reference recipe (ResNet-44, 80k steps)
    python -m cupynet.train --help                           # every flag with its default

parse flags -> load data (in a thread of its own, beside the device checks and the backend's setup) -> prepare
the model dir -> build the model -> resume from the latest checkpoint -> train to --train-steps (progress lines,
periodic checkpoints, evaluations every --eval-interval steps if asked) -> final checkpoint -> evaluate -> report.
Metrics go to <model-dir>/metrics.jsonl as JSON lines. Rerunning the same command resumes; --train-steps
is the total target step. Bad input ends with one line `error: ...` and exit status 2. SIGTERM (a scheduler's
preemption) stops the run after the step in progress with a checkpoint there, exit status 143
(cupynet/stop_request.py); Ctrl-C leaves at once with the last complete checkpoint, exit status 130.

Several devices (`--gpus cpu,cpu`, `--gpus 0,1`) train data-parallel: one worker thread per device runs
the same flow as one device, on its shard of every global batch (cupynet/parallel.py, Trainer's
"Data parallelism"). Rank 0 alone prints, writes metrics and checkpoints; every rank joins the
collectives (gradient average per step, loss at log steps, BN statistics before checkpoints and each
evaluation, the sharded evaluations themselves).
"""
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from cupynet import __version__
from cupynet.backends import check_devices, check_dtype, create_backend, resolve_devices
from cupynet.background import Background
from cupynet.checkpoint import claim_model_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from cupynet.config import DEMO_DEFAULTS, flag_of, parse_args, recipe_changes
from cupynet.data import builtin_sample_dir, find_batches_dir, load_cifar10, synthetic_dataset
from cupynet.errors import ConfigError, TrainingDiverged
from cupynet.parallel import HostGroup, NcclGroup, run_workers
from cupynet.report import MetricsLog, exit_status, format_duration, progress_line
from cupynet.stop_request import StopRequest, Terminated, stop_on_sigterm
from cupynet.trainer import Trainer


def load_dataset(config):
    if config.synthetic:
        return synthetic_dataset(seed=config.seed, validation_size=config.validation_size or 0)
    return load_cifar10(config.data_dir or builtin_sample_dir(), config.validation_size)


def load_in_background(config):
    """The dataset, loaded in a thread of its own (cupynet/background.py) while the run checks its devices and
    sets up the backend; `.result()` waits for it (or raises the load's error), `.seconds` is how long it took.

    Why: a run's setup counts against its wall time, and on an H100 the data took 0.9 s and the GPU backend's setup
    4.3 s of a 5.3-s setup, one after the other. They overlap wherever the backend's setup leaves the GIL free (the
    CUDA calls CuPy makes do) and the load does not need it (its file reads and NHWC copies). A data folder that
    is not there is reported at once, before the thread starts; what the files hold, when the result is asked."""
    if not config.synthetic:
        find_batches_dir(config.data_dir or builtin_sample_dir())
    return Background(load_dataset, config, name="data")


def check_against_data(config, dataset):
    """Flag checks that need the dataset's sizes."""
    if config.train_batch_size > len(dataset.train):
        raise ConfigError(f"--train-batch-size {config.train_batch_size} is larger than the "
                          f"{len(dataset.train)} training images")
    if config.eval_on == "validation" and len(dataset.validation) == 0:
        raise ConfigError("--eval-on validation needs --validation-size > 0")


def check_cuda_graph(config, devices):
    """--cuda-graph on needs GPU workers whose all-reduce runs on the device (checked before anything is written)."""
    if config.cuda_graph != "on":
        return
    if devices[0] == "cpu":
        raise ConfigError("--cuda-graph on needs GPU workers (--gpus 0, ...); the CPU backend has no CUDA graphs")
    if len(devices) > 1 and config.reduce == "host":
        raise ConfigError("--cuda-graph on cannot record --reduce host (the host all-reduce waits for the device "
                          "inside the step); use --reduce nccl or --cuda-graph off")


def build_backend(config, device):
    return create_backend(device, config.data_format, config.dtype, tf32=config.tf32, autotune=config.conv_autotune,
                          wgrad_streams=config.wgrad_streams, deterministic=config.conv_deterministic,
                          wgrad_chunks=config.wgrad_chunks, bn_launches=config.bn_launches, split_k=config.conv_split_k,
                          conv_genstats=config.conv_genstats, pixel_pairs=config.conv_pixel_pairs,
                          residual_grad_sums=config.residual_grad_sums, wgrad_pixel_pairs=config.wgrad_pixel_pairs,
                          stream_priorities=config.stream_priorities, tune_in_graph=config.conv_tune_in_graph,
                          padded_input=config.padded_input, programmatic_launch=config.programmatic_launch,
                          programmatic_launch_early=config.programmatic_launch_early,
                          own_conv_channels=config.own_conv_channels)


def make_group(config, devices):
    """The communicator group of a data-parallel run: NCCL between GPUs unless --reduce host."""
    if devices[0] != "cpu" and config.reduce == "nccl":
        return NcclGroup(devices)
    return HostGroup(len(devices))


class _Silent:
    """Output and metrics of the ranks other than 0: everything is dropped."""

    def __call__(self, *args, **kwargs):
        pass

    def write(self, *args, **kwargs):
        pass


class SetupClock:
    """Seconds from the start of a run to its first training step, by phase (the chief's, in its thread)."""

    def __init__(self):
        self.started = self._last = time.time()
        self.phases = {}
        self.parts = {}         # phase -> {part: seconds} where the phase knows its parts (a GPU backend's)

    def mark(self, phase, parts=None):
        """The time since the previous mark was spent on `phase` (of which `parts`, {part: seconds}, if given)."""
        now = time.time()
        self.phases[phase] = round(now - self._last, 3)
        self._last = now
        if parts:
            self.parts[phase] = dict(parts)

    @property
    def seconds(self):
        return self._last - self.started

    def describe(self):
        """'5.1s: backend 4.3s (CUDA context 0.4s, cuDNN import 1.2s, cuDNN handles 3.5s), data 0.0s (loaded
        beside the backend 0.9s), model 0.1s'."""
        def phase_text(phase, seconds):
            parts = ", ".join(f"{part} {s:.1f}s" for part, s in self.parts.get(phase, {}).items())
            return f"{phase} {seconds:.1f}s" + (f" ({parts})" if parts else "")
        return f"{self.seconds:.1f}s: " + ", ".join(phase_text(*item) for item in self.phases.items())


def run(config, out=print, stop=None):
    """Train and evaluate as `config` says; returns the final evaluation dict. Once `stop` (a StopRequest) is
    requested, the workers stop at a step boundary and save a checkpoint there instead: the dict then says where
    (`stopped_at`, `checkpoint`) and has no evaluation."""
    stop = stop or StopRequest()
    clock = SetupClock()
    loading = load_in_background(config)
    devices = resolve_devices(config.devices)
    check_devices(devices)
    check_cuda_graph(config, devices)
    backend = build_backend(config, devices[0]) if len(devices) == 1 else None    # beside the load
    if backend is not None:
        clock.mark("backend", getattr(backend, "setup_phases", None))
    dataset = loading.result()
    clock.mark("data", {"loaded beside the backend" if backend is not None else "loaded": loading.seconds})
    check_against_data(config, dataset)
    if backend is not None:
        with claim_model_dir(config.model_dir) as model_dir:      # one run per model dir
            return run_worker(config, dataset, backend, devices, model_dir, out, clock, stop)
    return run_data_parallel(config, dataset, devices, out, clock, stop)


def run_data_parallel(config, dataset, devices, out, clock, stop):
    """One worker thread per device, each running run_worker with its rank of one communicator group.

    The backends are built in the worker threads (a GPU backend binds its device and stream to the
    thread that builds it), so the flag checks they would make run here first: bad flags must end the
    run before the model dir is written.
    """
    check_dtype(devices[0], config.dtype)          # every worker has the same kind of device
    group = make_group(config, devices)
    with claim_model_dir(config.model_dir) as model_dir:     # one run per model dir

        def worker(rank, device):
            backend = build_backend(config, device)
            if rank == 0:
                clock.mark("backend", getattr(backend, "setup_phases", None))
            comm = group.communicator(rank, backend)
            return run_worker(config, dataset, backend, devices, model_dir, out if rank == 0 else _Silent(),
                              clock, stop, comm)

        return run_workers(devices, worker, group)[0]


def run_worker(config, dataset, backend, devices, model_dir, out, clock, stop, comm=None):
    """The whole run on one backend: alone (comm None) or as one rank of a data-parallel group.
    clock: the run's SetupClock (only the chief marks it); stop: the run's StopRequest."""
    chief = comm is None or comm.rank == 0          # prints, writes metrics and checkpoints
    out(f"cupynet {__version__}: {dataset.description}")
    if config.dataset_kind == "sample":
        demo = ", ".join(f"{flag_of(name)} {value}" for name, value in DEMO_DEFAULTS.items())
        out(f"  the built-in demo sample: flags not given take demo defaults ({demo}); "
            f"pass --data-dir DIR for the full CIFAR-10")
    trainer = Trainer(config, dataset, backend, comm)
    params = trainer.model.params
    out(f"model: ResNet-{config.num_layers} {config.block}, {params.num_elements:,} parameters | "
        f"backend: {backend.name} on {', '.join(map(str, devices))}, {backend.layout} {backend.dtype} | "
        f"batch {config.train_batch_size}{shard_note(trainer, comm)}, "
        f"{trainer.sampler.steps_per_epoch} steps/epoch")

    resumed_from = latest_checkpoint(model_dir)
    if resumed_from:
        arrays, meta = load_checkpoint(resumed_from)
        trainer.restore(arrays, meta, os.path.basename(resumed_from))
        out(f"model dir: {model_dir} | resuming from {os.path.basename(resumed_from)} (step {trainer.step})")
        if trainer.seed != config.seed:
            out(f"  (continuing with the checkpoint's seed {trainer.seed}, not --seed {config.seed})")
        changes = recipe_changes(meta, config, len(dataset.train))
        if changes:
            out(f"  (changed since the checkpoint: {', '.join(changes)})")
    else:
        out(f"model dir: {model_dir} | starting at step 0")
    trainer.broadcast_state()      # replicas start identical, fresh or resumed (no-op alone)

    if chief:
        clock.mark("model")        # built, initialized or restored, the data on the device
        out(f"setup {clock.describe()}")
    metrics = MetricsLog(model_dir) if chief else _Silent()
    metrics.write("start", step=trainer.step, resumed_from=resumed_from, config=config.to_dict(),
                  dataset=dataset.description, backend=backend.name, devices=[str(d) for d in devices])
    split = dataset.test if config.eval_on == "test" else dataset.validation
    # A diverging run is reported once, by train_loop (TrainingDiverged), not by the NumPy reference's warnings about
    # the overflows that lead to it (np.errstate holds in this thread: each worker's own).
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        loop = train_loop(trainer, config, model_dir, metrics, out, chief, stop, split)
    if loop.stopped:                     # on request, with the model dir's latest checkpoint at this step
        checkpoint = latest_checkpoint(model_dir) if chief else None    # the chief's: None if nothing was saved
        metrics.write("stopped", step=trainer.step, checkpoint=checkpoint and os.path.basename(checkpoint))
        return dict(stopped_at=trainer.step, checkpoint=checkpoint, train_seconds=loop.seconds)

    eval_started = time.time()
    trainer.average_moving_statistics()
    result = trainer.evaluate(split)
    eval_seconds = time.time() - eval_started
    wall = time.time() - clock.started
    train_seconds = loop.seconds - loop.eval_seconds
    metrics.write("eval", step=trainer.step, split=config.eval_on, wall_seconds=round(wall, 3),
                  setup_seconds=round(clock.seconds, 3), setup_phases=clock.phases, setup_parts=clock.parts,
                  eval_seconds=round(eval_seconds, 3), evaluations_during_training=loop.evaluations,
                  eval_during_training_seconds=round(loop.eval_seconds, 3), **result)
    during = (f", {loop.evaluations} evaluation{'s' if loop.evaluations > 1 else ''} during training "
              f"{format_duration(loop.eval_seconds)}" if loop.evaluations else "")
    out(f"final: {config.eval_on} accuracy {result['accuracy']:.2%} ({result['correct']}/{result['images']}), "
        f"loss {result['loss']:.4f}, global step {trainer.step}, wall time {format_duration(wall)} "
        f"(setup {format_duration(clock.seconds)}, train {format_duration(train_seconds)}{during}, "
        f"eval {format_duration(eval_seconds)})")
    return dict(result, step=trainer.step, wall_seconds=wall, setup_seconds=clock.seconds,
                setup_phases=dict(clock.phases), setup_parts=dict(clock.parts), eval_seconds=eval_seconds,
                evaluations_during_training=loop.evaluations, eval_during_training_seconds=loop.eval_seconds)


def shard_note(trainer, comm):
    """' = 2 workers x 32 (host all-reduce[, sync BN])' for a data-parallel run, '' alone."""
    if comm is None:
        return ""
    sync_bn = ", sync BN" if trainer.config.sync_bn else ""
    return f" = {comm.size} workers x {trainer.shard_size} ({comm.kind} all-reduce{sync_bn})"


class LoopOutcome(NamedTuple):
    seconds: float               # in the training loop, the evaluations during it included
    stopped: bool                # on a stop request (SIGTERM), not at --train-steps
    evaluations: int = 0         # every --eval-interval steps
    eval_seconds: float = 0.0    # their part of `seconds`


def train_loop(trainer, config, model_dir, metrics, out, chief, stop, eval_split=None):
    """Train from trainer.step to config.train_steps, or to the step where `stop` has the workers stop, with a
    checkpoint there unless the model dir has one; every config.eval_interval steps before the last, evaluate
    `eval_split` (when given). Returns a LoopOutcome."""
    rank = trainer.comm.rank if trainer.comm is not None else 0
    saved_step = trainer.step            # what the model dir holds already (a fresh run: nothing to save yet)
    if trainer.step >= config.train_steps and not stop.should_stop(rank, trainer.step):
        out(f"already at step {trainer.step} (--train-steps {config.train_steps}): nothing to train, evaluating")
        return LoopOutcome(0.0, False)
    started = time.time()
    mark_time, mark_step = started, trainer.step
    warming_up = trainer.runner.capture
    evaluations, eval_seconds = 0, 0.0
    while not stop.should_stop(rank, trainer.step):     # the same answer at the same step on every worker
        if trainer.step >= config.train_steps:
            return LoopOutcome(time.time() - started, False, evaluations, eval_seconds)
        lr = trainer.learning_rate
        trainer.train_step()
        step = trainer.step
        if warming_up and trainer.runner.captured:
            # What starting costs, once: the eager steps compiled kernels and picked cuDNN engines (autotuning
            # every candidate), then the step was recorded and its first replay ran. Every later step is a replay.
            trainer.be.synchronize()
            warming_up, seconds = False, time.time() - started
            out(f"warm-up: {seconds:.1f}s for the first {trainer.runner.eager_steps + 1} steps (eager steps "
                f"autotuning the convolutions, then the step recorded as a CUDA graph); replays from here")
            metrics.write("warmup", step=step, seconds=round(seconds, 3))
        if step % config.log_interval == 0 or step == config.train_steps:
            trainer.be.synchronize()
            now = time.time()
            images_per_sec = (step - mark_step) * config.train_batch_size / max(now - mark_time, 1e-9)
            eta = (config.train_steps - step) * config.train_batch_size / max(images_per_sec, 1e-9)
            loss = trainer.take_mean_loss()
            total_loss = loss + trainer.l2_penalty()
            out(progress_line(step, config.train_steps, trainer.epoch, loss, lr, images_per_sec, eta))
            metrics.write("train", step=step, epoch=round(trainer.epoch, 4), loss=loss,
                          total_loss=total_loss, lr=lr, images_per_sec=round(images_per_sec, 2))
            if chief and not math.isfinite(total_loss):     # the others: see diverged()
                diverged(model_dir, metrics, step, f"its mean loss since step {mark_step} is {loss:g} and its "
                                                   f"L2 term {total_loss - loss:g}")
            mark_time, mark_step = time.time(), step
        if (eval_split is not None and config.eval_interval and step % config.eval_interval == 0
                and step < config.train_steps):      # the final evaluation follows the last step
            seconds = evaluate_during_training(trainer, config, eval_split, metrics, out)
            evaluations, eval_seconds = evaluations + 1, eval_seconds + seconds
            mark_time += seconds                     # not in the next progress line's images/s
        if step % config.checkpoint_interval == 0 or step == config.train_steps:   # always one at the end
            save(trainer, model_dir, config, chief, metrics)
            saved_step = step
    if trainer.step != saved_step:       # every worker stopped at this step: the same collectives on all
        save(trainer, model_dir, config, chief, metrics)
    # Every worker's part of the last collectives runs before it leaves: no later read of its own (as an evaluation
    # has) would wait for them, and its peers' do.
    trainer.be.synchronize()
    return LoopOutcome(time.time() - started, True, evaluations, eval_seconds)


def evaluate_during_training(trainer, config, split, metrics, out):
    """One evaluation between two steps (every worker at the same step: a collective); returns its seconds."""
    trainer.be.synchronize()                         # the steps before it are not its time
    started = time.time()
    result = trainer.evaluate_during_training(split)
    seconds = time.time() - started
    step, width = trainer.step, len(str(config.train_steps))
    out(f"step {step:>{width}}/{config.train_steps}  epoch {trainer.epoch:6.2f}  {config.eval_on} accuracy "
        f"{result['accuracy']:.2%} ({result['correct']}/{result['images']}), loss {result['loss']:.4f} "
        f"(evaluated in {seconds:.1f}s)")
    metrics.write("eval_during_training", step=step, epoch=round(trainer.epoch, 4), split=config.eval_on,
                  seconds=round(seconds, 3), **result)
    return seconds


def save(trainer, model_dir, config, chief, metrics):
    """A checkpoint at the current step; every worker takes part (the moving statistics' mean), the chief writes.
    A state that is no longer finite is never saved: the run stops instead (TrainingDiverged)."""
    trainer.average_moving_statistics()      # the checkpoint holds the replicas' mean statistics
    if not chief:
        return
    arrays = trainer.checkpoint_arrays()
    broken = [name for name, array in arrays.items() if not np.isfinite(array).all()]
    if broken:      # BatchNorm can keep the loss finite while a moving variance has overflowed
        more = f" and {len(broken) - 1} more of its arrays" if len(broken) > 1 else ""
        diverged(model_dir, metrics, trainer.step, f"{broken[0]}{more} no longer finite (NaN or infinity)")
    save_checkpoint(model_dir, trainer.step, arrays, trainer.checkpoint_meta(), keep=config.keep_checkpoints)


def diverged(model_dir, metrics, step, what):
    """End the run: the training diverged (the reference tutorial's 'Model diverged with loss = NaN'), found at a
    progress line or before a checkpoint, so no checkpoint holds it. The chief alone checks and raises (it writes
    the metrics): the run's group is then aborted (parallel.run_workers), which takes the other workers out of
    their next collective."""
    metrics.write("diverged", step=step, what=what)
    kept = latest_checkpoint(model_dir)
    kept = f"{os.path.basename(kept)}, from before it, is the latest checkpoint" if kept else "no checkpoint was saved"
    raise TrainingDiverged(f"the training diverged by step {step}: {what}; {kept} (a lower --lr-values may help)")


def main(argv=None):
    return exit_status(lambda: run_command(argv), resumable=True)


def run_command(argv):
    """The command's work and its SIGTERM endings (exit_status has the others): the exit status."""
    stop = StopRequest()
    try:
        with stop_on_sigterm(stop):
            result = run(parse_args(argv), stop=stop)
    except Terminated:
        print("terminated (a second SIGTERM): the last complete checkpoint is intact; rerun the same command to "
              "resume", file=sys.stderr)
        return 143
    if "stopped_at" in result:
        checkpoint = result["checkpoint"]
        held = f"{os.path.basename(checkpoint)} holds it" if checkpoint else "nothing trained, nothing saved"
        print(f"terminated (SIGTERM) at step {result['stopped_at']}: {held}; rerun the same command to resume",
              file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
