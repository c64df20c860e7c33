# Session 26, call 1: (a) the fused 4-bit decode at 1×2 and 1×4 against dequantizing
# (FLEXGEN_FUSED4=0), OPT-6.7B and OPT-30B, 4-bit weights and cache all on the GPU; (b) the
# planner's S2nc plan (OPT-30B fp16 under 16 GiB) as planned and with the activations on the CPU.
# Run from the repository root on the GPU machine with .gpu/pack carried:
#   bash docs/runs/2026-12-04-s26/call1.sh     (JSON reports and times in $OUT/call1.tgz)
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
B=$PWD/.gpu/bin; L=$(mktemp -d); export PATH=$B:$PATH NCCL_NVLS_ENABLE=0
pack() { tar czf "$OUT/call1.tgz.part" -C "$L" . && mv "$OUT/call1.tgz.part" "$OUT/call1.tgz"; }
t() { local n=$1 lim=$2; shift 2; local s; s=$(date +%s); timeout "$lim" "$@" > "$L/$n.json" 2> "$L/$n.err"; echo "$n rc=$? $(( $(date +%s) - s )) s" >> $L/times.txt; pack; }
cat $B/BUILT_FROM > $L/commit.txt
Q=(--device cuda --dummy --percent 100 0 100 0 100 0 --gpu-batch-size 1 --compress-weight --compress-cache --prompt-len 512 --max-new-tokens 32 --json)
for m in opt-6.7b opt-30b; do
  for k in 2 4; do
    t "${m}_1x${k}" 60 flexgen-run --model $m "${Q[@]}" --num-gpu-batches $k
    FLEXGEN_FUSED4=0 t "${m}_1x${k}_nofuse" 60 flexgen-run --model $m "${Q[@]}" --num-gpu-batches $k
  done
done
for p in s2nc s2nc_actcpu; do
  t $p 150 flexgen-run --device cuda --model opt-30b --dummy --policy .gpu/pack/$p.toml --gpu-mem-limit 16GiB --prompt-len 512 --max-new-tokens 32 --json
done
cat $L/times.txt; grep -H '"total_tokens_per_s"\|"decode_tokens_per_s"\|"predicted_tokens_per_s"\|"prefill_s"\|"roofline_fraction"' $L/*.json
