"""ANP neuron masks: one score in [0, 1] per neuron, and the official file format.

Masks are a ``dict`` from a masked layer's name in ``model.named_modules()`` (a BatchNorm such
as ``"layer1.0.bn1"``, a LayerNorm such as ``"encoder.layers.encoder_layer_0.ln_1"``, or a
Conv/Linear layer with the Eq. 3 option) to a 1-D tensor with one score per neuron (channel or
feature), layers in model order. Each file row names the layer and the neuron's index in it.

The file is the official ``mask_values.txt`` of ``optimize_mask_cifar.py``::

    No \\t Layer Name \\t Neuron Idx \\t Mask Score \\n
    0 \\t layer1.0.bn1 \\t 0 \\t 0.9876 \\n
    ...

one row per channel, numbered globally, scores with 4 decimals, fields separated by
``" \\t "`` and every line ending in ``" \\n"``, exactly as that script writes it.
:func:`save_masks` also writes full-precision JSON (``.json``) and CSV (``.csv``), chosen by
the file's suffix; :func:`load_masks` reads all three.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import write_text
from .validation import InputError

HEADER = "No \t Layer Name \t Neuron Idx \t Mask Score \n"


def check_masks(masks: dict[str, torch.Tensor]) -> None:
    """Masks must be a non-empty dict of layer names to non-empty 1-D finite tensors."""
    if not isinstance(masks, dict) or not masks:
        raise InputError("masks must be a non-empty dict {layer name: 1-D tensor of scores}")
    for name, values in masks.items():
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise InputError(f"mask layer names must be non-empty module names without spaces, got {name!r}")
        if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() == 0:
            raise InputError(f"the masks of {name!r} must be a non-empty 1-D tensor, one score per channel")
        if not bool(torch.isfinite(values).all()):
            raise InputError(f"the masks of {name!r} hold NaN or Inf")


def format_masks(masks: dict[str, torch.Tensor]) -> str:
    """The official ``mask_values.txt`` text."""
    check_masks(masks)
    lines = [HEADER]
    count = 0
    for name, values in masks.items():
        for idx, value in enumerate(values.detach().cpu().tolist()):
            lines.append(f"{count} \t {name} \t {idx} \t {value:.4f} \n")
            count += 1
    return "".join(lines)


def format_masks_json(masks: dict[str, torch.Tensor], settings: dict | None = None) -> str:
    """``{"layers": {name: [score, ...]}, "settings": {...}}`` with full float precision."""
    check_masks(masks)
    body = {"layers": {name: values.detach().double().cpu().tolist() for name, values in masks.items()}}
    if settings:
        body["settings"] = settings
    return json.dumps(body, indent=1) + "\n"


def format_masks_csv(masks: dict[str, torch.Tensor]) -> str:
    """CSV with the header ``no,layer,neuron,mask``, one row per channel, full precision."""
    check_masks(masks)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["no", "layer", "neuron", "mask"])
    count = 0
    for name, values in masks.items():
        for idx, value in enumerate(values.detach().double().cpu().tolist()):
            writer.writerow([count, name, idx, repr(value)])
            count += 1
    return out.getvalue()


FORMATS = (".txt", ".json", ".csv")


def save_masks(masks: dict[str, torch.Tensor], path: str | Path, settings: dict | None = None) -> Path:
    """Write the masks, atomically: ``.json`` and ``.csv`` at full precision (JSON with the
    ``settings`` if given), any other suffix in the official text format."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return write_text(path, format_masks_json(masks, settings))
    if suffix == ".csv":
        return write_text(path, format_masks_csv(masks))
    return write_text(path, format_masks(masks))


def parse_masks(text: str, source: str = "mask file") -> dict[str, torch.Tensor]:
    """Masks from official-format text: whitespace-separated ``No, layer, neuron index, score``
    rows after one header row (as the official ``read_data`` reads them). Each layer's indices
    must be 0..C-1, each once."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0].split()[:1] != ["No"]:
        raise InputError(f"{source} does not start with the header {HEADER.strip()!r}")
    rows: dict[str, dict[int, float]] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) != 4:
            raise InputError(f"{source}, line {lineno}: expected 4 fields (No, Layer Name, Neuron Idx, "
                             f"Mask Score), got {len(fields)}: {line.strip()!r}")
        _, name, idx_text, value_text = fields
        try:
            idx, value = int(idx_text), float(value_text)
        except ValueError:
            raise InputError(f"{source}, line {lineno}: the neuron index must be an integer and the score a "
                             f"number, got {idx_text!r} and {value_text!r}") from None
        if not math.isfinite(value):
            raise InputError(f"{source}, line {lineno}: the score must be finite, got {value_text!r}")
        layer = rows.setdefault(name, {})
        if idx in layer:
            raise InputError(f"{source}, line {lineno}: neuron {idx} of {name} appears twice")
        layer[idx] = value
    if not rows:
        raise InputError(f"{source} holds no mask rows")
    masks = {}
    for name, layer in rows.items():
        if sorted(layer) != list(range(len(layer))):
            raise InputError(f"{source}: the neuron indices of {name} must be 0..{len(layer) - 1}, each once")
        masks[name] = torch.tensor([layer[i] for i in range(len(layer))], dtype=torch.float32)
    return masks


def _masks_from_json(text: str, source: str) -> dict[str, torch.Tensor]:
    try:
        layers = json.loads(text)["layers"]
        masks = {name: torch.tensor([float(v) for v in values], dtype=torch.float32) for name, values in layers.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{source} is not a fastpurify mask JSON: expected {{\"layers\": {{name: [scores]}}}}") \
            from None
    check_masks(masks)
    return masks


def _masks_from_csv(text: str, source: str) -> dict[str, torch.Tensor]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip().lower() for c in rows[0]] != ["no", "layer", "neuron", "mask"]:
        raise InputError(f"{source} does not start with the header no,layer,neuron,mask")
    body = "".join(f"{r[0]} \t {r[1]} \t {r[2]} \t {r[3]} \n" for r in rows[1:] if r)
    return parse_masks(HEADER + body, source)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read masks written by fastpurify (``.txt``, ``.json``, ``.csv``) or by the official script."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    text, suffix = path.read_text(), path.suffix.lower()
    if suffix == ".json":
        return _masks_from_json(text, str(path))
    if suffix == ".csv":
        return _masks_from_csv(text, str(path))
    return parse_masks(text, source=str(path))


@dataclass
class ANPResult:
    """ANP's output (the reference and the fast engine): masks by layer name (model
    order), the mask loss of every iteration, the wall time, the settings, and what the engine
    did (device, precision, CUDA graph, ...). A seed ensemble (``seeds=K``) also keeps each
    member's masks and losses; ``masks`` is then their aggregate."""

    masks: dict[str, torch.Tensor]
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    members: list[dict[str, torch.Tensor]] = field(default_factory=list)
    member_loss: list[list[float]] = field(default_factory=list)

    @property
    def num_neurons(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def save(self, path: str | Path) -> Path:
        """Write the masks atomically: the official ``mask_values.txt`` format, or JSON / CSV
        by the file's suffix (see :func:`save_masks`)."""
        return save_masks(self.masks, path, settings=self.settings)
