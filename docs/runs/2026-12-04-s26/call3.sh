# Session 26, call 3: the executor check (462 CUDA runs against the CPU executor; compressed
# weights now also at 1×8 and 100×1, which the fused decode takes since this session). Run from
# the repository root on the GPU machine with .gpu/pack carried:
#   bash docs/runs/2026-12-04-s26/call3.sh
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
mkdir -p "$OUT/main"
PARTS="executor" JOBS=8 OUT=$OUT/main bash xtask/scripts/gpu_first_call.sh .gpu/bin
mkdir -p /tmp/xmain && tar xzf "$OUT/main/first_call.tgz" -C /tmp/xmain && cat /tmp/xmain/times.txt
grep -h "compressed\|sliced" /tmp/xmain/executor*.log | grep -v "^OK" | head -20
tail -3 /tmp/xmain/executor*.log
