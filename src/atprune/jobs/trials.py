"""Trials on one model: prune it again and again from the same dense start, and score each result on held-out data.

:class:`TrialRunner` holds what every trial shares (block-0 inputs, a copy of the dense weights, the dense selection
metric) and tunes one knob of an allocator with a search strategy (:mod:`atprune.jobs.strategies`): ATP's beta for
``atprune search``, and each peer's main option for ``atprune compare --tune-peers``, with the same selection data
and the same trial budget.
"""

from __future__ import annotations

import math
import time

import torch

from atprune.allocation import block_sizes, block_statistic
from atprune.allocators import ALLOCATORS, NEEDS_NOTHING, get_allocator
from atprune.api import prune, resolve_batch_size
from atprune.engine.passes import first_block_inputs
from atprune.engine.placement import Placement, auto_batch_size
from atprune.errors import ConfigError
from atprune.eval.perplexity import kl_to_reference, next_token_logprobs, perplexity
from atprune.jobs.strategies import best_trial, golden_search, grid_betas
from atprune.models.adapter import Adapter


class TrialRunner:
    """What every trial on one model and one data set shares, computed once.

    Holds the block-0 inputs of the calibration windows, a CPU copy of the dense Linear weights (restored before
    each trial), and the dense model's selection perplexity and (for ``metric="kl"``) next-token log-probs.

    Args:
        model: transformers causal LM (dense; pruned in place by each trial).
        calib: ``[nsamples, seqlen]`` int64 calibration windows.
        select: ``[nselect, seqlen]`` int64 selection windows.
        metric: ``"ppl"`` (selection perplexity) or ``"kl"`` (mean KL(dense || pruned), nats per token).
        batch_size: windows per forward pass, or ``"auto"``.
        blocks_path: the decoder-block list of an unrecognised layout.
        quantize: an :class:`atprune.quant.QuantSpec`: every trial also quantizes in its pruning pass (None: none).
    """

    def __init__(self, model, calib: torch.Tensor, select: torch.Tensor, *, metric: str = "ppl", batch_size: int = 1,
                 blocks_path: str | None = None, quantize=None):
        self.model, self.calib, self.select = model, calib, select
        self.quantize = quantize  # an atprune.quant.QuantSpec: every trial quantizes in its pruning pass
        self.metric = metric
        self.blocks_path = blocks_path
        self.batch_size = resolve_batch_size(batch_size, model, calib, Placement.default_for(model))
        # logits passes (selection perplexity / KL, evaluation) need room for [batch, seqlen, vocab] too
        self.eval_batch_size = self.batch_size if batch_size != "auto" else auto_batch_size(
            model.config.get_text_config(), select.shape[1], 16, Placement.default_for(model).device,
            next(model.parameters()).dtype, logits=True)
        self.adapter = Adapter.for_model(model, blocks_path)
        self.block_sizes = block_sizes(self.adapter)  # ATP's legal beta range depends on them
        self.inputs = first_block_inputs(self.adapter, calib, self.batch_size)
        self.linears = {f"{i}.{n}": lin for i, b in enumerate(self.adapter.blocks)
                        for n, lin in self.adapter.linears(b).items()}
        self.dense = {n: lin.weight.detach().to("cpu", copy=True) for n, lin in self.linears.items()}
        self.statistics: dict[tuple, list[float]] = {}  # allocators' dense statistics, shared by trials
        self.reference = next_token_logprobs(model, select, batch_size=self.eval_batch_size) if metric == "kl" else None
        self.seqlen = select.shape[1]
        self.dense_select_ppl = perplexity(model, select.flatten(), self.seqlen, batch_size=self.eval_batch_size)["ppl"]

    def restore(self) -> None:
        """Put the dense weights back."""
        with torch.no_grad():
            for name, lin in self.linears.items():
                lin.weight.copy_(self.dense[name])

    def prune(self, method: str, sparsity: float, allocation: str, beta: float | None = None, progress: bool = False,
              options: dict | None = None):
        """Restore the dense weights and prune with one allocation (``options``: the allocator's, e.g.
        ``{"lam": 0.05}``); returns :class:`atprune.api.PruneResult`."""
        self.restore()
        allocator = get_allocator(allocation, beta=beta, **(options or {}))
        statistic = None
        if allocator.needs != NEEDS_NOTHING:  # computed once per allocator and fixed options: trials share it
            fixed = {k: v for k, v in allocator.describe().items() if k not in ("name", allocator.tunable)}
            key = (allocation, tuple(sorted(fixed.items())))
            if key not in self.statistics:
                self.statistics[key] = block_statistic(allocator, self.adapter, self.calib, self.inputs)
            statistic = self.statistics[key]
        return prune(self.model, method=method, sparsity=sparsity, allocation=allocation, beta=beta, calib=self.calib,
                     block_inputs=self.inputs, batch_size=self.batch_size, progress=progress,
                     blocks_path=self.blocks_path, allocation_options=options, allocator_statistic=statistic,
                     quantize=self.quantize)

    def score(self, select: torch.Tensor | None = None) -> float:
        """The selection metric of the model as it is now (on ``select`` windows if given: perplexity only)."""
        if select is not None:
            return perplexity(self.model, select.flatten(), select.shape[1], batch_size=self.eval_batch_size)["ppl"]
        if self.metric == "kl":
            return kl_to_reference(self.model, self.select, self.reference, batch_size=self.eval_batch_size)
        return perplexity(self.model, self.select.flatten(), self.seqlen, batch_size=self.eval_batch_size)["ppl"]

    def trial(self, method: str, sparsity: float, beta: float, allocation: str = "atp",
              select: torch.Tensor | None = None) -> dict:
        """One full prune with ``allocation`` at ``beta`` (the value of its tunable option: ATP's beta, OWL's lam, ...)
        and its selection metric; an illegal value (rates leaving [0, 1)) scores inf."""
        t0 = time.perf_counter()
        knob = ALLOCATORS.lookup(allocation).tunable
        try:
            if allocation == "atp":
                result = self.prune(method, sparsity, "atp", beta)
            else:
                result = self.prune(method, sparsity, allocation, options={knob: beta})
        except ConfigError as err:
            return {knob: beta, "rates": None, "metric": math.inf, "refused": str(err),
                    "seconds": time.perf_counter() - t0}
        return {knob: beta, "rates": result.spec["rates"], "metric": self.score(select),
                "overall_sparsity": result.overall_sparsity, "seconds": time.perf_counter() - t0}

    def tune(self, method: str, sparsity: float, allocation: str = "atp", *, strategy: str = "golden",
             max_trials: int = 6, step: float = 0.002, memo: dict | None = None, on_trial=None,
             select: torch.Tensor | None = None) -> tuple[list, float, float]:
        """Search ``allocation``'s tunable option over ``[0, tunable_max]`` (0 is uniform) with a strategy (``grid``:
        ATP only, the reference grid of step ``step``); ``memo`` maps values already measured to their metric
        (resume), ``on_trial(record)`` is called after each new trial; ``select`` scores on other windows (e.g. the
        test split, for the reference protocol). Returns ``(trials, chosen value, its metric)``.

        Raises:
            ConfigError: for an allocation with no tunable option, or ``grid`` for another allocation than ATP.
        """
        allocator = get_allocator(allocation, beta=0.0 if allocation == "atp" else None)
        if allocator.tunable is None:
            raise ConfigError(f"allocation {allocation!r} has no option to tune")
        memo = dict(memo or {})
        hi = allocator.tunable_max(sparsity, self.block_sizes)

        def objective(value: float) -> float:
            if value not in memo:
                record = self.trial(method, sparsity, value, allocation, select)
                memo[value] = record["metric"]
                if on_trial is not None:
                    on_trial(record)
            return memo[value]

        if strategy == "golden":
            trials = golden_search(objective, hi, max_trials)
        elif allocation == "atp":
            trials = [(b, objective(b)) for b in grid_betas(sparsity, self.block_sizes, step)]
        else:
            raise ConfigError(f"the grid strategy is ATP's reference grid; tune {allocation!r} with golden")
        chosen, value = best_trial(trials)
        return trials, chosen, value

    def search(self, method: str, sparsity: float, **options) -> tuple[list, float, float]:
        """ATP's beta: :meth:`tune` with ``allocation="atp"``."""
        return self.tune(method, sparsity, "atp", **options)
