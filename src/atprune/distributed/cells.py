"""``torchrun --nproc-per-node N -m atprune compare ...``: the comparison's cells split over N ranks.

Every rank loads the whole model and builds the same :class:`atprune.jobs.trials.TrialRunner` (whole calibration
set, same selection windows: checked by an all-gathered digest), then runs its share of the cells (pruner x
sparsity x allocation x variant) exactly as one process runs each: from the dense weights, with the whole
calibration set, ATP's beta (and a tuned peer's option) searched with the golden strategy inside the cell on that
rank (no data-parallel calibration and no parallel trials inside a cell). Every row is therefore what one process
computes for that cell (given the same arithmetic: the same threads on a CPU, the same kernels on GPUs); only the
seconds differ.

Which rank runs which cell (:func:`assign_cells`): greedy longest-processing-time
(:func:`atprune.distributed.solves.balance`) over the prune passes a cell costs, ``max_trials + 2`` for a searched
cell (its trials, the final prune, the evaluation) and 2 for the others; each rank runs its cells in the
one-process order. The rows are gathered on rank 0, put in the one-process order, and rank 0 alone writes the
folder (``compare.json``, ``results.csv``, ``results.md``, ``rates.png``) once, atomically: a temporary folder
beside ``--out`` renamed over it. A rank that fails leaves no folder.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from atprune.distributed.context import check_same
from atprune.distributed.solves import balance


def cell_cost(cell: tuple, max_trials: int) -> int:
    """Prune passes of one ``(method, sparsity, allocation, variant)`` cell: ``max_trials + 2`` when its option is
    searched (ATP; a peer's "tuned" or ATP's "selected on test" variant), else 2 (one prune, one evaluation)."""
    _, _, alloc, variant = cell
    return max_trials + 2 if alloc == "atp" or variant != "default" else 2


def assign_cells(cells: list[tuple], size: int, max_trials: int) -> list[int]:
    """The rank of every cell (see the module docstring); a pure function of the cells, the same on every rank.

    Raises:
        ValueError: ``size < 1``.
    """
    return balance([cell_cost(c, max_trials) for c in cells], size)


def write_compare_folder(state: dict, out: Path) -> None:
    """Write ``compare.json``, ``results.csv``, ``results.md`` and ``rates.png`` of ``state`` into a temporary
    folder beside ``out`` and rename it over ``out`` (an existing ``out`` is replaced whole; on any error nothing
    is left). ``state["rows"]`` must be non-empty."""
    from atprune.export.files import public_permissions, replace_folder, write_json
    from atprune.jobs.compare import plot_rates, to_csv, to_markdown

    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_json(tmp / "compare.json", state)
        (tmp / "results.csv").write_text(to_csv(state["rows"]), encoding="utf-8")
        (tmp / "results.md").write_text(to_markdown(state), encoding="utf-8")
        plot_rates(state["rows"], tmp / "rates.png")
        public_permissions(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ParallelCells:
    """This rank's part of a split comparison, handed to :func:`atprune.jobs.compare.run_compare_job`
    (``parallel=``).

    Args:
        rank, size: this process's rank and the number of processes (of the default group).
        max_trials: the job's golden-search budget (the cost of a searched cell).
        out: the job's output folder (written by rank 0 in :meth:`finish`).
    """

    def __init__(self, rank: int, size: int, max_trials: int, out: str | Path):
        self.rank, self.size, self.max_trials, self.out = rank, size, max_trials, Path(out)
        self.owners: list[int] = []
        self.mine: list[int] = []

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def share(self, cells: list[tuple], runner) -> list[tuple]:
        """This rank's cells, in the one-process order, after checking that every rank holds the same cells and
        the same ``[n, seqlen]`` int64 calibration and selection tokens of ``runner`` (all-gathered digests).

        Raises:
            ConfigError: ranks that disagree (one line naming them).
        """
        check_same("cells", [list(c) for c in cells])
        check_same("calibration and selection tokens", torch.cat([runner.calib.flatten(), runner.select.flatten(),
                                                                  torch.tensor(runner.select.shape)]))
        self.owners = assign_cells(cells, self.size, self.max_trials)
        self.mine = [k for k, owner in enumerate(self.owners) if owner == self.rank]
        return [cells[k] for k in self.mine]

    def finish(self, state: dict, cells: list[tuple]) -> dict | None:
        """Gather every rank's rows on rank 0 in the one-process cell order; rank 0 writes the folder
        (:func:`write_compare_folder`) and returns the full ``compare.json`` content, the others None.

        Raises:
            RuntimeError: this rank holds another number of rows than it ran cells.
            A backend error if another rank has died (it reports its own error).
        """
        rows = state["rows"]
        if len(rows) != len(self.mine):
            raise RuntimeError(f"rank {self.rank} ran {len(self.mine)} cell(s) but holds {len(rows)} row(s)")
        every: list | None = [None] * self.size if self.writer else None
        dist.gather_object((list(zip(self.mine, rows)), state.get("prune_passes")), every, dst=0)
        if not self.writer:
            return None
        by_cell = {k: row for pairs, _ in every for k, row in pairs}
        state["rows"] = [by_cell[k] for k in range(len(cells))]
        passes = [n for _, n in every]
        if None not in passes:  # summed: a configuration met again on another rank is pruned there again
            state["prune_passes"] = sum(passes)
        state["parallel"] = {"ranks": self.size, "cell_ranks": list(self.owners), "prune_passes": passes}
        write_compare_folder(state, self.out)
        return state


def run_compare_distributed(job):
    """Run ``job`` (a :class:`atprune.jobs.compare.CompareJob`) as this rank of a torchrun launch.

    Returns:
        The ``compare.json`` content on rank 0; None on the other ranks.

    Raises:
        ConfigError: ranks that disagree on the options, cells or tokens, and what
            :func:`atprune.jobs.compare.run_compare_job` raises.
    """
    from atprune.distributed.context import rank_job
    from atprune.jobs.compare import run_compare_job

    world, job = rank_job(job)
    parallel = ParallelCells(world.rank, world.size, job.max_trials, job.out)
    return run_compare_job(job, parallel=parallel)
