"""Run a norm layer's own ``forward`` with a computed scale and shift in place of its parameters.

This is how fastpurify perturbs a norm whose forward it does not know (a subclass with its own
forward, an RMS norm, a norm with an ``*Fp32`` twist): for the duration of one call, the layer's
``weight`` and ``bias`` entries are the tensors given (e.g. ``weight * (mask + delta)``), and
whatever its forward does with them runs unchanged. With ``weight * 1`` and ``bias * (1 + 0)``
the values are bitwise the layer's own, so the result is exactly the original layer's. Shared by
the fast layers and the reference, which both need it and neither imports the other. The
perturbed scale and shift themselves come from each side's own rule (``functional.group_affine``
for the fast layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


def call_with_affine(module: nn.Module, forward: Callable, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``forward(module, x)`` while ``module.weight`` is ``weight`` and (if given) ``module.bias`` is ``bias``;
    the parameters are put back afterwards, also when the forward raises."""
    params = module._parameters
    saved = {name: params[name] for name in ("weight", "bias") if name in params}
    params["weight"] = weight
    if bias is not None:
        params["bias"] = bias
    try:
        return forward(module, x)
    finally:
        params.update(saved)

