"""PyTorch definitions of the paper's other CIFAR networks, Shake-Shake and PyramidNet, with the tensor names
and layer order that swa-models builds, so that checkpoints move between the two and golden tests compare
them layer for layer.

    python xtask/torch/cifar_networks.py params

prints every variant's parameter count for 10 and 100 classes.

- ShakeShake(classes, depth, width): Gastaldi (2017), "Shake-Shake regularization", the CIFAR network
  `depth` = 6n+2 with three stages of n two-branch blocks of widths `width`, 2·width, 4·width (26 2x64d:
  depth 26, width 64). Each branch is ReLU-conv3x3-BN-ReLU-conv3x3-BN; the branches are mixed per image
  with alpha ~ U(0,1) forward and an independent beta ~ U(0,1) backward ("Shake-Shake-Image"), alpha = 0.5
  in evaluation. Where the shape changes, the shortcut is ReLU, then two 1x1 convolutions of width/2
  outputs each, the second on the input shifted by one pixel (right and down, zero-filled), both
  subsampled by the stride, concatenated and batch-normalised.
- PyramidNet(classes, depth, alpha, bottleneck): Han et al. (2017), "Deep Pyramidal Residual Networks":
  widths grow by alpha / (number of blocks) at every block and are rounded down, as in the authors' Torch
  code (math.floor; rounding to nearest instead gives 26.2M parameters for depth 272, alpha 200, not the
  published 26.0M);
  blocks BN-conv3x3-BN-ReLU-conv3x3-BN (basic, depth = 6n+2) or BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-
  conv1x1(x4)-BN (bottleneck, depth = 9n+2); the shortcut is the identity, 2x2 average-pooled where the
  resolution halves, zero-padded in channels.
"""
import math
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShakeMix(torch.autograd.Function):
    """alpha·a + (1 − alpha)·b forward; beta·g and (1 − beta)·g backward (alpha, beta: [N, 1, 1, 1])."""

    @staticmethod
    def forward(ctx, a, b, alpha, beta):
        ctx.save_for_backward(beta)
        return a * alpha + b * (1 - alpha)

    @staticmethod
    def backward(ctx, grad):
        beta, = ctx.saved_tensors
        return grad * beta, grad * (1 - beta), None, None


def shake_branch(in_channels, out_channels, stride):
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=False),
        nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ShakeShortcut(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels // 2, 1, bias=False)
        self.conv2 = nn.Conv2d(in_channels, out_channels // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = F.relu(x)
        y1 = self.conv1(x[:, :, ::self.stride, ::self.stride])
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        y2 = self.conv2(shifted[:, :, ::self.stride, ::self.stride])
        return self.bn(torch.cat([y1, y2], dim=1))


class ShakeBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.branch1 = shake_branch(in_channels, out_channels, stride)
        self.branch2 = shake_branch(in_channels, out_channels, stride)
        self.shortcut = (ShakeShortcut(in_channels, out_channels, stride)
                         if stride != 1 or in_channels != out_channels else None)
        # Tests set this to a callable returning (alpha, beta) of shape [N, 1, 1, 1].
        self.coefficients = None

    def forward(self, x):
        a, b = self.branch1(x), self.branch2(x)
        if self.training:
            n = x.shape[0]
            if self.coefficients is not None:
                alpha, beta = self.coefficients(n)
            else:
                alpha = torch.rand(n, 1, 1, 1, device=x.device)
                beta = torch.rand(n, 1, 1, 1, device=x.device)
            mixed = ShakeMix.apply(a, b, alpha, beta)
        else:
            mixed = 0.5 * a + 0.5 * b
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + mixed


def init_convolutions(model):
    """He-normal convolution weights over the fan-out, std sqrt(2 / (k·k·out)), as the authors' code and
    swa-models initialise these networks (BatchNorm and the classifier keep PyTorch's defaults)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')


class ShakeShake(nn.Module):
    def __init__(self, classes, depth=26, width=64):
        super().__init__()
        assert (depth - 2) % 6 == 0, 'depth must be 6n+2'
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_channels = 16
        for stage, (channels, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2)]):
            layer = []
            for block in range(blocks):
                layer.append(ShakeBlock(in_channels, channels, stride if block == 0 else 1))
                in_channels = channels
            setattr(self, f'layer{stage + 1}', nn.Sequential(*layer))
        self.fc = nn.Linear(in_channels, classes)
        init_convolutions(self)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.avg_pool2d(F.relu(x), 8).flatten(1)
        return self.fc(x)


def pad_channels(x, channels):
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))


class PyramidBasic(nn.Module):
    expansion = 1

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.stride = stride

    def forward(self, x):
        y = self.conv1(self.bn1(x))
        y = self.bn3(self.conv2(F.relu(self.bn2(y))))
        skip = F.avg_pool2d(x, 2) if self.stride != 1 else x
        return y + pad_channels(skip, y.shape[1])


class PyramidBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(channels * 4)
        self.stride = stride

    def forward(self, x):
        y = self.conv1(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(y)))
        y = self.bn4(self.conv3(F.relu(self.bn3(y))))
        skip = F.avg_pool2d(x, 2) if self.stride != 1 else x
        return y + pad_channels(skip, y.shape[1])


class PyramidNet(nn.Module):
    def __init__(self, classes, depth=272, alpha=200, bottleneck=True):
        super().__init__()
        block = PyramidBottleneck if bottleneck else PyramidBasic
        per_block = 9 if bottleneck else 6
        assert (depth - 2) % per_block == 0, f'depth must be {per_block}n+2'
        blocks = (depth - 2) // per_block
        add_rate = alpha / (3 * blocks)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_channels, width = 16, 16.0
        for stage, stride in enumerate([1, 2, 2]):
            layer = []
            for b in range(blocks):
                width += add_rate
                layer.append(block(in_channels, math.floor(width), stride if b == 0 else 1))
                in_channels = math.floor(width) * block.expansion
            setattr(self, f'layer{stage + 1}', nn.Sequential(*layer))
        self.bn_final = nn.BatchNorm2d(in_channels)
        self.fc = nn.Linear(in_channels, classes)
        init_convolutions(self)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.avg_pool2d(F.relu(self.bn_final(x)), 8).flatten(1)
        return self.fc(x)


def build(name, classes):
    """A network from its swa-models name: shakeshake<depth>-2x<width>d, pyramidnet<depth>a<alpha> (basic
    blocks) or pyramidnet<depth>a<alpha>-bottleneck."""
    m = re.fullmatch(r'shakeshake(\d+)-2x(\d+)d', name)
    if m:
        return ShakeShake(classes, int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r'pyramidnet(\d+)a(\d+)(-bottleneck)?', name)
    if m:
        return PyramidNet(classes, int(m.group(1)), int(m.group(2)), bottleneck=m.group(3) is not None)
    raise SystemExit(f'unknown network {name}')


NAMED = ['shakeshake26-2x32d', 'shakeshake26-2x64d', 'shakeshake26-2x96d', 'pyramidnet110a48',
         'pyramidnet272a200-bottleneck']


def params(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == '__main__':
    if sys.argv[1:] == ['params']:
        for name in NAMED:
            print(name, params(build(name, 10)), params(build(name, 100)))
    else:
        raise SystemExit(__doc__)
