"""TrainConfig: every flag of `python -m cupynet.train`, its default and its validation, in one place.

    config = parse_args(["--num-layers", "20", "--gpus", "cpu"])   # raises ConfigError on bad flags
    config.num_layers, config.devices, config.lr_values ...

Defaults follow TensorFlow's cifar10_estimator tutorial (ResNet-44 v1, batch 128, momentum 0.9, BN
decay 0.997, epsilon 1e-5, LR 0.1/0.01/0.001/0.0002 at epochs 82/123/300), with weight decay 1e-4 (He et
al.) and a 5,000-image validation split. Without --data-dir the run trains on the small CIFAR-10 sample
shipped in the package, and a few defaults change so that this demo finishes in about a minute on two
CPU cores (DEMO_DEFAULTS below); flags given explicitly always win.
"""
import argparse
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from cupynet.backends import BN_LAUNCHES, MAX_WGRAD_CHUNKS, MAX_WGRAD_STREAMS, WGRAD_CHUNKS, WGRAD_STREAMS
from cupynet.backends.conv3x3 import CHANNEL_CHOICES
from cupynet.errors import ConfigError
from cupynet.model import BLOCK_KINDS, blocks_per_stage
from cupynet.params import CONV_INITS, DEFAULT_CONV_INIT

LAYOUT_ALIASES = {"NCHW": "NCHW", "NHWC": "NHWC", "channels_first": "NCHW", "channels_last": "NHWC"}
DTYPES = ("float32", "float64", "bfloat16")

# Defaults for a real dataset (--data-dir) or --synthetic, and for the built-in sample (the demo).
STANDARD_DEFAULTS = dict(num_layers=44, train_steps=80000, train_batch_size=128, bn_decay=0.997,
                         log_interval=100, checkpoint_interval=2000)
# The demo: within a minute on 2 cores, a ResNet-8 makes ~11 passes over the 900 sample images and
# reaches ~30% test accuracy (10% is chance); a ResNet-20 gets only ~3.5 passes and stays near 17%.
# The moving BN statistics must settle within 150 steps for evaluation to mean anything, hence
# decay 0.9 instead of 0.997.
DEMO_DEFAULTS = dict(num_layers=8, train_steps=150, train_batch_size=64, bn_decay=0.9,
                     log_interval=15, checkpoint_interval=50)


@dataclass
class TrainConfig:
    # data
    data_dir: Optional[str] = None           # None: the built-in sample
    synthetic: bool = False
    validation_size: Optional[int] = None    # None: 10% of CIFAR-10's training images (5,000 of 50,000);
                                             # none of a synthetic set's
    eval_on: str = "test"
    distortion: bool = True
    # model
    num_layers: int = 44
    block: str = "v1"
    bn_decay: float = 0.997
    bn_epsilon: float = 1e-5
    conv_init: str = DEFAULT_CONV_INIT       # how convolution weights start (cupynet/params.py CONV_INITS)
    sync_bn: bool = False                    # BN statistics over the global batch (several workers)
    data_format: str = "NHWC"
    dtype: str = "float32"
    tf32: bool = True                        # GPU float32 convolutions on TF32 tensor cores
    cuda_graph: str = "auto"                 # record the GPU step once, replay it: auto (GPU: on), on, off
    conv_autotune: bool = True               # GPU: time cuDNN's candidate engines per convolution, keep the fastest
    wgrad_streams: int = WGRAD_STREAMS       # GPU: side streams the weight gradients take in turn
    conv_deterministic: bool = True          # GPU: only cuDNN engines that repeat their bits on every run
    conv_split_k: bool = False               # GPU: autotuning also times split-K settings of weight gradients
    conv_genstats: bool = False              # convolutions before BatchNorm also write its per-channel sums
    conv_pixel_pairs: bool = False           # GPU, NHWC: stage 1's 3x3 convolutions on pixel pairs
    wgrad_pixel_pairs: bool = False          # GPU, NHWC: and their weight gradients
    own_conv_channels: int = 0               # GPU, NHWC: 3x3 convolutions of at most this many channels in our kernel
    residual_grad_sums: bool = False         # a residual block's input-gradient add also reduces BatchNorm's sums
    wgrad_chunks: int = WGRAD_CHUNKS         # weight gradients per slice of the batch, side by side, then summed
    stream_priorities: bool = False          # GPU: the main stream before the weight gradients' side streams
    conv_tune_in_graph: bool = False         # GPU: the autotuner times each engine replayed from a CUDA graph
    padded_input: bool = False               # GPU, NHWC: the input's channels padded to 16 bytes for the stem
    programmatic_launch: bool = False        # GPU: the captured step's edges into our kernels programmatic
    programmatic_launch_early: bool = False  # GPU: ... and launched once the kernel before has begun
    bn_launches: int = BN_LAUNCHES           # GPU: launches per BatchNorm pass (1: one kernel waiting on its grid)
    # optimization
    train_steps: int = 80000                 # the total target step, not "additional steps"
    train_batch_size: int = 128
    eval_batch_size: int = 100
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_values: tuple = (0.1, 0.01, 0.001, 0.0002)
    lr_boundaries: tuple = (82.0, 123.0, 300.0)   # in epochs
    seed: int = 0
    # devices and bookkeeping
    gpus: str = "auto"
    reduce: str = "nccl"                     # GPU workers' all-reduce; CPU workers always use the host one
    model_dir: Optional[str] = None          # None: runs/<dataset>-resnet<depth>-<block>
    log_interval: int = 100
    eval_interval: int = 0                   # steps between evaluations during training; 0: only the final one
    checkpoint_interval: int = 2000
    keep_checkpoints: int = 5
    # derived by validate()
    devices: list = field(default_factory=list)

    @property
    def dataset_kind(self):
        """'sample', 'synthetic' or 'cifar10': checkpoints remember it so a demo run is never resumed on real data."""
        if self.synthetic:
            return "synthetic"
        return "cifar10" if self.data_dir else "sample"

    def to_dict(self):
        return asdict(self)


