"""The Python API: ``prune()`` an in-memory transformers model, ``evaluate_perplexity()`` it.

    >>> from atprune import load_model, prune, evaluate_perplexity
    >>> model, tok = load_model("smollm2-135m")
    >>> result = prune(model, tok, method="wanda", sparsity=0.7, allocation="atp", beta=0.01,
    ...                calib="wikitext2", nsamples=32, seqlen=512, data_dir="../shared/data")
    >>> result.overall_sparsity
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from atprune import data as data_mod
from atprune.allocation import allocate
from atprune.allocation import block_sizes as model_block_sizes
from atprune.allocation import layer_rates as offset_layer_rates
from atprune.allocation import offset_statistic
from atprune.allocation import needs_calibration as allocator_needs_calibration
from atprune.allocators import NEEDS_NOTHING, get_allocator
from atprune.allocators.nm import round_to_nm
from atprune.engine.passes import BlockInputs, first_block_inputs, sequential
from atprune.engine.placement import Placement, auto_batch_size
from atprune.errors import ConfigError, check_positive_int, check_sparsity
from atprune.eval.perplexity import perplexity
from atprune.models.adapter import Adapter, set_weight
from atprune.multimodal.pairs import ImageTextCalibration
from atprune.pruners import Pattern, get_pruner
from atprune.pruners.dsnot import check_refine, dsnot_refine, dsnot_skips
from atprune.quant.spec import QuantSpec
from atprune.quant.step import LayerQuant


@dataclass(frozen=True)
class PruneSpec:
    """A validated pruning request: what to prune with, at which rates."""

    method: str
    sparsity: float
    pattern: Pattern
    allocation: str
    beta: float | None
    rates: tuple[float, ...]  # for L equal blocks; empty for allocators that need the model (see prune())
    allocator: object = None
    statistic: dict = field(default_factory=dict)  # what the allocator derived the rates from (after prune())
    block_n: tuple[int, ...] = ()  # mixed N:M: the N of every block (after prune(); see atprune.allocators.nm)
    layer_rates: tuple[dict, ...] = ()  # ATP's attn_offset: {layer name: rate} per block (after prune()); else ()

    def block_pattern(self, i: int) -> Pattern:
        """The pattern of block ``i``: ``N_i:M`` for a mixed N:M run, else the run's pattern."""
        return Pattern(self.block_n[i], self.pattern.m) if self.block_n else self.pattern

    def describe(self) -> dict:
        extra = (self.allocator.describe() if self.allocator is not None else {}) | self.statistic
        return {"method": self.method, "sparsity": self.sparsity, "pattern": str(self.pattern),
                "allocation": self.allocation, "beta": self.beta} | {f"allocator_{k}": v for k, v in extra.items()
                                                                      if k != "name"} | (
            {"mixed_nm": True, "block_n": list(self.block_n)} if self.block_n else {})


