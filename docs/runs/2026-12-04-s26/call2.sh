# Session 26, call 2: the fused 4-bit decode beyond four micro-batches and at 128 rows (the rule
# changed this session) against dequantizing (FLEXGEN_FUSED4=0), OPT-30B with 4-bit weights and
# cache: all on the GPU at 128×1 and 64×4, and the original's T4 policy for OPT-30B compressed
# (everything on the CPU) at 64×4 under 16 GiB. Run from the repository root on the GPU machine
# with .gpu/pack carried: bash docs/runs/2026-12-04-s26/call2.sh   (reports in $OUT/call2.tgz)
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
B=$PWD/.gpu/bin; L=$(mktemp -d); export PATH=$B:$PATH NCCL_NVLS_ENABLE=0
pack() { tar czf "$OUT/call2.tgz.part" -C "$L" . && mv "$OUT/call2.tgz.part" "$OUT/call2.tgz"; }
t() { local n=$1 lim=$2; shift 2; local s; s=$(date +%s); timeout "$lim" "$@" > "$L/$n.json" 2> "$L/$n.err"; echo "$n rc=$? $(( $(date +%s) - s )) s" >> $L/times.txt; pack; }
cat $B/BUILT_FROM > $L/commit.txt
W=(--device cuda --model opt-30b --dummy --compress-weight --compress-cache --prompt-len 512 --max-new-tokens 32 --json)
for r in "gpu_128x1:100 0 100 0 100 0:128:1" "gpu_64x4:100 0 100 0 100 0:64:4" "t4_64x4:0 100 0 100 0 100:64:4"; do
  IFS=: read -r n pct b k <<< "$r"
  lim=(); [ "${n%%_*}" = t4 ] && lim=(--gpu-mem-limit 16GiB)
  t "$n" 100 flexgen-run "${W[@]}" --percent $pct --gpu-batch-size $b --num-gpu-batches $k "${lim[@]}"
  FLEXGEN_FUSED4=0 t "${n}_nofuse" 100 flexgen-run "${W[@]}" --percent $pct --gpu-batch-size $b --num-gpu-batches $k "${lim[@]}"
done
cat $L/times.txt; grep -H '"total_tokens_per_s"\|"decode_tokens_per_s"\|"prefill_s"\|"roofline_fraction"' $L/*.json
