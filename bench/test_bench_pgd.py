"""PGD-10 on chunks of images: fastpurify's engine (eager, graphed, default, bf16) against the
reference (eager, frozen-weight, and under torch.compile on a GPU), one process, same device,
model and data. Compare medians within the group ``pgd``. On a GPU: the issue's setting,
PreAct-ResNet-18 with CIFAR shapes at 512 images per chunk. On CPU: a small CNN on 16 images of
16px as a smoke test (`make test` runs each once). The runner behind `fastpurify bench pgd`
(fastpurify.benchmarks.pgd) builds the same attacks; the last test runs that command."""

import json

import pytest
import torch

from fastpurify.benchmarks.common import synchronized, synthetic_subject
from fastpurify.benchmarks.pgd import CPU_DEFAULT_SKIP, CUDA_ONLY, VARIANTS, build_attack, chunk_step
from fastpurify.cli import main

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SETTING = (dict(arch="preact_resnet18", batch_size=512, num_images=2048, size=32) if CUDA else
           dict(arch="small_cnn", batch_size=16, num_images=32, size=16))
RUN = [v for v in VARIANTS if CUDA or v not in CUDA_ONLY + CPU_DEFAULT_SKIP]


pytestmark = pytest.mark.usefixtures("cpu_path")  # bench/conftest.py


@pytest.fixture(scope="module")
def subject():
    return synthetic_subject(SETTING["arch"], SETTING["num_images"], DEVICE, image_size=SETTING["size"])


@pytest.mark.benchmark(group="pgd")
@pytest.mark.parametrize("variant", RUN)
def test_pgd_chunk(benchmark, subject, variant):
    model, images, labels = subject
    step = chunk_step(build_attack(variant, model, DEVICE), images, labels, SETTING["batch_size"])
    for _ in range(2):  # warm-up: compilation, graph capture, autotuning
        step()
    benchmark.extra_info.update(SETTING, variant=variant, device=str(DEVICE), steps=10)
    adv = benchmark.pedantic(synchronized(step, DEVICE), rounds=10 if CUDA else 1, iterations=2 if CUDA else 1, warmup_rounds=0)
    assert adv.shape == (SETTING["batch_size"], 3, SETTING["size"], SETTING["size"])
    assert 0.0 <= float(adv.min()) and float(adv.max()) <= 1.0


def test_bench_pgd_smoke_writes_json(tmp_path, capsys):
    """`fastpurify bench pgd --smoke`: every variant that applies to the device (on a GPU all but
    torch.compile, which would take most of the run compiling)."""
    out = tmp_path / "pgd.json"
    expected = (["reference", "reference-frozen", "fast-eager", "fast-graph", "fast", "fast-bf16"] if CUDA else
                ["reference", "reference-frozen", "fast-eager", "fast"])
    argv = ["bench", "pgd", "--smoke", "--out", str(out)] + (["--variants", ",".join(expected)] if CUDA else
                                                             ["--threads", "1"])
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "pgd"
    names = [v["name"] for v in result["variants"]]
    assert names == expected
    assert all(v["median_ms"] > 0 and v["images_per_second"] > 0 and len(v["block_ms"]) == 3
               for v in result["variants"])
    assert result["variants"][0]["ratio_vs_reference"] == 1.0
    assert {"date", "torch", "triton", "device", "device_type"} <= set(result["environment"])
    assert result["settings"]["batch_size"] == 16 and result["settings"]["random_start"] is True
    checks = result["equivalence"]["variants"]
    assert set(checks) == set(expected) - {"reference", "reference-frozen"}
    assert all(c["within_eps"] and c["max_abs_diff"] <= 2 * 8 / 255 + 1e-6 for c in checks.values())
    assert checks["fast-eager"]["equal_fraction"] > 0.95
    assert "img/s" in capsys.readouterr().out


def test_bench_pgd_rejects_cuda_only_variant_on_cpu(tmp_path, capsys):
    if CUDA:
        pytest.skip("checks the CPU refusal")
    assert main(["bench", "pgd", "--smoke", "--variants", "fast-bf16", "--out", str(tmp_path / "x.json")]) == 2
    assert "need a CUDA device" in capsys.readouterr().err
