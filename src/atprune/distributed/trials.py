"""``torchrun --nproc-per-node N -m atprune search ...``: the trials of the beta search on N ranks at once.

Every rank loads the whole model and builds the same :class:`atprune.jobs.trials.TrialRunner` (whole calibration
set, same selection windows: checked by an all-gathered digest); a trial is one full prune from the dense weights
plus its selection metric, on one rank, with no data-parallel calibration inside it.

The search strategies are sequential (each point depends on the metrics before it), so the ranks evaluate, in
rounds, the points the search *may* ask for next, and the search itself is then replayed on the gathered metrics:

1. Ask the search (replayed on the metrics known so far) for its next point; that point is certain.
2. Speculate: replay it again with each hypothetical outcome of that point, "better than every metric so far" (the
   new best) and "worse" (inf), and ask for the point after it; breadth first, the "better" branch first, until
   there are N distinct points or no branch asks for more. The golden search's next point depends only on which
   point is best (:func:`atprune.jobs.strategies.golden_search`), so its two branches hold the two possible next
   points; the first three points (0 and the two golden points) do not depend on any metric, so they run in one
   round on 3 ranks; the grid (fixed points) runs N points per round.
3. Rank r evaluates the r-th of those points; the records are all-gathered, every rank adds them to what it knows.
4. Repeat until the search, replayed on what is known, asks for nothing more. The final replay serves every trial
   from the gathered records, so the trials (values, metrics, order), the chosen value and its metric equal a
   one-process run's exactly: each trial's record is what one process would compute (same dense start, same data,
   same arithmetic); speculative points the search did not ask for are dropped (counted in ``describe()``).

The search of ATP's beta with its attention/MLP offset (``--attn-offset search``, :meth:`ParallelTrials.tune_offset`)
runs the same way, its points being ``(beta, offset)``: the golden part as above, then the two offsets at the chosen
beta (in one round on 2 ranks or more).

Nothing is written before the end: rank 0 alone evaluates the final model and writes the output folder
(atomically, as in one process); a search interrupted under torchrun leaves no folder (no ``search.json`` to
resume from; ``--resume`` still reads one a one-process run left).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from atprune.distributed.context import check_same


class _Asked(BaseException):
    """Raised by the probe trial function: the search asks for ``value`` (a BaseException, so that no
    ``except Exception`` on the way catches it)."""

    def __init__(self, value: float):
        super().__init__(value)
        self.value = value


def next_value(tune: Callable, memo: dict[float, float]) -> float | None:
    """The value a search asks for next when ``memo`` (value -> metric) is all it knows, or None when it has finished.

    Args:
        tune: ``tune(memo=..., trial=...)``, :meth:`atprune.jobs.trials.TrialRunner.tune` with every other argument
            bound (or :meth:`~atprune.jobs.trials.TrialRunner.tune_offset`: its values are ``(beta, offset)``).
    """
    def asked(method, sparsity, value, *rest, attn_offset=None):
        raise _Asked(value if attn_offset is None else (value, attn_offset))

    try:
        tune(memo=dict(memo), trial=asked)
    except _Asked as ask:
        return ask.value
    except ValueError:  # best_trial: no finite metric in a hypothetical branch; the real replay raises it again
        return None
    return None


def speculate(ask: Callable[[dict], float | None], memo: dict[float, float], width: int) -> list[float]:
    """Up to ``width`` distinct values the search may ask for next, the certain one first (see the module
    docstring, step 2).

    Args:
        ask: ``ask(memo) -> value or None``: :func:`next_value` with the search bound.
        memo: what is known, value -> metric (lower is better; inf: refused or non-finite).
        width: how many values at most (the number of ranks).

    Returns:
        Values not in ``memo``, breadth first over the hypothetical outcomes ("better" before "worse"); ``[]`` when
        the search has finished. At most ``2 * width`` replays per level.
    """
    found: list[float] = []
    level = [dict(memo)]
    while level and len(found) < width:
        below = []
        for hyp in level:
            value = ask(hyp)
            if value is None:
                continue
            if value not in found:
                found.append(value)
                if len(found) == width:
                    break
            finite = [v for v in hyp.values() if math.isfinite(v)]
            better = min(finite) - 1.0 if finite else 0.0
            below += [hyp | {value: better}, hyp | {value: math.inf}]
        level = below[: 2 * width]
    return found


def in_rounds(tune: Callable, memo: dict[float, float], width: int,
              evaluate: Callable[[list[float]], dict[float, dict]]) -> tuple[dict[float, dict], int, int]:
    """Evaluate, round after round, up to ``width`` values the search may ask for (:func:`speculate`) until the
    search, replayed on what is known, asks for nothing more (module docstring, steps 1-4).

    Args:
        tune: ``tune(memo=..., trial=...)``: the search with every other argument bound (see :func:`next_value`).
        memo: metrics known before (a resumed search), value -> metric.
        width: values per round (the number of ranks).
        evaluate: ``evaluate(values) -> {value: record}`` for every value given, each record holding its
            ``"metric"`` (the ranks' trials, gathered).

    Returns:
        ``(records, rounds, evaluated)``: every record evaluated, value -> record; the number of rounds; the number of
        values evaluated (on the search's path or not).
    """
    known = dict(memo)
    records: dict[float, dict] = {}
    rounds = evaluated = 0
    while todo := speculate(lambda hyp: next_value(tune, hyp), known, width):
        got = evaluate(todo)
        for value in todo:
            records[value] = got[value]
            known[value] = got[value]["metric"]
        rounds, evaluated = rounds + 1, evaluated + len(todo)
    return records, rounds, evaluated


class ParallelTrials:
    """This rank's part of a parallel search, handed to :func:`atprune.jobs.search.run_search_job` (``parallel=``).

    Args:
        rank, size: this process's rank and the number of processes (of the default group).

    Attributes:
        writer: rank 0 (evaluates the final model and writes the folder).
        rounds, evaluated, kept: rounds of parallel trials, trials evaluated on all ranks, trials the search used
            (summed over the searches this object ran).
    """

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self.rounds = self.evaluated = self.kept = 0

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def tune(self, runner, method: str, sparsity: float, allocation: str = "atp", *, memo: dict | None = None,
             on_trial=None, **options) -> tuple[list, float, float]:
        """:meth:`atprune.jobs.trials.TrialRunner.tune` with the trials spread over the ranks (module docstring);
        the same arguments and result, the same on every rank. In each round rank r runs the r-th value (ranks
        beyond the round's values wait); ``on_trial(record)`` is called for every trial of the search, in order,
        once all of them are known.

        Raises:
            ConfigError: ranks holding different calibration or selection tokens, and whatever ``tune`` raises.
            A backend error if another rank has died (it reports its own error).
        """
        def search(**kw):
            return runner.tune(method, sparsity, allocation, **options, **kw)

        def one(value: float) -> dict:
            return runner.trial(method, sparsity, value, allocation, options.get("select"), options.get("scorer"))

        return self._spread(runner, search, one, memo, on_trial)

    def tune_offset(self, runner, method: str, sparsity: float, *, memo: dict | None = None, on_trial=None,
                    **options) -> tuple[list, tuple[float, float], float]:
        """:meth:`atprune.jobs.trials.TrialRunner.tune_offset` (ATP's beta and ``attn_offset``) with the trials
        spread over the ranks as :meth:`tune` spreads them; values are ``(beta, offset)``, ``memo`` is keyed so.

        Raises:
            ConfigError: as :meth:`tune`, and whatever ``tune_offset`` raises.
        """
        def search(**kw):
            return runner.tune_offset(method, sparsity, **options, **kw)

        def one(point: tuple[float, float]) -> dict:
            beta, offset = point
            return runner.trial(method, sparsity, beta, "atp", options.get("select"), options.get("scorer"),
                                attn_offset=offset)

        return self._spread(runner, search, one, memo, on_trial)

    def _spread(self, runner, search: Callable, one: Callable, memo: dict | None, on_trial):
        """The rounds of :func:`in_rounds` for ``search(memo=, trial=, on_trial=)``, ``one(value)`` running one
        trial on this rank; then ``search`` replayed on the gathered records (its result)."""
        check_same("calibration and selection tokens", torch.cat([runner.calib.flatten(), runner.select.flatten(),
                                                                  torch.tensor(runner.select.shape)]))

        def evaluate(values: list) -> dict:
            mine = values[self.rank] if self.rank < len(values) else None
            record = None if mine is None else one(mine)
            every: list = [None] * self.size
            dist.all_gather_object(every, (mine, record))
            return {value: rec for value, rec in every if value is not None}

        records, rounds, evaluated = in_rounds(search, dict(memo or {}), self.size, evaluate)
        self.rounds, self.evaluated = self.rounds + rounds, self.evaluated + evaluated

        def served(method_, sparsity_, value, *rest, attn_offset=None):
            self.kept += 1
            return records[value if attn_offset is None else (value, attn_offset)]

        return search(memo=memo, on_trial=on_trial, trial=served)

    def describe(self) -> dict:
        """JSON for ``search.json``: ranks, rounds, trials evaluated and used (the rest were speculative)."""
        return {"ranks": self.size, "rounds": self.rounds, "trials_evaluated": self.evaluated,
                "trials_used": self.kept}


def run_search_distributed(job):
    """Run ``job`` (a :class:`atprune.jobs.search.SearchJob`) as this rank of a torchrun launch.

    Returns:
        The ``search.json`` content on rank 0; None on the other ranks.

    Raises:
        ConfigError: ranks that disagree on the options or the calibration / selection tokens, and what
            :func:`atprune.jobs.search.run_search_job` raises.
    """
    from atprune.distributed.context import rank_job
    from atprune.jobs.search import run_search_job

    world, job = rank_job(job)
    state = run_search_job(job, parallel=ParallelTrials(world.rank, world.size))
    return state if world.writer else None
