"""``fastpurify reproduce anp|pbe``: the papers' settings, the split, cached subjects, the budget,
the table, bad input (small, CPU), and the reduced pipeline on the real CIFAR-10 (JPEG copy)."""

import json
from pathlib import Path

import pytest
import torch

from fastpurify.anp_eps import EPS_GRID
from fastpurify.cli import main
from fastpurify.data import load_source
from fastpurify.reproduce import paper_config
from fastpurify.reproduce.subjects import epochs_within, get_subject, split_data, subject_key
from fastpurify.backdoor import implant_warning, weak_attack_warning
from fastpurify.reproduce.table import aggregate, markdown, write_table
from fastpurify.validation import InputError

pytestmark = pytest.mark.usefixtures("torch_backend")
CIFAR10_JPEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


def test_the_papers_settings_and_overrides():
    anp, pbe = paper_config("anp"), paper_config("pbe")
    assert (anp.arch, anp.rate, anp.clean_fraction, anp.anp_iterations, anp.threshold) == (
        "cifar_resnet18", 0.05, 0.01, 2000, 0.2)
    assert (pbe.arch, pbe.rate, pbe.clean_fraction, pbe.pbe_settings) == (
        "preact_resnet18", 0.1, 0.05, ("clean", "no-clean"))
    assert pbe.pbe_eps == pytest.approx(6 / 255) and (pbe.pbe_adv_epochs, pbe.pbe_clean_epochs) == (None, None)
    assert (pbe.pbe_lr, pbe.pbe_recipe, pbe.pbe_initial) == (None, None, "random")  # fastpurify.pbe's defaults
    gpu = paper_config("anp", "cuda", epochs=7)
    assert (gpu.recipe.epochs, gpu.recipe.batch_size, gpu.recipe.schedule, gpu.recipe.precision) == (
        7, 512, "onecycle", "bf16")
    assert paper_config("anp").recipe.precision == "fp32"


@pytest.mark.parametrize("overrides, message", [
    (dict(attacks=("badnets", "trojan")), "unknown attack 'trojan': choose from badnets, blend, sig, wanet, or none"),
    (dict(attacks=()), "at least one attack"),
    (dict(seeds=0), "--seeds"),
    (dict(rate=1.5), "--rate must lie in (0, 1)"),
    (dict(pbe_settings=("clean", "sometimes")), "--pbe-settings"),
    (dict(pbe_adv_epochs=0, pbe_clean_epochs=0), "--pbe-epochs"),
    (dict(pbe_adv_epochs=1), "give both PBE epoch counts"),
    (dict(pbe_adv_epochs=1, pbe_clean_epochs=1, pbe_recipe="authors"), "do not also give --pbe-epochs"),
    (dict(pbe_initial="lowest"), "--pbe-initial must be 'random' or 'high-loss'"),
    (dict(pbe_exclude_low_loss=0.5), "--pbe-exclude-low-loss 0.5 leaves 50% of the training images"),
    (dict(pbe_exclude_low_loss=-0.1), "--pbe-exclude-low-loss must lie in [0, 1)"),
    (dict(pbe_initial="high-loss", pbe_schedule=(0.05, 0.9)),
     "--pbe-exclude-low-loss 0.2 (--pbe-initial high-loss's default) leaves 80%"),
    (dict(pbe_lr=0.0), "--pbe-lr"),
    (dict(anp_eps=0.0), "--anp-eps must lie in (0, 1]"),
    (dict(anp_eps="loud"), "--anp-eps must be a number in (0, 1] or 'auto', got 'loud'"),
    (dict(select_order="rank"), "--select-order must be one of masks, patch, got 'rank'"),
    (dict(select_order_area=0.04), "--select-order-area is the patch of --select-order patch"),
    (dict(select_correct_stats=True, auto_rule=False), "--select-correct-stats corrects the auto rule's pruning"),
    (dict(select_hold=1, auto_rule=False), "--select-hold is how the auto rule's walk stops; drop --no-auto-rule"),
    (dict(select_hold=-1), "--select-hold must be a whole number of candidates from 0 to 10"),
    (dict(select_order="patch", select_order_area="large"), "--select-order-area must be a share of the pixels"),
    (dict(select_order="patch", select_order_area=1.5), "--select-order-area must lie in (0, 1]"),
    (dict(colour="red"), "unknown reproduction setting(s) colour"),
])
def test_bad_settings_say_what_is_accepted(overrides, message):
    with pytest.raises(InputError, match=None) as info:
        paper_config("anp", **overrides)
    assert message in str(info.value)
    with pytest.raises(InputError, match="unknown defense"):
        paper_config("fineprune")


