"""PBE: one round on a clean extra set, and one scoring pass, fastpurify (eager, default, bf16)
against the reference (eager, and under torch.compile on a GPU), one process, same device,
model and data. Compare medians within the groups ``pbe-round`` and ``pbe-scoring``. On a GPU:
PreAct-ResNet-18 with CIFAR shapes, a 2,500-image extra set (round 0 of PBE on 50,000 images)
with the paper's 3 + 17 epochs, scoring 50,000 images. On CPU: a small CNN, 32 images of 16px,
1 + 1 epochs, as a smoke test (`make test` runs each once). The runner behind `fastpurify bench
pbe` (fastpurify.benchmarks.pbe) makes the same calls; the last tests run that command."""

import copy
import json

import pytest
import torch

from fastpurify.benchmarks.common import synchronized, synthetic_subject
from fastpurify.benchmarks.pbe import (CPU_DEFAULT_SKIP, CUDA_ONLY, SCORE_VARIANTS, VARIANTS, fine_tuned_stand_in,
                                       round_call, score_step)
from fastpurify.cli import main
from fastpurify.inference import predict_logits

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SETTING = (dict(arch="preact_resnet18", batch_size=128, num_images=2500, size=32, adv_epochs=3, clean_epochs=17,
                score_images=50000) if CUDA else
           dict(arch="small_cnn", batch_size=16, num_images=32, size=16, adv_epochs=1, clean_epochs=1,
                score_images=64))
RUN = [v for v in VARIANTS if CUDA or v not in CUDA_ONLY + CPU_DEFAULT_SKIP]


pytestmark = pytest.mark.usefixtures("cpu_path")  # bench/conftest.py


@pytest.fixture(scope="module")
def subject():
    n = max(SETTING["num_images"], SETTING["score_images"])
    return synthetic_subject(SETTING["arch"], n, DEVICE, image_size=SETTING["size"])


@pytest.mark.benchmark(group="pbe-round")
@pytest.mark.parametrize("variant", RUN)
def test_pbe_round(benchmark, subject, variant):
    model, images, labels = subject
    n = SETTING["num_images"]
    call = round_call(variant, model, (images[:n], labels[:n]), DEVICE, batch_size=SETTING["batch_size"],
                      adv_epochs=SETTING["adv_epochs"], clean_epochs=SETTING["clean_epochs"])
    call()  # warm-up: compilation, autotuning
    benchmark.extra_info.update(SETTING, variant=variant, device=str(DEVICE))
    report = benchmark.pedantic(synchronized(call, DEVICE), rounds=3 if CUDA else 1, iterations=1, warmup_rounds=0)
    assert len(report.rounds) == 1 and report.rounds[0].size == n and report.seconds > 0


@pytest.mark.benchmark(group="pbe-scoring")
@pytest.mark.parametrize("variant", [v for v in SCORE_VARIANTS if CUDA or v not in CUDA_ONLY])
def test_pbe_scoring(benchmark, subject, variant):
    model, images, labels = subject
    n = SETTING["score_images"]
    infected = predict_logits(copy.deepcopy(model).to(DEVICE), images[:n])
    step = score_step(variant, fine_tuned_stand_in(model), infected, images[:n], labels[:n], DEVICE)
    step()  # warm-up
    benchmark.extra_info.update(SETTING, variant=variant, device=str(DEVICE))
    scores = benchmark.pedantic(synchronized(step, DEVICE), rounds=10 if CUDA else 1, iterations=1, warmup_rounds=0)
    assert scores.shape == (n,) and float(scores.abs().max()) <= 1 + 1e-6


def test_bench_pbe_smoke_writes_json(tmp_path, capsys):
    """`fastpurify bench pbe --smoke --full`: the round variants that apply to the device (on a GPU
    all but torch.compile, which would take most of the run compiling), the scoring pass and a
    tiny full progressive run."""
    out = tmp_path / "pbe.json"
    expected = ["reference", "fast-eager", "fast", "fast-bf16"] if CUDA else ["reference", "fast-eager", "fast"]
    argv = ["bench", "pbe", "--smoke", "--full", "--out", str(out)] + (
        ["--variants", ",".join(expected)] if CUDA else ["--threads", "1"])
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "pbe"
    assert [v["name"] for v in result["variants"]] == expected
    assert all(v["median_ms"] > 0 and v["images_per_second"] > 0 and len(v["block_ms"]) == 2
               for v in result["variants"])
    assert result["variants"][0]["ratio_vs_reference"] == 1.0
    assert all(v["note"].startswith("round ") for v in result["variants"])
    assert {"date", "torch", "triton", "device", "device_type"} <= set(result["environment"])
    assert result["settings"]["setting"] == "clean extra set (one round)"
    scoring_names = [v["name"] for v in result["scoring"]["variants"]]
    assert scoring_names == (["reference", "fast", "fast-bf16"] if CUDA else ["reference", "fast"])
    assert result["scoring"]["max_score_diff"]["fast"] < 1e-3 and result["scoring"]["score_range"][0] < 0.999
    full = result["full"]
    assert full["images"] == 64 and set(full["runs"]) == {"reference", "fast"}
    for run in full["runs"].values():
        assert [r["fraction"] for r in run["rounds"]] == [0.05, 0.2, 0.5, 0.7]
        assert run["wall_seconds"] > 0 and all(r["seconds"] > 0 for r in run["rounds"])
    assert full["runs"]["fast"]["speedup"] > 0
    assert "s/round" in capsys.readouterr().out
