# session 18 call 2: cuda_check, S3 as built and under gemm4_tc_4 tunings, S10 on the planner's new policy
B=$PWD/.gpu/bin; L=$(mktemp -d); export PATH=$B:$PATH NCCL_NVLS_ENABLE=0
pack() { tar czf "$OUT/call2.tgz.part" -C "$L" . && mv "$OUT/call2.tgz.part" "$OUT/call2.tgz"; }
t() { local n=$1 lim=$2; shift 2; local s; s=$(date +%s); timeout "$lim" "$@" > "$L/$n.log" 2>&1; echo "$n rc=$? $(( $(date +%s) - s )) s" >> $L/times.txt; pack; }
cat $B/BUILT_FROM > $L/commit.txt
S3=(--device cuda --model opt-175b --dummy --percent 100 0 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 1 --compress-weight --compress-cache --prompt-len 512 --max-new-tokens 32 --json)
t cuda_check 60 cuda_check
t s3 60 flexgen-run "${S3[@]}"
for v in "GT_MINB4=3" "GT_K=64" "GT_MINB4=5"; do  # s3_GT_MINB4=3 is s3.json here
  FLEXGEN_NVRTC_DEFINES="$v" t "s3_$v" 60 flexgen-run "${S3[@]}"
done
t s10 200 flexgen-run --device cuda --model opt-175b --dummy --policy .gpu/pack/s10.toml --gpu-mem-limit 15GiB --prompt-len 512 --max-new-tokens 32 --json
cat $L/times.txt; grep -H '"decode_tokens_per_s"\|"total_tokens_per_s"\|"predicted_tokens_per_s"\|median_decode' $L/s*.log; grep -h "time decode attention\|time quant" $L/cuda_check.log; tail -1 $L/cuda_check.log
