"""The ``atprune search`` job: choose ATP's beta (with ``attn_offset="search"`` also its attention/MLP offset, see
:func:`atprune.jobs.strategies.offset_search`) on held-out selection data, then prune and evaluate with it.

Selection data is never the evaluation split unless asked for (``select_on_test``, the reference protocol),
and then every report says so. Work shared by every trial is done once: data loading and tokenization, the
dense inputs of block 0, the dense weights (restored before each trial), and the dense selection metric and
next-token distributions. ``search.json`` is rewritten atomically after every trial, so an interrupted search
resumes (``resume=True``) without redoing finished trials.
"""

from __future__ import annotations

import math
import tempfile
import time
from functools import partial
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from atprune import data as data_mod
from atprune.allocators import beta_max
from atprune.api import plan
from atprune.errors import ConfigError
from atprune.export import check_export_options, check_output_dir, save_pruned, write_json
from atprune.export.checkpoint import SAVE_DTYPES
from atprune.jobs.bits_search import bits_step_trials, final_bits_prune, plot_bits_search
from atprune.jobs.multimodal import check_trials_data, check_vision_language, load_for_trials
from atprune.jobs.options import RunOptions, SelectionOptions, check_run_options, check_selection
from atprune.jobs.quantize import QuantOptions, check_quant, check_quant_widths, grid_tensors, quant_section
from atprune.export.report import build_report
from atprune.jobs.strategies import STRATEGIES, grid_betas
from atprune.jobs.trials import TrialRunner
from atprune.models.gguf_tokenizer import tokenizer_record

SEARCH_SCHEMA = "atprune.search/1"
# options that must match for a resumed search to reuse recorded trials
RESUME_KEYS = ("model", "method", "sparsity", "calib_data", "select_data", "select_on_test", "data_dir", "nsamples",
               "nselect", "seqlen", "seed", "metric", "dtype", "device", "batch_size", "attn_offset")
SEARCH_KEYS = {"bits_step_search": False, "beta": None}  # must match too (absent from older search.json: defaults)
QUANT_KEYS = ("quantize", "group_size", "quant_symmetric", "quant_method", "bits_allocation", "bits_mean", "bits_step",
              "bits_choices")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(kw_only=True)
class SearchJob(QuantOptions, SelectionOptions, RunOptions):
    """Options of one beta search (the CLI flags, one to one); the shared ones are in :class:`RunOptions`."""

    method: str = "wanda"
    sparsity: float = 0.5
    strategy: str = "golden"
    max_trials: int = 6
    step: float = 0.002
    metric: str = "ppl"
    attn_offset: str | None = None  # "search": also ATP's attention/MLP offset, in the same trial budget
    bits_step_search: bool = False  # search the ATP bit schedule's step instead of beta (--bits-step search)
    beta: float | None = None  # with bits_step_search: the fixed ATP sparsity beta (None: uniform sparsity)
    resume: bool = False
    save_dtype: str | None = None  # see atprune.jobs.prune.PruneJob
    formats: tuple[str, ...] = ("dense",)
    zero_shot: str | None = None  # lm-eval tasks scored on the dense and the final model (see atprune.eval.zeroshot)
    task_data: str | None = None
    zero_shot_limit: int | None = None


