"""Command line: ``atprune prune ...`` (a thin layer over :mod:`atprune.jobs.prune`).

Bad input is one line on stderr and exit code 2, before any heavy work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from atprune.allocators import ALLOCATORS
from atprune.errors import ConfigError
from atprune.export import MaskViolation
from atprune.pruners import PRUNERS
from atprune.vision.cli import add_vision_args


def _add_blocks_path(p: argparse.ArgumentParser) -> None:
    """``--blocks-path`` and ``--allow-tokenizer-mismatch``: how atprune reads the model (every model-loading job)."""
    p.add_argument("--blocks-path", default=None, metavar="PATH",
                   help="dotted path of the decoder-block nn.ModuleList for a model layout atprune does not recognise, "
                        "e.g. model.decoder.layers (default: found automatically)")
    _add_tokenizer_check(p)


def _add_tokenizer_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="go on (with a warning recorded in the report) when the tokenizer transformers builds from a "
                        ".gguf file does not match the file's own metadata (default: refuse before any work)")


def _add_common_args(p: argparse.ArgumentParser, *, sparsity_default: float | None = 0.5, out_required: bool = True,
                     offload: bool = False) -> None:
    """Options every subcommand shares: model, pruner, calibration data, sampling, device, output."""
    p.add_argument("--model", required=True, help="alias (smollm2-135m), .gguf file, model folder or Hugging Face id")
    p.add_argument("--method", default="wanda", help=f"pruner: {', '.join(PRUNERS)} (default wanda)")
    p.add_argument("--sparsity", type=float, default=sparsity_default, help="target sparsity ratio S in [0, 1) "
                   "(default 0.5" + ("; implied by an N:M pattern)" if sparsity_default is None else ")"))
    p.add_argument("--calib-data", default="c4", help="calibration text: c4, wikitext2, or a .raw/.txt/.jsonl/"
                   ".json(.gz)/.parquet file (default c4); for a vision-language model also a .jsonl of "
                   "{\"image\": path, \"text\": str} pairs")
    p.add_argument("--data-dir", default=None, help="local data folder for named sets (default $ATPRUNE_DATA_DIR)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sample and eval window (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    _add_device_args(p, offload)
    p.add_argument("--out", required=out_required, default=None, help="output folder (model, tokenizer, reports)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_blocks_path(p)


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer or 'auto', got {text!r}")
    return value


def _add_device_args(p: argparse.ArgumentParser, offload: bool = True) -> None:
    p.add_argument("--calib-batch-size", "--batch-size", dest="batch_size", type=_batch_size, default="auto",
                   help="windows per forward pass (calibration and evaluation); auto (default): from free GPU "
                   "memory on CUDA (at most 16, 4 with --offload), 1 on CPU; results do not depend on it")
    p.add_argument("--dtype", default=None, help="float32 (default on CPU), bfloat16 (default on CUDA), float16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    if offload:
        p.add_argument("--offload", action="store_true", help="keep the blocks in CPU memory and move each to the "
                       "GPU only while it is calibrated and pruned (models larger than the GPU)")
        p.add_argument("--offload-activations", action="store_true", help="keep calibration activations in pinned "
                       "CPU memory between blocks")


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    _add_common_args(p, sparsity_default=None, out_required=False, offload=True)
    p.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M, e.g. 2:4, 4:8; with a "
                   "non-uniform --allocation each block gets its own N, mean N:M (mixed N:M)")
    p.add_argument("--dist-reduce", choices=("sum", "ordered"), default="sum", help="under torchrun: add the ranks' "
                   "statistics with one all-reduce (sum) or rank after rank, bit for bit as one process (ordered)")
    p.add_argument("--allocation", default="uniform", help=f"per-block sparsity allocation: {', '.join(ALLOCATORS)}")
    p.add_argument("--beta", type=float, default=None, help="ATP step between consecutive blocks; legal range "
                   "[0, min(2S, 2(1-S))/(L-1)]")
    p.add_argument("--alloc-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="allocator option, repeatable: owl M=5 lam=0.08; alphapruning eps=0.3; dlp alpha=0.15")
    p.add_argument("--attn-offset", type=float, default=None, metavar="D", help="atp: inside each block prune "
                   "attention D more than the MLP, the block's rate kept (default 0: plain ATP; every layer rate must "
                   "stay in [0, 1), an illegal D is refused with its legal interval; unstructured only)")
    p.add_argument("--structure", default=None, metavar="channels|heads|both", help="structured width pruning with "
                   "--method wanda-sp or flap: remove whole MLP channels and/or KV groups with their query heads; "
                   "--sparsity is the mean fraction removed; saves a smaller transformers model")
    p.add_argument("--refine", default=None, metavar="dsnot", help="refine every layer's mask after "
                   "the pruner: dsnot (DSnoT, Zhang et al. 2024, official defaults; unstructured only)")
    p.add_argument("--eval-data", default="wikitext2", help="perplexity text: wikitext2 (test), c4 (validation), a file or a "
                   "data folder (default wikitext2)")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    p.add_argument("--no-eval-dense", action="store_true", help="skip the dense model's perplexity")
    p.add_argument("--eval-seqlen", type=int, default=None, help="eval window length (default: --seqlen)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows (quick checks)")
    p.add_argument("--strict", action="store_true", help="fewer calibration tokens than asked is an error")
    p.add_argument("--caption-data", default=None, metavar="PAIRS.jsonl", help="vision-language models: mean "
                   "log-likelihood of these captions for their images ({\"image\": path, \"text\": caption} "
                   "lines), dense and pruned")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON instead of the table")
    _add_zero_shot_args(p, "the pruned model and, unless --no-eval-dense, the dense one")
    _add_export_args(p)
    add_vision_args(p)
    _add_quant_args(p)


def _add_zero_shot_args(p: argparse.ArgumentParser, scored: str) -> None:
    """``--zero-shot`` and its data / limit options (prune, search)."""
    p.add_argument("--zero-shot", default=None, metavar="TASKS", help=f"also score zero-shot accuracy (lm-eval) of "
                   f"{scored}: comma list or 'all'")
    p.add_argument("--task-data", default=None, help="folder with the original task files (default: the hub)")
    p.add_argument("--zero-shot-limit", type=int, default=None, help="first N examples per zero-shot task")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    """Quantization of the pruned weights in the same pass (prune, search, compare; see atprune.quant)."""
    p.add_argument("--quantize", default=None, metavar="wN", help="also quantize the pruned weights: w4, w8 (wN, N in "
                   "2..8; 16-bit activations); pruned weights stay exactly 0")
    p.add_argument("--group-size", type=int, default=128, help="columns per scale (default 128; 0: per channel)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid (a zero point per group; default symmetric)")
    p.add_argument("--quant-method", default="gptq", help="gptq (default: Hessian error feedback, jointly with "
                   "sparsegpt) or rtn (round to nearest)")
    p.add_argument("--bits-allocation", default="uniform", help="uniform (default) or atp: more bits for the "
                   "input-side blocks, parameter-weighted mean --bits-mean")
    p.add_argument("--bits-mean", type=float, default=None, help="mean bits of --bits-allocation atp (default: wN)")
    p.add_argument("--bits-step", default="0", help="bits per block of the atp schedule (default 0); atprune search "
                   "also takes 'search': the step chosen on held-out data (golden, --max-trials), sparsity fixed")
    p.add_argument("--bits-choices", default="2,3,4,8", help="bit widths a block may get (default 2,3,4,8)")


def _quant_options(args) -> dict:
    """The :class:`atprune.jobs.quantize.QuantOptions` fields from the parsed arguments.

    Raises:
        ConfigError: ``--bits-choices`` that is not a comma list of integers; ``--bits-step`` neither a number nor
            (``atprune search`` only) ``search``.
    """
    try:
        choices = tuple(int(c) for c in args.bits_choices.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"--bits-choices takes a comma list of bit widths (e.g. 2,3,4,8), got {args.bits_choices!r}") from None
    step = str(args.bits_step).strip().lower()
    if step == "search":
        if args.command != "search":
            raise ConfigError("--bits-step search is an atprune search option; give a number here (e.g. 0.05)")
        step = "0"
    try:
        step = float(step)
    except ValueError:
        raise ConfigError(f"--bits-step takes a number (bits per block) or 'search', got {args.bits_step!r}") from None
    return {"quantize": args.quantize, "group_size": args.group_size, "quant_symmetric": not args.asym,
            "quant_method": args.quant_method, "bits_allocation": args.bits_allocation, "bits_mean": args.bits_mean,
            "bits_step": step, "bits_choices": choices}


def _bits_step_search(args) -> bool:
    """``--bits-step search`` given (the search job then searches the step, not beta)."""
    return str(getattr(args, "bits_step", "")).strip().lower() == "search"


def _add_export_args(p: argparse.ArgumentParser) -> None:
    """Checkpoint options of ``--out`` (prune, search)."""
    p.add_argument("--save-dtype", default=None, help="dtype of the saved checkpoint: float32, float16, bfloat16 "
                   "(default: --dtype); pruned weights stay exactly 0, underflow zeros are reported")
    p.add_argument("--format", default="dense", help="dense (default: safetensors), compressed (also writes "
                   "OUT/compressed/, the compressed-tensors sparse-bitmask format) or pack-quantized (with --quantize: "
                   "also OUT/pack-quantized/, compressed-tensors' dense W4A16/W8A16 format)")


def _add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a folder written by prune/search --out (report.json + safetensors)")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", required=True, help="report.json of a prune or search run (or its folder)")
    p.add_argument("--out", required=True, help="recipe file to write (YAML)")
    p.add_argument("--modifier", default=None, help="wanda or sparsegpt (default: the run's method)")
    p.add_argument("--blocks-path", default=None, help="dotted path of the decoder blocks (default: from the "
                   "report, else model.layers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing recipe file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atprune", description="One-shot LLM pruning with layer-wise sparsity "
                                     "allocation (ATP).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune_args(sub.add_parser("prune", help="prune a model block by block and report perplexity"))
    _add_verify_args(sub.add_parser("verify", help="recompute every pruned matrix's sparsity and mask checksum "
                                    "from a saved checkpoint and compare with its report"))
    _add_recipe_args(sub.add_parser("recipe", help="write a run's per-block sparsities as an llm-compressor recipe"))
    s = sub.add_parser("search", help="choose ATP's beta on held-out data, then prune and evaluate with it")
    _add_common_args(s)
    _add_export_args(s)
    s.add_argument("--select-data", default=None, help="selection text (validation split of a named set, or a file); "
                   "default: windows of the calibration source disjoint from the calibration samples (needed with "
                   "image-text calibration)")
    s.add_argument("--nselect", type=int, default=16, help="selection windows of --seqlen tokens (default 16)")
    s.add_argument("--select-on-test", action="store_true", help="select on the evaluation split (the reference "
                   "protocol); every report is marked 'selected on test'")
    s.add_argument("--eval-data", default="wikitext2", help="final evaluation text (default wikitext2 test)")
    s.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")
    s.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    s.add_argument("--strategy", default="golden", help="golden (default) or grid (step --step until illegal)")
    s.add_argument("--max-trials", type=int, default=6, help="prune passes of the golden search (default 6)")
    s.add_argument("--step", type=float, default=0.002, help="grid step (default 0.002, as the reference)")
    s.add_argument("--metric", default="ppl", help="ppl (selection perplexity, default) or kl (to the dense model)")
    s.add_argument("--attn-offset", default=None, metavar="search", help="search: also ATP's attention/MLP offset, "
                   "in the same --max-trials (beta by golden on all but 2 trials, then the offset at +-D0 at that "
                   "beta; docs/search.md)")
    s.add_argument("--resume", action="store_true", help="continue the search recorded in OUT/search.json")
    s.add_argument("--beta", type=float, default=None, help="with --bits-step search: ATP's sparsity beta, fixed "
                   "(default: uniform sparsity); beta and the bits step are not searched together")
    _add_zero_shot_args(s, "the dense and the final model")
    add_vision_args(s)
    _add_quant_args(s)
    c = sub.add_parser("compare", help="allocations x pruners x sparsities on one model, as Markdown/CSV tables")
    c.add_argument("--model", required=True, help="alias (smollm2-135m), .gguf file, model folder or Hugging Face id")
    c.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], help="pruners (default wanda sparsegpt)")
    c.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7], help="default 0.5 0.6 0.7")
    c.add_argument("--allocations", nargs="+", default=["uniform", "atp", "owl", "alphapruning", "dlp"],
                   help="default: all five; atp's beta is searched (golden) on held-out selection windows")
    c.add_argument("--calib-data", default="c4", help="calibration text (default c4); for a vision-language model "
                   "also a .jsonl of {\"image\": path, \"text\": str} pairs (with --select-data)")
    c.add_argument("--eval-data", default="wikitext2", help="evaluation text (default wikitext2 test)")
    c.add_argument("--data-dir", default=None, help="local data folder for named sets (default $ATPRUNE_DATA_DIR)")
    c.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    c.add_argument("--nselect", type=int, default=16, help="selection windows for ATP's beta search (default 16)")
    c.add_argument("--select-data", default=None, help="selection text for ATP's beta search (validation split of a "
                   "named set, or a file); default: windows of the calibration source disjoint from the calibration "
                   "samples (needed with image-text calibration)")
    c.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    c.add_argument("--max-trials", type=int, default=6, help="golden-search trials for ATP's beta and, with "
                   "--tune-peers, for each peer's option (default 6)")
    c.add_argument("--tune-peers", action="store_true", help="also run each peer with its main option (owl lam, "
                   "alphapruning eps, dlp alpha) searched on the same selection windows with the same trial budget as "
                   "ATP's beta; both the default and the tuned line are reported")
    c.add_argument("--atp-on-test", action="store_true", help="also run ATP with beta chosen on the evaluation data "
                   "(the reference protocol), marked 'selected on test' and never counted as best")
    c.add_argument("--atp-offset", action="store_true", help="also the column 'atp (attn/mlp offset)': ATP's beta "
                   "and attention/MLP offset searched together within --max-trials (>= 5), on the same selection "
                   "windows")
    c.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")
    _add_device_args(c, offload=False)
    c.add_argument("--out", required=True, help="output folder (compare.json, results.csv, results.md, rates.png)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_blocks_path(c)
    add_vision_args(c)
    _add_quant_args(c)
    a = sub.add_parser("analyze", help="local vs accumulated reconstruction error per block, per allocation")
    _add_common_args(a)
    a.add_argument("--allocations", nargs="+", default=["uniform"], help="e.g. uniform atp:0.01 atp:0.015")
    _add_eval_args(sub.add_parser("eval", help="zero-shot accuracy (lm-eval) of a model or a pruned run folder"))
    _add_bench_args(sub.add_parser("bench", help="sparse inference speed: correctness gate, then dense vs sparse per "
                                   "layer and end to end (CPU, or CUDA with --device cuda)"))
    return parser


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a pruned run folder (atprune prune --out), or an alias/model that "
                   "is pruned here by magnitude to --sparsity; without it, --shapes")
    p.add_argument("--shapes", nargs="+", default=None, metavar="OUTxIN", help="model-free mode: random matrices of "
                   "these shapes, e.g. 11008x4096 4096x11008")
    p.add_argument("--sparsity", nargs="+", type=float, default=None, help="sparsities of the random matrices "
                   "(default 0.7), or the magnitude pruning of a --model that is not a run folder")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 (default), float16")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (the CUDA kernel against cuBLAS: --shapes "
                   "and/or --config)")
    p.add_argument("--config", default=None, metavar="FILE", help="--device cuda: a transformers config JSON (e.g. "
                   "benchmarks/configs/llama2-7b.json) for a random-init model, pruned to a random --sparsity, for "
                   "the end-to-end decode under CUDA graphs (--prompt tokens of context, --gen steps)")
    p.add_argument("--batch", default="1,4,16", help="tokens per call (decode batch), comma list (default 1,4,16)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens for prefill (default 512)")
    p.add_argument("--gen", type=int, default=128, help="greedy decode steps (default 128)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument("--kernel", default="auto", help="auto (default), avx512, avx2, scalar or torch")
    p.add_argument("--repeats", type=int, default=7, help="timed passes per variant, best kept (default 7)")
    p.add_argument("--runs", type=int, default=2, help="end-to-end runs per model, best kept (default 2)")
    p.add_argument("--layers", type=int, default=None, help="distinct random matrices per shape (default: enough "
                   "for twice the last-level cache, at least 4)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the whole record as JSON")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="alias, .gguf file, model folder (a pruned run's --out) or hub id")
    p.add_argument("--tasks", default="all", help="comma list of boolq, piqa, hellaswag, winogrande, arc_easy, "
                   "arc_challenge, openbookqa (default all)")
    p.add_argument("--task-data", default=None, help="folder with the original task files (e.g. shared/data); "
                   "default: lm-eval downloads them from the hub")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task (default: whole split)")
    p.add_argument("--batch-size", type=int, default=16, help="loglikelihood requests per forward pass (default 16)")
    p.add_argument("--dtype", default=None, help="float32 (default on CPU), bfloat16 (default on CUDA), float16")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--out", default=None, help="folder for zeroshot.json (created; an existing file is replaced)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    _add_tokenizer_check(p)


def _run_eval(args) -> int:
    from atprune.export.report import versions
    from atprune.models.gguf_tokenizer import tokenizer_record
    from atprune.models.sources import load_model, resolve_device, resolve_dtype, resolve_model
    from atprune.eval.zeroshot import check_zero_shot, evaluate_zero_shot
    from atprune.eval.zeroshot.run import format_zero_shot

    check_zero_shot(args.tasks, args.task_data, args.limit, args.batch_size)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    source = resolve_model(args.model)
    model, tokenizer = load_model(source, dtype=dtype, device=device,
                                  allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    result = evaluate_zero_shot(model, tokenizer, args.tasks, args.task_data, limit=args.limit,
                                batch_size=args.batch_size)
    result["model"] = {"spec": args.model, "source": source.kind, "path": source.path,
                       "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
    result["model"]["tokenizer_check"], notes = tokenizer_record(tokenizer)
    result["versions"] = versions()
    if notes:
        result["warnings"] = notes
    run_report = Path(source.path) / "report.json" if source.kind == "folder" else None
    if run_report is not None and run_report.is_file():  # a pruned run folder: say what it is
        pruning = json.loads(run_report.read_text()).get("pruning") or {}
        result["model"]["pruning"] = {"spec": pruning.get("spec"), "overall_sparsity": pruning.get("overall_sparsity")}
    if args.out:
        from atprune.export import write_json

        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "zeroshot.json", result)  # atomic; a run folder gets it beside its report
    print(json.dumps(result, indent=2) if args.json else format_zero_shot({"model": result}))
    if args.out:
        print(f"saved: {os.path.abspath(args.out)}/zeroshot.json")
    return 0


def _run_bench(args) -> int:
    from atprune.cli_bench import run_bench

    return run_bench(args)


def _run_options(args, **overrides) -> dict:
    """The :class:`atprune.jobs.options.RunOptions` fields every job shares, from the parsed arguments (a field the
    subcommand has no flag for keeps its default); ``overrides`` replace or add fields."""
    from dataclasses import fields

    from atprune.jobs.options import RunOptions

    options = {f.name: getattr(args, f.name) for f in fields(RunOptions) if hasattr(args, f.name)}
    options["progress"] = not args.quiet
    if getattr(args, "no_eval", False):
        options["eval_data"] = None
    return options | overrides


def _run_search(args) -> int:
    from atprune.jobs.search import SearchJob, run_search_job

    job = SearchJob(**_run_options(args), method=args.method, sparsity=args.sparsity, select_data=args.select_data,
                    select_on_test=args.select_on_test, nselect=args.nselect, strategy=args.strategy,
                    max_trials=args.max_trials, step=args.step, metric=args.metric, resume=args.resume,
                    attn_offset=args.attn_offset, bits_step_search=_bits_step_search(args), beta=args.beta,
                    save_dtype=args.save_dtype, formats=(args.format,), zero_shot=args.zero_shot,
                    task_data=args.task_data, zero_shot_limit=args.zero_shot_limit, **_quant_options(args))
    from atprune.distributed.context import launched

    if launched():
        from atprune.distributed.trials import run_search_distributed

        state, code = _on_ranks(run_search_distributed, job)
        if state is None:  # a failed rank, or not rank 0: nothing to print
            return code
    else:
        state = run_search_job(job)
    mark = "  [SELECTED ON TEST]" if state["selected_on_test"] else ""
    if "bits_step" in state["chosen"]:
        _print_bits_trials(state, args.metric, mark)
        print(f"saved: {os.path.abspath(args.out)} (model, search.json, search.png, report.json)")
        return 0
    offset = "attn_offset" in state["chosen"]
    print(f"{'beta':>8}" + (f" {'offset':>8}" if offset else "") + f" {'metric':>12} {'seconds':>8}{mark}")
    for t in sorted(state["trials"], key=lambda t: (t["beta"], t.get("attn_offset", 0.0))):
        print(f"{t['beta']:>8.4f}" + (f" {t.get('attn_offset', 0.0):>+8.4f}" if offset else "")
              + f" {t['metric']:>12.4f} {t['seconds']:>8.1f}")
    chosen_offset = f", attn_offset {state['chosen']['attn_offset']:+.4f}" if offset else ""
    print(f"chosen beta {state['chosen']['beta']:.4f}{chosen_offset} ({args.metric} {state['chosen']['metric']:.4f}) "
          f"after {len(state['trials'])} trials, {state['search_seconds']:.0f}s")
    final = state.get("final_evaluation")
    if final:
        print(f"final perplexity {final['dataset']} {final['split']}: {final['ppl']:.3f} "
              f"({final['windows']}/{final['windows_total']} windows x {final['seqlen']} tokens){mark}")
    if state.get("zero_shot"):
        from atprune.eval.zeroshot.run import format_zero_shot

        zs = state["zero_shot"]
        print(format_zero_shot({"dense": zs["dense"], "sparse": zs["sparse"]}, zs["gate"]))
    print(f"saved: {os.path.abspath(args.out)} (model, search.json, search.png, report.json)")
    return 0


def _print_bits_trials(state: dict, metric: str, mark: str) -> None:
    """The bits-step search's trials (step, bits per block, metric), the chosen step and the final perplexity."""
    print(f"{'step':>8} {'mean bits':>9} {'metric':>12} {'seconds':>8}  bits per block{mark}")
    for t in sorted(state["trials"], key=lambda t: t["bits_step"]):
        print(f"{t['bits_step']:>8.4f} {t['mean_bits']:>9.3f} {t['metric']:>12.4f} {t['seconds']:>8.1f}  "
              f"{','.join(map(str, t['block_bits']))}")
    c = state["chosen"]
    print(f"chosen bits step {c['bits_step']:.4f} ({metric} {c['metric']:.4f}; bits per block {c['block_bits']}) "
          f"after {len(state['trials'])} trials, {state['search_seconds']:.0f}s")
    final = state.get("final_evaluation")
    if final:
        print(f"final perplexity {final['dataset']} {final['split']}: {final['ppl']:.3f} "
              f"({final['windows']}/{final['windows_total']} windows x {final['seqlen']} tokens){mark}")


