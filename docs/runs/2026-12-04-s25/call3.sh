# Session 25, call 3: the 16- and 32-row tiles by wgmma as well (GT_WGMMA=14, the default on
# sm_90a): cuda_check and gemv4_bench as built, under GT_WGMMA=8 (the 64-row tile only: call 2's)
# and GT_WGMMA=0 (mma.sync), Marlin, S3 (32-row decode) as built and under GT_WGMMA=8, the engine
# check (every app's tokens on CUDA), and OPT-66B 4-bit at 64×1. Run from the repository root on
# the GPU machine with .gpu/pack carried: bash docs/runs/2026-12-04-s25/call3.sh
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
mkdir -p "$OUT/main"
PARTS="check gemv4 variants marlin s3 s3envs engine" VARIANTS="GT_WGMMA=8;GT_WGMMA=0" \
  S3ENVS="FLEXGEN_NVRTC_DEFINES=GT_WGMMA=8" JOBS=8 OUT=$OUT/main \
  bash xtask/scripts/gpu_first_call.sh .gpu/bin
S64=(--device cuda --model opt-66b --dummy --percent 100 0 100 0 100 0 --gpu-batch-size 64
  --num-gpu-batches 1 --compress-weight --compress-cache --prompt-len 512 --max-new-tokens 32 --json)
echo "=== FLEXGEN_NVRTC_DEFINES=" >> "$OUT/s64.log"
timeout 120 .gpu/bin/flexgen-run "${S64[@]}" >> "$OUT/s64.log" 2>&1
echo "=== rc=$?" >> "$OUT/s64.log"
mkdir -p /tmp/xmain && tar xzf "$OUT/main/first_call.tgz" -C /tmp/xmain && cat /tmp/xmain/times.txt
grep -h "check\|FAIL" /tmp/xmain/gemv4*.log | grep -v ": ok\|same values" | head -30
grep -h "decode_tokens_per_s" /tmp/xmain/s3*.log
grep -h "===\|decode_tokens_per_s\|prefill_s" "$OUT/s64.log"
tail -3 /tmp/xmain/engine.log
