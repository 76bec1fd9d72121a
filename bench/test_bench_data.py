"""Win 2 of the design (§4): augmented batches made on the device, not by a DataLoader.

Both sides produce one batch of 128 CIFAR-size images with random crop (pad 4) and horizontal
flip, drawn with replacement from the same 500 clean images (ANP's clean set), in one process
on one device. Compare the medians of the group ``anp-batch``.
"""

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from fastpurify._torchvision import import_torchvision
from fastpurify.data import DeviceBatchSampler

N, BATCH = 500, 128
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def clean_set():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(N) % 10


class PilDataset(torch.utils.data.Dataset):
    """The official ANP path: uint8 arrays -> PIL -> per-image transforms."""

    def __init__(self, data, labels, transform):
        self.data, self.labels, self.transform = data.numpy(), labels, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.data[i])), int(self.labels[i])


@pytest.mark.benchmark(group="anp-batch")
def test_dataloader_pil_transforms(benchmark, clean_set):
    T = import_torchvision().transforms
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    ds = PilDataset(*clean_set, transform)
    sampler = RandomSampler(ds, replacement=True, num_samples=10**9)
    it = iter(DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=0))

    def one_batch():
        x, y = next(it)
        return x.to(DEVICE), y.to(DEVICE)

    x, _ = benchmark(one_batch)
    assert x.shape == (BATCH, 3, 32, 32)


@pytest.mark.benchmark(group="anp-batch")
def test_device_batch_sampler(benchmark, clean_set):
    images = clean_set[0].permute(0, 3, 1, 2).float().div(255)
    sampler = DeviceBatchSampler(images, clean_set[1], BATCH, seed=0, device=DEVICE)

    def one_batch():
        out = sampler.sample()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    x, _ = benchmark(one_batch)
    assert x.shape == (BATCH, 3, 32, 32)
