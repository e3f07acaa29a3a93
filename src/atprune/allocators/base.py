"""What model-dependent allocators may look at, and the mapping several of them share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atprune.models.adapter import Adapter
from atprune.errors import ConfigError


@dataclass
class AllocationContext:
    """The model and calibration data an allocator may use (built by :func:`atprune.prune`).

    Attributes:
        adapter: the model's :class:`atprune.models.adapter.Adapter`.
        windows: ``[nsamples, seqlen]`` int64 calibration tokens (None for data-free allocation).
        block_inputs: the captured block-0 inputs for ``windows`` (shared with the pruning pass).
        placement: the :class:`atprune.engine.placement.Placement` of the pruning pass (offloading), or None.
    """

    adapter: Adapter
    windows: torch.Tensor | None = None
    block_inputs: object | None = None
    placement: object | None = None

    def block_params(self) -> list[int]:
        """Number of prunable weights per block, input side first."""
        return [sum(lin.weight.numel() for lin in self.adapter.linears(b).values()) for b in self.adapter.blocks]

    def dense_block_stat(self, fn) -> list[float]:
        """``fn(linears, stats) -> float`` for every block of the *dense* model, with the Wanda input statistics
        (:class:`atprune.engine.stats.InputStats`) collected block by block on dense inputs (the OWL / DLP protocol).

        Raises:
            ConfigError: if no calibration windows were given.
        """
        from atprune.engine.passes import sequential

        if self.windows is None or self.block_inputs is None:
            raise ConfigError("this allocation needs calibration data")
        values: list[float] = []
        sequential(self.adapter, self.windows, lambda i, block, linears, stats: values.append(float(fn(linears, stats))),
                   inputs=self.block_inputs, placement=self.placement, last_outputs=False)
        return values


def wanda_scores(linears: dict, stats: dict) -> torch.Tensor:
    """All Wanda scores ``|W_ij| * ||X_j||_2`` of one block's Linear layers, flattened into one float32 vector."""
    return torch.cat([(lin.weight.detach().abs().float() * stats[name].col_norm().to(lin.weight.device)).flatten()
                      for name, lin in linears.items()])


def weighted_mean(values: list[float], weights: list[int]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def window_rates(score: list[float], sparsity: float, width: float, weights: list[int],
                 higher_is_sparser: bool) -> list[float]:
    """Min-max map ``score`` onto a window of ``width`` (rates differ by at most ``width``), then shift so the
    parameter-weighted mean is ``sparsity`` (OWL, Yin et al. 2024, Sec. 4; DLP uses the same mapping).

    Raises:
        ConfigError: if a rate leaves [0, 1) (the window is too wide for this sparsity).
    """
    lo, hi = min(score), max(score)
    unit = [0.5] * len(score) if hi == lo else [(v - lo) / (hi - lo) for v in score]
    if not higher_is_sparser:
        unit = [1 - u for u in unit]
    raw = [u * width for u in unit]
    shift = sparsity - weighted_mean(raw, weights)
    rates = [r + shift for r in raw]
    if min(rates) < 0 or max(rates) >= 1:
        raise ConfigError(f"rates {min(rates):.3f}..{max(rates):.3f} leave [0, 1): window {width:g} is too wide for "
                          f"sparsity {sparsity:g}")
    return rates
