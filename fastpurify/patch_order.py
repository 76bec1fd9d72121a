"""fastpurify's own pruning order for the ``auto`` rule (opt-in, not the paper's): ANP's candidate
neurons ordered by what a trigger reconstructed toward the suspected target needs.

ANP ranks neurons by masks learned against an adversary that knows nothing of the target class.
At CPU scale that ranking reaches the backdoor late on some subjects: 11-18 of 96 neurons and
11-20 points of clean accuracy (docs/anp-selection.md). Once the ``auto`` rule has named a
suspected target t and a small patch reaches it, the defender can ask each candidate neuron
directly, still without a trigger or poisoned data:

1. a trigger toward t is reconstructed on the defender's images not of class t
   (:func:`fastpurify.patch_trigger.reconstruct_patch`, a patch of ``area`` of the pixels), again
   every ``refresh`` prunings so the order follows the backdoor rather than one patch;
2. each candidate not yet pruned is pruned in turn (scale 0, shift kept, as
   :func:`fastpurify.pruning.prune`), exactly, and measured: the patch's cross-entropy to t and the
   clean accuracy on the defender's images;
3. the next neuron is the candidate that raises the patch's loss most among those that keep the
   clean accuracy within ``acc_budget`` of the unpruned model's; the order ends where none does,
   where a freshly reconstructed patch sends at most ``stop_share`` of the images to t (the
   backdoor no longer answers), or after ``max_neurons``.

Candidates: the ``pool`` neurons with the lowest masks (``DEFAULT_POOL``, 512: every neuron of the
CPU-scale CNNs; None: all), so on a large network ANP still proposes and the reconstructed trigger
orders. (On the CPU-scale subjects the order's first picks sat at ANP ranks 0-95, so there the pool
is everything: docs/anp-selection.md.) The order is a ranking like the masks' own
(:meth:`PatchOrder.ranking`): the ordered neurons first, then every other neuron in the masks'
order, so every prefix rule prunes along it. Cost: one forward pass over the defender's images
per candidate and step, plus a patch reconstruction every ``refresh`` steps.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .inference import model_device, predict
from .patch_trigger import reconstruct_patch
from .pruning import _ascending, _check_layers
from .validation import InputError, check_fraction, check_images, check_labels, check_positive_int

DEFAULT_ACC_BUDGET = 0.06  # the order's own budget; the auto rule's walk keeps its own (max_acc_drop)
DEFAULT_REFRESH = 4
DEFAULT_POOL = 512  # candidates: every neuron of the CPU-scale CNNs (96-192), ANP's lowest ~10 % of a ResNet-18's 4,800


@dataclass
class PatchOrder:
    """The order: ``neurons`` (layer, channel) in pruning order, after each the defender's clean
    accuracy (``acc``) and the patch's target loss (``patch_loss``); ``acc0`` unpruned, ``stopped``
    why the order ends, ``shares`` (prunings, the share of the other images each fresh patch sends
    to the target), ``settings`` what it ran with."""

    neurons: list[tuple[str, int]]
    acc: list[float]
    patch_loss: list[float]
    acc0: float
    stopped: str
    shares: list[tuple[int, float]] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def ranking(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scores in [0, 1) whose ascending order is this order, then the masks' own for the rest
        (ANP's ranking where the order ends)."""
        names, sizes = list(masks), [m.numel() for m in masks.values()]
        offsets = dict(zip(names, torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()))
        first = [offsets[n] + c for n, c in self.neurons]
        _, ascending = _ascending(masks)
        taken = set(first)
        order = first + [i for i in ascending.tolist() if i not in taken]
        scores = torch.empty(len(order), dtype=torch.float64)
        scores[torch.tensor(order)] = torch.arange(len(order), dtype=torch.float64) / len(order)
        return {n: part.to(masks[n].dtype).clone() for n, part in zip(names, scores.split(sizes))}

    def as_dict(self) -> dict:
        out = asdict(self)
        out["neurons"] = [[n, c] for n, c in self.neurons]
        return out


def _scores(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, patched: torch.Tensor, target: int,
            batch_size: int) -> tuple[float, float]:
    """(clean accuracy, the patched images' mean cross-entropy to ``target``)."""
    correct = int((predict(net, images, batch_size) == labels).sum())
    loss = 0.0
    goal = torch.full((batch_size,), target, device=patched.device)
    for start in range(0, patched.shape[0], batch_size):
        logits = net(patched[start:start + batch_size]).float()
        loss += float(F.cross_entropy(logits, goal[:logits.shape[0]], reduction="sum"))
    return correct / images.shape[0], loss / max(1, patched.shape[0])


