"""Stand-in models for tests of input checks, of the ReLU folding and of the pruning choice."""

import torch
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


def pruning_subject():
    """A small random CNN (48 BatchNorm neurons), 24 random 12 px images with labels, and random
    masks: what the pruning choice's tests walk."""
    from fastpurify.models import small_cnn
    torch.manual_seed(0)
    model = small_cnn(num_classes=10, in_channels=3, width=8).eval()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(24, 3, 12, 12, generator=g), torch.randint(0, 10, (24,), generator=g)
    masks = {n: torch.rand(m.num_features, generator=g) for n, m in model.named_modules()
             if isinstance(m, nn.BatchNorm2d)}
    return model, masks, images, labels
