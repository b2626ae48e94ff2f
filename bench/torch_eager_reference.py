"""PyTorch eager throughput of the same ResNet, as a reference figure for cupynet's GPU numbers.

    python bench/torch_eager_reference.py                                   # ResNet-44, batch 128, NHWC, fp32
    python bench/torch_eager_reference.py --layouts NCHW,NHWC --dtypes float32,bfloat16 --json out.json

The model is the one cupynet trains (cupynet/model.py, block "v1"): a 3x3 stem conv, three stages of n
post-activation basic blocks with 16/32/64 filters and strides 1/2/2, option-A shortcuts (average pool +
zero-padded channels), global average pooling and a 10-way dense layer; depth 6n+2. A training step is
forward + cross-entropy + backward + momentum SGD with weight decay on every parameter, on synthetic images
and labels that already sit on the GPU (no input pipeline is timed).

Layout NHWC means channels_last memory format for the model and the input; dtype bfloat16 means the
forward runs under `torch.autocast(dtype=torch.bfloat16)` with fp32 master weights. cuDNN autotuning
(`cudnn.benchmark`) is on, and PyTorch's default of TF32 for cuDNN convolutions applies to float32.
Timing: warm-up steps, then `--windows` windows of `--steps` steps each between two CUDA events; the
median images/s over the windows is reported (with min and max).

A benchmark only: nothing in cupynet imports this file, and PyTorch is not a dependency of cupynet.
"""
import argparse
import json
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10
STAGE_FILTERS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)


class ShortcutA(nn.Module):
    """Option-A shortcut: average pool with kernel = stride, then zero-pad channels symmetrically."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        self.pad_lo = (cout - cin) // 2
        self.pad_hi = cout - cin - self.pad_lo

    def forward(self, x):
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride)
        # F.pad pads the last dims first: (W, W, H, H, C, C) for an (N, C, H, W) tensor.
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))


class BasicBlockV1(nn.Module):
    """conv-BN-ReLU-conv-BN, add the shortcut, ReLU (post-activation)."""

    def __init__(self, cin, cout, stride, bn_momentum):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        needs_shortcut = (cin, stride) != (cout, 1)
        self.shortcut = ShortcutA(cin, cout, stride) if needs_shortcut else nn.Identity()

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNetV1(nn.Module):
    """CIFAR ResNet v1 of depth 6n+2."""

    def __init__(self, depth, bn_momentum=0.003):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        self.stem = nn.Conv2d(3, STAGE_FILTERS[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(STAGE_FILTERS[0], momentum=bn_momentum)
        layers = []
        cin = STAGE_FILTERS[0]
        for filters, stride in zip(STAGE_FILTERS, STAGE_STRIDES):
            for i in range(blocks):
                layers.append(BasicBlockV1(cin, filters, stride if i == 0 else 1, bn_momentum))
                cin = filters
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        x = x.mean(dim=(2, 3))
        return self.fc(x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=44, help="6n+2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--layouts", default="NHWC", help="comma-separated: NCHW, NHWC (channels_last)")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16 (autocast)")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps (cuDNN autotuning happens here)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows (median reported)")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


class Step:
    """One training step on fixed synthetic data: forward, loss, backward, momentum SGD."""

    def __init__(self, depth, batch, layout, dtype, device):
        torch.manual_seed(0)
        self.memory_format = torch.channels_last if layout == "NHWC" else torch.contiguous_format
        self.model = ResNetV1(depth).to(device).to(memory_format=self.memory_format)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        self.images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=self.memory_format)
        self.labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
        self.autocast = dtype == "bfloat16"

    def __call__(self):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            loss = F.cross_entropy(self.model(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss


def measure(args, layout, dtype):
    """Median images/s of one configuration, timed with CUDA events."""
    step = Step(args.depth, args.batch, layout, dtype, args.device)
    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    if not torch.isfinite(loss):
        raise RuntimeError(f"{layout} {dtype}: loss is {loss.item()} after warm-up; not timing a broken step")
    rates = []
    for _ in range(args.windows):
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(args.steps):
            step()
        end.record()
        end.synchronize()
        seconds = begin.elapsed_time(end) / 1000.0
        rates.append(args.steps * args.batch / seconds)
    return {"framework": "torch-eager", "depth": args.depth, "batch": args.batch, "layout": layout,
            "dtype": dtype, "images_per_sec": round(statistics.median(rates), 1),
            "images_per_sec_min": round(min(rates), 1), "images_per_sec_max": round(max(rates), 1),
            "windows": args.windows, "steps_per_window": args.steps, "warmup_steps": args.warmup}


def environment(device):
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def main(argv=None):
    args = parse_args(argv)
    torch.backends.cudnn.benchmark = True
    env = environment(args.device)
    print(f"{env['gpu']} | torch {env['torch']} | CUDA {env['cuda']} | cuDNN {env['cudnn']} | "
          f"ResNet-{args.depth} batch {args.batch} | {args.windows} windows x {args.steps} steps "
          f"after {args.warmup} warm-up")
    print(f"{'layout':>6} {'dtype':>9} {'img/s':>9} {'min':>9} {'max':>9}")
    rows = []
    for layout in args.layouts.split(","):
        for dtype in args.dtypes.split(","):
            row = measure(args, layout, dtype)
            rows.append(row)
            print(f"{layout:>6} {dtype:>9} {row['images_per_sec']:>9.1f} {row['images_per_sec_min']:>9.1f} "
                  f"{row['images_per_sec_max']:>9.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "torch_eager_reference", "environment": env, "args": vars(args),
                       "results": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
