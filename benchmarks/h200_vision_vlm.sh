#!/bin/bash
# Prune timings of image classifiers and of a vision-language model on the H200 device machine, random-init models
# of real architectures, in one call: benchmarks/vision_prune_speed.py (DeiT-B and ConvNeXt-B, 4096 images, Wanda
# and SparseGPT at 0.7, ATP at half its legal beta and uniform) and benchmarks/vlm_prune_speed.py (LLaVA-1.5-7B shape,
# 128 x 2048 text-only windows, Wanda and SparseGPT at 0.5, ATP beta 0.005). Expected: about 1 + 2 minutes; each
# script is stopped after VISION_LIMIT / VLM_LIMIT seconds (default 180 / 270, so at most 7.5 minutes), and each
# writes its JSON after every prune, so a run cut short keeps what it measured.
#   usage: bash benchmarks/h200_vision_vlm.sh   (writes $OUT/vision_prune_speed.{json,log}, $OUT/vlm_prune_speed.{json,log})
#   extra flags for either script: VISION_ARGS="--models deit_base_patch16_224" VLM_ARGS="--methods wanda" bash ...
set -u -o pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export ATPRUNE_SOURCE_COMMIT=$(cat .dev/commit 2>/dev/null)  # recorded as atprune_commit_declared (the copy's git lags its files)
echo "commit ${ATPRUNE_SOURCE_COMMIT:-unknown}"; nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv
python3 -c "import atprune, torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"
start=$(date +%s)
timeout ${VISION_LIMIT:-180} python3 benchmarks/vision_prune_speed.py --out "$OUT/vision_prune_speed.json" ${VISION_ARGS:-} \
    2>&1 | tee "$OUT/vision_prune_speed.log"
vision_rc=$?
timeout ${VLM_LIMIT:-270} python3 benchmarks/vlm_prune_speed.py --out "$OUT/vlm_prune_speed.json" ${VLM_ARGS:-} \
    2>&1 | tee "$OUT/vlm_prune_speed.log"
vlm_rc=$?
echo "vision rc=$vision_rc vlm rc=$vlm_rc total $(( $(date +%s) - start ))s"
[ $vision_rc -eq 0 ] && [ $vlm_rc -eq 0 ]
