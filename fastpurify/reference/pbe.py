"""Reference PBE (Mu et al., CVPR 2023): Progressive Backdoor Erasing, both settings of the
paper's Algorithm 1, in plain eager PyTorch, following the authors' code (``aft_main.py``,
``aft_train.py``, ``pbe_main.py``). The rounds, the order of the random draws and the report
are laid out in :mod:`fastpurify.purification`, shared with the fast ``fastpurify.pbe``.

A purification round on an extra set: ``adv_epochs`` epochs of fine-tuning on untargeted PGD
examples of it with the true labels (generated once per round against the model at the start of
the round, ``regenerate="round"``, the paper's step 1a; or every batch against the current
model, ``regenerate="batch"``, the authors' ``aft_train``; eval mode for the attack), then
``clean_epochs`` epochs of fine-tuning on the extra set itself. One SGD optimizer (lr 1e-3,
momentum 0.9, weight decay 5e-4, constant learning rate: the authors' scheduler is never
stepped) serves the whole run; batches are shuffled epochs with the crop + flip augmentation.
After each round of the progressive setting every training image is scored by the cosine
similarity of the infected and the current model's logits (eval mode, no augmentation); the
model is not reset between rounds.

Deliberate differences from the authors' scripts, stated once: the PGD examples are clamped to
[0, 1] (their ``aft_train`` only projects to the eps-ball), the augmentation is the package's
crop + flip (theirs adds a random rotation), batches are always shuffled (``pbe_main`` does not
shuffle), and every round runs the same ``adv_epochs`` + ``clean_epochs`` (their progressive
script runs 10 epochs per round: all adversarial in round 0, afterwards adversarial only in the
first 31 batches of the first epoch).
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
from ..purification import (DEFAULT_SCHEDULE, PBEPlan, PBEReport, PBEResult, PBERound, RoundClock, finish_round,
                            initial_subset, measure, next_subset, plan_pbe)
from ..ranking import cosine_scores, rank_descending
from .pgd import pgd

def _purify(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
            generator: torch.Generator, cfg: dict, bar) -> None:
    """One round: adversarial epochs, then clean epochs, on (images, labels)."""
    def attack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd(model, x, y, eps=cfg["eps"], alpha=cfg["alpha"], steps=cfg["pgd_steps"],
                   random_start=cfg["random_start"], generator=generator, batch_size=cfg["batch_size"])

    def sampler(x: torch.Tensor) -> DeviceBatchSampler:
        return DeviceBatchSampler(x, labels, cfg["batch_size"], generator=generator, augment=cfg["augment"],
                                  padding=cfg["padding"], flip=cfg["flip"])

    per_round = cfg["regenerate"] == "round"
    adversarial = attack(images, labels) if per_round and cfg["adv_epochs"] else None
    clean = sampler(images)  # drawing happens per epoch, so one sampler per set serves them all
    attacked = sampler(adversarial) if adversarial is not None else clean
    for epoch in range(cfg["adv_epochs"] + cfg["clean_epochs"]):
        in_adv = epoch < cfg["adv_epochs"]
        for x, y in attacked if in_adv else clean:
            if in_adv and not per_round:
                x = attack(x, y)
            model.train()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if bar is not None:
            bar.update(1)


def pbe(model: nn.Module, train_data: Any = None, clean_data: Any = None, *,
        poison_indices: torch.Tensor | None = None, test_data: Any = None, attack: Any = None,
        eps: float = 6 / 255, alpha: float | None = None, pgd_steps: int = 7, random_start: bool = False,
        regenerate: str = "round", adv_epochs: int = 3, clean_epochs: int = 17, lr: float = 1e-3,
        momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128, augment: bool = True,
        padding: int = 4, flip: bool = True, schedule: Sequence[float] = DEFAULT_SCHEDULE, seed: int = 0,
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
                    padding=padding, flip=flip, schedule=schedule, seed=seed)
    report = PBEReport(settings=plan.settings, engine={"name": "reference", "device": str(device)},
                       before=measure(model, plan), poisoned=plan.poisoned)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=plan.num_rounds * (adv_epochs + clean_epochs), desc="PBE (reference)", unit="epoch")
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), **plan.optimizer)
    generator = make_generator(seed, device)
    clock = RoundClock(device)
    if not plan.progressive:
        _purify(net, optimizer, plan.images, plan.labels, generator, plan.cfg, bar)
        finish_round(PBERound(0, None, None, size=plan.images.shape[0]), plan, net, clock, report)
    else:
        _progressive(model, net, optimizer, plan, generator, clock, report, bar)
    if bar is not None:
        bar.close()
    return PBEResult(net, report)


def _progressive(infected: nn.Module, net: nn.Module, optimizer: torch.optim.Optimizer, plan: PBEPlan,
                 generator: torch.Generator, clock: RoundClock, report: PBEReport, bar) -> None:
    logits = predict_logits(infected, plan.images)
    chosen = initial_subset(plan, generator)
    for r, fraction in enumerate(plan.fractions):
        if r > 0:
            clock.start()
            chosen = next_subset(plan, r, report.ranking)
        _purify(net, optimizer, plan.images[chosen], plan.labels[chosen], generator, plan.cfg, bar)
        scores = cosine_scores(logits, predict_logits(net, plan.images))
        info = PBERound(r, fraction, chosen, size=int(chosen.numel()), scores=scores, ranking=rank_descending(scores))
        finish_round(info, plan, net, clock, report)