def check_search(job: SearchJob):
    """Validate everything before the model is loaded; returns ``(source, num_blocks, device, dtype, previous, vl)``
    where ``previous`` are the trials of a resumable ``search.json`` (or ``[]``) and ``vl`` the
    :class:`atprune.jobs.multimodal.VisionLanguagePlan` (a vision-language model is loaded with its processor; an
    image-text calibration file is read and checked).

    Raises:
        ConfigError: the first problem found.
    """
    if job.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {job.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if job.metric not in ("ppl", "kl"):
        raise ConfigError(f"unknown selection metric {job.metric!r}; choose ppl or kl")
    if job.attn_offset not in (None, "search"):
        raise ConfigError(f"search takes --attn-offset search (beta and the offset searched together), got "
                          f"{job.attn_offset!r}; a fixed offset is a prune option (atprune prune --attn-offset D)")
    if job.attn_offset and job.strategy != "golden":
        raise ConfigError("--attn-offset search runs with the golden strategy only (beta by golden, then the offset)")
    if job.attn_offset and job.max_trials < 5:
        raise ConfigError(f"--attn-offset search needs --max-trials >= 5 (3 golden points of beta, then 2 offsets), "
                          f"got {job.max_trials}")
    if job.strategy == "golden" and job.max_trials < 3:
        raise ConfigError(f"golden search needs --max-trials >= 3 (uniform + 2 golden points), got {job.max_trials}")
    if job.strategy == "grid" and not job.step > 0:
        raise ConfigError(f"grid step must be > 0, got {job.step}")
    check_selection(job)
    _check_bits_search(job)

    def own_checks():
        if job.zero_shot:
            from atprune.eval.zeroshot import check_zero_shot

            check_zero_shot(job.zero_shot, job.task_data, job.zero_shot_limit)
        plan(job.method, job.sparsity, 2, allocation="atp", beta=0.0)  # method and sparsity, before the source
        check_quant(job, job.formats)

    checked = check_run_options(job, own_checks=own_checks)
    source, device, dtype = checked.source, checked.device, checked.dtype
    vl = check_vision_language(source, job.calib_data, None, job.nsamples)
    check_trials_data(vl, job, "search")
    previous = []
    if job.out:
        out = Path(job.out).expanduser()
        resumable = job.resume and (out / "search.json").is_file()
        # a folder holding this search's own search.json may be continued; anything else follows the usual rule
        check_export_options(job.save_dtype, job.formats)
        check_output_dir(out, job.overwrite or resumable, inputs=checked.inputs())
        if resumable:
            previous = _resumable_trials(out / "search.json", job, str(dtype).removeprefix("torch."), str(device))
    return source, checked.num_blocks, device, dtype, previous, vl


def _check_bits_search(job: SearchJob) -> None:
    """One knob per search: ``--bits-step search`` searches the bit schedule's step with the sparsity allocation
    fixed; ``--beta`` only fixes that allocation.

    Raises:
        ConfigError: the first conflicting option, as one line.
    """
    if not job.bits_step_search:
        if job.beta is not None:
            raise ConfigError("--beta fixes ATP's sparsity schedule for --bits-step search; a plain search chooses beta")
        return
    if job.quantize is None:
        raise ConfigError("--bits-step search needs --quantize wN --bits-allocation atp (e.g. --quantize w4)")
    if job.bits_allocation != "atp":
        raise ConfigError("--bits-step search needs --bits-allocation atp (the step of ATP's bit schedule)")
    if job.attn_offset:
        raise ConfigError("--bits-step search and --attn-offset search cannot be combined: one knob per search")
    if job.strategy != "golden":
        raise ConfigError("--bits-step search runs with the golden strategy only")
    if job.beta is not None and not job.beta >= 0:
        raise ConfigError(f"--beta must be >= 0, got {job.beta!r}")


def _config(job: SearchJob, dtype: str, device: str) -> dict:
    return asdict(job) | {"dtype": dtype, "device": device}


def _resumable_trials(path: Path, job: SearchJob, dtype: str, device: str) -> list[dict]:
    import json

    saved = json.loads(path.read_text())
    now = _config(job, dtype, device)
    diff = [k for k in RESUME_KEYS if saved.get("config", {}).get(k) != now[k]]
    # quantization options (a search.json written before they existed had none: the defaults)
    defaults = QuantOptions(quantize=None)
    diff += [k for k in QUANT_KEYS if _plain(saved.get("config", {}).get(k, getattr(defaults, k))) != _plain(now[k])]
    diff += [k for k, d in SEARCH_KEYS.items() if saved.get("config", {}).get(k, d) != now[k]]
    if diff:
        raise ConfigError(f"cannot resume {path}: options differ ({', '.join(diff)}); use another --out or the same options")
    trials = saved.get("trials", [])
    for t in trials:  # non-finite metrics were written as null
        t["metric"] = math.inf if t.get("metric") is None else t["metric"]
    return trials


def selection_windows(job, tokenizer, calib=None):
    """(calibration, selection windows, info) for a job with :class:`RunOptions` and :class:`SelectionOptions`; the
    two sets are disjoint when drawn from one source.

    The calibration is ``[nsamples, seqlen]`` int64 windows of ``job.calib_data``, or ``calib`` when given (a
    vision-language model's :class:`atprune.multimodal.pairs.ImageTextCalibration`): then the selection windows
    come from ``job.select_data`` (or the evaluation data with ``select_on_test``), which must be given
    (:func:`atprune.jobs.multimodal.check_trials_data` says so before loading).
    """
    calib_source = data_mod.load_text(job.calib_data, "train", job.data_dir) if calib is None else None
    same_as_calib = calib is None and job.select_data and (
        data_mod.identity(job.select_data, "validation", job.data_dir)
        == data_mod.identity(job.calib_data, "train", job.data_dir))
    if calib is not None and not (job.select_on_test or job.select_data):
        raise ConfigError("image-text calibration needs text selection data (--select-data)")
    if job.select_on_test or (job.select_data and not same_as_calib):
        spec = job.eval_data if job.select_on_test else job.select_data
        split = data_mod.eval_split(spec) if job.select_on_test else "validation"
        if calib is None:
            calib = data_mod.calibration_windows(tokenizer, calib_source, job.nsamples, job.seqlen, job.seed).windows
        tokens, info = data_mod.evaluation_tokens(tokenizer, data_mod.load_text(spec, split, job.data_dir))
        select = data_mod.cut_windows(tokens, job.seqlen, info.get("bos_token_id"), job.nselect)
        nwin = select.shape[0]
        if nwin == 0:
            raise ConfigError(f"selection data {spec} has fewer tokens than one window of {job.seqlen}")
        return calib, select, info | {"windows": nwin, "source": "selected on test" if job.select_on_test
                                      else "held-out data"}
    stream = data_mod.token_stream(tokenizer, calib_source, max_tokens=4 * (job.nsamples + job.nselect) * job.seqlen,
                                   seed=job.seed)
    calib, select = data_mod.sample_windows(stream, job.seqlen, [job.nsamples, job.nselect], seed=job.seed,
                                            bos=data_mod.window_bos(tokenizer))
    if calib.shape[0] < job.nsamples or select.shape[0] == 0:
        raise ConfigError(f"calibration source {calib_source.origin} has {stream.numel()} tokens: not enough for "
                          f"{job.nsamples} calibration + {job.nselect} selection windows of {job.seqlen}")
    return calib, select, calib_source.describe() | {"windows": select.shape[0], "source":
                                                     "calibration source, windows disjoint from the calibration samples"}


def plot_search(trials: list[dict], chosen: float, metric: str, path: Path, title: str, offset: float = 0.0) -> None:
    """PNG of the selection metric against beta; uniform (beta = 0) and the chosen beta are marked; trials with an
    attention/MLP offset D (``attn_offset`` search) are triangles at their beta, labelled with D."""
    from atprune.plotting import new_figure, save_png

    finite = [t for t in trials if t["metric"] is not None and math.isfinite(t["metric"])]
    pts = sorted((t["beta"], t["metric"]) for t in finite if not t.get("attn_offset"))
    fig, ax = new_figure(6, 4)
    ax.plot([b for b, _ in pts], [v for _, v in pts], "o-", color="tab:blue", label="trials")
    for t in finite:
        if t.get("attn_offset"):
            ax.plot([t["beta"]], [t["metric"]], "^", color="tab:orange", markersize=8)
            ax.annotate(f"D = {t['attn_offset']:+.3g}", (t["beta"], t["metric"]), fontsize=7)
    for b, v in pts:
        if b == 0.0:
            ax.plot([b], [v], "s", color="tab:red", markersize=9, label="uniform (beta = 0)")
        if b == chosen and not offset:
            ax.plot([b], [v], "*", color="tab:green", markersize=14, label=f"chosen beta = {b:.4g}")
    for t in finite:
        if offset and t["beta"] == chosen and t.get("attn_offset") == offset:
            ax.plot([chosen], [t["metric"]], "*", color="tab:green", markersize=14,
                    label=f"chosen beta = {chosen:.4g}, D = {offset:+.3g}")
    ax.set_xlabel("beta")
    ax.set_ylabel("selection perplexity" if metric == "ppl" else "KL(dense || sparse), nats/token")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    save_png(fig, path)


def run_search_job(job: SearchJob, parallel=None) -> dict:
    """Run the search; returns the ``search.json`` content (also written to ``job.out`` with the final model).

    ``parallel``: this rank's part of a torchrun launch (:class:`atprune.distributed.trials.ParallelTrials`): its
    ``tune`` (``tune_offset`` with ``attn_offset="search"``) spreads the trials over the ranks, nothing is written before the end (no ``search.json`` after each
    trial), and only its ``writer`` (rank 0) scores zero-shot tasks, evaluates the final model and writes the folder;
    the other ranks return the state after the search.

    Raises:
        ConfigError: bad options or data, before the model is loaded whenever possible.
    """
    source, num_blocks, device, dtype, previous, vl = check_search(job)
    if job.bits_step_search and parallel is not None:
        raise ConfigError("--bits-step search runs in one process (not under torchrun yet)")
    qspec = check_quant(job, job.formats, job.save_dtype, str(dtype).removeprefix("torch."))
    config = _config(job, str(dtype).removeprefix("torch."), str(device))
    out = Path(job.out).expanduser() if job.out else None
    t_start = time.perf_counter()
    # a vision-language model: loaded with its processor, only its language blocks pruned (atprune.multimodal)
    vlm, model, tokenizer = load_for_trials(vl, source, dtype, device, job, SAVE_DTYPES.get(job.save_dtype))
    tokenizer_check, tokenizer_notes = tokenizer_record(tokenizer)
    if out is not None:
        from atprune.export import check_saveable

        check_saveable(model, job.blocks_path)
    from atprune.models.adapter import Adapter

    adapter = Adapter.for_model(model, job.blocks_path)
    check_quant_widths(adapter, qspec)
    if job.attn_offset:  # every layer attention or MLP (ConfigError naming one that is neither), before any score
        from atprune.allocation import sublayer_sizes

        sublayer_sizes(adapter)
    writer = parallel is None or parallel.writer
    zero_shot = None
    if job.zero_shot and writer:  # the dense model, before any trial touches the weights
        from atprune.eval.zeroshot import evaluate_zero_shot, sanity_gate

        def score():
            return evaluate_zero_shot(model, tokenizer, job.zero_shot, job.task_data, limit=job.zero_shot_limit)

        zero_shot = {"dense": score()}
    calib, select, select_info = selection_windows(job, tokenizer, vlm.calibration(job.seqlen) if vlm else None)
    runner = TrialRunner(model, calib, select, metric=job.metric, batch_size=job.batch_size,
                         blocks_path=job.blocks_path, quantize=qspec)
    hi = beta_max(job.sparsity, runner.block_sizes)
    state = {"schema": SEARCH_SCHEMA, "config": config, "selected_on_test": job.select_on_test,
             "selection_data": select_info, "num_blocks": num_blocks, "beta_max": hi,
             "dense_selection_ppl": runner.dense_select_ppl, "trials": list(previous), "chosen": None}
    if job.bits_step_search:
        state["bits_step_max"] = runner.bits_step_range()
    budget = job.max_trials if job.strategy == "golden" else len(grid_betas(job.sparsity, runner.block_sizes, job.step))
    bar = tqdm(total=budget, desc="bits-step trials" if job.bits_step_search else "beta trials", unit="trial",
               disable=not job.progress)
    bar.update(len(previous))

    def record(trial: dict) -> None:
        state["trials"].append(trial)
        if out is not None and parallel is None:  # under torchrun the folder is written once, at the end
            write_json(out / "search.json", state)
        bar.update(1)

    offset = 0.0
    try:
        if job.bits_step_search:
            _, chosen, chosen_value = bits_step_trials(job, runner, previous, record)
        elif job.attn_offset:
            tune_offset = runner.tune_offset if parallel is None else partial(parallel.tune_offset, runner)
            _, (chosen, offset), chosen_value = tune_offset(
                job.method, job.sparsity, max_trials=job.max_trials, on_trial=record,
                memo={(t["beta"], t.get("attn_offset", 0.0)): t["metric"] for t in previous})
        else:
            tune = runner.tune if parallel is None else partial(parallel.tune, runner)
            _, chosen, chosen_value = tune(job.method, job.sparsity, "atp", strategy=job.strategy,
                                           max_trials=job.max_trials, step=job.step,
                                           memo={t["beta"]: t["metric"] for t in previous}, on_trial=record)
    finally:
        bar.close()
    if job.bits_step_search:
        state["chosen"] = {"bits_step": chosen, "metric": chosen_value}
    else:
        state["chosen"] = {"beta": chosen, "metric": chosen_value} | ({"attn_offset": offset} if job.attn_offset else {})
    if job.attn_offset:
        state["attn_offset_range"] = list(runner.offset_range(job.sparsity, chosen))  # at the chosen beta
    state["search_seconds"] = time.perf_counter() - t_start
    if parallel is not None:
        state["parallel"] = parallel.describe()
        if not writer:  # rank 0 alone prunes with the chosen beta, evaluates and writes
            return state
    if job.bits_step_search:
        final, chosen_config = final_bits_prune(job, runner, chosen)
        state["chosen"] |= {"block_bits": final.quantization["block_bits"], "mean_bits": final.quantization["mean_bits"]}
    else:
        final = runner.prune(job.method, job.sparsity, "atp", chosen, progress=job.progress,
                             options={"attn_offset": offset} if offset else None)
        chosen_config = {"allocation": "atp", "beta": chosen} | ({"attn_offset": offset} if job.attn_offset else {})
    evaluation = {"dense": None, "sparse": None}
    if job.eval_data:
        from atprune.api import evaluate_perplexity

        evaluation["sparse"] = evaluate_perplexity(model, tokenizer, job.eval_data, split=data_mod.eval_split(job.eval_data),
                                                   seqlen=job.seqlen, data_dir=job.data_dir, batch_size=runner.eval_batch_size,
                                                   max_windows=job.eval_windows, progress=job.progress)
        evaluation["sparse"]["selected_on_test"] = job.select_on_test
    state["final_evaluation"] = evaluation["sparse"]
    if vlm is not None:  # what was pruned, and the dense parts' checksums before the search and now
        state["multimodal"] = vlm.report()
    if zero_shot is not None:
        zero_shot["sparse"] = score()
        zero_shot["gate"] = sanity_gate(zero_shot["sparse"], zero_shot["dense"])
        state["zero_shot"] = zero_shot
    knob = "the bits step" if job.bits_step_search else "beta"
    notes = [f"SELECTED ON TEST: {knob} was chosen on the evaluation split (reference protocol)"] if job.select_on_test else []
    notes += tokenizer_notes + (vlm.warnings() if vlm is not None else [])
    state["tokenizer_check"] = tokenizer_check
    if out is not None:
        report = build_report(config=config | chosen_config, prune_result=final.to_dict(),
                              evaluation=evaluation, timings={"search": state["search_seconds"], "prune": final.seconds},
                              model={"spec": job.model, "source": source.kind, "path": source.path,
                                     "class": type(model).__name__, "blocks": num_blocks,
                                     "tokenizer_check": tokenizer_check}, warnings=notes)
        report["selected_on_test"] = job.select_on_test
        if qspec is not None:
            report["quantization"] = quant_section(final, model, dtype)
        if zero_shot is not None:
            report["zero_shot"] = zero_shot
        if vlm is not None:
            report["multimodal"] = vlm.report()
        title = (f"{job.model} {job.method} S={job.sparsity:g} ({job.strategy}, {len(state['trials'])} trials)"
                 + (" - SELECTED ON TEST" if job.select_on_test else ""))
        with tempfile.TemporaryDirectory() as tmp:
            if job.bits_step_search:
                plot_bits_search(state["trials"], chosen, job.metric, Path(tmp) / "search.png", title)
            else:
                plot_search(state["trials"], chosen, job.metric, Path(tmp) / "search.png", title, offset)
            # out was checked before loading (it holds at most this search's own search.json)
            save_pruned(model, tokenizer if vlm is None else vlm.processor, out, report, overwrite=True,
                        extra={"search.json": state}, files={"search.png": Path(tmp) / "search.png"},
                        save_dtype=job.save_dtype, formats=job.formats, blocks_path=job.blocks_path,
                        grids=grid_tensors(final), untouched=vlm.dense.untouched() if vlm is not None else None)
    return state
