#!/usr/bin/env bash
# What a GPU session runs, one step per device call (each fits the 10-minute limit on an H100; tests/gpu as a whole
# does not). Run from the repository root on the GPU machine; every step writes under $OUT (its output comes back).
#   scripts/gpu_session.sh STEP          STEP: one of the names below; `scripts/gpu_session.sh list` lists them
# Name the card, driver, torch and Triton with every figure: each step prints them first. Benchmark steps write
# results_rows.csv; merge it here with `python scripts/results_tables.py --add <returned>/results_rows.csv`. The
# device's copy of .git can name an older commit: put the commit into the device command from here,
# `BENCH_COMMIT=<git rev-parse --short HEAD> scripts/gpu_session.sh STEP`, or the rows say <old>-dirty and are refused.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/tests:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p "$OUT"

machine() {
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    python -c "import torch, triton; print('torch', torch.__version__, 'Triton', triton.__version__)"
}

# A step's limit in seconds: its own, or STEP_LIMIT_S where that is less (scripts/gpu_chain.sh sets it; the inner
# `timeout` runs in a process group of its own, so only its own limit stops what it started).
limit() { local own=$1; echo $(( ${STEP_LIMIT_S:-$own} < own ? ${STEP_LIMIT_S:-$own} : own )); }

gpu_tests() {  # the files given; each failure's report goes to $OUT/failures.txt as it happens (tests/failure_log.py);
               # a line a test (-v), so a run the deadline cuts says which tests it reached
    FX_INDEXCACHE_TEST_FAILURES="$OUT/failures.txt" timeout "$(limit 540)" python -m pytest -v -p no:cacheprovider "$@" \
        2>&1 | tee -a "$OUT/tests.txt"
}

CONFIGS=fx_indexcache/fuse/kernels/configs
sweep() {  # PRECISION KINDS: sweep, merge each shape's row into the card file, bring the file back
    local rc=0
    mkdir -p "$OUT/configs"
    timeout "$(limit 560)" python benchmarks/sweep_logits_configs.py --out "$OUT" --precision "$1" --kinds "$2" \
        --merge-into "$CONFIGS" || rc=$?
    cp "$CONFIGS"/logits_configs_*.json "$OUT/configs/"
    return $rc
}

# The top-k file is more than one call on an H100: `topk-exact` takes these tests, `graphs` the rest of it.
TOPK_EXACT="test_row_topk_exact or test_the_default_for_one_long_row or test_row_topk_launch_variants or test_last_split_is_race_free or test_cuda_topk_every_path_and_layout or test_cuda_topk_takes_every_path or test_cuda_topk_loads"

step=${1:?usage: gpu_session.sh STEP (gpu_session.sh list)}
STEPS="fused-replay new-kernels decode-kernels kernels fp8 topk-exact graphs generate-cold topk topk-cluster topk-stamps topk-variants topk-binned topk-count-row pdl pdl-parts paged deepgemm fused-bench fused-launches sweep-fp8 sweep-bf16 sweep-decode-fp8 sweep-decode-bf16 sweep-paged-fp8 sweep-prefill-heads decode-default"
if [ "$step" = list ]; then echo "$STEPS"; exit 0; fi
case " $STEPS " in
    *" $step "*) ;;
    *) echo "gpu_session: unknown step $step; steps: $STEPS" >&2; exit 2 ;;
