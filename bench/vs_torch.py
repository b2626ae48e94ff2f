"""cupynet against PyTorch: the same model, batch, layout and precision, in the same run on the same device.

    python bench/vs_torch.py                                  # GPU 0 if usable, else the CPU: ResNet-44, batch 128, NHWC
    python bench/vs_torch.py --device 0 --layouts NCHW,NHWC --dtypes float32,bfloat16
    python bench/vs_torch.py --device 0 --no-tf32             # strict float32 convolutions on both sides
    python bench/vs_torch.py --quick                          # CPU, ResNet-8, batch 8: checks the script runs

Three forms of one training step (forward, mean cross-entropy, backward, momentum SGD with weight decay on
every parameter) per layout and dtype:
  * torch-eager: the model in bench/torch_resnet.py, channels_last for NHWC, forward under
    `torch.autocast(bfloat16)` for bfloat16 (float32 master weights), `zero_grad(set_to_none=True)`,
    `torch.optim.SGD(momentum, weight_decay)`, `cudnn.benchmark = True`;
  * torch-graph (CUDA only, the strongest PyTorch form; /work/shared/GPU_NOTES.md): the whole step captured
    in one CUDA graph after three warm-up steps on a side stream, gradients set to None before capture,
    SGD written with `torch._foreach_*` ops and the LR in a 0-d tensor; each step replays the graph;
  * cupynet: bench/layouts.py's `measure` (the Trainer's own step, its on-device augmentation included).
The PyTorch steps copy a batch already on the device into the model's input each step: the stand-in for
cupynet's on-device augmentation (no host input pipeline is timed on either side).

It verifies before it times: per (layout, dtype) a cupynet Trainer's initial weights and BN statistics are
copied into the torch twin, cupynet runs one training step, and the very batch it trained on (its own
augmentation, read back from the Trainer's input buffer) goes through one torch step with the same LR.
The losses (batch statistics), the gradients, and what the update changes (torch's SGD applied to cupynet's
gradients: parameters, and the BN moving statistics) must agree within tolerances derived from the
precision (TOLERANCES below); otherwise it prints the differences, writes the JSON with its verification
and exits with status 1 before timing anything.

Timing: warm-up steps (excluded), then `--repeats` windows of `--steps` steps, timed with CUDA events on
the GPU and perf_counter on the CPU; images/s is the median of the windows (with min and max). Prints a
table with the ratios cupynet / PyTorch and writes JSON (`--json`, default bench/results/vs_torch-<host>.json)
with the hardware and versions (cupynet's and PyTorch's), the arguments, the verification and the rows.
Without PyTorch it prints one "skipped" line and exits 0. A benchmark only: PyTorch is not a dependency of cupynet.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)          # bench/layouts.py (which puts the repository on sys.path) and torch_resnet.py

import layouts                                                     # noqa: E402
from bench import step_options                                     # noqa: E402
from bench.cli import device_of, is_device, run_script     # noqa: E402
from cupynet.backends import MAX_WGRAD_CHUNKS, MAX_WGRAD_STREAMS, check_dtype, gpu_problem   # noqa: E402
from cupynet.config import OneLineErrorParser, TrainConfig         # noqa: E402
from cupynet.data import synthetic_dataset                         # noqa: E402
from cupynet.errors import ConfigError, CupynetError               # noqa: E402
from cupynet.train import build_backend                            # noqa: E402
from cupynet.trainer import Trainer                                # noqa: E402

DTYPES = ("float32", "bfloat16")
LAYOUTS = ("NCHW", "NHWC")
GRAPH_WARMUP_STEPS = 3             # eager steps on a side stream before capture (GPU_NOTES)
# Untimed and timed steps when not given: a GPU needs more steps for cuDNN autotuning and for windows
# long enough to time; a CPU step of ResNet-44 takes seconds.
DEFAULT_STEPS = {"gpu": dict(warmup=10, steps=20), "cpu": dict(warmup=1, steps=2)}


@dataclass
class Tolerance:
    """Relative tolerances of the verification: on the loss; on the gradient (all tensors as one vector);
    per tensor on what the update changes (parameters and BN moving statistics)."""
    loss: float
    grads: float
    step: float


# Where the tolerances come from. The two sides compute the same math in different orders (im2col + BLAS
# against oneDNN or cuDNN algorithms, different reduction trees), with u the unit roundoff of what the
# convolutions multiply: fp32 u = 2^-24 = 6e-8; TF32 (cupynet's and PyTorch's default for GPU float32
# convs) u = 2^-11 = 4.9e-4; bf16 u = 2^-8 = 3.9e-3, and there both sides also round every stored activation.
#   * loss: a conv output carries ~sqrt(C*R*S) * u relative error (C*R*S <= 576), but the products' errors
#     mostly cancel and BatchNorm after every conv rescales, so errors add over the depth instead of
#     compounding: ~sqrt(depth) * u * a few on a logit, further averaged by the mean over the batch.
#     fp32: 1e-5 (measured on the CPU: 1e-7 to 2e-7 for ResNet-8/20/44); tf32: 1e-2 (ResNet-44:
#     sqrt(45) * 4.9e-4 * 3 ~ 7e-3); bf16: 3e-2 (PyTorch bf16 autocast against cupynet fp32 on the CPU: 3e-4).
#   * gradients: set by ReLU kinks, not by rounding. An activation within rounding of zero takes the other
#     side of a ReLU on the other framework; its gradient is then 0 on one side and not on the other, and
#     BatchNorm's backward spreads that difference over its whole channel. Measured on the CPU (cupynet
#     against PyTorch/oneDNN, both fp32; float64 on both sides agrees to 1e-14, so the model is exact):
#     3.7e-3 / 7.5e-3 / 1.3e-2 for ResNet-8 b8 / ResNet-20 b32 / ResNet-44 b64, hence fp32 5e-2. Flips grow
#     with u: PyTorch bf16 against cupynet fp32 measured 0.29 (ResNet-44 b64), hence bf16 0.7 (an unrelated
#     gradient of the same norm gives 1.4, a sign error 2) and tf32, in between, 0.3. The tf32 and bf16
#     figures are extrapolated from those CPU measurements, not yet measured on a GPU.
#   * step: torch's optimizer gets cupynet's gradients, so the step differs only by the update's arithmetic
#     and the batch statistics. The change of a moving variance, (1 - decay) * (var - 1), is a difference of
#     float32 values ~1 (rounding u) that is (1 - decay) * |var - 1| ~ 3e-4 of them: fp32 3e-4 (measured up
#     to 7e-5). tf32: the batch statistics differ by ~u * a few: 1e-2; bf16 measured 5e-3: 5e-2.
TOLERANCES = {"fp32": Tolerance(loss=1e-5, grads=5e-2, step=3e-4),
              "tf32": Tolerance(loss=1e-2, grads=3e-1, step=1e-2),
              "bf16": Tolerance(loss=3e-2, grads=7e-1, step=5e-2)}


def import_torch():
    """(torch, None) or (None, why it cannot be imported)."""
    try:
        import torch
        return torch, None
    except Exception as error:      # ImportError, or OSError when a CUDA library of the wheel cannot load
        return None, " ".join(f"{type(error).__name__}: {error}".split())


# ----------------------------------------------------------------------------- arguments


def csv_of(allowed):
    """argparse type: a comma-separated list of values from `allowed`."""
    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(allowed)}, got {text!r}")
        return items
    parse.__name__ = "list"
    return parse


def add_step_options(p):
    """cupynet's step options (what bench/best_step_options.py prints), as training spells them. PyTorch's side
    always runs as --no-conv-deterministic allows (cudnn.benchmark without cudnn.deterministic); cupynet's NCHW
    runs go without --conv-pixel-pairs (its rows record it off)."""
    step_options.add_flags(p, help_prefix="cupynet: ")


def step_options_problem(args):
    """A one-line reason the step options cannot run with args.batch, or None."""
    for name, most in (("wgrad_streams", MAX_WGRAD_STREAMS), ("wgrad_chunks", MAX_WGRAD_CHUNKS)):
        if not 1 <= getattr(args, name) <= most:
            return f"--{name.replace('_', '-')} must be from 1 to {most}, got {getattr(args, name)}"
    if args.wgrad_chunks > args.batch:
        return f"--wgrad-chunks {args.wgrad_chunks} is more than the {args.batch} images of the batch"
    return None


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=44, help="ResNet v1 depth, 6n+2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--layouts", type=csv_of(LAYOUTS), default=["NHWC"], help="comma-separated: NCHW, NHWC")
    p.add_argument("--dtypes", type=csv_of(DTYPES), default=["float32"],
                   help="comma-separated: float32, bfloat16 (GPU only)")
    p.add_argument("--device", default="auto", help="'cpu', a GPU id, or 'auto' (GPU 0 if cupynet and PyTorch "
                   "can both use it, else the CPU)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="GPU float32: strict float32 convolutions on both sides (default: TF32 on both)")
    add_step_options(p)
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help="cupynet's whole-step CUDA graph (read by bench/layouts.py's measure)")
    p.add_argument("--warmup", type=int, help="untimed steps per form (default: 10 on a GPU, 1 on the CPU)")
    p.add_argument("--steps", type=int, help="steps per timed window (default: 20 on a GPU, 2 on the CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per form (median reported)")
    p.add_argument("--quick", action="store_true",
                   help="CPU, ResNet-8, batch 8, NHWC and NCHW, float32, 2 warm-up, 5 windows of 2 steps")
    p.add_argument("--json", help="output file (default bench/results/vs_torch-<host>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.depth, args.batch, args.layouts, args.dtypes = 8, 8, ["NHWC", "NCHW"], ["float32"]
        args.device, args.warmup, args.steps, args.repeats = "cpu", 2, 2, 5
    problem = argument_problem(args)
    if problem:
        p.error(problem)
    return args


def argument_problem(args):
    """A one-line reason the arguments cannot run, or None (the device itself is checked later)."""
    if args.depth < 8 or (args.depth - 2) % 6:
        return f"--depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, ...), got {args.depth}"
    for name in ("batch", "repeats", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name} must be >= 1, got {value}"
    problem = step_options_problem(args)
    if problem:
        return problem
    if args.warmup is not None and args.warmup < 0:
        return f"--warmup must be >= 0, got {args.warmup}"
    if args.device != "auto" and not is_device(args.device):
        return f"--device must be 'cpu', a GPU id or 'auto', got {args.device!r}"
    return None


def resolve_device(args, torch):
    """Turn --device auto into '0' or 'cpu', fill the device's default step counts; check the device."""
    if args.device == "auto":
        usable = torch.cuda.is_available() and gpu_problem() is None
        args.device = "0" if usable else "cpu"
    kind = "cpu" if args.device == "cpu" else "gpu"
    for name, value in DEFAULT_STEPS[kind].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for dtype in args.dtypes:
        check_dtype(device_of(args.device), dtype)     # bfloat16 needs a GPU: one-line DeviceError
    if kind == "gpu" and not torch.cuda.is_available():
        raise CupynetError(f"--device {args.device}: PyTorch sees no CUDA device (torch {torch.__version__}, "
                           f"built for CUDA {torch.version.cuda})")
    return torch.device("cpu") if kind == "cpu" else torch.device(f"cuda:{args.device}")


