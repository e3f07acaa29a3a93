"""atprune: one-shot LLM pruning with layer-wise sparsity allocation (ATP)."""

from atprune.models.adapter import Adapter
from atprune.api import PruneResult, evaluate_perplexity, plan, prune
from atprune.errors import ConfigError
from atprune.models.sources import load_model

__version__ = "0.1.0"

__all__ = ["Adapter", "ConfigError", "PruneResult", "evaluate_perplexity", "load_model", "plan", "prune", "__version__"]