def _csv(kind):
    """argparse type: comma-separated list of `kind`."""
    def parse(text):
        try:
            return tuple(kind(item) for item in text.split(",") if item.strip() != "")
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    parse.__name__ = f"list of {kind.__name__}"
    return parse


def layout_name(text):
    if text not in LAYOUT_ALIASES:
        raise argparse.ArgumentTypeError(f"expected NCHW, NHWC, channels_first or channels_last, got {text!r}")
    return LAYOUT_ALIASES[text]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, no usage dump) instead of exiting."""

    def error(self, message):
        raise ConfigError(f"{message} (see --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where it tells something: not for an unset default (None: the help says
    what applies, often a demo default), not for a flag that only turns something on or off (--synthetic,
    --no-distortion: its default is "not given"), and not where the help already names the default ("default
    1", "off by default"). A --x/--no-x pair whose help is silent on it gets "(default: True)" or False."""

    def _get_help_string(self, action):
        text = action.help or ""
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if action.default is None or switch or re.search(r"\(default|default:|default \d|by default", text):
            return text
        default = action.default
        if isinstance(default, (tuple, list)):      # as it is typed: --lr-values 0.1,0.01
            default = ",".join(f"{value:g}" if isinstance(value, float) else str(value) for value in default)
        return f"{text} (default: {default})"


def add_switch(group, field, help):
    """An on/off flag for the TrainConfig field `field`: --field-name and --no-field-name, its default TrainConfig's."""
    group.add_argument("--" + field.replace("_", "-"), action=argparse.BooleanOptionalAction,
                       default=getattr(TrainConfig(), field), help=help)


