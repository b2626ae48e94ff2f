"""Data-parallel scaling: images/s and efficiency vs worker count, and the all-reduce alone.

    python bench/scaling.py                                 # CPU workers: 1 and 2 x 'cpu', ResNet-20, batch 128
    python bench/scaling.py --workers 1,2 --depth 44 --batch 64 --repeats 5
    python bench/scaling.py --quick                         # ResNet-8, batch 8, workers 1,2, 2 windows of 1 step
    python bench/scaling.py --device 0 --workers 1,2,4      # N workers sharing GPU 0 (shared-GPU collectives)
    python bench/scaling.py --device 0 --workers 1 --comm nccl        # NCCL with one rank

For each N in `--workers`, N worker threads run through the real machinery of a data-parallel run
(cupynet/parallel.py `run_workers`, a `HostGroup` communicator, one Trainer replica per worker; see
cupynet/train.py `run_data_parallel`), on synthetic data with the global batch fixed (each worker trains
batch / N). Even N = 1 runs as a one-rank group, so every N pays the same per-step all-reduce machinery.
After `--warmup` untimed steps, rank 0 times `--repeats` windows of `--steps` steps (the per-step
gradient all-reduce keeps the ranks in lockstep, so rank 0's wall time is the group's);
images/s = median over windows of steps x global batch / seconds, efficiency = (img/s at N) / (img/s at 1).
The all-reduce alone: the same group all-reduces (mean) a float32 buffer of `model.params.total` elements,
the size of the flat gradient, `--repeats` times; the median seconds is reported.
`--comm` picks the communicator: `host` (HostGroup: through host memory, never captured), `shared`
(cupynet/shared_gpu.py: kernels on each worker's stream, workers sharing one GPU, captured in a CUDA graph
under the default --cuda-graph auto), `nccl` (one rank: NCCL refuses two ranks on one GPU); `auto` is host on
the CPU and shared on a GPU. Each row records the communicator and whether the step was captured.
Prints a table and writes JSON (`--json`, default bench/results/scaling-<host>.json) with `environment()`.
Bad input (a flag, a depth not 6n+2, a dtype the device lacks, a GPU that is not there) is one line, `error: ...`,
and exit status 2.
"""
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.layers import default_json, write_json                        # noqa: E402
from bench.cli import (check_at_least, check_device, depth_problem, device_of, dtype_problem,   # noqa: E402
                       is_count, is_device, run_script)
