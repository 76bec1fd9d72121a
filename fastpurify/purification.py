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
``clean_epochs`` epochs on the extra set itself. Each round has its own :class:`RoundSpec`:
``adv_epochs``, ``clean_epochs`` and ``adv_batches`` are one value for every round or one per
round (a shorter sequence repeats its last value). ``adv_batches`` (per-batch PGD only) makes only
the first that many batches of the round's adversarial epochs adversarial, the rest clean: the
authors' progressive script runs round 0 as 10 adversarial epochs and every later round as one
epoch whose first 31 batches are adversarial, then 9 clean epochs (``recipe="authors"``).

Random draws, all from one generator ``make_generator(seed, device)``, in this order: the
initial random subset (``randperm``); per round, with ``regenerate="round"``, PGD's random start
for the whole extra set (when enabled), then per epoch the sampler's permutation and
augmentation; with ``"batch"``, per batch the augmentation, then PGD's random start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from .backdoor.metrics import evaluate
from .calibration import AUTO, EPS_STEPS, adversarial_logits, calibrate
from .data import as_tensors
from .inference import model_dtype, output_classes
from .ranking import average_precision
from .validation import (InputError, check_fraction, check_labels, check_pgd_settings, check_positive,
                         check_positive_int)

DEFAULT_SCHEDULE = (0.05, 0.2, 0.5, 0.7)  # the random start, then the ranked extra sets
REGENERATE = ("round", "batch")
INITIAL = ("random", "high-loss")
# lr=None: the authors' 1e-3 in the progressive setting (their pbe_main.py); 1e-2 with a clean
# extra set. The authors' aft_main.py fine-tunes at 1e-3 on the whole clean CIFAR-10 training set
# (50,000 images: 7,820 steps in 3 + 17 epochs); on a defender's 500 images the same epochs are
# 80 steps, and 1e-3 left BadNets and Blend in place on CIFAR-10 (JPEG copy) where 1e-2 removed
# them (docs/pbe.md).
# With initial="high-loss" (fastpurify's round 0), 1e-2: on digits 1e-3 left Blend and BadNets in
# place (ASR 66 and 100) where 1e-2 removed them (0.0 and 0.3); on the CIFAR-10 Blend subjects 1e-2
# ended lower (ASR 0.5, 1.2 against 7.5, 5.8) within the same ACC budget (docs/pbe.md).
DEFAULT_LR = {"training set": 1e-3, "clean extra set": 1e-2, "high-loss": 1e-2}


def default_lr(progressive: bool, initial: str) -> float:
    """``lr=None``: the authors' 1e-3 for the progressive setting with the paper's random round 0,
    1e-2 with a clean extra set or with ``initial="high-loss"`` (:data:`DEFAULT_LR`)."""
    if not progressive:
        return DEFAULT_LR["clean extra set"]
    return DEFAULT_LR["high-loss" if initial == "high-loss" else "training set"]


HIGH_LOSS_SHARE = 0.5  # initial="high-loss": round 0 is drawn from this share of the images, highest loss first
# exclude_low_loss=None: with initial="high-loss" the best-fitted 20 % of the training images stay
# out of every extra set (on the CIFAR-10 subjects they held 99.5-99.8 % of the poisoned images;
# BadNets ASR 100 -> 2.8-15.9 with it, 98.5-99.8 without; Blend 0.5-2.6; docs/pbe.md); with the
# paper's random round 0, none.
DEFAULT_EXCLUDE_LOW_LOSS = {"random": 0.0, "high-loss": 0.2}


def default_exclude_low_loss(progressive: bool, initial: str) -> float:
    """``exclude_low_loss=None``: 0.2 with ``initial="high-loss"``, 0 with the paper's random round
    0 and with a clean extra set (:data:`DEFAULT_EXCLUDE_LOW_LOSS`)."""
    return DEFAULT_EXCLUDE_LOW_LOSS[initial] if progressive else 0.0