def _run_compare(args) -> int:
    from atprune.jobs.compare import CompareJob, run_compare_job

    job = CompareJob(**_run_options(args), methods=args.methods, sparsities=args.sparsities,
                     allocations=args.allocations, nselect=args.nselect, select_data=args.select_data,
                     max_trials=args.max_trials, tune_peers=args.tune_peers, atp_on_test=args.atp_on_test,
                     atp_offset=args.atp_offset,
                     **_quant_options(args))
    from atprune.distributed.context import launched

    if launched():
        from atprune.distributed.cells import run_compare_distributed

        state, code = _on_ranks(run_compare_distributed, job)
        if state is None:  # a failed rank, or not rank 0: nothing to print
            return code
    else:
        run_compare_job(job)
    print((Path(args.out) / "results.md").read_text())
    print(f"saved: {os.path.abspath(args.out)} (compare.json, results.csv, results.md, rates.png)")
    return 0


def _run_analyze(args) -> int:
    from atprune.jobs.analysis import AnalyzeJob, run_analyze_job

    result = run_analyze_job(AnalyzeJob(**_run_options(args), method=args.method, sparsity=args.sparsity,
                                        allocations=args.allocations))
    names = list(result["curves"])
    print("block " + " ".join(f"{n + ' local':>18} {n + ' accum':>18}" for n in names))
    for i in range(len(result["curves"][names[0]]["local"])):
        print(f"{i:>5} " + " ".join(f"{result['curves'][n]['local'][i]:>18.5f} {result['curves'][n]['accumulated'][i]:>18.5f}"
                                     for n in names))
    print(f"saved: {os.path.abspath(args.out)} (analysis.json, analysis.png)")
    return 0


