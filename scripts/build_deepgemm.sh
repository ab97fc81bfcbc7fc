#!/usr/bin/env bash
# Build DeepGEMM from its public source for benchmarks/bench_deepgemm.py (on a machine with CUDA's nvcc and torch).
#   scripts/build_deepgemm.sh SRC        SRC: a DeepGEMM checkout whose third-party/cutlass and third-party/fmt
#                                        hold the submodules at their pinned commits (include/ is all it needs)
# Prints the PYTHONPATH entry to use. The C++ extension builds in about 75 s on the H200 machine; its kernels
# are compiled at their first call by DeepGEMM's own JIT (nvcc), into DG_JIT_CACHE_DIR.
# Built with the system compiler (/usr/bin/g++, LDSHARED="/usr/bin/g++ -shared"): built with the GPU image's
# default g++ wrapper the extension imported and then segfaulted in its JIT include parser's std::regex at the
# first logits call (session 10, benchmarks/results/deepgemm_run10_segfault.txt); with the system g++ 13 it runs
# (H100, 2026-12-05). DG_CC / DG_CXX choose other compilers.
set -euo pipefail
src=$(realpath "${1:?usage: build_deepgemm.sh SRC}")
for sub in cutlass/include/cutlass cutlass/include/cute fmt/include; do
    [ -d "$src/third-party/$sub" ] || { echo "build_deepgemm: $src/third-party/$sub is missing (the submodules)" >&2; exit 1; }
done
# its setup.py imports scripts/generate_pyi.py: a copy of the sources without scripts/ fails after a minute
[ -f "$src/scripts/generate_pyi.py" ] || { echo "build_deepgemm: $src/scripts/generate_pyi.py is missing (DeepGEMM's setup.py imports it: copy the whole checkout)" >&2; exit 1; }
cd "$src"
ln -sfn "$src/third-party/cutlass/include/cutlass" deep_gemm/include/cutlass
ln -sfn "$src/third-party/cutlass/include/cute" deep_gemm/include/cute
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export CC=${DG_CC:-/usr/bin/gcc} CXX=${DG_CXX:-/usr/bin/g++}
for tool in "$CC" "$CXX"; do
    [ -x "$tool" ] || { echo "build_deepgemm: compiler $tool not found (set DG_CC / DG_CXX)" >&2; exit 1; }
done
export LDSHARED="$CXX -shared"
echo "build_deepgemm: $("$CXX" --version | head -n 1), LDSHARED=$LDSHARED" >&2
rm -rf build
DG_USE_LOCAL_VERSION=0 python setup.py build >build.log 2>&1 || { tail -40 build.log >&2; exit 1; }
so=$(find build -name "_C*.so" -type f | head -n 1)
[ -n "$so" ] || { echo "build_deepgemm: no _C*.so under $src/build" >&2; exit 1; }
ln -sfn "$src/$so" deep_gemm/
echo "$src"