def build_parser():
    d = TrainConfig()
    p = OneLineErrorParser(prog="python -m cupynet.train", description="Train a CIFAR-10 ResNet, then evaluate it.",
                           formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", help="folder with cifar-10-batches-py (or that folder itself); "
                      "default: the CIFAR-10 sample shipped with cupynet, with demo defaults")
    data.add_argument("--synthetic", action="store_true", help="random images, for benchmarks")
    data.add_argument("--validation-size", type=int, help="training images held out for validation "
                      "(default: 10%% of CIFAR-10's; none of --synthetic's)")
    data.add_argument("--eval-on", choices=("test", "validation"), default=d.eval_on, help="split evaluated at the end "
                      "(and every --eval-interval steps)")
    data.add_argument("--no-distortion", dest="distortion", action="store_false",
                      help="turn off pad-4/random-crop/random-flip augmentation")
    model = p.add_argument_group("model")
    model.add_argument("--num-layers", type=int, help="depth: 6n+2 for v1/v2, 9n+2 for bottleneck (default 44; demo 8)")
    model.add_argument("--block", choices=BLOCK_KINDS, default=d.block, help="residual block kind")
    model.add_argument("--batch-norm-decay", dest="bn_decay", type=float, help="moving-average decay (default 0.997; demo 0.9)")
    model.add_argument("--batch-norm-epsilon", dest="bn_epsilon", type=float, default=d.bn_epsilon,
                       help="added to the batch variance before its square root")
    model.add_argument("--conv-init", choices=tuple(CONV_INITS), default=d.conv_init,
                       help="how convolution weights start: he_normal (N(0, 2/fan_in), the default), "
                            "glorot_uniform (the reference tutorial's: TensorFlow 1's default), pytorch_default "
                            "(U(+-1/sqrt(fan_in))); the scale sets the effective learning rate of a conv before BN")
    model.add_argument("--sync-bn", action="store_true",
                       help="with several workers, BatchNorm statistics over the global batch (all-reduced), "
                            "exactly as one device; default: each worker's own shard")
    model.add_argument("--data-format", type=layout_name, default=d.data_format, help="memory layout: NCHW or NHWC")
    model.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                       help="compute precision: float32, float64 (CPU only), bfloat16 (GPU only, float32 master weights)")
    add_switch(model, "tf32",
               help="GPU float32 convolutions may use TF32 tensor cores (--no-tf32: strict float32)")
    model.add_argument("--cuda-graph", choices=("auto", "on", "off"), default=d.cuda_graph,
                       help="record the whole GPU training step once as a CUDA graph and replay it each step "
                            "(auto: on for GPU workers unless --reduce host; results are identical either way with "
                            "--conv-deterministic, the default)")
    add_switch(model, "conv_autotune",
               help="GPU: time cuDNN's candidate engines for each training convolution on first use (up to 8 "
                    "of its heuristics' list) and keep the fastest; an evaluation's own shapes take the "
                    "heuristics' first choice, untimed (--no-conv-autotune: that choice everywhere, identical "
                    "across processes)")
    add_switch(model, "conv_deterministic",
               help="GPU: only cuDNN engines that give the same bits on every run, so reruns, resumes and "
                    "the captured step repeat exactly (--no-conv-deterministic: engines that add in a "
                    "varying order too, as PyTorch's default)")
    add_switch(model, "conv_split_k",
               help="GPU, with --conv-autotune: also time split-K settings of each weight gradient's cuDNN "
                    "engines (the sum over the batch cut into 2-64 slices: more of the GPU busy at 16-64 "
                    "channels; off by default until a GPU run shows it faster)")
    add_switch(model, "conv_genstats",
               help="GPU: each convolution that feeds a BatchNorm also writes the per-channel sum and sum "
                    "of squares of its output (cuDNN's genstats, one fused graph), so BatchNorm's statistics "
                    "skip their own pass over the activation; needs --conv-autotune, which checks each such "
                    "engine's sums first; a convolution with no engine that passes runs as before. Statistics from "
                    "unshifted float32 sums; not with --sync-bn's layers; off by default until a GPU run "
                    "shows it faster")
    add_switch(model, "conv_pixel_pairs",
               help="GPU, NHWC: stage 1's 3x3 convolutions (16 channels) run forward and data gradient as "
                    "the same convolutions on pixel pairs (32 channels at half the width, a kernel built "
                    "from the weights each step), where cuDNN's engines are faster; the same results up "
                    "to the order of the sums; off by default until a GPU run shows it faster")
    add_switch(model, "wgrad_pixel_pairs",
               help="GPU, NHWC: the weight gradients of stage 1's 3x3 convolutions run on pixel pairs too "
                    "(with or without --conv-pixel-pairs): cuDNN's weight gradient of the paired "
                    "convolution, folded back by a small kernel (each weight's two places added); the same "
                    "gradients up to rounding (in bfloat16, two rounded halves); off by default until a "
                    "GPU run shows it faster")
    model.add_argument("--own-conv-channels", type=int, choices=CHANNEL_CHOICES, default=d.own_conv_channels,
                       metavar="N",
                       help="GPU, NHWC, bfloat16 or float32 with --tf32; N is 0, 16, 32 or 64: the 3x3 convolutions "
                            "whose channels in and out are at most N (16: stage 1's; 64: all) run their forwards "
                            "and data gradients in cupynet's own tensor-core kernel (kernels/conv3x3.cu) instead of "
                            "cuDNN's engines, which are slow at these widths; a stage's first, strided, data "
                            "gradient and every weight gradient stay with cuDNN; the same results up to the order "
                            "of the sums; default 0 (none) until a GPU run shows it faster")
    add_switch(model, "residual_grad_sums",
               help="block v1: the kernel that adds up a residual block's input gradient (main path plus "
                    "identity shortcut) also reduces the gradient sums of the BatchNorm that gradient "
                    "flows into next (the previous block's last one, or the stem's), in the same pass: "
                    "that BatchNorm's backward skips its own reduction (one launch and one read of three "
                    "activations fewer, 19 times per ResNet-44 step); the same results; not for --sync-bn's "
                    "layers; off by default until a GPU run shows it faster")
    add_switch(model, "stream_priorities",
               help="GPU: the main stream (forward, data gradients, BatchNorm: the step's critical path) at "
                    "the device's highest priority and the weight gradients' side streams at its lowest, "
                    "so that free SMs take the main chain's waiting blocks first; the captured step keeps "
                    "them (its graph instantiated with per-node priorities through the CUDA driver); the "
                    "same results; off by default until a GPU run shows it faster")
    add_switch(model, "conv_tune_in_graph",
               help="GPU, with --conv-autotune: time each candidate cuDNN engine replayed from a recorded CUDA "
                    "graph, as the captured step runs it, instead of enqueued eagerly: in a graph, cuDNN's "
                    "own memsets (an engine zeroing its workspace) are memset nodes, which an H100 trace showed "
                    "3-13 us slow to follow (0.42 us between two kernels); off by default until a GPU run shows it faster")
    add_switch(model, "padded_input",
               help="GPU, NHWC: the augmentation writes the network's input with its 3 channels padded by zeros "
                    "to a 16-byte pixel (8 in bfloat16, 4 in float32) and the stem convolution runs on it with "
                    "its weights padded alike, so that cuDNN neither pads the input itself on every call nor "
                    "falls back to its generic engine for 3 channels; the same results up to the engines' "
                    "rounding; off by default until a GPU run shows it faster")
    add_switch(model, "programmatic_launch",
               help="GPU (Hopper and later), captured steps: each of our kernels that follows another kernel on a "
                    "stream is launched before that kernel has finished (a programmatic edge of the CUDA graph, "
                    "made through the CUDA driver) and waits for it inside, so that its launch overlaps the "
                    "other's end; on an H100 one kernel followed another after a median 0.42-0.45 us, about 200 "
                    "times a step; the same results; off by default until a GPU run shows it faster")
    add_switch(model, "programmatic_launch_early",
               help="GPU (Hopper and later), captured steps: --programmatic-launch, with each of our kernels "
                    "launched as soon as every block of the kernel before it has begun (the edge's launch-order "
                    "port, cuDNN's kernels included) rather than once that kernel's blocks have all let it (ours "
                    "do as they start, cuDNN's as they end); more overlap, and more blocks holding SMs while they "
                    "wait; implies --programmatic-launch; off by default until a GPU run shows it faster")
    model.add_argument("--wgrad-streams", type=int, default=d.wgrad_streams,
                       help=f"GPU: weight gradients run beside the data gradients on this many side streams, "
                            f"taken in turn, so they also overlap each other (1-{MAX_WGRAD_STREAMS}; default "
                            f"{d.wgrad_streams}; results are identical for any value)")
    model.add_argument("--wgrad-chunks", type=int, default=d.wgrad_chunks,
                       help=f"each weight gradient is computed over this many slices of the worker's batch, side "
                            f"by side on consecutive side streams (use as many --wgrad-streams), then summed in a "
                            f"fixed order: more of the GPU busy at 16-64 channels, still deterministic "
                            f"(1-{MAX_WGRAD_CHUNKS}; default {d.wgrad_chunks}; other values add in another order)")
    model.add_argument("--bn-launches", type=int, choices=(1, 2), default=d.bn_launches,
                       help=f"GPU: kernel launches per BatchNorm pass: 2 (a reduction, then the elementwise half) or "
                            f"1 (both in one kernel whose blocks wait for the reduction: one launch gap fewer; "
                            f"default {d.bn_launches}; results are identical where the GPU holds the reduction's "
                            f"whole grid at once)")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--train-steps", type=int, help="total target step; a rerun resumes and stops there "
                     "(default 80000; demo 150)")
    opt.add_argument("--train-batch-size", type=int, help="global batch, split across workers (default 128; demo 64)")
    opt.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                     help="images per evaluation step (every test image is evaluated once whatever the size)")
    opt.add_argument("--momentum", type=float, default=d.momentum, help="momentum of SGD")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 coefficient on every variable")
    opt.add_argument("--lr-values", type=_csv(float), default=d.lr_values, help="piecewise-constant learning rates")
    opt.add_argument("--lr-boundaries", type=_csv(float), default=d.lr_boundaries,
                     help="epochs at which the next --lr-values entry starts")
    opt.add_argument("--seed", type=int, default=d.seed,
                     help="seeds the initialization, the epochs' order and the augmentation draws")
    run = p.add_argument_group("devices and bookkeeping")
    run.add_argument("--gpus", default=d.gpus, help="'cpu', GPU ids like '0' or '0,1', or 'auto'; "
                     "several ('cpu,cpu', '0,1') train data-parallel, one worker per device")
    run.add_argument("--reduce", choices=("nccl", "host"), default=d.reduce,
                     help="how several GPU workers average gradients: NCCL, or through host memory "
                     "(CPU workers always use host)")
    run.add_argument("--model-dir", help="checkpoints and metrics.jsonl (default: runs/<dataset>-resnet<depth>-<block>)")
    run.add_argument("--log-interval", type=int, help="steps between progress lines (default 100; demo 15)")
    run.add_argument("--eval-interval", type=int, default=d.eval_interval,
                     help="steps between evaluations of the --eval-on split during training, each printed and in "
                     "metrics.jsonl (an accuracy curve); training goes on exactly as without them; 0: only the "
                     "final evaluation")
    run.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints (default 2000; demo 50)")
    run.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                     help="most recent checkpoints kept in --model-dir; older ones are deleted")
    return p


