"""``fastpurify pbe`` from the command line (small, CPU): both settings, both engines, the
rebuilt poisoned training set and its ground truth, the outputs, and bad input."""

import json

import numpy as np
import pytest
import torch

from fastpurify.backdoor import BadNets, evaluate, poison
from fastpurify.checkpoint import load_model
from fastpurify.cli import main
from fastpurify.commands.pbe import parse_pixels, parse_schedule
from fastpurify.data import load_source
from fastpurify.models import small_cnn
from fastpurify.ranking import average_precision

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["--adv-epochs", "1", "--clean-epochs", "1", "--pgd-steps", "2", "--batch-size", "32", "--no-progress"]


pytestmark = pytest.mark.usefixtures("torch_backend")  # the suspect comes from tests/conftest.py: checkpoint


def _rows(path):
    return [line.split("\t") for line in path.read_text().splitlines() if not line.startswith("#")]


def test_parsers():
    assert parse_pixels("6/255", "--eps") == pytest.approx(6 / 255)
    assert parse_pixels("0.03", "--eps") == 0.03
    assert parse_schedule("0.05,0.2,0.5,0.7") == [0.05, 0.2, 0.5, 0.7]
    assert parse_schedule("1") == [1.0]


def test_clean_extra_set_writes_model_report_and_figure(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    assert main(["pbe", "--model", str(checkpoint), "--clean-images", "40", "--eps", "8/255", "--out", str(out),
                 "--flip", "on", "--padding", "3", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "auto settings" not in printed  # all three given
    assert "PBE on a clean extra set: 40 images" in printed and "before ACC" in printed
    assert "    1     clean         40" in printed  # the table's round: all 40 clean images
    report = json.loads((out / "report.json").read_text())
    assert report["setting"] == "clean extra set" and report["engine"] == "fast"
    assert report["extra_images"] == 40 and report["evaluated_images"] == 359 - 40
    assert report["settings"]["eps"] == pytest.approx(8 / 255) and report["settings"]["alpha"] == pytest.approx(
        8 / 255 / 5)
    assert report["settings"]["adv_epochs"] == 1 and report["poisoned_images"] is None
    assert report["settings"]["flip"] is True and report["settings"]["padding"] == 3
    assert "calibration" not in report["settings"]
    assert report["arguments"]["clean_images"] == 40 and report["engine_info"]["name"] == "fast"
    [round_] = report["rounds"]
    assert round_["size"] == 40 and round_["fraction"] is None and round_["seconds"] > 0
    assert round_["acc"] == pytest.approx(report["after"]["acc"]) and round_["asr"] == pytest.approx(
        report["after"]["asr"])
    assert {"acc", "asr", "ra"} <= set(report["before"]) and {"acc", "asr", "ra"} <= set(report["after"])
    weak = report["before"]["asr"] < 0.8  # the untrained suspect carries no backdoor: the user is told
    assert ("warning" in report) == weak == ("warning: the attack given reaches only" in printed)
    # the purified model reloads through its metadata, differs from the suspect, and scores as reported
    purified, meta = load_model(out / "purified_model.safetensors")
    assert meta["purified"]["defense"] == "pbe" and meta["attack"]["name"] == "badnets"
    suspect, _ = load_model(checkpoint)
    assert not torch.equal(purified.features[0].weight, suspect.features[0].weight)
    test = load_source("digits", size=16, channels=1).test
    again = evaluate(purified, test[0][40:], test[1][40:], BadNets(num_classes=10, target=0))
    assert again["acc"] == pytest.approx(report["after"]["acc"]) and again["asr"] == pytest.approx(
        report["after"]["asr"])
    assert (out / "pbe_rounds.png").read_bytes()[:8] == PNG
    assert not (out / "ranking.txt").exists() and not (out / "precision_recall.png").exists()


def test_progressive_rebuilds_the_poisoned_training_set_and_its_ground_truth(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    assert main(["pbe", "--model", str(checkpoint), "--schedule", "0.1,0.3", "--out", str(out), *FAST,
                 "--regenerate", "batch", "--clean-epochs", "0,1", "--adv-batches", "all,2"]) == 0
    printed = capsys.readouterr().out
    assert "1438 images of digits's training split, poisoned at rate 0.1 (144 poisoned, known)" in printed
    assert "2 round(s): 1 + 0 epochs, then 1 (2 adversarial batches) + 1 (PGD every batch)" in printed, printed
    assert "adv ACC  adv ASR" in printed and "the trigger's target 0:" in printed
    assert "auto settings, from the infected model of 1000 extra-set images: eps " in printed
    report = json.loads((out / "report.json").read_text())
    chosen = report["settings"]["calibration"]  # --eps, --flip, --padding auto by default
    assert report["settings"]["eps"] == chosen["eps"]["value"] and chosen["eps"]["reached"] is not None
    assert report["settings"]["flip"] == chosen["flip"]["value"] and report["settings"]["padding"] == 2  # 16 px
    assert report["settings"]["rounds"] == [dict(adv_epochs=1, clean_epochs=0, adv_batches=None),
                                            dict(adv_epochs=1, clean_epochs=1, adv_batches=2)]
    assert report["rounds"][0]["adv_acc"] is None and 0 <= report["rounds"][1]["adv_asr"] <= 1
    assert report["adversarial_labels"]["target"] == 0 and report["adversarial_labels"]["images"] == 1000
    assert report["setting"] == "training set" and report["poisoned_images"] == 144
    assert report["evaluated_images"] == 359 and report["settings"]["schedule"] == [0.1, 0.3]
    assert [r["size"] for r in report["rounds"]] == [143, 431]
    assert all(0 <= r["poisoned"] <= r["size"] and 0 < r["average_precision"] <= 1 for r in report["rounds"])
    # ranking.txt: every training image once, with its score, best first, and the ground truth that
    # poison() gives for the recorded data, rate and seed
    rows = _rows(out / "ranking.txt")
    ranking = torch.tensor([int(r[0]) for r in rows])
    scores = torch.tensor([float(r[1]) for r in rows])
    flags = torch.tensor([r[2] == "1" for r in rows])
    assert sorted(ranking.tolist()) == list(range(1438)) and bool((scores[:-1] >= scores[1:]).all())
    truth = poison(load_source("digits", size=16, channels=1).train, BadNets(num_classes=10, target=0), 0.1).is_poisoned
    assert torch.equal(flags, truth[ranking])
    assert average_precision(ranking, ~truth) == pytest.approx(report["rounds"][-1]["average_precision"])
    for png in ("pbe_rounds.png", "precision_recall.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert len(report["figures"]) == 2


def _train_file(tmp_path, with_truth: bool):
    g = torch.Generator().manual_seed(0)
    arrays = dict(images=torch.rand(120, 1, 16, 16, generator=g).numpy(),
                  labels=torch.randint(0, 10, (120,), generator=g).numpy())
    if with_truth:
        arrays["poison_indices"] = np.arange(0, 120, 10)
    np.savez(tmp_path / "train.npz", **arrays)
    return tmp_path / "train.npz"


def test_reference_engine_on_a_training_set_file_with_ground_truth(tmp_path, checkpoint):
    out = tmp_path / "out"
    args = ["pbe", "--model", str(checkpoint), "--train-data", str(_train_file(tmp_path, True)), "--engine",
            "reference", "--schedule", "0.25,0.5", "--attack", "none", "--out", str(out), *FAST]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["engine"] == "reference" and report["attack"] is None
    assert report["engine_info"] == {"name": "reference", "device": "cpu"}
    assert report["poisoned_images"] == 12 and [r["size"] for r in report["rounds"]] == [30, 60]
    assert report["rounds"][-1]["asr"] is None and "asr" not in report["after"]
    rows = _rows(out / "ranking.txt")
    assert sum(r[2] == "1" for r in rows) == 12 and {int(r[0]) for r in rows if r[2] == "1"} == set(range(0, 120, 10))
    assert (out / "precision_recall.png").exists()


def test_training_set_file_without_ground_truth(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    assert main(["pbe", "--model", str(checkpoint), "--train-data", str(_train_file(tmp_path, False)),
                 "--schedule", "0.5", "--no-plot", "--out", str(out), *FAST]) == 0
    assert "train.npz holds no poison_indices or poisoned" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["poisoned_images"] is None and report["rounds"][0]["average_precision"] is None
    assert all(len(r) == 2 for r in _rows(out / "ranking.txt")) and report["figures"] == []
    assert not (out / "pbe_rounds.png").exists()


def test_pickled_model_needs_trust_pickle(tmp_path, capsys):
    path = tmp_path / "whole.pt"
    torch.save(small_cnn(num_classes=10, in_channels=1), path)
    base = ["pbe", "--model", str(path), "--arch", "small_cnn", "--in-channels", "1", "--size", "16",
            "--clean-images", "40", "--no-plot", "--out", str(tmp_path / "out"), *FAST]
    assert main(base) == 2 and "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*base, "--trust-pickle"]) == 0
    assert "asr" not in json.loads((tmp_path / "out" / "report.json").read_text())["after"]  # no trigger known


@pytest.mark.parametrize("args, message", [
    (["--schedule", "0.5,0.2"], "--schedule must be comma-separated, strictly increasing fractions in (0, 1]"),
    (["--schedule", "0,0.5"], "--schedule must be"),
    (["--eps", "0"], "--eps must be a positive finite number"),
    (["--eps", "six/255"], "--eps must be a number or a fraction such as 6/255"),
    (["--exclude-low-loss", "0.4"], "--exclude-low-loss 0.4 leaves 60% of the training images to choose from, but "
                                    "--schedule's last round takes 70%"),
    (["--exclude-low-loss", "1"], "--exclude-low-loss must lie in [0, 1)"),
    (["--initial", "high-loss", "--schedule", "0.05,0.9"], "--exclude-low-loss 0.2 (--initial high-loss's default; "
                                                          "give 0 to keep none out) leaves 80%"),
    (["--exclude-low-loss", "0.2", "--clean-images", "40"], "--exclude-low-loss keeps training images out"),
    (["--padding", "-2"], "--padding must be a whole number of pixels >= 0 or 'auto', got '-2'"),
    (["--padding", "wide"], "--padding must be a whole number of pixels >= 0 or 'auto'"),
    (["--alpha", "1/0"], "--alpha must be a number or a fraction"),
    (["--adv-epochs", "0", "--clean-epochs", "0"], "round 0: --adv-epochs + --clean-epochs must be at least 1"),
    (["--adv-epochs", "1,x"], "--adv-epochs must be non-negative integers, one or one per round"),
    (["--adv-epochs", "1,1,1,1,1"], "--adv-epochs must be one value or one per round (at most 4 here)"),
    (["--clean-images", "40", "--adv-epochs", "1,1"], "(at most 1 here)"),
    (["--adv-batches", "31", "--regenerate", "round"], "give --regenerate batch"),
    (["--recipe", "authors", "--clean-epochs", "2"], "--recipe authors sets --adv-batches, --adv-epochs, --clean-epochs, --regenerate; do not also give --adv-epochs, --clean-epochs"),
    (["--adv-batches", "all,0", "--regenerate", "batch"], "--adv-batches must be positive integers or 'all'"),
    (["--momentum", "1"], "--momentum must lie in [0, 1)"),
    (["--clean-images", "5000"], "--clean-images must be below 359"),
    (["--clean-images", "40", "--train-data", "x.npz"], "--train-data and --poison-rate are for the progressive"),
    (["--data", "missing.npz", "--clean-images", "40"], "data file not found"),
    (["--train-data", "missing.npz"], "data file not found"),
    (["--poison-rate", "1.5"], "--poison-rate must lie in [0, 1)"),
    (["--attack", "none"], "poisoning the training split needs a trigger"),
])
def test_bad_arguments_exit_2(tmp_path, checkpoint, capsys, args, message):
    argv = ["pbe", "--model", str(checkpoint), "--out", str(tmp_path / "out"), *FAST, *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_flip_takes_auto_on_or_off(tmp_path, checkpoint, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["pbe", "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--flip", "maybe"])
    assert exited.value.code == 2 and "--flip: invalid choice: 'maybe' (choose from" in capsys.readouterr().err


def test_a_training_set_file_of_other_images_is_refused(tmp_path, checkpoint, capsys):
    np.savez(tmp_path / "rgb.npz", images=np.zeros((20, 3, 16, 16), np.float32), labels=np.zeros(20, np.int64))
    assert main(["pbe", "--model", str(checkpoint), "--train-data", str(tmp_path / "rgb.npz"),
                 "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "rgb.npz holds (3, 16, 16) images but the test split of digits holds (1, 16, 16)" in capsys.readouterr().err


def test_a_data_file_has_no_training_split(tmp_path, checkpoint, capsys):
    path = _train_file(tmp_path, False)
    assert main(["pbe", "--model", str(checkpoint), "--data", str(path), "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "train.npz has no training split: give --train-data FILE" in capsys.readouterr().err


def test_no_fused_norms_reaches_the_engine(tmp_path, checkpoint, monkeypatch):
    """``--no-fused-norms`` hands ``fused_norms=False`` to the engine; without it the engine decides (None)."""
    import importlib

    engine = importlib.import_module("fastpurify.engines.pbe")  # the module (the package exports its function)
    seen = []
    original = engine.pbe

    def recording(*args, **kwargs):
        seen.append(kwargs["fused_norms"])
        return original(*args, **kwargs)
    monkeypatch.setattr(engine, "pbe", recording)
    for extra in ([], ["--no-fused-norms"]):
        assert main(["pbe", "--model", str(checkpoint), "--clean-images", "40", "--eps", "8/255", "--flip", "off",
                     "--padding", "0", "--out", str(tmp_path / f"out{len(extra)}"), "--no-plot", *extra, *FAST]) == 0
    assert seen == [None, False]
