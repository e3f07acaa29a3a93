#!/bin/bash
# The CUDA sparse kernel on the H200 device machine (issue 15): GPU tests, per-layer tables against cuBLAS, and the
# end-to-end decode of a random-init LLaMA-2-7B shape at 70 %, all in one call (compiles the kernel first).
#   usage: bash benchmarks/h200_sparse.sh   (writes under $OUT)
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 ATPRUNE_CACHE_DIR=/tmp/atprune-cache
export ATPRUNE_SOURCE_COMMIT=$(cat .dev/commit 2>/dev/null)  # recorded as atprune_commit_declared (the copy's git lags its files)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
echo "commit $(cat .dev/commit 2>/dev/null || echo unknown)"; nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
time python3 -c "from atprune.sparse import cuda; cuda.extension(); print('kernel built')" 2>&1 | tail -5
python3 -m pytest -q -m gpu tests/test_sparse_cuda.py tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
python3 -m atprune.cli bench --device cuda --shapes 4096x4096 11008x4096 4096x11008 --sparsity 0.5 0.7 0.8 \
    --batch ${BATCHES:-1,4,16} --json "$OUT/sparse_cuda_layers.json" 2>&1 | tee "$OUT/sparse_cuda_layers.log"
python3 -m atprune.cli bench --device cuda --config benchmarks/configs/llama2-7b.json --sparsity 0.7 --batch 1 \
    --prompt 512 --gen 64 --json "$OUT/sparse_cuda_e2e.json" 2>&1 | tee "$OUT/sparse_cuda_e2e.log"