def _run_verify(args) -> int:
    from atprune.export import format_verify_table, verify_checkpoint

    rows = verify_checkpoint(args.dir)
    print(format_verify_table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def _run_recipe(args) -> int:
    from atprune.export.recipe import write_recipe

    print(f"saved: {write_recipe(args.report, args.out, args.modifier, args.blocks_path, args.overwrite)}")
    return 0


def _alloc_options(items: list[str]) -> dict | None:
    """``["M=5", "lam=0.08"]`` -> ``{"M": 5.0, "lam": 0.08}``.

    Raises:
        ConfigError: for an item that is not KEY=NUMBER.
    """
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--alloc-opt takes KEY=NUMBER (e.g. lam=0.08), got {item!r}") from None
        if not sep or not key.strip():
            raise ConfigError(f"--alloc-opt takes KEY=NUMBER (e.g. lam=0.08), got {item!r}")
    return options or None


def _prune_alloc_options(args) -> dict | None:
    """``--alloc-opt`` items with ``--attn-offset D`` added as ``attn_offset`` (the flag wins)."""
    options = _alloc_options(args.alloc_opt) or {}
    if args.attn_offset is not None:
        options["attn_offset"] = args.attn_offset
    return options or None


def _job_from_args(args):
    from atprune.jobs.prune import PruneJob

    sparsity = args.sparsity
    if sparsity is None and args.pattern.strip().lower() in ("unstructured", "none", ""):
        sparsity = 0.5
    return PruneJob(**_run_options(args), method=args.method, sparsity=sparsity, pattern=args.pattern,
                    allocation=args.allocation, beta=args.beta, allocation_options=_prune_alloc_options(args),
                    eval_seqlen=args.eval_seqlen, eval_dense=not args.no_eval_dense, offload=args.offload,
                    offload_activations=args.offload_activations, strict=args.strict, save_dtype=args.save_dtype,
                    formats=(args.format,), zero_shot=args.zero_shot, task_data=args.task_data,
                    zero_shot_limit=args.zero_shot_limit, caption_data=args.caption_data, refine=args.refine,
                    **_quant_options(args))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``atprune`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    args.argv_tail = list(sys.argv[1:] if argv is None else argv)[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_launch(args)
        if args.command in ("prune", "search", "compare") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # an image classifier as --model: the vision jobs (one process only; not under torchrun yet)
            from atprune.vision.cli import run_vision_command

            args.allocation_options = _prune_alloc_options(args) if args.command == "prune" else None
            code = run_vision_command(args)
            if code is not None:
                return code
        if args.command == "search":
            return _run_search(args)
        if args.command == "analyze":
            return _run_analyze(args)
        if args.command == "compare":
            return _run_compare(args)
        if args.command in ("verify", "recipe"):
            return {"verify": _run_verify, "recipe": _run_recipe}[args.command](args)
        if args.command == "eval":
            return _run_eval(args)
        if args.command == "bench":
            return _run_bench(args)
        return _run_prune(args)
    except ConfigError as err:
        print(f"atprune: error: {err}", file=sys.stderr)
        return 2
    except MaskViolation as err:
        print(f"atprune: error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # atprune bench refusing to time a sparse model that gives wrong outputs
        from atprune.sparse.bench import BenchMismatch

        if not isinstance(err, BenchMismatch):
            raise
        print(f"atprune: error: {err}", file=sys.stderr)
        return 1


DISTRIBUTED_COMMANDS = ("prune", "search", "compare")


def _check_launch(args) -> None:
    """Under torchrun (:mod:`atprune.distributed`) ``prune`` (data-parallel calibration), ``search`` (parallel
    trials) and ``compare`` (cells split over the ranks) run on language models; anything else is one line.

    Raises:
        ConfigError: another command, or an image classifier, under a launch of several processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if args.command not in DISTRIBUTED_COMMANDS:
        raise ConfigError(f"`atprune {args.command}` does not run under torchrun; only "
                          f"{', '.join(f'`atprune {c}`' for c in DISTRIBUTED_COMMANDS)} do")
    from atprune.vision.models import is_vision_model

    if is_vision_model(args.model):
        raise ConfigError("image classifiers do not run under torchrun yet; run them in one process")


def _on_ranks(run, job):
    """``run(job)`` as this rank of a torchrun launch: ``(result, 0)``, with result None on ranks other than 0;
    ``(None, 1)`` after printing one line naming the rank and the error (torchrun then stops the others)."""
    from atprune.distributed.context import leave
    from atprune.distributed.prune import rank_failed

    try:
        return run(job), 0
    except Exception as err:
        return None, rank_failed(err)
    finally:
        leave()


def _run_structured(args) -> int:
    from atprune.jobs.structured import StructuredJob, format_structured, run_structured_job

    if args.pattern.strip().lower() not in ("unstructured", "none", "") or args.refine or args.format != "dense":
        raise ConfigError("--structure removes whole channels/heads; it takes no --pattern, --refine or --format")
    report = run_structured_job(StructuredJob(
        **_run_options(args), method=args.method, structure=args.structure,
        sparsity=0.2 if args.sparsity is None else args.sparsity, allocation=args.allocation, beta=args.beta,
        allocation_options=_prune_alloc_options(args), eval_dense=not args.no_eval_dense))
    print(json.dumps(report, indent=2) if args.json else format_structured(report))
    return 0


def _run_prune(args) -> int:
    from atprune.distributed.context import launched
    from atprune.jobs.prune import run_prune_job
    from atprune.export.report import format_table

    if args.structure is not None and launched():
        raise ConfigError("--structure does not run under torchrun yet; run it in one process")
    if args.structure is not None:
        return _run_structured(args)
    if launched():
        from atprune.distributed.prune import run_prune_distributed

        report, code = _on_ranks(lambda job: run_prune_distributed(job, args.dist_reduce), _job_from_args(args))
        if report is None:  # a failed rank, or not rank 0: nothing to print
            return code
    else:
        report = run_prune_job(_job_from_args(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        if report.get("quantization"):
            from atprune.jobs.quantize import format_quant

            print(format_quant(report["quantization"]))
        if args.out:
            print(f"saved: {os.path.abspath(args.out)} (model.safetensors, tokenizer, report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
