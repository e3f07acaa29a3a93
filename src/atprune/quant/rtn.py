"""Round-to-nearest (RTN): every weight goes to the nearest value of its group's min-max grid, no error feedback.

The baseline GPTQ compares with (Frantar et al. 2022, Sec. 5, "RTN"); the grid is :mod:`atprune.quant.grid`.
Pruned weights (exact zeros) stay exactly 0 with no mask to carry: 0 is on every grid (its code is the zero
point, ``round(0 / scale) + zero``, and ``(zero - zero) * scale = 0``).
"""

from __future__ import annotations

import torch

from atprune.quant.grid import Grid, find_params, quantize


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                 scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, Grid]:
    """Quantize one matrix by rounding to nearest.

    Args:
        weight: ``[rows, cols]`` any float dtype; zeros are pruned weights and stay 0.
        bits: 2..8; group_size: columns per group (must divide ``cols``) or None (per channel).
        symmetric: grid type (see :func:`atprune.quant.grid.find_params`).
        scale_dtype: dtype of the stored scales (default ``weight.dtype``).

    Returns:
        ``(quantized, grid)``: ``[rows, cols]`` in ``weight``'s dtype and device, and its :class:`Grid`.

    Raises:
        ValueError: if ``group_size`` does not divide ``cols``.
    """
    w = weight.detach().float()
    rows, cols = w.shape
    width = group_size or cols
    if cols % width:
        raise ValueError(f"group size {width} does not divide the input width {cols}")
    scales, zeros, out = [], [], torch.empty_like(w)
    for c in range(0, cols, width):
        scale, zero = find_params(w[:, c:c + width], bits, symmetric, scale_dtype or weight.dtype)
        out[:, c:c + width] = quantize(w[:, c:c + width], scale[:, None], zero[:, None], bits)
        scales.append(scale)
        zeros.append(zero)
    return out.to(weight.dtype), Grid(bits, group_size, symmetric, torch.stack(scales, 1), torch.stack(zeros, 1))
