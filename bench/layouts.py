"""Training throughput of the ResNet per depth, batch, memory layout and precision.

    python bench/layouts.py                                   # CPU: ResNet-20/44, batch 128, NCHW and NHWC
    python bench/layouts.py --depths 20 --batches 64 --layouts NHWC --repeats 7
    python bench/layouts.py --quick                           # a tiny grid, for CI (checks the script runs)

Each configuration trains on synthetic data already on the device (the real input kernel, random images):
warm-up steps first (excluded), then `--repeats` timed windows of `--steps` full training steps
(augment -> forward -> backward -> momentum update); images/s is reported as the median of the windows
with min and max. Prints a table and writes JSON (`--json`, default bench/results/layouts-<host>.json)
with the hardware, library versions, git commit and the full config of each row.
Only the NumPy (CPU) backend exists in this version; the GPU backend adds CUDA-event timing here.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cupynet import __version__                                   # noqa: E402
from cupynet.backends import create_backend                        # noqa: E402
from cupynet.config import TrainConfig                             # noqa: E402
from cupynet.data import synthetic_dataset                         # noqa: E402
from cupynet.trainer import Trainer                                # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="20,44", help="comma-separated ResNet depths (6n+2)")
    p.add_argument("--batches", default="128", help="comma-separated batch sizes")
    p.add_argument("--layouts", default="NCHW,NHWC")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    p.add_argument("--steps", type=int, default=2, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per configuration (median reported)")
    p.add_argument("--quick", action="store_true", help="ResNet-8, batch 8, NHWC and NCHW, 2 windows of 1 step")
    p.add_argument("--json", help="output file (default bench/results/layouts-<host>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.depths, args.batches, args.warmup, args.steps, args.repeats = "8", "8", 1, 1, 2
    return args


def environment():
    """Hardware and versions, recorded with every result."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    blas = None
    try:
        blas = [lib.get("version") or lib.get("name") for lib in np.show_config(mode="dicts")["Build Dependencies"].values()]
    except Exception:   # older NumPy without mode="dicts": the version alone is enough
        pass
    return {"cupynet": __version__, "git_commit": commit, "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "host": platform.node(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def measure(depth, batch, layout, dtype, args, dataset):
    config = TrainConfig(num_layers=depth, train_batch_size=batch, data_format=layout, dtype=dtype,
                         synthetic=True)
    backend = create_backend(args.device, layout, dtype)
    trainer = Trainer(config, dataset, backend)
    for _ in range(args.warmup):
        trainer.train_step()
    backend.synchronize()
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        backend.synchronize()
        rates.append(args.steps * batch / (time.perf_counter() - start))
    loss = trainer.take_mean_loss()
    if not np.isfinite(loss):
        raise RuntimeError(f"ResNet-{depth} {layout} {dtype}: loss is {loss}, not timing a broken step")
    median = statistics.median(rates)
    return {"backend": backend.name, "device": args.device, "depth": depth, "batch": batch, "layout": layout,
            "dtype": dtype, "images_per_sec": round(median, 2), "images_per_sec_min": round(min(rates), 2),
            "images_per_sec_max": round(max(rates), 2), "step_ms": round(1000 * batch / median, 2),
            "windows": args.repeats, "steps_per_window": args.steps, "warmup_steps": args.warmup,
            "mean_loss": round(loss, 4)}


def main(argv=None):
    args = parse_args(argv)
    ints = lambda text: [int(v) for v in text.split(",")]
    batches = ints(args.batches)
    dataset = synthetic_dataset(num_train=max(batches) * 4, num_test=max(batches), seed=0)
    env = environment()
    print(f"cupynet {env['cupynet']} ({env['git_commit']}) | numpy {env['numpy']} | {env['cpu']}, "
          f"{env['cpu_count']} cores | {args.repeats} windows x {args.steps} steps after {args.warmup} warm-up")
    print(f"{'depth':>5} {'batch':>5} {'layout':>6} {'dtype':>8} {'img/s':>9} {'min':>9} {'max':>9} {'ms/step':>9}")
    rows = []
    for depth in ints(args.depths):
        for batch in batches:
            for layout in args.layouts.split(","):
                for dtype in args.dtypes.split(","):
                    row = measure(depth, batch, layout, dtype, args, dataset)
                    rows.append(row)
                    print(f"{depth:>5} {batch:>5} {layout:>6} {dtype:>8} {row['images_per_sec']:>9.1f} "
                          f"{row['images_per_sec_min']:>9.1f} {row['images_per_sec_max']:>9.1f} {row['step_ms']:>9.1f}",
                          flush=True)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"layouts-{platform.node() or 'host'}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"benchmark": "layouts", "environment": env, "args": vars(args), "results": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
