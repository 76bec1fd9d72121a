"""What both PBE implementations share: the checks of the settings and data, the plan of the
rounds, the per-round record and the report. The reference (:mod:`fastpurify.reference.pbe`)
and the fast engine (:mod:`fastpurify.engines.pbe`) differ only in how they compute a round.

A run is one or more rounds; each round fine-tunes on an *extra set*:

- with a clean extra set (``clean_data``): one round on all of it;
- without (the progressive setting on ``train_data``): round 0 on a random ``schedule[0]`` of the
  training set, round r > 0 on the top ``schedule[r]`` of the previous round's ranking (the
  training images ordered by the cosine similarity of the infected and the current model's
  logits, most likely clean first).

A round: PGD examples of the extra set (``regenerate="round"``: once, against the model at the
start of the round, as the paper's step 1a; ``"batch"``: every batch against the current model,
as the authors' code), ``adv_epochs`` epochs of fine-tuning on them with the true labels, then
``clean_epochs`` epochs on the extra set itself.

Random draws, all from one generator ``make_generator(seed, device)``, in this order: the
initial random subset (``randperm``); per round, with ``regenerate="round"``, PGD's random start
for the whole extra set (when enabled), then per epoch the sampler's permutation and
augmentation; with ``"batch"``, per batch the augmentation, then PGD's random start.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from .backdoor.metrics import evaluate
from .data import as_tensors
from .inference import output_classes
from .ranking import average_precision
from .validation import (InputError, check_fraction, check_labels, check_pgd_settings, check_positive,
                         check_positive_int)

DEFAULT_SCHEDULE = (0.05, 0.2, 0.5, 0.7)  # the random start, then the ranked extra sets
REGENERATE = ("round", "batch")


@dataclass
class PBERound:
    """One purification round.

    ``fraction``/``indices``: the extra set (None for a clean extra set: all of it). In the
    progressive setting, ``scores``/``ranking``: every training image's score after the round
    and the clean-first ranking. With ground truth (``poison_indices``): how many poisoned
    images the extra set held (``poisoned``, ``poisoned_fraction``) and the ranking's
    ``average_precision`` for finding the clean images. With ``test_data``: ``acc`` after the
    round, and ``asr`` with an ``attack``. ``seconds``: the round's time, evaluation excluded.
    """

    round: int
    fraction: float | None
    indices: torch.Tensor | None
    size: int = 0
    scores: torch.Tensor | None = None
    ranking: torch.Tensor | None = None
    poisoned: int | None = None
    poisoned_fraction: float | None = None
    average_precision: float | None = None
    acc: float | None = None
    asr: float | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The round without its tensors (JSON-ready)."""
        return {k: getattr(self, k) for k in ("round", "fraction", "size", "poisoned", "poisoned_fraction",
                                              "average_precision", "acc", "asr", "seconds")}


@dataclass
class PBEReport:
    """The rounds of a PBE run, its total time (evaluation excluded), its settings, how the
    engine ran (``engine``), the infected model's metrics (``before``) when ``test_data`` was
    given, and the ground-truth poison flags (``poisoned``) when they were given."""

    rounds: list[PBERound] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    before: dict[str, float] | None = None
    poisoned: torch.Tensor | None = None

    @property
    def ranking(self) -> torch.Tensor | None:
        """The final clean-first ranking of the training images (progressive setting)."""
        return self.rounds[-1].ranking if self.rounds else None

    def summary(self) -> dict[str, Any]:
        """The report without tensors (JSON-ready)."""
        return {"seconds": self.seconds, "settings": self.settings, "engine": self.engine, "before": self.before,
                "rounds": [r.summary() for r in self.rounds]}


class PBEResult(NamedTuple):
    """``purified, report = pbe(...)``: the purified copy of the model and the report."""

    model: nn.Module
    report: PBEReport


def check_schedule(schedule: Sequence[float]) -> None:
    """A schedule of fractions in (0, 1], strictly increasing."""
    if not isinstance(schedule, Sequence) or isinstance(schedule, str) or len(schedule) == 0:
        raise InputError(f"schedule must be a non-empty sequence of fractions, got {schedule!r}")
    for f in schedule:
        check_fraction(f, "every schedule fraction", low_open=True, high_open=False)
    if any(b <= a for a, b in zip(schedule, schedule[1:])):
        raise InputError(f"schedule must be strictly increasing, e.g. (0.05, 0.2, 0.5, 0.7), got {tuple(schedule)}")


