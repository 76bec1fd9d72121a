"""Small subjects for the large-model tests (also imported by the gloo ranks): a conv/linear
net without normalisation, a net of residual blocks, and a tiny ViT-like token net."""

import torch
import torch.nn as nn


def clean_set(n=24, channels=3, size=8, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, size, size, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


def max_gap(a, b):
    assert list(a) == list(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


class Block(nn.Module):
    """conv-norm-relu-conv-norm with a residual: a block for checkpointing."""

    def __init__(self, c, norm):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(c, c, 3, padding=1), norm(c)
        self.conv2, self.norm2 = nn.Conv2d(c, c, 3, padding=1), norm(c)

    def forward(self, x):
        return torch.relu(x + self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x))))))


class TokenNet(nn.Module):
    """A tiny ViT-like network: patch embedding, LayerNorm'd MLP blocks on tokens, a head."""

    def __init__(self, dim=6, classes=4):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                                    nn.Linear(2 * dim, dim)) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(tokens)).mean(1))


def plain_net(classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 9, 7), nn.ReLU(), nn.Linear(7, classes)).double()


def block_net(norm=nn.BatchNorm2d, classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(Block(4, norm), Block(4, norm)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes)).double()


def token_net():
    torch.manual_seed(0)
    net = TokenNet().double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net
