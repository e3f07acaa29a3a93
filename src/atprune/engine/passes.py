"""The sequential block-by-block engine.

1. Run the model on the calibration windows until block 0 and keep, per batch, the hidden states, and
   every keyword argument the model passes to each block (attention mask, possibly ``None``; position
   embeddings computed at model level; position ids; cache arguments, with the KV cache off); blocks of
   another attention type (sliding window) get their own mask and rotary table.
2. For block i: collect input statistics of its Linear sublayers with forward hooks (one pass with the
   current, already sparse-fed, inputs), call ``prune_block(i, block, stats)``, then recompute the block's
   outputs with the pruned weights; they are the next block's inputs.

The engine knows nothing about any pruner or allocator: the caller says which statistics it needs and
what to do with them. Calibration windows all have the same length and no padding, so batch
composition does not change any statistic.

Calibration can also be a list of *feeds*: one dict of model keyword inputs per forward pass (a vision-language
model's ``input_ids``, ``pixel_values``, ``image_grid_thw``...; see :mod:`atprune.multimodal`). Feeds differ in
length and in what the model derives from them (image-token masks, 3D rotary positions), so every feed runs through
the whole model once and keeps its own block keyword arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from atprune.models.adapter import Adapter
from atprune.engine.placement import Placement, exact_tf32_for
from atprune.engine.stats import InputStats


class _StopForward(BaseException):
    """Raised by a hook to end a forward pass once it has seen what it needed (block 0's inputs; the inputs of
    every layer of a block). A ``BaseException``, so that model code catching ``Exception`` lets it through."""


@dataclass
class BlockInputs:
    """Inputs of the current block.

    Attributes:
        hidden: one ``[batch, seqlen, hidden]`` tensor per calibration batch.
        shared: keyword arguments of block 0 per key (for token windows the key is the batch size: the arguments
            are identical for every batch of that size, since windows have one length and no padding; for feeds
            each feed has its own key).
        overrides: per key, ``{block index: {name: value}}`` for the keyword arguments a block receives
            that differ from block 0's (models with per-layer attention types, e.g. sliding-window layers,
            pass a different mask or rotary table to some blocks); empty for most models.
        keys: the key of every entry of ``hidden`` (default: its batch size).
    """

    hidden: list[torch.Tensor]
    shared: dict
    overrides: dict
    keys: list | None = None

    def key(self, j: int):
        """The key of ``hidden[j]`` into ``shared`` and ``overrides``."""
        return self.keys[j] if self.keys is not None else self.hidden[j].shape[0]

    def kwargs(self, block: int, key) -> dict:
        """Keyword arguments for ``block`` and the batch of key ``key`` (see :meth:`key`)."""
        return self.shared[key] | self.overrides[key].get(block, {})

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        return BlockInputs(hidden, self.shared, self.overrides, self.keys)


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


def _as_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """Split a block call into its hidden states and every other argument by name: positional arguments after
    the hidden states (GPT-2 passes the cache and the mask positionally) are named from ``forward``'s signature,
    so the block can later be called as ``block(hidden, **kwargs)``. The KV cache is turned off where the
    block takes ``use_cache``."""
    kwargs = dict(kwargs)
    if args:
        hidden, rest = args[0], args[1:]
    else:
        hidden, rest = kwargs.pop("hidden_states"), ()
    params = inspect.signature(module.forward).parameters
    if rest:
        names = [n for n, p in params.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
        if len(rest) > len(names):
            raise TypeError(f"{type(module).__name__} was called with {len(args)} positional arguments; its forward "
                            f"names only {len(names) + 1}")
        kwargs.update(zip(names, rest))
    if "use_cache" in kwargs or "use_cache" in params:
        kwargs["use_cache"] = False
    return hidden, kwargs


def _record_all_blocks(adapter: Adapter, batch: torch.Tensor | dict,
                       placement: Placement) -> tuple[torch.Tensor, dict, dict[int, dict]]:
    """One full forward pass of one batch (token ids, or a feed: a dict of model inputs) with pre-hooks on every
    block: block 0's input, block 0's keyword arguments, and per block the keyword arguments that differ from
    block 0's."""
    seen: list[tuple] = [None] * adapter.num_blocks

    def make_hook(i):
        def hook(module, args, kwargs):
            hidden, named = _as_kwargs(module, args, kwargs)
            seen[i] = (hidden.detach() if i == 0 else None, named)

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(adapter.blocks)]
    try:
        with torch.no_grad(), placement.streaming(adapter.blocks):
            adapter.model(**(batch if isinstance(batch, dict) else {"input_ids": batch}), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hidden, base = seen[0]
    overrides = {}
    for i in range(1, adapter.num_blocks):
        diff = {k: v for k, v in seen[i][1].items() if k not in base or not _same(v, base[k])}
        if diff:
            overrides[i] = diff
    return hidden, base, overrides


def _feed_to(feed: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """A feed's tensors on ``device``; floating ones (pixel values) in the model's ``dtype``."""
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
            for k, v in feed.items()}


def first_block_inputs(adapter: Adapter, windows: torch.Tensor | list[dict], batch_size: int = 1,
                       placement: Placement | None = None) -> BlockInputs:
    """Capture what the blocks receive when the model runs on ``windows``.

    The first batch of each size runs through the whole model with hooks on every block (so per-block keyword
    arguments are known); every other batch stops right after block 0's inputs are captured.

    Args:
        windows: ``[nsamples, seqlen]`` int64 token ids (no padding), or a list of feeds (one dict of model
            keyword inputs per forward pass, e.g. a processor's output for one image-text pair; ``batch_size`` is
            then ignored and every feed runs through the whole model and keeps its own block arguments).
        batch_size: windows per forward pass.
        placement: where blocks and activations live (default: all on the model's device).

    Returns:
        :class:`BlockInputs`; hidden states stored as ``placement`` says, keyword arguments on its device.
    """
    placement = placement or Placement.default_for(adapter.model)
    device = placement.device
    if not isinstance(windows, torch.Tensor):
        dtype = next(adapter.model.parameters()).dtype
        feeds = BlockInputs([], {}, {}, [])
        for j, feed in enumerate(windows):
            hidden, feeds.shared[j], feeds.overrides[j] = _record_all_blocks(adapter, _feed_to(feed, device, dtype),
                                                                             placement)
            feeds.hidden.append(placement.store(hidden))
            feeds.keys.append(j)
        return feeds
    captured = BlockInputs([], {}, {})

    def grab(module, args, kwargs):
        captured.hidden.append(placement.store((args[0] if args else kwargs["hidden_states"]).detach()))
        raise _StopForward

    for batch in windows.split(batch_size):
        batch = batch.to(device)
        size = batch.shape[0]
        if size not in captured.shared:
            hidden, captured.shared[size], captured.overrides[size] = _record_all_blocks(adapter, batch, placement)
            captured.hidden.append(placement.store(hidden))
            continue
        handle = adapter.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                adapter.model(input_ids=batch, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
    return captured


def run_block(block: nn.Module, index: int, inputs: BlockInputs,
              placement: Placement | None = None) -> list[torch.Tensor]:
    """Outputs of ``block`` (number ``index``, already on the compute device) for every batch of ``inputs``,
    each ``[batch, seqlen, hidden]`` and stored as ``placement`` says; tuple outputs are reduced to their
    first item."""
    outs = []
    with torch.no_grad():
        for j, hidden in enumerate(inputs.hidden):
            x = placement.fetch(hidden) if placement else hidden
            out = block(x, **inputs.kwargs(index, inputs.key(j)))
            out = out[0] if isinstance(out, (tuple, list)) else out
            outs.append(placement.store(out) if placement else out)
    return outs


def _watch_inputs(layer, fn: Callable[[torch.Tensor], None]):
    """Call ``fn(x)`` with every input ``x`` of ``layer``: before the layer runs where it takes a forward
    pre-hook (``nn.Linear``, :class:`atprune.models.adapter.TransposedLinear`), otherwise after it (expert views, whose
    inputs are only known once the router has run). Returns the hook handle."""
    if hasattr(layer, "register_forward_pre_hook"):
        def pre(module, args, kwargs=None):
            fn(args[0] if args else next(iter((kwargs or {}).values())))

        if isinstance(layer, nn.Module):
            return layer.register_forward_pre_hook(pre, with_kwargs=True)
        return layer.register_forward_pre_hook(lambda m, args: pre(m, args))
    return layer.register_forward_hook(lambda module, args, out: fn(args[0]))


def collect_stats(block: nn.Module, index: int, linears: dict[str, nn.Linear], inputs: BlockInputs,
                  hessian: bool, placement: Placement | None = None,
                  stats: dict[str, InputStats] | None = None) -> dict[str, InputStats]:
    """One forward pass of ``block`` (number ``index``) over ``inputs`` with hooks that accumulate
    :class:`InputStats` (float32) for every layer in ``linears``.

    ``stats``, when given, are sums to continue (one per name of ``linears``, layers that read one input sharing one
    object as this function would share them): the batches of ``inputs`` are added to them in order, exactly as if
    they had come after the batches those sums saw (a data-parallel caller passes on the sums of the ranks before).

    Layers that receive the very same input tensor (q/k/v projections, gate/up projections) share one
    :class:`InputStats` object: their statistics are identical, so they are computed and stored once.
    The block's outputs are not needed here. The first batch runs the whole block and counts how often each layer
    is called (once in a decoder layer; more with chunked feed-forward layers); every later batch stops as soon as
    every layer has been called that often, so the last projection (e.g. ``down_proj``) and the residual after it
    are never computed. This assumes the same calls for every batch of equal-length windows, true of the decoders
    atprune supports (MoE expert views are called once per forward whatever the routing).
    """
    if stats is None:
        stats = {name: InputStats(lin.in_features, hessian=hessian) for name, lin in linears.items()}
    else:
        stats = dict(stats)
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input kept alive, first layer that read it)
    calls: dict[str, int] = {}  # calls of each layer in the current batch
    expected: dict[str, int] | None = None  # calls per batch, counted in the first batch

    def add(name: str, x: torch.Tensor) -> None:
        first = seen.get(id(x))
        shared = first is not None and first[0] is x and first[1] != name
        if shared and stats[name] is not stats[first[1]] and stats[name].ntokens == 0:
            stats[name] = stats[first[1]]
        if not (shared and stats[name] is stats[first[1]]):
            seen[id(x)] = (x, name)
            stats[name].add(x)
        calls[name] = calls.get(name, 0) + 1
        if calls == expected:
            raise _StopForward

    handles = [_watch_inputs(lin, lambda x, name=name: add(name, x)) for name, lin in linears.items()]
    try:
        with torch.no_grad(), exact_tf32_for(next(block.parameters()).dtype):
            for j, hidden in enumerate(inputs.hidden):
                seen.clear()
                calls.clear()
                x = placement.fetch(hidden) if placement else hidden
                try:
                    block(x, **inputs.kwargs(index, inputs.key(j)))
                except _StopForward:
                    pass
                if expected is None:
                    expected = dict(calls)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return stats


PruneBlockFn = Callable[[int, nn.Module, dict[str, nn.Linear], dict[str, InputStats] | None], None]
CollectFn = Callable[[nn.Module, int, dict[str, nn.Linear], BlockInputs, bool, Placement | None],
                     dict[str, InputStats]]


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
    placement: Placement | None = None,
    last_outputs: bool = True,
    collect: CollectFn | None = None,
) -> list[torch.Tensor]:
    """Prune the model block by block.

    Args:
        adapter: the model's :class:`Adapter`.
        windows: ``[nsamples, seqlen]`` int64 calibration token ids, or a list of feeds (see
            :func:`first_block_inputs`).
        prune_block: ``f(i, block, linears, stats)`` changes the weights of block i in place; ``stats`` maps
            layer names to :class:`InputStats` collected on the block's current inputs (``None`` if
            ``needs_stats`` is False).
        needs_hessian: collect ``X X^T`` too (SparseGPT).
        inputs: block-0 inputs already captured with :func:`first_block_inputs` (reused across runs).
        progress: called with i after block i is done.
        placement: where blocks and activations live (default: all on the model's device); with offloading
            each block is on the compute device only from its statistics pass to its output pass.
        last_outputs: run the last block's output pass (its outputs feed no further block; callers that only
            prune pass False and save that pass).

    Returns:
        The last block's outputs, one ``[batch, seqlen, hidden]`` tensor per batch (empty with
        ``last_outputs=False``).
    """
    placement = placement or Placement.default_for(adapter.model)
    if inputs is None:
        inputs = first_block_inputs(adapter, windows, batch_size, placement)
    current = inputs.with_hidden(list(inputs.hidden))
    for i, block in enumerate(adapter.blocks):
        placement.enter(block)
        try:
            linears = adapter.linears(block)
            stats = None
            if needs_stats:
                stats = (collect or collect_stats)(block, i, linears, current, needs_hessian, placement)
            prune_block(i, block, linears, stats)
            del stats
            last = i == adapter.num_blocks - 1
            current = current.with_hidden([] if last and not last_outputs else run_block(block, i, current, placement))
        finally:
            placement.leave(block)
        if progress is not None:
            progress(i)
    return current.hidden
