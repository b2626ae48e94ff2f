"""Where a GPU run's setup goes: the CUDA context, the cuDNN Frontend's import, cuDNN's libraries, its handles.

    python bench/setup_costs.py --device 0                 # 2 fresh processes per order, medians
    python bench/setup_costs.py --device 0 --runs 3 --json out.json

A run's setup counts against its wall time: on an H100 (2026-11-27) the GPU backend's took 4.3 s of a 146.9-s
time-to-accuracy run, the CUDA context and then cuDNN. Since 2026-11-29 the backend imports the Frontend beside the
context (cupynet/backends/cudnn_conv.py, import_frontend_in_background). This says what the rest is. Each run is a
fresh Python process (a library loads once per process) that times each part, in one of two orders:

  backend   as CupyBackend does it: `import cupy`, the context (the device and a first stream), `import cudnn`,
            the first cuDNN handle, a second one, then one convolution planned and run (the heuristics' first
            plan; training does that in its warm-up, after its setup);
  preload   `import cupy`, `import cudnn`, then every other libcudnn*.so* in the folder of the libcudnn it loaded
            (cudnn_folders says where else it looks), opened one by one (ctypes, RTLD_GLOBAL: cuDNN's own loading
            later finds them loaded) and timed, then the context, the handles and the convolution as above.

With each part's seconds, the cuDNN libraries the process has mapped after the import and after the first handle
(read from /proc/self/maps). If the first handle is much faster in the preload order, its seconds in the backend
order are cuDNN opening its libraries, which needs no context: the backend's import thread could open those (and
only those) beside the context too. Prints the medians per order and writes JSON (--json, default
bench/results/setup_costs-<host>.json) with bench/layouts.py's environment(). GPU only: without one (or without
CuPy) it says so in one line, `error: ...`, with exit status 2; a measured process failing is exit status 1.
"""
import argparse
import ctypes
import glob
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.layers import default_json, write_json                  # noqa: E402
from bench.cli import check_device, is_count, run_script           # noqa: E402
from bench.layouts import environment                               # noqa: E402
from cupynet.config import OneLineErrorParser                       # noqa: E402
from cupynet.errors import CupynetError                             # noqa: E402

ORDERS = ("backend", "preload")
CHILD_TIMEOUT_S = 120
# The probe convolution: stage 1's 3x3 at batch 128, NHWC float32 (any convolution makes cuDNN load its engines)
PROBE_INPUT, PROBE_WEIGHT = (128, 32, 32, 16), (16, 3, 3, 16)


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", required=True, help="the GPU id")
    p.add_argument("--runs", type=int, default=2, help="fresh processes per order (medians reported)")
    p.add_argument("--json", help="output file (default bench/results/setup_costs-<host>.json)")
    p.add_argument("--child", choices=ORDERS, help=argparse.SUPPRESS)     # one measured process (internal)
    args = p.parse_args(argv)
    if not is_count(args.device):
        p.error(f"--device must be a GPU id (the setup measured is the GPU backend's), got {args.device!r}")
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    return args


