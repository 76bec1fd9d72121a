"""The fast engines, built on functional and layers (never on kernels directly)."""

from .anp import ANPDiverged, ANPEngine, anp
from .pbe import PBEEngine, pbe
from .pgd import PGDAttack, pgd

__all__ = ["ANPDiverged", "ANPEngine", "PBEEngine", "PGDAttack", "anp", "pbe", "pgd"]
