"""DSnoT: training-free refinement of a pruning mask by prune-and-grow within each output row.

Zhang et al., ICLR 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", Sec. 3
(Eq. 5-8), as computed by the official code (github.com/zyxxmu/DSnoT, ``lib/prune.py``, ``prune_DSnoT``,
unstructured branch, with ``lib/layerwrapper.py`` ``WrappedGPT.add_batch`` for the statistics):

- Per weight, ``D_ij = W_ij * xbar_j`` with ``xbar_j`` the input's sum over tokens divided by the number of
  calibration windows (``sum_metric_row``); the row's expected reconstruction error of the mask is
  ``r_i = sum_{j pruned} D_ij``.
- Regrowing candidates: the pruned weights, ranked by ``D_ij / var_j ** pow_of_var_regrowing`` (``var_j``: the
  input's variance); while ``r_i > 0`` the one of largest value is regrown, else the one of smallest.
- Pruning candidates: the kept weights, those with ``D_ij < 0`` in ascending Wanda score then those with
  ``D_ij >= 0`` in descending Wanda score (``return_reorder_indice``); while ``r_i < 0`` the next one from the end
  (positive ``D``, smallest Wanda score) is pruned, else the next one from the start.
- One swap per row and cycle, for at most ``max_cycle_time`` cycles; a row stops for good once
  ``|r_i| <= update_threshold`` (and, with ``same_sign``, once a swap would flip the sign of ``r_i``).

Defaults are the official ``main.py``'s: ``max_cycle_time=50``, ``update_threshold=0.1``,
``pow_of_var_regrowing=1``, ``--without_same_sign`` True (``same_sign=False``), ``--skip_layer mlp`` (the MLP
layers keep their initial mask; ``skip=()`` refines every layer). The weights are not updated: the refined layer
is the dense weight times the refined mask, as in the official code (after SparseGPT too, whose weight updates are
then dropped, as the official ``initial_method sparsegpt`` never applies them).

Two differences, both for corner cases: every swap pairs one pruned and one kept weight of the same row, so the
zeros per row never change (the official lists also hold kept weights of zero score once a row runs out of
candidates); and ``var_j`` is the variance over all tokens (the official code averages per-window variances).
Only unstructured masks are refined (the official N:M branch is not implemented).
"""

from __future__ import annotations

import torch

from atprune.engine.stats import InputStats
from atprune.errors import ConfigError

REFINERS = ("dsnot",)


def check_refine(refine: str | None, pattern=None) -> None:
    """Raise ConfigError for an unknown ``--refine`` or one combined with an N:M pattern."""
    if refine is None:
        return
    if refine not in REFINERS:
        raise ConfigError(f"unknown refinement {refine!r}; known: {', '.join(REFINERS)}")
    if pattern is not None and getattr(pattern, "structured", False):
        raise ConfigError(f"--refine {refine} refines unstructured masks only, not pattern {pattern}")


def dsnot_skips(name: str, skip: tuple[str, ...] = ("mlp",)) -> bool:
    """Whether the official default ``--skip_layer mlp`` leaves layer ``name`` (relative to its block, e.g.
    ``mlp.down_proj``) with its initial mask: its first name component is in ``skip``."""
    return name.split(".")[0] in skip


def dsnot_refine(weight: torch.Tensor, pruned: torch.Tensor, stats: InputStats, *, max_cycle_time: int = 50,
                 update_threshold: float = 0.1, pow_of_var_regrowing: float = 1.0,
                 same_sign: bool = False) -> torch.Tensor:
    """Refine a pruning mask of one Linear layer (see the module docstring for the rule and its source).

    Args:
        weight: ``[out, in]`` dense weight (any float dtype and device; not modified).
        pruned: ``[out, in]`` bool, True = pruned (the initial mask, e.g. Wanda's).
        stats: the layer's calibration inputs (``sq_norm``, ``total``, ``windows``).
        max_cycle_time, update_threshold, pow_of_var_regrowing, same_sign: the official options.

    Returns:
        ``[out, in]`` bool refined mask on ``weight``'s device with the same number of True per row as ``pruned``.

    Raises:
        RuntimeError: no calibration input reached the layer.
    """
    w = weight.detach().float()
    dev = w.device
    mask = pruned.to(dev).clone()
    xbar = (stats.total / max(stats.windows, 1)).to(dev)
    var = stats.var().to(dev)
    metric = w * xbar.unsqueeze(0)  # D_ij
    wanda = w.abs() * stats.col_norm().to(dev).unsqueeze(0)
    rows, cols = w.shape
    ar = torch.arange(rows, device=dev)
    err = (metric * mask).sum(dim=1)
    start_sign = torch.sign(err)
    # regrowing list: pruned weights by D / var^p ascending (kept ones pushed to the end)
    grow_key = metric / var.pow(pow_of_var_regrowing).unsqueeze(0) if pow_of_var_regrowing else metric
    grow_key = torch.nan_to_num(grow_key, nan=0.0, posinf=torch.finfo(torch.float32).max,
                                neginf=-torch.finfo(torch.float32).max)
    grow = torch.sort(grow_key.masked_fill(~mask, float("inf")), dim=1, stable=True).indices
    n_pruned = mask.sum(dim=1)
    # pruning list: kept weights, D < 0 by ascending Wanda score, then D >= 0 by descending Wanda score
    neg = metric < 0
    key = torch.where(neg, wanda, -wanda).masked_fill(mask, float("inf"))
    order = torch.sort(key, dim=1, stable=True).indices
    group = torch.where(mask, 2, torch.where(neg, 0, 1)).gather(1, order)
    cut = torch.sort(group, dim=1, stable=True).indices
    shrink = order.gather(1, cut)
    n_kept = cols - n_pruned
    lo_g, hi_g = torch.zeros_like(n_pruned), n_pruned - 1  # pointers into each end of the lists
    lo_p, hi_p = torch.zeros_like(n_kept), n_kept - 1
    active = (n_pruned > 0) & (n_kept > 0)
    for _ in range(max_cycle_time):
        if not bool(active.any()):
            break
        up = err > 0
        gi = torch.where(up, hi_g, lo_g).clamp(0, cols - 1)
        g_idx = grow[ar, gi]
        down = err < 0
        pi = torch.where(down, hi_p, lo_p).clamp(0, cols - 1)
        p_idx = shrink[ar, pi]
        lo_g, hi_g = lo_g + (~up).long(), hi_g - up.long()
        lo_p, hi_p = lo_p + (~down).long(), hi_p - down.long()
        g_val, p_val = metric[ar, g_idx], metric[ar, p_idx]
        after = err + p_val - g_val
        ok = err.abs() > update_threshold
        if same_sign:
            ok &= start_sign == torch.sign(after)
        active &= ok & (lo_g <= hi_g + 1) & (lo_p <= hi_p + 1)
        rows_up = ar[active]
        mask[rows_up, p_idx[active]] = True
        mask[rows_up, g_idx[active]] = False
        err = torch.where(active, after, err)
    return mask
