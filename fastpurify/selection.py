"""How many neurons to prune, chosen without a trigger: where the adversary's pull to one class ends.

A backdoored model's adversarial examples are mostly labelled as the attacker's target class (the
observation PBE builds on; ANP's Fig. 1b makes the same one for adversarial neuron perturbation),
a clean model's spread over the classes. So, on the defender's clean images and nothing else:

1. the **suspected target** t is the class most of the unpruned model's adversarial examples
   land on; when fewer than ``min_suspicion`` of them do, nothing points to a backdoor and
   nothing is pruned;
2. for each candidate pruning (a growing prefix of the masks' ranking, smallest first) the
   adversary attacks the pruned model again, and ``target_share`` is the share of its
   adversarial examples labelled t;
3. the rule prunes the fewest neurons whose target share has fallen to ``max_target_share``,
   plus a ``margin`` (a fraction of that number) — the share reaches zero a little before the
   backdoor is fully gone (measured: docs/anp-selection.md) — among the prunings whose clean
   accuracy stays within ``max_acc_drop`` of the unpruned model's. When none gets there, the
   candidate with the lowest target share if it is below half the unpruned model's, else none.

The adversary (``probe``): ``"inputs"`` (default), untargeted L-inf PGD on each image, large
enough (32/255) that nearly every image is flipped, so the statistic is where the examples go,
not whether; ``"neurons"``, one ANP perturbation of every remaining neuron shared by all images
(kept for comparison: on digits it drives clean and backdoored models alike onto one class, so
it does not tell them apart; measured in docs/anp-selection.md).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as FP
from .arena import NeuronArena
from .inference import model_device, predict
from .layers import convert
from .neurons import layer_kind
from .pruning import _check_layers, select_neurons
from .validation import InputError, check_fraction, check_images, check_labels, check_positive_int


@dataclass(frozen=True)
class SelectionPoint:
    """One candidate pruning: ``pruned`` neurons, the clean accuracy, and under the adversary the
    error rate, the count of its wrong labels per class (``histogram``), the most frequent one
    (``top_class``) and its share (``concentration``), and the share of the suspected target."""

    pruned: int
    acc: float
    adv_error: float
    histogram: tuple[int, ...]
    top_class: int | None
    concentration: float
    target_share: float | None = None


@dataclass
class Selection:
    """The ``auto`` rule's choice: ``pruned`` neurons, why, the suspected target, and the curve."""

    pruned: int
    reason: str
    target: int | None
    points: list[SelectionPoint]
    settings: dict

    def as_dict(self) -> dict:
        return {"pruned": self.pruned, "reason": self.reason, "target": self.target, "settings": self.settings,
                "points": [asdict(p) for p in self.points]}


def error_histogram(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, tuple[int, ...]]:
    """(error rate, count of the wrong predictions per predicted class)."""
    wrong = predictions != labels
    counts = torch.bincount(predictions[wrong], minlength=num_classes)
    return int(wrong.sum()) / labels.numel(), tuple(int(c) for c in counts)


def error_concentration(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int | None]:
    """(error rate, share of the errors on the most frequent wrong class, that class)."""
    error, counts = error_histogram(predictions, labels, int(max(predictions.max(), labels.max())) + 1)
    top, share = _top(counts)
    return error, share, top


def _top(counts: tuple[int, ...]) -> tuple[int | None, float]:
    """The most frequent class of a histogram and its share (None, 0.0 for an empty one)."""
    total = sum(counts)
    if not total:
        return None, 0.0
    top = max(range(len(counts)), key=counts.__getitem__)
    return top, counts[top] / total


def share_of(point: SelectionPoint, target: int) -> float:
    """The share of the point's adversarial errors labelled ``target`` (0 without errors)."""
    total = sum(point.histogram)
    return point.histogram[target] / total if total and target < len(point.histogram) else 0.0


PROBES = ("inputs", "neurons")
DEFAULT_EPS = {"inputs": 32 / 255, "neurons": 0.4}


