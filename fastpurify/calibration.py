"""PBE's settings read from the model and the data instead of from the dataset's name.

The paper's defaults (eps 6/255, crop with 4 pixels of padding, horizontal flips) were made for
32-pixel natural images. On other data they silently do nothing or harm (docs/pbe.md): on 16-pixel
digits the infected model labels only 5-12 % of its 6/255 PGD examples wrongly, so "adversarial
fine-tuning" is clean fine-tuning and the backdoor stays; and a flipped digit is another digit.
Each ``"auto"`` setting is resolved once, before any fine-tuning, from the model as given (eval
mode) and up to :data:`CALIBRATION_IMAGES` images of the extra set (the training set in the
progressive setting, labels as given). Nothing here uses a trigger or knows the attack.

- ``eps="auto"``: the paper's 6/255 when at least :data:`ADVERSARIAL_SHARE` of the images' PGD
  examples (the run's steps and step rule, no random start) are misclassified; otherwise the
  smallest whole k/255 up to 32/255 at which they are (binary search, assuming the share grows
  with eps), or 32/255 when none reaches it.
- ``flip="auto"``: horizontal flips only when the model's accuracy on the flipped images keeps
  at least :data:`FLIP_RETAINED` of its accuracy on the images themselves (on CIFAR-10 flipping
  costs nothing; a model of digits loses 60-80 % of its accuracy, because a flipped digit is
  another digit or none, and fine-tuning on flips would teach it other data).
- ``padding="auto"``: an eighth of the image's shorter side (4 pixels at 32, 2 at 16).

The sample is drawn with its own generator (seed ``plan.seed``), so the run's random draws are
the same as with the resolved values given explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .inference import predict_logits

AUTO = "auto"
CALIBRATION_IMAGES = 1000
ADVERSARIAL_SHARE = 0.8  # eps="auto": the share of PGD examples that must be misclassified
EPS_STEPS = (6, 32)  # eps="auto" searches k/255 for k in this range: the paper's 6/255 upward
FLIP_RETAINED = 0.9  # flip="auto": the share of the accuracy that must survive a flip
PADDING_SHARE = 1 / 8  # padding="auto": this share of the shorter image side


def auto_padding(height: int, width: int) -> int:
    """An eighth of the shorter side, at least one pixel."""
    return max(1, round(min(height, width) * PADDING_SHARE))


def calibration_sample(images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to :data:`CALIBRATION_IMAGES` of the images, a seeded random draw (all when fewer)."""
    n = images.shape[0]
    if n <= CALIBRATION_IMAGES:
        return images, labels
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:CALIBRATION_IMAGES].to(images.device)
    return images[pick], labels[pick]


def flip_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int
                  ) -> tuple[float, float]:
    """The model's accuracy on the images, and on them flipped left-right."""
    labels = labels.to(images.device)
    plain = predict_logits(model, images, batch_size).argmax(1)
    flipped = predict_logits(model, images.flip(-1), batch_size).argmax(1)
    return float((plain == labels).double().mean()), float((flipped == labels).double().mean())


def adversarial_logits(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                       alpha: float | None, steps: int, batch_size: int) -> torch.Tensor:
    """The model's logits (eval mode) on the PGD examples of the images (L-inf ``eps``, step
    ``alpha`` or eps / 5, ``steps`` steps, no random start), ``batch_size`` images at a time."""
    from .reference.pgd import pgd

    x = pgd(model, images, labels, eps=eps, alpha=eps / 5 if alpha is None else alpha, steps=steps,
            random_start=False, batch_size=batch_size)
    return predict_logits(model, x, batch_size)


def adversarial_share(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                      alpha: float | None, steps: int, batch_size: int) -> float:
    """The share of the images whose PGD examples (:func:`adversarial_logits`) the model labels
    other than ``labels``."""
    predicted = adversarial_logits(model, images, labels, eps=eps, alpha=alpha, steps=steps,
                                   batch_size=batch_size).argmax(1)
    return float((predicted != labels.to(predicted.device)).double().mean())


