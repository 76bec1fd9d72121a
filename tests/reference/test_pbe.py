import copy

import pytest
import torch
import torch.nn.functional as F

from fastpurify import InputError
from fastpurify.data import DeviceBatchSampler, make_generator, synthetic_dataset
from fastpurify.inference import predict_logits
from fastpurify.models import small_cnn
from fastpurify.ranking import average_precision, cosine_scores, rank_descending
from fastpurify.reference import pbe, pgd
from tests.stubs import Refuses


def _model():
    torch.manual_seed(0)
    return small_cnn(num_classes=4, in_channels=1, width=4)


@pytest.mark.parametrize("regenerate", ["round", "batch"])
def test_a_round_on_a_clean_extra_set_is_adversarial_then_clean_fine_tuning(regenerate):
    """The documented order: one generator drives PGD's random start and the sampler's epochs;
    one SGD optimizer; PGD examples once per round ("round") or of every batch against the
    current model ("batch")."""
    model = _model()
    x, y = synthetic_dataset(n=12, num_classes=4, channels=1, size=8, seed=0)
    kw = dict(eps=8 / 255, alpha=2 / 255, pgd_steps=2, random_start=True, lr=0.01, batch_size=5, padding=1,
              seed=3)
    purified, report = pbe(model, clean_data=(x, y), adv_epochs=2, clean_epochs=1, regenerate=regenerate,
                           progress=False, **kw)

    net = copy.deepcopy(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = make_generator(3)
    attack = dict(eps=8 / 255, alpha=2 / 255, steps=2, random_start=True, generator=g)
    adversarial = pgd(net, x, y, batch_size=5, **attack) if regenerate == "round" else None
    for epoch in range(3):
        source = adversarial if epoch < 2 and regenerate == "round" else x
        for xb, yb in DeviceBatchSampler(source, y, 5, generator=g, padding=1):
            if epoch < 2 and regenerate == "batch":
                xb = pgd(net, xb, yb, **attack)
            net.train()
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (k, a), b in zip(purified.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert len(report.rounds) == 1 and report.rounds[0].indices is None and report.ranking is None
    assert report.rounds[0].size == 12 and report.before is None and report.rounds[0].acc is None
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), purified.state_dict().values()))


def test_training_set_rounds_follow_the_schedule_and_the_ranking():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = synthetic_dataset(n=100, num_classes=4, channels=1, size=8, seed=1)
    poisoned = torch.arange(0, 100, 10)
    purified, result = pbe(model, train_data=(x, y), poison_indices=poisoned, adv_epochs=1, clean_epochs=1,
                           pgd_steps=2, batch_size=32, lr=0.01, seed=5, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the given model is untouched"
    assert [r.fraction for r in result.rounds] == [0.05, 0.2, 0.5, 0.7]
    assert [r.indices.numel() for r in result.rounds] == [5, 20, 50, 70]
    assert torch.equal(result.rounds[0].indices, torch.randperm(100, generator=make_generator(5))[:5])
    for prev, cur in zip(result.rounds, result.rounds[1:]):  # the top of the previous round's ranking
        assert torch.equal(cur.indices, prev.ranking[:cur.indices.numel()])
    scores = cosine_scores(predict_logits(model, x), predict_logits(purified, x))
    torch.testing.assert_close(result.rounds[-1].scores, scores)
    assert torch.equal(result.ranking, rank_descending(scores))
    flags = torch.zeros(100, dtype=torch.bool)
    flags[poisoned] = True
    for r in result.rounds:
        assert r.poisoned == int(flags[r.indices].sum()) and r.poisoned_fraction == r.poisoned / r.indices.numel()
        assert r.average_precision == average_precision(r.ranking, ~flags)
    _, again = pbe(model, train_data=(x, y), poison_indices=flags, adv_epochs=1, clean_epochs=1, pgd_steps=2,
                   batch_size=32, lr=0.01, seed=5, progress=False)
    assert torch.equal(again.ranking, result.ranking), "seeded, and poison flags work like indices"


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule=(0.5, 0.2)), "schedule must be strictly increasing"),
    (dict(schedule=(0.2, 0.2, 0.7)), "schedule must be strictly increasing"),
    (dict(schedule=()), "non-empty sequence"),
    (dict(schedule=(0.2, 1.5)), r"every schedule fraction must lie in \(0, 1\]"),
    (dict(eps=0), "eps .* must be a positive"),
    (dict(alpha=-0.1), "alpha .* must be a positive"),
    (dict(pgd_steps=0), "steps must be a positive integer"),
    (dict(adv_epochs=-1), "adv_epochs must be a non-negative integer"),
    (dict(adv_epochs=0, clean_epochs=0), "at least 1"),
    (dict(lr=0), "lr must be a positive"),
    (dict(schedule=(0.001, 0.5)), "selects none"),
    (dict(poison_indices=torch.tensor([40])), r"integer indices in \[0, 39\]"),
])
def test_bad_settings_fail_before_any_work(kwargs, message):
    data = (torch.rand(40, 1, 4, 4), torch.zeros(40, dtype=torch.int64))
    with pytest.raises(InputError, match=message):
        pbe(Refuses(), train_data=data, progress=False, **kwargs)


def test_data_errors():
    data = (torch.rand(40, 1, 4, 4), torch.zeros(40, dtype=torch.int64))
    with pytest.raises(InputError, match="give train_data"):
        pbe(Refuses(), progress=False)
    with pytest.raises(InputError, match="only apply to the training-set setting"):
        pbe(Refuses(), data, clean_data=data, poison_indices=torch.tensor([0]), progress=False)
    with pytest.raises(InputError, match=r"pixel values in \[0, 1\]"):
        pbe(Refuses(), clean_data=(data[0] * 2, data[1]), progress=False)