def test_the_split_holds_out_a_clean_reserve():
    splits = load_source("synthetic", size=8, seed=0)
    config = paper_config("pbe", train_images=1000, clean_images=60, test_images=200)
    data = split_data(splits, config)
    assert data.train[1].numel() == 900 and data.reserve[1].numel() == 100 and data.test[1].numel() == 200
    # disjoint: no reserve image is a training image
    flat = lambda x: {tuple(v.tolist()) for v in x.reshape(x.shape[0], -1)[:, :6]}  # noqa: E731
    assert not flat(data.train[0]) & flat(data.reserve[0])
    again = split_data(splits, config)
    assert torch.equal(again.reserve[0], data.reserve[0])  # the same split for every run and seed
    with pytest.raises(InputError, match="the defender needs 150 clean images but the reserve holds only 100"):
        split_data(splits, paper_config("pbe", train_images=1000, clean_images=150))
    with pytest.raises(InputError, match="--train-images 99999 is more than the 2048 images"):
        split_data(splits, paper_config("pbe", train_images=99999))


def test_subjects_are_cached_by_what_decides_their_weights(tmp_path):
    splits = load_source("synthetic", size=8, seed=0)
    config = paper_config("anp", arch="small_cnn", rate=0.1, epochs=1, train_images=400, clean_images=20)
    data = split_data(splits, config)
    kw = dict(recipe=config.recipe, device=torch.device("cpu"), cache=tmp_path, progress=False)
    first = get_subject(data, config, "badnets", 0, **kw)
    second = get_subject(data, config, "badnets", 0, **kw)
    assert not first.record["cached"] and second.record["cached"]
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert second.before == first.before and torch.equal(second.poisoned.poison_indices, first.poisoned.poison_indices)
    keys = {subject_key(data, config, "badnets", 0, config.recipe), subject_key(data, config, "badnets", 1, config.recipe),
            subject_key(data, config, "blend", 0, config.recipe),
            subject_key(data, paper_config("anp", arch="small_cnn", rate=0.2, epochs=1, train_images=400), "badnets", 0,
                        config.recipe)}
    assert len(keys) == 4


def test_the_budget_caps_the_epochs():
    splits = load_source("synthetic", size=8, seed=0)
    config = paper_config("anp", arch="small_cnn", epochs=50, train_images=1000)
    data = split_data(splits, config)
    cpu = torch.device("cpu")
    tight, info = epochs_within(1e-6, data, config, config.recipe, cpu, subjects=2)
    assert tight.epochs == 1 and info["epochs_used"] == 1 and info["probe_seconds_per_epoch"] > 0
    loose, info = epochs_within(1e6, data, config, config.recipe, cpu, subjects=2)
    assert loose.epochs == 50 and info["epochs_asked"] == 50


def _run(attack, seed, before, after_asr):
    return {"attack": attack, "seed": seed, "before": {"acc": before, "asr": 0.99},
            "anp": {"mask_seconds": 2.0, "threshold": {"acc": before - 0.05, "asr": after_asr, "pruned": 10},
                    "clean_rule": {"acc": before - 0.01, "asr": 0.5, "pruned": 3}}}


def test_the_table_is_mean_and_std_over_seeds_beside_the_paper():
    runs = [_run("badnets", 0, 0.80, 0.10), _run("badnets", 1, 0.90, 0.20), _run("blend", 0, 0.70, 0.05)]
    rows = aggregate("anp", runs)
    assert [r["attack"] for r in rows] == ["badnets", "blend"] and rows[0]["seeds"] == [0, 1]
    acc = rows[0]["cells"]["before ACC"]
    assert acc["mean"] == pytest.approx(85.0) and acc["std"] == pytest.approx(7.0710678) and acc["n"] == 2
    assert rows[0]["cells"]["threshold ASR"]["mean"] == pytest.approx(15.0)
    text = markdown("anp", rows, {"data": "X", "lines": [("subjects", "tiny")]},
                    {"badnets": {"before": [93.5, 100.0], "anp": [90.0, None]}})
    assert "| badnets | 2 | 85.0 ± 7.1 | 99.0 ± 0.0 | 80.0 ± 7.1 | 15.0 ± 7.1 | 10 ± 0 |" in text
    badnets = next(line for line in text.splitlines() if line.startswith("| badnets"))
    assert badnets.endswith("| 93.5 / 100 | 90 / ? |")
    assert "| blend | 1 | 70.0 | 99.0 | 65.0 | 5.0 | 10 |" in text and text.count("n/a") == 2
    assert "not filled in" not in text
    assert "give them with --paper-numbers" in markdown("anp", rows, {"data": "X", "lines": []}, {})
    assert "Warning" not in text