def plan(method: str, sparsity: float | None, num_blocks: int, *, allocation: str = "uniform",
         beta: float | None = None, pattern: str | Pattern = "unstructured",
         allocation_options: dict | None = None, block_sizes: list[int] | None = None) -> PruneSpec:
    """Check every pruning option and compute the per-block sparsity ratios, without touching a model.

    Args:
        method: pruner name (``magnitude``, ``wanda``, ``sparsegpt``).
        sparsity: target sparsity ratio S in [0, 1); for an N:M pattern it may be None (taken as 1 - N/M).
        num_blocks: L, the model's number of decoder blocks.
        allocation: allocator name (``uniform``, ``atp``, ``owl``, ``alphapruning``, ``dlp``).
        beta: ATP step (required for ``atp``).
        pattern: ``"unstructured"`` or ``"N:M"``.
        allocation_options: options of the allocator (``M``, ``lam`` for owl; ``eps`` for alphapruning;
            ``alpha`` for dlp; ``attn_offset`` for atp, see :mod:`atprune.allocators.offset`: only ``|D| < 1`` is
            checked here, :func:`prune` checks its exact range on the model). Rates are for ``num_blocks`` equal
            blocks; :func:`prune` recomputes them for the model's block sizes. Model-dependent allocators leave ``rates`` empty until :func:`prune`.
        block_sizes: prunable weights per block, when known (ATP's legal beta range depends on them); default:
            ``num_blocks`` equal blocks.

    Raises:
        ConfigError: unknown method or allocation, sparsity outside [0, 1), illegal beta (the message gives the
            legal range for this S and L), malformed N:M, an N:M pattern with a different sparsity or with a
            2:4-style M < 3 with a non-uniform allocation. An N:M pattern with a non-uniform allocation is
            mixed N:M: :func:`prune` rounds each block's rate to one N (:func:`atprune.allocators.nm.round_to_nm`).
            A non-zero ``attn_offset`` with an N:M pattern.
    """
    get_pruner(method)
    pattern = pattern if isinstance(pattern, Pattern) else Pattern.parse(pattern)
    if pattern.structured:
        implied = pattern.sparsity
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ConfigError(f"pattern {pattern} fixes the sparsity ratio at {implied:g}; got --sparsity {sparsity:g}")
        if allocation != "uniform" and pattern.m < 3:
            raise ConfigError(f"mixed N:M with allocation {allocation!r} needs M >= 3 so that blocks can differ "
                              f"(pattern {pattern} allows only N={pattern.n}); use e.g. 4:8, or allocation 'uniform'")
        sparsity = implied
    if sparsity is None:
        raise ConfigError("a sparsity ratio is required for unstructured pruning (e.g. 0.5)")
    check_sparsity(sparsity)
    if allocation == "atp" and beta is None:
        raise ConfigError("allocation 'atp' needs a beta, e.g. --beta 0.01 (0 is uniform)")
    if allocation != "atp" and beta is not None:
        raise ConfigError(f"--beta applies to allocation 'atp' only, not {allocation!r}")
    allocator = get_allocator(allocation, beta=beta, **(allocation_options or {}))
    blocks = block_sizes if block_sizes is not None else num_blocks
    allocator.check(sparsity, blocks)
    if getattr(allocator, "attn_offset", 0.0) and pattern.structured:
        raise ConfigError(f"attn_offset applies to unstructured sparsity only, not pattern {pattern} (every layer of a "
                          "block keeps the block's N:M)")
    rates = () if allocator.needs != NEEDS_NOTHING else allocator.allocate(sparsity, blocks).rates
    return PruneSpec(method, float(sparsity), pattern, allocation, beta, rates, allocator)


def check_widths(adapter: Adapter, pattern: Pattern) -> None:
    """Raise ConfigError if an N:M pattern's M does not divide the input width of some prunable layer."""
    for i, block in enumerate(adapter.blocks):
        for name, lin in adapter.linears(block).items():
            pattern.check_width(lin.in_features, f"block {i} {name}")


def check_attn_offset(spec: PruneSpec, adapter: Adapter) -> None:
    """ATP's ``attn_offset`` on this model, before any data is read: every prunable layer is attention or MLP and
    every layer rate stays in [0, 1) for the model's block sizes (:mod:`atprune.allocators.offset`); nothing to
    check without an offset.

    Raises:
        ConfigError: a layer that is neither, or an illegal offset (the message gives the legal interval).
    """
    if getattr(spec.allocator, "attn_offset", 0.0):
        rates = spec.allocator.allocate(spec.sparsity, model_block_sizes(adapter)).rates
        offset_layer_rates(spec.allocator, spec.sparsity, adapter, rates)


def needs_calibration(spec: PruneSpec, refine: str | None = None) -> bool:
    """Whether pruning as ``spec`` says reads calibration data (magnitude with uniform, atp or alphapruning does
    not; any ``refine`` does)."""
    return get_pruner(spec.method).needs_stats or refine is not None or allocator_needs_calibration(spec.allocator)


@dataclass
class PruneResult:
    """What a pruning run did.

    ``blocks[i]`` holds ``target`` (rate given by the allocator), ``achieved`` (zero fraction over the block's
    pruned Linear weights), ``params`` and ``zeros`` (counts) and ``layers`` (per layer achieved sparsity); with ATP's
    ``attn_offset`` also ``layer_targets`` (per layer rate; ``target`` is their parameter-weighted mean).
    ``overall_sparsity`` is parameter-weighted over all pruned layers (embeddings and lm_head excluded).
    """

    spec: dict
    blocks: list[dict]
    overall_sparsity: float
    pruned_params: int
    seconds: float
    calibration: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)  # spec, bits per block (see atprune.quant.step)

    def to_dict(self) -> dict:
        return asdict(self)