def flag_of(field_name):
    """The command-line spelling of a TrainConfig field, e.g. bn_decay -> --batch-norm-decay."""
    for action in build_parser()._actions:
        if action.dest == field_name and action.option_strings:
            return action.option_strings[0]
    raise KeyError(field_name)


# What a resumed run should train with as before: a flag changed on a rerun (on purpose, or a flag forgotten) makes
# another experiment, so the run says so. Speed and bookkeeping flags are left out (they change how fast, not what).
RECIPE_FIELDS = ("train_batch_size", "momentum", "weight_decay", "lr_values", "lr_boundaries", "distortion",
                 "bn_decay", "bn_epsilon", "dtype", "sync_bn")


def recipe_changes(meta, config, train_images):
    """How this run's recipe differs from a checkpoint's (its meta: the config as to_dict wrote it, and the number of
    training images): '--weight-decay 0.0001 -> 0.0002', 'distortion on -> off' for a switch, 'training images
    45000 -> 50000' (another --validation-size or data), 'workers 1 -> 2' (each worker's BatchNorm normalizes with
    its shard's statistics). [] where nothing differs or the checkpoint does not say."""
    saved = meta.get("config", {})
    changes = []
    if meta.get("train_images", train_images) != train_images:
        changes.append(f"training images {meta['train_images']} -> {train_images}")
    if len(saved.get("devices", config.devices)) != len(config.devices):
        changes.append(f"workers {len(saved['devices'])} -> {len(config.devices)}")
    for name in RECIPE_FIELDS:
        if name not in saved:
            continue
        old, new = saved[name], getattr(config, name)
        if isinstance(new, tuple):
            old = tuple(old)                 # a list once written as JSON
        if old == new:
            continue
        if isinstance(new, bool):
            changes.append(f"{name.replace('_', ' ')} {'on' if old else 'off'} -> {'on' if new else 'off'}")
        else:
            show = (lambda v: ",".join(f"{x:g}" for x in v)) if isinstance(new, tuple) else str
            changes.append(f"{flag_of(name)} {show(old)} -> {show(new)}")
    return changes


