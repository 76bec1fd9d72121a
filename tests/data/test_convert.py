import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fastpurify.data import as_tensors, infer_num_classes
from fastpurify.validation import InputError


def test_tensor_pair_is_copied_not_aliased(images):
    labels = torch.arange(6) % 3
    x, y = as_tensors((images, labels))
    assert torch.equal(x, images) and torch.equal(y, labels)
    x.zero_()
    assert images.abs().sum() > 0


def test_uint8_numpy_pair_is_scaled():
    arr = np.full((2, 1, 4, 4), 255, dtype=np.uint8)
    x, y = as_tensors((arr, [1, 0]))
    assert x.dtype == torch.float32 and float(x.max()) == 1.0
    assert y.tolist() == [1, 0] and y.dtype == torch.int64


def test_channels_last_pair_is_refused():
    with pytest.raises(InputError, match=r"permute\(0, 3, 1, 2\)"):
        as_tensors((torch.rand(4, 32, 32, 3), torch.zeros(4, dtype=torch.int64)))


class PilDataset(Dataset):
    """A torchvision-like dataset yielding PIL images (no transform)."""

    def __init__(self, n):
        rng = np.random.default_rng(0)
        self.arrays = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(n)]

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        return Image.fromarray(self.arrays[i]), i % 2


def test_map_style_dataset_of_pil_images():
    ds = PilDataset(3)
    x, y = as_tensors(ds)
    assert x.shape == (3, 3, 5, 7)
    expected = torch.from_numpy(ds.arrays[2]).permute(2, 0, 1).float() / 255
    assert torch.allclose(x[2], expected)
    assert y.tolist() == [0, 1, 0]


class CifarLike(Dataset):
    """Holds .data (N, H, W, C) uint8 and .targets, like torchvision's CIFAR10."""

    classes = [str(i) for i in range(10)]

    def __init__(self, transform=None):
        self.data = np.random.default_rng(0).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
        self.targets = [3, 1, 4, 1]
        self.transform = transform
        self.target_transform = None

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


def test_torchvision_style_dataset_fast_path_equals_item_path():
    fast = as_tensors(CifarLike())
    slow = as_tensors(CifarLike(transform=lambda img: img))  # a transform forces item by item
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert fast[0].shape == (4, 3, 6, 6)
    assert infer_num_classes(CifarLike(), fast[1]) == 10


def test_real_torchvision_dataset_class(tmp_path):
    from fastpurify._torchvision import import_torchvision

    tv = import_torchvision()

    class Folderless(tv.datasets.VisionDataset):
        def __init__(self):
            super().__init__(str(tmp_path))
            self.data = np.zeros((2, 4, 4, 3), dtype=np.uint8)
            self.targets = [0, 1]

        def __len__(self):
            return 2

    x, y = as_tensors(Folderless())
    assert x.shape == (2, 3, 4, 4) and y.tolist() == [0, 1]


def test_dataloader():
    ds = TensorDataset(torch.rand(10, 1, 4, 4), torch.arange(10) % 5)
    x, y = as_tensors(DataLoader(ds, batch_size=3))
    assert x.shape == (10, 1, 4, 4) and torch.equal(y, torch.arange(10) % 5)


@pytest.mark.parametrize("data, message", [
    ((torch.rand(0, 3, 4, 4), torch.zeros(0, dtype=torch.int64)), "empty"),
    (TensorDataset(torch.rand(0, 3, 4, 4), torch.zeros(0)), "empty"),
    ((torch.rand(4, 4, 4), torch.zeros(4, dtype=torch.int64)), "rank 4"),
    ((torch.full((2, 1, 4, 4), float("nan")), torch.zeros(2, dtype=torch.int64)), "NaN"),
    ((torch.rand(2, 1, 4, 4), torch.tensor([0, 0.5])), "integer"),
    ((torch.rand(3, 1, 4, 4), torch.tensor([0, 1])), "one label per image"),
    (42, "cannot read data"),
])
def test_bad_data(data, message):
    with pytest.raises(InputError, match=message):
        as_tensors(data)


def test_labels_out_of_range_for_given_classes():
    with pytest.raises(InputError, match=r"\[0, 4\]"):
        as_tensors((torch.rand(2, 1, 4, 4), torch.tensor([0, 5])), num_classes=5)
