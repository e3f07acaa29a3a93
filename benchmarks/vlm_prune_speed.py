"""Wall time, throughput and peak GPU memory of whole pruning passes of a vision-language model (LLaVA-1.5-7B shape),
text-only calibration, against the compute floor; with the proof that only the language blocks changed.

    python benchmarks/vlm_prune_speed.py --out runs/vlm_prune_speed.json
    python benchmarks/vlm_prune_speed.py --methods wanda --nsamples 64 --out runs/vlm_wanda.json
    python benchmarks/vlm_prune_speed.py --device cpu --dtype float32 --tiny --text-layers 2 --vision-layers 1 \
        --nsamples 2 --seqlen 64 --out /tmp/vlm_prune_speed.json   # CPU check, seconds

The model is ``LlavaForConditionalGeneration`` built from ``--config`` (default
``benchmarks/configs/llava-1.5-7b.json``, the fields of llava-hf/llava-1.5-7b-hf's config.json: CLIP ViT-L/14-336
vision tower, 2-layer GELU projector, LLaMA-2-7B language model, vocabulary 32064; 7.06B parameters) with random
weights (nothing can be downloaded on the benchmark machine; the work per block does not depend on the values),
directly on ``--device`` in ``--dtype`` (default bfloat16). ``--text-layers`` / ``--vision-layers`` keep only that
many blocks; ``--tiny`` also shrinks the widths (language 64 wide, 4 heads, MLP 128; vision 32 wide, 2 heads, MLP
64) for a CPU check.

Calibration is text only, as ``atprune prune`` on a vision-language folder with ``--calib-data c4``: ``--nsamples``
x ``--seqlen`` random token windows (default 128 x 2048, the standard protocol) drawn below the image token id
(32000), so no window holds an image placeholder. For each of ``--methods`` (default Wanda and SparseGPT) at
``--sparsity`` 0.5 with ATP ``--beta`` 0.005 (the example of the vision-language issue), the dense language blocks
are restored, then one ``atprune.prune(model, calib=windows, ...)`` call is timed (the adapter finds
``model.model.language_model.layers``; capturing block-0 inputs included; ``torch.cuda.synchronize`` before the clock
stops). Before the timings every method runs once, untimed, on a copy of the architecture with two language
blocks and one vision layer (the same matrix shapes, so the same kernels; a second 7B model is not needed) on the
first batch of windows (``--batch-size``, or 16 for ``auto``).

Recorded per method: wall seconds, tokens per second, peak GPU memory (``torch.cuda.max_memory_allocated``, reset
before each prune), the batch size atprune chose, achieved sparsity of the language blocks (atprune's, and the zeros
of every ``nn.Linear`` under the language blocks counted from the model's module tree), the rates' range, and for
each part that must stay dense (vision tower, projector, token embeddings, lm_head; see
:mod:`atprune.multimodal.dense`) its sha256 before and after and its zero count before and after. On CUDA also the
compute floor: two forward passes of every language block over the calibration tokens,
``2 x 2 x block parameters x tokens`` FLOPs, over the bf16 matmul rate measured in the same run (8192^3 matmuls), as
``benchmarks/prune_speed.py`` does. The exit status is 1 when a dense part changed. Timings are never asserted
in tests; tests/test_bench_vlm.py checks on the ``--tiny`` model that text-only pruning changes only the language
blocks' matrices.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import atprune  # first: makes torchvision importable next to a CPU torch (atprune.torchvision_compat)
from atprune.api import plan
from atprune.errors import ConfigError
from atprune.export import write_json
from atprune.export.report import _source_commit
from atprune.models.adapter import Adapter
from atprune.multimodal.dense import DenseParts
from atprune.multimodal.layout import LAYOUTS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prune_speed import matmul_tflops  # noqa: E402  (benchmarks/ on sys.path)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "llava-1.5-7b.json"
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 32}


def versions(device: torch.device) -> dict:
    """Versions of what decides the numbers, and the device (no gguf / tokenizers: not used here)."""
    import transformers

    return {"atprune": atprune.__version__, "atprune_commit": _source_commit(),
            "atprune_commit_declared": os.environ.get("ATPRUNE_SOURCE_COMMIT"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}


def read_config(path: str | Path, text_layers: int | None = None, vision_layers: int | None = None,
                tiny: bool = False) -> dict:
    """The config file as a dict (keys starting with ``_comment`` dropped), with the language / vision block counts
    replaced when given, ``--tiny``'s widths, and the language model's KV cache off."""
    raw = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_comment")}
    text, vision = dict(raw["text_config"]), dict(raw["vision_config"])
    if tiny:
        text |= TINY_TEXT
        vision |= TINY_VISION
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    if vision_layers is not None:
        vision["num_hidden_layers"] = vision_layers
    text["use_cache"] = False
    return raw | {"text_config": text, "vision_config": vision}


def build(raw: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``LlavaForConditionalGeneration`` (through ``AutoModelForImageTextToText``, as atprune loads a folder) of the
    config dict ``raw``, random weights (seed 0), made on ``device`` in ``dtype``, eval mode."""
    from transformers import AutoModelForImageTextToText, LlavaConfig

    config = LlavaConfig.from_dict(copy.deepcopy(raw))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model.eval()


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


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