def precision(device, dtype, tf32):
    """'fp32', 'tf32' or 'bf16': what the convolutions multiply in, which sets the tolerances."""
    if dtype == "bfloat16":
        return "bf16"
    return "tf32" if device.type == "cuda" and tf32 else "fp32"


# ----------------------------------------------------------------------------- building both sides


def cupynet_config(args, layout, dtype):
    return TrainConfig(num_layers=args.depth, train_batch_size=args.batch, data_format=layout, dtype=dtype,
                       synthetic=True, tf32=args.tf32, **step_options.config_kwargs(args))


def cupynet_trainer(args, layout, dtype, dataset):
    config = cupynet_config(args, layout, dtype)
    return Trainer(config, dataset, build_backend(config, device_of(args.device)))


def memory_format(torch, layout):
    return torch.channels_last if layout == "NHWC" else torch.contiguous_format


def torch_model(torch, config, device, layout):
    """The torch twin with cupynet's BatchNorm settings, on `device` in `layout`'s memory format."""
    from torch_resnet import ResNetV1
    model = ResNetV1(config.num_layers, bn_momentum=1.0 - config.bn_decay, bn_epsilon=config.bn_epsilon)
    return model.to(device).to(memory_format=memory_format(torch, layout)).train()


def configure_torch(torch, device, tf32):
    """cuDNN autotuning on; TF32 for cuDNN convolutions exactly when cupynet uses it."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.set_device(device)


class TorchEagerStep:
    """One eager PyTorch training step: forward (autocast for bf16), cross-entropy, backward, SGD.

    images: (N, 3, 32, 32) in the model's memory format, on the model's device; labels: (N,) int64.
    """

    def __init__(self, torch, model, images, labels, dtype, config, learning_rate):
        self.torch, self.model = torch, model
        self.images, self.labels = images, labels          # the static batch the step reads
        self.source = images.clone()                       # copied in every step (stand-in for augmentation)
        self.autocast = dict(device_type=images.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=config.momentum,
                                         weight_decay=config.weight_decay, nesterov=False, dampening=0)

    def forward_backward(self):
        """Loss (0-d tensor) of the static batch; gradients land in .grad (fresh tensors: set_to_none)."""
        torch = self.torch
        self.images.copy_(self.source)
        with torch.autocast(**self.autocast):
            loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def __call__(self):
        loss = self.forward_backward()
        self.optimizer.step()
        return loss


def sgd_foreach(torch, params, grads, buffers, learning_rate, momentum, weight_decay):
    """cupynet's momentum SGD (cupynet/optim.py) in foreach ops; learning_rate is a 0-d tensor.

    g = grad + wd * v;  buffer = momentum * buffer + g;  v -= lr * buffer
    (torch.optim.SGD with weight_decay, dampening 0, nesterov False, from zero buffers.)
    """
    with torch.no_grad():
        g = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, g)
        torch._foreach_sub_(params, torch._foreach_mul(buffers, learning_rate))


class TorchGraphStep:
    """The whole training step captured in one CUDA graph, as GPU_NOTES describes; each call replays it.

    Static input and labels; three eager warm-up steps on a side stream (cuDNN autotuning, allocations);
    gradients set to None just before capture, so backward allocates them in the graph's private pool;
    forward (autocast for bf16) + cross-entropy + backward + foreach SGD with the LR in a 0-d tensor inside
    `torch.cuda.graph`. Per step: copy the batch into the static input, set the LR tensor, replay.
    """

    def __init__(self, torch, model, images, labels, dtype, config, learning_rate):
        self.torch, self.model = torch, model
        self.images, self.labels = images, labels
        self.source = images.clone()
        # No autocast weight-cast cache inside a capture: the cached bf16 copies would be freed on leaving
        # autocast while the graph still uses their memory (PyTorch's CUDA-graph notes require it off).
        self.autocast = dict(device_type="cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16",
                             cache_enabled=False)
        self.momentum, self.weight_decay = config.momentum, config.weight_decay
        self.params = list(model.parameters())
        self.buffers = [torch.zeros_like(p) for p in self.params]
        self.learning_rate_value = learning_rate
        self.learning_rate = torch.tensor(learning_rate, device=images.device)     # 0-d, read by the graph
        self.graph = self._capture()

    def _step(self):
        torch = self.torch
        for p in self.params:
            p.grad = None
        with torch.autocast(**self.autocast):
            loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
        loss.backward()
        sgd_foreach(torch, self.params, [p.grad for p in self.params], self.buffers, self.learning_rate,
                    self.momentum, self.weight_decay)
        return loss

    def _capture(self):
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loss = self._step()                    # a static tensor, rewritten by every replay
        return graph

    def __call__(self):
        self.images.copy_(self.source)
        self.learning_rate.fill_(self.learning_rate_value)
        self.graph.replay()
        return self.loss


# ----------------------------------------------------------------------------- verification


def host_batch(trainer):
    """The Trainer's last batch as NumPy: images (N, 3, 32, 32) float32 (NCHW whatever the layout), labels (N,)."""
    be = trainer.be
    images = be.to_host(trainer.x).astype(np.float32)   # bf16 values are exact in float32
    if be.layout == "NHWC":
        images = images.transpose(0, 3, 1, 2)
    images = images[:, :3]                               # without --padded-input's zero channels
    return np.ascontiguousarray(images), be.to_host(trainer.labels).astype(np.int64)


