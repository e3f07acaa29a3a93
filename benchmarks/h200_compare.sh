#!/bin/bash
# The standard-protocol comparison (issue 13) on the H200 device machine, one pruner and a list of sparsities per
# call (each call must end within 10 minutes). Needs, under .dev/ (ignored by git, carried by the device tool):
# .dev/whl (transformers 5.24.0 and gguf 0.19.0 wheels: the machine's transformers 5.17 fails atprune's Gemma check,
# and it has no gguf), .dev/data (wiki.test.raw, c4-sample jsonl), and the SmolLM2 GGUF assembled in /tmp/m by an
# earlier call (two chunks, sha256 checked).
# Gemma 3 270M (253 MB): split it into .dev/g1 (36,000,000 bytes, carried with .dev/whl and .dev/data) and
# .dev/g2..g5 (54,280,000 bytes each, the last the rest); carry one chunk per call while the machine is warm
# (`cat .dev/gN/part >> /tmp/m/gemma.gguf` in each), check the sha256 (a5fd3b62...), then run with
# MODEL=/tmp/m/gemma.gguf.
# DEST (default $OUT) is where the results go: benchmarks/h200_compare_bg.sh starts several of these in the background
# with DEST=/root/bg (they outlive the call while the machine stays warm) and benchmarks/h200_poll.sh brings them back.
# EXTRA adds compare options (e.g. EXTRA=--atp-offset for the attention/MLP offset column).
#   usage: [MODEL=FILE] [DEST=DIR] [EXTRA=...] bash benchmarks/h200_compare.sh METHOD "S1 S2 ..." OUT_NAME
set -euo pipefail
method=$1; sparsities=$2; name=$3
data=${DATA:-.dev/data}  # an earlier call may have left the data in /tmp/data
[ -d /tmp/site/transformers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .dev/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export ATPRUNE_SOURCE_COMMIT=$(cat .dev/commit 2>/dev/null || cat /tmp/commit 2>/dev/null)  # recorded as atprune_commit_declared (the copy's git lags its files)
python3 -c "import transformers, tokenizers, torch; print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
echo "commit $(cat .dev/commit 2>/dev/null || cat /tmp/commit 2>/dev/null || echo unknown)"
python3 -m atprune.cli compare --model "${MODEL:-/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf}" --methods "$method" --sparsities $sparsities \
    --calib-data $data/c4-sample.00000-of-00001.jsonl --eval-data $data/wiki.test.raw \
    --nsamples 128 --nselect 16 --seqlen 2048 --max-trials 6 --tune-peers --atp-on-test ${EXTRA:-} \
    --device cuda --dtype float32 --out "${DEST:-$OUT}/$name" --overwrite 2>&1 | grep -v "it/s\]$" | tee "${DEST:-$OUT}/$name.log"
