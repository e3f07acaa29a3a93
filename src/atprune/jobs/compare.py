"""``atprune compare``: allocations x pruners x sparsities on one model, measured the same way in one run.

Every cell starts from the same dense weights, uses the same calibration windows (block-0 inputs captured
once), and is evaluated on the same tokens. ATP's beta is searched per (pruner, sparsity) with the golden
strategy on held-out selection windows of the calibration source (never the evaluation data); with ``atp_offset``
also ATP's beta and attention/MLP offset together, in the same budget (column "atp (attn/mlp offset)",
:func:`atprune.jobs.strategies.offset_search`). A configuration met
again (uniform is the first point of every search; a search on the test split may choose a value already evaluated)
is neither pruned nor evaluated again (:class:`atprune.jobs.trials.TrialRunner`).
Writes ``compare.json`` (after every cell), ``results.csv``, ``results.md`` and ``rates.png``.
"""

from __future__ import annotations

import csv
import math
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from atprune import data as data_mod
from atprune.allocation import sublayer_sizes
from atprune.allocators import ALLOCATORS
from atprune.atomic import atomic_file
from atprune.api import evaluate_perplexity, plan
from atprune.errors import ConfigError
from atprune.export import check_output_dir, write_json
from atprune.jobs.multimodal import check_trials_data, check_vision_language, load_for_trials
from atprune.jobs.options import RunOptions, SelectionOptions, check_run_options, check_selection
from atprune.jobs.quantize import QuantOptions, check_quant, check_quant_widths
from atprune.models.adapter import Adapter
from atprune.export.report import versions
from atprune.jobs.search import selection_windows
from atprune.jobs.trials import TrialRunner
from atprune.models.gguf_tokenizer import tokenizer_record


@dataclass(kw_only=True)
class CompareJob(QuantOptions, SelectionOptions, RunOptions):
    """Options of one comparison (the CLI flags, one to one); the shared ones are in :class:`RunOptions`, the
    held-out selection data of ATP's beta search in :class:`SelectionOptions`."""

    out: str
    eval_data: str = "wikitext2"
    methods: list[str] = field(default_factory=lambda: ["wanda", "sparsegpt"])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7])
    allocations: list[str] = field(default_factory=lambda: ["uniform", "atp", "owl", "alphapruning", "dlp"])
    max_trials: int = 6
    tune_peers: bool = False  # also each peer with its main option searched on the selection data (same budget)
    atp_on_test: bool = False  # also ATP with beta chosen on the evaluation data (the reference protocol, marked)
    atp_offset: bool = False  # also ATP with beta and its attention/MLP offset searched together (same budget)


def check_compare(job: CompareJob):
    """Validate every cell's options before the model is loaded; returns ``(source, num_blocks, device, dtype, vl)``
    with ``vl`` the :class:`atprune.jobs.multimodal.VisionLanguagePlan` (a vision-language model is loaded with its
    processor; an image-text calibration file is read and checked).

    Raises:
        ConfigError: the first problem found.
    """
    for a in job.allocations:
        ALLOCATORS.lookup(a)  # an unknown name is a one-line error listing the known ones
    if not job.methods or not job.sparsities or not job.allocations:
        raise ConfigError("compare needs at least one method, sparsity and allocation")
    if ("atp" in job.allocations or job.tune_peers) and job.max_trials < 3:
        raise ConfigError(f"the golden search (ATP's beta, --tune-peers) needs --max-trials >= 3, got {job.max_trials}")
    if job.atp_offset and ("atp" not in job.allocations or job.max_trials < 5):
        raise ConfigError(f"--atp-offset adds ATP with beta and its attention/MLP offset searched together; it needs "
                          f"atp among --allocations and --max-trials >= 5 (got {job.max_trials})")
    if job.atp_on_test and "atp" not in job.allocations:
        raise ConfigError("--atp-on-test adds ATP selected on the evaluation data; it needs atp among --allocations")
    if job.select_on_test:
        raise ConfigError("compare tunes on held-out selection data; for the reference protocol add ATP selected on "
                          "the evaluation data with --atp-on-test (marked, never counted as best)")
    check_selection(job)

    def own_checks():
        for method in job.methods:
            for s in job.sparsities:
                for a in job.allocations:
                    plan(method, s, 2, allocation=a, beta=0.0 if a == "atp" else None)
        check_quant(job)

    checked = check_run_options(job, own_checks=own_checks)
    vl = check_vision_language(checked.source, job.calib_data, None, job.nsamples)
    check_trials_data(vl, job, "compare")
    check_output_dir(job.out, job.overwrite, inputs=checked.inputs())
    return checked.source, checked.num_blocks, checked.device, checked.dtype, vl


