"""AlphaPruning: heavy-tailed self-regularisation theory for layerwise sparsity.

Lu et al., NeurIPS 2024, "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for Improved Layer-wise
Pruning of Large Language Models", as its official code computes it (haiquanlu/AlphaPruning):

* ``lib/esd_utils.py``, ``net_esd_estimator(fix_fingers="xmin_peak")`` (the ``alpha_peak`` metric, ``main.py``'s
  default): the eigenvalues of ``W^T W`` (squared singular values, ascending); a 100-bin histogram of their log10;
  ``xmin2 = 10 ** (left edge of the fullest bin)``. Every eigenvalue ``e_i`` from the smallest up to ``1.5 * xmin2`` is
  tried as the power-law cut-off, skipping those below ``log10(0.95 * xmin2)`` (the official code compares a linear
  eigenvalue with that logarithm; we keep its rule as it is): Hill's estimate over the ``n = N - i`` eigenvalues from
  ``e_i`` up, ``alpha_i = 1 + n / (sum_{k>=i} log e_k - n log e_i)``, and its Kolmogorov-Smirnov distance
  ``D_i = max_k |1 - (e_{i+k} / e_i)^(1 - alpha_i) - k / n|`` (only for ``alpha_i > 1``; else D = 1). The alpha
  with the smallest D (the first, on ties) is the matrix's alpha.
* ``lib/prune.py``, ``ww_sparsity`` with ``mapping_type="block_wise"``: a block's alpha is the mean over its
  matrices; alphas are mapped linearly onto ``[1 - eps, 1 + eps]`` (higher alpha, higher sparsity: a heavier tail,
  lower alpha, means better trained, pruned less) and scaled so that the parameter-weighted mean is S.

``eps`` defaults to ``main.py``'s 0.3; the official scripts (``scripts/llama_7b.sh``) use 0.3 for magnitude and 0.2
for Wanda and SparseGPT on LLaMA-7B, so tune it (``atprune compare --tune-peers``). Needs no calibration data.
Deviations, both for numerical safety only: eigenvalues are computed and fitted in float64 (the official code uses
float32), and eigenvalues that are exactly 0 (a rank-deficient matrix, whose log is -inf) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from atprune.allocators.base import NEEDS_WEIGHTS, Allocation, as_sizes, require_statistic, weighted_mean
from atprune.allocators.registry import register_allocator
from atprune.errors import ConfigError, check_sparsity

BINS = 100  # histogram bins of log10(eigenvalues) (net_esd_estimator's default)
XMIN_MAX = 1.5  # cut-offs are tried up to this times the histogram peak


def eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """Ascending float64 eigenvalues of ``W^T W`` (squared singular values of ``weight``: ``[out, in]``, any float
    dtype), exact zeros left out: ``[min(out, in)]`` at most."""
    eigs = torch.linalg.svdvals(weight.detach().double()).square().sort().values.cpu()
    return eigs[eigs > 0]


def peak_cutoff_range(eigs: torch.Tensor, bins: int = BINS) -> tuple[float, float]:
    """``(low, high)`` of the cut-offs the official ``xmin_peak`` rule tries: ``low = log10(0.95 * xmin2)`` (compared
    with linear eigenvalues, as the official code does) and ``high = 1.5 * xmin2``, with ``xmin2`` the left edge of the
    fullest bin of the histogram of ``log10(eigs)``."""
    logs = eigs.log10()
    lo, hi = logs.min().item(), logs.max().item()
    counts = torch.histc(logs, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    xmin2 = 10 ** edges[int(counts.argmax())].item()
    return math.log10(0.95 * xmin2), XMIN_MAX * xmin2


def alpha_peak(weight: torch.Tensor, bins: int = BINS) -> float:
    """Power-law exponent alpha of the eigenvalue tail of ``W^T W`` by the official ``xmin_peak`` fit (module
    docstring): the Hill estimate at the cut-off, among those tried, with the smallest KS distance.

    Args:
        weight: ``[out, in]`` matrix, any float dtype and device.

    Returns:
        alpha (float; nan for fewer than two non-zero eigenvalues; inf when the chosen tail is flat, e.g. the
        identity, as in the official code).
    """
    eigs = eigenvalues(weight)
    n_all = eigs.numel()
    if n_all < 2:
        return float("nan")
    low, high = peak_cutoff_range(eigs, bins)
    logs = eigs.log()
    suffix = logs.flip(0).cumsum(0).flip(0)  # sum_{k >= i} log e_k
    best_alpha, best_d = 0.0, 1.0  # the official defaults of a cut-off that is skipped
    for i in range(n_all - 1):
        xmin = eigs[i].item()
        if xmin < low:
            continue
        if xmin > high:
            break
        n = n_all - i
        spread = suffix[i].item() - n * logs[i].item()  # 0 when every eigenvalue from e_i up equals e_i
        alpha = 1 + n / spread if spread > 0 else math.inf  # the official float division gives inf there too
        if alpha > 1:
            seq = torch.arange(n, dtype=torch.float64)
            d = (1 - (eigs[i:] / xmin) ** (1 - alpha) - seq / n).abs().max().item()
        else:
            d = 1.0
        if d < best_d or (i == 0 and d == best_d):  # argmin: the first minimum
            best_alpha, best_d = alpha, d
    return float(best_alpha)


@register_allocator("alphapruning")
class AlphaPruningAllocator:
    """``eps``: relative spread of the rates around S (default 0.3).

    Raises:
        ConfigError: unless ``0 <= eps < 1``.
    """

    needs = NEEDS_WEIGHTS
    tunable = "eps"

    def __init__(self, eps: float = 0.3):
        if not 0 <= eps < 1:
            raise ConfigError(f"alphapruning needs 0 <= eps < 1, got {eps}")
        self.eps = float(eps)

    def tunable_max(self, sparsity: float, block_sizes) -> float:
        """``0.98 min(1, (1 - S) / S)``: the highest rate, about ``S (1 + eps)``, stays below 1."""
        return 0.98 * min(0.999, (1 - sparsity) / sparsity) if sparsity > 0 else 0.0

    def check(self, sparsity: float, num_blocks: int) -> None:
        check_sparsity(sparsity)

    def block_statistic(self, weights, col_norms=None) -> float:
        """The block's alpha: the mean :func:`alpha_peak` of its matrices (``mapping_type="block_wise"``)."""
        return sum(alpha_peak(w) for w in weights.values()) / len(weights)

    def allocate(self, sparsity: float, block_sizes: int | Sequence[int],
                 statistic: Sequence[float] | None = None) -> Allocation:
        """One rate per block, parameter-weighted mean ``sparsity``, ordered like the block alphas.

        Raises:
            ConfigError: without the statistic, a non-finite block alpha, or a rate leaving [0, 1).
        """
        sizes = as_sizes(block_sizes)
        alphas = require_statistic(self.name, statistic, len(sizes))
        if not all(math.isfinite(a) for a in alphas):
            bad = [i for i, a in enumerate(alphas) if not math.isfinite(a)]
            raise ConfigError(f"alphapruning: the alpha of block(s) {bad} is not finite (a degenerate spectrum, e.g. "
                              f"equal singular values); choose another allocation for this model")
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