class RoundSpec(NamedTuple):
    """How one round fine-tunes: ``adv_epochs`` epochs with adversarial batches (all of them, or
    only the first ``adv_batches`` of the round, the rest clean), then ``clean_epochs``."""

    adv_epochs: int
    clean_epochs: int
    adv_batches: int | None = None

    @property
    def epochs(self) -> int:
        return self.adv_epochs + self.clean_epochs

    def summary(self) -> dict[str, Any]:
        return self._asdict()


# The authors' scripts, per setting. Progressive (pbe_main.py): per-batch PGD; round 0 is 10
# adversarial epochs; every later round one epoch whose first 31 batches are adversarial (the
# rest clean), then 9 clean epochs. Clean extra set (aft_main.py): per-batch PGD, 3 adversarial
# + 17 clean epochs.
RECIPES = {
    "authors": {"training set": dict(regenerate="batch", adv_epochs=(10, 1), clean_epochs=(0, 9),
                                     adv_batches=(None, 31)),
                "clean extra set": dict(regenerate="batch", adv_epochs=3, clean_epochs=17, adv_batches=None)},
}
# The rounds when none of the round keywords is given: the authors' progressive rounds (measured
# far better than one epoch pair for every round: docs/pbe.md); with a clean extra set their 3 + 17
# epochs on examples made once per round (the paper's step 1a), measured kinder to clean accuracy
# than per-batch PGD on a few hundred images.
DEFAULT_ROUNDS = {"training set": RECIPES["authors"]["training set"],
                  "clean extra set": dict(regenerate="round", adv_epochs=3, clean_epochs=17, adv_batches=None)}
GIVEN_EPOCHS = dict(adv_epochs=3, clean_epochs=17, adv_batches=None)  # when some round keyword is given


def per_round(value: Any, name: str, rounds: int, *, allow_none: bool = False) -> list:
    """One value per round from a single value (every round) or a sequence (one per round, a
    shorter one repeating its last value)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or len(values) > rounds:
        raise InputError(f"{name} must be one value or one per round (at most {rounds} here), got {value!r}")
    for v in values:
        if v is None and allow_none:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if allow_none else 0):
            kind = "a positive integer or None (all)" if allow_none else "a non-negative integer"
            raise InputError(f"every {name} must be {kind}, got {v!r}")
    return values + [values[-1]] * (rounds - len(values))


def round_specs(adv_epochs: Any, clean_epochs: Any, adv_batches: Any, rounds: int, regenerate: str
                ) -> list[RoundSpec]:
    """Each round's :class:`RoundSpec`, checked."""
    specs = [RoundSpec(*v) for v in zip(per_round(adv_epochs, "adv_epochs", rounds),
                                        per_round(clean_epochs, "clean_epochs", rounds),
                                        per_round(adv_batches, "adv_batches", rounds, allow_none=True))]
    for r, spec in enumerate(specs):
        if spec.epochs == 0:
            raise InputError(f"round {r}: adv_epochs + clean_epochs must be at least 1")
        if spec.adv_batches is not None and regenerate != "batch":
            raise InputError("adv_batches caps the adversarial batches of per-batch PGD: give regenerate='batch' "
                             "(with regenerate='round' the round's examples are made once; use adv_epochs)")
    return specs


def _cut(keywords: dict[str, Any], rounds: int) -> dict[str, Any]:
    return {k: v[:rounds] if isinstance(v, tuple) else v for k, v in keywords.items()}


def describe_rounds(specs: list[RoundSpec]) -> str:
    """``"3 + 17 epochs"``, or per round where they differ: ``"10 + 0 epochs, then 1 (31
    adversarial batches) + 9"``."""
    def one(spec: RoundSpec) -> str:
        capped = "" if spec.adv_batches is None else f" ({spec.adv_batches} adversarial batches)"
        return f"{spec.adv_epochs}{capped} + {spec.clean_epochs}"

    parts = [one(specs[0]) + " epochs"]
    for prev, spec in zip(specs, specs[1:]):
        if spec != prev:
            parts.append("then " + one(spec))
    return ", ".join(parts)


