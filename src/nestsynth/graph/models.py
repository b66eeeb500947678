"""Reference networks as plain ``nn.Module`` s for the graph core: CIFAR ResNets and tiny
residual models for 8x8 digits.

The CIFAR ResNets use 1x1 convolution + batch norm projection shortcuts wherever a block
changes the shape (He et al. 2016's option B): option A's shortcut (stride-2 subsampling
and zero-padded channels) is a slice and a pad, which the graph core does not support.

Dense weight counts (convolutions and the classifier; biases and batch norm not counted):

* ResNet-20: 268,336 weights in the 19 convolutions and the 64 x 10 classifier, plus
  2,560 in the two projection shortcuts (16 x 32 + 32 x 64), 270,896 in all (the
  paper's "0.27M").  40,813,184 multiply-accumulates on 32 x 32 inputs.
* ResNet-18 (CIFAR variant: 3x3 stem, no max pool): 11,164,352 weights
  (~11.17M parameters with biases and batch norm), 555,422,720 multiply-accumulates.
* ResNet-8 for MNIST (:func:`resnet8_mnist`, 8/16/32 channels, one block per stage):
  19,464 weights, 2,364,864 multiply-accumulates on 28 x 28 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A bias-free ``kernel`` x ``kernel`` convolution ("same" padding) and its batch norm."""
    return nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)


class BasicBlock(nn.Module):
    """He et al.'s basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of the first convolution (and of the projection shortcut).

    The shortcut is the identity when the shape is kept, otherwise a 1x1 convolution
    with ``stride`` followed by batch norm (``shortcut`` is then an ``nn.Sequential``).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, 3, stride)
        self.conv2, self.bn2 = _conv_bn(c_out, c_out, 3)
        self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, stages of basic blocks, global average pool, classifier.

    Args:
        widths: channels of each stage (the stem has ``widths[0]``).
        blocks: basic blocks per stage.
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.

    Stage ``i`` is ``layer{i+1}``; its first block has stride 2 except in stage 1.
    """

    def __init__(self, widths, blocks, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, widths[0], 3)
        c_in = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(c_in, width, 2 if (j == 0 and i > 0) else 1))
                c_in = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.n_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """He et al. 2016's CIFAR ResNet-20: 3 stages of 3 basic blocks, 16/32/64 channels.

    Projection shortcuts (option B) at the two stage changes add 2,560 weights to the
    0.27M (270,896 dense weights in all; see the module docstring).
    """
    return CifarResNet((16, 32, 64), (3, 3, 3), num_classes, in_channels)


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """The common CIFAR ResNet-18: 3x3 stem with 64 channels, 4 stages of 2 basic blocks
    with 64/128/256/512 channels, 1x1 projection shortcuts, average pool, classifier
    (11,164,352 dense weights)."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels)


def resnet8_mnist(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    """A ResNet-8 for MNIST-sized images: 3x3 stem with 8 channels, 3 stages of one basic
    block with 8/16/32 channels (1x1 projection shortcuts into stages 2 and 3), average
    pool, classifier: 19,464 dense weights, 2,364,864 multiply-accumulates on 28 x 28 x 1.

    The global average pool makes it fit any image size (8x8 digits included)."""
    return CifarResNet((8, 16, 32), (1, 1, 1), num_classes, in_channels)


class TinyResidualMLP(nn.Module):
    """A residual MLP for 8x8 digits: flatten, fc_in, one residual block of two Linear
    layers (batch norm on the first), then the classifier.

    Args:
        in_features: inputs after flattening (64 for 8x8 digits).
        hidden: width of the residual stream and of the block.
        num_classes: outputs.
    """

    def __init__(self, in_features: int = 64, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.fc_in = nn.Linear(in_features, hidden)
        self.fc1, self.bn1, self.fc2 = nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc_in(torch.flatten(x, 1)))
        h = torch.relu(h + self.fc2(torch.relu(self.bn1(self.fc1(h)))))
        return self.out(h)


class TinyResidualCNN(nn.Module):
    """A small CNN for (C, 8, 8) images that has every coupling the graph core handles:
    a residual block on the stem's stream, two 1x1 branches concatenated along channels,
    max pooling to 4x4, flatten into a Linear layer with batch norm, and the classifier.

    Args:
        in_channels: channels of the input images.
        width: channels of the stem's stream and of each branch.
        hidden: neurons of the hidden Linear layer.
        num_classes: outputs.
    """

    def __init__(self, in_channels: int = 1, width: int = 8, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.stem, self.bn = _conv_bn(in_channels, width, 3)
        self.block = BasicBlock(width, width)
        self.branch_a = nn.Conv2d(width, width, 1)
        self.branch_b = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * width * 16, hidden)
        self.fc_bn = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(F.relu(self.bn(self.stem(x))))
        x = torch.cat([F.relu(self.branch_a(x)), F.relu(self.branch_b(x))], dim=1)
        x = self.pool(x).flatten(1)
        return self.out(F.relu(self.fc_bn(self.fc(x))))
