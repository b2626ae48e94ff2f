"""Evaluate saved checkpoints: `python -m cupynet.evaluate MODEL_DIR_OR_CHECKPOINT [flags]`.

    python -m cupynet.evaluate runs/resnet44                        # its latest checkpoint, on the test split
    python -m cupynet.evaluate runs/resnet44 --all                  # every checkpoint kept: accuracy per step
    python -m cupynet.evaluate runs/resnet44/ckpt-00040000.npz --eval-on validation --gpus cpu

The counterpart of the reference tutorial's separate evaluation program. The model (depth, block, BatchNorm
epsilon) and the data (its folder, the held-out validation split, a synthetic set's seed) come from the checkpoint's
record of the run that wrote it, so no training flag needs repeating; the device, precision and memory layout are
this run's choice (checkpoints are layout-free): by default a GPU if one can run, and the training's precision
(where the device has it) and layout. On the same
device and precision, a run's final checkpoint evaluates exactly as the run's own final evaluation did.
Writes nothing. Bad input ends with one line `error: ...` and exit status 2.
"""
import os
import sys

from cupynet import __version__
from cupynet.backends import check_devices, check_dtype, resolve_devices
from cupynet.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from cupynet.config import DTYPES, HelpFormatter, OneLineErrorParser, TrainConfig, layout_name, validate
from cupynet.errors import CheckpointError, ConfigError, DataError
from cupynet.report import exit_status
from cupynet.train import build_backend, check_against_data, load_dataset
from cupynet.trainer import Trainer

# What a checkpoint's record of its run gives the evaluation: the model and the data, and the speed options that
# choose the forward's kernels (our own convolution kernel, pixel pairs, the padded input), so that an evaluation
# repeats the run's own bit for bit on the same GPU. The rest of its flags (the recipe, the other speed options, the
# bookkeeping) play no part in an evaluation and keep their defaults.
RUN_FIELDS = ("data_dir", "synthetic", "validation_size", "seed", "num_layers", "block", "bn_decay", "bn_epsilon",
              "train_batch_size", "eval_batch_size", "data_format", "dtype", "tf32")
FORWARD_KERNEL_FIELDS = ("own_conv_channels", "conv_pixel_pairs", "padded_input")     # NHWC only