@torch.no_grad()
def patch_order(model: nn.Module, masks: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                target: int, *, acc_budget: float = DEFAULT_ACC_BUDGET, area: float = 0.01, steps: int = 100,
                refresh: int = DEFAULT_REFRESH, stop_share: float = 0.05, pool: int | None = DEFAULT_POOL,
                max_neurons: int | None = None,
                batch_size: int = 512, seed: int = 0, progress: bool = False) -> PatchOrder:
    """The order of the module docstring on the defender's clean ``images`` (in [0, 1]). ``model``
    is not modified (an eval-mode copy is pruned). ``max_neurons`` defaults to half the neurons."""
    _check_layers(model, masks)
    check_images(images)
    check_labels(labels, num_images=images.shape[0])
    check_fraction(acc_budget, "acc_budget", low_open=False, high_open=False)
    check_fraction(area, "area", low_open=True, high_open=False)
    check_fraction(stop_share, "stop_share", low_open=False, high_open=False)
    for value, name in ((steps, "steps"), (refresh, "refresh"), (batch_size, "batch_size")):
        check_positive_int(value, name)
    total = sum(m.numel() for m in masks.values())
    pool = total if pool is None else pool
    max_neurons = total // 2 if max_neurons is None else max_neurons
    for value, name in ((pool, "pool"), (max_neurons, "max_neurons")):
        check_positive_int(value, name)
    if not isinstance(target, int) or isinstance(target, bool) or target < 0:
        raise InputError(f"target must be a class index (an integer >= 0), got {target!r}")
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    device = model_device(net)
    images, labels = images.to(device), labels.to(device)
    others = images[labels != target]
    if not others.shape[0]:
        raise InputError(f"every clean image is of class {target}: the order needs images of other classes")
    layers = dict(net.named_modules())
    names, sizes = list(masks), [m.numel() for m in masks.values()]
    flat = [(n, c) for n, size in zip(names, sizes) for c in range(size)]
    candidates = _ascending(masks)[1][:pool].tolist()
    settings = dict(target=target, acc_budget=acc_budget, area=area, steps=steps, refresh=refresh, stop_share=stop_share,
                    pool=min(pool, total), max_neurons=max_neurons, seed=seed, images=int(labels.numel()))
    order: list[tuple[str, int]] = []
    accs: list[float] = []
    losses: list[float] = []
    shares: list[tuple[int, float]] = []
    acc0 = float((predict(net, images, batch_size) == labels).float().mean())
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=min(max_neurons, len(candidates)), desc="ordering by the reconstructed trigger",
                   unit="neuron")
    stopped = f"the order reached max_neurons ({max_neurons})"
    patched = None
    for step in range(min(max_neurons, len(candidates))):
        if step % refresh == 0:
            mask, pattern = reconstruct_patch(net, others, target, area=area, steps=steps, batch_size=batch_size,
                                              seed=seed + step)
            patched = (1 - mask) * others + mask * pattern
            share = float((predict(net, patched, batch_size) == target).float().mean())
            shares.append((step, share))
            if share <= stop_share:
                stopped = (f"a patch reconstructed after {step} prunings sends {share:.2f} of the other images to class "
                           f"{target} (<= {stop_share})")
                break
        best = None
        for i in candidates:
            name, c = flat[i]
            weight = layers[name].weight
            kept = weight[c].clone()
            weight[c] = 0.0
            acc, loss = _scores(net, images, labels, patched, target, batch_size)
            weight[c] = kept
            if acc >= acc0 - acc_budget - 1e-9 and (best is None or loss > best[0]):
                best = (loss, acc, i)
        if best is None:
            stopped = (f"no further candidate keeps the clean accuracy within {acc_budget} of the unpruned "
                       f"model's ({acc0:.3f})")
            break
        loss, acc, i = best
        name, c = flat[i]
        layers[name].weight[c] = 0.0
        candidates.remove(i)
        order.append((name, c))
        accs.append(acc)
        losses.append(loss)
        if bar is not None:
            bar.update(1)
    if not candidates:
        stopped = "every candidate is in the order"
    if bar is not None:
        bar.close()
    return PatchOrder(order, accs, losses, acc0, stopped, shares, settings)