def _as_windows(calib, tokenizer, nsamples, seqlen, seed, data_dir, strict) -> tuple[torch.Tensor | list, dict]:
    if isinstance(calib, ImageTextCalibration):  # feeds of a vision-language model, one per image-text pair
        return list(calib.feeds), calib.info
    if isinstance(calib, data_mod.TokenWindows):
        return calib.windows, calib.info
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype != torch.long:
            raise ConfigError(f"calib tensor must be [nsamples, seqlen] int64, got {tuple(calib.shape)} {calib.dtype}")
        return calib, {"dataset": "tensor", "nsamples": calib.shape[0], "seqlen": calib.shape[1]}
    if tokenizer is None:
        raise ConfigError("calib given as a data name or path needs the tokenizer")
    source = data_mod.load_text(calib or "c4", "train", data_dir)
    tw = data_mod.calibration_windows(tokenizer, source, nsamples, seqlen, seed, strict)
    return tw.windows, tw.info


OFFLOAD_BATCH_CAP = 4  # "auto" batch size with offloading (LLaMA-2-70B shape: transients ~3 GiB instead of ~12)


def resolve_batch_size(batch_size: int | str, model, windows: torch.Tensor, placement: Placement) -> int:
    """``"auto"`` -> :func:`atprune.engine.placement.auto_batch_size` for this model and ``[nsamples, seqlen]`` windows
    (at most 16, or :data:`OFFLOAD_BATCH_CAP` when ``placement`` offloads); an int is returned as is; image-text
    feeds (a list, not a tensor) run one per forward pass: 1.

    Raises:
        ConfigError: for anything else than ``"auto"`` or a positive int.
    """
    if not isinstance(windows, torch.Tensor):
        return 1  # image-text feeds: one pair per forward pass
    if batch_size == "auto":
        dtype = next(model.parameters()).dtype
        # offloading is asked for to save device memory: keep the transient activations small too
        cap = OFFLOAD_BATCH_CAP if placement.offload else 16
        return auto_batch_size(model.config.get_text_config(), windows.shape[1], windows.shape[0], placement.device,
                               dtype, cap=cap)
    check_positive_int("batch size", batch_size, "a positive integer or 'auto'")
    return batch_size