def parse_args(argv=None):
    """Flags -> a validated TrainConfig. Raises ConfigError with a one-line message."""
    args = vars(build_parser().parse_args(argv))
    names = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in args.items() if k in names and v is not None})
    defaults = DEMO_DEFAULTS if config.dataset_kind == "sample" else STANDARD_DEFAULTS
    for name, value in defaults.items():
        if args.get(name) is None:
            setattr(config, name, value)
    if config.model_dir is None:
        config.model_dir = f"runs/{config.dataset_kind}-resnet{config.num_layers}-{config.block}"
    validate(config)
    return config


def parse_devices(spec):
    """'auto' | 'cpu' | 'cpu,cpu' | '0' | '0,1' -> list of 'auto', 'cpu' or GPU ids (ints)."""
    spec = spec.strip().lower()
    if spec == "auto":
        return ["auto"]
    devices = []
    for token in spec.split(","):
        token = token.strip()
        if token == "cpu":
            devices.append("cpu")
        elif re.fullmatch("[0-9]+", token):        # not str.isdigit(): it takes '²' and '٣' too
            devices.append(int(token))
        else:
            raise ConfigError(f"--gpus {spec!r}: {token!r} is neither 'cpu' nor a GPU id (expected e.g. cpu, 0 or 0,1)")
    gpu_ids = [d for d in devices if d != "cpu"]
    if gpu_ids and len(gpu_ids) != len(devices):
        raise ConfigError(f"--gpus {spec!r}: mixes CPU and GPU workers; use either 'cpu' or GPU ids")
    if len(set(gpu_ids)) != len(gpu_ids):
        raise ConfigError(f"--gpus {spec!r}: a GPU id appears twice")
    return devices


