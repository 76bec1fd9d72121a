"""The subjects of a reproduction: the data split the papers use, and backdoored models trained
once and cached.

A subject is keyed by everything that decides its weights (the data's fingerprint, the split,
the architecture, the attack, the poison rate, the seed and the training recipe), stored as
``<cache>/subjects/<key>/model.safetensors`` and ``subject.json`` (written last, so a run killed
while training leaves no subject behind), and read back with the safe loader.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..backdoor import Attack, evaluate, make_attack, poison
from ..backdoor.poison import PoisonedDataset
from ..checkpoint import load_model, save_model
from ..data import DataSplits
from ..data.image_cache import cache_folder
from ..files import write_json
from ..models import build_model
from ..training import train_classifier
from ..validation import InputError
from .config import CONTROL, ReproduceConfig, TrainRecipe

FORMAT = "1"  # bump when training or poisoning changes what a key produces
SPLIT_SEED = 0  # the data split is the same for every subject seed, as in the papers


@dataclass
class SplitData:
    """The training images of the subjects, the defender's reserve (clean, never poisoned) and
    the test images; ``name`` says where they came from, ``fingerprint`` what the training
    images and labels are (:func:`_fingerprint`, taken once: it is part of every subject's key)."""

    train: tuple[torch.Tensor, torch.Tensor]
    reserve: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    name: str
    full_train_size: int
    fingerprint: dict


def _random_subset(data: tuple[torch.Tensor, torch.Tensor], n: int | None, generator: torch.Generator,
                   what: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data
    if n is None:
        return images, labels
    if n > labels.numel():
        raise InputError(f"--{what} {n} is more than the {labels.numel()} images there are")
    keep = torch.randperm(labels.numel(), generator=generator)[:n].sort().values
    return images[keep], labels[keep]


def split_data(splits: DataSplits, config: ReproduceConfig) -> SplitData:
    """The papers' split: a seeded random ``reserve_fraction`` of the training split is held out
    for the defender, the rest trains the subjects (after an optional random cut to
    ``train_images``); the test split (optionally cut to ``test_images``) measures ACC and ASR."""
    if splits.train[1].numel() == 0:
        raise InputError(f"{splits.name} has no training split: a reproduction trains its own subjects")
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train = _random_subset(splits.train, config.train_images, g, "train-images")
    test = _random_subset(splits.test, config.test_images, g, "test-images")
    n = train[1].numel()
    order = torch.randperm(n, generator=g)
    n_reserve = round(config.reserve_fraction * n)
    need = clean_count(config, n)
    if need > n_reserve:
        raise InputError(f"the defender needs {need} clean images but the reserve holds only {n_reserve} "
                         f"({config.reserve_fraction:.0%} of {n} training images); lower --clean-images")
    reserve, rest = order[:n_reserve], order[n_reserve:].sort().values
    images, labels = train[0][rest], train[1][rest]
    return SplitData((images, labels), (train[0][reserve], train[1][reserve]), test, splits.num_classes, splits.name,
                     n, {"images": _fingerprint(images), "labels": _fingerprint(labels)})


def clean_count(config: ReproduceConfig, full_train_size: int) -> int:
    """How many clean images the defender holds: ``clean_images``, else ``clean_fraction`` of the
    training split (ANP: 1 % = 500 of CIFAR-10's 50,000; PBE: 5 % = 2,500)."""
    return config.clean_images or max(1, round(config.clean_fraction * full_train_size))


def defender_clean(data: SplitData, config: ReproduceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    n = clean_count(config, data.full_train_size)
    return data.reserve[0][:n], data.reserve[1][:n]


@dataclass
class Subject:
    """A backdoored model, its attack and poisoned training set, its metrics before any defense
    (fractions), and how it was trained (``record``: epochs, seconds, device, cached or not).
    The clean control (attack ``"none"``) has no attack and no poisoned set (``poisoned`` None:
    it trained on ``SplitData.train`` as it is), and ``before`` has no ASR."""

    model: nn.Module
    attack: Attack | None
    poisoned: PoisonedDataset | None
    before: dict
    record: dict

    def training_set(self, data: SplitData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(images, labels, poisoned indices) the subject trained on; indices None for the control."""
        return _training_set(data, self.poisoned)


def _training_set(data: SplitData, poisoned: PoisonedDataset | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if poisoned is None:  # the clean control
        return data.train[0], data.train[1], None
    return poisoned.images, poisoned.labels, poisoned.poison_indices


def _poisoning(config: ReproduceConfig, attack: str) -> tuple[float, int | None]:
    """(rate, target) of ``attack``'s poisoning: (0.0, None) for the clean control, whose weights
    neither enters."""
    return (0.0, None) if attack == CONTROL else (config.rate, config.target)


def _fingerprint(t: torch.Tensor) -> list:
    """Shape, sum and a position-weighted sum of the per-row sums, accumulated in float64 without
    a float64 copy of the data."""
    rows = t.reshape(t.shape[0], -1).sum(dim=1, dtype=torch.float64) if t.dim() > 1 else t.double()
    weights = torch.arange(1, rows.shape[0] + 1, dtype=torch.float64, device=rows.device)
    return [list(t.shape), round(float(rows.sum()), 6), round(float(rows @ weights), 3)]


def subject_key(data: SplitData, config: ReproduceConfig, attack: str, seed: int, recipe: TrainRecipe) -> str:
    """A hash of everything that decides the subject's weights."""
    rate, target = _poisoning(config, attack)
    spec = {"format": FORMAT, "data": data.name, **data.fingerprint, "arch": config.arch, "num_classes": data.num_classes,
            "attack": attack, "target": target, "rate": rate, "seed": seed, "recipe": asdict(recipe)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def subjects_folder(cache: str | Path | None) -> Path:
    """``cache`` if given, else ``subjects/`` in fastpurify's cache folder ($FASTPURIFY_CACHE or
    ~/.cache/fastpurify)."""
    return Path(cache).expanduser() if cache is not None else cache_folder(True) / "subjects"


def cached_subject(cache: Path, key: str) -> bool:
    return (cache / key / "subject.json").is_file()


def get_subject(data: SplitData, config: ReproduceConfig, attack_name: str, seed: int, *, recipe: TrainRecipe,
                device: torch.device, cache: Path, progress: bool) -> Subject:
    """The cached subject for (attack, seed), or a new one trained with ``recipe`` and cached
    (attack ``"none"``: the clean control, the same training without poison)."""
    control = attack_name == CONTROL
    attack = None if control else make_attack(attack_name, num_classes=data.num_classes, target=config.target,
                                              seed=seed)
    poisoned = None if control else poison(data.train, attack, config.rate, seed=seed)
    rate, target = _poisoning(config, attack_name)
    key = subject_key(data, config, attack_name, seed, recipe)
    folder = cache / key
    if cached_subject(cache, key):
        record = json.loads((folder / "subject.json").read_text())
        model, _ = load_model(folder / "model.safetensors")
        return Subject(model.to(device), attack, poisoned, record["before"], {**record, "cached": True})
    torch.manual_seed(seed)
    model = build_model(config.arch, num_classes=data.num_classes, in_channels=data.train[0].shape[1])
    images, labels, _ = _training_set(data, poisoned)
    history = train_classifier(model, images, labels, epochs=recipe.epochs, lr=recipe.lr,
                               batch_size=recipe.batch_size, weight_decay=recipe.weight_decay,
                               schedule=recipe.schedule, nesterov=recipe.nesterov, precision=recipe.precision,
                               label_smoothing=recipe.label_smoothing, channels_last=None, seed=seed,
                               device=device, progress=progress)
    before = evaluate(model, *data.test, attack)
    record = {"key": key, "arch": config.arch, "attack": attack_name, "seed": seed, "rate": rate, "target": target,
              "data": data.name, "train_images": int(data.train[1].numel()),
              "recipe": asdict(recipe), "train_seconds": round(history.seconds, 2), "device": str(device),
              "final_train_accuracy": history.accuracy[-1], "before": before}
    meta = {"arch": config.arch, "num_classes": data.num_classes, "in_channels": int(data.train[0].shape[1]),
            "image_size": list(data.train[0].shape[2:]),
            "attack": {"name": CONTROL} if control else {"name": attack_name, "mode": "all2one", "target": target,
                                                            "seed": seed},
            "poison": {"data": data.name, "rate": rate, "seed": seed}}
    save_model(model, folder / "model.safetensors", metadata=meta)
    write_json(folder / "subject.json", record)
    return Subject(model, attack, poisoned, before, {**record, "cached": False})


def epochs_within(budget_seconds: float, data: SplitData, config: ReproduceConfig, recipe: TrainRecipe,
                  device: torch.device, subjects: int) -> tuple[TrainRecipe, dict]:
    """The recipe with its epochs capped so that ``subjects`` trainings fit in ``budget_seconds``:
    a throwaway model is timed on a few batches (after one warm-up batch) and the epochs are
    ``min(recipe.epochs, budget / subjects / seconds per epoch)``, at least 1."""
    batch = recipe.batch_size
    probe_batches = 6
    images, labels = data.train[0][:batch * (probe_batches + 1)], data.train[1][:batch * (probe_batches + 1)]
    model = build_model(config.arch, num_classes=data.num_classes, in_channels=data.train[0].shape[1])
    kw = dict(lr=recipe.lr, batch_size=batch, schedule=recipe.schedule, precision=recipe.precision,
              channels_last=None, device=device, progress=False)
    train_classifier(model, images[:batch], labels[:batch], epochs=1, **kw)
    start = time.perf_counter()
    train_classifier(model, images[batch:], labels[batch:], epochs=1, **kw)
    per_batch = (time.perf_counter() - start) / -(-labels[batch:].numel() // batch)
    per_epoch = per_batch * -(-data.train[1].numel() // batch)
    fit = int(budget_seconds / subjects / per_epoch)
    epochs = max(1, min(recipe.epochs, fit))
    return replace(recipe, epochs=epochs), {"budget_seconds": budget_seconds, "subjects": subjects,
                                            "probe_seconds_per_epoch": round(per_epoch, 3),
                                            "epochs_asked": recipe.epochs, "epochs_used": epochs}