def plan_rounds(setting: str, recipe: str | None, given: dict[str, Any], rounds: int
                ) -> tuple[dict[str, Any], list[RoundSpec]]:
    """The run's round keywords (:func:`round_keywords`) and each round's :class:`RoundSpec`,
    checked."""
    keywords = round_keywords(setting, recipe, given, rounds)
    if keywords["regenerate"] not in REGENERATE:
        raise InputError(f"regenerate must be 'round' (PGD examples once per round, the paper) or 'batch' (every "
                         f"batch against the current model, the authors' code), got {keywords['regenerate']!r}")
    return keywords, round_specs(keywords["adv_epochs"], keywords["clean_epochs"], keywords["adv_batches"], rounds,
                                 keywords["regenerate"])


def round_keywords(setting: str, recipe: str | None, given: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The round keywords (regenerate, adv_epochs, clean_epochs, adv_batches) of a run of
    ``rounds`` rounds: ``recipe``'s for the setting (then none may be given); else the setting's
    :data:`DEFAULT_ROUNDS` where none of the epoch keywords is given, or the given ones with
    3 + 17 epochs and no batch cap for those left None; ``regenerate`` None is the setting's. A
    recipe's or default's per-round values are cut to the run's rounds."""
    named = {k: v for k, v in given.items() if v is not None}
    if recipe is not None:
        if recipe not in RECIPES:
            raise InputError(f"recipe must be one of {sorted(RECIPES)} or None, got {recipe!r}")
        if named:
            raise InputError(f"recipe={recipe!r} sets {', '.join(sorted(RECIPES[recipe][setting]))}; do not also "
                             f"give {', '.join(sorted(named))}")
        return _cut(RECIPES[recipe][setting], rounds)
    default = _cut(DEFAULT_ROUNDS[setting], rounds)
    epochs = {k: named.get(k, v) for k, v in GIVEN_EPOCHS.items()}
    if not set(named) & set(GIVEN_EPOCHS):
        epochs = {k: default[k] for k in GIVEN_EPOCHS}
    regenerate = named.get("regenerate", default["regenerate"])
    if regenerate == "round" and "adv_batches" not in named:
        epochs["adv_batches"] = None  # the authors' partial epochs need per-batch PGD
    return dict(regenerate=regenerate, **epochs)


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
    adv_acc: float | None = None
    adv_asr: float | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The round without its tensors (JSON-ready)."""
        return {k: getattr(self, k) for k in ("round", "fraction", "size", "poisoned", "poisoned_fraction",
                                              "average_precision", "adv_acc", "adv_asr", "acc", "asr", "seconds")}


@dataclass
class PBEReport:
    """The rounds of a PBE run, its total time (evaluation excluded), its settings, how the
    engine ran (``engine``), the infected model's metrics (``before``) when ``test_data`` was
    given, the ground-truth poison flags (``poisoned``) when they were given, and (with
    ``test_data``) how the infected model labels its own PGD examples (``adversarial_labels``,
    :func:`adversarial_labels`)."""

    rounds: list[PBERound] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    before: dict[str, float] | None = None
    poisoned: torch.Tensor | None = None
    adversarial_labels: dict[str, Any] | None = None

    @property
    def ranking(self) -> torch.Tensor | None:
        """The final clean-first ranking of the training images (progressive setting)."""
        return self.rounds[-1].ranking if self.rounds else None

    def summary(self) -> dict[str, Any]:
        """The report without tensors (JSON-ready)."""
        return {"seconds": self.seconds, "settings": self.settings, "engine": self.engine, "before": self.before,
                "adversarial_labels": self.adversarial_labels, "rounds": [r.summary() for r in self.rounds]}


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
    device, the rounds' fractions (empty for a clean extra set), the settings every round shares
    ``cfg``, each round's :class:`RoundSpec`, the optimizer settings, and the optional ground
    truth and test data."""

    images: torch.Tensor
    labels: torch.Tensor
    fractions: list[float]
    cfg: dict[str, Any]
    specs: list[RoundSpec]
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

    @property
    def total_epochs(self) -> int:
        return sum(spec.epochs for spec in self.specs)


def plan_pbe(model: nn.Module, train_data: Any, clean_data: Any, *, device: torch.device, poison_indices: Any,
             test_data: Any, attack: Any, eps: float, alpha: float | None, pgd_steps: int, random_start: bool,
             regenerate: str | None, adv_epochs: Any, clean_epochs: Any, lr: float | None, momentum: float,
             weight_decay: float, batch_size: int, augment: bool, padding: int, flip: bool, schedule: Sequence[float],
             seed: int, adv_batches: Any = None, recipe: str | None = None, initial: str = "random",
             exclude_low_loss: float | None = None) -> PBEPlan:
    """Check every setting, then the data (before any work), and lay out the run."""
    if train_data is None and clean_data is None:
        raise InputError("give train_data (the training set) or clean_data (a clean extra set), or both")
    progressive = clean_data is None
    check_auto_settings(eps=eps, flip=flip, padding=padding)
    if eps == AUTO:  # the bound is chosen by calibrate(); check the rest with the largest it may choose
        check_pgd_settings(eps=EPS_STEPS[1] / 255, alpha=EPS_STEPS[1] / 255 / 5 if alpha is None else alpha,
                           steps=pgd_steps, norm="linf", lo=0.0, hi=1.0, random_start=random_start)
    else:
        alpha = eps / 5 if alpha is None else alpha
        check_pgd_settings(eps=eps, alpha=alpha, steps=pgd_steps, norm="linf", lo=0.0, hi=1.0,
                           random_start=random_start)
    check_schedule(schedule)
    rounds, specs = plan_rounds("training set" if progressive else "clean extra set", recipe,
                                dict(regenerate=regenerate, adv_epochs=adv_epochs, clean_epochs=clean_epochs,
                                     adv_batches=adv_batches), len(schedule) if progressive else 1)
    regenerate = rounds["regenerate"]
    if initial not in INITIAL:
        raise InputError(f"initial must be 'random' (round 0 drawn from the whole training set, the paper) or "
                         f"'high-loss' (from the half the infected model fits least), got {initial!r}")
    if initial != "random" and not progressive:
        raise InputError(f"initial={initial!r} picks round 0 of the progressive setting (train_data without "
                         "clean_data); with a clean extra set there is one round on all of it")
    if initial == "high-loss" and schedule[0] > HIGH_LOSS_SHARE:
        raise InputError(f"initial='high-loss' draws round 0 from the {HIGH_LOSS_SHARE:.0%} of the training images "
                         f"the infected model fits least: the schedule's first fraction must be at most "
                         f"{HIGH_LOSS_SHARE}, got {schedule[0]}")
    given = exclude_low_loss is not None
    if not given:
        exclude_low_loss = default_exclude_low_loss(progressive, initial)
    check_fraction(exclude_low_loss, "exclude_low_loss", low_open=False, high_open=True)
    if exclude_low_loss and not progressive:
        raise InputError("exclude_low_loss keeps training images out of the progressive setting's extra sets; with "
                         "a clean extra set there is nothing to keep out")
    if exclude_low_loss and schedule[-1] > 1 - exclude_low_loss:
        which = "" if given else f" (initial={initial!r}'s default; give exclude_low_loss=0 to keep none out)"
        raise InputError(f"exclude_low_loss={exclude_low_loss}{which} leaves {1 - exclude_low_loss:.0%} of the "
                         f"training images to choose from, but the schedule's last round takes {schedule[-1]:.0%}: "
                         f"lower one of them")
    lr = default_lr(progressive, initial) if lr is None else lr
    check_positive(lr, "lr")
    check_fraction(momentum, "momentum", low_open=False, high_open=True)
    check_fraction(weight_decay, "weight_decay", low_open=False, high_open=True)
    check_positive_int(batch_size, "batch_size")
    if poison_indices is not None and not progressive:
        raise InputError("poison_indices only apply to the training-set setting (train_data without clean_data)")
    if attack is not None and test_data is None:
        raise InputError("an attack is used to measure the ASR on test_data; give test_data too")
    dtype = model_dtype(model)
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
               batch_size=batch_size, augment=augment, padding=padding, flip=flip, initial=initial,
               exclude_low_loss=exclude_low_loss)
    optimizer = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    settings = dict(cfg, **optimizer, seed=seed, setting="training set" if progressive else "clean extra set",
                    schedule=list(schedule) if progressive else None, num_images=n, recipe=recipe,
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in rounds.items() if k != "regenerate"},
                    rounds=[spec.summary() for spec in specs])
    return PBEPlan(images, labels, fractions, cfg, specs, optimizer, seed, settings, poisoned, test, attack)