class PruningProbe:
    """An eval-mode copy of a model whose neurons are pruned as a growing prefix of a ranking
    (scale 0, shift kept, as :func:`fastpurify.pruning.prune`), and the adversary's errors on a
    fixed set of clean images after each pruning.

    ``probe="inputs"``: untargeted L-inf PGD on each image (``steps`` steps of eps / 4 from a
    seeded random start) — the observation PBE builds on: a backdoored model's adversarial
    examples are mostly labelled as the target class. ``probe="neurons"``: one ANP perturbation of
    every remaining neuron (``m + delta``, ``1 + xi`` within ``eps``) shared by all images,
    ``steps`` sign steps of 2 * eps / steps from zero — ANP's Fig. 1b."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                 *, probe: str, eps: float, steps: int, batch_size: int, seed: int = 0):
        _check_layers(model, masks)
        if probe not in PROBES:
            raise InputError(f"probe must be one of {PROBES}, got {probe!r}")
        self.kinds = sorted({layer_kind(m) for n, m in model.named_modules() if n in masks})
        self.net = copy.deepcopy(model).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.device = model_device(self.net)
        self.layers = dict(self.net.named_modules())
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.probe, self.eps, self.steps, self.batch_size, self.seed = probe, eps, steps, batch_size, seed
        self.masks = masks
        self.num_neurons = sum(m.numel() for m in masks.values())
        self.pruned = 0

    @torch.no_grad()
    def prune_to(self, k: int) -> None:
        """Prune the first ``k`` neurons of the ranking (``pruning.select_neurons(number=k)``)."""
        if k < self.pruned:
            raise InputError("prune_to only grows the pruning; make a new PruningProbe to prune fewer")
        for name, chosen in select_neurons(self.masks, number=k).items():
            weight = self.layers[name].weight
            weight[chosen.to(weight.device)] = 0.0
        self.pruned = k

    def _predict(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return predict(net, images, self.batch_size)

    def point(self) -> SelectionPoint:
        """Clean accuracy of the current pruning, then the adversary's errors."""
        clean = self._predict(self.net, self.images)
        acc = float((clean == self.labels).float().mean())
        predictions = self._inputs_probe() if self.probe == "inputs" else self._neurons_probe()
        num_classes = max(int(clean.max()), int(predictions.max()), int(self.labels.max())) + 1
        error, counts = error_histogram(predictions, self.labels, num_classes)
        top, share = _top(counts)
        return SelectionPoint(self.pruned, acc, error, counts, top, share)

    def _inputs_probe(self) -> torch.Tensor:
        from .engines.pgd import pgd

        adversarial = pgd(self.net, self.images, self.labels, eps=self.eps, alpha=self.eps / 4, steps=self.steps,
                          seed=self.seed, batch_size=self.batch_size)
        return self._predict(self.net, adversarial)

    def _neurons_probe(self) -> torch.Tensor:
        net = convert(self.net, self.kinds).eval()
        arena, n = NeuronArena(net), self.labels.numel()
        arena.set_mode("perturbed")
        for _ in range(self.steps):
            for s in range(0, n, self.batch_size):
                part = self.labels[s:s + self.batch_size]
                loss = F.cross_entropy(net(self.images[s:s + self.batch_size]), part, reduction="sum") / n
                arena.gather_noise_grad(loss, accumulate=s > 0)
            with torch.no_grad():
                FP.noise_sign_step_(arena.perturbation, arena.noise_grad.view(-1), 2 * self.eps / self.steps,
                                    self.eps, True)
        return self._predict(net, self.images)


