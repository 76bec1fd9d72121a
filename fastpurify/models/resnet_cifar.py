"""CIFAR ResNet-18 as in the official ANP code.

3x3 stride-1 stem without max-pool, BasicBlocks with BatchNorm after every convolution and in
every projection shortcut: 20 BatchNorm layers, 4,800 channels. Parameter names match the
official checkpoints (conv1, bn1, layerK.i.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}, linear),
so those load directly. Global average pooling is adaptive, so any input size works (on 32x32
it equals the official 4x4 average pool).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .stages import resnet_stages


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = resnet_stages(BasicBlock, num_blocks)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
