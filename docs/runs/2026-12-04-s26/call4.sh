# Session 26, call 4: S10 (OPT-175B under a 15 GiB cap, prompt 512, 32 new tokens): the planner's
# policy for this host (12×3, s10-policy.toml) and the one it makes for a host of 150 GB
# (24×2, s10-host150-policy.toml: 127.5 GB of host memory planned, this host has 135 GB), with
# peak RSS. Run from the repository root on the GPU machine with .gpu/pack carried:
#   bash docs/runs/2026-12-04-s26/call4.sh     (reports in $OUT/call4.tgz)
set -u
mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin
B=$PWD/.gpu/bin; L=$(mktemp -d); export PATH=$B:$PATH NCCL_NVLS_ENABLE=0
pack() { tar czf "$OUT/call4.tgz.part" -C "$L" . && mv "$OUT/call4.tgz.part" "$OUT/call4.tgz"; }
cat $B/BUILT_FROM > $L/commit.txt; free -b > $L/free.txt
for p in s10 s10h150; do
  s=$(date +%s)
  timeout 260 flexgen-run --device cuda --model opt-175b --dummy --policy .gpu/pack/$p.toml \
    --gpu-mem-limit 15GiB --prompt-len 512 --max-new-tokens 32 --json > "$L/$p.json" 2> "$L/$p.err"
  echo "$p rc=$? $(( $(date +%s) - s )) s" >> $L/times.txt; pack
done
cat $L/times.txt; grep -H '"peak_rss"\|"total_tokens_per_s"\|"decode_tokens_per_s"\|"predicted_tokens_per_s"\|"prefill_s"\|"roofline_fraction"' $L/*.json
tail -3 $L/s10h150.err