def check_epochs(adv_epochs: int, clean_epochs: int) -> None:
    for value, name in ((adv_epochs, "adv_epochs"), (clean_epochs, "clean_epochs")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    if adv_epochs + clean_epochs == 0:
        raise InputError("adv_epochs + clean_epochs must be at least 1")


def poison_flags(poison_indices: Any, n: int, device: torch.device) -> torch.Tensor:
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


@dataclass
class PBEPlan:
    """A checked PBE run: the extra-set data (the training set in the progressive setting) on the
    device, the rounds' fractions (empty for a clean extra set), the round settings ``cfg``, the
    optimizer settings, and the optional ground truth and test data."""

    images: torch.Tensor
    labels: torch.Tensor
    fractions: list[float]
    cfg: dict[str, Any]
    optimizer: dict[str, float]
    seed: int
    settings: dict[str, Any]
    poisoned: torch.Tensor | None = None
    test: tuple[torch.Tensor, torch.Tensor] | None = None
    attack: Any = None

    @property
    def progressive(self) -> bool:
        return bool(self.fractions)

    @property
    def num_rounds(self) -> int:
        return max(1, len(self.fractions))


def plan_pbe(model: nn.Module, train_data: Any, clean_data: Any, *, device: torch.device, poison_indices: Any,
             test_data: Any, attack: Any, eps: float, alpha: float | None, pgd_steps: int, random_start: bool,
             regenerate: str, adv_epochs: int, clean_epochs: int, lr: float, momentum: float, weight_decay: float,
             batch_size: int, augment: bool, padding: int, flip: bool, schedule: Sequence[float],
             seed: int) -> PBEPlan:
    """Check every setting, then the data (before any work), and lay out the run."""
    if train_data is None and clean_data is None:
        raise InputError("give train_data (the training set) or clean_data (a clean extra set), or both")
    progressive = clean_data is None
    alpha = eps / 5 if alpha is None else alpha
    check_pgd_settings(eps=eps, alpha=alpha, steps=pgd_steps, norm="linf", lo=0.0, hi=1.0, random_start=random_start)
    if regenerate not in REGENERATE:
        raise InputError(f"regenerate must be 'round' (PGD examples once per round, the paper) or 'batch' (every "
                         f"batch against the current model, the authors' code), got {regenerate!r}")
    check_epochs(adv_epochs, clean_epochs)
    check_positive(lr, "lr")
    check_fraction(momentum, "momentum", low_open=False, high_open=True)
    check_fraction(weight_decay, "weight_decay", low_open=False, high_open=True)
    check_positive_int(batch_size, "batch_size")
    check_schedule(schedule)
    if poison_indices is not None and not progressive:
        raise InputError("poison_indices only apply to the training-set setting (train_data without clean_data)")
    if attack is not None and test_data is None:
        raise InputError("an attack is used to measure the ASR on test_data; give test_data too")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    images, labels = as_tensors(train_data if progressive else clean_data, device=device, dtype=dtype)
    if float(images.min()) < 0.0 or float(images.max()) > 1.0:
        raise InputError("PBE's PGD needs pixel values in [0, 1]; put any normalisation inside the model")
    n = images.shape[0]
    fractions = list(schedule) if progressive else []
    if any(int(n * f) < 1 for f in fractions):
        raise InputError(f"a fraction of {min(fractions)} of {n} training images selects none; raise it")
    poisoned = None if poison_indices is None else poison_flags(poison_indices, n, device)
    classes = output_classes(model, images)
    which = "training" if progressive else "clean extra set"
    if int(labels.max()) >= classes:
        raise InputError(f"the {which} data has labels up to {int(labels.max())} but the model outputs {classes} "
                         f"classes (labels must lie in [0, {classes - 1}])")
    test = None
    if test_data is not None:
        test = as_tensors(test_data, device=device, dtype=dtype)
        check_labels(test[1], num_classes=classes, name="test labels")
    cfg = dict(eps=eps, alpha=alpha, pgd_steps=pgd_steps, random_start=random_start, regenerate=regenerate,
               adv_epochs=adv_epochs, clean_epochs=clean_epochs, batch_size=batch_size, augment=augment,
               padding=padding, flip=flip)
    optimizer = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    settings = dict(cfg, **optimizer, seed=seed, setting="training set" if progressive else "clean extra set",
                    schedule=list(schedule) if progressive else None, num_images=n)
    return PBEPlan(images, labels, fractions, cfg, optimizer, seed, settings, poisoned, test, attack)


def initial_subset(plan: PBEPlan, generator: torch.Generator) -> torch.Tensor:
    """Round 0's extra set in the progressive setting: a random ``schedule[0]`` of the data."""
    n = plan.images.shape[0]
    return torch.randperm(n, generator=generator, device=plan.images.device)[:int(n * plan.fractions[0])]


def next_subset(plan: PBEPlan, round_index: int, ranking: torch.Tensor) -> torch.Tensor:
    """Round r's extra set (r > 0): the top ``schedule[r]`` of the previous ranking."""
    return ranking[:int(plan.images.shape[0] * plan.fractions[round_index])]


def record_selection(info: PBERound, plan: PBEPlan) -> None:
    """Fill in what ground truth tells about a round's extra set and ranking."""
    if plan.poisoned is None or info.indices is None:
        return
    info.poisoned = int(plan.poisoned[info.indices].sum())
    info.poisoned_fraction = info.poisoned / max(1, info.size)
    if info.ranking is not None and bool((~plan.poisoned).any()):
        info.average_precision = average_precision(info.ranking, ~plan.poisoned)


def measure(model: nn.Module, plan: PBEPlan) -> dict[str, float] | None:
    """ACC (and ASR with an attack) on the test data, when given."""
    if plan.test is None:
        return None
    return evaluate(model, *plan.test, plan.attack)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RoundClock:
    """Times rounds, leaving the evaluation out."""

    def __init__(self, device: torch.device):
        self.device, self.total = device, 0.0
        self._start = time.perf_counter()

    def start(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def stop(self) -> float:
        synchronize(self.device)
        seconds = time.perf_counter() - self._start
        self.total += seconds
        return seconds


def finish_round(info: PBERound, plan: PBEPlan, model: nn.Module, clock: RoundClock, report: PBEReport) -> None:
    """Stop the round's clock, then record ground truth and test metrics, and append it."""
    info.seconds = clock.stop()
    record_selection(info, plan)
    metrics = measure(model, plan)
    if metrics is not None:
        info.acc, info.asr = metrics["acc"], metrics.get("asr")
    report.rounds.append(info)
    report.seconds = clock.total
