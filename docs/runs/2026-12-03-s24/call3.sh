# Session 24, call 3: the tensor-core order shipped (pack writes it, gemm4_tc and dequant_tc read
# it): gemv4_bench's checks and timings beside Marlin, cuda_check, S3, the engine and executor
# checks (every placement's tokens), and three tunings of the product. Run from the repository
# root on the GPU machine with .gpu/pack carried: bash docs/runs/2026-12-03-s24/call3.sh
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
mkdir -p "$OUT/main"
PARTS="check gemv4 marlin s3 engine" JOBS=8 OUT=$OUT/main bash xtask/scripts/gpu_first_call.sh .gpu/bin
for v in GT_K8=64 GT_STAGES=4 GT_MINB8=3; do
  echo "=== FLEXGEN_NVRTC_DEFINES=$v" >> "$OUT/variants.log"
  FLEXGEN_NVRTC_DEFINES="$v" timeout 100 .gpu/bin/gemv4_bench >> "$OUT/variants.log" 2>&1
  echo "=== rc=$?" >> "$OUT/variants.log"
done
mkdir -p "$OUT/exec"
PARTS="executor" JOBS=8 OUT=$OUT/exec bash xtask/scripts/gpu_first_call.sh .gpu/bin
for d in main exec; do mkdir -p /tmp/x$d && tar xzf "$OUT/$d/first_call.tgz" -C /tmp/x$d && cat /tmp/x$d/times.txt; done
grep -h "check\|FAIL" /tmp/xmain/gemv4.log | head -20
grep -h "rc=" "$OUT/variants.log"
