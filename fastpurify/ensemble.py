"""K independent ANP runs as one: the arena of a seed ensemble and how its masks are combined.

ANP's masks swing with the random seed (issue 19: one seed in four leaves the backdoor, the
mean of four seeds' masks removes it). A seed ensemble trains K mask sets at once through one
converted network: member k draws its batches, augmentations and noise exactly as a single run
with seed ``seed + k`` would, and every batch holds the K members' images one after another
(K equal batch groups). The norm layers normalise each group with its own statistics and the
model's weights are frozen, so the members never mix: member k's gradients are those of its
own single run (float64 to rounding; tested).

The layers keep one shared ``neuron_mask`` of zeros and read each member's mask through their
per-group ``noise`` rows (scale ``weight * (0 + m_k [+ delta_k])``, shift ``bias * (1 + xi_k)``),
so every layer kind and both kernel backends serve the ensemble unchanged:

- ``clean``: K groups, row k is ``m_k``;
- ``perturbed``: K groups, row k is ``m_k + delta_k``, shift row ``xi_k``;
- ``grouped``: 2K groups, the K clean rows then the K perturbed ones (the batch is [clean
  copies of the K members' images; perturbed copies]).

The flat buffers are (K, P) and (K, 2, P), so the sign step and the mask step still update the
whole ensemble with one launch each.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .arena import MODES, masks_by_layer
from .data import DeviceBatchSampler, make_generator
from .layers import perturbed_layers
from .validation import InputError

AGGREGATES = ("mean", "rank")


class EnsembleArena:
    """The buffers of K ANP members over one converted model, and its forward modes."""

    def __init__(self, model: nn.Module, members: int):
        if not isinstance(members, int) or members < 2:
            raise InputError(f"an ensemble needs at least 2 members, got {members!r}")
        self.layers = perturbed_layers(model)
        if not self.layers:
            raise InputError("the model holds no perturbed layer: convert it first (fastpurify.layers.convert)")
        first = next(iter(self.layers.values())).weight
        self.members = members
        self.sizes = [layer.num_neurons for layer in self.layers.values()]
        self.num_neurons = p = sum(self.sizes)
        kw = dict(dtype=first.dtype, device=first.device)
        start = torch.cat([layer.neuron_mask.detach().reshape(-1) for layer in self.layers.values()]).to(**kw)
        self.mask = start.expand(members, p).clone()
        self.momentum = torch.zeros(members, p, **kw)
        self.noise = torch.zeros(members, 2, p, **kw)  # [k, 0]: delta of member k; [k, 1]: xi
        self.mask_grad = torch.zeros(members, p, **kw)
        self.noise_grad = torch.zeros(members, 2, p, **kw)
        self._mask_views, self._delta_views, self._xi_views = [], [], []
        offset = 0
        for layer, c in zip(self.layers.values(), self.sizes):
            part = slice(offset, offset + c)
            offset += c
            self._mask_views.append(self.mask[:, part].requires_grad_())
            self._delta_views.append(self.noise[:, 0, part].requires_grad_())
            self._xi_views.append(self.noise[:, 1, part].requires_grad_())
            layer._parameters.pop("neuron_mask", None)
            layer.neuron_mask = torch.zeros(c, **kw)  # each member's mask rides in the noise rows
        self.set_mode("clean")

    @property
    def perturbation(self) -> torch.Tensor:
        """Every member's noise as one contiguous vector (member-major: delta, then xi)."""
        return self.noise.view(-1)

    def set_mode(self, mode: str) -> None:
        """Point every layer at the rows of ``mode`` (see the module docstring). The rows are built
        from the current buffers, so call it before each forward pass."""
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        for layer, m, d, xi in zip(self.layers.values(), self._mask_views, self._delta_views, self._xi_views):
            layer.perturbed = True
            if mode == "clean":
                layer.batch_groups, layer.noise, layer.noise_bias = self.members, m, None
            elif mode == "perturbed":
                layer.batch_groups, layer.noise, layer.noise_bias = self.members, m + d, xi
            else:
                layer.batch_groups = 2 * self.members
                layer.noise = torch.cat([m, m + d])
                layer.noise_bias = torch.cat([torch.zeros_like(xi), xi])
        self.mode = mode

    @torch.no_grad()
    def draw_noise(self, eps: float, generators: list[torch.Generator]) -> None:
        """Member k's delta, then its xi ~ U(-eps, eps), in one draw from its own generator (a single
        run's draw)."""
        for k, generator in enumerate(generators):
            self.noise[k].uniform_(-eps, eps, generator=generator)

    def gather_noise_grad(self, loss: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self._delta_views + self._xi_views, materialize_grads=True)
        n = len(self._delta_views)
        both = torch.stack([torch.cat(grads[:n], dim=1), torch.cat(grads[n:], dim=1)], dim=1)
        _store(self.noise_grad, both, accumulate)
        return self.noise_grad

    def gather_mask_grad(self, loss: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self._mask_views, materialize_grads=True)
        _store(self.mask_grad, torch.cat(grads, dim=1), accumulate)
        return self.mask_grad

    def member_masks(self) -> list[dict[str, torch.Tensor]]:
        """Each member's masks by layer name: CPU copies, float32 (float64 for a float64 model)."""
        return [masks_by_layer(row, self.layers, self.sizes) for row in self.mask]


