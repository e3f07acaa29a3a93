"""Magnitude pruning: remove the weights of smallest ``|W|``, one threshold per matrix.

Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks";
the layer-wise baseline of Sun et al. 2023 (Wanda, Table 2).
"""

from __future__ import annotations

import torch

from atprune.pruners.registry import register_pruner
from atprune.pruners.base import Pattern, prune_mask
from atprune.engine.stats import InputStats


@register_pruner("magnitude")
class MagnitudePruner:
    """Score ``|W_ij|``; unstructured: lowest ``floor(numel * s)`` over the whole matrix; N:M: per group."""

    needs_hessian = False
    needs_stats = False

    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern) -> torch.Tensor:
        """See :meth:`atprune.pruners.base.Pruner.prune`. ``stats`` is ignored."""
        mask = prune_mask(weight.abs().float(), sparsity, pattern, per_row=False)
        return weight.masked_fill(mask, 0)
