"""ATP: an increasing arithmetic progression of per-block sparsity ratios.

Pruning block by block lets the reconstruction error grow with depth, so input-side blocks are
pruned less and output-side blocks more. Block i of L (i = 0 .. L-1, input side first) gets

    s_i = S - beta * (L - 1) / 2 + beta * i,

whose mean is S. Every s_i must lie in [0, 1], which gives the legal range

    0 <= beta <= min(2 S, 2 (1 - S)) / (L - 1).
"""

from __future__ import annotations

from atprune.errors import ConfigError
from atprune.pruners.base import check_sparsity

_EPS = 1e-12


def beta_max(sparsity: float, num_blocks: int) -> float:
    """Largest legal beta for target ``sparsity`` S and ``num_blocks`` L: ``min(2S, 2(1-S)) / (L-1)``.

    Returns 0.0 for a single block (only beta = 0 is possible).
    """
    if num_blocks <= 1:
        return 0.0
    return min(2 * sparsity, 2 * (1 - sparsity)) / (num_blocks - 1)


def atp_rates(sparsity: float, num_blocks: int, beta: float) -> list[float]:
    """``[s_0, ..., s_{L-1}]`` with ``s_i = S - beta (L-1)/2 + beta i`` (floats in [0, 1]).

    Raises:
        ConfigError: if S is outside [0, 1), L < 1, or beta outside ``[0, beta_max(S, L)]``.
    """
    check_sparsity(sparsity)
    if num_blocks < 1:
        raise ConfigError(f"number of blocks must be >= 1, got {num_blocks}")
    hi = beta_max(sparsity, num_blocks)
    if not (-_EPS <= beta <= hi + _EPS):
        raise ConfigError(
            f"illegal beta {beta:g}: for sparsity {sparsity:g} and {num_blocks} blocks it must be in [0, {hi:.6g}] "
            f"(min(2S, 2(1-S))/(L-1))"
        )
    start = sparsity - beta * (num_blocks - 1) / 2
    return [min(1.0, max(0.0, start + beta * i)) for i in range(num_blocks)]


class ATPAllocator:
    """Arithmetic-progression allocation with step ``beta`` (see module docstring)."""

    name = "atp"
    needs_model = False

    def __init__(self, beta: float | None = None):
        if beta is None:
            raise ConfigError("allocation 'atp' needs --beta (0 gives uniform)")
        self.beta = float(beta)

    def check(self, sparsity: float, num_blocks: int) -> None:
        """Raise ConfigError for an illegal S or beta (the message prints the legal range)."""
        atp_rates(sparsity, num_blocks, self.beta)

    def rates(self, sparsity: float, num_blocks: int, context=None) -> list[float]:
        """Per-block sparsity ratios, see :func:`atp_rates`."""
        return atp_rates(sparsity, num_blocks, self.beta)

    def describe(self) -> dict:
        return {"name": self.name, "beta": self.beta}
