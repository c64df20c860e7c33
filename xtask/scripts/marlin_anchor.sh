#!/bin/bash
# Issue 20's same-machine anchor for the 4-bit product: builds marlin_anchor.cu with Marlin's
# kernel (IST-DASLab/marlin, Apache-2.0, not in this repository) and runs it; compare its table
# with gemv4_bench's from the same call.
# Usage, on the GPU machine: marlin_anchor.sh MARLIN_DIR [BUILD_DIR]
#   MARLIN_DIR holds marlin_cuda_kernel.cu, e.g. exported from the fetched repository:
#   git --git-dir=<snapshot> archive HEAD marlin | tar x -C .gpu/pack   (then .gpu/pack/marlin)
set -euo pipefail
# --expt-relaxed-constexpr: Marlin calls a constexpr host function in device code (torch's
# extension builder passes the flag).
src=${1:?usage: marlin_anchor.sh MARLIN_DIR [BUILD_DIR]}
[ -f "$src/marlin_cuda_kernel.cu" ] || { echo "no marlin_cuda_kernel.cu in $src" >&2; exit 2; }
build=${2:-$(mktemp -d)}
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
here=$(cd "$(dirname "$0")" && pwd)
"$nvcc" --version | tail -1
# CUDA 13's ptxas drops Marlin's createpolicy but keeps the cp.async that reads its L2 cache hint
# (IST-DASLab/marlin issue #44: an illegal instruction at run time, seen here with 13.0): the
# weights' copies are built without the hint (evict-first; each weight is read once either way).
python3 - "$src/marlin_cuda_kernel.cu" "$build/marlin_cuda_kernel.cu" <<'PY'
import sys
s = open(sys.argv[1]).read()
old = ('"   .reg .b64 p;\\n"\n    "   createpolicy.fractional.L2::evict_first.b64 p, 1.0;"\n'
       '    "   cp.async.cg.shared.global.L2::cache_hint [%0], [%1], %2, p;\\n"')
assert s.count(old) == 1, "Marlin's cp_async4_stream is not the one this script patches"
open(sys.argv[2], "w").write(s.replace(old, '"   cp.async.cg.shared.global [%0], [%1], %2;\\n"'))
PY
"$nvcc" -O3 -std=c++17 --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 -o "$build/marlin_bench" \
  "$here/marlin_anchor.cu" "$build/marlin_cuda_kernel.cu" -lcublas
[ "${MARLIN_RUN:-1}" = 0 ] || "$build/marlin_bench" # MARLIN_RUN=0: build only