def check_auto_settings(*, eps: Any, flip: Any, padding: Any) -> None:
    """eps a positive number or "auto", flip a bool or "auto", padding a whole number >= 0 or "auto"."""
    if isinstance(eps, str) and eps != AUTO:
        raise InputError(f"eps must be a number (the L-inf bound in pixel units, e.g. 6/255) or 'auto' (chosen from "
                         f"the model's own PGD examples), got {eps!r}")
    if not (flip == AUTO or isinstance(flip, bool)):
        raise InputError(f"flip must be True, False or 'auto' (flips only for a model that labels flipped images "
                         f"the same), got {flip!r}")
    if not (padding == AUTO or (isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0)):
        raise InputError(f"padding must be a whole number of pixels >= 0 or 'auto' (an eighth of the image side), "
                         f"got {padding!r}")


def resolve_auto(plan: PBEPlan, model: nn.Module, batch_size: int | None = None) -> None:
    """Choose the plan's "auto" eps, flip and padding from ``model`` (the infected model, eval
    mode) and the extra set (:func:`fastpurify.calibration.calibrate`, ``batch_size`` images at
    a time), before any fine-tuning; the settings then hold the chosen values and
    ``calibration`` how they were chosen."""
    record = calibrate(model, plan.images, plan.labels, plan.cfg, plan.seed, batch_size)
    for key in ("eps", "alpha", "flip", "padding"):
        plan.settings[key] = plan.cfg[key]
    if record:
        plan.settings["calibration"] = record