def test_a_subject_whose_backdoor_did_not_implant_is_named(tmp_path):
    assert implant_warning(None) is None and implant_warning(0.8) is None and implant_warning(0.99) is None
    warning = implant_warning(0.12)
    assert "did not implant (ASR 12.0% < 80%)" in warning and "--epochs" in warning and "--rate" in warning
    assert weak_attack_warning(None) is None and weak_attack_warning(0.9) is None
    assert "reaches only ASR 3.0% (< 80%)" in weak_attack_warning(0.03) and "--target" in weak_attack_warning(0.03)
    runs = [_run("badnets", 0, 0.5, 0.02), {**_run("badnets", 1, 0.5, 0.02), "warning": warning}]
    write_table(tmp_path, "anp", runs, {"data": "X", "lines": []}, {}, {})
    text = (tmp_path / "table.md").read_text()
    assert f"**Warning**: badnets seed 1: {warning}." in text and "seed 0:" not in text
    assert json.loads((tmp_path / "table.json").read_text())["runs"][1]["warning"] == warning


def test_paper_numbers_file_is_checked(tmp_path, capsys):
    bad = tmp_path / "paper.json"
    bad.write_text(json.dumps({"badnets": {"fineprune": [1, 2]}}))
    assert main(["reproduce", "anp", "--data", "digits", "--paper-numbers", str(bad), "--out",
                 str(tmp_path / "out")]) == 2
    assert "unknown method 'fineprune' for anp; use before, anp" in capsys.readouterr().err
    bad.write_text("{not json")
    assert main(["reproduce", "pbe", "--data", "digits", "--paper-numbers", str(bad)]) == 2
    assert "not a readable JSON file" in capsys.readouterr().err
    assert main(["reproduce", "pbe", "--pbe-epochs", "3", "--data", "digits"]) == 2
    assert "--pbe-epochs must be 2 comma-separated whole numbers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reproduce_on_digits_from_the_command_line(tmp_path, capsys):
    """Both defenses, two seeds, one attack; the second command reuses the first's subjects."""
    paper = tmp_path / "paper.json"
    paper.write_text(json.dumps({"badnets": {"before": [93.7, 100.0], "pbe": [91.0, 1.5]}}))
    common = ["--data", "digits", "--arch", "small_cnn", "--attacks", "badnets", "--seeds", "2", "--rate", "0.1",
              "--epochs", "3", "--clean-images", "64", "--subject-cache", str(tmp_path / "subjects"), "--no-progress"]
    assert main(["reproduce", "anp", *common, "--iterations", "5", "--out", str(tmp_path / "anp")]) == 0
    out = capsys.readouterr().out
    assert out.count("subject trained in") == 2 and "threshold 0.2: pruned" in out and "; auto: pruned" in out
    runs = json.loads((tmp_path / "anp" / "table.json").read_text())["runs"]
    weak = [r["before"]["asr"] < 0.8 for r in runs]  # three epochs may leave a backdoor weak: then it is said
    assert [("warning" in r) for r in runs] == weak and out.count("  warning: the backdoor did not implant") == sum(weak)
    assert main(["reproduce", "pbe", *common, "--pbe-epochs", "1,1", "--pbe-schedule", "0.2,0.5",
                 "--pbe-initial", "high-loss", "--pbe-lr", "0.02", "--pbe-exclude-low-loss", "0.3",
                 "--paper-numbers", str(paper), "--out", str(tmp_path / "pbe")]) == 0
    out = capsys.readouterr().out
    assert out.count("subject cached") == 2 and "PBE no-clean" in out
    for defense in ("anp", "pbe"):
        table = json.loads((tmp_path / defense / "table.json").read_text())
        assert table["defense"] == defense and table["data"] == "digits" and len(table["runs"]) == 2
        assert table["config"]["arch"] == "small_cnn" and table["rows"][0]["attack"] == "badnets"
        cells = table["rows"][0]["cells"]
        assert all(0.0 <= c["mean"] <= 100.0 for h, c in cells.items() if c["unit"] == "%")
        assert (tmp_path / defense / "table.md").is_file() and (tmp_path / defense / "runs" / "badnets-seed1.json").is_file()
    pbe = json.loads((tmp_path / "pbe" / "table.json").read_text())
    run = pbe["runs"][0]["pbe"]
    assert run["clean"]["clean_images"] == 64 and [r["fraction"] for r in run["no-clean"]["rounds"]] == [0.2, 0.5]
    assert (pbe["config"]["pbe_initial"], pbe["config"]["pbe_lr"]) == ("high-loss", 0.02)
    assert pbe["config"]["pbe_exclude_low_loss"] == 0.3 and "the best-fitted 0.3 kept out" in out
    assert run["no-clean"]["adversarial_labels"]["target"] == 0
    assert all(0 <= r["adv_asr"] <= 1 for r in run["no-clean"]["rounds"]), "each round's step-1b metrics"
    assert "| 93.7 / 100 | n/a | 91 / 1.5 |" in (tmp_path / "pbe" / "table.md").read_text()


