"""A frozen model's eval-mode BatchNorms through fastpurify's fused kernels, for attacks on it.

In eval mode a BatchNorm is a per-channel affine map of its input,
``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, and an attack on a frozen
model (PGD, PBE's PGD) needs only its input gradient, ``weight / sqrt(running_var + eps) * dy``.
On CUDA PyTorch runs that gradient as a non-vectorised elementwise kernel plus layout copies when
the activations are channels_last: 18.6 + 17.9 ms of the fast PGD-10 step's 112 ms on an H200
(PreAct-ResNet-18, batch 512; ``bench/results/gpucheck-2026-11-27-run3``), against 8.3 ms for
cuDNN's whole eval forward.

:class:`EvalNorms` routes the forward of a model's eval-mode ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``
/ ``nn.BatchNorm3d`` / ``nn.SyncBatchNorm`` (exact types: a subclass may compute something else)
through :func:`fastpurify.functional.perturbed_batch_norm` with ``training=False``, a mask of ones
and no noise: one streaming kernel forward (``bn_normalize_kernel``, no statistics pass) and one
backward (``bn_grad_apply_kernel`` with only dx), both in the activations' own layout. The
kernels read the module's live weight, bias and running statistics, so a CUDA graph captured
through them stays valid while an optimizer updates those in place (the PBE engine).

Where such a BatchNorm's output feeds a ReLU and nothing else (PreAct-ResNet's ``relu(bn(x))``),
the ReLU is folded in too (:func:`fastpurify.fusion.fold_relus`: the model traced by torch.fx,
traced in eval mode, that ReLU removed from the graph and applied by the BatchNorm's kernels, its
backward recomputed from x): :meth:`EvalNorms.active` yields that traced model to run, whose
ReLUs exist only while the routing is active. A model fx cannot trace, or one with forward hooks,
runs as it is, its ReLUs apart.

What each module computes is the same formula; the rounding differs from cuDNN's by the order of
the operations (float32: a few units in the last place). A module in training mode, one
without running statistics, one whose weight or bias requires a gradient while autograd is on,
or an input the kernels cannot take (not on the module's device, not floating point) runs its own
forward, unchanged. The model is never modified: the routing is an instance attribute set only
inside :meth:`EvalNorms.active` and removed on exit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as FP
from .fusion import fold_relus
from .inference import eval_mode

ROUTED_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def routable(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm this routing serves: an exact type of ``ROUTED_TYPES``
    with running statistics, whose ``forward`` is not already replaced on the instance."""
    return (type(module) in ROUTED_TYPES and module.track_running_stats and module.running_mean is not None
            and module.running_var is not None and "forward" not in module.__dict__)


def _frozen_forward(module: nn.modules.batchnorm._BatchNorm, ones: torch.Tensor, relu_after: set[int],
                    x: torch.Tensor) -> torch.Tensor:
    """``module``'s eval forward through the fused kernels (then ReLU, where the traced model left
    it to the module: ``id(module)`` in ``relu_after``, read at each call, so that
    :meth:`EvalNorms.unfold` takes effect at once), or its own forward where the kernels do not apply."""
    relu = id(module) in relu_after
    params_need_grad = torch.is_grad_enabled() and any(
        p is not None and p.requires_grad for p in (module.weight, module.bias))
    if (module.training or params_need_grad or x.device != ones.device or x.dtype not in FP.FLOAT_DTYPES
            or FP.backend_for(x) != "triton"):
        y = type(module).forward(module, x)
        return F.relu(y) if relu else y
    module._check_input_dim(x)
    return FP.perturbed_batch_norm(x, module.weight, module.bias, ones, None, None, module.running_mean,
                                   module.running_var, training=False, eps=module.eps, relu=relu)


class EvalNorms:
    """The routable BatchNorms of ``model`` (:func:`routable`), each with a persistent mask of ones
    on its device (a CUDA graph captured through the routing keeps reading it after
    :meth:`active` has exited), and, with ``fold_relu``, ``model`` traced with the ReLUs that are
    all those BatchNorms feed left to them (``folded``: how many)."""

    def __init__(self, model: nn.Module, fold_relu: bool = True):
        self.model = model
        self.modules = [m for m in model.modules() if routable(m)]
        self._ones = [torch.ones(m.num_features, dtype=torch.float32, device=m.running_mean.device)
                      for m in self.modules]
        self.traced, relu_after = model, []
        if fold_relu and self.modules:
            ids = {id(m) for m in self.modules}
            with eval_mode(model):  # a forward that branches on self.training is traced as the attack runs it
                self.traced, relu_after = fold_relus(model, lambda m: id(m) in ids)
        self._relu_after = {id(m) for m in relu_after}

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def folded(self) -> int:
        return len(self._relu_after)

    def unfold(self) -> None:
        """Run the model as it is from now on, its ReLUs apart (the attack's self-check disagreed);
        the routed modules stop applying the ReLUs at once, inside :meth:`active` too."""
        self.traced = self.model
        self._relu_after.clear()

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Within the block each module's calls take the fused eval path (when in eval mode); yields
        the model to run: the traced one, or the model itself where a module whose ReLU was folded
        could not be routed (its forward replaced on the instance since)."""
        patched = []
        try:
            for module, ones in zip(self.modules, self._ones):
                if "forward" in module.__dict__:  # replaced since: leave it alone
                    continue
                module.forward = functools.partial(_frozen_forward, module, ones, self._relu_after)
                patched.append(module)
            routed = {id(m) for m in patched}
            yield self.traced if self._relu_after <= routed else self.model
        finally:
            for module in patched:
                del module.forward
