"""Pruning + quantization on one model in one process: the cells of docs/quantization.md (quick protocol).

    python benchmarks/quant_quick.py --model smollm2-135m --calib-data wiki.valid.raw --eval-data wiki.test.raw \
        --nsamples 16 --seqlen 256 --eval-windows 12 --group-size 64 --threads 1 --out docs/results/quant_quick_smollm2.json

The model is loaded once; the calibration windows and the evaluation tokens are drawn once; each cell restores the
dense weights, prunes (and quantizes) with :func:`atprune.prune` exactly as ``atprune prune`` does, and measures
WikiText-2 perplexity on the first ``--eval-windows`` test windows. The record is rewritten after every cell.
"""

from __future__ import annotations

import argparse
import time

import torch

from atprune.api import evaluate_perplexity, prune
from atprune.data import calibration_windows, eval_set, load_text
from atprune.export import write_json
from atprune.models.adapter import Adapter
from atprune.models.sources import load_model
from atprune.quant import make_spec

# name, method, sparsity, allocation, beta, quantization options (None: none)
CELLS = [
    ("dense w4 rtn", "magnitude", 0.0, "uniform", None, {"quantize": "w4", "method": "rtn"}),
    ("dense w4 gptq", "magnitude", 0.0, "uniform", None, {"quantize": "w4"}),
    ("wanda 50%", "wanda", 0.5, "uniform", None, None),
    ("wanda 50% + w4 gptq", "wanda", 0.5, "uniform", None, {"quantize": "w4"}),
    ("wanda 50% atp + w4 gptq", "wanda", 0.5, "atp", 0.005, {"quantize": "w4"}),
    ("sparsegpt 50%", "sparsegpt", 0.5, "uniform", None, None),
    ("sparsegpt 50% + w4 joint", "sparsegpt", 0.5, "uniform", None, {"quantize": "w4"}),
    ("dense w3 gptq", "magnitude", 0.0, "uniform", None, {"quantize": "w3"}),
    ("dense mixed mean 3 atp bits", "magnitude", 0.0, "uniform", None,
     {"quantize": "w3", "bits_allocation": "atp", "bits_mean": 3.0, "bits_step": 0.05}),
    ("wanda 60%", "wanda", 0.6, "uniform", None, None),
    ("wanda 60% + w4 gptq", "wanda", 0.6, "uniform", None, {"quantize": "w4"}),
    ("wanda 60% atp + w4 gptq", "wanda", 0.6, "atp", 0.0065, {"quantize": "w4"}),
    ("sparsegpt 60%", "sparsegpt", 0.6, "uniform", None, None),
    ("sparsegpt 60% + w4 joint", "sparsegpt", 0.6, "uniform", None, {"quantize": "w4"}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-data", required=True)
    p.add_argument("--eval-data", required=True)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--cells", nargs="*", default=None, help="names of the cells to run (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: GPTQ's column loop is many small "
                   "ops, which several threads waiting on each other slow down many times on a loaded CPU)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype=torch.float32, device="cpu", progress=False)
    adapter = Adapter.for_model(model)
    calib = calibration_windows(tok, load_text(args.calib_data, "train"), args.nsamples, args.seqlen, 0)
    evalset = eval_set(tok, args.eval_data, "test")
    dense = {n: t.detach().clone() for n, t in model.state_dict().items()}

    def ppl() -> dict:
        return evaluate_perplexity(model, tok, evalset, seqlen=args.seqlen, max_windows=args.eval_windows,
                                   progress=False)

    record = {"config": vars(args) | {"dtype": "float32", "device": "cpu", "threads": torch.get_num_threads()},
              "calibration": calib.info, "dense": ppl(), "cells": []}
    write_json(args.out, record)
    for name, method, sparsity, allocation, beta, q in CELLS:
        if args.cells and name not in args.cells:
            continue
        model.load_state_dict(dense)
        spec = make_spec(q["quantize"], group_size=args.group_size,
                         **{k: v for k, v in q.items() if k != "quantize"}) if q else None
        t0 = time.perf_counter()
        result = prune(model, method=method, sparsity=sparsity, allocation=allocation, beta=beta, calib=calib,
                       progress=False, quantize=spec)
        seconds = time.perf_counter() - t0
        ev = ppl()
        cell = {"name": name, "method": method, "sparsity": sparsity, "allocation": allocation, "beta": beta,
                "overall_zeros": result.overall_sparsity, "ppl": ev["ppl"], "windows": ev["windows"],
                "prune_seconds": seconds, "quantization": result.quantization or None}
        if spec is not None:
            from atprune.jobs.quantize import quant_section

            cell["sizes"] = quant_section(result, model, torch.float32)["sizes"]["bits_per_weight"]
        record["cells"].append(cell)
        write_json(args.out, record)
        print(f"{name:32s} ppl {ev['ppl']:9.3f}  zeros {result.overall_sparsity:.4f}  {seconds:6.1f}s", flush=True)
    print(f"dense ppl {record['dense']['ppl']:.3f} ({record['dense']['windows']} windows)")


if __name__ == "__main__":
    main()
