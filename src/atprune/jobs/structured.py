"""Structured width pruning (``atprune prune --structure channels|heads|both --method wanda-sp|flap``): remove whole
MLP channels and whole KV groups, block by block, at per-block rates from any allocator, and save the smaller model.

Scores: :mod:`atprune.pruners.structured` (official FLAP code); physical shrinking and the saved config:
:mod:`atprune.models.shrink`. The rate of a block is the fraction of its MLP channels (``channels``), of its KV groups
(``heads``) or of both (``both``) removed, ``floor(rate * n)``; the allocators see the usual prunable weights per
block (equal for these families), so their mean is the mean width fraction removed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from atprune import data as data_mod
from atprune.allocation import allocate
from atprune.allocators import get_allocator
from atprune.api import evaluate_perplexity
from atprune.engine.passes import first_block_inputs, sequential
from atprune.engine.placement import Placement
from atprune.errors import ConfigError, check_sparsity
from atprune.jobs.options import RunOptions, check_run_options
from atprune.models.adapter import Adapter
from atprune.models.shrink import (attention_shape, block_widths, check_family, query_columns, shrink_heads, shrink_mlp,
                                   update_config)
from atprune.models.sources import load_model
from atprune.pruners import structured as sp

log = logging.getLogger(__name__)


def plan_structured(method: str, structure: str, sparsity: float, allocation: str, beta: float | None,
                    allocation_options: dict | None, num_blocks: int):
    """Check the options (no model needed) and return the allocator.

    Raises:
        ConfigError: unknown method or structure, sparsity outside [0, 1), beta missing for atp or given to another
            allocation, or an illegal beta.
    """
    sp.check_structured(method, structure)
    check_sparsity(sparsity)
    if allocation == "atp" and beta is None:
        raise ConfigError("allocation 'atp' needs a beta, e.g. --beta 0.01 (0 is uniform)")
    if allocation != "atp" and beta is not None:
        raise ConfigError(f"--beta applies to allocation 'atp' only, not {allocation!r}")
    allocator = get_allocator(allocation, beta=beta, **(allocation_options or {}))
    allocator.check(sparsity, num_blocks)
    if getattr(allocator, "attn_offset", 0.0):
        raise ConfigError("attn_offset applies to unstructured pruning; --structure removes channels and heads at one "
                          "rate per block")
    return allocator


def check_rates(adapter: Adapter, rates, structure: str) -> None:
    """ConfigError (before the pruning pass) if a block's rate would remove all its channels or KV groups."""
    for i, (block, rate) in enumerate(zip(adapter.blocks, rates)):
        if structure in ("channels", "both"):
            sp.removed_count(rate, block.mlp.down_proj.in_features, "MLP channels", f"block {i}")
        if structure in ("heads", "both"):
            sp.removed_count(rate, attention_shape(block)[1], "KV groups (every head)", f"block {i}")


def shrink(model, windows: torch.Tensor, method: str, structure: str, rates, batch_size: int = 1) -> list[dict]:
    """Shrink ``model`` in place, block by block, with statistics of each block's current inputs.

    Args:
        windows: ``[nsamples, seqlen]`` int64 calibration tokens.
        rates: one rate per block (fraction of channels / KV groups removed).

    Returns:
        Per block: ``index``, ``rate``, ``removed_channels``, ``removed_kv_groups`` and the new widths.
    """
    adapter = Adapter.for_model(model)
    check_rates(adapter, rates, structure)
    bias = method == "flap" and any(r > 0 for r in rates)  # ratio 0 everywhere: the model is left exactly as it was
    records: list[dict] = []

    def prune_block(i, block, linears, stats):
        rec = {"index": i, "rate": rates[i], "removed_channels": 0, "removed_kv_groups": 0}
        if structure in ("channels", "both"):
            down, st = block.mlp.down_proj, stats["mlp.down_proj"]
            k = sp.removed_count(rates[i], down.in_features)
            keep = sp.keep_indices(sp.column_scores(method, down.weight, st), k)
            comp = sp.compensation(down.weight, st, keep) if bias else None
            shrink_mlp(block, keep, comp)
            rec["removed_channels"] = k
        if structure in ("heads", "both"):
            o, st = block.self_attn.o_proj, stats["self_attn.o_proj"]
            heads, kv, hd = attention_shape(block)
            k = sp.removed_count(rates[i], kv)
            keep = sp.keep_indices(sp.group_scores(sp.head_scores(method, o.weight, st, hd), kv), k)
            comp = sp.compensation(o.weight, st, query_columns(keep, heads, kv, hd)) if bias else None
            shrink_heads(block, keep, comp)
            rec["removed_kv_groups"] = k
        records.append(rec | block_widths([block])[0])

    placement = Placement.default_for(model)
    inputs = first_block_inputs(adapter, windows, batch_size, placement)
    sequential(adapter, windows, prune_block, inputs=inputs, placement=placement, last_outputs=False)
    parts = {"channels": {"channels"}, "heads": {"heads"}, "both": {"channels", "heads"}}[structure]
    update_config(model, [{k: r[k] for k in ("intermediate_size", "num_heads", "num_kv_heads")} for r in records],
                  parts if bias else set())
    return records


