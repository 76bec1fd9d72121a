"""``fastpurify anp`` and ``fastpurify bench anp`` from the command line (small, CPU)."""

import inspect
import json
import re

import numpy as np
import pytest
import torch

from fastpurify import selection
from fastpurify.checkpoint import load_model
from fastpurify.cli import main
from fastpurify.commands import anp as command
from fastpurify.masks import load_masks
from fastpurify.models import small_cnn

FAST = ["--iterations", "12", "--batch-size", "16", "--clean-images", "40", "--no-progress"]


pytestmark = pytest.mark.usefixtures("torch_backend")  # the suspect comes from tests/conftest.py: checkpoint


def test_anp_writes_masks_report_pruned_model_and_figures(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    assert main(["anp", "--model", str(checkpoint), "--data", "digits", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "ANP: 12 iterations in" in printed and "it/s" in printed and "PoisonACC" in printed
    assert re.search(r"masked \d+ neurons in (\d+) layers \(\1 fused\)", printed), printed  # how they were perturbed
    report = json.loads((out / "report.json").read_text())
    assert report["engine"] == "fast" and report["settings"]["iterations"] == 12
    assert report["pruning"] == {"rule": "threshold", "value": 0.2, "pruned": report["pruning"]["pruned"]}
    assert {"acc", "asr"} <= set(report["before"]) and {"acc", "asr"} <= set(report["after"])
    weak = report["before"]["asr"] < 0.8  # the untrained suspect carries no backdoor: the user is told
    assert ("warning" in report) == weak == ("warning: the attack given reaches only" in printed)
    assert report["evaluated_images"] == 359 - 40 and len(report["sweep"]) == 20
    masks = load_masks(out / "mask_values.txt")
    assert list(masks) == list(load_masks(out / "masks.json"))
    pruned, meta = load_model(out / "pruned_model.safetensors")
    zeroed = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert zeroed == meta["pruned"]["neurons"] == sum(int((m <= 0.2).sum()) for m in masks.values())
    assert (out / "sweep.txt").read_text().startswith("No. \t Layer Name")
    for png in ("mask_distribution.png", "pruning_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_anp_reference_engine_number_rule_and_sweep_by_numbers(tmp_path, checkpoint):
    out = tmp_path / "out"
    args = ["anp", "--model", str(checkpoint), "--data", "digits", "--out", str(out), "--engine", "reference",
            "--number", "5", "--sweep", "numbers", "--sweep-values", "0,5,10", "--attack", "none", "--no-plot", *FAST]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruning"]["pruned"] == 5 and report["engine"] == "reference"
    assert [p["pruned"] for p in report["sweep"]] == [0, 0, 5, 10] and "asr" not in report["after"]
    assert not (out / "pruning_curve.png").exists()


def test_anp_reads_a_data_file(tmp_path, checkpoint):
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "clean.npz", images=torch.rand(60, 1, 16, 16, generator=g).numpy(),
             labels=torch.randint(0, 10, (60,), generator=g).numpy())
    out = tmp_path / "out"
    assert main(["anp", "--model", str(checkpoint), "--data", str(tmp_path / "clean.npz"), "--out", str(out),
                 "--no-plot", *FAST]) == 0
    assert json.loads((out / "report.json").read_text())["evaluated_images"] == 20


def test_pickled_model_needs_trust_pickle(tmp_path, capsys):
    path = tmp_path / "whole.pt"
    torch.save(small_cnn(num_classes=10, in_channels=1), path)
    base = ["anp", "--model", str(path), "--arch", "small_cnn", "--in-channels", "1", "--data", "digits",
            "--size", "16", "--no-plot", "--out", str(tmp_path / "out"), *FAST]
    assert main(base) == 2 and "--trust-pickle" in capsys.readouterr().err
    assert main([*base, "--trust-pickle"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--iterations", "0"], "--iterations must be a positive integer"),
    (["--threshold", "1.5"], "--threshold must lie in [0, 1]"),
    (["--clean-images", "5000"], "--clean-images must be below 359"),
    (["--data", "missing.npz"], "data file not found"),
    (["--sweep-values", "a,b"], "--sweep-values must be comma-separated thresholds"),
    (["--select", "auto", "--threshold", "0.3"], "--select auto chooses the number of neurons itself"),
    (["--select", "number"], "--select number needs its value: --number VALUE"),
    (["--select", "fraction", "--number", "3"], "--select fraction does not take --number"),
    (["--seeds", "0"], "--seeds must be a positive integer"),
    (["--seeds", "2", "--engine", "reference"], "runs on the fast engine"),
    (["--max-target-share", "2"], "--max-target-share must lie in [0, 1]"),
    (["--select-eps", "0"], "--select-eps must be positive"),
    (["--select-probe", "patch", "--select-eps", "2"], "the patch's share of the pixels"),
    (["--select-steps", "0"], "--select-steps must be a positive integer"),
    (["--select-order", "patch"], "--select-order is the auto rule's ranking; give it with --select auto"),
    (["--select-correct-stats"], "--select-correct-stats corrects the pruning the auto rule chooses"),
    (["--select-hold", "1"], "--select-hold is how the auto rule's walk stops; give it with --select auto"),
    (["--select", "auto", "--select-hold", "11"], "--select-hold must be a whole number of candidates from 0 to 10"),
    (["--select", "auto", "--select-order", "patch", "--select-probe", "inputs"], "needs --select-probe patch"),
    (["--select", "auto", "--select-order-area", "0.04"], "--select-order-area is the patch of --select-order patch"),
    (["--select", "auto", "--select-order", "patch", "--select-area-readings", "3"], "--select-area-readings is how --select-order-area auto reads the size"),
    (["--select", "auto", "--select-order", "patch", "--select-order-area", "auto", "--select-area-readings", "0"], "--select-area-readings must be a positive integer"),
    (["--select", "auto", "--select-order", "patch", "--select-order-area", "0"], "--select-order-area must lie in (0, 1]"),
    (["--select", "auto", "--select-order", "patch", "--select-order-area", "big"], "--select-order-area must be a share of the pixels in (0, 1] or 'auto', got 'big'"),
])
def test_anp_bad_arguments_exit_2(tmp_path, checkpoint, capsys, args, message):
    argv = ["anp", "--model", str(checkpoint), "--data", "digits", "--out", str(tmp_path / "out"), *FAST, *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_correcting_statistics_needs_batch_norms(tmp_path, capsys):
    """A model without BatchNorm (torchvision's SqueezeNet): refused before any ANP iteration, not after."""
    from fastpurify.models import build_model
    torch.save(build_model("torchvision:squeezenet1_1", num_classes=10).state_dict(), tmp_path / "squeezenet.pt")
    argv = ["anp", "--model", str(tmp_path / "squeezenet.pt"), "--arch", "torchvision:squeezenet1_1", "--num-classes",
            "10", "--in-channels", "3", "--data", "synthetic", "--size", "32", "--out", str(tmp_path / "out"),
            "--select", "auto", "--select-correct-stats", *FAST]
    assert main(argv) == 2
    assert "torchvision:squeezenet1_1 has no BatchNorm layer that keeps them" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["anp", "--model", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_bench_anp_smoke_writes_json(tmp_path, capsys):
    out = tmp_path / "anp.json"
    assert main(["bench", "anp", "--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    names = [v["name"] for v in result["variants"]]
    assert names == ["reference", "reference-frozen", "fast-separate", "fast-eager", "fast", "fast-nchw",
                     "fast-seeds4"]
    notes = {v["name"]: v["note"] for v in result["variants"]}
    assert notes["fast"].startswith("channels_last") and notes["fast-nchw"].startswith("NCHW")  # the CPU default
    assert all(v["median_ms"] > 0 and len(v["block_ms"]) == 3 for v in result["variants"])
    assert result["variants"][0]["ratio_vs_reference"] == 1.0
    assert {"date", "torch", "triton", "device"} <= set(result["environment"])
    assert result["settings"]["interleaved"] is True  # on the CPU the variants' blocks are interleaved
    assert all(v["note"].endswith("interleaved") for v in result["variants"])
    assert "x ref" in capsys.readouterr().out


def test_interleaved_blocks_alternate_their_order():
    from fastpurify.benchmarks.common import time_interleaved

    calls = []
    steps = {name: ((lambda n=name: calls.append(n)), "") for name in ("reference", "a", "b")}
    timings = time_interleaved(steps, torch.device("cpu"), warmup=1, iterations=2, repeats=3)
    assert calls[:3] == ["reference", "a", "b"]  # the warm-up
    blocks = calls[3:]
    assert blocks == ["reference"] * 2 + ["a"] * 2 + ["b"] * 2 + ["b"] * 2 + ["a"] * 2 + ["reference"] * 2 + \
        ["reference"] * 2 + ["a"] * 2 + ["b"] * 2
    assert [t.name for t in timings] == ["reference", "a", "b"] and all(len(t.block_ms) == 3 for t in timings)
    assert timings[0].ratio_vs_reference == 1.0 and timings[1].peak_memory_mb is None


def test_bench_rejects_unknown_variants(tmp_path, capsys):
    assert main(["bench", "anp", "--smoke", "--variants", "fast,turbo", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown benchmark variant" in capsys.readouterr().err


def test_anp_seed_ensemble_with_the_auto_selection(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    args = ["anp", "--model", str(checkpoint), "--data", "digits", "--out", str(out), "--seeds", "2", "--select",
            "auto", "--select-probe", "inputs", "--acc-budget", "1", *FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["ensemble"]["seeds"] == [0, 1] and report["settings"]["seeds"] == 2
    assert report["pruning"]["rule"] == "auto" and report["pruning"]["value"] is None
    selection = report["selection"]
    assert selection["pruned"] == report["pruning"]["pruned"] and selection["reason"] in printed
    assert selection["points"][0]["pruned"] == 0 and len(selection["points"]) > 1
    assert all(0 <= p["concentration"] <= 1 and sum(p["histogram"]) >= 0 for p in selection["points"])
    members = [load_masks(out / "members" / f"masks_seed{s}.json") for s in (0, 1)]
    mean = load_masks(out / "masks.json")
    for name in mean:
        assert torch.allclose(mean[name], (members[0][name] + members[1][name]) / 2, atol=1e-6)
    pruned, meta = load_model(out / "pruned_model.safetensors")
    zeroed = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert zeroed == meta["pruned"]["neurons"] == selection["pruned"]
    assert (out / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_offers_the_selection_probes_and_default():
    from fastpurify.reproduce.config import SELECT_ORDERS
    assert set(command.PROBES) == set(selection.PROBES)
    assert set(command.ORDERS) == set(selection.ORDERS) == set(SELECT_ORDERS)
    assert inspect.signature(selection.choose_pruning).parameters["order"].default == "masks"
    assert command.DEFAULT_PROBE == inspect.signature(selection.choose_pruning).parameters["probe"].default


def test_anp_auto_selection_with_the_patch_probe(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    args = ["anp", "--model", str(checkpoint), "--data", "digits", "--out", str(out), "--select", "auto",
            "--select-probe", "patch", "--select-eps", "0.02", "--select-steps", "20", "--no-plot", *FAST]
    assert main(args) == 0
    selection = json.loads((out / "report.json").read_text())["selection"]
    assert selection["settings"]["probe"] == "patch" and selection["settings"]["eps"] == 0.02
    assert selection["settings"]["steps"] == 20
    assert selection["suspicion"]["pruned"] == 0 and selection["reason"] in capsys.readouterr().out
    if selection["settings"]["walk"] == "patch":  # the unpruned model answers the patch: the walk follows it
        assert selection["points"][0]["target_share"] >= 0.4 and "trigger reconstructed toward" in selection["reason"]
    else:
        assert "so the walk follows the input adversary" in selection["reason"]


def test_anp_auto_selection_along_the_trigger_guided_order(tmp_path, capsys):
    """A quickly trained BadNets digits model (6 epochs); measured on this machine: 3 neurons along
    the order, ASR 100 -> 0.4 % for 6.3 points (docs/anp-selection.md measures real subjects)."""
    assert main(["train", "--data", "digits", "--size", "16", "--channels", "1", "--attack", "badnets", "--arch",
                 "small_cnn", "--epochs", "6", "--lr", "0.05", "--no-flip", "--out", str(tmp_path / "suspect"),
                 "--no-progress"]) == 0
    out = tmp_path / "out"
    args = ["anp", "--model", str(tmp_path / "suspect" / "model.safetensors"), "--data", "digits", "--out", str(out),
            "--select", "auto", "--select-order", "patch", "--select-order-area", "0.03", "--select-eps", "0.02",
            "--select-steps", "20", "--no-plot", *FAST]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    chosen = report["selection"]
    assert chosen["settings"]["order"] == "patch" and chosen["reason"] in capsys.readouterr().out
    assert chosen["settings"]["walk"] == "patch" and chosen["target"] == 0  # the backdoor answers a patch
    order = chosen["order"]
    assert order["settings"]["target"] == 0 and "ordered by a reconstructed trigger of 0.03" in chosen["reason"]
    assert order["settings"]["area"] == chosen["settings"]["order_area"] == 0.03
    assert order["neurons"] and all(acc >= order["acc0"] - order["settings"]["acc_budget"] - 1e-9
                                    for acc in order["acc"])
    assert 0 < chosen["pruned"] == report["pruning"]["pruned"]
    # the saved model is pruned along the order: its first neurons' scales are zero, the rest untouched
    model, _ = load_model(out / "pruned_model.safetensors")
    suspect, _ = load_model(tmp_path / "suspect" / "model.safetensors")
    modules, original = dict(model.named_modules()), dict(suspect.named_modules())
    ordered = {tuple(n) for n in order["neurons"][:chosen["pruned"]]}
    for name, values in load_masks(out / "masks.json").items():
        for channel in range(values.numel()):
            expected = 0.0 if (name, channel) in ordered else original[name].weight[channel]
            assert modules[name].weight[channel] == expected
    assert report["after"]["asr"] < report["before"]["asr"]
    # the order's patch size read from the model: the largest of 1-8 times --select-eps no other class's patch reaches
    read = tmp_path / "read"
    assert main([*args[:args.index("--out") + 1], str(read), *args[args.index("--out") + 2:args.index("0.03")], "auto",
                 "--select-area-readings", "3", *args[args.index("0.03") + 1:]]) == 0
    report = json.loads((read / "report.json").read_text())
    chosen = report["selection"]
    reading, area = chosen["settings"]["area_reading"], chosen["settings"]["order_area_read"]
    votes = chosen["settings"]["area_votes"]  # the median of up to 3 seeds' readings
    assert chosen["settings"]["area_readings"] == 3 and [v["seed"] for v in votes] == list(range(len(votes)))
    assert 2 <= len(votes) <= 3 and area == sorted(v["area"] for v in votes)[(len(votes) - 1) // 2]
    assert chosen["settings"]["order_area"] == "auto" and chosen["order"]["settings"]["area"] == area
    under = [r["area"] for r in reading if r["max_other"] < 0.4]  # none: a class reached at 0.02 itself, which is kept
    assert area == (max(under) if under else 0.02) and area in {0.02 * f for f in (1, 2, 4, 8)}
    assert f"the patch size read from the model: {area:g} of the pixels" in chosen["reason"]
    assert report["after"]["asr"] < report["before"]["asr"]
    # the same choice with the BatchNorm statistics corrected for the pruning where the patch still fails on them
    fixed = tmp_path / "fixed"
    assert main([*args[:args.index("--out") + 1], str(fixed), *args[args.index("--out") + 2:],
                 "--select-correct-stats", "--select-hold", "1"]) == 0
    report = json.loads((fixed / "report.json").read_text())
    chosen = report["selection"]
    assert chosen["pruned"] == report["pruning"]["pruned"] > 0 and chosen["settings"]["correct_statistics"]
    assert chosen["settings"]["hold"] == 1 and "over the next 1 candidate" in chosen["reason"]  # the stop held
    check = chosen["statistics_check"]
    assert check["pruned"] == chosen["pruned"]
    assert chosen["statistics"] in ("corrected", "stored")
    if chosen["statistics"] == "corrected":  # kept only where the patch still fails on the corrected model
        assert check["target_share"] <= 0.05 and "the BatchNorm statistics corrected for the pruning" in chosen["reason"]
    else:
        assert "the BatchNorm statistics left as stored" in chosen["reason"]
    corrected, meta = load_model(fixed / "pruned_model.safetensors")
    moved = any(not torch.equal(a.running_mean, b.running_mean) for a, b in zip(
        (m for m in corrected.modules() if isinstance(m, torch.nn.BatchNorm2d)),
        (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))))
    assert moved == (chosen["statistics"] == "corrected") == (meta["pruned"].get("statistics") == "corrected")
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(corrected.modules(), model.modules())
               if isinstance(a, torch.nn.BatchNorm2d))
