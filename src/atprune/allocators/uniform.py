"""Uniform allocation: every block gets the target sparsity ratio (the Wanda / SparseGPT default)."""

from __future__ import annotations

from atprune.pruners.base import check_sparsity


class UniformAllocator:
    """``s_i = S`` for every block i."""

    name = "uniform"
    needs_model = False

    def check(self, sparsity: float, num_blocks: int) -> None:
        """Raise ConfigError unless ``0 <= sparsity < 1``."""
        check_sparsity(sparsity)

    def rates(self, sparsity: float, num_blocks: int, context=None) -> list[float]:
        """Per-block sparsity ratios, a list of ``num_blocks`` floats equal to ``sparsity``."""
        self.check(sparsity, num_blocks)
        return [float(sparsity)] * num_blocks

    def describe(self) -> dict:
        return {"name": self.name}
