"""The fast engines, built on functional and layers (never on kernels directly)."""

from .anp import ANPDiverged, ANPEngine, anp

__all__ = ["ANPDiverged", "ANPEngine", "anp"]
