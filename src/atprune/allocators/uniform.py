"""Uniform allocation: every block gets the target sparsity ratio (the Wanda / SparseGPT default)."""

from __future__ import annotations

from collections.abc import Sequence

from atprune.allocators.base import NEEDS_NOTHING, Allocation, as_sizes
from atprune.allocators.registry import register_allocator
from atprune.errors import check_sparsity


@register_allocator("uniform")
class UniformAllocator:
    """``s_i = S`` for every block i."""

    needs = NEEDS_NOTHING
    tunable = None

    def check(self, sparsity: float, num_blocks: int) -> None:
        """Raise ConfigError unless ``0 <= sparsity < 1``."""
        check_sparsity(sparsity)

    def block_statistic(self, weights, col_norms) -> float:
        raise NotImplementedError("uniform needs no statistic")

    def allocate(self, sparsity: float, block_sizes: int | Sequence[int], statistic=None) -> Allocation:
        """``sparsity`` for each of the blocks (``block_sizes``: L or the L sizes).

        Raises:
            ConfigError: unless ``0 <= sparsity < 1``.
        """
        check_sparsity(sparsity)
        return Allocation((float(sparsity),) * len(as_sizes(block_sizes)))

    def describe(self) -> dict:
        return {"name": self.name}