def run_compare_job(job: CompareJob, parallel=None) -> dict:
    """Run every cell; returns the content of ``compare.json``.

    ``parallel``: this rank's part of a torchrun launch (:class:`atprune.distributed.cells.ParallelCells`): only
    the cells of its ``share(cells, runner)`` run here and nothing is written here; its ``finish(state, cells)``
    gathers every rank's rows in cell order and writes the folder on rank 0 (atomically), and is returned.

    Raises:
        ConfigError: bad options, before the model is loaded.
    """
    source, num_blocks, device, dtype, vl = check_compare(job)
    out = Path(job.out).expanduser()
    write = parallel is None  # under torchrun rank 0 writes the whole folder once, at the end
    if write:
        out.mkdir(parents=True, exist_ok=True)
    # a vision-language model: loaded with its processor, only its language blocks pruned (atprune.multimodal)
    vlm, model, tokenizer = load_for_trials(vl, source, dtype, device, job)
    tokenizer_check, tokenizer_notes = tokenizer_record(tokenizer)
    calib, select, select_info = selection_windows(job, tokenizer, vlm.calibration(job.seqlen) if vlm else None)
    qspec = check_quant(job)
    adapter = Adapter.for_model(model, job.blocks_path)
    check_quant_widths(adapter, qspec)
    if job.atp_offset:  # every layer attention or MLP (ConfigError naming one that is neither), before any cell
        sublayer_sizes(adapter)
    runner = TrialRunner(model, calib, select, batch_size=job.batch_size, blocks_path=job.blocks_path,
                         quantize=qspec)
    evalset = data_mod.eval_set(tokenizer, job.eval_data, data_mod.eval_split(job.eval_data), job.data_dir)

    def ppl() -> dict:
        return evaluate_perplexity(model, tokenizer, evalset, seqlen=job.seqlen, batch_size=runner.eval_batch_size,
                                   max_windows=job.eval_windows, progress=False)

    state = {"schema": "atprune.compare/1", "config": asdict(job) | {"dtype": str(dtype), "device": str(device)},
             "versions": versions(), "selection_data": select_info, "tokenizer_check": tokenizer_check, "warnings": tokenizer_notes,
             "dense": ppl(), "rows": []}
    test = ("test", ppl)  # one name for the evaluation, so a configuration met again is not pruned or scored again
    cells = [(method, s, alloc, variant) for method in job.methods for s in job.sparsities for alloc in job.allocations
             for variant in _variants(job, alloc)]
    for method, s, alloc, variant in (cells if parallel is None else parallel.share(cells, runner)):
        t0 = time.perf_counter()
        column = alloc if variant == "default" else f"{alloc} ({variant})"
        row = {"method": method, "sparsity": s, "allocation": alloc, "variant": variant, "column": column,
               "beta": None, "options": None, "search_seconds": None}
        beta, options = None, None
        if variant == OFFSET:  # beta and attn_offset together, on the selection windows
            trials, (beta, offset), _ = runner.tune_offset(method, s, max_trials=job.max_trials)
            options = {"attn_offset": offset}
            row |= {"beta": beta, "options": options, "search_seconds": time.perf_counter() - t0,
                    "trials": [[list(x), v] for x, v in trials]}
        elif alloc == "atp" or variant != "default":  # "selected on test": beta chosen on the evaluation windows
            trials, value, _ = runner.tune(method, s, alloc, max_trials=job.max_trials,
                                           scorer=test if variant == "selected on test" else None)
            knob = ALLOCATORS[alloc].tunable
            beta, options = (value, None) if alloc == "atp" else (None, {knob: value})
            row |= {"beta": beta, "options": options, "search_seconds": time.perf_counter() - t0, "trials": trials}
        try:
            key = runner.configuration(method, s, alloc, beta, options)
        except ConfigError as err:  # e.g. a peer's default option gives a rate >= 1 at this sparsity: say so, go on
            row |= {"ppl": math.inf, "refused": str(err), "eval_windows": 0, "overall_sparsity": None,
                    "prune_seconds": None, "rates": None, "statistic": {}}
            state["rows"].append(row)
            if write:
                write_json(out / "compare.json", state)
            if job.progress:
                print(f"[{len(state['rows'])}/{len(cells)}] {method} S={s:g} {column}: refused: {err}", flush=True)
            continue
        evaluated = (key, "test") in runner.scores  # e.g. the configuration a search on the test split chose
        result = (runner.known if evaluated else runner.prune)(method, s, alloc, beta, options=options)
        ev = runner.measure(key, *test)
        row |= {"ppl": ev["ppl"], "eval_windows": ev["windows"], "overall_sparsity": result.overall_sparsity,
                "prune_seconds": result.seconds, "rates": result.spec["rates"],
                "quantization": result.quantization or None,
                "statistic": {k: v for k, v in result.spec.items() if k.startswith("allocator_")}}
        state["rows"].append(row)
        if write:
            write_json(out / "compare.json", state)
        if job.progress:
            chosen = (f" beta={beta:.4g}" if beta is not None else "") + "".join(
                f" {k}={v:.4g}" for k, v in (options or {}).items())
            print(f"[{len(state['rows'])}/{len(cells)}] {method} S={s:g} {column}{chosen}: ppl {ev['ppl']:.3f}",
                  flush=True)
    state["prune_passes"] = runner.prunes  # configurations met again (uniform, a chosen value) were not pruned again
    if vlm is not None:  # what was pruned, and the dense parts' checksums before the first cell and after the last
        state["multimodal"] = vlm.report()
        state["warnings"] += vlm.warnings()
    if parallel is not None:
        return parallel.finish(state, cells)
    write_json(out / "compare.json", state)
    for name, text in (("results.csv", to_csv(state["rows"])), ("results.md", to_markdown(state))):
        with atomic_file(out / name) as fh:
            fh.write(text)
    plot_rates(state["rows"], out / "rates.png")
    return state


