"""seqpack: padding-free training for any Hugging Face Transformers model, in two lines.

    from seqpack import patch
    patch(model)

Importing seqpack imports no optional package, writes no torch config and patches nothing.
"""

from .patching import UnsupportedModelError, is_patched, patch, unpatch
from .sampler import TokenBudgetBatchSampler

__version__ = "0.1.0"
__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "UnsupportedModelError",
    "TokenBudgetBatchSampler",
    "__version__",
]
