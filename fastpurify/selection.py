"""How many neurons to prune, chosen without a trigger: where the backdoor stops answering an adversary.

A backdoored model's adversarial examples are mostly labelled as the attacker's target class (the
observation PBE builds on; ANP's Fig. 1b makes the same one for adversarial neuron perturbation),
a clean model's spread over the classes. So, on the defender's clean images and nothing else:

1. the **suspected target** t is the class most of the unpruned model's adversarial examples
   (untargeted L-inf PGD on each image, 32/255: nearly every image flips, so the statistic is
   where they go, not whether) land on. When fewer than ``min_suspicion`` of them do, the patch
   probe (below) scans every class in turn, as Neural Cleanse does, and names the class its patch
   sends at least ``min_suspicion`` of the other images to and ``SCAN_RATIO`` times as many as to
   any other class, or nearly all of them (``SCAN_DECISIVE``) where no other class's patch does
   (every clean control measured: at most 0.20 to any class); when none stands out (or the probe
   is not ``"patch"``), nothing points to a backdoor and nothing is pruned. (The per-image
   adversary's pull was 0.32-0.36 on CIFAR-10 BadNets subjects whose trigger a 1 % patch
   reproduces at 1.00: docs/anp-selection.md.)
2. for each candidate pruning (a growing prefix of the masks' ranking, smallest first) the probe
   measures what is left of the backdoor as ``target_share``;
3. the rule prunes the fewest neurons whose target share has fallen to ``max_target_share``,
   plus a ``margin`` (a fraction of that number) — the share reaches zero a little before the
   backdoor is fully gone (measured: docs/anp-selection.md) — among the prunings whose clean
   accuracy stays within ``max_acc_drop`` of the unpruned model's (with ``hold``, only where the share
   also stays there over the next candidates). When none gets there, the candidate with the lowest
   target share if it is below half the unpruned model's, else none.

The probe: ``"patch"`` (default), a trigger reconstructed toward t after each pruning (one mask
of ``eps`` of the pixels and one pattern shared by all images, as Neural Cleanse reconstructs
triggers); ``target_share`` is the share of the images not of class t that it sends to t. It is
closer to what a trigger is than a per-image perturbation, and keeps finding the backdoor where
the per-image adversary's pull has already ended (docs/anp-selection.md); where no small patch
sends ``min_suspicion`` of the images to t on the unpruned model, the walk follows the per-image
adversary instead, and the reason says so. ``"inputs"``: the per-image adversary of step 1 after
each pruning, ``target_share`` the share of its adversarial examples labelled t. ``"neurons"``:
one ANP perturbation of every remaining neuron shared by all images (kept for comparison: on
digits it drives clean and backdoored models alike onto one class, so it does not tell them
apart).

The walk's ranking is the masks' unless ``order="patch"`` (fastpurify's own, opt-in): then, once
a patch reaches the suspected target, it walks the order :mod:`fastpurify.patch_order` builds from
that reconstructed trigger under a clean-accuracy budget.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bn_statistics import Statistics, corrected_statistics, load_statistics, require_batch_norms
from .inference import model_device, predict
from .layers import convert
from .neuron_adversary import perturbed_predictions
from .neurons import layer_kind
from .patch_order import DEFAULT_ACC_BUDGET, PatchOrder, patch_order
from .patch_trigger import reconstruct_patch
from .pruning import _check_layers, prune, select_neurons
from .validation import (InputError, check_auto_or_fraction, check_fraction, check_hold, check_images,
                         check_labels, check_positive_int)


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
    """The ``auto`` rule's choice: ``pruned`` neurons, why, the suspected target, the curve, and
    the unpruned model's point under the adversary that named the target (``suspicion``: the
    curve's first point unless the probe is ``"patch"``); ``ranking`` the scores whose ascending
    order the walk pruned along (the masks unless ``order="patch"`` reordered them: ``order``)."""

    pruned: int
    reason: str
    target: int | None
    points: list[SelectionPoint]
    settings: dict
    suspicion: SelectionPoint | None = None
    ranking: dict[str, torch.Tensor] | None = None
    order: "PatchOrder | None" = None
    statistics: Statistics | None = None
    statistics_check: SelectionPoint | None = None

    def as_dict(self) -> dict:
        return {"pruned": self.pruned, "reason": self.reason, "target": self.target, "settings": self.settings,
                "suspicion": None if self.suspicion is None else asdict(self.suspicion),
                "order": None if self.order is None else self.order.as_dict(),
                "statistics": self.statistics_used,
                "statistics_check": None if self.statistics_check is None else asdict(self.statistics_check),
                "points": [asdict(p) for p in self.points]}

    @property
    def statistics_used(self) -> str | None:
        """``"corrected"`` or ``"stored"`` where the correction was checked (``correct_statistics``), else None."""
        return None if self.statistics_check is None else "corrected" if self.statistics is not None else "stored"

    def prune(self, model: nn.Module) -> nn.Module:
        """A pruned copy of ``model``: the chosen number of neurons along the ranking the walk used
        (``ranking``: the masks, or with ``order="patch"`` the reconstructed trigger's order), with
        the BatchNorm statistics corrected for the pruning where the choice kept them
        (``statistics``; ``correct_statistics=True``)."""
        pruned = prune(model, self.ranking, number=self.pruned)
        return pruned if self.statistics is None else load_statistics(pruned, self.statistics)


def error_histogram(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, tuple[int, ...]]:
    """(error rate, count of the wrong predictions per predicted class)."""
    wrong = predictions != labels
    counts = torch.bincount(predictions[wrong], minlength=num_classes)
    return int(wrong.sum()) / max(1, labels.numel()), tuple(int(c) for c in counts)


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


PROBES = ("inputs", "patch", "neurons")
DEFAULT_EPS = {"inputs": 32 / 255, "patch": 0.01, "neurons": 0.4}  # patch: the mask's share of the pixels
DEFAULT_STEPS = {"inputs": 10, "patch": 100, "neurons": 10}
SCAN_RATIO = 2.0  # a scanned class is the target when its patch share is this many times the next one's
SCAN_DECISIVE = 0.9  # ... or when its patch sends this share of the images there and no other class's does
ORDERS = ("masks", "patch")  # the ranking the walk prunes along: the masks', or the trigger-guided order
AREA_LADDER = (1, 2, 4, 8)  # order_area="auto": the areas tried, as multiples of the probe's eps (1 %: 1-8 %)
DEFAULT_AREA_READINGS = 5  # order_area="auto": the median of up to this many seeds' readings (stops at 3 agreeing)


class PruningProbe:
    """An eval-mode copy of a model whose neurons are pruned as a growing prefix of a ranking
    (scale 0, shift kept, as :func:`fastpurify.pruning.prune`), and the adversary's errors on a
    fixed set of clean images after each pruning.

    ``probe="inputs"``: untargeted L-inf PGD on each image (``steps`` steps of eps / 4 from a
    seeded random start) — the observation PBE builds on: a backdoored model's adversarial
    examples are mostly labelled as the target class. ``probe="neurons"``: one ANP perturbation of
    every remaining neuron (``m + delta``, ``1 + xi`` within ``eps``) shared by all images,
    ``steps`` sign steps of 2 * eps / steps from zero — ANP's Fig. 1b. ``probe="patch"``: a
    trigger toward ``target`` reconstructed on the images not of class ``target``
    (:func:`reconstruct_patch`, ``eps`` the mask's share of the pixels); the point's
    ``target_share`` is the share of those images it sends to ``target``."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                 *, probe: str, eps: float, steps: int, batch_size: int, seed: int = 0, target: int | None = None):
        _check_layers(model, masks)
        self._set_probe(probe, eps, steps, target)
        self.kinds = sorted({layer_kind(m) for n, m in model.named_modules() if n in masks})
        self.net = copy.deepcopy(model).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.device = model_device(self.net)
        self.layers = dict(self.net.named_modules())
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.batch_size, self.seed = batch_size, seed
        self.masks = masks
        self.num_neurons = sum(m.numel() for m in masks.values())
        self.pruned = 0

    def _set_probe(self, probe: str, eps: float, steps: int, target: int | None) -> None:
        if probe not in PROBES:
            raise InputError(f"probe must be one of {PROBES}, got {probe!r}")
        if probe == "patch" and target is None:
            raise InputError("the patch probe reconstructs a trigger toward a class: give its target")
        self.probe, self.eps, self.steps, self.target = probe, eps, steps, target

    def reseeded(self, seed: int) -> "PruningProbe":
        """This probe with another seed for its adversary's random draws (the model and images shared,
        as :meth:`under`)."""
        other = copy.copy(self)
        other.seed = seed
        return other

    def under(self, probe: str, *, eps: float, steps: int, target: int | None = None) -> "PruningProbe":
        """This probe's pruned copy and images (shared, not copied: prune one of the two only) under
        another adversary."""
        other = copy.copy(self)
        other._set_probe(probe, eps, steps, target)
        return other

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

    @torch.no_grad()
    def num_classes(self) -> int:
        """The model's number of outputs."""
        return int(self.net(self.images[:1]).shape[1])

    def point(self) -> SelectionPoint:
        """Clean accuracy of the current pruning, then the adversary's errors."""
        clean = self._predict(self.net, self.images)
        acc = float((clean == self.labels).float().mean())
        labels = self.labels
        if self.probe == "patch":
            labels = self.labels[self.labels != self.target]
            predictions = self._patch_probe()
        else:
            predictions = self._inputs_probe() if self.probe == "inputs" else self._neurons_probe()
        top_prediction = int(predictions.max()) if predictions.numel() else 0
        num_classes = max(int(clean.max()), top_prediction, int(self.labels.max()),
                          -1 if self.target is None else self.target) + 1
        error, counts = error_histogram(predictions, labels, num_classes)
        top, share = _top(counts)
        sent = None if self.probe != "patch" else counts[self.target] / max(1, labels.numel())
        return SelectionPoint(self.pruned, acc, error, counts, top, share, sent)

    def _inputs_probe(self) -> torch.Tensor:
        from .engines.pgd import pgd

        adversarial = pgd(self.net, self.images, self.labels, eps=self.eps, alpha=self.eps / 4, steps=self.steps,
                          seed=self.seed, batch_size=self.batch_size)
        return self._predict(self.net, adversarial)

    def _patch_probe(self) -> torch.Tensor:
        others = self.images[self.labels != self.target]
        if not others.shape[0]:
            return self.labels[:0]
        mask, pattern = reconstruct_patch(self.net, others, self.target, area=self.eps, steps=self.steps,
                                          batch_size=self.batch_size, seed=self.seed)
        return self._predict(self.net, (1 - mask) * others + mask * pattern)

    def _neurons_probe(self) -> torch.Tensor:
        return perturbed_predictions(convert(self.net, self.kinds).eval(), self.images, self.labels, eps=self.eps,
                                     steps=self.steps, batch_size=self.batch_size)


def scan_classes(probe: PruningProbe, *, eps: float, steps: int) -> list[SelectionPoint]:
    """The patch probe toward every class in turn on ``probe``'s model as pruned now (Neural
    Cleanse's outlier test, read as shares): one point per class, its ``target_share`` the share
    of the images not of that class a reconstructed patch sends there."""
    return [probe.under("patch", eps=eps, steps=steps, target=c).point() for c in range(probe.num_classes())]


def patch_outlier(shares: list[float], min_share: float, ratio: float = SCAN_RATIO,
                  decisive: float = SCAN_DECISIVE) -> int | None:
    """The class a small patch reaches far better than any other: its share at least ``min_share``
    and ``ratio`` times the next largest, or at least ``decisive`` (nearly every image) with the
    next below that; else None."""
    if not shares:
        return None
    top = max(range(len(shares)), key=shares.__getitem__)
    second = max((v for c, v in enumerate(shares) if c != top), default=0.0)
    if shares[top] >= decisive > second:
        return top
    return top if shares[top] >= min_share and shares[top] >= ratio * second else None


def area_ladder(eps: float) -> list[float]:
    """The patch sizes ``order_area="auto"`` may read: ``eps`` times ``AREA_LADDER``, within the image."""
    return [eps * f for f in AREA_LADDER if eps * f <= 1]


def read_patch_area(probe: PruningProbe, target: int, *, eps: float, steps: int, bar: float,
                    known: list[float] | None = None, progress: bool = False) -> tuple[float, list[dict]]:
    """The patch size read from the model (``order_area="auto"``): the largest area ``eps * f``, f in
    ``AREA_LADDER``, at which a patch reconstructed toward every class but ``target`` still sends fewer
    than ``bar`` of that class's other images there, on ``probe``'s model as pruned now. A larger patch
    answers the backdoor more like its trigger (a trigger larger than the patch outlives a small one),
    but past this size a patch draws clean features of other classes too, so it no longer tells the
    backdoor apart. The ladder stops at the first area some other class reaches (``eps`` itself when
    one does at ``eps``). ``known``: the shares toward every class at ``eps`` already measured (the
    scan's). Returns (area, the reading: per area tried, the largest share toward another class and
    which class). Cost: up to one patch reconstruction per other class and area tried."""
    area, reading = eps, []
    classes = [c for c in range(probe.num_classes()) if c != target]
    sizes = area_ladder(eps)
    meter = None
    if progress:
        from tqdm.auto import tqdm
        meter = tqdm(total=len(classes) * (len(sizes) - (known is not None)), desc="reading the patch size",
                     unit="patch")
    for size in sizes:
        worst, which = 0.0, None
        for c in classes:  # the first class over the bar ends the ladder: the others need not be tried
            if size == eps and known is not None:
                share = known[c]
            else:
                share = probe.under("patch", eps=size, steps=steps, target=c).point().target_share
                if meter is not None:
                    meter.update(1)
            if share > worst:
                worst, which = share, c
            if share >= bar:
                break
        reading.append(dict(area=size, max_other=round(worst, 4), max_other_class=which))
        if worst >= bar:
            break
        area = size
    if meter is not None:
        meter.close()
    return area, reading


def vote_patch_area(probe: PruningProbe, target: int, *, eps: float, steps: int, bar: float, readings: int = 1,
                    known: list[float] | None = None, progress: bool = False) -> tuple[float, list[dict]]:
    """:func:`read_patch_area` repeated with up to ``readings`` seeds of the patch reconstruction
    (``probe.seed``, ``probe.seed + 1``, ...): the median reading (for an even count the smaller of the
    two middle ones). One reconstruction's reading is a draw where a class's share sits near ``bar``
    (docs/anp-selection.md); the median of several is steadier. It stops as soon as one size has been
    read more than ``readings / 2`` times, which is then the median whatever the others read (three
    agreeing of five). ``known`` (the scan's shares, at ``probe.seed``) serves the first reading only.
    Returns (area, per reading: its seed, its area and its ``read_patch_area`` reading)."""
    check_positive_int(readings, "area_readings")
    areas, record = [], []
    for i in range(readings):
        reader = probe if i == 0 else probe.reseeded(probe.seed + i)
        area, reading = read_patch_area(reader, target, eps=eps, steps=steps, bar=bar, known=known if i == 0 else None,
                                        progress=progress)
        areas.append(area)
        record.append(dict(seed=reader.seed, area=area, reading=reading))
        if areas.count(area) > readings // 2:
            return area, record
    return sorted(areas)[(len(areas) - 1) // 2], record


def candidate_numbers(num_neurons: int, max_fraction: float, count: int) -> list[int]:
    """0 and up to ``count`` evenly spaced numbers of neurons up to ``max_fraction`` of them."""
    top = int(max_fraction * num_neurons)
    step = max(1, -(-top // count))
    return list(range(0, top + 1, step))


def choose_pruning(model: nn.Module, masks: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor, *,
                   max_target_share: float = 0.05, margin: float = 0.25, min_suspicion: float = 0.4,
                   max_acc_drop: float = 0.1, probe: str = "patch", eps: float | None = None, steps: int | None = None,
                   max_fraction: float = 0.5, candidates: int = 50, batch_size: int = 512, seed: int = 0,
                   order: str = "masks", order_budget: float = DEFAULT_ACC_BUDGET, order_area: float | str | None = None,
                   area_readings: int = DEFAULT_AREA_READINGS, correct_statistics: bool = False,
                   hold: int = 0, progress: bool = False) -> Selection:
    """The ``auto`` pruning rule on the defender's clean ``images`` (no trigger, no poisoned data;
    the module docstring says how). Candidates: 0 and up to ``candidates`` numbers of neurons up
    to ``max_fraction`` of them; the walk stops once the choice is made or the clean accuracy
    falls more than ``max_acc_drop`` (a fraction) below the unpruned model's. ``eps`` and ``steps``
    are the probe's (None: ``DEFAULT_EPS`` and ``DEFAULT_STEPS``); with ``probe="patch"`` the
    suspected target and the sign of a backdoor come from the ``"inputs"`` adversary at its
    defaults, or where its pull is under ``min_suspicion`` from a patch toward every class
    (``Selection.suspicion``; ``settings["suspected_by"]``, ``settings["class_shares"]``).

    ``order="patch"`` (fastpurify's own, opt-in): where the walk follows a patch toward the
    suspected target, it walks the order :func:`fastpurify.patch_order.patch_order` gives the
    masks' neurons (``order_budget`` its clean-accuracy budget; ``order_area`` its patch's share of
    the pixels, which the walk then measures with too; None: ``eps``; ``"auto"``: read from the model by
    :func:`read_patch_area`, the largest of 1-8 times ``eps`` at which no other class is reached by a patch
    as often as ``min_suspicion``, the median of up to ``area_readings`` reconstruction seeds
    (:func:`vote_patch_area`); ``settings["area_votes"]`` each reading, ``settings["area_reading"]``
    the first that read the size used) instead of the masks' ranking;
    ``Selection.ranking`` is the ranking walked, ``Selection.order`` the order and its curve.

    ``correct_statistics=True`` (fastpurify's own, opt-in): once the walk has chosen a pruning, the
    BatchNorm running statistics are corrected for it on the defender's images
    (:mod:`fastpurify.bn_statistics`), and the correction is kept only where the walk's own probe
    still passes on the corrected model (target share at most ``max_target_share``) and its clean
    accuracy is at least the uncorrected one's; the correction can bring the backdoor back (on
    digits it did), and then the check refuses it (``Selection.statistics``, ``statistics_check``).

    ``hold=h`` (fastpurify's own, opt-in): a candidate counts as the stop only where the share stays at most
    ``max_target_share`` over it and the ``h`` candidates after it (the walk looks that far ahead; those may lie
    past the accuracy budget, the stop itself may not); the fallback takes the lowest such held share. Along a
    walk the share can dip for one pruning and come back with the next, and the backdoor with it (digits BadNets
    s1: 0.00 at 4 neurons, true ASR 13.5 %, then 0.14-0.17; docs/anp-selection.md, eleventh round); 0 is the rule
    as it was."""
    for value, name in ((max_target_share, "max_target_share"), (min_suspicion, "min_suspicion"),
                        (max_acc_drop, "max_acc_drop")):
        check_fraction(value, name, low_open=False, high_open=False)
    check_fraction(max_fraction, "max_fraction", low_open=True, high_open=False)
    if not (isinstance(margin, (int, float)) and 0 <= margin <= 10):
        raise InputError(f"margin must be a number in [0, 10] (a fraction of the neurons found), got {margin!r}")
    if probe not in PROBES:
        raise InputError(f"probe must be one of {PROBES}, got {probe!r}")
    if order not in ORDERS:
        raise InputError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "patch" and probe != "patch":
        raise InputError(f"order='patch' orders the neurons by a reconstructed patch: it needs probe='patch', "
                         f"got {probe!r}")
    check_fraction(order_budget, "order_budget", low_open=False, high_open=False)
    if order_area is not None:
        check_auto_or_fraction(order_area, "order_area", "a share of the pixels")
    check_positive_int(area_readings, "area_readings")
    check_hold(hold, "hold")
    if correct_statistics:
        require_batch_norms(model, "correct_statistics")
    eps = DEFAULT_EPS[probe] if eps is None else eps
    steps = DEFAULT_STEPS[probe] if steps is None else steps
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise InputError(f"eps must be positive, got {eps}")
    if probe == "patch" and eps > 1:
        raise InputError(f"the patch probe's eps is the mask's share of the pixels, in (0, 1]; got {eps}")
    for value, name in ((steps, "steps"), (candidates, "candidates"), (batch_size, "batch_size")):
        check_positive_int(value, name)
    check_images(images)
    check_labels(labels, num_images=images.shape[0])
    settings = dict(rule="auto", probe=probe, max_target_share=max_target_share, margin=margin,
                    min_suspicion=min_suspicion, max_acc_drop=max_acc_drop, eps=eps, steps=steps,
                    max_fraction=max_fraction, candidates=candidates, seed=seed, images=int(labels.numel()),
                    order=order, order_area=order_area, area_readings=area_readings,
                    correct_statistics=correct_statistics, hold=hold)
    if probe == "patch":  # the suspicion comes from the input adversary at its defaults
        adversary = PruningProbe(model, masks, images, labels, probe="inputs", eps=DEFAULT_EPS["inputs"],
                                 steps=DEFAULT_STEPS["inputs"], batch_size=batch_size, seed=seed)
    else:
        adversary = PruningProbe(model, masks, images, labels, probe=probe, eps=eps, steps=steps,
                                 batch_size=batch_size, seed=seed)
    numbers = candidate_numbers(adversary.num_neurons, max_fraction, candidates)
    adversary.prune_to(0)
    suspicion = adversary.point()
    target = suspicion.top_class
    suspicion = _with_share(suspicion, target)
    settings["suspected_by"] = adversary.probe
    first, walk, note, patch_point = suspicion, adversary.probe, "", None
    if target is None or suspicion.concentration < min_suspicion:
        why = ("the adversary flips none of the clean images" if target is None else
               f"only {suspicion.concentration:.2f} of the unpruned model's adversarial examples land on one class "
               f"(< {min_suspicion})")
        if probe != "patch":
            return Selection(0, f"nothing pruned: {why}: no sign of a backdoor", target, [suspicion], settings,
                             suspicion, masks)
        # The pull of a per-image adversary can miss a backdoor a trigger-sized patch finds: try a
        # patch toward every class, and name the one it reaches far better than the others.
        scan = scan_classes(adversary, eps=eps, steps=steps)
        shares = [p.target_share for p in scan]
        settings["class_shares"] = [round(v, 4) for v in shares]
        named = patch_outlier(shares, min_suspicion)
        ranked = sorted(shares, reverse=True) + [0.0]

        def scanned(where: str) -> str:
            return (f"a patch of {eps:g} of the pixels sends at most {ranked[0]:.2f} of the other images to {where} "
                    f"(next {ranked[1]:.2f})")
        if named is None:
            return Selection(0, f"nothing pruned: {why}, and {scanned('one class')}: no class stands out "
                                f"(>= {min_suspicion} and {SCAN_RATIO:g}x the next, or >= {SCAN_DECISIVE:g} alone): "
                                "no sign of a backdoor", target,
                             [suspicion], settings, suspicion, masks)
        target, patch_point = named, scan[named]
        suspicion, settings["suspected_by"] = patch_point, "patch scan"
        note = f"{why}, but {scanned(f'class {named}')}; "
    if probe == "patch":
        patch = adversary.under(probe, eps=eps, steps=steps, target=target)
        point = patch.point() if patch_point is None else patch_point
        if point.target_share >= min_suspicion:
            adversary, first, walk = patch, point, probe
        else:  # the backdoor does not answer a small patch (a blended or warping trigger): follow the pull
            note = (f"a patch of {eps:g} of the pixels sends only {point.target_share:.2f} of the other images to "
                    f"class {target} (< {min_suspicion}), so the walk follows the input adversary; ")
    settings["walk"] = walk
    ranking, ordered = masks, None
    if order == "patch" and walk == "patch":
        area = eps if order_area is None else order_area
        if area == "auto":
            area, readings = vote_patch_area(adversary, target, eps=eps, steps=steps, bar=min_suspicion,
                                             readings=area_readings, known=settings.get("class_shares"),
                                             progress=progress)
            settings["area_votes"] = readings
            settings["area_reading"] = next(r["reading"] for r in readings if r["area"] == area)
            read = ", ".join(f"{r['area']:g}" for r in readings)
            note += (f"the patch size read from the model: {area:g} of the pixels (the largest of "
                     f"{', '.join(f'{size:g}' for size in area_ladder(eps))} at which no other class's patch "
                     f"reaches {min_suspicion}"
                     + (f"; the patch reconstruction's seeds {readings[0]['seed']}-{readings[-1]['seed']} read {read}: "
                        f"their median, of up to {area_readings} seeds, stopping where more than half agree"
                        if len(readings) > 1 else "") + "); ")
            settings["order_area_read"] = area
        ordered = patch_order(model, masks, images, labels, target, acc_budget=order_budget, area=area, steps=steps,
                              stop_share=max_target_share, max_neurons=max(1, numbers[-1]), batch_size=batch_size,
                              seed=seed, progress=progress)
        ranking = ordered.ranking(masks)
        if area != eps:  # the walk measures with the order's patch
            adversary = adversary.under("patch", eps=area, steps=steps, target=target)
            first = adversary.point()
        adversary.masks = ranking  # nothing pruned yet: the walk prunes along the order from here
        note += (f"the neurons ordered by a reconstructed trigger of {area:g} of the pixels ({len(ordered.neurons)} "
                 f"ordered: {ordered.stopped}); ")
    elif order == "patch":
        note += "no patch to order the neurons by, so the masks' ranking; "
    points = [first]
    pull = note + (f"the trigger reconstructed toward class {target} (sending {first.target_share:.2f} of the other "
                   f"images there unpruned)" if walk == "patch" else
                   f"the adversary's pull to class {target} ({first.concentration:.2f} of its examples unpruned)")
    floor = first.acc - max_acc_drop - 1e-9
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(numbers), initial=1, desc="choosing the pruning", unit="candidate")
    found = goal = None
    for k in numbers[1:]:
        adversary.prune_to(k)
        point = adversary.point()
        points.append(point if walk == "patch" else _with_share(point, target))
        if bar is not None:
            bar.update(1)
        i = len(points) - 1 - hold  # the candidate whose look-ahead is now complete
        if found is None and i >= 1 and points[i].acc >= floor and _held_share(points, i, hold) <= max_target_share:
            found, goal = points[i], math.ceil(points[i].pruned * (1 + margin))
        if points[-1].acc < floor:
            break
        if found is not None and k >= goal:
            break
    if bar is not None:
        bar.close()
    within = [p for p in points if p.acc >= floor]
    ahead = f" over the next {hold} candidate{'s' if hold > 1 else ''}" if hold else ""
    if found is not None:
        best = [p for p in within if p.pruned <= max(goal, found.pruned)][-1]
        reason = (f"{pull} fell to {found.target_share:.2f} (<= {max_target_share}) at {found.pruned} neurons"
                  f"{' and stayed there' + ahead if hold else ''}; "
                  f"with the margin {margin:g}: {best.pruned} neurons, clean accuracy {best.acc:.3f} "
                  f"(unpruned {first.acc:.3f})")
        chosen = Selection(best.pruned, reason, target, points, settings, suspicion, ranking, ordered)
        return _correct_statistics(chosen, model, adversary, best, max_target_share) if correct_statistics else chosen
    shares = {p.pruned: _held_share(points, i, hold) for i, p in enumerate(points)}
    lowest = min(within, key=lambda p: (shares[p.pruned], p.pruned))
    if shares[lowest.pruned] <= first.target_share / 2:
        reason = note + (f"no pruning within the accuracy budget ({max_acc_drop}) brings the share of class "
                         f"{target} to {max_target_share}{' and keeps it there' + ahead if hold else ''}; "
                         f"the lowest{' held' if hold else ''}, {shares[lowest.pruned]:.2f} (unpruned "
                         f"{first.target_share:.2f}), at {lowest.pruned} neurons")
        chosen = Selection(lowest.pruned, reason, target, points, settings, suspicion, ranking, ordered)
        return (_correct_statistics(chosen, model, adversary, lowest, max_target_share) if correct_statistics
                and lowest.pruned else chosen)
    reason = "nothing pruned: " + note + (f"no pruning within the accuracy budget ({max_acc_drop}) halves the share "
                                          f"of class {target} ({first.target_share:.2f} unpruned, "
                                          f"{shares[lowest.pruned]:.2f} at best{', held' + ahead if hold else ''})")
    return Selection(0, reason, target, points, settings, suspicion, ranking, ordered)


def _correct_statistics(chosen: Selection, model: nn.Module, walked: PruningProbe, point: SelectionPoint,
                        max_target_share: float) -> Selection:
    """``chosen`` with the BatchNorm statistics corrected for its pruning where the walk's probe
    (``walked``: its adversary, patch size and target) still passes on the corrected model and the
    clean accuracy does not fall; otherwise ``chosen`` as it was, the check recorded either way."""
    check = PruningProbe(model, chosen.ranking, walked.images, walked.labels, probe=walked.probe, eps=walked.eps,
                         steps=walked.steps, batch_size=walked.batch_size, seed=walked.seed,
                         target=walked.target if walked.probe == "patch" else None)
    check.prune_to(chosen.pruned)
    statistics = corrected_statistics(model, check.net, check.images, check.batch_size)
    load_statistics(check.net, statistics)
    corrected = check.point()
    if walked.probe != "patch":
        corrected = _with_share(corrected, chosen.target)
    chosen.statistics_check = corrected
    probe = "the patch" if walked.probe == "patch" else "the adversary"
    sent = f"{corrected.target_share:.2f} of the other images to class {chosen.target}"
    if corrected.target_share <= max_target_share and corrected.acc >= point.acc:
        chosen.statistics = statistics
        chosen.reason += (f"; the BatchNorm statistics corrected for the pruning ({probe} still sends only {sent}, "
                          f"<= {max_target_share}; clean accuracy {corrected.acc:.3f})")
    else:
        why = (f"{probe} would send {sent} (> {max_target_share})" if corrected.target_share > max_target_share else
               f"the clean accuracy would be {corrected.acc:.3f}, not above {point.acc:.3f}")
        chosen.reason += f"; the BatchNorm statistics left as stored (corrected for the pruning, {why})"
    return chosen


def _held_share(points: list[SelectionPoint], index: int, hold: int) -> float:
    """The largest target share over ``points[index]`` and the ``hold`` points after it that the walk measured."""
    return max(p.target_share for p in points[index:index + hold + 1])


def _with_share(point: SelectionPoint, target: int | None) -> SelectionPoint:
    share = None if target is None else share_of(point, target)
    return SelectionPoint(point.pruned, point.acc, point.adv_error, point.histogram, point.top_class,
                          point.concentration, share)
