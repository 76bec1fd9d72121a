import pytest


@pytest.fixture(autouse=True)
def _torch_backend(torch_backend):
    """The engines run fastpurify's PyTorch path unless a test asks for the kernels."""


@pytest.fixture
def exact_cuda(monkeypatch):
    """For comparisons on a GPU: the compiled kernels (not the PyTorch path the other engine tests
    use), TF32 off and cuDNN's deterministic algorithms (its default ones may sum in a different
    order on every call), restored afterwards."""
    import torch

    monkeypatch.setenv("FASTPURIFY_BACKEND", "triton")
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = flags
