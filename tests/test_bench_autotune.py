"""The benchmarks' cuDNN-autotuned variants (``reference-autotune``, ``fast-autotune``): each is
measured in a thread of its own with ``torch.backends.cudnn.benchmark`` on, the flag restored
after, its ratio to the autotuned reference recorded; CUDA only, never interleaved; and every
variant the GPU check names is one its benchmark knows."""

from __future__ import annotations

import threading

import pytest
import torch

from fastpurify.benchmarks import anp, pbe, pgd
from fastpurify.benchmarks.common import (AUTOTUNED_VARIANTS, Timing, add_ratios, check_interleavable,
                                          in_autotune_thread, run_variants, table, untuned)
from fastpurify.cli import main
from fastpurify.gpucheck.speed import SIZES
from fastpurify.validation import InputError

CPU = torch.device("cpu")


def test_the_call_runs_in_a_new_thread_with_autotuning_and_the_flag_comes_back():
    before = torch.backends.cudnn.benchmark
    seen = in_autotune_thread(lambda: (threading.get_ident(), torch.backends.cudnn.benchmark), CPU)
    assert seen[0] != threading.get_ident() and seen[1] is True
    assert torch.backends.cudnn.benchmark is before


def test_an_error_in_the_thread_reaches_the_caller_and_the_flag_comes_back():
    before = torch.backends.cudnn.benchmark

    def fail():
        raise ValueError("broken variant")
    with pytest.raises(ValueError, match="broken variant"):
        in_autotune_thread(fail, CPU)
    assert torch.backends.cudnn.benchmark is before


@pytest.mark.parametrize("device, expected", [("cuda", 3), ("cuda:1", 1)])
def test_the_thread_runs_on_the_callers_cuda_device(device, expected, monkeypatch):
    """``torch.device("cuda")`` (what the benchmarks resolve) has no index, which set_device refuses:
    the thread takes the caller's current device by index."""
    seen = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: seen.append((index, threading.get_ident())))
    in_autotune_thread(lambda: None, torch.device(device))
    assert seen[0][0] == expected and isinstance(seen[0][0], int) and seen[0][1] != threading.get_ident()


def test_run_variants_measures_the_autotuned_ones_in_their_own_thread():
    calls = {}

    def measure(name):
        calls[name] = (untuned(name), threading.get_ident(), torch.backends.cudnn.benchmark)
        return Timing(name, {"reference": 40.0, "fast": 8.0, "reference-autotune": 36.0,
                             "fast-autotune": 6.0}[name], 1.0, 2.0, 1.0, note="graph" if "fast" in name else "")

    names = ("reference", "fast", *AUTOTUNED_VARIANTS)
    timings, skipped = run_variants(names, measure, CPU, progress=None)
    assert skipped == [] and [t.name for t in timings] == list(names)
    main_thread = threading.get_ident()
    assert calls["reference"] == ("reference", main_thread, False) and calls["fast"] == ("fast", main_thread, False)
    for name in AUTOTUNED_VARIANTS:
        base, thread, flag = calls[name]
        assert base == name.removesuffix("-autotune") and thread != main_thread and flag is True
    by = {t.name: t for t in timings}
    assert by["fast-autotune"].note == "cuDNN autotuned, graph" and by["reference-autotune"].note == "cuDNN autotuned"
    assert by["fast"].note == "graph"
    assert by["fast-autotune"].ratio_vs_reference == round(40 / 6, 3)
    assert by["fast-autotune"].ratio_vs_autotuned_reference == 6.0  # 36 / 6: both sides autotuned
    assert by["reference-autotune"].ratio_vs_autotuned_reference == 1.0
    assert by["fast"].ratio_vs_autotuned_reference is None  # only the autotuned variants
    lines = table([t.as_dict() for t in timings], rate_key="iterations_per_second")
    assert lines[4].endswith("cuDNN autotuned, graph; 6.00x reference-autotune")
    assert "reference-autotune" not in lines[2]


def test_add_ratios_without_the_autotuned_reference_leaves_that_ratio_empty():
    timings = [Timing("reference", 10.0, 9.0, 11.0, 1.0), Timing("fast-autotune", 5.0, 4.0, 6.0, 1.0)]
    add_ratios(timings)
    assert timings[1].ratio_vs_reference == 2.0 and timings[1].ratio_vs_autotuned_reference is None


def test_autotuned_variants_are_never_interleaved():
    check_interleavable(("reference", "fast"))
    with pytest.raises(InputError, match=r"\['fast-autotune'\] run in a thread of their own"):
        check_interleavable(("reference", "fast-autotune"))


