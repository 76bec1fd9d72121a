"""The fast PBE engine against the reference step for step (float64: same extra sets every
round, same parameters), its report, and its handling of bad input."""

import json
import warnings

import pytest
import torch
import torch.nn as nn

import fastpurify
from fastpurify import InputError
from fastpurify.backdoor import BadNets
from fastpurify.data import synthetic_dataset
from fastpurify.models import small_cnn
from fastpurify.reference import pbe as reference_pbe
from tests.stubs import Refuses



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return small_cnn(num_classes=4, in_channels=1, width=4).double()


@pytest.fixture(scope="module")
def data():
    x, y = synthetic_dataset(n=100, num_classes=4, channels=1, size=8, seed=1)
    return x.double(), y


SMALL = dict(adv_epochs=1, clean_epochs=1, pgd_steps=2, batch_size=16, lr=0.01, seed=5, progress=False)


def gap(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values())
               if p.is_floating_point())


@pytest.mark.parametrize("regenerate", ["round", "batch"])
@pytest.mark.parametrize("random_start", [False, True])
def test_progressive_rounds_follow_the_reference_step_for_step(model, data, regenerate, random_start):
    kw = dict(SMALL, train_data=data, poison_indices=torch.arange(0, 100, 10), regenerate=regenerate,
              random_start=random_start)
    ref, ref_report = reference_pbe(model, **kw)
    fast, report = fastpurify.pbe(model, device="cpu", pgd_batch_size=7, score_batch_size=30, **kw)
    assert len(report.rounds) == 4
    for a, b in zip(ref_report.rounds, report.rounds):
        assert torch.equal(a.indices, b.indices), f"round {b.round}: a different extra set"
        assert torch.equal(a.ranking, b.ranking)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-9)
        assert (a.poisoned, a.average_precision) == (b.poisoned, pytest.approx(b.average_precision))
    assert gap(ref, fast) < 1e-6
    assert gap(model, fast) > 1e-4, "the copy was fine-tuned"
    assert report.engine["name"] == "fast" and ref_report.engine["name"] == "reference"


def test_a_clean_extra_set_round_follows_the_reference(model, data):
    clean = (data[0][:40], data[1][:40])
    for regenerate in ("round", "batch"):
        kw = dict(SMALL, clean_data=clean, regenerate=regenerate, random_start=True, adv_epochs=2)
        ref, ref_report = reference_pbe(model, **kw)
        fast, report = fastpurify.pbe(model, device="cpu", **kw)
        assert gap(ref, fast) < 1e-6
        assert len(report.rounds) == 1 and report.rounds[0].size == 40 and report.ranking is None


ROUNDS = dict(regenerate="batch", adv_epochs=(2, 1), clean_epochs=(0, 2), adv_batches=(None, 1))


def test_per_round_epochs_and_adversarial_batches_follow_the_reference(model, data):
    """Round 0 all adversarial, later rounds one adversarial batch then clean (the authors' shape)."""
    kw = dict(SMALL, train_data=data, schedule=(0.2, 0.5, 0.7), **ROUNDS)
    ref, ref_report = reference_pbe(model, **kw)
    fast, report = fastpurify.pbe(model, device="cpu", **kw)
    assert gap(ref, fast) < 1e-6
    assert all(torch.equal(a.ranking, b.ranking) for a, b in zip(ref_report.rounds, report.rounds))
    assert report.settings["rounds"] == [dict(adv_epochs=2, clean_epochs=0, adv_batches=None),
                                         dict(adv_epochs=1, clean_epochs=2, adv_batches=1),
                                         dict(adv_epochs=1, clean_epochs=2, adv_batches=1)]
    one = dict(kw, adv_epochs=(2, 1), clean_epochs=(0, 2), adv_batches=None)  # every batch of epoch 0 adversarial
    assert gap(fastpurify.pbe(model, device="cpu", **one).model, fast) > 1e-6, "adv_batches changed the run"