def relative_error(ours, theirs):
    """Norm-wise relative difference ||ours - theirs|| / ||theirs||, in float64."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), np.finfo(np.float32).tiny))


def worst(errors):
    """(name, error) of the largest error in {name: error}."""
    name = max(errors, key=errors.get)
    return name, errors[name]


def one_step_each(torch, args, layout, dtype, dataset, device, perturb=None):
    """Same weights, same batch, one training step on each side; everything verify() compares.

    `perturb(torch_model)`, if given, edits the torch model after the copy (the negative control of the tests).
    Returns (before, ours, theirs): the copied state {name: canonical float32 array}, and per side a dict
    with the loss (float), the gradients and the state after the update (both {name: array}).
    """
    from torch_resnet import copy_weights, cupynet_arrays, cupynet_gradients, cupynet_state, set_gradients
    trainer = cupynet_trainer(args, layout, dtype, dataset)
    model = torch_model(torch, trainer.config, device, layout)
    copy_weights(trainer, model)
    if perturb is not None:
        perturb(model)
    before = cupynet_arrays(trainer)
    learning_rate = trainer.learning_rate

    trainer.train_step()                                                    # cupynet: augment, step, update
    params = trainer.model.params
    ours = {"loss": trainer.take_mean_loss(), "grads": params.state_dict(flat=params.grad_flat),
            "after": cupynet_arrays(trainer)}

    images, labels = host_batch(trainer)
    images = torch.from_numpy(images).to(device).contiguous(memory_format=memory_format(torch, layout))
    step = TorchEagerStep(torch, model, images, torch.from_numpy(labels).to(device), dtype, trainer.config,
                          learning_rate)
    loss = step.forward_backward().item()
    grads = cupynet_gradients(model)
    # The update from cupynet's gradients: what the step changes then differs only by the optimizer's and
    # BatchNorm's own arithmetic, not by the gradients' ReLU-kink noise (see TOLERANCES).
    set_gradients(model, ours["grads"])
    step.optimizer.step()
    theirs = {"loss": loss, "grads": grads, "after": cupynet_state(model)}
    return before, ours, theirs


def compare(before, ours, theirs, tolerance):
    """Loss, per-tensor gradient and per-tensor step errors against the tolerances -> a JSON-ready dict."""
    loss_error = abs(ours["loss"] - theirs["loss"]) / abs(theirs["loss"])
    # Gradients as one vector: a tensor whose true gradient nearly cancels to zero (a BatchNorm gamma) can
    # differ by 100% of its tiny norm under bf16 and still be right; the worst tensor is reported, not judged.
    names = sorted(theirs["grads"])
    grad_error = relative_error(flat(ours["grads"], names), flat(theirs["grads"], names))
    grad_name, grad_name_error = worst({name: relative_error(ours["grads"][name], theirs["grads"][name])
                                        for name in names})
    # What the step changed (-lr * momentum buffer of the parameters, (1 - decay) * (batch - moving) of the
    # moving statistics), per tensor and compared as a change: an error in the step's math is relative to it.
    step_errors = {name: relative_error(ours["after"][name] - before[name], theirs["after"][name] - before[name])
                   for name in before}
    step_name, step_error = worst(step_errors)
    passed = loss_error <= tolerance.loss and grad_error <= tolerance.grads and step_error <= tolerance.step
    return {"loss_cupynet": ours["loss"], "loss_torch": theirs["loss"], "loss_rel_error": loss_error,
            "loss_tolerance": tolerance.loss, "grad_rel_error": grad_error, "grad_tolerance": tolerance.grads,
            "grad_worst_tensor": grad_name, "grad_worst_tensor_rel_error": grad_name_error,
            "step_rel_error": step_error, "step_worst": step_name, "step_tolerance": tolerance.step,
            "passed": bool(passed)}


def flat(arrays, names):
    """The arrays of `names`, raveled and concatenated in that order: (total,)."""
    return np.concatenate([np.ravel(arrays[name]) for name in names])


def verify(torch, args, layout, dtype, dataset, device):
    kind = precision(device, dtype, args.tf32)
    before, ours, theirs = one_step_each(torch, args, layout, dtype, dataset, device)
    return {"layout": layout, "dtype": dtype, "precision": kind, **compare(before, ours, theirs, TOLERANCES[kind])}


def print_verification(check):
    verdict = "ok" if check["passed"] else "FAILED"
    print(f"verify {check['layout']} {check['dtype']} ({check['precision']}): loss cupynet {check['loss_cupynet']:.6f} "
          f"torch {check['loss_torch']:.6f} rel {check['loss_rel_error']:.1e} (tol {check['loss_tolerance']:.0e}); "
          f"grads rel {check['grad_rel_error']:.1e} (tol {check['grad_tolerance']:.0e}; worst tensor "
          f"{check['grad_worst_tensor']} {check['grad_worst_tensor_rel_error']:.1e}); "
          f"step rel {check['step_rel_error']:.1e} (tol {check['step_tolerance']:.0e}) [{check['step_worst']}]: "
          f"{verdict}", flush=True)


# ----------------------------------------------------------------------------- timing


class TorchSync:
    """What layouts.WallTimer needs of a backend: synchronize()."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def synchronize(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)