def needs_losses(plan: PBEPlan) -> bool:
    """Whether the progressive rounds use the infected model's loss on every training image."""
    return plan.cfg["initial"] == "high-loss" or plan.cfg["exclude_low_loss"] > 0


def kept_out(plan: PBEPlan, losses: torch.Tensor | None) -> torch.Tensor | None:
    """``exclude_low_loss``: a mask of the ceil(share * n) training images with the lowest loss
    under the infected model (kept out of every extra set), or None when the share is 0."""
    share = plan.cfg["exclude_low_loss"]
    if share == 0:
        return None
    if losses is None:
        raise ValueError("exclude_low_loss needs the infected model's losses")
    mask = torch.zeros(losses.numel(), dtype=torch.bool, device=losses.device)
    mask[torch.argsort(losses, stable=True)[:math.ceil(losses.numel() * share)]] = True
    return mask


def initial_subset(plan: PBEPlan, generator: torch.Generator, losses: torch.Tensor | None = None) -> torch.Tensor:
    """Round 0's extra set in the progressive setting: a random ``schedule[0]`` of the data
    (``initial="random"``, the paper), or of the half of it on which the infected model's loss
    is highest (``"high-loss"``, fastpurify's own; ``losses``: every training image's
    cross-entropy under the infected model, eval mode, no augmentation). A backdoored model fits
    its poisoned images with the trigger's shortcut, far more confidently than clean ones:
    measured on digits and CIFAR-10 subjects (BadNets, Blend), the lowest-loss 20 % held 94-100 %
    of the poisoned images (docs/pbe.md). A random round 0 with ``exclude_low_loss`` is drawn
    from the images it leaves."""
    n = plan.images.shape[0]
    count = int(n * plan.fractions[0])
    excluded = kept_out(plan, losses)
    if plan.cfg["initial"] == "random":
        if excluded is None:
            return torch.randperm(n, generator=generator, device=plan.images.device)[:count]
        eligible = torch.nonzero(~excluded).flatten()
    else:
        if losses is None:
            raise ValueError("initial='high-loss' needs the infected model's losses")
        eligible = torch.argsort(losses, descending=True, stable=True)[:math.ceil(n * HIGH_LOSS_SHARE)]
        if excluded is not None:  # an exclude_low_loss above a half reaches into it
            eligible = eligible[~excluded[eligible]]
    pick = torch.randperm(eligible.numel(), generator=generator, device=plan.images.device)[:count]
    return eligible[pick]


