"""Images and labels from one file, read without running code: ``.npz`` (numpy, pickles
refused), ``.safetensors``, or ``.pt``/``.pth`` (``torch.load(weights_only=True)``), holding
the arrays ``images`` (or ``x``) and ``labels`` (or ``y``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..files import damage
from ..validation import InputError
from .convert import as_tensors

SUFFIXES = (".npz", ".safetensors", ".pt", ".pth")
_KEYS = (("images", "x"), ("labels", "y"))


def _pick(arrays: dict, path: Path) -> tuple:
    out = []
    for names in _KEYS:
        key = next((k for k in names if k in arrays), None)
        if key is None:
            raise InputError(f"{path} must hold arrays named {' or '.join(repr(k) for k in names)}; it holds "
                             f"{sorted(arrays) or 'nothing'}")
        out.append(arrays[key])
    return tuple(out)


def load_tensor_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` as :func:`fastpurify.data.as_tensors` returns them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: data files must be one of {', '.join(SUFFIXES)}")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        elif suffix == ".safetensors":
            from safetensors.torch import load_file
            arrays = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            arrays = dict(zip(("images", "labels"), loaded)) if isinstance(loaded, (tuple, list)) else loaded
            if not isinstance(arrays, dict):
                raise InputError(f"{path} must hold a dict {{'images': ..., 'labels': ...}} or a pair (images, "
                                 f"labels), got {type(loaded).__name__}")
    except InputError:
        raise
    except Exception as err:  # damaged, or pickled objects that the safe loaders refuse
        why = damage(path)
        if why:
            raise InputError(f"{path} is not a readable data file: {why}") from None
        raise InputError(f"{path} could not be read safely as arrays ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return as_tensors(_pick(arrays, path))
