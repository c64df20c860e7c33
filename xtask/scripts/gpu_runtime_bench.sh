#!/bin/bash
# Issue 6's GPU benchmarks, ours and the original FlexLLMGen on the same machine, in one or two
# device calls (H200, dummy weights, prompt 512): S4, S1, S8 (gen 32), then S7 (gen 8, 30 % of
# OPT-30B's weights on disk) and S8's largest block. Usage, in the repository root on the GPU
# machine: `bash xtask/scripts/gpu_runtime_bench.sh [part1|part2|part3|part4|all]` (part3: S1c and
# S1cc, part4: S3, issue 7).
# BIN: stripped release binaries (default .gpu/bin); FLEX: FlexLLMGen's source and runner
# (default .gpu/flex, see docs/benchmarks.md). Logs go to $OUT (default /tmp).
set -o pipefail
BIN=${BIN:-.gpu/bin}; FLEX=${FLEX:-.gpu/flex}; OUT=${OUT:-/tmp}; export OUT
export PATH=$PWD/$BIN:$PATH
T="/usr/bin/time -f process_wall=%es_maxRSS=%MKiB"
part=${1:-all}
if [ "$part" = part1 ] || [ "$part" = all ]; then
echo "=== S4 ours"; $T flexgen-run --device cuda --model opt-6.7b --dummy --percent 100 0 100 0 100 0 --gpu-batch-size 64 --num-gpu-batches 1 --prompt-len 512 --max-new-tokens 32 -q --json > $OUT/s4.json 2> $OUT/s4.err; tail -1 $OUT/s4.err; grep -E '"(prefill|decode|total)_tokens_per_s"|"wall_s"' $OUT/s4.json
FLEX_TAG=s4 FLEX_TIMEOUT=200 bash $FLEX/flexllmgen.sh "--model facebook/opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 64 --num-gpu-batches 1 --prompt-len 512 --gen-len 32"
echo "=== S1 ours"; $T flexgen-run --device cuda --model opt-30b --dummy --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --prompt-len 512 --max-new-tokens 32 -q 2>&1 | tee $OUT/s1.log | tail -4
FLEX_TAG=s1 FLEX_TIMEOUT=230 bash $FLEX/flexllmgen.sh "--model facebook/opt-30b --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --prompt-len 512 --gen-len 32"
echo "=== S8 ours"; $T flexgen-run --device cuda --model opt-66b --dummy --percent 50 50 100 0 100 0 --gpu-batch-size 24 --num-gpu-batches 2 --prompt-len 512 --max-new-tokens 32 -q 2>&1 | tee $OUT/s8.log | tail -4
FLEX_TAG=s8 FLEX_TIMEOUT=230 bash $FLEX/flexllmgen.sh "--model facebook/opt-66b --percent 50 50 100 0 100 0 --gpu-batch-size 24 --num-gpu-batches 2 --prompt-len 512 --gen-len 32"
fi
if [ "$part" = part2 ] || [ "$part" = all ]; then
echo "=== S7 ours"; $T flexgen-run --device cuda --model opt-30b --dummy --percent 0 70 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --prompt-len 512 --max-new-tokens 8 --offload-dir /tmp/flexgen-offload -q --json > $OUT/s7.json 2> $OUT/s7.err; tail -2 $OUT/s7.err
grep -E '"(prefill|decode|total)_tokens_per_s"|"wall_s"|disk|roofline|pinned_weights' $OUT/s7.json
rm -rf /tmp/flexgen-offload
(while sleep 10; do echo "$(date +%s) offload_bytes=$(du -sb /tmp/offload 2>/dev/null | cut -f1)"; done) > $OUT/s7_flex_du.log 2>&1 &
du_pid=$!
FLEX_TAG=s7 FLEX_TIMEOUT=330 bash $FLEX/flexllmgen.sh "--model facebook/opt-30b --percent 0 70 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --prompt-len 512 --gen-len 8"
kill $du_pid; sort -t= -k2 -n $OUT/s7_flex_du.log | tail -1
echo "=== S8 32x2 ours (original accounting says it does not fit)"; flexgen-run --device cuda --model opt-66b --dummy --percent 50 50 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --prompt-len 512 --max-new-tokens 32 -q 2>&1 | tail -3
for bs in 28 26; do echo "=== S8 ${bs}x2 ours"; $T flexgen-run --device cuda --model opt-66b --dummy --percent 50 50 100 0 100 0 --gpu-batch-size $bs --num-gpu-batches 2 --prompt-len 512 --max-new-tokens 32 -q > $OUT/s8b.log 2>&1; rc=$?; tail -5 $OUT/s8b.log; [ $rc = 0 ] && break; done
fi
if [ "$part" = part3 ] || [ "$part" = all ]; then
echo "=== S1c ours"; $T flexgen-run --device cuda --model opt-30b --dummy --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --prompt-len 512 --max-new-tokens 32 --compress-weight -q 2>&1 | tee $OUT/s1c.log | tail -5
FLEX_TAG=s1c FLEX_TIMEOUT=300 bash $FLEX/flexllmgen.sh "--model facebook/opt-30b --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --prompt-len 512 --gen-len 32 --compress-weight"
echo "=== S1cc ours (a larger block: the compressed cache takes 0.28 of the bytes)"; $T flexgen-run --device cuda --model opt-30b --dummy --percent 0 100 100 0 100 0 --gpu-batch-size 64 --num-gpu-batches 2 --prompt-len 512 --max-new-tokens 32 --compress-weight --compress-cache -q 2>&1 | tee $OUT/s1cc.log | tail -5
FLEX_TAG=s1cc FLEX_TIMEOUT=300 bash $FLEX/flexllmgen.sh "--model facebook/opt-30b --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --prompt-len 512 --gen-len 32 --compress-weight --compress-cache"
fi
if [ "$part" = part4 ] || [ "$part" = all ]; then
echo "=== S3: OPT-175B, compressed weights and cache, the planner's policy for this machine"
flexgen-plan --hardware policies/hardware/h200.toml --model opt-175b --prompt-len 512 --gen-len 32 --out $OUT/s3.toml --explain 2>&1 | tail -6
$T flexgen-run --device cuda --policy $OUT/s3.toml --model opt-175b --dummy --prompt-len 512 --max-new-tokens 32 -q 2>&1 | tee $OUT/s3.log | tail -5
pct=$(python3 -c "import tomllib;p=tomllib.load(open('$OUT/s3.toml','rb'));pl=p['placement'];print(*[round(pl[k][t]) for k in ('weights','kv_cache','activations') for t in ('gpu','cpu')])")
bs=$(python3 -c "import tomllib;p=tomllib.load(open('$OUT/s3.toml','rb'));print(p['gpu_batch_size'],p['num_gpu_batches'])")
set -- $bs
FLEX_TAG=s3 FLEX_TIMEOUT=400 bash $FLEX/flexllmgen.sh "--model facebook/opt-175b --percent $pct --gpu-batch-size $1 --num-gpu-batches $2 --prompt-len 512 --gen-len 32 --compress-weight --compress-cache"
fi
