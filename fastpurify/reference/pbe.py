"""Reference PBE (Mu et al., CVPR 2023): Progressive Backdoor Erasing, both settings of the
paper's Algorithm 1, in plain eager PyTorch, following the authors' code (``aft_main.py``,
``aft_train.py``, ``pbe_main.py``).

A purification round on an extra set: ``adv_epochs`` epochs in which every batch is replaced by
its untargeted PGD examples against the current model (eval mode for the attack, as the
authors' ``aft_train``) and the model is fine-tuned on them with the true labels, then
``clean_epochs`` epochs of fine-tuning on the extra set itself. One SGD optimizer (lr 1e-3,
momentum 0.9, weight decay 5e-4, constant learning rate: the authors' scheduler is never
stepped) serves the whole run; batches are shuffled epochs with the crop + flip augmentation.

- With a clean extra set: one round on it.
- Without: the first extra set is a random ``schedule[0]`` (5%) of the poisoned training set;
  after each round every training image is scored by the cosine similarity of the infected and
  the current model's logits (eval mode, no augmentation), ranked descending (most likely clean
  first), and the next round's extra set is the top fraction given by the next entry of
  ``schedule`` (20%, 50%, 70%); so ``len(schedule)`` rounds. The model is not reset between rounds.

Deliberate differences from the authors' scripts, stated once: the PGD examples are clamped to
[0, 1] (their ``aft_train`` only projects to the eps-ball), the augmentation is the package's
crop + flip (theirs adds a random rotation), batches are always shuffled (``pbe_main`` does not
shuffle), and every round runs the same ``adv_epochs`` + ``clean_epochs`` (their progressive
script runs 10 epochs per round: all adversarial in round 0, afterwards adversarial only in the
first 31 batches of the first epoch).

Random draws, all from one generator ``make_generator(seed, device)``: the initial random
subset (``randperm``), then per epoch the sampler's permutation and augmentation, and PGD's
random start when enabled.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DeviceBatchSampler, as_tensors, make_generator
from ..inference import model_device, predict_logits
from ..ranking import average_precision, cosine_scores, rank_descending
from ..validation import InputError, check_fraction, check_positive, check_positive_int
from .pgd import check_pgd_settings, pgd

DEFAULT_SCHEDULE = (0.05, 0.2, 0.5, 0.7)  # the random start, then the ranked extra sets


@dataclass
class PBERound:
    """One purification round: the fraction and the indices of its extra set (None for a clean
    extra set: all of it); in the training-set setting, the scores and the clean-first ranking
    of every training image computed after the round, and, when the poisoned indices are known,
    how many poisoned images the extra set held and the ranking's average precision."""

    fraction: float | None
    indices: torch.Tensor | None
    scores: torch.Tensor | None = None
    ranking: torch.Tensor | None = None
    poisoned: int | None = None
    average_precision: float | None = None


@dataclass
class PBEResult:
    """The purified copy of the model and its rounds."""

    model: nn.Module
    rounds: list[PBERound] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ranking(self) -> torch.Tensor | None:
        """The final clean-first ranking of the training images (training-set setting)."""
        return self.rounds[-1].ranking


def check_schedule(schedule: Sequence[float]) -> None:
    """A schedule of fractions in (0, 1], strictly increasing."""
    if not isinstance(schedule, Sequence) or len(schedule) == 0:
        raise InputError(f"schedule must be a non-empty sequence of fractions, got {schedule!r}")
    for f in schedule:
        check_fraction(f, "every schedule fraction", low_open=True, high_open=False)
    if any(b <= a for a, b in zip(schedule, schedule[1:])):
        raise InputError(f"schedule must be strictly increasing, e.g. (0.2, 0.5, 0.7), got {tuple(schedule)}")