esac
machine | tee "$OUT/machine.txt"
case "$step" in
    fused-replay)    # fused score + top-k, both filters: CUDA-graph replay and compute-sanitizer (about 3 min;
                     # the tests a filter must pass to be the default, first, since new-kernels' rest fills a call)
        gpu_tests tests/gpu/test_fused_score_topk_gpu.py -k "cuda_graph or sanitizer" ;;
    new-kernels)     # fused score + top-k, both filters: against the two-kernel path, every path, masks (about 6.5
                     # min on an H200); the paged decode tests are decode-kernels'
        gpu_tests tests/gpu/test_fused_score_topk_gpu.py -k "not cuda_graph and not sanitizer" ;;
    decode-kernels)  # the logits kernels' launches (decode: key blocks a program) and the paged decode kernel
        gpu_tests tests/gpu/test_lightning_indexer_kernel.py tests/gpu/test_paged_decode_gpu.py ;;
    kernels)         # the substitution, low-precision scores, every layout the matcher knows
        gpu_tests tests/gpu/test_kernel_substitution_gpu.py tests/gpu/test_lowp_scores_gpu.py \
            tests/gpu/test_indexer_layouts_gpu.py ;;
    fp8)             # fp8 scoring and the logits kernel itself
        gpu_tests tests/gpu/test_indexer_fp8_gpu.py tests/gpu/test_lightning_indexer_kernel.py ;;
    topk-exact)      # the top-k kernels' exactness over rows, launches, paths and layouts (about 400 cases: one call)
        gpu_tests tests/gpu/test_topk_and_cudagraphs_gpu.py -k "$TOPK_EXACT" ;;
    graphs)          # the rest of the top-k file (binned, replay, sanitizer, cudagraph trees), CUDA-graph trees
                     # across graphs, transformers' generate under CUDA graphs
        gpu_tests tests/gpu/test_topk_and_cudagraphs_gpu.py -k "not ($TOPK_EXACT)" \
            tests/gpu/test_cross_graph_cudagraphs_gpu.py tests/gpu/test_generate_cudagraphs_gpu.py ;;
    generate-cold)   # generate() under CUDA graphs with every compile cache empty, twice: an empty cache makes
                     # Inductor time pad_mm afresh, and a padded q·k once hid every indexer (padded_products.py)
        for run in 1 2; do
            cold=$(mktemp -d)
            TORCHINDUCTOR_CACHE_DIR=$cold/inductor TRITON_CACHE_DIR=$cold/triton FX_INDEXCACHE_CACHE=$cold/ours \
                gpu_tests tests/gpu/test_generate_cudagraphs_gpu.py --tb=long -rA || true
        done ;;
    topk)            # the CUDA top-k: decode logits + top-k per launch variant, then the exactness and CUDA-graph
                     # tests of its kernels (FX_INDEXCACHE_NVRTC_FLAGS, when set, picks a build variant for both)
        timeout "$(limit 240)" python benchmarks/bench_topk_cuda.py --decode-sweep --out "$OUT"
        gpu_tests tests/gpu/test_topk_and_cudagraphs_gpu.py -k "cuda" ;;
    topk-cluster)    # the cluster rows (sm_90+: a row over a thread-block cluster of eight wide blocks) beside the
                     # default launch and the wide block: replay alone and after the logits (long single rows too),
                     # then the exactness, race, graph and sanitizer tests of the cluster rows and of the default
                     # on long rows, then the cluster's stamps (a -DTOPK_STAMPS build)
        for algorithm in auto cuda_wide cuda_cluster; do
            timeout "$(limit 100)" python benchmarks/bench_topk_phases.py --sections replay --algorithm "$algorithm" \
                --out "$OUT/replay_$algorithm" | grep "^replay" || true
        done
        gpu_tests tests/gpu/test_topk_and_cudagraphs_gpu.py -k "cluster or sanitizer or default_for_one_long_row or auto" \
            || true
        timeout "$(limit 120)" python benchmarks/bench_topk_phases.py --sections stamps --algorithm cuda_cluster \
            --out "$OUT/stamps" | grep "^stamps" || true ;;
    topk-stamps)     # where the wide CUDA top-k block's time goes: its clock at each phase (a -DTOPK_STAMPS build)
        timeout "$(limit 300)" python benchmarks/bench_topk_phases.py --sections stamps --out "$OUT" ;;
    topk-binned)     # the wide block's threshold from the rows' binned counts (topk_cuda.row_bins) against its
                     # sample, and the key-rows logits kernel counting its keys (indexer_logits(bins=...)): the
                     # binned tests, then replay of the top-k alone and of the whole step either way
        gpu_tests tests/gpu/test_topk_and_cudagraphs_gpu.py -k "binned" || true
        timeout "$(limit 150)" python benchmarks/bench_topk_phases.py --sections binned --out "$OUT" \
            | grep "^binned" || true ;;
    topk-count-row)  # the binned entries counting their own row's bins in shared memory (-DTOPK_COUNT_ROW: no sample,
                     # p.bins ignored): the binned tests under that build, then the binned section under each build
                     # (its "binned" top-k is then the self-counting block, against the sampled one)
        FX_INDEXCACHE_NVRTC_FLAGS=-DTOPK_COUNT_ROW gpu_tests tests/gpu/test_topk_and_cudagraphs_gpu.py -k binned || true
        for flags in "" "-DTOPK_COUNT_ROW"; do
            FX_INDEXCACHE_NVRTC_FLAGS="$flags" timeout "$(limit 100)" python benchmarks/bench_topk_phases.py \
                --sections binned --out "$OUT/binned${flags:+_count_row}" | grep "^binned" || true
        done ;;
    pdl)             # programmatic dependent launch off, then on (FX_INDEXCACHE_PDL): replay of the logits and the
                     # top-k; then the programmatic-launch and CUDA-graph GPU tests with it on (the default)
        for pdl in 0 1; do
            FX_INDEXCACHE_PDL=$pdl timeout "$(limit 100)" python benchmarks/bench_topk_phases.py --sections replay \
                --out "$OUT/replay_pdl$pdl" | grep "^replay" || true
        done
        gpu_tests tests/gpu/test_topk_and_cudagraphs_gpu.py -k "programmatic or replay" ;;
    pdl-parts)       # which launch programmatic launch helps or hurts (1 x 256K measured slower with it, after the
                     # wide block): the logits kernel and the top-k each plain or programmatic, medians of five
                     # interleaved rounds; the wide block, then the launch the product picks (auto: the cluster
                     # rows from 64K on)
        for algorithm in cuda_wide auto; do
            timeout "$(limit 280)" python benchmarks/bench_topk_phases.py --sections programmatic_parts \
                --algorithm "$algorithm" --out "$OUT/$algorithm" | grep "^programmatic" || true
        done ;;
    topk-variants)   # build variants of the CUDA top-k (TOPK_VARIANTS: flag sets for FX_INDEXCACHE_NVRTC_FLAGS,
                     # separated by "|"; an empty set is the default build) side by side: exactness on every check
                     # case, then the wide block's stamps and replay time
        IFS='|' read -r -a variants <<< "${TOPK_VARIANTS:?set TOPK_VARIANTS, e.g. '|-DMY_VARIANT=1'}"
        for flags in "${variants[@]}"; do
            name=$(echo "${flags:-default}" | tr -c 'A-Za-z0-9=\n' '_')
            mkdir -p "$OUT/$name"
            FX_INDEXCACHE_NVRTC_FLAGS="$flags" timeout "$(limit 150)" python benchmarks/bench_topk_cuda.py --checks \
                --out "$OUT/$name" > "$OUT/$name/checks.txt" 2>&1 || true
            tail -1 "$OUT/$name/checks.txt"
            FX_INDEXCACHE_NVRTC_FLAGS="$flags" timeout "$(limit 100)" python benchmarks/bench_topk_phases.py \
                --sections replay --out "$OUT/$name/replay" | grep "^replay" || true
            FX_INDEXCACHE_NVRTC_FLAGS="$flags" timeout "$(limit 120)" python benchmarks/bench_topk_phases.py \
                --sections stamps --out "$OUT/$name" | grep "^stamps" || true
        done ;;
    paged)           # the paged decode kernel alone (both kinds of launch, CUDA graphs, compute-sanitizer memcheck)
        gpu_tests tests/gpu/test_paged_decode_gpu.py ;;
    deepgemm)        # ours beside DeepGEMM (built first when DEEPGEMM_SRC names a checkout with its submodules)
        if [ -n "${DEEPGEMM_SRC:-}" ]; then
            export PYTHONPATH="$(scripts/build_deepgemm.sh "$DEEPGEMM_SRC"):$PYTHONPATH"
        fi
        timeout "$(limit 560)" python benchmarks/bench_deepgemm.py --out "$OUT" ;;
    fused-bench)     # logits, logits + top-k and the fused score + top-k, side by side
        timeout "$(limit 560)" python benchmarks/bench_fused_score_topk.py --out "$OUT" ;;
    fused-launches)  # the atomic filter's prefill launches side by side, the default's time by kernel
        timeout "$(limit 560)" python benchmarks/bench_fused_score_topk.py --prefill-launches --out "$OUT" ;;
    sweep-fp8)       # fp8 prefill launch configurations, both logits kernels; each shape's best merged into the
                     # package's card file (later steps of the call use it; $OUT/configs/ brings it back to commit)
        sweep fp8 prefill ;;
    sweep-bf16)      # the same for bf16 prefill
        sweep bf16 prefill ;;
    sweep-decode-fp8)   # fp8 decode: the contiguous kernel (key blocks a program) and the paged one (issue 28 item 3)
        sweep fp8 decode,paged ;;
    sweep-decode-bf16)  # the same in bf16
        sweep bf16 decode,paged ;;
    sweep-paged-fp8)    # fp8 paged decode only (both of its kinds of launch)
        sweep fp8 paged ;;
    sweep-prefill-heads)  # the prefill kernel one head a step against two (the second product issued before the
                          # first's epilogue), around the measured best tile (64 x 128 on 4 warps); not merged
        timeout "$(limit 560)" python benchmarks/sweep_logits_configs.py --out "$OUT" --precision both --kinds prefill \
            --restrict block_s=64 --restrict block_t=128 --restrict num_warps=4 ;;
    decode-default)  # issue 28 item 4: the default (S writes dropped where proven) against hand-written, CUDA graphs
        timeout "$(limit 560)" python benchmarks/bench_decode_cudagraphs.py --out "$OUT" --points 1@32768,16@32768 --prewarm \
            --variants inductor,hand_f4,ours_f4,ours_f4_keep --budget-s 400 ;;
esac