def test_adversarial_batches_cap_counts_pgd_calls(model, data, monkeypatch):
    """adv_batches=1: one PGD call in the round, the rest of its batches clean."""
    import importlib

    module = importlib.import_module("fastpurify.reference.pbe")  # the module, not the function it exports
    calls = []
    real = module.pgd
    monkeypatch.setattr(module, "pgd", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    clean = (data[0][:48], data[1][:48])
    reference_pbe(model, clean_data=clean, **dict(SMALL, regenerate="batch", adv_epochs=2, clean_epochs=0,
                                                  adv_batches=1))
    assert calls == [16]
    calls.clear()
    reference_pbe(model, clean_data=clean, **dict(SMALL, regenerate="batch", adv_epochs=2, clean_epochs=0))
    assert calls == [16] * 6, "two epochs of three batches, every one adversarial"


def test_a_high_loss_round_0_follows_the_reference_and_draws_from_the_least_fitted_half(model, data):
    import torch.nn.functional as F

    kw = dict(SMALL, train_data=data, schedule=(0.3, 0.6), initial="high-loss")
    ref, ref_report = reference_pbe(model, **kw)
    fast, report = fastpurify.pbe(model, device="cpu", score_batch_size=30, **kw)
    assert gap(ref, fast) < 1e-6
    first = report.rounds[0].indices
    assert torch.equal(first, ref_report.rounds[0].indices) and first.numel() == 30
    with torch.no_grad():
        loss = F.cross_entropy(model.eval()(data[0]), data[1], reduction="none")
    assert bool((loss[first] >= loss.median()).all()), "round 0 from the half with the highest loss"
    _, other = fastpurify.pbe(model, device="cpu", **dict(kw, seed=6))
    assert not torch.equal(other.rounds[0].indices, first), "a random draw within that half"
    assert report.settings["initial"] == "high-loss"
    with pytest.raises(InputError, match="picks round 0 of the progressive setting"):
        fastpurify.pbe(model, clean_data=data, initial="high-loss", progress=False)


@pytest.mark.parametrize("initial, share, schedule", [("random", 0.4, (0.1, 0.3, 0.6)),
                                                      ("high-loss", 0.4, (0.1, 0.3, 0.6)),
                                                      ("high-loss", 0.6, (0.1, 0.3, 0.4))])  # into the half
def test_exclude_low_loss_keeps_the_best_fitted_images_out_of_every_round(model, data, initial, share, schedule):
    import torch.nn.functional as F

    kw = dict(SMALL, train_data=data, schedule=schedule, initial=initial, exclude_low_loss=share)
    ref, ref_report = reference_pbe(model, **kw)
    fast, report = fastpurify.pbe(model, device="cpu", **kw)
    assert gap(ref, fast) < 1e-6
    with torch.no_grad():
        loss = F.cross_entropy(model.eval()(data[0]), data[1], reduction="none")
    lowest = set(torch.argsort(loss)[:round(share * 100)].tolist())
    for mine, theirs in zip(report.rounds, ref_report.rounds):
        assert torch.equal(mine.indices, theirs.indices)
        assert not lowest & set(mine.indices.tolist()), f"round {mine.round} holds a kept-out image"
        assert mine.indices.numel() == int(100 * mine.fraction)
    # the later rounds are the previous ranking's best among the images left
    left = [i for i in report.rounds[1].ranking.tolist() if i not in lowest]
    assert report.rounds[2].indices.tolist() == left[:round(schedule[2] * 100)]
    assert report.settings["exclude_low_loss"] == share
    with pytest.raises(InputError, match="leaves 60% of the training images to choose from"):
        fastpurify.pbe(model, data, schedule=(0.1, 0.7), exclude_low_loss=0.4, progress=False)
    with pytest.raises(InputError, match="nothing to keep out"):
        fastpurify.pbe(model, clean_data=data, exclude_low_loss=0.2, progress=False)


def test_lr_and_exclude_low_loss_defaults_per_setting_and_round_0(model, data):
    from fastpurify.purification import DEFAULT_LR

    kw = dict(SMALL, pgd_steps=1)
    kw.pop("lr")
    _, progressive = fastpurify.pbe(model, data, device="cpu", schedule=(0.5,), **kw)
    _, clean = fastpurify.pbe(model, clean_data=data, device="cpu", **kw)
    assert progressive.settings["lr"] == DEFAULT_LR["training set"] == 1e-3
    assert clean.settings["lr"] == DEFAULT_LR["clean extra set"] == 1e-2
    _, high_loss = fastpurify.pbe(model, data, device="cpu", schedule=(0.3,), initial="high-loss", **kw)
    assert high_loss.settings["lr"] == DEFAULT_LR["high-loss"] == 1e-2
    # and exclude_low_loss=None: the best-fitted 20 % kept out with high-loss, none with the paper's round 0
    assert high_loss.settings["exclude_low_loss"] == 0.2 and progressive.settings["exclude_low_loss"] == 0.0
    with pytest.raises(InputError, match=r"exclude_low_loss=0.2 \(initial='high-loss'\'s default; give "):
        fastpurify.pbe(model, data, schedule=(0.1, 0.9), initial="high-loss", progress=False)
    _, none_out = fastpurify.pbe(model, data, device="cpu", schedule=(0.1, 0.9), initial="high-loss",
                                 exclude_low_loss=0.0, **kw)
    assert none_out.settings["exclude_low_loss"] == 0.0
    _, default = fastpurify.pbe(model, data, device="cpu", schedule=(0.3,), pgd_steps=1, batch_size=32, seed=5,
                                progress=False)  # no round keyword, one round: the authors' round 0
    assert default.settings["rounds"] == [dict(adv_epochs=10, clean_epochs=0, adv_batches=None)]


def test_the_authors_recipe_sets_the_rounds_of_their_scripts(model, data):
    from fastpurify.purification import RECIPES

    kw = dict(pgd_steps=1, batch_size=32, lr=0.01, seed=5, progress=False)
    _, progressive = fastpurify.pbe(model, data, device="cpu", recipe="authors", schedule=(0.2, 0.5), **kw)
    assert progressive.settings["regenerate"] == "batch" and progressive.settings["recipe"] == "authors"
    assert progressive.settings["rounds"] == [dict(adv_epochs=10, clean_epochs=0, adv_batches=None),
                                              dict(adv_epochs=1, clean_epochs=9, adv_batches=31)]
    _, clean = fastpurify.pbe(model, clean_data=(data[0][:32], data[1][:32]), device="cpu", recipe="authors", **kw)
    assert clean.settings["rounds"] == [dict(adv_epochs=3, clean_epochs=17, adv_batches=None)]
    assert clean.settings["regenerate"] == "batch"
    assert set(RECIPES["authors"]) == {"training set", "clean extra set"}
    with pytest.raises(InputError, match="recipe='authors' sets .*; do not also give adv_epochs"):
        fastpurify.pbe(model, data, recipe="authors", adv_epochs=3, progress=False)


def test_default_rounds_per_setting_and_given_keywords():
    """No round keyword: the authors' progressive rounds, and 3 + 17 epochs on examples made once
    per round with a clean set; any epoch keyword given: 3 + 17 and no batch cap for the rest."""
    from fastpurify.purification import round_keywords

    none = dict(regenerate=None, adv_epochs=None, clean_epochs=None, adv_batches=None)
    assert round_keywords("training set", None, none, 4) == dict(regenerate="batch", adv_epochs=(10, 1),
                                                                 clean_epochs=(0, 9), adv_batches=(None, 31))
    assert round_keywords("clean extra set", None, none, 1) == dict(regenerate="round", adv_epochs=3,
                                                                    clean_epochs=17, adv_batches=None)
    assert round_keywords("training set", None, dict(none, clean_epochs=4), 4) == dict(
        regenerate="batch", adv_epochs=3, clean_epochs=4, adv_batches=None)
    assert round_keywords("training set", None, dict(none, regenerate="round"), 4) == dict(
        regenerate="round", adv_epochs=(10, 1), clean_epochs=(0, 9), adv_batches=None)
    one_round = round_keywords("training set", "authors", none, 1)  # a one-round schedule: round 0's values
    assert (one_round["adv_epochs"], one_round["clean_epochs"], one_round["adv_batches"]) == ((10,), (0,), (None,))


def test_the_report_breaks_each_round_into_its_two_steps(data):
    """ACC / ASR after the adversarial epochs are the model's at that point: a run of only those
    epochs ends where the two-step run measured its middle."""
    torch.manual_seed(0)
    net = small_cnn(num_classes=4, in_channels=1, width=4).double()
    attack = BadNets(num_classes=4, target=0)
    test = tuple(t.double() if t.is_floating_point() else t for t in synthetic_dataset(n=60, num_classes=4,
                                                                                       channels=1, size=8, seed=9))
    kw = dict(SMALL, clean_data=(data[0][:48], data[1][:48]), test_data=test, attack=attack, lr=0.1)
    _, both = fastpurify.pbe(net, device="cpu", **dict(kw, adv_epochs=2, clean_epochs=2))
    _, first = fastpurify.pbe(net, device="cpu", **dict(kw, adv_epochs=2, clean_epochs=0))
    r, f = both.rounds[0], first.rounds[0]
    assert (r.adv_acc, r.adv_asr) == (f.acc, f.asr) and f.adv_acc is None, "no middle without clean epochs"
    assert (r.acc, r.asr) != (r.adv_acc, r.adv_asr) or r.acc == r.adv_acc
    summary = both.summary()
    assert summary["rounds"][0]["adv_acc"] == r.adv_acc
    labels = summary["adversarial_labels"]
    assert labels["images"] == 48 and labels["target"] == 0 and sum(labels["shares"]) == pytest.approx(1, abs=1e-3)
    assert labels["top_share"] == max(labels["shares"]) and labels["target_share"] == labels["shares"][0]


def test_adversarial_labels_count_the_infected_models_predictions(model, data):
    """The shares are the infected model's labels of its own PGD examples (reference PGD, no
    random start), on the clean images when the ground truth is known."""
    from fastpurify.purification import adversarial_labels, plan_pbe
    from fastpurify.reference.pgd import pgd

    poisoned = torch.arange(0, 100, 4)
    plan = plan_pbe(model, data, None, device=torch.device("cpu"), poison_indices=poisoned, test_data=data,
                    attack=None, eps=16 / 255, alpha=None, pgd_steps=3, random_start=False, regenerate="round",
                    adv_epochs=1, clean_epochs=1, lr=0.01, momentum=0.9, weight_decay=0.0, batch_size=16,
                    augment=False, padding=0, flip=False, schedule=(0.5,), seed=0)
    keep = torch.ones(100, dtype=torch.bool)
    keep[poisoned] = False
    x = pgd(model, data[0][keep], data[1][keep], eps=16 / 255, alpha=16 / 255 / 5, steps=3, random_start=False)
    with torch.no_grad():
        expected = torch.bincount(model.eval()(x).argmax(1), minlength=4).double() / 75
    out = adversarial_labels(model, plan)
    assert out["images"] == 75 and "target" not in out
    assert out["shares"] == pytest.approx(expected.tolist(), abs=1e-4)
    assert out["top_class"] == int(expected.argmax())


def test_layout_and_precision_options_run_the_same_rounds(model, data):
    """channels_last (the default on CUDA and for float32 on the CPU) changes no result; bfloat16
    autocast runs and scores."""
    kw = dict(SMALL, train_data=data, schedule=(0.2, 0.5))
    _, ref = reference_pbe(model, **kw)
    _, fast = fastpurify.pbe(model, device="cpu", channels_last=True, **kw)
    assert fast.engine["channels_last"] and all(torch.equal(a.indices, b.indices)
                                                for a, b in zip(ref.rounds, fast.rounds))
    net = small_cnn(num_classes=4, in_channels=1, width=4)
    kw["train_data"] = (data[0].float(), data[1])
    _, ref32 = reference_pbe(net, **kw)
    _, fast32 = fastpurify.pbe(net, device="cpu", **kw)
    assert fast32.engine["channels_last"], "the CPU default for a float32 model"
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(ref32.rounds, fast32.rounds))
    _, half = fastpurify.pbe(net, device="cpu", precision="bf16", **kw)
    assert half.engine["precision"] == "bf16" and bool(torch.isfinite(half.rounds[-1].scores).all())


