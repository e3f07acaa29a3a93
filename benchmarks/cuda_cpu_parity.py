"""Same model, same calibration windows, pruned once on the CPU and once on CUDA (both float32): do the results agree?

    python benchmarks/cuda_cpu_parity.py --model /path/SmolLM2-135M-Instruct.Q4_1.gguf \
        --calib wiki.valid.raw --eval wiki.test.raw --methods wanda sparsegpt --sparsity 0.5

For each method: the fraction of weights whose keep/prune decision differs between the two runs (Wanda and
magnitude should give identical masks in float32, up to exact ties of the score), and the WikiText-2 perplexity of
both pruned models, each evaluated on CUDA in float32 over the same windows. Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import sys

import torch

import atprune
from atprune.data import eval_set
from atprune.export import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model spec or path (GGUF file, folder, hub id)")
    p.add_argument("--calib", required=True, help="calibration text file")
    p.add_argument("--eval", required=True, help="evaluation text file (WikiText-2 raw test)")
    p.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only this many windows")
    p.add_argument("--device", default="cuda", help="the device compared with the CPU")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_cpu_parity.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    dense, tokenizer = atprune.load_model(args.model, dtype=torch.float32, device="cpu", progress=False)
    evalset = eval_set(tokenizer, args.eval)
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    rows = []
    for method in args.methods:
        pruned = {}
        for where in ("cpu", device):
            dense.load_state_dict(state)
            model = dense.to(where)
            atprune.prune(model, tokenizer, method=method, sparsity=args.sparsity, calib=args.calib,
                          nsamples=args.nsamples, seqlen=args.seqlen, batch_size="auto", progress=False)
            model.to(device)
            ppl = atprune.evaluate_perplexity(model, tokenizer, evalset, seqlen=args.eval_seqlen, batch_size=8,
                                              max_windows=args.eval_windows, progress=False)["ppl"]
            masks = {n: (m.weight != 0).cpu() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".layers." in n}
            pruned[where if where == "cpu" else "other"] = (ppl, masks)
            model.to("cpu")
        (ppl_cpu, m_cpu), (ppl_gpu, m_gpu) = pruned["cpu"], pruned["other"]
        total = sum(m.numel() for m in m_cpu.values())
        differ = sum((m_cpu[n] != m_gpu[n]).sum().item() for n in m_cpu)
        rows.append({"method": method, "ppl_cpu": ppl_cpu, "ppl_cuda": ppl_gpu,
                     "ppl_rel_diff": abs(ppl_gpu - ppl_cpu) / ppl_cpu, "mask_decisions_differing": differ,
                     "weights": total, "fraction_differing": differ / total})
    head = (f"model={args.model} sparsity={args.sparsity} calib={args.nsamples}x{args.seqlen} float32 "
            f"vs {torch.cuda.get_device_name() if device.type == 'cuda' else device} torch={torch.__version__} eval windows of {args.eval_seqlen}")
    print(head)
    for r in rows:
        print(f"{r['method']:<10} ppl cpu {r['ppl_cpu']:.4f} {args.device} {r['ppl_cuda']:.4f} (rel diff "
              f"{100 * r['ppl_rel_diff']:.3f} %), mask decisions differing {r['mask_decisions_differing']} of "
              f"{r['weights']} ({100 * r['fraction_differing']:.4f} %)")
    if args.json:
        write_json(args.json, {"argv": sys.argv, "header": head, "rows": rows})


if __name__ == "__main__":
    main()