@dataclass(kw_only=True)
class StructuredJob(RunOptions):
    """Options of a structured run (the CLI flags one to one)."""

    method: str = "wanda-sp"
    structure: str = "channels"
    sparsity: float = 0.2
    allocation: str = "uniform"
    beta: float | None = None
    allocation_options: dict | None = None
    eval_dense: bool = True


def run_structured_job(job: StructuredJob) -> dict:
    """Check, load, calibrate, allocate, shrink, evaluate and (with ``out``) save; returns the report.

    Raises:
        ConfigError: bad options or a family that cannot express the structure, before any pruning work.
    """
    from atprune.export.files import check_output_dir
    from atprune.export.report import build_report
    from atprune.export.shrunk import save_shrunk

    checked = check_run_options(job, own_checks=lambda: plan_structured(
        job.method, job.structure, job.sparsity, job.allocation, job.beta, job.allocation_options, 2))
    allocator = plan_structured(job.method, job.structure, job.sparsity, job.allocation, job.beta,
                                job.allocation_options, checked.num_blocks)
    if job.out:
        check_output_dir(job.out, job.overwrite, inputs=checked.inputs())
    timings = {}
    t0 = time.perf_counter()
    model, tokenizer = load_model(checked.source, dtype=checked.dtype, device=checked.device, progress=job.progress,
                                  allow_tokenizer_mismatch=job.allow_tokenizer_mismatch)
    check_family(model.config.get_text_config(), job.structure, job.method == "flap")
    adapter = Adapter.for_model(model, job.blocks_path)
    timings["load"] = time.perf_counter() - t0
    params_before = sum(p.numel() for p in model.parameters())
    calib = data_mod.calibration_windows(tokenizer, data_mod.load_text(job.calib_data, "train", job.data_dir),
                                         job.nsamples, job.seqlen, job.seed)
    batch = 1 if job.batch_size == "auto" else job.batch_size
    evaluation = {"dense": None, "sparse": None}
    evalset = (data_mod.eval_set(tokenizer, job.eval_data, data_mod.eval_split(job.eval_data), job.data_dir)
               if job.eval_data else None)

    def evaluate(tag):
        t = time.perf_counter()
        evaluation[tag] = evaluate_perplexity(model, tokenizer, evalset, seqlen=job.seqlen, batch_size=batch,
                                              max_windows=job.eval_windows, progress=job.progress)
        timings[f"eval_{tag}"] = time.perf_counter() - t

    t0 = time.perf_counter()
    alloc = allocate(allocator, job.sparsity, adapter, calib.windows)
    check_rates(adapter, alloc.rates, job.structure)  # a rate that removes every head: refused before evaluating
    timings["allocate"] = time.perf_counter() - t0
    if evalset is not None and job.eval_dense:
        evaluate("dense")
    t0 = time.perf_counter()
    blocks = shrink(model, calib.windows, job.method, job.structure, alloc.rates, batch)
    timings["prune"] = time.perf_counter() - t0
    if evalset is not None:
        evaluate("sparse")
    params_after = sum(p.numel() for p in model.parameters())
    pruning = {"spec": {"method": job.method, "structure": job.structure, "sparsity": job.sparsity,
                        "allocation": job.allocation, "beta": job.beta, "rates": list(alloc.rates)},
               "blocks": blocks, "params_before": params_before, "params_after": params_after,
               "ordinary_checkpoint": not hasattr(model.config.get_text_config(), "atprune_widths"),
               "calibration": calib.info}
    report = build_report(config=asdict(job), prune_result=pruning, evaluation=evaluation, timings=timings,
                          model={"spec": job.model, "source": checked.source.kind, "class": type(model).__name__,
                                 "blocks": adapter.num_blocks})
    if job.out:
        save_shrunk(model, tokenizer, job.out, report, overwrite=job.overwrite)
    return report


def format_structured(report: dict) -> str:
    """Short table: per block rate and widths, parameters, perplexities."""
    pr = report["pruning"]
    spec = pr["spec"]
    lines = [f"method={spec['method']} structure={spec['structure']} allocation={spec['allocation']}"
             + (f" beta={spec['beta']:g}" if spec.get("beta") is not None else "") + f" target={spec['sparsity']:g}",
             f"{'block':>5} {'rate':>7} {'mlp width':>9} {'heads':>5} {'kv':>3}"]
    for b in pr["blocks"]:
        lines.append(f"{b['index']:>5} {b['rate']:>7.4f} {b['intermediate_size']:>9} {b['num_heads']:>5} "
                     f"{b['num_kv_heads']:>3}")
    lines.append(f"parameters: {pr['params_before']:,} -> {pr['params_after']:,} "
                 f"({pr['params_after'] / pr['params_before']:.3f}); ordinary checkpoint: {pr['ordinary_checkpoint']}")
    for key in ("dense", "sparse"):
        e = report["evaluation"].get(key)
        if e:
            lines.append(f"{key:>6} perplexity {e['dataset']}: {e['ppl']:.3f} ({e['windows']} windows x {e['seqlen']})")
    return "\n".join(lines)