def next_subset(plan: PBEPlan, round_index: int, ranking: torch.Tensor,
                losses: torch.Tensor | None = None) -> torch.Tensor:
    """Round r's extra set (r > 0): the top ``schedule[r]`` of the previous ranking, passing over
    the images ``exclude_low_loss`` keeps out (``losses``: as for :func:`initial_subset`)."""
    excluded = kept_out(plan, losses)
    if excluded is not None:
        ranking = ranking[~excluded[ranking]]
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
    """Times rounds, leaving the evaluation out (:meth:`paused`)."""

    def __init__(self, device: torch.device):
        self.device, self.total = device, 0.0
        self._start, self._elapsed = time.perf_counter(), 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._start, self._elapsed = time.perf_counter(), 0.0

    def stop(self) -> float:
        synchronize(self.device)
        seconds = self._elapsed + time.perf_counter() - self._start
        self.total += seconds
        self._elapsed = 0.0
        return seconds

    @contextmanager
    def paused(self):
        """Leave the block's time out of the round's."""
        synchronize(self.device)
        self._elapsed += time.perf_counter() - self._start
        try:
            yield
        finally:
            synchronize(self.device)
            self._start = time.perf_counter()


def midround_measure(info: PBERound, plan: PBEPlan, model: nn.Module, clock: RoundClock) -> None:
    """Record ACC / ASR after the round's adversarial epochs (test data given), off the clock."""
    if plan.test is None:
        return
    with clock.paused():
        metrics = measure(model, plan)
    info.adv_acc, info.adv_asr = metrics["acc"], metrics.get("asr")


ADVERSARIAL_LABEL_IMAGES = 1000


def adversarial_labels(model: nn.Module, plan: PBEPlan) -> dict[str, Any]:
    """How the infected model labels PGD examples (the run's eps, alpha and steps, no random
    start, eval mode) of up to 1,000 of the extra set's images (the clean ones when the ground
    truth is known): each class's share, and the top class. The PBE paper's observation is that
    a backdoored model sends most of them to the target class. With an all-to-one ``attack``,
    ``target_share`` is the share labelled as its target."""
    images, labels = plan.images, plan.labels
    if plan.poisoned is not None and bool((~plan.poisoned).any()):
        images, labels = images[~plan.poisoned], labels[~plan.poisoned]
    images, labels = images[:ADVERSARIAL_LABEL_IMAGES], labels[:ADVERSARIAL_LABEL_IMAGES]
    cfg = plan.cfg
    logits = adversarial_logits(model, images, labels, eps=cfg["eps"], alpha=cfg["alpha"], steps=cfg["pgd_steps"],
                                batch_size=cfg["batch_size"])
    predicted = logits.argmax(1)
    counts = torch.bincount(predicted, minlength=logits.shape[1]).double()
    shares = (counts / counts.sum()).tolist()
    top = int(counts.argmax())
    out = {"images": int(images.shape[0]), "shares": [round(v, 4) for v in shares], "top_class": top,
           "top_share": shares[top], "misclassified": float((predicted != labels).double().mean())}
    if plan.attack is not None and getattr(plan.attack, "mode", None) == "all2one":
        out["target"], out["target_share"] = plan.attack.target, shares[plan.attack.target]
    return out


def finish_round(info: PBERound, plan: PBEPlan, model: nn.Module, clock: RoundClock, report: PBEReport) -> None:
    """Stop the round's clock, then record ground truth and test metrics, and append it."""
    info.seconds = clock.stop()
    record_selection(info, plan)
    metrics = measure(model, plan)
    if metrics is not None:
        info.acc, info.asr = metrics["acc"], metrics.get("asr")
    report.rounds.append(info)
    report.seconds = clock.total
