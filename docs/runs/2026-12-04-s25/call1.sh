# Session 25, call 1: the 64-row 4-bit product by Hopper's wgmma (GT_WGMMA, default on sm_90a):
# cuda_check and gemv4_bench (checks, then timings) as built, the same under GT_WGMMA=0 (mma.sync,
# as before) and GT_K8=64, Marlin in the same call, Nsight Compute on gemm4_tc_1/_4/_8, and S3
# (the whole module now compiled for compute_90a). Run from the repository root on the GPU
# machine with .gpu/pack carried: bash docs/runs/2026-12-04-s25/call1.sh
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
mkdir -p "$OUT/main"
PARTS="check gemv4 variants marlin s3 ncu" VARIANTS="GT_WGMMA=0;GT_K8=64" OUT=$OUT/main \
  bash xtask/scripts/gpu_first_call.sh .gpu/bin
mkdir -p /tmp/xmain && tar xzf "$OUT/main/first_call.tgz" -C /tmp/xmain && cat /tmp/xmain/times.txt
grep -h "check\|FAIL" /tmp/xmain/gemv4*.log | head -30
grep -h "decode" /tmp/xmain/s3.log | head -5
