"""ANP's eps="auto" (fastpurify.anp_eps) and the neuron adversary it reads (fastpurify.neuron_adversary):
the choice on the grid, its record, the engine and CLI wiring, and what is refused. (What it chooses on real
subjects, and how ANP then does, is measured in docs/anp-selection.md.)"""

import json

import pytest
import torch
import torch.nn.functional as F

from fastpurify import InputError
from fastpurify import anp_eps as E
from fastpurify.arena import NeuronArena
from fastpurify.cli import main
from fastpurify.engines.anp import anp
from fastpurify.layers import convert
from fastpurify.models import small_cnn
from fastpurify.neuron_adversary import perturb_neurons

pytestmark = pytest.mark.usefixtures("torch_backend")

CPU = torch.device("cpu")
KINDS = ("batchnorm",)


def _subject(n=40):
    torch.manual_seed(0)
    model = small_cnn(num_classes=10, in_channels=3, width=8).eval()
    g = torch.Generator().manual_seed(0)
    return model, torch.rand(n, 3, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_one_sign_step_puts_every_neuron_at_the_bound_the_way_that_raises_the_loss():
    model, images, labels = _subject()
    net = convert(model, KINDS).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        clean_loss = F.cross_entropy(net(images), labels)
    probe = NeuronArena(net)  # the gradient at zero noise, gathered independently of perturb_neurons
    probe.set_mode("perturbed")
    grad = probe.gather_noise_grad(F.cross_entropy(net(images), labels)).clone().view(-1)
    arena = perturb_neurons(net, images, labels, eps=0.1, steps=1, batch_size=16)  # 3 batches, summed
    noise = arena.perturbation
    moved = grad != 0
    assert moved.any() and torch.equal(noise[moved], 0.1 * grad[moved].sign())
    with torch.no_grad():
        assert F.cross_entropy(net(images), labels) > clean_loss


def _fake(monkeypatch, accuracy_at):
    """perturbed_predictions replaced: at eps, the first round(accuracy_at(eps) * n) images right."""
    calls = []

    def predictions(net, x, y, *, eps, steps, batch_size):
        calls.append(eps)
        right = round(accuracy_at(eps) * y.numel())
        wrong = (y + 1) % 10
        return torch.cat([y[:right], wrong[right:]])

    monkeypatch.setattr(E, "perturbed_predictions", predictions)
    monkeypatch.setattr(E, "predict", lambda net, x, batch_size: _labels)
    return calls


_labels = torch.arange(100) % 10


@pytest.mark.parametrize("falls_to_zero_at, chosen", [(0.3, 0.15), (0.2, 0.1), (0.05, 0.025), (0.06, 0.05)])
def test_auto_takes_the_smallest_grid_eps_that_halves_the_accuracy(monkeypatch, falls_to_zero_at, chosen):
    model, _, _ = _subject()
    calls = _fake(monkeypatch, lambda eps: max(0.0, 1 - eps / falls_to_zero_at))
    record = E.auto_eps(model, torch.zeros(100, 3, 12, 12), _labels, mask_layers=KINDS, batch_size=50, device=CPU)
    assert record["value"] == chosen and record["reached"] and record["clean_accuracy"] == 1.0
    brute = min(e for e in E.EPS_GRID if max(0.0, 1 - e / falls_to_zero_at) <= E.RETAINED)
    assert brute == chosen
    assert len(calls) <= 6 and calls[:2] == [E.EPS_GRID[0], E.EPS_GRID[-1]][:len(calls[:2])]  # a bisection
    assert record["accuracy"][f"{chosen:g}"] <= 0.5 and record["images"] == 100


def test_auto_falls_back_to_the_papers_bound_when_nothing_halves_the_accuracy(monkeypatch):
    model, _, _ = _subject()
    _fake(monkeypatch, lambda eps: 0.9)
    record = E.auto_eps(model, torch.zeros(100, 3, 12, 12), _labels, mask_layers=KINDS, batch_size=50, device=CPU)
    assert record["value"] == 0.4 and not record["reached"]
    assert "the paper's bound" in E.describe(record)


def test_auto_on_a_real_model_matches_the_brute_force_curve_and_leaves_the_model():
    model, images, labels = _subject(60)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = E.auto_eps(model, images, labels, mask_layers=KINDS, batch_size=32, device=CPU)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    net = E._frozen(model, KINDS, CPU)
    for eps, acc in record["accuracy"].items():  # each recorded accuracy is the perturbed model's
        from fastpurify.neuron_adversary import perturbed_predictions
        got = perturbed_predictions(net, images, labels, eps=float(eps), steps=1, batch_size=32)
        assert round(float((got == labels).double().mean()), 4) == acc
    limit = E.RETAINED * record["clean_accuracy"]
    assert record["accuracy"][f"{record['value']:g}"] <= limit + 1e-4 or not record["reached"]
    smaller = [float(e) for e in record["accuracy"] if float(e) < record["value"]]
    assert all(record["accuracy"][f"{e:g}"] > limit - 1e-4 for e in smaller)
    assert record["value"] in E.EPS_GRID and E.describe(record).startswith(f"eps auto: {record['value']:g}")


def test_the_engine_runs_with_the_chosen_eps_and_records_why():
    model, images, labels = _subject(60)
    kw = dict(iterations=4, batch_size=16, device="cpu", progress=False, mask_layers=KINDS)
    auto = anp(model, (images, labels), eps="auto", **kw)
    record = auto.settings["eps_auto"]
    assert auto.settings["eps"] == record["value"] == E.auto_eps(model, images, labels, mask_layers=KINDS,
                                                                 batch_size=16, device=CPU)["value"]
    given = anp(model, (images, labels), eps=record["value"], **kw)
    assert all(torch.equal(auto.masks[k], given.masks[k]) for k in given.masks)
    assert "eps_auto" not in given.settings
    ensemble = anp(model, (images, labels), eps="auto", seeds=2, **kw)  # one after another on the CPU
    assert ensemble.settings["eps_auto"] == record and ensemble.settings["eps"] == record["value"]


@pytest.mark.parametrize("eps", ["big", 0.0, -1.0])
def test_the_engine_refuses_a_bad_eps(eps):
    model, images, labels = _subject()
    with pytest.raises(InputError, match="eps"):
        anp(model, (images, labels), eps=eps, iterations=1, device="cpu", progress=False)


def test_the_command_takes_eps_auto_and_says_what_it_chose(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    argv = ["anp", "--model", str(checkpoint), "--data", "digits", "--out", str(out), "--iterations", "4",
            "--batch-size", "16", "--clean-images", "40", "--no-progress", "--eps", "auto"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    record = report["settings"]["eps_auto"]
    assert report["settings"]["eps"] == record["value"] in E.EPS_GRID and record["images"] == 40
    assert f"eps auto: {record['value']:g}" in printed


@pytest.mark.parametrize("args, message", [
    (["--eps", "loud"], "--eps must be a number in (0, 1] or 'auto', got 'loud'"),
    (["--eps", "0"], "--eps must lie in (0, 1], got 0.0"),
    (["--eps", "auto", "--engine", "reference"], "--eps auto is read from the model by the fast engine"),
])
def test_the_command_refuses_a_bad_eps(tmp_path, checkpoint, capsys, args, message):
    argv = ["anp", "--model", str(checkpoint), "--data", "digits", "--out", str(tmp_path / "out"), "--iterations",
            "2", "--no-progress", *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
