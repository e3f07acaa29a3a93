"""Data-parallel calibration: each rank runs its share of the calibration windows through the block being pruned,
and the input statistics of every Linear layer are summed over ranks before the pruner reads them, so every rank
holds the same statistics, chooses the same mask and computes the same pruned weights; the outputs of the block
(the next block's inputs) stay on the rank that computed them.

The statistics are sums over tokens (:class:`atprune.engine.stats.InputStats`: token and window counts,
``sum_t x_tj^2`` for Wanda's column norms, ``sum_t x_tj`` for the mean, ``sum_t x_t x_t^T`` for SparseGPT's Hessian;
the fields listed in ``InputStats.SUMS`` and ``COUNTS``), so adding the ranks' sums gives the sums over all windows.
Two ways to add them (``reduce``):

- ``"sum"`` (default): every rank sums its own windows, then one ``all_reduce`` adds the ranks' sums (and a
  broadcast from rank 0 makes every rank hold the very same bits whatever the backend's reduction order). The
  additions happen in another order than in one process, so the statistics equal a one-process run's up to float32
  rounding (and the masks up to near ties).
- ``"ordered"``: rank r receives the sums of ranks 0..r-1, adds its own windows to them in order and passes them on;
  the last rank broadcasts the total. Every addition then happens exactly as in one process, so the statistics,
  masks and pruned weights equal a one-process run bit for bit; the statistics passes of the ranks run one after
  another (the output passes still run at once).

Ranks hold contiguous runs of whole calibration batches (``batch_size`` windows each, the last one possibly
shorter, as in one process), so every batch is the very tensor a one-process run would feed.

Once a block's statistics are reduced, the layers' solves that read a Hessian (SparseGPT, GPTQ) are split over the
ranks and their results broadcast (:mod:`atprune.distributed.solves`), so every rank holds the same pruned weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from atprune.engine.passes import BlockInputs, collect_stats
from atprune.engine.placement import Placement
from atprune.engine.stats import InputStats
from atprune.errors import ConfigError
from atprune.distributed.context import check_same
from atprune.distributed.solves import split_solves

REDUCTIONS = ("sum", "ordered")


def shard_bounds(nwindows: int, batch_size: int, rank: int, size: int) -> tuple[int, int]:
    """Windows ``[start, stop)`` of rank ``rank``: the ``ceil(nwindows / batch_size)`` batches are split into
    ``size`` contiguous runs whose lengths differ by at most one batch (the first ranks get the longer runs).

    Raises:
        ConfigError: fewer batches than ranks (some rank would have no window).
    """
    nbatches = -(-nwindows // batch_size)
    if nbatches < size:
        raise ConfigError(f"{size} ranks but only {nbatches} calibration batch(es) ({nwindows} windows, batch size "
                          f"{batch_size}): every rank needs at least one; start at most {nbatches} processes, or "
                          "raise --nsamples or lower --batch-size")
    base, extra = divmod(nbatches, size)
    first = rank * base + min(rank, extra)
    last = first + base + (rank < extra)
    return first * batch_size, min(last * batch_size, nwindows)


def _leaders(stats: dict[str, InputStats], names: list[str]) -> list[int]:
    """For every name, the index of the first name holding the same :class:`InputStats` object."""
    return [next(j for j in range(k + 1) if stats[names[j]] is stats[name]) for k, name in enumerate(names)]


def _present(s: InputStats) -> bool:
    return any(getattr(s, f) is not None for f in InputStats.SUMS)


def _allocate(s: InputStats, device: torch.device) -> None:
    """Give ``s`` its zero sums (every field of ``InputStats.SUMS`` it collects, in their shapes) by adding an empty
    ``[0, 0, in]`` input: no token and no window is counted."""
    s.add(torch.zeros(0, 0, s.in_features, dtype=torch.float32, device=device))


def _sums(s: InputStats) -> list[torch.Tensor]:
    return [t for t in (getattr(s, f) for f in InputStats.SUMS) if t is not None]


def _transfer(stats: dict[str, InputStats] | None, linears: dict, hessian: bool, device: torch.device,
              move: Callable[[torch.Tensor], None]) -> dict[str, InputStats]:
    """Send (``stats`` given) or receive (``stats`` None) one block's statistics with ``move`` (a send, receive or
    broadcast of one tensor in place), sharing kept: a header ``[layers, 2 + counts]`` int64 (leader index, present,
    ``InputStats.COUNTS``), then per present leader its ``InputStats.SUMS`` tensors (float32)."""
    names = list(linears)
    header = torch.zeros(len(names), 2 + len(InputStats.COUNTS), dtype=torch.int64, device=device)
    if stats is not None:
        header[:, 0] = torch.tensor(_leaders(stats, names))
        header[:, 1] = torch.tensor([_present(stats[n]) for n in names])
        for c, field in enumerate(InputStats.COUNTS):
            header[:, 2 + c] = torch.tensor([getattr(stats[n], field) for n in names])
    move(header)
    out: dict[str, InputStats] = {}
    for k, (lead, present, *counts) in enumerate(header.tolist()):
        name = names[k]
        if lead != k:
            out[name] = out[names[lead]]
            continue
        s = stats[name] if stats is not None else InputStats(linears[name].in_features, hessian=hessian)
        if present:
            if stats is None:
                _allocate(s, device)
                for field, value in zip(InputStats.COUNTS, counts):
                    setattr(s, field, value)
            for t in _sums(s):
                move(t)
        out[name] = s
    return out


class DataParallelCalibration:
    """This rank's part of a data-parallel pruning run, handed to :func:`atprune.api.prune` (``data_parallel=``).

    Args:
        rank, size: this process's rank and the number of processes (of the default process group).
        device: where the statistics live (the compute device: a CUDA device with NCCL, the CPU with gloo).
        reduce: ``"sum"`` or ``"ordered"`` (see the module docstring).

    Raises:
        ConfigError: an unknown ``reduce``.
    """

    def __init__(self, rank: int, size: int, device: torch.device | str = "cpu", reduce: str = "sum"):
        if reduce not in REDUCTIONS:
            raise ConfigError(f"distributed statistics reduction must be one of {', '.join(REDUCTIONS)}, got "
                              f"{reduce!r}")
        self.rank, self.size, self.device, self.reduce = rank, size, torch.device(device), reduce

    def shard(self, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's windows (see :func:`shard_bounds`), after checking that every rank holds the same
        ``[nsamples, seqlen]`` int64 calibration tokens (all-gathered digest).

        Raises:
            ConfigError: image-text feeds (not supported yet), ranks holding different tokens, fewer batches than
                ranks.
        """
        if not isinstance(windows, torch.Tensor):
            raise ConfigError("data-parallel calibration takes token windows; image-text calibration is not "
                              "supported across processes yet")
        check_same("calibration tokens", windows)
        start, stop = shard_bounds(windows.shape[0], batch_size, self.rank, self.size)
        return windows[start:stop]

    def finish(self, summary) -> None:
        """Wait until every rank has pruned every block, and check that they all hold ``summary`` (e.g. the zeros
        of every block): rank 0 writes nothing for a run that another rank has not finished.

        Raises:
            ConfigError: ranks that pruned differently; a backend error if another rank has died.
        """
        check_same("pruning results", summary)

    def solve(self, index: int, linears: dict, solve: Callable[[str], object]) -> dict[str, object]:
        """The ``share`` hook of :func:`atprune.api.block_pruner`: block ``index``'s layer solves split over the
        ranks and their results broadcast (:func:`atprune.distributed.solves.split_solves`); every rank returns
        the same results, bit for bit."""
        return split_solves(linears, solve, self.rank, self.size, self.device)

    def collect(self, block: nn.Module, index: int, linears: dict, inputs: BlockInputs, hessian: bool,
                placement: Placement | None = None) -> dict[str, InputStats]:
        """:func:`atprune.engine.passes.collect_stats` over this rank's windows, summed over every rank; the same
        statistics (bit for bit) on every rank."""
        if self.reduce == "ordered":
            return self._ordered(block, index, linears, inputs, hessian, placement)
        stats = collect_stats(block, index, linears, inputs, hessian, placement)
        names = list(linears)
        leads = _leaders(stats, names)
        for k, name in enumerate(names):
            if leads[k] != k:
                continue
            s = stats[name]
            counts = torch.tensor([getattr(s, f) for f in InputStats.COUNTS] + [_present(s)], dtype=torch.int64,
                                  device=self.device)
            dist.all_reduce(counts)
            if not counts[-1]:  # no rank saw an input of this layer
                continue
            if not _present(s):
                _allocate(s, self.device)
            for t in _sums(s):
                dist.all_reduce(t)
                dist.broadcast(t, 0)  # one set of bits on every rank, whatever order the backend added in
            for field, value in zip(InputStats.COUNTS, counts.tolist()):
                setattr(s, field, value)
        return stats

    def _ordered(self, block, index, linears, inputs, hessian, placement) -> dict[str, InputStats]:
        before = None
        if self.rank > 0:
            before = _transfer(None, linears, hessian, self.device, lambda t: dist.recv(t, self.rank - 1))
        stats = collect_stats(block, index, linears, inputs, hessian, placement, stats=before)
        last = self.size - 1
        if self.rank < last:
            _transfer(stats, linears, hessian, self.device, lambda t: dist.send(t, self.rank + 1))
        return _transfer(stats if self.rank == last else None, linears, hessian, self.device,
                         lambda t: dist.broadcast(t, last))
