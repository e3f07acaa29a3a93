"""Wall time, throughput and peak GPU memory of whole pruning passes of image classifiers (DeiT-B, ConvNeXt-B).

    python benchmarks/vision_prune_speed.py --out runs/vision_prune_speed.json
    python benchmarks/vision_prune_speed.py --models deit_base_patch16_224 --methods wanda --nimages 1024 \
        --batch-size 128 --out runs/deit_wanda.json
    python benchmarks/vision_prune_speed.py --device cpu --dtype float32 --nimages 8 \
        --models deit_tiny_patch16_224 convnext_atto --out /tmp/vision_prune_speed.json   # CPU check, seconds

Each model is a timm architecture built from its real config with random weights
(``atprune.vision.load_classifier("timm:NAME", random_init=True)``, i.e. ``timm.create_model(NAME,
pretrained=False)``; nothing is downloaded, and the work per block does not depend on the values), on ``--device``
in ``--dtype``. Calibration: ``--nimages`` random ``N(0, 1)`` images of the model's input size (224 x 224 for both
defaults: the statistics of preprocessed ImageNet images are of that order), made on the device in the model's
dtype, so no host-to-device copy is in the timings.

For every method of ``--methods`` and both allocations (ATP with beta = half its legal maximum for this model's
block sizes at ``--sparsity``, or ``--beta``; and uniform) the dense weights are restored, then one
``atprune.vision.prune_classifier(model, images, ...)`` call is timed: capturing block 0's inputs, the allocator,
every block's statistics, pruning and outputs (``torch.cuda.synchronize`` before the clock stops on CUDA). Before
the timings every method runs once, untimed, on the first ``--warmup-images`` images.

Recorded per model / method / allocation: wall seconds, images per second, peak GPU memory
(``torch.cuda.max_memory_allocated``, reset before each prune; None on CPU), achieved sparsity (parameter-weighted
over the blocks' prunable matrices, from atprune's result) and the count of zeros in those matrices read back from
the model, the rates' range, the model's parameter count, the pruned parameter count and the batch size. On CUDA
also the compute floor of one pass: two forward passes of the blocks' prunable matrices over the calibration images
(statistics, then outputs with the pruned weights), ``2 x 2 x sum over matrices of (rows x in x out)`` FLOPs with
the rows (tokens or pixels per image) counted by hooks on one image, over the matmul rate measured in the same run
(8192^3 matmuls in ``--dtype``). Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

import atprune  # noqa: F401 - first: makes torchvision importable next to a CPU torch (atprune.torchvision_compat)
from atprune.allocation import block_sizes
from atprune.allocators import beta_max
from atprune.api import plan
from atprune.errors import ConfigError
from atprune.export import write_json
from atprune.export.report import _source_commit
from atprune.vision import VisionAdapter, load_classifier, prune_classifier
from atprune.vision.compat import import_timm
from atprune.vision.models import check_model_spec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prune_speed import matmul_tflops  # noqa: E402  (benchmarks/ on sys.path)

DEFAULT_MODELS = ("deit_base_patch16_224", "convnext_base")


def versions(device: torch.device) -> dict:
    """Versions of what decides the numbers, and the device (no gguf / tokenizers: not used here)."""
    import transformers

    timm = import_timm()
    return {"atprune": atprune.__version__, "atprune_commit": _source_commit(),
            "atprune_commit_declared": os.environ.get("ATPRUNE_SOURCE_COMMIT"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "timm": timm.__version__, "transformers": transformers.__version__, "platform": platform.platform(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """``(fn(), wall seconds, peak GiB allocated during the call or None on CPU)``."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out, seconds, peak


