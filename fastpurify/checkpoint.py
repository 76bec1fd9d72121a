"""Load and save model weights safely.

A suspect model is untrusted input. safetensors files hold tensors only; ``.pt``/``.pth``
files are opened with ``torch.load(weights_only=True)``, which refuses pickled code. Running
arbitrary pickled code takes an explicit ``trust_pickle=True``. Outputs are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .files import atomic_path, damage
from .models import build_model
from .validation import InputError

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def save_model(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Write the model's state dict as safetensors, with ``metadata`` (JSON-encoded values)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_metadata(path: str | Path) -> dict:
    """The metadata saved with a safetensors file (empty for other formats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except Exception as err:  # safetensors raises SafetensorError (or OSError) for a damaged file
        raise _unreadable(path, err) from None
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def load_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch checkpoint, unwrapped from common containers
    (``{'state_dict': ...}``, ``{'model': ...}``) and DataParallel ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # SafetensorError for a damaged file
            raise _unreadable(path, err) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except Exception as err:  # torch raises UnpicklingError or RuntimeError, depending on version
            if damage(path):
                raise _unreadable(path, err) from None
            if trust_pickle:
                raise _unreadable(path, err) from err
            raise InputError(
                f"{path} could not be loaded as plain weights ({type(err).__name__}: {str(err).splitlines()[0]}). "
                "It may hold pickled Python code, which fastpurify does not run by default. Convert it to "
                "safetensors, or pass trust_pickle=True (--trust-pickle) only if you trust its author."
            ) from None
    for _ in range(3):
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if isinstance(state, dict):
            inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), (dict, nn.Module))), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = inner
                continue
        break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               in_channels: int | None = None, *, trust_pickle: bool = False) -> tuple[nn.Module, dict]:
    """Build ``arch`` and load the checkpoint into it strictly. Architecture, classes and
    channels default to the metadata fastpurify saved with the file."""
    meta = read_metadata(path)
    arch = arch or meta.get("arch")
    if arch is None:
        raise InputError(f"{path} does not say its architecture: pass arch (--arch), e.g. 'cifar_resnet18'")
    num_classes = num_classes or meta.get("num_classes", 10)
    in_channels = in_channels or meta.get("in_channels", 3)
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels)
    state = load_state_dict(path, trust_pickle=trust_pickle)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"{path} does not fit {arch} with {num_classes} classes and {in_channels} input "
                         f"channels: {_summary(str(err))}") from None
    return model, {**meta, "arch": arch, "num_classes": num_classes, "in_channels": in_channels}


def _unreadable(path: Path, err: Exception) -> InputError:
    why = damage(path) or f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
    return InputError(f"{path} is not a readable checkpoint: {why}")


def _summary(message: str, limit: int = 600) -> str:
    text = " ".join(line.strip() for line in message.splitlines()[1:]) or message
    return text if len(text) <= limit else text[:limit] + " ..."
