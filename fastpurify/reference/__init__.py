"""Reference baselines: ANP, PGD and PBE as published, in plain eager PyTorch.

The yardstick every fast path is measured against, for correctness and for speed: official-code
semantics, no fusion, no tricks. Nothing here imports the fast path (``fastpurify.functional``,
``fastpurify.layers``, ``fastpurify.kernels``). Pruning (:mod:`fastpurify.pruning`) and the mask
file (:mod:`fastpurify.masks`) are shared with the fast engines.
"""

from .anp import ANPResult, ANPState, anp
from .noisy_layers import NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyLayerNorm, NoisyLinear, to_noisy
from .pbe import PBEResult, PBERound, pbe
from .pgd import pgd

__all__ = [
    "ANPResult", "ANPState", "NoisyBatchNorm1d", "NoisyBatchNorm2d", "NoisyLayerNorm", "NoisyLinear", "PBEResult", "PBERound", "anp", "pbe", "pgd",
    "to_noisy",
]
