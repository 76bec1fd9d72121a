"""Whole ANP iterations: fastpurify against the reference (eager, frozen-weight, and under
torch.compile on a GPU), one process, same device, model and data. Compare medians within the
group ``anp``. On a GPU: the issue's setting, CIFAR ResNet-18 at batch 128 on 500 images. On
CPU: a small CNN at batch 32 as a smoke test (`make test` runs each once). The runner behind
`fastpurify bench anp` (fastpurify.benchmarks.anp) builds the same steps."""

import pytest
import torch

from fastpurify.benchmarks.anp import VARIANTS, _build
from fastpurify.data import synthetic_dataset
from fastpurify.models import build_model

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SETTING = (dict(arch="cifar_resnet18", batch_size=128, num_images=500, size=32) if CUDA else
           dict(arch="small_cnn", batch_size=32, num_images=64, size=16))
RUN = [v for v in VARIANTS if CUDA or v not in ("reference-compile", "fast-bf16")]


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    """On CPU fastpurify runs its PyTorch path (the tests' TRITON_INTERPRET=1 would time the
    Triton interpreter instead)."""
    if not CUDA:
        monkeypatch.setenv("FASTPURIFY_BACKEND", "torch")


@pytest.fixture(scope="module")
def subject():
    torch.manual_seed(0)
    model = build_model(SETTING["arch"], num_classes=10, in_channels=3)
    images, labels = synthetic_dataset(n=SETTING["num_images"], size=SETTING["size"], seed=0)
    return model, images.to(DEVICE), labels.to(DEVICE)


@pytest.mark.benchmark(group="anp")
@pytest.mark.parametrize("variant", RUN)
def test_anp_iteration(benchmark, subject, variant):
    model, images, labels = subject
    step = _build(variant, model, images, labels, SETTING["batch_size"], DEVICE)
    for _ in range(2):  # warm-up: compilation, graph capture, autotuning
        step()

    def iteration():
        step()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.extra_info.update(SETTING, variant=variant, device=str(DEVICE))
    benchmark.pedantic(iteration, rounds=10 if CUDA else 1, iterations=5 if CUDA else 1, warmup_rounds=0)
