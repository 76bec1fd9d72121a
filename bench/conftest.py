"""Benchmarks record the device and library versions beside every figure."""

import datetime
import platform

import pytest
import torch

# Each benchmarked shape and layout compiles its own graph: keep them all cached, or dynamo
# would silently fall back to eager after the default limit and understate torch.compile.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)


def pytest_benchmark_update_machine_info(config, machine_info):
    import numpy

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    machine_info.update({
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                             f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })


@pytest.fixture
def cpu_path():
    """On CPU: fastpurify's PyTorch path on one thread (see fastpurify.benchmarks.common.cpu_smoke);
    on a GPU: nothing changes."""
    if torch.cuda.is_available():
        yield
        return
    from fastpurify.benchmarks.common import cpu_smoke

    with cpu_smoke():
        yield

