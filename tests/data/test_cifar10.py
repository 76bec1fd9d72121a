import os
import pickle

import numpy as np
import pytest
import torch

from fastpurify.data import CIFAR10_FILES, load_cifar10, load_source
from fastpurify.validation import InputError


def write_fake_cifar(folder, per_batch=7, protocol=2):
    """The real layout: one pickled dict per batch with b'data' (N, 3072) uint8 and b'labels'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in CIFAR10_FILES:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_reads_train_and_test(tmp_path, protocol):
    written = write_fake_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    x, y = load_cifar10(tmp_path, train=True)
    assert x.shape == (35, 3, 32, 32) and x.dtype == torch.float32
    first = torch.from_numpy(written["data_batch_1"][0][0].reshape(3, 32, 32)).float() / 255
    assert torch.equal(x[0], first)  # rows are channel-major: R plane, G plane, B plane
    assert y[7:14].tolist() == written["data_batch_2"][1]
    xt, yt = load_cifar10(tmp_path / "cifar-10-batches-py", train=False)  # the folder itself works too
    assert xt.shape == (7, 3, 32, 32) and yt.tolist() == written["test_batch"][1]


def test_missing_files_name_the_path(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3") as info:
        load_cifar10(tmp_path)
    assert "cifar-10-batches-py" in str(info.value) and "never downloads" in str(info.value)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(folder)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": Exploit(), b"labels": [0]}, fh)
    with pytest.raises(InputError, match="refusing to load"):
        load_cifar10(tmp_path, train=False)


def test_wrong_shape_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(folder)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(InputError, match="3072"):
        load_cifar10(tmp_path, train=False)


def test_source_spec(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    for spec in (f"cifar10:{tmp_path}", str(tmp_path)):
        splits = load_source(spec)
        assert splits.train[0].shape[0] == 35 and splits.test[0].shape[0] == 7 and splits.num_classes == 10
    with pytest.raises(InputError, match="3x32x32"):
        load_source(str(tmp_path), size=64)
    with pytest.raises(InputError, match="unknown data source"):
        load_source("imagenet")
