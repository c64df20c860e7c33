# Session 25, call 4: call 3's binaries again: the executor check (every placement's tokens
# against the golden greedy run, with the whole module compiled for compute_90a) and S3 as built
# and under GT_WGMMA=8 once more (call 3: 647.0 against 615.2 tok/s). Run from the repository root
# on the GPU machine with .gpu/pack carried: bash docs/runs/2026-12-04-s25/call4.sh
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
mkdir -p "$OUT/main"
PARTS="s3 s3envs executor" S3ENVS="FLEXGEN_NVRTC_DEFINES=GT_WGMMA=8" JOBS=8 OUT=$OUT/main \
  bash xtask/scripts/gpu_first_call.sh .gpu/bin
mkdir -p /tmp/xmain && tar xzf "$OUT/main/first_call.tgz" -C /tmp/xmain && cat /tmp/xmain/times.txt
grep -h "decode_tokens_per_s" /tmp/xmain/s3*.log
tail -3 /tmp/xmain/executor*.log
