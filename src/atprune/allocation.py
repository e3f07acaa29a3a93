"""What an allocator needs, computed for it: block sizes and, where it declares a need, one number per block.

Allocators are pure (:mod:`atprune.allocators`); this module is the one place that runs the model for them:
``NEEDS_WEIGHTS`` reads the dense weights, ``NEEDS_DENSE_WANDA`` runs the block-by-block engine on the dense model
and hands each block's weights and input column norms to the allocator's ``block_statistic``.
"""

from __future__ import annotations

import torch

from atprune.allocators import NEEDS_DENSE_WANDA, NEEDS_NOTHING, NEEDS_WEIGHTS, Allocation
from atprune.engine.passes import BlockInputs, sequential
from atprune.engine.placement import Placement
from atprune.errors import ConfigError
from atprune.models.adapter import ATTENTION, MLP, Adapter, sublayer


def block_sizes(adapter: Adapter) -> list[int]:
    """Number of prunable weights per block, input side first (embeddings and lm_head are not in any block)."""
    return [sum(lin.weight.numel() for lin in adapter.linears(b).values()) for b in adapter.blocks]


def sublayer_sizes(adapter: Adapter) -> list[tuple[int, int]]:
    """``(a_i, m_i)`` per block: prunable weights of its attention and of its MLP layers
    (:func:`atprune.models.adapter.sublayer`).

    Raises:
        ConfigError: a layer that is neither (it would break the block's rate constraint of ``attn_offset``).
    """
    sizes = []
    for i, block in enumerate(adapter.blocks):
        counts = {ATTENTION: 0, MLP: 0}
        for name, lin in adapter.linears(block).items():
            kind = sublayer(name)
            if kind is None:
                raise ConfigError(f"attn_offset needs every prunable layer to be attention or MLP; block {i} layer "
                                  f"{name!r} is neither (see atprune.models.adapter.sublayer)")
            counts[kind] += lin.weight.numel()
        sizes.append((counts[ATTENTION], counts[MLP]))
    return sizes


def layer_rates(allocator, sparsity: float, adapter: Adapter, rates) -> tuple[dict[str, float], ...] | None:
    """Per-layer rates of an allocator with an ``attn_offset`` (ATP), from its block ``rates``: one
    ``{layer name: rate}`` per block, attention layers at the block's attention rate and MLP layers at its MLP rate
    (:mod:`atprune.allocators.offset`). None when the allocator has no offset (or it is 0): every layer of block i
    then takes ``rates[i]``.

    Raises:
        ConfigError: a layer that is neither attention nor MLP, or an offset that puts a layer rate outside [0, 1)
            (the message gives the legal interval).
        RuntimeError: a block whose parameter-weighted layer rate is not its block rate (a bug).
    """
    if not getattr(allocator, "attn_offset", 0.0):
        return None
    sizes = sublayer_sizes(adapter)
    pairs = allocator.split(sparsity, rates, sizes)
    out = []
    for i, (block, (attn, mlp)) in enumerate(zip(adapter.blocks, pairs)):
        layers = adapter.linears(block)
        out.append({name: attn if sublayer(name) == ATTENTION else mlp for name in layers})
        params = {name: lin.weight.numel() for name, lin in layers.items()}
        mean = sum(out[i][n] * p for n, p in params.items()) / sum(params.values())
        if abs(mean - rates[i]) > 1e-9:
            raise RuntimeError(f"block {i}: layer rates have weighted mean {mean:.9f}, not the block rate {rates[i]}")
    return tuple(out)


def offset_statistic(adapter: Adapter, per_layer: tuple[dict[str, float], ...]) -> dict:
    """For the report of ATP with an attention/MLP offset (docs/search.md; atprune's own rule).

    Args:
        adapter: the model's adapter (its blocks give the parameter counts).
        per_layer: one ``{layer name: rate}`` per block, as :func:`layer_rates` returns.

    Returns:
        ``{"attn_rates", "mlp_rates"}``: one float per block, the rate of its attention and of its MLP layers (a
        block without that sublayer: the mean of its layer rates); ``{"attn_params", "mlp_params"}``: one int per
        block, its attention and MLP weight counts (a_i, m_i).
    """
    sizes = sublayer_sizes(adapter)
    rates = {ATTENTION: [], MLP: []}
    for rates_of_block in per_layer:
        mean = sum(rates_of_block.values()) / len(rates_of_block)
        for kind in (ATTENTION, MLP):
            rates[kind].append(next((r for n, r in rates_of_block.items() if sublayer(n) == kind), mean))
    return {"attn_rates": rates[ATTENTION], "mlp_rates": rates[MLP], "attn_params": [a for a, _ in sizes],
            "mlp_params": [m for _, m in sizes]}


