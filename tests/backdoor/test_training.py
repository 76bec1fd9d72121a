import pytest
import torch

from fastpurify.backdoor import BadNets, Blend, train_backdoored
from fastpurify.data import load_digits, synthetic_dataset, train_test_split
from fastpurify.inference import predict_logits
from fastpurify.models import small_cnn
from fastpurify.training import train_classifier


@pytest.mark.slow
def test_badnets_digits_model_is_accurate_and_backdoored():
    """The real thing: bundled digits at 16x16 (the end-to-end tests' size; the demo's test trains
    the same at 32x32), BadNets 10% all-to-one, small BN CNN, CPU."""
    images, labels = load_digits(size=16)
    train, test = train_test_split(images, labels, 0.2, seed=0)
    torch.manual_seed(0)
    model = small_cnn(num_classes=10, in_channels=1)
    subject = train_backdoored(model, train, test, BadNets(num_classes=10, target=0), 0.1, epochs=15, lr=0.05,
                               batch_size=64, padding=2, flip=False, progress=False)
    assert subject.metrics["acc"] >= 0.90
    assert subject.metrics["asr"] >= 0.90
    assert subject.poisoned.poison_indices.numel() == round(0.1 * len(train[1]))
    assert subject.history.loss[-1] < subject.history.loss[0]


def test_trainer_is_seeded_and_restores_nothing_it_should_not():
    x, y = synthetic_dataset(n=64, num_classes=4, channels=1, size=8, seed=0)

    def run():
        torch.manual_seed(1)
        m = small_cnn(num_classes=4, in_channels=1, width=4)
        h = train_classifier(m, x, y, epochs=2, batch_size=16, padding=1, seed=5, progress=False)
        return m, h

    (m1, h1), (m2, h2) = run(), run()
    assert h1.loss == h2.loss and len(h1.loss) == 2
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_trainer_learns_blend_on_synthetic():
    (tx, ty), test = train_test_split(*synthetic_dataset(n=400, num_classes=4, channels=3, size=12), 0.25)
    torch.manual_seed(0)
    subject = train_backdoored(small_cnn(num_classes=4, in_channels=3, width=8), (tx, ty), test,
                               Blend(num_classes=4, target=1, alpha=0.3), 0.1, epochs=6, lr=0.05, batch_size=32,
                               padding=0, flip=False, progress=False)
    assert subject.metrics["acc"] > 0.8 and subject.metrics["asr"] > 0.8


def test_predict_restores_training_flags():
    model = small_cnn(num_classes=3, in_channels=1, width=4)
    model.train()
    model.features[1].eval()  # a mixed state must come back exactly
    predict_logits(model, torch.rand(5, 1, 8, 8), batch_size=2)
    assert model.training and not model.features[1].training and model.features[4].training


def test_the_fast_recipe_one_cycle_bf16_channels_last():
    """The GPU recipe's code path on the CPU: one-cycle lr, Nesterov, bf16 autocast, channels_last.
    It learns, it reports how it ran, and the model comes back float32 in the default layout."""
    (tx, ty), test = train_test_split(*synthetic_dataset(n=400, num_classes=4, channels=3, size=12), 0.25)
    torch.manual_seed(0)
    model = small_cnn(num_classes=4, in_channels=3, width=8)
    h = train_classifier(model, tx, ty, epochs=6, lr=0.1, batch_size=32, padding=0, flip=False, schedule="onecycle",
                         nesterov=True, precision="bf16", channels_last=True, label_smoothing=0.1, progress=False)
    assert h.settings["schedule"] == "onecycle" and h.settings["precision"] == "bf16" and h.settings["channels_last"]
    assert h.loss[-1] < h.loss[0] and h.accuracy[-1] > 0.8
    conv = model.features[0].weight
    assert conv.dtype == torch.float32 and conv.is_contiguous()
    assert (predict_logits(model, test[0]).argmax(1) == test[1]).float().mean() > 0.8


def test_one_cycle_schedule_shape():
    from fastpurify.training import learning_rate_schedule

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4, momentum=0.9)
    sched = learning_rate_schedule(opt, "onecycle", 0.4, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.4 / 25) and max(lrs) == pytest.approx(0.4, rel=1e-3)
    assert lrs.index(max(lrs)) in (24, 25) and lrs[-1] < 0.4 / 100


@pytest.mark.parametrize("kwargs, message", [(dict(schedule="step"), "schedule must be one of"),
                                             (dict(precision="fp8"), "precision"),
                                             (dict(label_smoothing=1.0), "label_smoothing")])
def test_trainer_rejects_bad_options(kwargs, message):
    x, y = synthetic_dataset(n=16, num_classes=4, channels=1, size=8, seed=0)
    with pytest.raises(Exception, match=message):
        train_classifier(small_cnn(num_classes=4, in_channels=1, width=4), x, y, epochs=1, progress=False, **kwargs)
