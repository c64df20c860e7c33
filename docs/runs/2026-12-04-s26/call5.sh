# Session 26, call 5: Llama-3.1-70B under a 24 GiB cap with 4-bit weights and cache allowed, the
# planner's policy for a job of 384 prompts (48×8: a block of eight micro-batches, which the
# fused 4-bit decode now serves; session 8 measured this case dequantizing). Run from the
# repository root on the GPU machine with .gpu/pack carried: bash docs/runs/2026-12-04-s26/call5.sh
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
cat .gpu/bin/BUILT_FROM > "$OUT/commit.txt"
PATH=$PWD/.gpu/bin:$PATH CAPS=24 JOB=384 OUT=$OUT bash xtask/scripts/gpu_llama.sh caps 2>&1 | tee "$OUT/caps.log"
