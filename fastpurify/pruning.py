"""Prune neurons by their ANP masks; shared by the reference and the fast engines.

Pruning a neuron sets its scale to 0 and keeps its shift, as the official
``prune_neuron_cifar.py`` does and as the paper says ("we always keep the bias"): the BatchNorm,
LayerNorm or GroupNorm gamma of that channel or feature, or, for a Conv/Linear neuron (Eq. 3), the
weight row of that output channel (its bias stays).
Neurons are ranked globally, across layers, by ascending mask (a stable sort over the masks in
layer order, as the official script sorts the rows of ``mask_values.txt``), so every rule
prunes a prefix of that ranking:

- ``threshold=t``: every neuron with mask <= t (the official comparison), compared in float32;
- ``number=k``: the k smallest masks;
- ``fraction=f``: the ``int(f * total)`` smallest masks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backdoor import Attack
from .inference import predict_logits
from .masks import check_masks
from .neurons import layer_kind, num_neurons
from .validation import InputError, check_fraction, check_images, check_labels

# The official sweep: thresholds 0, 0.05, ..., 0.90 (--pruning-max 0.90 --pruning-step 0.05).
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(19))


def _ascending(masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """All masks as one float32 vector (layers in order) and its stable ascending order."""
    values = torch.cat([m.detach().float().cpu() for m in masks.values()])
    return values, torch.sort(values, stable=True).indices


def count_pruned(masks: dict[str, torch.Tensor], *, threshold: float | None = None, number: int | None = None,
                 fraction: float | None = None) -> int:
    """How many neurons a rule prunes (the length of its prefix of the global ranking)."""
    check_masks(masks)
    rules = {k: v for k, v in (("threshold", threshold), ("number", number), ("fraction", fraction)) if v is not None}
    if len(rules) != 1:
        raise InputError(f"give exactly one of threshold, number or fraction; got {sorted(rules) or 'none'}")
    values, _ = _ascending(masks)
    total = values.numel()
    if threshold is not None:
        check_fraction(threshold, "threshold", low_open=False, high_open=False)
        return int((values <= threshold).sum())
    if number is not None:
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= total:
            raise InputError(f"number must be an integer in [0, {total}] (the masks hold {total} neurons), "
                             f"got {number!r}")
        return number
    check_fraction(fraction, "fraction", low_open=False, high_open=False)
    return int(fraction * total)


def select_neurons(masks: dict[str, torch.Tensor], *, threshold: float | None = None, number: int | None = None,
                   fraction: float | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks per layer of the neurons a rule prunes."""
    k = count_pruned(masks, threshold=threshold, number=number, fraction=fraction)
    values, order = _ascending(masks)
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    chosen[order[:k]] = True
    return dict(zip(masks, chosen.split([m.numel() for m in masks.values()])))


def _check_layers(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    check_masks(masks)
    modules = dict(model.named_modules())
    for name, values in masks.items():
        layer = modules.get(name)
        if layer is None or layer_kind(layer) is None or getattr(layer, "weight", None) is None:
            raise InputError(f"the masks name layer {name!r}, which is not a BatchNorm, LayerNorm, GroupNorm, Conv or Linear "
                             "layer with a weight in this model; masks must come from this model's architecture")
        if num_neurons(layer) != values.numel():
            raise InputError(f"layer {name!r} has {num_neurons(layer)} neurons but its masks hold "
                             f"{values.numel()} scores")


def prune(model: nn.Module, masks: dict[str, torch.Tensor], *, threshold: float | None = None,
          number: int | None = None, fraction: float | None = None) -> nn.Module:
    """A pruned copy of ``model``: scale (gamma, or the weight row) = 0 for the neurons the rule
    selects, the shift and everything else kept. ``model`` is not modified."""
    _check_layers(model, masks)
    selected = select_neurons(masks, threshold=threshold, number=number, fraction=fraction)
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    with torch.no_grad():
        for name, chosen in selected.items():
            weight = modules[name].weight
            weight[chosen.to(weight.device)] = 0.0
    return pruned


@dataclass(frozen=True)
class SweepPoint:
    """One row of a pruning sweep. ``by`` and ``value`` are None for the unpruned model;
    ``last`` is the pruned neuron with the highest mask: (layer, index, mask)."""

    by: str | None
    value: float | None
    pruned: int
    acc: float
    loss: float
    asr: float | None = None
    poison_loss: float | None = None
    last: tuple[str, int, float] | None = None


def _loss_and_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       batch_size: int) -> tuple[float, float]:
    logits = predict_logits(model, images, batch_size)
    labels = labels.to(logits.device)
    return float(F.cross_entropy(logits, labels)), int((logits.argmax(1) == labels).sum()) / labels.numel()


