"""The integer quantization grid of one weight matrix: per output row, one (scale, zero point) per group of columns.

The grid is GPTQ's min-max grid (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"; official code IST-DASLab/gptq ``quant.py``, ``Quantizer.find_params`` with
``weight=True, perchannel=True, mse=False`` and ``quantize``): for the values ``x`` of one row and group,

- ``xmin = min(min(x), 0)``, ``xmax = max(max(x), 0)`` (0 is always on the grid, so a pruned weight stays 0);
- symmetric: ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax`` where ``xmin < 0``; an all-zero group gets
  ``[-1, 1]``;
- ``scale = (xmax - xmin) / maxq`` with ``maxq = 2^bits - 1``; zero point ``(maxq + 1) / 2`` (symmetric) or
  ``round(-xmin / scale)`` (asymmetric);
- code ``q = clamp(round(x / scale) + zero, 0, maxq)``, value ``(q - zero) * scale``.

Scales are rounded to the dtype the weights are stored in (``scale_dtype``) before use, so that the dequantized
value ``(q - zero) * scale`` computed here in float32 equals what compressed-tensors computes from the stored scale
(``(q - zero).to(scale.dtype) * scale``) bit for bit: ``|q - zero| <= 255`` has at most 8 significant bits and a
16-bit scale at most 11, so the float32 product is exact and rounds once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def find_params(x: torch.Tensor, bits: int, symmetric: bool,
                scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``x`` (GPTQ ``Quantizer.find_params``, per channel, no MSE search).

    Args:
        x: ``[rows, n]`` float weights of one group of columns (pruned entries already 0).
        bits: code width, 2..8.
        symmetric: symmetric grid (zero point ``2^(bits-1)``) or asymmetric (rounded zero point).
        scale_dtype: dtype the scales are rounded to (the checkpoint's weight dtype).

    Returns:
        ``(scale, zero)``: ``[rows]`` float32 each; ``zero`` holds integers in ``[0, 2^bits - 1]``.
    """
    maxq = 2 ** bits - 1
    x = x.float()
    zeros = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    xmin = torch.minimum(x.min(dim=1).values, zeros)
    xmax = torch.maximum(x.max(dim=1).values, zeros)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(scale_dtype).float()
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero, 0, 2^bits - 1)`` as float32; ``x`` ``[rows, n]``, ``scale``
    and ``zero`` ``[rows, 1]`` (or broadcastable)."""
    return torch.clamp(torch.round(x.float() / scale) + zero, 0, 2 ** bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Value of codes ``q`` on the grid: ``(q - zero) * scale`` in float32."""
    return (q - zero) * scale


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded to the nearest grid value (GPTQ ``quantize``): ``dequantize(codes(x))``, float32."""
    return dequantize(codes(x, scale, zero, bits), scale, zero)


@dataclass
class Grid:
    """The grid a matrix was quantized on.

    Attributes:
        bits: code width (2..8).
        group_size: columns per group, or None (one group per row: per-channel).
        symmetric: symmetric or asymmetric grid.
        scale: ``[rows, groups]`` float32 (already rounded to the storage dtype).
        zero: ``[rows, groups]`` float32 integers in ``[0, 2^bits - 1]``.
    """

    bits: int
    group_size: int | None
    symmetric: bool
    scale: torch.Tensor
    zero: torch.Tensor

    def expand(self, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of every weight, ``[rows, cols]`` each."""
        width = self.group_size or cols
        return (self.scale.repeat_interleave(width, dim=1)[:, :cols],
                self.zero.repeat_interleave(width, dim=1)[:, :cols])

    def codes_of(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes ``[rows, cols]`` (int16) of a matrix that lies on this grid (its dequantized values)."""
        scale, zero = self.expand(weight.shape[1])
        return codes(weight.float(), scale, zero, self.bits).to(torch.int16)

    def values(self, q: torch.Tensor) -> torch.Tensor:
        """Float32 values ``[rows, cols]`` of codes ``q``."""
        scale, zero = self.expand(q.shape[1])
        return dequantize(q.float(), scale, zero)
