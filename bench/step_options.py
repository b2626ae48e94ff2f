"""The step options, declared once: the flags of `python -m cupynet.train` that change how a training step runs
on the GPU (not what it learns), which bench/device_check.sh times to pick the fastest.

Each is named by its TrainConfig field, which is also its field in bench/layouts.py's rows and its argparse dest
everywhere; its flag (spelling, help, choices) is cupynet.train's and its default TrainConfig's. From OPTIONS, in
its order, the benchmarks derive:
  * layouts.py: its grid dimensions (wgrad streams and chunks also as --wgrad-pairs), row fields, table columns;
  * best_step_options.py: a row's options by name, the flags that select them (`flags`), `describe`;
  * vs_torch.py (timeline.py), layers.py, time_to_accuracy.py: their flags (`add_flags`), then TrainConfig's
    arguments (`config_kwargs`) or the flags passed on (`flags`);
  * device_check.sh's summary: the labels of the options that are off (or 0) by default.
Adding an on/off option takes one StepOption here, then its rows in device_check.sh's measurement plan and the
line of layouts.measure's row that records it as the backend applied it (tests/test_bench_scripts.py checks that
each option has a flag cupynet.train takes, a field in the rows and, off or 0 by default, a label).
"""
from dataclasses import dataclass

from cupynet.config import TrainConfig, build_parser

_DEFAULTS = TrainConfig()
_TRAIN_FLAGS = {action.dest: action for action in build_parser()._actions}


@dataclass(frozen=True)
class StepOption:
    name: str             # TrainConfig's field
    column: str           # bench/layouts.py's table: the column's head, right-aligned in `width` characters
    width: int
    phrase: str           # describe()'s words, with the separator before them: "{}" takes an int's value; a
    phrase_off: str = ""  # switch has its words when on and when off
    label: str = ""       # device_check.sh's summary: " + label" where an option off (0) by default is on ("{}":
                          # its value)

    @property
    def default(self):
        return getattr(_DEFAULTS, self.name)

    @property
    def on_off(self):
        return isinstance(self.default, bool)

    @property
    def flag(self):
        """cupynet.train's flag, e.g. --conv-genstats (its --no- form turns a switch off)."""
        return _TRAIN_FLAGS[self.name].option_strings[0]

    @property
    def switch(self):
        """A switch's flag that turns its default over: --conv-genstats, --no-conv-deterministic."""
        return "--no-" + self.flag[2:] if self.default else self.flag

    @property
    def choices(self):
        return _TRAIN_FLAGS[self.name].choices

    @property
    def help(self):
        return _TRAIN_FLAGS[self.name].help

    def flags(self, value):
        """The cupynet.train flags that select `value` (none for the default; None: not given, none either)."""
        if value is None or value == self.default:
            return []
        return [self.switch] if self.on_off else [self.flag, str(value)]

    def describe(self, value):
        """Its part of describe(): ', 2 BatchNorm launch(es)', ' with split-K settings', '' (a switch off)."""
        if self.on_off:
            return self.phrase if value else self.phrase_off
        return self.phrase.format(value)


OPTIONS = (
    StepOption("wgrad_streams", column="wgrad", width=5, phrase="{} stream(s)"),
    StepOption("wgrad_chunks", column="chunks", width=6, phrase=", {} chunk(s)"),
    StepOption("conv_deterministic", column="det", width=4, phrase=", deterministic engines",
               phrase_off=", any engines"),
    StepOption("conv_split_k", column="split", width=5, phrase=" with split-K settings", label="split-K"),
    StepOption("bn_launches", column="bn", width=3, phrase=", {} BatchNorm launch(es)"),
    StepOption("conv_genstats", column="genstats", width=8, phrase=", statistics from the convolutions (genstats)",
               label="genstats"),
    StepOption("conv_pixel_pairs", column="px-pairs", width=8, phrase=", stage 1 convolutions on pixel pairs",
               label="pixel pairs"),
    StepOption("wgrad_pixel_pairs", column="wg-pairs", width=8, phrase=", stage 1 weight gradients on pixel pairs",
               label="wgrad pixel pairs"),
    StepOption("own_conv_channels", column="own-conv", width=8,
               phrase=", convolutions of up to {} channels in our own kernel",
               label="own conv kernel up to {} channels"),
    StepOption("residual_grad_sums", column="res-sums", width=8, phrase=", BatchNorm gradient sums in the residual add",
               label="residual grad sums"),
    StepOption("stream_priorities", column="prio", width=4, phrase=", the main stream first",
               label="stream priorities"),
    StepOption("conv_tune_in_graph", column="in-graph", width=8, phrase=", engines timed in a graph",
               label="engines timed in a graph"),
    StepOption("padded_input", column="padded", width=6, phrase=", the input padded to 16 bytes a pixel",
               label="padded input"),
    StepOption("programmatic_launch", column="pdl", width=3, phrase=", programmatic launches",
               label="programmatic launch"),
    StepOption("programmatic_launch_early", column="pdl-early", width=9,
               phrase=", launched once the kernel before has begun", label="programmatic launch early"),
)
NAMES = tuple(option.name for option in OPTIONS)
DEFAULTS = {option.name: option.default for option in OPTIONS}


def add_flags(parser, options=OPTIONS, help_prefix="", ints_unset=False):
    """`options`' flags as cupynet.train spells them, each with its TrainConfig field as dest: an int takes a value
    (TrainConfig's default, or None with ints_unset: left to cupynet.train), a switch is the one flag that turns
    its default over (--conv-genstats, --no-conv-deterministic: what `flags` gives)."""
    for option in options:
        if option.on_off:
            parser.add_argument(option.switch, dest=option.name, help=help_prefix + option.help,
                                action="store_false" if option.default else "store_true")
        else:
            parser.add_argument(option.flag, type=int, choices=option.choices, help=help_prefix + option.help,
                                default=None if ints_unset else option.default)


def config_kwargs(args, options=OPTIONS):
    """TrainConfig's keyword arguments for `options` as parsed into args (add_flags)."""
    return {option.name: getattr(args, option.name) for option in options}


def flags(options):
    """The cupynet.train flags that select `options` (by name: a dict, or vars() of parsed args), in OPTIONS'
    order; none for a default, a None or a missing one."""
    return [flag for option in OPTIONS for flag in option.flags(options.get(option.name))]


def describe(options):
    """'1 stream(s), 1 chunk(s), deterministic engines, 2 BatchNorm launch(es)': `options` (every one, by name)."""
    return "".join(option.describe(options[option.name]) for option in OPTIONS)