def prune(model, tokenizer=None, *, method: str = "wanda", sparsity: float | None = 0.5, allocation: str = "uniform",
          beta: float | None = None, pattern: str = "unstructured", calib=None, nsamples: int = 128,
          seqlen: int = 2048, seed: int = 0, batch_size: int | str = 1, data_dir: str | None = None,
          strict: bool = False, block_inputs: BlockInputs | None = None, allocation_options: dict | None = None,
          placement: Placement | None = None, progress: bool = True, blocks_path: str | None = None,
          allocator_statistic: list[float] | None = None, refine: str | None = None,
          quantize: QuantSpec | None = None, data_parallel=None) -> PruneResult:
    """Prune ``model`` in place, block by block, with per-block sparsity ratios from an allocator.

    Args:
        model: a transformers causal LM (in memory, any device; weights are changed in place).
        tokenizer: needed when ``calib`` is a data name or path.
        method, sparsity, allocation, beta, pattern: see :func:`plan`.
        calib: ``[nsamples, seqlen]`` int64 tensor, :class:`atprune.data.TokenWindows`, a data spec
            (``"c4"``, ``"wikitext2"``, a file), None (C4), or for a vision-language model an
            :class:`atprune.multimodal.pairs.ImageTextCalibration` (image-text pairs through its processor).
        nsamples, seqlen, seed: calibration windows to draw when ``calib`` is a spec.
        batch_size: calibration windows per forward pass, or ``"auto"`` (see
            :func:`atprune.engine.placement.auto_batch_size`; 1 on CPU). Results do not depend on it.
        data_dir: local data folder for named data sets.
        strict: fewer calibration tokens than asked is an error instead of a warning.
        block_inputs: block-0 inputs already captured for these windows (reused between runs).
        placement: :class:`atprune.engine.placement.Placement` (block / activation offloading); default: everything on
            the model's device. With ``offload`` the model must already be placed by ``placement.prepare``.
        blocks_path: dotted path of the decoder-block ``nn.ModuleList`` for a layout atprune does not recognise
            (e.g. ``"model.decoder.layers"``); default: found automatically (see :meth:`Adapter.for_model`).
        allocator_statistic: the allocator's per-block statistic (:func:`atprune.allocation.block_statistic`)
            already computed on this very dense model, e.g. by an earlier trial; default: computed here.
        refine: ``"dsnot"``: refine each layer's mask after the pruner (:mod:`atprune.pruners.dsnot`, official
            defaults; unstructured only; the layer becomes the dense weight times the refined mask).
        quantize: also quantize every pruned layer in the same pass (:class:`atprune.quant.QuantSpec`, see
            :mod:`atprune.quant.step`): GPTQ after the mask (SparseGPT: jointly), or round to nearest. The result's
            ``quantization`` holds the bits per block and ``grids`` (an attribute, not serialised) each matrix's grid.
            Not with ``refine`` (DSnoT would move weights off the quantization grid).
        data_parallel: this process's part of a data-parallel run (see
            :class:`atprune.distributed.calibration.DataParallelCalibration`): its ``shard(windows, batch_size)`` gives
            the windows this process runs, its ``collect`` sums every process's statistics before the pruner reads
            them, its ``solve(i, linears, solve)`` splits the solves that read a Hessian (SparseGPT, GPTQ) over the
            processes (see :func:`block_pruner`'s ``share``), its ``finish(summary)`` waits for every process at the
            end. Allocators that read calibration data are not supported with it.

    Returns:
        :class:`PruneResult`.

    Raises:
        ConfigError: bad options (see :func:`plan`), an N:M pattern a layer width does not divide, bad data,
            decoder blocks not found or a bad ``blocks_path``.
        torch.linalg.LinAlgError: SparseGPT's Hessian stays singular even after raising the damping.
    """
    model.eval()
    adapter = Adapter.for_model(model, blocks_path)
    spec = plan(method, sparsity, adapter.num_blocks, allocation=allocation, beta=beta, pattern=pattern,
                allocation_options=allocation_options, block_sizes=model_block_sizes(adapter))
    check_widths(adapter, spec.pattern)
    check_attn_offset(spec, adapter)
    check_refine(refine, spec.pattern)
    if refine is not None and quantize is not None:
        raise ConfigError("--refine and --quantize cannot be combined yet (DSnoT's swaps would leave the grid)")
    pruner = get_pruner(method)
    quant = LayerQuant(quantize, spec, adapter) if quantize is not None else None
    needs_stats = pruner.needs_stats or refine is not None or (quant is not None and quant.needs_hessian)
    placement = placement or Placement.default_for(model)
    if needs_calibration(spec, refine) or (quant is not None and quant.needs_hessian):
        windows, calib_info = _as_windows(calib, tokenizer, nsamples, seqlen, seed, data_dir, strict)
        batch_size = resolve_batch_size(batch_size, model, windows, placement)
        calib_info = dict(calib_info) | {"batch_size": batch_size}
    else:
        windows, calib_info = None, {}
    if data_parallel is not None and windows is not None:
        if allocator_needs_calibration(spec.allocator):
            raise ConfigError(f"allocation {spec.allocation!r} reads calibration data itself; data-parallel runs "
                              "support uniform, atp and alphapruning")
        if block_inputs is not None:
            raise ConfigError("block_inputs are captured on all windows; a data-parallel run captures its own share")
        windows = data_parallel.shard(windows, batch_size)
    start = time.perf_counter()
    if allocator_needs_calibration(spec.allocator) and block_inputs is None and allocator_statistic is None:
        block_inputs = first_block_inputs(adapter, windows, batch_size, placement)
    spec = resolve_rates(spec, adapter, windows, block_inputs, placement, statistic=allocator_statistic)
    blocks: list[dict] = []
    hessian = pruner.needs_hessian or (quant is not None and quant.needs_hessian)
    # the solves that read a Hessian (SparseGPT, GPTQ) are split over the processes of a data-parallel run; the
    # others (a sort of Wanda's scores, rounding) cost less than broadcasting their results
    share = data_parallel.solve if data_parallel is not None and windows is not None and hessian else None
    prune_block = block_pruner(pruner, spec.rates, spec.pattern, blocks, block_pattern=spec.block_pattern,
                               refine=refine, quant=quant, share=share, layer_rates=spec.layer_rates or None)

    bar = tqdm(total=adapter.num_blocks, desc=f"{method} {spec.allocation}", unit="block", disable=not progress)
    try:
        if needs_stats:
            sequential(adapter, windows, prune_block, needs_hessian=hessian, batch_size=batch_size,
                       inputs=block_inputs, progress=lambda i: bar.update(1), placement=placement, last_outputs=False,
                       collect=data_parallel.collect if data_parallel is not None else None)
        else:  # data-free (magnitude): no forward pass at all
            for i, block in enumerate(adapter.blocks):
                prune_block(i, block, adapter.linears(block), None)
                bar.update(1)
    finally:
        bar.close()
    if data_parallel is not None:  # every rank has finished, with the same zeros, before anything is written
        data_parallel.finish([(b["index"], b["zeros"]) for b in blocks])
    result = prune_result(spec, blocks, time.perf_counter() - start, calib_info, refine,
                          quant.describe() if quant is not None else None)
    result.grids = quant.named_grids(model) if quant is not None else {}
    return result


