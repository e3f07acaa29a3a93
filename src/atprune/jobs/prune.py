"""The whole ``atprune prune`` job as one function: check, load, calibrate, evaluate, prune, evaluate, save.

Every check that can fail on user input runs in :func:`check_job` before the model is loaded.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from atprune import data as data_mod
from atprune.models.adapter import Adapter
from atprune.pruners.dsnot import check_refine
from atprune.api import (OFFLOAD_BATCH_CAP, check_attn_offset, check_widths, evaluate_perplexity, needs_calibration,
                         plan, prune)
from atprune.errors import ConfigError, check_positive_int
from atprune.export import check_export_options, check_output_dir, check_saveable, record_masks, save_pruned
from atprune.engine.placement import Placement, auto_batch_size, peak_memory_gib
from atprune.export.checkpoint import SAVE_DTYPES
from atprune.export.report import build_report
from atprune.jobs.multimodal import VisionLanguageRun, check_vision_language, with_offload
from atprune.jobs.options import RunOptions, check_run_options, check_window_length
from atprune.jobs.quantize import QuantOptions, check_quant, check_quant_widths, grid_tensors, quant_section
from atprune.models.gguf_tokenizer import tokenizer_record
from atprune.models.sources import load_model, resolve_device

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PruneJob(QuantOptions, RunOptions):
    """Options of one prune run (the CLI flags, one to one); the shared ones are in :class:`RunOptions`, the
    quantization ones in :class:`atprune.jobs.quantize.QuantOptions`."""

    method: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    beta: float | None = None
    allocation_options: dict | None = None
    eval_seqlen: int | None = None
    eval_dense: bool = True
    offload: bool = False
    offload_activations: bool = False
    strict: bool = False
    save_dtype: str | None = None  # float32, float16, bfloat16; None: the dtype the model ran in
    formats: tuple[str, ...] = ("dense",)  # add "compressed" for the compressed-tensors sparse-bitmask copy
    zero_shot: str | None = None  # lm-eval tasks, e.g. "boolq,piqa" or "all"
    task_data: str | None = None  # local original task files (None: the hub)
    zero_shot_limit: int | None = None
    zero_shot_batch_size: int = 16
    caption_data: str | None = None  # image-text .jsonl: caption log-likelihood, dense vs pruned (vision-language)
    refine: str | None = None  # "dsnot": DSnoT mask refinement after the pruner (atprune.pruners.dsnot)


def check_job(job: PruneJob):
    """Validate everything that can be checked without loading the model.

    Returns:
        ``(source, spec, device, dtype, vl)``: the resolved model source, the :class:`atprune.api.PruneSpec`
        (rates for the model's number of blocks), the torch device and dtype, and the
        :class:`atprune.jobs.multimodal.VisionLanguagePlan` (image-text files read and checked).

    Raises:
        ConfigError: the first problem found, as one line.
    """
    check_positive_int("eval-seqlen", job.eval_seqlen, optional=True)
    check_window_length("eval_seqlen", job.eval_seqlen)

    def own_checks():
        if job.offload and job.zero_shot:
            raise ConfigError("--zero-shot with --offload is not supported yet (lm-eval runs the whole model on one "
                              "device); score the saved model with `atprune eval` instead")
        if (job.offload or job.offload_activations) and resolve_device(job.device).type == "cpu":
            raise ConfigError("--offload / --offload-activations move weights or activations off a GPU; they need "
                              "--device cuda")
        check_export_options(job.save_dtype, job.formats)
        check_quant(job, job.formats)
        if job.zero_shot:
            from atprune.eval.zeroshot import check_zero_shot

            check_zero_shot(job.zero_shot, job.task_data, job.zero_shot_limit, job.zero_shot_batch_size)
        first = plan(job.method, job.sparsity, 2, allocation=job.allocation,
                     beta=0.0 if job.beta is not None else None, pattern=job.pattern)  # before the model is touched
        check_refine(job.refine, first.pattern)

    checked = check_run_options(job, own_checks=own_checks)
    if job.out:
        check_output_dir(job.out, job.overwrite, inputs=checked.inputs())
    spec = plan(job.method, job.sparsity, checked.num_blocks, allocation=job.allocation, beta=job.beta,
                pattern=job.pattern, allocation_options=job.allocation_options)
    vl = check_vision_language(checked.source, job.calib_data if needs_calibration(spec, job.refine) else None,
                               job.caption_data, job.nsamples)
    vl = with_offload(vl, job.offload)
    return checked.source, spec, checked.device, checked.dtype, vl


def run_prune_job(job: PruneJob, data_parallel=None) -> dict:
    """Run the job and return its report (also written to ``job.out/report.json`` with the model).

    ``data_parallel``: this process's part of a data-parallel run, passed to :func:`atprune.api.prune` (see
    :mod:`atprune.distributed.prune`, which also keeps evaluation and writing to rank 0).

    Raises:
        ConfigError: bad options or data (before the model is loaded whenever possible).
    """
    source, spec, device, dtype, vl = check_job(job)
    qspec = check_quant(job, job.formats, job.save_dtype, str(dtype).removeprefix("torch."))
    timings: dict[str, float] = {}
    run_warnings: list[str] = []
    t0 = time.perf_counter()
    placement = Placement(device, offload=job.offload, offload_activations=job.offload_activations)
    vlm = VisionLanguageRun(vl, source, dtype, device, job.progress) if vl.vision_language else None
    if vlm is None:
        model, tokenizer = load_model(source, dtype=dtype, device="cpu" if job.offload else device,
                                      progress=job.progress, allow_tokenizer_mismatch=job.allow_tokenizer_mismatch)
    else:
        model, tokenizer = vlm.model, vlm.tokenizer
    tokenizer_check, notes = tokenizer_record(tokenizer)
    run_warnings.extend(notes)
    adapter = Adapter.for_model(model, job.blocks_path)
    placement.prepare(model, adapter.blocks)
    timings["load"] = time.perf_counter() - t0
    check_widths(adapter, spec.pattern)  # before any data or evaluation work
    check_attn_offset(spec, adapter)
    check_quant_widths(adapter, qspec)
    if job.out:
        check_saveable(model, job.blocks_path)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    calib = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        needs_calib = needs_calibration(spec, job.refine) or (qspec is not None and qspec.needs_hessian)
        if needs_calib and vlm is not None and vl.calib_pairs:
            calib = vlm.calibration(job.seqlen)
        elif needs_calib:
            calib_source = data_mod.load_text(job.calib_data, "train", job.data_dir)
            calib = data_mod.calibration_windows(tokenizer, calib_source, job.nsamples, job.seqlen, job.seed,
                                                 job.strict)
    for w in caught:
        run_warnings.append(str(w.message))
        log.warning("%s", w.message)
    timings["calibration_data"] = time.perf_counter() - t0
    eval_seqlen = job.eval_seqlen or job.seqlen
    evaluation = {"dense": None, "sparse": None}
    evalset = None
    if job.eval_data:
        evalset = data_mod.eval_set(tokenizer, job.eval_data, data_mod.eval_split(job.eval_data), job.data_dir)
        if evalset.tokens.numel() < eval_seqlen:
            raise ConfigError(f"evaluation data {job.eval_data} has {evalset.tokens.numel()} tokens, less than one "
                              f"window of {eval_seqlen}")

    eval_batch = job.batch_size
    if eval_batch == "auto":
        eval_batch = auto_batch_size(model.config.get_text_config(), eval_seqlen, 16, device, dtype, logits=True,
                                     cap=OFFLOAD_BATCH_CAP if job.offload else 16)

    def evaluate(tag: str):
        t = time.perf_counter()
        evaluation[tag] = evaluate_perplexity(model, tokenizer, evalset, seqlen=eval_seqlen,
                                              data_dir=job.data_dir, batch_size=eval_batch,
                                              max_windows=job.eval_windows, placement=placement,
                                              progress=job.progress)
        timings[f"eval_{tag}"] = time.perf_counter() - t

    if job.eval_data and job.eval_dense:
        evaluate("dense")
    zero_shot = {"dense": None, "sparse": None, "gate": None}

    def score(tag: str):
        from atprune.eval.zeroshot import evaluate_zero_shot

        t = time.perf_counter()
        zero_shot[tag] = evaluate_zero_shot(model, tokenizer, job.zero_shot, job.task_data, limit=job.zero_shot_limit,
                                            batch_size=job.zero_shot_batch_size)
        timings[f"zero_shot_{tag}"] = time.perf_counter() - t

    if job.zero_shot and job.eval_dense:
        score("dense")
    if vlm is not None:
        vlm.before_pruning(SAVE_DTYPES.get(job.save_dtype), score_dense=job.eval_dense)
    result = prune(model, tokenizer, method=spec.method, sparsity=spec.sparsity, allocation=spec.allocation,
                   beta=spec.beta, pattern=spec.pattern, calib=calib, batch_size=job.batch_size,
                   allocation_options=job.allocation_options, placement=placement, blocks_path=job.blocks_path,
                   progress=job.progress, refine=job.refine, quantize=qspec, data_parallel=data_parallel)
    timings["prune"] = result.seconds
    masks = record_masks(model, job.blocks_path) if job.out else None  # checked again at every step of the save
    if job.eval_data:
        evaluate("sparse")
        ppl = evaluation["sparse"]["ppl"]
        if not math.isfinite(ppl):
            msg = f"SPARSE PERPLEXITY IS {ppl}: the pruned model diverged (try a lower sparsity or beta)"
            run_warnings.append(msg)
            log.warning("!" * 20 + " %s " + "!" * 20, msg)

    if vlm is not None:
        vlm.after_pruning()
        timings.update(vlm.timings)
        run_warnings.extend(vlm.warnings())
    if job.zero_shot:
        from atprune.eval.zeroshot import sanity_gate

        score("sparse")
        zero_shot["gate"] = sanity_gate(zero_shot["sparse"], zero_shot["dense"])
        if zero_shot["gate"]["flagged"] or zero_shot["gate"]["dense_at_or_below_chance_everywhere"]:
            run_warnings.append(f"ZERO-SHOT SANITY GATE: {zero_shot['gate']['reason']}")
            log.warning("%s", run_warnings[-1])
    config = asdict(job) | {"eval_seqlen": eval_seqlen, "eval_batch_size": eval_batch,
                            "dtype": str(dtype).removeprefix("torch."), "device": str(device)}

    model_info = {"spec": job.model, "source": source.kind, "path": source.path, "class": type(model).__name__,
                  "blocks": adapter.num_blocks, "tokenizer_check": tokenizer_check}
    report = build_report(config=config, prune_result=result.to_dict(), evaluation=evaluation, timings=timings,
                          model=model_info, warnings=run_warnings)
    report["peak_gpu_memory_gib"] = peak_memory_gib(device)
    if qspec is not None:
        report["quantization"] = quant_section(result, model, dtype)
    if job.zero_shot:
        report["zero_shot"] = zero_shot
    if vlm is not None:
        report["multimodal"] = vlm.report()
    if job.out:
        t = time.perf_counter()
        save_pruned(model, tokenizer if vlm is None else vlm.processor, job.out, report, overwrite=job.overwrite,
                    masks=masks, save_dtype=job.save_dtype, formats=job.formats,
                    untouched=vlm.dense.untouched() if vlm is not None else None, grids=grid_tensors(result))
        timings["save"] = time.perf_counter() - t
    return report