def smallest_bound(share: Callable[[int], float]) -> tuple[int, bool, dict[int, float]]:
    """The smallest k in :data:`EPS_STEPS` with ``share(k)`` at least :data:`ADVERSARIAL_SHARE`:
    the low end when it passes, the high end (not reached) when even it does not, else a binary
    search between them (assuming the share grows with k). Returns (k, reached, every share
    measured by k)."""
    low, high = EPS_STEPS
    shares: dict[int, float] = {}

    def passes(k: int) -> bool:
        shares[k] = share(k)
        return shares[k] >= ADVERSARIAL_SHARE

    if passes(low):
        return low, True, shares
    if not passes(high):
        return high, False, shares
    while high - low > 1:  # share(low) < target <= share(high): the smallest passing k in (low, high]
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high, True, shares


def auto_eps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, alpha: float | None, steps: int,
             batch_size: int) -> dict[str, Any]:
    """The smallest k/255 (k in :data:`EPS_STEPS`) whose PGD examples are misclassified for at
    least :data:`ADVERSARIAL_SHARE` of the images; returns the choice and every share measured."""
    chosen, reached, shares = smallest_bound(
        lambda k: adversarial_share(model, images, labels, eps=k / 255, alpha=alpha, steps=steps, batch_size=batch_size))
    return {"value": chosen / 255, "pixels": f"{chosen}/255", "reached": reached, "target_share": ADVERSARIAL_SHARE,
            "shares": {f"{k}/255": round(v, 4) for k, v in sorted(shares.items())}}


def calibrate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: dict[str, Any],
              seed: int, batch_size: int | None = None) -> dict[str, Any]:
    """Resolve the ``"auto"`` values among ``cfg``'s eps, flip and padding in place, from
    ``model`` (eval mode) and the extra set ``images`` / ``labels``, ``batch_size`` images at a
    time (default ``cfg["batch_size"]``); return how each was chosen (empty when none is
    ``"auto"``). ``cfg["alpha"]`` None becomes eps / 5 of the chosen eps."""
    record: dict[str, Any] = {}
    if cfg["padding"] == AUTO:
        cfg["padding"] = auto_padding(images.shape[-2], images.shape[-1])
        record["padding"] = {"value": cfg["padding"], "image_size": list(images.shape[-2:]), "share": PADDING_SHARE}
    if cfg["flip"] != AUTO and cfg["eps"] != AUTO:
        return record
    x, y = calibration_sample(images, labels, seed)
    record["images"] = int(x.shape[0])
    batch_size = batch_size or cfg["batch_size"]
    if cfg["flip"] == AUTO:
        accuracy, flipped = flip_accuracy(model, x, y, batch_size)
        cfg["flip"] = flipped >= FLIP_RETAINED * accuracy
        record["flip"] = {"value": cfg["flip"], "accuracy": round(accuracy, 4), "flipped_accuracy": round(flipped, 4),
                          "retained": FLIP_RETAINED}
    if cfg["eps"] == AUTO:
        record["eps"] = auto_eps(model, x, y, alpha=cfg["alpha"], steps=cfg["pgd_steps"], batch_size=batch_size)
        cfg["eps"] = record["eps"]["value"]
    if cfg["alpha"] is None:
        cfg["alpha"] = cfg["eps"] / 5
    return record


def describe_calibration(record: dict[str, Any]) -> str:
    """One line saying what each "auto" setting became and why."""
    parts = []
    if "eps" in record:
        eps = record["eps"]
        first = next(iter(eps["shares"].items()))
        last = eps["shares"][eps["pixels"]]
        how = (f"{last:.0%} of its PGD examples misclassified" if first[0] == eps["pixels"] else
               f"{first[1]:.0%} misclassified at {first[0]}, {last:.0%} at {eps['pixels']}")
        if not eps["reached"]:
            how += f"; below the {eps['target_share']:.0%} sought even at the largest bound"
        parts.append(f"eps {eps['pixels']} ({how})")
    if "flip" in record:
        flip = record["flip"]
        parts.append(f"{'flips' if flip['value'] else 'no flips'} (accuracy {flip['accuracy']:.0%}, flipped "
                     f"{flip['flipped_accuracy']:.0%})")
    if "padding" in record:
        parts.append(f"padding {record['padding']['value']} (image side {min(record['padding']['image_size'])})")
    images = f" of {record['images']} extra-set images" if "images" in record else ""
    return f"auto settings, from the infected model{images}: " + ", ".join(parts)
