"""Run a norm layer's own ``forward`` with a computed scale and shift in place of its parameters.

This is how fastpurify perturbs a norm whose forward it does not know (a subclass with its own
forward, an RMS norm, a norm with an ``*Fp32`` twist): for the duration of one call, the layer's
``weight`` and ``bias`` entries are the tensors given (e.g. ``weight * (mask + delta)``), and
whatever its forward does with them runs unchanged. With ``weight * 1`` and ``bias * (1 + 0)``
the values are bitwise the layer's own, so the result is exactly the original layer's. Shared by
the fast layers and the reference, which both need it and neither imports the other.
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


def per_group_affine(weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                     noise: torch.Tensor | None, noise_bias: torch.Tensor | None, group: int):
    """Group ``group``'s scale ``weight * (mask + noise[g])`` and shift ``bias * (1 + noise_bias[g])``
    (``noise``/``noise_bias``: (groups, C), (C,) or None; a None bias stays None)."""
    scale = mask if noise is None else mask + noise.view(-1, mask.numel())[group]
    shift = bias if bias is None or noise_bias is None else bias * (1 + noise_bias.view(-1, mask.numel())[group])
    return weight * scale, shift
