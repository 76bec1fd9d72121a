"""Stand-in models for tests of input checks and of the ReLU folding."""

import torch.nn as nn
import torch.nn.functional as F


class Refuses(nn.Module):
    """A model (one Linear layer, 2 classes) whose forward pass fails the test: for checks that
    must refuse bad input before any work."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        raise AssertionError("no forward may run")


class CalledTwice(nn.Module):
    """One BatchNorm called twice, once before a ReLU: a flag set for that call would change both."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv(x)
        return (F.relu(self.bn(h)) + self.bn(0.5 * h)).mean((2, 3))
