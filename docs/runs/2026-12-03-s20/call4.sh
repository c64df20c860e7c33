# Session 20 call 4: the planner's S2 plans (OPT-30B under 16 GiB, prompt 512, 32 new tokens) with
# and without compression, each once, then S3 again; JSON reports and times in $OUT/call4.tgz.
B=$PWD/.gpu/bin; L=$(mktemp -d); export PATH=$B:$PATH NCCL_NVLS_ENABLE=0
pack() { tar czf "$OUT/call4.tgz.part" -C "$L" . && mv "$OUT/call4.tgz.part" "$OUT/call4.tgz"; }
t() { local n=$1 lim=$2; shift 2; local s; s=$(date +%s); timeout "$lim" "$@" > "$L/$n.json" 2> "$L/$n.err"; echo "$n rc=$? $(( $(date +%s) - s )) s" >> $L/times.txt; pack; }
cat $B/BUILT_FROM > $L/commit.txt
for p in s2 s2nc; do
  t $p 150 flexgen-run --device cuda --model opt-30b --dummy --policy .gpu/pack/$p.toml --gpu-mem-limit 16GiB --prompt-len 512 --max-new-tokens 32 --json
done
t s3 90 flexgen-run --device cuda --model opt-175b --dummy --percent 100 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1 --compress-weight --compress-cache --prompt-len 512 --max-new-tokens 32 --json
cat $L/times.txt; grep -H '"total_tokens_per_s"\|"decode_tokens_per_s"\|"predicted_tokens_per_s"\|"prefill_s"\|"roofline_fraction"' $L/*.json
