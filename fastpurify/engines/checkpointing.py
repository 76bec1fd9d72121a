"""Activation checkpointing for the engines' forward passes, without renaming any module.

:func:`checkpoint_blocks` makes every *block* of a model (a child of an ``nn.Sequential`` or
``nn.ModuleList`` that itself holds at least two layers with parameters: a ResNet BasicBlock, a
ViT encoder block, a ConvNeXt or Swin block) run under ``torch.utils.checkpoint``: its
activations are dropped after the forward and recomputed in the backward, so the memory of a
pass holds one block's activations at a time plus every block's input. The block's ``forward``
is wrapped on the instance, so ``named_modules()`` (and mask names) are unchanged.

Recomputation must not move BatchNorm running statistics twice: the recompute runs under a
context that restores the block's buffers afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _buffers_restored(block: nn.Module) -> Iterator[None]:
    saved = [(b, b.detach().clone()) for b in block.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _is_block(module: nn.Module) -> bool:
    if isinstance(module, (nn.Sequential, nn.ModuleList)):
        return False
    with_params = [m for m in module.modules() if m is not module and any(True for _ in m.parameters(recurse=False))]
    return len(with_params) >= 2


def _checkpointed(block: nn.Module, forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        contexts = lambda: (contextlib.nullcontext(), _buffers_restored(block))  # noqa: E731
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)
    return run


def checkpoint_blocks(model: nn.Module) -> list[str]:
    """Wrap the forward of every block of ``model`` (in place) in activation checkpointing;
    returns the blocks' names (empty when the model has none, e.g. a plain Sequential of layers)."""
    names = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue
        for child_name, child in parent.named_children():
            if _is_block(child) and not getattr(child, "_fastpurify_checkpointed", False):
                child.forward = _checkpointed(child, child.forward)
                child._fastpurify_checkpointed = True
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def remove_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`checkpoint_blocks` in place (before a model is handed back to the user)."""
    for module in model.modules():
        if module.__dict__.pop("_fastpurify_checkpointed", False):
            module.__dict__.pop("forward", None)
    return model
