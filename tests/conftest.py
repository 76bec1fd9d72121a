import os

import pytest
import torch

# TRITON_INTERPRET=1 without a GPU is set in the repository's root conftest.py, before any test
# module (tests/ or bench/) is imported.

# The tests run many small tensor operations, where a second intra-op thread costs more than it
# gives (and on a shared 2-core machine spinning threads make it far worse): use one.
torch.set_num_threads(1)


def pytest_configure(config):
    """FASTPURIFY_TEST_DEVICE (tests/devices.py): refuse a device that cannot be used rather than
    quietly testing on the CPU, and on CUDA test the compiled kernels in true float32."""
    try:
        from .devices import TEST_DEVICE
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if TEST_DEVICE.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise pytest.UsageError(f"FASTPURIFY_TEST_DEVICE={TEST_DEVICE} but CUDA is not available here "
                                "(torch.cuda.is_available() is False); unset it to test on the CPU")
    if TEST_DEVICE.index is not None and TEST_DEVICE.index >= torch.cuda.device_count():
        raise pytest.UsageError(f"FASTPURIFY_TEST_DEVICE={TEST_DEVICE} but this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise pytest.UsageError(f"FASTPURIFY_TEST_DEVICE={TEST_DEVICE} tests the compiled Triton kernels: "
                                "unset TRITON_INTERPRET")
    if TEST_DEVICE.index is not None:
        torch.cuda.set_device(TEST_DEVICE)  # the current device, where Triton launches
    # The float32 tolerances of the layer tests assume true float32 convolutions and matmuls.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _image_cache(tmp_path_factory, monkeypatch):
    """Decoded image folders are cached in the session's temporary folder, never in ~/.cache."""
    monkeypatch.setenv("FASTPURIFY_CACHE", str(tmp_path_factory.getbasetemp() / "fastpurify-cache"))


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test on each backend of fastpurify.functional, on tests/devices.py's TEST_DEVICE (on
    the CPU, "triton" runs the kernels through Triton's interpreter; on CUDA, compiled)."""
    monkeypatch.setenv("FASTPURIFY_BACKEND", request.param)
    return request.param


@pytest.fixture
def images():
    """A small batch of varied RGB images in [0, 1]."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 11, 13, generator=g)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torch_backend(monkeypatch):
    """fastpurify's PyTorch path, as a user's CPU runs it (whole engines through the interpreted
    kernels would be slow)."""
    monkeypatch.setenv("FASTPURIFY_BACKEND", "torch")


SUSPECT_META = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": [16, 16],
                "attack": {"name": "badnets", "mode": "all2one", "target": 0, "seed": 0},
                "poison": {"data": "digits", "rate": 0.1, "seed": 0}}


@pytest.fixture
def checkpoint(tmp_path):
    """A suspect checkpoint as ``fastpurify train`` writes it (an untrained small CNN for the
    bundled 16x16 digits, BadNets recorded as its trigger, the poisoning recorded)."""
    from fastpurify.checkpoint import save_model
    from fastpurify.models import small_cnn

    torch.manual_seed(0)
    return save_model(small_cnn(num_classes=10, in_channels=1), tmp_path / "suspect.safetensors",
                      metadata=SUSPECT_META)
