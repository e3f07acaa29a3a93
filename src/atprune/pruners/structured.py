"""Structured width scores: which MLP channels and which attention heads (whole KV groups) to remove.

Both scorers read a block's calibration statistics (collected before the block is changed) of the layer that consumes
the structure: an MLP channel j is input column j of ``down_proj``; a query head is a run of ``head_dim`` input
columns of ``o_proj``. As in the official code (github.com/CASIA-IVA-Lab/FLAP, ``lib/prune.py``):

- ``wanda-sp`` (``prune_wanda_sp``; An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for LLMs",
  the structured Wanda baseline): channel score ``mean_i |W_ij| ||X_j||_2``; head score: the sum of those over the
  head's columns.
- ``flap`` (``metrics['WIFV']`` with ``BiasGPT``; FLAP Eq. 4-6): channel score ``var_j * sum_i W_ij^2`` (the
  fluctuation of input j weighted by its column's squared norm); head score: the sum over the head's columns of that
  score squared (the official ``W_metric ** 2`` for ``o_proj``). Removed inputs are compensated by a bias
  ``b = sum_{j removed} W[:, j] * mean_j`` on the consuming layer (``compress(bias=True)``, FLAP Eq. 7).

Grouped-query attention: a KV head and its ``num_heads / num_kv_heads`` query heads are removed together; the score of
a group is the sum of its query heads' scores. The number removed per block is ``floor(rate * n)`` of the ``n``
channels or groups (the official ``sort(...)[int(n * ratio)]`` threshold), lowest scores first (ties: lower index
removed first). Per-block rates come from any atprune allocator instead of FLAP's own global ranking (``AL-AM``).
"""

from __future__ import annotations

import math

import torch

from atprune.engine.stats import InputStats
from atprune.errors import ConfigError

METHODS = ("wanda-sp", "flap")
STRUCTURES = ("channels", "heads", "both")


def check_structured(method: str, structure: str) -> None:
    """Raise ConfigError for an unknown structured method or structure (one line each)."""
    if method not in METHODS:
        raise ConfigError(f"--structure prunes with a structured method: {', '.join(METHODS)}; got --method {method!r}")
    if structure not in STRUCTURES:
        raise ConfigError(f"unknown structure {structure!r}; known: {', '.join(STRUCTURES)}")


def column_scores(method: str, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """Score of every input column of the consuming layer (see the module docstring).

    Args:
        method: ``wanda-sp`` or ``flap``.
        weight: ``[out, in]`` weight of ``down_proj`` / ``o_proj`` (any float dtype and device).
        stats: that layer's calibration input statistics.

    Returns:
        ``[in]`` float32, higher = more important.
    """
    w = weight.detach().float()
    if method == "wanda-sp":
        return (w.abs() * stats.col_norm().to(w.device).unsqueeze(0)).mean(dim=0)
    return stats.var().to(w.device) * w.square().sum(dim=0)


def head_scores(method: str, weight: torch.Tensor, stats: InputStats, head_dim: int) -> torch.Tensor:
    """``[num_heads]`` float32 score of every query head from ``o_proj``'s ``[hidden, num_heads * head_dim]`` weight."""
    cols = column_scores(method, weight, stats)
    if method == "flap":
        cols = cols.square()
    return cols.reshape(-1, head_dim).sum(dim=1)


def group_scores(heads: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[num_kv_heads]``: the sum of the scores of each KV group's query heads (consecutive, as repeat_kv lays
    them out)."""
    return heads.reshape(num_kv_heads, -1).sum(dim=1)


def removed_count(rate: float, n: int, what: str = "units", where: str = "block") -> int:
    """``floor(rate * n)``; ConfigError if that removes all ``n`` (a block needs at least one channel / KV group)."""
    k = math.floor(rate * n + 1e-9)
    if k >= n:
        raise ConfigError(f"{where}: rate {rate:g} removes all {n} {what}; lower the sparsity or beta")
    return k


def keep_indices(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Sorted int64 indices of the ``len(scores) - remove`` highest scores (the ``remove`` lowest are dropped; ties:
    the lower index dropped first)."""
    order = torch.sort(scores.float().cpu(), stable=True).indices
    return torch.sort(order[remove:]).values


def compensation(weight: torch.Tensor, stats: InputStats, keep: torch.Tensor) -> torch.Tensor:
    """FLAP's bias ``sum_{j not in keep} W[:, j] * mean_j``: ``[out]`` float32 (the expected contribution of the
    removed inputs, added back as a constant)."""
    w = weight.detach().float()
    removed = torch.ones(w.shape[1], dtype=torch.bool)
    removed[keep] = False
    mean = stats.mean().to(w.device) * removed.to(w.device)
    return w @ mean
