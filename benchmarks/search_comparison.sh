#!/usr/bin/env bash
# Golden vs grid beta search side by side, plus the reconstruction-error analysis, on one model and data.
# Usage: benchmarks/search_comparison.sh MODEL DATA_DIR OUT_DIR [extra atprune options, e.g. --device cuda]
# DATA_DIR holds wiki.valid.raw (calibration + held-out selection windows) and wiki.test.raw (final evaluation).
set -euo pipefail
read -r -a ATPRUNE <<< "${ATPRUNE:-atprune}"  # e.g. ATPRUNE="python3 -m atprune.cli"
model=$1 data=$2 out=$3
shift 3
common=(--model "$model" --method wanda --sparsity 0.7 --calib-data "$data/wiki.valid.raw"
        --nsamples 32 --seqlen 512 --quiet "$@")
mkdir -p "$out"
"${ATPRUNE[@]}" search "${common[@]}" --nselect 16 --eval-data "$data/wiki.test.raw" --strategy golden --max-trials 6 \
    --out "$out/golden" --overwrite | tee "$out/golden.txt"
"${ATPRUNE[@]}" search "${common[@]}" --nselect 16 --eval-data "$data/wiki.test.raw" --strategy grid \
    --out "$out/grid" --overwrite | tee "$out/grid.txt"
beta=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen']['beta'])" "$out/golden/search.json")
"${ATPRUNE[@]}" analyze "${common[@]}" --allocations uniform "atp:0.005" "atp:$beta" --out "$out/analyze" --overwrite \
    | tee "$out/analyze.txt"
