"""``atprune bench``: the command-line side (argument checks, model loading, printing). The measuring is in
:mod:`atprune.sparse.bench` and :mod:`atprune.sparse.bench_model`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from atprune.errors import ConfigError, check_positive_int


def _check(args) -> None:
    from atprune.sparse import kernels
    from atprune.sparse.bench import parse_batches, parse_dtype, parse_shapes

    if args.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda needs a CUDA GPU, and torch sees none here")
        if args.model is not None:
            raise ConfigError("--device cuda takes --shapes and/or --config (a random-init model for the end-to-end "
                              "decode), not --model")
        if args.shapes is None and args.config is None:
            raise ConfigError("--device cuda: give --shapes OUTxIN ... and/or --config MODEL_CONFIG.json")
        if args.config is not None and not Path(args.config).is_file():
            raise ConfigError(f"--config {args.config} is not a file")
    elif args.config is not None:
        raise ConfigError("--config (a random-init model) is for --device cuda")
    elif (args.model is None) == (args.shapes is None):
        raise ConfigError("give either --model (a pruned run folder or a model to prune) or --shapes OUTxIN ...")
    for name in ("threads", "layers"):
        check_positive_int(f"--{name}", getattr(args, name), optional=True)
    for name in ("repeats", "runs", "prompt"):
        check_positive_int(f"--{name}", getattr(args, name))
    if args.gen < 2:
        raise ConfigError(f"--gen must be at least 2, got {args.gen}")
    for s in args.sparsity or []:
        if not 0 <= s < 1:
            raise ConfigError(f"--sparsity must be in [0, 1), got {s}")
    args.batches = parse_batches(args.batch)
    args.torch_dtype = parse_dtype(args.dtype or "bfloat16")
    args.shape_list = parse_shapes(args.shapes) if args.shapes else None
    if args.device == "cpu":
        kernels.resolve_kernel(args.kernel)  # a kernel this CPU cannot run: one line, before any work
    elif args.torch_dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError("--device cuda: the CUDA kernel takes --dtype bfloat16 or float16")
    elif max(args.batches) > 16:
        raise ConfigError(f"--device cuda: the CUDA kernel takes 1 to 16 tokens per call, got --batch {args.batch}")
    if args.json:
        folder = Path(args.json).resolve().parent
        if not folder.is_dir():
            raise ConfigError(f"--json folder {folder} does not exist")


def _load(args):
    """(dense pruned model, tokenizer, sparse model or None, description)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atprune.sparse import load_sparse
    from atprune.sparse.load import check_run_folder

    path = Path(args.model)
    if path.is_dir() and (path / "report.json").is_file():
        check_run_folder(path)
        if args.sparsity:
            raise ConfigError("--sparsity is for random matrices or a model pruned here; a run folder is already "
                              "pruned")
        dense = AutoModelForCausalLM.from_pretrained(path, dtype=args.torch_dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        sparse = load_sparse(path, dtype=args.torch_dtype, kernel=args.kernel)
        return dense, tokenizer, sparse, f"run folder {path}"
    if not args.sparsity or len(args.sparsity) != 1:
        raise ConfigError(f"{args.model} is not a run folder (no report.json): give one --sparsity to prune it by "
                          "magnitude here, or prune it first with atprune prune --out")
    from atprune.api import prune
    from atprune.models.sources import load_model

    model, tokenizer = load_model(args.model, dtype=args.torch_dtype, progress=False)
    prune(model, tokenizer, method="magnitude", sparsity=args.sparsity[0], progress=False)
    return model, tokenizer, None, f"{args.model} pruned here by magnitude to {args.sparsity[0]}"


def _print_model(record: dict) -> None:
    print(f"{'layer shape':>12} {'n':>3} {'b':>3} {'sparsity':>8} {'torch us':>9} {'dense us':>9} {'sparse us':>9} "
          f"{'speedup':>7}")
    for r in record["layers"]:
        print(f"{r['shape'][0]:>6}x{r['shape'][1]:<5} {r['layers']:>3} {r['batch']:>3} {r['sparsity']:>8.3f} "
              f"{r['torch_us']:>9.1f} {r.get('dense_us', float('nan')):>9.1f} {r['sparse_us']:>9.1f} "
              f"{r['speedup']:>6.2f}x")
    print(f"{'batch':>5} {'prefill tok/s dense':>20} {'sparse':>8} {'decode tok/s dense':>19} {'sparse':>8} "
          f"{'speedup':>7} {'outside linear':>14} {'predicted':>9} {'same tokens':>11}")
    for r in record["end_to_end"]:
        share = r.get("outside_linear_share")
        pred = r.get("predicted_decode_speedup")
        print(f"{r['batch']:>5} {r['dense_prefill_tokens_per_s']:>20.1f} {r['sparse_prefill_tokens_per_s']:>8.1f} "
              f"{r['dense_decode_tokens_per_s']:>19.2f} {r['sparse_decode_tokens_per_s']:>8.2f} "
              f"{r['decode_speedup']:>6.2f}x {'' if share is None else f'{share:.0%}':>14} "
              f"{'' if pred is None else f'{pred:.2f}x':>9} {r['same_greedy_tokens']:>11.0%}")


def run_bench(args) -> int:
    """Run ``atprune bench`` from parsed arguments; returns the exit code (0)."""
    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from atprune.sparse.bench import bench_shapes, format_row, header, write_record
    from atprune.sparse.bench_model import bench_model

    say = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.device == "cuda":
        record = _run_cuda(args, say)
    elif args.shape_list:
        record = bench_shapes(args.shape_list, args.sparsity or [0.7], args.torch_dtype, args.batches,
                              kernel=args.kernel, repeats=args.repeats, layers=args.layers, progress=lambda m: None)
        say(header(record))
        say("per layer: best of interleaved passes over distinct layers (us per layer call: each layer's fastest call); speedup over the faster "
            "of torch F.linear and the own dense kernel")
        for row in record["results"]:
            say(format_row(row))
    else:
        dense, tokenizer, sparse, source = _load(args)
        record = bench_model(dense, tokenizer, args.torch_dtype, args.batches, prompt=args.prompt, gen=args.gen,
                             kernel=args.kernel, repeats=args.repeats, runs=args.runs, sparse=sparse, source=source,
                             progress=say)
        say(header(record))
        _print_model(record)
    record["command"] = "atprune bench " + " ".join(args.argv_tail) if getattr(args, "argv_tail", None) else None
    if args.json:
        write_record(args.json, record)
        say(f"saved: {os.path.abspath(args.json)}")
    return 0


def _run_cuda(args, say) -> dict:
    """``--device cuda``: per-layer tables (``--shapes``) and the end-to-end decode (``--config``)."""
    from atprune.sparse import bench_cuda, cuda
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                            text=True).stdout.strip() or None
    record = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "dtype": str(args.torch_dtype).removeprefix("torch."), "commit": commit,
              "copy_roof_tbps": bench_cuda.copy_roof()}
    cuda.extension()  # compile (or load) before anything is timed
    say(f"{record['device']}  {record['dtype']}  copy roof {record['copy_roof_tbps']:.2f} TB/s (read + write)")
    if args.shape_list:
        rows = bench_cuda.per_layer(args.shape_list, args.sparsity or [0.7], args.batches, args.torch_dtype,
                                    repeats=max(args.repeats, 20))
        record["layers"] = rows
        say("per layer, CUDA graphs, distinct weights cycled past L2: us per call; TB/s of the bytes each must read")
        say(f"{'shape':>12} {'sparsity':>8} {'b':>3} {'cuBLAS us':>9} {'sparse us':>9} {'speedup':>7} "
            f"{'cuBLAS TB/s':>11} {'sparse TB/s':>11} {'B/weight':>8}")
        for r in rows:
            say(f"{r['shape'][0]:>6}x{r['shape'][1]:<5} {r['sparsity']:>8.2f} {r['batch']:>3} {r['dense_us']:>9.1f} "
                f"{r['sparse_us']:>9.1f} {r['speedup']:>6.2f}x {r['dense_tbps']:>11.2f} {r['sparse_tbps']:>11.2f} "
                f"{r['bytes_per_weight']:>8.3f}")
    if args.config:
        sparsity = (args.sparsity or [0.7])[0]
        dense = bench_cuda.random_model(args.config, args.torch_dtype)
        pruned = bench_cuda.prune_linears_randomly(dense, sparsity)
        e2e = bench_cuda.end_to_end(dense, args.batches, context=args.prompt, steps=args.gen, runs=args.runs)
        e2e.update({"config": args.config, "sparsity": sparsity, "layers_pruned": pruned})
        record["end_to_end"] = e2e
        say(f"end to end: {args.config}, random weights, {pruned} decoder linears at random sparsity {sparsity}, "
            f"context {args.prompt}, decode step in a CUDA graph; weights on GPU: dense "
            f"{e2e['gpu_weight_bytes_dense'] / 2**30:.2f} GiB, sparse {e2e['gpu_weight_bytes_sparse'] / 2**30:.2f} GiB")
        say(f"{'batch':>5} {'dense tok/s':>11} {'sparse tok/s':>12} {'speedup':>7} {'logits rel diff':>15}")
        for r in e2e["rows"]:
            say(f"{r['batch']:>5} {r['dense_tok_s']:>11.1f} {r['sparse_tok_s']:>12.1f} {r['speedup']:>6.2f}x "
                f"{r['logits_rel_diff']:>15.4f}")
    return record
