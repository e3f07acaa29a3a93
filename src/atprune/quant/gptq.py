"""GPTQ quantization that keeps a sparsity mask, and SparseGPT's joint pruning + quantization.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1; official code IST-DASLab/gptq ``gptq.py``, ``GPTQ.fasterquant``): with
``U`` the upper Cholesky factor of ``(H + lambda I)^-1`` (``H = X X^T`` of the layer's calibration inputs,
``lambda = percdamp * mean diag H``; inputs that are always 0 get ``H_jj = 1`` and their weights set to 0), walk
the columns in order, in blocks of ``blocksize``; quantize column j to its grid, and feed the error
``(w_j - q_j) / U_jj`` into the columns not yet quantized (``W[:, k] -= e * U[j, k]`` for ``k > j``; lazily, block
by block, for the later blocks). The grid of a group is found (:func:`atprune.quant.grid.find_params`) when the
walk reaches the group's first column, from the weights as updated so far (``groupsize != -1``, not
``static_groups``, no ``actorder``); per channel it is found once, from the weights before the walk.

Masks. A pruned weight is quantized to exactly 0 whatever the updates it received: the walk never revives it,
and its error (its updated value minus 0) is fed forward like any other, the OBS update of a fixed mask
(Frantar & Alistarh 2023, "SparseGPT", Sec. 3 and 4). With ``sparsity``/``pattern`` the mask is chosen inside the
walk as SparseGPT does (official code IST-DASLab/sparsegpt ``sparsegpt.py``, ``SparseGPT.fasterprune`` with a
``quantizer``: per block, the lowest OBS saliencies ``w^2 / U_jj^2``; for N:M per group of M at its first column)
and each column is pruned and quantized in the same step: SparseGPT's joint compression (paper Sec. 4, "Joint
Sparsification & Quantization"). The grid ignores pruned weights (they are 0, and 0 is always on the grid).

Deviation kept on purpose: the official code finds a group's grid from the weights before the updates of the
same block when ``groupsize < blocksize``; here blocks are aligned to groups and the grid always sees every
earlier update (for ``groupsize == blocksize == 128``, the default, the two are the same).
"""

from __future__ import annotations

import math

import torch

from atprune.pruners.base import Pattern
from atprune.pruners.sparsegpt import _unstructured_mask
from atprune.quant.grid import Grid, find_params, quantize


def _aligned_blocksize(blocksize: int, group_size: int | None, pattern: Pattern | None) -> int:
    """A block size that no group of ``group_size`` columns and no N:M group crosses."""
    if group_size:
        blocksize = group_size * max(1, blocksize // group_size)
    if pattern is not None and pattern.structured and blocksize % pattern.m:
        blocksize = blocksize * pattern.m // math.gcd(blocksize, pattern.m)
    return blocksize


def gptq_quantize(weight: torch.Tensor, upper: torch.Tensor, dead: torch.Tensor, bits: int,
                  group_size: int | None, symmetric: bool, *, scale_dtype: torch.dtype | None = None,
                  blocksize: int = 128, sparsity: float | None = None,
                  pattern: Pattern | None = None) -> tuple[torch.Tensor, Grid]:
    """Quantize one Linear weight with GPTQ, keeping its zeros (or choosing them jointly, SparseGPT-style).

    Args:
        weight: ``[rows, cols]`` any float dtype. Without ``sparsity``/``pattern`` its exact zeros are the pruning
            mask and stay exactly 0.
        upper: ``[cols, cols]`` float32 upper Cholesky factor of the damped inverse Hessian
            (:func:`atprune.pruners.sparsegpt.cached_inverse_factor`), on ``weight``'s device.
        dead: ``[cols]`` bool, inputs that were always 0 (their weights are set to 0).
        bits: 2..8; group_size: columns per group (divides ``cols``) or None (per channel); symmetric: grid type.
        scale_dtype: dtype of the stored scales (default ``weight.dtype``).
        blocksize: columns per lazy-update block (GPTQ default 128; aligned to the groups).
        sparsity: prune jointly (unstructured): fraction of each block's weights with the lowest OBS saliency.
        pattern: prune jointly with an N:M pattern (``sparsity`` is then ignored).

    Returns:
        ``(quantized, grid)``: ``[rows, cols]`` in ``weight``'s dtype and device, every entry on ``grid``, the
        pruned ones exactly 0.

    Raises:
        ValueError: if ``group_size`` (or an N:M pattern's M) does not divide ``cols``.
    """
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)
    rows, cols = w.shape
    if group_size and cols % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {cols}")
    joint_nm = pattern is not None and pattern.structured
    if joint_nm:
        pattern.check_width(cols)
    joint = joint_nm or sparsity is not None
    scale_dtype = scale_dtype or weight.dtype
    w[:, dead] = 0.0
    pruned = torch.zeros_like(w, dtype=torch.bool) if joint else w == 0
    scales, zeros = [], []
    if not group_size:
        scale, zero = find_params(w, bits, symmetric, scale_dtype)
        scales.append(scale)
        zeros.append(zero)
    bs = _aligned_blocksize(blocksize, group_size, pattern)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        w1 = w[:, i1:i2].clone()
        u1 = upper[i1:i2, i1:i2]
        d = torch.diag(u1)
        if joint_nm:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        elif joint:
            mask1 = _unstructured_mask(w1, d, sparsity)
        else:
            mask1 = pruned[:, i1:i2]
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            if joint_nm and j % pattern.m == 0:
                sal = w1[:, j:j + pattern.m].square() / d[j:j + pattern.m].square().unsqueeze(0)
                idx = torch.topk(sal, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1.scatter_(1, j + idx, True)
            if group_size and (i1 + j) % group_size == 0:
                grp = w1[:, j:j + group_size].masked_fill(mask1[:, j:j + group_size], 0.0)
                scale, zero = find_params(grp, bits, symmetric, scale_dtype)
                scales.append(scale)
                zeros.append(zero)
            col = w1[:, j]
            q = quantize(col.unsqueeze(1), scale.unsqueeze(1), zero.unsqueeze(1), bits).squeeze(1)
            q = q.masked_fill(mask1[:, j], 0.0)
            q1[:, j] = q
            e = (col - q) / d[j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            err1[:, j] = e
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    return w.to(weight.dtype), Grid(bits, group_size, symmetric, torch.stack(scales, 1), torch.stack(zeros, 1))