class TorchEventTimer:
    """Seconds of a window on the device, between two CUDA events on PyTorch's current stream."""

    def __init__(self, torch):
        self.begin = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def start(self):
        self.begin.record()

    def stop(self):
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1000.0


def time_torch(torch, step, args, device, form):
    """Warm up `step`, then time --repeats windows of --steps steps -> a result dict like layouts.measure's."""
    for _ in range(args.warmup):
        step()
    loss = step().item()                                          # one more: a finite loss, and synchronized
    if not np.isfinite(loss):
        raise RuntimeError(f"{form}: loss is {loss} after warm-up; not timing a broken step")
    timer = TorchEventTimer(torch) if device.type == "cuda" else layouts.WallTimer(TorchSync(torch, device))
    rates = []
    for _ in range(args.repeats):
        timer.start()
        for _ in range(args.steps):
            step()
        rates.append(args.steps * args.batch / timer.stop())
    median = statistics.median(rates)
    return {"images_per_sec": round(median, 2), "images_per_sec_min": round(min(rates), 2),
            "images_per_sec_max": round(max(rates), 2), "step_ms": round(1000 * args.batch / median, 3),
            "windows": args.repeats, "steps_per_window": args.steps, "warmup_steps": args.warmup,
            "last_loss": round(loss, 4)}


