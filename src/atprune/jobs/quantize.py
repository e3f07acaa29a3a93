"""The quantization options every pruning job shares (``--quantize``, ``--group-size``, ...), their checks, and the
report section they add (bits per block, honest sizes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atprune.errors import ConfigError
from atprune.quant.sizes import size_report
from atprune.quant.spec import DEFAULT_CHOICES, QuantSpec, make_spec


@dataclass(kw_only=True)
class QuantOptions:
    """Quantization of the pruned weights in the same pass (see :mod:`atprune.quant`).

    Attributes:
        quantize: ``"w4"``, ``"w8"`` (``wN``, N in 2..8) or None (no quantization).
        group_size: columns per scale (default 128); None, 0 or -1: one scale per output channel.
        quant_symmetric: symmetric grid (default) or asymmetric (zero point per group).
        quant_method: ``gptq`` (default; jointly with SparseGPT) or ``rtn`` (round to nearest).
        bits_allocation: ``uniform`` or ``atp`` (bits per block on ATP's schedule, mean ``bits_mean``).
        bits_mean, bits_step, bits_choices: the ATP bit schedule (see :func:`atprune.quant.bits.atp_bits`).
    """

    quantize: str | None = None
    group_size: int | None = 128
    quant_symmetric: bool = True
    quant_method: str = "gptq"
    bits_allocation: str = "uniform"
    bits_mean: float | None = None
    bits_step: float = 0.0
    bits_choices: tuple[int, ...] = field(default=DEFAULT_CHOICES)


def check_quant(opts, formats=(), save_dtype: str | None = None, run_dtype: str | None = None) -> QuantSpec | None:
    """The job's :class:`QuantSpec` (None without ``--quantize``), checked before any model is loaded.

    Raises:
        ConfigError: a bad quantization option; ``--format pack-quantized`` without ``--quantize``; a save dtype
            other than the run dtype with ``--quantize`` (the saved weights would leave the grid).
    """
    spec = make_spec(opts.quantize, group_size=opts.group_size, symmetric=opts.quant_symmetric,
                     method=opts.quant_method, bits_allocation=opts.bits_allocation, bits_mean=opts.bits_mean,
                     bits_step=opts.bits_step, bits_choices=opts.bits_choices)
    if spec is not None and getattr(opts, "refine", None):
        raise ConfigError("--refine and --quantize cannot be combined yet (DSnoT's swaps would leave the grid)")
    if "pack-quantized" in tuple(formats or ()) and spec is None:
        raise ConfigError("--format pack-quantized stores quantized weights; add --quantize w4 (or w8)")
    if spec is not None and save_dtype and run_dtype and save_dtype != run_dtype:
        raise ConfigError(f"--save-dtype {save_dtype} differs from the run dtype {run_dtype}: the quantized weights "
                          "would leave their grid; run with --dtype " + save_dtype)
    return spec


def quant_section(result, model, dtype: torch.dtype) -> dict:
    """The report's ``quantization`` section: spec, bits per block and their mean, and the honest sizes
    (:func:`atprune.quant.sizes.size_report`) of the quantized matrices."""
    matrices = []
    params = dict(model.named_parameters())
    for name, grid in getattr(result, "grids", {}).items():
        w = params[name]
        matrices.append({"rows": w.shape[0], "cols": w.shape[1], "nonzeros": int(torch.count_nonzero(w)),
                         "bits": grid.bits, "group_size": grid.group_size, "symmetric": grid.symmetric})
    bits = torch.finfo(dtype).bits
    return dict(result.quantization) | {"sizes": size_report(matrices, bits)}


def grid_tensors(result) -> dict[str, dict]:
    """name -> ``{"bits", "group_size", "symmetric", "scale", "zero"}`` (CPU tensors) for the pack-quantized writer."""
    return {name: {"bits": g.bits, "group_size": g.group_size, "symmetric": g.symmetric, "scale": g.scale.cpu(),
                   "zero": g.zero.cpu()} for name, g in getattr(result, "grids", {}).items()}


def check_quant_widths(adapter, spec: QuantSpec | None) -> None:
    """Raise ConfigError if ``spec``'s group size does not divide some prunable layer's input width (run right after
    the model is loaded, before any data or evaluation work)."""
    if spec is None:
        return
    from atprune.quant.spec import check_group_widths

    check_group_widths({f"block {i} {n}": lin.in_features for i, b in enumerate(adapter.blocks)
                        for n, lin in adapter.linears(b).items()}, spec)


def format_quant(section: dict) -> str:
    """Two lines for the CLI: bits per block, and bits per weight stored three ways."""
    spec, per = section["spec"], section["sizes"]["bits_per_weight"]
    how = (f"{spec['method']} {'symmetric' if spec['symmetric'] else 'asymmetric'}, "
           f"group {spec['group_size'] or 'per-channel'}" + (", joint with sparsegpt" if section.get("joint") else ""))
    return (f"quantized ({how}): bits per block {section['block_bits']} (mean {section['mean_bits']:.3f})\n"
            f"bits per weight: dequantized checkpoint {per['dequantized']:.0f}, packed {per['packed']:.3f}, "
            f"bitmap + codes {per['sparse_packed']:.3f} (no runtime yet)")
