"""Every ANP neuron of a converted network (BatchNorm, LayerNorm or Conv/Linear) in one flat arena.

With ``P`` masked channels in total (layers in model order, channels in order), the arena holds

- ``mask`` (P,): the neuron masks m; each layer's ``neuron_mask`` is a slice of it;
- ``momentum`` (P,): the SGD momentum buffer of the masks;
- ``noise`` (2, 2, P): ``noise[g, k]`` for group g (0 clean, 1 perturbed) and kind k (0 delta,
  1 xi). The clean row stays zero, so the two-group mask step reads each layer's (2, C) noise
  as a strided view: group 0 is the clean pass, group 1 the perturbed one. ``noise[1]`` is the
  contiguous (2P,) vector the sign step updates in one launch;
- ``mask_grad`` (P,) and ``noise_grad`` (2, P): the gathered gradients (one ``torch.cat``).

The per-layer slices that are differentiated (masks; the perturbed group's delta and xi) are
leaf views with ``requires_grad``: autograd hands back their gradients, and in-place updates
of the arena (under ``no_grad``) are seen by every layer without copies. The arena never calls
a kernel: the engines update it through :mod:`fastpurify.functional`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import perturbed_layers
from .validation import InputError

MODES = ("clean", "perturbed", "grouped")


class NeuronArena:
    """The flat buffers of one converted model and the switch between its forward modes."""

    def __init__(self, model: nn.Module):
        self.layers = perturbed_layers(model)
        if not self.layers:
            raise InputError("the model holds no perturbed layer: convert it first (fastpurify.layers.convert)")
        first = next(iter(self.layers.values())).weight
        self.sizes = [layer.num_neurons for layer in self.layers.values()]
        self.num_neurons = sum(self.sizes)
        kw = dict(dtype=first.dtype, device=first.device)
        p = self.num_neurons
        self.mask = torch.cat([layer.neuron_mask.detach().reshape(-1) for layer in self.layers.values()]).to(**kw)
        self.momentum = torch.zeros(p, **kw)
        self.noise = torch.zeros(2, 2, p, **kw)
        self.mask_grad = torch.zeros(p, **kw)
        self.noise_grad = torch.zeros(2, p, **kw)
        self._mask_views, self._delta_views, self._xi_views = [], [], []
        self._grouped_delta, self._grouped_xi = [], []
        offset = 0
        for layer, c in zip(self.layers.values(), self.sizes):
            part = slice(offset, offset + c)
            offset += c
            self._mask_views.append(self.mask[part].requires_grad_())
            self._delta_views.append(self.noise[1, 0, part].requires_grad_())
            self._xi_views.append(self.noise[1, 1, part].requires_grad_())
            self._grouped_delta.append(self.noise[:, 0, part])
            self._grouped_xi.append(self.noise[:, 1, part])
            # The mask now lives in the arena: a plain attribute, no longer a module parameter.
            layer._parameters.pop("neuron_mask", None)
            layer.neuron_mask = self._mask_views[-1]
        self.set_mode("clean")

    @property
    def perturbation(self) -> torch.Tensor:
        """The perturbed group's noise as one contiguous (2P,) vector: every delta, then every xi."""
        return self.noise[1].view(-1)

    def set_mode(self, mode: str) -> None:
        """``clean``: m only; ``perturbed``: (m + delta, 1 + xi) on the whole batch;
        ``grouped``: the batch is [clean half; perturbed half], each half with its own statistics."""
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        for i, layer in enumerate(self.layers.values()):
            layer.perturbed = mode != "clean"
            layer.batch_groups = 2 if mode == "grouped" else 1
            if mode == "grouped":
                layer.noise, layer.noise_bias = self._grouped_delta[i], self._grouped_xi[i]
            else:
                layer.noise, layer.noise_bias = self._delta_views[i], self._xi_views[i]
        self.mode = mode

    @torch.no_grad()
    def draw_noise(self, eps: float, generator: torch.Generator) -> None:
        """delta, then xi ~ U(-eps, eps): one draw of 2P values, every neuron's delta then every
        xi (the reference's draw; one launch on a GPU)."""
        self.noise[1].uniform_(-eps, eps, generator=generator)

    def gather_noise_grad(self, loss: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
        """d loss / d (delta, xi) of the perturbed group into ``noise_grad`` (2, P), or added to
        it with ``accumulate`` (micro-batches); one gather."""
        grads = torch.autograd.grad(loss, self._delta_views + self._xi_views, materialize_grads=True)
        _gather(grads, self.noise_grad.view(-1), accumulate)
        return self.noise_grad

    def gather_mask_grad(self, loss: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
        """d loss / d m into ``mask_grad`` (P,), or added to it with ``accumulate``; one gather."""
        grads = torch.autograd.grad(loss, self._mask_views, materialize_grads=True)
        _gather(grads, self.mask_grad, accumulate)
        return self.mask_grad

    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks by layer name: copies on the CPU, float32 (float64 for a float64 model)."""
        return masks_by_layer(self.mask, self.layers, self.sizes)


def masks_by_layer(flat: torch.Tensor, names, sizes: list[int]) -> dict[str, torch.Tensor]:
    """A flat (P,) mask vector as {layer name: its slice}: CPU copies, float32 (float64 stays float64)."""
    flat = flat.detach().cpu()
    flat = flat if flat.dtype == torch.float64 else flat.float()
    return dict(zip(names, (part.clone() for part in flat.split(sizes))))


def _gather(grads: tuple[torch.Tensor, ...], out: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        out.add_(torch.cat(grads))
    else:
        torch.cat(grads, out=out)
