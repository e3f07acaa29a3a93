"""One entry point per layer for the pruning pass: quantize a just-pruned weight (or prune and quantize it jointly)."""

from __future__ import annotations

import torch

from atprune.engine.stats import InputStats
from atprune.pruners.base import Pattern
from atprune.pruners.sparsegpt import cached_inverse_factor
from atprune.quant.bits import atp_bits
from atprune.quant.gptq import gptq_quantize
from atprune.quant.grid import Grid
from atprune.quant.rtn import rtn_quantize
from atprune.quant.spec import QuantSpec


def block_bits(spec: QuantSpec, sizes: list[int]) -> list[int]:
    """Bits of every block: ``spec.bits`` everywhere, or the ATP schedule (:func:`atprune.quant.bits.atp_bits`) for
    ``bits_allocation="atp"`` over blocks of ``sizes`` quantized weights."""
    if spec.bits_allocation == "atp":
        return atp_bits(spec.bits_mean, spec.bits_step, sizes, spec.bits_choices)
    return [spec.bits] * len(sizes)


def quantize_layer(weight: torch.Tensor, stats: InputStats | None, spec: QuantSpec, bits: int, *,
                   joint_sparsity: float | None = None, joint_pattern: Pattern | None = None,
                   scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, Grid]:
    """Quantize one Linear weight ``[out, in]`` (its zeros are the pruning mask and stay 0) to ``bits``.

    With ``joint_sparsity`` / ``joint_pattern`` (GPTQ only) the weight is dense and pruned in the same column walk
    (SparseGPT's joint compression, :func:`atprune.quant.gptq.gptq_quantize`).

    Raises:
        RuntimeError: GPTQ without a Hessian in ``stats``.
    """
    if spec.method == "rtn":
        return rtn_quantize(weight, bits, spec.group_size, spec.symmetric, scale_dtype)
    if stats is None:
        raise RuntimeError("GPTQ needs the layer's Hessian (InputStats(hessian=True))")
    upper, dead, _ = cached_inverse_factor(stats, spec.percdamp, weight.device)
    return gptq_quantize(weight, upper, dead, bits, spec.group_size, spec.symmetric, scale_dtype=scale_dtype,
                         blocksize=spec.blocksize, sparsity=joint_sparsity, pattern=joint_pattern)
