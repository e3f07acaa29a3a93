"""The allocator interface, what an allocator may ask for, and the mappings several of them share.

An allocator is pure: it gets the target S, the block sizes and (if it declares a need) one number per block that
the job computed for it, and returns the rates with the statistic behind them. It never runs the model and keeps
no state between runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from atprune.errors import ConfigError

# What an allocator asks the job to compute, one float per block, with its ``block_statistic``:
NEEDS_NOTHING = "nothing"  # rates from S and the block sizes alone (uniform, ATP)
NEEDS_WEIGHTS = "weights"  # from the dense weights alone (AlphaPruning: spectra); no calibration data
NEEDS_DENSE_WANDA = "dense_wanda"  # from the dense weights and the column norms ||X_j||_2 of each layer's input,
#                                    collected block by block on the *dense* model (OWL, DLP)
NEEDS = (NEEDS_NOTHING, NEEDS_WEIGHTS, NEEDS_DENSE_WANDA)


@dataclass(frozen=True)
class Allocation:
    """The result of an allocation.

    Attributes:
        rates: one sparsity ratio in [0, 1] per block, input side first; parameter-weighted mean S.
        statistic: what the rates were derived from, for the report (e.g. ``{"outlier_ratio": [...]}``);
            keys become ``allocator_<key>`` in the run's spec.
    """

    rates: tuple[float, ...]
    statistic: dict = field(default_factory=dict)


class Allocator(Protocol):
    """A layer-wise sparsity allocator, registered with :func:`atprune.allocators.registry.register_allocator`.

    Attributes:
        name: the registered name (``--allocation``).
        needs: one of :data:`NEEDS`: what the job must compute (with :meth:`block_statistic`) before
            :meth:`allocate`.
        tunable: the name of the one option that a fair comparison searches on held-out data (ATP's ``beta``,
            OWL's ``lam``, AlphaPruning's ``eps``, DLP's ``alpha``; 0 is uniform for each), or None.
    """

    name: str
    needs: str
    tunable: str | None  # the option a fair comparison tunes (its value 0 gives uniform), or None

    def tunable_max(self, sparsity: float, block_sizes: Sequence[int]) -> float:
        """Upper end of the range the tuner searches for ``tunable`` at ``sparsity`` (the lower end is 0)."""

    def check(self, sparsity: float, num_blocks: int | Sequence[int]) -> None:
        """Validate S and the options for ``num_blocks`` blocks (or, once the model is known, the block sizes) before
        any weight is touched (ConfigError)."""

    def block_statistic(self, weights: Mapping[str, torch.Tensor],
                        col_norms: Mapping[str, torch.Tensor] | None) -> float:
        """One block's number (only called when ``needs`` is not ``NEEDS_NOTHING``).

        Args:
            weights: layer name -> ``[out, in]`` dense weight (any float dtype and device; do not modify).
            col_norms: layer name -> ``[in]`` float32 ``||X_j||_2`` of the layer's dense calibration input
                (``NEEDS_DENSE_WANDA``), else None.
        """

    def allocate(self, sparsity: float, block_sizes: int | Sequence[int],
                 statistic: Sequence[float] | None = None) -> Allocation:
        """Rates for blocks of ``block_sizes`` prunable weights (an int L: L equal blocks), with parameter-weighted
        mean ``sparsity``; ``statistic``: the per-block numbers the job computed (None for ``NEEDS_NOTHING``).

        Raises:
            ConfigError: if no legal rates exist for these options (e.g. a window too wide for S).
        """

    def describe(self) -> dict:
        """The allocator's name and options, for the report."""


def as_sizes(block_sizes: int | Sequence[int]) -> list[int]:
    """``L`` -> ``[1] * L`` (equal blocks); a sequence of sizes is returned as a list.

    Raises:
        ConfigError: for no blocks or a size below 1.
    """
    sizes = [1] * block_sizes if isinstance(block_sizes, int) else [int(s) for s in block_sizes]
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"an allocation needs at least one block of at least one weight, got {block_sizes!r}")
    return sizes


def require_statistic(name: str, statistic: Sequence[float] | None, num_blocks: int) -> list[float]:
    """The per-block statistic as a list, checked to hold one number per block.

    Raises:
        ConfigError: if it is missing (the allocator was called without what it declared it needs) or has the
            wrong length.
    """
    if statistic is None:
        raise ConfigError(f"{name} needs the model (its per-block statistic); call it through atprune.prune")
    if len(statistic) != num_blocks:
        raise ConfigError(f"{name} got a statistic for {len(statistic)} blocks, expected {num_blocks}")
    return [float(v) for v in statistic]


def wanda_scores(weights: Mapping[str, torch.Tensor], col_norms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All Wanda scores ``|W_ij| * ||X_j||_2`` (Sun et al. 2023, Eq. 1) of one block's layers, flattened into one
    float32 vector (on the weights' device)."""
    return torch.cat([(w.detach().abs().float() * col_norms[name].to(w.device)).flatten()
                      for name, w in weights.items()])


def weighted_mean(values: Sequence[float], weights: Sequence[int]) -> float:
    """``sum(v * w) / sum(w)``."""
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def window_rates(score: Sequence[float], sparsity: float, width: float, weights: Sequence[int],
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
