"""Pruning an image classifier block by block: the text path's planner, allocators, pruners and engine, with the
classifier's own block inputs (:mod:`atprune.vision.adapter`).

    >>> from atprune.vision import prune_classifier
    >>> result = prune_classifier(model, calib_images, method="wanda", sparsity=0.5, allocation="atp", beta=0.01)
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from atprune.allocation import allocate, block_sizes
from atprune.api import PruneResult, block_pruner, check_widths, needs_calibration, plan, prune_result
from atprune.engine.passes import BlockInputs, sequential
from atprune.engine.placement import Placement
from atprune.errors import ConfigError, check_positive_int
from atprune.pruners import get_pruner
from atprune.vision.adapter import VisionAdapter


class _Stop(BaseException):
    """Ends a forward pass once block 0's input is captured (a BaseException, so model code catching Exception
    lets it through)."""


def check_images(images: torch.Tensor, what: str = "calibration images") -> None:
    """Raise ConfigError unless ``images`` is a non-empty float ``[n, channels, H, W]`` tensor."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point() or not len(images):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"{what} must be a float [n, channels, height, width] tensor of preprocessed images, "
                          f"got {shape}")


def block_inputs(adapter: VisionAdapter, images: torch.Tensor, batch_size: int = 32) -> BlockInputs:
    """What block 0 receives when the model runs on ``images``: the model's own forward up to its first block
    (patch embedding, class / distillation token and position embedding for ViT and DeiT; the stem for ConvNeXt).

    Args:
        images: ``[n, channels, H, W]`` preprocessed images (moved to the model's device and dtype).
        batch_size: images per forward pass.

    Returns:
        :class:`atprune.engine.passes.BlockInputs`: one tensor per batch (``[batch, tokens, dim]`` for ViT,
        ``[batch, C, H', W']`` for ConvNeXt); blocks take no keyword arguments.
    """
    check_images(images)
    check_positive_int("batch size", batch_size)
    param = next(adapter.model.parameters())
    hidden: list[torch.Tensor] = []

    def grab(module, args):
        hidden.append(args[0].detach())
        raise _Stop

    handle = adapter.entry.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for batch in images.split(batch_size):
                try:
                    adapter.logits(batch.to(param.device, param.dtype))
                except _Stop:
                    pass
    finally:
        handle.remove()
    sizes = {h.shape[0] for h in hidden}
    return BlockInputs(hidden, {s: {} for s in sizes}, {s: {} for s in sizes})


def prune_classifier(model, images: torch.Tensor | None = None, *, method: str = "wanda", sparsity: float | None = 0.5,
                     allocation: str = "uniform", beta: float | None = None, pattern: str = "unstructured",
                     batch_size: int = 32, allocation_options: dict | None = None,
                     inputs: BlockInputs | None = None, allocator_statistic: list[float] | None = None,
                     progress: bool = False, calib_info: dict | None = None) -> PruneResult:
    """Prune an image classifier in place, block by block, with per-block rates from an allocator.

    The rates keep the parameter-weighted mean at ``sparsity`` over the blocks' prunable weights (ConvNeXt blocks of
    later stages are wider; ATP then uses its size-aware progression, see :mod:`atprune.allocators.atp`).

    Args:
        model: timm ViT / DeiT / ConvNeXt or transformers ViT / ConvNext image classifier (weights changed in place).
        images: ``[nsamples, channels, H, W]`` preprocessed calibration images (not needed for magnitude with a
            data-free allocation, nor when ``inputs`` is given).
        method, sparsity, allocation, beta, pattern, allocation_options: as :func:`atprune.api.plan`.
        batch_size: images per forward pass (results do not depend on it).
        inputs: block-0 inputs already captured by :func:`block_inputs` for these images (reused across trials).
        allocator_statistic: the allocator's per-block statistic computed earlier on this dense model.
        calib_info: description of the calibration images, recorded in the result.

    Returns:
        :class:`atprune.api.PruneResult` (``blocks[i]`` per block; ``overall_sparsity`` over the blocks' prunable
        weights, patch embedding, downsampling layers and head excluded).

    Raises:
        ConfigError: bad options (see :func:`atprune.api.plan`), a model that is not a supported classifier,
            calibration images missing or malformed.
    """
    model.eval()
    adapter = VisionAdapter.for_model(model)
    if pattern not in ("unstructured", None) and allocation != "uniform":
        raise ConfigError(f"N:M pattern {pattern} with allocation {allocation!r}: mixed N:M per block is for language "
                          "models so far; use --allocation uniform with a pattern on image models")
    spec = plan(method, sparsity, adapter.num_blocks, allocation=allocation, beta=beta, pattern=pattern,
                allocation_options=allocation_options, block_sizes=block_sizes(adapter))
    check_widths(adapter, spec.pattern)
    if getattr(spec.allocator, "attn_offset", 0.0):
        raise ConfigError("attn_offset (attention/MLP offset) is for language models so far")
    pruner = get_pruner(method)
    start = time.perf_counter()
    if needs_calibration(spec) and inputs is None:
        if images is None:
            raise ConfigError(f"method {method!r} with allocation {allocation!r} needs calibration images")
        inputs = block_inputs(adapter, images, batch_size)
    placement = Placement.default_for(model)
    result = allocate(spec.allocator, spec.sparsity, adapter, None, inputs, placement, statistic=allocator_statistic)
    spec = replace(spec, rates=result.rates, statistic=result.statistic)
    records: list[dict] = []
    prune_block = block_pruner(pruner, spec.rates, spec.pattern, records)
    bar = tqdm(total=adapter.num_blocks, desc=f"{method} {spec.allocation}", unit="block", disable=not progress)
    try:
        if pruner.needs_stats:
            sequential(adapter, None, prune_block, needs_hessian=pruner.needs_hessian, inputs=inputs,
                       progress=lambda i: bar.update(1), placement=placement, last_outputs=False)
        else:
            for i, block in enumerate(adapter.blocks):
                prune_block(i, block, adapter.linears(block), None)
                bar.update(1)
    finally:
        bar.close()
    info = dict(calib_info or {})
    if inputs is not None:
        info.setdefault("nsamples", sum(h.shape[0] for h in inputs.hidden))
    return prune_result(spec, records, time.perf_counter() - start, info)