def _variants(job: CompareJob, alloc: str) -> list[str]:
    """The rows one allocation gets: its defaults (ATP: beta searched on held-out data); with ``tune_peers`` also the
    peer with its main option searched the same way ("tuned"); with ``atp_on_test`` also ATP with beta chosen on the
    evaluation data ("selected on test", the reference protocol); with ``atp_offset`` also ATP with beta and
    attention/MLP offset searched on held-out data (:data:`OFFSET`)."""
    variants = ["default"]
    tunable = ALLOCATORS[alloc].tunable
    if job.tune_peers and alloc != "atp" and tunable is not None:
        variants.append("tuned")
    if job.atp_on_test and alloc == "atp":
        variants.append("selected on test")
    if job.atp_offset and alloc == "atp":
        variants.append(OFFSET)
    return variants


OFFSET = "attn/mlp offset"  # the variant of ATP with its attention/MLP offset searched (column "atp (attn/mlp offset)")


CSV_FIELDS = ["method", "sparsity", "allocation", "variant", "beta", "options", "ppl", "overall_sparsity",
              "prune_seconds", "search_seconds", "eval_windows"]


def to_csv(rows: list[dict]) -> str:
    """The rows as CSV (one line per cell, the columns of ``CSV_FIELDS``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _column(row: dict) -> str:
    return row.get("column", row["allocation"])


def _cell_text(row: dict) -> str:
    if row.get("refused"):
        return "refused"
    chosen = [f"beta {row['beta']:.4f}"] if row["beta"] is not None else []
    chosen += [f"{k} {v:.3g}" for k, v in (row.get("options") or {}).items()]
    return f"{row['ppl']:.2f}" + (f" ({', '.join(chosen)})" if chosen else "")


def to_markdown(state: dict) -> str:
    """Perplexity table: one line per (pruner, sparsity), one column per allocation (and variant: a peer "tuned" on
    the selection data, ATP "selected on test"), the best held-out cell in bold (a column selected on test is never
    "best": it saw the evaluation data), searched values in brackets; then achieved sparsity and times."""
    rows = state["rows"]
    columns = list(dict.fromkeys(_column(r) for r in rows))
    lines = [f"| pruner | sparsity | {' | '.join(columns)} | best |", "|---|---|" + "---|" * (len(columns) + 1)]
    for method in dict.fromkeys(r["method"] for r in rows):
        for s in dict.fromkeys(r["sparsity"] for r in rows):
            cells = {_column(r): r for r in rows if r["method"] == method and r["sparsity"] == s}
            honest = [r for r in cells.values() if r.get("variant") != "selected on test"]
            best = _column(min(honest, key=lambda r: r["ppl"]))
            out = [f"**{_cell_text(cells[c])}**" if c == best else _cell_text(cells[c]) for c in columns]
            lines.append(f"| {method} | {s:g} | {' | '.join(out)} | {best} |")
    dense = state["dense"]
    lines += ["", f"Dense perplexity: {dense['ppl']:.3f} ({dense['windows']} windows x {dense['seqlen']} tokens).", "",
              "| pruner | sparsity | allocation | achieved sparsity | prune s | search s |", "|---|---|---|---|---|---|"]
    for r in rows:
        search = f"{r['search_seconds']:.1f}" if r["search_seconds"] is not None else "-"
        if r.get("refused"):
            lines.append(f"| {r['method']} | {r['sparsity']:g} | {_column(r)} | refused: {r['refused']} | - | {search} |")
            continue
        lines.append(f"| {r['method']} | {r['sparsity']:g} | {_column(r)} | {r['overall_sparsity']:.4f} | "
                     f"{r['prune_seconds']:.1f} | {search} |")
    return "\n".join(lines) + "\n"


def plot_rates(rows: list[dict], path: Path) -> None:
    """Per-block rates of every allocation at the highest sparsity, for the first pruner."""
    from atprune.plotting import new_figure, save_png

    method = rows[0]["method"]
    s = max(r["sparsity"] for r in rows)
    fig, ax = new_figure(7, 4.5)
    for r in rows:
        if r["method"] == method and r["sparsity"] == s and r["rates"]:
            label = _column(r) + (f" (beta {r['beta']:.4f})" if r["beta"] is not None else "")
            ax.plot(range(len(r["rates"])), r["rates"], "o-", markersize=3, label=label)
    ax.set_xlabel("block index (input side first)")
    ax.set_ylabel("sparsity ratio")
    ax.set_title(f"per-block sparsity at S={s:g} ({method})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
