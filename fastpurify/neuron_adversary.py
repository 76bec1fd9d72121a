"""ANP's adversary on its own: one perturbation of every neuron, shared by all images.

On a converted network (:func:`fastpurify.layers.convert`) each neuron computes with
``(m + delta, 1 + xi)``; the adversary takes ``steps`` sign steps of ``2 * eps / steps`` from
zero on the mean cross-entropy of the given images, ``delta`` and ``xi`` clamped to ``eps``
(``steps=1``: every neuron at ``+-eps``, whichever way raises the loss). ANP's Fig. 1 perturbs
neurons this way; :mod:`fastpurify.selection` (the ``"neurons"`` probe) and ANP's
``eps="auto"`` (:mod:`fastpurify.anp_eps`) read the model's answer to it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as FP
from .arena import NeuronArena
from .inference import predict


def perturb_neurons(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, steps: int,
                    batch_size: int) -> NeuronArena:
    """Perturb the converted ``net`` (eval mode, frozen) adversarially on the images, ``batch_size``
    at a time (the gradients summed over the whole set); the returned arena holds the
    perturbation and leaves ``net`` in perturbed mode until another arena is made."""
    arena, n = NeuronArena(net), labels.numel()
    arena.set_mode("perturbed")
    for _ in range(steps):
        for s in range(0, n, batch_size):
            part = labels[s:s + batch_size]
            loss = F.cross_entropy(net(images[s:s + batch_size]), part, reduction="sum") / n
            arena.gather_noise_grad(loss, accumulate=s > 0)
        with torch.no_grad():
            FP.noise_sign_step_(arena.perturbation, arena.noise_grad.view(-1), 2 * eps / steps, eps, True)
    return arena


def perturbed_predictions(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, steps: int,
                          batch_size: int) -> torch.Tensor:
    """The labels ``net`` gives the images under the adversary of :func:`perturb_neurons`."""
    perturb_neurons(net, images, labels, eps=eps, steps=steps, batch_size=batch_size)
    return predict(net, images, batch_size)
