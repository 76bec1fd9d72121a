"""The trigger-free pruning choice (fastpurify.selection): its statistic, its pruned copies, the
rule's walk over the candidates, and its refusals. (Its effectiveness on real subjects is
measured in docs/anp-selection.md and asserted on digits in tests/test_end_to_end.py.)"""

import pytest
import torch

from fastpurify import InputError
from fastpurify.inference import predict
from fastpurify.pruning import prune
from fastpurify import selection as S

from .stubs import pruning_subject

pytestmark = pytest.mark.usefixtures("torch_backend")


def test_error_concentration_counts_the_wrong_predictions_only():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    predictions = torch.tensor([0, 3, 3, 3, 1, 5])  # wrong: 3, 3, 1 (the 3 of image 3 is right)
    assert S.error_concentration(predictions, labels) == (0.5, 2 / 3, 3)
    assert S.error_concentration(labels.clone(), labels) == (0.0, 0.0, None)
    assert S.error_histogram(predictions, labels, 6) == (0.5, (0, 1, 0, 2, 0, 0))
    point = S.SelectionPoint(0, 1.0, 0.5, (0, 1, 0, 2, 0, 0), 3, 2 / 3)
    assert S.share_of(point, 3) == 2 / 3 and S.share_of(point, 0) == 0.0


_subject = pruning_subject


@pytest.mark.parametrize("probe", S.PROBES)
def test_probe_prunes_what_prune_prunes_and_leaves_the_model(probe):
    model, masks, images, labels = _subject()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe_ = S.PruningProbe(model, masks, images, labels, probe=probe, eps=S.DEFAULT_EPS[probe], steps=2,
                            batch_size=10, target=labels[0].item() if probe == "patch" else None)
    for k in (0, 3, 9):
        probe_.prune_to(k)
        with torch.no_grad():
            assert torch.equal(probe_.net(images), prune(model, masks, number=k).eval()(images))
        point = probe_.point()
        assert point.pruned == k and 0 <= point.concentration <= 1 and 0 <= point.adv_error <= 1
        if probe == "patch":  # the share of the images not of the target sent there
            assert 0 <= point.target_share <= 1 and sum(point.histogram) <= (labels != labels[0]).sum()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(InputError, match="only grows"):
        probe_.prune_to(2)


def test_the_input_adversary_flips_more_than_the_clean_model_errs():
    model, masks, images, labels = _subject()
    point = S.PruningProbe(model, masks, images, labels, probe="inputs", eps=32 / 255, steps=5, batch_size=24).point()
    assert point.adv_error > 1 - point.acc - 1e-9


class _CornerModel(torch.nn.Module):
    """Logits of 8x8 one-channel images: class 3 scores 40 times the top-left pixel above 0.5 (a
    one-pixel backdoor; ``backdoor=False``: 40 times the image's mean above 0.5, which no single
    pixel can carry); the others a fixed random linear map of the image."""

    def __init__(self, backdoor=True):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = torch.nn.Parameter(torch.randn(10, 64, generator=g) * 0.3)
        self.backdoor = backdoor

    def forward(self, x):
        logits = x.flatten(1) @ self.weight.t()
        logits = logits.clone()
        logits[:, 3] = 40 * ((x[:, 0, 0, 0] if self.backdoor else x.mean(dim=(1, 2, 3))) - 0.5)
        return logits


def test_reconstruct_patch_finds_a_one_pixel_trigger_and_keeps_to_its_area():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=g) * 0.5  # the corner stays below 0.5: class 3 never wins alone
    for area, pixels in ((1 / 64, 1), (0.05, 3)):
        model = _CornerModel().eval()
        mask, pattern = S.reconstruct_patch(model, images, 3, area=area, steps=60, batch_size=16)
        assert mask.shape == (1, 1, 8, 8) and int(mask.sum()) == pixels and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert mask[0, 0, 0, 0] == 1 and pattern[0, 0, 0, 0] > 0.9  # the trigger's pixel, bright
        assert pattern.min() >= 0 and pattern.max() <= 1
        sent = predict(model, (1 - mask) * images + mask * pattern)
        assert (sent == 3).float().mean() == 1.0
    clean = _CornerModel(backdoor=False).eval()  # no pixel carries the images to class 3
    mask, pattern = S.reconstruct_patch(clean, images, 3, area=1 / 64, steps=60, batch_size=16)
    assert (predict(clean, (1 - mask) * images + mask * pattern) == 3).sum() == 0


