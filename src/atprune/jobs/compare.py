"""``atprune compare``: allocations x pruners x sparsities on one model, measured the same way in one run.

Every cell starts from the same dense weights, uses the same calibration windows (block-0 inputs captured
once), and is evaluated on the same tokens. ATP's beta is searched per (pruner, sparsity) with the golden
strategy on held-out selection windows of the calibration source (never the evaluation data).
Writes ``compare.json`` (after every cell), ``results.csv``, ``results.md`` and ``rates.png``.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from atprune import data as data_mod
from atprune.allocators import ALLOCATORS
from atprune.api import evaluate_perplexity, plan
from atprune.errors import ConfigError
from atprune.export import check_output_dir, write_json
from atprune.jobs.options import RunOptions, SelectionOptions, check_run_options, check_selection
from atprune.export.report import versions
from atprune.jobs.search import TrialRunner, selection_windows
from atprune.models.gguf_tokenizer import tokenizer_record
from atprune.models.sources import load_model


@dataclass(kw_only=True)
class CompareJob(SelectionOptions, RunOptions):
    """Options of one comparison (the CLI flags, one to one); the shared ones are in :class:`RunOptions`, the
    held-out selection data of ATP's beta search in :class:`SelectionOptions`."""

    out: str
    eval_data: str = "wikitext2"
    methods: list[str] = field(default_factory=lambda: ["wanda", "sparsegpt"])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7])
    allocations: list[str] = field(default_factory=lambda: ["uniform", "atp", "owl", "alphapruning", "dlp"])
    max_trials: int = 6


def check_compare(job: CompareJob):
    """Validate every cell's options before the model is loaded; returns ``(source, num_blocks, device, dtype)``.

    Raises:
        ConfigError: the first problem found.
    """
    unknown = [a for a in job.allocations if a not in ALLOCATORS]
    if unknown:
        raise ConfigError(f"unknown allocation {unknown[0]!r}; choose from: {', '.join(ALLOCATORS)}")
    if not job.methods or not job.sparsities or not job.allocations:
        raise ConfigError("compare needs at least one method, sparsity and allocation")
    if "atp" in job.allocations and job.max_trials < 3:
        raise ConfigError(f"ATP's golden search needs --max-trials >= 3, got {job.max_trials}")
    check_selection(job)

    def own_checks():
        for method in job.methods:
            for s in job.sparsities:
                for a in job.allocations:
                    plan(method, s, 2, allocation=a, beta=0.0 if a == "atp" else None)

    checked = check_run_options(job, own_checks=own_checks)
    check_output_dir(job.out, job.overwrite, inputs=checked.inputs())
    return checked.source, checked.num_blocks, checked.device, checked.dtype


