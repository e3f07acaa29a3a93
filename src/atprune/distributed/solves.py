"""A block's layer solves split over the ranks: each rank solves its own layers, then every result is broadcast from
the rank that computed it, so every rank ends with the same weights (and quantization grids) bit for bit.

Once a block's statistics are reduced every rank holds the same statistics and the same dense weights, and one
layer's solve (SparseGPT's column walk, GPTQ's, DSnoT's swaps) reads only its own dense weight and statistics: so
a layer solved on rank r gives the very bits any other rank (or one process) would compute, given the same
arithmetic (the same threads on a CPU, the same kernels on GPUs), and broadcasting copies bits.

Which rank solves which layer (:func:`assign_layers`) is a deterministic function of the block's layer shapes and
the number of ranks, the same on every rank: greedy longest-processing-time (Graham 1969): the layers in order of
decreasing estimated cost ``rows * cols^2 + cols^3`` (the error updates of the column walk, ``~rows * cols^2 / 2``
multiply-adds, and the Cholesky factorisations of the ``[cols, cols]`` Hessian; ties: the earlier layer), each to
the rank with the least cost so far (ties: the lower rank). Layers that share an input (q/k/v) share one factor in
one process; split over ranks, each rank computes it once for itself. With more ranks than layers some ranks solve
nothing in that block and only receive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist


def layer_cost(rows: int, cols: int) -> int:
    """Estimated cost of one layer's solve: ``rows * cols^2 + cols^3`` (see the module docstring); no unit."""
    return rows * cols * cols + cols ** 3


def balance(costs: list[float], size: int) -> list[int]:
    """Greedy longest-processing-time assignment (Graham 1969) of jobs to ranks.

    Args:
        costs: estimated cost of every job (no unit; only their ratios matter).
        size: number of ranks (>= 1).

    Returns:
        ``[len(costs)]`` ranks in ``0 .. size - 1``: the jobs in order of decreasing cost (ties: the earlier job),
        each to the rank with the least cost so far (ties: the lower rank). A pure function: the same list on every
        rank.

    Raises:
        ValueError: ``size < 1``.
    """
    if size < 1:
        raise ValueError(f"need at least one rank, got {size}")
    load = [0] * size
    owners = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[k] = rank
        load[rank] += costs[k]
    return owners


def assign_layers(shapes: list[tuple[int, int]], size: int) -> list[int]:
    """Owner rank of every layer of a block: :func:`balance` over :func:`layer_cost`.

    Args:
        shapes: ``(rows, cols)`` = ``(out_features, in_features)`` of each layer, in the block's order.
        size: number of ranks (>= 1).

    Raises:
        ValueError: ``size < 1``.
    """
    return balance([layer_cost(*shape) for shape in shapes], size)


def _skeleton(obj):
    """``obj`` with every tensor replaced by ``("tensor", shape, dtype)`` (dataclasses, tuples, lists and dicts
    walked; anything else kept): what a receiver needs to allocate the tensors, small enough to pickle."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return ("dataclass", type(obj), {f.name: _skeleton(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, (tuple, list)):
        return ("seq", type(obj), [_skeleton(v) for v in obj])
    if isinstance(obj, dict):
        return ("dict", {k: _skeleton(v) for k, v in obj.items()})
    return ("value", obj)


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors of ``obj`` in the order :func:`_skeleton` and :func:`_rebuild` walk them."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


def _rebuild(skeleton, tensors):
    """The object of ``skeleton`` with its tensors taken, in order, from the iterator ``tensors``."""
    kind = skeleton[0]
    if kind == "tensor":
        return next(tensors)
    if kind == "dataclass":
        return skeleton[1](**{k: _rebuild(v, tensors) for k, v in skeleton[2].items()})
    if kind == "seq":
        return skeleton[1](_rebuild(v, tensors) for v in skeleton[2])
    if kind == "dict":
        return {k: _rebuild(v, tensors) for k, v in skeleton[1].items()}
    return skeleton[1]


def split_solves(linears: dict, solve: Callable[[str], object], rank: int, size: int,
                 device: torch.device) -> dict[str, object]:
    """Run ``solve(name)`` for this rank's layers of ``linears`` (see :func:`assign_layers`) and receive the others'.

    Args:
        linears: the block's layers by name (each with ``out_features`` and ``in_features``), in the same order on
            every rank.
        solve: one layer's solve; its result may hold tensors (in dataclasses, tuples, lists, dicts: e.g.
            ``(weight [out, in], Grid or None)``) and small picklable values.
        rank, size: this process and the number of processes (of the default group).
        device: where received tensors are put (the rank's compute device; with NCCL a CUDA device); a rank's own
            tensors are sent from a copy on it if they live elsewhere.

    Returns:
        ``{name: result}`` for every layer, in ``linears``' order: this rank's own results as ``solve`` returned
        them, the others' rebuilt with bit-identical tensors.

    Raises:
        whatever ``solve`` raises on this rank; a backend error if another rank has died.
    """
    names = list(linears)
    owners = assign_layers([(linears[n].out_features, linears[n].in_features) for n in names], size)
    mine = {n: solve(n) for n, owner in zip(names, owners) if owner == rank}
    skeletons: list = [None] * size
    dist.all_gather_object(skeletons, {n: _skeleton(v) for n, v in mine.items()})
    results = {}
    for name, owner in zip(names, owners):
        if owner == rank:
            for t in _tensors(mine[name]):
                buf = t.detach().to(device).contiguous()
                dist.broadcast(buf, owner)
            results[name] = mine[name]
            continue
        skeleton = skeletons[owner][name]
        received = []
        for spec in _tensor_specs(skeleton):
            buf = torch.empty(spec[1], dtype=spec[2], device=device)
            dist.broadcast(buf, owner)
            received.append(buf)
        results[name] = _rebuild(skeleton, iter(received))
    return results


def _tensor_specs(skeleton) -> list[tuple]:
    """The ``("tensor", shape, dtype)`` leaves of ``skeleton`` in walk order."""
    kind = skeleton[0]
    if kind == "tensor":
        return [skeleton]
    if kind == "dataclass":
        return [s for v in skeleton[2].values() for s in _tensor_specs(v)]
    if kind == "seq":
        return [s for v in skeleton[2] for s in _tensor_specs(v)]
    if kind == "dict":
        return [s for v in skeleton[1].values() for s in _tensor_specs(v)]
    return []
