"""A ReLU folded into the perturbed BatchNorm before it, in an engine's own converted copy of a model.

In a ResNet most BatchNorms feed a ReLU and nothing else (``relu(bn(conv(x)))``). Run apart, the
ReLU costs a pass over the activations forward (read, write) and one backward (read the gradient
and the output, write): on an H200 the ReLUs of ANP's step on the CIFAR ResNet-18 took about
1 ms of its 8 ms (``bench/results/gpucheck-2026-11-27-run3``). Fused, the BatchNorm kernel writes
ReLU(y) and its backward recomputes where y was positive from x, which it reads anyway
(:func:`fastpurify.functional.perturbed_batch_norm`, ``relu=True``).

:func:`fuse_batch_norm_relu` traces the model with ``torch.fx`` (fastpurify's perturbed layers as
leaves), and wherever a fused-path :class:`~fastpurify.layers.PerturbedBatchNorm1d` / ``2d``'s
output goes to a ReLU (``F.relu``, ``torch.relu``, ``.relu()``, ``nn.ReLU``; in place or not)
and to nothing else, it removes the ReLU from the graph and sets the layer's ``fused_relu``. The
result is a ``GraphModule`` over the same layer objects under the same names, computing the same
function. A model fx cannot trace (data-dependent control flow, say), or one whose modules carry
forward hooks (a traced graph would skip those of the modules it inlines), is returned unchanged.
This is for a copy an engine owns (the ANP engine's converted network): the layers' flags change.
:func:`fold_relus` is the same pass for any modules (``fastpurify.eval_norms`` folds the ReLUs
after a frozen model's eval BatchNorms for PGD).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .layers import PerturbedBatchNorm1d, PerturbedBatchNorm2d, _Neurons

RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
RELU_METHODS = ("relu", "relu_")
FUSABLE = (PerturbedBatchNorm1d, PerturbedBatchNorm2d)  # exact types: the norm-act layers run their own act


class _Tracer(fx.Tracer):
    """fastpurify's perturbed layers are leaves: traced as calls, never into."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _Neurons) or super().is_leaf_module(m, qualname)


def _is_relu_of(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a plain ReLU of ``source`` (no threshold, no other input): ``F.relu(x)``
    or ``F.relu(x, inplace)`` (positional or keyword), ``torch.relu(x)``, ``x.relu()``, ``nn.ReLU``."""
    if not node.args or node.args[0] is not source:
        return False
    if node.op == "call_function":
        inplace = node.args[1] if len(node.args) == 2 else None
        return (node.target in RELU_FUNCTIONS and len(node.args) <= 2 and set(node.kwargs) <= {"inplace"}
                and inplace in (None, True, False))
    if len(node.args) != 1 or node.kwargs:
        return False
    if node.op == "call_method":
        return node.target in RELU_METHODS
    return node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU


def _has_hooks(model: nn.Module) -> bool:
    """Whether any module carries forward hooks: a traced graph inlines the modules it does not
    keep as leaves, and their hooks (the root's too) would no longer run."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def fold_relus(model: nn.Module, foldable, tracer: fx.Tracer | None = None) -> tuple[nn.Module, list[nn.Module]]:
    """``model`` traced (by ``tracer``, default fx's) with every plain ReLU removed whose input is a
    call of a module ``foldable(module)`` accepts, the model's only call of that module, and is used
    by that ReLU alone: ``(GraphModule,
    those modules)``, whose callers must then apply the ReLU themselves; ``(model, [])`` where
    nothing folds, fx cannot trace the model, or a module carries forward hooks."""
    if _has_hooks(model):
        return model, []
    try:
        graph = (tracer or fx.Tracer()).trace(model)
    except Exception:  # noqa: BLE001 - any model fx cannot trace runs as it is
        return model, []
    modules = dict(model.named_modules())
    calls = Counter(id(modules[n.target]) for n in graph.nodes if n.op == "call_module" and n.target in modules)
    folded = []
    for node in list(graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is None or not foldable(module) or calls[id(module)] != 1:  # a flag set for one call would
            continue  # change every call of a module the model calls twice (under one name or two)
        users = list(node.users)
        if len(users) != 1 or not _is_relu_of(users[0], node, modules):
            continue
        relu = users[0]
        relu.replace_all_uses_with(node)
        graph.erase_node(relu)
        folded.append(module)
    if not folded:
        return model, []
    graph.lint()
    out = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Folded")
    out.training = model.training  # the root's flag only: each layer keeps its own
    return out, folded


def fuse_batch_norm_relu(model: nn.Module) -> tuple[nn.Module, int]:
    """``(model with the ReLUs folded into their BatchNorms, how many)``; ``(model, 0)`` where fx
    cannot trace it or nothing is to fuse (see the module docstring)."""
    out, folded = fold_relus(model, lambda m: type(m) in FUSABLE and m.path == "fused", _Tracer())
    for layer in folded:
        layer.fused_relu = True
    return out, len(folded)