def _check_kinds(config):
    """Each field holds the kind of value it declares: a record of a run read back from JSON may not (the flags
    parsed here always do). bool is no int here, and an int is a float."""
    def fits(value, kind):
        if kind in (int, float) and isinstance(value, bool):
            return False
        return isinstance(value, {float: (int, float), tuple: (tuple, list)}.get(kind, kind))

    for item in fields(config):
        value = getattr(config, item.name)
        kinds = typing.get_args(item.type) or (item.type,)        # Optional[int]: (int, NoneType)
        if not any(fits(value, kind) for kind in kinds):
            flag = flag_of(item.name) if item.name != "devices" else "devices"
            raise ConfigError(f"{flag} must be {' or '.join(kind.__name__ for kind in kinds)}, got {value!r}")


def validate(config):
    """Check every flag and combination; raise ConfigError naming the first problem."""
    c = config
    _check_kinds(c)
    if c.synthetic and c.data_dir:
        raise ConfigError("--synthetic and --data-dir exclude each other")
    for flag, path in (("--data-dir", c.data_dir), ("--model-dir", c.model_dir)):
        if path is not None and not path.strip():
            raise ConfigError(f"{flag} is empty: name a folder (leave the flag out for its default)")
    try:
        blocks_per_stage(c.num_layers, c.block)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error))
    if c.data_format not in ("NCHW", "NHWC"):
        raise ConfigError(f"--data-format must be NCHW or NHWC, got {c.data_format!r}")
    if c.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {c.dtype!r}")
    if not 0 <= c.seed < 2**32:          # the augmentation's hash takes a 32-bit seed
        raise ConfigError(f"--seed must be from 0 to {2**32 - 1}, got {c.seed}")
    c.devices = parse_devices(c.gpus)
    _positive(c, "train_batch_size", "eval_batch_size", "log_interval", "checkpoint_interval", "keep_checkpoints")
    if c.train_steps < 0:
        raise ConfigError(f"--train-steps must be >= 0, got {c.train_steps}")
    if c.eval_interval < 0:
        raise ConfigError(f"--eval-interval must be >= 0 (0: only the final evaluation), got {c.eval_interval}")
    workers = len(c.devices)
    if c.train_batch_size % workers:
        raise ConfigError(f"--train-batch-size {c.train_batch_size} is not divisible by the {workers} workers "
                          f"of --gpus {c.gpus} (each worker takes an equal shard)")
    if not 0 <= c.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {c.momentum}")
    if not 0 <= c.weight_decay < math.inf:          # NaN fails every comparison
        raise ConfigError(f"--weight-decay must be a finite number >= 0, got {c.weight_decay}")
    if not 0 <= c.bn_decay < 1:
        raise ConfigError(f"--batch-norm-decay must be in [0, 1), got {c.bn_decay}")
    if not 0 < c.bn_epsilon < math.inf:
        raise ConfigError(f"--batch-norm-epsilon must be a finite number > 0, got {c.bn_epsilon}")
    if not 1 <= c.wgrad_streams <= MAX_WGRAD_STREAMS:
        raise ConfigError(f"--wgrad-streams must be from 1 to {MAX_WGRAD_STREAMS}, got {c.wgrad_streams}")
    if not 1 <= c.wgrad_chunks <= MAX_WGRAD_CHUNKS:
        raise ConfigError(f"--wgrad-chunks must be from 1 to {MAX_WGRAD_CHUNKS}, got {c.wgrad_chunks}")
    if c.wgrad_chunks > c.train_batch_size // workers:
        raise ConfigError(f"--wgrad-chunks {c.wgrad_chunks} is more than the {c.train_batch_size // workers} "
                          f"images of each worker's batch")
    if c.conv_genstats and not c.conv_autotune:
        raise ConfigError("--conv-genstats needs --conv-autotune: the autotuner runs each genstats engine again "
                          "before it is used, and drops one whose sums do not repeat")
    for flag, on in (("--conv-pixel-pairs", c.conv_pixel_pairs), ("--wgrad-pixel-pairs", c.wgrad_pixel_pairs)):
        if on and c.data_format != "NHWC":
            raise ConfigError(f"{flag} needs --data-format NHWC: a pixel pair is two neighbouring pixels' "
                              f"channels, adjacent in memory only when channels come last")
    if c.own_conv_channels not in CHANNEL_CHOICES:
        raise ConfigError(f"--own-conv-channels must be one of {', '.join(map(str, CHANNEL_CHOICES))}, "
                          f"got {c.own_conv_channels}")
    if c.own_conv_channels and c.data_format != "NHWC":
        raise ConfigError("--own-conv-channels needs --data-format NHWC: its lanes load a pixel's channels, "
                          "adjacent in memory only when channels come last")
    if c.own_conv_channels and c.dtype == "float32" and not c.tf32:
        raise ConfigError("--own-conv-channels multiplies float32 on TF32 tensor cores: it cannot run with "
                          "--no-tf32 (strict float32); leave one of them out")
    if c.padded_input and c.data_format != "NHWC":
        raise ConfigError("--padded-input needs --data-format NHWC: it pads each pixel's channels to 16 bytes, "
                          "a vector only when channels come last")
    if c.residual_grad_sums and c.block != "v1":
        raise ConfigError(f"--residual-grad-sums needs --block v1: only a post-activation block adds up its input "
                          f"gradient in a kernel of its own (--block {c.block}'s blocks end in a plain add)")
    if c.residual_grad_sums and c.sync_bn and workers > 1:
        raise ConfigError("--residual-grad-sums cannot take over --sync-bn's gradient sums: each BatchNorm "
                          "all-reduces its own between its two halves")
    if c.conv_split_k and not c.conv_autotune:
        raise ConfigError("--conv-split-k needs --conv-autotune: split-K settings are candidates the autotuner "
                          "times (without it cuDNN's heuristic choice runs)")
    if c.conv_tune_in_graph and not c.conv_autotune:
        raise ConfigError("--conv-tune-in-graph needs --conv-autotune: it is how the autotuner times the engines "
                          "(without it cuDNN's heuristic choice runs)")
    _validate_schedule(c)
    if c.validation_size is not None and c.validation_size < 0:
        raise ConfigError(f"--validation-size must be >= 0, got {c.validation_size}")


def _positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _validate_schedule(c):
    if len(c.lr_values) != len(c.lr_boundaries) + 1:
        raise ConfigError(f"--lr-values needs one more entry than --lr-boundaries "
                          f"(got {len(c.lr_values)} values for {len(c.lr_boundaries)} boundaries)")
    if not all(0 <= v < math.inf for v in c.lr_values):
        raise ConfigError(f"--lr-values must be finite numbers >= 0, got {','.join(map(str, c.lr_values))}")
    if (not all(0 < b < math.inf for b in c.lr_boundaries)
            or list(c.lr_boundaries) != sorted(set(c.lr_boundaries))):
        raise ConfigError(f"--lr-boundaries must be positive, finite and strictly increasing, got "
                          f"{','.join(map(str, c.lr_boundaries))}")