def _scripted(monkeypatch, curve):
    """Replace the adversary by a scripted curve {k: (clean acc, histogram of the adversarial labels)}."""
    def point(self):
        acc, hist = curve[self.pruned]
        top = max(range(len(hist)), key=hist.__getitem__)
        return S.SelectionPoint(self.pruned, acc, 1.0, tuple(hist), top, hist[top] / sum(hist))
    monkeypatch.setattr(S.PruningProbe, "point", point)


def _choose(**kw):
    """choose_pruning on the small subject; the input adversary's walk unless ``probe`` is given."""
    kw.setdefault("probe", "inputs")
    model, masks, images, labels = _subject()  # 48 neurons: candidates 0, 1, ..., 24 at max_fraction 0.5
    assert sum(m.numel() for m in masks.values()) == 48
    return S.choose_pruning(model, masks, images, labels, candidates=24, **kw)


def _pull(share):
    """A histogram of 100 adversarial labels: ``share`` of them on class 2, the rest spread."""
    on = round(100 * share)
    rest = 100 - on
    return [rest // 9 + (i < rest % 9) if i != 2 else 0 for i in range(10)][:2] + [on] + \
        [rest // 9 + (i < rest % 9) for i in range(2, 9)]


def test_auto_prunes_where_the_pull_to_the_suspected_target_ends_plus_the_margin(monkeypatch):
    shares = [0.8, 0.7, 0.5, 0.3, 0.2, 0.1, 0.04, 0.03, 0.0] + [0.0] * 16
    _scripted(monkeypatch, {k: (0.9 - 0.001 * k, _pull(s)) for k, s in enumerate(shares)})
    choice = _choose()
    assert choice.target == 2
    assert [round(p.target_share, 2) for p in choice.points[:7]] == [0.8, 0.7, 0.5, 0.3, 0.2, 0.1, 0.04]
    assert choice.pruned == 8 and "fell to 0.04 (<= 0.05) at 6 neurons" in choice.reason  # ceil(6 * 1.25) = 8
    assert [p.pruned for p in choice.points] == list(range(9))  # the walk stops once the choice is made


def test_auto_prunes_nothing_without_a_sign_of_a_backdoor(monkeypatch):
    _scripted(monkeypatch, {k: (0.9, _pull(0.3)) for k in range(25)})
    choice = _choose()
    assert choice.pruned == 0 and "no sign of a backdoor" in choice.reason and len(choice.points) == 1


def test_auto_stops_at_the_accuracy_budget_and_falls_back(monkeypatch):
    curve = {k: (0.9 if k < 6 else 0.7, _pull(0.8 - 0.1 * k)) for k in range(25)}
    _scripted(monkeypatch, curve)
    choice = _choose(max_acc_drop=0.1)
    assert [p.pruned for p in choice.points] == list(range(7))  # k = 6 breaks the budget: the walk stops
    assert choice.pruned == 5 and "the lowest, 0.30" in choice.reason  # 0.3 <= half of 0.8
    _scripted(monkeypatch, {k: (0.9 if k < 3 else 0.7, _pull(0.8 - 0.1 * k)) for k in range(25)})
    choice = _choose(max_acc_drop=0.1)
    assert choice.pruned == 0 and "halves the share" in choice.reason  # 0.6 at best: not half of 0.8


# digits BadNets s1's walk (docs/anp-selection.md, eleventh round), one candidate a neuron: the patch's share dips to
# 0.00 at 4 neurons (true ASR 13.5 %), comes back at 5-9 with the backdoor, then stays under the bar from 10 on
DIP = [1.0, 1.0, 0.35, 0.33, 0.0, 0.14, 0.17, 0.14, 0.11, 0.08, 0.03, 0.03, 0.02, 0.02, 0.01] + [0.02] * 10


def test_hold_stops_only_where_the_share_stays_under_the_bar(monkeypatch):
    _scripted(monkeypatch, {k: (0.9, _pull(s)) for k, s in enumerate(DIP)})
    plain = _choose()
    assert plain.pruned == 5 and "fell to 0.00 (<= 0.05) at 4 neurons;" in plain.reason  # ceil(4 * 1.25)
    assert plain.settings["hold"] == 0
    held = _choose(hold=1)
    assert held.pruned == 13 and held.settings["hold"] == 1  # 10 and 11 under the bar: ceil(10 * 1.25)
    assert "fell to 0.03 (<= 0.05) at 10 neurons and stayed there over the next 1 candidate;" in held.reason
    assert [p.pruned for p in held.points] == list(range(14))  # looked one past 4 and 10, stopped at the goal
    two = _choose(hold=2)  # 10, 11, 12 under the bar
    assert two.pruned == 13 and "over the next 2 candidates" in two.reason
    # where the margin walks past the look-ahead anyway, the hold costs no candidate and changes nothing
    _scripted(monkeypatch, {k: (0.9, _pull(0.8 if k < 3 else 0.0)) for k in range(25)})
    assert _choose(hold=1).pruned == _choose().pruned == 4 and len(_choose(hold=1).points) == 5


def test_hold_may_look_past_the_accuracy_budget_but_not_stop_there(monkeypatch):
    # under the bar from 6 on; from 7 on the clean accuracy is out of the budget: 7 confirms 6, which is chosen
    _scripted(monkeypatch, {k: (0.9 if k < 7 else 0.7, _pull(0.8 if k < 6 else 0.0)) for k in range(25)})
    choice = _choose(hold=1)
    assert choice.pruned == 6 and "at 6 neurons and stayed there" in choice.reason
    # the share dips at 6 only: 7 refutes it, and the fallback takes the lowest *held* share (0.3 at 5)
    shares = [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.0, 0.5]
    _scripted(monkeypatch, {k: (0.9 if k < 7 else 0.7, _pull(shares[min(k, 7)])) for k in range(25)})
    assert _choose().pruned == 6  # the plain rule stops on the dip (its goal, 8, lies out of the budget)
    choice = _choose(hold=1)
    assert choice.pruned == 5 and "the lowest held, 0.30" in choice.reason and "keeps it there" in choice.reason


@pytest.mark.parametrize("hold", [-1, 11, 1.5, True, "1"])
def test_a_bad_hold_is_refused(hold):
    with pytest.raises(InputError, match="hold must be a whole number of candidates from 0 to 10"):
        _choose(hold=hold)


def _scripted_probes(monkeypatch, pull, patch, others=None):
    """The input adversary's pull {k: share on class 2} and the patch's {k: share sent to class 2};
    ``others``: the share a patch toward any other class sends there (None: none is asked for)."""
    def point(self):
        if self.probe == "patch":
            assert self.target == 2 or others is not None
            sent = patch[self.pruned] if self.target == 2 else others
            hist = [0] * 10
            hist[self.target] = round(100 * sent)
            return S.SelectionPoint(self.pruned, 0.9, sent, tuple(hist), self.target, 1.0, sent)
        hist = _pull(pull[self.pruned])
        top = max(range(len(hist)), key=hist.__getitem__)
        return S.SelectionPoint(self.pruned, 0.9, 1.0, tuple(hist), top, hist[top] / sum(hist))
    monkeypatch.setattr(S.PruningProbe, "point", point)


def test_the_patch_walk_takes_the_target_from_the_input_adversary_and_prunes_where_the_patch_fails(monkeypatch):
    # the per-image pull ends after 2 neurons, the reconstructed trigger works until 9
    _scripted_probes(monkeypatch, {k: 0.8 if k < 2 else 0.0 for k in range(25)},
                     {k: 1.0 if k < 10 else 0.02 for k in range(25)})
    choice = _choose(probe="patch")
    assert choice.target == 2 and choice.suspicion.concentration == 0.8 and choice.settings["walk"] == "patch"
    assert choice.pruned == 13 and "fell to 0.02 (<= 0.05) at 10 neurons" in choice.reason  # ceil(10 * 1.25)
    assert "trigger reconstructed toward class 2" in choice.reason
    assert choice.settings["eps"] == S.DEFAULT_EPS["patch"] and choice.settings["steps"] == S.DEFAULT_STEPS["patch"]
    assert choice.as_dict()["suspicion"]["concentration"] == 0.8
    assert _choose(probe="inputs").pruned == 3  # the input adversary alone: ceil(2 * 1.25)


def test_the_patch_walk_falls_back_to_the_pull_when_no_patch_carries_the_backdoor(monkeypatch):
    _scripted_probes(monkeypatch, {k: 0.8 if k < 4 else 0.0 for k in range(25)}, {k: 0.1 for k in range(25)})
    choice = _choose(probe="patch")
    assert choice.settings["walk"] == "inputs" and choice.pruned == 5
    assert "sends only 0.10 of the other images to class 2" in choice.reason


def test_the_patch_scan_names_the_target_where_the_pull_is_too_weak(monkeypatch):
    """The per-image adversary's pull (0.3) is under min_suspicion, as on CIFAR-10 BadNets subjects
    (0.32 on an H200's ResNet-18, 0.36 on the CPU's wide CNN): a patch toward every class finds
    the one it reaches far better than the others."""
    _scripted_probes(monkeypatch, {k: 0.3 for k in range(25)}, {k: 1.0 if k < 10 else 0.02 for k in range(25)},
                     others=0.2)
    choice = _choose(probe="patch")
    assert choice.target == 2 and choice.settings["suspected_by"] == "patch scan"
    assert choice.settings["class_shares"] == [0.2, 0.2, 1.0] + [0.2] * 7
    assert choice.suspicion.target_share == 1.0 and choice.settings["walk"] == "patch"
    assert choice.pruned == 13 and "fell to 0.02 (<= 0.05) at 10 neurons" in choice.reason
    assert "but a patch of 0.01 of the pixels sends at most 1.00 of the other images to class 2 (next 0.20)" \
        in choice.reason
    # a strong pull names the target without a scan
    _scripted_probes(monkeypatch, {k: 0.8 for k in range(25)}, {k: 1.0 if k < 10 else 0.02 for k in range(25)})
    choice = _choose(probe="patch")
    assert choice.settings["suspected_by"] == "inputs" and "class_shares" not in choice.settings


@pytest.mark.parametrize("target_share, others", [(0.5, 0.3), (0.3, 0.0), (0.1, 0.1)])
def test_nothing_is_pruned_when_no_class_stands_out_of_the_scan(monkeypatch, target_share, others):
    _scripted_probes(monkeypatch, {k: 0.3 for k in range(25)}, {k: target_share for k in range(25)}, others=others)
    choice = _choose(probe="patch")  # 0.5 < 2 x 0.3; 0.3 < min_suspicion; nothing above 0.1
    assert choice.pruned == 0 and "no class stands out" in choice.reason and len(choice.points) == 1
    assert len(choice.settings["class_shares"]) == 10
    _scripted_probes(monkeypatch, {k: 0.3 for k in range(25)}, {k: 1.0 for k in range(25)})
    choice = _choose(probe="inputs")  # only the patch probe scans
    assert choice.pruned == 0 and "no sign of a backdoor" in choice.reason and "class_shares" not in choice.settings


def test_patch_outlier():
    assert S.patch_outlier([0.0, 1.0, 0.25, 0.03], 0.4) == 1
    assert S.patch_outlier([0.0, 0.45, 0.25], 0.4) is None  # not twice the next
    assert S.patch_outlier([0.0, 0.35, 0.0], 0.4) is None  # under min_suspicion
    assert S.patch_outlier([0.9], 0.4) == 0 and S.patch_outlier([], 0.4) is None
    # nearly every image to one class and no other class's patch as far: named despite a strong second
    # (CIFAR-10 BadNets s2: 1.00 to the target, 0.52 to class 2; docs/anp-selection.md)
    assert S.patch_outlier([1.0, 0.19, 0.52, 0.02], 0.4) == 0
    assert S.patch_outlier([0.95, 0.91, 0.1], 0.4) is None  # two classes nearly total: neither stands out
    assert S.patch_outlier([0.89, 0.52, 0.1], 0.4) is None  # under the decisive share and not twice the next


def test_candidate_numbers():
    assert S.candidate_numbers(96, 0.5, 50) == list(range(49))
    assert S.candidate_numbers(4800, 0.2, 40) == list(range(0, 961, 24))


@pytest.mark.parametrize("kw, words", [(dict(probe="gradients"), "probe must be one of"), (dict(eps=0), "eps"),
                                       (dict(max_target_share=1.5), "max_target_share"),
                                       (dict(margin=-1), "margin"),
                                       (dict(steps=0), "steps"), (dict(max_fraction=0), "max_fraction"),
                                       (dict(probe="patch", eps=1.5), "share of the pixels")])
def test_bad_settings_are_refused(kw, words):
    with pytest.raises(InputError, match=words):
        _choose(**kw)
