"""The quantization step of the pruning pass: what :func:`atprune.api.prune` calls for every layer it prunes
(quantize a just-pruned weight, or prune and quantize it jointly), and the grids it keeps."""

from __future__ import annotations

import torch
from torch import nn

from atprune.engine.stats import InputStats
from atprune.pruners.base import Pattern
from atprune.pruners.sparsegpt import cached_inverse_factor
from atprune.quant.bits import atp_bits, mean_bits
from atprune.quant.gptq import gptq_quantize
from atprune.quant.grid import Grid
from atprune.quant.rtn import rtn_quantize
from atprune.quant.spec import QuantSpec, check_group_widths


def block_bits(spec: QuantSpec, sizes: list[int]) -> list[int]:
    """Bits of every block: ``spec.bits`` everywhere, or the ATP schedule (:func:`atprune.quant.bits.atp_bits`) for
    ``bits_allocation="atp"`` over blocks of ``sizes`` quantized weights."""
    if spec.bits_allocation == "atp":
        return atp_bits(spec.bits_mean, spec.bits_step, sizes, spec.bits_choices)
    return [spec.bits] * len(sizes)


def quant_key(spec: QuantSpec | None, sizes: list[int]) -> tuple | None:
    """What of ``spec`` determines the quantized weights (with the same masks and calibration): ``(method,
    group_size, symmetric, percdamp, blocksize, bits per block)``, so two schedules giving the same bits per block
    (e.g. ATP's step 0 and uniform bits) are one key; None without quantization."""
    if spec is None:
        return None
    return (spec.method, spec.group_size, spec.symmetric, spec.percdamp, spec.blocksize,
            tuple(block_bits(spec, sizes)))


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


class LayerQuant:
    """Quantizes the layers of one pruning run and keeps their grids.

    Args:
        spec: the quantization request.
        prune_spec: the run's :class:`atprune.api.PruneSpec` (SparseGPT + GPTQ run jointly, in one column walk).
        adapter: the model's :class:`atprune.models.adapter.Adapter` (block sizes for the bit schedule, widths).

    Attributes:
        bits: bits of every block (uniform, or ATP's schedule with the requested parameter-weighted mean).
        joint: SparseGPT's joint pruning + quantization (the pruner is then not called).
        needs_hessian: GPTQ reads ``X X^T``.

    Raises:
        ConfigError: a group size that does not divide a layer's input width.
    """

    def __init__(self, spec: QuantSpec, prune_spec, adapter):
        self.spec = spec
        self.prune_spec = prune_spec
        widths, sizes = {}, []
        for i, block in enumerate(adapter.blocks):
            linears = adapter.linears(block)
            widths.update({f"block {i} {n}": lin.in_features for n, lin in linears.items()})
            sizes.append(sum(lin.in_features * lin.out_features for lin in linears.values()))
        check_group_widths(widths, spec)
        self.sizes = sizes
        self.bits = block_bits(spec, sizes)
        self.joint = spec.method == "gptq" and prune_spec.method == "sparsegpt"
        self.needs_hessian = spec.needs_hessian
        self.grids: dict[tuple[int, str], tuple[object, Grid]] = {}

    def __call__(self, block: int, name: str, layer, weight: torch.Tensor, stats: InputStats | None,
                 joint_rate: float | None = None, pattern=None) -> torch.Tensor:
        """The quantized weight ``[out, in]`` (same dtype and device) of layer ``name`` of ``block``; with
        ``joint_rate`` (joint mode) ``weight`` is dense and pruned at that rate, or with the N:M ``pattern`` of the
        block (default: the run's; a mixed N:M run passes each block's)."""
        pattern = pattern if pattern is not None else self.prune_spec.pattern
        kwargs = {}
        if self.joint:
            kwargs = ({"joint_pattern": pattern} if pattern.structured else {"joint_sparsity": joint_rate})
        q, grid = quantize_layer(weight, stats, self.spec, self.bits[block], scale_dtype=weight.dtype, **kwargs)
        self.grids[(block, name)] = (layer, grid)
        return q

    def describe(self) -> dict:
        """JSON: the spec, bits per block and their parameter-weighted mean."""
        return {"spec": self.spec.describe(), "block_bits": list(self.bits),
                "mean_bits": mean_bits(self.bits, self.sizes), "joint": self.joint}

    def named_grids(self, model: nn.Module) -> dict[str, Grid]:
        """Parameter name (``model.layers.0.mlp.up_proj.weight``) -> grid, for the ``nn.Linear`` layers quantized."""
        names = {id(p): n for n, p in model.named_parameters()}
        out = {}
        for layer, grid in self.grids.values():
            if isinstance(layer, nn.Linear) and id(layer.weight) in names:
                out[names[id(layer.weight)]] = grid
        return out
