#!/bin/bash
# zero-shot measurements for issue 7 (dense, 70% uniform Wanda, 70% ATP Wanda beta 0.0098), LIMIT (default 50) examples per task
set -x
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-src}
PY=${PY:-python}
D=${TASK_DATA:-../shared/data}
L=${LIMIT:-50}  # LIMIT=200 for the limit-200 tables
cd "${OUT_DIR:-.}"
date -u
$PY -m atprune.cli eval --model smollm2-135m --tasks all --task-data $D --limit $L --out dense
date -u
$PY -m atprune.cli prune --model smollm2-135m --method wanda --sparsity 0.7 --calib-data $D/wikitext-2-raw-v1/wiki.valid.raw \
  --nsamples 32 --seqlen 512 --no-eval --no-eval-dense --zero-shot all --task-data $D --zero-shot-limit $L --quiet --json > uniform.json
date -u
$PY -m atprune.cli prune --model smollm2-135m --method wanda --sparsity 0.7 --allocation atp --beta 0.0098 \
  --calib-data $D/wikitext-2-raw-v1/wiki.valid.raw \
  --nsamples 32 --seqlen 512 --no-eval --no-eval-dense --zero-shot all --task-data $D --zero-shot-limit $L --quiet --json > atp.json
date -u
