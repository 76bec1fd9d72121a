"""ANP's ``eps="auto"``: the neuron-perturbation bound read from the model, not from the paper.

The paper's eps 0.4 was set for a CIFAR-10 ResNet-18 (4,800 neurons). On smaller networks the
same bound breaks the whole model: on the CPU-scale CIFAR-10 CNNs (96 neurons) one sign step of
0.4 leaves 8-17 % clean accuracy, chance level, whether or not there is a backdoor, and ANP's
masks then fall broadly instead of on the backdoor (docs/anp-selection.md, fourth round: eps 0.1
ranked the backdoor's neurons first on every subject measured). So ``"auto"`` asks the model how
hard a neuron adversary hits it, on the defender's clean images and nothing else:

- the model (eval mode, as given) is converted (:func:`fastpurify.layers.convert`) and
  perturbed by one sign step of every neuron to ``+-eps``
  (:func:`fastpurify.neuron_adversary.perturb_neurons`, ``steps=1``);
- the chosen eps is the smallest of :data:`EPS_GRID` (0.025 to the paper's 0.4 in steps of
  0.025) at which the perturbed model keeps at most :data:`RETAINED` of its clean accuracy
  (binary search over the grid, assuming accuracy falls as eps grows); when even 0.4 leaves more,
  0.4 (``reached`` False).

Nothing here uses a trigger or knows the attack. The record names every eps tried and the
accuracy it left, and goes into the result's settings (``eps_auto``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .calibration import calibration_sample
from .inference import predict
from .layers import convert
from .neuron_adversary import perturbed_predictions

AUTO = "auto"
EPS_GRID = tuple(round(0.025 * k, 3) for k in range(1, 17))  # 0.025 ... 0.4, the paper's bound last
RETAINED = 0.5  # the share of the clean accuracy that one sign step of the chosen eps leaves at most


def _accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predictions == labels).double().mean())


def _frozen(model: nn.Module, mask_layers, device: torch.device) -> nn.Module:
    """An eval-mode converted copy of ``model`` on ``device``, its weights frozen."""
    return convert(model, mask_layers).to(device).eval().requires_grad_(False)


def auto_eps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, mask_layers, batch_size: int,
             device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Choose ANP's eps for ``model`` from the defender's clean ``images`` / ``labels`` (up to
    :data:`fastpurify.calibration.CALIBRATION_IMAGES`, a draw seeded with ``seed``): the record
    ``{"value", "reached", "retained", "clean_accuracy", "accuracy": {eps: accuracy}, "images"}``.
    ``model`` is not modified."""
    x, y = calibration_sample(images, labels, seed)
    x, y = x.to(device), y.to(device)
    net = _frozen(model, mask_layers, device)
    clean = _accuracy(predict(net, x, batch_size), y)
    tried: dict[float, float] = {}

    def low_enough(i: int) -> bool:
        eps = EPS_GRID[i]
        tried[eps] = _accuracy(perturbed_predictions(net, x, y, eps=eps, steps=1, batch_size=batch_size), y)
        return tried[eps] <= RETAINED * clean

    low, high = 0, len(EPS_GRID) - 1
    if low_enough(low):
        chosen, reached = low, True
    elif not low_enough(high):
        chosen, reached = high, False
    else:  # low fails, high passes: the smallest passing index in (low, high]
        while high - low > 1:
            middle = (low + high) // 2
            if low_enough(middle):
                high = middle
            else:
                low = middle
        chosen, reached = high, True
    return {"value": EPS_GRID[chosen], "reached": reached, "retained": RETAINED, "clean_accuracy": round(clean, 4),
            "accuracy": {f"{e:g}": round(a, 4) for e, a in sorted(tried.items())}, "images": int(y.numel())}


def describe(record: dict[str, Any]) -> str:
    """One line saying which eps "auto" chose and why."""
    tried = ", ".join(f"{e}: {100 * a:.1f} %" for e, a in record["accuracy"].items())
    why = (f"the smallest that leaves at most {record['retained']:g} of the clean accuracy "
           f"({100 * record['clean_accuracy']:.1f} %) under one sign step of every neuron"
           if record["reached"] else
           f"the paper's bound: no eps up to it leaves {record['retained']:g} of the clean accuracy or less")
    return f"eps auto: {record['value']:g}, {why} (on {record['images']} images; {tried})"
