"""Reconstruction error per block: the "reconstruction error explosion" that motivates ATP.

For block i with dense input X_i (from the dense model) and sparse input X^s_i (from the model pruned up to
block i-1), and dense / pruned weights W / W_s:

* local error       ||B_i(X_i; W) - B_i(X_i; W_s)||^2   / ||B_i(X_i; W)||^2   (same dense input)
* accumulated error ||B_i(X_i; W) - B_i(X^s_i; W_s)||^2 / ||B_i(X_i; W)||^2   (input from the sparse model)

Both are measured while pruning in the usual sequential way (statistics from the sparse stream X^s_i), so the
pruned model is exactly the one :func:`atprune.prune` would produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from atprune import data as data_mod

from atprune.models.adapter import Adapter, set_weight
from atprune.allocation import allocate, block_sizes
from atprune.api import plan, resolve_batch_size
from atprune.engine.passes import BlockInputs, collect_stats, first_block_inputs, run_block
from atprune.engine.placement import Placement
from atprune.errors import ConfigError
from atprune.export import check_output_dir, write_json
from atprune.export.report import versions
from atprune.jobs.options import RunOptions, check_run_options
from atprune.models.gguf_tokenizer import tokenizer_record
from atprune.models.sources import load_model
from atprune.pruners import get_pruner


def _sq(tensors: list[torch.Tensor]) -> float:
    return sum(t.double().square().sum().item() for t in tensors)


def _sq_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum((x.double() - y.double()).square().sum().item() for x, y in zip(a, b))


def reconstruction_errors(model, windows: torch.Tensor, *, method: str, sparsity: float, allocation: str = "uniform",
                          beta: float | None = None, pattern: str = "unstructured", batch_size: int = 1,
                          inputs: BlockInputs | None = None, blocks_path: str | None = None) -> dict:
    """Prune ``model`` in place block by block and measure the local and accumulated error of every block.

    Args:
        model: transformers causal LM (its weights are pruned in place).
        windows: ``[nsamples, seqlen]`` int64 calibration token ids.
        method, sparsity, allocation, beta, pattern: as for :func:`atprune.prune`.
        inputs: block-0 inputs already captured for ``windows``.
        blocks_path: the decoder-block list of an unrecognised layout (see :meth:`atprune.Adapter.for_model`).

    Returns:
        ``{"rates": [L floats], "local": [L floats], "accumulated": [L floats]}`` (relative squared errors, unitless).

    Raises:
        ConfigError: bad options (see :func:`atprune.api.plan`).
    """
    adapter = Adapter.for_model(model, blocks_path)
    spec = plan(method, sparsity, adapter.num_blocks, allocation=allocation, beta=beta, pattern=pattern,
                block_sizes=block_sizes(adapter))
    pruner = get_pruner(method)
    dense_in = inputs or first_block_inputs(adapter, windows, batch_size)
    # the rates prune() would use: for the model's block sizes, from the statistic the allocator needs (dense model)
    rates = allocate(spec.allocator, spec.sparsity, adapter, windows, dense_in).rates
    sparse_in = dense_in.with_hidden(list(dense_in.hidden))
    local, accumulated = [], []
    for i, block in enumerate(adapter.blocks):
        linears = adapter.linears(block)
        dense_out = run_block(block, i, dense_in)
        stats = collect_stats(block, i, linears, sparse_in, pruner.needs_hessian) if pruner.needs_stats else None
        for name, lin in linears.items():
            set_weight(lin, pruner.prune(lin.weight.detach(), stats[name] if stats else None, rates[i], spec.pattern))
        del stats
        local_out = run_block(block, i, dense_in)
        sparse_out = run_block(block, i, sparse_in)
        norm = _sq(dense_out)
        local.append(_sq_diff(dense_out, local_out) / norm)
        accumulated.append(_sq_diff(dense_out, sparse_out) / norm)
        dense_in = dense_in.with_hidden(dense_out)
        sparse_in = sparse_in.with_hidden(sparse_out)
    return {"rates": list(rates), "local": local, "accumulated": accumulated}


def plot_errors(curves: dict[str, dict], path: str | Path, title: str) -> None:
    """PNG with local (dashed) and accumulated (solid) error against block index, one colour per allocation."""
    from atprune.plotting import new_figure, save_png

    path = Path(path)
    fig, ax = new_figure(7, 4.5)
    for k, (label, c) in enumerate(curves.items()):
        color = f"C{k}"
        xs = range(len(c["local"]))
        ax.plot(xs, c["accumulated"], "-", color=color, label=f"{label}: accumulated")
        ax.plot(xs, c["local"], "--", color=color, label=f"{label}: local")
    ax.set_yscale("log")
    ax.set_xlabel("block index i (input side first)")
    ax.set_ylabel("relative squared error ||B(X;W) - B(.;W_s)||^2 / ||B(X;W)||^2")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_png(fig, path)


def parse_allocation(text: str) -> tuple[str, float | None]:
    """``"uniform"`` -> ("uniform", None); ``"atp:0.01"`` -> ("atp", 0.01).

    Raises:
        ConfigError: for anything else.
    """
    name, _, value = text.partition(":")
    if not value:
        return name, None
    try:
        return name, float(value)
    except ValueError:
        raise ConfigError(f"allocation must look like 'uniform' or 'atp:0.01', got {text!r}") from None


@dataclass(kw_only=True)
class AnalyzeJob(RunOptions):
    """Options of ``atprune analyze`` (the CLI flags, one to one); the shared ones are in :class:`RunOptions`.

    ``allocations`` are texts such as ``"uniform"`` or ``"atp:0.01"`` (see :func:`parse_allocation`)."""

    out: str
    method: str = "wanda"
    sparsity: float = 0.5
    allocations: list[str] = field(default_factory=lambda: ["uniform"])
    eval_data: str | None = None
    nsamples: int = 32
    seqlen: int = 512
    batch_size: int | str = 1


def run_analyze(**options) -> dict:
    """:func:`run_analyze_job` of ``AnalyzeJob(**options)``."""
    return run_analyze_job(AnalyzeJob(**options))


def run_analyze_job(job: AnalyzeJob) -> dict:
    """Measure local and accumulated errors for each allocation (same calibration windows, same dense start)
    and write ``analysis.json`` and ``analysis.png`` into ``job.out``. ``progress=False`` silences the model loading
    bars.

    Raises:
        ConfigError: bad options, checked for every allocation before the model is loaded.
    """
    parsed = [parse_allocation(a) for a in job.allocations]

    def own_checks():
        for name, beta in parsed:
            plan(job.method, job.sparsity, 2, allocation=name, beta=0.0 if beta is not None else None)

    checked = check_run_options(job, own_checks=own_checks)
    for name, beta in parsed:
        plan(job.method, job.sparsity, checked.num_blocks, allocation=name, beta=beta)
    out_dir = check_output_dir(job.out, job.overwrite, inputs=checked.inputs())
    lm, tokenizer = load_model(checked.source, dtype=checked.dtype, device=checked.device, progress=job.progress,
                               allow_tokenizer_mismatch=job.allow_tokenizer_mismatch)
    tokenizer_check, tokenizer_notes = tokenizer_record(tokenizer)
    windows = data_mod.calibration_windows(tokenizer, data_mod.load_text(job.calib_data, "train", job.data_dir),
                                           job.nsamples, job.seqlen, job.seed)
    adapter = Adapter.for_model(lm, job.blocks_path)
    batch_size = resolve_batch_size(job.batch_size, lm, windows.windows, Placement.default_for(lm))
    inputs = first_block_inputs(adapter, windows.windows, batch_size)
    dense = {k: v.detach().to("cpu", copy=True) for k, v in lm.state_dict().items()}
    curves = {}
    for text, (name, beta) in zip(job.allocations, parsed):
        lm.load_state_dict(dense)
        curves[text] = reconstruction_errors(lm, windows.windows, method=job.method, sparsity=job.sparsity,
                                             allocation=name, beta=beta, batch_size=batch_size, inputs=inputs,
                                             blocks_path=job.blocks_path)
    result = {"schema": "atprune.analysis/1", "versions": versions(), "model": job.model, "method": job.method, "sparsity": job.sparsity,
              "calibration": windows.info, "tokenizer_check": tokenizer_check, "warnings": tokenizer_notes, "curves": curves}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "analysis.json", result)
    plot_errors(curves, out_dir / "analysis.png", f"{job.model} {job.method} S={job.sparsity:g}, "
                f"{windows.info['nsamples']} x {job.seqlen} calibration tokens")
    return result