def matrix_flops_per_image(adapter: VisionAdapter, image: torch.Tensor) -> int:
    """FLOPs of one forward pass of every block's prunable matrices on one image ``[1, C, H, W]``: for each
    matrix ``2 x rows x in x out`` with ``rows`` the tokens (ViT) or pixels (ConvNeXt) it multiplies, counted by a
    pre-hook on the matrix (its input is ``[..., in]``)."""
    total = [0]
    handles = []
    for block in adapter.blocks:
        for lin in adapter.linears(block).values():
            def hook(layer, args, lin=lin):
                x = args[0]
                total[0] += 2 * (x.numel() // lin.in_features) * lin.in_features * lin.out_features
            handles.append(lin.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            adapter.logits(image)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def zeros_in_blocks(adapter: VisionAdapter) -> tuple[int, int]:
    """``(zeros, weights)`` over the blocks' prunable matrices, read back from the model."""
    zeros = weights = 0
    for block in adapter.blocks:
        for lin in adapter.linears(block).values():
            zeros += int((lin.weight == 0).sum())
            weights += lin.weight.numel()
    return zeros, weights


def bench_model(name: str, args, device: torch.device, dtype: torch.dtype, tflops: float | None,
                save) -> list[dict]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, _, info = load_classifier(f"timm:{name}", random_init=True, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    adapter = VisionAdapter.for_model(model)
    sizes = block_sizes(adapter)
    bmax = beta_max(args.sparsity, sizes)
    beta = bmax / 2 if args.beta is None else args.beta
    for method in args.methods:  # an illegal --beta for this model is a one-line error before any timing
        plan(method, args.sparsity, adapter.num_blocks, allocation="atp", beta=beta, block_sizes=sizes)
    input_size = tuple(info["preprocessing"]["input_size"])
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn((args.nimages, *input_size), generator=gen, device=device, dtype=dtype)
    flops_image = matrix_flops_per_image(adapter, images[:1])
    floor = 2 * flops_image * args.nimages / (tflops * 1e12) if tflops else None
    dense = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    common = {"model": name, "family": adapter.family, "params": params, "blocks": adapter.num_blocks,
              "block_params": sum(sizes), "input_size": list(input_size), "nimages": args.nimages,
              "batch_size": args.batch_size, "sparsity": args.sparsity, "build_s": build_s,
              "matrix_gflops_per_image": flops_image / 1e9, "floor_s": floor}
    print(f"{name}: {params / 1e6:.1f}M parameters, {adapter.num_blocks} blocks ({adapter.family}), "
          f"{sum(sizes) / 1e6:.1f}M prunable, input {input_size}, beta_max {bmax:.5f}, built in {build_s:.1f}s",
          flush=True)
    warm = images[:min(args.warmup_images, args.nimages)]
    for method in args.methods:  # untimed: kernel selection, cuBLAS / cuSOLVER handles, allocator pools
        prune_classifier(model, warm, method=method, sparsity=args.sparsity, batch_size=args.batch_size)
        model.load_state_dict(dense)
    rows = []
    for method in args.methods:
        for allocation, b in (("atp", beta), ("uniform", None)):
            model.load_state_dict(dense)
            result, seconds, peak = timed(lambda: prune_classifier(
                model, images, method=method, sparsity=args.sparsity, allocation=allocation, beta=b,
                batch_size=args.batch_size), device)
            zeros, weights = zeros_in_blocks(adapter)
            rates = result.spec["rates"]
            rows.append(common | {
                "method": method, "allocation": allocation, "beta": b,
                "beta_max": bmax if allocation == "atp" else None,
                "seconds": seconds, "atprune_seconds": result.seconds, "images_per_s": args.nimages / seconds,
                "peak_gib": peak, "x_floor": seconds / floor if floor else None,
                "achieved_sparsity": result.overall_sparsity, "zeros_read_back": zeros / weights,
                "pruned_params": result.pruned_params, "rate_min": min(rates), "rate_max": max(rates)})
            r = rows[-1]
            save(rows)
            peak_s = f"{peak:.2f}" if peak is not None else "-"
            xf = f"{r['x_floor']:.1f}" if r["x_floor"] else "-"
            print(f"  {method:<9} {allocation:<7} {seconds:>8.2f}s {r['images_per_s']:>9.1f} img/s  x floor {xf:>6}  "
                  f"peak {peak_s} GiB  sparsity {r['achieved_sparsity']:.4f}  rates {min(rates):.3f}..{max(rates):.3f}",
                  flush=True)
    del model, images, dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm model names")
    p.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=None, help="ATP's beta (default: half its legal maximum per model)")
    p.add_argument("--nimages", type=int, default=4096, help="calibration images")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (atprune's default)")
    p.add_argument("--warmup-images", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    args = p.parse_args(argv)
    try:
        for n in ("nimages", "batch_size", "warmup_images"):
            if getattr(args, n) < 1:
                raise ConfigError(f"--{n.replace('_', '-')} must be a positive integer, got {getattr(args, n)}")
        for method in args.methods:
            plan(method, args.sparsity, 2)
        for name in args.models:
            check_model_spec(f"timm:{name}", random_init=True)
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is visible (use --device cpu for a check run)")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    tflops = matmul_tflops(device, dtype) if device.type == "cuda" else None
    head = (f"device={versions(device)['device']} dtype={args.dtype} nimages={args.nimages} "
            f"batch={args.batch_size} sparsity={args.sparsity} methods={','.join(args.methods)} "
            + (f"matmul={tflops:.0f} TFLOP/s" if tflops else "matmul=- (CPU: no floor)"))
    print(head, flush=True)
    meta = {"schema": "atprune.bench.vision_prune_speed/1", "argv": sys.argv, "header": head,
            "versions": versions(device), "tflops": tflops}
    done: list[dict] = []

    def save(model_rows: list[dict]) -> None:  # after every prune: a run cut short keeps what it measured
        if args.out:
            write_json(args.out, meta | {"rows": done + model_rows})

    for name in args.models:
        done += bench_model(name, args, device, dtype, tflops, save)
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