def run_compare_job(job: CompareJob) -> dict:
    """Run every cell; returns the content of ``compare.json``.

    Raises:
        ConfigError: bad options, before the model is loaded.
    """
    source, num_blocks, device, dtype = check_compare(job)
    out = Path(job.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(source, dtype=dtype, device=device, progress=job.progress,
                                  allow_tokenizer_mismatch=job.allow_tokenizer_mismatch)
    tokenizer_check, tokenizer_notes = tokenizer_record(tokenizer)
    calib, select, select_info = selection_windows(job, tokenizer)
    runner = TrialRunner(model, calib, select, batch_size=job.batch_size, blocks_path=job.blocks_path)
    evalset = data_mod.eval_set(tokenizer, job.eval_data, data_mod.eval_split(job.eval_data), job.data_dir)

    def ppl() -> dict:
        return evaluate_perplexity(model, tokenizer, evalset, seqlen=job.seqlen, batch_size=runner.eval_batch_size,
                                   max_windows=job.eval_windows, progress=False)

    state = {"schema": "atprune.compare/1", "config": asdict(job) | {"dtype": str(dtype), "device": str(device)},
             "versions": versions(), "selection_data": select_info, "tokenizer_check": tokenizer_check, "warnings": tokenizer_notes,
             "dense": ppl(), "rows": []}
    total = len(job.methods) * len(job.sparsities) * len(job.allocations)
    for method in job.methods:
        for s in job.sparsities:
            for alloc in job.allocations:
                t0 = time.perf_counter()
                row = {"method": method, "sparsity": s, "allocation": alloc, "beta": None, "search_seconds": None}
                beta = None
                if alloc == "atp":
                    trials, beta, _ = runner.search(method, s, max_trials=job.max_trials)
                    row |= {"beta": beta, "search_seconds": time.perf_counter() - t0, "trials": trials}
                result = runner.prune(method, s, alloc, beta)
                ev = ppl()
                row |= {"ppl": ev["ppl"], "eval_windows": ev["windows"], "overall_sparsity": result.overall_sparsity,
                        "prune_seconds": result.seconds, "rates": result.spec["rates"],
                        "statistic": {k: v for k, v in result.spec.items() if k.startswith("allocator_")}}
                state["rows"].append(row)
                write_json(out / "compare.json", state)
                if job.progress:
                    print(f"[{len(state['rows'])}/{total}] {method} S={s:g} {alloc}"
                          + (f" beta={beta:.4g}" if beta is not None else "") + f": ppl {ev['ppl']:.3f}", flush=True)
    (out / "results.csv").write_text(to_csv(state["rows"]))
    (out / "results.md").write_text(to_markdown(state))
    plot_rates(state["rows"], out / "rates.png")
    return state


CSV_FIELDS = ["method", "sparsity", "allocation", "beta", "ppl", "overall_sparsity", "prune_seconds", "search_seconds",
              "eval_windows"]


def to_csv(rows: list[dict]) -> str:
    """The rows as CSV (one line per cell, the columns of ``CSV_FIELDS``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_markdown(state: dict) -> str:
    """Perplexity table: one line per (pruner, sparsity), one column per allocation, the best cell in bold,
    ATP's searched beta in brackets; then achieved sparsity and times."""
    rows = state["rows"]
    allocs = list(dict.fromkeys(r["allocation"] for r in rows))
    lines = [f"| pruner | sparsity | {' | '.join(allocs)} | best |", "|---|---|" + "---|" * (len(allocs) + 1)]
    for method in dict.fromkeys(r["method"] for r in rows):
        for s in dict.fromkeys(r["sparsity"] for r in rows):
            cells = {r["allocation"]: r for r in rows if r["method"] == method and r["sparsity"] == s}
            best = min(cells.values(), key=lambda r: r["ppl"])["allocation"]
            out = []
            for a in allocs:
                r = cells[a]
                text = f"{r['ppl']:.2f}" + (f" (beta {r['beta']:.4f})" if r["beta"] is not None else "")
                out.append(f"**{text}**" if a == best else text)
            lines.append(f"| {method} | {s:g} | {' | '.join(out)} | {best} |")
    dense = state["dense"]
    lines += ["", f"Dense perplexity: {dense['ppl']:.3f} ({dense['windows']} windows x {dense['seqlen']} tokens).", "",
              "| pruner | sparsity | allocation | achieved sparsity | prune s | search s |", "|---|---|---|---|---|---|"]
    for r in rows:
        search = f"{r['search_seconds']:.1f}" if r["search_seconds"] is not None else "-"
        lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['allocation']} | {r['overall_sparsity']:.4f} | "
                     f"{r['prune_seconds']:.1f} | {search} |")
    return "\n".join(lines) + "\n"


def plot_rates(rows: list[dict], path: Path) -> None:
    """Per-block rates of every allocation at the highest sparsity, for the first pruner."""
    from atprune.plotting import new_figure, save_png

    method = rows[0]["method"]
    s = max(r["sparsity"] for r in rows)
    fig, ax = new_figure(7, 4.5)
    for r in rows:
        if r["method"] == method and r["sparsity"] == s:
            label = r["allocation"] + (f" (beta {r['beta']:.4f})" if r["beta"] is not None else "")
            ax.plot(range(len(r["rates"])), r["rates"], "o-", markersize=3, label=label)
    ax.set_xlabel("block index (input side first)")
    ax.set_ylabel("sparsity ratio")
    ax.set_title(f"per-block sparsity at S={s:g} ({method})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
