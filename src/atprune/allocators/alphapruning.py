"""AlphaPruning: heavy-tailed self-regularisation theory for layerwise sparsity.

Lu et al., NeurIPS 2024, "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for Improved Layer-wise
Pruning of Large Language Models". For every weight matrix, fit a power law ``p(lambda) ~ lambda^-alpha`` to the
tail of the empirical spectral density of ``W^T W`` (eigenvalues = squared singular values) with the Hill
estimator ``alpha = 1 + n / sum_i log(lambda_i / lambda_min)`` over the ``n`` eigenvalues >= ``lambda_min``,
where ``lambda_min`` is the peak of the histogram of ``log10(lambda)`` (100 bins). A block's alpha is the mean
over its matrices. Lower alpha = heavier tail = better trained = pruned less: alphas are mapped linearly onto
``[S(1-eps), S(1+eps)]`` (higher alpha, higher sparsity), then rescaled so the parameter-weighted mean is S.
Needs no calibration data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from atprune.allocators.base import NEEDS_WEIGHTS, Allocation, as_sizes, require_statistic, weighted_mean
from atprune.allocators.registry import register_allocator
from atprune.errors import ConfigError, check_sparsity


def hill_alpha(weight: torch.Tensor, bins: int = 100) -> float:
    """Power-law exponent of the eigenvalue tail of ``W^T W`` (``weight``: ``[out, in]``, any float dtype)."""
    eigs = torch.linalg.svdvals(weight.detach().float()).square()
    eigs = eigs[eigs > eigs.max() * 1e-12].double()
    if eigs.numel() < 2:
        return float("nan")
    logs = eigs.log10()
    hist = torch.histc(logs, bins=bins, min=logs.min().item(), max=logs.max().item())
    width = (logs.max() - logs.min()) / bins
    peak = int(hist.argmax())
    xmin = 10 ** (logs.min() + peak * width)
    tail = eigs[eigs >= xmin]
    denom = (tail / xmin).log().sum().item()
    return 1.0 + tail.numel() / denom if denom > 0 else float("nan")


@register_allocator("alphapruning")
class AlphaPruningAllocator:
    """``eps``: relative spread of the rates around S (default 0.3).

    Raises:
        ConfigError: unless ``0 <= eps < 1``.
    """

    needs = NEEDS_WEIGHTS

    def __init__(self, eps: float = 0.3):
        if not 0 <= eps < 1:
            raise ConfigError(f"alphapruning needs 0 <= eps < 1, got {eps}")
        self.eps = float(eps)

    def check(self, sparsity: float, num_blocks: int) -> None:
        check_sparsity(sparsity)

    def block_statistic(self, weights, col_norms=None) -> float:
        """The block's alpha: the mean :func:`hill_alpha` of its matrices."""
        return sum(hill_alpha(w) for w in weights.values()) / len(weights)

    def allocate(self, sparsity: float, block_sizes: int | Sequence[int],
                 statistic: Sequence[float] | None = None) -> Allocation:
        """One rate per block, parameter-weighted mean ``sparsity``, ordered like the block alphas.

        Raises:
            ConfigError: without the statistic, or if a rate leaves [0, 1).
        """
        sizes = as_sizes(block_sizes)
        alphas = require_statistic(self.name, statistic, len(sizes))
        lo, hi = min(alphas), max(alphas)
        unit = [0.5] * len(alphas) if hi == lo else [(a - lo) / (hi - lo) for a in alphas]
        raw = [sparsity * (1 - self.eps + 2 * self.eps * u) for u in unit]
        scale = sparsity / weighted_mean(raw, sizes) if sparsity > 0 else 0.0
        rates = [r * scale for r in raw]
        if max(rates) >= 1:
            raise ConfigError(f"alphapruning rate {max(rates):.3f} >= 1: eps {self.eps:g} too large for sparsity {sparsity:g}")
        return Allocation(tuple(rates), {"alpha": alphas})

    def describe(self) -> dict:
        return {"name": self.name, "eps": self.eps}
