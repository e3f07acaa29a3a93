"""The sequential block-by-block engine.

1. Run the model on the calibration windows until block 0 and keep, per batch, the hidden states and
   every keyword argument the model passes to the block (attention mask, possibly ``None``; position
   embeddings computed at model level; position ids; cache arguments, with the KV cache off).
2. For block i: collect input statistics of its Linear sublayers with forward hooks (one pass with the
   current, already sparse-fed, inputs), call ``prune_block(i, block, stats)``, then recompute the block's
   outputs with the pruned weights; they are the next block's inputs.

The engine knows nothing about any pruner or allocator: the caller says which statistics it needs and
what to do with them. Calibration windows all have the same length and no padding, so batch
composition does not change any statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from atprune.models import Adapter
from atprune.stats import InputStats


class _StopForward(Exception):
    """Raised by the block-0 pre-hook to end the forward pass once its inputs are captured."""


@dataclass
class BlockInputs:
    """Inputs of the current block: ``hidden[k]`` is ``[batch, seqlen, hidden]`` and ``kwargs[k]`` the
    keyword arguments that go with it."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]


def first_block_inputs(adapter: Adapter, windows: torch.Tensor, batch_size: int = 1) -> BlockInputs:
    """Capture what block 0 receives when the model runs on ``windows``.

    Args:
        windows: ``[nsamples, seqlen]`` int64 token ids (no padding).
        batch_size: windows per forward pass.

    Returns:
        :class:`BlockInputs` on the model's device.
    """
    model = adapter.model
    device = next(model.parameters()).device
    captured = BlockInputs([], [])

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append({k: v for k, v in kwargs.items()} | {"use_cache": False})
        raise _StopForward

    handle = adapter.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """Outputs of ``block`` for every captured batch; tuple outputs are reduced to their first item."""
    outs = []
    with torch.no_grad():
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            out = block(hidden, **kwargs)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def collect_stats(block: nn.Module, linears: dict[str, nn.Linear], inputs: BlockInputs, hessian: bool) -> dict[str, InputStats]:
    """One forward pass of ``block`` over ``inputs`` with hooks that accumulate :class:`InputStats`
    for every layer in ``linears``."""
    stats = {name: InputStats(lin.in_features, hessian=hessian) for name, lin in linears.items()}
    handles = [
        lin.register_forward_hook(lambda mod, args, out, s=stats[name]: s.add(args[0]))
        for name, lin in linears.items()
    ]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return stats


PruneBlockFn = Callable[[int, nn.Module, dict[str, nn.Linear], dict[str, InputStats] | None], None]


def sequential(
    adapter: Adapter,
    windows: torch.Tensor,
    prune_block: PruneBlockFn,
    *,
    needs_stats: bool = True,
    needs_hessian: bool = False,
    batch_size: int = 1,
    inputs: BlockInputs | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Prune the model block by block.

    Args:
        adapter: the model's :class:`Adapter`.
        windows: ``[nsamples, seqlen]`` int64 calibration token ids.
        prune_block: ``f(i, block, linears, stats)`` changes the weights of block i in place; ``stats`` maps
            layer names to :class:`InputStats` collected on the block's current inputs (``None`` if
            ``needs_stats`` is False).
        needs_hessian: collect ``X X^T`` too (SparseGPT).
        inputs: block-0 inputs already captured with :func:`first_block_inputs` (reused across runs).
        progress: called with i after block i is done.

    Returns:
        The last block's outputs, one ``[batch, seqlen, hidden]`` tensor per batch.
    """
    if inputs is None:
        inputs = first_block_inputs(adapter, windows, batch_size)
    current = BlockInputs(list(inputs.hidden), inputs.kwargs)
    for i, block in enumerate(adapter.blocks):
        linears = adapter.linears(block)
        stats = collect_stats(block, linears, current, needs_hessian) if needs_stats else None
        prune_block(i, block, linears, stats)
        del stats
        current = BlockInputs(run_block(block, current), current.kwargs)
        if progress is not None:
            progress(i)
    return current.hidden