def needs_calibration(allocator) -> bool:
    """Whether the allocator's statistic reads calibration activations."""
    return allocator.needs == NEEDS_DENSE_WANDA


def block_statistic(allocator, adapter: Adapter, windows: torch.Tensor | None = None,
                    inputs: BlockInputs | None = None, placement: Placement | None = None) -> list[float] | None:
    """The per-block statistic ``allocator.needs``, computed on the model as it is now (dense, before pruning).

    Args:
        allocator: an :class:`~atprune.allocators.base.Allocator`.
        windows: ``[nsamples, seqlen]`` int64 calibration tokens (``NEEDS_DENSE_WANDA`` only).
        inputs: their captured block-0 inputs (shared with the pruning pass); enough without ``windows``.
        placement: where blocks and activations live during the pass (offloading).

    Returns:
        One float per block, or None for ``NEEDS_NOTHING``.

    Raises:
        ConfigError: for ``NEEDS_DENSE_WANDA`` without calibration windows.
        ValueError: for an unknown need (a bug in the allocator).
    """
    if allocator.needs == NEEDS_NOTHING:
        return None
    if allocator.needs == NEEDS_WEIGHTS:
        with torch.no_grad():
            return [float(allocator.block_statistic({n: lin.weight.detach() for n, lin in adapter.linears(b).items()},
                                                    None)) for b in adapter.blocks]
    if allocator.needs != NEEDS_DENSE_WANDA:
        raise ValueError(f"allocator {allocator.name!r} declares an unknown need {allocator.needs!r}")
    if windows is None and inputs is None:
        raise ConfigError(f"allocation {allocator.name!r} needs calibration data")
    values: list[float] = []

    def measure(i, block, linears, stats):
        weights = {n: lin.weight.detach() for n, lin in linears.items()}
        values.append(float(allocator.block_statistic(weights, {n: stats[n].col_norm() for n in linears})))

    sequential(adapter, windows, measure, inputs=inputs, placement=placement, last_outputs=False)
    return values


def check_rates(rates, sparsity: float, sizes: list[int], allocation: str) -> None:
    """Every allocator must give one rate in [0, 1] per block with parameter-weighted mean ``sparsity``.

    Raises:
        RuntimeError: if it does not (a bug in the allocator, not bad input).
    """
    if len(rates) != len(sizes) or any(not 0 <= r <= 1 for r in rates):
        raise RuntimeError(f"allocation {allocation!r} returned {len(rates)} rates for {len(sizes)} blocks or a rate "
                           f"outside [0, 1]: {rates}")
    mean = sum(r * p for r, p in zip(rates, sizes)) / sum(sizes)
    if abs(mean - sparsity) > 1e-6:
        raise RuntimeError(f"allocation {allocation!r} has parameter-weighted mean {mean:.6f}, not {sparsity:g}")


def allocate(allocator, sparsity: float, adapter: Adapter, windows: torch.Tensor | None = None,
             inputs: BlockInputs | None = None, placement: Placement | None = None,
             statistic: list[float] | None = None) -> Allocation:
    """Compute what ``allocator`` needs on ``adapter``'s model (unless ``statistic``, computed before on the same
    dense model, is given), call it, and check its rates (:func:`check_rates`).

    Raises:
        ConfigError: as :func:`block_statistic` and the allocator's ``allocate``.
    """
    sizes = block_sizes(adapter)
    if statistic is None:
        statistic = block_statistic(allocator, adapter, windows, inputs, placement)
    result = allocator.allocate(sparsity, sizes, statistic)
    check_rates(result.rates, sparsity, sizes, allocator.name)
    return result
