"""The PyTorch twin of cupynet's ResNet v1, and the copy of cupynet's weights into it (for bench/vs_torch.py).

    from torch_resnet import ResNetV1, copy_weights, cupynet_gradients, cupynet_state, set_gradients
    model = ResNetV1(depth=44, bn_momentum=1 - config.bn_decay, bn_epsilon=config.bn_epsilon)
    copy_weights(trainer, model)          # trainer: cupynet.trainer.Trainer (or its .model, a cupynet ResNet)
    arrays = cupynet_state(model)         # {cupynet name: canonical NumPy array}, to compare after a step
    grads = cupynet_gradients(model)      # the same for the parameters' .grad
    set_gradients(model, grads)           # and back

The architecture is cupynet/model.py's block "v1", detail for detail:
  * stem: 3x3 conv (16 filters, stride 1, pad 1, no bias) -> BatchNorm -> ReLU;
  * three stages of n = (depth - 2) / 6 post-activation basic blocks with 16/32/64 filters, the first
    block of stages 2 and 3 with stride 2: conv3x3(stride)-BN-ReLU-conv3x3-BN, add the shortcut, ReLU;
    every conv pads 1 on each side (cupynet's pad = ksize // 2, symmetric even at stride 2);
  * option-A shortcut where the shape changes: average pool with kernel = stride, then zero-pad the
    channels, (cout - cin) // 2 below and the rest above;
  * global average pool and a 10-way dense layer with bias.
BatchNorm: cupynet's moving = decay * moving + (1 - decay) * batch is PyTorch's momentum = 1 - decay; both
normalize with the biased batch variance and update the moving variance with the unbiased one; epsilon
is passed through. Only block "v1" has a twin: copy_weights refuses the others.

Parameter names: cupynet's ParamStore names every tensor ("stage2/block0/conv1/w", ".../bn1/gamma",
".../bn1/moving_variance", "logits/w"); `twin_tensors` maps each to the torch tensor holding it. Conv
weights are canonical KCRS in cupynet (state_dict) and (out, in, kh, kw) in torch: the same order.
cupynet's dense weight is (in, out) (y = x @ w + b); torch.nn.Linear's is (out, in): it is transposed.

A benchmark helper only: nothing in cupynet imports this file, and PyTorch is not a dependency of cupynet. Run as a
script, it has nothing to run; without PyTorch it says in one line that it needs it (exit status 2).
"""
import sys

import numpy as np

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except Exception as error:      # ImportError, or OSError when a CUDA library of the wheel cannot load
    if __name__ != "__main__":
        raise
    print(f"error: bench/torch_resnet.py needs PyTorch ({' '.join(f'{type(error).__name__}: {error}'.split())}); "
          f"it is bench/vs_torch.py's model, run that", file=sys.stderr)
    sys.exit(2)

NUM_CLASSES = 10
STAGE_FILTERS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)
# cupynet BatchNorm tensor name -> torch.nn.BatchNorm2d attribute
BN_TENSORS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
DENSE_WEIGHT = "logits/w"    # the one tensor stored transposed: cupynet (in, out), torch (out, in)


def blocks_per_stage(depth):
    """n of a v1 ResNet of depth 6n + 2."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"ResNet v1 depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, ...), got {depth}")
    return (depth - 2) // 6


class ShortcutA(nn.Module):
    """Option-A shortcut: average pool with kernel = stride, then zero-pad channels (lo below, the rest above)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        self.pad_lo = (cout - cin) // 2
        self.pad_hi = cout - cin - self.pad_lo

    def forward(self, x):
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride)
        # F.pad pads the last dims first: (W, W, H, H, C, C) for an (N, C, H, W) tensor (logical order,
        # also for channels_last memory).
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))


