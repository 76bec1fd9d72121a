"""A ReLU folded into the perturbed BatchNorm before it, in an engine's own converted copy of a model.

In a ResNet most BatchNorms feed a ReLU and nothing else (``relu(bn(conv(x)))``). Run apart, the
ReLU costs a pass over the activations forward (read, write) and one backward (read the gradient
and the output, write): on an H200 the ReLUs of ANP's step on the CIFAR ResNet-18 took about
1 ms of its 8 ms (``bench/results/gpucheck-2026-11-27-run3``). Fused, the BatchNorm kernel writes
ReLU(y) and its backward recomputes where y was positive from x, which it reads anyway
(:func:`fastpurify.functional.perturbed_batch_norm`, ``relu=True``). The other BatchNorm of each
block ends it, ``relu(bn2(conv2(h)) + shortcut)``: there the add is folded in too (``residual``),
the kernel reading the shortcut, writing ReLU(y + r) and, backward, r's gradient beside x's.

:func:`fuse_batch_norm_relu` traces the model with ``torch.fx`` (fastpurify's perturbed layers as
leaves), and wherever a fused-path :class:`~fastpurify.layers.PerturbedBatchNorm1d` / ``2d``'s
output goes to a ReLU (``F.relu``, ``torch.relu``, ``.relu()``, ``nn.ReLU``; in place or not)
and to nothing else, it removes the ReLU from the graph and sets the layer's ``fused_relu``; where
it goes to an add whose result goes to such a ReLU alone, the layer takes the add's other operand
as its residual (``fused_residual``). A layer the model calls more than once is never folded. The
result is a ``GraphModule`` over the same layer objects under the same names, computing the same
function. A model fx cannot trace (data-dependent control flow, say), or one whose modules carry
forward hooks (a traced graph would skip those of the modules it inlines), is returned unchanged.
This is for a copy an engine owns (the ANP engine's converted network): the layers' flags change.
:func:`fold_relus` is the same pass for any modules (``fastpurify.eval_norms`` folds the ReLUs
after a frozen model's eval BatchNorms for PGD).
"""

from __future__ import annotations

import operator
import warnings
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


ADDS = (operator.add, torch.add)  # fx traces ``out += shortcut`` as ``out + shortcut`` too


def _residual_add(node: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand where ``node`` adds ``source`` and one other node and nothing else
    (``a + b``, ``torch.add(a, b)``, in either order), else None."""
    if node.op != "call_function" or node.target not in ADDS or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if (a is source) == (b is source):
        return None
    other = b if a is source else a
    return other if isinstance(other, fx.Node) else None


def fold_relus(model: nn.Module, foldable, tracer: fx.Tracer | None = None,
               residual: bool = False) -> tuple[nn.Module, list[nn.Module]]:
    """``model`` traced (by ``tracer``, default fx's) with every plain ReLU removed whose input is a
    call of a module ``foldable(module)`` accepts, the model's only call of that module, and is used
    by that ReLU alone: ``(GraphModule, those modules)``, whose callers must then apply the ReLU
    themselves; ``(model, [])`` where nothing folds, fx cannot trace the model, or a module
    carries forward hooks. With ``residual`` (modules whose forward takes one: fastpurify's
    BatchNorms), also ``relu(m(x) + r)``, the add used by the ReLU alone and m's output by the add
    alone, becomes ``m(x, r)`` (called where the add was) and the module's ``fused_residual`` is set."""
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
        if len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if _is_relu_of(user, node, modules):  # relu(m(x)) -> m(x)
            relu, result, gone = user, node, (user,)
        else:  # relu(m(x) + r) -> m(x, r), called where the add was (after r)
            other = _residual_add(user, node) if residual and len(node.args) == 1 and not node.kwargs else None
            relu = next(iter(user.users)) if other is not None and len(user.users) == 1 else None
            if relu is None or not _is_relu_of(relu, user, modules):
                continue
            with graph.inserting_before(user):
                result = graph.call_module(node.target, (node.args[0], other))
            gone = (relu, user, node)
            module.fused_residual = True
        relu.replace_all_uses_with(result)
        for dead in gone:
            graph.erase_node(dead)
        folded.append(module)
    if not folded:
        return model, []
    graph.lint()
    out = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Folded")
    _keep_module_order(out, model)
    out.training = model.training  # the root's flag only: each layer keeps its own
    return out, folded


def _keep_module_order(copy: nn.Module, original: nn.Module) -> None:
    """Register ``copy``'s submodules, at every level, in ``original``'s order. A GraphModule
    registers them in the order its graph calls them, which a folded add changes (a block's
    shortcut BatchNorm before its bn2); the modules' order is the order of the neurons (the
    arena's layout, the noise draws), which must stay the model's."""
    rank = {name: i for i, name in enumerate(original._modules)}
    copy._modules = dict(sorted(copy._modules.items(), key=lambda item: rank.get(item[0], len(rank))))
    for name, child in copy._modules.items():
        if name in original._modules and child is not original._modules[name]:
            _keep_module_order(child, original._modules[name])


def fuse_batch_norm_relu(model: nn.Module, sample: torch.Tensor | None = None) -> tuple[nn.Module, int]:
    """``(model with the ReLUs folded into their BatchNorms, how many)``; ``(model, 0)`` where fx
    cannot trace it or nothing is to fuse (see the module docstring). With ``sample`` (a batch
    the model takes), the folded model's outputs on it are checked against the model's own: a
    model fx traced otherwise than it runs (Python-side state, say) is left unfolded, with a
    warning, rather than run as something else."""
    out, folded = fold_relus(model, lambda m: type(m) in FUSABLE and m.path == "fused", _Tracer(), residual=True)
    for layer in folded:
        layer.fused_relu = True
    if folded and sample is not None and not _same_outputs(out, model, folded, sample):
        return model, 0
    return out, len(folded)


def _same_outputs(folded_model: nn.Module, model: nn.Module, layers: list[nn.Module], sample: torch.Tensor) -> bool:
    """Whether the folded model gives the model's own outputs on ``sample`` (the model run with
    the layers' flags cleared); where not, the flags stay cleared and a warning says so."""
    flags = [(layer.fused_relu, layer.fused_residual) for layer in layers]
    with torch.no_grad():
        got = folded_model(sample)
        for layer in layers:
            layer.fused_relu = layer.fused_residual = False
        want = model(sample)
    if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and got.shape == want.shape:
        scale = float(want.abs().max()) + 1.0 if want.numel() else 1.0
        if torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5 * scale, equal_nan=True):
            for layer, (relu, residual) in zip(layers, flags):
                layer.fused_relu, layer.fused_residual = relu, residual
            return True
        gap = f"max |difference| {float((got.float() - want.float()).abs().max()):.3g}"
    else:
        gap = "outputs of another kind or shape"
    warnings.warn(f"the model as torch.fx traced it, with its ReLUs folded into the BatchNorms, computes other "
                  f"outputs than the model ({gap}); running it with its ReLUs apart", RuntimeWarning, stacklevel=3)
    return False