def torch_form(torch, form, args, layout, dtype, device):
    """A fresh torch model and batch (synthetic images in [-1, 1), random labels) -> the timed `form`."""
    config = cupynet_config(args, layout, dtype)
    model = torch_model(torch, config, device, layout)
    images = torch.rand(args.batch, 3, 32, 32, device=device) * 2 - 1
    images = images.contiguous(memory_format=memory_format(torch, layout))
    labels = torch.randint(0, 10, (args.batch,), device=device)
    learning_rate = config.lr_values[0]
    kind = TorchGraphStep if form == "graph" else TorchEagerStep
    return time_torch(torch, kind(torch, model, images, labels, dtype, config, learning_rate), args, device,
                      f"torch-{form} {layout} {dtype}")


def ratio(ours, theirs):
    """cupynet / PyTorch images/s from the reported figures (None where either did not run)."""
    if theirs is None or ours is None:
        return None
    return round(ours["images_per_sec"] / theirs["images_per_sec"], 3)


def benchmark_row(torch, args, layout, dtype, dataset, device):
    """The three timings of one configuration. One that fails at run time (out of memory, a CUDA error, a
    capture PyTorch refuses) is None with its error under "errors"; the others are still measured."""
    errors = {}

    def attempt(name, timing):
        try:
            return timing()
        except ConfigError:
            raise                          # flags cupynet refuses: the run is wrong, not this form
        except Exception as error:
            errors[name] = layouts.one_line(error)
            print(f"{name} {layout} {dtype}: failed: {errors[name]}", flush=True)
            return None

    eager = attempt("torch_eager", lambda: torch_form(torch, "eager", args, layout, dtype, device))
    graph = attempt("torch_graph", lambda: torch_form(torch, "graph", args, layout, dtype, device)) \
        if device.type == "cuda" else None
    # timed with the step options that were verified against PyTorch (cupynet_trainer)
    ours = attempt("cupynet", lambda: layouts.measure(args.depth, args.batch, layout, dtype, args, dataset,
                                                      **step_options.config_kwargs(args)))
    row = {"depth": args.depth, "batch": args.batch, "layout": layout, "dtype": dtype,
           "precision": precision(device, dtype, args.tf32), "torch_eager": eager, "torch_graph": graph,
           "cupynet": ours, "ratio_vs_torch_eager": ratio(ours, eager), "ratio_vs_torch_graph": ratio(ours, graph)}
    if errors:
        row["errors"] = errors
    return row