def resolve_rates(spec: PruneSpec, adapter: Adapter, windows=None, block_inputs: BlockInputs | None = None,
                  placement: Placement | None = None, statistic: list[float] | None = None) -> PruneSpec:
    """``spec`` (from :func:`plan`) with the rates for ``adapter``'s model: the allocator's per-block rates (from
    ``statistic`` if given, else from what it declares it needs, computed on the model as it is now: dense), its
    per-layer rates (ATP's ``attn_offset``) and, for an N:M pattern under a non-uniform allocation, the N per block
    (rates rounded to ``1 - N/M``). Reads no weight beyond the allocator's statistic; prunes nothing.

    Raises:
        ConfigError: as :func:`atprune.allocation.allocate` and :func:`atprune.allocation.layer_rates`.
    """
    allocation = allocate(spec.allocator, spec.sparsity, adapter, windows, block_inputs, placement, statistic=statistic)
    spec = replace(spec, rates=allocation.rates, statistic=allocation.statistic)
    per_layer = offset_layer_rates(spec.allocator, spec.sparsity, adapter, spec.rates)
    if per_layer is not None:
        spec = replace(spec, layer_rates=per_layer, statistic=spec.statistic | offset_statistic(adapter, per_layer))
    if spec.pattern.structured and spec.allocation != "uniform":
        block_n = tuple(round_to_nm(spec.rates, model_block_sizes(adapter), spec.pattern.n, spec.pattern.m))
        rates = tuple(1.0 - k / spec.pattern.m for k in block_n)
        if len(set(block_n)) == 1:  # e.g. atp with beta 0: every block has the run's N:M, not a mixed run
            block_n = ()
        spec = replace(spec, block_n=block_n, rates=rates,
                       statistic=spec.statistic | {"rates_before_nm_rounding": list(spec.rates)})
    return spec