def mapped_cudnn_libraries():
    """The cuDNN libraries this process has mapped (paths, sorted; empty where /proc is not there)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if line.count(" ") >= 5}
    except (OSError, IndexError):
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith("libcudnn"))


def cudnn_folders(mapped):
    """Where cuDNN's libraries are: the folders of the mapped ones; else (a Frontend that opens cuDNN only when first
    asked) the folders on LD_LIBRARY_PATH, or of an nvidia-cudnn wheel on sys.path, that hold a libcudnn.so*."""
    if mapped:
        return sorted({os.path.dirname(p) for p in mapped})
    candidates = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    candidates += [os.path.join(entry, "nvidia", "cudnn", "lib") for entry in sys.path if entry]
    return [d for d in dict.fromkeys(candidates) if glob.glob(os.path.join(d, "libcudnn.so*"))]


def libraries_beside(folders, mapped):
    """Every libcudnn*.so* in `folders` that is not mapped yet, each file once (links resolved)."""
    loaded = {os.path.realpath(p) for p in mapped}
    found = {}
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "libcudnn*.so*"))):
            real = os.path.realpath(path)
            if real not in loaded and real not in found.values():
                found[path] = real
    return list(found)


def measure_once(order, device):
    """One process's parts, in seconds, in `order`; and the libraries mapped along the way."""
    parts, notes = {}, {}
    last = time.perf_counter()

    def mark(part):
        nonlocal last
        now = time.perf_counter()
        parts[part] = round(now - last, 4)
        last = now

    import cupy
    mark("import cupy")

    def context():
        cupy.cuda.Device(device).use()
        return cupy.cuda.Stream(non_blocking=True)

    if order == "backend":
        stream = context()
        mark("CUDA context")
        import cudnn
        mark("import cudnn")
    else:
        import cudnn
        mark("import cudnn")
        preloaded = {}
        mapped = mapped_cudnn_libraries()
        for path in libraries_beside(cudnn_folders(mapped), mapped):
            started = time.perf_counter()
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                preloaded[os.path.basename(path)] = round(time.perf_counter() - started, 4)
            except OSError as error:
                preloaded[os.path.basename(path)] = f"not opened: {error}"
        notes["preloaded"] = preloaded
        mark("open cuDNN's libraries")
        stream = context()
        mark("CUDA context")
    notes["mapped after the import"] = [os.path.basename(p) for p in mapped_cudnn_libraries()]
    last = time.perf_counter()
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=stream.ptr)
    mark("first cuDNN handle")
    notes["mapped after the first handle"] = [os.path.basename(p) for p in mapped_cudnn_libraries()]
    cudnn.create_handle()
    mark("second cuDNN handle")
    from cupynet.backends.cudnn_conv import CudnnConv
    with stream:
        conv = CudnnConv(handle, "NHWC", "float32")
        x, w = cupy.zeros(PROBE_INPUT, cupy.float32), cupy.zeros(PROBE_WEIGHT, cupy.float32)
        conv.forward(x, w, 1, 1, cupy.empty(PROBE_INPUT, cupy.float32))
        stream.synchronize()
    mark("first convolution")
    return {"order": order, "parts": parts, "notes": notes}


def run_child(order, device):
    """measure_once in a fresh process (this script with --child): its report, or CupynetError with its last line."""
    command = [sys.executable, os.path.abspath(__file__), "--device", str(device), "--child", order]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CupynetError(f"a {order}-order process took more than {CHILD_TIMEOUT_S} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CupynetError(f"a {order}-order process failed (exit {done.returncode}): {last}")
    return json.loads(lines[-1])


def medians(runs):
    """{part: median seconds} over runs of one order, parts in the order they ran."""
    names = list(dict.fromkeys(part for run in runs for part in run["parts"]))
    return {name: round(statistics.median(run["parts"][name] for run in runs if name in run["parts"]), 4)
            for name in names}


def main(argv=None):
    args = parse_args(argv)
    device = int(args.device)
    if args.child:
        print(json.dumps(measure_once(args.child, device)))
        return 0
    try:
        runs = {order: [] for order in ORDERS}
        for _ in range(args.runs):               # the orders taking turns: the page cache is warm for both alike
            for order in ORDERS:
                runs[order].append(run_child(order, device))
        env = environment(device)
    except CupynetError as error:
        # A GPU that is not there (or no CuPy) is bad input: one line and exit status 2. Asked only now: the check
        # imports CuPy and cuDNN, which would warm the page cache for the first measured process.
        check_device(args.device)
        print(f"error: {error}", file=sys.stderr)           # a measured process failed on a GPU that is there
        return 1
    summary = {order: medians(runs[order]) for order in ORDERS}
    for order in ORDERS:
        parts = summary[order]
        print(f"{order:>8} order (median of {args.runs}): {sum(parts.values()):.2f} s: "
              + ", ".join(f"{name} {seconds:.3f}" for name, seconds in parts.items()))
    first = runs["backend"][0]["notes"]
    print(f"cuDNN libraries mapped after `import cudnn`: {', '.join(first['mapped after the import']) or 'none'}; "
          f"after the first handle: {', '.join(first['mapped after the first handle']) or 'none'}")
    preloaded = runs["preload"][0]["notes"]["preloaded"]
    if preloaded:
        print("opened ahead (first preload-order run): "
              + ", ".join(f"{name} {value if isinstance(value, str) else f'{value:.3f} s'}"
                          for name, value in preloaded.items()))
    path = args.json or default_json("setup_costs")
    write_json(path, {"benchmark": "setup_costs", "environment": env, "args": vars(args), "medians": summary,
                      "runs": runs})
    return 0


if __name__ == "__main__":
    run_script(main)
