"""Wanda: prune by weight magnitude times input activation norm, within each output row.

Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for Large Language Models",
Eq. 1: ``S_ij = |W_ij| * ||X_j||_2``, compared per output (row i); no weight update.
"""

from __future__ import annotations

import torch

from atprune.pruners.registry import register_pruner
from atprune.pruners.base import Pattern, prune_mask
from atprune.engine.stats import InputStats


@register_pruner("wanda")
class WandaPruner:
    """Score ``|W_ij| * ||X_j||_2``; unstructured: lowest ``floor(in * s)`` in every row; N:M: per group."""

    needs_hessian = False
    needs_stats = True

    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern) -> torch.Tensor:
        """See :meth:`atprune.pruners.base.Pruner.prune`.

        Raises:
            RuntimeError: if ``stats`` is None or saw no input.
        """
        if stats is None:
            raise RuntimeError("wanda needs input statistics of the layer")
        scores = weight.abs().float() * stats.col_norm().to(weight.device).unsqueeze(0)
        mask = prune_mask(scores, sparsity, pattern, per_row=True)
        return weight.masked_fill(mask, 0)
