"""Would fusing the element-wise work of a decoder block pay for itself? Eager vs ``torch.compile`` forward of one
block of a big-model shape, against the block's matmul floor, and the compile time.

    python benchmarks/block_compile.py --config benchmarks/configs/llama2-7b.json --batch 16 --seqlen 2048

Builds a two-block model (random init) from the config on the GPU, captures block 0's inputs with the engine, and
times (CUDA-synchronised, median of ``--reps``) the eager forward of block 0, the first call of
``torch.compile(block, dynamic=False)`` (compilation included), its later calls, and the first call of block 1
compiled the same way (same code: reused or recompiled). The floor is ``2 x block parameters x tokens`` FLOPs over
the bf16 matmul rate measured in the same run. Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from atprune.engine.passes import first_block_inputs
from atprune.models.adapter import Adapter
from prune_speed import build, matmul_tflops  # noqa: E402  (run with benchmarks/ on sys.path)


def clock(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    tflops = matmul_tflops(device, dtype)
    model = build(args.config, 2, dtype, device)
    adapter = Adapter.for_model(model)
    windows = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen))
    inputs = first_block_inputs(adapter, windows, args.batch)
    x, kwargs = inputs.hidden[0], inputs.kwargs(0, args.batch)
    block0, block1 = adapter.blocks[0], adapter.blocks[1]
    params = sum(lin.weight.numel() for lin in adapter.linears(block0).values())
    floor = 2 * params * x.shape[0] * x.shape[1] / (tflops * 1e12)
    with torch.no_grad():
        for _ in range(3):
            ref = block0(x, **kwargs)
        eager = statistics.median(clock(lambda: block0(x, **kwargs)) for _ in range(args.reps))
        compiled0 = torch.compile(block0, dynamic=False)
        first = clock(lambda: compiled0(x, **kwargs))
        fused = statistics.median(clock(lambda: compiled0(x, **kwargs)) for _ in range(args.reps))
        out = compiled0(x, **kwargs)
        compiled1 = torch.compile(block1, dynamic=False)
        first1 = clock(lambda: compiled1(x, **kwargs))
    ref = ref[0] if isinstance(ref, tuple) else ref
    out = out[0] if isinstance(out, tuple) else out
    diff = (out.float() - ref.float()).abs().max().item()
    print(f"config={args.config} tokens={args.batch}x{args.seqlen} gpu={torch.cuda.get_device_name()} "
          f"torch={torch.__version__} matmul={tflops:.0f} TFLOP/s")
    print(f"block matmul floor {1e3 * floor:.1f} ms | eager {1e3 * eager:.1f} ms ({eager / floor:.2f}x) | "
          f"compiled {1e3 * fused:.1f} ms ({fused / floor:.2f}x) | first compiled call {first:.1f} s | "
          f"first call of block 1 compiled {first1:.2f} s | max |compiled - eager| {diff:.3g}")


if __name__ == "__main__":
    main()