@pytest.mark.parametrize("module", [anp, pgd, pbe])
def test_each_benchmark_offers_them_on_cuda_only(module):
    assert set(AUTOTUNED_VARIANTS) <= set(module.VARIANTS) and set(AUTOTUNED_VARIANTS) <= set(module.CUDA_ONLY)


def test_naming_one_on_the_cpu_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "anp", "--smoke", "--device", "cpu", "--variants", "reference,fast-autotune",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "['fast-autotune'] need a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_every_variant_the_gpu_check_names_is_known_to_its_benchmark():
    """A misspelt variant would end a stage on the GPU, where each minute is scarce."""
    known = {"anp": anp.VARIANTS, "pgd": pgd.VARIANTS, "pbe": pbe.VARIANTS, "large": anp.VARIANTS}
    for stage, sizes in SIZES.items():
        if stage not in known:
            continue
        for s in sizes:
            named = [*s.get("variants", ()), *s.get("after", ()), *s.get("profile", ())]
            assert named and set(named) <= set(known[stage]), (stage, set(named) - set(known[stage]))
    assert set(AUTOTUNED_VARIANTS) <= set(SIZES["anp"][0]["after"]) and set(AUTOTUNED_VARIANTS) <= set(
        SIZES["pgd"][0]["variants"]) and set(AUTOTUNED_VARIANTS) <= set(SIZES["pbe"][0]["variants"])


SMOKE = {anp: (anp.run_anp_benchmark, dict(arch="small_cnn", batch_size=8, num_images=16, image_size=16,
                                           iterations=1, warmup=1, repeats=1)),
         pgd: (pgd.run_pgd_benchmark, dict(arch="small_cnn", batch_size=8, num_images=8, image_size=16, steps=2,
                                           iterations=1, warmup=1, repeats=1)),
         pbe: (pbe.run_pbe_benchmark, dict(arch="small_cnn", batch_size=8, num_images=8, image_size=16, adv_epochs=1,
                                           clean_epochs=1, warmup=0, repeats=1))}


@pytest.mark.parametrize("module", [anp, pgd, pbe])
def test_each_benchmark_builds_the_untuned_variant_in_the_thread(module, monkeypatch, torch_backend):
    """The wiring, on the CPU (where cuDNN plays no part: the CUDA-only guard lifted for the test):
    the autotuned variants are built as the variants they tune, named as asked."""
    monkeypatch.setattr(module, "CUDA_ONLY", tuple(v for v in module.CUDA_ONLY if v not in AUTOTUNED_VARIANTS))
    run, sizes = SMOKE[module]
    kw = dict(interleave=False) if module is not pbe else {}
    result = run(device="cpu", variants=("reference", "fast", *AUTOTUNED_VARIANTS), progress=None, **sizes, **kw)
    by = {v["name"]: v for v in result["variants"]}
    assert list(by) == ["reference", "fast", *AUTOTUNED_VARIANTS] and result["skipped"] == []
    tuned_note = by["fast-autotune"]["note"]
    assert tuned_note.startswith("cuDNN autotuned, ")
    flags = (lambda note: note.split("; ")[1:]) if module is pbe else (lambda note: note)  # PBE: after its time
    assert flags(tuned_note.removeprefix("cuDNN autotuned, ")) == flags(by["fast"]["note"])
    assert by["reference-autotune"]["note"].startswith("cuDNN autotuned")
    assert by["fast-autotune"]["ratio_vs_autotuned_reference"] > 0 and by["fast"]["ratio_vs_autotuned_reference"] is None
    if module is pgd:  # the autotuned fast variant's examples are checked against the reference's too
        assert result["equivalence"]["variants"]["fast-autotune"]["within_eps"] is True
    if module is not pbe:
        with pytest.raises(InputError, match="cannot be timed in interleaved blocks"):
            run(device="cpu", variants=("reference", "fast-autotune"), progress=None, **sizes, interleave=True)


@pytest.mark.gpu
def test_autotuned_variants_run_and_capture_their_graphs_on_cuda():
    result = anp.run_anp_benchmark(arch="small_cnn", batch_size=16, num_images=32, image_size=16, device="cuda",
                                   variants=("reference", "fast", *AUTOTUNED_VARIANTS), warmup=1, iterations=2,
                                   repeats=2, progress=None)
    by = {v["name"]: v for v in result["variants"]}
    assert set(by) == {"reference", "fast", *AUTOTUNED_VARIANTS} and result["skipped"] == []
    assert by["fast-autotune"]["note"].startswith("cuDNN autotuned, CUDA graph")
    assert by["fast-autotune"]["ratio_vs_autotuned_reference"] > 0
    assert torch.backends.cudnn.benchmark is False
