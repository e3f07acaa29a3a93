"""ATP: an increasing arithmetic progression of per-block sparsity ratios.

Pruning block by block lets the reconstruction error grow with depth, so input-side blocks are
pruned less and output-side blocks more. Block i of L (i = 0 .. L-1, input side first) gets

    s_i = S - beta * (L - 1) / 2 + beta * i,

whose mean is S. Every s_i must lie in [0, 1], which gives the legal range

    0 <= beta <= min(2 S, 2 (1 - S)) / (L - 1).

Blocks of different sizes (p_i prunable weights): the step stays beta and the progression is shifted so that the
*parameter-weighted* mean is S, i.e. the fraction of weights removed is S, as for every allocator:

    s_i = S - beta * ibar + beta * i,   ibar = sum_i p_i i / sum_i p_i,

legal for 0 <= beta <= min(S / ibar, (1 - S) / (L - 1 - ibar)); with equal blocks ibar = (L - 1) / 2 and both
reduce to the formulas above (and are computed by them exactly).

Option ``attn_offset`` D (default 0, plain ATP): inside every block, attention projections are pruned D more than
MLP projections, the block's parameter-weighted rate kept at s_i (:mod:`atprune.allocators.offset`, where the legal
range of D is derived). It needs the block's attention / MLP split, so :func:`atprune.prune` applies it per layer
(unstructured sparsity only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from atprune.allocators.base import NEEDS_NOTHING, Allocation, as_sizes
from atprune.allocators.offset import split_rates
from atprune.allocators.registry import register_allocator
from atprune.errors import ConfigError, check_sparsity

_EPS = 1e-12


def _mean_index(sizes: list[int]) -> float:
    """Parameter-weighted mean block index ``ibar``; exactly ``(L-1)/2`` for equal sizes."""
    if len(set(sizes)) == 1:
        return (len(sizes) - 1) / 2
    return sum(p * i for i, p in enumerate(sizes)) / sum(sizes)


def beta_max(sparsity: float, blocks: int | Sequence[int]) -> float:
    """Largest legal beta for target ``sparsity`` S and ``blocks`` (L, or the L block sizes).

    Equal blocks: ``min(2S, 2(1-S)) / (L-1)``; sizes p_i: ``min(S / ibar, (1-S) / (L-1-ibar))`` (module docstring).
    Returns 0.0 for a single block (only beta = 0 is possible).
    """
    sizes = as_sizes(blocks)
    n = len(sizes)
    if n <= 1:
        return 0.0
    if len(set(sizes)) == 1:
        return min(2 * sparsity, 2 * (1 - sparsity)) / (n - 1)
    ibar = _mean_index(sizes)
    return min(sparsity / ibar, (1 - sparsity) / (n - 1 - ibar))


def _check_beta(sparsity: float, blocks: int | Sequence[int], beta: float) -> list[int]:
    check_sparsity(sparsity)
    if isinstance(blocks, int) and blocks < 1:
        raise ConfigError(f"number of blocks must be >= 1, got {blocks}")
    sizes = as_sizes(blocks)
    hi = beta_max(sparsity, sizes)
    if not (-_EPS <= beta <= hi + _EPS):
        rule = "min(2S, 2(1-S))/(L-1)" if len(set(sizes)) == 1 else "min(S/ibar, (1-S)/(L-1-ibar)) for these block sizes"
        raise ConfigError(f"illegal beta {beta:g}: for sparsity {sparsity:g} and {len(sizes)} blocks it must be in "
                          f"[0, {hi:.6g}] ({rule})")
    return sizes


def atp_rates(sparsity: float, blocks: int | Sequence[int], beta: float) -> list[float]:
    """``[s_0, ..., s_{L-1}]``, ``s_i = S - beta ibar + beta i`` (floats in [0, 1]); for ``blocks`` = L (or equal
    sizes) this is the paper's ``s_i = S - beta (L-1)/2 + beta i``.

    Raises:
        ConfigError: if S is outside [0, 1), there is no block, or beta is outside ``[0, beta_max(S, blocks)]``.
    """
    sizes = _check_beta(sparsity, blocks, beta)
    start = sparsity - beta * _mean_index(sizes)
    return [min(1.0, max(0.0, start + beta * i)) for i in range(len(sizes))]


@register_allocator("atp")
class ATPAllocator:
    """Arithmetic-progression allocation with step ``beta`` (see module docstring).

    Raises:
        ConfigError: without a beta (0 gives uniform).
    """

    needs = NEEDS_NOTHING
    tunable = "beta"

    def __init__(self, beta: float | None = None, attn_offset: float = 0.0):
        if beta is None:
            raise ConfigError("allocation 'atp' needs --beta (0 gives uniform)")
        self.beta = float(beta)
        self.attn_offset = float(attn_offset)  # attention rate minus MLP rate inside each block (0: plain ATP)

    def check(self, sparsity: float, blocks: int | Sequence[int]) -> None:
        """Raise ConfigError for an illegal S or beta for ``blocks`` (L equal blocks, or the L block sizes; the message
        prints the legal range), or an ``attn_offset`` with ``|D| >= 1`` (two rates in [0, 1) differ by less than 1;
        the exact range needs the model's attention / MLP sizes: :meth:`split`)."""
        _check_beta(sparsity, blocks, self.beta)
        if not (math.isfinite(self.attn_offset) and abs(self.attn_offset) < 1):
            raise ConfigError(f"illegal attn_offset {self.attn_offset:g}: attention and MLP rates lie in [0, 1), so "
                              "their difference must be in (-1, 1)")

    def split(self, sparsity: float, rates: Sequence[float],
              sublayers: Sequence[tuple[int, int]]) -> list[tuple[float, float]]:
        """``[(attention rate, MLP rate)]`` per block for block ``rates`` (of mean ``sparsity``) and ``sublayers``
        ``(a_i, m_i)`` (:func:`atprune.allocators.offset.split_rates`).

        Raises:
            ConfigError: a layer rate outside [0, 1); the message gives the legal interval of attn_offset.
        """
        return split_rates(rates, sublayers, self.attn_offset, f"sparsity {sparsity:g}, beta {self.beta:g}")

    def tunable_max(self, sparsity: float, block_sizes) -> float:
        """:func:`beta_max`."""
        return beta_max(sparsity, block_sizes)

    def block_statistic(self, weights, col_norms) -> float:
        raise NotImplementedError("atp needs no statistic")

    def allocate(self, sparsity: float, block_sizes: int | Sequence[int], statistic=None) -> Allocation:
        """Per-block rates, see :func:`atp_rates` (parameter-weighted mean S for blocks of different sizes)."""
        return Allocation(tuple(atp_rates(sparsity, block_sizes, self.beta)))

    def describe(self) -> dict:
        return {"name": self.name, "beta": self.beta} | ({"attn_offset": self.attn_offset} if self.attn_offset else {})