from bench.layouts import WallTimer, environment                          # noqa: E402
from cupynet.backends import create_backend                              # noqa: E402
from cupynet.config import OneLineErrorParser, TrainConfig               # noqa: E402
from cupynet.data import synthetic_dataset                               # noqa: E402
from cupynet.parallel import HostGroup, NcclGroup, run_workers           # noqa: E402
from cupynet.step_graph import WARMUP_STEPS                              # noqa: E402
from cupynet.trainer import Trainer                                      # noqa: E402


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (the first is the baseline)")
    p.add_argument("--device", default="cpu", help="'cpu' or a GPU id (N workers share it)")
    p.add_argument("--depth", type=int, default=20, help="ResNet depth (6n+2)")
    p.add_argument("--batch", type=int, default=128, help="global batch, fixed for every worker count")
    p.add_argument("--layout", default="NHWC", choices=("NCHW", "NHWC"))
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 (GPU) or float64 (CPU)")
    p.add_argument("--comm", default="auto", choices=("auto", "host", "shared", "nccl"),
                   help="communicator (auto: host on the CPU, shared on a GPU)")
    p.add_argument("--cuda-graph", default="auto", choices=("auto", "on", "off"), help="as the training flag")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per worker count")
    p.add_argument("--steps", type=int, default=2, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (and all-reduces), median reported")
    p.add_argument("--quick", action="store_true", help="ResNet-8, batch 8, workers 1,2, 2 windows of 1 step")
    p.add_argument("--json", help="output file (default bench/results/scaling-<host>.json)")
    args = p.parse_args(argv)
    if not is_device(args.device):
        p.error(f"--device: 'cpu' or a GPU id, got {args.device!r}")
    if not all(is_count(n) and int(n) > 0 for n in args.workers.split(",")):
        p.error(f"--workers: a comma-separated list of positive integers, got {args.workers!r}")
    for problem in (depth_problem(args.depth), dtype_problem(args.dtype, args.device)):
        if problem:
            p.error(problem)
    check_at_least(p.error, args, 1, "batch", "steps", "repeats")
    check_at_least(p.error, args, 0, "warmup")
    if args.cuda_graph == "on" and args.device == "cpu":
        p.error("--cuda-graph on needs a GPU (--device 0): the CPU backend has no CUDA graphs")
    if args.quick:
        args.depth, args.batch, args.workers, args.warmup, args.steps, args.repeats = 8, 8, "1,2", 1, 1, 2
    args.worker_counts = [int(n) for n in args.workers.split(",")]
    bad = [n for n in args.worker_counts if args.batch % n]
    if bad:
        p.error(f"--batch {args.batch} must split evenly over every worker count (not {bad[0]})")
    if args.comm == "auto":
        args.comm = "host" if args.device == "cpu" else "shared"
    if args.comm != "host" and args.device == "cpu":
        p.error(f"--comm {args.comm} needs a GPU (--device 0)")
    if args.comm == "nccl" and max(args.worker_counts) > 1:
        p.error("--comm nccl runs one rank only: NCCL refuses two ranks on one GPU")
    return args


def make_group(args, n):
    if args.comm == "shared":
        from cupynet.shared_gpu import SharedGpuGroup
        return SharedGpuGroup(n, device_of(args.device))
    if args.comm == "nccl":
        return NcclGroup([device_of(args.device)] * n)
    return HostGroup(n)


def timed_windows(timer, repeats, fn):
    """Seconds of each of `repeats` windows, each running fn() once."""
    seconds = []
    for _ in range(repeats):
        timer.start()
        fn()
        seconds.append(timer.stop())
    return seconds


def worker_run(args, dataset, group):
    """worker_fn for run_workers: train, time the windows, then time the all-reduce alone."""
    config = TrainConfig(num_layers=args.depth, train_batch_size=args.batch, data_format=args.layout,
                         dtype=args.dtype, synthetic=True, cuda_graph=args.cuda_graph)

    def worker(rank, device):
        backend = create_backend(device, args.layout, args.dtype)    # in the worker thread, as train.py does
        comm = group.communicator(rank, backend)
        trainer = Trainer(config, dataset, backend, comm)
        trainer.broadcast_state()
        # A captured step is recorded after WARMUP_STEPS eager ones: the recording step is never timed.
        for _ in range(max(args.warmup, WARMUP_STEPS + 1) if trainer.runner.capture else args.warmup):
            trainer.train_step()
        timer = WallTimer(backend)      # wall time: what a run waits for, all-reduce through the host included

        def window():
            for _ in range(args.steps):
                trainer.train_step()
        step_windows = timed_windows(timer, args.repeats, window)
        loss = trainer.take_mean_loss()
        buffer = backend.zeros((trainer.model.params.total,), dtype=np.float32)
        reduce_seconds = timed_windows(timer, args.repeats, lambda: comm.all_reduce_mean(buffer))
        return {"step_windows_s": step_windows, "all_reduce_s": reduce_seconds, "loss": loss,
                "gradient_elements": trainer.model.params.total, "captured": trainer.runner.captured}
    return worker


def measure(n, args, dataset):
    """One row: N workers on `args.device`, rank 0's timings."""
    group = make_group(args, n)
    devices = [device_of(args.device)] * n
    result = run_workers(devices, worker_run(args, dataset, group), group)[0]
    if not np.isfinite(result["loss"]):
        raise RuntimeError(f"{n} workers: loss is {result['loss']}, not timing a broken step")
    rates = [args.steps * args.batch / s for s in result["step_windows_s"]]
    median = statistics.median(rates)
    return {"workers": n, "device": args.device, "communicator": args.comm, "captured": result["captured"],
            "global_batch": args.batch, "per_worker_batch": args.batch // n,
            "images_per_sec": round(median, 2), "images_per_sec_min": round(min(rates), 2),
            "images_per_sec_max": round(max(rates), 2), "step_ms": round(1000 * args.batch / median, 3),
            "gradient_elements": result["gradient_elements"],
            "all_reduce_s": statistics.median(result["all_reduce_s"]),
            "mean_loss": round(result["loss"], 4)}


def add_efficiency(rows):
    """efficiency = img/s at N / img/s at the first (baseline) worker count."""
    base = rows[0]["images_per_sec"]
    for row in rows:
        row["efficiency"] = round(row["images_per_sec"] / base, 4)


def main(argv=None):
    args = parse_args(argv)
    check_device(args.device)                       # a clear DeviceError before environment() asks CUDA
    dataset = synthetic_dataset(num_train=args.batch * 4, num_test=args.batch, seed=0)
    env = environment(args.device)
    print(f"{env.get('gpu', 'CPU')} | ResNet-{args.depth} {args.layout} {args.dtype}, global batch {args.batch} | "
          f"{args.repeats} windows x {args.steps} steps after {args.warmup} warm-up | {env['cpu_count']} cores")
    rows = [measure(n, args, dataset) for n in args.worker_counts]
    add_efficiency(rows)
    print(f"{'workers':>7} {'batch/w':>7} {'img/s':>9} {'min':>9} {'max':>9} {'ms/step':>9} {'effic.':>7} "
          f"{'allreduce ms':>12}")
    for r in rows:
        print(f"{r['workers']:>7} {r['per_worker_batch']:>7} {r['images_per_sec']:>9.1f} {r['images_per_sec_min']:>9.1f} "
              f"{r['images_per_sec_max']:>9.1f} {r['step_ms']:>9.2f} {r['efficiency']:>7.2f} "
              f"{1000 * r['all_reduce_s']:>12.3f}")
    print(f"(all-reduce: mean of {rows[0]['gradient_elements']:,} float32 elements = the flat gradient, "
          f"{args.comm} communicator; steps {'captured' if rows[0]['captured'] else 'eager'})")
    write_json(args.json or default_json("scaling"),
               {"benchmark": "scaling", "environment": env, "args": vars(args), "results": rows})


if __name__ == "__main__":
    run_script(main)