class BasicBlockV1(nn.Module):
    """conv-BN-ReLU-conv-BN, add the shortcut, ReLU (post-activation)."""

    def __init__(self, cin, cout, stride, bn):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, **bn)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, **bn)
        needs_shortcut = (cin, stride) != (cout, 1)
        self.shortcut = ShortcutA(cin, cout, stride) if needs_shortcut else nn.Identity()

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNetV1(nn.Module):
    """CIFAR ResNet v1 of depth 6n+2: x (N, 3, 32, 32) -> logits (N, 10)."""

    def __init__(self, depth, bn_momentum=0.003, bn_epsilon=1e-5):
        super().__init__()
        n = blocks_per_stage(depth)
        bn = dict(momentum=bn_momentum, eps=bn_epsilon)
        self.depth = depth
        self.stem = nn.Conv2d(3, STAGE_FILTERS[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(STAGE_FILTERS[0], **bn)
        self.stages = nn.ModuleList()
        cin = STAGE_FILTERS[0]
        for filters, stride in zip(STAGE_FILTERS, STAGE_STRIDES):
            blocks = []
            for index in range(n):
                blocks.append(BasicBlockV1(cin, filters, stride if index == 0 else 1, bn))
                cin = filters
            self.stages.append(nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))           # (N, 16, 32, 32)
        for stage in self.stages:
            x = stage(x)                                  # (N, 16|32|64, 32|16|8, 32|16|8)
        x = x.mean(dim=(2, 3))                            # (N, 64)
        return self.fc(x)                                 # (N, 10)


def twin_tensors(model):
    """{cupynet parameter or statistic name: the torch tensor that holds it} for a ResNetV1."""
    tensors = {"stem/conv/w": model.stem.weight}
    tensors.update(_bn_tensors("stem/bn", model.stem_bn))
    for stage_index, stage in enumerate(model.stages, start=1):
        for block_index, block in enumerate(stage):
            name = f"stage{stage_index}/block{block_index}"
            tensors[f"{name}/conv1/w"] = block.conv1.weight
            tensors.update(_bn_tensors(f"{name}/bn1", block.bn1))
            tensors[f"{name}/conv2/w"] = block.conv2.weight
            tensors.update(_bn_tensors(f"{name}/bn2", block.bn2))
    tensors[DENSE_WEIGHT] = model.fc.weight
    tensors["logits/b"] = model.fc.bias
    return tensors


def _bn_tensors(name, bn):
    return {f"{name}/{ours}": getattr(bn, theirs) for ours, theirs in BN_TENSORS.items()}


def cupynet_model_of(trainer_or_model):
    """The cupynet ResNet of a Trainer (its .model) or the model itself; only block v1 has a torch twin."""
    model = getattr(trainer_or_model, "model", trainer_or_model)
    if model.block != "v1":
        raise ValueError(f"bench/torch_resnet.py has a PyTorch twin of block 'v1' only, not {model.block!r}")
    return model


def cupynet_arrays(trainer_or_model):
    """{name: canonical float32 NumPy array} of cupynet's parameters and BN moving statistics."""
    model = cupynet_model_of(trainer_or_model)
    arrays = {**model.params.state_dict(), **model.state.state_dict()}
    return {name: np.asarray(value, dtype=np.float32) for name, value in arrays.items()}


def copy_weights(trainer_or_model, torch_model):
    """Copy cupynet's parameters and BN moving statistics into `torch_model` (a ResNetV1), in place.

    Raises ValueError if the two models do not have exactly the same tensors with the same shapes.
    """
    model = cupynet_model_of(trainer_or_model)
    if model.num_layers != torch_model.depth:
        raise ValueError(f"cupynet ResNet-{model.num_layers} vs torch ResNet-{torch_model.depth}")
    arrays = cupynet_arrays(model)
    targets = twin_tensors(torch_model)
    if set(arrays) != set(targets):
        missing, extra = sorted(set(arrays) - set(targets)), sorted(set(targets) - set(arrays))
        raise ValueError(f"tensor names differ: only in cupynet {missing}, only in torch {extra}")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(_as_torch(name, arrays[name], target))


def set_gradients(torch_model, arrays):
    """Make {cupynet name: canonical NumPy gradient} the parameters' .grad (e.g. to feed cupynet's gradients
    to torch's optimizer and compare the update alone)."""
    for name, tensor in twin_tensors(torch_model).items():
        if isinstance(tensor, nn.Parameter):
            tensor.grad = _as_torch(name, arrays[name], tensor)


def _as_torch(name, array, like):
    """A canonical cupynet array -> a tensor shaped, typed and placed like `like` (the dense weight transposed)."""
    source = array.T if name == DENSE_WEIGHT else array
    if tuple(source.shape) != tuple(like.shape):
        raise ValueError(f"{name}: cupynet shape {source.shape} vs torch {tuple(like.shape)}")
    return torch.from_numpy(np.ascontiguousarray(source)).to(device=like.device, dtype=like.dtype)


def cupynet_state(torch_model):
    """The torch model's tensors as cupynet would name and shape them: {name: float32 NumPy array}."""
    return {name: _as_cupynet(name, tensor) for name, tensor in twin_tensors(torch_model).items()}


def cupynet_gradients(torch_model):
    """The trainable tensors' .grad, named and shaped as cupynet's gradient buffer: {name: NumPy array}.

    BN moving statistics are buffers, not parameters: they have no gradient and are left out.
    """
    return {name: _as_cupynet(name, tensor.grad) for name, tensor in twin_tensors(torch_model).items()
            if isinstance(tensor, nn.Parameter)}


def _as_cupynet(name, tensor):
    """A torch tensor -> float32 NumPy in cupynet's canonical shape (the dense weight transposed)."""
    value = tensor.detach().float().cpu().numpy()
    return value.T if name == DENSE_WEIGHT else value
