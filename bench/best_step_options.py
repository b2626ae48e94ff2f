"""The fastest step options measured by bench/layouts.py, as flags for the scripts that train or compare.

    python bench/best_step_options.py step_options.json [more.json ...] --dtype bfloat16 --batch 128
    --wgrad-streams 2 --wgrad-chunks 2              (stdout: flags for cupynet.train, vs_torch.py, time_to_accuracy.py)

Reads the rows of `bench/layouts.py --json` files (grids over --wgrad-streams/--wgrad-chunks pairs,
--conv-deterministic, --conv-split-k, --bn-launches, --conv-genstats, --conv-pixel-pairs and --residual-grad-sums),
keeps the captured ones of the given dtype, batch and layout (not those that failed), and prints the flags of the
fastest. The defaults (1 stream, 1 chunk, deterministic engines, no split-K settings, 2 BatchNorm launches, no
genstats, no pixel pairs, no gradient sums in the residual add) win unless the fastest row beats them by more
than --min-gain (default 2%): a difference inside the windows' spread is not worth leaving the defaults for. Prints
nothing for the defaults. Why it chose, with both figures, goes to stderr; so does a file that could not be read,
when another could.
bench/device_check.sh uses it to run the accuracy and the PyTorch comparison with the options its own
step_options stage found fastest, in the same device call.

A missing or unreadable file, or no matching row, is a one-line error and exit status 2.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cupynet.backends import BN_LAUNCHES, WGRAD_CHUNKS, WGRAD_STREAMS   # noqa: E402

# (wgrad_streams, wgrad_chunks, conv_deterministic, conv_split_k, bn_launches, conv_genstats, conv_pixel_pairs,
#  residual_grad_sums)
DEFAULT_OPTIONS = (WGRAD_STREAMS, WGRAD_CHUNKS, True, False, BN_LAUNCHES, False, False, False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="bench/layouts.py JSON files")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--layout", default="NHWC")
    p.add_argument("--min-gain", type=float, default=0.02,
                   help="how much faster than the defaults the best row must be to be chosen (0.02: 2%%)")
    args = p.parse_args(argv)
    if args.min_gain < 0:
        p.error(f"--min-gain must be >= 0, got {args.min_gain}")
    return args


def options_of(row):
    """(wgrad_streams, wgrad_chunks, conv_deterministic, conv_split_k, bn_launches, conv_genstats, conv_pixel_pairs,
    residual_grad_sums) of a layouts.py row (older rows lack the later fields: they ran the defaults)."""
    return (row.get("wgrad_streams") or 1, row.get("wgrad_chunks") or 1, row.get("conv_deterministic", True),
            bool(row.get("conv_split_k")), row.get("bn_launches") or BN_LAUNCHES, bool(row.get("conv_genstats")),
            bool(row.get("conv_pixel_pairs")), bool(row.get("residual_grad_sums")))


def choose(rows, dtype, batch, layout, min_gain):
    """(options, best row, default row or None): the fastest captured row's options, or the defaults'
    unless it beats them by more than min_gain. ValueError when no row matches."""
    matching = [row for row in rows if row.get("captured") and row.get("dtype") == dtype
                and row.get("batch") == batch and row.get("layout") == layout and "error" not in row]
    if not matching:
        raise ValueError(f"no captured {layout} {dtype} batch-{batch} row")
    best = max(matching, key=lambda row: row["images_per_sec"])
    default = next((row for row in matching if options_of(row) == DEFAULT_OPTIONS), None)
    if default is not None and best["images_per_sec"] <= default["images_per_sec"] * (1 + min_gain):
        return DEFAULT_OPTIONS, best, default
    return options_of(best), best, default


def flags(options):
    """The command-line flags that select `options` (nothing for a default)."""
    streams, chunks, deterministic, split_k, bn_launches, genstats, pixel_pairs, residual_sums = options
    out = []
    if streams != WGRAD_STREAMS:
        out += ["--wgrad-streams", str(streams)]
    if chunks != WGRAD_CHUNKS:
        out += ["--wgrad-chunks", str(chunks)]
    if not deterministic:
        out += ["--no-conv-deterministic"]
    if split_k:
        out += ["--conv-split-k"]
    if bn_launches != BN_LAUNCHES:
        out += ["--bn-launches", str(bn_launches)]
    if genstats:
        out += ["--conv-genstats"]
    if pixel_pairs:
        out += ["--conv-pixel-pairs"]
    if residual_sums:
        out += ["--residual-grad-sums"]
    return out


def describe(options):
    streams, chunks, deterministic, split_k, bn_launches, genstats, pixel_pairs, residual_sums = options
    return (f"{streams} stream(s), {chunks} chunk(s), {'deterministic' if deterministic else 'any'} engines"
            f"{' with split-K settings' if split_k else ''}, {bn_launches} BatchNorm launch(es)"
            f"{', statistics from the convolutions (genstats)' if genstats else ''}"
            f"{', stage 1 convolutions on pixel pairs' if pixel_pairs else ''}"
            f"{', BatchNorm gradient sums in the residual add' if residual_sums else ''}")


def main(argv=None):
    args = parse_args(argv)
    rows, problems = [], []
    for path in args.results:
        try:
            with open(path) as f:
                rows += json.load(f)["results"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            problems.append(f"{path}: {error}")
    try:
        if len(problems) == len(args.results):
            raise ValueError("; ".join(problems))
        options, best, default = choose(rows, args.dtype, args.batch, args.layout, args.min_gain)
    except (ValueError, KeyError, TypeError) as error:
        print(f"best_step_options: {' '.join(args.results)}: {error}", file=sys.stderr)
        sys.exit(2)
    for problem in problems:
        print(f"best_step_options: skipped {problem}", file=sys.stderr)
    against = f"; defaults {default['images_per_sec']:.0f}" if default else "; defaults not measured"
    print(f"best_step_options: {describe(options)} ({args.layout} {args.dtype} batch {args.batch}: fastest "
          f"{describe(options_of(best))} {best['images_per_sec']:.0f} img/s{against})", file=sys.stderr)
    print(" ".join(flags(options)))


if __name__ == "__main__":
    main()