# ----------------------------------------------------------------------------- report


def torch_environment(torch, device):
    """PyTorch's versions and settings, beside layouts.environment()'s hardware and cupynet versions."""
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "torch_threads": torch.get_num_threads(), "torch_cudnn_benchmark": torch.backends.cudnn.benchmark,
            "torch_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    if device.type == "cuda":
        info["torch_gpu"] = torch.cuda.get_device_name(device)
    return info


def print_header(env, args):
    print(f"{env.get('gpu', 'CPU')} | cupynet {env['cupynet']} ({env['git_commit']}) | torch {env['torch']} "
          f"(CUDA {env['torch_cuda']}, cuDNN {env['torch_cudnn']}) | numpy {env['numpy']} | {env['cpu']}, "
          f"{env['cpu_count']} cores")
    print(f"ResNet-{args.depth} v1, batch {args.batch} | {args.repeats} windows x {args.steps} steps after "
          f"{args.warmup} warm-up | device {args.device}, TF32 {'on' if args.tf32 else 'off'}", flush=True)


def figure(result):
    return f"{result['images_per_sec']:>11.1f}" if result else f"{'-':>11}"


def times(value):
    return f"{value:>9.3f}x" if value is not None else f"{'-':>10}"


def print_table(rows):
    print(f"{'layout':>6} {'dtype':>8} {'torch-eager':>11} {'torch-graph':>11} {'cupynet':>11} "
          f"{'cupy/eager':>10} {'cupy/graph':>10}   (images/s, median)")
    for row in rows:
        print(f"{row['layout']:>6} {row['dtype']:>8} {figure(row['torch_eager'])} {figure(row['torch_graph'])} "
              f"{figure(row['cupynet'])} {times(row['ratio_vs_torch_eager'])} {times(row['ratio_vs_torch_graph'])}")


