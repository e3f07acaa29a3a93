#!/usr/bin/env bash
# Sparse inference benchmark (docs/performance.md, "Sparse inference"): the exact commands behind the tables.
# Needs a pruned run folder; the one measured was made with
#   atprune prune --model smollm2-135m --method wanda --sparsity 0.7 --allocation atp --beta 0.01 \
#       --calib-data ../shared/data/wikitext-2-raw-v1/wiki.valid.raw --nsamples 32 --seqlen 512 --no-eval \
#       --out runs/smollm2-wanda70
# Usage: benchmarks/sparse_bench.sh [RUN_FOLDER] [OUT_FOLDER]   (defaults runs/smollm2-wanda70, docs/results/sparse)
set -euo pipefail
RUN=${1:-runs/smollm2-wanda70}
OUT=${2:-docs/results/sparse}
mkdir -p "$OUT"
AT=${ATPRUNE:-atprune}
uptime | tee "$OUT/load_before.txt"
# Per layer, LLaMA-7B MLP shapes, random matrices (distinct layers cycled beyond the last-level cache).
$AT bench --device cpu --shapes 11008x4096 4096x11008 --sparsity 0.5 0.6 0.7 0.8 --dtype bfloat16 --batch 1,4,16 \
    --repeats 15 --json "$OUT/shapes_bf16.json"
$AT bench --device cpu --shapes 11008x4096 4096x11008 --sparsity 0.7 0.8 --dtype float32 --batch 1,4,16 \
    --repeats 15 --json "$OUT/shapes_fp32.json"
# Where the sparse kernel stops paying (tokens per call), for the dense fallback threshold.
$AT bench --device cpu --shapes 4096x11008 --sparsity 0.7 --dtype bfloat16 --batch 1,2,4,8,16,32 \
    --repeats 15 --json "$OUT/crossover_bf16.json"
# End to end on the real pruned SmolLM2, bf16 and float32.
$AT bench --model "$RUN" --device cpu --dtype bfloat16 --batch 1,4,16 --prompt 512 --gen 128 \
    --runs 3 --json "$OUT/smollm2_wanda70_bf16.json"
$AT bench --model "$RUN" --device cpu --dtype float32 --batch 1,4,16 --prompt 512 --gen 128 \
    --runs 3 --json "$OUT/smollm2_wanda70_fp32.json"
uptime | tee "$OUT/load_after.txt"