def test_the_given_model_is_untouched(data):
    torch.manual_seed(1)
    net = small_cnn(num_classes=4, in_channels=1, width=4).double()
    net.features[0].weight.requires_grad_(False)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    purified, _ = fastpurify.pbe(net, data, device="cpu", **SMALL)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not net.training and not net.features[0].weight.requires_grad and net.features[1].weight.requires_grad
    assert purified is not net and all(p.grad is None for p in net.parameters())


def test_the_report_measures_each_round(data):
    torch.manual_seed(0)
    net = small_cnn(num_classes=4, in_channels=1, width=4)
    x, y = (t.float() if t.is_floating_point() else t for t in data)
    attack = BadNets(num_classes=4, target=0)
    test = synthetic_dataset(n=40, num_classes=4, channels=1, size=8, seed=9)
    purified, report = fastpurify.pbe(net, (x, y), test_data=test, attack=attack,
                                      poison_indices=torch.tensor([1, 2, 3]), device="cpu", **SMALL)
    assert set(report.before) >= {"acc", "asr"}
    for r in report.rounds:
        assert 0 <= r.acc <= 1 and 0 <= r.asr <= 1 and r.seconds > 0
        assert r.poisoned == int(torch.isin(r.indices, torch.tensor([1, 2, 3])).sum())
        assert r.poisoned_fraction == pytest.approx(r.poisoned / r.size)
    assert report.seconds == pytest.approx(sum(r.seconds for r in report.rounds))
    summary = json.loads(json.dumps(report.summary()))
    assert [r["fraction"] for r in summary["rounds"]] == [0.05, 0.2, 0.5, 0.7]
    settings = summary["settings"]
    assert settings["eps"] == settings["calibration"]["eps"]["value"], "eps='auto' by default, the choice reported"
    assert settings["alpha"] == pytest.approx(settings["eps"] / 5), "alpha=None is eps / 5 of the chosen eps"
    assert summary["engine"]["device"] == "cpu" and summary["engine"]["precision"] == "fp32"
    assert report.rounds[-1].acc == fastpurify.backdoor.evaluate(purified, *test)["acc"]


