#!/usr/bin/env bash
# Build DeepGEMM from its public source for benchmarks/bench_deepgemm.py (on a machine with CUDA's nvcc and torch).
#   scripts/build_deepgemm.sh SRC        SRC: a DeepGEMM checkout whose third-party/cutlass and third-party/fmt
#                                        hold the submodules at their pinned commits (include/ is all it needs)
# Prints the PYTHONPATH entry to use. The C++ extension builds in about 75 s on the H200 machine; its kernels
# are compiled at their first call by DeepGEMM's own JIT (nvcc), into DG_JIT_CACHE_DIR.
set -euo pipefail
src=$(realpath "${1:?usage: build_deepgemm.sh SRC}")
for sub in cutlass/include/cutlass cutlass/include/cute fmt/include; do
    [ -d "$src/third-party/$sub" ] || { echo "build_deepgemm: $src/third-party/$sub is missing (the submodules)" >&2; exit 1; }
done
cd "$src"
ln -sfn "$src/third-party/cutlass/include/cutlass" deep_gemm/include/cutlass
ln -sfn "$src/third-party/cutlass/include/cute" deep_gemm/include/cute
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
rm -rf build
DG_USE_LOCAL_VERSION=0 python setup.py build >build.log 2>&1 || { tail -40 build.log >&2; exit 1; }
so=$(find build -name "_C*.so" -type f | head -n 1)
[ -n "$so" ] || { echo "build_deepgemm: no _C*.so under $src/build" >&2; exit 1; }
ln -sfn "$src/$so" deep_gemm/
echo "$src"