def block_pruner(pruner, rates, pattern: Pattern, records: list[dict], block_pattern=None, refine: str | None = None,
                 quant: LayerQuant | None = None, share=None, layer_rates=None):
    """The ``prune_block(i, block, linears, stats)`` callback of :func:`atprune.engine.passes.sequential`: prunes
    every layer of block i with ``pruner`` at ``rates[i]`` (with ``layer_rates``, one ``{name: rate}`` per block:
    each layer at its own rate, and the record gets ``layer_targets``; ``target`` stays ``rates[i]``, the
    parameter-weighted mean of the layer rates) and the pattern ``block_pattern(i)``, default
    ``pattern``: a mixed N:M run's N per block), refines the mask with DSnoT when ``refine == "dsnot"`` (not on the
    layers DSnoT skips), quantizes each layer with ``quant`` (after the mask; with SparseGPT jointly, in the same
    column walk), and appends the block's record (``index``, ``target``, ``achieved``, ``params``, ``zeros``,
    per-layer ``layers``, ``pattern`` for N:M, ``bits`` when quantized) to ``records``. Layers are anything
    :func:`atprune.models.adapter.set_weight` takes (``weight`` ``[out, in]``).

    ``share``: ``share(i, linears, solve) -> {name: (weight, grid)}`` runs ``solve(name)`` (the layer's new
    ``[out, in]`` weight, in its dtype and device, and its :class:`atprune.quant.grid.Grid` or None) for the layers
    of block i somewhere and returns every layer's result; a data-parallel run's
    (:meth:`atprune.distributed.calibration.DataParallelCalibration.solve`) splits the solves over the processes
    and broadcasts each result from the one that computed it. One layer's solve reads only its own dense weight and
    statistics, never another layer's new weight, so where and in which order the solves run changes no result.
    Default (None): every solve here, each layer's weight replaced as soon as it is solved.
    """
    def prune_block(i, block, linears, stats):
        block_rate, pat = rates[i], (block_pattern(i) if block_pattern is not None else pattern)
        layers, totals = {}, [0, 0]

        def solve(name: str):
            lin = linears[name]
            rate = layer_rates[i][name] if layer_rates is not None else block_rate
            dense = lin.weight.detach()
            stat = stats[name] if stats else None
            if quant is not None and quant.joint:
                new = quant(i, name, lin, dense, stat, rate, pat)
            else:
                new = pruner.prune(dense, stat, rate, pat)
                if refine is not None and not dsnot_skips(name):
                    new = dense.masked_fill(dsnot_refine(dense, new == 0, stat), 0)
                if quant is not None:
                    new = quant(i, name, lin, new, stat)
            return new, (quant.grids[(i, name)][1] if quant is not None else None)

        def place(name: str, new: torch.Tensor, grid) -> None:
            lin = linears[name]
            set_weight(lin, new)
            if grid is not None:  # solved elsewhere: keep its grid here too
                quant.grids[(i, name)] = (lin, grid)
            n, z = lin.weight.numel(), int((lin.weight == 0).sum())
            layers[name] = z / n
            totals[0], totals[1] = totals[0] + n, totals[1] + z

        if share is None:
            for name in linears:
                place(name, *solve(name))
        else:
            outcomes = share(i, linears, solve)
            for name in linears:
                place(name, *outcomes[name])
        params, zeros = totals
        records.append({"index": i, "target": block_rate, "achieved": zeros / params, "params": params, "zeros": zeros,
                        "layers": layers} | ({"layer_targets": dict(layer_rates[i])} if layer_rates is not None else {})
                       | ({"pattern": str(pat)} if pat.structured else {})
                       | ({"bits": quant.bits[i]} if quant is not None else {}))

    return prune_block


def prune_result(spec: PruneSpec, blocks: list[dict], seconds: float, calib_info: dict,
                 refine: str | None = None, quantization: dict | None = None) -> PruneResult:
    """The :class:`PruneResult` of a run that pruned ``blocks`` (the records of :func:`block_pruner`)."""
    params = sum(b["params"] for b in blocks)
    zeros = sum(b["zeros"] for b in blocks)
    described = spec.describe() | {"rates": list(spec.rates)} | ({"refine": refine} if refine else {})
    return PruneResult(described, blocks, zeros / params, params, seconds, calib_info, quantization or {})


def evaluate_perplexity(model, tokenizer, data: str | data_mod.EvalSet = "wikitext2", *, split: str = "test", seqlen: int = 2048,
                        data_dir: str | None = None, batch_size: int = 1, max_windows: int | None = None,
                        placement: Placement | None = None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on a text set (default WikiText-2 raw test), see :func:`atprune.eval.perplexity.perplexity`.

    ``data`` is a data spec (see :func:`atprune.data.load_text`) or an already tokenized
    :class:`atprune.data.EvalSet` (to evaluate several models on the same tokens). With an offloading
    ``placement`` (after its ``prepare``) each block visits the compute device while it runs.

    Returns:
        The dict of :func:`atprune.eval.perplexity.perplexity` plus the data description (dataset, split, origin,
        BOS policy).
    """
    evalset = data if isinstance(data, data_mod.EvalSet) else data_mod.eval_set(tokenizer, data, split, data_dir)
    bar = tqdm(desc=f"ppl {evalset.info['dataset']}", unit="win", disable=not progress)

    def tick(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    cap = evalset.info.get("max_windows")
    if cap is not None:
        max_windows = cap if max_windows is None else min(max_windows, cap)
    streaming = placement.streaming() if placement else contextlib.nullcontext()
    try:
        with streaming:
            result = perplexity(model, evalset.tokens, seqlen, batch_size=batch_size, max_windows=max_windows,
                                progress=tick, bos=evalset.info.get("bos_token_id"))
    finally:
        bar.close()
    return result | evalset.info
