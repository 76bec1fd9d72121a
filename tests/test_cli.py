import json
import subprocess
import sys

import pytest
import torch

from fastpurify.backdoor import BadNets, evaluate
from fastpurify.checkpoint import load_model
from fastpurify.cli import main
from fastpurify.data import load_source
from fastpurify.masks import load_masks


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    """The README's main job: a backdoored digits model, ACC/ASR reported, saved as safetensors;
    then fastpurify.anp (timed against the reference, the mask gap reported) on 100 held-out clean images,
    pruned by the clean-data rule, ACC/ASR
    before and after on the other held-out images."""
    monkeypatch.setenv("FASTPURIFY_BACKEND", "torch")  # as a user's CPU runs it (tests set TRITON_INTERPRET=1)
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "backdoored model: ACC" in printed and "ANP: 200 iterations on 100 held-out clean images: fastpurify.anp" in printed
    assert "on the other 259 test images: before ACC" in printed and "after ACC" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"]["acc"] >= 0.9 and report["metrics"]["asr"] >= 0.9
    model, meta = load_model(tmp_path / "model.safetensors")  # architecture from the saved metadata
    assert meta["arch"] == "small_cnn" and meta["attack"]["name"] == "badnets"
    splits = load_source("digits", size=32, channels=1, seed=0)
    attack = BadNets(num_classes=10, target=0)
    again = evaluate(model, *splits.test, attack)
    assert again["acc"] == pytest.approx(report["metrics"]["acc"])
    assert again["asr"] == pytest.approx(report["metrics"]["asr"])

    anp = report["anp"]
    assert anp["clean_images"] == 100 and anp["evaluated_images"] == 259 and anp["settings"]["iterations"] == 200
    assert anp["seconds"] > 0 and anp["reference_seconds"] > 0
    # the CPU's default channels_last sums in another order than the reference: reported, not hidden
    assert anp["engine"]["channels_last"] and anp["masks_equal_reference"] == (anp["max_mask_gap"] <= 1e-4)
    assert ("masks equal to the reference's" in printed) == anp["masks_equal_reference"]
    for after in (anp["after"], anp["reference_after"]):  # both mask sets purify by the same rule
        assert after["asr"] < anp["before"]["asr"] - 0.3 and after["acc"] > anp["before"]["acc"] - 0.08
    masks = load_masks(tmp_path / "mask_values.txt")
    assert list(masks) == ["features.1", "features.4", "features.8", "features.11"]
    pruned, pruned_meta = load_model(tmp_path / "pruned_model.safetensors")
    assert pruned_meta["pruned"]["neurons"] == anp["pruned"] > 0
    held_out = splits.test[0][100:], splits.test[1][100:]
    assert evaluate(pruned, *held_out, attack)["asr"] == pytest.approx(anp["after"]["asr"])
    zeroed = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert zeroed == anp["pruned"]

    # PBE on the same 100 clean images (the demo's settings: see tests/test_end_to_end.py)
    assert "PBE: 3 + 17 epochs on the same 100 clean images (eps 16/255): fastpurify.pbe" in printed
    pbe = report["pbe"]
    assert pbe["clean_images"] == 100 and pbe["evaluated_images"] == 259 and pbe["settings"]["clean_epochs"] == 17
    assert pbe["seconds"] > 0 and pbe["reference_seconds"] > 0
    assert pbe["after"]["asr"] < 0.2 and pbe["after"]["acc"] > pbe["before"]["acc"] - 0.06
    assert abs(pbe["reference_after"]["asr"] - pbe["after"]["asr"]) <= 0.02
    purified, purified_meta = load_model(tmp_path / "purified_model.safetensors")
    assert purified_meta["purified"]["defense"] == "pbe" and purified_meta["poison"] == {"data": "digits",
                                                                                       "rate": 0.1, "seed": 0}
    assert evaluate(purified, *held_out, attack)["asr"] == pytest.approx(pbe["after"]["asr"])


def test_train_command_other_choices(tmp_path, capsys):
    code = main(["train", "--data", "synthetic", "--size", "8", "--arch", "small_cnn", "--attack", "wanet",
                 "--mode", "all2all", "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["attack"] == "wanet" and "asr" in report["metrics"]
    weak = report["metrics"]["asr"] < 0.8  # one epoch of WaNet rarely implants: the user is told so
    assert ("warning" in report) == weak == ("warning: the backdoor did not implant" in capsys.readouterr().out)
    model, meta = load_model(tmp_path / "model.safetensors")
    assert meta["image_size"] == [8, 8] and model(torch.rand(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("args, message", [
    (["--anp-iterations", "0"], "--anp-iterations must be a positive integer"),
    (["--max-drop", "2"], r"--max-drop must lie in [0, 1]"),
    (["--clean-images", "0"], "--clean-images must be a positive integer"),
])
def test_bad_demo_arguments_exit_2_before_training(tmp_path, capsys, args, message):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "synthetic", "--size", "8", "--target", "12"], "target 12 is outside"),
    (["--data", "synthetic", "--size", "8", "--rate", "1.5"], "poison rate must lie in (0, 1)"),
    (["--data", "cifar10:/nonexistent"], "CIFAR-10 python batches not found"),
    (["--data", "synthetic", "--size", "8", "--arch", "nonet"], "unknown model"),
    (["--data", "digits", "--size", "4"], "digits size must be an integer >= 8"),
])
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, args, message):
    code = main(["train", "--epochs", "1", "--out", str(tmp_path), "--no-progress", *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "model.safetensors").exists()


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastpurify", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("fastpurify ")
