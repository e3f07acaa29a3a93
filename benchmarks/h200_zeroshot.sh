#!/bin/bash
# Zero-shot accuracy (issue 13, item 4) on the H200: dense, ATP and the best tuned peer at 70 % Wanda on SmolLM2
# (standard protocol: 128 C4 windows x 2048 tokens, float32), each scored by lm-eval with --zero-shot-limit examples
# per task. The beta/eps come from docs/results/compare_standard_wanda70_smollm2.json (chosen on held-out data).
# Needs: the SmolLM2 GGUF in /tmp/m, the data in /tmp/data (h200_compare.sh's first calls), .dev/lmeval (lm-eval
# 0.4.13 and the dependencies the machine lacks, as wheels) and .dev/tasks (the seven task folders of shared/data).
set -u
limit=${LIMIT:-1000}
[ -d /tmp/site2/lm_eval ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .dev/lmeval/*.whl
export PYTHONPATH=/tmp/site:/tmp/site2:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export ATPRUNE_SOURCE_COMMIT=$(cat .dev/commit 2>/dev/null)  # recorded as atprune_commit_declared (the copy's git lags its files)
echo "commit $(cat .dev/commit 2>/dev/null || echo unknown)"
model=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
common="--model $model --method wanda --sparsity 0.7 --calib-data /tmp/data/c4-sample.00000-of-00001.jsonl --nsamples 128 \
  --seqlen 2048 --device cuda --dtype float32 --no-eval --zero-shot all --task-data .dev/tasks --zero-shot-limit $limit"
python3 -m atprune.cli prune $common --allocation atp --beta 0.012786910112066794 --out /tmp/zs-atp --overwrite \
  2>&1 | grep -v "it/s\]$" | tail -25 | tee "$OUT/zs_atp.log"
cp /tmp/zs-atp/report.json "$OUT/zs_atp_report.json"
python3 -m atprune.cli prune $common --no-eval-dense --allocation alphapruning --alloc-opt eps=0.2829800730753092 \
  --out /tmp/zs-ap --overwrite 2>&1 | grep -v "it/s\]$" | tail -15 | tee "$OUT/zs_alphapruning.log"
cp /tmp/zs-ap/report.json "$OUT/zs_alphapruning_report.json"
python3 -m atprune.cli prune $common --no-eval-dense --allocation uniform --out /tmp/zs-uni --overwrite \
  2>&1 | grep -v "it/s\]$" | tail -15 | tee "$OUT/zs_uniform.log"
cp /tmp/zs-uni/report.json "$OUT/zs_uniform_report.json"