def sweep(model: nn.Module, masks: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor, *,
          attack: Attack | None = None, thresholds: list[float] | None = None, numbers: list[int] | None = None,
          batch_size: int = 512) -> list[SweepPoint]:
    """Evaluate the unpruned model, then each pruning by threshold (default: the official
    0, 0.05, ..., 0.90) or by number: clean loss and ACC on ``images``, and with ``attack`` the
    poison loss and ASR on the triggered images that count (``attack.asr_eligible``) with the
    attacker's labels, as the official ``prune_neuron_cifar.py`` prints them."""
    if thresholds is not None and numbers is not None:
        raise InputError("sweep by thresholds or by numbers, not both")
    by, values = ("number", list(numbers)) if numbers is not None else (
        "threshold", list(DEFAULT_THRESHOLDS if thresholds is None else thresholds))
    if not values:
        raise InputError(f"give at least one {by} to sweep")
    _check_layers(model, masks)
    counts = [count_pruned(masks, **{by: v}) for v in values]
    check_images(images, unit_range=attack is not None)
    check_labels(labels, num_images=images.shape[0])
    poisoned = None
    if attack is not None:
        keep = attack.asr_eligible(labels)
        poisoned = attack.trigger(images[keep]), attack.target_labels(labels[keep])
    flat, order = _ascending(masks)
    neurons = [(name, i) for name, m in masks.items() for i in range(m.numel())]

    def point(net: nn.Module, by_: str | None, value: float | None, k: int) -> SweepPoint:
        loss, acc = _loss_and_accuracy(net, images, labels, batch_size)
        asr = poison_loss = None
        if poisoned is not None:
            poison_loss, asr = _loss_and_accuracy(net, *poisoned, batch_size)
        last = None
        if k > 0:
            j = int(order[k - 1])
            last = (*neurons[j], float(flat[j]))
        return SweepPoint(by_, value, k, acc, loss, asr, poison_loss, last)

    points = [point(model, None, None, 0)]
    for value, k in zip(values, counts):
        points.append(point(prune(model, masks, number=k), by, value, k))
    return points


def format_sweep(points: list[SweepPoint]) -> str:
    """The sweep as the official table: ``No. \\t Layer Name \\t Neuron Idx \\t Mask \\t PoisonLoss
    \\t PoisonACC \\t CleanLoss \\t CleanACC`` (No. = neurons pruned; Mask = the threshold, or the
    mask of the last neuron pruned by number)."""
    lines = ["No. \t Layer Name \t Neuron Idx \t Mask \t PoisonLoss \t PoisonACC \t CleanLoss \t CleanACC"]
    for p in points:
        layer, idx, mask = p.last if p.last is not None else ("None", "None", None)
        shown = p.value if p.by == "threshold" else mask
        shown = "None" if shown is None else f"{shown:.4f}"
        poison = "- \t -" if p.asr is None else f"{p.poison_loss:.4f} \t {p.asr:.4f}"
        lines.append(f"{p.pruned} \t {layer} \t {idx} \t {shown} \t {poison} \t {p.loss:.4f} \t {p.acc:.4f}")
    return "\n".join(lines) + "\n"


@dataclass
class PruneChoice:
    """The pruning the clean-data rule chose: the pruned copy, its sweep point, and the sweep
    (``points[0]`` is the unpruned model)."""

    model: nn.Module
    point: SweepPoint
    points: list[SweepPoint]

    @property
    def baseline(self) -> SweepPoint:
        return self.points[0]


def prune_by_clean_accuracy(model: nn.Module, masks: dict[str, torch.Tensor], images: torch.Tensor,
                            labels: torch.Tensor, *, max_drop: float = 0.02, thresholds: list[float] | None = None,
                            numbers: list[int] | None = None, batch_size: int = 512) -> PruneChoice:
    """Pick the pruning that needs no poisoned data: among the swept thresholds (or numbers),
    the one pruning the most neurons whose clean accuracy on the defender's own clean
    ``images`` is at most ``max_drop`` (a fraction, e.g. 0.02 = 2 points) below the unpruned
    model's. Nothing is pruned when no candidate qualifies."""
    check_fraction(max_drop, "max_drop", low_open=False, high_open=False)
    points = sweep(model, masks, images, labels, thresholds=thresholds, numbers=numbers, batch_size=batch_size)
    floor = points[0].acc - max_drop - 1e-9
    best = max((p for p in points if p.acc >= floor), key=lambda p: p.pruned)
    chosen = prune(model, masks, number=best.pruned) if best.pruned else copy.deepcopy(model)
    return PruneChoice(chosen, best, points)


__all__ = [
    "DEFAULT_THRESHOLDS", "PruneChoice", "SweepPoint", "count_pruned", "format_sweep", "prune",
    "prune_by_clean_accuracy", "select_neurons", "sweep",
]