def test_kernels_through_the_interpreter_follow_the_reference(model, data, monkeypatch):
    monkeypatch.setenv("FASTPURIFY_BACKEND", "triton")  # the fused PGD step and cosine, interpreted
    kw = dict(SMALL, train_data=(data[0][:40], data[1][:40]), schedule=(0.2, 0.5), random_start=True)
    ref, ref_report = reference_pbe(model, **kw)
    fast, report = fastpurify.pbe(model, device="cpu", **kw)
    assert report.engine["backend"] == "triton"
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(ref_report.rounds, report.rounds))
    assert gap(ref, fast) < 1e-6


BAD = [
    (dict(eps=0), "eps .* must be a positive"),
    (dict(eps=-1 / 255), "eps .* must be a positive"),
    (dict(schedule=(0.5, 0.2)), "schedule must be strictly increasing"),
    (dict(schedule=(0.2, 1.5)), r"every schedule fraction must lie in \(0, 1\]"),
    (dict(schedule="0.2"), "non-empty sequence"),
    (dict(regenerate="epoch"), "regenerate must be 'round'"),
    (dict(adv_epochs=0, clean_epochs=0), "at least 1"),
    (dict(adv_epochs=(1, 0), clean_epochs=(1, 0)), "round 1: adv_epochs \\+ clean_epochs must be at least 1"),
    (dict(adv_epochs=(1, 1, 1, 1, 1)), r"one value or one per round \(at most 4 here\)"),
    (dict(adv_epochs=-1), "every adv_epochs must be a non-negative integer"),
    (dict(clean_epochs=(2, 1.5)), "every clean_epochs must be a non-negative integer"),
    (dict(adv_batches=31, regenerate="round"), "give regenerate='batch'"),
    (dict(adv_batches=0, regenerate="batch"), "every adv_batches must be a positive integer or None"),
    (dict(recipe="paper"), r"recipe must be one of \['authors'\]"),
    (dict(initial="low-loss"), "initial must be 'random'"),
    (dict(initial="high-loss", schedule=(0.6, 0.7)), "the schedule's first fraction must be at most 0.5"),
    (dict(momentum=1.0), r"momentum must lie in \[0, 1\)"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(attack=BadNets(num_classes=2, target=0)), "give test_data too"),
]


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_settings_fail_before_any_work(engine, kwargs, message):
    data = (torch.rand(40, 1, 4, 4), torch.zeros(40, dtype=torch.int64))
    run = fastpurify.pbe if engine == "fast" else reference_pbe
    with pytest.raises(InputError, match=message):
        run(Refuses(), train_data=data, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="fp16"), "precision must be one of"),
    (dict(cuda_graph=True), "cuda_graph=True needs a CUDA device"),
    (dict(pgd_batch_size=0), "pgd_batch_size must be a positive integer"),
    (dict(device="cuda:0"), "CUDA is not available"),
])
def test_bad_engine_options(kwargs, message):
    if torch.cuda.is_available() and "device" in kwargs:
        pytest.skip("CUDA is available here")
    data = (torch.rand(40, 1, 4, 4), torch.zeros(40, dtype=torch.int64))
    with pytest.raises(InputError, match=message):
        fastpurify.pbe(Refuses(), data, progress=False, device=kwargs.pop("device", "cpu"), **kwargs)


