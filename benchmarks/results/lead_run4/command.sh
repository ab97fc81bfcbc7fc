#!/bin/bash
# Lead's device run: generate() tokens/s, decode streamed timing, prefill roofline + top-k, GPU tests subset.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/ic_cache
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( 575 - $(el) )); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/env.txt
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $OUT/env.txt
GEN="--layers 4 --batch 1 --prompts 8192,32768 --new-tokens 32 --chunk 2048 --variants inductor,ours_f4,ours_f4_fused"
DEC="--layers 6 --variants inductor,hand_f8,ours_f8,ours_f8_drop,hand_f4,ours_f4,ours_f4_drop --points 16@32768,64@8192"
mkdir -p $OUT/gen $OUT/dec $OUT/kern
timeout 190 python benchmarks/bench_generate.py --out $OUT/gen $GEN --prewarm-only --prewarm-timeout-s 180 > $OUT/gen/prewarm_console.txt 2>&1 &
timeout 190 python benchmarks/bench_decode_cudagraphs.py --out $OUT/dec $DEC --prewarm-only --prewarm-timeout-s 180 > $OUT/dec/prewarm_console.txt 2>&1 &
wait
echo "[$(el)s] prewarm done" | tee -a $OUT/stages.txt
timeout 170 python benchmarks/bench_decode_cudagraphs.py --out $OUT/dec $DEC --warm-cache --budget-s 160 2>&1 | grep -vi warn > $OUT/dec/console.txt
echo "[$(el)s] decode done" | tee -a $OUT/stages.txt
L=$(left); [ $L -gt 200 ] && L=200
timeout $L python benchmarks/bench_generate.py --out $OUT/gen $GEN --warm-cache --budget-s $(( L - 15 )) 2>&1 | grep -vi warn > $OUT/gen/console.txt
echo "[$(el)s] generate done" | tee -a $OUT/stages.txt
L=$(left)
if [ $L -gt 70 ]; then
  timeout 70 python benchmarks/bench_indexer_kernel.py --out $OUT/kern --sections prefill,topk --quick --budget-s 55 2>&1 | grep -vi warn | tail -30 > $OUT/kern/console.txt
  echo "[$(el)s] kernel bench done" | tee -a $OUT/stages.txt
fi
L=$(left)
if [ $L -gt 30 ]; then
  timeout $L python -m pytest -q -x tests/gpu/test_cross_graph_cudagraphs_gpu.py tests/gpu/test_kernel_substitution_gpu.py tests/gpu/test_indexer_layouts_gpu.py -p no:cacheprovider 2>&1 | tail -15 > $OUT/gpu_tests.txt
  echo "[$(el)s] tests done" | tee -a $OUT/stages.txt
fi
tail -3 $OUT/gpu_tests.txt; grep "^|" $OUT/dec/decode_cudagraphs.md; cat $OUT/gen/generate.md; tail -12 $OUT/kern/console.txt
