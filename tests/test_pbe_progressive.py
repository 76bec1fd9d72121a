"""PBE without clean data, end to end on CPU, on subjects where it is measured to work
(docs/pbe.md): 16x16 digits poisoned at 10 % (small BN CNNs of width 16), purified by
``fastpurify.pbe`` with its defaults (the authors' rounds; eps, crop padding and flips chosen
from the infected model: 8-20/255, 2 pixels, no flips here) on the poisoned training set.

- WaNet (40 epochs: the warp needs them to implant), the paper's random round 0, two rounds (5 %,
  then the cleanest-looking 20 %). Measured here (one thread): ASR 90.7 -> 0.0 %, ACC 97.8 ->
  98.6 %, eps 8/255. With the earlier fixed 6/255 over subject seeds 1 and 2 the random round 0
  gave 0.6 and 14.3 % (its round-1 extra set 7 % poisoned): the paper's round 0 is the less
  reliable one, which is why the assertions pin seed 0.
- Blend, BadNets and WaNet, ``initial="high-loss"`` (fastpurify's round 0, with its defaults lr
  1e-2 and the best-fitted 20 % kept out of every round), the four rounds of the paper's
  schedule. Measured here: Blend ASR 100 -> 0.0 % (ACC 99.2 -> 98.1), BadNets 100 -> 0.0 % (99.4
  -> 98.6), WaNet 90.7 -> 0.9 % (97.8 -> 98.9), about 16 s each. The random round 0 leaves Blend
  and BadNets in place on these subjects (ASR 100). WaNet's warped images are not the best-fitted
  ones, so keeping those out does not clean its later rounds (2 % poisoned in the last; AP 0.993
  after round 0, 0.987 after the last): the ranking only gets cleaner on Blend and BadNets.
- Another CPU (an AVX-512 Xeon, 2026-11-27) rounds the subjects' 15-40 epochs and the rounds
  differently, and the outcomes move: Blend ASR 100 -> 0.0 % but ACC 98.9 -> 91.4 (eps 11/255),
  BadNets 100 -> 0.0 % (99.4 -> 98.1), WaNet 86.6 -> 12.8 % (97.8 -> 96.1; its round 0 15.5 %
  poisoned, AP 0.93-0.94). The assertions hold what held on both: Blend and BadNets removed with
  no poisoned image after round 0, within 8 points of ACC; WaNet cut to at most 15 % ASR.
"""

import pytest

import fastpurify
from fastpurify.backdoor import BadNets, Blend, WaNet
from tests.digits_subjects import digits_subject

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_backend")]

ATTACKS = {"wanet": (WaNet, 40), "blend": (Blend, 15), "badnets": (BadNets, 15)}
_SUBJECTS = {}


def subject(name: str):
    """The width-16 digits subject of ``name``, trained once per module run."""
    if name not in _SUBJECTS:
        attack, epochs = ATTACKS[name]
        trained, test = digits_subject(attack(num_classes=10, target=0), width=16, epochs=epochs)
        assert trained.metrics["asr"] > 0.6 and trained.metrics["acc"] > 0.95, trained.metrics
        _SUBJECTS[name] = trained, test
    return _SUBJECTS[name]


def purify(name: str, **kw):
    trained, test = subject(name)
    poisoned = trained.poisoned
    _, report = fastpurify.pbe(trained.model, poisoned.tensors, poison_indices=poisoned.poison_indices,
                               test_data=test, attack=trained.attack, device="cpu", progress=False, **kw)
    before, last = report.before, report.rounds[-1]
    print(f"\nPBE without clean data ({name}, {kw}, {report.seconds:.0f} s, "
          f"eps {report.settings['eps'] * 255:.0f}/255): "
          f"ACC {before['acc']:.3f} -> {last.acc:.3f}, ASR {before['asr']:.3f} -> {last.asr:.3f}; AP per round "
          f"{[round(r.average_precision, 3) for r in report.rounds]}; poisoned share per round "
          f"{[round(r.poisoned_fraction, 3) for r in report.rounds]}")
    return report


def test_progressive_pbe_removes_wanet_from_digits_with_the_papers_round_0():
    report = purify("wanet", schedule=(0.05, 0.2))
    before, last = report.before, report.rounds[-1]
    assert last.asr <= 0.10 and last.acc >= before["acc"] - 0.03
    assert all(r.average_precision > 0.95 for r in report.rounds), "the rankings find the clean images"
    assert report.rounds[1].poisoned_fraction < 0.05, "round 1's extra set is cleaner than the training set"
    assert report.settings["rounds"][0] == dict(adv_epochs=10, clean_epochs=0, adv_batches=None)
    chosen = report.settings["calibration"]
    assert chosen["flip"]["value"] is False and report.settings["padding"] == 2, "digits: no flips, 2-pixel crops"
    assert chosen["eps"]["reached"] and report.settings["eps"] > 6 / 255, "6/255 makes too few adversarial digits"


@pytest.mark.parametrize("name", ["blend", "badnets", "wanet"])
def test_progressive_pbe_with_the_high_loss_round_0_removes_every_digits_backdoor(name):
    report = purify(name, initial="high-loss")
    before, last = report.before, report.rounds[-1]
    assert report.settings["lr"] == 1e-2 and report.settings["exclude_low_loss"] == 0.2
    assert last.acc >= before["acc"] - 0.08  # 1.1 to 7.5 points on the CPUs measured
    if name == "wanet":  # its warped images are not the best-fitted ones: the rounds stay partly poisoned
        assert last.asr <= 0.15 and all(r.average_precision > 0.9 for r in report.rounds)
        return
    # the trigger's shortcut makes the poisoned images the best-fitted ones: kept out of every round
    assert last.asr <= 0.05
    assert report.rounds[0].poisoned_fraction < 0.05, "round 0 drawn from the half the infected model fits least"
    assert all(r.average_precision > 0.95 for r in report.rounds)
    assert report.rounds[-1].average_precision >= report.rounds[0].average_precision, "the ranking gets cleaner"
    assert all(r.poisoned == 0 for r in report.rounds[1:]), "no poisoned image after round 0"
