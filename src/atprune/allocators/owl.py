"""OWL: outlier-weighted layerwise sparsity.

Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity (OWL)", Sec. 4: for each block, the layerwise
outlier distribution ``D_i`` is the fraction of its Wanda scores ``|W| * ||X||_2`` (all Linear sublayers
together, on the dense model's inputs) larger than ``M`` times their mean. Blocks with more outliers are pruned
less: ``D`` is min-max mapped onto a window of width ``2 * lambda`` and shifted so the mean sparsity is S.

As the official code computes it (luuyin/OWL, ``lib/prune_all.py``, ``prune_wanda_outlier`` with
``check_outlier_mean``): the outlier ratios of the dense blocks, scaled to ``[0, 2 Lamda]``, centred on the density
``1 - S`` (higher ratio, higher density); the defaults ``Hyper_m`` = 5 and ``Lamda`` = 0.08 are those of its LLaMA-7B
script. The shift here keeps the parameter-weighted mean at S (the official code keeps the plain mean; the same for
blocks of equal size).
"""

from __future__ import annotations

from collections.abc import Sequence

from atprune.allocators.base import (NEEDS_DENSE_WANDA, Allocation, as_sizes, require_statistic, wanda_scores,
                                     window_rates)
from atprune.allocators.registry import register_allocator
from atprune.errors import ConfigError, check_sparsity


def outlier_ratio(scores, m: float) -> float:
    """Fraction of ``scores`` (a 1-D tensor) strictly greater than ``m * scores.mean()``."""
    return (scores > m * scores.mean()).float().mean().item()


@register_allocator("owl")
class OWLAllocator:
    """``M`` (outlier threshold, default 5) and ``lam`` (half window, default 0.08).

    Raises:
        ConfigError: unless ``M > 0`` and ``0 <= lam < 0.5``.
    """

    needs = NEEDS_DENSE_WANDA
    tunable = "lam"  # M stays at its default 5 when tuning

    def __init__(self, M: float = 5.0, lam: float = 0.08):
        if not (M > 0 and 0 <= lam < 0.5):
            raise ConfigError(f"owl needs M > 0 and 0 <= lam < 0.5, got M={M}, lam={lam}")
        self.M, self.lam = float(M), float(lam)

    def tunable_max(self, sparsity: float, block_sizes) -> float:
        """``0.98 min(S, 1 - S)``: a window of ``2 lam`` centred on S stays inside [0, 1) (a skewed statistic can still
        push a rate out: that trial is then refused)."""
        return 0.98 * min(sparsity, 1 - sparsity, 0.499)

    def check(self, sparsity: float, num_blocks: int) -> None:
        check_sparsity(sparsity)

    def block_statistic(self, weights, col_norms) -> float:
        """The block's outlier ratio ``D_i`` (see :func:`outlier_ratio`) of its dense Wanda scores."""
        return outlier_ratio(wanda_scores(weights, col_norms), self.M)

    def allocate(self, sparsity: float, block_sizes: int | Sequence[int],
                 statistic: Sequence[float] | None = None) -> Allocation:
        """One rate per block (input side first), parameter-weighted mean ``sparsity``, max - min = 2 lam.

        Raises:
            ConfigError: without the statistic, or if a rate leaves [0, 1).
        """
        sizes = as_sizes(block_sizes)
        ratios = require_statistic(self.name, statistic, len(sizes))
        rates = window_rates(ratios, sparsity, 2 * self.lam, sizes, higher_is_sparser=False)
        return Allocation(tuple(rates), {"outlier_ratio": ratios})

    def describe(self) -> dict:
        return {"name": self.name, "M": self.M, "lam": self.lam}
