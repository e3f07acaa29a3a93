"""Where the time of one pruning pass goes: capture of block-0 inputs, statistics passes, the pruner itself and
output passes, each summed over all blocks (CUDA-synchronised wall time).

    python benchmarks/pass_breakdown.py --config benchmarks/configs/llama2-7b.json --method wanda
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import atprune
import atprune.models.adapter
import atprune.api
import atprune.engine.passes as engine
from atprune.pruners import get_pruner
from prune_speed import build  # noqa: E402  (run from benchmarks/ or with it on sys.path)

TOTALS: dict[str, float] = collections.defaultdict(float)
ACTIVE: list[str] = []


def timed(name, fn):
    """``fn`` timed into TOTALS[name], unless called inside another timed function."""

    def wrapper(*a, **k):
        if ACTIVE:
            return fn(*a, **k)
        ACTIVE.append(name)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            torch.cuda.synchronize()
            TOTALS[name] += time.perf_counter() - t0
            ACTIVE.pop()

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--blocks", type=int, default=None)
    p.add_argument("--method", default="wanda")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", default="auto")
    args = p.parse_args()
    model = build(args.config, args.blocks, torch.bfloat16, torch.device("cuda"))
    windows = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen))
    atprune.prune(model, method=args.method, sparsity=0.5, calib=windows[:1, :64], progress=False)  # warm-up
    pruner = get_pruner(args.method)
    pruner.prune = timed("pruner", pruner.prune)
    atprune.api.get_pruner = lambda name, **kw: pruner
    engine.first_block_inputs = timed("capture", engine.first_block_inputs)
    engine.collect_stats = timed("statistics pass", engine.collect_stats)
    orig_run = engine.run_block
    engine.run_block = timed("output pass", orig_run)
    t0 = time.perf_counter()
    bs = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    result = atprune.prune(model, method=args.method, sparsity=0.5, calib=windows, batch_size=bs, progress=False)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    print(f"{args.method}: total {total:.2f}s, batch size {result.calibration['batch_size']}")
    for k, v in TOTALS.items():
        print(f"  {k:<20} {v:8.2f}s")
    shared = atprune.api.first_block_inputs(atprune.models.adapter.Adapter.for_model(model), windows[:2], 2).shared[2]
    print("block kwargs:", {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__) for k, v in shared.items()})


if __name__ == "__main__":
    main()