@pytest.mark.slow
def test_the_clean_control_is_trained_without_poison_and_has_no_asr(tmp_path, capsys):
    """--attacks ...,none: a subject trained on the same split without poison, beside a backdoored one; ANP's
    rules and both PBE settings run on it, its ASR cells are absent (n/a), its key ignores the poison rate."""
    common = ["--data", "digits", "--arch", "small_cnn", "--attacks", "badnets,none", "--rate", "0.1", "--epochs", "4",
              "--clean-images", "64", "--subject-cache", str(tmp_path / "subjects"), "--no-progress"]
    assert main(["reproduce", "anp", *common, "--iterations", "5", "--anp-eps", "auto", "--select-order", "patch",
                 "--select-order-area", "auto", "--select-correct-stats", "--select-hold", "1",
                 "--out", str(tmp_path / "anp")]) == 0
    out = capsys.readouterr().out
    anp = json.loads((tmp_path / "anp" / "table.json").read_text())
    assert "eps auto (read from each subject), alpha 0.2" in out and anp["config"]["anp_eps"] == "auto"
    assert anp["config"]["select_order"] == "patch" and anp["config"]["select_order_area"] == "auto"
    assert ("along the trigger-guided order (--select-order patch, its patch auto), BatchNorm statistics corrected "
            "where the check passes (--select-correct-stats), its stop held over 1 more candidate (--select-hold)") \
        in out and anp["config"]["select_correct_stats"] and anp["config"]["select_hold"] == 1
    for r in anp["runs"]:  # the auto rule walked the trigger-guided order where a patch reached its target
        auto = r["anp"]["auto"]
        assert auto["settings"]["order"] == "patch" and auto["settings"]["correct_statistics"]
        assert auto["settings"]["hold"] == 1
        assert auto["statistics"] == (None if auto["pruned"] == 0 else "corrected" if "statistics corrected" in
                                      auto["reason"] else "stored")
        assert (auto["order"] is not None) == (auto["settings"].get("walk") == "patch"), auto["reason"]
        if auto["order"] is not None:  # its patch read from the subject
            assert auto["order"]["settings"]["area"] == auto["settings"]["order_area_read"]
    for r in anp["runs"]:  # what the engine ran with: each subject's own reading (fastpurify.anp_eps)
        assert r["anp"]["settings"]["eps"] == r["anp"]["eps_reading"]["value"] in EPS_GRID
    assert "none, seed 0: subject (small_cnn, no poison: the clean control)" in out and "ASR n/a" in out and "**none**: the clean control" in out
    assert main(["reproduce", "pbe", *common, "--pbe-epochs", "1,1", "--pbe-schedule", "0.2",
                 "--out", str(tmp_path / "pbe")]) == 0
    assert capsys.readouterr().out.count("subject cached") == 2
    for defense in ("anp", "pbe"):
        table = json.loads((tmp_path / defense / "table.json").read_text())
        rows = {r["attack"]: r["cells"] for r in table["rows"]}
        assert "before ASR" in rows["badnets"] and "before ASR" not in rows["none"]
        assert not any(h.endswith("ASR") for h in rows["none"]) and rows["none"]["before ACC"]["mean"] > 50
        control = next(r for r in table["runs"] if r["attack"] == "none")
        assert control["before"]["asr"] is None and control["subject"]["rate"] == 0.0
        assert "| none | 1 |" in (tmp_path / defense / "table.md").read_text()
    run = json.loads((tmp_path / "pbe" / "runs" / "none-seed0.json").read_text())["pbe"]
    assert run["no-clean"]["asr"] is None and run["no-clean"]["rounds"][-1]["poisoned_fraction"] is None
    assert run["no-clean"]["train_images"] == json.loads((tmp_path / "pbe" / "runs" / "badnets-seed0.json").read_text()
                                                         )["pbe"]["no-clean"]["train_images"]
    splits = load_source("synthetic", size=8, seed=0)
    config = paper_config("anp", arch="small_cnn", train_images=400, clean_images=20)
    data = split_data(splits, config)
    other_rate = paper_config("anp", arch="small_cnn", rate=0.2, train_images=400, clean_images=20)
    assert subject_key(data, config, "none", 0, config.recipe) == subject_key(data, other_rate, "none", 0, config.recipe)
    assert subject_key(data, config, "badnets", 0, config.recipe) != subject_key(data, other_rate, "badnets", 0,
                                                                                  config.recipe)


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10_JPEG.is_file(), reason=f"the CIFAR-10 (JPEG copy) tarball is not at {CIFAR10_JPEG} "
                    "(the repository's ../shared/data/cifar10-jpeg.tar.xz)")