def build_parser():
    p = OneLineErrorParser(prog="python -m cupynet.evaluate", description=__doc__.split("\n\n")[0],
                           formatter_class=HelpFormatter)
    p.add_argument("path", help="a model dir (its latest checkpoint; every one with --all) or one ckpt-<step>.npz")
    p.add_argument("--all", action="store_true", help="every checkpoint in the model dir, oldest step first")
    p.add_argument("--eval-on", choices=("test", "validation"), default="test",
                   help="split evaluated; validation: the images the run held out (its --validation-size)")
    p.add_argument("--data-dir", help="folder with cifar-10-batches-py (default: the one the run trained on)")
    p.add_argument("--gpus", default="auto", help="one device: 'cpu', a GPU id, or 'auto' (a GPU if one can run)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="compute precision (default: the run's, or float32 where the device lacks it)")
    p.add_argument("--data-format", type=layout_name, help="memory layout, NCHW or NHWC (default: the run's)")
    p.add_argument("--eval-batch-size", type=int, help="images per forward (default: the run's)")
    return p


def parse_args(argv=None):
    """Flags -> argparse namespace; a bad flag raises ConfigError (one line)."""
    return build_parser().parse_args(argv)


def checkpoints_to_evaluate(path, every):
    """The checkpoint files `path` names: a file itself, or a model dir's latest (every one with `every`)."""
    if os.path.isfile(path):
        if every:
            raise ConfigError(f"--all takes a model dir, and {path} is one checkpoint file")
        return [os.path.abspath(path)]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model dir or checkpoint file")
    found = list_checkpoints(path) if every else [p for p in [latest_checkpoint(path)] if p]
    if not found:
        raise CheckpointError(f"{path} holds no checkpoint (ckpt-<step>.npz)")
    return found


def config_of(meta, args, source):
    """The TrainConfig the model and the data are built from: the checkpoint's run, with this run's device choices."""
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{source}: has no record of the run that wrote it (no 'config' in its meta)")
    try:
        config = TrainConfig(**{name: saved[name] for name in RUN_FIELDS + FORWARD_KERNEL_FIELDS if name in saved})
        validate(config)                   # a record edited by hand, or from another version, in one line
    except (TypeError, ValueError, ConfigError) as error:
        raise CheckpointError(f"{source}: its record of the run does not fit this cupynet ({error})")
    config.gpus = args.gpus
    config.eval_on = args.eval_on
    if args.data_dir is not None:
        config.data_dir, config.synthetic = args.data_dir, False
    if args.data_format is not None and args.data_format != config.data_format:
        config.data_format = args.data_format
        for name in FORWARD_KERNEL_FIELDS:           # the run's, for its layout: the defaults in another
            setattr(config, name, getattr(TrainConfig(), name))
    if args.eval_batch_size is not None:
        config.eval_batch_size = args.eval_batch_size
    validate(config)                       # a bad --gpus, --eval-batch-size, ... in one line
    if len(config.devices) != 1:
        raise ConfigError(f"--gpus {args.gpus}: an evaluation runs on one device")
    return config


def choose_dtype(config, requested, device):
    """--dtype if given; else the run's, or float32 where this device lacks it (bfloat16 on the CPU, float64 on a
    GPU). Returns a note to print when it is not the run's own, else ''."""
    note = ""
    if requested is not None:
        config.dtype = requested
    elif (device == "cpu" and config.dtype == "bfloat16") or (device != "cpu" and config.dtype == "float64"):
        note = (f"  (the run trained in {config.dtype}, which the {'CPU' if device == 'cpu' else 'GPU'} backend "
                f"lacks: evaluating in float32)")
        config.dtype = "float32"
    check_dtype(device, config.dtype)
    return note


def load_data(config, from_the_run, source):
    """The dataset; a data folder the checkpoint names that is gone is an error that says how to point elsewhere."""
    try:
        return load_dataset(config)
    except DataError as error:
        if from_the_run:
            raise DataError(f"{error} (the data the run of {source} trained on; pass --data-dir)") from None
        raise


def evaluate(args, out=print):
    """Evaluate every checkpoint `args` names, in order, a line each."""
    paths = checkpoints_to_evaluate(args.path, args.all)
    newest = os.path.basename(paths[-1])
    loaded = {paths[-1]: load_checkpoint(paths[-1])}      # read once: its record sets up the run, then it is evaluated
    meta = loaded[paths[-1]][1]
    config = config_of(meta, args, newest)
    width = len(str(meta["step"]))            # the newest step is the longest
    device = resolve_devices(config.devices)[0]
    check_devices([device])
    dtype_note = choose_dtype(config, args.dtype, device)
    dataset = load_data(config, args.data_dir is None, newest)
    check_against_data(config, dataset)
    split = dataset.test if config.eval_on == "test" else dataset.validation
    backend = build_backend(config, device)
    trainer = Trainer(config, dataset, backend)
    trainer.check_restorable(meta, way_out="evaluate it on the data it trained on (leave out --data-dir)")
    out(f"cupynet {__version__}: {dataset.description}")
    out(f"model: ResNet-{config.num_layers} {config.block} | backend: {backend.name} on {device}, {backend.layout} "
        f"{backend.dtype} | {config.eval_on} split, {len(split)} images | {len(paths)} checkpoint"
        f"{'s' if len(paths) > 1 else ''} of {os.path.dirname(paths[-1])}")
    if dtype_note:
        out(dtype_note)
    for path in paths:
        name = os.path.basename(path)
        arrays, meta = loaded.pop(path) if path in loaded else load_checkpoint(path)
        trainer.restore(arrays, meta, name)
        result = trainer.evaluate(split)
        out(f"{name}  step {trainer.step:>{width}}  {config.eval_on} accuracy {result['accuracy']:.2%} "
            f"({result['correct']}/{result['images']})  loss {result['loss']:.4f}")


def main(argv=None):
    return exit_status(lambda: evaluate(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
