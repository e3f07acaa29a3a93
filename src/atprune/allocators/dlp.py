"""DLP: dynamic layerwise pruning by block importance.

Chen et al., ICML 2025, "DLP: Dynamic Layerwise Pruning in Large Language Models": a block's importance is
its mean Wanda score ``|W| * ||X||_2`` on dense inputs; more important blocks are pruned less. Importance is
min-max mapped onto a window of width ``2 * alpha`` and shifted so the mean sparsity is S. Default alpha:
0.04 up to 55 % sparsity, 0.1 up to 65 %, 0.15 above (the paper's settings at 50 / 60 / 70 %).
"""

from __future__ import annotations

from atprune.allocators.base import AllocationContext, wanda_scores, window_rates
from atprune.errors import ConfigError
from atprune.pruners.base import check_sparsity


def default_alpha(sparsity: float) -> float:
    """0.04 for S <= 0.55, 0.1 for S <= 0.65, else 0.15."""
    return 0.04 if sparsity <= 0.55 else 0.1 if sparsity <= 0.65 else 0.15


class DLPAllocator:
    """``alpha``: half window (default by sparsity, see :func:`default_alpha`)."""

    name = "dlp"
    needs_model = True

    def __init__(self, alpha: float | None = None):
        if alpha is not None and not 0 <= alpha < 0.5:
            raise ConfigError(f"dlp needs 0 <= alpha < 0.5, got {alpha}")
        self.alpha = alpha
        self.statistic: list[float] | None = None

    def check(self, sparsity: float, num_blocks: int) -> None:
        check_sparsity(sparsity)

    def rates(self, sparsity: float, num_blocks: int, context: AllocationContext | None = None) -> list[float]:
        """One rate per block, parameter-weighted mean ``sparsity``, max - min = 2 alpha.

        Raises:
            ConfigError: without a context or if a rate leaves [0, 1).
        """
        if context is None:
            raise ConfigError("dlp needs the model and calibration data")
        alpha = default_alpha(sparsity) if self.alpha is None else self.alpha
        self.alpha_used = alpha
        self.statistic = context.dense_block_stat(lambda linears, stats: wanda_scores(linears, stats).mean().item())
        return window_rates(self.statistic, sparsity, 2 * alpha, context.block_params(), higher_is_sparser=False)

    def describe(self) -> dict:
        return {"name": self.name, "alpha": getattr(self, "alpha_used", self.alpha), "importance": self.statistic}
