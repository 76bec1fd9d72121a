"""Benchmarks record the device and library versions beside every figure."""

import datetime
import platform

import torch


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
