"""atprune: one-shot LLM pruning with layer-wise sparsity allocation (ATP)."""

from atprune.adapter import Adapter
from atprune.api import PruneResult, evaluate_perplexity, plan, prune
from atprune.errors import ConfigError
from atprune.sources import load_model

__version__ = "0.1.0"

__all__ = ["Adapter", "ConfigError", "PruneResult", "evaluate_perplexity", "load_model", "load_sparse", "plan", "prune",
           "sparsify_for_inference", "__version__"]

_SPARSE = ("sparsify_for_inference", "load_sparse")


def __getattr__(name: str):
    """``sparsify_for_inference`` and ``load_sparse`` come from :mod:`atprune.sparse`, imported on first use so
    that ``import atprune`` stays light."""
    if name in _SPARSE:
        import atprune.sparse as sparse

        return getattr(sparse, name)
    raise AttributeError(f"module 'atprune' has no attribute {name!r}")
