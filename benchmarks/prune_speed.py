"""Wall time, throughput and peak GPU memory of whole pruning passes on big model shapes, against the compute floor.

    python benchmarks/prune_speed.py --config benchmarks/configs/llama2-7b.json --methods wanda sparsegpt \
        --search-trials 6
    python benchmarks/prune_speed.py --config benchmarks/configs/llama2-70b.json --blocks 8 --offload \
        --offload-activations --methods wanda sparsegpt

The model is built with random weights from a real architecture config (no weights can be downloaded on the
benchmark machine; the work per block does not depend on the values) directly on the GPU, in ``--dtype``
(default bfloat16). Calibration: ``--nsamples`` x ``--seqlen`` random tokens (default 128 x 2048, the standard
protocol). For each method the dense weights are restored, then one full ``atprune.prune`` call is timed
(capturing block-0 inputs included), after an untimed warm-up of every method on one short window.

The compute floor of one pass is two forward passes of every block over the calibration tokens (statistics, then
outputs with the pruned weights): ``2 x 2 x block parameters x tokens`` FLOPs over the bf16 matmul rate measured in
the same run (8192^3 matmuls). ``--search-trials N`` also times a full ATP beta search with Wanda at sparsity 0.7
(N golden-section trials, each a prune pass plus the perplexity of ``--nselect`` selection windows), the final prune
with the chosen beta, and a perplexity evaluation over ``--eval-windows`` windows (166 x 2048 tokens is the size of
WikiText-2 test under the LLaMA tokenizer). Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

import atprune
from atprune.eval.perplexity import perplexity
from atprune.models.adapter import Adapter
from atprune.engine.placement import Placement
from atprune.jobs.search import TrialRunner
from atprune.export import write_json


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def build(config_path: str, blocks: int | None, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in json.load(open(config_path)).items() if not k.startswith("_")}
    if blocks:
        raw["num_hidden_layers"] = blocks
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def timed(fn, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="architecture config JSON (benchmarks/configs/)")
    p.add_argument("--blocks", type=int, default=None, help="build only this many blocks (70B shape)")
    p.add_argument("--methods", nargs="*", default=["wanda", "sparsegpt"], help="passes to time (none: only --search-trials)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--offload-activations", action="store_true")
    p.add_argument("--search-trials", type=int, default=0, help="also time an ATP search (Wanda, S=0.7)")
    p.add_argument("--nselect", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=166)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("prune_speed.py needs a CUDA device")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    tflops = matmul_tflops(device, dtype)
    model = build(args.config, args.blocks, dtype, device)
    adapter = Adapter.for_model(model)
    placement = Placement(device, offload=args.offload, offload_activations=args.offload_activations)
    placement.prepare(model, adapter.blocks)
    linears = {f"{i}.{n}": lin for i, b in enumerate(adapter.blocks) for n, lin in adapter.linears(b).items()}
    block_params = sum(lin.weight.numel() for lin in linears.values())
    dense = {n: lin.weight.detach().to("cpu", copy=True) for n, lin in linears.items()}

    def restore():
        with torch.no_grad():
            for n, lin in linears.items():
                lin.weight.copy_(dense[n])

    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=gen)
    tokens = windows.numel()
    floor = 2 * 2 * block_params * tokens / (tflops * 1e12)
    for method in args.methods:  # warm-up outside the timings
        atprune.prune(model, method=method, sparsity=args.sparsity, calib=windows[:1, :64], placement=placement,
                      progress=False)
        restore()
    rows = []
    for method in args.methods:
        restore()
        result, seconds, peak = timed(lambda: atprune.prune(model, method=method, sparsity=args.sparsity, calib=windows,
                                                            batch_size=batch_size, placement=placement,
                                                            progress=False), device)
        rows.append({"what": f"{method} pass", "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "peak_gib": peak, "x_floor": seconds / floor, "batch_size": result.calibration["batch_size"],
                     "overall_sparsity": result.overall_sparsity})
    if args.search_trials and not args.offload:
        restore()
        select = torch.randint(0, vocab, (args.nselect, args.seqlen), generator=gen)
        evaluation = torch.randint(0, vocab, (args.eval_windows * args.seqlen,), generator=gen)

        def search():
            runner = TrialRunner(model, windows, select, batch_size=batch_size)
            trials, beta, _ = runner.search("wanda", 0.7, max_trials=args.search_trials)
            runner.prune("wanda", 0.7, "atp", beta)
            ppl = perplexity(model, evaluation, args.seqlen, batch_size=runner.batch_size)
            return len(trials), beta, ppl["windows"]

        (ntrials, beta, nwin), seconds, peak = timed(search, device)
        rows.append({"what": f"ATP search wanda 0.7 ({ntrials} trials + final prune + {nwin}-window ppl)",
                     "seconds": seconds, "tokens_per_s": None, "peak_gib": peak, "x_floor": None, "beta": beta})
    name = args.config.rsplit("/", 1)[-1].removesuffix(".json") + (f" ({args.blocks} blocks)" if args.blocks else "")
    head = (f"model={name} block_params={block_params / 1e9:.2f}B gpu={torch.cuda.get_device_name(device)} "
            f"dtype={args.dtype} calib={args.nsamples}x{args.seqlen} offload={args.offload} "
            f"offload_activations={args.offload_activations} matmul={tflops:.0f} TFLOP/s floor={floor:.1f}s "
            f"torch={torch.__version__} python={platform.python_version()}")
    print(head)
    print(f"{'what':<60} {'seconds':>8} {'tokens/s':>10} {'x floor':>8} {'peak GiB':>9}")
    for r in rows:
        tps = f"{r['tokens_per_s']:>10.0f}" if r["tokens_per_s"] else f"{'':>10}"
        xf = f"{r['x_floor']:>8.2f}" if r["x_floor"] else f"{'':>8}"
        print(f"{r['what']:<60} {r['seconds']:>8.1f} {tps} {xf} {r['peak_gib']:>9.2f}")
    if args.json:
        write_json(args.json, {"argv": sys.argv, "header": head, "tflops": tflops, "floor_s": floor, "rows": rows})


if __name__ == "__main__":
    main()
