"""The four ResNet stages (64, 128, 256, 512 channels) shared by our CIFAR-style ResNets."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

WIDTHS = (64, 128, 256, 512)


def resnet_stages(block: Callable[[int, int, int], nn.Module], num_blocks: tuple[int, ...],
                  in_planes: int = 64) -> list[nn.Sequential]:
    """One ``nn.Sequential`` per stage; every stage but the first halves the resolution in its
    first block."""
    stages = []
    for i, (planes, blocks) in enumerate(zip(WIDTHS, num_blocks)):
        layers = []
        for j in range(blocks):
            layers.append(block(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
            in_planes = planes
        stages.append(nn.Sequential(*layers))
    return stages
