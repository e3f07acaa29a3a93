"""Markdown tables for docs/performance.md from the JSON records of benchmarks/sparse_bench.sh.

    python benchmarks/sparse_tables.py docs/results/sparse/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def shapes_table(rec: dict) -> str:
    lines = ["| shape (out x in) | sparsity | batch | layers cycled (MB dense) | torch F.linear us | own dense us | "
             "sparse us | speedup (best) | speedup (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["results"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['sparsity']:.0%} | {r['batch']} | {r['layers']} "
                     f"({r['cycled_dense_bytes'] / 1e6:.0f}) | {r['torch_us']:.0f} | {r.get('dense_us', float('nan')):.0f} | "
                     f"{r['sparse_us']:.0f} | **{r['speedup']:.2f}x** | {r['speedup_median']:.2f}x |")
    return "\n".join(lines)


def model_tables(rec: dict) -> str:
    lines = ["| layer shape | layers | batch | torch us | own dense us | sparse us | speedup |",
             "|---|---|---|---|---|---|---|"]
    for r in rec["layers"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['layers']} | {r['batch']} | {r['torch_us']:.1f} | "
                     f"{r.get('dense_us', float('nan')):.1f} | {r['sparse_us']:.1f} | {r['speedup']:.2f}x |")
    lines += ["", "| batch | prefill tok/s dense | sparse | decode tok/s dense | sparse | decode speedup | "
              "dense step ms | of which outside linear | predicted speedup | same greedy tokens |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["end_to_end"]:
        share = r.get("outside_linear_share")
        pred = r.get("predicted_decode_speedup")
        lines.append(f"| {r['batch']} | {r['dense_prefill_tokens_per_s']:.0f} | {r['sparse_prefill_tokens_per_s']:.0f} | "
                     f"{r['dense_decode_tokens_per_s']:.1f} | {r['sparse_decode_tokens_per_s']:.1f} | "
                     f"**{r['decode_speedup']:.2f}x** | {r['dense_decode_step_ms']:.1f} | "
                     f"{'' if share is None else f'{share:.0%}'} | {'' if pred is None else f'{pred:.2f}x'} | "
                     f"{r['same_greedy_tokens']:.0%} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for path in paths:
        rec = json.loads(Path(path).read_text())
        m = rec["machine"]
        print(f"### {Path(path).name}\n")
        print(f"`{rec.get('command')}` -- {m['cpu']}, {m['threads']} threads, {rec['dtype']}, kernel {rec['kernel']}, "
              f"torch {m['torch']}, commit {m['commit']}\n")
        print(shapes_table(rec) if rec["mode"] == "shapes" else model_tables(rec))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
