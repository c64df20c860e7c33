# Session 25, call 2: call 1's wgmma product with its accumulators kept until the last wait (call
# 1 read 8 of them a thread before it: gemv4_bench's 70-row check failed) and 64 inputs a stage
# by default: cuda_check and gemv4_bench as built, under GT_WGMMA=0 (mma.sync) and GT_K8=32,
# Marlin, Nsight Compute on gemm4_tc_1/_4/_8, and OPT-66B 4-bit all on the GPU at 64×1 (decode
# micro-batches of 64 rows) as built and under GT_WGMMA=0. Run from the repository root on the GPU
# machine with .gpu/pack carried: bash docs/runs/2026-12-04-s25/call2.sh
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
mkdir -p "$OUT/main"
PARTS="check gemv4 variants marlin ncu" VARIANTS="GT_WGMMA=0;GT_K8=32" OUT=$OUT/main \
  bash xtask/scripts/gpu_first_call.sh .gpu/bin
S64=(--device cuda --model opt-66b --dummy --percent 100 0 100 0 100 0 --gpu-batch-size 64
  --num-gpu-batches 1 --compress-weight --compress-cache --prompt-len 512 --max-new-tokens 32 --json)
for d in "" GT_WGMMA=0 ""; do
  echo "=== FLEXGEN_NVRTC_DEFINES=$d" >> "$OUT/s64.log"
  FLEXGEN_NVRTC_DEFINES="$d" timeout 120 .gpu/bin/flexgen-run "${S64[@]}" >> "$OUT/s64.log" 2>&1
  echo "=== rc=$?" >> "$OUT/s64.log"
done
mkdir -p /tmp/xmain && tar xzf "$OUT/main/first_call.tgz" -C /tmp/xmain && cat /tmp/xmain/times.txt
grep -h "check\|FAIL" /tmp/xmain/gemv4*.log | grep -v ": ok\|same values" | head -30
grep -h "===\|decode_tokens_per_s\|prefill_s\|\"gpu_setup_s" "$OUT/s64.log"
