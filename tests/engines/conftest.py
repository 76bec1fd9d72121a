import pytest


@pytest.fixture(autouse=True)
def _torch_backend(torch_backend):
    """The engines run fastpurify's PyTorch path unless a test asks for the kernels."""