def _store(out: torch.Tensor, value: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        out.add_(value)
    else:
        out.copy_(value)


class MemberSamplers:
    """The K members' batch samplers, member k seeded ``seed + k``: one batch is their K batches
    one after another."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seeds: list[int], **options):
        self.samplers = [DeviceBatchSampler(images, labels, batch_size, seed=s, **options) for s in seeds]

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [s.sample() for s in self.samplers]
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    def sample_into(self, images: torch.Tensor, labels: torch.Tensor, rows: slice = slice(None)) -> None:
        """:meth:`sample`'s batch written into the buffers, member k's into its block of rows (every row)."""
        if rows != slice(None):
            raise InputError("an ensemble's batch is written whole (its members' blocks)")
        b = self.samplers[0].batch_size
        for k, sampler in enumerate(self.samplers):
            sampler.sample_into(images[k * b:(k + 1) * b], labels[k * b:(k + 1) * b])


def draws(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, members: int, *,
          device: torch.device, **options):
    """The batch sampler and noise generator(s) of a run with ``seed`` (the reference's: sampler
    seeded ``seed``, noise ``seed + 1``), or of ``members`` such runs with seeds ``seed + k``."""
    if members == 1:
        return (DeviceBatchSampler(images, labels, batch_size, seed=seed, device=device, **options),
                make_generator(seed + 1, device))
    return (MemberSamplers(images, labels, batch_size, [seed + k for k in range(members)], device=device, **options),
            [make_generator(seed + k + 1, device) for k in range(members)])


def aggregate_masks(members: list[dict[str, torch.Tensor]], how: str = "mean") -> dict[str, torch.Tensor]:
    """One score per neuron from the members' masks: ``"mean"`` the mean mask (stays in [0, 1], so
    the paper's threshold keeps its meaning), ``"rank"`` the mean of each member's normalised
    ascending rank (0 = the member's smallest mask, 1 = its largest; ties share their mean rank)."""
    if how not in AGGREGATES:
        raise InputError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    if not members:
        raise InputError("no member masks to aggregate")
    names, sizes = list(members[0]), [v.numel() for v in members[0].values()]
    flat = torch.stack([torch.cat([m[n].detach().double().cpu().reshape(-1) for n in names]) for m in members])
    if how == "rank":
        flat = torch.stack([_normalised_rank(row) for row in flat])
    out = flat.mean(0).to(next(iter(members[0].values())).dtype)
    return dict(zip(names, (part.clone() for part in out.split(sizes))))


def _normalised_rank(values: torch.Tensor) -> torch.Tensor:
    """Ascending ranks in [0, 1]; tied values get the mean of their ranks."""
    n = values.numel()
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    uniq, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # the first rank of each distinct value
    mean_rank = first.double() + (counts.double() - 1) / 2
    return mean_rank[inverse] / (n - 1)
