"""The pruner interface, sparsity patterns, and the mask-selection helpers pruners share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from atprune.errors import ConfigError, check_sparsity  # noqa: F401  (check_sparsity: re-exported)
from atprune.engine.stats import InputStats


@dataclass(frozen=True)
class Pattern:
    """Where zeros may go.

    ``Pattern()`` is unstructured. ``Pattern(n, m)`` is N:M semi-structured sparsity: in every
    group of ``m`` consecutive weights along the input dimension of each output row, at most
    ``n`` weights are non-zero (NVIDIA 2:4 = ``Pattern(2, 4)``; sparsity ratio ``1 - n/m``).
    """

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """Sparsity ratio the pattern implies (``1 - n/m``), or ``None`` when unstructured."""
        return 1.0 - self.n / self.m if self.m else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """Parse ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).

        Raises:
            ConfigError: on anything else, or when not ``0 < N < M``.
        """
        text = text.strip().lower()
        if text in ("", "unstructured", "none"):
            return cls()
        parts = text.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(f"pattern must be 'unstructured' or 'N:M' such as 2:4 or 4:8, got {text!r}")
        n, m = int(parts[0]), int(parts[1])
        if not 0 < n < m:
            raise ConfigError(f"N:M pattern needs 0 < N < M (N kept out of every M), got {n}:{m}")
        return cls(n, m)

    def check_width(self, in_features: int, name: str = "layer") -> None:
        """Raise ConfigError if ``in_features`` is not divisible by ``m``."""
        if self.m and in_features % self.m:
            raise ConfigError(f"{name}: input width {in_features} is not divisible by M={self.m} of pattern {self}")


class Pruner(Protocol):
    """One pruning criterion (and, for SparseGPT, weight update), registered with
    :func:`atprune.pruners.registry.register_pruner`.

    ``prune`` is a pure tensor function: it returns the pruned weight and leaves ``weight`` as it was. The engine
    collects what the pruner declares it needs before calling it, and nothing else.

    Attributes:
        name: the registered name (``--method``).
        needs_stats: True if ``prune`` reads input statistics (False: data-free, no calibration pass at all).
        needs_hessian: True if the statistics must include ``X X^T`` (``InputStats(hessian=True)``).
    """

    name: str
    needs_stats: bool
    needs_hessian: bool

    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern) -> torch.Tensor:
        """Prune one Linear weight.

        Args:
            weight: ``[out_features, in_features]``, any float dtype and device.
            stats: statistics of the layer's calibration inputs (unused by magnitude).
            sparsity: fraction of weights to zero, in ``[0, 1)``; ignored for N:M patterns.
            pattern: unstructured or N:M.

        Returns:
            A new tensor of the same shape, dtype and device, with exactly the pruned entries zero
            (weights that were already zero count as pruned).
        """
        ...


def prune_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool) -> torch.Tensor:
    """Boolean mask of the weights to remove (True = prune): the lowest ``scores``.

    Args:
        scores: ``[rows, cols]`` importance, higher = keep.
        sparsity: fraction to remove; ignored for N:M.
        pattern: N:M removes the ``m - n`` lowest of every ``m`` consecutive columns in each row.
        per_row: unstructured only; True removes ``floor(cols * sparsity)`` in every row (Wanda's
            comparison group), False removes ``floor(numel * sparsity)`` over the whole matrix
            (one threshold, as magnitude pruning does).

    Returns:
        ``[rows, cols]`` bool tensor on the device of ``scores``. Ties are broken by position
        (stable sort), so the count is exact.
    """
    rows, cols = scores.shape
    if pattern.structured:
        pattern.check_width(cols)
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        idx = torch.topk(groups, pattern.m - pattern.n, dim=-1, largest=False).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
        return mask.reshape(rows, cols)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if per_row:
        k = int(cols * sparsity)
        if k:
            idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
            mask.scatter_(1, idx, True)
        return mask
    k = int(scores.numel() * sparsity)
    if k:
        idx = torch.sort(scores.flatten(), stable=True).indices[:k]
        mask.view(-1)[idx] = True
    return mask