def test_labels_the_model_does_not_have_are_refused(model, data):
    x, y = data
    with pytest.raises(InputError, match=r"clean extra set data has labels up to 6 but the model outputs 4 classes"):
        fastpurify.pbe(model, clean_data=(x[:20], y[:20] + 3), device="cpu", progress=False)
    with pytest.raises(InputError, match=r"training data has labels up to 6"):
        reference_pbe(model, train_data=(x, y + 3), progress=False)
    with pytest.raises(InputError, match=r"test labels must lie in \[0, 3\]"):
        fastpurify.pbe(model, (x, y), test_data=(x, y + 3), device="cpu", progress=False)


def test_alpha_above_eps_without_random_start_is_allowed_but_warned(model, data):
    kw = dict(SMALL, clean_data=(data[0][:20], data[1][:20]), eps=2 / 255, alpha=4 / 255, device="cpu")
    with pytest.warns(UserWarning, match="alpha=0.01569 > eps=0.007843"):
        fastpurify.pbe(model, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpurify.pbe(model, random_start=True, **kw)


def test_missing_data_and_bad_pixels_are_refused(model, data):
    with pytest.raises(InputError, match="give train_data"):
        fastpurify.pbe(model, device="cpu", progress=False)
    with pytest.raises(InputError, match=r"pixel values in \[0, 1\]"):
        fastpurify.pbe(model, clean_data=(data[0] * 2, data[1]), device="cpu", progress=False)
    nan = data[0].clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        fastpurify.pbe(model, (nan, data[1]), device="cpu", progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("regenerate", ["round", "batch"])
def test_cuda_graphs_follow_the_eager_engine(regenerate, exact_cuda):
    """On a GPU: the captured PGD loop and training step give what the eager engine gives
    (TF32 off, deterministic cuDNN: with its default algorithms the parameters drifted 0.028
    apart over the 4 epochs on an H100; selections are compared, parameters loosely)."""
    from fastpurify.models import build_model
    torch.manual_seed(0)
    net = build_model("preact_resnet18", num_classes=10, in_channels=3).cuda()
    x, y = synthetic_dataset(n=640, size=32, seed=0)
    kw = dict(adv_epochs=2, clean_epochs=2, pgd_steps=3, batch_size=64, schedule=(0.2, 0.5), seed=0, progress=False,
              regenerate=regenerate, device="cuda", tf32=False, channels_last=False, pgd_batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed or mismatching capture would warn
        graphed, g_report = fastpurify.pbe(net, (x, y), cuda_graph=True, **kw)
    eager, e_report = fastpurify.pbe(net, (x, y), cuda_graph=False, **kw)
    assert g_report.engine["graphs_captured"] >= 2
    overlap = len(set(g_report.rounds[1].indices.tolist()) & set(e_report.rounds[1].indices.tolist()))
    assert overlap >= 0.95 * g_report.rounds[1].size
    assert gap(graphed, eager) < 1e-2


def test_graph_bookkeeping_without_a_gpu(model, data, monkeypatch):
    """The CUDA-graph paths of the engine, with capture replaced by a recorder that runs the step
    eagerly: the shapes that recur are captured (the training step after its first eager step,
    with the momentum buffers in the saved state), and the results do not change."""
    from fastpurify.engines import runtime
    from fastpurify.engines.pbe import PBEEngine
    from fastpurify.purification import plan_pbe

    captured = []

    def record(cls, step, state, check, **kw):
        captured.append((step, len(state), len(check)))
        return lambda: step()

    monkeypatch.setattr(runtime.GraphedStep, "try_capture", classmethod(record))
    kw = dict(poison_indices=None, test_data=None, attack=None, eps=6 / 255, alpha=None, pgd_steps=2,
              random_start=True, adv_epochs=2, clean_epochs=1, lr=0.01, momentum=0.9, weight_decay=5e-4,
              batch_size=16, augment=True, padding=4, flip=True, schedule=(0.5,), seed=0)
    results = []
    for graphs in (True, False):
        for regenerate in ("round", "batch"):
            plan = plan_pbe(model, (data[0][:48], data[1][:48]), None, device=torch.device("cpu"),
                            regenerate=regenerate, **kw)
            engine = PBEEngine(model, plan, device=torch.device("cpu"), channels_last=False, cuda_graph=graphs,
                               precision="fp32", pgd_batch_size=12, score_batch_size=64)
            engine.purify(plan.images, plan.labels, plan.specs[0])
            results.append({k: v.clone() for k, v in engine.model.state_dict().items()})
            if graphs:
                params = len(list(engine.model.parameters()))
                buffers = len(list(engine.model.buffers()))
                train = [c for c in captured if c[2] == params]
                assert len(train) == 1 and train[0][1] == 2 * params + buffers, "params, buffers, momenta"
                assert engine.tuner.graphs.captured == 1 and engine.attack.graphs.captured == 1
                assert set(engine.tuner.graphs.uses) == {(16, 1, 8, 8)}  # 48 images: 3 full batches
                engine.purify(plan.images[:40], plan.labels[:40], plan.specs[0])  # a round whose last batch holds 8
                assert (8, 1, 8, 8) in engine.tuner.graphs.uses and (8, 1, 8, 8) in engine.tuner._buffers
                engine.purify(plan.images[:16], plan.labels[:16], plan.specs[0])  # the next round forgets that shape
                assert set(engine.tuner.graphs.graphs) == {(16, 1, 8, 8)} and set(engine.tuner._buffers) == {
                    (16, 1, 8, 8)}
                captured.clear()
    for a, b in zip(results[:2], results[2:]):
        assert max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()) == 0.0