def language_zeros(model: nn.Module) -> tuple[int, int]:
    """``(zeros, weights)`` over every ``nn.Linear`` under the language blocks' path of the model's layout, found
    by walking module names (not through atprune's adapter)."""
    prefix = LAYOUTS[type(model).__name__].blocks + "."
    zeros = weights = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(prefix):
            zeros += int((module.weight == 0).sum())
            weights += module.weight.numel()
    return zeros, weights


def dense_zeros(parts: DenseParts) -> dict[str, int]:
    params = dict(parts.model.named_parameters())
    return {part: sum(int((params[n] == 0).sum()) for n in names) for part, names in parts.names.items()}


def token_windows(config, nsamples: int, seqlen: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` int64 random token ids below the image token id (text only), seed 0."""
    vocab = config.get_text_config().vocab_size
    high = min(vocab, getattr(config, "image_token_id", vocab) or vocab)
    return torch.randint(0, high, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="LLaVA config JSON (benchmarks/configs/)")
    p.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--allocation", default="atp")
    p.add_argument("--beta", type=float, default=0.005, help="ATP's beta (ignored unless --allocation atp)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", default="auto", help="windows per forward pass, or auto")
    p.add_argument("--text-layers", type=int, default=None, help="keep only this many language blocks")
    p.add_argument("--vision-layers", type=int, default=None, help="keep only this many vision layers")
    p.add_argument("--tiny", action="store_true", help="tiny widths too (CPU check)")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    args = p.parse_args(argv)
    beta = args.beta if args.allocation == "atp" else None
    try:
        raw = read_config(args.config, args.text_layers, args.vision_layers, args.tiny)
        blocks = raw["text_config"].get("num_hidden_layers", 32)
        for n in ("nsamples", "seqlen", "text_layers", "vision_layers"):
            value = getattr(args, n)
            if value is not None and value < 1:
                raise ConfigError(f"--{n.replace('_', '-')} must be a positive integer, got {value}")
        batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
        for method in args.methods:
            plan(method, args.sparsity, blocks, allocation=args.allocation, beta=beta)
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is visible (use --device cpu for a check run)")
    except (ConfigError, OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    tflops = matmul_tflops(device, dtype) if device.type == "cuda" else None
    from transformers import LlavaConfig

    windows = token_windows(LlavaConfig.from_dict(copy.deepcopy(raw)), args.nsamples, args.seqlen)
    tokens = windows.numel()
    options = dict(sparsity=args.sparsity, allocation=args.allocation, beta=beta, batch_size=batch_size,
                   progress=False)
    warmup_s = None
    if not args.no_warmup:  # same matrix shapes on two language blocks: kernels, cuBLAS / cuSOLVER handles
        t0 = time.perf_counter()
        small = build(read_config(args.config, 2, 1, args.tiny), device, dtype)
        warm = windows[:min(len(windows), batch_size if isinstance(batch_size, int) else 16)]
        for method in args.methods:
            atprune.prune(small, method=method, calib=warm, **options)
        del small
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        synchronize(device)
        warmup_s = time.perf_counter() - t0
    model, build_s, _ = timed(lambda: build(raw, device, dtype), device)
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    if dtypes != {args.dtype}:
        raise SystemExit(f"the model was built with parameters in {sorted(dtypes)}, not {args.dtype}")
    layout = LAYOUTS[type(model).__name__]
    adapter = Adapter.for_model(model)
    if adapter.blocks_path != layout.blocks:
        raise SystemExit(f"atprune's adapter found {adapter.blocks_path}, not the language blocks {layout.blocks}")
    linears = {f"{i}.{n}": lin for i, b in enumerate(adapter.blocks) for n, lin in adapter.linears(b).items()}
    block_params = sum(lin.weight.numel() for lin in linears.values())
    params = sum(p.numel() for p in model.parameters())
    floor = 2 * 2 * block_params * tokens / (tflops * 1e12) if tflops else None
    t0 = time.perf_counter()
    parts = DenseParts(model)
    zeros_before = dense_zeros(parts)
    digest_s = time.perf_counter() - t0
    text, vision = model.config.text_config, model.config.vision_config
    head = (f"model={type(model).__name__} ({Path(args.config).name}{', tiny' if args.tiny else ''}) "
            f"params={_count(params)} language_blocks={adapter.num_blocks} x {text.hidden_size} wide "
            f"({_count(block_params)} prunable) vision_layers={vision.num_hidden_layers} x {vision.hidden_size} "
            f"device={versions(device)['device']} dtype={args.dtype} calib={args.nsamples}x{args.seqlen} text-only "
            + (f"matmul={tflops:.0f} TFLOP/s floor={floor:.1f}s " if tflops else "")
            + f"build={build_s:.1f}s torch={torch.__version__}")
    print(head, flush=True)
    dense = ({n: lin.weight.detach().to("cpu", copy=True) for n, lin in linears.items()}
             if len(args.methods) > 1 else None)
    meta = {"schema": "atprune.bench.vlm_prune_speed/1", "argv": sys.argv, "header": head,
            "versions": versions(device), "config": raw, "tflops": tflops, "floor_s": floor, "params": params,
            "block_params": block_params, "language_blocks": adapter.num_blocks, "blocks_path": adapter.blocks_path,
            "tokens": tokens, "build_s": build_s, "warmup_s": warmup_s, "digest_s": digest_s}
    rows = []
    for k, method in enumerate(args.methods):
        if k:
            with torch.no_grad():
                for n, lin in linears.items():
                    lin.weight.copy_(dense[n])
        result, seconds, peak = timed(lambda: atprune.prune(model, method=method, calib=windows, **options), device)
        zeros, weights = language_zeros(model)
        report = parts.report()
        after = dense_zeros(parts)
        rates = result.spec["rates"]
        rows.append({"method": method, "sparsity": args.sparsity, "allocation": args.allocation, "beta": beta,
                     "seconds": seconds, "atprune_seconds": result.seconds, "tokens_per_s": tokens / seconds,
                     "peak_gib": peak, "x_floor": seconds / floor if floor else None,
                     "batch_size": result.calibration["batch_size"], "achieved_sparsity": result.overall_sparsity,
                     "language_linear_zeros": zeros / weights, "language_linear_weights": weights,
                     "rate_min": min(rates), "rate_max": max(rates),
                     "dense_parts_unchanged": all(r["unchanged"] for r in report.values()),
                     "dense_parts": {part: r | {"zeros_before": zeros_before[part], "zeros_after": after[part]}
                                     for part, r in report.items()}})
        r = rows[-1]
        if args.out:  # after every prune: a run cut short keeps what it measured
            write_json(args.out, meta | {"rows": rows})
        tps = f"{r['tokens_per_s']:>10.0f}"
        xf = f"{r['x_floor']:>8.2f}" if r["x_floor"] else f"{'-':>8}"
        pk = f"{peak:>9.2f}" if peak is not None else f"{'-':>9}"
        print(f"{method:<10} {seconds:>8.1f}s {tps} tok/s  x floor {xf}  peak {pk} GiB  batch {r['batch_size']:>3}  "
              f"sparsity {r['achieved_sparsity']:.4f} (linears {r['language_linear_zeros']:.4f})  rates "
              f"{min(rates):.4f}..{max(rates):.4f}  dense parts unchanged: {r['dense_parts_unchanged']}", flush=True)
    if args.out:
        print(f"wrote {args.out}")
    return 0 if all(r["dense_parts_unchanged"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
