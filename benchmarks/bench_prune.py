"""Time one full pruning pass per method, side by side in one process, and report peak memory.

    python benchmarks/bench_prune.py --model smollm2-135m --methods wanda sparsegpt --nsamples 32 --seqlen 512
    python benchmarks/bench_prune.py --config benchmarks/configs/smollm2-135m.json --device cuda   # random init

With ``--config`` the model is built with random weights from an architecture config (the work per block is the
same as for the real weights, so timings transfer; perplexities would not). Calibration windows are random
tokens unless ``--calib-data`` is given. Each method starts from the same weights, after one untimed warm-up
pass of every method on a single short window. Peak memory is the process's
peak resident set size on CPU (reset before each method through /proc/self/clear_refs) and
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

import atprune
from atprune.data import calibration_windows, load_text
from atprune.models.sources import load_model, resolve_device
from atprune.export import write_json


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")


def peak_read(device: torch.device) -> float:
    """Peak memory in GiB since the last reset."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def build(args, device):
    if args.config:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**{k: v for k, v in json.load(open(args.config)).items() if not k.startswith("_")})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval().to(device)
        return model, None, os.path.basename(args.config)
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    return model, tok, args.model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--config", default=None, help="architecture config JSON: random-init model")
    p.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-data", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None, help="also write results here")
    args = p.parse_args()
    device = resolve_device(args.device)
    model, tok, name = build(args, device)
    vocab = model.config.get_text_config().vocab_size
    if args.calib_data and tok is not None:
        windows = calibration_windows(tok, load_text(args.calib_data, "train"), args.nsamples, args.seqlen).windows
    else:
        windows = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    dense = copy.deepcopy(model.state_dict())
    for method in args.methods:  # warm-up (CUDA context, cuSOLVER/cuBLAS handles, allocator) outside the timings
        atprune.prune(model, method=method, sparsity=args.sparsity, calib=windows[:1, : min(args.seqlen, 64)],
                      progress=False)
        model.load_state_dict(dense)
    rows = []
    for method in args.methods:
        model.load_state_dict(dense)
        peak_reset(device)
        t0 = time.perf_counter()
        result = atprune.prune(model, method=method, sparsity=args.sparsity, calib=windows, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows.append({"method": method, "seconds": seconds, "peak_gib": peak_read(device),
                     "overall_sparsity": result.overall_sparsity})
    base = rows[0]["seconds"]
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"model={name} device={dev} dtype={args.dtype} nsamples={args.nsamples} seqlen={args.seqlen} "
          f"torch={torch.__version__} python={platform.python_version()}")
    print(f"{'method':<10} {'seconds':>9} {'x ' + rows[0]['method']:>12} {'peak GiB':>9} {'sparsity':>9}")
    for r in rows:
        print(f"{r['method']:<10} {r['seconds']:>9.1f} {r['seconds'] / base:>12.2f} {r['peak_gib']:>9.2f} "
              f"{r['overall_sparsity']:>9.4f}")
    if args.json:
        write_json(args.json, {"argv": sys.argv, "device": dev, "rows": rows})


if __name__ == "__main__":
    main()
