"""Reference PBE (Mu et al., CVPR 2023): Progressive Backdoor Erasing, both settings of the
paper's Algorithm 1, in plain eager PyTorch, following the authors' code (``aft_main.py``,
``aft_train.py``, ``pbe_main.py``). The rounds, the order of the random draws and the report
are laid out in :mod:`fastpurify.purification`, shared with the fast ``fastpurify.pbe``.

A purification round on an extra set: ``adv_epochs`` epochs of fine-tuning on untargeted PGD
examples of it with the true labels (generated once per round against the model at the start of
the round, ``regenerate="round"``, the paper's step 1a; or every batch against the current
model, ``regenerate="batch"``, the authors' ``aft_train``; eval mode for the attack), then
``clean_epochs`` epochs of fine-tuning on the extra set itself. One SGD optimizer (momentum 0.9,
weight decay 5e-4, constant learning rate: the authors' scheduler is never stepped; ``lr=None``
is their 1e-3 in the progressive setting and fastpurify's 1e-2 with a clean extra set or
``initial="high-loss"``, :func:`fastpurify.purification.default_lr`) serves the whole run; batches
are shuffled epochs with the crop + flip augmentation. The "auto" eps, flip and padding (the
defaults) are resolved from the infected model before any of this
(:func:`fastpurify.purification.resolve_auto`), as the fast engine resolves them.
After each round of the progressive setting every training image is scored by the cosine
similarity of the infected and the current model's logits (eval mode, no augmentation); the
model is not reset between rounds.

Deliberate differences from the authors' scripts, stated once: the PGD examples are clamped to
[0, 1] (their ``aft_train`` only projects to the eps-ball), the augmentation is the package's
crop + flip (theirs adds a random rotation), batches are always shuffled (``pbe_main`` does not
shuffle). Their progressive script's rounds (10 adversarial epochs in round 0; afterwards one
epoch adversarial only in its first 31 batches, then 9 clean) are the progressive default when
no round keyword is given, and ``recipe="authors"`` (:data:`fastpurify.purification.RECIPES`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DeviceBatchSampler, make_generator
from ..inference import model_device, predict_logits
from ..purification import (DEFAULT_SCHEDULE, PBEPlan, PBEReport, PBEResult, PBERound, RoundClock, RoundSpec,
                            adversarial_labels, finish_round, initial_subset, measure, midround_measure, next_subset,
                            needs_losses, plan_pbe, resolve_auto)
from ..ranking import cosine_scores, rank_descending
from .pgd import pgd

def _purify(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
            generator: torch.Generator, cfg: dict, spec: RoundSpec, bar, after_adversarial=None) -> None:
    """One round: adversarial epochs (only the first ``spec.adv_batches`` batches adversarial,
    when set), then clean epochs, on (images, labels); ``after_adversarial()`` between them."""
    def attack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd(model, x, y, eps=cfg["eps"], alpha=cfg["alpha"], steps=cfg["pgd_steps"],
                   random_start=cfg["random_start"], generator=generator, batch_size=cfg["batch_size"])

    def sampler(x: torch.Tensor) -> DeviceBatchSampler:
        return DeviceBatchSampler(x, labels, cfg["batch_size"], generator=generator, augment=cfg["augment"],
                                  padding=cfg["padding"], flip=cfg["flip"])

    per_round = cfg["regenerate"] == "round"
    adversarial = attack(images, labels) if per_round and spec.adv_epochs else None
    clean = sampler(images)  # drawing happens per epoch, so one sampler per set serves them all
    attacked = sampler(adversarial) if adversarial is not None else clean
    left = spec.adv_batches  # per-batch PGD only: adversarial batches still to come (None: all)
    for epoch in range(spec.epochs):
        in_adv = epoch < spec.adv_epochs
        for x, y in attacked if in_adv else clean:
            if in_adv and not per_round and (left is None or left > 0):
                x = attack(x, y)
                left = None if left is None else left - 1
            model.train()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if bar is not None:
            bar.update(1)
        if epoch == spec.adv_epochs - 1 and spec.clean_epochs and after_adversarial is not None:
            after_adversarial()


def pbe(model: nn.Module, train_data: Any = None, clean_data: Any = None, *,
        poison_indices: torch.Tensor | None = None, test_data: Any = None, attack: Any = None,
        eps: float | str = "auto", alpha: float | None = None, pgd_steps: int = 7, random_start: bool = False,
        regenerate: str | None = None, adv_epochs: int | Sequence[int] | None = None,
        clean_epochs: int | Sequence[int] | None = None,
        adv_batches: int | None | Sequence[int | None] = None, recipe: str | None = None, initial: str = "random",
        exclude_low_loss: float | None = None, lr: float | None = None,
        momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128, augment: bool = True,
        padding: int | str = "auto", flip: bool | str = "auto", schedule: Sequence[float] = DEFAULT_SCHEDULE,
        seed: int = 0,
        progress: bool = True) -> PBEResult:
    """Purify a copy of ``model`` with PBE; returns ``(purified, report)``. With ``clean_data``
    (a clean extra set): one round on it (``train_data`` is then not used). Without: the
    progressive setting on ``train_data`` (the possibly poisoned training set), where
    ``poison_indices`` (the ground truth, for evaluation only) adds the poisoned share of each
    extra set and the average precision of each ranking. ``test_data`` adds ACC per round, and
    ``attack`` (a :mod:`fastpurify.backdoor` attack) the ASR. The keywords are those of the fast
    ``fastpurify.pbe``. Data is anything :func:`fastpurify.data.as_tensors` reads, pixels in
    [0, 1]. ``model`` is not modified."""
    device = model_device(model)
    plan = plan_pbe(model, train_data, clean_data, device=device, poison_indices=poison_indices,
                    test_data=test_data, attack=attack, eps=eps, alpha=alpha, pgd_steps=pgd_steps,
                    random_start=random_start, regenerate=regenerate, adv_epochs=adv_epochs, clean_epochs=clean_epochs,
                    lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, augment=augment,
                    padding=padding, flip=flip, schedule=schedule, seed=seed, adv_batches=adv_batches, recipe=recipe,
                    initial=initial, exclude_low_loss=exclude_low_loss)
    resolve_auto(plan, model)
    report = PBEReport(settings=plan.settings, engine={"name": "reference", "device": str(device)},
                       before=measure(model, plan), poisoned=plan.poisoned)
    if plan.test is not None:
        report.adversarial_labels = adversarial_labels(model, plan)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=plan.total_epochs, desc="PBE (reference)", unit="epoch")
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), **plan.optimizer)
    generator = make_generator(seed, device)
    clock = RoundClock(device)
    if not plan.progressive:
        info = PBERound(0, None, None, size=plan.images.shape[0])
        _purify(net, optimizer, plan.images, plan.labels, generator, plan.cfg, plan.specs[0], bar,
                lambda: midround_measure(info, plan, net, clock))
        finish_round(info, plan, net, clock, report)
    else:
        _progressive(model, net, optimizer, plan, generator, clock, report, bar)
    if bar is not None:
        bar.close()
    return PBEResult(net, report)


def _progressive(infected: nn.Module, net: nn.Module, optimizer: torch.optim.Optimizer, plan: PBEPlan,
                 generator: torch.Generator, clock: RoundClock, report: PBEReport, bar) -> None:
    logits = predict_logits(infected, plan.images)
    losses = F.cross_entropy(logits, plan.labels, reduction="none") if needs_losses(plan) else None
    chosen = initial_subset(plan, generator, losses)
    for r, fraction in enumerate(plan.fractions):
        if r > 0:
            clock.start()
            chosen = next_subset(plan, r, report.ranking, losses)
        info = PBERound(r, fraction, chosen, size=int(chosen.numel()))
        _purify(net, optimizer, plan.images[chosen], plan.labels[chosen], generator, plan.cfg, plan.specs[r], bar,
                lambda: midround_measure(info, plan, net, clock))
        info.scores = cosine_scores(logits, predict_logits(net, plan.images))
        info.ranking = rank_descending(info.scores)
        finish_round(info, plan, net, clock, report)
