"""The fastest step options measured by bench/layouts.py, as flags for the scripts that train or compare.

    python bench/best_step_options.py step_options.json [more.json ...] --dtype bfloat16 --batch 128
    --wgrad-streams 2 --wgrad-chunks 2              (stdout: flags for cupynet.train, vs_torch.py, time_to_accuracy.py)

Reads the rows of `bench/layouts.py --json` files (grids over the step options, bench/step_options.py: wgrad
streams and chunks, deterministic engines or not, split-K settings, BatchNorm launches, genstats, ...), keeps the
captured ones of the given dtype, batch and layout (not those that failed), and prints the flags of the fastest.
The defaults (cupynet.train's: 1 stream, 1 chunk, deterministic engines, 2 BatchNorm launches, every other option
off) win unless the fastest row beats them by more than --min-gain (default 2%): a difference inside the windows'
spread is not worth leaving the defaults for. Prints nothing for the defaults. Why it chose, with both figures,
goes to stderr; so does a file that could not be read, when another could.
bench/device_check.sh uses it to run the accuracy and the PyTorch comparison with the options its own
step_options stage found fastest, in the same device call.

A bad flag, a missing or unreadable file (when no other could be read), or no matching row, is a one-line error,
`error: ...`, and exit status 2.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import step_options   # noqa: E402
from bench.cli import check_at_least, run_script   # noqa: E402
from cupynet.config import DTYPES, OneLineErrorParser   # noqa: E402
from cupynet.errors import ConfigError   # noqa: E402


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="bench/layouts.py JSON files")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--layout", default="NHWC", choices=("NCHW", "NHWC"))
    p.add_argument("--min-gain", type=float, default=0.02,
                   help="how much faster than the defaults the best row must be to be chosen (0.02: 2%%)")
    args = p.parse_args(argv)
    check_at_least(p.error, args, 1, "batch")
    check_at_least(p.error, args, 0, "min_gain")
    return args


def read_rows(path):
    """The rows of a bench/layouts.py JSON file; ValueError saying (without the path) why there are none."""
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as error:
        raise ValueError(error.strerror or str(error)) from None        # its str() names the path again
    except ValueError as error:                                         # not JSON, or not UTF-8
        raise ValueError(f"not JSON ({error})") from None
    rows = report.get("results") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError("no 'results' list of rows: not a bench/layouts.py --json file")
    return rows


def options_of(row):
    """The step options of a layouts.py row, by name (older rows lack the later fields: they ran the defaults; a
    null field, an option the backend lacks, counts as its default too)."""
    return {name: default if row.get(name) is None else row[name] for name, default in step_options.DEFAULTS.items()}


def choose(rows, dtype, batch, layout, min_gain):
    """(options, best row, default row or None): the fastest captured row's options, or the defaults'
    unless it beats them by more than min_gain. ValueError when no row matches."""
    matching = [row for row in rows if row.get("captured") and row.get("dtype") == dtype
                and row.get("batch") == batch and row.get("layout") == layout and "error" not in row
                and isinstance(row.get("images_per_sec"), (int, float))]
    if not matching:
        raise ValueError(f"no captured {layout} {dtype} batch-{batch} row")
    best = max(matching, key=lambda row: row["images_per_sec"])
    default = next((row for row in matching if options_of(row) == step_options.DEFAULTS), None)
    if default is not None and best["images_per_sec"] <= default["images_per_sec"] * (1 + min_gain):
        return step_options.DEFAULTS, best, default
    return options_of(best), best, default


def main(argv=None):
    args = parse_args(argv)
    rows, read, problems = [], [], []
    for path in args.results:
        try:
            rows += read_rows(path)
            read.append(path)
        except ValueError as error:
            problems.append(f"{path}: {error}")
    if not read:
        raise ConfigError("; ".join(problems))
    try:
        options, best, default = choose(rows, args.dtype, args.batch, args.layout, args.min_gain)
    except ValueError as error:
        skipped = f" (skipped {'; '.join(problems)})" if problems else ""
        raise ConfigError(f"{', '.join(read)}: {error}{skipped}") from None
    for problem in problems:
        print(f"best_step_options: skipped {problem}", file=sys.stderr)
    against = f"; defaults {default['images_per_sec']:.0f}" if default else "; defaults not measured"
    print(f"best_step_options: {step_options.describe(options)} ({args.layout} {args.dtype} batch {args.batch}: "
          f"fastest {step_options.describe(options_of(best))} {best['images_per_sec']:.0f} img/s{against})",
          file=sys.stderr)
    print(" ".join(step_options.flags(options)))


if __name__ == "__main__":
    run_script(main)