def candidate_numbers(num_neurons: int, max_fraction: float, count: int) -> list[int]:
    """0 and up to ``count`` evenly spaced numbers of neurons up to ``max_fraction`` of them."""
    top = int(max_fraction * num_neurons)
    step = max(1, -(-top // count))
    return list(range(0, top + 1, step))


def choose_pruning(model: nn.Module, masks: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor, *,
                   max_target_share: float = 0.05, margin: float = 0.25, min_suspicion: float = 0.4,
                   max_acc_drop: float = 0.1, probe: str = "inputs", eps: float | None = None, steps: int = 10,
                   max_fraction: float = 0.5, candidates: int = 50, batch_size: int = 512, seed: int = 0,
                   progress: bool = False) -> Selection:
    """The ``auto`` pruning rule on the defender's clean ``images`` (no trigger, no poisoned data;
    the module docstring says how). Candidates: 0 and up to ``candidates`` numbers of neurons up
    to ``max_fraction`` of them; the walk stops once the choice is made or the clean accuracy
    falls more than ``max_acc_drop`` (a fraction) below the unpruned model's."""
    for value, name in ((max_target_share, "max_target_share"), (min_suspicion, "min_suspicion"),
                        (max_acc_drop, "max_acc_drop")):
        check_fraction(value, name, low_open=False, high_open=False)
    check_fraction(max_fraction, "max_fraction", low_open=True, high_open=False)
    if not (isinstance(margin, (int, float)) and 0 <= margin <= 10):
        raise InputError(f"margin must be a number in [0, 10] (a fraction of the neurons found), got {margin!r}")
    if probe not in PROBES:
        raise InputError(f"probe must be one of {PROBES}, got {probe!r}")
    eps = DEFAULT_EPS[probe] if eps is None else eps
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise InputError(f"eps must be positive, got {eps}")
    for value, name in ((steps, "steps"), (candidates, "candidates"), (batch_size, "batch_size")):
        check_positive_int(value, name)
    check_images(images)
    check_labels(labels, num_images=images.shape[0])
    settings = dict(rule="auto", probe=probe, max_target_share=max_target_share, margin=margin,
                    min_suspicion=min_suspicion, max_acc_drop=max_acc_drop, eps=eps, steps=steps,
                    max_fraction=max_fraction, candidates=candidates, seed=seed, images=int(labels.numel()))
    adversary = PruningProbe(model, masks, images, labels, probe=probe, eps=eps, steps=steps, batch_size=batch_size,
                             seed=seed)
    numbers = candidate_numbers(adversary.num_neurons, max_fraction, candidates)
    adversary.prune_to(0)
    first = adversary.point()
    target = first.top_class
    first = _with_share(first, target)
    points = [first]
    if target is None or first.concentration < min_suspicion:
        why = ("the adversary flips none of the clean images" if target is None else
               f"only {first.concentration:.2f} of the unpruned model's adversarial examples land on one class "
               f"(< {min_suspicion}): no sign of a backdoor")
        return Selection(0, f"nothing pruned: {why}", target, points, settings)
    floor = first.acc - max_acc_drop - 1e-9
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(numbers), initial=1, desc="choosing the pruning", unit="candidate")
    found = goal = None
    for k in numbers[1:]:
        adversary.prune_to(k)
        points.append(_with_share(adversary.point(), target))
        if bar is not None:
            bar.update(1)
        p = points[-1]
        if p.acc < floor:
            break
        if found is None and p.target_share <= max_target_share:
            found, goal = p, math.ceil(k * (1 + margin))
        if found is not None and k >= goal:
            break
    if bar is not None:
        bar.close()
    within = [p for p in points if p.acc >= floor]
    if found is not None:
        best = [p for p in within if p.pruned <= max(goal, found.pruned)][-1]
        reason = (f"the adversary's pull to class {target} ({first.concentration:.2f} of its examples unpruned) fell to "
                  f"{found.target_share:.2f} (<= {max_target_share}) at {found.pruned} neurons; with the margin "
                  f"{margin:g}: {best.pruned} neurons, clean accuracy {best.acc:.3f} (unpruned {first.acc:.3f})")
        return Selection(best.pruned, reason, target, points, settings)
    lowest = min(within, key=lambda p: (p.target_share, p.pruned))
    if lowest.target_share <= first.target_share / 2:
        reason = (f"no pruning within the accuracy budget ({max_acc_drop}) brings the share of class {target} to "
                  f"{max_target_share}; the lowest, {lowest.target_share:.2f} (unpruned {first.target_share:.2f}), "
                  f"at {lowest.pruned} neurons")
        return Selection(lowest.pruned, reason, target, points, settings)
    reason = (f"nothing pruned: no pruning within the accuracy budget ({max_acc_drop}) halves the share of class "
              f"{target} ({first.target_share:.2f} unpruned, {lowest.target_share:.2f} at best)")
    return Selection(0, reason, target, points, settings)


def _with_share(point: SelectionPoint, target: int | None) -> SelectionPoint:
    share = None if target is None else share_of(point, target)
    return SelectionPoint(point.pruned, point.acc, point.adv_error, point.histogram, point.top_class,
                          point.concentration, share)
