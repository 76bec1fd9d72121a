import json
import subprocess
import sys

import pytest
import torch

from fastpurify.backdoor import BadNets, evaluate
from fastpurify.checkpoint import load_model
from fastpurify.cli import main
from fastpurify.data import load_source


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """The README's main job: a backdoored digits model, ACC/ASR reported, saved as safetensors."""
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ACC" in printed and "ASR" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"]["acc"] >= 0.9 and report["metrics"]["asr"] >= 0.9
    model, meta = load_model(tmp_path / "model.safetensors")  # architecture from the saved metadata
    assert meta["arch"] == "small_cnn" and meta["attack"]["name"] == "badnets"
    splits = load_source("digits", size=32, channels=1, seed=0)
    again = evaluate(model, *splits.test, BadNets(num_classes=10, target=0))
    assert again["acc"] == pytest.approx(report["metrics"]["acc"])
    assert again["asr"] == pytest.approx(report["metrics"]["asr"])


def test_train_command_other_choices(tmp_path):
    code = main(["train", "--data", "synthetic", "--size", "8", "--arch", "small_cnn", "--attack", "wanet",
                 "--mode", "all2all", "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["attack"] == "wanet" and "asr" in report["metrics"]
    model, meta = load_model(tmp_path / "model.safetensors")
    assert meta["image_size"] == [8, 8] and model(torch.rand(2, 3, 8, 8)).shape == (2, 10)


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
