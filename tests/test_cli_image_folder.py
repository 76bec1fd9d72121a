"""``--data imagefolder:PATH`` and ``--data cifar10-jpeg[:PATH]`` from the command line, and
clear exits for bad image folders and damaged checkpoints (small, CPU)."""

import json

import pytest

from fastpurify.checkpoint import load_model
from fastpurify.cli import main

from .data.image_folders import image_set, write_archive, write_folder

pytestmark = pytest.mark.usefixtures("torch_backend")


def test_train_on_an_image_folder_archive(tmp_path, capsys):
    files, _ = image_set(classes=("b", "a", "c"), per_class=(20, 10), size=(8, 8))
    source = write_archive(tmp_path / "tiny.tar.gz", files, top="tiny")
    out = tmp_path / "out"
    assert main(["train", "--data", f"imagefolder:{source}", "--arch", "small_cnn", "--epochs", "1",
                 "--batch-size", "16", "--out", str(out), "--no-progress"]) == 0
    assert "data tiny.tar.gz: 60 train / 30 test images of (3, 8, 8)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["data"] == f"imagefolder:{source}" and "asr" in report["metrics"]
    model, meta = load_model(out / "model.safetensors")
    assert meta["num_classes"] == 3 and meta["in_channels"] == 3 and meta["image_size"] == [8, 8]


def test_anp_on_an_image_folder(tmp_path, checkpoint):
    """The suspect of tests/conftest.py takes 1x16x16 images: a grayscale folder of that size."""
    files, _ = image_set(per_class=(2, 20), size=(16, 16), channels=1)
    source = write_folder(tmp_path / "grey", files)
    out = tmp_path / "out"
    assert main(["anp", "--model", str(checkpoint), "--data", f"imagefolder:{source}", "--out", str(out),
                 "--iterations", "3", "--batch-size", "16", "--clean-images", "40", "--no-plot",
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == "grey" and report["clean_images"] == 40 and report["evaluated_images"] == 20


@pytest.mark.parametrize("command", ["train", "anp"])
def test_a_bad_image_folder_exits_2_naming_the_file(tmp_path, checkpoint, capsys, command):
    files, _ = image_set(size=(16, 16), channels=1)
    files["train/cat/002.png"] = b"not a png"
    source = write_folder(tmp_path / "bad", files)
    args = ["--data", f"imagefolder:{source}", "--out", str(tmp_path / "out"), "--no-progress"]
    args += ["--model", str(checkpoint)] if command == "anp" else ["--arch", "small_cnn", "--epochs", "1"]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert f"{source / 'train/cat/002.png'} is not a readable JPEG or PNG image" in err
    assert not (tmp_path / "out").exists()


def test_cifar10_jpeg_not_found_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTPURIFY_DATA", raising=False)
    assert main(["train", "--data", "cifar10-jpeg", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cifar10-jpeg.tar.xz not found; looked for" in err and str(tmp_path / "data") in err
    assert main(["train", "--data", "imagefolder:", "--out", str(tmp_path / "out")]) == 2
    assert "imagefolder needs a path" in capsys.readouterr().err


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"garbage" + b[7:]])
def test_a_damaged_checkpoint_exits_2_naming_it(tmp_path, checkpoint, capsys, damage):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(checkpoint.read_bytes()))
    assert main(["anp", "--model", str(bad), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert f"{bad} is not a readable checkpoint" in capsys.readouterr().err
