"""SparseGPT: one-shot pruning with optimal-brain-surgeon weight updates.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
Algorithm 1. For each Linear layer, with ``H = X X^T`` (fp32, dampened by ``percdamp`` times the mean
diagonal), walk the columns in blocks of ``blocksize``; in each block choose the mask by the OBS
saliency ``w^2 / U_jj^2`` with ``U`` the upper Cholesky factor of ``H^-1`` (over the whole block for
unstructured sparsity, per group of M for N:M),
zero those weights and spread the error ``(w - 0) / [H^-1]_jj`` onto the columns not yet processed
through the upper Cholesky factor of ``H^-1``.
"""

from __future__ import annotations

import logging

import torch

from atprune.pruners.base import Pattern
from atprune.stats import InputStats

log = logging.getLogger(__name__)


def inverse_hessian_cholesky(h: torch.Tensor, percdamp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``U^T U = (H + lambda I)^-1``).

    Args:
        h: ``[n, n]`` float32 symmetric PSD matrix (not modified).
        percdamp: ``lambda = percdamp * mean(diag(H))``; multiplied by 10 and retried (logged) whenever
            the Cholesky factorisation fails, up to ``max_tries`` times.

    Returns:
        ``(U, damping)``: ``[n, n]`` float32 upper-triangular factor and the damping fraction used.

    Raises:
        torch.linalg.LinAlgError: if it still fails after ``max_tries`` increases.
    """
    mean_diag = torch.mean(torch.diag(h))
    damp = percdamp
    for attempt in range(max_tries):
        hd = h.clone()
        hd.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                return upper, damp
        if attempt + 1 < max_tries:
            new = damp * 10 if damp > 0 else 1e-6
            log.warning("SparseGPT: Cholesky failed with damping %.3g of mean diag; retrying with %.3g", damp, new)
            damp = new
    raise torch.linalg.LinAlgError(f"SparseGPT: Hessian not positive definite even with damping {damp:.3g}")


class SparseGPTPruner:
    """OBS pruning with weight reconstruction; ``percdamp`` (default 0.01) and ``blocksize`` (default 128)."""

    name = "sparsegpt"
    needs_hessian = True
    needs_stats = True

    def __init__(self, percdamp: float = 0.01, blocksize: int = 128):
        self.percdamp = percdamp
        self.blocksize = blocksize
        self.last_damping: float | None = None

    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern) -> torch.Tensor:
        """See :meth:`atprune.pruners.base.Pruner.prune`. Computation in float32 on ``weight``'s device.

        Raises:
            RuntimeError: if ``stats`` carries no Hessian.
        """
        if stats is None:
            raise RuntimeError("sparsegpt needs the layer's Hessian (InputStats(hessian=True))")
        w = weight.detach().float().clone(memory_format=torch.contiguous_format)  # views (Conv1D) may be transposed
        rows, cols = w.shape
        blocksize = self.blocksize
        if pattern.structured:
            pattern.check_width(cols)
            # N:M groups are chosen inside a block: blocks must not split a group of M columns.
            blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
        h = stats.hessian().to(w.device).clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        hinv, self.last_damping = inverse_hessian_cholesky(h, self.percdamp)
        pruned = torch.zeros_like(w, dtype=torch.bool)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            w1 = w[:, i1:i2].clone()
            q1 = torch.zeros_like(w1)
            err1 = torch.zeros_like(w1)
            hinv1 = hinv[i1:i2, i1:i2]
            d = torch.diag(hinv1)
            if pattern.structured:
                mask1 = torch.zeros_like(w1, dtype=torch.bool)
            else:
                saliency = w1.square() / d.square().unsqueeze(0)
                k = int(saliency.numel() * sparsity)
                mask1 = torch.zeros_like(w1, dtype=torch.bool)
                if k:
                    idx = torch.sort(saliency.flatten(), stable=True).indices[:k]
                    mask1.view(-1)[idx] = True
            for j in range(i2 - i1):
                col = w1[:, j]
                if pattern.structured and j % pattern.m == 0:
                    grp = w1[:, j : j + pattern.m].square() / d[j : j + pattern.m].square().unsqueeze(0)
                    idx = torch.topk(grp, pattern.m - pattern.n, dim=1, largest=False).indices
                    mask1.scatter_(1, j + idx, True)
                q = col.masked_fill(mask1[:, j], 0.0)
                q1[:, j] = q
                e = (col - q) / d[j]
                w1[:, j:] -= e.unsqueeze(1) * hinv1[j, j:].unsqueeze(0)
                err1[:, j] = e
            w[:, i1:i2] = q1
            pruned[:, i1:i2] = mask1
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        w[pruned] = 0.0
        return w.to(weight.dtype)
