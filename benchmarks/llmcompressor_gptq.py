"""llm-compressor's own GPTQ on the same model and calibration windows as benchmarks/quant_quick.py (side by side).

Run in three steps, the middle one in a separate environment holding llm-compressor (it pins compressed-tensors and
transformers versions other than atprune's test environment; torch stays the CPU 2.13.0 build):

    python benchmarks/llmcompressor_gptq.py prepare --model smollm2-135m --calib-data wiki.valid.raw \
        --nsamples 16 --seqlen 256 --work /tmp/lc                    # atprune env: dense folder + windows
    /tmp/lcvenv/bin/python benchmarks/llmcompressor_gptq.py quantize --work /tmp/lc --group-size 64
    python benchmarks/llmcompressor_gptq.py evaluate --work /tmp/lc --eval-data wiki.test.raw --seqlen 256 \
        --eval-windows 12 --out docs/results/llmcompressor_gptq_smollm2.json

``quantize`` runs ``oneshot`` with one ``GPTQModifier`` (W4A16: int4 symmetric, groups of ``--group-size``, no
activation ordering, dampening 0.01, block 128: atprune's defaults) on the very windows atprune calibrated on, and
saves the compressed (pack-quantized) model; ``evaluate`` loads it dequantized and measures perplexity with
atprune's evaluator on the same test windows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def prepare(args) -> None:
    from atprune.data import calibration_windows, load_text
    from atprune.models.sources import load_model

    work = Path(args.work)
    model, tok = load_model(args.model, dtype=torch.float32, device="cpu", progress=False)
    model.save_pretrained(work / "dense")
    tok.save_pretrained(work / "dense")
    calib = calibration_windows(tok, load_text(args.calib_data, "train"), args.nsamples, args.seqlen, 0)
    torch.save(calib.windows, work / "calib.pt")
    (work / "calib.json").write_text(json.dumps(calib.info, indent=2))


def quantize(args) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.work)
    windows = torch.load(work / "calib.pt")
    model = AutoModelForCausalLM.from_pretrained(work / "dense", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(work / "dense")
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=args.group_size)
    recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], actorder=None, dampening_frac=0.01, block_size=128)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1])
    seconds = time.perf_counter() - t0
    model.save_pretrained(work / "llmcompressor-w4", save_compressed=True)
    tok.save_pretrained(work / "llmcompressor-w4")
    import compressed_tensors
    import llmcompressor

    (work / "quantize.json").write_text(json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__,
                                                    "compressed_tensors": compressed_tensors.__version__}, indent=2))


def evaluate(args) -> None:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from atprune.api import evaluate_perplexity
    from atprune.data import eval_set
    from atprune.models.sources import load_model

    work = Path(args.work)
    _, tok = load_model(str(work / "dense"), dtype=torch.float32, device="cpu", progress=False)
    model = AutoModelForCausalLM.from_pretrained(work / "llmcompressor-w4", dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    evalset = eval_set(tok, args.eval_data, "test")
    ev = evaluate_perplexity(model, tok, evalset, seqlen=args.seqlen, max_windows=args.eval_windows, progress=False)
    record = {"calibration": json.loads((work / "calib.json").read_text()),
              "quantize": json.loads((work / "quantize.json").read_text()), "ppl": ev["ppl"], "windows": ev["windows"],
              "config": vars(args)}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"llm-compressor GPTQ w4: ppl {ev['ppl']:.3f} ({ev['windows']} windows)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["prepare", "quantize", "evaluate"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-data")
    p.add_argument("--eval-data")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=12)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--work", required=True)
    p.add_argument("--out")
    args = p.parse_args()
    {"prepare": prepare, "quantize": quantize, "evaluate": evaluate}[args.step](args)


if __name__ == "__main__":
    main()
