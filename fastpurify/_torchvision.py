"""Import torchvision, also where its compiled operators cannot load.

torchvision's wheels on PyPI are built against CUDA torch. Beside a CPU-only torch build its
compiled extension fails to load, and since torchvision 0.2x its import then stops at
``register_fake("torchvision::nms")`` for want of that operator's schema. fastpurify needs only
torchvision's pure-Python parts (model definitions, datasets), so on that failure we declare the
two missing schemas (no kernels: calling ``torchvision.ops.nms`` still fails clearly) and import
again. Where the extension loads, nothing is changed.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the schema library alive for the life of the process


def import_torchvision() -> ModuleType:
    global _library
    try:
        import torchvision
        return torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err) or _library is not None:
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for op, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, op):
            _library.define(schema)
    import torchvision
    return torchvision
