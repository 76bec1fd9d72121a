"""Stand-in models for tests of input checks."""

import torch.nn as nn


class Refuses(nn.Module):
    """A model (one Linear layer, 2 classes) whose forward pass fails the test: for checks that
    must refuse bad input before any work."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        raise AssertionError("no forward may run")
