"""fastpurify: fast backdoor removal for image classifiers (ANP and PBE, fused Triton kernels).

Layering (data flows one way): kernels -> functional -> layers -> engines -> CLI.
"""

__version__ = "0.1.0"

from .validation import InputError  # noqa: E402

__all__ = ["InputError", "__version__"]