def test_reduced_reproduction_on_real_cifar10(tmp_path, capsys):
    """The whole pipeline on real images at CPU scale: 5,000 training images, a small BN CNN, 15
    epochs, BadNets at 10 %; ANP then PBE on the same (cached) subject. A real training run, on the
    worker's one thread (tests/conftest.py): about 2 minutes beside the suite's other worker, where
    two threads sharing the machine's two cores with that worker took 3.5-4.5 minutes."""
    common = ["--data", f"cifar10-jpeg:{CIFAR10_JPEG}", "--arch", "small_cnn", "--attacks", "badnets", "--rate", "0.1",
              "--train-images", "5000", "--test-images", "1000", "--clean-images", "250", "--epochs", "15",
              "--subject-cache", str(tmp_path / "subjects"), "--no-progress"]
    assert main(["reproduce", "anp", *common, "--iterations", "100", "--no-auto-rule", "--out", str(tmp_path / "anp")]) == 0
    assert main(["reproduce", "pbe", *common, "--pbe-epochs", "1,3", "--pbe-schedule", "0.1,0.3",
                 "--out", str(tmp_path / "pbe")]) == 0
    out = capsys.readouterr().out
    assert "subject trained in" in out and "subject cached" in out
    anp = json.loads((tmp_path / "anp" / "table.json").read_text())
    pbe = json.loads((tmp_path / "pbe" / "table.json").read_text())
    assert anp["data"] == pbe["data"] == "CIFAR-10 (JPEG copy)"
    run = anp["runs"][0]
    assert run["subject"]["train_images"] == 4500 and run["anp"]["clean_images"] == 250
    reading = run["anp"]["eps_reading"]  # the paper's eps ran; what "auto" would have read is recorded
    assert run["anp"]["settings"]["eps"] == 0.4 and reading["value"] in EPS_GRID and reading["images"] == 250
    # a real backdoored subject: the trigger works, the clean accuracy is far above chance
    assert run["before"]["asr"] > 0.8 and run["before"]["acc"] > 0.35
    assert pbe["runs"][0]["before"] == run["before"]
    for table in (anp, pbe):
        text = (tmp_path / table["defense"] / "table.md").read_text()
        assert text.startswith(f"# {table['defense'].upper()} reproduction on CIFAR-10 (JPEG copy)")
        assert "| badnets | 1 |" in text and "1000 test images" in text
    after = pbe["runs"][0]["pbe"]
    assert set(after) == {"clean", "no-clean"} and all(0 <= after[s]["asr"] <= 1 for s in after)
