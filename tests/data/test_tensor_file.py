"""A damaged data file (.safetensors, .npz, .pt) is a clear error naming it."""

import numpy as np
import pytest
import torch

from fastpurify.data import load_source
from fastpurify.data.tensor_file import load_tensor_file
from fastpurify.validation import InputError


def write(path):
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    if path.suffix == ".npz":
        np.savez(path, images=images.numpy(), labels=labels.numpy())
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({"images": images, "labels": labels}, str(path))
    else:
        torch.save({"images": images, "labels": labels}, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
@pytest.mark.parametrize("damage", ["truncated", "overwritten", "empty"])
def test_a_damaged_data_file_is_named(tmp_path, suffix, damage):
    path = write(tmp_path / f"clean{suffix}")
    assert load_tensor_file(path)[0].shape == (4, 1, 8, 8)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "overwritten": b"\x00" * len(data), "empty": b""}[damage])
    with pytest.raises(InputError, match=f"{path} is not a readable data file"):
        load_tensor_file(path)
    with pytest.raises(InputError, match=f"{path} is not a readable data file"):
        load_source(str(path))
