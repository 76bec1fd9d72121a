"""A small BatchNorm CNN for fast CPU tests and the demo.

Two stages of (conv-BN-ReLU) x 2 + max-pool, a 2x2 adaptive average pool that keeps coarse
position (a corner trigger stays visible), and a linear classifier. Works on any input size
of at least 4x4 and any channel count.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, width), nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width), *_conv_bn_relu(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def small_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width)


def small_cnn_wide(num_classes: int = 10, in_channels: int = 3) -> SmallCNN:
    """``small_cnn`` at width 32 (192 normalised neurons, 4x the convolution work): the CPU-scale
    subject with room to prune (docs/anp-selection.md)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=32)