def write_json(path, report, quiet=False):
    path = path or os.path.join(BENCH, "results", f"vs_torch-{platform.node() or 'host'}.json")
    layouts.replace_json(path, report)
    if not quiet:
        print(f"wrote {path}")


def run(torch, args):
    """Verify every configuration, then time them; returns the process exit status."""
    device = resolve_device(args, torch)
    configure_torch(torch, device, args.tf32)
    env = {**layouts.environment(args.device), **torch_environment(torch, device)}
    print_header(env, args)
    dataset = synthetic_dataset(num_train=args.batch * 4, num_test=args.batch, seed=0)
    configs = [(layout, dtype) for layout in args.layouts for dtype in args.dtypes]
    checks = []
    for layout, dtype in configs:
        checks.append(verify(torch, args, layout, dtype, dataset, device))
        print_verification(checks[-1])
    report = {"benchmark": "vs_torch", "environment": env, "args": vars(args), "verification": checks, "results": []}
    if not all(check["passed"] for check in checks):
        print("vs_torch: verification FAILED: cupynet and PyTorch disagree beyond the tolerances; nothing timed",
              file=sys.stderr)
        write_json(args.json, report)
        return 1
    if device.type != "cuda":
        print("torch-graph: skipped: whole-step CUDA graphs need a CUDA device")
    started = time.perf_counter()
    for layout, dtype in configs:          # the JSON after every row: a run stopped from outside keeps them
        report["results"].append(benchmark_row(torch, args, layout, dtype, dataset, device))
        write_json(args.json, report, quiet=True)
    print_table(report["results"])
    print(f"timed in {time.perf_counter() - started:.1f} s")
    write_json(args.json, report)
    failed = sum(len(row.get("errors", {})) for row in report["results"])
    if failed:
        print(f"vs_torch: {failed} timing(s) failed (the rows' \"errors\" say why)", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    args = parse_args(argv)
    torch, problem = import_torch()
    if torch is None:
        print(f"vs_torch: skipped: PyTorch is not importable ({problem})")
        return 0
    try:
        return run(torch, args)
    except CupynetError as error:        # a device or dtype this machine cannot run: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run_script(main)
