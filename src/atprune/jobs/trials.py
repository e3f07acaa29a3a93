"""Trials on one model: prune it again and again from the same dense start, and score each result on held-out data.

:class:`TrialRunner` holds what every trial shares (block-0 inputs, a copy of the dense weights, the dense selection
metric) and tunes one knob of an allocator with a search strategy (:mod:`atprune.jobs.strategies`): ATP's beta for
``atprune search``, and each peer's main option for ``atprune compare --tune-peers``, with the same selection data
and the same trial budget.

Nothing is pruned twice: a trial is identified by its *configuration* (pruner, mean sparsity, the exact per-block
rates and, with ATP's ``attn_offset``, the exact per-layer rates, which with the runner's fixed calibration windows
determine every pruned weight), and the runner remembers,
per configuration, the prune's result and every score measured on it. A configuration met again (e.g. uniform, the
first point of every search, or the value a search chose) is answered from memory, and a prune of the configuration
the model already holds is skipped.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable

import torch

from atprune.allocation import block_sizes, block_statistic, sublayer_sizes
from atprune.allocators import ALLOCATORS, NEEDS_NOTHING, atp_rates, beta_max, get_allocator
from atprune.allocators.offset import offset_interval
from atprune.api import plan, prune, prune_result, resolve_batch_size, resolve_rates
from atprune.engine.passes import first_block_inputs
from atprune.engine.placement import Placement, auto_batch_size
from atprune.errors import ConfigError
from atprune.eval.perplexity import kl_to_reference, next_token_logprobs, perplexity
from atprune.jobs.strategies import best_offset_trial, best_trial, golden_search, grid_betas, offset_search
from atprune.models.adapter import Adapter
from atprune.multimodal.pairs import ImageTextCalibration
from atprune.quant.bits import step_max
from atprune.quant.step import quant_key


UNFINISHED = ("unfinished prune",)  # TrialRunner.current while a prune runs (and after one that raised)


class TrialRunner:
    """What every trial on one model and one data set shares, computed once.

    Holds the block-0 inputs of the calibration windows, a CPU copy of the dense Linear weights (restored before
    each trial), and the dense model's selection perplexity and (for ``metric="kl"``) next-token log-probs.

    Args:
        model: transformers causal LM (dense; pruned in place by each trial).
        calib: ``[nsamples, seqlen]`` int64 calibration windows, or a vision-language model's
            :class:`atprune.multimodal.pairs.ImageTextCalibration` (one feed per image-text pair, each run through
            the whole model once for the block-0 inputs).
        select: ``[nselect, seqlen]`` int64 selection windows.
        metric: ``"ppl"`` (selection perplexity) or ``"kl"`` (mean KL(dense || pruned), nats per token).
        batch_size: windows per forward pass, or ``"auto"``.
        blocks_path: the decoder-block list of an unrecognised layout.
        quantize: an :class:`atprune.quant.QuantSpec`: every trial also quantizes in its pruning pass (None: none).

    The runner owns the model's Linear weights between its calls: it assumes nobody else changes them (it remembers
    which configuration the model holds, see the module docstring).
    """

    def __init__(self, model, calib: torch.Tensor, select: torch.Tensor, *, metric: str = "ppl", batch_size: int = 1,
                 blocks_path: str | None = None, quantize=None):
        self.model, self.calib, self.select = model, calib, select
        # what the engine's passes take: token windows, or the image-text feeds
        windows = calib.feeds if isinstance(calib, ImageTextCalibration) else calib
        self.quantize = quantize  # an atprune.quant.QuantSpec: every trial quantizes in its pruning pass
        self.metric = metric
        self.blocks_path = blocks_path
        self.batch_size = resolve_batch_size(batch_size, model, windows, Placement.default_for(model))
        # logits passes (selection perplexity / KL, evaluation) need room for [batch, seqlen, vocab] too
        self.eval_batch_size = batch_size if batch_size != "auto" else auto_batch_size(
            model.config.get_text_config(), select.shape[1], 16, Placement.default_for(model).device,
            next(model.parameters()).dtype, logits=True)
        self.adapter = Adapter.for_model(model, blocks_path)
        self.block_sizes = block_sizes(self.adapter)  # ATP's legal beta range depends on them
        self.inputs = first_block_inputs(self.adapter, windows, self.batch_size)
        self.windows = windows
        self.linears = {f"{i}.{n}": lin for i, b in enumerate(self.adapter.blocks)
                        for n, lin in self.adapter.linears(b).items()}
        self.dense = {n: lin.weight.detach().to("cpu", copy=True) for n, lin in self.linears.items()}
        self.statistics: dict[tuple, list[float]] = {}  # allocators' dense statistics, shared by trials
        self.reference = next_token_logprobs(model, select, batch_size=self.eval_batch_size) if metric == "kl" else None
        self.seqlen = select.shape[1]
        self.dense_select_ppl = perplexity(model, select.flatten(), self.seqlen, batch_size=self.eval_batch_size)["ppl"]
        self.results: dict[tuple, object] = {}  # configuration -> its PruneResult
        self.scores: dict[tuple, object] = {}  # (configuration, score name) -> what that score measured on it
        self.current: tuple | None = None  # the configuration the model holds now (None: dense; UNFINISHED: neither)
        self.prunes = 0  # prune passes actually run (for reports: how many a cache hit saved)
        self.sublayers: list[tuple[int, int]] | None = None  # (attention, MLP) weights per block, when first needed

    def restore(self) -> None:
        """Put the dense weights back."""
        with torch.no_grad():
            for name, lin in self.linears.items():
                lin.weight.copy_(self.dense[name])
        self.current = None

    def _statistic(self, allocator, allocation: str) -> list[float] | None:
        """The allocator's dense statistic, computed once per allocator and fixed options (trials share it)."""
        if allocator.needs == NEEDS_NOTHING:
            return None
        fixed = {k: v for k, v in allocator.describe().items() if k not in ("name", allocator.tunable)}
        key = (allocation, tuple(sorted(fixed.items())))
        if key not in self.statistics:
            if self.current is not None:  # a dense statistic: measure it on the dense weights
                self.restore()
            self.statistics[key] = block_statistic(allocator, self.adapter, self.windows, self.inputs)
        return self.statistics[key]

    def _resolve(self, method: str, sparsity: float, allocation: str, beta: float | None,
                 options: dict | None, quantize=None) -> tuple[tuple, object]:
        """``(configuration, spec)``: the key of :meth:`configuration` and the resolved
        :class:`atprune.api.PruneSpec` of the request (its allocation's name and options, the rates);
        ``quantize`` None: the runner's."""
        spec = plan(method, sparsity, self.adapter.num_blocks, allocation=allocation, beta=beta,
                    allocation_options=options, block_sizes=self.block_sizes)
        spec = resolve_rates(spec, self.adapter, statistic=self._statistic(spec.allocator, allocation))
        layers = tuple(tuple(sorted((n, float(r)) for n, r in block.items())) for block in (spec.layer_rates or ()))
        quant = quant_key(quantize or self.quantize, self.block_sizes)
        return (method, float(spec.sparsity), tuple(float(r) for r in spec.rates), layers, quant), spec

    def configuration(self, method: str, sparsity: float, allocation: str, beta: float | None = None,
                      options: dict | None = None, quantize=None) -> tuple:
        """``(method, sparsity, rates, layer_rates, quant)``: what determines the weights a prune with these options
        leaves (the runner's calibration windows are fixed); ``rates`` the exact per-block floats the allocator gives,
        ``layer_rates`` ``()`` when every layer takes its block's rate, else (ATP's ``attn_offset``) one
        ``((layer name, rate), ...)`` per block, so an offset trial is never taken for plain ATP; ``quant`` the
        quantization (:func:`atprune.quant.step.quant_key`: grid options and the bits of every block, None without
        quantization) of ``quantize`` (a :class:`atprune.quant.QuantSpec`; None: the runner's), so trials of
        different bit schedules are never confused.

        Raises:
            ConfigError: illegal options, e.g. a value that puts a rate outside [0, 1) (as :func:`atprune.api.prune`).
        """
        return self._resolve(method, sparsity, allocation, beta, options, quantize)[0]

    def known(self, method: str, sparsity: float, allocation: str, beta: float | None = None,
              options: dict | None = None, quantize=None):
        """The :class:`atprune.api.PruneResult` of the prune that made this request's configuration, without pruning:
        its blocks, counts and seconds, described as this request (allocation, options); e.g. ATP at beta 0 met as
        the uniform run's weights is reported as ATP at beta 0.

        Raises:
            KeyError: the configuration was never pruned by this runner.
        """
        key, spec = self._resolve(method, sparsity, allocation, beta, options, quantize)
        made = self.results[key]
        result = prune_result(spec, made.blocks, made.seconds, made.calibration, None, made.quantization)
        result.grids = getattr(made, "grids", {})
        return result

    def prune(self, method: str, sparsity: float, allocation: str, beta: float | None = None, progress: bool = False,
              options: dict | None = None, quantize=None):
        """Prune the dense weights with one allocation (``options``: the allocator's, e.g. ``{"lam": 0.05}``) and
        quantize with ``quantize`` (None: the runner's spec), unless the model already holds that very configuration
        (then :meth:`known`); returns :class:`atprune.api.PruneResult`."""
        key = self.configuration(method, sparsity, allocation, beta, options, quantize)
        if key == self.current:
            return self.known(method, sparsity, allocation, beta, options, quantize)
        allocator = get_allocator(allocation, beta=beta, **(options or {}))
        statistic = self._statistic(allocator, allocation)
        self.restore()
        self.current = UNFINISHED  # until prune() returns: weights neither dense nor a configuration if it raises
        result = prune(self.model, method=method, sparsity=sparsity, allocation=allocation, beta=beta, calib=self.calib,
                       block_inputs=self.inputs, batch_size=self.batch_size, progress=progress,
                       blocks_path=self.blocks_path, allocation_options=options, allocator_statistic=statistic,
                       quantize=quantize or self.quantize)
        self.prunes += 1
        self.current = key
        self.results[key] = result
        return result

    def measure(self, key: tuple, name: str, fn: Callable[[], object]):
        """``fn()`` (a score of the model as it is now, which must hold configuration ``key``), remembered under
        ``(key, name)``: asked again, the remembered value is returned without calling ``fn``.

        Args:
            key: a configuration of :meth:`configuration`.
            name: what ``fn`` measures (e.g. ``"selection ppl"``); one key may hold several names.
            fn: the measurement; its return value (a float or a dict) is stored as it is.

        Raises:
            RuntimeError: ``(key, name)`` is not remembered and the model does not hold ``key`` now (measuring it would
                score other weights).
        """
        if (key, name) not in self.scores:
            if key != self.current:
                raise RuntimeError(f"measure {name!r}: the model holds {self.current}, not {key}")
            self.scores[key, name] = fn()
        return self.scores[key, name]

    def score(self, select: torch.Tensor | None = None) -> float:
        """The selection metric of the model as it is now (on ``select`` windows if given: perplexity only)."""
        if select is not None:
            return perplexity(self.model, select.flatten(), select.shape[1], batch_size=self.eval_batch_size)["ppl"]
        if self.metric == "kl":
            return kl_to_reference(self.model, self.select, self.reference, batch_size=self.eval_batch_size)
        return perplexity(self.model, self.select.flatten(), self.seqlen, batch_size=self.eval_batch_size)["ppl"]

    def trial(self, method: str, sparsity: float, beta: float, allocation: str = "atp",
              select: torch.Tensor | None = None, scorer: tuple[str, Callable[[], object]] | None = None,
              attn_offset: float = 0.0) -> dict:
        """One full prune with ``allocation`` at ``beta`` (the value of its tunable option: ATP's beta, OWL's lam, ...)
        and its selection metric; an illegal value (rates leaving [0, 1)) scores inf. ``select``: score perplexity on
        these windows instead; ``scorer``: ``(name, fn)``, score with ``fn()`` instead (a float, or a dict with
        ``"ppl"``). ``attn_offset``: ATP's attention/MLP offset (recorded when not 0). A configuration scored before
        the same way is not pruned again (``"cached": True``).

        Returns:
            ``{<option>: beta, "rates": per-block floats, "metric": float, "overall_sparsity": float, "seconds": wall
            seconds}``, plus ``"attn_offset"`` when not 0 and ``"cached"`` for a remembered configuration; an illegal
            value gives ``"rates": None``, ``"metric": inf`` and ``"refused"`` (the reason) instead.

        Raises:
            ConfigError: ``attn_offset`` given for an allocation other than ATP.
        """
        t0 = time.perf_counter()
        knob = ALLOCATORS.lookup(allocation).tunable
        beta_arg, options = (beta, None) if allocation == "atp" else (None, {knob: beta})
        if attn_offset:
            if allocation != "atp":
                raise ConfigError(f"attn_offset is an option of allocation 'atp', not {allocation!r}")
            options = {"attn_offset": attn_offset}
        extra = {"attn_offset": attn_offset} if attn_offset else {}
        try:
            key = self.configuration(method, sparsity, allocation, beta_arg, options)
        except ConfigError as err:
            return {knob: beta, **extra, "rates": None, "metric": math.inf, "refused": str(err),
                    "seconds": time.perf_counter() - t0}
        if scorer is not None:
            name, fn = scorer
        elif select is not None:
            digest = hashlib.sha256(select.cpu().numpy().tobytes()).hexdigest()[:16]
            name, fn = f"ppl on windows {digest} {list(select.shape)}", lambda: self.score(select)
        else:
            name, fn = "selection " + self.metric, self.score
        cached = (key, name) in self.scores
        result = self.results[key] if cached else self.prune(method, sparsity, allocation, beta_arg, options=options)
        value = self.measure(key, name, fn)
        metric = value["ppl"] if isinstance(value, dict) else value
        return {knob: beta, **extra, "rates": result.spec["rates"], "metric": metric,
                "overall_sparsity": result.overall_sparsity, "seconds": time.perf_counter() - t0} | (
                    {"cached": True} if cached else {})

    def tune(self, method: str, sparsity: float, allocation: str = "atp", *, strategy: str = "golden",
             max_trials: int = 6, step: float = 0.002, memo: dict | None = None, on_trial=None,
             select: torch.Tensor | None = None, scorer: tuple[str, Callable[[], object]] | None = None,
             trial=None) -> tuple[list, float, float]:
        """Search ``allocation``'s tunable option over ``[0, tunable_max]`` (0 is uniform) with a strategy (``grid``:
        ATP only, the reference grid of step ``step``); ``memo`` maps values already measured to their metric
        (resume), ``on_trial(record)`` is called after each new trial; ``select`` scores on other windows (e.g. the
        test split, for the reference protocol), ``scorer`` scores with a named function instead (see :meth:`trial`);
        ``trial`` runs one trial in place of :meth:`trial` (same arguments and record;
        :mod:`atprune.distributed.trials` serves records computed on other processes). Returns ``(trials, chosen
        value, its metric)``.

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
                record = (trial or self.trial)(method, sparsity, value, allocation, select, scorer)
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

    def offset_range(self, sparsity: float, beta: float) -> tuple[float, float]:
        """``(lo, hi)``: the legal interval of ATP's ``attn_offset`` at ``beta`` on this model
        (:func:`atprune.allocators.offset.offset_interval`).

        Raises:
            ConfigError: an illegal beta, or a layer that is neither attention nor MLP.
        """
        if self.sublayers is None:
            self.sublayers = sublayer_sizes(self.adapter)
        lo, hi, _ = offset_interval(atp_rates(sparsity, self.block_sizes, beta), self.sublayers)
        return lo, hi

    def tune_offset(self, method: str, sparsity: float, *, max_trials: int = 6, memo: dict | None = None,
                    on_trial=None, select: torch.Tensor | None = None,
                    scorer: tuple[str, Callable[[], object]] | None = None,
                    trial=None) -> tuple[list, tuple[float, float], float]:
        """ATP's beta and ``attn_offset`` together, within ``max_trials`` trials
        (:func:`atprune.jobs.strategies.offset_search`); ``memo`` maps ``(beta, offset)`` already measured to their
        metric, ``trial`` runs one trial in place of :meth:`trial` (called as ``trial(method, sparsity, beta, "atp",
        select, scorer, attn_offset=offset)``, offset 0.0 included; :mod:`atprune.distributed.trials`), the rest as
        :meth:`tune`. Returns ``(trials, (beta, offset) chosen, its metric)``.

        Raises:
            ConfigError: ``max_trials < 5``, or a layer that is neither attention nor MLP (before any trial).
        """
        memo = dict(memo or {})
        self.offset_range(sparsity, 0.0)  # every layer classified, before the first prune

        def objective(beta: float, offset: float) -> float:
            if (beta, offset) not in memo:
                record = (trial or self.trial)(method, sparsity, beta, "atp", select, scorer, attn_offset=offset)
                memo[beta, offset] = record["metric"]
                if on_trial is not None:
                    on_trial(record)
            return memo[beta, offset]

        trials = offset_search(objective, beta_max(sparsity, self.block_sizes),
                               lambda b: self.offset_range(sparsity, b), max_trials)
        chosen, value = best_offset_trial(trials)
        return trials, chosen, value

    def search(self, method: str, sparsity: float, **options) -> tuple[list, float, float]:
        """ATP's beta: :meth:`tune` with ``allocation="atp"``."""
        return self.tune(method, sparsity, "atp", **options)

    def bits_step_range(self) -> float:
        """The legal maximum of the ATP bit schedule's step for the runner's spec on this model
        (:func:`atprune.quant.bits.step_max` over the blocks' weight counts).

        Raises:
            ConfigError: the runner quantizes without ``bits_allocation="atp"`` (or does not quantize).
        """
        spec = self.quantize
        if spec is None or spec.bits_allocation != "atp":
            raise ConfigError("--bits-step search needs --quantize wN --bits-allocation atp")
        return step_max(spec.bits_mean, self.block_sizes, spec.bits_choices)

    def tune_bits_step(self, method: str, sparsity: float, allocation: str = "uniform", beta: float | None = None,
                       options: dict | None = None, *, max_trials: int = 6, memo: dict | None = None,
                       on_trial=None) -> tuple[list, float, float]:
        """The ATP bit schedule's step by golden search over ``[0, bits_step_range()]`` (the first trial is step 0:
        uniform bits as far as the widths allow), the sparsity allocation fixed (``allocation`` with ``beta`` /
        ``options``), scored with the selection metric on the runner's selection windows. ``memo``: step -> metric
        already measured (resume); ``on_trial(record)`` after each new trial, record ``{"bits_step", "block_bits",
        "mean_bits", "rates", "metric", "overall_sparsity", "seconds"[, "cached"]}``. Returns ``(trials, chosen step,
        its metric)``.

        Raises:
            ConfigError: see :meth:`bits_step_range`; illegal allocation options (before any trial).
        """
        hi = self.bits_step_range()
        self.configuration(method, sparsity, allocation, beta, options)  # illegal options: refused before any prune
        memo = dict(memo or {})

        def objective(step: float) -> float:
            if step not in memo:
                record = self._bits_objective(method, sparsity, step, allocation, beta, options)
                memo[step] = record["metric"]
                if on_trial is not None:
                    on_trial(record)
            return memo[step]

        trials = golden_search(objective, hi, max_trials)
        chosen, value = best_trial(trials)
        return trials, chosen, value

    def _bits_objective(self, method: str, sparsity: float, step: float, allocation: str, beta: float | None,
                        options: dict | None) -> dict:
        """One trial of :meth:`tune_bits_step`: prune (unless this configuration was scored before: ``"cached"``)
        and quantize at ``step``, score with the selection metric; returns its record."""
        from dataclasses import replace

        from atprune.quant.bits import mean_bits
        from atprune.quant.step import block_bits

        t0 = time.perf_counter()
        spec = replace(self.quantize, bits_step=float(step))
        key = self.configuration(method, sparsity, allocation, beta, options, spec)
        name = "selection " + self.metric
        cached = (key, name) in self.scores
        result = self.results[key] if cached else self.prune(method, sparsity, allocation, beta, options=options,
                                                             quantize=spec)
        value = self.measure(key, name, self.score)
        bits = block_bits(spec, self.block_sizes)
        return {"bits_step": float(step), "block_bits": bits, "mean_bits": mean_bits(bits, self.block_sizes),
                "rates": result.spec["rates"], "metric": value, "overall_sparsity": result.overall_sparsity,
                "seconds": time.perf_counter() - t0} | ({"cached": True} if cached else {})
