"""DLP: dynamic layerwise pruning by block importance.

Chen et al., ICML 2025, "DLP: Dynamic Layerwise Pruning in Large Language Models", as its official code computes it
(ironartisan/DLP, ``lib/prune.py``, ``get_dlp_ratios``, the unstructured path): a block's score is the mean of its
Wanda scores ``|W| * ||X||_2`` (all its Linear layers together, dense model, dense inputs); its importance is
``1 - score / sum(scores)``, min-max mapped onto ``[0, 2 alpha]`` and shifted so the mean *density* is ``1 - S``.
A higher mean Wanda score is therefore *lower* importance and *more* pruning (the official ratio files rise from
about 0.53 to 0.83 over LLaMA's blocks at 70 %); in sparsity terms the score itself is min-max mapped onto a window of
width ``2 alpha``, higher score higher sparsity. The shift here keeps the parameter-weighted mean at S (the official
code keeps the plain mean; the two agree for blocks of equal size).

The paper's text speaks of the median; the official unstructured path takes the mean (its structured N:M path offers
``--strategy`` mean, median, sum, ...), and this follows the code. Default alpha: 0.04 up to 55 % sparsity, 0.1 up to
65 %, 0.15 above (the paper's settings at 50 / 60 / 70 %).
"""

from __future__ import annotations

from collections.abc import Sequence

from atprune.allocators.base import (NEEDS_DENSE_WANDA, Allocation, as_sizes, require_statistic, wanda_scores,
                                     window_rates)
from atprune.allocators.registry import register_allocator
from atprune.errors import ConfigError, check_sparsity


def default_alpha(sparsity: float) -> float:
    """0.04 for S <= 0.55, 0.1 for S <= 0.65, else 0.15."""
    return 0.04 if sparsity <= 0.55 else 0.1 if sparsity <= 0.65 else 0.15


@register_allocator("dlp")
class DLPAllocator:
    """``alpha``: half window (default by sparsity, see :func:`default_alpha`).

    Raises:
        ConfigError: unless ``0 <= alpha < 0.5``.
    """

    needs = NEEDS_DENSE_WANDA
    tunable = "alpha"

    def __init__(self, alpha: float | None = None):
        if alpha is not None and not 0 <= alpha < 0.5:
            raise ConfigError(f"dlp needs 0 <= alpha < 0.5, got {alpha}")
        self.alpha = alpha

    def tunable_max(self, sparsity: float, block_sizes) -> float:
        """``0.98 min(S, 1 - S)`` (see :meth:`atprune.allocators.owl.OWLAllocator.tunable_max`)."""
        return 0.98 * min(sparsity, 1 - sparsity, 0.499)

    def check(self, sparsity: float, num_blocks: int) -> None:
        check_sparsity(sparsity)

    def block_statistic(self, weights, col_norms) -> float:
        """The block's mean dense Wanda score (``get_dlp_ratios``' ``abs(mean)``; the scores are non-negative)."""
        return wanda_scores(weights, col_norms).mean().item()

    def allocate(self, sparsity: float, block_sizes: int | Sequence[int],
                 statistic: Sequence[float] | None = None) -> Allocation:
        """One rate per block, parameter-weighted mean ``sparsity``, max - min = 2 alpha, higher mean Wanda score
        higher rate.

        Raises:
            ConfigError: without the statistic, or if a rate leaves [0, 1).
        """
        sizes = as_sizes(block_sizes)
        scores = require_statistic(self.name, statistic, len(sizes))
        alpha = default_alpha(sparsity) if self.alpha is None else self.alpha
        rates = window_rates(scores, sparsity, 2 * alpha, sizes, higher_is_sparser=True)
        return Allocation(tuple(rates), {"alpha": alpha, "mean_wanda_score": scores})

    def describe(self) -> dict:
        return {"name": self.name, "alpha": self.alpha}