def _check_epochs(adv_epochs: int, clean_epochs: int) -> None:
    for value, name in ((adv_epochs, "adv_epochs"), (clean_epochs, "clean_epochs")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    if adv_epochs + clean_epochs == 0:
        raise InputError("adv_epochs + clean_epochs must be at least 1")


def _poison_flags(poison_indices: Any, n: int, device: torch.device) -> torch.Tensor:
    """A boolean flag per training image from poisoned indices (or from such flags)."""
    given = torch.as_tensor(poison_indices, device=device)
    if given.dtype == torch.bool:
        if given.shape != (n,):
            raise InputError(f"poison flags must have one entry per training image ({n}), got {tuple(given.shape)}")
        return given
    if given.is_floating_point() or given.dim() != 1 or (given.numel() and not 0 <= int(given.min()) <= int(
            given.max()) < n):
        raise InputError(f"poison_indices must be a 1-D tensor of integer indices in [0, {n - 1}]")
    flags = torch.zeros(n, dtype=torch.bool, device=device)
    flags[given.long()] = True
    return flags


def _purify(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
            generator: torch.Generator, cfg: dict, bar) -> None:
    """One round: adversarial epochs, then clean epochs, on (images, labels)."""
    sampler = DeviceBatchSampler(images, labels, cfg["batch_size"], generator=generator, augment=cfg["augment"],
                                 padding=cfg["padding"], flip=cfg["flip"])
    for epoch in range(cfg["adv_epochs"] + cfg["clean_epochs"]):
        for x, y in sampler:
            if epoch < cfg["adv_epochs"]:
                x = pgd(model, x, y, eps=cfg["eps"], alpha=cfg["alpha"], steps=cfg["pgd_steps"],
                        random_start=cfg["random_start"], generator=generator)
            model.train()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if bar is not None:
            bar.update(1)


def pbe(model: nn.Module, train_data: Any = None, clean_data: Any = None, *,
        poison_indices: torch.Tensor | None = None,
        eps: float = 6 / 255, alpha: float | None = None, pgd_steps: int = 7, random_start: bool = False,
        adv_epochs: int = 3, clean_epochs: int = 17, lr: float = 1e-3, momentum: float = 0.9,
        weight_decay: float = 5e-4, batch_size: int = 128, augment: bool = True, padding: int = 4, flip: bool = True,
        schedule: Sequence[float] = DEFAULT_SCHEDULE, seed: int = 0,
        progress: bool = True) -> PBEResult:
    """Purify a copy of ``model`` with PBE. With ``clean_data`` (a clean extra set): one round on
    it (``train_data`` is then not used). Without: the progressive setting on ``train_data`` (the
    possibly poisoned training set), where ``poison_indices`` (the ground truth, for evaluation
    only) adds the average precision of each round's ranking. The signature and keywords are
    those of the fast ``fastpurify.pbe``. Data is anything :func:`fastpurify.data.as_tensors`
    reads, pixels in [0, 1]. ``model`` is not modified."""
    if train_data is None and clean_data is None:
        raise InputError("give train_data (the training set) or clean_data (a clean extra set), or both")
    progressive = clean_data is None
    alpha = eps / 5 if alpha is None else alpha
    check_pgd_settings(eps=eps, alpha=alpha, steps=pgd_steps, norm="linf", lo=0.0, hi=1.0)
    _check_epochs(adv_epochs, clean_epochs)
    check_positive(lr, "lr")
    check_fraction(momentum, "momentum", low_open=False, high_open=True)
    check_fraction(weight_decay, "weight_decay", low_open=False, high_open=True)
    check_positive_int(batch_size, "batch_size")
    check_schedule(schedule)
    device = model_device(model)
    images, labels = as_tensors(train_data if progressive else clean_data, device=device)
    if float(images.min()) < 0.0 or float(images.max()) > 1.0:
        raise InputError("PBE's PGD needs pixel values in [0, 1]; put any normalisation inside the model")
    n = images.shape[0]
    fractions = list(schedule) if progressive else []
    if any(int(n * f) < 1 for f in fractions):
        raise InputError(f"a fraction of {min(fractions)} of {n} training images selects none; raise it")
    if poison_indices is not None and not progressive:
        raise InputError("poison_indices only apply to the training-set setting (train_data without clean_data)")
    poisoned = None if poison_indices is None else _poison_flags(poison_indices, n, device)
    cfg = dict(eps=eps, alpha=alpha, pgd_steps=pgd_steps, random_start=random_start, adv_epochs=adv_epochs,
               clean_epochs=clean_epochs, batch_size=batch_size, augment=augment, padding=padding, flip=flip)
    settings = dict(cfg, lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed,
                    setting="training set" if progressive else "clean extra set",
                    schedule=list(schedule))

    start = time.perf_counter()
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    generator = make_generator(seed, device)
    rounds_total = max(1, len(fractions))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=rounds_total * (adv_epochs + clean_epochs), desc="PBE (reference)", unit="epoch")
    result = PBEResult(net, settings=settings)
    if not progressive:
        _purify(net, optimizer, images, labels, generator, cfg, bar)
        result.rounds.append(PBERound(None, None))
    else:
        infected = predict_logits(model, images)
        chosen = torch.randperm(n, generator=generator, device=device)[:int(n * fractions[0])]
        for r, fraction in enumerate(fractions):
            if r > 0:
                chosen = result.ranking[:int(n * fraction)]
            _purify(net, optimizer, images[chosen], labels[chosen], generator, cfg, bar)
            scores = cosine_scores(infected, predict_logits(net, images))
            info = PBERound(fraction, chosen, scores, rank_descending(scores))
            if poisoned is not None:
                info.poisoned = int(poisoned[chosen].sum())
                info.average_precision = average_precision(info.ranking, ~poisoned)
            result.rounds.append(info)
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - start
    return result
