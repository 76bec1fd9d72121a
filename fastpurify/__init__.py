"""fastpurify: fast backdoor removal for image classifiers (ANP and PBE, fused Triton kernels).

    import fastpurify
    result = fastpurify.anp(model, (clean_images, clean_labels))     # masks per BatchNorm layer
    pruned = fastpurify.prune(model, result.masks, threshold=0.2)     # or number= / fraction=

    purified, report = fastpurify.pbe(model, train_data)              # progressive PBE, no clean data
    purified, report = fastpurify.pbe(model, clean_data=(x, y))       # PBE on a clean extra set
    x_adv = fastpurify.pgd(model, images, labels, eps=8 / 255)        # fused, graphed PGD

Layering (data flows one way): kernels -> functional -> layers -> engines -> CLI. The engines
are imported on first use, so ``import fastpurify`` (and the reference baselines) stay light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .validation import InputError  # noqa: E402

# Public name -> the module that defines it (imported lazily, PEP 562).
_LAZY = {
    "anp": "fastpurify.engines.anp",
    "ANPDiverged": "fastpurify.engines.anp",
    "ANPResult": "fastpurify.masks",
    "pgd": "fastpurify.engines.pgd",
    "pbe": "fastpurify.engines.pbe",
    "PBEResult": "fastpurify.purification",
    "PBEReport": "fastpurify.purification",
    "PBERound": "fastpurify.purification",
    "prune": "fastpurify.pruning",
    "prune_by_clean_accuracy": "fastpurify.pruning",
    "sweep": "fastpurify.pruning",
    "choose_pruning": "fastpurify.selection",
    "patch_order": "fastpurify.patch_order",
    "keep_freed_memory": "fastpurify.cpu_memory",
    "load_masks": "fastpurify.masks",
    "save_masks": "fastpurify.masks",
}

__all__ = ["InputError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastpurify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
