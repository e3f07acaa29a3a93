"""Quick-protocol measurements of issue 17 (CPU; SmolLM2-135M by default, ``--model gemma3-270m`` too): mixed 4:8, Wanda + DSnoT, structured MLP width.

    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/issue17_quick.py --data-dir ../shared/data --out OUT.json \
        --cells nm dsnot structured

One process loads the model once and restores the dense weights before every cell, so all cells share the same
dense weights, the same 32 x 512 calibration windows (WikiText-2 validation, seed 0) and the same evaluation tokens
(the first ``--eval-windows`` windows of 512 tokens of WikiText-2 test). Every cell goes through the public API
(``atprune.prune`` with ``pattern`` / ``refine``; :func:`atprune.jobs.structured.shrink` for the structured cells).
The structured cells also time dense inference of the shrunk model against the unpruned one in the same process
(prefill of ``--prompt`` tokens, then ``--gen`` greedy decode steps with the KV cache; best of ``--repeats``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import atprune
from atprune import data as data_mod
from atprune.allocation import allocate
from atprune.allocators import get_allocator
from atprune.jobs.structured import shrink
from atprune.models.adapter import Adapter

HELD_OUT_BETA = {0.5: 0.0050, 0.6: 0.0065, 0.7: 0.0098}  # docs/results.md quick protocol, golden search, held out


def _timed(model, prompt: torch.Tensor, gen: int) -> tuple[float, float]:
    with torch.inference_mode():
        t = time.perf_counter()
        out = model(prompt, use_cache=True)
        pre = time.perf_counter() - t
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(gen):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return pre, time.perf_counter() - t


def side_by_side(models: dict, prompt: torch.Tensor, gen: int, repeats: int) -> dict:
    """Prefill and decode tokens/s of each model, timed alternately (dense, shrunk, dense, ...) ``repeats`` times,
    best kept, so that both see the same machine load."""
    best = {k: [float("inf"), float("inf")] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            pre, dec = _timed(m, prompt, gen)
            best[k] = [min(best[k][0], pre), min(best[k][1], dec)]
    return {k: {"prefill_tok_s": prompt.shape[1] / p, "decode_tok_s": gen / d} for k, (p, d) in best.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cells", nargs="+", default=["nm", "dsnot", "structured"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--betas", default=None, help="ATP's beta per sparsity as JSON, e.g. '{\"0.5\": 0.0139}' "
                    "(default: SmolLM2's quick-protocol held-out betas); a held-out value, never one chosen on test")
    ap.add_argument("--allocations", nargs="+", default=["uniform", "atp"], help="allocations of the nm / dsnot cells "
                    "(owl: its official defaults)")
    ap.add_argument("--methods", nargs="+", default=["wanda"], help="pruners of the dsnot cells")
    ap.add_argument("--widths-from", default=None, help="speed cell: a record of this script with structured cells; "
                    "models of those per-block MLP widths are timed against the dense one, all interleaved")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    betas = {float(k): v for k, v in json.loads(args.betas).items()} if args.betas else HELD_OUT_BETA
    wiki = Path(args.data_dir) / "wikitext-2-raw-v1"
    model, tok = atprune.load_model(args.model, progress=False)
    model.eval()
    dense_state = copy.deepcopy(model.state_dict())
    calib = data_mod.calibration_windows(tok, data_mod.load_text(str(wiki / "wiki.valid.raw"), "train"),
                                         args.nsamples, args.seqlen, 0)
    evalset = data_mod.eval_set(tok, str(wiki / "wiki.test.raw"), "test")
    record = {"command": " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "platform": platform.platform(), "processor": platform.processor(), "dtype": "float32",
              "calibration": calib.info, "eval_windows": args.eval_windows, "cells": []}

    def ppl(m):
        return atprune.evaluate_perplexity(m, tok, evalset, seqlen=args.seqlen, max_windows=args.eval_windows,
                                           progress=False)["ppl"]

    def save():
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    record["dense_ppl"] = ppl(model)
    save()
    print("dense", record["dense_ppl"], flush=True)

    def cell(name, **kw):
        model.load_state_dict(dense_state)
        t = time.perf_counter()
        res = atprune.prune(model, tok, calib=calib, progress=False, **kw)
        entry = {"cell": name, **{k: v for k, v in kw.items()}, "ppl": ppl(model), "seconds": time.perf_counter() - t,
                 "overall_sparsity": res.overall_sparsity, "block_n": res.spec.get("block_n")}
        record["cells"].append(entry)
        save()
        print(entry, flush=True)

    if "nm" in args.cells:
        for alloc in args.allocations:
            cell("mixed 4:8", method="wanda", sparsity=None, pattern="4:8", allocation=alloc,
                 **({"beta": betas[0.5]} if alloc == "atp" else {}))
    if "dsnot" in args.cells:
        for method in args.methods:
            for s in (0.6, 0.7):
                for alloc in args.allocations:
                    beta = betas[s] if alloc == "atp" else None
                    for refine in (None, "dsnot"):
                        cell(f"{method}+dsnot" if refine else method, method=method, sparsity=s, allocation=alloc,
                             beta=beta, refine=refine)
    if "speed" in args.cells:  # speed depends on the shapes only: cut the first channels to the recorded widths
        from atprune.models.shrink import shrink_mlp

        prompt = calib.windows[:1, : args.prompt]
        model.load_state_dict(dense_state)
        models = {"dense": model}
        for c in json.loads(Path(args.widths_from).read_text())["cells"]:
            m = copy.deepcopy(model)
            for block, width in zip(Adapter.for_model(m).blocks, c["widths"]):
                shrink_mlp(block, torch.arange(width))
            models[f"{c['allocation']} {c['sparsity']:g}"] = m
        record["speed"] = side_by_side(models, prompt, args.gen, args.repeats)
        record["speed_params"] = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        save()
        print(record["speed"], flush=True)
    if "structured" in args.cells:
        prompt = calib.windows[:1, : args.prompt]
        model.load_state_dict(dense_state)
        params = sum(p.numel() for p in model.parameters())
        for s in (0.2, 0.3, 0.5):
            for alloc in args.allocations:
                m = copy.deepcopy(model)
                m.load_state_dict(dense_state)
                adapter = Adapter.for_model(m)
                beta = None
                if alloc == "atp":  # not tuned: half the legal maximum for S and the model's block count
                    from atprune.allocators.atp import beta_max

                    beta = round(beta_max(s, adapter.num_blocks) / 2, 5)
                allocator = get_allocator(alloc, beta=beta)
                rates = allocate(allocator, s, adapter, windows=calib.windows).rates  # OWL: dense statistics
                t = time.perf_counter()
                blocks = shrink(m, calib.windows, "wanda-sp", "channels", rates)
                entry = {"cell": "structured mlp", "method": "wanda-sp", "sparsity": s, "allocation": alloc,
                         "beta": beta, "ppl": ppl(m), "seconds": time.perf_counter() - t,
                         "params": sum(p.numel() for p in m.parameters()), "dense_params": params,
                         "widths": [b["intermediate_size"] for b in blocks],
                         "speed": side_by_side({"dense": model, "shrunk": m}, prompt, args.gen, args.repeats)}
                record["cells"].append(entry)
                save()
                print({k: v for k, v in entry.items() if k != "widths"}, flush=True)
                del m
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
