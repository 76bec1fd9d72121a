"""Turn what a user hands us into validated (images, labels) tensors.

Accepted: an ``(images, labels)`` pair of tensors or numpy arrays, any map-style
``torch.utils.data.Dataset`` (torchvision datasets included), or a ``DataLoader``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..validation import InputError, check_images, check_labels

ACCEPTED = "an (images, labels) pair of tensors/arrays, a map-style torch Dataset, or a DataLoader"


def as_tensors(data: Any, *, num_classes: int | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return validated ``(images (N, C, H, W) float in [0, 1] range as given, labels (N,) int64)``.

    uint8 images are scaled by 1/255. Tensors given in an (images, labels) pair must be NCHW;
    items of a Dataset follow torchvision's ``ToTensor`` rules (tensors are CHW, PIL images and
    numpy arrays HWC). The data is copied, never modified in place.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = _images_from_batch(data[0]), _labels_to_tensor(data[1])
    elif isinstance(data, DataLoader):
        images, labels = _from_loader(data, progress)
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        images, labels = _from_dataset(data, progress)
    else:
        raise InputError(f"cannot read data of type {type(data).__name__}: expected {ACCEPTED}")
    images = images.to(dtype=dtype)
    check_images(images)
    check_labels(labels, num_images=images.shape[0], num_classes=num_classes)
    if device is not None:
        images, labels = images.to(device), labels.to(device)
    return images.contiguous(), labels


def infer_num_classes(data: Any, labels: torch.Tensor) -> int:
    """The dataset's own class list if it has one, else the largest label + 1."""
    classes = getattr(data, "classes", None)
    if classes is not None and len(classes) > 0:
        return len(classes)
    return int(labels.max()) + 1


def _to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images.clone()
    raise InputError(f"images must be uint8 or floating point, got dtype {images.dtype}")


def _images_from_batch(images: Any) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a tensor or numpy array (N, C, H, W), got {type(images).__name__}")
    if images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] > 4:
        raise InputError(
            f"images of shape {tuple(images.shape)} look channels-last (N, H, W, C); fastpurify expects "
            "(N, C, H, W): pass images.permute(0, 3, 1, 2)"
        )
    return _to_float(images)


def _labels_to_tensor(labels: Any) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        out = labels.detach().cpu()
    else:
        try:
            out = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError) as err:
            raise InputError(f"labels must be a sequence of class indices: {err}") from None
    if out.is_floating_point():
        if not torch.equal(out, out.round()):
            raise InputError("labels must be integer class indices, got non-integer values")
    elif out.dtype == torch.bool:
        raise InputError("labels must be integer class indices, got booleans")
    return out.to(torch.int64).reshape(-1) if out.dim() == 0 else out.to(torch.int64)


def _item_to_chw(item: Any) -> torch.Tensor:
    """One image as a float CHW tensor, by torchvision ToTensor's rules."""
    if isinstance(item, torch.Tensor):
        return _to_float(item.detach().cpu())
    if hasattr(item, "mode") and hasattr(item, "size"):  # a PIL image
        item = np.array(item)
    if isinstance(item, np.ndarray):
        arr = item[:, :, None] if item.ndim == 2 else item
        if arr.ndim != 3:
            raise InputError(f"a dataset image must be (H, W) or (H, W, C), got shape {item.shape}")
        return _to_float(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))
    raise InputError(f"a dataset item's image must be a tensor, PIL image or numpy array, got {type(item).__name__}")


def _from_dataset(ds: Any, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(ds)
    if n == 0:
        raise InputError("the dataset is empty: no images were given")
    fast = _from_torchvision_arrays(ds)
    if fast is not None:
        return fast
    indices = range(n)
    if progress:
        from tqdm.auto import tqdm
        indices = tqdm(indices, desc="reading dataset", unit="img")
    images, labels = [], []
    for i in indices:
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise InputError(f"dataset item {i} must be an (image, label) pair, got {type(item).__name__}")
        images.append(_item_to_chw(item[0]))
        labels.append(int(item[1]))
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise InputError(f"dataset images must all have one shape, found {sorted(shapes)[:3]}...")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _from_torchvision_arrays(ds: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fast path for torchvision-style datasets holding ``.data``/``.targets`` and no transforms."""
    data, targets = getattr(ds, "data", None), getattr(ds, "targets", None)
    if data is None or targets is None:
        return None
    if getattr(ds, "transform", None) is not None or getattr(ds, "target_transform", None) is not None:
        return None
    data = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or len(data) != len(targets):
        return None
    if data.dim() == 3:  # MNIST-style (N, H, W)
        images = data.unsqueeze(1)
    elif data.dim() == 4:  # CIFAR-style (N, H, W, C)
        images = data.permute(0, 3, 1, 2)
    else:
        return None
    return _to_float(images.contiguous()), _labels_to_tensor(targets)


def _from_loader(loader: DataLoader, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batches = loader
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(loader, desc="reading batches", unit="batch")
    images, labels = [], []
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise InputError("each DataLoader batch must be an (images, labels) pair")
        images.append(_images_from_batch(batch[0]))
        labels.append(_labels_to_tensor(batch[1]))
    if not images:
        raise InputError("the DataLoader yielded no batches: no images were given")
    return torch.cat(images), torch.cat(labels)
