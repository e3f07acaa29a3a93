"""atprune: one-shot LLM pruning with layer-wise sparsity allocation (ATP).

The public API is imported on first use (PEP 562), so ``import atprune.sparse`` or ``import atprune.allocators``
does not pull in the pruning engine and transformers:

    >>> import atprune
    >>> model, tokenizer = atprune.load_model("smollm2-135m")
    >>> result = atprune.prune(model, tokenizer, method="wanda", sparsity=0.7, allocation="atp", beta=0.01)
"""

from __future__ import annotations

import importlib

from atprune.torchvision_compat import ensure_torchvision_importable

__version__ = "0.1.0"

# A CPU torch next to PyPI's CUDA-built torchvision (which timm pulls in) breaks even `from transformers import
# LlamaConfig`; this imports torchvision through the narrow workaround in that case only (no import otherwise).
ensure_torchvision_importable()

_PUBLIC = {  # name -> module that defines it
    "Adapter": "atprune.models.adapter",
    "ConfigError": "atprune.errors",
    "PruneResult": "atprune.api",
    "evaluate_perplexity": "atprune.api",
    "load_model": "atprune.models.sources",
    "load_sparse": "atprune.sparse",
    "plan": "atprune.api",
    "prune": "atprune.api",
    "sparsify_for_inference": "atprune.sparse",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'atprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
