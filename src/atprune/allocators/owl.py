"""OWL: outlier-weighted layerwise sparsity.

Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity (OWL)", Sec. 4: for each block, the layerwise
outlier distribution ``D_i`` is the fraction of its Wanda scores ``|W| * ||X||_2`` (all Linear sublayers
together) larger than ``M`` times their mean. Blocks with more outliers are pruned less: ``D`` is min-max
mapped onto a window of width ``2 * lambda`` and shifted so the mean sparsity is S.
"""

from __future__ import annotations

from atprune.allocators.base import AllocationContext, wanda_scores, window_rates
from atprune.errors import ConfigError
from atprune.pruners.base import check_sparsity


def outlier_ratio(scores, m: float) -> float:
    """Fraction of ``scores`` (a 1-D tensor) strictly greater than ``m * scores.mean()``."""
    return (scores > m * scores.mean()).float().mean().item()


class OWLAllocator:
    """``M`` (outlier threshold, default 5) and ``lam`` (half window, default 0.08)."""

    name = "owl"
    needs_model = True

    def __init__(self, M: float = 5.0, lam: float = 0.08):
        if not (M > 0 and 0 <= lam < 0.5):
            raise ConfigError(f"owl needs M > 0 and 0 <= lam < 0.5, got M={M}, lam={lam}")
        self.M, self.lam = float(M), float(lam)
        self.statistic: list[float] | None = None

    def check(self, sparsity: float, num_blocks: int) -> None:
        check_sparsity(sparsity)

    def rates(self, sparsity: float, num_blocks: int, context: AllocationContext | None = None) -> list[float]:
        """One rate per block (input side first), parameter-weighted mean ``sparsity``, max - min = 2 lam.

        Raises:
            ConfigError: without a context (model and calibration data) or if a rate leaves [0, 1).
        """
        if context is None:
            raise ConfigError("owl needs the model and calibration data")
        self.statistic = context.dense_block_stat(lambda linears, stats: outlier_ratio(wanda_scores(linears, stats), self.M))
        return window_rates(self.statistic, sparsity, 2 * self.lam, context.block_params(), higher_is_sparser=False)

    def describe(self) -> dict:
        return {"name": self.name, "M": self.M, "lam": self.lam, "outlier_ratio": self.statistic}
